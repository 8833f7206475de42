"""Segmented multi-arm LoRA linear layer: K LoRA arms (adapters of different
ranks) over one frozen base weight, each arm on its own contiguous block of rows.

Math (x: (M, K) after flattening leading dims, rows of arm k the block
[m_k, m_k + M_k) with sum_k M_k = M; W: (N, K) dense or NF4; arm k has rank r_k,
A_k = lora_A[o_k : o_k + r_k] (r_k, K), B_k = lora_B[:, o_k : o_k + r_k] (N, r_k),
o_k = r_1 + ... + r_{k-1}, scaling s_k, dropout keep-mask m_k with probability
p_k, x_k = x[m_k : m_k + M_k], x_dk = x_k * m_k / (1 - p_k)):

    forward
        Y   = x @ W.T + b                                       (M, N)  one base GEMM, all rows
        S_k = x_dk @ A_k.T                                      (M_k, r_k)
        Y[rows_k] += s_k * S_k @ B_k.T
    backward, with dY = dL/dY and dY_k = dY[rows_k]
        dS_k = s_k * dY_k @ B_k                                 (M_k, r_k)
        dB_k = s_k * dY_k.T @ S_k       -> dB[:, o_k : o_k + r_k]
        dX   = dY @ W,  dX[rows_k] += (dS_k @ A_k) * m_k / (1 - p_k)
        dA_k = dS_k.T @ x_dk            -> dA[o_k : o_k + r_k]

    Derivation: arm k's rows are a single-arm LoRA layer (``lora_linear.py``)
    whose low-rank term depends only on x_k, A_k, B_k; the arms share nothing
    but W and b, so each gradient is the single-arm one restricted to the arm's
    rows and columns, and the base term's gradient dY @ W is taken over all rows
    at once. A rank or a row block of another arm never enters arm k's terms.

Layout: lora_A is the arms' A matrices concatenated along dim 0 and lora_B the
B matrices along dim 1, not padded to the largest rank (ranks 1..128 sum to
255: padding would do ~4x the low-rank work and hold ~4x the optimizer state).

Dropout: arm k's mask is drawn for x_k alone from seeds[k], exactly as
``lora_linear`` draws it for an input x_k with that seed (per backend: the
Triton backend with Philox of (seed, local flat index), the torch backend with
a ``torch.Generator`` seeded with it). So an arm run together with others, with
the same seed and the same rows, sees the mask of its solo run.

Backends (the convention of ``rankwise.kernels``): ``"torch"`` runs one base
matmul over all rows plus a loop over the arms with the single-arm low-rank
math (differentiated by autograd), correct for any input and device;
``"triton"`` runs the kernels (on a CPU only under ``TRITON_INTERPRET=1``);
``"auto"`` picks Triton on CUDA, torch otherwise. Dense and NF4 bases in both.
The tests compare both with a float64 per-arm reference of their own.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .lowrank import check_tensor, compute_dtype, draw_seed, validate_lora_args
from .nf4 import NF4Weight, dequantize_nf4

__all__ = ["multi_lora_linear", "multi_lora_linear_torch"]


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
    if sum(ranks) != lora_A.shape[0]:
        raise ValueError(f"ranks: sum {sum(ranks)} does not match lora_A's {lora_A.shape[0]} rows "
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


def multi_lora_linear_torch(x2, weight, lora_A, lora_B, ranks, scalings, rows, bias=None,
                            dropout_ps=None, seeds=None):
    """The torch path on a 2-D ``x2`` and a dense ``weight``: one base matmul over
    all rows, then each arm's low-rank term on its own rows (autograd
    differentiates it). ``ranks``, ``scalings``, ``rows``, ``dropout_ps``, ``seeds``:
    one entry per arm, already validated."""
    n = len(rows)
    dropout_ps = dropout_ps or (0.0,) * n
    seeds = seeds or (0,) * n
    y = torch.nn.functional.linear(x2, weight, bias)
    parts = []
    m0 = o = 0
    for M_k, r, s, p, seed in zip(rows, ranks, scalings, dropout_ps, seeds):
        x_k = x2[m0:m0 + M_k]
        if p > 0.0:
            x_k = x_k * torch_keep_mask(x_k.shape, p, seed, x2.device).to(x2.dtype) / (1.0 - p)
        S_k = torch.nn.functional.linear(x_k, lora_A[o:o + r])
        parts.append(s * torch.nn.functional.linear(S_k, lora_B[:, o:o + r]))
        m0 += M_k
        o += r
    return y + torch.cat(parts)


# ----------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------


def multi_lora_linear(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      ranks: Sequence[int], scalings: Sequence[float], rows: Sequence[int],
                      bias: Optional[torch.Tensor] = None, dropout_p=0.0, seeds: Optional[Sequence[int]] = None,
                      backend: str = "auto") -> torch.Tensor:
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

    Dtypes as ``lora_linear``: weight, adapters and bias are cast to x's dtype
    (or autocast's); accumulation is fp32 in the kernels.

    Returns:
        Tensor ``(..., out_features)`` in the compute dtype.
    """
    is_nf4 = isinstance(weight, NF4Weight)
    if is_nf4:
        if len(weight.shape) != 2:
            raise ValueError(f"weight: expected a 2-D NF4 weight (out_features, in_features), "
                             f"got shape {tuple(weight.shape)}")
    else:
        check_tensor(weight, "weight", 2)
    ranks, scalings, rows, dropout_ps, seeds = validate_multi_args(
        x, tuple(weight.shape), weight.device, lora_A, lora_B, bias, ranks, scalings, rows, dropout_p, seeds,
        backend)

    device_type = x.device.type
    dtype = compute_dtype(x)

    def cast(t):
        return t if t is None or t.dtype == dtype else t.to(dtype)

    x, lora_A, lora_B, bias = cast(x), cast(lora_A), cast(lora_B), cast(bias)
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
    raise NotImplementedError("multi_lora_linear: the Triton backend is not written yet; use backend='torch'")
