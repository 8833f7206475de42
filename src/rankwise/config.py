"""Run configuration: typed, frozen sections parsed once at the edge.

A config file is YAML (a nested mapping); ``parse`` turns it, plus ``--set``
overrides, into a frozen ``RunConfig`` whose attribute paths are the config
keys (``cfg.lora.r`` is the key ``lora.r``). Every key is declared once, as a
dataclass field: its type (the annotation), its default, its help text, its
allowed values and its constraint (the field's ``metadata``). Parsing checks
all of them, and the checks between keys, before any model is loaded; every
problem is a ``rankwise.errors.ConfigError`` naming the key (unknown keys get
the closest known key, or the rankwise name of a PEFT / transformers key, as a
suggestion).

    cfg = parse("examples/lora.yaml", ["lora.r=8"])   # -> RunConfig
    cfg.lora.r, cfg.train.backend                      # 8, 'auto'
    cfg.to_dict()                                      # the nested dict written to resolved_config.yaml

The dict-level helpers stay for code that reads and writes YAML: ``resolve``
(-> the validated nested dict, ``parse(...).to_dict()``), ``validate``,
``defaults``, ``flatten`` / ``unflatten``, ``apply_overrides``,
``parse_overrides``, ``load_yaml``, ``dump_yaml``, ``get``, and ``SCHEMA``
(dotted key -> ``KeySpec``, derived from the dataclasses).

YAML is read as untrusted text (``safe_load_text``, used for config files and
``--set`` values): a file must be UTF-8; nesting deeper than ``MAX_DEPTH``, an
alias inside the node it names, and aliases expanding past ``MAX_EXPANDED`` values
(a "billion laughs" file) are refused from the parser's events, before anything
is built. Every value a message shows is cut short (``errors.short``).

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
import dataclasses
import difflib
import functools
import hashlib
import importlib.util
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import yaml

from .atomic import atomic_write_text, file_sha256
from .errors import ConfigError, one_line, short

REQUIRED = object()  # marker: the key has no default and must be given

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BACKENDS = ("auto", "triton", "torch")


# ----------------------------------------------------------------------------- constraints

def _positive(v):
    return None if v > 0 else "must be > 0"


LR_MAX = 1e30  # AdamW's step size lr / (1 - beta1^n) must stay a float32 number for every beta1 < 0.9999999


def _learning_rate(v):
    if not v > 0:
        return "must be > 0"
    return None if v <= LR_MAX else f"must be at most {LR_MAX:g} (AdamW's float32 step size overflows above it)"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _in_unit(lo_open: bool, hi_open: bool) -> Callable:
    def check(v):
        ok = (0.0 < v if lo_open else 0.0 <= v) and (v < 1.0 if hi_open else v <= 1.0)
        return None if ok else f"must be in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}"
    return check


SEED_MAX = 2**64 - 1  # what torch.manual_seed takes; the data order reduces its own seed mod 2**64


def _seed(v):
    return None if 0 <= v <= SEED_MAX else f"must be in [0, {SEED_MAX}]"


def _non_empty(v):
    return None if v.strip() else "must not be empty"


def _targets(v):
    return None if v and all(isinstance(t, str) and t for t in v) else "must be a non-empty list of module names"


def _betas(v):
    ok = len(v) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v)
    return None if ok else "must be two numbers in [0, 1)"


_LORA_INIT = re.compile(r"default|gaussian|pissa|pissa_niter_[1-9][0-9]*")


def _lora_init(v):
    return None if _LORA_INIT.fullmatch(v) else "must be one of default, gaussian, pissa, pissa_niter_N (N >= 1)"


def key(default=REQUIRED, help: str = "", choices: Optional[tuple] = None, check: Optional[Callable] = None):
    """A config key: a dataclass field whose metadata holds its help, allowed values and constraint.

    ``check(value) -> None | str`` returns what is wrong (``"must be > 0"``); it
    sees non-null values only.
    """
    meta = {"help": help, "choices": choices, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    if default is REQUIRED:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- the sections

@dataclass(frozen=True)
class LoraCfg:
    r: int = key(16, "LoRA rank", check=_positive)
    alpha: float = key(32.0, "LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rslora)", check=_non_negative)
    dropout: float = key(0.0, "dropout on the LoRA branch input", check=_in_unit(False, True))
    rslora: bool = key(False, "rank-stabilized scaling alpha / sqrt(r)")
    targets: list = key(list(DEFAULT_TARGETS), "nn.Linear names (last name component) to adapt, or all-linear "
                        "(every linear layer but the output head)", check=_targets)
    init: str = key("default", "initialisation of A and B: default | gaussian | pissa | pissa_niter_N",
                    check=_lora_init)


@dataclass(frozen=True)
class MaskCfg:
    fraction: float = key(0.1, "method masked: share of the candidate weights that may change",
                          check=_in_unit(True, False))
    score: str = key("grad", "grad: top |grad| summed over warmup_steps; update: top |W_run - W_base| of mask.from",
                     choices=("grad", "update"))
    warmup_steps: int = key(10, "score grad: optimizer-steps worth of batches to score on", check=_non_negative)
    # ``from`` is a Python keyword: the attribute is ``from_`` (the config key stays ``mask.from``)
    from_: Optional[str] = key(None, "score update: a finished full-SFT run directory")


@dataclass(frozen=True)
class FieldsCfg:
    prompt: str = key("prompt", "prompt_completion: name of the prompt field")
    completion: str = key("completion", "prompt_completion: name of the completion field")
    messages: str = key("messages", "chat: name of the messages field")
    answers: str = key("answers", "eval rows: gold answers (str or list; 'answer' also read)")
    instruction: str = key("instruction", "alpaca: name of the instruction field")
    input: str = key("input", "alpaca: name of the optional input field (absent or empty: no input)")
    output: str = key("output", "alpaca: name of the response field")
    conversations: str = key("conversations", "sharegpt: name of the conversations field ({from, value} turns)")
    text: str = key("text", "text: name of the text field")


@dataclass(frozen=True)
class DataCfg:
    train: str = key(REQUIRED, "training set: local json/jsonl/csv/parquet, or hub name[:split]")
    eval: Optional[str] = key(None, "in-domain eval set (same formats)")
    eval_ood: Optional[str] = key(None, "out-of-domain eval set (same formats)")
    eval_fraction: float = key(0.0, "hold out this share of data.train's rows as the eval set (seeded by "
                               "train.seed; 0: none; not with data.eval)", check=_in_unit(False, True))
    format: str = key("prompt_completion", "row format (rankwise.formats)",
                      choices=("prompt_completion", "chat", "alpaca", "sharegpt", "text"))
    chat_template: Optional[str] = key(None, "chat, sharegpt: a built-in template (chatml, llama3) or a .jinja "
                                       "file (default: the tokenizer's own)", check=_non_empty)
    fields: FieldsCfg = field(default_factory=FieldsCfg)
    max_length: int = key(512, "tokens per example (longer ones are truncated; text: chunked)", check=_positive)
    stride: int = key(0, "text: tokens each chunk repeats from the one before, as context (0: no overlap)",
                      check=_non_negative)
    packing: bool = key(False, "false: batch_size examples per micro-batch; true: fill batch_size*max_length tokens")
    add_eos: bool = key(True, "prompt_completion, alpaca, text: append the EOS token (and train on it)")

    def __post_init__(self):  # checks between the data keys
        if self.eval and self.eval_fraction:
            raise ConfigError("config keys 'data.eval' and 'data.eval_fraction' are both set: give an eval file "
                              "or hold out a share of data.train, not both")
        if self.stride and self.format != "text":
            raise ConfigError(f"config key 'data.stride' applies to data.format 'text' only, got format "
                              f"{self.format!r}")
        if self.stride >= self.max_length:
            raise ConfigError(f"config key 'data.stride' must be smaller than data.max_length ({self.max_length}), "
                              f"got {self.stride}")
        if self.chat_template is not None and self.format not in ("chat", "sharegpt"):
            raise ConfigError(f"config key 'data.chat_template' applies to data.format 'chat' and 'sharegpt' only, "
                              f"got format {self.format!r}")


EARLY_STOP_METRICS = ("eval_loss", "eval_accuracy", "eval_ood_loss", "eval_ood_accuracy")


@dataclass(frozen=True)
class EarlyStopCfg:
    patience: int = key(0, "stop after this many evaluations without improvement (0: never stop early)",
                        check=_non_negative)
    metric: str = key("eval_loss", "the eval metric watched (losses must fall, accuracies rise)",
                      choices=EARLY_STOP_METRICS)
    min_delta: float = key(0.0, "an improvement smaller than this does not count", check=_non_negative)


@dataclass(frozen=True)
class TrainCfg:
    max_steps: int = key(200, "optimizer steps (ignored when train.epochs is set)", check=_positive)
    epochs: Optional[float] = key(None, "train this many passes over the data instead of max_steps", check=_positive)
    batch_size: int = key(8, "examples (or rows of max_length with packing) per micro-batch", check=_positive)
    grad_accum: int = key(1, "micro-batches per optimizer step", check=_positive)
    lr: float = key(2.0e-4, "peak learning rate", check=_learning_rate)
    schedule: str = key("cosine", "decay after warmup", choices=("cosine", "linear", "constant"))
    warmup: float = key(0.03, "warmup: fraction of the steps if < 1, else a number of steps", check=_non_negative)
    min_lr_ratio: float = key(0.0, "final lr as a fraction of the peak", check=_non_negative)
    weight_decay: float = key(0.0, "AdamW weight decay (matrices only)", check=_non_negative)
    betas: list = key([0.9, 0.999], "AdamW betas", check=_betas)
    eps: float = key(1.0e-8, "AdamW eps", check=_non_negative)
    max_grad_norm: Optional[float] = key(1.0, "clip the global grad norm (null: no clipping)", check=_positive)
    optimizer: str = key("adamw", "adamw: torch (fused on CUDA); adamw8bit: bitsandbytes",
                         choices=("adamw", "adamw8bit"))
    seed: int = key(0, f"seed for init, dropout and data order, in [0, {SEED_MAX}]", check=_seed)
    gradient_checkpointing: bool = key(False, "recompute activations in backward")
    fused_kernels: bool = key(False, "RMSNorm and SwiGLU MLPs through rankwise's fused kernels (each kind checked "
                              "against the module's own forward first)")
    fused_loss: bool = key(True, "output head + cross entropy in chunks, never the full logits (checked against the "
                           "model's own loss on the first batch; models it does not fit fall back with a warning)")
    backend: str = key("auto", "kernels of LoRA, fused_kernels and fused_loss: auto (Triton on CUDA, torch "
                       "elsewhere), triton (on a CPU: needs TRITON_INTERPRET=1), torch", choices=BACKENDS)
    precision: str = key("auto", "autocast dtype on GPU (auto: bf16 if supported, else fp16); CPU always fp32",
                         choices=("auto", "bf16", "fp16", "fp32"))
    cuda_graphs: str = key("auto", "capture the whole step as one CUDA graph: on (micro-batches padded to one "
                           "shape), auto (on CUDA with data.packing when nothing stands in the way), off; "
                           "nothing off CUDA", choices=("auto", "on", "off"))
    log_every: int = key(10, "steps between metrics.jsonl rows", check=_positive)
    save_every: int = key(100, "steps between checkpoints (0: only at the end)", check=_non_negative)
    device: str = key("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    early_stop: EarlyStopCfg = field(default_factory=EarlyStopCfg)


@dataclass(frozen=True)
class EvalCfg:
    every: int = key(50, "steps between evaluations (0: only at the end)", check=_non_negative)
    generate: bool = key(True, "generation QA accuracy when eval rows have answers")
    max_new_tokens: int = key(16, "greedy tokens generated per eval prompt", check=_positive)
    batch_size: int = key(32, "eval batch size (loss and generation)", check=_positive)
    max_examples: Optional[int] = key(None, "evaluate on the first N eval rows only", check=_positive)


REPORT_TO = ("tensorboard", "wandb")


def _report_to(v):
    if not all(isinstance(x, str) and x in REPORT_TO for x in v) or len(set(v)) != len(v):
        return f"must be a list of distinct names from {', '.join(REPORT_TO)}"
    return None


@dataclass(frozen=True)
class LogCfg:
    tensorboard: bool = key(False, "also write TensorBoard events to output_dir/tb")
    progress: bool = key(True, "tqdm progress bar")
    report_to: list = key([], "also report every metrics row to: tensorboard (output_dir/tb), wandb (Weights & "
                          "Biases, files in output_dir/wandb; WANDB_MODE=offline keeps them local)", check=_report_to)
    wandb_project: str = key("rankwise", "the W&B project of the runs (report_to: [wandb])", check=_non_empty)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One run, fully defaulted and validated; attribute paths are the config keys."""
    model: str = key(REQUIRED, "base model: local directory or hub id", check=_non_empty)
    tokenizer: Optional[str] = key(None, "tokenizer path or hub id (default: the model's)")
    dtype: str = key("auto", "dtype of the (frozen) base weights", choices=("auto", "bf16", "fp16", "fp32"))
    quantization: str = key("none", "quantize the frozen base linear weights (lora only)", choices=("none", "nf4"))
    double_quant: bool = key(False, "nf4: also quantize the absmax constants")
    attention: str = key("auto", "auto = flash_attention_2 if flash_attn imports, else sdpa",
                         choices=("auto", "flash_attention_2", "sdpa", "eager"))
    method: str = key("lora", "what is trained", choices=("lora", "full", "masked"))
    lora: LoraCfg = field(default_factory=LoraCfg)
    mask: MaskCfg = field(default_factory=MaskCfg)
    data: DataCfg  # data.train is required, so the section has no default
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    log: LogCfg = field(default_factory=LogCfg)
    output_dir: str = key("runs/rankwise", "where resolved_config.yaml, metrics.jsonl, checkpoint/, adapter/ go",
                          check=_non_empty)

    def __post_init__(self):  # checks between keys
        if self.method == "masked" and self.mask.score == "update" and not self.mask.from_:
            raise ConfigError("config key 'mask.from' is required when mask.score is 'update' "
                              "(a full-SFT run directory)")
        if self.quantization != "none" and self.method != "lora":
            raise ConfigError(f"config key 'quantization' = {self.quantization!r} needs method 'lora' "
                              f"(the quantized base weights are frozen), got method {self.method!r}")
        stop = self.train.early_stop
        if stop.patience:
            if not self.eval.every:
                raise ConfigError("config key 'train.early_stop.patience' needs evaluations during the run: set "
                                  "eval.every > 0")
            source = self.data.eval_ood if stop.metric.startswith("eval_ood") else \
                (self.data.eval or self.data.eval_fraction)
            if not source:
                raise ConfigError(f"config key 'train.early_stop.metric' is {stop.metric!r} but there is no "
                                  f"{'data.eval_ood' if stop.metric.startswith('eval_ood') else 'data.eval'} set")
        if self.log.tensorboard and importlib.util.find_spec("tensorboard") is None:  # before any model loads
            raise ConfigError("config key 'log.tensorboard' is true but the tensorboard package is not installed: "
                              "pip install tensorboard, or set log.tensorboard: false")
        for name in self.log.report_to:
            if importlib.util.find_spec(name) is None:
                raise ConfigError(f"config key 'log.report_to' names {name} but the {name} package is not "
                                  f"installed: pip install {name}, or leave {name} out")

    def to_dict(self) -> dict:
        """The nested config dict (what a run's ``resolved_config.yaml`` holds)."""
        return unflatten({k: copy.deepcopy(_attr(self, k)) for k in SCHEMA})

    def get(self, dotted: str):
        """``cfg.get("mask.from")``: the value of a dotted key."""
        return _attr(self, dotted)


