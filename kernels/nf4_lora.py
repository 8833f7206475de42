"""Fused LoRA linear layer on an NF4 base weight (QLoRA), W never materialised.

Same math as ``lora_linear.py`` (x: (M, K), W: (N, K) stored as NF4, A: (r, K),
B: (N, r), s = scaling, m = dropout keep-mask, x_d = x * m / (1 - p)):

    forward
        S  = x_d @ A.T                               (M, r)  lowrank.lora_down
        Y  = x @ W.T + s * S @ B.T + b               (M, N)  kernel 1 here: W tiles
                                                             dequantized in registers
    backward
        dS = s * dY @ B,  dB = s * dY.T @ S                  lowrank.lora_ds_db (dY read once)
        dX = dY @ W + (dS @ A) * m / (1 - p)         (M, K)  kernel 2 here: W tiles
                                                             dequantized in registers
        dA = dS.T @ x_d                                      lowrank.lora_da
        db = sum_rows(dY)                                    torch, only if b requires grad

    The derivation is the dense one (see ``lora_linear.py``); W is frozen, so it
    gets no gradient.

Each W tile is read as packed 4-bit bytes plus its per-block fp32 scale (blocks of 32 to 4096 values) (or the
8-bit double-quantized scale, decoded in registers too): ``w = code[nib] *
absmax``, rounded to the weight's original dtype and then to the compute dtype,
exactly the values ``dequantize_nf4(W).to(x.dtype)`` would hold, so the op equals
"dequantize, then the dense op" up to fp32 summation order.

Saved for backward: x, S and the dropout seed (A, B, b and the NF4 weight are
the layer's own, kept by reference); the mask is regenerated, never stored.

torch.compile: ``rankwise::nf4_lora_linear`` (forward, with the autograd
formula) and ``rankwise::nf4_lora_dx`` are torch.library custom ops like the
dense ones, made by the same ``lowrank.lora_function`` (eager calls take their
autograd.Function twin); the NF4Weight enters them as its tensors and constants.

Backends as in ``lora_linear.py``: ``"triton"`` runs the kernels here and
lowrank.py's; ``"torch"`` (and ``"auto"`` off CUDA) dequantizes W with
``nf4.dequantize_nf4`` and runs ``lora_torch.lora_linear_torch``
(``nf4_lora_linear_reference`` is that path's public name). Callers normally
reach this op through ``lora_linear``, which sends an ``NF4Weight`` here.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .lora_torch import lora_linear_torch, one_arm_call
from .lowrank import (
    ONE_ARM,
    KernelSet,
    OpLayout,
    dropout_args,
    lora_da,
    lora_down,
    lora_ds_db,
    lora_function,
    lowrank_dx_tail,
    lowrank_fwd_tail,
    split_dx,
    split_fwd,
    traced_kernels,
)
from .nf4 import TL_DTYPES, NF4Weight, dequantize_nf4, nf4_dequantize, nf4_rows_tile, nf4_tile
from .tuning import run_path
from .utils import (
    INTERPRET,
    dot_precision,
    fused_variants,
    gemm_config,
    gemm_configs,
    max_shared_memory,
    rank_block,
    round_bf16,
    rounds_bf16_itself,
    swizzle_tile,
    upcast_for_dot,
)

# ----------------------------------------------------------------------------
# Triton kernels (S, dS / dB and dA are lowrank.py's)
# ----------------------------------------------------------------------------


NF4_SMALL_BK = 32


def nf4_gemm_config(dtype: torch.dtype, device: torch.device) -> dict:
    """``gemm_config`` fitted to the NF4 GEMMs on a GPU (sizes from benchmarks/compile_check.py):

    - two pipeline stages: the NF4 tiles add their bytes, scales and codebook to each
      stage, and three stages of 128x128x64 16-bit tiles with double quantization
      need 256 KiB of shared memory, over the 227 KiB of an H100 block;
    - fp32: BM=64 (at 128 the fp32 tiles and the dequantized W spill ~450 B of stack);
    - devices below Hopper's shared memory (A100: 163 KiB; RTX 3090/4090, A10, L4:
      99 KiB): BK=32 (at 64, two stages need 128 KiB with double quantization, and
      the tiles spill registers on sm_80 and sm_89, which have no wgmma)."""
    cfg = dict(gemm_config(dtype))
    if not INTERPRET:
        cfg["num_stages"] = min(cfg["num_stages"], 2)
        if dtype == torch.float32:
            cfg["BM"] = 64
        if max_shared_memory(device) < 200 * 1024:
            cfg["BK"] = NF4_SMALL_BK
    return cfg


def nf4_tile_configs(dtype: torch.dtype, device: torch.device, R: int) -> list:
    """The tile configs the NF4 GEMMs are tuned over: ``nf4_gemm_config`` first, then
    the architecture's NF4 list (``utils.gemm_configs``, pruned by shared memory)."""
    return gemm_configs(nf4_gemm_config(dtype, device), dtype, device, rank_block(R), nf4=True)


