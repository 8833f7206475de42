"""Fused SwiGLU: ``silu(gate) * up``, the activation of the Llama MLP
(``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, ``act_fn = silu``).

Math, elementwise, with s = sigmoid(g) = 1 / (1 + exp(-g)):

    silu(g) = g s
    y       = silu(g) u

Backward, with dy the incoming gradient, since ds/dg = s (1 - s):

    d silu / dg = s + g s (1 - s) = s (1 + g (1 - s))
    dL/dg = dy u s (1 + g (1 - s))
    dL/du = dy silu(g)

Each kernel loads its operands in their dtype, computes in fp32 and stores in the
inputs' dtype (one rounding per output; torch's ``F.silu(g) * u`` in bf16 / fp16
rounds twice, after the silu and after the product).

What is kept for backward and why: gate and up (the op's inputs, which the MLP's
down_proj backward does not keep), nothing else: the sigmoid and silu are
recomputed in the backward kernel (an elementwise op is bound by memory traffic,
so recomputing costs nothing, while saving y or silu(g) would add an (M, I)
activation).

Layout: inputs are viewed as (M, N) (N the last dimension) with any row stride
and unit column stride (so the two halves of a fused gate_up projection output
go in without a copy); other strides are copied first. Outputs are contiguous.
One program per (BM, BN) tile.

Backends: ``"triton"`` runs the kernels; ``"torch"`` (the CPU path) runs
``_swiglu_fwd_torch`` / ``_swiglu_bwd_torch``, the same contract (fp32 math, one
rounding) in plain torch ops behind the same custom ops; ``"auto"`` picks Triton on
CUDA and torch otherwise. ``swiglu_reference`` is the torch path under its old
public name; the tests compare both backends with their own reference.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import (
    BACKENDS,
    INTERPRET,
    check_triton_tensor,
    fused_apply,
    next_pow2,
    round_bf16,
    rounds_bf16_itself,
)


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


@triton.jit
def _swiglu_fwd_kernel(G, stride_g, U, stride_u, Y, M, N,
                       BM: tl.constexpr, BN: tl.constexpr, RNE: tl.constexpr):
    """y = silu(g) * u for one (BM, BN) tile; Y is contiguous (M, N).
    RNE: bf16 under the interpreter (round with round_bf16 before the cast)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    if RNE:
        y = round_bf16(y)
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, stride_dy, G, stride_g, U, stride_u, DG, DU, M, N,
                       BM: tl.constexpr, BN: tl.constexpr, RNE: tl.constexpr):
    """dg = dy u s (1 + g (1 - s)), du = dy g s (s = sigmoid(g), recomputed) for one
    (BM, BN) tile; DG and DU are contiguous (M, N)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    if RNE:
        dg = round_bf16(dg)
        du = round_bf16(du)
    out = rows[:, None] * N + cols[None, :]
    tl.store(DG + out, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + out, du.to(DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------
# Launchers (all tensors (M, N) with unit column stride; any row stride)
# ----------------------------------------------------------------------------


def _tiles(M: int, N: int) -> tuple[int, int, tuple[int, int], int]:
    """(BM, BN, grid, warps): tiles of about 4096 elements, at most 1024 wide."""
    BN = min(1024, next_pow2(N))
    BM = max(1, min(next_pow2(M), 4096 // BN))
    return BM, BN, (triton.cdiv(M, BM), triton.cdiv(N, BN)), 4 if INTERPRET else 8


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _swiglu_fwd_triton(g, u):
    M, N = g.shape
    y = torch.empty((M, N), dtype=g.dtype, device=g.device)
    BM, BN, grid, warps = _tiles(M, N)
    _swiglu_fwd_kernel[grid](g, g.stride(0), u, u.stride(0), y, M, N, BM=BM, BN=BN, RNE=rounds_bf16_itself(g.dtype),
                             num_warps=warps)
    return y


def _swiglu_bwd_triton(dy, g, u):
    M, N = g.shape
    dg = torch.empty((M, N), dtype=g.dtype, device=g.device)
    du = torch.empty((M, N), dtype=u.dtype, device=u.device)
    BM, BN, grid, warps = _tiles(M, N)
    _swiglu_bwd_kernel[grid](dy, dy.stride(0), g, g.stride(0), u, u.stride(0), dg, du, M, N,
                             BM=BM, BN=BN, RNE=rounds_bf16_itself(g.dtype), num_warps=warps)
    return dg, du


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _swiglu_fwd_torch(g, u):
    """Plain-torch twin of ``_swiglu_fwd_triton``: same contract (fp32 math, one rounding)."""
    ct = _compute_dtype(g.dtype)
    return (torch.nn.functional.silu(g.to(ct)) * u.to(ct)).to(g.dtype).contiguous()


def _swiglu_bwd_torch(dy, g, u):
    """Plain-torch twin of ``_swiglu_bwd_triton``."""
    ct = _compute_dtype(g.dtype)
    gf, uf, dyf = g.to(ct), u.to(ct), dy.to(ct)
    s = torch.sigmoid(gf)
    dg = dyf * uf * s * (1 + gf * (1 - s))
    du = dyf * gf * s
    return dg.to(g.dtype).contiguous(), du.to(u.dtype).contiguous()


# ----------------------------------------------------------------------------
# Autograd: as in rms_norm.py, the custom ops ``rankwise::swiglu`` (with the
# autograd formula) and ``rankwise::swiglu_bwd`` for torch.compile, and an
# autograd.Function twin for eager calls.
# ----------------------------------------------------------------------------


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    """silu(gate) * up for (M, N) gate and up of one dtype; contiguous, in that dtype."""
    gate, up = _unit_stride(gate), _unit_stride(up)
    if backend == "triton" and gate.numel():  # (an empty input goes through the torch twin)
        return _swiglu_fwd_triton(gate, up)
    return _swiglu_fwd_torch(gate, up)


def _swiglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_gate, d_up), contiguous (M, N) in the inputs' dtype."""
    dy, gate, up = _unit_stride(dy), _unit_stride(gate), _unit_stride(up)
    if backend == "triton" and gate.numel():
        return _swiglu_bwd_triton(dy, gate, up)
    return _swiglu_bwd_torch(dy, gate, up)


