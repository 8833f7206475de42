"""Fused GeGLU: ``gelu_tanh(gate) * up``, the activation of the Gemma MLP
(``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, ``act_fn = gelu_pytorch_tanh``).

Math, elementwise, with k = sqrt(2 / pi), c = 0.044715 and
z = k (g + c g^3). Since 0.5 (1 + tanh(z)) = sigmoid(2 z), writing s = sigmoid(2 z):

    gelu_tanh(g) = 0.5 g (1 + tanh(z)) = g s
    y            = gelu_tanh(g) u

(the sigmoid form is the same function, and avoids a tanh the interpreter and older
Triton builds lack). Backward, with dy the incoming gradient: ds/dz = 2 s (1 - s)
and dz/dg = k (1 + 3 c g^2), so

    d gelu_tanh / dg = s + g * 2 s (1 - s) * k (1 + 3 c g^2)
    dL/dg = dy u (s + 2 k g s (1 - s) (1 + 3 c g^2))
    dL/du = dy g s

Each kernel loads its operands in their dtype, computes in fp32 and stores in the
inputs' dtype (one rounding per output; torch's ``F.gelu(g, approximate="tanh") * u``
in bf16 / fp16 rounds twice, after the gelu and after the product).

What is kept for backward and why: gate and up (the op's inputs, which the MLP's
down_proj backward does not keep), nothing else: s and the gelu are recomputed in
the backward kernel (elementwise, bound by memory traffic: recomputing is free,
saving y would add an (M, I) activation).

Layout: inputs are viewed as (M, N) with any row stride and unit column stride;
other strides are copied first. Outputs are contiguous. One program per (BM, BN) tile.

Backends: ``"triton"`` runs the kernels; ``"torch"`` runs ``_geglu_fwd_torch`` /
``_geglu_bwd_torch`` (the same contract in plain torch ops, behind the same custom
ops); ``"auto"`` picks Triton on CUDA and torch otherwise. ``geglu_reference`` is
the torch path; the tests compare both backends with a float64 reference of their own.
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

_K = math.sqrt(2.0 / math.pi)
_C = 0.044715


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


@triton.jit
def _geglu_fwd_kernel(G, stride_g, U, stride_u, Y, M, N,
                      BM: tl.constexpr, BN: tl.constexpr, RNE: tl.constexpr):
    """y = g sigmoid(2 k (g + c g^3)) * u for one (BM, BN) tile; Y is contiguous (M, N).
    RNE: bf16 under the interpreter (round with round_bf16 before the cast)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g))
    y = g * s * u
    if RNE:
        y = round_bf16(y)
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(DY, stride_dy, G, stride_g, U, stride_u, DG, DU, M, N,
                      BM: tl.constexpr, BN: tl.constexpr, RNE: tl.constexpr):
    """dg = dy u (s + 2 k g s (1 - s) (1 + 3 c g^2)), du = dy g s (s recomputed) for one
    (BM, BN) tile; DG and DU are contiguous (M, N)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g2 = g * g
    s = tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g2 * g))
    dgelu = s + 2.0 * 0.7978845608028654 * g * s * (1.0 - s) * (1.0 + 3.0 * 0.044715 * g2)
    dg = dy * u * dgelu
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


def _geglu_fwd_triton(g, u):
    M, N = g.shape
    y = torch.empty((M, N), dtype=g.dtype, device=g.device)
    BM, BN, grid, warps = _tiles(M, N)
    _geglu_fwd_kernel[grid](g, g.stride(0), u, u.stride(0), y, M, N, BM=BM, BN=BN, RNE=rounds_bf16_itself(g.dtype),
                            num_warps=warps)
    return y


def _geglu_bwd_triton(dy, g, u):
    M, N = g.shape
    dg = torch.empty((M, N), dtype=g.dtype, device=g.device)
    du = torch.empty((M, N), dtype=u.dtype, device=u.device)
    BM, BN, grid, warps = _tiles(M, N)
    _geglu_bwd_kernel[grid](dy, dy.stride(0), g, g.stride(0), u, u.stride(0), dg, du, M, N,
                            BM=BM, BN=BN, RNE=rounds_bf16_itself(g.dtype), num_warps=warps)
    return dg, du


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _geglu_fwd_torch(g, u):
    """Plain-torch twin of ``_geglu_fwd_triton``: same contract (fp32 math, one rounding)."""
    ct = _compute_dtype(g.dtype)
    return (torch.nn.functional.gelu(g.to(ct), approximate="tanh") * u.to(ct)).to(g.dtype).contiguous()


def _geglu_bwd_torch(dy, g, u):
    """Plain-torch twin of ``_geglu_bwd_triton``."""
    ct = _compute_dtype(g.dtype)
    gf, uf, dyf = g.to(ct), u.to(ct), dy.to(ct)
    s = torch.sigmoid(2 * _K * (gf + _C * gf ** 3))
    dg = dyf * uf * (s + 2 * _K * gf * s * (1 - s) * (1 + 3 * _C * gf * gf))
    du = dyf * gf * s
    return dg.to(g.dtype).contiguous(), du.to(u.dtype).contiguous()


# ----------------------------------------------------------------------------
# Autograd: as in swiglu.py, the custom ops ``rankwise::geglu`` (with the autograd
# formula) and ``rankwise::geglu_bwd`` for torch.compile, and an autograd.Function
# twin for eager calls.
# ----------------------------------------------------------------------------


def _geglu_fwd(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
    """gelu_tanh(gate) * up for (M, N) gate and up of one dtype; contiguous, in that dtype."""
    gate, up = _unit_stride(gate), _unit_stride(up)
    if backend == "triton" and gate.numel():  # (an empty input goes through the torch twin)
        return _geglu_fwd_triton(gate, up)
    return _geglu_fwd_torch(gate, up)


def _geglu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_gate, d_up), contiguous (M, N) in the inputs' dtype."""
    dy, gate, up = _unit_stride(dy), _unit_stride(gate), _unit_stride(up)
    if backend == "triton" and gate.numel():
        return _geglu_bwd_triton(dy, gate, up)
    return _geglu_bwd_torch(dy, gate, up)


