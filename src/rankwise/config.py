"""Run configuration: schema, defaults, validation, ``--set`` overrides, YAML I/O.

A config is a plain nested ``dict`` (what ``yaml.safe_load`` returns). It is
parsed and validated once, at the edge (``load_config`` / ``resolve``); the
training code then reads plain values out of it and hands plain arguments to
the modules below it.

Every key, its default and its type are listed in ``SCHEMA`` (dotted names).
Unknown keys are rejected with an error that names them (and suggests the
closest known key); required keys that are missing are named too.

Example (all keys, with their defaults, are in ``examples/lora.yaml``)::

    model: path/or/hub-id
    method: lora
    lora: {r: 16, alpha: 32}
    data: {train: data/train.jsonl, eval: data/eval.jsonl}
    train: {max_steps: 200, lr: 2.0e-4}
    output_dir: runs/example
"""
from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Mapping

REQUIRED = object()  # marker: the key has no default and must be given

from .atomic import atomic_write_text  # noqa: F401  (re-exported: config.atomic_write_text)

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# dotted key -> (default, accepted types, allowed values or None, one-line help)
# ``None`` in the accepted types means the key may be null.
SCHEMA: dict[str, tuple[Any, tuple, tuple | None, str]] = {
    "model": (REQUIRED, (str,), None, "base model: local directory or hub id"),
    "tokenizer": (None, (str, None), None, "tokenizer path or hub id (default: the model's)"),
    "dtype": ("auto", (str,), ("auto", "bf16", "fp16", "fp32"), "dtype of the (frozen) base weights"),
    "quantization": ("none", (str,), ("none", "nf4"), "quantize the frozen base linear weights (lora only)"),
    "double_quant": (False, (bool,), None, "nf4: also quantize the absmax constants"),
    "attention": ("auto", (str,), ("auto", "flash_attention_2", "sdpa", "eager"),
                  "auto = flash_attention_2 if flash_attn imports, else sdpa"),
    "method": ("lora", (str,), ("lora", "full", "masked"), "what is trained"),
    "lora.r": (16, (int,), None, "LoRA rank"),
    "lora.alpha": (32.0, (float,), None, "LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rslora)"),
    "lora.dropout": (0.0, (float,), None, "dropout on the LoRA branch input"),
    "lora.rslora": (False, (bool,), None, "rank-stabilized scaling alpha / sqrt(r)"),
    "lora.targets": (list(DEFAULT_TARGETS), (list,), None, "nn.Linear names (last name component) to adapt, or all-linear (every linear layer but the output head)"),
    "lora.init": ("default", (str,), None, "initialisation of A and B (see rankwise.LoRALinear)"),
    "mask.fraction": (0.1, (float,), None, "method masked: share of the candidate weights that may change"),
    "mask.score": ("grad", (str,), ("grad", "update"),
                   "grad: top |grad| summed over warmup_steps; update: top |W_run - W_base| of mask.from"),
    "mask.warmup_steps": (10, (int,), None, "score grad: optimizer-steps worth of batches to score on"),
    "mask.from": (None, (str, None), None, "score update: a finished full-SFT run directory"),
    "data.train": (REQUIRED, (str,), None, "training set: local json/jsonl/csv/parquet, or hub name[:split]"),
    "data.eval": (None, (str, None), None, "in-domain eval set (same formats)"),
    "data.eval_ood": (None, (str, None), None, "out-of-domain eval set (same formats)"),
    "data.format": ("prompt_completion", (str,), ("prompt_completion", "chat"), "row format"),
    "data.fields.prompt": ("prompt", (str,), None, "prompt_completion: name of the prompt field"),
    "data.fields.completion": ("completion", (str,), None, "prompt_completion: name of the completion field"),
    "data.fields.messages": ("messages", (str,), None, "chat: name of the messages field"),
    "data.fields.answers": ("answers", (str,), None, "eval rows: gold answers (str or list; 'answer' also read)"),
    "data.max_length": (512, (int,), None, "tokens per example (longer ones are truncated)"),
    "data.packing": (False, (bool,), None,
                     "false: batch_size examples per micro-batch; true: fill batch_size*max_length tokens"),
    "data.add_eos": (True, (bool,), None, "prompt_completion: append the EOS token to the completion"),
    "train.max_steps": (200, (int,), None, "optimizer steps (ignored when train.epochs is set)"),
    "train.epochs": (None, (float, None), None, "train this many passes over the data instead of max_steps"),
    "train.batch_size": (8, (int,), None, "examples (or rows of max_length with packing) per micro-batch"),
    "train.grad_accum": (1, (int,), None, "micro-batches per optimizer step"),
    "train.lr": (2.0e-4, (float,), None, "peak learning rate"),
    "train.schedule": ("cosine", (str,), ("cosine", "linear", "constant"), "decay after warmup"),
    "train.warmup": (0.03, (float,), None, "warmup: fraction of the steps if < 1, else a number of steps"),
    "train.min_lr_ratio": (0.0, (float,), None, "final lr as a fraction of the peak"),
    "train.weight_decay": (0.0, (float,), None, "AdamW weight decay (matrices only)"),
    "train.betas": ([0.9, 0.999], (list,), None, "AdamW betas"),
    "train.eps": (1.0e-8, (float,), None, "AdamW eps"),
    "train.max_grad_norm": (1.0, (float, None), None, "clip the global grad norm (null: no clipping)"),
    "train.optimizer": ("adamw", (str,), ("adamw", "adamw8bit"), "adamw: torch (fused on CUDA); adamw8bit: bitsandbytes"),
    "train.seed": (0, (int,), None, "seed for init, dropout and data order"),
    "train.gradient_checkpointing": (False, (bool,), None, "recompute activations in backward"),
    "train.fused_kernels": (False, (bool,), None,
                            "RMSNorm and SwiGLU MLPs through rankwise's fused kernels (each kind checked against "
                            "the module's own forward first)"),
    "train.fused_loss": (True, (bool,), None,
                         "output head + cross entropy in chunks, never the full logits (checked against the "
                         "model's own loss on the first batch; models it does not fit fall back with a warning)"),
    "train.precision": ("auto", (str,), ("auto", "bf16", "fp16", "fp32"),
                        "autocast dtype on GPU (auto: bf16 if supported, else fp16); CPU always fp32"),
    "train.log_every": (10, (int,), None, "steps between metrics.jsonl rows"),
    "train.save_every": (100, (int,), None, "steps between checkpoints (0: only at the end)"),
    "train.device": ("auto", (str,), None, "auto (cuda if available), cpu, cuda, cuda:N"),
    "eval.every": (50, (int,), None, "steps between evaluations (0: only at the end)"),
    "eval.generate": (True, (bool,), None, "generation QA accuracy when eval rows have answers"),
    "eval.max_new_tokens": (16, (int,), None, "greedy tokens generated per eval prompt"),
    "eval.batch_size": (32, (int,), None, "eval batch size (loss and generation)"),
    "eval.max_examples": (None, (int, None), None, "evaluate on the first N eval rows only"),
    "log.tensorboard": (False, (bool,), None, "also write TensorBoard events to output_dir/tb"),
    "log.progress": (True, (bool,), None, "tqdm progress bar"),
    "output_dir": ("runs/rankwise", (str,), None, "where config.yaml, metrics.jsonl, checkpoints, adapter/ go"),
}

