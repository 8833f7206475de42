"""What a run trains: ``setup_trainable`` (LoRA layers injected, every weight, or the mask candidates) returns
the ``Trainable`` the optimizer moves; for masked SFT ``setup_mask`` sets its masks (the checkpoint's when
resuming, else ``choose_mask``: the top fraction of weights by gradient or by a finished full-SFT run's update).

Masked SFT chooses among decoder-layer weights except norms (``mask_candidates``), as the knowledge
study's restoration.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from . import config as C
from .adapter import adapter_state_dict
from .batches import Batches
from .errors import ConfigError
from .lora import inject_lora
from .masking import topk_mask
from .model import load_model
from .runtime import Dist

log = logging.getLogger("rankwise")


@dataclass
class Trainable:
    """What the optimizer moves: named parameters, and for masked SFT the boolean masks over them."""
    named: list
    masks: Optional[list] = None
    pissa_init: Optional[dict] = None  # lora.init pissa: A0, B0 (PEFT names), to save the adapter on the original base

    @property
    def params(self) -> list:
        return [p for _, p in self.named]

    @property
    def numel(self) -> int:
        return sum(p.numel() for _, p in self.named)

    @property
    def n_changing(self) -> int:
        """Weights that may change: the masked count for masked SFT, every trainable weight otherwise."""
        return sum(int(m.sum()) for m in self.masks) if self.masks is not None else self.numel

    def keep_masked_grads(self) -> None:
        """Masked SFT: zero the gradient outside the mask, so only masked weights count for clipping."""
        if self.masks is None:
            return
        for (_, p), m in zip(self.named, self.masks):
            if p.grad is not None:
                p.grad.masked_fill_(~m, 0.0)


def mask_candidates(model) -> dict:
    """Parameters masked SFT may change: those of the decoder layers except norms (as in the knowledge study)."""
    return {n: p for n, p in model.named_parameters() if ".layers." in f".{n}" and "norm" not in n}


def setup_trainable(model, cfg: C.RunConfig) -> Trainable:
    """Set ``requires_grad`` for the method: LoRA layers injected, every weight, or the mask candidates."""
    pissa_init = None
    if cfg.method == "lora":
        lc = cfg.lora
        torch.manual_seed(cfg.train.seed)  # the same A init for every run with this seed
        try:
            inject_lora(model, lc.targets, lc.r, lc.alpha, dropout=lc.dropout, use_rslora=lc.rslora, init=lc.init,
                        backend=cfg.train.backend)
        except ValueError as e:  # e.g. targets that match no layer of this model
            raise ConfigError(f"lora.targets: {' '.join(str(e).split())[:300]}") from None
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # LoRA matrices train in fp32 whatever the base dtype
        if lc.init.startswith("pissa"):  # the base now holds W - s B0 A0; keep A0, B0 for the saved adapter
            pissa_init = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    elif cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:  # masked: only the decoder-layer weights are candidates; the rest stays frozen
        cands = mask_candidates(model)
        if not cands:
            raise ConfigError("method masked: the model has no parameters under '.layers.' to mask")
        for n, p in model.named_parameters():
            p.requires_grad_(n in cands)
    return Trainable([(n, p) for n, p in model.named_parameters() if p.requires_grad], pissa_init=pissa_init)


def score_by_update(run_dir: str, trainable: Trainable) -> list:
    """``|W_run - W_base|`` per trainable weight, ``W_run`` from ``run_dir/model`` (a finished full-SFT run)."""
    src = os.path.join(run_dir, "model")
    if not os.path.isdir(src):
        raise ConfigError(f"mask.from: no model/ directory in {run_dir} (a finished full-SFT run)")
    run = dict(load_model(src, dtype="fp32", attention="sdpa", device="cpu").named_parameters())
    missing = [n for n, _ in trainable.named if n not in run]
    if missing:
        raise ConfigError(f"mask.from: {src} lacks parameters of this model, e.g. {missing[0]!r}")
    return [(run[n].float() - p.detach().float().cpu()).abs() for n, p in trainable.named]


def score_by_grad(loss_fn, trainable: Trainable, batches: Batches, steps: int, grad_accum: int, dist: Dist) -> list:
    """``|grad|`` summed over the first ``steps`` optimizer steps' batches (each step's token-mean loss), no update."""
    params = trainable.params
    scores = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for s in range(max(1, steps)):
        step_batches = [b for _, b in batches.step(s, grad_accum, dist)]
        n_tgt = sum(b["n_targets"] for b in step_batches)
        for b in step_batches:
            (loss_fn(b) / n_tgt).backward()
        for sc, p in zip(scores, params):
            if p.grad is not None:
                sc += p.grad.float().abs()
            p.grad = None
    return scores


def choose_mask(m: C.MaskCfg, trainable: Trainable, loss_fn, batches: Batches, grad_accum: int, dist: Dist) -> list:
    """The boolean masks of masked SFT: the top ``m.fraction`` of the scores over every candidate weight."""
    if m.score == "update":
        scores = score_by_update(m.from_, trainable)
    else:
        scores = score_by_grad(loss_fn, trainable, batches, m.warmup_steps, grad_accum, dist)
    return [mask.to(dist.device) for mask in topk_mask(scores, m.fraction)]


def setup_mask(cfg: C.RunConfig, trainable: Trainable, ckpt, loss_fn, batches: Batches, dist: Dist) -> None:
    """Masked SFT: the checkpoint's masks when resuming, else ``choose_mask``; other methods have none."""
    if cfg.method != "masked":
        return
    if ckpt is not None:
        saved = ckpt["arms"][0].get("mask") or {}  # a solo run is one arm
        for n, p in trainable.named:
            if n not in saved or saved[n].shape != p.shape or saved[n].dtype != torch.bool:
                raise ConfigError(f"--resume: the checkpoint in {cfg.output_dir} has no mask of {p.shape} for {n}")
        trainable.masks = [saved[n].to(dist.device) for n, _ in trainable.named]
    else:
        trainable.masks = choose_mask(cfg.mask, trainable, loss_fn, batches, cfg.train.grad_accum, dist)
    if dist.master:
        log.info("mask (%s): %s of %s candidate weights may change", cfg.mask.score, f"{trainable.n_changing:,}",
                 f"{trainable.numel:,}")

