"""Restoration: reset a chosen fraction of the fine-tuning updates to their base values.

:func:`plan_restore` checks the arguments and the two state dicts' names,
shapes and dtypes (from metadata only, so a checkpoint need not be loaded) and
returns a :class:`RestorePlan`; the plan finds the threshold (:meth:`RestorePlan.select`),
then restores one tensor at a time (:meth:`RestorePlan.restore_tensor`) in sorted-name
order and keeps the statistics. :func:`restore` runs a plan on in-memory state
dicts; ``rankwise restore`` (:mod:`rankwise.restore`) runs the same plan streaming
from safetensors checkpoints, so the two agree bit for bit.
"""
from __future__ import annotations

import enum
import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .. import _C
from .bits import FLOAT_DTYPES, unpack_mask
from .keys import UPDATE_SCORES, Score, Select, name_stream, parse_choice
from .selection import NO_THRESHOLD, ExtensionBackend, backend_for, check_fraction, device_type, select_count, select_threshold

# {name: (shape, dtype)}: what a plan needs to know of a state dict.
Meta = Mapping[str, Tuple[Sequence[int], torch.dtype]]
# (name, flat base, flat tuned) of each in-scope tensor in sorted-name order; called once per read.
Pairs = Callable[[], Iterable[Tuple[str, torch.Tensor, torch.Tensor]]]


class Scope(enum.Enum):
    """Over which elements the ``floor(n * fraction)`` are chosen."""

    GLOBAL = "global"  # all in-scope elements at once
    PER_TENSOR = "per_tensor"  # each tensor on its own

    @property
    def label(self) -> str:
        return self.value


def in_scope(name: str, include: Optional[str] = r"layers", exclude: Optional[str] = r"norm") -> bool:
    """Whether a parameter takes part in the restoration: ``re.search(include)`` and not ``re.search(exclude)``."""
    if include and not re.search(include, name):
        return False
    return not (exclude and re.search(exclude, name))


def _listing(names: List[str]) -> str:
    return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")


def _compare_meta(base: Meta, tuned: Meta) -> None:
    """Raise ValueError listing names missing on either side and shape/dtype mismatches."""
    problems = []
    only_base = sorted(set(base) - set(tuned))
    only_tuned = sorted(set(tuned) - set(base))
    if only_base:
        problems.append(f"missing in tuned: {_listing(only_base)}")
    if only_tuned:
        problems.append(f"missing in base: {_listing(only_tuned)}")
    bad = [
        f"{name} (base {tuple(base[name][0])} {base[name][1]}, tuned {tuple(tuned[name][0])} {tuned[name][1]})"
        for name in sorted(set(base) & set(tuned))
        if tuple(base[name][0]) != tuple(tuned[name][0]) or base[name][1] != tuned[name][1]
    ]
    if bad:
        problems.append(f"shape/dtype mismatch: {'; '.join(bad[:20])}{' ...' if len(bad) > 20 else ''}")
    if problems:
        raise ValueError("base and tuned do not match: " + " | ".join(problems))


def _scope_names(meta: Meta, include, exclude) -> List[str]:
    names = sorted(n for n in meta if in_scope(n, include, exclude))
    if not names:
        raise ValueError(f"no parameter matches include={include!r} exclude={exclude!r}")
    for n in names:
        dtype = meta[n][1]
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"parameter {n} is {dtype}; restore needs floating-point tensors (fp32, fp16 or bf16)")
    return names


