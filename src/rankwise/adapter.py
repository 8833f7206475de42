"""LoRA adapters on disk, in the PEFT format.

An adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` (shape ``(r, in)``) and
``...lora_B.weight`` (shape ``(out, r)``), e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, so that
``peft.PeftModel.from_pretrained(base, adapter_dir)`` loads it. The layer
computes ``y = x W^T + scaling * (x A^T) B^T`` with ``scaling = alpha / r``
(``alpha / sqrt(r)`` with rsLoRA).

Small free functions: find the LoRA modules of a model, save, load, merge.
"""
from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, atomic_write_text
from .errors import ConfigError, read_json_object, short
from .lora import inject_lora, lora_scaling

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT LoRA options rankwise does not implement; an adapter that sets any of them is refused
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")


def lora_modules(model: torch.nn.Module) -> dict:
    """``{module path: module}`` for every LoRA layer (a module with ``base``, ``lora_A`` and ``lora_B``)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), torch.Tensor) and isinstance(getattr(m, "lora_B", None), torch.Tensor)
            and isinstance(getattr(m, "base", None), torch.nn.Module)}


def adapter_state_dict(model: torch.nn.Module) -> dict:
    """The LoRA tensors of ``model`` under their PEFT names (detached, on the CPU, contiguous)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().to("cpu").contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().to("cpu").contiguous()
    return out




def pissa_to_lora(tensors: dict, initial: dict, r: int, alpha: float, use_rslora: bool = False):
    """Express a PiSSA-trained adapter as a plain LoRA adapter on the *original* base weights.

    PiSSA starts from ``W_res = W - s B0 A0`` and trains ``A, B``, so the tuned weight
    is ``W + s (B A - B0 A0)``: a rank-``2r`` update ``s [B, -B0] [A; A0]``. Returns
    ``(tensors, 2r, alpha')`` with ``alpha'`` chosen to keep the scaling ``s``
    (``2 alpha``, or ``sqrt(2) alpha`` with rsLoRA). ``initial`` maps the PEFT
    tensor names to the values at initialisation.
    """
    out = {}
    for key, t in tensors.items():
        t0 = initial[key]
        out[key] = torch.cat([t, t0], 0) if key.endswith("lora_A.weight") else torch.cat([t, -t0], 1)
    return out, 2 * r, alpha * (math.sqrt(2.0) if use_rslora else 2.0)


