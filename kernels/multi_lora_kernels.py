"""The Triton kernels of ``multi_lora.py`` (the segmented multi-arm LoRA op) and
their launchers: kernels 1-5 of that file's docstring, the launch plan of one
call (``multi_plan`` / ``MultiPlan``), and the big GEMMs of the forward and
dX by either path (``multi_lora_fwd_gemm`` / ``multi_lora_dx_gemm``: the fused
kernels 2 and 4, or the split path, torch's GEMM then ``lowrank.py``'s in-place
tail kernels, chosen by ``tuning``). ``multi_lora.py`` holds the custom ops, the
autograd Functions, the torch path and the public entry points, and calls only
the public launchers here.

Tiling and routing (details above the kernels): rows are cut into tiles of BM
rows per arm (an arm's last tile partly masked), listed in a tile map of (arm,
first local row); every program reads its tile's arm and takes that arm's rank,
A_k / B_k offsets, S offset, scaling and dropout from per-arm tables. A tile
never holds two arms' rows, so it never mixes their low-rank terms; the base
GEMM still runs once over every row (at most one partial tile per arm more
than a plain GEMM). Nothing is copied or padded in memory. kernel 5 (dA, and
dB) runs one program column per arm over that arm's rows.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .lowrank import lowrank_dx_add_, lowrank_dx_tail, lowrank_fwd_add_, lowrank_fwd_tail, wide_rank_warps
from .nf4 import TL_DTYPES, nf4_rows_tile, nf4_tile
from .nf4_lora import nf4_dense, nf4_gemm_config
from .tuning import run_path
from .utils import (
    INTERPRET,
    dot_precision,
    dropout_keep,
    fit_shared_memory,
    gemm_config,
    max_shared_memory,
    rank_block,
    round_bf16,
    rounds_bf16_itself,
    skinny_config,
    swizzle_tile,
    upcast_for_dot,
)

__all__ = ["MultiPlan", "multi_plan", "multi_lora_down", "multi_lora_fwd_gemm", "multi_lora_ds_db",
           "multi_lora_dx_gemm", "multi_lora_da"]


# ----------------------------------------------------------------------------
# Triton kernels
#
# Routing: the rows are cut into tiles per arm. A tile map (``_tiles``, one per
# row-block size BM, built by ``multi_plan``) lists, for each tile t, its arm k,
# its first row inside the arm (a multiple of BM); an arm of M_k rows gets
# ceil(M_k / BM) tiles, the last one partly masked, and an empty arm none. A
# program reads its tile's arm from the map, then the arm's row start, row
# count, rank offset, rank, S offset, seed, scaling and dropout (``_arm``):
# every tile belongs to exactly one arm, so no tile ever mixes two arms'
# low-rank terms, and the base GEMM still covers every row once (at most one
# extra tile per arm against a plain GEMM's cdiv(M, BM)). No row is copied or
# padded in memory. dA and dB (kernel 5, a reduction over each arm's rows) need
# no map: their grid has one axis per arm.
#
# S and dS are stored compactly, arm after arm: arm k's (M_k, r_k) block starts
# at s_k = sum_{j<k} M_j * r_j (row stride r_k), so they hold sum_k M_k * r_k
# values, not M * max(r) or M * sum(r).
#
# Dropout: the keep-mask of arm k at (local row i, column c) is Philox of
# (seeds[k], i * K + c) (``utils.dropout_keep`` on local rows): the single-arm
# kernels' mask for an input of the arm's rows alone. An arm with p = 0 keeps
# every element (rand >= 0) with scale 1.
# ----------------------------------------------------------------------------


@triton.jit
def _tile(TILES, t):
    """(arm, first local row) of tile t."""
    return tl.load(TILES + 2 * t), tl.load(TILES + 2 * t + 1)


@triton.jit
def _arm(ARM_I, ARM_F, arm):
    """(row start, rows, rank offset, rank, S offset, seed, scaling, p, 1 / (1 - p)) of an arm."""
    base_i = ARM_I + 6 * arm
    base_f = ARM_F + 3 * arm
    return (tl.load(base_i), tl.load(base_i + 1), tl.load(base_i + 2), tl.load(base_i + 3), tl.load(base_i + 4),
            tl.load(base_i + 5), tl.load(base_f), tl.load(base_f + 1), tl.load(base_f + 2))


@triton.jit
def _multi_down_kernel(
    X, A, S, TILES, ARM_I, ARM_F,
    K,
    stride_xm, stride_xk, stride_ar, stride_ak,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
):
    """S_k[i, r] = sum_c x_dk[i, c] * A_k[r, c] for the BM rows of one tile of arm k."""
    t = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    arm, lrow0 = _tile(TILES, t)
    row0, Mk, aoff, R, soff, seed, scaling, p, keep_scale = _arm(ARM_I, ARM_F, arm)
    if pid_r * BR < R:
        lm = lrow0 + tl.arange(0, BM)
        rr = pid_r * BR + tl.arange(0, BR)
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            x = tl.load(X + (row0 + lm)[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=(lm[:, None] < Mk) & (rk[None, :] < K), other=0.0)
            if HAS_DROPOUT:
                x = tl.where(dropout_keep(seed, lm, rk, K, p), x, 0.0)
            a = tl.load(A + (aoff + rr)[None, :] * stride_ar + rk[:, None] * stride_ak,
                        mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(x, a, acc, input_precision=PREC)
        if HAS_DROPOUT:
            acc = acc * keep_scale
        tl.store(S + soff + lm[:, None] * R + rr[None, :], acc.to(S.dtype.element_ty),
                 mask=(lm[:, None] < Mk) & (rr[None, :] < R))


@triton.jit
def _w_tile(W, PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, rn, rk, k0, N, K, stride_wn, stride_wk,
            NF4: tl.constexpr, TRANS: tl.constexpr, QBLOCK: tl.constexpr, DOUBLE: tl.constexpr,
            NESTED_BLOCK: tl.constexpr, WDTYPE: tl.constexpr, EVEN_K: tl.constexpr, W_RNE: tl.constexpr,
            BK: tl.constexpr):
    """The base weight's tile W[rn, rk] (rk = k0 + arange(BK)), as (BK, BN) = W.T's tile
    when TRANS, else (BN, BK): loaded from a dense W, or dequantized in registers from
    NF4 (the values ``dequantize_nf4(W)`` holds, as in ``nf4_lora.py``)."""
    if NF4:
        if EVEN_K:
            w = nf4_rows_tile(PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, rn, k0, N, K,
                              BK, QBLOCK, DOUBLE, NESTED_BLOCK)
            if TRANS:
                w = tl.trans(w)
        else:
            if TRANS:
                w = nf4_tile(PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, rn[None, :] * K + rk[:, None],
                             (rn[None, :] < N) & (rk[:, None] < K), QBLOCK, DOUBLE, NESTED_BLOCK)
            else:
                w = nf4_tile(PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, rn[:, None] * K + rk[None, :],
                             (rn[:, None] < N) & (rk[None, :] < K), QBLOCK, DOUBLE, NESTED_BLOCK)
        if W_RNE:  # W rounded to its bf16 dtype by hand: the interpreter's cast truncates
            w = round_bf16(w)
        w = w.to(WDTYPE)
    else:
        if TRANS:
            w = tl.load(W + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                        mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)
        else:
            w = tl.load(W + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                        mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
    return w


@triton.jit
def _multi_fwd_kernel(
    X, W, PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, S, B, BIAS, Y, TILES, ARM_I, ARM_F,
    NT, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_bn, stride_br, stride_ym, stride_yn,
    NF4: tl.constexpr, QBLOCK: tl.constexpr, DOUBLE: tl.constexpr, NESTED_BLOCK: tl.constexpr,
    WDTYPE: tl.constexpr, EVEN_K: tl.constexpr, W_RNE: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y[tile] = x[tile] @ W.T + (s_k * S_k[tile]) @ B_k.T + b: the base GEMM over the
    tile's rows and arm k's low-rank tail, one accumulator."""
    t, pid_n = swizzle_tile(NT * BM, N, BM, BN, GROUP_M)
    arm, lrow0 = _tile(TILES, t)
    row0, Mk, aoff, R, soff, _seed, scaling, _p, _ks = _arm(ARM_I, ARM_F, arm)
    lm = lrow0 + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(X + (row0 + lm)[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(lm[:, None] < Mk) & (rk[None, :] < K), other=0.0)
        w = _w_tile(W, PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, rn, rk, k0, N, K, stride_wn, stride_wk,
                    NF4, True, QBLOCK, DOUBLE, NESTED_BLOCK, WDTYPE, EVEN_K, W_RNE, BK)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=PREC)
    acc = lowrank_fwd_tail(acc, S + soff, B + aoff * stride_br, BIAS, lm, rn, Mk, N, R, R, 1,
                           stride_bn, stride_br, scaling, HAS_BIAS, UPCAST, PREC, BR)
    tl.store(Y + (row0 + lm)[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=(lm[:, None] < Mk) & (rn[None, :] < N))


@triton.jit
def _multi_ds_kernel(
    DY, B, S, DS, TILES, ARM_I, ARM_F,
    N,
    stride_dym, stride_dyn, stride_bn, stride_br,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
):
    """dS_k[tile] = s_k * dY[tile] @ B_k (compact, arm after arm).

    dB is not formed here: adding each row tile's (BN, BR) share of dB with
    atomics, as the single-arm kernel 3 does, cost 20 ms of a 26 ms backward on
    an H200 at 4 x 8192 rows, 2048 -> 8192, ranks 1/8/32/128 (every tile of every
    arm adds a full rank block); ``multi_lora_ds_db`` reduces dB over each arm's
    rows with kernel 5 instead."""
    t = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    arm, lrow0 = _tile(TILES, t)
    row0, Mk, aoff, R, soff, _seed, scaling, _p, _ks = _arm(ARM_I, ARM_F, arm)
    if pid_r * BR < R:
        lm = lrow0 + tl.arange(0, BM)
        rr = pid_r * BR + tl.arange(0, BR)
        smask = (lm[:, None] < Mk) & (rr[None, :] < R)
        ds = tl.zeros((BM, BR), dtype=tl.float32)
        for n0 in range(0, N, BN):
            rn = n0 + tl.arange(0, BN)
            dy = tl.load(DY + (row0 + lm)[:, None] * stride_dym + rn[None, :] * stride_dyn,
                         mask=(lm[:, None] < Mk) & (rn[None, :] < N), other=0.0)
            b = tl.load(B + rn[:, None] * stride_bn + (aoff + rr)[None, :] * stride_br,
                        mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
            if UPCAST:
                dy = dy.to(tl.float32)
                b = b.to(tl.float32)
            ds = tl.dot(dy, b, ds, input_precision=PREC)
        tl.store(DS + soff + lm[:, None] * R + rr[None, :], (ds * scaling).to(DS.dtype.element_ty), mask=smask)


@triton.jit
def _multi_dx_kernel(
    DY, W, PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, DS, A, DX, TILES, ARM_I, ARM_F,
    NT, N, K,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_dxm, stride_dxk,
    NF4: tl.constexpr, QBLOCK: tl.constexpr, DOUBLE: tl.constexpr, NESTED_BLOCK: tl.constexpr,
    WDTYPE: tl.constexpr, EVEN_K: tl.constexpr, W_RNE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX[tile] = dY[tile] @ W + (dS_k[tile] @ A_k) * m_k / (1 - p_k): the base GEMM and
    arm k's low-rank tail, the mask regenerated from the arm's seed on local rows."""
    t, pid_k = swizzle_tile(NT * BM, K, BM, BK, GROUP_M)
    arm, lrow0 = _tile(TILES, t)
    row0, Mk, aoff, R, soff, seed, scaling, p, keep_scale = _arm(ARM_I, ARM_F, arm)
    lm = lrow0 + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        dy = tl.load(DY + (row0 + lm)[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=(lm[:, None] < Mk) & (rn[None, :] < N), other=0.0)
        w = _w_tile(W, PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, rn, rk, pid_k * BK, N, K, stride_wn, stride_wk,
                    NF4, False, QBLOCK, DOUBLE, NESTED_BLOCK, WDTYPE, EVEN_K, W_RNE, BK)
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(dy.dtype)
        acc = tl.dot(dy, w, acc, input_precision=PREC)
    acc = lowrank_dx_tail(acc, DS + soff, A + aoff * stride_ar, lm, rk, Mk, K, R, R, 1, stride_ar, stride_ak,
                          seed, p, keep_scale, HAS_DROPOUT, UPCAST, PREC, BM, BK, BR)
    tl.store(DX + (row0 + lm)[:, None] * stride_dxm + rk[None, :] * stride_dxk,
             acc.to(DX.dtype.element_ty), mask=(lm[:, None] < Mk) & (rk[None, :] < K))


@triton.jit
def _multi_da_kernel(
    DS, X, DA, ARM_I, ARM_F,
    K,
    stride_xm, stride_xk, stride_dar, stride_dak,
    HAS_DROPOUT: tl.constexpr, SCALED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BR: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr,
):
    """dA_k = dS_k.T @ x_dk over the arm's own rows (grid axis 2 = arm), written to
    rows o_k : o_k + r_k of dA; an arm without rows writes zeros. ``SCALED``: times
    the arm's scaling s_k (dB_k.T = s_k * S_k.T @ dY_k, see ``multi_lora_ds_db``)."""
    pid_k = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    arm = tl.program_id(2).to(tl.int64)
    row0, Mk, aoff, R, soff, seed, scaling, p, keep_scale = _arm(ARM_I, ARM_F, arm)
    if pid_r * BR < R:
        rk = pid_k * BK + tl.arange(0, BK)
        rr = pid_r * BR + tl.arange(0, BR)
        acc = tl.zeros((BR, BK), dtype=tl.float32)
        for m0 in range(0, Mk, BM):
            lm = m0 + tl.arange(0, BM).to(tl.int64)
            ds = tl.load(DS + soff + lm[None, :] * R + rr[:, None],
                         mask=(lm[None, :] < Mk) & (rr[:, None] < R), other=0.0)
            x = tl.load(X + (row0 + lm)[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=(lm[:, None] < Mk) & (rk[None, :] < K), other=0.0)
            if HAS_DROPOUT:
                x = tl.where(dropout_keep(seed, lm, rk, K, p), x, 0.0)
            if UPCAST:
                ds = ds.to(tl.float32)
                x = x.to(tl.float32)
            acc = tl.dot(ds, x, acc, input_precision=PREC)
        if HAS_DROPOUT:
            acc = acc * keep_scale
        if SCALED:
            acc = acc * scaling
        tl.store(DA + (aoff + rr)[:, None] * stride_dar + rk[None, :] * stride_dak,
                 acc.to(DA.dtype.element_ty), mask=(rr[:, None] < R) & (rk[None, :] < K))


# ----------------------------------------------------------------------------
# Launchers: own the shapes, allocate outputs, pick the grid. x2 / dY are 2-D
# (any strides); S and dS are the compact flat buffers described above.
# ----------------------------------------------------------------------------


class MultiPlan(NamedTuple):
    """Everything the launchers need about the arms, built once per call
    (``multi_plan``): the per-arm tables and the two tile maps on the device,
    the tile sizes, and host copies of what the launchers size buffers with."""
    rows: tuple
    ranks: tuple
    arm_i: torch.Tensor        # (n, 6) int64: row start, rows, rank offset, rank, S offset, seed
    arm_f: torch.Tensor        # (n, 3) fp32: scaling, p, 1 / (1 - p)
    gemm_tiles: torch.Tensor   # (T_gemm, 2) int64: arm, first local row
    skinny_tiles: torch.Tensor  # (T_skinny, 2) int64: arm, first local row
    gemm_cfg: dict
    gemm_br: int
    skinny_cfg: dict
    skinny_br: int
    has_dropout: bool
    s_size: int                # sum_k M_k * r_k: length of S and dS


def _tiles(rows, ranks, BM):
    """Host tile map for row blocks of BM: [(arm, first local row)]."""
    return [(k, i * BM) for k, M_k in enumerate(rows) for i in range(-(-M_k // BM))]


# The device tables a CUDA graph captured: a replay reads them at the addresses of the capture, so they must
# outlive the memo's evictions (other shapes, e.g. evaluation batches, push them out); a few small tensors per
# capture, kept for the process.
_CAPTURED: list = []


def _kept(tables):
    """``tables``, also kept in ``_CAPTURED`` while a CUDA graph is being captured."""
    first = tables[0] if isinstance(tables, tuple) else tables
    if first.is_cuda and torch.cuda.is_current_stream_capturing():
        _CAPTURED.append(tables)
    return tables


@functools.lru_cache(maxsize=128)
def _arm_tables(rows, ranks, scalings, ps, seeds, device):
    """The per-arm tables on the device, ``(arm_i, arm_f, sum_k M_k r_k)``, memoised:
    a training step calls each layer with the same arms again and again (with
    per-step dropout seeds, only these two small tables are copied anew)."""
    arm_i, arm_f, row0, aoff, soff = [], [], 0, 0, 0
    for M_k, r, s, p, seed in zip(rows, ranks, scalings, ps, seeds):
        arm_i.append((row0, M_k, aoff, r, soff, seed if p > 0.0 else 0))
        arm_f.append((s, p, 1.0 / (1.0 - p) if p > 0.0 else 1.0))
        row0, aoff, soff = row0 + M_k, aoff + r, soff + M_k * r
    return (torch.tensor(arm_i, dtype=torch.int64).to(device), torch.tensor(arm_f, dtype=torch.float32).to(device),
            soff)


@functools.lru_cache(maxsize=128)
def _tile_table(rows, ranks, BM, device):
    """The tile map for row blocks of BM on the device, (T, 2) int64; memoised like ``_arm_tables``."""
    return torch.tensor(_tiles(rows, ranks, BM), dtype=torch.int64).reshape(-1, 2).to(device)


def multi_plan(rows, ranks, scalings, dropout_ps, seeds, dtype: torch.dtype, device: torch.device,
               nf4: bool) -> MultiPlan:
    """The launch plan of one call: tile sizes for ``dtype`` on ``device`` (NF4 or
    dense base GEMMs) and the device tables of the arms."""
    rows, ranks = tuple(rows), tuple(ranks)
    r_max = max(ranks)
    gemm_cfg = nf4_gemm_config(dtype, device) if nf4 else gemm_config(dtype)
    gemm_br = rank_block(r_max)
    if not nf4:
        gemm_cfg = fit_shared_memory(gemm_cfg, device, gemm_br, dtype)
    elif not INTERPRET and max_shared_memory(device) < 200 * 1024:
        # NF4 below Hopper: the arm-table registers on top of nf4_gemm_config's tiles spilled in the dX
        # GEMM at sm_89 (benchmarks/compile_check.py); BM sizes the tile table, so it is set here
        gemm_cfg = {**gemm_cfg, "BM": 64}
    skinny_br = rank_block(r_max, cap=32 if INTERPRET else 128)
    skinny_cfg = fit_shared_memory(skinny_config(dtype), device, skinny_br, dtype)
    if not INTERPRET and skinny_br > 64:
        # dS/dB with a rank block over 64: the arm-table registers on top of the (BM + BN) x BR fp32
        # accumulators spilled at sm_90 with BM=64 (benchmarks/compile_check.py); BM sizes the tile
        # tables too, so it is chosen here, once, for every skinny kernel
        skinny_cfg = {**skinny_cfg, "BM": 32, "BN": min(skinny_cfg["BN"], 64)}
    arm_i, arm_f, s_size = _kept(_arm_tables(rows, ranks, tuple(scalings), tuple(dropout_ps), tuple(seeds), device))
    gemm_tiles = _kept(_tile_table(rows, ranks, gemm_cfg["BM"], device))
    skinny_tiles = _kept(_tile_table(rows, ranks, skinny_cfg["BM"], device))
    return MultiPlan(rows, ranks, arm_i, arm_f, gemm_tiles, skinny_tiles, gemm_cfg, gemm_br,
                     skinny_cfg, skinny_br, any(p > 0.0 for p in dropout_ps), s_size)


def _base_args(base, K: int):
    """The base weight's kernel arguments: (W, six NF4 tensors), (stride_wn, stride_wk)
    and the NF4 constexprs. ``base`` is a dense W (the NF4 slots get placeholders)
    or ``(the six tensors of nf4_kernel_args, (blocksize, double_quant,
    nested_blocksize, W's original dtype))``."""
    if isinstance(base, tuple):
        tensors, (blocksize, double_quant, nested_blocksize, wdtype) = base
        return (tensors[0],) + tuple(tensors), (0, 0), dict(
            NF4=True, QBLOCK=blocksize, DOUBLE=double_quant, NESTED_BLOCK=nested_blocksize,
            WDTYPE=TL_DTYPES[wdtype], EVEN_K=K % 2 == 0, W_RNE=rounds_bf16_itself(wdtype))
    return (base,) * 7, (base.stride(0), base.stride(1)), dict(
        NF4=False, QBLOCK=64, DOUBLE=False, NESTED_BLOCK=256, WDTYPE=tl.float32, EVEN_K=True, W_RNE=False)


def multi_lora_down(x2, A, plan: MultiPlan) -> torch.Tensor:
    """S_k = dropout_k(x_k) @ A_k.T for every arm, the compact flat S in x2's dtype."""
    K = x2.shape[1]
    S = torch.empty(plan.s_size, device=x2.device, dtype=x2.dtype)
    T = plan.skinny_tiles.shape[0]
    if T == 0:
        return S
    cfg, BR = plan.skinny_cfg, plan.skinny_br
    grid = (T, triton.cdiv(max(plan.ranks), BR))
    _multi_down_kernel[grid](
        x2, A, S, plan.skinny_tiles, plan.arm_i, plan.arm_f, K,
        x2.stride(0), x2.stride(1), A.stride(0), A.stride(1),
        HAS_DROPOUT=plan.has_dropout, UPCAST=upcast_for_dot(x2.dtype), PREC=dot_precision(x2.dtype),
        BM=cfg["BM"], BR=BR, BK=cfg["BK"], num_warps=wide_rank_warps(cfg, BR), num_stages=cfg["num_stages"],
    )
    return S


def _multi_fwd_gemm(x2, base, S, B, bias, plan: MultiPlan) -> torch.Tensor:
    """Y = x2 @ W.T + b, plus each arm's s_k * S_k @ B_k.T on its rows; (M, N) in x2's dtype."""
    M, K = x2.shape
    N = B.shape[0]
    Y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    T = plan.gemm_tiles.shape[0]
    if T == 0:
        return Y
    w, (swn, swk), const = _base_args(base, K)
    cfg = plan.gemm_cfg
    grid = (T * triton.cdiv(N, cfg["BN"]),)
    _multi_fwd_kernel[grid](
        x2, *w, S, B, bias if bias is not None else x2, Y, plan.gemm_tiles, plan.arm_i, plan.arm_f,
        T, N, K,
        x2.stride(0), x2.stride(1), swn, swk, B.stride(0), B.stride(1), Y.stride(0), Y.stride(1),
        **const, HAS_BIAS=bias is not None, UPCAST=upcast_for_dot(x2.dtype), PREC=dot_precision(x2.dtype),
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BR=plan.gemm_br, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return Y


def multi_lora_ds_db(dY, S, B, plan: MultiPlan):
    """dS_k = s_k * dY_k @ B_k (compact flat, S's dtype) and dB (N, sum r) in B's dtype,
    arm k's columns s_k * dY_k.T @ S_k (zeros for an arm without rows).

    dS by row tiles (``_multi_ds_kernel``); dB by kernel 5 (``_multi_da_kernel``, which
    reduces ``T_k.T @ X_k`` over each arm's rows): with ``S`` for ``dS`` and ``dY`` for
    ``x`` it gives ``S_k.T @ dY_k`` = dB_k.T, written transposed into the fp32
    ``(N, sum r)`` buffer, times s_k. A fixed reduction order per
    output tile, so no atomics and the same bits in torch's deterministic mode."""
    N, RT = B.shape
    dS = torch.empty_like(S)
    T = plan.skinny_tiles.shape[0]
    if T == 0:
        return dS, torch.zeros((N, RT), device=B.device, dtype=B.dtype)
    cfg, BR = plan.skinny_cfg, plan.skinny_br
    upcast, prec = upcast_for_dot(dY.dtype), dot_precision(dY.dtype)
    warps = wide_rank_warps(cfg, BR)
    _multi_ds_kernel[(T, triton.cdiv(max(plan.ranks), BR))](
        dY, B, S, dS, plan.skinny_tiles, plan.arm_i, plan.arm_f,
        N,
        dY.stride(0), dY.stride(1), B.stride(0), B.stride(1),
        UPCAST=upcast, PREC=prec,
        BM=cfg["BM"], BN=cfg["BN"], BR=BR, num_warps=warps, num_stages=cfg["num_stages"],
    )
    dB32 = torch.empty((N, RT), device=dY.device, dtype=torch.float32)
    grid = (triton.cdiv(N, cfg["BN"]), triton.cdiv(max(plan.ranks), BR), len(plan.ranks))
    _multi_da_kernel[grid](
        S, dY, dB32, plan.arm_i, plan.arm_f, N,
        dY.stride(0), dY.stride(1), dB32.stride(1), dB32.stride(0),
        HAS_DROPOUT=False, SCALED=True, UPCAST=upcast, PREC=prec,
        BR=BR, BK=cfg["BN"], BM=cfg["BK"], num_warps=warps, num_stages=cfg["num_stages"],
    )
    return dS, dB32.to(B.dtype)


def _multi_dx(dY, base, dS, A, plan: MultiPlan) -> torch.Tensor:
    """dX = dY @ W, plus each arm's (dS_k @ A_k) * m_k / (1 - p_k) on its rows; (M, K) in dY's dtype."""
    M, N = dY.shape
    K = A.shape[1]
    dX = torch.empty((M, K), device=dY.device, dtype=dY.dtype)
    T = plan.gemm_tiles.shape[0]
    if T == 0:
        return dX
    w, (swn, swk), const = _base_args(base, K)
    cfg = plan.gemm_cfg
    grid = (T * triton.cdiv(K, cfg["BN"]),)
    _multi_dx_kernel[grid](
        dY, *w, dS, A, dX, plan.gemm_tiles, plan.arm_i, plan.arm_f,
        T, N, K,
        dY.stride(0), dY.stride(1), swn, swk, A.stride(0), A.stride(1), dX.stride(0), dX.stride(1),
        **const, HAS_DROPOUT=plan.has_dropout, UPCAST=upcast_for_dot(dY.dtype), PREC=dot_precision(dY.dtype),
        BM=cfg["BM"], BK=cfg["BN"], BN=cfg["BK"], BR=plan.gemm_br, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dX


def multi_lora_da(dS, x2, plan: MultiPlan, out_dtype) -> torch.Tensor:
    """dA (sum r, K) in ``out_dtype``: arm k's rows dS_k.T @ dropout_k(x_k)."""
    K = x2.shape[1]
    RT = sum(plan.ranks)
    dA = torch.empty((RT, K), device=x2.device, dtype=out_dtype)
    cfg, BR = plan.skinny_cfg, plan.skinny_br
    grid = (triton.cdiv(K, cfg["BN"]), triton.cdiv(max(plan.ranks), BR), len(plan.ranks))
    _multi_da_kernel[grid](
        dS, x2, dA, plan.arm_i, plan.arm_f, K,
        x2.stride(0), x2.stride(1), dA.stride(0), dA.stride(1),
        HAS_DROPOUT=plan.has_dropout, SCALED=False, UPCAST=upcast_for_dot(x2.dtype), PREC=dot_precision(x2.dtype),
        BR=BR, BK=cfg["BN"], BM=cfg["BK"], num_warps=wide_rank_warps(cfg, BR), num_stages=cfg["num_stages"],
    )
    return dA


# ----------------------------------------------------------------------------
# The split path (``path="split"``, or ``"auto"``'s measured choice on CUDA): the
# base product over all rows by torch (cuBLAS on CUDA; an NF4 W dequantized whole
# first), then each arm's low-rank term added in place on its rows by the
# single-arm tail kernels of ``lowrank.py`` (one launch per arm with rows; their
# dropout mask is Philox of (seed, local row * K + column), the one kernels 1, 4
# and 5 draw for the arm). On an H200 the fused kernel 2 ran at about half the
# GEMM peak at 4 x 8192 rows (2048 -> 8192), where the single-arm op's tuning
# chose cuBLAS (benchmarks/results/nvidia-h200-2026-11-28).
# ----------------------------------------------------------------------------


def _arm_spans(plan: MultiPlan):
    """Per arm, on the host: (first row, rows, rank offset, rank, S offset)."""
    row0 = o = soff = 0
    for M_k, r in zip(plan.rows, plan.ranks):
        yield row0, M_k, o, r, soff
        row0, o, soff = row0 + M_k, o + r, soff + M_k * r


def _dense_base(base, N: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """A dense W as it is, an NF4 one (``_base_args``' tuple) dequantized whole, in ``dtype``."""
    return nf4_dense(base[0], base[1], N, K, dtype) if isinstance(base, tuple) else base


def _multi_fwd_split(x2, base, S, B, bias, plan: MultiPlan, scalings) -> torch.Tensor:
    """``_multi_fwd_gemm`` by the split path."""
    W = _dense_base(base, B.shape[0], x2.shape[1], x2.dtype)
    Y = torch.addmm(bias, x2, W.t()) if bias is not None else torch.mm(x2, W.t())
    for (row0, M_k, o, r, soff), s in zip(_arm_spans(plan), scalings):
        if M_k:
            lowrank_fwd_add_(Y[row0:row0 + M_k], S[soff:soff + M_k * r].view(M_k, r), B[:, o:o + r], s)
    return Y


def _multi_dx_split(dY, base, dS, A, plan: MultiPlan, dropout_ps, seeds) -> torch.Tensor:
    """``_multi_dx`` by the split path."""
    W = _dense_base(base, dY.shape[1], A.shape[1], dY.dtype)
    dX = torch.mm(dY, W)
    for (row0, M_k, o, r, soff), p, seed in zip(_arm_spans(plan), dropout_ps, seeds):
        if M_k:
            lowrank_dx_add_(dX[row0:row0 + M_k], dS[soff:soff + M_k * r].view(M_k, r), A[o:o + r], p,
                            seed if p > 0.0 else None)
    return dX


def multi_lora_fwd_gemm(x2, base, S, B, bias, plan: MultiPlan, scalings, path: str) -> torch.Tensor:
    """Y by the path ``path`` names (``"auto"``: ``tuning.choose_path``'s measured choice
    on CUDA between kernel 2 and the split path; kernel 2 elsewhere)."""
    op = "multi_nf4_fwd" if isinstance(base, tuple) else "multi_fwd"
    return run_path(path, op, x2.shape[0], B.shape[0], x2.shape[1], x2,
                    lambda cfg: _multi_fwd_gemm(x2, base, S, B, bias, plan),
                    lambda: _multi_fwd_split(x2, base, S, B, bias, plan, scalings), dict)


def multi_lora_dx_gemm(dY, base, dS, A, plan: MultiPlan, dropout_ps, seeds, path: str) -> torch.Tensor:
    """dX by the path ``path`` names (as ``multi_lora_fwd_gemm``)."""
    op = "multi_nf4_dx" if isinstance(base, tuple) else "multi_dx"
    return run_path(path, op, dY.shape[0], A.shape[1], dY.shape[1], dY,
                    lambda cfg: _multi_dx(dY, base, dS, A, plan),
                    lambda: _multi_dx_split(dY, base, dS, A, plan, dropout_ps, seeds), dict)
