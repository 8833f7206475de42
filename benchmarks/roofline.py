"""Roofline accounting for the benchmark scripts: ceilings measured in the same
run, FLOP and byte models of the LoRA layers, and the attained fraction.

For a measured time ``t`` of an op doing ``F`` FLOPs and moving ``Q`` bytes on
a machine whose measured ceilings are ``P`` FLOP/s (dense matmul) and ``BW``
bytes/s (large copy)::

    roofline time   T = max(F / P, Q / BW)
    attained        T / t            (1.0 = at the roofline)
    bound           "compute" if F / P >= Q / BW else "memory"

A figure that misses its target is reported with these (issue #8).

The max is taken over the whole layer (all its kernels / ops together), so it
is a lower bound for every implementation. For a sequence of separate kernels
the sum of per-kernel rooflines is tighter: an unfused elementwise pass is
memory-bound and cannot overlap the compute-bound GEMM before it, so in a
compute-bound layer the extra bytes of an unfused implementation show up in
its lower attained fraction, not in a longer roofline.

Counting conventions of the models below:

- FLOPs are those of the matrix products, 2 per multiply-add. Elementwise work
  (the LoRA scale, the add, dropout) is O(M N) or O(M K), at most ~1/r of the
  smallest product, and is counted in bytes only. NF4 decoding is integer/ALU
  work, not matmul FLOPs, and is counted as 0 FLOPs.
- Bytes are the compulsory traffic of each op *as the implementation runs it*:
  every kernel or torch op reads each operand once and writes each output once
  from/to memory; nothing is assumed to stay in cache between ops (at GPU sizes
  the tensors are many times the L2). Tensors saved for backward are referenced,
  not copied: their cost is the backward op reading them again.
  A fraction above 1 means operands were served from cache (small CPU shapes).
- Notation: x (M, K) input, W (N, K) frozen base weight, A (r, K), B (N, r),
  y (M, N); ``e`` bytes per element of the compute dtype (4 fp32, 2 bf16/fp16);
  ``w`` the bytes of one read of W (``N K e`` dense, ``nf4_weight_bytes`` NF4).
  No bias (the benchmarks use none). W gets no gradient (frozen); x, A, B do.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch

PASSES = ("fwd", "bwd", "fwd_bwd")


class Cost(NamedTuple):
    """Model FLOPs and bytes of one pass."""

    flops: int
    bytes: int

    def __add__(self, other: "Cost") -> "Cost":  # type: ignore[override]
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


def _passes(fwd: Cost, bwd: Cost) -> Dict[str, Cost]:
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


# ----------------------------------------------------------------------------
# FLOP / byte models
# ----------------------------------------------------------------------------


def base_linear(M: int, K: int, N: int, e: int) -> Dict[str, Cost]:
    """The frozen base layer alone, ``y = x @ W.T`` (F.linear), gradient for x only.

    fwd: ``y = x W^T``: 2MNK FLOPs; reads x, W, writes y:   e(MK + NK + MN)
    bwd: ``dX = dY W``: 2MNK FLOPs; reads dY, W, writes dX: e(MN + NK + MK)
    """
    f = 2 * M * N * K
    return _passes(Cost(f, e * (M * K + N * K + M * N)), Cost(f, e * (M * N + N * K + M * K)))


def lora_flops(M: int, K: int, N: int, r: int) -> Dict[str, int]:
    """Matmul FLOPs of the LoRA layer, the same for every implementation.

    forward:  y = x W^T  (2MNK)  +  S = x_d A^T (2MrK)  +  S B^T (2MrN)
              = 2MNK + 2Mr(K + N)
    backward: dS = s dY B (2MNr), dB = s dY^T S (2MNr), dX = dY W (2MNK)
              + dS A (2MrK), dA = dS^T x_d (2MrK)
              = 2MNK + 4Mr(K + N)                (no dW: W is frozen)
    fwd+bwd:  4MNK + 6Mr(K + N)
    """
    fwd = 2 * M * N * K + 2 * M * r * (K + N)
    bwd = 2 * M * N * K + 4 * M * r * (K + N)
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}


def lora_fused(M: int, K: int, N: int, r: int, e: int, w_bytes: Optional[int] = None) -> Dict[str, Cost]:
    """rankwise's fused LoRA layer (kernels of ``rankwise.kernels.lora_linear``,
    or their NF4 twins with ``w_bytes = nf4_weight_bytes(...)``). FLOPs: ``lora_flops``.

    forward (w = w_bytes, default N K e)
        k1  S = x_d A^T            reads x, A; writes S        e(MK + rK + Mr)
        k2  y = x W^T + s S B^T    reads x, W, S, B; writes y  e(MK + Mr + Nr + MN) + w
        total                      e(2MK + rK + 2Mr + Nr + MN) + w
    backward (dropout mask regenerated from the seed: no bytes)
        k3  dS, dB from one dY     reads dY, B, S; writes dS, dB   e(MN + 2Nr + 2Mr)
        k4  dX = dY W + dS A       reads dY, W, dS, A; writes dX   e(MN + Mr + rK + MK) + w
        k5  dA = dS^T x_d          reads dS, x; writes dA          e(Mr + MK + rK)
        total                      e(2MN + 2MK + 4Mr + 2Nr + 2rK) + w
    (k3's fp32 dB accumulator, O(N r), is left out.)
    """
    w = N * K * e if w_bytes is None else w_bytes
    fl = lora_flops(M, K, N, r)
    fwd = e * (2 * M * K + r * K + 2 * M * r + N * r + M * N) + w
    bwd = e * (2 * M * N + 2 * M * K + 4 * M * r + 2 * N * r + 2 * r * K) + w
    return _passes(Cost(fl["fwd"], fwd), Cost(fl["bwd"], bwd))


def lora_peft(M: int, K: int, N: int, r: int, e: int, p: float = 0.0, fused_elementwise: bool = False,
              w_bytes: Optional[int] = None) -> Dict[str, Cost]:
    """PEFT's eager ``lora.Linear``: ``base(x) + B(A(dropout(x))) * s``, one torch op
    at a time (also ``lora_linear(..., backend="torch")``). FLOPs: ``lora_flops``.

    forward
        base = x W^T          reads x, W; writes (M, N)          e(MK + MN) + w
        x_d = dropout(x)      (p > 0) reads x; writes x_d, mask  2eMK + MK
        S = x_d A^T           reads x (again), A; writes S       e(MK + rK + Mr)
        L = S B^T             reads S, B; writes the LoRA output e(Mr + Nr + MN)
        L * s                 reads L; writes                    2eMN
        base + L s            reads both; writes y               3eMN
        total                 e(2MK + rK + 2Mr + Nr + 7MN) + w   (+ 2eMK + MK with dropout)
    backward
        dL = s dY             2eMN
        dS = dL B             e(MN + Nr + Mr)
        dB = dL^T S           e(MN + Mr + Nr)
        dx_d = dS A           e(Mr + rK + MK)
        dA = dS^T x_d         e(Mr + MK + rK)
        dx_d * mask / (1-p)   (p > 0) 2eMK + MK
        dx_base = dY W        e(MN + MK) + w
        dX = dx_base + dx_l   3eMK
        total                 e(5MN + 6MK + 4Mr + 2Nr + 2rK) + w   (+ 2eMK + MK with dropout)

    So it moves e(6MN) more than the fused layer forward and e(3MN + 4MK) more
    backward. ``fused_elementwise`` models torch.compile fusing the scale and
    the add into one pass (3eMN instead of 5eMN forward), an estimate: what
    Inductor fuses depends on the version. Dropout is counted as CUDA's
    ``native_dropout`` (one pass writing x_d and a bool mask); on the CPU torch
    decomposes it into bernoulli_, div_ and mul with a float mask (more bytes).
    """
    w = N * K * e if w_bytes is None else w_bytes
    fl = lora_flops(M, K, N, r)
    drop = (2 * e * M * K + M * K) if p > 0 else 0
    fwd = e * (2 * M * K + r * K + 2 * M * r + N * r + (5 if fused_elementwise else 7) * M * N) + w + drop
    bwd = e * (5 * M * N + 6 * M * K + 4 * M * r + 2 * N * r + 2 * r * K) + w + drop
    return _passes(Cost(fl["fwd"], fwd), Cost(fl["bwd"], bwd))


def nf4_weight_bytes(numel: int, blocksize: int = 64, double_quant: bool = False) -> int:
    """Bytes of an NF4 weight as stored (``rankwise.quant.NF4Weight.nbytes``, the
    same tensors as bitsandbytes' quant state), with ``nb = ceil(numel / blocksize)``:

        packed codes     ceil(numel / 2)          (two 4-bit codes a byte)
        NF4 code table   16 * 4
        absmax           4 nb                     (fp32 per block)
      or, double-quantized (bitsandbytes' compress_statistics):
        absmax           nb                       (uint8 codes)
        nested absmax    4 ceil(nb / 256)         (fp32 per 256 codes)
        nested map       256 * 4,  offset 4

    At blocksize 64: K N / 2 + K N / 16 (0.5625 bytes a value), or about
    K N / 2 + K N / 64 with double quantization.
    """
    nb = -(-numel // blocksize)
    total = -(-numel // 2) + 16 * 4
    if double_quant:
        return total + nb + 4 * (-(-nb // 256)) + 256 * 4 + 4
    return total + 4 * nb


def nf4_dequant(N: int, K: int, e: int, blocksize: int = 64, double_quant: bool = False) -> Cost:
    """Dequantizing the whole NF4 W to a dense (N, K) buffer (bitsandbytes'
    ``dequantize_4bit``, rankwise's ``dequantize_nf4``): reads the stored NF4 bytes,
    writes N K e; with double quantization the absmax codes are first decoded to
    an fp32 buffer (written and read back: 8 nb). 0 matmul FLOPs. A lower bound:
    implementations may pass through more temporaries."""
    nb = -(-(N * K) // blocksize)
    extra = 8 * nb if double_quant else 0
    return Cost(0, nf4_weight_bytes(N * K, blocksize, double_quant) + extra + N * K * e)


def nf4_lora(M: int, K: int, N: int, r: int, e: int, impl: str, blocksize: int = 64,
             double_quant: bool = False) -> Dict[str, Cost]:
    """The LoRA layer on an NF4 base weight, three ways (FLOPs: ``lora_flops``):

    - ``"fused"``: rankwise's Triton kernels decode W tiles in registers: the
      fused model with ``w = nf4_weight_bytes`` for each of the two W reads
      (forward k2, backward k4); no dense W is ever written.
    - ``"torch"``: rankwise's ``backend="torch"`` reference: dequantize once in
      the forward, then the eager (PEFT-style) layer on the dense W, whose
      backward reuses the saved dense W:
      fwd = nf4_dequant + peft fwd, bwd = peft bwd.
    - ``"bnb_peft"``: bitsandbytes ``matmul_4bit`` + PEFT's eager LoRA branch on
      its dequantize-then-F.linear path (the CPU path, and CUDA's for M > 1536 in
      bitsandbytes 0.50): W is dequantized to a full buffer in the forward and
      again in the backward: fwd = nf4_dequant + peft fwd, bwd = nf4_dequant + peft bwd.
    """
    deq = nf4_dequant(N, K, e, blocksize, double_quant)
    if impl == "fused":
        return lora_fused(M, K, N, r, e, w_bytes=nf4_weight_bytes(N * K, blocksize, double_quant))
    peft = lora_peft(M, K, N, r, e)
    if impl == "torch":
        return _passes(deq + peft["fwd"], peft["bwd"])
    if impl == "bnb_peft":
        return _passes(deq + peft["fwd"], deq + peft["bwd"])
    raise ValueError(f"impl: expected 'fused', 'torch' or 'bnb_peft', got {impl!r}")


# ----------------------------------------------------------------------------
# Ceilings measured in this run
# ----------------------------------------------------------------------------

_CEILINGS: dict = {}


def measure_ceilings(dtype: torch.dtype = torch.float32, device: Optional[str] = None) -> dict:
    """Dense matmul throughput (FLOP/s) in ``dtype`` and copy bandwidth (bytes/s),
    measured now, cached per process for (device, dtype, torch CPU threads).

    - matmul: ``a @ b`` of two n x n ``dtype`` matrices, 2 n^3 FLOPs (n = 8192 on
      CUDA, 1536 on the CPU), under the current matmul settings (e.g. TF32).
    - bandwidth: ``dst.copy_(src)`` of a large buffer (512 MiB on CUDA, 128 MiB on
      the CPU, several times the last-level cache), 2 * nbytes (read + write).

    Each ceiling uses the fast end of its samples (``benchmarks.common.time_ms``:
    the minimum on the CPU, do_bench's 20th percentile on CUDA): a ceiling is what
    the machine can do, and on a shared CPU the median drifts with the load. On
    the CPU the pair takes about a second.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    key = (device, str(dtype), torch.get_num_threads())
    if key in _CEILINGS:
        return _CEILINGS[key]
    cuda = device.startswith("cuda")
    n = 8192 if cuda else 1536
    copy_bytes = 2**29 if cuda else 2**27
    mm, cp = _matmul_ms(n, dtype, device), _copy_ms(copy_bytes, dtype, device)
    if cuda:
        torch.cuda.empty_cache()
    out = dict(device=device, dtype=str(dtype).split(".")[-1], threads=torch.get_num_threads(),
               peak_flops=2 * n**3 / (mm * 1e-3), peak_bw=2 * copy_bytes / (cp * 1e-3),
               matmul_n=n, matmul_ms=mm, copy_bytes=copy_bytes, copy_ms=cp)
    out["ridge_flops_per_byte"] = out["peak_flops"] / out["peak_bw"]
    _CEILINGS[key] = out
    return out


def _fastest(t: dict) -> float:
    return t.get("ms_min", t.get("ms_p20", t["ms"]))


def _matmul_ms(n: int, dtype: torch.dtype, device: str) -> float:
    from benchmarks.common import time_ms

    g = torch.Generator(device=device).manual_seed(0)  # own generator: the global RNG is left alone
    a = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    return _fastest(time_ms(lambda: torch.matmul(a, b), warmup=1, reps=6))


def _copy_ms(nbytes: int, dtype: torch.dtype, device: str) -> float:
    from benchmarks.common import time_ms

    src = torch.ones(nbytes // dtype_bytes(dtype), device=device, dtype=dtype)
    dst = torch.empty_like(src)
    return _fastest(time_ms(lambda: dst.copy_(src), warmup=1, reps=6))


def roofline(flops: float, nbytes: float, ms: Optional[float], ceilings: dict) -> dict:
    """Roofline time ``max(flops / peak_flops, bytes / peak_bw)`` (ms), the
    attained fraction ``roofline_ms / ms`` (None when ``ms`` is None: not timed)
    and the bound that sets the roofline ("compute" or "memory")."""
    t_compute = flops / ceilings["peak_flops"] * 1e3
    t_memory = nbytes / ceilings["peak_bw"] * 1e3
    t = max(t_compute, t_memory)
    return dict(roofline_ms=t, fraction=(t / ms) if ms else None,
                bound="compute" if t_compute >= t_memory else "memory")


def annotate(row: dict, prefix: str, cost: Cost, ms: Optional[float], ceilings: dict) -> dict:
    """Add ``<prefix>_flops``, ``_bytes``, ``_roofline_ms``, ``_roofline_frac`` and
    ``_bound`` to ``row`` for one pass (``prefix`` "fwd" or "fwd_bwd"); returns row."""
    rl = roofline(cost.flops, cost.bytes, ms, ceilings)
    row.update({f"{prefix}_flops": int(cost.flops), f"{prefix}_bytes": int(cost.bytes),
                f"{prefix}_roofline_ms": rl["roofline_ms"], f"{prefix}_roofline_frac": rl["fraction"],
                f"{prefix}_bound": rl["bound"]})
    return row


def ceiling_figures(ceilings: dict) -> list:
    """The two measured ceilings as ``summary`` figures."""
    c = ceilings
    return [dict(figure=f"ceiling: dense matmul {c['dtype']}, n={c['matmul_n']}", value=c["peak_flops"] / 1e9,
                 unit="GFLOP/s", baseline="-"),
            dict(figure=f"ceiling: copy bandwidth (read+write), {c['copy_bytes'] / 2**20:.0f} MiB",
                 value=c["peak_bw"] / 1e9, unit="GB/s", baseline="-")]


def roofline_figure(what: str, row: dict, prefix: str = "fwd_bwd") -> Optional[dict]:
    """A ``summary`` figure for one measured pass of a row: its attained fraction
    of the roofline, with the roofline time and bound as the baseline; None if
    the pass was not timed."""
    frac = row.get(f"{prefix}_roofline_frac")
    if frac is None:
        return None
    return dict(figure=f"{what}, fraction of roofline", value=frac, unit="of roofline",
                baseline=f"roofline {row[f'{prefix}_roofline_ms']:.3g} ms, {row[f'{prefix}_bound']}-bound")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


__all__ = ["Cost", "PASSES", "base_linear", "lora_flops", "lora_fused", "lora_peft", "nf4_weight_bytes",
           "nf4_dequant", "nf4_lora", "measure_ceilings", "roofline", "annotate", "ceiling_figures",
           "roofline_figure", "dtype_bytes"]