class RestorePlan:
    """The selection of one restoration and its running state; made by :func:`plan_restore`.

    Use: ``plan.select(pairs)`` once (it finds the global threshold; a no-op per
    tensor), then ``plan.restore_tensor(name, base, tuned)`` for every name of
    ``plan.names`` in that (sorted) order, then ``plan.stats()``. The order is the
    tie order: among elements whose key equals the threshold, earlier names and
    lower flat indices are restored first.

    Attributes:
        names: the in-scope names, sorted.
        n, k: in-scope elements, and how many are restored.
        score, select_mode, scope: the parsed choices (:class:`Score`, :class:`Select`, :class:`Scope`).
        scale: the factor of the kept deltas (``1 / (1 - fraction)`` with rescale, else 1).
    """

    def __init__(self, names: List[str], numels: Dict[str, int], fraction, score: Score, select: Select,
                 scope: Scope, seed: int, rescale: bool, device="cpu"):
        self.names, self.numels = list(names), dict(numels)
        check_fraction(fraction)
        self.fraction = float(fraction)
        self.score, self.select_mode, self.scope, self.seed = score, select, scope, seed
        self.backend = backend_for(device)
        self.n = sum(self.numels.values())
        if scope is Scope.GLOBAL:
            self.k = select_count(self.n, fraction)
        else:
            self.k = sum(select_count(self.numels[m], fraction) for m in self.names)
        self.scale = 1.0 / (1.0 - self.fraction) if rescale and self.fraction < 1.0 else 1.0
        self.threshold, self.ties = NO_THRESHOLD, 0
        self.tensors: Dict[str, dict] = {}
        self.chosen_sum = 0.0
        self.total_sum = 0.0
        self._next = 0  # index into names of the next tensor to mask

    def select(self, pairs: Pairs, in_memory: bool = False) -> None:
        """Find the global threshold over ``pairs()`` (nothing to do per tensor).

        In memory on CPU the extension's sampled select is used (usually one read
        of every pair); otherwise the two-level radix select, which calls
        ``pairs()`` twice and holds one pair at a time.
        """
        if self.scope is not Scope.GLOBAL:
            return
        self.threshold, self.ties = select_threshold(
            lambda: ((b, t, name_stream(m)) for m, b, t in pairs()),
            self.k, self.score, self.select_mode, self.seed, self.backend, in_memory=in_memory,
        )

    def mask(self, name: str, base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        """The packed mask of the elements of ``name`` to restore; records its statistics."""
        if self._next >= len(self.names) or name != self.names[self._next]:
            want = self.names[self._next] if self._next < len(self.names) else "nothing (all done)"
            raise ValueError(f"tensors must be restored in sorted-name order: got {name!r}, expected {want!r}")
        self._next += 1
        base, tuned = base.reshape(-1).contiguous(), tuned.reshape(-1).contiguous()
        stream = name_stream(name)
        if self.scope is Scope.GLOBAL:
            threshold, quota = self.threshold, self.ties
        else:
            threshold, quota = select_threshold(
                lambda: [(base, tuned, stream)], select_count(tuned.numel(), self.fraction),
                self.score, self.select_mode, self.seed, self.backend)
        packed, count, taken, chosen_sum, total_sum = self.backend.build(
            base, tuned, self.score, self.select_mode, self.seed, stream, threshold, quota)
        if self.scope is Scope.GLOBAL:
            self.ties -= taken
        self.chosen_sum += chosen_sum
        self.total_sum += total_sum
        self.tensors[name] = {
            "numel": tuned.numel(),
            "restored": count,
            "ratio": count / tuned.numel() if tuned.numel() else 0.0,
            "score_sum": total_sum,
            "restored_score_sum": chosen_sum,
        }
        return packed

    def apply(self, base: torch.Tensor, tuned: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """A copy of ``tuned`` with the masked elements set to ``base`` (and the kept deltas scaled)."""
        out = tuned.detach().clone().contiguous()
        if self.backend is ExtensionBackend:
            _C.restore_(out.view(-1), base.detach().reshape(-1).contiguous(), packed, self.scale)
            return out
        chosen = unpack_mask(packed, out.shape)
        b = base.reshape(out.shape).to(out.dtype)
        if self.scale != 1.0:
            out = (b.float() + (out.float() - b.float()) * self.scale).to(out.dtype)
        return torch.where(chosen, b, out)

    def restore_tensor(self, name: str, base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
        """:meth:`mask` then :meth:`apply`: the restored tensor, shaped like ``tuned``."""
        packed = self.mask(name, base, tuned)
        return self.apply(base, tuned, packed).view(tuned.shape)

    def stats(self) -> dict:
        """``n``, ``k``, ``restored``, score sums and share, the choices, and per-tensor ``tensors[name]``."""
        return {
            "fraction": self.fraction,
            "score": self.score.label,
            "select": self.select_mode.label,
            "scope": self.scope.label,
            "seed": self.seed,
            "rescale": self.scale,
            "n": self.n,
            "k": self.k,
            "restored": sum(v["restored"] for v in self.tensors.values()),
            "score_sum": self.total_sum,
            "restored_score_sum": self.chosen_sum,
            "score_share": self.chosen_sum / self.total_sum if self.total_sum > 0 else 0.0,
            "tensors": self.tensors,
        }


def plan_restore(
    base: Meta,
    tuned: Meta,
    fraction: float,
    score="relative",
    select="top",
    scope="global",
    include: Optional[str] = r"layers",
    exclude: Optional[str] = r"norm",
    seed: int = 0,
    rescale: bool = False,
    device="cpu",
) -> RestorePlan:
    """Check a restoration's arguments and state dicts; return its :class:`RestorePlan`.

    Args:
        base, tuned: ``{name: (shape, dtype)}`` of the two state dicts (metadata
            only: a checkpoint need not be loaded); the same names, shapes and dtypes.
        fraction, score, select, scope, include, exclude, seed, rescale: as :func:`restore`
            (``score``, ``select`` and ``scope`` as strings or :class:`Score`,
            :class:`Select`, :class:`Scope` members).
        device: where the tensors will be; it picks the backend (CPU: ``rankwise._C``;
            otherwise torch ops, which also run on CPU tensors as a cross-check).
    Raises:
        ValueError (bad fraction or choice, mismatched dicts, nothing in scope),
        TypeError (wrong argument types, non-float tensors in scope).
    """
    check_fraction(fraction)
    score = parse_choice(Score, score, "score", UPDATE_SCORES)
    select = parse_choice(Select, select, "select")
    if isinstance(scope, str) and scope in {s.value for s in Scope}:
        scope = Scope(scope)
    if not isinstance(scope, Scope):
        raise ValueError(f"scope must be one of {sorted(s.value for s in Scope)}, got {scope!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    _compare_meta(base, tuned)
    names = _scope_names(tuned, include, exclude)
    numels = {n: int(torch.Size(tuned[n][0]).numel()) for n in names}
    return RestorePlan(names, numels, fraction, score, select, scope, seed, rescale, device)


def restore(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    fraction: float,
    score: str = "relative",
    select: str = "top",
    scope: str = "global",
    include: Optional[str] = r"layers",
    exclude: Optional[str] = r"norm",
    seed: int = 0,
    rescale: bool = False,
) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Reset a chosen ``fraction`` of the fine-tuning updates to their base values.

    The parameters in scope are those whose name matches ``include`` and not
    ``exclude`` (regular expressions, ``re.search``; the defaults keep the decoder
    layers' weights without the norms). Each element gets a score (``relative``:
    ``|tuned - base| / (|base| + 1e-8)`` in fp32, or ``abs``); ``select`` chooses
    the ``floor(n * fraction)`` elements with the largest (``top``) or smallest
    (``bottom``) score, or a seeded uniformly random subset (``random``), over all
    in-scope elements at once (``scope="global"``) or per tensor
    (``"per_tensor"``); the chosen elements take their base values. With the
    defaults this is the parameter-level restoration of Ye et al. (one global
    top-k of the relative change), except that ties at the threshold are broken
    deterministically (earlier name in sorted order, then lower index) and the
    score is computed in fp32 even for bf16 weights.

    Args:
        base, tuned: ``{name: tensor}`` with the same names, shapes and dtypes.
        fraction: in [0, 1].
        seed: seed of ``select="random"``.
        rescale: multiply the kept (not restored) deltas of in-scope tensors by
            ``1 / (1 - fraction)`` (DARE-style drop-and-rescale).
    Returns:
        ``(restored, stats)``: ``restored`` has every name of ``tuned`` (tensors out
        of scope are the tuned tensors themselves, not copies); ``stats`` has
        ``n``, ``k``, ``restored``, ``score_share`` (the share of the total score
        held by the restored elements) and per-tensor ``tensors[name]`` with
        ``numel``, ``restored``, ``ratio``, ``score_sum``, ``restored_score_sum``.
    """
    if not isinstance(base, Mapping) or not isinstance(tuned, Mapping):
        raise TypeError("base and tuned must be mappings {name: tensor}")
    meta_b = {n: (tuple(t.shape), t.dtype) for n, t in base.items()}
    meta_t = {n: (tuple(t.shape), t.dtype) for n, t in tuned.items()}
    device = device_type(t for n, t in tuned.items() if in_scope(n, include, exclude))
    plan = plan_restore(meta_b, meta_t, fraction, score, select, scope, include, exclude, seed, rescale, device)

    def pairs():
        for n in plan.names:
            yield n, base[n].detach().reshape(-1).contiguous(), tuned[n].detach().reshape(-1).contiguous()

    plan.select(pairs, in_memory=True)
    out = dict(tuned)
    for n, b, _ in pairs():
        out[n] = plan.restore_tensor(n, b, tuned[n])
    return out, plan.stats()
