"""Fused gated activations ``act(gate) * up``: SwiGLU (``act = silu``, the Llama MLP) and
GeGLU (``act = gelu_tanh``, the Gemma MLP), ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.

One pair of kernels and one torch path serve both; the activation is a compile-time
constant (``ACT``). Math, elementwise, with dy the incoming gradient:

SwiGLU, with s = sigmoid(g) = 1 / (1 + exp(-g)) and ds/dg = s (1 - s):

    y     = silu(g) u = g s u
    dL/dg = dy u (s + g s (1 - s)) = dy u s (1 + g (1 - s))
    dL/du = dy g s

GeGLU, with k = sqrt(2 / pi), c = 0.044715, z = k (g + c g^3); since
0.5 (1 + tanh(z)) = sigmoid(2 z), write s = sigmoid(2 z) (the same function, without
a tanh the interpreter and older Triton builds lack); ds/dz = 2 s (1 - s) and
dz/dg = k (1 + 3 c g^2):

    y     = gelu_tanh(g) u = 0.5 g (1 + tanh(z)) u = g s u
    dL/dg = dy u (s + 2 k g s (1 - s) (1 + 3 c g^2))
    dL/du = dy g s

In both, y = g s u and dL/du = dy g s; only s and the derivative of ``act`` differ.

Each kernel loads its operands in their dtype, computes in fp32 and stores in the
inputs' dtype (one rounding per output; torch's ``act(g) * u`` in bf16 / fp16 rounds
twice, after the activation and after the product).

What is kept for backward and why: gate and up (the op's inputs, which the MLP's
down_proj backward does not keep), nothing else: s and the activation are recomputed
in the backward kernel (an elementwise op is bound by memory traffic, so recomputing
costs nothing, while saving y or act(g) would add an (M, I) activation).

Layout: inputs are viewed as (M, N) (N the last dimension) with any row stride
and unit column stride (so the two halves of a fused gate_up projection output
go in without a copy); other strides are copied first. Outputs are contiguous.
One program per (BM, BN) tile.

Backends: ``"triton"`` runs the kernels; ``"torch"`` (the CPU path) runs
``_gated_fwd_torch`` / ``_gated_bwd_torch``, the same contract (fp32 math, one
rounding) in plain torch ops behind the same custom ops; ``"auto"`` picks Triton on
CUDA and torch otherwise. ``swiglu_reference`` / ``geglu_reference`` are the torch
paths; the tests compare both backends with float64 references of their own.
``kernels/geglu.py`` re-exports the GeGLU names.
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

SILU, GELU_TANH = 0, 1  # the ACT constant of the kernels
_K = math.sqrt(2.0 / math.pi)
_C = 0.044715


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


@triton.jit
def _act_s(g, ACT: tl.constexpr):
    """s with act(g) = g s: sigmoid(g) (SILU) or sigmoid(2 k (g + c g^3)) (GELU_TANH)."""
    if ACT == 0:
        s = tl.sigmoid(g)
    else:
        s = tl.sigmoid(2.0 * 0.7978845608028654 * (g + 0.044715 * g * g * g))
    return s


@triton.jit
def _gated_fwd_kernel(G, stride_g, U, stride_u, Y, M, N,
                      BM: tl.constexpr, BN: tl.constexpr, RNE: tl.constexpr, ACT: tl.constexpr):
    """y = g s u for one (BM, BN) tile; Y is contiguous (M, N).
    RNE: bf16 under the interpreter (round with round_bf16 before the cast)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = g * _act_s(g, ACT) * u
    if RNE:
        y = round_bf16(y)
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(DY, stride_dy, G, stride_g, U, stride_u, DG, DU, M, N,
                      BM: tl.constexpr, BN: tl.constexpr, RNE: tl.constexpr, ACT: tl.constexpr):
    """dg = dy u act'(g), du = dy g s (s recomputed) for one (BM, BN) tile; DG and DU
    are contiguous (M, N)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _act_s(g, ACT)
    if ACT == 0:
        dact = s * (1.0 + g * (1.0 - s))
    else:
        dact = s + 2.0 * 0.7978845608028654 * g * s * (1.0 - s) * (1.0 + 3.0 * 0.044715 * g * g)
    dg = dy * u * dact
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


def _gated_fwd_triton(g, u, act: int):
    M, N = g.shape
    y = torch.empty((M, N), dtype=g.dtype, device=g.device)
    BM, BN, grid, warps = _tiles(M, N)
    _gated_fwd_kernel[grid](g, g.stride(0), u, u.stride(0), y, M, N, BM=BM, BN=BN, RNE=rounds_bf16_itself(g.dtype),
                            ACT=act, num_warps=warps)
    return y


def _gated_bwd_triton(dy, g, u, act: int):
    M, N = g.shape
    dg = torch.empty((M, N), dtype=g.dtype, device=g.device)
    du = torch.empty((M, N), dtype=u.dtype, device=u.device)
    BM, BN, grid, warps = _tiles(M, N)
    _gated_bwd_kernel[grid](dy, dy.stride(0), g, g.stride(0), u, u.stride(0), dg, du, M, N,
                            BM=BM, BN=BN, RNE=rounds_bf16_itself(g.dtype), ACT=act, num_warps=warps)
    return dg, du


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _gated_fwd_torch(g, u, act: int):
    """Plain-torch twin of ``_gated_fwd_triton``: same contract (fp32 math, one rounding)."""
    ct = _compute_dtype(g.dtype)
    gf = g.to(ct)
    a = torch.nn.functional.silu(gf) if act == SILU else torch.nn.functional.gelu(gf, approximate="tanh")
    return (a * u.to(ct)).to(g.dtype).contiguous()


def _gated_bwd_torch(dy, g, u, act: int):
    """Plain-torch twin of ``_gated_bwd_triton``."""
    ct = _compute_dtype(g.dtype)
    gf, uf, dyf = g.to(ct), u.to(ct), dy.to(ct)
    if act == SILU:
        s = torch.sigmoid(gf)
        dact = s * (1 + gf * (1 - s))
    else:
        s = torch.sigmoid(2 * _K * (gf + _C * gf ** 3))
        dact = s + 2 * _K * gf * s * (1 - s) * (1 + 3 * _C * gf * gf)
    return (dyf * uf * dact).to(g.dtype).contiguous(), (dyf * gf * s).to(u.dtype).contiguous()


# ----------------------------------------------------------------------------
# Autograd: as in rms_norm.py, per activation the custom ops ``rankwise::<name>``
# (with the autograd formula) and ``rankwise::<name>_bwd`` for torch.compile, and an
# autograd.Function twin for eager calls.
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


def _gated_op(name: str, act: int):
    """The custom ops ``rankwise::<name>`` and ``rankwise::<name>_bwd``, the eager twin, and the
    function ``(gate, up, backend) -> act(gate) * up`` that dispatches between them."""

    def fwd(gate: torch.Tensor, up: torch.Tensor, backend: str) -> torch.Tensor:
        """act(gate) * up for (M, N) gate and up of one dtype; contiguous, in that dtype."""
        gate, up = _unit_stride(gate), _unit_stride(up)
        if backend == "triton" and gate.numel():  # (an empty input goes through the torch twin)
            return _gated_fwd_triton(gate, up, act)
        return _gated_fwd_torch(gate, up, act)

    def bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, backend: str
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(d_gate, d_up), contiguous (M, N) in the inputs' dtype."""
        dy, gate, up = _unit_stride(dy), _unit_stride(gate), _unit_stride(up)
        if backend == "triton" and gate.numel():
            return _gated_bwd_triton(dy, gate, up, act)
        return _gated_bwd_torch(dy, gate, up, act)

    op = torch.library.custom_op(f"rankwise::{name}", fwd, mutates_args=())
    bwd_op = torch.library.custom_op(f"rankwise::{name}_bwd", bwd, mutates_args=())
    op.register_fake(lambda gate, up, backend: gate.new_empty(gate.shape))
    bwd_op.register_fake(lambda dy, gate, up, backend: (gate.new_empty(gate.shape), up.new_empty(up.shape)))

    def setup_context(ctx, inputs, output):
        gate, up, backend = inputs
        # Saved: gate and up only; s and the activation are recomputed in backward.
        ctx.save_for_backward(gate, up)
        ctx.backend = backend
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_y, bwd_fn):
        """Gradients of (gate, up, backend)."""
        need_g, need_u = ctx.needs_input_grad[:2]
        if grad_y is None or not (need_g or need_u):
            return None, None, None
        gate, up = ctx.saved_tensors
        dg, du = bwd_fn(grad_y, gate, up, ctx.backend)
        return dg if need_g else None, du if need_u else None, None

    op.register_autograd(lambda ctx, grad_y: backward(ctx, grad_y, getattr(torch.ops.rankwise, f"{name}_bwd")),
                         setup_context=setup_context)

    class Function(torch.autograd.Function):
        """The eager twin of the custom op: same arguments, output and autograd formula."""

        @staticmethod
        def forward(ctx, *inputs):
            output = fwd(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_y):
            return backward(ctx, grad_y, bwd)

    Function.__name__ = Function.__qualname__ = f"{name.capitalize()}Function"

    def apply(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        _validate(gate, up, backend)
        if backend == "auto":
            backend = "triton" if gate.is_cuda else "torch"
        if backend == "triton":
            check_triton_tensor(gate, "gate")
            check_triton_tensor(up, "up")
        shape2 = (math.prod(gate.shape[:-1]), gate.shape[-1])
        with torch.autocast(gate.device.type, enabled=False):
            y = fused_apply(Function, getattr(torch.ops.rankwise, name))(gate.reshape(shape2), up.reshape(shape2),
                                                                        backend)
        return y.reshape(gate.shape)

    return Function, apply


SwiGLUFunction, _swiglu = _gated_op("swiglu", SILU)
GeGLUFunction, _geglu = _gated_op("geglu", GELU_TANH)


# ----------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------


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
    return _swiglu(gate, up, backend)


def geglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``gelu_tanh(gate) * up`` in one kernel (the Gemma MLP's ``act_fn(gate_proj(x)) * up_proj(x)``
    with ``act_fn = gelu_pytorch_tanh``, i.e. ``F.gelu(gate, approximate="tanh")``).

    Arguments, result and gradients as :func:`swiglu` (the gelu is recomputed in backward).
    """
    return _geglu(gate, up, backend)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``swiglu(gate, up, backend="torch")``: the plain-torch path (fp32 math, one
    rounding), public under its old name. The tests compare both backends with a
    reference of their own (``tests/helpers.py``: ``F.silu(gate) * up``), not with this."""
    return swiglu(gate, up, backend="torch")


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``geglu(gate, up, backend="torch")``: the plain-torch path (fp32 math, one rounding).
    The tests compare both backends with a float64 reference of their own, not with this."""
    return geglu(gate, up, backend="torch")
