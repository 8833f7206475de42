"""Per-element scores and the 32-bit selection keys built from them.

Every selection in this package picks the ``k`` largest keys; a key is a
``uint32`` (held in int64) that orders like what is being selected:

* :class:`Score` says what an element's score is, computed in fp32 whatever the
  storage dtype: ``VALUE`` the tuned value itself, ``ABS`` ``|tuned - base|``,
  ``RELATIVE`` ``|tuned - base| / (|base| + 1e-8)``.
* :class:`Select` says how a score becomes a key: ``TOP`` the order-preserving
  bits of the score (NaN largest, -0 equal to +0), ``BOTTOM`` their complement
  (so the smallest scores have the largest keys), ``RANDOM`` the upper 32 bits of
  ``splitmix64(salt + index)`` with a per-tensor salt of the seed and the tensor's
  stream id, independent of the score.

The enum values are the ``kind`` and ``mode`` codes of ``rankwise._C`` (which has
the same enums in ``csrc/masking.h``). The functions here are the torch twins of
the extension's CPU code, used for CUDA tensors and checked bit for bit against it.
"""
from __future__ import annotations

import enum
import math
import zlib
from typing import Iterable, Optional, Type, TypeVar

import torch

from .. import _C
from .bits import check_float

_U32 = 0xFFFFFFFF

E = TypeVar("E", bound=enum.Enum)


def parse_choice(cls: Type[E], value, arg: str, allowed: Optional[Iterable[E]] = None) -> E:
    """``value`` (a member of ``cls`` or its lower-case name) as a member; ValueError naming ``arg`` otherwise."""
    allowed = list(cls) if allowed is None else list(allowed)
    labels = sorted(m.name.lower() for m in allowed)
    if isinstance(value, cls) and value in allowed:
        return value
    if isinstance(value, str) and value in labels:
        return cls[value.upper()]
    raise ValueError(f"{arg} must be one of {labels}, got {value!r}")


class Score(enum.IntEnum):
    """What an element's score is (fp32 math). Values are ``rankwise._C``'s ``kind`` codes."""

    VALUE = 0  # the tuned value itself (topk_mask)
    ABS = 1  # |tuned - base|
    RELATIVE = 2  # |tuned - base| / (|base| + 1e-8)

    @property
    def label(self) -> str:
        return self.name.lower()


class Select(enum.IntEnum):
    """Which elements a selection takes. Values are ``rankwise._C``'s ``mode`` codes."""

    TOP = 0  # the largest scores
    BOTTOM = 1  # the smallest scores
    RANDOM = 2  # a seeded uniformly random subset

    @property
    def label(self) -> str:
        return self.name.lower()


UPDATE_SCORES = (Score.ABS, Score.RELATIVE)  # the scores of an update (base -> tuned)


# --------------------------------------------------------------------------- splitmix64

_GOLDEN = 0x9E3779B97F4A7C15


def _s64(x: int) -> int:
    """The int64 holding the bit pattern of ``x mod 2**64``."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding uint64 bit patterns."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 step (Steele, Lea and Flood 2014; Vigna's reference code), element-wise.

    ``z`` is an int64 tensor holding uint64 bit patterns; the result likewise
    (int64 arithmetic wraps like uint64). ``splitmix64(0)`` is
    ``0xE220A8397B1DCDAF``, the first output of the generator seeded with 0.

    This is the package's one splitmix64. Its device twins are ``mix64`` in
    ``csrc/masking.cpp`` (the CPU extension's key loops, bound as
    ``rankwise._C.splitmix64``); ``tests/test_masking.py`` checks that they agree
    bit for bit.
    """
    z = z + _s64(_GOLDEN)
    z = (z ^ _srl(z, 30)) * _s64(0xBF58476D1CE4E5B9)
    z = (z ^ _srl(z, 27)) * _s64(0x94D049BB133111EB)
    return z ^ _srl(z, 31)


def stream_salt(seed: int, stream: int) -> int:
    """Salt of one tensor's random keys: ``splitmix64(seed ^ splitmix64(stream))`` as an int64."""
    mixed = splitmix64(torch.tensor(_s64(stream), dtype=torch.int64))
    return int(splitmix64(mixed ^ _s64(seed)))


def name_stream(name: str) -> int:
    """Stream id of a tensor's random keys: CRC-32 of its name (order-independent)."""
    return zlib.crc32(name.encode("utf-8"))


def random_keys(n: int, seed: int, stream: int, device) -> torch.Tensor:
    """The ``n`` random keys of one tensor: ``hi32(splitmix64(salt + i))``, int64."""
    z = torch.arange(n, dtype=torch.int64, device=device) + stream_salt(seed, stream)
    return _srl(splitmix64(z), 32)


def random_score(shape, seed: int = 0, stream: int = 0, device="cpu") -> torch.Tensor:
    """Seeded uniform scores in [0, 1) (float64, exactly ``key / 2**32``) of the random selection.

    Element ``i`` of stream ``stream`` gets the upper 32 bits of
    ``splitmix64(splitmix64(seed ^ splitmix64(stream)) + i)``.
    """
    shape = (int(shape),) if isinstance(shape, int) else tuple(shape)
    keys = random_keys(math.prod(shape), seed, stream, torch.device(device))
    return (keys.double() / 2.0**32).view(shape)


# --------------------------------------------------------------------------- scores and keys


def compute_score(base: torch.Tensor, tuned: torch.Tensor, score="relative") -> torch.Tensor:
    """The fp32 per-element score of an update, ``"abs"`` or ``"relative"`` (see :class:`Score`)."""
    kind = parse_choice(Score, score, "score", UPDATE_SCORES)
    check_float(base, "base")
    check_float(tuned, "tuned")
    if base.shape != tuned.shape or base.dtype != tuned.dtype:
        raise ValueError(f"base and tuned must match, got {tuple(base.shape)} {base.dtype} and {tuple(tuned.shape)} {tuned.dtype}")
    if tuned.device.type == "cpu":
        return _C.compute_score(base.contiguous(), tuned.contiguous(), int(kind))
    return score_torch(base, tuned, kind)


def score_torch(base: torch.Tensor, tuned: torch.Tensor, score: Score) -> torch.Tensor:
    """:func:`compute_score` (any :class:`Score`) in torch ops: fp32, the shape of ``tuned``."""
    t = tuned.float()
    if score == Score.VALUE:
        return t
    b = base.float()
    d = (t - b).abs()
    return d if score == Score.ABS else d / (b.abs() + 1e-8)


def float_keys(s: torch.Tensor) -> torch.Tensor:
    """Order-preserving uint32 keys (int64) of fp32 values: NaN largest, -0 equal to +0."""
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0 -> +0
    bits = s.view(torch.int32).to(torch.int64) & _U32
    keys = torch.where(bits >= 0x80000000, _U32 - bits, bits | 0x80000000)
    return torch.where(torch.isnan(s), torch.full_like(keys, _U32), keys)


def keys_torch(base: torch.Tensor, tuned: torch.Tensor, score: Score, select: Select, seed: int, stream: int) -> torch.Tensor:
    """The flat selection keys of one tensor pair in torch ops; ``rankwise._C.compute_keys`` on CPU."""
    if select == Select.RANDOM:
        return random_keys(tuned.numel(), seed, stream, tuned.device)
    keys = float_keys(score_torch(base, tuned, score).reshape(-1))
    return _U32 - keys if select == Select.BOTTOM else keys
