"""Fused linear + cross entropy: the output head and the loss without the full logits.

Math, for hidden states h (N, H), head weight W (V, H), optional bias b (V,) and
targets t (N,) (``ignore_index`` marks rows without a target), with the options
softcap s (None: c = z), label smoothing e in [0, 1], class weights w (V,) (None:
w = 1), z-loss scale lam >= 0:

    z_i    = h_i W^T + b                        (one row of logits, V values)
    c_ij   = s tanh(z_ij / s)                   (softcap; c = z without it)
    lse_i  = log sum_j exp(c_ij)                (fp32, online max/sum over V blocks)
    ce_i   = (1 - e) w_{t_i} (lse_i - c_{i,t_i}) + (e / V) sum_j w_j (lse_i - c_ij)
           = (1 - e) w_{t_i} (lse_i - c_{i,t_i}) + (e / V) (S_w lse_i - sum_j w_j c_ij),  S_w = sum_j w_j
    zl_i   = lam lse_i^2                        (z-loss, PaLM)
    (ce_i = zl_i = 0 for an ignored row; e = 0, w = 1: ce_i = lse_i - z_{i,t_i})
    L      = sum_i ce_i / D + sum_i zl_i / n    ("mean": D = sum_{i valid} w_{t_i}, n = number of
                                                  valid rows; 0/0 = nan, as torch)
           = sum_i (ce_i + zl_i)                ("sum")
           = (ce_i + zl_i)_i                    ("none")

ce_i and D are torch's ``F.cross_entropy(c, t, weight=w, label_smoothing=e)``; the
z-loss is not class-weighted and its mean is over the valid rows (as Liger-Kernel).
The z-loss returned on request is its part of L (sum zl_i / n, sum zl_i, or zl_i),
already included in L; the token accuracy is [argmax_j z_ij = t_i] (first index on
ties; the softcap is monotone and does not change it), 0 for an ignored row, and
for "mean"/"sum" its mean over the valid rows. Neither has a gradient.

Backward: with g_i = dL/dce_i (1, 1 / D, or the incoming per-row gradient) and
gz_i = dL/dzl_i (1, 1 / n, or the same per-row gradient), both 0 for an ignored
row, and p_ij = softmax_j(c_i) = exp(c_ij - lse_i), since d lse_i / d c_ij = p_ij:

    d ce_i / d c_ij = (1 - e) w_{t_i} (p_ij - [j = t_i]) + (e / V) (S_w p_ij - w_j)
    d zl_i / d c_ij = 2 lam lse_i p_ij
    d c_ij / d z_ij = 1 - tanh^2(z_ij / s) = 1 - (c_ij / s)^2      (1 without softcap)
    dz_ij = (g_i d ce_i / d c_ij + gz_i d zl_i / d c_ij) (1 - (c_ij / s)^2)
    dh    = dz W,    dW = dz^T h,    db = sum_i dz_i

(no options: dz_ij = g_i (p_ij - [j = t_i])). The class weights and e are constants
(no gradient to ``ce_weight``).

The (N, V) logits are the largest activation of a language model's training
step (N = 8192 tokens at V = 128k is 4 GiB in fp32). Here the rows go through in
chunks of C rows: the chunk's logits are computed by one GEMM, one Triton program
per row turns them into ce_i, zl_i, the accuracy and, in the same buffer, dz (two
passes over the row: online max/sum with the running argmax and the smoothing
sums, then dz), and two GEMMs turn dz into the chunk's dh and its share of dW.
Peak extra memory is one (C, V) chunk.

What is kept for backward and why:
- reduction "mean"/"sum" with gradients needed: the gradient is computed during
  the forward pass (the scalar incoming gradient only scales it, L being linear
  in g and gz), so backward is one multiply; kept are dh (the size of h), and
  dW (fp32) / db only when the head weight / bias require grad. No logits and no h are kept.
- reduction "none" (per-row incoming gradients), or no grad at forward time:
  kept are h, W, b, t and the class weights; backward recomputes each chunk's
  logits (one more GEMM).

Backends: ``"triton"`` turns each chunk's logits into losses and dz with the row
kernel; ``"torch"`` (the CPU path) does the same chunks with ``_ce_rows_torch``;
the GEMMs are torch's either way; ``"auto"`` picks Triton on CUDA and torch
otherwise. ``linear_cross_entropy_reference`` is the torch path under its old
public name; the tests compare both backends with their own full-logits reference.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .tuning import choose_path
from .utils import BACKENDS, INTERPRET, check_triton_tensor, fused_apply, next_pow2

_REDUCTIONS = ("mean", "sum", "none")


class LinearCrossEntropyOutput(NamedTuple):
    """What ``linear_cross_entropy`` returns when ``return_z_loss`` or
    ``return_token_accuracy`` is set (the fields of Liger-Kernel's ``CrossEntropyOutput``);
    a field not asked for is None. ``loss`` already includes the z-loss."""

    loss: torch.Tensor
    z_loss: Optional[torch.Tensor] = None
    token_accuracy: Optional[torch.Tensor] = None


class _Options(NamedTuple):
    """The loss options as the row functions take them: ``weight`` fp32 contiguous (V,) or None."""

    weight: Optional[torch.Tensor]
    label_smoothing: float
    lse_square_scale: float
    softcap: Optional[float]
    want_z: bool
    want_acc: bool


# ----------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """tanh in fp32 from ``tl.exp`` (libdevice's is not in the interpreter): an odd
    Taylor polynomial below |x| = 1/8 (where (1 - e)/(1 + e) would cancel; next term
    < 2e-10 relative), (1 - e)/(1 + e) with e = exp(-2|x|) above (-> 1 at infinity)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * -0.05396825396825397)))
    r = tl.where(a < 0.125, small, big)
    return tl.where(x < 0, -r, r)


