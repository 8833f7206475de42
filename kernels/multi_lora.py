"""Segmented multi-arm LoRA linear layer: several LoRA arms (adapters of
different ranks) over one frozen base weight, each arm on its own contiguous
block of rows (issue 14: a rank sweep trained in one pass, the arms' copies of
a batch stacked along the rows).

Math (x: (M, K) after flattening leading dims, rows of arm k the block
[m_k, m_k + M_k) with sum_k M_k = M; W: (N, K) dense or NF4; arm k has rank r_k,
A_k = lora_A[o_k : o_k + r_k] (r_k, K), B_k = lora_B[:, o_k : o_k + r_k] (N, r_k),
o_k = r_1 + ... + r_{k-1}, scaling s_k, dropout keep-mask m_k with probability
p_k, x_k = x[rows_k], x_dk = x_k * m_k / (1 - p_k)):

    forward
        S_k = x_dk @ A_k.T                                 (M_k, r_k) kernel 1, per tile of arm k
        Y   = x @ W.T + b,  Y[rows_k] += s_k * S_k @ B_k.T (M, N)     kernel 2: one base GEMM over
                                                                      all rows, each tile adds
                                                                      its arm's low-rank term
    backward, with dY = dL/dY and dY_k = dY[rows_k]
        dS_k = s_k * dY_k @ B_k                            (M_k, r_k) kernel 3, per tile of arm k
        dB_k = s_k * dY_k.T @ S_k  -> dB[:, o_k : o_k + r_k]          kernel 5 on (S, dY), per arm
        dX   = dY @ W,  dX[rows_k] += (dS_k @ A_k) * m_k / (1 - p_k)  kernel 4 (one GEMM)
        dA_k = dS_k.T @ x_dk       -> dA[o_k : o_k + r_k]             kernel 5, per arm
        dW = dY.T @ x,  db = sum_rows(dY)                  torch, only if a dense W / b require grad

    (The single-arm op forms dB in kernel 3 from the same read of dY, adding each row
    tile's share with atomics; with K arms stacked that cost 20 of 26 ms of the
    backward on an H200 (4 x 8192 rows, ranks 1..128), so here dB is a reduction over
    each arm's rows: no atomics, and the same bits in deterministic mode.)

    Derivation: the rows of arm k are a single-arm LoRA layer (``lora_linear.py``
    derives each gradient) whose low-rank term depends on x_k, A_k, B_k only; the
    arms share nothing but W and b. So L's gradient with respect to S_k, B_k, A_k
    and x_k's LoRA input is the single-arm one on the arm's rows and columns
    (dL/dS_k = s_k dY_k B_k, dL/dB_k = s_k dY_k.T S_k, dL/dA_k = dS_k.T x_dk,
    dL/dx_k gets (dS_k A_k) * m_k / (1 - p_k)), and the base term x @ W.T adds
    dY @ W over all rows at once. Rows and columns of other arms never enter.

Layout: lora_A is the arms' A matrices concatenated along dim 0 and lora_B the
B matrices along dim 1, not padded to the largest rank (ranks 1..128 sum to
255: padding would do ~4x the low-rank work and hold ~4x the optimizer state).

Tiling and routing (the Triton backend; details above the kernels): rows are
cut into tiles of BM rows per arm (an arm's last tile partly masked), listed
in a tile map of (arm, first local row); every program reads its tile's arm
and takes that arm's rank, A_k / B_k offsets, S offset, scaling and dropout
from per-arm tables. A tile never holds two arms' rows, so it never mixes
their low-rank terms; the base GEMM still runs once over every row (at most
one partial tile per arm more than a plain GEMM). Nothing is copied or padded
in memory. kernel 5 (dA, and dB) runs one program column per arm over that
arm's rows.

Saved for backward: x and the compact S (arm k's (M_k, r_k) block after
the others: sum_k M_k r_k values, not M * max r); W, A, B, b are the layer's own
tensors, kept by reference; the per-arm lists (ranks, scalings, rows, dropout,
seeds). The dropout masks are never stored: kernels 1, 4 and 5 regenerate them
from the seeds. Accumulation is fp32 throughout; S and dS are stored in the
compute dtype, as in the single-arm op.

Dropout: arm k's mask is drawn for x_k alone from seeds[k], exactly as
``lora_linear`` draws it for an input x_k with that seed, on each backend: the
Triton kernels use Philox of (seed, local row * K + column), ``utils.dropout_keep``
on the arm's local rows; the torch path a ``torch.Generator`` seeded with it for
x_k's shape. So an arm run together with others, with the same seed and the
same rows, sees the mask of its solo run (tested). The two backends draw
different masks for one seed, as ``lora_linear``'s do.

Backends (the convention of ``rankwise.kernels``): ``"torch"`` runs one base
matmul over all rows plus a loop over the arms with the single-arm low-rank
math (each scaling applied to the arm's small factors, the low-rank terms added
in place), its backward the formulas above written out (one graph node per
layer), correct for any input and device;
``"triton"`` runs the kernels (on a CPU only under ``TRITON_INTERPRET=1``);
``"auto"`` picks Triton on CUDA, torch otherwise. Dense and NF4 bases in both;
the NF4 kernels dequantize W tiles in registers, as ``nf4_lora.py``'s do. The
tests compare both backends with a float64 per-arm reference of their own.

torch.compile: the Triton backend is registered as torch.library custom ops
(``rankwise::multi_lora_linear`` / ``rankwise::multi_nf4_lora_linear`` returning
(Y, S) with the autograd formula, and the backward ops
``rankwise::multi_lora_ds_db``, ``rankwise::multi_lora_dx``,
``rankwise::multi_nf4_lora_dx``, ``rankwise::multi_lora_da``), each with a fake
function, so a compiled graph calls kernels 1-2 forward and 3-5 backward as
eager does; eager calls take their autograd.Function twins (cheaper dispatch).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from .lowrank import (
    check_tensor,
    compute_dtype,
    draw_seed,
    lowrank_dx_add_,
    lowrank_dx_tail,
    lowrank_fwd_add_,
    lowrank_fwd_tail,
    validate_lora_args,
    wide_rank_warps,
)
from .nf4 import TL_DTYPES, NF4Weight, dequantize_nf4, nf4_kernel_args, nf4_rows_tile, nf4_tile
from .nf4_lora import nf4_dense, nf4_gemm_config
from .tuning import check_path, run_path
from .utils import (
    INTERPRET,
    check_triton_tensor,
    dot_precision,
    dropout_keep,
    fit_shared_memory,
    fused_apply,
    gemm_config,
    max_shared_memory,
    rank_block,
    round_bf16,
    rounds_bf16_itself,
    skinny_config,
    swizzle_tile,
    upcast_for_dot,
)

__all__ = ["multi_lora_linear", "multi_lora_linear_arms", "multi_lora_linear_torch", "MultiLoRALinearFunction", "MultiNF4LoRALinearFunction"]


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
    arm_i, arm_f, s_size = _arm_tables(rows, ranks, tuple(scalings), tuple(dropout_ps), tuple(seeds), device)
    gemm_tiles = _tile_table(rows, ranks, gemm_cfg["BM"], device)
    skinny_tiles = _tile_table(rows, ranks, skinny_cfg["BM"], device)
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


def _fwd_path(x2, base, S, B, bias, plan: MultiPlan, scalings, path: str) -> torch.Tensor:
    """Y by the path ``path`` names (``"auto"``: ``tuning.choose_path``'s measured choice
    on CUDA between kernel 2 and the split path; kernel 2 elsewhere)."""
    op = "multi_nf4_fwd" if isinstance(base, tuple) else "multi_fwd"
    return run_path(path, op, x2.shape[0], B.shape[0], x2.shape[1], x2,
                    lambda cfg: _multi_fwd_gemm(x2, base, S, B, bias, plan),
                    lambda: _multi_fwd_split(x2, base, S, B, bias, plan, scalings), dict)


def _dx_path(dY, base, dS, A, plan: MultiPlan, dropout_ps, seeds, path: str) -> torch.Tensor:
    """dX by the path ``path`` names (as ``_fwd_path``)."""
    op = "multi_nf4_dx" if isinstance(base, tuple) else "multi_dx"
    return run_path(path, op, dY.shape[0], A.shape[1], dY.shape[1], dY,
                    lambda cfg: _multi_dx(dY, base, dS, A, plan),
                    lambda: _multi_dx_split(dY, base, dS, A, plan, dropout_ps, seeds), dict)


# ----------------------------------------------------------------------------
# Autograd: as in lora_linear.py, one forward, setup_context and backward used
# twice: as torch.library custom ops for torch.compile (forward ops
# ``rankwise::multi_lora_linear`` (dense W) and ``rankwise::multi_nf4_lora_linear``
# carry the autograd formula; backward ops ``rankwise::multi_lora_ds_db``,
# ``rankwise::multi_lora_dx``, ``rankwise::multi_nf4_lora_dx``,
# ``rankwise::multi_lora_da``; each with a fake function giving its output
# shapes), and as autograd.Functions calling the same functions directly for
# eager calls (cheaper to dispatch). The arms enter every op as five lists
# (ranks, scalings, rows, dropout_ps, seeds: ``arms`` below); each op builds its
# launch plan from them (``multi_plan``, its device tables memoised). An NF4
# weight enters as the six tensors of ``nf4_kernel_args`` and four constants.
# ----------------------------------------------------------------------------


def _plan(t: torch.Tensor, ranks, scalings, rows, dropout_ps, seeds, nf4: bool) -> MultiPlan:
    return multi_plan(rows, ranks, scalings, dropout_ps, seeds, t.dtype, t.device, nf4)


def _s_numel(ranks, rows) -> int:
    return sum(r * m for r, m in zip(ranks, rows))


def _multi_lora_fwd(x2: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                    bias: Optional[torch.Tensor], ranks: list[int], scalings: list[float], rows: list[int],
                    dropout_ps: list[float], seeds: list[int], path: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on a 2-D x and a dense W (kernel 1, then kernel 2 or the split path per
    ``path``): ``(Y, S)``, the compact S returned only so that backward can save it
    (marked non-differentiable)."""
    plan = _plan(x2, ranks, scalings, rows, dropout_ps, seeds, False)
    S = multi_lora_down(x2, lora_A, plan)
    return _fwd_path(x2, weight, S, lora_B, bias, plan, scalings, path), S