# ----------------------------------------------------------------------------- the schema, derived

@dataclass(frozen=True)
class KeySpec:
    """One config key: ``default`` (``REQUIRED`` if none), ``types`` (``None`` in them: nullable), ``choices``,
    ``check``, ``help``."""
    default: Any
    types: tuple
    choices: Optional[tuple]
    check: Optional[Callable]
    help: str

    def __getitem__(self, i):  # the old positional tuple: (default, types, choices, help)
        return (self.default, self.types, self.choices, self.help)[i]


def _attr_name(leaf: str) -> str:
    return "from_" if leaf == "from" else leaf


def _key_name(attr: str) -> str:
    return "from" if attr == "from_" else attr


def _attr(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, _attr_name(part))
    return obj


def _types_of(hint) -> tuple:
    if typing.get_origin(hint) is typing.Union:
        return tuple(None if a is type(None) else a for a in typing.get_args(hint))
    return (hint,)


def _walk(cls, prefix=""):
    """(dotted key, KeySpec) for every key of section ``cls``; nested sections -> (dotted name, class)."""
    hints = typing.get_type_hints(cls)
    keys, sections = {}, {}
    for f in dataclasses.fields(cls):
        dotted = prefix + _key_name(f.name)
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            sections[dotted] = hint
            sub_keys, sub_sections = _walk(hint, dotted + ".")
            keys.update(sub_keys)
            sections.update(sub_sections)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        keys[dotted] = KeySpec(default, _types_of(hint), f.metadata.get("choices"), f.metadata.get("check"),
                               f.metadata.get("help", ""))
    return keys, sections


