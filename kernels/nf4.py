"""NF4 dequantization: a Triton kernel, its launcher, and the plain-torch reference.

Math (bitsandbytes' NF4 layout; W has ``numel`` values, flattened row-major):

    byte  = packed[i // 2]
    nib   = byte >> 4 if i is even else byte & 15          (first value in the high nibble)
    scale = absmax[i // blocksize]                          (fp32)
          = map8[absmax_u8[b]] * nested[b // 256] + offset  with double quantization, b = i // blocksize
    W[i]  = (code[nib] * scale) rounded once to W's dtype   (product in fp32)

``nf4_tile`` (a ``triton.jit`` helper) computes ``code[nib] * scale`` in fp32
for any tile of flat indices, ``nf4_rows_tile`` for a (rows, BK) tile of a 2-D
weight with an even row length (bytes loaded once per pair of values); the fused
NF4 LoRA kernels (``nf4_lora.py``) call them on their W tiles, so a
full-precision W never exists in memory.

There is no backward: the NF4 base weight is frozen.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import INTERPRET, require_gpu_or_interpreter

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def nf4_scale(ABSMAX, NESTED, NMAP, OFFSET, blk, mask, DOUBLE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 absmax of the quantization blocks ``blk`` (decodes double quantization:
    ``map8[absmax_u8[blk]] * nested[blk // 256] + offset``, multiply then add)."""
    if DOUBLE:
        q8 = tl.load(ABSMAX + blk, mask=mask, other=0).to(tl.int32)
        c8 = tl.load(NMAP + q8, mask=mask, other=0.0)
        s2 = tl.load(NESTED + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        off = tl.load(OFFSET)
        scale = c8 * s2
        scale = scale + off
    else:
        scale = tl.load(ABSMAX + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def nf4_tile(PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, flat, mask,
             BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 values ``code[nib(flat)] * scale(flat)`` of an NF4 tensor at the int64
    flat indices ``flat`` (any tile shape); masked-out lanes give 0."""
    byte = tl.load(PACKED + flat // 2, mask=mask, other=0).to(tl.int32)
    nib = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
    code = tl.load(QMAP + nib, mask=mask, other=0.0)
    scale = nf4_scale(ABSMAX, NESTED, NMAP, OFFSET, flat // BLOCKSIZE, mask, DOUBLE, NESTED_BLOCKSIZE)
    return code * scale


@triton.jit
def nf4_rows_tile(PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, rn, k0, N, K,
                  BK: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr,
                  NESTED_BLOCKSIZE: tl.constexpr):
    """fp32 (len(rn), BK) tile ``W[rn, k0:k0+BK]`` of a 2-D NF4 weight W (N, K)
    with **K even**: each row starts on a byte boundary, so the tile's bytes are
    loaded once as a (len(rn), BK // 2) block and split into high / low nibbles
    (interleaved back into k order) instead of one byte load per value."""
    rkh = tl.arange(0, BK // 2)
    row_byte = (rn * K + k0) // 2
    bmask = (rn[:, None] < N) & (k0 + 2 * rkh[None, :] < K)
    b = tl.load(PACKED + row_byte[:, None] + rkh[None, :], mask=bmask, other=0).to(tl.int32)
    nib = tl.interleave(b >> 4, b & 15)
    rk = k0 + tl.arange(0, BK)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    code = tl.load(QMAP + nib, mask=mask, other=0.0)
    blk = (rn[:, None] * K + rk[None, :]) // BLOCKSIZE
    scale = nf4_scale(ABSMAX, NESTED, NMAP, OFFSET, blk, mask, DOUBLE, NESTED_BLOCKSIZE)
    return code * scale


@triton.jit
def _nf4_dequant_kernel(PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, OUT, numel,
                        BLOCKSIZE: tl.constexpr, DOUBLE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                        BLOCK: tl.constexpr):
    """OUT[i] = code[nib(i)] * scale(i), stored in OUT's dtype."""
    pid = tl.program_id(0).to(tl.int64)
    flat = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = flat < numel
    v = nf4_tile(PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, flat, mask,
                 BLOCKSIZE, DOUBLE, NESTED_BLOCKSIZE)
    tl.store(OUT + flat, v.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_quantize_kernel(X, MIDS, PACKED, ABSMAX, numel, n_blocks,
                         BLOCKSIZE: tl.constexpr, NB: tl.constexpr, DIV_RN: tl.constexpr):
    """NB quantization blocks per program (bitsandbytes' NF4 rules):
    absmax = max |x|; v = clamp(x * (1 / max(absmax, 1e-38)), -1, 1) (``x / absmax`` in
    the short last block); index = number of code midpoints strictly below v; two
    indices per byte, the first in the high nibble."""
    pid = tl.program_id(0).to(tl.int64)
    rb = pid * NB + tl.arange(0, NB).to(tl.int64)
    rj = tl.arange(0, BLOCKSIZE)
    flat = rb[:, None] * BLOCKSIZE + rj[None, :]
    x = tl.load(X + flat, mask=flat < numel, other=0.0).to(tl.float32)
    am = tl.max(tl.abs(x), axis=1)
    # 1e-38 is an fp32 denormal: a bare Python float below fp32's smallest normal becomes an fp64
    # constant in Triton's GPU compiler (and div_rn then rejects the fp64 operand), so make it fp32 here
    amc = tl.maximum(am, tl.full((NB,), 1e-38, tl.float32))
    full = (rb + 1) * BLOCKSIZE <= numel
    den = amc[:, None] + tl.zeros_like(x)
    if DIV_RN:  # correctly rounded fp32 division (Triton's default '/' is approximate on GPUs)
        inv = tl.math.div_rn(tl.full((NB,), 1.0, tl.float32), amc)
        q = tl.math.div_rn(x, den)
    else:  # the interpreter divides in numpy, already correctly rounded
        inv = 1.0 / amc
        q = x / den
    v = tl.where(full[:, None], x * inv[:, None], q)
    v = tl.minimum(tl.maximum(v, -1.0), 1.0)
    idx = tl.zeros((NB, BLOCKSIZE), dtype=tl.int32)
    for i in tl.static_range(15):
        idx += (v > tl.load(MIDS + i)).to(tl.int32)
    hi, lo = tl.split(tl.reshape(idx, (NB, BLOCKSIZE // 2, 2)))
    byte = ((hi << 4) | lo).to(tl.uint8)
    pair = rb[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(PACKED + pair, byte, mask=pair * 2 < numel)
    tl.store(ABSMAX + rb, tl.where(full, am, amc), mask=rb < n_blocks)


def nf4_quantize_packed(W: torch.Tensor, blocksize: int, code: torch.Tensor):
    """Triton NF4 quantizer: ``(packed (ceil(numel/2), 1) uint8, absmax fp32)``,
    byte-identical to ``rankwise.quant.quantize_nf4``'s torch path."""
    require_gpu_or_interpreter(W.device, "W", "or quantize with rankwise.quant.quantize_nf4 on the CPU")
    x = W.detach().reshape(-1).contiguous()
    numel = x.numel()
    n_blocks = -(-numel // blocksize)
    c = code.to(x.device, torch.float32)
    mids = ((c[:-1] + c[1:]) / 2).contiguous()
    packed = torch.empty(((numel + 1) // 2, 1), device=x.device, dtype=torch.uint8)
    absmax = torch.empty(n_blocks, device=x.device, dtype=torch.float32)
    NB = max(1, 4096 // blocksize)
    grid = (triton.cdiv(n_blocks, NB),)
    _nf4_quantize_kernel[grid](x, mids, packed, absmax, numel, n_blocks, BLOCKSIZE=blocksize, NB=NB,
                               DIV_RN=not INTERPRET, num_warps=4, enable_fp_fusion=False)
    return packed, absmax


def nf4_kernel_args(q):
    """The tensor arguments of ``nf4_tile`` for an ``NF4Weight`` (placeholders
    where double quantization is off) and its constexprs."""
    double = q.double_quant
    absmax = q.absmax if double else q.absmax.float()
    nested = q.nested_absmax.float() if double else absmax
    nmap = q.nested_quant_map.float() if double else q.quant_map
    offset = q.offset.reshape(1).float() if double else absmax
    qmap = q.quant_map.float()
    tensors = (q.packed, absmax, qmap, nested, nmap, offset)
    const = dict(BLOCKSIZE=q.blocksize, DOUBLE=double, NESTED_BLOCKSIZE=q.nested_blocksize if double else 256)
    return tensors, const


def nf4_dequantize(q, out_dtype=None) -> torch.Tensor:
    """Dequantize an ``NF4Weight`` with the Triton kernel; returns ``q.shape`` in
    ``out_dtype`` (default ``q.dtype``). Equals ``rankwise.quant.dequantize_nf4``
    exactly when ``out_dtype`` is ``q.dtype`` (one rounding of the fp32 product)."""
    if not getattr(q, "_rankwise_nf4", False):
        raise TypeError(f"q: expected an NF4Weight, got {type(q).__name__}")
    out_dtype = out_dtype or q.dtype
    if out_dtype not in _TL_DTYPES:
        raise TypeError(f"out_dtype: expected float32, float16 or bfloat16, got {out_dtype}")
    require_gpu_or_interpreter(q.device, "q", "or use rankwise.quant.dequantize_nf4")
    numel = q.numel
    out = torch.empty(numel, device=q.device, dtype=out_dtype)
    tensors, const = nf4_kernel_args(q)
    BLOCK = 1024
    grid = (triton.cdiv(numel, BLOCK),)
    # No fused multiply-add: the double-quant scale must round like bitsandbytes' (mul, then add).
    _nf4_dequant_kernel[grid](*tensors, out, numel, **const, BLOCK=BLOCK, num_warps=4,
                              enable_fp_fusion=False)
    return out.reshape(q.shape)


def nf4_dequantize_reference(q, out_dtype=None) -> torch.Tensor:
    """Plain-torch reference: ``code[nib] * absmax`` in fp32, cast once."""
    n = q.numel
    b = q.packed.reshape(-1)
    idx = torch.stack([b >> 4, b & 0xF], dim=1).reshape(-1)[:n].long()
    vals = q.quant_map.float()[idx]
    scale = q.absmax_fp32().repeat_interleave(q.blocksize)[:n]
    return (vals * scale).to(out_dtype or q.dtype).reshape(q.shape)