@triton.jit
def _ce_rows_kernel(Z, stride_z, T, LOSS, ZLOSS, ACC, G, stride_g, GZ, stride_gz, CW, V, ignore_index,
                    label_smoothing, lse_square_scale, softcap,
                    DO_GRAD: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                    ZLOSS_ON: tl.constexpr, SOFTCAP: tl.constexpr, ACC_ON: tl.constexpr, BV: tl.constexpr):
    """One program per row of a chunk of logits Z (rows, V), any float dtype; the
    math is the module docstring's (c, lse, ce, zl, dz), all in fp32.

    Pass 1: c = softcap * tanh(z / softcap) (SOFTCAP) or z; online max m and sum s of
    exp(c - m) over BV-wide blocks, so lse = m + log s; with SMOOTH also sum_j w_j c_j
    and S_w = sum_j w_j (w = CW, or 1 without HAS_WEIGHT); with ACC_ON the running
    argmax of z (a later block replaces it only when strictly larger: first index).
    LOSS = ce, ZLOSS = lam lse^2 (ZLOSS_ON), ACC = [argmax = t] (ACC_ON); 0 for an ignored row.
    Pass 2 (DO_GRAD): overwrite the row with dz = (g dce/dc + gz dzl/dc) (1 - (c/softcap)^2),
    g = G[row * stride_g], gz = GZ[row * stride_gz] (stride 0: one scale for every row),
    both 0 for an ignored row.
    """
    row = tl.program_id(0).to(tl.int64)
    zrow = Z + row * stride_z
    t = tl.load(T + row).to(tl.int64)
    valid = t != ignore_index
    m = -float("inf")
    s = 0.0
    swc = 0.0  # sum_j w_j c_j (SMOOTH)
    sw = 0.0   # sum_j w_j (SMOOTH)
    best = -float("inf")  # running max of z and its index (ACC_ON)
    best_idx = 0
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        cmask = cols < V
        z = tl.load(zrow + cols, mask=cmask, other=-float("inf")).to(tl.float32)
        if ACC_ON:
            bmax = tl.max(z, axis=0)
            bidx = tl.argmax(z, axis=0, tie_break_left=True)
            best_idx = tl.where(bmax > best, v0 + bidx, best_idx)
            best = tl.maximum(best, bmax)
        if SOFTCAP:
            z = tl.where(cmask, softcap * _tanh(z / softcap), -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if SMOOTH:
            zc = tl.where(cmask, z, 0.0)  # -inf past V: masked before any product
            if HAS_WEIGHT:
                w = tl.load(CW + cols, mask=cmask, other=0.0)
                swc += tl.sum(w * zc, axis=0)
                sw += tl.sum(w, axis=0)
            else:
                swc += tl.sum(zc, axis=0)
    if SMOOTH and not HAS_WEIGHT:
        sw = V * 1.0
    lse = m + tl.log(s)
    ct = tl.load(zrow + t, mask=valid, other=0.0).to(tl.float32)
    if SOFTCAP:
        ct = softcap * _tanh(ct / softcap)
    if HAS_WEIGHT:
        wt = tl.load(CW + t, mask=valid, other=0.0)
    else:
        wt = 1.0
    ce = wt * (lse - ct)
    if SMOOTH:
        ce = (1.0 - label_smoothing) * ce + (label_smoothing / V) * (sw * lse - swc)
    tl.store(LOSS + row, tl.where(valid, ce, 0.0))
    if ZLOSS_ON:
        tl.store(ZLOSS + row, tl.where(valid, lse_square_scale * lse * lse, 0.0))
    if ACC_ON:
        tl.store(ACC + row, tl.where(valid & (best_idx == t), 1.0, 0.0))
    if DO_GRAD:
        g = tl.load(G + row * stride_g).to(tl.float32)
        g = tl.where(valid, g, 0.0)
        a_hot = g * wt * (1.0 - label_smoothing)  # coefficient of (p - [j = t])
        a_p = a_hot
        if SMOOTH:
            a_p += g * (label_smoothing / V) * sw
        if ZLOSS_ON:
            gz = tl.load(GZ + row * stride_gz).to(tl.float32)
            a_p += tl.where(valid, gz, 0.0) * 2.0 * lse_square_scale * lse
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            cmask = cols < V
            z = tl.load(zrow + cols, mask=cmask, other=0.0).to(tl.float32)
            if SOFTCAP:
                th = _tanh(z / softcap)
                z = softcap * th
            # dc = a_p p - a_hot [j = t] - g (e / V) w_j
            d = a_p * tl.exp(z - lse) - tl.where(cols == t, a_hot, 0.0)
            if SMOOTH:
                if HAS_WEIGHT:
                    d -= g * (label_smoothing / V) * tl.load(CW + cols, mask=cmask, other=0.0)
                else:
                    d -= g * (label_smoothing / V)
            if SOFTCAP:
                d = d * (1.0 - th * th)
            tl.store(zrow + cols, d.to(Z.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------


def _ce_rows_triton(z, t, out, g, gz, ignore_index, do_grad, opt: _Options):
    """Per-row ce, z-loss and accuracy of the logits chunk ``z`` (rows, V) into ``out``
    = (loss, zloss or None, acc or None) (fp32, rows); with ``do_grad`` ``z`` is overwritten
    by dz, ``g`` / ``gz`` (1-element or (rows,) fp32 tensors) scaling the ce / z-loss parts."""
    rows, V = z.shape
    if rows == 0:
        return
    if INTERPRET:
        BV, warps = min(1024, next_pow2(V)), 4
    else:
        BV = min(4096, next_pow2(V))
        warps = 16 if BV >= 4096 else (8 if BV >= 2048 else 4)
    loss, zloss, acc = out
    z_on = opt.lse_square_scale != 0.0
    _ce_rows_kernel[(rows,)](
        z, z.stride(0), t, loss, zloss if zloss is not None else loss, acc if acc is not None else loss,
        g, 0 if g.numel() == 1 else g.stride(0), gz, 0 if gz.numel() == 1 else gz.stride(0),
        opt.weight if opt.weight is not None else loss, V, ignore_index,
        float(opt.label_smoothing), float(opt.lse_square_scale), float(opt.softcap or 1.0),
        DO_GRAD=do_grad, HAS_WEIGHT=opt.weight is not None, SMOOTH=opt.label_smoothing != 0.0,
        ZLOSS_ON=z_on and zloss is not None, SOFTCAP=opt.softcap is not None, ACC_ON=acc is not None,
        BV=BV, num_warps=warps)


def _ce_rows_torch(z, t, out, g, gz, ignore_index, do_grad, opt: _Options):
    """Plain-torch twin of ``_ce_rows_triton`` (the CPU path): same contract.
    One fp32 log-softmax of the (softcapped) chunk; its exp is the softmax of the gradient."""
    loss, zloss, acc = out
    rows, V = z.shape
    valid = t != ignore_index
    tc = torch.where(valid, t, 0)
    if acc is not None:
        acc.copy_((z.argmax(1) == t) & valid)
    c = z.to(torch.float32)
    th = None
    if opt.softcap is not None:
        th = torch.tanh(c / opt.softcap)
        c = th * opt.softcap
    lse = torch.logsumexp(c, dim=-1)
    lsm = c.sub_(lse[:, None])  # c is no longer needed: the log-softmax in its place
    w = opt.weight
    wt = w[tc] if w is not None else None
    ce = -lsm.gather(1, tc[:, None]).squeeze(1)
    if wt is not None:
        ce = ce * wt
    eps = opt.label_smoothing
    if eps:
        smooth = -(lsm * w).sum(1) if w is not None else -lsm.sum(1)
        ce = (1.0 - eps) * ce + (eps / V) * smooth
    loss.copy_(torch.where(valid, ce, 0.0))
    z_on = opt.lse_square_scale != 0.0 and zloss is not None
    if z_on:
        zloss.copy_(torch.where(valid, opt.lse_square_scale * lse * lse, 0.0))
    if not do_grad:
        return
    gr = torch.where(valid, g.expand(rows), 0.0)
    a_hot = gr * (1.0 - eps) if wt is None else gr * wt * (1.0 - eps)
    a_p = a_hot
    if eps:
        a_p = a_p + gr * (eps / V) * (w.sum() if w is not None else V)
    if z_on:
        a_p = a_p + torch.where(valid, gz.expand(rows), 0.0) * (2.0 * opt.lse_square_scale) * lse
    d = lsm.exp_().mul_(a_p[:, None])
    d[torch.arange(rows, device=z.device), tc] -= a_hot
    if eps:
        d.sub_((gr * (eps / V))[:, None] * (w if w is not None else 1.0))
    if th is not None:
        d.mul_(th.square_().neg_().add_(1.0))
    z.copy_(d)


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


# The measured chunking (CUDA, ``chunk_size=None``): wider chunks make wider GEMMs and fewer launches, at the
# cost of a larger transient (C, V) chunk of logits. The candidates are the default chunk ("fused") and
# ``k`` times it ("fused:x<k>"), capped at the batch and at _MAX_CHUNK_VALUES logits (256 MiB in bf16), timed
# once per (rows bucket, V, H, dtype) by ``tuning.choose_path`` (op ``lce``) and cached with the GEMMs'
# choices. The names do not depend on the row count, so a cached choice holds for every batch of its bucket.
_MAX_CHUNK_VALUES = 1 << 27
CHUNK_MULTIPLES = (2, 4, 8, 16)


def chunk_candidates(N: int, V: int, H: int) -> dict:
    """``{choice: rows per chunk}``: the default chunk, and each multiple of it capped at N and at
    ``_MAX_CHUNK_VALUES`` logits (never below the default)."""
    first = _chunk_rows(N, V, H, None)
    cap = max(first, _MAX_CHUNK_VALUES // max(V, 1))
    return {"fused": first, **{f"fused:x{k}": max(first, min(first * k, N, cap)) for k in CHUNK_MULTIPLES}}


def _measured_chunk(h, W, b, t, ignore_index: int, backend: str, need: tuple, opt: _Options) -> int:
    """The chunk of the fastest forward-and-gradient pass among ``chunk_candidates`` (``tuning.choose_path``:
    measured on CUDA and cached; the default off CUDA, while compiling and while a CUDA graph is captured)."""
    N, V, H = h.shape[0], W.shape[0], W.shape[1]
    sizes = chunk_candidates(N, V, H)
    if len(set(sizes.values())) == 1:
        return sizes["fused"]
    g = torch.ones(1, dtype=torch.float32, device=h.device)
    run = lambda c: _fused_pass(h, W, b, t, g, g, ignore_index, c, backend, *need, opt)  # noqa: E731
    choice = choose_path("auto", "lce", N, V, H, h, lambda: {k: (lambda c=c: run(c)) for k, c in sizes.items()})
    return sizes.get(choice, sizes["fused"])


def _fused_pass(h, W, b, t, g, gz, ignore_index, chunk, backend, need_h, need_W, need_b, opt: _Options,
                do_grad=True):
    """Loop over row chunks: logits, loss rows, and (``do_grad``) dz and its products.

    h (N, H), W (V, H), b (V,) or None in the compute dtype; t (N,) int64; g / gz fp32
    (1 element, or (N,) per row) scale the ce / z-loss parts of dz. Returns (ce rows fp32 (N,),
    z-loss rows fp32 or None, accuracy rows fp32 or None, dh or None, dW fp32 or None, db fp32 or None)."""
    N, V = h.shape[0], W.shape[0]
    ce_rows = _ce_rows_triton if backend == "triton" else _ce_rows_torch
    f32 = dict(dtype=torch.float32, device=h.device)
    loss = torch.empty(N, **f32)
    zloss = torch.zeros(N, **f32) if (opt.want_z or opt.lse_square_scale != 0.0) else None
    acc = torch.empty(N, **f32) if opt.want_acc else None
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if (do_grad and need_h) else None
    dW = torch.zeros(W.shape, **f32) if (do_grad and need_W) else None
    db = torch.zeros(V, **f32) if (do_grad and need_b) else None
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        hc = h[c0:c1]
        z = torch.addmm(b, hc, W.t()) if b is not None else torch.mm(hc, W.t())
        gc_ = g if g.numel() == 1 else g[c0:c1]
        gzc = gz if gz.numel() == 1 else gz[c0:c1]
        out = tuple(None if x is None else x[c0:c1] for x in (loss, zloss, acc))
        ce_rows(z, t[c0:c1], out, gc_, gzc, ignore_index, do_grad, opt)
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
    return loss, zloss, acc, dh, dW, db


# ----------------------------------------------------------------------------
# Autograd: one forward, one setup_context, one backward, used twice (as in
# lora_linear.py): as torch.library custom ops for torch.compile
# (``rankwise::linear_cross_entropy`` carrying the autograd formula, and
# ``rankwise::linear_cross_entropy_bwd``), and as an autograd.Function calling
# the same functions directly for eager calls (cheaper to dispatch).
#
# The forward returns (loss, z_loss, token_accuracy, dh, dW, db): the gradients are
# outputs so that they can be saved (a custom op's intermediates are invisible to
# autograd); all but the loss are non-differentiable, and empty (0 elements) when
# not computed. The loss options come last, with defaults: no option is the plain loss.
# ----------------------------------------------------------------------------


def _eager_grads(reduction: str, need_h: bool, need_W: bool, need_b: bool) -> bool:
    """Whether the forward pass computes the gradients (mean/sum with any gradient wanted)."""
    return reduction != "none" and (need_h or need_W or need_b)


def _options(ce_weight, label_smoothing, lse_square_scale, softcap, want_z=False, want_acc=False) -> _Options:
    return _Options(ce_weight, float(label_smoothing), float(lse_square_scale),
                    None if softcap is None else float(softcap), bool(want_z), bool(want_acc))


def _lce_fwd(h: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], t: torch.Tensor, ignore_index: int,
             reduction: str, chunk: int, backend: str, need_h: bool, need_W: bool, need_b: bool,
             ce_weight: Optional[torch.Tensor] = None, label_smoothing: float = 0.0,
             lse_square_scale: float = 0.0, softcap: Optional[float] = None,
             return_z_loss: bool = False, return_token_accuracy: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (fp32: scalar, or (N,) for "none"), z-loss and token accuracy (fp32, the loss's
    shape, when asked for) and, for mean/sum with gradients wanted, (dh, dW fp32, db fp32)
    of the loss; empty tensors where not computed. ``ce_weight``: fp32 (V,) or None."""
    need_b = need_b and b is not None
    eager = _eager_grads(reduction, need_h, need_W, need_b)
    opt = _options(ce_weight, label_smoothing, lse_square_scale, softcap, return_z_loss, return_token_accuracy)
    valid = t != ignore_index
    # 1/0 = inf when nothing is a target: loss nan and gradients 0 (g is zeroed per ignored row), as torch
    inv_n = (1.0 / valid.sum().to(torch.float32)).reshape(1)
    if reduction == "mean":
        if ce_weight is not None:  # torch's weighted mean: divided by the summed weights of the targets
            g = (1.0 / (ce_weight[torch.where(valid, t, 0)] * valid).sum()).reshape(1)
        else:
            g = inv_n
        gz = inv_n
    else:
        g = gz = torch.ones(1, dtype=torch.float32, device=h.device)
    ce, zl, acc, dh, dW, db = _fused_pass(h, W, b, t, g, gz, ignore_index, chunk, backend,
                                          need_h, need_W, need_b, opt, do_grad=eager)
    empty32 = h.new_empty(0, dtype=torch.float32)
    if reduction == "none":
        zl_out = zl
        loss = ce if zl is None or lse_square_scale == 0.0 else ce + zl
    elif reduction == "sum":
        zl_out = None if zl is None else zl.sum()
        loss = ce.sum() if zl_out is None or lse_square_scale == 0.0 else ce.sum() + zl_out
    else:
        zl_out = None if zl is None else zl.sum() * gz[0]
        loss = ce.sum() * g[0]
        if zl_out is not None and lse_square_scale != 0.0:
            loss = loss + zl_out
    if acc is not None and reduction != "none":
        acc = acc.sum() * inv_n[0]
    return (loss, zl_out if return_z_loss else empty32.clone(), acc if acc is not None else empty32.clone(),
            dh if dh is not None else h.new_empty(0), dW if dW is not None else empty32.clone(),
            db if db is not None else empty32.clone())


def _lce_bwd(h: torch.Tensor, W: torch.Tensor, b: Optional[torch.Tensor], t: torch.Tensor, g: torch.Tensor,
             ignore_index: int, chunk: int, backend: str, need_h: bool, need_W: bool, need_b: bool,
             ce_weight: Optional[torch.Tensor] = None, label_smoothing: float = 0.0,
             lse_square_scale: float = 0.0, softcap: Optional[float] = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dW fp32, db fp32) for per-row incoming gradients ``g`` (fp32, (N,)) of
    ce_i + zl_i, recomputing the logits chunk by chunk; empty tensors where not wanted."""
    need_b = need_b and b is not None
    opt = _options(ce_weight, label_smoothing, lse_square_scale, softcap)
    *_, dh, dW, db = _fused_pass(h, W, b, t, g, g, ignore_index, chunk, backend, need_h, need_W, need_b, opt)
    empty32 = h.new_empty(0, dtype=torch.float32)
    return (dh if dh is not None else h.new_empty(0), dW if dW is not None else empty32,
            db if db is not None else empty32.clone())


_lce_op = torch.library.custom_op("rankwise::linear_cross_entropy", _lce_fwd, mutates_args=())
_lce_bwd_op = torch.library.custom_op("rankwise::linear_cross_entropy_bwd", _lce_bwd, mutates_args=())


@_lce_op.register_fake
def _lce_fake(h, W, b, t, ignore_index, reduction, chunk, backend, need_h, need_W, need_b,
              ce_weight=None, label_smoothing=0.0, lse_square_scale=0.0, softcap=None,
              return_z_loss=False, return_token_accuracy=False):
    need_b = need_b and b is not None
    eager = _eager_grads(reduction, need_h, need_W, need_b)
    f32 = torch.float32
    shape = (h.shape[0],) if reduction == "none" else ()
    return (h.new_empty(shape, dtype=f32),
            h.new_empty(shape if return_z_loss else (0,), dtype=f32),
            h.new_empty(shape if return_token_accuracy else (0,), dtype=f32),
            h.new_empty(h.shape if eager and need_h else (0,)),
            h.new_empty(W.shape if eager and need_W else (0,), dtype=f32),
            h.new_empty((W.shape[0],) if eager and need_b else (0,), dtype=f32))


@_lce_bwd_op.register_fake
def _lce_bwd_fake(h, W, b, t, g, ignore_index, chunk, backend, need_h, need_W, need_b,
                  ce_weight=None, label_smoothing=0.0, lse_square_scale=0.0, softcap=None):
    f32 = torch.float32
    return (h.new_empty(h.shape if need_h else (0,)), h.new_empty(W.shape if need_W else (0,), dtype=f32),
            h.new_empty((W.shape[0],) if need_b and b is not None else (0,), dtype=f32))


def _lce_setup_context(ctx, inputs, output):
    inputs = tuple(inputs) + (None, 0.0, 0.0, None, False, False)[len(inputs) - 11:]  # the defaults
    h, W, b, t, ignore_index, reduction, chunk, backend, need_h, need_W, need_b, ce_weight = inputs[:12]
    label_smoothing, lse_square_scale, softcap = inputs[12:15]
    _, z_loss, acc, dh, dW, db = output
    ctx.eager = _eager_grads(reduction, need_h, need_W, need_b and b is not None)
    ctx.meta = (ignore_index, chunk, backend, W.dtype, None if b is None else b.dtype,
                label_smoothing, lse_square_scale, softcap)
    if ctx.eager:
        # Saved: the loss's own gradients (dh the size of h; dW / db only for a trainable head),
        # scaled by the incoming gradient in backward. No logits and no h.
        ctx.save_for_backward(dh, dW, db)
    else:
        # "none" (per-row incoming gradients) or no gradient at forward time: backward
        # recomputes the logits chunk by chunk from h, W, b, t (and the class weights).
        ctx.save_for_backward(h, W, b, t, ce_weight)
    ctx.mark_non_differentiable(z_loss, acc, dh, dW, db)
    ctx.set_materialize_grads(False)


def _lce_backward(ctx, grad_loss, bwd):
    """Gradients of the inputs (None for the non-tensor ones and those that need none).
    The z-loss and the accuracy outputs have none: the z-loss's gradient comes through the loss."""
    ignore_index, chunk, backend, w_dtype, b_dtype, label_smoothing, lse_square_scale, softcap = ctx.meta
    need_h, need_W, need_b = ctx.needs_input_grad[:3]
    none = (None,) * (len(ctx.needs_input_grad) - 3)
    if grad_loss is None:
        return (None, None, None) + none
    if ctx.eager:
        dh, dW, db = ctx.saved_tensors
        go = grad_loss.to(torch.float32)
        dh = dh * go.to(dh.dtype) if need_h else None
        dW = (dW * go).to(w_dtype) if need_W else None
        db = (db * go).to(b_dtype) if need_b else None
        return (dh, dW, db) + none
    h, W, b, t, ce_weight = ctx.saved_tensors
    g = grad_loss.reshape(-1).to(torch.float32).contiguous()
    dh, dW, db = bwd(h, W, b, t, g, ignore_index, chunk, backend, need_h, need_W, need_b,
                     ce_weight, label_smoothing, lse_square_scale, softcap)
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
                                   reduction: str = "mean", **options):
    """``linear_cross_entropy(..., backend="torch")``: the plain-torch path (the same
    chunks as the kernel, no full logits), public under its old name; ``options`` are
    ``linear_cross_entropy``'s loss options. The tests compare both backends with a
    reference of their own (``F.cross_entropy`` on the full logits), not with this."""
    return linear_cross_entropy(hidden, weight, targets, bias, ignore_index, reduction, backend="torch", **options)


# ----------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------


def _validate(hidden, weight, targets, bias, ignore_index, reduction, chunk_size, backend, check_targets=True):
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
    if check_targets and targets.numel() and not torch.compiler.is_compiling():  # data-dependent: eager only
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0])
            raise ValueError(f"targets: class indices must lie in [0, {V}) (vocab_size) or equal ignore_index "
                             f"{ignore_index}; got {int(targets.reshape(-1)[i])} at flat position {i}")


def _validate_options(weight, ce_weight, label_smoothing, lse_square_scale, softcap, return_z_loss,
                      return_token_accuracy):
    def real(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    if not real(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a float in [0, 1], got {label_smoothing!r}")
    if not real(lse_square_scale) or lse_square_scale < 0.0:
        raise ValueError(f"lse_square_scale: expected a finite float >= 0 (the z-loss scale), got {lse_square_scale!r}")
    if softcap is not None and (not real(softcap) or softcap <= 0.0):
        raise ValueError(f"softcap: expected None or a finite float > 0, got {softcap!r}")
    V = weight.shape[0]
    if ce_weight is not None and (not isinstance(ce_weight, torch.Tensor) or not ce_weight.is_floating_point()
                                  or tuple(ce_weight.shape) != (V,) or ce_weight.device != weight.device):
        got = (f"dtype {ce_weight.dtype}, shape {tuple(ce_weight.shape)} on {ce_weight.device}"
               if isinstance(ce_weight, torch.Tensor) else type(ce_weight).__name__)
        raise ValueError(f"ce_weight: expected a floating-point tensor of shape ({V},) (one weight per class) "
                         f"on {weight.device}, got {got}")
    for flag, name in ((return_z_loss, "return_z_loss"), (return_token_accuracy, "return_token_accuracy")):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {flag!r}")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: Optional[int] = None, backend: str = "auto", *,
                         label_smoothing: float = 0.0, lse_square_scale: float = 0.0,
                         return_z_loss: bool = False, softcap: Optional[float] = None,
                         ce_weight: Optional[torch.Tensor] = None, return_token_accuracy: bool = False,
                         check_targets: bool = True):
    """Cross entropy of the logits ``hidden @ weight.T + bias`` against ``targets``,
    without materialising the full logits; with Liger-Kernel's loss options.

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

    Loss options (keyword only; they compose, e.g. softcap + smoothing + weights + z-loss):
        label_smoothing: in [0, 1], as ``F.cross_entropy``'s (with ``ce_weight`` and
            ``ignore_index`` too): the target distribution is ``(1 - e) one_hot + e / vocab_size``.
        lse_square_scale: the z-loss ``lse_square_scale * logsumexp(logits)^2`` added per
            non-ignored position (not class-weighted), summed, or averaged over the
            non-ignored positions for ``"mean"`` (Liger-Kernel's z-loss).
        return_z_loss: also return the z-loss part of the loss (reduced as above), for logging.
        softcap: ``logits -> softcap * tanh(logits / softcap)`` before the softmax (Gemma 2's
            ``final_logit_softcapping``); gradients go through the tanh. None: no cap.
        ce_weight: per-class weights, shape ``(vocab_size,)``, as ``F.cross_entropy``'s
            ``weight``: ``"mean"`` divides by the summed weights of the non-ignored targets.
            A constant: no gradient reaches it.
        return_token_accuracy: also return the accuracy of ``argmax(logits) == targets``
            over the non-ignored positions (first index on ties; the softcap does not change it).
        check_targets: refuse a target outside ``[0, vocab_size)`` (other than ``ignore_index``)
            with a ``ValueError``; it reads the targets back to the host (a sync on a GPU), so a
            caller that checked them already (``rankwise train``: on the host, once) passes False.

    Dtypes: the logits are computed in ``hidden``'s dtype (or the autocast dtype),
    ``weight`` and ``bias`` cast to it as ``F.linear`` under autocast would; the
    softmax and the loss in fp32 (``ce_weight`` too).

    Returns: without ``return_z_loss`` / ``return_token_accuracy``, the loss: an fp32
    tensor, a scalar, or ``targets``' shape for ``reduction="none"``. With either, a
    ``LinearCrossEntropyOutput(loss, z_loss, token_accuracy)`` named tuple (Liger-Kernel's
    ``CrossEntropyOutput`` fields; a field not asked for is None), fp32 tensors of the
    loss's shape: ``loss`` includes the z-loss; ``z_loss`` and ``token_accuracy`` carry no
    gradient (for ``"none"`` per position, 0 where ignored; for ``"mean"`` and ``"sum"`` the
    accuracy is the mean over the non-ignored positions, nan when there are none).
    Gradients flow to ``hidden``, and to ``weight`` / ``bias`` when they require grad
    (accumulated in fp32).
    """
    _validate(hidden, weight, targets, bias, ignore_index, reduction, chunk_size, backend, check_targets)
    _validate_options(weight, ce_weight, label_smoothing, lse_square_scale, softcap, return_z_loss,
                      return_token_accuracy)
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
    cw = None if ce_weight is None else ce_weight.detach().to(torch.float32).contiguous()
    grad_on = torch.is_grad_enabled()
    need = (grad_on and h2.requires_grad, grad_on and W.requires_grad, grad_on and b is not None and b.requires_grad)
    chunk = _chunk_rows(h2.shape[0], W.shape[0], W.shape[1], chunk_size)
    if chunk_size is None and h2.is_cuda:
        opt = _options(cw, label_smoothing, lse_square_scale, softcap)
        chunk = _measured_chunk(h2.detach(), W.detach(), None if b is None else b.detach(), t, int(ignore_index),
                                backend, need, opt)
    with torch.autocast(device_type, enabled=False):
        loss, z_loss, acc = fused_apply(LinearCrossEntropyFunction, torch.ops.rankwise.linear_cross_entropy)(
            h2, W, b, t, int(ignore_index), reduction, chunk, backend, *need, cw, float(label_smoothing),
            float(lse_square_scale), None if softcap is None else float(softcap), return_z_loss,
            return_token_accuracy)[:3]
    if reduction == "none":
        loss = loss.reshape(lead)
        z_loss = z_loss.reshape(lead) if return_z_loss else z_loss
        acc = acc.reshape(lead) if return_token_accuracy else acc
    if not (return_z_loss or return_token_accuracy):
        return loss
    return LinearCrossEntropyOutput(loss, z_loss if return_z_loss else None, acc if return_token_accuracy else None)