def save_adapter(model, out_dir, *, base_model: str, r: int, alpha: float, dropout: float = 0.0,
                 targets=None, use_rslora: bool = False, tensors: dict | None = None) -> str:
    """Write ``model``'s LoRA layers (or the given PEFT-named ``tensors``) to ``out_dir`` in the PEFT format.

    Returns ``out_dir``.
    """
    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA layers (call rankwise.inject_lora first)")
    if targets is None:
        targets = sorted({name.rsplit(".", 1)[-1] for name in mods})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(r),
        "lora_alpha": float(alpha),
        "lora_dropout": float(dropout),
        "target_modules": sorted(targets),
        "use_rslora": bool(use_rslora),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    os.makedirs(out_dir, exist_ok=True)
    tensors = adapter_state_dict(model) if tensors is None else {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(os.path.join(out_dir, WEIGHTS_NAME), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write_text(os.path.join(out_dir, CONFIG_NAME), json.dumps(config, indent=2))
    return out_dir


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_adapter_config(cfg, cfg_path) -> dict:
    """``cfg`` (the JSON of ``cfg_path``) if it is an adapter config rankwise reads, else a ``ConfigError``.

    A JSON object with ``peft_type`` LORA (or none), ``r`` a positive int, ``lora_alpha``
    a finite number >= 0, ``target_modules`` a name pattern or a list of names; the
    optional ``lora_dropout`` in [0, 1), ``use_rslora`` a bool and
    ``base_model_name_or_path`` a string (each may be null); none of ``UNSUPPORTED``.
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{cfg_path}: peft_type must be LORA, got {short(cfg.get('peft_type'))}")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ConfigError(f"{cfg_path}: missing key {key!r}")
    r, alpha, targets = cfg["r"], cfg["lora_alpha"], cfg["target_modules"]
    dropout, rslora, base = cfg.get("lora_dropout"), cfg.get("use_rslora"), cfg.get("base_model_name_or_path")
    names = isinstance(targets, list) and bool(targets) and all(isinstance(t, str) and t for t in targets)
    problems = [  # (key, value, what it must be, whether it is)
        ("r", r, "a positive integer (the rank)", isinstance(r, int) and not isinstance(r, bool) and r >= 1),
        ("lora_alpha", alpha, "a finite number >= 0", _is_number(alpha) and math.isfinite(alpha) and alpha >= 0),
        ("target_modules", targets, "a list of module names (or one pattern string)",
         names or (isinstance(targets, str) and targets != "")),
        ("lora_dropout", dropout, "a number in [0, 1) or null", dropout is None or (_is_number(dropout) and 0 <= dropout < 1)),
        ("use_rslora", rslora, "true, false or null", rslora is None or isinstance(rslora, bool)),
        ("base_model_name_or_path", base, "a model path or hub id (a string) or null", base is None or isinstance(base, str)),
    ]
    for key, value, want, ok in problems:
        if not ok:
            raise ConfigError(f"{cfg_path}: {key} must be {want}, got {short(value)}")
    # What rankwise reads, merges and analyses: one rank and alpha for every module, and
    # ΔW = scaling * B @ A in nn.Linear's layout. Anything else would be silently misread.
    unsupported = [k for k in UNSUPPORTED if cfg.get(k)]
    if unsupported:
        raise ConfigError(f"{cfg_path}: adapters with {', '.join(unsupported)} are not supported "
                          "(rankwise reads one rank and alpha for every module, ΔW = scaling * B @ A)")
    return cfg


def _check_ranks(tensors: dict, r: int, w_path) -> None:
    """Every ``lora_A`` is ``(r, in)`` and every ``lora_B`` ``(out, r)``: else the scaling would be misread."""
    for key, t in tensors.items():
        if key.endswith(".lora_A.weight") and (t.dim() != 2 or t.shape[0] != r):
            raise ConfigError(f"{w_path}: {key} has shape {tuple(t.shape)}, not (r, in) with r = {r} "
                              f"as {CONFIG_NAME} gives")
        if key.endswith(".lora_B.weight") and (t.dim() != 2 or t.shape[1] != r):
            raise ConfigError(f"{w_path}: {key} has shape {tuple(t.shape)}, not (out, r) with r = {r} "
                              f"as {CONFIG_NAME} gives")


def read_adapter(adapter_dir) -> tuple[dict, dict]:
    """``(adapter_config, tensors)`` from a PEFT LoRA adapter directory.

    A config rankwise does not read (see :func:`check_adapter_config`) or tensors whose
    rank is not the config's ``r`` are a ``ConfigError`` (a ``ValueError``) naming the file.
    """
    cfg_path = os.path.join(adapter_dir, CONFIG_NAME)
    w_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    missing = "not a LoRA adapter directory (missing {}): " + str(adapter_dir)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(missing.format(CONFIG_NAME))
    cfg = check_adapter_config(read_json_object(cfg_path), cfg_path)  # named even when the weights are gone too
    if not os.path.isfile(w_path):
        raise FileNotFoundError(missing.format(WEIGHTS_NAME))
    tensors = load_file(w_path)
    _check_ranks(tensors, cfg["r"], w_path)
    return cfg, tensors


def scaling_of(cfg: dict) -> float:
    """The LoRA scaling of an adapter config: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return lora_scaling(cfg["r"], cfg["lora_alpha"], bool(cfg.get("use_rslora")))


def _split_keys(tensors, path):
    pairs = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ConfigError(f"{path}: unexpected tensor {short(key)} (expected {PREFIX}<module>.lora_A/B.weight)")
        body = key[len(PREFIX):]
        name, which = body[: -len(".lora_A.weight")], body[-len("lora_A.weight"):-len(".weight")]
        pairs.setdefault(name, {})[which] = t
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ConfigError(f"{path}: module {short(name)} has {sorted(ab)} but needs both lora_A and lora_B")
    return pairs


def load_adapter(model, adapter_dir, *, inject: bool = True):
    """Load a PEFT LoRA adapter into ``model`` (injecting LoRA layers first when ``inject``); returns ``model``."""
    cfg, tensors = read_adapter(adapter_dir)
    if inject:
        targets = cfg["target_modules"]
        if isinstance(targets, str):
            raise ValueError(f"{adapter_dir}: target_modules as a regex is not supported; give a list of names")
        inject_lora(model, targets, cfg["r"], cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                    use_rslora=cfg.get("use_rslora", False))
    mods = lora_modules(model)
    pairs = _split_keys(tensors, adapter_dir)
    missing = sorted(set(mods) - set(pairs))
    extra = sorted(set(pairs) - set(mods))
    if missing or extra:
        raise ValueError(f"{adapter_dir}: adapter does not match the model's LoRA layers "
                         f"(missing in the adapter: {missing[:3]}, not in the model: {extra[:3]})")
    with torch.no_grad():
        for name, m in mods.items():
            for which in ("lora_A", "lora_B"):
                p, t = getattr(m, which), pairs[name][which]
                if p.shape != t.shape:
                    raise ValueError(f"{adapter_dir}: {name}.{which} has shape {tuple(t.shape)}, "
                                     f"the model expects {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))
    return model


def merge_adapter(model, adapter_dir):
    """Add ``scaling * B @ A`` of a PEFT adapter to the plain ``nn.Linear`` weights of ``model`` (in place).

    The product is formed in fp32 and rounded once to the weight dtype.
    Returns ``model``.
    """
    cfg, tensors = read_adapter(adapter_dir)
    scale = scaling_of(cfg)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, ab in _split_keys(tensors, adapter_dir).items():
            lin = modules.get(name)
            if not isinstance(lin, torch.nn.Linear):
                raise ValueError(f"{adapter_dir}: {name!r} is not an nn.Linear of the base model")
            delta = lora_delta(ab["lora_A"].to(lin.weight.device), ab["lora_B"], scale)
            if delta.shape != lin.weight.shape:
                raise ValueError(f"{adapter_dir}: {name} update has shape {tuple(delta.shape)}, "
                                 f"the weight has {tuple(lin.weight.shape)}")
            lin.weight.copy_((lin.weight.float() + delta).to(lin.weight.dtype))
    return model


def unwrap_lora(model):
    """Replace every LoRA layer by its base ``nn.Linear`` with the update merged in; returns ``model``."""
    for name, m in list(lora_modules(model).items()):
        base = m.base
        with torch.no_grad():
            delta = lora_delta(m.lora_A, m.lora_B, m.scaling)
            base.weight.copy_((base.weight.float() + delta).to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, base)
    return model


def lora_delta_norms(model) -> dict:
    """``{module path: ||scaling * B A||_F}`` for every LoRA layer (computed in fp32)."""
    out = {}
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            out[name] = float(lora_delta(m.lora_A, m.lora_B, m.scaling).norm())
    return out


def lora_pairs(adapter_dir) -> tuple[dict, dict]:
    """``(adapter_config, {module path: (A, B)})`` of a PEFT LoRA adapter directory.

    ``A`` has shape ``(r, in)`` and ``B`` ``(out, r)``, as stored; the module paths
    are those of the base model (``model.layers.0.self_attn.q_proj``).
    """
    cfg, tensors = read_adapter(adapter_dir)
    return cfg, {name: (ab["lora_A"], ab["lora_B"]) for name, ab in _split_keys(tensors, adapter_dir).items()}


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The update ``ΔW = scaling * B @ A`` of one LoRA layer, in fp32 on ``A``'s device.

    Args:
        A: ``(r, in)``; B: ``(out, r)``; scaling: e.g. :func:`scaling_of` of the adapter config.

    Returns:
        ``(out, in)`` fp32 tensor.
    """
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"lora_B {tuple(B.shape)} and lora_A {tuple(A.shape)} do not chain into B @ A")
    return (B.float().to(A.device) @ A.float()).mul_(float(scaling))