def _multi_nf4_lora_fwd(x2: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, bias: Optional[torch.Tensor],
                        packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                        nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset: torch.Tensor,
                        blocksize: int, double_quant: bool, nested_blocksize: int, wdtype: torch.dtype,
                        ranks: list[int], scalings: list[float], rows: list[int], dropout_ps: list[float],
                        seeds: list[int], path: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on a 2-D x and an NF4 W: ``(Y, S)`` as ``rankwise::multi_lora_linear``."""
    plan = _plan(x2, ranks, scalings, rows, dropout_ps, seeds, True)
    nf4 = ((packed, absmax, quant_map, nested_absmax, nested_map, offset),
           (blocksize, double_quant, nested_blocksize, wdtype))
    S = multi_lora_down(x2, lora_A, plan)
    return _fwd_path(x2, nf4, S, lora_B, bias, plan, scalings, path), S


def _multi_ds_db(dY: torch.Tensor, S: torch.Tensor, lora_B: torch.Tensor, ranks: list[int], scalings: list[float],
                 rows: list[int], dropout_ps: list[float], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dS, dB)`` of kernel 3; reads torch's deterministic flag when it runs."""
    return multi_lora_ds_db(dY, S, lora_B, _plan(dY, ranks, scalings, rows, dropout_ps, seeds, False))


def _multi_dx_dense(dY: torch.Tensor, weight: torch.Tensor, dS: torch.Tensor, lora_A: torch.Tensor,
                    ranks: list[int], scalings: list[float], rows: list[int], dropout_ps: list[float],
                    seeds: list[int], path: str = "auto") -> torch.Tensor:
    """dX of kernel 4 (or of the split path, per ``path``) on a dense W, the masks regenerated
    from the seeds."""
    return _dx_path(dY, weight, dS, lora_A, _plan(dY, ranks, scalings, rows, dropout_ps, seeds, False),
                    dropout_ps, seeds, path)


def _multi_dx_nf4(dY: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                  nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset: torch.Tensor,
                  blocksize: int, double_quant: bool, nested_blocksize: int, wdtype: torch.dtype,
                  dS: torch.Tensor, lora_A: torch.Tensor, ranks: list[int], scalings: list[float], rows: list[int],
                  dropout_ps: list[float], seeds: list[int], path: str = "auto") -> torch.Tensor:
    """dX of kernel 4 on an NF4 W (tiles dequantized in registers), or of the split path."""
    nf4 = ((packed, absmax, quant_map, nested_absmax, nested_map, offset),
           (blocksize, double_quant, nested_blocksize, wdtype))
    return _dx_path(dY, nf4, dS, lora_A, _plan(dY, ranks, scalings, rows, dropout_ps, seeds, True),
                    dropout_ps, seeds, path)


def _multi_da(dS: torch.Tensor, x2: torch.Tensor, ranks: list[int], scalings: list[float], rows: list[int],
              dropout_ps: list[float], seeds: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    """dA of kernel 5 in ``out_dtype``, the masks regenerated from the seeds."""
    return multi_lora_da(dS, x2, _plan(x2, ranks, scalings, rows, dropout_ps, seeds, False), out_dtype)


_fwd_op = torch.library.custom_op("rankwise::multi_lora_linear", _multi_lora_fwd, mutates_args=())
_nf4_fwd_op = torch.library.custom_op("rankwise::multi_nf4_lora_linear", _multi_nf4_lora_fwd, mutates_args=())
_ds_db_op = torch.library.custom_op("rankwise::multi_lora_ds_db", _multi_ds_db, mutates_args=())
_dx_op = torch.library.custom_op("rankwise::multi_lora_dx", _multi_dx_dense, mutates_args=())
_nf4_dx_op = torch.library.custom_op("rankwise::multi_nf4_lora_dx", _multi_dx_nf4, mutates_args=())
_da_op = torch.library.custom_op("rankwise::multi_lora_da", _multi_da, mutates_args=())


@_fwd_op.register_fake
def _fwd_fake(x2, weight, lora_A, lora_B, bias, ranks, scalings, rows, dropout_ps, seeds, path="auto"):
    return x2.new_empty((x2.shape[0], weight.shape[0])), x2.new_empty((_s_numel(ranks, rows),))


@_nf4_fwd_op.register_fake
def _nf4_fwd_fake(x2, lora_A, lora_B, bias, packed, absmax, quant_map, nested_absmax, nested_map, offset,
                  blocksize, double_quant, nested_blocksize, wdtype, ranks, scalings, rows, dropout_ps, seeds,
                  path="auto"):
    return x2.new_empty((x2.shape[0], lora_B.shape[0])), x2.new_empty((_s_numel(ranks, rows),))


@_ds_db_op.register_fake
def _ds_db_fake(dY, S, lora_B, ranks, scalings, rows, dropout_ps, seeds):
    return S.new_empty(S.shape), lora_B.new_empty(lora_B.shape)


@_dx_op.register_fake
def _dx_fake(dY, weight, dS, lora_A, ranks, scalings, rows, dropout_ps, seeds, path="auto"):
    return dY.new_empty((dY.shape[0], lora_A.shape[1]))


@_nf4_dx_op.register_fake
def _nf4_dx_fake(dY, packed, absmax, quant_map, nested_absmax, nested_map, offset, blocksize, double_quant,
                 nested_blocksize, wdtype, dS, lora_A, ranks, scalings, rows, dropout_ps, seeds, path="auto"):
    return dY.new_empty((dY.shape[0], lora_A.shape[1]))


@_da_op.register_fake
def _da_fake(dS, x2, ranks, scalings, rows, dropout_ps, seeds, out_dtype):
    return x2.new_empty((sum(ranks), x2.shape[1]), dtype=out_dtype)


class _Backward(NamedTuple):
    """Kernels 3 and 5 as callables: the plain functions (eager) or the ops (traced)."""
    ds_db: Callable
    da: Callable


_EAGER = _Backward(_multi_ds_db, _multi_da)
_TRACED = _Backward(lambda *a: torch.ops.rankwise.multi_lora_ds_db(*a), lambda *a: torch.ops.rankwise.multi_lora_da(*a))


def _lowrank_grads(k: _Backward, dY, x2, lora_A, lora_B, S, arms, need, dx):
    """``(dX, dA, dB)`` (None where ``need`` says no gradient); ``dx(dY, dS)`` runs kernel 4."""
    need_x, need_a, need_b = need
    dX = dA = dB = None
    if need_x or need_a or need_b:
        dS, dB = k.ds_db(dY, S, lora_B, *arms)
        if need_x:
            dX = dx(dY, dS)
        if need_a:
            dA = k.da(dS, x2, *arms, lora_A.dtype)
        if not need_b:
            dB = None
    return dX, dA, dB


def _setup_context(ctx, inputs, output):
    x2, weight, lora_A, lora_B, bias = inputs[:5]
    S = output[1]
    # Saved: x and the compact S (activations, sum_k M_k r_k values); W, A, B are
    # the layer's own tensors, kept by reference; the seeds (in ``arms``): the
    # dropout masks are regenerated, never stored.
    ctx.save_for_backward(x2, weight, lora_A, lora_B, S)
    ctx.arms = tuple(inputs[5:10])
    ctx.path, ctx.n_inputs = (inputs[10] if len(inputs) > 10 else "auto"), len(inputs)
    ctx.mark_non_differentiable(S)
    ctx.set_materialize_grads(False)


def _backward(ctx, dY, k: _Backward, dx):
    """Gradients of the inputs of ``rankwise::multi_lora_linear`` (ten, or eleven with ``path``)."""
    x2, weight, lora_A, lora_B, S = ctx.saved_tensors
    need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
    if dY is None:
        return (None,) * ctx.n_inputs
    dY = dY if dY.dtype == x2.dtype else dY.to(x2.dtype)
    dX, dA, dB = _lowrank_grads(k, dY, x2, lora_A, lora_B, S, ctx.arms, (need_x, need_a, need_b),
                                lambda dY, dS: dx(dY, weight, dS, lora_A, *ctx.arms, ctx.path))
    # A dense base weight and the bias are frozen in LoRA, but get their gradients
    # (in torch) when they require grad, like nn.Linear's.
    dW = (dY.t() @ x2).to(weight.dtype) if need_w else None
    dbias = dY.float().sum(0).to(dY.dtype) if need_bias else None
    return (dX, dW, dA, dB, dbias) + (None,) * (ctx.n_inputs - 5)


def _nf4_setup_context(ctx, inputs, output):
    # As the dense one; the NF4 tensors are the frozen W's own, kept by reference.
    ctx.save_for_backward(*inputs[:3], output[1], *inputs[4:10])
    ctx.nf4_meta = tuple(inputs[10:14])
    ctx.arms = tuple(inputs[14:19])
    ctx.path, ctx.n_inputs = (inputs[19] if len(inputs) > 19 else "auto"), len(inputs)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _nf4_backward(ctx, dY, k: _Backward, dx):
    """Gradients of the inputs of ``rankwise::multi_nf4_lora_linear`` (19, or 20 with ``path``;
    the NF4 W gets none)."""
    x2, lora_A, lora_B, S, *nf4 = ctx.saved_tensors
    need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
    if dY is None:
        return (None,) * ctx.n_inputs
    dY = dY if dY.dtype == x2.dtype else dY.to(x2.dtype)
    dX, dA, dB = _lowrank_grads(k, dY, x2, lora_A, lora_B, S, ctx.arms, (need_x, need_a, need_b),
                                lambda dY, dS: dx(dY, *nf4, *ctx.nf4_meta, dS, lora_A, *ctx.arms, ctx.path))
    dbias = dY.float().sum(0).to(dY.dtype) if need_bias else None
    return (dX, dA, dB, dbias) + (None,) * (ctx.n_inputs - 4)


_fwd_op.register_autograd(
    lambda ctx, dY, _dS: _backward(ctx, dY, _TRACED, lambda *a: torch.ops.rankwise.multi_lora_dx(*a)),
    setup_context=_setup_context)
_nf4_fwd_op.register_autograd(
    lambda ctx, dY, _dS: _nf4_backward(ctx, dY, _TRACED, lambda *a: torch.ops.rankwise.multi_nf4_lora_dx(*a)),
    setup_context=_nf4_setup_context)


class MultiLoRALinearFunction(torch.autograd.Function):
    """The eager twin of ``rankwise::multi_lora_linear`` (dense W): same arguments,
    outputs and autograd formula, functions called directly."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _multi_lora_fwd(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dY, _dS):
        return _backward(ctx, dY, _EAGER, _multi_dx_dense)


class MultiNF4LoRALinearFunction(torch.autograd.Function):
    """The eager twin of ``rankwise::multi_nf4_lora_linear``."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _multi_nf4_lora_fwd(*inputs)
        _nf4_setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dY, _dS):
        return _nf4_backward(ctx, dY, _EAGER, _multi_dx_nf4)


# ----------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------


def _int_list(value, name, minimum):
    """``value`` as a tuple of Python ints >= ``minimum``, else a ValueError naming ``name``."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}: expected a list or tuple of ints, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{name}: expected ints >= {minimum}, got {list(value)!r}")
        out.append(int(v))
    return tuple(out)


def _float_list(value, name, n):
    """``value`` (a number, or a sequence of ``n`` numbers) as a tuple of ``n`` floats."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        value = [value] * n
    if len(value) != n:
        raise ValueError(f"{name}: expected {n} values (one per arm), got {len(value)}")
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected real numbers, got {list(value)!r}") from None


def validate_multi_args(x, weight_shape, weight_device, lora_A, lora_B, bias, ranks, scalings, rows,
                        dropout_p, seeds, backend):
    """Check the arguments of ``multi_lora_linear``; returns ``(ranks, scalings, rows,
    dropout_ps, seeds)`` as tuples of ints / floats, one entry per arm (seeds drawn
    from torch's default generator for arms with dropout and no seed). Errors name
    the argument."""
    validate_lora_args(x, weight_shape, weight_device, lora_A, lora_B, bias, 1.0, 0.0, backend)
    return _arm_lists(x, lora_A.shape[0], ranks, scalings, rows, dropout_p, seeds)


def _arm_lists(x, total_rank, ranks, scalings, rows, dropout_p, seeds):
    """The per-arm lists of ``multi_lora_linear`` checked against x's rows and the
    adapters' total rank, as tuples (see ``validate_multi_args``)."""
    rows = _int_list(rows, "rows", 0)
    ranks = _int_list(ranks, "ranks", 1)
    n = len(rows)
    if n == 0:
        raise ValueError("rows: expected at least one arm, got an empty list")
    if len(ranks) != n:
        raise ValueError(f"ranks: expected one rank per arm ({n} arms in rows), got {len(ranks)}")
    M = math.prod(x.shape[:-1])
    if sum(rows) != M:
        raise ValueError(f"rows: the arms' row counts sum to {sum(rows)}, but x has {M} rows "
                         f"(x shape {tuple(x.shape)})")
    if sum(ranks) != total_rank:
        raise ValueError(f"ranks: sum {sum(ranks)} does not match lora_A's {total_rank} rows "
                         f"(lora_A is the arms' A matrices concatenated along dim 0)")
    scalings = _float_list(scalings, "scalings", n)
    dropout_ps = _float_list(dropout_p, "dropout_p", n)
    for p in dropout_ps:
        if not (0.0 <= p < 1.0):
            raise ValueError(f"dropout_p: expected probabilities in [0, 1), got {list(dropout_ps)!r}")
    if seeds is None:
        seeds = [None] * n
    elif isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    if not isinstance(seeds, (list, tuple)) or len(seeds) != n:
        raise ValueError(f"seeds: expected None or one int per arm ({n} arms), got {seeds!r}")
    out_seeds = []
    for p, s in zip(dropout_ps, seeds):
        s = draw_seed(p, s)
        if s is not None and (isinstance(s, bool) or not isinstance(s, int)):
            raise ValueError(f"seeds: expected ints, got {list(seeds)!r}")
        out_seeds.append(int(s) if p > 0.0 else 0)
    return ranks, scalings, rows, dropout_ps, tuple(out_seeds)


# ----------------------------------------------------------------------------
# The torch path (backend="torch", and "auto" off CUDA)
# ----------------------------------------------------------------------------


def torch_keep_mask(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The keep-mask the torch path draws for an input of ``shape`` (the draw of
    ``lowrank.lora_linear_torch``: ``torch.rand`` from a generator seeded with ``seed``)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return torch.rand(shape, generator=g, device=device) >= dropout_p


class _MultiLoRATorchFunction(torch.autograd.Function):
    """The torch path with its backward written out: the formulas of the module
    docstring with each arm's scaling applied to its small factors, never to a
    full ``(rows, out)`` block: forward ``y_k += s * S_k @ B_k.T`` is one in-place
    ``addmm_`` (the scaling as its alpha) on arm k's rows of the base output;
    backward ``dS_k = s * (dY_k @ B_k)`` and ``dB_k = s * (dY_k.T @ S_k)`` scale
    ``(rows, r)`` / ``(out, r)`` results, and ``dX_k += dS_k @ A_k`` is an in-place
    ``addmm_`` (with dropout: the product masked, then added). Per arm and layer
    that is two ops forward and at most five backward, and no full-size
    temporaries: on a CPU, one 128 -> 128 layer with 4 arms (ranks 1 to 64, 96
    rows each) runs forward and backward in about three quarters of the time the
    previous ``y + s * lora`` form took.
    The values differ from ``lowrank.lora_linear_torch``'s (``y + s * ((x_d @ A.T) @ B.T)``
    under autograd) only by where the fp32 rounding of the scaling falls.
    The arms' A_k and B_k are inputs of their own (``*adapters``: A_1..A_n,
    then B_1..B_n), so each arm's gradient lands in its own tensor: one graph node
    per layer, and no full-size zero gradients for slices.

    Saved for backward: x, each arm's S_k, and per arm with dropout its dropped
    input x_dk and keep-mask (bool; autograd would keep x_dk and the mask too);
    W and the adapters by reference."""

    @staticmethod
    def forward(ctx, x2, weight, bias, arms, *adapters):
        scalings, rows, dropout_ps, seeds = arms
        n = len(rows)
        As, Bs = adapters[:n], adapters[n:]
        y = torch.nn.functional.linear(x2, weight, bias)
        dropped, Ss = [], []  # per arm with dropout: x_dk and its keep-mask
        for x_k, y_k, A_k, B_k, s, p, seed in zip(x2.split(rows), y.split(rows), As, Bs, scalings, dropout_ps,
                                                  seeds):
            if p > 0.0:
                keep = torch_keep_mask(x_k.shape, p, seed, x2.device)
                x_k = x_k * keep.to(x2.dtype) / (1.0 - p)
                dropped += [x_k, keep]
            S_k = torch.nn.functional.linear(x_k, A_k)
            y_k.addmm_(S_k, B_k.t(), alpha=s)
            Ss.append(S_k)
        ctx.arms = arms
        ctx.save_for_backward(x2, weight, *adapters, *dropped, *Ss)
        return y

    @staticmethod
    def backward(ctx, dY):
        scalings, rows, dropout_ps, _ = ctx.arms
        n = len(rows)
        x2, weight, *rest = ctx.saved_tensors
        As, Bs, dropped, Ss = rest[:n], rest[n:2 * n], iter(rest[2 * n:len(rest) - n]), rest[len(rest) - n:]
        need = ctx.needs_input_grad
        dX = dY.mm(weight) if need[0] else None
        dW = dY.t().mm(x2) if need[1] else None
        dBias = dY.sum(0) if need[2] else None
        dAs, dBs = [None] * n, [None] * n
        dXs = dX.split(rows) if need[0] else None
        for k, (dY_k, x_k, s, p) in enumerate(zip(dY.split(rows), x2.split(rows), scalings, dropout_ps)):
            xd_k, keep = (next(dropped), next(dropped)) if p > 0.0 else (x_k, None)
            if need[4 + n + k]:
                dBs[k] = dY_k.t().mm(Ss[k]).mul_(s)
            if not (need[4 + k] or need[0]):
                continue
            dS = dY_k.mm(Bs[k]).mul_(s)
            if need[4 + k]:
                dAs[k] = dS.t().mm(xd_k)
            if need[0]:
                if p > 0.0:
                    dXs[k].add_(dS.mm(As[k]).mul_(keep.to(dS.dtype)).div_(1.0 - p))
                else:
                    dXs[k].addmm_(dS, As[k])
        return dX, dW, dBias, None, *dAs, *dBs


def multi_lora_linear_torch(x2, weight, lora_A, lora_B, ranks, scalings, rows, bias=None,
                            dropout_ps=None, seeds=None):
    """The torch path on a 2-D ``x2`` and a dense ``weight``: one base matmul over
    all rows, then each arm's low-rank term on its own rows, with the backward
    written out (``_MultiLoRATorchFunction``; its values are those of autograd on
    ``y + s_k * (x_dk @ A_k.T) @ B_k.T`` per arm, up to where the rounding of the
    scaling falls). ``lora_A`` / ``lora_B`` concatenated, or sequences of the arms'
    own ``(r_k, in)`` / ``(out, r_k)`` tensors; ``ranks``, ``scalings``, ``rows``,
    ``dropout_ps``, ``seeds``: one entry per arm, already validated."""
    n = len(rows)
    if isinstance(lora_A, torch.Tensor):
        lora_A, lora_B = lora_A.split(list(ranks)), lora_B.split(list(ranks), 1)
    arms = (tuple(scalings), tuple(rows), tuple(dropout_ps or (0.0,) * n), tuple(seeds or (0,) * n))
    return _MultiLoRATorchFunction.apply(x2, weight, bias, arms, *lora_A, *lora_B)


# ----------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------


def multi_lora_linear(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      ranks: Sequence[int], scalings: Sequence[float], rows: Sequence[int],
                      bias: Optional[torch.Tensor] = None, dropout_p=0.0, seeds: Optional[Sequence[int]] = None,
                      backend: str = "auto", path: str = "auto") -> torch.Tensor:
    """K LoRA arms over one frozen base weight, each on its own block of rows.

    Returns y with ``y[rows_k] = x_k @ W.T + b + s_k * (drop_k(x_k) @ A_k.T) @ B_k.T``
    (the module docstring writes out the gradients).

    Args:
        x: input ``(M, in_features)`` or ``(..., in_features)`` (flattened to M rows);
            any strides. Arm k owns the contiguous block of ``rows[k]`` rows after
            the blocks of arms 0..k-1.
        weight: the frozen base, ``(out_features, in_features)`` dense, or an
            ``NF4Weight``; one for all arms. A dense weight (and the bias) that
            requires grad gets its gradient; an NF4 weight gets none.
        lora_A: ``(sum(ranks), in_features)``, the arms' A matrices concatenated along
            dim 0 (arm k's rows ``o_k : o_k + ranks[k]``), not padded.
        lora_B: ``(out_features, sum(ranks))``, the B matrices concatenated along dim 1.
        ranks: per-arm ranks (ints >= 1), summing to ``lora_A.shape[0]``.
        scalings: per-arm scalings (floats; one float is used for every arm).
        rows: per-arm row counts (ints >= 0), summing to M.
        bias: optional ``(out_features,)``, shared by all arms.
        dropout_p: dropout probability on the LoRA branch's input, one float for
            all arms or one per arm.
        seeds: ``None`` or one int per arm. Arm k's keep-mask is drawn from
            ``seeds[k]`` for its own rows alone, so it equals the mask
            ``lora_linear(x_k, ..., dropout_p=p_k, seed=seeds[k])`` draws on the same
            backend: an arm run together with others sees its solo run's mask.
            ``None`` draws one seed per arm with dropout from torch's default generator.
        backend: ``"triton"``, ``"torch"`` or ``"auto"`` (Triton on CUDA, else torch).
        path: how the Triton backend does the two big GEMMs (forward Y, backward dX):
            ``"fused"`` (kernels 2 and 4, each arm's low-rank term in the GEMM's
            accumulator), ``"split"`` (torch's GEMM over all rows, then each arm's term
            added in place by a small kernel) or ``"auto"`` (on CUDA, the faster of the
            two as measured on first use and cached, as ``lora_linear``'s; fused elsewhere).

    Dtypes as ``lora_linear``: weight, adapters and bias are cast to x's dtype
    (or autocast's); accumulation is fp32 in the kernels.

    Returns:
        Tensor ``(..., out_features)`` in the compute dtype.
    """
    is_nf4 = _check_weight_and_path(weight, path)
    ranks, scalings, rows, dropout_ps, seeds = validate_multi_args(
        x, tuple(weight.shape), weight.device, lora_A, lora_B, bias, ranks, scalings, rows, dropout_p, seeds,
        backend)
    return _run(x, weight, is_nf4, lora_A, lora_B, ranks, scalings, rows, bias, dropout_ps, seeds, backend, path)


def multi_lora_linear_arms(x: torch.Tensor, weight, lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor],
                           scalings: Sequence[float], rows: Sequence[int], bias: Optional[torch.Tensor] = None,
                           dropout_p=0.0, seeds: Optional[Sequence[int]] = None, backend: str = "auto",
                           path: str = "auto") -> torch.Tensor:
    """``multi_lora_linear`` with each arm's adapters as tensors of their own.

    ``lora_As[k]`` is arm k's A ``(r_k, in_features)`` and ``lora_Bs[k]`` its B
    ``(out_features, r_k)`` (the ranks are read from them); everything else as
    ``multi_lora_linear``, and so is the result. On the torch path each arm's
    gradient goes straight to its own tensors (no concatenation, no split of the
    gradients); the Triton path concatenates them once and runs the same kernels.
    ``rankwise.together.MultiLoRALinear`` calls this with its arms' Parameters.
    """
    is_nf4 = _check_weight_and_path(weight, path)
    lora_As, lora_Bs = list(lora_As), list(lora_Bs)
    if not lora_As or len(lora_As) != len(lora_Bs):
        raise ValueError(f"lora_As, lora_Bs: expected one A and one B per arm, got {len(lora_As)} and {len(lora_Bs)}")
    for k, (A, B) in enumerate(zip(lora_As, lora_Bs)):
        try:
            validate_lora_args(x, tuple(weight.shape), weight.device, A, B, bias, 1.0, 0.0, backend)
        except (TypeError, ValueError) as e:
            raise type(e)(f"arm {k}: {e}") from None
    ranks = [int(A.shape[0]) for A in lora_As]
    ranks, scalings, rows, dropout_ps, seeds = _arm_lists(x, sum(ranks), ranks, scalings, rows, dropout_p, seeds)
    return _run(x, weight, is_nf4, lora_As, lora_Bs, ranks, scalings, rows, bias, dropout_ps, seeds, backend, path)


def _check_weight_and_path(weight, path: str) -> bool:
    """Check the base weight (a 2-D tensor or NF4 weight) and ``path``; returns whether W is NF4."""
    is_nf4 = isinstance(weight, NF4Weight)
    if is_nf4:
        if len(weight.shape) != 2:
            raise ValueError(f"weight: expected a 2-D NF4 weight (out_features, in_features), "
                             f"got shape {tuple(weight.shape)}")
    else:
        check_tensor(weight, "weight", 2)
    check_path(path)
    return is_nf4


def _run(x, weight, is_nf4, lora_A, lora_B, ranks, scalings, rows, bias, dropout_ps, seeds, backend, path="auto"):
    """The validated op: ``lora_A`` / ``lora_B`` concatenated, or lists of the arms' own tensors."""
    device_type = x.device.type
    dtype = compute_dtype(x)

    def cast(t):
        return t if t is None or t.dtype == dtype else t.to(dtype)

    x, bias = cast(x), cast(bias)
    if isinstance(lora_A, torch.Tensor):
        lora_A, lora_B = cast(lora_A), cast(lora_B)
    else:
        lora_A, lora_B = [cast(a) for a in lora_A], [cast(b) for b in lora_B]
    if not is_nf4:
        weight = cast(weight)
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    lead = x.shape[:-1]
    N = weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if backend == "torch":
        W = dequantize_nf4(weight).to(dtype) if is_nf4 else weight
        with torch.autocast(device_type, enabled=False):
            y = multi_lora_linear_torch(x2, W, lora_A, lora_B, ranks, scalings, rows, bias, dropout_ps, seeds)
        return y.reshape(*lead, N)
    if not isinstance(lora_A, torch.Tensor):
        lora_A, lora_B = torch.cat(lora_A, 0), torch.cat(lora_B, 1)
    for t, name in ((x, "x"), (lora_A, "lora_A"), (lora_B, "lora_B")) + (() if is_nf4 else ((weight, "weight"),)):
        check_triton_tensor(t, name)
    arms = (list(ranks), list(scalings), list(rows), list(dropout_ps), list(seeds))
    with torch.autocast(device_type, enabled=False):
        if is_nf4:
            tensors, const = nf4_kernel_args(weight)
            y, _ = fused_apply(MultiNF4LoRALinearFunction, torch.ops.rankwise.multi_nf4_lora_linear)(
                x2, lora_A, lora_B, bias, *tensors,
                const["BLOCKSIZE"], const["DOUBLE"], const["NESTED_BLOCKSIZE"], weight.dtype, *arms, path)
        else:
            y, _ = fused_apply(MultiLoRALinearFunction, torch.ops.rankwise.multi_lora_linear)(
                x2, weight, lora_A, lora_B, bias, *arms, path)
    return y.reshape(*lead, N)