_geglu_op = torch.library.custom_op("rankwise::geglu", _geglu_fwd, mutates_args=())
_geglu_bwd_op = torch.library.custom_op("rankwise::geglu_bwd", _geglu_bwd, mutates_args=())


@_geglu_op.register_fake
def _geglu_fake(gate, up, backend):
    return gate.new_empty(gate.shape)


@_geglu_bwd_op.register_fake
def _geglu_bwd_fake(dy, gate, up, backend):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _geglu_setup_context(ctx, inputs, output):
    gate, up, backend = inputs
    # Saved: gate and up only; the sigmoid and the gelu are recomputed in backward.
    ctx.save_for_backward(gate, up)
    ctx.backend = backend
    ctx.set_materialize_grads(False)


def _geglu_backward(ctx, grad_y, bwd):
    """Gradients of (gate, up, backend)."""
    need_g, need_u = ctx.needs_input_grad[:2]
    if grad_y is None or not (need_g or need_u):
        return None, None, None
    gate, up = ctx.saved_tensors
    dg, du = bwd(grad_y, gate, up, ctx.backend)
    return dg if need_g else None, du if need_u else None, None


_geglu_op.register_autograd(lambda ctx, grad_y: _geglu_backward(ctx, grad_y, torch.ops.rankwise.geglu_bwd),
                            setup_context=_geglu_setup_context)


class GeGLUFunction(torch.autograd.Function):
    """The eager twin of ``rankwise::geglu``: same arguments, output and autograd
    formula, the functions called directly."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _geglu_fwd(*inputs)
        _geglu_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        return _geglu_backward(ctx, grad_y, _geglu_bwd)


# ----------------------------------------------------------------------------
# The torch path
# ----------------------------------------------------------------------------


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``geglu(gate, up, backend="torch")``: the plain-torch path (fp32 math, one rounding).
    The tests compare both backends with a float64 reference of their own, not with this."""
    return geglu(gate, up, backend="torch")


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


def geglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``gelu_tanh(gate) * up`` in one kernel (the Gemma MLP's ``act_fn(gate_proj(x)) * up_proj(x)``
    with ``act_fn = gelu_pytorch_tanh``, i.e. ``F.gelu(gate, approximate="tanh")``).

    Args:
        gate: shape ``(..., intermediate_size)``, any number of leading dimensions, any
            strides (a row stride alone costs no copy, e.g. a half of a fused gate_up output).
        up: the same shape and dtype as ``gate``.
        backend: ``"triton"`` (the kernels; on the CPU only under ``TRITON_INTERPRET=1``),
            ``"torch"`` (the same math with torch ops) or ``"auto"`` (Triton on CUDA,
            else torch).

    Returns a contiguous tensor of ``gate``'s shape and dtype; the math is done in
    fp32 and rounded once. Gradients flow to ``gate`` and ``up`` (in their dtype),
    computed from the saved ``gate`` and ``up`` alone (the gelu is recomputed).
    """
    _validate(gate, up, backend)
    if backend == "auto":
        backend = "triton" if gate.is_cuda else "torch"
    if backend == "triton":
        check_triton_tensor(gate, "gate")
        check_triton_tensor(up, "up")
    shape2 = (math.prod(gate.shape[:-1]), gate.shape[-1])
    with torch.autocast(gate.device.type, enabled=False):
        y = fused_apply(GeGLUFunction, torch.ops.rankwise.geglu)(gate.reshape(shape2), up.reshape(shape2), backend)
    return y.reshape(gate.shape)
