"""A model's shapes without its weights: the model built on the meta device from its config alone.

``meta_model(path)`` gives ``(config, model on the meta device)``; ``targets_of`` the
``{name: (in, out)}`` of the layers ``lora.targets`` selects (LoRA injected into the
meta model, as ``rankwise.lora.inject_lora`` would into the real one).
``check_targets(cfg)`` lets ``rankwise train`` refuse targets that match no layer
before it writes anything or loads a weight; a model whose config cannot be built
on the meta device is left to the real load to report.
"""
from __future__ import annotations

import torch

from .errors import ConfigError
from .lora import inject_lora, lora_layers


def meta_model(path: str):
    """``(model config, model on the meta device)`` of the model at ``path``: shapes only, no weights loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM  # heavy at import: transformers

    try:
        mcfg = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(mcfg)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"cannot read the model config of {path}: {' '.join(str(e).split())[:200]}") from None
    return mcfg, model


def targets_of(meta, targets) -> dict:
    """The LoRA targets' ``{name: (in, out)}`` of a model built on the meta device (LoRA is injected into it)."""
    with torch.random.fork_rng(devices=[]):
        try:
            inject_lora(meta, targets, 1, 1.0)
        except ValueError as e:
            raise ConfigError(f"lora.targets: {' '.join(str(e).split())[:300]}") from None
    return {n: (m.in_features, m.out_features) for n, m in lora_layers(meta)}


def check_targets(model_path: str, targets) -> None:
    """Refuse (one ``ConfigError`` line) LoRA ``targets`` that select no layer of the model at ``model_path``,
    judged on its meta-device model; nothing when that model cannot be built (the real load says why)."""
    try:
        _, meta = meta_model(model_path)
    except Exception:  # noqa: BLE001  a hub id offline, remote code, an unreadable config: the load reports it
        return
    targets_of(meta, targets)
