"""Bit-packed masks: pack, unpack, count, and zero a tensor where the bit is 0.

A packed mask of ``n`` elements is a flat ``uint8`` tensor of ``ceil(n / 8)``
bytes; bit ``j`` (least significant first) of byte ``i`` is element ``8 * i + j``
of the flattened tensor; padding bits are 0 (``numpy.packbits(...,
bitorder="little")``). CPU tensors go through ``rankwise._C``; CUDA tensors
through torch ops (:func:`pack_mask_torch`, :func:`unpack_mask_torch`) and the
Triton kernel ``rankwise.kernels.masked_adamw.apply_mask``.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import torch

from .. import _C
from ..kernels.masked_adamw import apply_mask

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Mask = torch.Tensor  # bool (any shape, numel n) or packed uint8 (ceil(n / 8) bytes)


def check_float(t: torch.Tensor, what: str) -> None:
    """Raise TypeError unless ``t`` is an fp32, fp16 or bf16 tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be a floating-point tensor (fp32, fp16 or bf16), got {t.dtype}")


def as_packed(mask: Mask, numel: int, device: torch.device, what: str = "mask") -> torch.Tensor:
    """A bool mask of ``numel`` elements or a packed uint8 mask, as a contiguous packed mask on ``device``."""
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
    return pack_mask_torch(mask)


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
    return unpack_mask_torch(packed, numel).view(shape)


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
    check_float(tensor, "tensor")
    packed = as_packed(mask, tensor.numel(), tensor.device)
    target = tensor if tensor.is_contiguous() else tensor.contiguous()
    if tensor.device.type == "cpu":
        _C.apply_mask_(target, packed)
    else:
        apply_mask(target, packed)
    if target is not tensor:
        tensor.copy_(target)
    return tensor


# --------------------------------------------------------------------------- torch twins (CUDA tensors)

_BIT_WEIGHTS: Dict[str, torch.Tensor] = {}


def _bit_weights(device) -> torch.Tensor:
    key = str(device)
    if key not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[key] = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=device)
    return _BIT_WEIGHTS[key]


def pack_mask_torch(mask: torch.Tensor) -> torch.Tensor:
    """:func:`pack_mask` in torch ops (the CUDA path); the same bytes as ``rankwise._C``."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8) * _bit_weights(mask.device)
    return bits.sum(dim=1, dtype=torch.uint8)


def unpack_mask_torch(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """:func:`unpack_mask` in torch ops (the CUDA path): a flat bool tensor of ``numel`` elements."""
    bits = (packed.reshape(-1, 1) & _bit_weights(packed.device)) != 0
    return bits.reshape(-1)[:numel]