SCHEMA, _SECTION_CLASSES = _walk(RunConfig)
SCHEMA: dict[str, KeySpec]
_SECTIONS = sorted(_SECTION_CLASSES)


# ----------------------------------------------------------------------------- dict helpers

def defaults() -> dict:
    """A nested config dict holding every default (required keys are absent)."""
    flat = {k: copy.deepcopy(v.default) for k, v in SCHEMA.items() if v.default is not REQUIRED}
    return unflatten(flat)


def flatten(cfg: Mapping, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; sections known to the schema are descended into."""
    out = {}
    for k, value in cfg.items():
        if not isinstance(k, str):
            raise ConfigError(f"config key {prefix}{short(k)} must be a string")
        dotted = prefix + k
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


def get(cfg, dotted: str):
    """``get(cfg, "lora.r")`` on a nested config dict or a ``RunConfig``."""
    if isinstance(cfg, RunConfig):
        return _attr(cfg, dotted)
    node = cfg
    for p in dotted.split("."):
        node = node[p]
    return node


# names people bring from PEFT / transformers -> ours
_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora",
            "target_modules": "targets", "learning_rate": "lr", "num_train_epochs": "epochs",
            "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size": "batch_size",
            "warmup_ratio": "warmup", "warmup_steps": "warmup", "lr_scheduler_type": "schedule",
            "max_seq_length": "max_length", "torch_dtype": "dtype", "attn_implementation": "attention"}


def _suggest(dotted: str) -> str:
    """A hint for an unknown key: a known alias, a close name in the same section, or the name elsewhere."""
    section, _, leaf = dotted.rpartition(".")
    known = list(SCHEMA) + _SECTIONS

    def by_leaf(name):
        same = [k for k in known if k.rpartition(".")[2] == name and k.rpartition(".")[0] == section and k != dotted]
        other = [k for k in known if k.rpartition(".")[2] == name and k != dotted]
        return (same or other or [None])[0]

    hit = by_leaf(_ALIASES[leaf]) if leaf in _ALIASES else by_leaf(leaf)
    if hit is None:
        siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
        close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
        hit = siblings[close[0]] if close else None
    return f" (did you mean {hit!r}?)" if hit else ""


def _coerce(dotted: str, value: Any) -> Any:
    """Check ``value`` against the spec of ``dotted``; int -> float, numeric strings and comma lists are accepted."""
    spec = SCHEMA[dotted]
    types = spec.types
    if value is None:
        if None in types:
            return None
        raise ConfigError(f"config key {dotted!r} must not be null")
    if float in types and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            value = float(value)
        except (ValueError, OverflowError):  # not a number, or an int too large for a float: refused below
            pass
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {dotted!r} must be a finite number, got {value!r}")
    if int in types and isinstance(value, float) and value.is_integer() and float not in types:
        value = int(value)
    if list in types and isinstance(value, (tuple, str)):
        value = list(value) if isinstance(value, tuple) else [s.strip() for s in value.split(",") if s.strip()]
    want = tuple(t for t in types if t is not None)
    if not (isinstance(value, want) and not (isinstance(value, bool) and bool not in want)):
        names = " or ".join(t.__name__ for t in want) + (" or null" if None in types else "")
        raise ConfigError(f"config key {dotted!r} must be {names}, got {type(value).__name__} {short(value)}")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"config key {dotted!r} must be one of {', '.join(map(str, spec.choices))}; "
                          f"got {short(value)}")
    problem = spec.check(value) if spec.check is not None else None
    if problem:
        raise ConfigError(f"config key {dotted!r} {problem}, got {short(value)}")
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**64:
        raise ConfigError(f"config key {dotted!r} must fit in 64 bits, got {short(value)}")
    if dotted == "train.betas":
        value = [float(b) for b in value]
    return value


def _build(cls, flat: dict, prefix: str = ""):
    kwargs = {}
    for f in dataclasses.fields(cls):
        dotted = prefix + _key_name(f.name)
        kwargs[f.name] = _build(_SECTION_CLASSES[dotted], flat, dotted + ".") if dotted in _SECTION_CLASSES \
            else flat[dotted]
    return cls(**kwargs)


# ----------------------------------------------------------------------------- parsing

def validate_config(cfg: Mapping) -> RunConfig:
    """A nested config mapping -> ``RunConfig`` (defaults filled, every key checked).

    Raises ``ConfigError`` naming the first unknown key (with a suggestion), a
    missing required key, or a key with a wrong type or value.
    """
    if isinstance(cfg, RunConfig):
        return cfg
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"config must be a mapping of keys to values, got {type(cfg).__name__}")
    flat = flatten(cfg)
    for k in flat:
        if k in _SECTIONS:
            raise ConfigError(f"config key {k!r} must be a mapping (e.g. {k}: {{...}}), got {short(flat[k])}")
    unknown = [k for k in flat if k not in SCHEMA]
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ConfigError("unknown config key" + ("s " if len(unknown) > 1 else " ")
                          + ", ".join(f"{short(k)}{_suggest(k)}" for k in unknown[:5]) + more)
    resolved = {}
    for dotted, spec in SCHEMA.items():
        if dotted in flat:
            resolved[dotted] = _coerce(dotted, flat[dotted])
        elif spec.default is REQUIRED:
            raise ConfigError(f"missing required config key {dotted!r} ({spec.help})")
        else:
            resolved[dotted] = copy.deepcopy(spec.default)
    return _build(RunConfig, resolved)


def validate(cfg: Mapping) -> dict:
    """Fill defaults into ``cfg`` and check every key; returns a new resolved nested dict."""
    return validate_config(cfg).to_dict()


def parse_overrides(items) -> dict:
    """``["lora.r=8", "train.lr=1e-4"]`` -> flat dict; values are parsed as YAML (``[a, b]``, ``null``, ``true``)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {short(item)}")
        k, raw = item.split("=", 1)
        k = k.strip()
        if not k:
            raise ConfigError(f"--set expects key=value, got {short(item)}")
        try:
            value = safe_load_text(raw, f"--set {one_line(k, 80)}") if raw.strip() else ""
        except yaml.YAMLError as e:
            k = one_line(k, 80)
            raise ConfigError(f"--set {k}: the value {short(raw)} is not valid YAML ({_yaml_problem(e)}); "
                              f"quote it to pass a string, e.g. --set '{k}=\"...\"'") from None
        out[k] = value
    return out


def apply_overrides(cfg: Mapping, overrides) -> dict:
    """Return ``cfg`` with dotted overrides applied (a list of ``key=value`` strings or a mapping)."""
    if overrides is None:
        return copy.deepcopy(dict(cfg))
    if not isinstance(overrides, Mapping):
        overrides = parse_overrides(overrides)
    flat = flatten(cfg)
    for k, value in overrides.items():
        if k not in SCHEMA:
            raise ConfigError(f"unknown config key {short(k)} in overrides{_suggest(k)}")
        flat[k] = value
    return unflatten(flat)


def _yaml_problem(e) -> str:
    """A YAML error on one line: what is wrong and where (line, column)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return one_line(getattr(e, "problem", None) or e) + where


MAX_DEPTH = 64  # levels of nesting a config (or a --set value) may have; a real one has four
MAX_EXPANDED = 100_000  # values a document may expand to through its aliases (a real config has a few hundred)


def _check_yaml_shape(text: str, where: str) -> None:
    """Refuse, from the parser's events alone (no recursion, nothing built), YAML nested deeper than
    ``MAX_DEPTH``, an alias inside the node it names, or aliases that expand past ``MAX_EXPANDED`` values
    (a "billion laughs" file is a few lines that expand to billions)."""
    sizes, stack, open_anchors, total, aliased = {}, [], set(), 0, False  # anchor -> expanded size
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        mark = event.start_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}"
        if isinstance(event, yaml.DocumentStartEvent):
            sizes.clear()
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= MAX_DEPTH:
                raise ConfigError(f"{where} nests deeper than {MAX_DEPTH} levels (at {at})")
            stack.append([event.anchor, 1])
            if event.anchor is not None:
                open_anchors.add(event.anchor)
            total += 1
            continue
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in open_anchors:
                raise ConfigError(f"{where}: the alias *{one_line(event.anchor, 40)} at {at} lies inside the "
                                  "node it names (a value that contains itself)")
            n, aliased = sizes.get(event.anchor, 1), True
            total += n
        elif isinstance(event, yaml.ScalarEvent):
            n = 1
            total += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, n = stack.pop()  # already counted in total, item by item
            if anchor is not None:
                sizes[anchor] = n
                open_anchors.discard(anchor)
        else:
            continue
        if stack:
            stack[-1][1] += n
        if aliased and total > MAX_EXPANDED:
            raise ConfigError(f"{where}: its aliases (*name) expand to more than {MAX_EXPANDED} values (at {at}); "
                              "write the values out instead")


def _safe_loader():
    class Loader(yaml.SafeLoader):
        """``yaml.SafeLoader`` whose unreadable scalars (a 5,000-digit int, month 13) are YAML errors with a place."""

        def construct_object(self, node, deep=False):
            try:
                return super().construct_object(node, deep)
            except (ValueError, OverflowError, TypeError) as e:
                if isinstance(e, ConfigError):
                    raise
                raise yaml.constructor.ConstructorError(
                    None, None, f"cannot read the value {short(getattr(node, 'value', ''), 60)}: {one_line(e, 120)}",
                    node.start_mark) from None

    return Loader


def safe_load_text(text: str, where: str = "YAML text"):
    """``yaml.safe_load(text)`` for untrusted text: nesting, alias expansion and unreadable values are refused
    (``ConfigError`` or ``yaml.YAMLError``) before anything is built; ``where`` names the text in the message."""
    try:
        _check_yaml_shape(text, where)
        return yaml.load(text, Loader=_safe_loader())
    except RecursionError:  # a parser or constructor recursing on nesting the shape check did not see
        raise ConfigError(f"{where} is nested too deeply to read") from None


def load_yaml(path) -> dict:
    """Read a YAML config file (UTF-8) into a dict (an empty file gives ``{}``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or one_line(e)}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"config file {path} is not UTF-8 text: byte 0x{data[e.start]:02x} at line {line}, "
                          f"column {column}; save it as UTF-8") from None
    try:
        cfg = safe_load_text(text, f"config file {path}")
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(cfg).__name__}")
    return cfg


