"""MaskedAdamW: AdamW on the elements whose mask bit is set (sparse fine-tuning)."""
from __future__ import annotations

from typing import Mapping

import torch

from .. import _C
from ..kernels.masked_adamw import masked_adamw_step
from .bits import as_packed, check_float


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
            check_float(p, f"params[{i}]")
            self.state[p]["mask"] = as_packed(by_id[id(p)], p.numel(), p.device, f"masks[{i}]")

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
                    masked_adamw_step(*args, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd, step=st["step"])
                if target is not p.data:
                    p.data.copy_(target)
        return loss
