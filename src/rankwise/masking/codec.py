"""The sparse delta codec: the elements of a tensor under a mask, as varint index
gaps plus the raw values, decoded bit-exactly onto a base tensor (CPU, ``rankwise._C``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

from .. import _C
from .bits import Mask, as_packed, check_float


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
    check_float(tensor, "tensor")
    t = tensor.detach().cpu().reshape(-1).contiguous()
    packed = as_packed(mask, t.numel(), torch.device("cpu"))
    index_bytes, values = _C.sparse_encode(t, packed)
    return SparseUpdate(tuple(tensor.shape), tensor.dtype, index_bytes, values)


def sparse_decode(update: SparseUpdate, base: torch.Tensor) -> torch.Tensor:
    """A copy of ``base`` with the encoded elements written back (bit-exact)."""
    check_float(base, "base")
    if tuple(base.shape) != tuple(update.shape) or base.dtype != update.dtype:
        raise ValueError(
            f"base is {tuple(base.shape)} {base.dtype}, the update was encoded from {update.shape} {update.dtype}"
        )
    out = base.detach().cpu().reshape(-1).contiguous().clone()
    _C.sparse_decode_(out, update.index_bytes, update.values)
    return out.view(update.shape).to(base.device)
