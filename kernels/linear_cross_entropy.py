"""Fused linear + cross entropy: the output head and the loss without the full logits.

Math, for hidden states h (N, H), head weight W (V, H), optional bias b (V,) and
targets t (N,) (``ignore_index`` marks rows without a target):

    z_i    = h_i W^T + b                        (one row of logits, V values)
    lse_i  = log sum_j exp(z_ij)                (fp32, online max/sum over V blocks)
    loss_i = lse_i - z_{i, t_i}                 (0 for an ignored row)
    L      = sum_i loss_i        (reduction "sum")
           = L_sum / n_valid     ("mean", n_valid = number of rows with a target; 0/0 = nan as in torch)
           = (loss_i)_i          ("none")

Backward: with g_i = dL/dloss_i (1, 1 / n_valid, or the incoming per-row gradient;
0 for an ignored row), since d lse_i / d z_ij = softmax_ij and d z_{i,t_i} / d z_ij = [j = t_i]:

    dz_ij = g_i (softmax_ij - [j = t_i])
    dh    = dz W,    dW = dz^T h,    db = sum_i dz_i

The (N, V) logits are the largest activation of a language model's training
step (N = 8192 tokens at V = 128k is 4 GiB in fp32). Here the rows go through in
chunks of C rows: the chunk's logits are computed by one GEMM, one Triton program
per row turns them into loss_i and, in the same buffer, dz (two passes over the
row: online max/sum, then softmax - one-hot), and two GEMMs turn dz into the
chunk's dh and its share of dW. Peak extra memory is one (C, V) chunk.

What is kept for backward and why:
- reduction "mean"/"sum" with gradients needed: the gradient is computed during
  the forward pass (the scalar incoming gradient only scales it), so backward is
  one multiply; kept are dh (the size of h), and dW (fp32) / db only when the head
  weight / bias require grad. No logits and no h are kept.
- reduction "none" (per-row incoming gradients), or no grad at forward time:
  kept are h, W, b, t; backward recomputes each chunk's logits (one more GEMM).

Backends: ``"triton"`` turns each chunk's logits into losses and dz with the row
kernel; ``"torch"`` (the CPU path) does the same chunks with ``_ce_rows_torch``;
the GEMMs are torch's either way; ``"auto"`` picks Triton on CUDA and torch
otherwise. ``linear_cross_entropy_reference`` is the torch path under its old
public name; the tests compare both backends with their own full-logits reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .utils import BACKENDS, INTERPRET, check_triton_tensor, fused_apply, next_pow2

_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------


@triton.jit
def _ce_rows_kernel(Z, stride_z, T, LOSS, G, stride_g, V, ignore_index,
                    DO_GRAD: tl.constexpr, BV: tl.constexpr):
    """One program per row of a chunk of logits Z (rows, V), any float dtype.

    Pass 1: online max m and sum s of exp(z - m) over BV-wide blocks (fp32), so
    lse = m + log s; loss = lse - z[t] (0 when t == ignore_index).
    Pass 2 (DO_GRAD): overwrite the row with dz = g (exp(z - lse) - [j == t]),
    g = G[row * stride_g] (stride 0: one scale for every row), 0 for an ignored row.
    """
    row = tl.program_id(0).to(tl.int64)
    zrow = Z + row * stride_z
    t = tl.load(T + row).to(tl.int64)
    valid = t != ignore_index
    m = -float("inf")
    s = 0.0
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        z = tl.load(zrow + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    zt = tl.load(zrow + t, mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - zt, 0.0))
    if DO_GRAD:
        g = tl.load(G + row * stride_g).to(tl.float32)
        g = tl.where(valid, g, 0.0)
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            cmask = cols < V
            z = tl.load(zrow + cols, mask=cmask, other=0.0).to(tl.float32)
            d = (tl.exp(z - lse) - tl.where(cols == t, 1.0, 0.0)) * g
            tl.store(zrow + cols, d.to(Z.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------


def _ce_rows_triton(z, t, loss, g, ignore_index, do_grad):
    """Per-row loss of the logits chunk ``z`` (rows, V) into ``loss`` (fp32, rows);
    with ``do_grad`` ``z`` is overwritten by dz scaled by ``g`` (a 1-element or (rows,) fp32 tensor)."""
    rows, V = z.shape
    if rows == 0:
        return
    if INTERPRET:
        BV, warps = min(1024, next_pow2(V)), 4
    else:
        BV = min(4096, next_pow2(V))
        warps = 16 if BV >= 4096 else (8 if BV >= 2048 else 4)
    _ce_rows_kernel[(rows,)](z, z.stride(0), t, loss, g, 0 if g.numel() == 1 else g.stride(0), V, ignore_index,
                             DO_GRAD=do_grad, BV=BV, num_warps=warps)


def _ce_rows_torch(z, t, loss, g, ignore_index, do_grad):
    """Plain-torch twin of ``_ce_rows_triton`` (the CPU path): same contract.
    One fp32 log-softmax of the chunk; its exp is the softmax of the gradient."""
    lsm = torch.log_softmax(z, dim=-1, dtype=torch.float32)
    valid = t != ignore_index
    tc = torch.where(valid, t, 0)
    loss.copy_(torch.where(valid, -lsm.gather(1, tc[:, None]).squeeze(1), 0.0))
    if do_grad:
        gr = torch.where(valid, g.expand(t.shape[0]), 0.0)
        d = lsm.exp_()
        d[torch.arange(t.shape[0], device=z.device), tc] -= 1.0
        z.copy_(d.mul_(gr[:, None]))


# A chunk of logits holds about max(N * H, 2^24) values: the size of h (so the
# memory saved grows with the vocabulary), but never so few rows that the GEMMs
# get narrow (64 MiB of fp32 logits at least).
_MIN_CHUNK_VALUES = 1 << 24


def _chunk_rows(N: int, V: int, H: int, chunk_size: Optional[int]) -> int:
    """Rows per chunk: ``chunk_size`` when given, else a power of two making a chunk of
    logits about ``max(N * H, 2^24)`` values, at most N."""
    if chunk_size is not None:
        return max(1, min(int(chunk_size), max(N, 1)))
    return max(1, min(max(N, 1), next_pow2(math.ceil(max(N * H, _MIN_CHUNK_VALUES) / V))))


def _fused_pass(h, W, b, t, g, ignore_index, chunk, backend, need_h, need_W, need_b, do_grad=True):
    """Loop over row chunks: logits, loss rows, and (``do_grad``) dz and its products.

    h (N, H), W (V, H), b (V,) or None in the compute dtype; t (N,) int64; g fp32
    (1 element, or (N,) per row). Returns (loss rows fp32 (N,), dh or None,
    dW fp32 or None, db fp32 or None)."""
    N, V = h.shape[0], W.shape[0]
    ce_rows = _ce_rows_triton if backend == "triton" else _ce_rows_torch
    loss = torch.empty(N, dtype=torch.float32, device=h.device)
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if (do_grad and need_h) else None
    dW = torch.zeros(W.shape, dtype=torch.float32, device=h.device) if (do_grad and need_W) else None
    db = torch.zeros(V, dtype=torch.float32, device=h.device) if (do_grad and need_b) else None
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        hc = h[c0:c1]
        z = torch.addmm(b, hc, W.t()) if b is not None else torch.mm(hc, W.t())
        gc_ = g if g.numel() == 1 else g[c0:c1]
        ce_rows(z, t[c0:c1], loss[c0:c1], gc_, ignore_index, do_grad)
        if not do_grad:
            continue
        if dh is not None:
            torch.mm(z, W, out=dh[c0:c1])
        if dW is not None:  # the chunk's product in the compute dtype, summed into fp32 without an fp32 copy
            if z.dtype == torch.float32:
                dW.addmm_(z.t(), hc)
            else:
                dW.add_(torch.mm(z.t(), hc))
        if db is not None:
            db.add_(z.sum(0, dtype=torch.float32))
    return loss, dh, dW, db


# ----------------------------------------------------------------------------
# Autograd: one forward, one setup_context, one backward, used twice (as in
# lora_linear.py): as torch.library custom ops for torch.compile
# (``rankwise::linear_cross_entropy`` carrying the autograd formula, and
# ``rankwise::linear_cross_entropy_bwd``), and as an autograd.Function calling
# the same functions directly for eager calls (cheaper to dispatch).
#
# The forward returns (loss, dh, dW, db): the gradients are outputs so that they
# can be saved (a custom op's intermediates are invisible to autograd); they are
# non-differentiable, and empty (0 elements) when not computed.
# ----------------------------------------------------------------------------


def _eager_grads(reduction: str, need_h: bool, need_W: bool, need_b: bool) -> bool:
    """Whether the forward pass computes the gradients (mean/sum with any gradient wanted)."""
    return reduction != "none" and (need_h or need_W or need_b)


def _lce_fwd(h: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], t: torch.Tensor, ignore_index: int,
             reduction: str, chunk: int, backend: str, need_h: bool, need_W: bool, need_b: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (fp32: scalar, or (N,) for "none") and, for mean/sum with gradients
    wanted, (dh, dW fp32, db fp32) of the loss; empty tensors where not computed."""
    need_b = need_b and b is not None
    eager = _eager_grads(reduction, need_h, need_W, need_b)
    if reduction == "mean":  # 1/0 = inf when nothing is a target: loss nan and gradients 0, as torch
        scale = (1.0 / (t != ignore_index).sum().to(torch.float32)).reshape(1)
    else:
        scale = torch.ones(1, dtype=torch.float32, device=h.device)
    loss_rows, dh, dW, db = _fused_pass(h, W, b, t, scale, ignore_index, chunk, backend,
                                        need_h, need_W, need_b, do_grad=eager)
    if reduction == "none":
        loss = loss_rows
    elif reduction == "sum":
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() * scale[0]
    empty32 = h.new_empty(0, dtype=torch.float32)
    return (loss, dh if dh is not None else h.new_empty(0), dW if dW is not None else empty32,
            db if db is not None else empty32.clone())


