"""Sparse update masking: bit-packed masks, exact top-k selection across many
tensors, parameter restoration, a masked AdamW optimizer and a sparse codec.

Conventions (the same in the C++ extension ``rankwise._C``, the Triton kernels in
``rankwise.kernels.masked_adamw`` and the pure-torch paths here):

* **Bit order.** A packed mask of ``n`` elements is a flat ``uint8`` tensor of
  ``ceil(n / 8)`` bytes; bit ``j`` (least significant bit first) of byte ``i``
  is element ``8 * i + j`` of the flattened tensor; padding bits are 0.
* **Scores** are computed in fp32 whatever the storage dtype (fp32, fp16, bf16):
  ``abs``: ``|tuned - base|``; ``relative``: ``|tuned - base| / (|base| + 1e-8)``.
* **Selection** of ``k = floor(n * fraction)`` elements is exact, over 32-bit
  keys that order like the scores, with no concatenation: in memory, a sampled
  bracket around the k-th key, one pass collecting the keys inside it and an
  exact selection among them (falling back to the radix select when the bracket
  misses); streaming, a two-level (16 + 16 bit) radix select. ``fraction`` is taken as the decimal it prints as, so 0.2 of 10
  is 2 even though ``10 * 0.2`` is 1.9999... in floating point. NaN counts as
  the largest score and -0 equals +0.
* **Ties** at the threshold are broken by position: the tensor that comes first
  (list order for :func:`topk_mask`; sorted parameter names for :func:`restore`,
  so dict order and checkpoint sharding do not matter), then the lower flat
  index.
* **Random selection** draws a 32-bit key per element from a counter-based
  generator (splitmix64 of the seed, a per-tensor stream id derived from the
  parameter name with CRC-32, and the element index), then takes the ``k``
  largest keys: an exactly-``k`` uniformly random subset that does not depend on
  how the tensors are chunked or sharded. With ``rescale=True`` the kept deltas
  are multiplied by ``1 / (1 - fraction)`` (DARE).

CPU tensors go through ``rankwise._C``; CUDA tensors through the Triton kernels
(mask application, masked AdamW) and torch ops (keys, histograms), with the same
results.
"""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from . import _C

__all__ = [
    "pack_mask",
    "unpack_mask",
    "apply_mask_",
    "mask_count",
    "topk_mask",
    "select_count",
    "compute_score",
    "random_score",
    "restore",
    "in_scope",
    "name_stream",
    "MaskedAdamW",
    "SparseUpdate",
    "sparse_encode",
    "sparse_decode",
]

SCORES = {"value": 0, "abs": 1, "relative": 2}
SELECTS = {"top": 0, "bottom": 1, "random": 2}
SCOPES = ("global", "per_tensor")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NO_THRESHOLD = 1 << 32  # threshold key that chooses nothing
_U32 = 0xFFFFFFFF

Mask = torch.Tensor  # bool (any shape, numel n) or packed uint8 (ceil(n / 8) bytes)


# --------------------------------------------------------------------------- helpers


def _check_fraction(fraction) -> Fraction:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"fraction must be a number in [0, 1], got {type(fraction).__name__}")
    f = float(fraction)
    if not math.isfinite(f) or f < 0.0 or f > 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    return Fraction(repr(f))


def select_count(n: int, fraction: float) -> int:
    """``floor(n * fraction)``, exact on the decimal value of ``fraction``.

    Example: ``select_count(10, 0.2) == 2`` (``int(10 * 0.2)`` would also be 2,
    but ``int(3 * 0.1 * 10)`` style rounding slips are avoided in general).
    """
    return math.floor(n * _check_fraction(fraction))


def _check_choice(value: str, choices, arg: str) -> str:
    if value not in choices:
        raise ValueError(f"{arg} must be one of {sorted(choices)}, got {value!r}")
    return value