def parse(config, overrides=None) -> RunConfig:
    """A ``RunConfig``, a config dict or a YAML path, plus overrides -> the validated ``RunConfig``."""
    if isinstance(config, RunConfig):
        if not overrides:
            return config
        config = config.to_dict()
    cfg = load_yaml(config) if isinstance(config, (str, os.PathLike)) else copy.deepcopy(dict(config))
    return validate_config(apply_overrides(cfg, overrides))


def resolve(config, overrides=None) -> dict:
    """A config dict or YAML path plus overrides -> the validated, fully defaulted nested dict."""
    return parse(config, overrides).to_dict()


# Keys that say how or where a run computes, not what it trains: changing them keeps the run the same run
# (a resume, or a sweep reusing a finished arm, is allowed across them). Every other key is a setting.
NOT_SETTINGS = ("output_dir", "log.tensorboard", "log.progress", "log.report_to", "log.wandb_project",
                "train.log_every", "train.save_every",
                "train.device", "train.backend", "train.cuda_graphs", "eval.every")


# data keys of the formats beyond prompt_completion and chat: settings only for the formats that read them
_FORMAT_KEYS = {"alpaca": ("data.fields.instruction", "data.fields.input", "data.fields.output"),
                "sharegpt": ("data.fields.conversations", "data.chat_template"),
                "chat": ("data.chat_template",), "text": ("data.fields.text", "data.stride")}


