"""Fused RMSNorm, as Hugging Face's ``LlamaRMSNorm`` computes it.

Math, for one row x (H values) of the input, weight w (H,) and eps > 0:

    rstd = 1 / sqrt(mean_j x_j^2 + eps)          (fp32: x upcast first)
    n_j  = x_j * rstd                            (fp32, then rounded to x's dtype)
    y_j  = w_j * n_j                             (in promote(x.dtype, w.dtype))

exactly HF's order of operations and roundings
(``weight * (x.float() * rsqrt(x.float().pow(2).mean(-1) + eps)).to(x.dtype)``):
the output dtype is ``torch.promote_types(x.dtype, weight.dtype)``, which is x's
dtype whenever the weight has x's dtype (a model loaded in bf16 / fp16 / fp32),
and fp32 for HF's mixed case of an fp32 weight and half-precision x. The product
w_j * n_j of two half values is exact in fp32, so one rounding of it to the output
dtype is what torch does too.

Backward, with dy the incoming gradient, treating the rounding of n as the
identity and writing n for the fp32 x * rstd. Let g_j = dy_j w_j. Since
d rstd / d x_i = -rstd^3 x_i / H,

    dL/dx_i = sum_j g_j (d n_j / d x_i) = sum_j g_j (rstd [i = j] - x_j rstd^3 x_i / H)
            = rstd (g_i - n_i c),        c = (1/H) sum_j g_j n_j
    dL/dw_j = sum_rows dy_j n_j

dx is computed in fp32 and stored in x's dtype; dw is summed in fp32 (each program
of the backward kernel sums its block of rows into its own fp32 row of a
(programs, H) buffer, and torch sums those rows: deterministic, no atomics), then
cast to the weight's dtype. dw is computed only when the weight requires grad.

What is kept for backward and why: x (the input itself, no copy unless its last
dimension is strided) and rstd (fp32, one value per row), plus the weight. Not the
normalised x: it is recomputed from x and rstd in one multiply, so the saved
activation is x, which the preceding layer's backward usually keeps anyway.

Kernels: the forward runs one program per row; the backward a fixed number of
programs (a few per SM), each over a contiguous block of rows. A row of up to
8192 values (1024 under the interpreter) is held in registers (read once); a
longer row is walked twice in blocks (sum of squares / of g * n, then the outputs).

Backends: ``"triton"`` runs the kernels; ``"torch"`` (the CPU path, and any dtype
torch supports, fp64 included) runs ``_rms_fwd_torch`` / ``_rms_bwd_torch``, the
same contract in plain torch ops behind the same custom ops; ``"auto"`` picks
Triton on CUDA and torch otherwise. ``rms_norm_reference`` is the torch path under
its old public name; the tests compare both backends with their own reference.
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
    cuda_properties,
    fused_apply,
    next_pow2,
    round_bf16,
    rounds_bf16_itself,
)


# Longest row held in registers in one block; longer rows are walked in blocks of this size.
_MAX_BLOCK = 1024 if INTERPRET else 8192


# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


@triton.jit
def _normalize_store(x, rstd, X, W, yrow, cols, mask, X_RNE: tl.constexpr, Y_RNE: tl.constexpr):
    """y = w * round_to_x_dtype(x * rstd) for the fp32 values ``x`` at ``cols``, stored
    at ``yrow + cols`` in the output's dtype (HF's rounding: normalised x in x's dtype)."""
    n = x * rstd
    if X_RNE:
        n = round_bf16(n)
    else:
        n = n.to(X.dtype.element_ty).to(tl.float32)
    y = n * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if Y_RNE:
        y = round_bf16(y)
    tl.store(yrow + cols, y.to(yrow.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_fwd_kernel(X, stride_x, W, Y, stride_y, RSTD, H, eps,
                         BH: tl.constexpr, ONE_BLOCK: tl.constexpr, X_RNE: tl.constexpr, Y_RNE: tl.constexpr):
    """One program per row: rstd = rsqrt(mean(x^2) + eps) into RSTD (fp32),
    y = w * round_to_x_dtype(x * rstd) into Y (Y's dtype).

    ONE_BLOCK: the row fits in one BH block (read once); else two passes over BH blocks.
    X_RNE / Y_RNE: x's / y's dtype is bf16 under the interpreter (round with round_bf16)."""
    row = tl.program_id(0).to(tl.int64)
    xrow = X + row * stride_x
    yrow = Y + row * stride_y
    if ONE_BLOCK:
        cols = tl.arange(0, BH)
        mask = cols < H
        x = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        tl.store(RSTD + row, rstd)
        _normalize_store(x, rstd, X, W, yrow, cols, mask, X_RNE, Y_RNE)
    else:
        acc = tl.zeros([BH], dtype=tl.float32)
        for c0 in range(0, H, BH):
            cols = c0 + tl.arange(0, BH)
            x = tl.load(xrow + cols, mask=cols < H, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / H + eps)
        tl.store(RSTD + row, rstd)
        for c0 in range(0, H, BH):
            cols = c0 + tl.arange(0, BH)
            mask = cols < H
            x = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float32)
            _normalize_store(x, rstd, X, W, yrow, cols, mask, X_RNE, Y_RNE)


@triton.jit
def _rms_norm_bwd_kernel(DY, stride_dy, X, stride_x, W, RSTD, DX, stride_dx, DWP, M, H, rows_per_prog,
                         HAS_DW: tl.constexpr, BH: tl.constexpr, ONE_BLOCK: tl.constexpr, DX_RNE: tl.constexpr):
    """Program p takes rows [p * rows_per_prog, (p + 1) * rows_per_prog) ∩ [0, M).

    Per row, with n = x * rstd and g = dy * w (fp32): c = sum(g * n) / H and
    dx = rstd * (g - n * c) into DX (DX's dtype). HAS_DW: the program's sum over
    its rows of dy * n goes into row p of DWP (fp32, (programs, H), zero-filled).
    ONE_BLOCK: a row fits in one BH block (x and dy read once, the dw partial sum
    kept in registers); else each row is read twice and the partial sum is
    accumulated in DWP's row p, which only program p touches."""
    pid = tl.program_id(0).to(tl.int64)
    r0 = pid * rows_per_prog
    r1 = tl.minimum(r0 + rows_per_prog, M)
    dwp = DWP + pid * H
    if ONE_BLOCK:
        cols = tl.arange(0, BH)
        mask = cols < H
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BH], dtype=tl.float32)
        for row in range(r0, r1):
            rstd = tl.load(RSTD + row)
            n = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32) * rstd
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            g = dy * w
            c = tl.sum(g * n, axis=0) / H
            dx = (g - n * c) * rstd
            if DX_RNE:
                dx = round_bf16(dx)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_DW:
                dw += dy * n
        if HAS_DW:
            tl.store(dwp + cols, dw, mask=mask)
    else:
        for row in range(r0, r1):
            rstd = tl.load(RSTD + row)
            xrow = X + row * stride_x
            dyrow = DY + row * stride_dy
            acc = tl.zeros([BH], dtype=tl.float32)
            for c0 in range(0, H, BH):
                cols = c0 + tl.arange(0, BH)
                mask = cols < H
                n = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float32) * rstd
                dy = tl.load(dyrow + cols, mask=mask, other=0.0).to(tl.float32)
                acc += dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) * n
            c = tl.sum(acc, axis=0) / H
            for c0 in range(0, H, BH):
                cols = c0 + tl.arange(0, BH)
                mask = cols < H
                n = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float32) * rstd
                dy = tl.load(dyrow + cols, mask=mask, other=0.0).to(tl.float32)
                g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
                dx = (g - n * c) * rstd
                if DX_RNE:
                    dx = round_bf16(dx)
                tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if HAS_DW:
                    p = tl.load(dwp + cols, mask=mask, other=0.0)
                    tl.store(dwp + cols, p + dy * n, mask=mask)


