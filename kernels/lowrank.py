"""The low-rank half of a LoRA layer, shared by the dense (``lora_linear.py``)
and the NF4 (``nf4_lora.py``) ops: whatever does not touch the base weight W.

Math (x: (M, K), A: (r, K), B: (N, r), s = scaling, m = dropout keep-mask,
x_d = x * m / (1 - p); derivations in ``lora_linear.py``):

    S  = x_d @ A.T                 (M, r)  ``lora_down``      (kernel 1 of the layer)
    dS = s * dY @ B,               (M, r)  ``lora_ds_db``     (kernel 3, reads dY once)
    dB = s * dY.T @ S              (N, r)
    dA = dS.T @ x_d                (r, K)  ``lora_da``        (kernel 5)

and the two ``triton.jit`` tails that the base-weight GEMMs of either op call
inside their own accumulators:

    acc += (s * S) @ B.T (+ b)             ``lowrank_fwd_tail`` (forward tile)
    acc += (dS @ A) * m / (1 - p)          ``lowrank_dx_tail``  (dX tile)

and the split path's two in-place tail kernels, which run those same tails on
a product torch already made (``torch.addmm`` / ``mm``: cuBLAS on CUDA), one
read and one write of each output tile:

    Y  += s * S @ B.T                      ``lowrank_fwd_add_``  (after Y = x @ W.T + b)
    dX += (dS @ A) * m / (1 - p)           ``lowrank_dx_add_``   (after dX = dY @ W)

The dropout mask is never stored: every kernel that needs it regenerates it
from (seed, flat element index) with Philox (``utils.dropout_keep``);
``dropout_mask`` returns it for tests and users.

Also here, because every LoRA op shares them: the backward custom ops
``rankwise::lora_ds_db`` and ``rankwise::lora_da`` (with fake functions, for
torch.compile); the family's autograd, written once for its four forward ops
(dense or NF4 base x one arm or an arm table): ``lora_function`` registers a
forward op with its fake, setup_context and backward and returns the op's eager
autograd.Function twin; argument checks and seed handling. The call that picks
the torch path or the Triton op, and the torch path itself, are ``lora_torch.py``.

On CUDA each of the three skinny products is also a measured choice
(``tuning.run_path``, as the big GEMMs are): the Triton kernel, or torch's GEMMs
(``torch.mm`` / ``addmm`` with the scaling as the GEMM's alpha: cuBLAS), cached
per shape under the op names ``lora_down`` / ``lora_ds_db`` / ``lora_da`` with
"split" for torch. With dropout the down and dA products stay on the kernels
(torch would have to materialise the mask). Elsewhere: the kernels.

Import rule: this module imports only ``utils`` and ``tuning``; the op files
import it, never each other's private names.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .tuning import run_path
from .utils import (
    BACKENDS,
    INTERPRET,
    dot_precision,
    dropout_keep,
    fit_shared_memory,
    rank_block,
    skinny_config,
    upcast_for_dot,
)

# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


@triton.jit
def lowrank_fwd_tail(acc, S, B, BIAS, rm, rn, M, N, R, stride_sm, stride_sr, stride_bn, stride_br, scaling,
                     HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, BR: tl.constexpr):
    """``acc += (s * S[rm]) @ B[rn].T (+ bias[rn])``: the low-rank term of a forward
    tile, added into the base GEMM's accumulator. The scaling is applied to the
    (BM, BR) S tile in fp32 registers, never to a stored tensor. Shared by the
    dense and the NF4 forward kernels."""
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        s = tl.load(S + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(B + rn[None, :] * stride_bn + rr[:, None] * stride_br,
                    mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
        s = s.to(tl.float32) * scaling
        if UPCAST:
            b = b.to(tl.float32)
        else:
            s = s.to(b.dtype)
        acc = tl.dot(s, b, acc, input_precision=PREC)
    if HAS_BIAS:
        bias = tl.load(BIAS + rn, mask=rn < N, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    return acc


@triton.jit
def lowrank_dx_tail(acc, DS, A, rm, rk, M, K, R, stride_dsm, stride_dsr, stride_ar, stride_ak,
                    seed, p, keep_scale,
                    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """``acc += (dS[rm] @ A[:, rk]) * m / (1 - p)``: the LoRA part of a dX tile, with
    the dropout mask regenerated from the seed. Shared by the dense and NF4 dX kernels."""
    if HAS_DROPOUT:
        lacc = tl.zeros((BM, BK), dtype=tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        ds = tl.load(DS + rm[:, None] * stride_dsm + rr[None, :] * stride_dsr,
                     mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        a = tl.load(A + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                    mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0)
        if UPCAST:
            ds = ds.to(tl.float32)
            a = a.to(tl.float32)
        if HAS_DROPOUT:
            lacc = tl.dot(ds, a, lacc, input_precision=PREC)
        else:
            acc = tl.dot(ds, a, acc, input_precision=PREC)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, rm, rk, K, p)
        acc += tl.where(keep, lacc * keep_scale, 0.0)
    return acc



@triton.jit
def _lora_down_kernel(
    X, A, S,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    seed, p, keep_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    """S[m, r] = sum_k x_d[m, k] * A[r, k]   (kernel 1)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed, rm, rk, K, p), x, 0.0)
        a = tl.load(A + rr[None, :] * stride_ar + rk[:, None] * stride_ak,
                    mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        acc = tl.dot(x, a, acc, input_precision=PREC)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.store(S + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
             acc.to(S.dtype.element_ty), mask=(rm[:, None] < M) & (rr[None, :] < R))



@triton.jit
def _lora_bwd_dsdb_kernel(
    DY, B, S, DS, DB,
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsm, stride_dsr, stride_dbp, stride_dbn, stride_dbr,
    scaling,
    DETERMINISTIC: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    """dS = s * dY @ B and dB = s * dY.T @ S from one read of dY   (kernel 3).

    Each program owns BM rows: dS for them stays in registers over the whole
    N loop; its (BN, BR) share of dB is added to an fp32 buffer with atomics,
    or, when torch's deterministic mode is on, written to a per-program slice
    that the launcher sums in a fixed order.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    s = tl.load(S + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
    if UPCAST:
        s = s.to(tl.float32)
    ds = tl.zeros((BM, BR), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        dy = tl.load(DY + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        b = tl.load(B + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                    mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        ds = tl.dot(dy, b, ds, input_precision=PREC)
        db = tl.dot(tl.trans(dy), s, input_precision=PREC) * scaling
        db_ptrs = DB + rn[:, None] * stride_dbn + rr[None, :] * stride_dbr
        db_mask = (rn[:, None] < N) & (rr[None, :] < R)
        if DETERMINISTIC:
            tl.store(db_ptrs + pid_m * stride_dbp, db, mask=db_mask)
        else:
            tl.atomic_add(db_ptrs, db, mask=db_mask)
    tl.store(DS + rm[:, None] * stride_dsm + rr[None, :] * stride_dsr,
             (ds * scaling).to(DS.dtype.element_ty), mask=(rm[:, None] < M) & (rr[None, :] < R))



@triton.jit
def _lora_bwd_da_kernel(
    DS, X, DA,
    M, K, R,
    stride_dsm, stride_dsr, stride_xm, stride_xk, stride_dar, stride_dak,
    seed, p, keep_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
):
    """dA = dS.T @ x_d   (kernel 5)."""
    pid_k = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    rk = pid_k * BK + tl.arange(0, BK)
    rr = pid_r * BR + tl.arange(0, BR)
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    for m0 in range(0, M, BM):
        rm = m0 + tl.arange(0, BM).to(tl.int64)
        ds = tl.load(DS + rm[None, :] * stride_dsm + rr[:, None] * stride_dsr,
                     mask=(rm[None, :] < M) & (rr[:, None] < R), other=0.0)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed, rm, rk, K, p), x, 0.0)
        if UPCAST:
            ds = ds.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(ds, x, acc, input_precision=PREC)
    if HAS_DROPOUT:
        acc = acc * keep_scale
    tl.store(DA + rr[:, None] * stride_dar + rk[None, :] * stride_dak,
             acc.to(DA.dtype.element_ty), mask=(rr[:, None] < R) & (rk[None, :] < K))


@triton.jit
def _lowrank_fwd_add_kernel(
    Y, S, B,
    M, N, R,
    stride_ym, stride_yn, stride_sm, stride_sr, stride_bn, stride_br,
    scaling,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    """Y[m, n] += s * sum_r S[m, r] * B[n, r], in place   (the split path's forward tail).

    Y already holds the base product x @ W.T + b (cuBLAS); each program reads its
    (BM, BN) tile of Y once, adds the low-rank term with ``lowrank_fwd_tail`` in
    fp32 and writes it back once."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    y_ptrs = Y + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    acc = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    acc = lowrank_fwd_tail(acc, S, B, Y, rm, rn, M, N, R, stride_sm, stride_sr, stride_bn, stride_br,
                           scaling, False, UPCAST, PREC, BR)
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _lowrank_dx_add_kernel(
    DX, DS, A,
    M, K, R,
    stride_dxm, stride_dxk, stride_dsm, stride_dsr, stride_ar, stride_ak,
    seed, p, keep_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
):
    """dX[m, k] += (sum_r dS[m, r] * A[r, k]) * m[m, k] / (1 - p), in place   (the split
    path's dX tail; dX already holds dY @ W, and the keep-mask m is regenerated
    from the seed by ``lowrank_dx_tail``)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    mask = (rm[:, None] < M) & (rk[None, :] < K)
    dx_ptrs = DX + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk
    acc = tl.load(dx_ptrs, mask=mask, other=0.0).to(tl.float32)
    acc = lowrank_dx_tail(acc, DS, A, rm, rk, M, K, R, stride_dsm, stride_dsr, stride_ar, stride_ak,
                          seed, p, keep_scale, HAS_DROPOUT, UPCAST, PREC, BM, BK, BR)
    tl.store(dx_ptrs, acc.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _dropout_mask_kernel(OUT, M, K, seed, p, BM: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    keep = dropout_keep(seed, rm, rk, K, p)
    tl.store(OUT + rm[:, None] * K + rk[None, :], keep.to(tl.int8),
             mask=(rm[:, None] < M) & (rk[None, :] < K))


# ----------------------------------------------------------------------------
# Launchers: own the shapes, allocate outputs, pick the grid.
# All take 2-D operands (any strides) and return new tensors.
# ----------------------------------------------------------------------------


def dropout_args(dropout_p: float, seed: Optional[int]):
    """The kernels' dropout arguments ``(HAS_DROPOUT, seed, p, 1 / (1 - p))``; seed 0
    and scale 1 when dropout is off."""
    has = dropout_p > 0.0
    return has, (int(seed) if has else 0), float(dropout_p), (1.0 / (1.0 - dropout_p) if has else 1.0)


def wide_rank_warps(cfg: dict, BR: int) -> int:
    """Warps of the skinny (rank-sized) kernels, here and in ``multi_lora_kernels.py``: twice as
    many for a rank block over 64 on a GPU, where the (BM or BN) x BR fp32
    accumulators otherwise spill registers (sm_90:
    255 registers and 200-1900 bytes of stack at r = 128-256 with 4 warps;
    benchmarks/compile_check.py)."""
    return cfg["num_warps"] if (INTERPRET or BR <= 64) else 2 * cfg["num_warps"]


def lora_down(x2: torch.Tensor, A: torch.Tensor, dropout_p: float = 0.0, seed: Optional[int] = None) -> torch.Tensor:
    """S = dropout(x2) @ A.T, (M, r) in x2's dtype (kernel 1, or torch's GEMM where measured faster)."""
    if dropout_p > 0.0 or x2.shape[0] == 0:
        return _lora_down_kernel_run(x2, A, dropout_p, seed)
    return run_path("auto", "lora_down", x2.shape[0], A.shape[0], x2.shape[1], x2,
                    lambda cfg: _lora_down_kernel_run(x2, A), lambda: torch.mm(x2, A.t().to(x2.dtype)), dict)


def _lora_down_kernel_run(x2: torch.Tensor, A: torch.Tensor, dropout_p: float = 0.0,
                          seed: Optional[int] = None) -> torch.Tensor:
    M, K = x2.shape
    R = A.shape[0]
    S = torch.empty((M, R), device=x2.device, dtype=x2.dtype)
    if M == 0:
        return S
    cfg = skinny_config(x2.dtype)
    BR = rank_block(R, cap=32 if INTERPRET else 128)
    cfg = fit_shared_memory(cfg, x2.device, BR, x2.dtype)
    has_drop, seed, p, keep_scale = dropout_args(dropout_p, seed)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(R, BR))
    _lora_down_kernel[grid](
        x2, A, S, M, K, R,
        x2.stride(0), x2.stride(1), A.stride(0), A.stride(1), S.stride(0), S.stride(1),
        seed, p, keep_scale,
        HAS_DROPOUT=has_drop, UPCAST=upcast_for_dot(x2.dtype), PREC=dot_precision(x2.dtype),
        BM=cfg["BM"], BR=BR, BK=cfg["BK"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return S



def lora_ds_db(dY, S, B, scaling: float):
    """dS = scaling * dY @ B (M, r, S's dtype) and dB = scaling * dY.T @ S (N, r, B's dtype):
    kernel 3, or torch's two GEMMs where measured faster."""
    M, N = dY.shape
    R = S.shape[1]
    if M == 0:  # contiguous, like the non-empty result (and the custom op's fake function)
        return (torch.empty((M, R), device=dY.device, dtype=S.dtype),
                torch.zeros((N, R), device=B.device, dtype=B.dtype))
    return run_path("auto", "lora_ds_db", M, N, R, dY, lambda cfg: _lora_ds_db_kernel_run(dY, S, B, scaling),
                    lambda: _lora_ds_db_torch(dY, S, B, scaling), dict)


def _alpha_mm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * a @ b`` with alpha applied inside the GEMM (one rounding, as the kernels)."""
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=alpha)


def _lora_ds_db_torch(dY, S, B, scaling: float):
    dS = _alpha_mm(dY, B.to(dY.dtype), float(scaling))
    dB = _alpha_mm(dY.t(), S.to(dY.dtype), float(scaling))
    return dS.to(S.dtype), dB.to(B.dtype)


def _lora_ds_db_kernel_run(dY, S, B, scaling: float):
    M, N = dY.shape
    R = S.shape[1]
    dS = torch.empty((M, R), device=dY.device, dtype=S.dtype)
    cfg = skinny_config(dY.dtype)
    BR = rank_block(R, cap=32 if INTERPRET else 128)
    cfg = fit_shared_memory(cfg, dY.device, BR, dY.dtype)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(R, BR))
    deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic:  # one fp32 slice per row block, summed in a fixed order
        dB32 = torch.empty((grid[0], N, R), device=dY.device, dtype=torch.float32)
        strides = dB32.stride()
    else:
        dB32 = torch.zeros((N, R), device=dY.device, dtype=torch.float32)
        strides = (0,) + dB32.stride()
    _lora_bwd_dsdb_kernel[grid](
        dY, B, S, dS, dB32,
        M, N, R,
        dY.stride(0), dY.stride(1), B.stride(0), B.stride(1), S.stride(0), S.stride(1),
        dS.stride(0), dS.stride(1), *strides,
        float(scaling),
        DETERMINISTIC=deterministic, UPCAST=upcast_for_dot(dY.dtype), PREC=dot_precision(dY.dtype),
        BM=cfg["BM"], BN=cfg["BN"], BR=BR, num_warps=wide_rank_warps(cfg, BR), num_stages=cfg["num_stages"],
    )
    dB = dB32.sum(0) if deterministic else dB32
    return dS, dB.to(B.dtype)



def lora_da(dS, x2, dropout_p: float = 0.0, seed: Optional[int] = None, out_dtype=None) -> torch.Tensor:
    """dA = dS.T @ dropout(x2), (r, K) (kernel 5, or torch's GEMM where measured faster)."""
    if dropout_p > 0.0 or x2.shape[0] == 0:
        return _lora_da_kernel_run(dS, x2, dropout_p, seed, out_dtype)
    return run_path("auto", "lora_da", x2.shape[0], dS.shape[1], x2.shape[1], x2,
                    lambda cfg: _lora_da_kernel_run(dS, x2, 0.0, None, out_dtype),
                    lambda: torch.mm(dS.t().to(x2.dtype), x2).to(out_dtype or x2.dtype), dict)


def _lora_da_kernel_run(dS, x2, dropout_p: float = 0.0, seed: Optional[int] = None, out_dtype=None) -> torch.Tensor:
    M, K = x2.shape
    R = dS.shape[1]
    dA = torch.empty((R, K), device=x2.device, dtype=out_dtype or x2.dtype)
    if M == 0:
        return dA.zero_()
    cfg = skinny_config(x2.dtype)
    BR = rank_block(R, cap=32 if INTERPRET else 128)
    cfg = fit_shared_memory(cfg, x2.device, BR, x2.dtype)
    has_drop, seed, p, keep_scale = dropout_args(dropout_p, seed)
    grid = (triton.cdiv(K, cfg["BN"]), triton.cdiv(R, BR))
    _lora_bwd_da_kernel[grid](
        dS, x2, dA,
        M, K, R,
        dS.stride(0), dS.stride(1), x2.stride(0), x2.stride(1), dA.stride(0), dA.stride(1),
        seed, p, keep_scale,
        HAS_DROPOUT=has_drop, UPCAST=upcast_for_dot(x2.dtype), PREC=dot_precision(x2.dtype),
        BR=BR, BK=cfg["BN"], BM=cfg["BK"], num_warps=wide_rank_warps(cfg, BR), num_stages=cfg["num_stages"],
    )
    return dA


def tail_config(dtype: torch.dtype) -> dict:
    """Tiles of the split path's in-place tail kernels: memory-bound (one read and
    one write of the output tile, the S / dS and B / A rows beside it), so wide
    tiles of the output and a short rank loop."""
    if INTERPRET:
        return dict(BM=32, BN=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BM=64, BN=64, num_warps=4, num_stages=2)
    return dict(BM=64, BN=128, num_warps=8, num_stages=2)


def lowrank_fwd_add_(Y: torch.Tensor, S: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``Y += scaling * S @ B.T`` in place (Y: (M, N), S: (M, r), B: (N, r)); returns Y.
    The split path's forward tail, after the base product ``Y = x @ W.T + b``."""
    M, N = Y.shape
    R = S.shape[1]
    if M == 0 or N == 0:
        return Y
    BR = rank_block(R)
    cfg = fit_shared_memory(tail_config(Y.dtype), Y.device, BR, Y.dtype)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]))
    _lowrank_fwd_add_kernel[grid](
        Y, S, B, M, N, R,
        Y.stride(0), Y.stride(1), S.stride(0), S.stride(1), B.stride(0), B.stride(1),
        float(scaling),
        UPCAST=upcast_for_dot(Y.dtype), PREC=dot_precision(Y.dtype),
        BM=cfg["BM"], BN=cfg["BN"], BR=BR, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return Y


def lowrank_dx_add_(dX: torch.Tensor, dS: torch.Tensor, A: torch.Tensor, dropout_p: float = 0.0,
                    seed: Optional[int] = None) -> torch.Tensor:
    """``dX += dropout_mask * (dS @ A) / (1 - p)`` in place (dX: (M, K), dS: (M, r),
    A: (r, K)); returns dX. The split path's dX tail, after ``dX = dY @ W``."""
    M, K = dX.shape
    R = dS.shape[1]
    if M == 0 or K == 0:
        return dX
    BR = rank_block(R)
    cfg = fit_shared_memory(tail_config(dX.dtype), dX.device, BR, dX.dtype)
    has_drop, seed, p, keep_scale = dropout_args(dropout_p, seed)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(K, cfg["BN"]))
    _lowrank_dx_add_kernel[grid](
        dX, dS, A, M, K, R,
        dX.stride(0), dX.stride(1), dS.stride(0), dS.stride(1), A.stride(0), A.stride(1),
        seed, p, keep_scale,
        HAS_DROPOUT=has_drop, UPCAST=upcast_for_dot(dX.dtype), PREC=dot_precision(dX.dtype),
        BM=cfg["BM"], BK=cfg["BN"], BR=BR, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dX


def split_fwd(x2: torch.Tensor, W: torch.Tensor, S: torch.Tensor, B: torch.Tensor, scaling: float,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The split path's forward on a dense W (an NF4 one dequantized whole by the
    caller): Y = x2 @ W.T (+ bias) by torch (cuBLAS on CUDA), then
    ``Y += scaling * S @ B.T`` in place (``lowrank_fwd_add_``)."""
    Y = torch.addmm(bias, x2, W.t()) if bias is not None else torch.mm(x2, W.t())
    return lowrank_fwd_add_(Y, S, B, scaling)


def split_dx(dY: torch.Tensor, W: torch.Tensor, dS: torch.Tensor, A: torch.Tensor, dropout_p: float = 0.0,
             seed: Optional[int] = None) -> torch.Tensor:
    """The split path's dX: dX = dY @ W by torch, then ``dX += dropout_mask * (dS @ A)
    / (1 - p)`` in place (``lowrank_dx_add_``)."""
    return lowrank_dx_add_(torch.mm(dY, W), dS, A, dropout_p, seed)


def dropout_mask(shape, dropout_p: float, seed: int, device="cpu") -> torch.Tensor:
    """The keep-mask (bool, ``shape`` = (..., in)) that the Triton kernels use for
    ``dropout_p`` and ``seed``; for tests and for users who need the exact mask."""
    shape = tuple(shape)
    K = shape[-1]
    M = 1
    for d in shape[:-1]:
        M *= d
    out = torch.empty((M, K), device=device, dtype=torch.int8)
    if M and K:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        _dropout_mask_kernel[grid](out, M, K, int(seed), float(dropout_p), BM=32, BK=32)
    return out.bool().reshape(shape)



# ----------------------------------------------------------------------------
# Custom ops of the shared backward kernels (torch.compile): each with a fake
# function that gives its output shapes without running a kernel. Registered
# here, once, and used by both single-arm layers' traced backward.
# ----------------------------------------------------------------------------


@torch.library.custom_op("rankwise::lora_ds_db", mutates_args=())
def _lora_ds_db_op(dY: torch.Tensor, S: torch.Tensor, lora_B: torch.Tensor, scaling: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dS, dB)`` of kernel 3; reads torch's deterministic flag when it runs."""
    return lora_ds_db(dY, S, lora_B, scaling)


@_lora_ds_db_op.register_fake
def _lora_ds_db_fake(dY, S, lora_B, scaling):
    return S.new_empty((dY.shape[0], S.shape[1])), lora_B.new_empty(lora_B.shape)


@torch.library.custom_op("rankwise::lora_da", mutates_args=())
def _lora_da_op(dS: torch.Tensor, x2: torch.Tensor, dropout_p: float, seed: int,
                out_dtype: torch.dtype) -> torch.Tensor:
    """dA of kernel 5 in ``out_dtype``, the dropout mask regenerated from ``seed``."""
    return lora_da(dS, x2, dropout_p, seed, out_dtype)


@_lora_da_op.register_fake
def _lora_da_fake(dS, x2, dropout_p, seed, out_dtype):
    return x2.new_empty((dS.shape[1], x2.shape[1]), dtype=out_dtype)


# ----------------------------------------------------------------------------
# The LoRA op family's autograd, written once for its four forward ops
# (``rankwise::lora_linear``, ``nf4_lora_linear``, ``multi_lora_linear``,
# ``multi_nf4_lora_linear``): dense or NF4 base x one arm or an arm table.
#
# Each forward op returns ``(Y, S)`` and is used twice:
# - as a torch.library custom op, for torch.compile: it carries the autograd
#   formula (``register_autograd``), whose backward calls the backward custom
#   ops (kernels 3, 4 and 5), and every op has a fake function giving its output
#   shapes without running a kernel, so dynamo / AOTAutograd trace them as
#   opaque calls: a compiled graph runs kernels 1-2 forward and 3-5 backward;
# - as its autograd.Function twin calling the launchers directly, for eager
#   calls: a Python custom op's dispatch costs several times the host time of an
#   autograd.Function, which a training step would pay on every layer.
# The launchers and the ops take the same positional arguments, so setup_context
# and backward are written once against either set (``KernelSet``).
#
# Gradients (the derivation is ``lora_linear.py``'s, arm by arm in
# ``multi_lora.py``): from dY, kernel 3 gives dS = s * dY @ B and dB = s * dY.T @ S,
# kernel 4 dX = dY @ W + (dS @ A) * m / (1 - p), kernel 5 dA = dS.T @ x_d; a
# dense W and the bias get dW = dY.T @ x and db = sum_rows(dY) from torch when
# they require grad (frozen in LoRA, but treated like nn.Linear's); an NF4 W none.
# Saved: x and S (activations) and the dropout seeds (masks regenerated, never
# stored); W (or its NF4 tensors), A and B are the layer's own, kept by reference.
# ----------------------------------------------------------------------------


class KernelSet(NamedTuple):
    """The backward kernels 3, 4 and 5 of one forward op as callables: the launchers
    (eager) or the custom ops (traced), with the same positional arguments."""
    ds_db: Callable
    dx: Callable
    da: Callable


def traced_kernels(ds_db: str, dx: str, da: str) -> KernelSet:
    """The ``KernelSet`` of the custom ops ``rankwise::<ds_db>``, ``<dx>``, ``<da>``."""
    return KernelSet(*(lambda *a, name=name: getattr(torch.ops.rankwise, name)(*a) for name in (ds_db, dx, da)))


class OpLayout(NamedTuple):
    """Where a forward op's inputs sit: x2, then a dense W, A, B, bias (``nf4``
    False) or A, B, bias and the NF4 weight's six tensors and four constants
    (``nf4`` True); then ``n_arm`` arm arguments; then ``path`` (optional).
    Kernel 3 takes the arm arguments ``arms[ds]``; kernels 4 and 5 ``arms[da]``."""
    nf4: bool
    n_arm: int
    ds: slice
    da: slice


#: The arm arguments of a single-arm op: scaling | dropout_p, seed.
ONE_ARM = dict(n_arm=3, ds=slice(0, 1), da=slice(1, 3))
#: Those of a multi-arm op: the lists ranks, scalings, rows, dropout_ps, seeds, for every kernel.
ARM_TABLE = dict(n_arm=5, ds=slice(0, 5), da=slice(0, 5))


def _setup_context(layout: OpLayout, ctx, inputs, output):
    """Save what ``_backward`` needs (see the section comment); S is marked
    non-differentiable and gets no materialised zero gradient."""
    if layout.nf4:  # x2, A, B, bias, the six NF4 tensors, its four constants, arms, path
        x2, lora_A, lora_B = inputs[:3]
        base, consts, rest = inputs[4:10], tuple(inputs[10:14]), inputs[14:]
    else:  # x2, W, A, B, bias, arms, path
        x2, weight, lora_A, lora_B = inputs[:4]
        base, consts, rest = (weight,), (), inputs[5:]
    ctx.save_for_backward(x2, lora_A, lora_B, output[1], *base)
    arms = tuple(rest[:layout.n_arm])
    ctx.base_consts, ctx.ds_args, ctx.da_args = consts, arms[layout.ds], arms[layout.da]
    ctx.path, ctx.n_inputs = (rest[layout.n_arm] if len(rest) > layout.n_arm else "auto"), len(inputs)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(layout: OpLayout, ctx, dY, k: KernelSet):
    """The gradients of every input (None for those that need none and the
    non-tensor ones): dX, dA, dB by kernels 3-5, dW (dense W) and db by torch."""
    x2, lora_A, lora_B, S, *base = ctx.saved_tensors
    if dY is None:
        return (None,) * ctx.n_inputs
    dense = not layout.nf4
    w = 1 if dense else 0  # a dense W is input 1, before A, B and the bias
    need = ctx.needs_input_grad
    need_x, need_a, need_b, need_bias = need[0], need[1 + w], need[2 + w], need[3 + w]
    dY = dY if dY.dtype == x2.dtype else dY.to(x2.dtype)
    dX = dA = dB = None
    if need_x or need_a or need_b:
        dS, dB = k.ds_db(dY, S, lora_B, *ctx.ds_args)
        if need_x:
            dX = k.dx(dY, *base, *ctx.base_consts, dS, lora_A, *ctx.da_args, ctx.path)
        if need_a:
            dA = k.da(dS, x2, *ctx.da_args, lora_A.dtype)
        if not need_b:
            dB = None
    dW = (dY.t() @ x2).to(base[0].dtype) if dense and need[1] else None
    dbias = dY.float().sum(0).to(dY.dtype) if need_bias else None
    grads = (dX, dW, dA, dB, dbias) if dense else (dX, dA, dB, dbias)
    return grads + (None,) * (ctx.n_inputs - len(grads))


def lora_function(name: str, fwd: Callable, fake: Callable, layout: OpLayout, eager: KernelSet,
                  traced: KernelSet, function_name: str, doc: str) -> type:
    """Register ``fwd`` (its annotations give the schema) as the custom op
    ``rankwise::<name>`` with ``fake`` and the family's autograd formula (backward
    through the ``traced`` ops), and return its eager twin: the autograd.Function
    ``function_name``, with the same arguments, outputs and formula, calling
    ``fwd`` and the ``eager`` launchers directly."""
    op = torch.library.custom_op(f"rankwise::{name}", fwd, mutates_args=())
    op.register_fake(fake)
    op.register_autograd(lambda ctx, dY, _dS: _backward(layout, ctx, dY, traced),
                         setup_context=lambda ctx, inputs, output: _setup_context(layout, ctx, inputs, output))

    def forward(ctx, *inputs):
        # setup_context called here rather than declared: a declared one makes
        # every apply() bind a signature (inspect), a cost paid on every layer.
        output = fwd(*inputs)
        _setup_context(layout, ctx, inputs, output)
        return output

    def backward(ctx, dY, _dS):
        return _backward(layout, ctx, dY, eager)

    return type(function_name, (torch.autograd.Function,), dict(
        __doc__=doc, __module__=fwd.__module__, __qualname__=function_name,
        forward=staticmethod(forward), backward=staticmethod(backward)))


# ----------------------------------------------------------------------------
# Arguments: checks, compute dtype, dropout seed (every public entry of the family)
# ----------------------------------------------------------------------------


def check_tensor(t, name, ndim=None):
    """A floating-point tensor (of ``ndim`` dimensions when given), else a
    TypeError / ValueError naming the argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")


def draw_seed(dropout_p: float, seed):
    """The dropout seed: ``seed`` as given, or one drawn from torch's default
    generator when dropout is on and ``seed`` is None. ``.item()`` of the int64
    draw is already a Python int (under torch.compile with
    ``torch._dynamo.config.capture_scalar_outputs = True`` a symbolic int that
    flows into the op; without it, a graph break), so it is not passed to ``int()``."""
    if dropout_p > 0.0 and seed is None:
        return torch.randint(0, 2**31 - 1, (1,)).item()
    return seed


def op_seed(dropout_p: float, seed):
    """The custom ops' ``int`` seed argument: 0 (unused) without dropout."""
    if dropout_p == 0.0:
        return 0
    return seed if isinstance(seed, (int, torch.SymInt)) else int(seed)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a LoRA layer computes in: autocast's when autocast is on for
    x's device, else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def validate_lora_args(x, weight_shape, weight_device, lora_A, lora_B, bias, scaling, dropout_p, backend):
    """Check the arguments of a LoRA layer call against the base weight's shape
    and device; returns ``scaling`` as a float. Errors name the argument."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., in_features), got a 0-D tensor")
    check_tensor(lora_A, "lora_A", 2)
    check_tensor(lora_B, "lora_B", 2)
    out_features, in_features = weight_shape
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A: rank r = lora_A.shape[0] must be >= 1, got shape {tuple(lora_A.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match weight in_features {in_features} "
                         f"(weight shape {tuple(weight_shape)})")
    if lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A: expected shape (r, {in_features}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, r):
        raise ValueError(f"lora_B: expected shape ({out_features}, {r}) = (out_features, r), "
                         f"got {tuple(lora_B.shape)}")
    devices = {"x": x.device, "weight": weight_device, "lora_A": lora_A.device, "lora_B": lora_B.device}
    if bias is not None:
        check_tensor(bias, "bias", 1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
        devices["bias"] = bias.device
    if len(set(devices.values())) > 1:
        raise ValueError("all tensors must be on one device, got " +
                         ", ".join(f"{k} on {v}" for k, v in devices.items()))
    try:
        scaling = float(scaling)
    except (TypeError, ValueError):
        raise TypeError(f"scaling: expected a real number, got {scaling!r}") from None
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    return scaling
