"""Sparse update masking: bit-packed masks, exact top-k selection across many
tensors, parameter restoration, a masked AdamW optimizer and a sparse codec.

Modules (each imports only the ones above it):

* :mod:`.bits`: packed masks (pack, unpack, count, apply).
* :mod:`.keys`: the :class:`Score` and :class:`Select` enums, per-element scores,
  splitmix64 and the 32-bit selection keys.
* :mod:`.selection`: exact threshold selection across tensors, :func:`topk_mask`.
* :mod:`.restoration`: :func:`restore` and its public planner
  (:func:`plan_restore` -> :class:`RestorePlan`), shared with ``rankwise restore``.
* :mod:`.optim`: :class:`MaskedAdamW`.
* :mod:`.codec`: :class:`SparseUpdate`, :func:`sparse_encode`, :func:`sparse_decode`.

Conventions (the same in the C++ extension ``rankwise._C``, the Triton kernels in
``rankwise.kernels.masked_adamw`` and the torch paths here):

* **Bit order.** A packed mask of ``n`` elements is a flat ``uint8`` tensor of
  ``ceil(n / 8)`` bytes; bit ``j`` (least significant bit first) of byte ``i``
  is element ``8 * i + j`` of the flattened tensor; padding bits are 0.
* **Scores** are computed in fp32 whatever the storage dtype (fp32, fp16, bf16):
  ``abs``: ``|tuned - base|``; ``relative``: ``|tuned - base| / (|base| + 1e-8)``.
* **Selection** of ``k = floor(n * fraction)`` elements is exact, over 32-bit
  keys that order like the scores, with no concatenation: in memory, a sampled
  bracket around the k-th key, one pass collecting the keys inside it and an
  exact selection among them (falling back to the radix select when the bracket
  misses); streaming, a two-level (16 + 16 bit) radix select. ``fraction`` is
  taken as the decimal it prints as, so 0.2 of 10 is 2 even though ``10 * 0.2``
  is 1.9999... in floating point. NaN counts as the largest score and -0 equals +0.
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
from .bits import FLOAT_DTYPES, Mask, apply_mask_, mask_count, pack_mask, unpack_mask
from .codec import SparseUpdate, sparse_decode, sparse_encode
from .keys import Score, Select, compute_score, name_stream, random_score, splitmix64
from .optim import MaskedAdamW
from .restoration import RestorePlan, Scope, in_scope, plan_restore, restore
from .selection import NO_THRESHOLD, select_count, topk_mask

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
    "Score",
    "Select",
    "Scope",
    "RestorePlan",
    "plan_restore",
    "splitmix64",
]