# Keys whose value is a mapping of free-form sub-keys would go here; none yet.
_SECTIONS = sorted({k.rsplit(".", 1)[0] for k in SCHEMA if "." in k} |
                   {k.rsplit(".", 2)[0] for k in SCHEMA if k.count(".") >= 2})


def defaults() -> dict:
    """A nested config dict holding every default (required keys are absent)."""
    flat = {k: copy.deepcopy(v[0]) for k, v in SCHEMA.items() if v[0] is not REQUIRED}
    return unflatten(flat)


def flatten(cfg: Mapping, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; sections known to the schema are descended into."""
    out = {}
    for key, value in cfg.items():
        if not isinstance(key, str):
            raise TypeError(f"config key {prefix}{key!r} must be a string")
        dotted = prefix + key
        if isinstance(value, Mapping) and dotted in _SECTIONS:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def unflatten(flat: Mapping) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict = {}
    for dotted, value in flat.items():
        node = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


# names people bring from PEFT / transformers -> ours
_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora",
            "target_modules": "targets", "learning_rate": "lr", "num_train_epochs": "epochs",
            "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
            "warmup_ratio": "warmup", "warmup_steps": "warmup", "lr_scheduler_type": "schedule",
            "max_seq_length": "max_length", "torch_dtype": "dtype", "attn_implementation": "attention"}


def _suggest(key: str) -> str:
    """A hint for an unknown key: a known alias, a close name in the same section, or the name elsewhere."""
    section, _, leaf = key.rpartition(".")
    known = list(SCHEMA) + _SECTIONS

    def by_leaf(name):
        same = [k for k in known if k.rpartition(".")[2] == name and k.rpartition(".")[0] == section and k != key]
        other = [k for k in known if k.rpartition(".")[2] == name and k != key]
        return (same or other or [None])[0]

    hit = by_leaf(_ALIASES[leaf]) if leaf in _ALIASES else by_leaf(leaf)
    if hit is None:
        siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
        close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
        hit = siblings[close[0]] if close else None
    return f" (did you mean {hit!r}?)" if hit else ""


def _coerce(key: str, value: Any) -> Any:
    """Check ``value`` against the schema type of ``key``; int -> float and numeric strings are accepted."""
    default, types, choices, _ = SCHEMA[key]
    if value is None:
        if None in types:
            return None
        raise ValueError(f"config key {key!r} must not be null")
    if float in types and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            value = float(value)
        except ValueError:
            pass
    if int in types and isinstance(value, float) and value.is_integer() and float not in types:
        value = int(value)
    if list in types and isinstance(value, (tuple, str)):
        value = list(value) if isinstance(value, tuple) else [s.strip() for s in value.split(",") if s.strip()]
    want = tuple(t for t in types if t is not None)
    ok = isinstance(value, want) and not (isinstance(value, bool) and bool not in want)
    if not ok:
        names = " or ".join(t.__name__ for t in want) + (" or null" if None in types else "")
        raise ValueError(f"config key {key!r} must be {names}, got {type(value).__name__} {value!r}")
    if choices is not None and value not in choices:
        raise ValueError(f"config key {key!r} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def validate(cfg: Mapping) -> dict:
    """Fill defaults into ``cfg`` and check every key; returns a new resolved nested dict.

    Raises ``ValueError`` naming the first unknown key (with a suggestion), a
    missing required key, or a key with a wrong type or value.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"config must be a mapping of keys to values, got {type(cfg).__name__}")
    flat = flatten(cfg)
    for k in flat:
        if k in _SECTIONS:
            raise ValueError(f"config key {k!r} must be a mapping (e.g. {k}: {{...}}), got {flat[k]!r}")
    unknown = [k for k in flat if k not in SCHEMA]
    if unknown:
        raise ValueError("unknown config key" + ("s " if len(unknown) > 1 else " ")
                         + ", ".join(f"{k!r}{_suggest(k)}" for k in unknown))
    resolved = {}
    for key, (default, _, _, _) in SCHEMA.items():
        if key in flat:
            resolved[key] = _coerce(key, flat[key])
        elif default is REQUIRED:
            raise ValueError(f"missing required config key {key!r} ({SCHEMA[key][3]})")
        else:
            resolved[key] = copy.deepcopy(default)
    _check_values(resolved)
    return unflatten(resolved)