# ----------------------------------------------------------------------------
# Launchers (x, dy: (M, H) with unit column stride; any row stride)
# ----------------------------------------------------------------------------


def _block(H: int) -> tuple[int, bool, int]:
    """(block width, whether a row fits in one block, warps)."""
    BH = min(_MAX_BLOCK, next_pow2(H))
    # 16 warps from 4096 on: at 8 the backward's row state (x, dy, w, dw) spills on sm_90
    warps = 4 if (INTERPRET or BH <= 1024) else (8 if BH <= 2048 else 16)
    return BH, next_pow2(H) <= _MAX_BLOCK, warps


def _bwd_programs(M: int, device: torch.device) -> int:
    """Programs of the backward kernel: two per SM on a GPU (4 under the interpreter),
    at most one per row. Each writes one fp32 row of dw partial sums."""
    if device.type != "cuda":
        return max(1, min(M, 4))
    return max(1, min(M, 2 * cuda_properties(device).multi_processor_count))


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` (M, H) with unit column stride (a copy only when it has none)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _rms_fwd_triton(x, w, eps, out_dtype):
    M, H = x.shape
    y = torch.empty((M, H), dtype=out_dtype, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    BH, one, warps = _block(H)
    _rms_norm_fwd_kernel[(M,)](x, x.stride(0), w, y, y.stride(0), rstd, H, eps,
                               BH=BH, ONE_BLOCK=one, X_RNE=rounds_bf16_itself(x.dtype), Y_RNE=rounds_bf16_itself(out_dtype), num_warps=warps)
    return y, rstd


def _rms_bwd_triton(dy, x, w, rstd, need_w):
    M, H = x.shape
    dx = torch.empty((M, H), dtype=x.dtype, device=x.device)
    rows = triton.cdiv(M, _bwd_programs(M, x.device))
    G = triton.cdiv(M, rows)  # no program without rows
    dwp = torch.zeros((G, H) if need_w else (0,), dtype=torch.float32, device=x.device)
    BH, one, warps = _block(H)
    _rms_norm_bwd_kernel[(G,)](dy, dy.stride(0), x, x.stride(0), w, rstd, dx, dx.stride(0), dwp, M, H, rows,
                               HAS_DW=need_w, BH=BH, ONE_BLOCK=one, DX_RNE=rounds_bf16_itself(x.dtype), num_warps=warps)
    return dx, (dwp.sum(0) if need_w else dwp)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half inputs (as HF), the input's own dtype when wider (fp64: the torch backend)."""
    return torch.promote_types(dtype, torch.float32)


def _rms_fwd_torch(x, w, eps, out_dtype):
    """Plain-torch twin of ``_rms_fwd_triton``: same contract (HF's operations)."""
    xf = x.to(_compute_dtype(x.dtype))
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    y = w * (xf * rstd[:, None]).to(x.dtype)
    return y.to(out_dtype).contiguous(), rstd.to(_compute_dtype(x.dtype))


def _rms_bwd_torch(dy, x, w, rstd, need_w):
    """Plain-torch twin of ``_rms_bwd_triton``: dx = rstd (g - n mean(g n)), dw = sum dy n."""
    ct = _compute_dtype(x.dtype)
    n = x.to(ct) * rstd.to(ct)[:, None]
    dyf = dy.to(ct)
    g = dyf * w.to(ct)
    dx = ((g - n * (g * n).mean(-1, keepdim=True)) * rstd.to(ct)[:, None]).to(x.dtype).contiguous()
    dw = (dyf * n).sum(0) if need_w else x.new_empty(0, dtype=ct)
    return dx, dw


# ----------------------------------------------------------------------------
# Autograd: one forward, one setup_context, one backward, used twice (as in
# linear_cross_entropy.py): as the torch.library custom ops ``rankwise::rms_norm``
# (carrying the autograd formula) and ``rankwise::rms_norm_bwd`` for
# torch.compile, and as an autograd.Function calling the same functions
# directly for eager calls. The forward returns (y, rstd): rstd is an output so
# that it can be saved (a custom op's intermediates are invisible to autograd);
# it is non-differentiable.
# ----------------------------------------------------------------------------


def _rms_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (M, H) in promote(x.dtype, weight.dtype), rstd (M,) fp32 (fp64 for fp64 x))
    for x (M, H) and weight (H,)."""
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    x = _unit_stride(x)
    if backend == "triton" and x.numel():  # (an empty input goes through the torch twin)
        return _rms_fwd_triton(x, weight.contiguous(), eps, out_dtype)
    return _rms_fwd_torch(x, weight, eps, out_dtype)


def _rms_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, backend: str,
             need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (M, H) in x's dtype, dw (H,) fp32 (fp64 for fp64 x), or empty unless ``need_weight``)."""
    dy, x = _unit_stride(dy), _unit_stride(x)
    if backend == "triton" and x.numel():
        return _rms_bwd_triton(dy, x, weight.contiguous(), rstd.contiguous(), need_weight)
    return _rms_bwd_torch(dy, x, weight, rstd, need_weight)


_rms_op = torch.library.custom_op("rankwise::rms_norm", _rms_fwd, mutates_args=())
_rms_bwd_op = torch.library.custom_op("rankwise::rms_norm_bwd", _rms_bwd, mutates_args=())


@_rms_op.register_fake
def _rms_fake(x, weight, eps, backend):
    return (x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype)),
            x.new_empty(x.shape[:1], dtype=_compute_dtype(x.dtype)))


@_rms_bwd_op.register_fake
def _rms_bwd_fake(dy, x, weight, rstd, backend, need_weight):
    return x.new_empty(x.shape), x.new_empty(weight.shape if need_weight else (0,), dtype=_compute_dtype(x.dtype))


def _rms_setup_context(ctx, inputs, output):
    x, weight, eps, backend = inputs
    _, rstd = output
    # Saved: x and rstd (one fp32 value per row), and the weight; not the normalised
    # x (recomputed as x * rstd in backward).
    ctx.save_for_backward(x, weight, rstd)
    ctx.backend = backend
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)


def _rms_backward(ctx, grad_y, bwd):
    """Gradients of (x, weight, eps, backend); dw only when the weight requires grad."""
    need_x, need_w = ctx.needs_input_grad[:2]
    if grad_y is None or not (need_x or need_w):
        return None, None, None, None
    x, weight, rstd = ctx.saved_tensors
    dx, dw = bwd(grad_y, x, weight, rstd, ctx.backend, need_w)
    return dx if need_x else None, dw.to(weight.dtype) if need_w else None, None, None


_rms_op.register_autograd(lambda ctx, grad_y, _grad_rstd: _rms_backward(ctx, grad_y, torch.ops.rankwise.rms_norm_bwd),
                          setup_context=_rms_setup_context)


class RMSNormFunction(torch.autograd.Function):
    """The eager twin of ``rankwise::rms_norm``: same arguments, outputs and
    autograd formula, the functions called directly."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _rms_fwd(*inputs)
        _rms_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_rstd):
        return _rms_backward(ctx, grad_y, _rms_bwd)


# ----------------------------------------------------------------------------
# The torch path, public under its historical name
# ----------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``rms_norm(x, weight, eps, backend="torch")``: the plain-torch path (Hugging
    Face's ``LlamaRMSNorm`` operations; fp64 inputs stay fp64), public under its old
    name. The tests compare both backends with a reference of their own
    (``tests/helpers.py``), not with this."""
    return rms_norm(x, weight, eps, backend="torch")


# ----------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------


def _validate(x, weight, eps, backend):
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    for t, name in ((x, "x"), (weight, "weight")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not x.is_floating_point() or x.dim() < 1:
        raise TypeError(f"x: expected a floating-point tensor of shape (..., hidden_size), "
                        f"got dtype {x.dtype}, shape {tuple(x.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating-point tensor, got dtype {weight.dtype}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight: expected shape ({x.shape[-1]},) (x's last dimension), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight: expected a tensor on x's device {x.device}, got {weight.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of ``x`` over its last dimension, scaled by ``weight``: Hugging Face's
    ``LlamaRMSNorm`` (``weight * (x / sqrt(mean(x^2, -1) + eps))``) in one kernel.

    Args:
        x: shape ``(..., hidden_size)``, any number of leading dimensions, any strides.
        weight: shape ``(hidden_size,)``; gets a gradient when it requires grad
            (summed over rows in fp32, deterministically), else none is computed.
        eps: added to the mean square, > 0 (Llama: ``config.rms_norm_eps``).
        backend: ``"triton"`` (the kernels; on the CPU only under ``TRITON_INTERPRET=1``),
            ``"torch"`` (the same math with torch ops) or ``"auto"`` (Triton on CUDA,
            else torch).

    Dtypes, as HF: the statistics and the normalisation in fp32, the normalised x
    rounded to x's dtype and then multiplied by the weight; the result has dtype
    ``torch.promote_types(x.dtype, weight.dtype)``: x's dtype when the weight has it,
    fp32 for an fp32 weight with half-precision x. Gradients: dx in x's dtype
    (computed in fp32), dweight in the weight's dtype. Autocast does not change any of
    this (as for HF's module, whose ops autocast leaves alone).

    Saved for backward: x and one fp32 rstd per row (and the weight), not the
    normalised x.
    """
    _validate(x, weight, eps, backend)
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    if backend == "triton":
        check_triton_tensor(x, "x")
        check_triton_tensor(weight, "weight")
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        y, _ = fused_apply(RMSNormFunction, torch.ops.rankwise.rms_norm)(x2, weight, float(eps), backend)
    return y.reshape(x.shape)
