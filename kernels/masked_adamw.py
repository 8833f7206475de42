"""Bit-packed mask kernels for CUDA tensors: mask application and a masked AdamW step.

Mask layout (shared with ``rankwise._C``): a flat uint8 tensor of ``ceil(n / 8)``
bytes; bit ``j`` (LSB-first) of byte ``i`` is element ``8 * i + j``.

Masked AdamW, on the elements whose bit is set (others are neither read for the
update nor written), with fp32 moments ``m1``, ``m2`` and step ``t``::

    p  <- p * (1 - lr * wd)
    m1 <- m1 + (1 - b1) * (g - m1)
    m2 <- m2 * b2 + (1 - b2) * g * g
    p  <- p - lr / (1 - b1^t) * m1 / (sqrt(m2) / sqrt(1 - b2^t) + eps)

which is torch.optim.AdamW's order of operations. The arithmetic is fp32 in
registers whatever the parameter dtype; the parameter is stored back in its dtype.
There is no backward: these are optimizer-side in-place updates.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import TRITON_DTYPES

_BLOCK = 1024


@triton.jit
def _mask_bits(mask_ptr, offs, inb):
    byte = tl.load(mask_ptr + (offs >> 3), mask=inb, other=0).to(tl.int32)
    return (byte >> (offs & 7).to(tl.int32)) & 1


@triton.jit
def _apply_mask_kernel(x_ptr, mask_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    bits = _mask_bits(mask_ptr, offs, inb)
    drop = inb & (bits == 0)
    tl.store(x_ptr + offs, tl.zeros([BLOCK], dtype=x_ptr.dtype.element_ty), mask=drop)


@triton.jit
def _masked_adamw_kernel(
    p_ptr, g_ptr, m1_ptr, m2_ptr, mask_ptr, n,
    decay, w1, beta2, w2, step_size, bc2_sqrt, eps,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    sel = inb & (_mask_bits(mask_ptr, offs, inb) == 1)
    p = tl.load(p_ptr + offs, mask=sel, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=sel, other=0.0).to(tl.float32)
    m1 = tl.load(m1_ptr + offs, mask=sel, other=0.0)
    m2 = tl.load(m2_ptr + offs, mask=sel, other=0.0)
    p = p * decay
    m1 = m1 + w1 * (g - m1)
    m2 = m2 * beta2 + w2 * g * g
    p = p - step_size * (m1 / (tl.sqrt(m2) / bc2_sqrt + eps))
    tl.store(m1_ptr + offs, m1, mask=sel)
    tl.store(m2_ptr + offs, m2, mask=sel)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=sel)


def _check_packed(packed: torch.Tensor, n: int, device) -> None:
    if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
        raise ValueError(f"packed mask must be uint8 with ceil({n} / 8) = {(n + 7) // 8} bytes, got {packed.dtype} {packed.numel()}")
    if packed.device != device or not packed.is_contiguous():
        raise ValueError("packed mask must be contiguous and on the tensor's device")


def apply_mask(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the elements of contiguous ``x`` whose bit in ``packed`` is 0."""
    if x.dtype not in TRITON_DTYPES or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous fp32/fp16/bf16 tensor, got {x.dtype}")
    n = x.numel()
    _check_packed(packed, n, x.device)
    if n:
        _apply_mask_kernel[(triton.cdiv(n, _BLOCK),)](x, packed, n, BLOCK=_BLOCK)
    return x


def masked_adamw_step(param, grad, exp_avg, exp_avg_sq, packed, *, lr, beta1, beta2, eps, weight_decay, step):
    """In-place masked AdamW step (see the module docstring) on contiguous tensors.

    ``param``/``grad`` share a dtype (fp32/fp16/bf16); ``exp_avg``/``exp_avg_sq`` are fp32.
    """
    n = param.numel()
    if param.dtype not in TRITON_DTYPES or grad.dtype != param.dtype or grad.numel() != n:
        raise ValueError("param and grad must be fp32/fp16/bf16 tensors of one dtype and numel")
    for name, s in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if s.dtype != torch.float32 or s.numel() != n or not s.is_contiguous():
            raise ValueError(f"{name} must be a contiguous fp32 tensor with param's numel")
    if not (param.is_contiguous() and grad.is_contiguous()):
        raise ValueError("param and grad must be contiguous")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    _check_packed(packed, n, param.device)
    step_size = lr / (1.0 - beta1**step)
    bc2_sqrt = (1.0 - beta2**step) ** 0.5
    if n:
        _masked_adamw_kernel[(triton.cdiv(n, _BLOCK),)](
            param, grad, exp_avg, exp_avg_sq, packed, n,
            1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2, step_size, bc2_sqrt, eps,
            BLOCK=_BLOCK,
        )
    return param


# --------------------------------------------------------------------------- torch references


def unpack_reference(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of ``n`` elements from a packed mask, in plain torch."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    bits = (packed.to(torch.int32).reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:n].bool()


def apply_mask_reference(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Out-of-place reference of :func:`apply_mask`."""
    keep = unpack_reference(packed, x.numel()).view(x.shape)
    return torch.where(keep, x, torch.zeros_like(x))


def masked_adamw_step_reference(param, grad, exp_avg, exp_avg_sq, packed, *, lr, beta1, beta2, eps, weight_decay, step):
    """Out-of-place float64 reference: returns (param, exp_avg, exp_avg_sq) after one step."""
    sel = unpack_reference(packed, param.numel()).view(param.shape)
    p, g = param.double(), grad.double()
    m1, m2 = exp_avg.double(), exp_avg_sq.double()
    p1 = p * (1 - lr * weight_decay)
    m1n = m1 + (1 - beta1) * (g - m1)
    m2n = m2 * beta2 + (1 - beta2) * g * g
    p1 = p1 - lr / (1 - beta1**step) * m1n / (m2n.sqrt() / (1 - beta2**step) ** 0.5 + eps)
    return (
        torch.where(sel, p1.to(param.dtype), param),
        torch.where(sel, m1n.float(), exp_avg),
        torch.where(sel, m2n.float(), exp_avg_sq),
    )