def _check_float(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be a floating-point tensor (fp32, fp16 or bf16), got {t.dtype}")


def name_stream(name: str) -> int:
    """Stream id of a tensor's random keys: CRC-32 of its name (order-independent)."""
    return zlib.crc32(name.encode("utf-8"))


def _packed_for(mask: Mask, numel: int, device: torch.device, what: str = "mask") -> torch.Tensor:
    """Accept a bool mask of ``numel`` elements or a packed uint8 mask; return packed, on ``device``."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what} must be a bool or packed uint8 tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        if mask.numel() != numel:
            raise ValueError(f"{what} has {mask.numel()} elements, expected {numel}")
        return pack_mask(mask.to(device))
    if mask.dtype == torch.uint8:
        if mask.numel() != (numel + 7) // 8:
            raise ValueError(f"{what} (packed) has {mask.numel()} bytes, expected ceil({numel} / 8) = {(numel + 7) // 8}")
        return mask.reshape(-1).to(device).contiguous()
    raise TypeError(f"{what} must be bool or packed uint8, got {mask.dtype}")


# --------------------------------------------------------------------------- bit masks

_BIT_WEIGHTS = {}


def _bit_weights(device) -> torch.Tensor:
    key = str(device)
    if key not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[key] = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=device)
    return _BIT_WEIGHTS[key]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool mask (any shape, ``n`` elements) into ``ceil(n / 8)`` uint8 bytes.

    Bit ``j`` (least significant first) of byte ``i`` is element ``8 * i + j`` of
    ``mask.flatten()``; the padding bits of the last byte are 0. 8x smaller than
    a bool tensor.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.device.type == "cpu":
        return _C.pack_mask(mask)
    return _pack_mask_torch(mask)


def _pack_mask_torch(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(-1)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8) * _bit_weights(mask.device)
    return bits.sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Union[int, Sequence[int], torch.Size]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a bool tensor of ``shape`` (or ``numel`` if an int)."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    shape = (int(shape),) if isinstance(shape, int) else tuple(shape)
    numel = math.prod(shape)
    if packed.numel() != (numel + 7) // 8:
        raise ValueError(f"packed has {packed.numel()} bytes, expected ceil({numel} / 8) = {(numel + 7) // 8}")
    if packed.device.type == "cpu":
        return _C.unpack_mask(packed.reshape(-1).contiguous(), numel).view(shape)
    return _unpack_mask_torch(packed, numel).view(shape)


def _unpack_mask_torch(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.reshape(-1, 1) & _bit_weights(packed.device)) != 0
    return bits.reshape(-1)[:numel]


def mask_count(mask: Mask, numel: Optional[int] = None) -> int:
    """Number of selected elements of a bool mask, or of a packed mask of ``numel`` elements."""
    if mask.dtype == torch.bool:
        return int(mask.sum())
    if numel is None:
        raise ValueError("numel is required for a packed mask")
    if mask.device.type == "cpu":
        return int(_C.mask_count(mask.reshape(-1).contiguous(), numel))
    return int(unpack_mask(mask, numel).sum())


def apply_mask_(tensor: torch.Tensor, mask: Mask) -> torch.Tensor:
    """Zero, in place, the elements of ``tensor`` whose mask bit is 0; returns ``tensor``.

    ``mask`` is a bool tensor with ``tensor.numel()`` elements or a packed uint8
    mask (see :func:`pack_mask`). CPU tensors go through ``rankwise._C``, CUDA
    tensors through the Triton kernel ``rankwise.kernels.masked_adamw.apply_mask``.
    """
    _check_float(tensor, "tensor")
    packed = _packed_for(mask, tensor.numel(), tensor.device)
    target = tensor if tensor.is_contiguous() else tensor.contiguous()
    if tensor.device.type == "cpu":
        _C.apply_mask_(target, packed)
    else:
        from .kernels.masked_adamw import apply_mask

        apply_mask(target, packed)
    if target is not tensor:
        tensor.copy_(target)
    return tensor


# --------------------------------------------------------------------------- scores and keys


def compute_score(base: torch.Tensor, tuned: torch.Tensor, score: str = "relative") -> torch.Tensor:
    """The fp32 per-element score of an update: ``abs`` or ``relative`` (see module docstring)."""
    _check_choice(score, ("abs", "relative"), "score")
    _check_float(base, "base")
    _check_float(tuned, "tuned")
    if base.shape != tuned.shape or base.dtype != tuned.dtype:
        raise ValueError(f"base and tuned must match, got {tuple(base.shape)} {base.dtype} and {tuple(tuned.shape)} {tuned.dtype}")
    if tuned.device.type == "cpu":
        return _C.compute_score(base.contiguous(), tuned.contiguous(), SCORES[score])
    return _torch_score(base, tuned, SCORES[score])


def random_score(shape, seed: int = 0, stream: int = 0, device="cpu") -> torch.Tensor:
    """Seeded uniform scores in [0, 1) (float64, exactly ``key / 2**32``) of the random selection.

    Element ``i`` of stream ``stream`` gets the upper 32 bits of
    ``splitmix64(splitmix64(seed ^ splitmix64(stream)) + i)``.
    """
    shape = (int(shape),) if isinstance(shape, int) else tuple(shape)
    keys = _torch_random_keys(math.prod(shape), seed, stream, torch.device(device))
    return (keys.double() / 2.0**32).view(shape)


def _torch_score(base, tuned, kind):
    t = tuned.float()
    if kind == 0:
        return t
    b = base.float()
    d = (t - b).abs()
    return d if kind == 1 else d / (b.abs() + 1e-8)


def _float_keys(s: torch.Tensor) -> torch.Tensor:
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0 -> +0
    bits = s.view(torch.int32).to(torch.int64) & _U32
    keys = torch.where(bits >= 0x80000000, _U32 - bits, bits | 0x80000000)
    return torch.where(torch.isnan(s), torch.full_like(keys, _U32), keys)


def _s64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def _mix64_int(z: int) -> int:
    m = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    return (z >> s) & ((1 << (64 - s)) - 1)


def _torch_random_keys(n: int, seed: int, stream: int, device) -> torch.Tensor:
    m = (1 << 64) - 1
    salt = _mix64_int((seed & m) ^ _mix64_int(stream & m))
    z = torch.arange(n, dtype=torch.int64, device=device) + _s64(salt + 0x9E3779B97F4A7C15)
    z = (z ^ _srl(z, 30)) * _s64(0xBF58476D1CE4E5B9)
    z = (z ^ _srl(z, 27)) * _s64(0x94D049BB133111EB)
    z = z ^ _srl(z, 31)
    return _srl(z, 32)


def _torch_keys(base, tuned, kind, mode, seed, stream):
    if mode == 2:
        return _torch_random_keys(tuned.numel(), seed, stream, tuned.device)
    keys = _float_keys(_torch_score(base, tuned, kind).reshape(-1))
    return _U32 - keys if mode == 1 else keys


# --------------------------------------------------------------------------- selection backends


class _CPUBackend:
    """Selection through rankwise._C (CPU tensors)."""

    @staticmethod
    def histogram(hist, base, tuned, kind, mode, seed, stream, prefix_mask, prefix, shift):
        _C.key_histogram_(hist, base, tuned, kind, mode, seed, stream, prefix_mask, prefix, shift)

    @staticmethod
    def build(base, tuned, kind, mode, seed, stream, threshold, quota, stats=True):
        packed, count, ties, chosen_sum, total_sum = _C.build_mask(
            base, tuned, kind, mode, seed, stream, threshold, quota, stats)
        return packed, int(count), int(ties), float(chosen_sum), float(total_sum)


class _TorchBackend:
    """The same selection in torch ops, for CUDA tensors (and as a CPU cross-check)."""

    @staticmethod
    def histogram(hist, base, tuned, kind, mode, seed, stream, prefix_mask, prefix, shift):
        keys = _torch_keys(base, tuned, kind, mode, seed, stream)
        if prefix_mask:
            keys = keys[(keys & prefix_mask) == prefix]
        digits = (keys >> shift) & 0xFFFF
        hist += torch.bincount(digits, minlength=1 << 16).to(hist.device)

    @staticmethod
    def build(base, tuned, kind, mode, seed, stream, threshold, quota, stats=True):
        keys = _torch_keys(base, tuned, kind, mode, seed, stream)
        score = _torch_score(base, tuned, kind).reshape(-1).double()
        chosen = keys > threshold
        eq = keys == threshold
        if quota >= 0:
            eq = eq & (torch.cumsum(eq.to(torch.int64), 0) <= quota)
        chosen |= eq
        return (
            pack_mask(chosen),
            int(chosen.sum()),
            int(eq.sum()),
            float(score[chosen].sum()),
            float(score.sum()),
        )


def _backend_for(tensors: Iterable[torch.Tensor]):
    devices = {t.device.type for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device type, got {sorted(devices)}")
    return _CPUBackend if devices <= {"cpu"} else _TorchBackend


def _walk(hist: torch.Tensor, k: int) -> Tuple[int, int]:
    digit, rank = _C.histogram_walk(hist.cpu(), k)
    return int(digit), int(rank)


def _select_threshold(pairs_factory, k: int, kind: int, mode: int, seed: int, backend) -> Tuple[int, int]:
    """Two-level radix select of the k largest keys over ``pairs_factory()``,
    an iterable of ``(base, tuned, stream)`` that may load tensors lazily (it is
    iterated twice). Returns (threshold, ties to take)."""
    if k == 0:
        return NO_THRESHOLD, 0
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    for base, tuned, stream in pairs_factory():
        backend.histogram(hist, base, tuned, kind, mode, seed, stream, 0, 0, 16)
    high, k2 = _walk(hist, k)
    hist.zero_()
    for base, tuned, stream in pairs_factory():
        backend.histogram(hist, base, tuned, kind, mode, seed, stream, 0xFFFF0000, high << 16, 0)
    low, rank = _walk(hist, k2)
    return (high << 16) | low, rank


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
        _check_float(t, f"tensors[{i}]")
    n = sum(t.numel() for t in tensors)
    k = select_count(n, fraction)
    mode = 0 if largest else 1
    flat = [t.contiguous() for t in tensors]
    backend = _backend_for(flat)
    if backend is _CPUBackend:
        threshold, ties = _C.select_threshold(flat, flat, k, 0, mode, 0, [0] * len(flat))
    else:
        threshold, ties = _select_threshold(lambda: ((t, t, 0) for t in flat), k, 0, mode, 0, backend)
    masks = []
    for t in flat:
        p, _, taken, _, _ = backend.build(t, t, 0, mode, 0, 0, threshold, ties, stats=False)
        ties -= taken
        masks.append(p if packed else unpack_mask(p, t.shape))
    return masks


# --------------------------------------------------------------------------- restore


def in_scope(name: str, include: Optional[str] = r"layers", exclude: Optional[str] = r"norm") -> bool:
    """Whether a parameter takes part in the restoration: ``re.search(include)`` and not ``re.search(exclude)``."""
    if include and not re.search(include, name):
        return False
    return not (exclude and re.search(exclude, name))


def _compare_tensor_dicts(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], shapes_base, shapes_tuned):
    """Raise ValueError listing names missing on either side and shape/dtype mismatches."""
    problems = []
    only_base = sorted(set(shapes_base) - set(shapes_tuned))
    only_tuned = sorted(set(shapes_tuned) - set(shapes_base))
    if only_base:
        problems.append(f"missing in tuned: {', '.join(only_base[:20])}{' ...' if len(only_base) > 20 else ''}")
    if only_tuned:
        problems.append(f"missing in base: {', '.join(only_tuned[:20])}{' ...' if len(only_tuned) > 20 else ''}")
    bad = [
        f"{name} (base {tuple(shapes_base[name][0])} {shapes_base[name][1]}, tuned {tuple(shapes_tuned[name][0])} {shapes_tuned[name][1]})"
        for name in sorted(set(shapes_base) & set(shapes_tuned))
        if tuple(shapes_base[name][0]) != tuple(shapes_tuned[name][0]) or shapes_base[name][1] != shapes_tuned[name][1]
    ]
    if bad:
        problems.append(f"shape/dtype mismatch: {'; '.join(bad[:20])}{' ...' if len(bad) > 20 else ''}")
    if problems:
        raise ValueError("base and tuned do not match: " + " | ".join(problems))


def _check_restore_args(fraction, score, select, scope, seed):
    _check_fraction(fraction)
    _check_choice(score, ("abs", "relative"), "score")
    _check_choice(select, tuple(SELECTS), "select")
    _check_choice(scope, SCOPES, "scope")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _scope_names(shapes: Mapping[str, tuple], include, exclude) -> List[str]:
    names = sorted(n for n in shapes if in_scope(n, include, exclude))
    if not names:
        raise ValueError(f"no parameter matches include={include!r} exclude={exclude!r}")
    for n in names:
        dtype = shapes[n][1]
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"parameter {n} is {dtype}; restore needs floating-point tensors (fp32, fp16 or bf16)")
    return names


class _Plan:
    """Threshold(s) of a restoration and the running tie cursor, shared by the
    in-memory :func:`restore` and the streaming ``rankwise restore`` CLI."""

    def __init__(self, names, numels, fraction, score, select, scope, seed, rescale):
        self.names, self.numels = names, numels
        self.fraction, self.score, self.select, self.scope, self.seed = fraction, score, select, scope, seed
        self.kind, self.mode = SCORES[score], SELECTS[select]
        self.n = sum(numels.values())
        self.k = select_count(self.n, fraction) if scope == "global" else sum(select_count(numels[m], fraction) for m in names)
        f = float(_check_fraction(fraction))
        self.scale = 1.0 / (1.0 - f) if rescale and f < 1.0 else 1.0
        self.threshold, self.ties = NO_THRESHOLD, 0
        self.tensors: Dict[str, dict] = {}
        self.chosen_sum = 0.0
        self.total_sum = 0.0

    def stream(self, name):
        return name_stream(name)

    def select_global(self, pairs_factory, backend, in_memory=False):
        """pairs_factory yields (name, base, tuned) in sorted-name order (twice).

        In memory on CPU the extension's ``select_threshold`` is used (usually one
        read: a sampled bracket around the threshold); otherwise the two-level
        radix select, which streams every tensor pair twice."""
        if self.scope == "global" and in_memory and backend is _CPUBackend:
            triples = list(pairs_factory())
            self.threshold, self.ties = _C.select_threshold(
                [b for _, b, _ in triples], [t for _, _, t in triples], self.k, self.kind, self.mode, self.seed,
                [self.stream(m) for m, _, _ in triples],
            )
        elif self.scope == "global":
            self.threshold, self.ties = _select_threshold(
                lambda: ((b, t, self.stream(m)) for m, b, t in pairs_factory()), self.k, self.kind, self.mode, self.seed, backend
            )

    def mask(self, name, base, tuned, backend) -> torch.Tensor:
        """Packed mask of one tensor; tensors must be visited in sorted-name order."""
        base, tuned = base.reshape(-1).contiguous(), tuned.reshape(-1).contiguous()
        stream = self.stream(name)
        if self.scope == "global":
            threshold, quota = self.threshold, self.ties
        else:
            k = select_count(tuned.numel(), self.fraction)
            threshold, quota = _select_threshold(lambda: [(base, tuned, stream)], k, self.kind, self.mode, self.seed, backend)
        packed, count, taken, chosen_sum, total_sum = backend.build(base, tuned, self.kind, self.mode, self.seed, stream, threshold, quota)
        if self.scope == "global":
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

    def apply(self, base, tuned, packed) -> torch.Tensor:
        out = tuned.detach().clone().contiguous()
        if out.device.type == "cpu":
            _C.restore_(out.view(-1), base.detach().reshape(-1).contiguous(), packed, self.scale)
        else:
            chosen = unpack_mask(packed, out.shape)
            b = base.to(out.dtype)
            if self.scale != 1.0:
                kept = (b.float() + (out.float() - b.float()) * self.scale).to(out.dtype)
                out = torch.where(chosen, b, kept)
            else:
                out = torch.where(chosen, b, out)
        return out

    def stats(self) -> dict:
        restored = sum(v["restored"] for v in self.tensors.values())
        return {
            "fraction": float(self.fraction),
            "score": self.score,
            "select": self.select,
            "scope": self.scope,
            "seed": self.seed,
            "rescale": self.scale,
            "n": self.n,
            "k": self.k,
            "restored": restored,
            "score_sum": self.total_sum,
            "restored_score_sum": self.chosen_sum,
            "score_share": self.chosen_sum / self.total_sum if self.total_sum > 0 else 0.0,
            "tensors": self.tensors,
        }


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
    _check_restore_args(fraction, score, select, scope, seed)
    if not isinstance(base, Mapping) or not isinstance(tuned, Mapping):
        raise TypeError("base and tuned must be mappings {name: tensor}")
    shapes_b = {n: (tuple(t.shape), t.dtype) for n, t in base.items()}
    shapes_t = {n: (tuple(t.shape), t.dtype) for n, t in tuned.items()}
    _compare_tensor_dicts(base, tuned, shapes_b, shapes_t)
    names = _scope_names(shapes_t, include, exclude)
    backend = _backend_for(tuned[n] for n in names)
    plan = _Plan(names, {n: tuned[n].numel() for n in names}, fraction, score, select, scope, seed, rescale)

    def pairs():
        for n in names:
            yield n, base[n].detach().reshape(-1).contiguous(), tuned[n].detach().reshape(-1).contiguous()

    plan.select_global(pairs, backend, in_memory=True)
    out = dict(tuned)
    for n, b, t in pairs():
        packed = plan.mask(n, b, t, backend)
        out[n] = plan.apply(b, tuned[n], packed).view(tuned[n].shape)
    return out, plan.stats()


# --------------------------------------------------------------------------- masked AdamW


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW that updates only the elements whose mask bit is set (sparse fine-tuning).

    For every parameter ``p`` with mask ``m`` and step ``t``, on the elements with
    ``m = 1``: ``p <- p * (1 - lr * wd)``, ``m1 <- b1 * m1 + (1 - b1) * g``,
    ``m2 <- b2 * m2 + (1 - b2) * g^2``,
    ``p <- p - lr / (1 - b1^t) * m1 / (sqrt(m2) / sqrt(1 - b2^t) + eps)``, exactly
    the order of ``torch.optim.AdamW``; elements with ``m = 0`` are not touched
    (bit-identical, weight decay included). Moments are kept in fp32 whatever the
    parameter dtype; the packed masks live in ``state[p]["mask"]`` and so travel
    with ``state_dict()``.

    Args:
        params: an iterable of tensors or of param-group dicts.
        masks: ``{param or index: mask}``, or a sequence aligned with the flat list of
            params; each mask is bool with the param's numel, or packed uint8
            (:func:`pack_mask`). Every param needs one.
    CPU parameters go through ``rankwise._C``, CUDA ones through
    ``rankwise.kernels.masked_adamw``.
    """

    def __init__(self, params, masks, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        if not 0.0 <= float(lr):
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        flat = [p for g in self.param_groups for p in g["params"]]
        if isinstance(masks, Mapping):
            by_id = {}
            for key, m in masks.items():
                if isinstance(key, int) and not isinstance(key, bool):
                    if not 0 <= key < len(flat):
                        raise ValueError(f"masks index {key} out of range for {len(flat)} params")
                    by_id[id(flat[key])] = m
                elif isinstance(key, torch.Tensor):
                    by_id[id(key)] = m
                else:
                    raise TypeError(f"masks keys must be params or int indices, got {type(key).__name__}")
        else:
            masks = list(masks)
            if len(masks) != len(flat):
                raise ValueError(f"masks has {len(masks)} entries for {len(flat)} params")
            by_id = {id(p): m for p, m in zip(flat, masks)}
        missing = [i for i, p in enumerate(flat) if id(p) not in by_id]
        if missing:
            raise ValueError(f"params at indices {missing[:20]} have no mask (every param needs one)")
        for i, p in enumerate(flat):
            _check_float(p, f"params[{i}]")
            self.state[p]["mask"] = _packed_for(by_id[id(p)], p.numel(), p.device, f"masks[{i}]")

    def load_state_dict(self, state_dict):
        # torch casts every state tensor to the param dtype on load; the moments are
        # fp32 and the masks uint8 by design, so they are put back from the originals.
        keep = {
            k: {n: v for n, v in s.items() if n in ("exp_avg", "exp_avg_sq", "mask")}
            for k, s in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        flat = [p for g in self.param_groups for p in g["params"]]
        for idx, saved in keep.items():
            p = flat[int(idx)]
            for n, v in saved.items():
                dtype = torch.uint8 if n == "mask" else torch.float32
                if n == "mask" and v.dtype != torch.uint8:
                    raise ValueError(f"state_dict mask of param {idx} is {v.dtype}, expected packed uint8")
                self.state[p][n] = v.detach().to(device=p.device, dtype=dtype).clone().contiguous()

    @torch.no_grad()
    def step(self, closure=None):
        """One masked AdamW step; returns ``closure()`` when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            eps, wd = float(group["eps"]), float(group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MaskedAdamW does not support sparse gradients")
                st = self.state[p]
                if "exp_avg" not in st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                st["step"] = int(st["step"]) + 1
                target = p.data if p.data.is_contiguous() else p.data.contiguous()
                grad = p.grad.to(p.dtype).contiguous()
                args = (target, grad, st["exp_avg"], st["exp_avg_sq"], st["mask"].to(p.device))
                if p.device.type == "cpu":
                    _C.masked_adamw_step_(*args, lr, beta1, beta2, eps, wd, st["step"])
                else:
                    from .kernels.masked_adamw import masked_adamw_step

                    masked_adamw_step(*args, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd, step=st["step"])
                if target is not p.data:
                    p.data.copy_(target)
        return loss


# --------------------------------------------------------------------------- sparse codec


@dataclass
class SparseUpdate:
    """The elements of a tensor under a mask: LEB128 varints of the index gaps
    (``index[j] - index[j-1] - 1``, the first relative to -1) plus the values
    themselves in the tensor's dtype (so decoding is bit-exact)."""

    shape: Tuple[int, ...]
    dtype: torch.dtype
    index_bytes: torch.Tensor
    values: torch.Tensor

    def sizes(self) -> dict:
        """Byte sizes: encoded indices, values, total, the dense tensor, and a bit mask."""
        numel = math.prod(self.shape)
        dense = numel * self.values.element_size()
        total = self.index_bytes.numel() + self.values.numel() * self.values.element_size()
        return {
            "count": self.values.numel(),
            "index_bytes": self.index_bytes.numel(),
            "value_bytes": self.values.numel() * self.values.element_size(),
            "total_bytes": total,
            "dense_bytes": dense,
            "bitmask_bytes": (numel + 7) // 8,
            "ratio": total / dense if dense else 0.0,
        }


def sparse_encode(tensor: torch.Tensor, mask: Mask) -> SparseUpdate:
    """Encode the elements of ``tensor`` (typically the fine-tuned weights) where ``mask`` is set."""
    _check_float(tensor, "tensor")
    t = tensor.detach().cpu().reshape(-1).contiguous()
    packed = _packed_for(mask, t.numel(), torch.device("cpu"))
    index_bytes, values = _C.sparse_encode(t, packed)
    return SparseUpdate(tuple(tensor.shape), tensor.dtype, index_bytes, values)


def sparse_decode(update: SparseUpdate, base: torch.Tensor) -> torch.Tensor:
    """A copy of ``base`` with the encoded elements written back (bit-exact)."""
    _check_float(base, "base")
    if tuple(base.shape) != tuple(update.shape) or base.dtype != update.dtype:
        raise ValueError(
            f"base is {tuple(base.shape)} {base.dtype}, the update was encoded from {update.shape} {update.dtype}"
        )
    out = base.detach().cpu().reshape(-1).contiguous().clone()
    _C.sparse_decode_(out, update.index_bytes, update.values)
    return out.view(update.shape).to(base.device)