@triton.jit
def _nf4_lora_fwd_kernel(
    X, PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, S, B, BIAS, Y,
    M, N, K, R,
    stride_xm, stride_xk, stride_sm, stride_sr, stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    QBLOCK: tl.constexpr, DOUBLE: tl.constexpr, NESTED_BLOCK: tl.constexpr, WDTYPE: tl.constexpr,
    EVEN_K: tl.constexpr, W_RNE: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y = x @ dequant(W).T + (s * S) @ B.T + b, one accumulator   (kernel 1)."""
    pid_m, pid_n = swizzle_tile(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        # (BK, BN) tile of W.T: element (k, n) is W's flat index n * K + k
        if EVEN_K:
            w = tl.trans(nf4_rows_tile(PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, rn, k0, N, K,
                                       BK, QBLOCK, DOUBLE, NESTED_BLOCK))
        else:
            wmask = (rn[None, :] < N) & (rk[:, None] < K)
            w = nf4_tile(PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, rn[None, :] * K + rk[:, None], wmask,
                         QBLOCK, DOUBLE, NESTED_BLOCK)
        if W_RNE:  # W rounded to its bf16 dtype by hand: the interpreter's cast truncates
            w = round_bf16(w)
        w = w.to(WDTYPE)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=PREC)
    acc = lowrank_fwd_tail(acc, S, B, BIAS, rm, rn, M, N, R, stride_sm, stride_sr, stride_bn, stride_br,
                           scaling, HAS_BIAS, UPCAST, PREC, BR)
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _nf4_lora_bwd_dx_kernel(
    DY, PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, DS, A, DX,
    M, N, K, R,
    stride_dym, stride_dyn, stride_dsm, stride_dsr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    seed, p, keep_scale,
    QBLOCK: tl.constexpr, DOUBLE: tl.constexpr, NESTED_BLOCK: tl.constexpr, WDTYPE: tl.constexpr,
    EVEN_K: tl.constexpr, W_RNE: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dX = dY @ dequant(W) + (dS @ A) * m / (1 - p)   (kernel 2)."""
    pid_m, pid_k = swizzle_tile(M, K, BM, BK, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        dy = tl.load(DY + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        # (BN, BK) tile of W: element (n, k) is flat index n * K + k
        if EVEN_K:
            w = nf4_rows_tile(PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, rn, pid_k * BK, N, K,
                              BK, QBLOCK, DOUBLE, NESTED_BLOCK)
        else:
            wmask = (rn[:, None] < N) & (rk[None, :] < K)
            w = nf4_tile(PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, rn[:, None] * K + rk[None, :], wmask,
                         QBLOCK, DOUBLE, NESTED_BLOCK)
        if W_RNE:  # W rounded to its bf16 dtype by hand: the interpreter's cast truncates
            w = round_bf16(w)
        w = w.to(WDTYPE)
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(dy.dtype)
        acc = tl.dot(dy, w, acc, input_precision=PREC)
    acc = lowrank_dx_tail(acc, DS, A, rm, rk, M, K, R, stride_dsm, stride_dsr, stride_ar, stride_ak,
                          seed, p, keep_scale, HAS_DROPOUT, UPCAST, PREC, BM, BK, BR)
    tl.store(DX + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk,
             acc.to(DX.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K))


# ----------------------------------------------------------------------------
# Launchers (the NF4 twins of the dense layer's base-weight GEMMs)
# ----------------------------------------------------------------------------


def _nf4_consts(blocksize: int, double_quant: bool, nested_blocksize: int, wdtype: torch.dtype, K: int):
    """The NF4 constexprs of the kernels for a weight with rows of K values."""
    # EVEN_K: rows start on byte boundaries, so W tiles load their bytes once per pair of values
    return dict(QBLOCK=blocksize, DOUBLE=double_quant, NESTED_BLOCK=nested_blocksize, WDTYPE=TL_DTYPES[wdtype],
                EVEN_K=K % 2 == 0, W_RNE=rounds_bf16_itself(wdtype))


def _nf4_fwd_gemm(x2, nf4, meta, S, B, scaling: float, bias: Optional[torch.Tensor],
                  cfg: Optional[dict] = None) -> torch.Tensor:
    """Y = x2 @ dequant(W).T + scaling * S @ B.T (+ bias), (M, N) in x2's dtype.
    ``nf4``: W's six kernel tensors (``nf4_kernel_args``); ``meta``: (blocksize,
    double_quant, nested_blocksize, W's original dtype); ``cfg``: tiles (one of
    ``nf4_tile_configs``; None: ``nf4_gemm_config``)."""
    M, K = x2.shape
    N, R = B.shape
    Y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    if M == 0:
        return Y
    cfg = cfg or nf4_gemm_config(x2.dtype, x2.device)
    BR = rank_block(R)
    const = _nf4_consts(*meta, K)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    _nf4_lora_fwd_kernel[grid](
        x2, *nf4, S, B, bias if bias is not None else x2, Y,
        M, N, K, R,
        x2.stride(0), x2.stride(1), S.stride(0), S.stride(1), B.stride(0), B.stride(1),
        Y.stride(0), Y.stride(1),
        float(scaling),
        **const, HAS_BIAS=bias is not None, UPCAST=upcast_for_dot(x2.dtype), PREC=dot_precision(x2.dtype),
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BR=BR, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return Y


def _nf4_bwd_dX(dY, nf4, meta, dS, A, dropout_p: float = 0.0, seed: Optional[int] = None,
                cfg: Optional[dict] = None) -> torch.Tensor:
    """dX = dY @ dequant(W) + dropout_mask * (dS @ A) / (1 - p), (M, K) in dY's dtype;
    ``nf4``, ``meta`` and ``cfg`` as in ``_nf4_fwd_gemm``."""
    M, N = dY.shape
    R, K = A.shape
    dX = torch.empty((M, K), device=dY.device, dtype=dY.dtype)
    if M == 0:
        return dX
    cfg = cfg or nf4_gemm_config(dY.dtype, dY.device)
    BR = rank_block(R)
    has_drop, seed, p, keep_scale = dropout_args(dropout_p, seed)
    const = _nf4_consts(*meta, K)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(K, cfg["BN"]),)
    _nf4_lora_bwd_dx_kernel[grid](
        dY, *nf4, dS, A, dX,
        M, N, K, R,
        dY.stride(0), dY.stride(1), dS.stride(0), dS.stride(1), A.stride(0), A.stride(1),
        dX.stride(0), dX.stride(1),
        seed, p, keep_scale,
        **const, HAS_DROPOUT=has_drop, UPCAST=upcast_for_dot(dY.dtype), PREC=dot_precision(dY.dtype),
        BM=cfg["BM"], BK=cfg["BN"], BN=cfg["BK"], BR=BR, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dX


def nf4_dense(nf4, meta, N: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """The split path's W: the NF4 weight dequantized whole by ``nf4.nf4_dequantize``'s
    kernel (bitsandbytes' values, in W's original dtype), then cast to ``dtype`` as
    the torch path does. A transient (N, K) tensor, as in bitsandbytes + PEFT."""
    packed, absmax, qmap, nested, nmap, offset = nf4
    blocksize, double_quant, nested_blocksize, wdtype = meta
    q = NF4Weight(packed, absmax, qmap, blocksize, (N, K), wdtype, nested if double_quant else None,
                  nmap if double_quant else None, offset if double_quant else None, nested_blocksize)
    W = nf4_dequantize(q, backend="triton")
    return W if W.dtype == dtype else W.to(dtype)


def _nf4_fwd_path(x2, nf4, meta, S, B, scaling: float, bias, path: str) -> torch.Tensor:
    """Y by the path ``path`` names (``"auto"``: ``tuning.choose_path`` on CUDA, fused
    elsewhere). The split path dequantizes W whole (``nf4_dense``), then runs
    ``lowrank.split_fwd``: torch's GEMM and the in-place low-rank tail."""
    return run_path(path, "nf4_fwd", x2.shape[0], B.shape[0], x2.shape[1], x2,
                    lambda c: _nf4_fwd_gemm(x2, nf4, meta, S, B, scaling, bias, c),
                    lambda: split_fwd(x2, nf4_dense(nf4, meta, B.shape[0], x2.shape[1], x2.dtype), S, B, scaling,
                                      bias),
                    lambda: fused_variants(nf4_tile_configs(x2.dtype, x2.device, B.shape[1])), rank=B.shape[1])


def _nf4_dx_path(dY, nf4, meta, dS, A, dropout_p: float, seed, path: str) -> torch.Tensor:
    """dX by the path ``path`` names (as ``_nf4_fwd_path``; split: ``lowrank.split_dx``)."""
    return run_path(path, "nf4_dx", dY.shape[0], A.shape[1], dY.shape[1], dY,
                    lambda c: _nf4_bwd_dX(dY, nf4, meta, dS, A, dropout_p, seed, c),
                    lambda: split_dx(dY, nf4_dense(nf4, meta, dY.shape[1], A.shape[1], dY.dtype), dS, A, dropout_p,
                                     seed),
                    lambda: fused_variants(nf4_tile_configs(dY.dtype, dY.device, A.shape[0])), rank=A.shape[0])


# ----------------------------------------------------------------------------
# Autograd: the forward op ``rankwise::nf4_lora_linear`` with the backward op
# ``rankwise::nf4_lora_dx`` (kernels 3 and 5 are lowrank.py's), wired by
# ``lowrank.lora_function`` as the dense ones are. The NF4Weight is not a
# tensor, so it enters as the six tensors of ``nf4_kernel_args`` (packed,
# absmax, quant_map, nested_absmax, nested_map, offset; placeholders where
# double quantization is off) and its four constants.
# ----------------------------------------------------------------------------


def _nf4_lora_linear_fwd(x2: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         bias: Optional[torch.Tensor],
                         packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                         nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset: torch.Tensor,
                         blocksize: int, double_quant: bool, nested_blocksize: int, wdtype: torch.dtype,
                         scaling: float, dropout_p: float, seed: int, path: str = "auto"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on a 2-D x: ``(Y, S)``, S returned for backward only (see
    ``rankwise::lora_linear``). W's out_features is lora_B's first dimension.
    ``path``: fused kernel, split path (dequantize, torch's GEMM, in-place tail) or "auto"."""
    nf4 = (packed, absmax, quant_map, nested_absmax, nested_map, offset)
    S = lora_down(x2, lora_A, dropout_p, seed)
    Y = _nf4_fwd_path(x2, nf4, (blocksize, double_quant, nested_blocksize, wdtype), S, lora_B, scaling, bias, path)
    return Y, S


def _nf4_lora_linear_fake(x2, lora_A, lora_B, bias, packed, absmax, quant_map, nested_absmax, nested_map, offset,
                          blocksize, double_quant, nested_blocksize, wdtype, scaling, dropout_p, seed, path="auto"):
    M = x2.shape[0]
    return x2.new_empty((M, lora_B.shape[0])), x2.new_empty((M, lora_A.shape[0]))


def _nf4_lora_dx(dY: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                 nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset: torch.Tensor,
                 blocksize: int, double_quant: bool, nested_blocksize: int, wdtype: torch.dtype,
                 dS: torch.Tensor, lora_A: torch.Tensor, dropout_p: float, seed: int,
                 path: str = "auto") -> torch.Tensor:
    """dX of kernel 2, W tiles dequantized in registers (or of the split path, per
    ``path``), the mask regenerated from ``seed``."""
    nf4 = (packed, absmax, quant_map, nested_absmax, nested_map, offset)
    return _nf4_dx_path(dY, nf4, (blocksize, double_quant, nested_blocksize, wdtype), dS, lora_A, dropout_p, seed,
                        path)


_nf4_lora_dx_op = torch.library.custom_op("rankwise::nf4_lora_dx", _nf4_lora_dx, mutates_args=())


@_nf4_lora_dx_op.register_fake
def _nf4_lora_dx_fake(dY, packed, absmax, quant_map, nested_absmax, nested_map, offset,
                      blocksize, double_quant, nested_blocksize, wdtype, dS, lora_A, dropout_p, seed, path="auto"):
    return dY.new_empty((dY.shape[0], lora_A.shape[1]))


NF4LoRALinearFunction = lora_function(
    "nf4_lora_linear", _nf4_lora_linear_fwd, _nf4_lora_linear_fake, OpLayout(nf4=True, **ONE_ARM),
    KernelSet(lora_ds_db, _nf4_lora_dx, lora_da), traced_kernels("lora_ds_db", "nf4_lora_dx", "lora_da"),
    "NF4LoRALinearFunction", """The eager twin of ``rankwise::nf4_lora_linear``: same arguments, outputs
    and autograd formula, launchers called directly.""")


# ----------------------------------------------------------------------------
# Public entry (lora_linear sends an NF4Weight here) and its torch path
# ----------------------------------------------------------------------------


def nf4_lora_linear(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                    bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0, seed: Optional[int] = None,
                    backend: str = "auto", path: str = "auto") -> torch.Tensor:
    """``x @ dequant(weight).T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T``.

    Args are those of ``rankwise.kernels.lora_linear`` with ``weight`` an
    ``NF4Weight`` of shape (out_features, in_features); ``x`` is (..., in_features).
    Backend ``"triton"`` dequantizes W tiles inside the GEMM kernels (no
    full-precision W is ever allocated); ``"torch"`` (and ``"auto"`` off CUDA)
    dequantizes W, then runs the plain-torch path. The weight gets no gradient.
    ``path``: ``"fused"`` (W tiles dequantized inside the Triton GEMMs), ``"split"``
    (W dequantized whole by the NF4 kernel into a transient tensor, torch's GEMM,
    then the in-place low-rank tail) or ``"auto"`` (the measured choice on CUDA,
    ``kernels/tuning.py``; fused elsewhere).

    Returns:
        Tensor (..., out_features) in the compute dtype (x's, or autocast's).
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight: expected an NF4Weight, got {type(weight).__name__}")
    return one_arm_call(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, backend, path,
                        (NF4LoRALinearFunction, torch.ops.rankwise.nf4_lora_linear))


def nf4_lora_linear_reference(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p: float = 0.0,
                              seed: Optional[int] = None, keep_mask: Optional[torch.Tensor] = None):
    """The torch path of ``nf4_lora_linear`` (``backend="torch"``): dequantize the
    NF4 weight to x's dtype (``nf4.dequantize_nf4``), then ``lora_torch.lora_linear_torch``.
    Public under this historical name; the tests compare with their own float64
    reference, not with this."""
    W = dequantize_nf4(weight).to(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return lora_linear_torch(x, W, lora_A, lora_B, scaling, bias, dropout_p, seed, keep_mask)