def unused_data_keys(cfg) -> set:
    """The data keys the run's format does not read, and ``data.eval_fraction`` when 0: left out of its
    settings, so that a run whose format does not use them keeps the settings it had before they existed."""
    used = set(_FORMAT_KEYS.get(cfg.data.format, ()))
    unused = {k for keys in _FORMAT_KEYS.values() for k in keys} - used
    if not cfg.data.eval_fraction:
        unused.add("data.eval_fraction")
    if cfg.data.chat_template is None:
        unused.add("data.chat_template")
    return unused


def settings(cfg) -> dict:
    """The flat ``{key: value}`` of the keys that change a run's result (all but ``NOT_SETTINGS``, and the
    sections the method does not use: ``mask.*`` for LoRA, ``lora.*`` for full and masked SFT). Early stopping's
    keys count only when it is on (``train.early_stop.patience`` > 0), and then ``eval.every`` counts too (when
    the evaluations fall decides where the run stops); a run without it has the settings it always had.

    Local data files also contribute their content: ``data.train#sha256`` etc., so a
    file rewritten under the same name counts as a change.
    """
    cfg = cfg if isinstance(cfg, RunConfig) else validate_config(cfg)
    unused = {"lora": ("mask.",), "full": ("lora.", "mask."), "masked": ("lora.",)}[cfg.method]
    if not cfg.train.early_stop.patience:
        unused += ("train.early_stop.",)
    out = {k: copy.deepcopy(_attr(cfg, k)) for k in SCHEMA if k not in NOT_SETTINGS and not k.startswith(unused)
           and k not in unused_data_keys(cfg)}
    if cfg.train.early_stop.patience:
        out["eval.every"] = cfg.eval.every
    for k in ("data.train", "data.eval", "data.eval_ood", "data.chat_template"):
        path = out.get(k)
        if path and os.path.isfile(path):
            st = os.stat(path)
            out[f"{k}#sha256"] = _file_sha256(os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    """sha256 of a file, read once per (path, inode, size, mtime, ctime) in a process: a sweep asks for its
    data's digest once per arm. (A rewrite to the same size within one file-system timestamp tick would
    be missed, in this process only.)"""
    return file_sha256(path)


def settings_hash(values: Mapping) -> str:
    """A short stable hash of ``settings(cfg)`` (sorted JSON, sha256, 16 hex digits)."""
    text = json.dumps(dict(values), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def changed_settings(old: Mapping, new: Mapping) -> list:
    """Keys whose values differ between two ``settings`` dicts, sorted (keys missing on one side count)."""
    return sorted(k for k in set(old) | set(new) if old.get(k, object()) != new.get(k, object()))


def describe_changes(old: Mapping, new: Mapping) -> str:
    """``lora.r (4 -> 8), train.lr (0.01 -> 0.5)``: the settings that differ, with both values."""
    missing = object()

    def short(v):
        text = "(none)" if v is missing else json.dumps(v)
        return text if len(text) <= 40 else text[:37] + "..."

    keys = changed_settings(old, new)
    return ", ".join(f"{k} ({short(old.get(k, missing))} -> {short(new.get(k, missing))})" for k in keys) \
        or "the settings hash"


def dump_yaml(cfg, path) -> None:
    """Write ``cfg`` (a dict or a ``RunConfig``) as YAML to ``path`` atomically (temp file, then rename)."""
    data = cfg.to_dict() if isinstance(cfg, RunConfig) else dict(cfg)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    atomic_write_text(path, text)
