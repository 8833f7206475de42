"""Exact selection of the ``k`` largest keys across many tensors, and masks from it.

``k = floor(n * fraction)`` is exact on the decimal ``fraction`` prints as
(:func:`select_count`). The threshold key and the number of ties at it to take
come from :func:`select_threshold`:

* in memory on CPU, ``rankwise._C.select_threshold``: a sampled bracket around
  the k-th key, one pass collecting the keys inside it and an exact selection
  among them (falling back to the radix select when the bracket misses);
* otherwise (streaming, or CUDA tensors) :func:`radix_threshold`: a two-level
  (16 + 16 bit) radix select that reads every tensor pair twice and never
  concatenates them.

A tensor's mask is then every key above the threshold plus the first ties at
it, the tensors visited in order (list order for :func:`topk_mask`, sorted
names for a restoration) and each by flat index. A backend computes histograms
and masks: :class:`ExtensionBackend` (``rankwise._C``, CPU tensors) or
:class:`TorchBackend` (torch ops, CUDA tensors and a CPU cross-check).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Iterable, List, Sequence, Tuple

import torch

from .. import _C
from .bits import check_float, pack_mask, unpack_mask
from .keys import Score, Select, keys_torch, score_torch

NO_THRESHOLD = 1 << 32  # threshold key that chooses nothing

# (base, tuned, stream) of each tensor in tie order; a factory may load lazily and is called once per read.
Triples = Callable[[], Iterable[Tuple[torch.Tensor, torch.Tensor, int]]]


def check_fraction(fraction) -> Fraction:
    """``fraction`` as the exact decimal it prints as; TypeError / ValueError unless a number in [0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"fraction must be a number in [0, 1], got {type(fraction).__name__}")
    f = float(fraction)
    if not math.isfinite(f) or f < 0.0 or f > 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    return Fraction(repr(f))


def select_count(n: int, fraction: float) -> int:
    """``floor(n * fraction)``, exact on the decimal value of ``fraction``.

    Example: ``select_count(100, 0.29) == 29``, where ``int(100 * 0.29)`` is 28
    because ``100 * 0.29`` is 28.999... in floating point.
    """
    return math.floor(n * check_fraction(fraction))


# --------------------------------------------------------------------------- backends


class ExtensionBackend:
    """Histograms and masks through ``rankwise._C`` (CPU tensors)."""

    @staticmethod
    def histogram(hist, base, tuned, score: Score, select: Select, seed, stream, prefix_mask, prefix, shift):
        """Add the 16-bit digit ``(key >> shift) & 0xFFFF`` of every key with ``key & prefix_mask == prefix`` to ``hist``."""
        _C.key_histogram_(hist, base, tuned, int(score), int(select), seed, stream, prefix_mask, prefix, shift)

    @staticmethod
    def build(base, tuned, score: Score, select: Select, seed, stream, threshold, quota, stats=True):
        """``(packed mask, chosen, ties taken, chosen score sum, total score sum)`` of one tensor pair:
        keys above ``threshold`` plus the first ``quota`` ties (all of them when ``quota < 0``)."""
        packed, count, ties, chosen_sum, total_sum = _C.build_mask(
            base, tuned, int(score), int(select), seed, stream, threshold, quota, stats)
        return packed, int(count), int(ties), float(chosen_sum), float(total_sum)


class TorchBackend:
    """The same histograms and masks in torch ops, for CUDA tensors (and as a CPU cross-check)."""

    @staticmethod
    def histogram(hist, base, tuned, score: Score, select: Select, seed, stream, prefix_mask, prefix, shift):
        keys = keys_torch(base, tuned, score, select, seed, stream)
        if prefix_mask:
            keys = keys[(keys & prefix_mask) == prefix]
        digits = (keys >> shift) & 0xFFFF
        hist += torch.bincount(digits, minlength=1 << 16).to(hist.device)

    @staticmethod
    def build(base, tuned, score: Score, select: Select, seed, stream, threshold, quota, stats=True):
        keys = keys_torch(base, tuned, score, select, seed, stream)
        chosen = keys > threshold
        eq = keys == threshold
        if quota >= 0:
            eq = eq & (torch.cumsum(eq.to(torch.int64), 0) <= quota)
        chosen |= eq
        if stats:
            s = score_torch(base, tuned, score).reshape(-1).double()
            chosen_sum, total_sum = float(s[chosen].sum()), float(s.sum())
        else:
            chosen_sum = total_sum = 0.0
        return pack_mask(chosen), int(chosen.sum()), int(eq.sum()), chosen_sum, total_sum