_swiglu_op = torch.library.custom_op("rankwise::swiglu", _swiglu_fwd, mutates_args=())
_swiglu_bwd_op = torch.library.custom_op("rankwise::swiglu_bwd", _swiglu_bwd, mutates_args=())


@_swiglu_op.register_fake
def _swiglu_fake(gate, up, backend):
    return gate.new_empty(gate.shape)


@_swiglu_bwd_op.register_fake
def _swiglu_bwd_fake(dy, gate, up, backend):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    # Saved: gate and up only; sigmoid / silu are recomputed in backward.
    ctx.save_for_backward(gate, up)
    ctx.backend = backend
    ctx.set_materialize_grads(False)


def _swiglu_backward(ctx, grad_y, bwd):
    """Gradients of (gate, up, backend)."""
    need_g, need_u = ctx.needs_input_grad[:2]
    if grad_y is None or not (need_g or need_u):
        return None, None, None
    gate, up = ctx.saved_tensors
    dg, du = bwd(grad_y, gate, up, ctx.backend)
    return dg if need_g else None, du if need_u else None, None


_swiglu_op.register_autograd(lambda ctx, grad_y: _swiglu_backward(ctx, grad_y, torch.ops.rankwise.swiglu_bwd),
                             setup_context=_swiglu_setup_context)


class SwiGLUFunction(torch.autograd.Function):
    """The eager twin of ``rankwise::swiglu``: same arguments, output and autograd
    formula, the functions called directly."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _swiglu_fwd(*inputs)
        _swiglu_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        return _swiglu_backward(ctx, grad_y, _swiglu_bwd)


# ----------------------------------------------------------------------------
# The torch path, public under its historical name
# ----------------------------------------------------------------------------


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``swiglu(gate, up, backend="torch")``: the plain-torch path (fp32 math, one
    rounding), public under its old name. The tests compare both backends with a
    reference of their own (``tests/helpers.py``: ``F.silu(gate) * up``), not with this."""
    return swiglu(gate, up, backend="torch")


# ----------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------


def _validate(gate, up, backend):
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    for t, name in ((gate, "gate"), (up, "up")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point() or t.dim() < 1:
            raise TypeError(f"{name}: expected a floating-point tensor with at least one dimension, "
                            f"got dtype {t.dtype}, shape {tuple(t.shape)}")
    if up.shape != gate.shape:
        raise ValueError(f"up: expected gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up: expected gate's dtype {gate.dtype}, got {up.dtype}")
    if up.device != gate.device:
        raise ValueError(f"up: expected a tensor on gate's device {gate.device}, got {up.device}")


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` in one kernel (the Llama MLP's ``act_fn(gate_proj(x)) * up_proj(x)``).

    Args:
        gate: shape ``(..., intermediate_size)``, any number of leading dimensions, any
            strides (a row stride alone costs no copy, e.g. a half of a fused gate_up output).
        up: the same shape and dtype as ``gate``.
        backend: ``"triton"`` (the kernels; on the CPU only under ``TRITON_INTERPRET=1``),
            ``"torch"`` (the same math with torch ops) or ``"auto"`` (Triton on CUDA,
            else torch).

    Returns a contiguous tensor of ``gate``'s shape and dtype; the math is done in
    fp32 and rounded once. Gradients flow to ``gate`` and ``up`` (in their dtype),
    computed from the saved ``gate`` and ``up`` alone (silu is recomputed).
    """
    _validate(gate, up, backend)
    if backend == "auto":
        backend = "triton" if gate.is_cuda else "torch"
    if backend == "triton":
        check_triton_tensor(gate, "gate")
        check_triton_tensor(up, "up")
    shape2 = (math.prod(gate.shape[:-1]), gate.shape[-1])
    with torch.autocast(gate.device.type, enabled=False):
        y = fused_apply(SwiGLUFunction, torch.ops.rankwise.swiglu)(gate.reshape(shape2), up.reshape(shape2), backend)
    return y.reshape(gate.shape)
