"""Segmented multi-arm LoRA linear layer: several LoRA arms (adapters of
different ranks) over one frozen base weight, each arm on its own contiguous
block of rows (a rank sweep trained in one pass: the arms' copies of a batch
stacked along the rows).

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

The kernels, their launchers and the tiling (one tile map of (arm, first local
row) per row-block size, so no tile mixes two arms' rows; nothing copied or
padded) are in ``multi_lora_kernels.py``, with the split path of the big GEMMs;
the torch path is ``lora_torch.py`` (shared with the single-arm op, its one-arm
case); this file holds the custom ops, the autograd Functions and the public
entry points.

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

Backends (the convention of ``rankwise.kernels``): ``"torch"``
(``lora_torch.multi_lora_linear_torch``) runs one base matmul over all rows plus
a loop over the arms (each scaling applied to the arm's small factors, the
low-rank terms added in place), its backward the formulas above written out
(one graph node per layer), correct for any input and device;
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

import math
from typing import Optional, Sequence

import torch

from .lora_torch import check_weight_and_path, lora_call, multi_lora_linear_torch
from .lowrank import ARM_TABLE, KernelSet, OpLayout, draw_seed, lora_function, traced_kernels, validate_lora_args
from .multi_lora_kernels import (
    MultiPlan,
    multi_lora_da,
    multi_lora_down,
    multi_lora_ds_db,
    multi_lora_dx_gemm,
    multi_lora_fwd_gemm,
    multi_plan,
)

__all__ = ["multi_lora_linear", "multi_lora_linear_arms", "MultiLoRALinearFunction", "MultiNF4LoRALinearFunction"]


# ----------------------------------------------------------------------------
# Autograd: the forward ops ``rankwise::multi_lora_linear`` (dense W) and
# ``rankwise::multi_nf4_lora_linear`` with the backward ops
# ``rankwise::multi_lora_ds_db``, ``rankwise::multi_lora_dx``,
# ``rankwise::multi_nf4_lora_dx`` and ``rankwise::multi_lora_da``, each with a
# fake function giving its output shapes, wired by ``lowrank.lora_function`` as
# the single-arm ops are (custom op for torch.compile, autograd.Function twin for
# eager calls, one setup_context and backward for the family). The arms enter
# every op as five lists (ranks, scalings, rows, dropout_ps, seeds); each op
# builds its launch plan from them (``multi_plan``, its device tables memoised).
# An NF4 weight enters as the six tensors of ``nf4_kernel_args`` and four constants.
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
    return multi_lora_fwd_gemm(x2, weight, S, lora_B, bias, plan, scalings, path), S


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
    return multi_lora_fwd_gemm(x2, nf4, S, lora_B, bias, plan, scalings, path), S


def _multi_ds_db(dY: torch.Tensor, S: torch.Tensor, lora_B: torch.Tensor, ranks: list[int], scalings: list[float],
                 rows: list[int], dropout_ps: list[float], seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dS, dB)`` of kernel 3; reads torch's deterministic flag when it runs."""
    return multi_lora_ds_db(dY, S, lora_B, _plan(dY, ranks, scalings, rows, dropout_ps, seeds, False))


def _multi_dx_dense(dY: torch.Tensor, weight: torch.Tensor, dS: torch.Tensor, lora_A: torch.Tensor,
                    ranks: list[int], scalings: list[float], rows: list[int], dropout_ps: list[float],
                    seeds: list[int], path: str = "auto") -> torch.Tensor:
    """dX of kernel 4 (or of the split path, per ``path``) on a dense W, the masks regenerated
    from the seeds."""
    return multi_lora_dx_gemm(dY, weight, dS, lora_A, _plan(dY, ranks, scalings, rows, dropout_ps, seeds, False),
                    dropout_ps, seeds, path)


