"""NF4 dequantization: the weight container, a Triton kernel, its launcher, and the torch path.

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

Also here, so that the kernels need nothing from ``rankwise.quant`` (which
re-exports these under the same names): ``NF4Weight``, the container of the
format, and ``dequantize_nf4``, the torch path of the dequantization.

Backends (as every op in ``rankwise.kernels``): ``nf4_dequantize(q, out_dtype,
backend)`` runs the Triton kernel for ``"triton"``, plain torch ops for
``"torch"`` (``dequantize_nf4`` is that path in W's own dtype), and ``"auto"``
picks Triton for CUDA weights, torch otherwise. ``nf4_dequantize_reference``
is the torch path under its old public name; the tests compare both with a
float64 product of their own.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .utils import BACKENDS, INTERPRET, require_gpu_or_interpreter, round_bf16, rounds_bf16_itself

#: torch dtype -> Triton dtype, for the dtypes an NF4 weight can dequantize to
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
#: the dtypes a weight may have before quantization (and after dequantization)
WEIGHT_DTYPES = tuple(TL_DTYPES)
#: absmax values per nested (double-quantization) block
NESTED_BLOCKSIZE = 256
#: the smallest quantization block (bitsandbytes' CPU and CUDA paths accept 32 too)
MIN_BLOCKSIZE = 32

# The 16 NF4 code values (quantiles of N(0, 1) normalised to [-1, 1], QLoRA).
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_CODE = torch.tensor(NF4_VALUES, dtype=torch.float32)


def is_pow2(n) -> bool:
    """True for a positive Python int that is a power of two."""
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int):
    """``code[q] * absmax[i // blocksize]`` in fp32."""
    n = q.numel()
    vals = code.to(q.device)[q.reshape(-1).long()]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return vals * scale


# ----------------------------------------------------------------------------
# The container
# ----------------------------------------------------------------------------


class NF4Weight:
    """A frozen weight stored as NF4 (bitsandbytes layout); not a Parameter.

    Fields: ``packed`` (uint8, (ceil(numel/2), 1)), ``absmax`` (fp32 per block,
    or uint8 codes with double quantization), ``nested_absmax`` (fp32 per 256
    absmax codes), ``nested_quant_map`` (the 256-value dynamic map), ``offset``
    (0-d fp32 tensor), ``quant_map`` (the 16 NF4 values), ``blocksize``,
    ``shape`` (original) and ``dtype`` (original, also the dequantized dtype).
    """

    def __init__(self, packed, absmax, quant_map, blocksize, shape, dtype,
                 nested_absmax=None, nested_quant_map=None, offset=None, nested_blocksize=NESTED_BLOCKSIZE):
        self.packed = packed
        self.absmax = absmax
        self.quant_map = quant_map
        self.blocksize = int(blocksize)
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.nested_absmax = nested_absmax
        self.nested_quant_map = nested_quant_map
        self.offset = offset
        self.nested_blocksize = int(nested_blocksize)
        _validate_weight(self)

    # -- properties ------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: packed weights plus all scale tensors and maps."""
        total = 0
        for t in (self.packed, self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map, self.offset):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def dim(self) -> int:
        return len(self.shape)

    def size(self, d=None):
        return self.shape if d is None else self.shape[d]

    def to(self, device=None, non_blocking: bool = False) -> "NF4Weight":
        """A copy on ``device`` (dtype casts are not allowed: the format is fixed)."""
        if isinstance(device, torch.dtype):
            raise TypeError("NF4Weight.to: the storage format is fixed; pass a device, not a dtype")

        def mv(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return NF4Weight(mv(self.packed), mv(self.absmax), mv(self.quant_map), self.blocksize, self.shape,
                         self.dtype, mv(self.nested_absmax), mv(self.nested_quant_map), mv(self.offset),
                         self.nested_blocksize)

    def cpu(self) -> "NF4Weight":
        return self.to("cpu")

    def cuda(self, device=None) -> "NF4Weight":
        return self.to("cuda" if device is None else device)

    def absmax_fp32(self) -> torch.Tensor:
        """Per-block scales in fp32 (decodes the double quantization if any)."""
        if not self.double_quant:
            return self.absmax.float()
        am = dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_quant_map,
                                        self.nested_blocksize)
        return am + self.offset.to(am.device)

    def dequantize(self) -> torch.Tensor:
        return dequantize_nf4(self)

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, device={self.device})")