def _lce_bwd(h: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], t: torch.Tensor, g: torch.Tensor,
             ignore_index: int, chunk: int, backend: str, need_h: bool, need_W: bool, need_b: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW fp32, db fp32) for per-row incoming gradients ``g`` (fp32, (N,)),
    recomputing the logits chunk by chunk; empty tensors where not wanted."""
    need_b = need_b and b is not None
    _, dh, dW, db = _fused_pass(h, W, b, t, g, ignore_index, chunk, backend, need_h, need_W, need_b)
    empty32 = h.new_empty(0, dtype=torch.float32)
    return (dh if dh is not None else h.new_empty(0), dW if dW is not None else empty32,
            db if db is not None else empty32.clone())


_lce_op = torch.library.custom_op("rankwise::linear_cross_entropy", _lce_fwd, mutates_args=())
_lce_bwd_op = torch.library.custom_op("rankwise::linear_cross_entropy_bwd", _lce_bwd, mutates_args=())


@_lce_op.register_fake
def _lce_fake(h, W, b, t, ignore_index, reduction, chunk, backend, need_h, need_W, need_b):
    need_b = need_b and b is not None
    eager = _eager_grads(reduction, need_h, need_W, need_b)
    f32 = torch.float32
    return (h.new_empty((h.shape[0],) if reduction == "none" else (), dtype=f32),
            h.new_empty(h.shape if eager and need_h else (0,)),
            h.new_empty(W.shape if eager and need_W else (0,), dtype=f32),
            h.new_empty((W.shape[0],) if eager and need_b else (0,), dtype=f32))


@_lce_bwd_op.register_fake
def _lce_bwd_fake(h, W, b, t, g, ignore_index, chunk, backend, need_h, need_W, need_b):
    f32 = torch.float32
    return (h.new_empty(h.shape if need_h else (0,)), h.new_empty(W.shape if need_W else (0,), dtype=f32),
            h.new_empty((W.shape[0],) if need_b and b is not None else (0,), dtype=f32))


def _lce_setup_context(ctx, inputs, output):
    h, W, b, t, ignore_index, reduction, chunk, backend, need_h, need_W, need_b = inputs
    _, dh, dW, db = output
    ctx.eager = _eager_grads(reduction, need_h, need_W, need_b and b is not None)
    ctx.meta = (ignore_index, chunk, backend, W.dtype, None if b is None else b.dtype)
    if ctx.eager:
        # Saved: the loss's own gradients (dh the size of h; dW / db only for a trainable head),
        # scaled by the incoming gradient in backward. No logits and no h.
        ctx.save_for_backward(dh, dW, db)
    else:
        # "none" (per-row incoming gradients) or no gradient at forward time: backward
        # recomputes the logits chunk by chunk from h, W, b, t.
        ctx.save_for_backward(h, W, b, t)
    ctx.mark_non_differentiable(dh, dW, db)
    ctx.set_materialize_grads(False)


def _lce_backward(ctx, grad_loss, bwd):
    """Gradients of the eleven inputs (None for the non-tensor ones and those that need none)."""
    ignore_index, chunk, backend, w_dtype, b_dtype = ctx.meta
    need_h, need_W, need_b = ctx.needs_input_grad[:3]
    none = (None,) * 8
    if grad_loss is None:
        return (None, None, None) + none
    if ctx.eager:
        dh, dW, db = ctx.saved_tensors
        go = grad_loss.to(torch.float32)
        dh = dh * go.to(dh.dtype) if need_h else None
        dW = (dW * go).to(w_dtype) if need_W else None
        db = (db * go).to(b_dtype) if need_b else None
        return (dh, dW, db) + none
    h, W, b, t = ctx.saved_tensors
    g = grad_loss.reshape(-1).to(torch.float32).contiguous()
    dh, dW, db = bwd(h, W, b, t, g, ignore_index, chunk, backend, need_h, need_W, need_b)
    return (dh if need_h else None, dW.to(w_dtype) if need_W else None,
            db.to(b_dtype) if need_b else None) + none


_lce_op.register_autograd(lambda ctx, grad_loss, *_: _lce_backward(ctx, grad_loss, torch.ops.rankwise.linear_cross_entropy_bwd),
                          setup_context=_lce_setup_context)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The eager twin of ``rankwise::linear_cross_entropy``: same arguments,
    outputs and autograd formula, the functions called directly."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _lce_fwd(*inputs)
        _lce_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        return _lce_backward(ctx, grad_loss, _lce_bwd)


# ----------------------------------------------------------------------------
# The torch path, public under its historical name
# ----------------------------------------------------------------------------


def linear_cross_entropy_reference(hidden, weight, targets, bias=None, ignore_index: int = -100,
                                   reduction: str = "mean"):
    """``linear_cross_entropy(..., backend="torch")``: the plain-torch path (the same
    chunks as the kernel, no full logits), public under its old name. The tests
    compare both backends with a reference of their own (``tests/helpers.py``:
    ``F.cross_entropy`` on the full logits), not with this."""
    return linear_cross_entropy(hidden, weight, targets, bias, ignore_index, reduction, backend="torch")


# ----------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------


def _validate(hidden, weight, targets, bias, ignore_index, reduction, chunk_size, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    for t, name in ((hidden, "hidden"), (weight, "weight"), (targets, "targets")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not hidden.is_floating_point() or hidden.dim() < 1:
        raise TypeError(f"hidden: expected a floating-point tensor of shape (..., hidden_size), "
                        f"got dtype {hidden.dtype}, shape {tuple(hidden.shape)}")
    if not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError(f"weight: expected a floating-point (vocab_size, hidden_size) tensor, "
                        f"got dtype {weight.dtype}, shape {tuple(weight.shape)}")
    V, H = weight.shape
    if V < 1:
        raise ValueError(f"weight: vocab_size (weight.shape[0]) must be >= 1, got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != H:
        raise ValueError(f"hidden: last dimension {hidden.shape[-1]} does not match weight's hidden_size {H} "
                         f"(weight shape {tuple(weight.shape)})")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"targets: expected an integer tensor of class indices, got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets: expected shape {tuple(hidden.shape[:-1])} (hidden's leading dimensions), "
                         f"got {tuple(targets.shape)}")
    devices = {"hidden": hidden.device, "weight": weight.device, "targets": targets.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (V,):
            raise ValueError(f"bias: expected a floating-point tensor of shape ({V},), got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        devices["bias"] = bias.device
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device, got " +
                         ", ".join(f"{k} on {v}" for k, v in devices.items()))
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    if targets.numel() and not torch.compiler.is_compiling():  # a data-dependent check: eager only
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            raise ValueError(f"targets: class indices must lie in [0, {V}) (vocab_size) or equal ignore_index "
                             f"{ignore_index}; got {int(targets.reshape(-1)[i])} at flat position {i}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """Cross entropy of the logits ``hidden @ weight.T + bias`` against ``targets``,
    without materialising the full logits.

    Args:
        hidden: shape ``(..., hidden_size)``, any strides (the last hidden states).
        weight: the output head, shape ``(vocab_size, hidden_size)`` (``lm_head.weight``).
        targets: integer class indices, shape ``hidden.shape[:-1]``; positions equal to
            ``ignore_index`` count for nothing. Targets are not shifted: pass the next
            tokens already aligned with ``hidden``.
        bias: optional, shape ``(vocab_size,)``.
        ignore_index: target value to skip (-100, as Hugging Face labels).
        reduction: ``"mean"`` (over the non-ignored positions; nan when there are none,
            as torch), ``"sum"`` or ``"none"`` (a loss per position, 0 where ignored).
        chunk_size: rows of logits computed at once; ``None`` picks one that makes a
            chunk about the size of ``hidden`` (at least 2^24 logits).
        backend: ``"triton"`` (the kernel; on the CPU only under ``TRITON_INTERPRET=1``),
            ``"torch"`` (the same chunked loop with torch ops) or ``"auto"`` (Triton on
            CUDA, else torch).

    Dtypes: the logits are computed in ``hidden``'s dtype (or the autocast dtype),
    ``weight`` and ``bias`` cast to it as ``F.linear`` under autocast would; the
    softmax and the loss in fp32. Returns an fp32 tensor: a scalar, or
    ``targets``' shape for ``reduction="none"``. Gradients flow to ``hidden``,
    and to ``weight`` / ``bias`` when they require grad (accumulated in fp32).
    """
    _validate(hidden, weight, targets, bias, ignore_index, reduction, chunk_size, backend)
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype

    def cast(x):
        return x if x is None or x.dtype == dtype else x.to(dtype)

    h, W, b = cast(hidden), cast(weight), cast(bias)
    if backend == "auto":
        backend = "triton" if h.is_cuda else "torch"
    if backend == "triton":
        for x, name in ((h, "hidden"), (W, "weight")):
            check_triton_tensor(x, name)
    lead = targets.shape
    h2 = h.reshape(-1, h.shape[-1])
    t = targets.reshape(-1).to(torch.int64).contiguous()
    chunk = _chunk_rows(h2.shape[0], W.shape[0], W.shape[1], chunk_size)
    grad_on = torch.is_grad_enabled()
    need = (grad_on and h2.requires_grad, grad_on and W.requires_grad, grad_on and b is not None and b.requires_grad)
    with torch.autocast(device_type, enabled=False):
        loss = fused_apply(LinearCrossEntropyFunction, torch.ops.rankwise.linear_cross_entropy)(
            h2, W, b, t, int(ignore_index), reduction, chunk, backend, *need)[0]
    return loss.reshape(lead) if reduction == "none" else loss