def backend_for(device) -> type:
    """The backend of tensors on ``device`` (a device, a device string or a device type)."""
    return ExtensionBackend if torch.device(device).type == "cpu" else TorchBackend


def device_type(tensors: Iterable[torch.Tensor]) -> str:
    """The one device type of ``tensors`` (``"cpu"`` when empty); ValueError when they are spread over several."""
    types = {t.device.type for t in tensors}
    if len(types) > 1:
        raise ValueError(f"all tensors must be on one device type, got {sorted(types)}")
    return types.pop() if types else "cpu"


# --------------------------------------------------------------------------- thresholds


def _walk(hist: torch.Tensor, k: int) -> Tuple[int, int]:
    digit, rank = _C.histogram_walk(hist.cpu(), k)
    return int(digit), int(rank)


def radix_threshold(triples: Triples, k: int, score: Score, select: Select, seed: int, backend) -> Tuple[int, int]:
    """Two-level radix select of the ``k`` largest keys over ``triples()`` (called twice).

    Returns ``(threshold, ties)``: the chosen elements are every key above
    ``threshold`` and the first ``ties`` keys equal to it, in tie order.
    """
    if k == 0:
        return NO_THRESHOLD, 0
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for base, tuned, stream in triples():
        backend.histogram(hist, base, tuned, score, select, seed, stream, 0, 0, 16)
    high, k2 = _walk(hist, k)
    hist.zero_()
    for base, tuned, stream in triples():
        backend.histogram(hist, base, tuned, score, select, seed, stream, 0xFFFF0000, high << 16, 0)
    low, rank = _walk(hist, k2)
    return (high << 16) | low, rank


def select_threshold(triples: Triples, k: int, score: Score, select: Select, seed: int, backend,
                     in_memory: bool = True) -> Tuple[int, int]:
    """Threshold and ties of the ``k`` largest keys: the extension's sampled select when the
    tensors are in memory on CPU (usually one read), else :func:`radix_threshold`."""
    if k == 0:
        return NO_THRESHOLD, 0
    if in_memory and backend is ExtensionBackend:
        bases, tuneds, streams = zip(*triples())
        threshold, ties = _C.select_threshold(list(bases), list(tuneds), k, int(score), int(select), seed, list(streams))
        return int(threshold), int(ties)
    return radix_threshold(triples, k, score, select, seed, backend)


# --------------------------------------------------------------------------- top-k across tensors


def topk_mask(tensors: Sequence[torch.Tensor], fraction: float, largest: bool = True, packed: bool = False) -> List[torch.Tensor]:
    """Masks of the ``floor(n * fraction)`` largest (or smallest) values across ``tensors``.

    ``n`` is the total number of elements; the selection is global and exact,
    with no concatenation. Ties at the threshold go to the earlier tensor in the
    list, then to the lower flat index. NaN counts as the largest value.

    Args:
        tensors: fp32/fp16/bf16 tensors of any shapes, all on CPU or all on CUDA.
        fraction: in [0, 1].
        largest: choose the largest values (True) or the smallest (False).
        packed: return packed uint8 masks instead of bool masks shaped like the inputs.
    Returns:
        one mask per tensor.
    """
    tensors = list(tensors)
    for i, t in enumerate(tensors):
        check_float(t, f"tensors[{i}]")
    k = select_count(sum(t.numel() for t in tensors), fraction)
    select = Select.TOP if largest else Select.BOTTOM
    flat = [t.contiguous() for t in tensors]
    backend = backend_for(device_type(flat))
    threshold, ties = select_threshold(lambda: ((t, t, 0) for t in flat), k, Score.VALUE, select, 0, backend)
    masks = []
    for t in flat:
        p, _, taken, _, _ = backend.build(t, t, Score.VALUE, select, 0, 0, threshold, ties, stats=False)
        ties -= taken
        masks.append(p if packed else unpack_mask(p, t.shape))
    return masks