def _validate_weight(q: NF4Weight) -> None:
    if not is_pow2(q.blocksize) or q.blocksize < MIN_BLOCKSIZE:
        raise ValueError(f"blocksize: expected a power of two >= {MIN_BLOCKSIZE}, got {q.blocksize!r}")
    if q.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {q.dtype}")
    if not isinstance(q.packed, torch.Tensor) or q.packed.dtype != torch.uint8:
        raise TypeError(f"packed: expected a uint8 tensor, got "
                        f"{getattr(q.packed, 'dtype', type(q.packed).__name__)}")
    n = q.numel
    if q.packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed: a weight of shape {tuple(q.shape)} ({n} values) needs {(n + 1) // 2} bytes, "
                         f"got a tensor of shape {tuple(q.packed.shape)} ({q.packed.numel()} bytes)")
    blocks = -(-n // q.blocksize)
    if q.absmax.numel() != blocks:
        raise ValueError(f"absmax: expected {blocks} values (ceil({n} / blocksize {q.blocksize})), "
                         f"got {q.absmax.numel()}")
    if q.nested_absmax is not None:
        if q.absmax.dtype != torch.uint8:
            raise TypeError(f"absmax: with double quantization expected uint8 codes, got {q.absmax.dtype}")
        nb = -(-blocks // q.nested_blocksize)
        if q.nested_absmax.numel() != nb:
            raise ValueError(f"nested_absmax: expected {nb} values, got {q.nested_absmax.numel()}")
        if q.nested_quant_map is None or q.nested_quant_map.numel() != 256:
            raise ValueError("nested_quant_map: expected the 256-value dynamic map")
        if q.offset is None:
            raise ValueError("offset: required with double quantization")
    elif q.absmax.dtype != torch.float32:
        raise TypeError(f"absmax: expected float32, got {q.absmax.dtype}")
    if q.quant_map.numel() != 16:
        raise ValueError(f"quant_map: expected the 16 NF4 code values, got {q.quant_map.numel()} values")


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


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
                        RNE: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[i] = code[nib(i)] * scale(i), stored in OUT's dtype."""
    pid = tl.program_id(0).to(tl.int64)
    flat = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = flat < numel
    v = nf4_tile(PACKED, ABSMAX, QMAP, NESTED, NMAP, OFFSET, flat, mask,
                 BLOCKSIZE, DOUBLE, NESTED_BLOCKSIZE)
    if RNE:  # bf16 under the interpreter, whose cast truncates
        v = round_bf16(v)
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


def _check_nf4(q, out_dtype):
    if not isinstance(q, NF4Weight):
        raise TypeError(f"q: expected an NF4Weight, got {type(q).__name__}")
    if out_dtype not in TL_DTYPES:
        raise TypeError(f"out_dtype: expected float32, float16 or bfloat16, got {out_dtype}")


def _nf4_dequantize_triton(q: NF4Weight, out_dtype: torch.dtype) -> torch.Tensor:
    require_gpu_or_interpreter(q.device, "q", "or use backend='torch' (rankwise.quant.dequantize_nf4)")
    numel = q.numel
    out = torch.empty(numel, device=q.device, dtype=out_dtype)
    tensors, const = nf4_kernel_args(q)
    BLOCK = 1024
    grid = (triton.cdiv(numel, BLOCK),)
    # No fused multiply-add: the double-quant scale must round like bitsandbytes' (mul, then add).
    _nf4_dequant_kernel[grid](*tensors, out, numel, **const, RNE=rounds_bf16_itself(out_dtype), BLOCK=BLOCK,
                              num_warps=4, enable_fp_fusion=False)
    return out.reshape(q.shape)


def _nf4_dequantize_torch(q: NF4Weight, out_dtype: torch.dtype) -> torch.Tensor:
    """``code[nib] * absmax`` in fp32 with torch ops, rounded once to ``out_dtype``."""
    n, bs = q.numel, q.blocksize
    b = q.packed.reshape(-1)
    # one gather per byte: (code[hi], code[lo]) from a 256 x 2 table
    code = q.quant_map.to(b.device).float()
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)
    vals = pairs[b.long()].reshape(-1)[:n]
    absmax = q.absmax_fp32()
    blocks = absmax.numel()
    if n != blocks * bs:
        vals = torch.nn.functional.pad(vals, (0, blocks * bs - n))
    out = (vals.view(blocks, bs) * absmax.view(-1, 1)).reshape(-1)[:n]
    return out.to(out_dtype).reshape(q.shape)


def nf4_dequantize(q: NF4Weight, out_dtype=None, backend: str = "auto") -> torch.Tensor:
    """Dequantize an ``NF4Weight``: ``q.shape`` in ``out_dtype`` (default ``q.dtype``),
    each value the fp32 product ``code[nib] * scale`` rounded once.

    Args:
        q: the weight.
        out_dtype: float32, float16 or bfloat16.
        backend: ``"triton"`` (the kernel; on the CPU only under ``TRITON_INTERPRET=1``),
            ``"torch"`` (plain torch ops, any device) or ``"auto"`` (Triton for a CUDA
            weight, torch otherwise). Both give the same bytes, equal to
            ``bitsandbytes.functional.dequantize_4bit`` when ``out_dtype`` is ``q.dtype``.
    """
    out_dtype = out_dtype or getattr(q, "dtype", None)
    _check_nf4(q, out_dtype)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.device.type == "cuda" else "torch"
    if backend == "triton":
        return _nf4_dequantize_triton(q, out_dtype)
    return _nf4_dequantize_torch(q, out_dtype)


def dequantize_nf4(q: NF4Weight) -> torch.Tensor:
    """The full-precision weight (``q.shape``, ``q.dtype``) with torch ops on q's
    device; equals ``bitsandbytes.functional.dequantize_4bit`` exactly. The torch
    path of ``nf4_dequantize``; re-exported by ``rankwise.quant``."""
    _check_nf4(q, getattr(q, "dtype", None))
    return _nf4_dequantize_torch(q, q.dtype)


def nf4_dequantize_reference(q: NF4Weight, out_dtype=None) -> torch.Tensor:
    """``nf4_dequantize(q, out_dtype, backend="torch")``: the torch path, public
    under its old name (the tests' oracle is a float64 product of their own)."""
    return nf4_dequantize(q, out_dtype, backend="torch")