def _check_values(c: dict) -> None:
    def positive(key, allow_zero=False):
        if c[key] is not None and (c[key] < 0 or (c[key] == 0 and not allow_zero)):
            raise ValueError(f"config key {key!r} must be {'>= 0' if allow_zero else '> 0'}, got {c[key]!r}")

    for key in ("lora.r", "data.max_length", "train.max_steps", "train.batch_size", "train.grad_accum",
                "train.lr", "eval.max_new_tokens", "eval.batch_size", "train.log_every", "train.epochs",
                "eval.max_examples"):
        positive(key)
    for key in ("lora.dropout", "train.warmup", "train.weight_decay", "train.min_lr_ratio", "train.eps",
                "train.save_every", "eval.every", "mask.warmup_steps", "lora.alpha"):
        positive(key, allow_zero=True)
    if c["train.max_grad_norm"] is not None:
        positive("train.max_grad_norm")
    if not 0.0 <= c["lora.dropout"] < 1.0:
        raise ValueError(f"config key 'lora.dropout' must be in [0, 1), got {c['lora.dropout']}")
    if not 0.0 < c["mask.fraction"] <= 1.0:
        raise ValueError(f"config key 'mask.fraction' must be in (0, 1], got {c['mask.fraction']}")
    if not c["lora.targets"] or not all(isinstance(t, str) and t for t in c["lora.targets"]):
        raise ValueError(f"config key 'lora.targets' must be a non-empty list of module names, got {c['lora.targets']!r}")
    betas = c["train.betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ValueError(f"config key 'train.betas' must be two numbers in [0, 1), got {betas!r}")
    c["train.betas"] = [float(b) for b in betas]
    if c["method"] == "masked" and c["mask.score"] == "update" and not c["mask.from"]:
        raise ValueError("config key 'mask.from' is required when mask.score is 'update' (a full-SFT run directory)")
    if c["quantization"] != "none" and c["method"] != "lora":
        raise ValueError(f"config key 'quantization' = {c['quantization']!r} needs method 'lora' "
                         f"(the quantized base weights are frozen), got method {c['method']!r}")


def parse_overrides(items) -> dict:
    """``["lora.r=8", "train.lr=1e-4"]`` -> flat dict; values are parsed as YAML (``[a, b]``, ``null``, ``true``)."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key] = value
    return out


def apply_overrides(cfg: Mapping, overrides) -> dict:
    """Return ``cfg`` with dotted overrides applied (a list of ``key=value`` strings or a mapping)."""
    if overrides is None:
        return copy.deepcopy(dict(cfg))
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    flat = flatten(cfg)
    for key, value in overrides.items():
        if key not in SCHEMA:
            raise ValueError(f"unknown config key {key!r} in overrides{_suggest(key)}")
        flat[key] = value
    return unflatten(flat)


def load_yaml(path) -> dict:
    """Read a YAML config file into a dict (an empty file gives ``{}``)."""
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys, got {type(cfg).__name__}")
    return cfg


def resolve(config, overrides=None) -> dict:
    """A config dict or YAML path plus overrides -> the validated, fully defaulted nested dict."""
    cfg = load_yaml(config) if isinstance(config, (str, os.PathLike)) else copy.deepcopy(dict(config))
    return validate(apply_overrides(cfg, overrides))


def get(cfg: Mapping, dotted: str):
    """``get(cfg, "lora.r")`` on a nested config."""
    node = cfg
    for p in dotted.split("."):
        node = node[p]
    return node


def dump_yaml(cfg: Mapping, path) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (temp file in the same directory, then rename)."""
    import yaml

    text = yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=False)
    atomic_write_text(path, text)