def _multi_dx_nf4(dY: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor,
                  nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset: torch.Tensor,
                  blocksize: int, double_quant: bool, nested_blocksize: int, wdtype: torch.dtype,
                  dS: torch.Tensor, lora_A: torch.Tensor, ranks: list[int], scalings: list[float], rows: list[int],
                  dropout_ps: list[float], seeds: list[int], path: str = "auto") -> torch.Tensor:
    """dX of kernel 4 on an NF4 W (tiles dequantized in registers), or of the split path."""
    nf4 = ((packed, absmax, quant_map, nested_absmax, nested_map, offset),
           (blocksize, double_quant, nested_blocksize, wdtype))
    return multi_lora_dx_gemm(dY, nf4, dS, lora_A, _plan(dY, ranks, scalings, rows, dropout_ps, seeds, True),
                    dropout_ps, seeds, path)


def _multi_da(dS: torch.Tensor, x2: torch.Tensor, ranks: list[int], scalings: list[float], rows: list[int],
              dropout_ps: list[float], seeds: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    """dA of kernel 5 in ``out_dtype``, the masks regenerated from the seeds."""
    return multi_lora_da(dS, x2, _plan(x2, ranks, scalings, rows, dropout_ps, seeds, False), out_dtype)


_ds_db_op = torch.library.custom_op("rankwise::multi_lora_ds_db", _multi_ds_db, mutates_args=())
_dx_op = torch.library.custom_op("rankwise::multi_lora_dx", _multi_dx_dense, mutates_args=())
_nf4_dx_op = torch.library.custom_op("rankwise::multi_nf4_lora_dx", _multi_dx_nf4, mutates_args=())
_da_op = torch.library.custom_op("rankwise::multi_lora_da", _multi_da, mutates_args=())


def _fwd_fake(x2, weight, lora_A, lora_B, bias, ranks, scalings, rows, dropout_ps, seeds, path="auto"):
    return x2.new_empty((x2.shape[0], weight.shape[0])), x2.new_empty((_s_numel(ranks, rows),))


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


MultiLoRALinearFunction = lora_function(
    "multi_lora_linear", _multi_lora_fwd, _fwd_fake, OpLayout(nf4=False, **ARM_TABLE),
    KernelSet(_multi_ds_db, _multi_dx_dense, _multi_da),
    traced_kernels("multi_lora_ds_db", "multi_lora_dx", "multi_lora_da"),
    "MultiLoRALinearFunction", """The eager twin of ``rankwise::multi_lora_linear`` (dense W): same arguments,
    outputs and autograd formula, functions called directly.""")
MultiNF4LoRALinearFunction = lora_function(
    "multi_nf4_lora_linear", _multi_nf4_lora_fwd, _nf4_fwd_fake, OpLayout(nf4=True, **ARM_TABLE),
    KernelSet(_multi_ds_db, _multi_dx_nf4, _multi_da),
    traced_kernels("multi_lora_ds_db", "multi_nf4_lora_dx", "multi_lora_da"),
    "MultiNF4LoRALinearFunction", """The eager twin of ``rankwise::multi_nf4_lora_linear``.""")


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
    is_nf4 = check_weight_and_path(weight, path)
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
    ``rankwise.arm_layers.MultiLoRALinear`` calls this with its arms' Parameters.
    """
    is_nf4 = check_weight_and_path(weight, path)
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


def _run(x, weight, is_nf4, lora_A, lora_B, ranks, scalings, rows, bias, dropout_ps, seeds, backend, path="auto"):
    """The validated op: ``lora_A`` / ``lora_B`` concatenated, or lists of the arms' own tensors."""
    arms = (list(ranks), list(scalings), list(rows), list(dropout_ps), list(seeds))
    triton_op = ((MultiNF4LoRALinearFunction, torch.ops.rankwise.multi_nf4_lora_linear) if is_nf4 else
                 (MultiLoRALinearFunction, torch.ops.rankwise.multi_lora_linear))
    return lora_call(x, weight, lora_A, lora_B, bias, arms, backend, path, triton_op,
                     lambda x2, W, A, B, b: multi_lora_linear_torch(x2, W, A, B, ranks, scalings, rows, b, dropout_ps,
                                                                    seeds))
