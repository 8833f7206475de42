"""How many LoRA arms fit in one together run: the model's shapes, the peak-memory estimate and the grouping.

``target_dims`` and ``model_shape`` read a model's shapes from its config alone (built on the meta device,
once per process for a local model); ``estimate_peak_bytes`` models a together run's peak memory,
``memory_budget`` reads what the device has, and ``plan_groups`` splits the arms into groups that fit.
Used by ``rankwise.together`` (rank checks) and ``rankwise.sweep`` (``--together`` without ``--group-size``).
"""
from __future__ import annotations

import copy
import functools
import os

import torch

from . import config as C
from . import shapes
from .errors import ConfigError
from .model import resolve_device


# ----------------------------------------------------------------------------- reading a model's shapes

def _meta_model(path: str):
    """``shapes.meta_model``, looked up here (each build of a together run's checks goes through this name)."""
    return shapes.meta_model(path)


def _config_stamp(path: str):
    """``(path, inode, size, mtime, ctime)`` of a local model's ``config.json``; None for anything else."""
    try:
        st = os.stat(os.path.join(str(path), "config.json"))
    except OSError:
        return None
    return os.path.realpath(os.path.join(str(path), "config.json")), st.st_ino, st.st_size, st.st_mtime_ns, \
        st.st_ctime_ns


def _read_once(fn, cfg: C.RunConfig):
    """``fn(model, targets)``, computed once per (config file stamp, targets) in a process for a local model:
    a together sweep asks for one model's shapes several times (rank check, memory plan, each group), and
    each read builds the model on the meta device. Other models are read each time. (A config rewritten to
    the same size within one file-system timestamp tick would be missed, in this process only.)"""
    targets = cfg.lora.targets if isinstance(cfg.lora.targets, str) else tuple(cfg.lora.targets)
    stamp = _config_stamp(cfg.model)
    if stamp is None:
        return fn(cfg.model, targets)
    return copy.deepcopy(_memo(fn, cfg.model, targets, stamp))


@functools.lru_cache(maxsize=32)
def _memo(fn, model, targets, stamp):
    return fn(model, targets)


def _meta_targets(model, targets) -> dict:
    return _targets_of(_meta_model(model)[1], targets)


def _targets_of(meta, targets) -> dict:
    """``shapes.targets_of``."""
    return shapes.targets_of(meta, targets)


def target_dims(cfg: C.RunConfig) -> dict:
    """``{module path: (in_features, out_features)}`` of the layers ``cfg.lora.targets`` selects.

    Read from the model's config alone: the model is built on the meta device, no weights are loaded
    (once per process for a local model whose ``config.json`` has not changed).
    """
    return _read_once(_meta_targets, C.parse(cfg))


# ----------------------------------------------------------------------------- memory: how many arms fit

# The memory model of ``estimate_peak_bytes`` (stated, conservative; every term in bytes):
#
#   peak = base + K * act + sum_k state_k + logits
#
#   base    every weight of the model at its load dtype (``dtype: auto`` counted as fp32); with
#           ``quantization: nf4`` the targeted linear weights at 0.5 byte per value + one fp32
#           absmax per 64 values (NF4_BYTES = 0.5625), the rest dense.
#   act     one arm's activations saved for backward over one micro-batch of
#           N = batch_size * max_length tokens (the longest micro-batch; packing or not):
#           N * layers * (ACT_PER_HIDDEN * hidden + ACT_PER_INTERMEDIATE * intermediate
#           + quadratic * ATTN_SCORES * heads * N) * act_bytes * ACT_SLACK.
#           A Llama decoder layer keeps about 8 hidden-sized vectors per token (two norm inputs and
#           outputs, q, k, v, the attention output) and 4 intermediate-sized ones (gate, up, act(gate),
#           their product); ``quadratic`` counts the attention scores and probabilities (2 per head and
#           key) where they are materialised: eager attention, or any attention on a CPU (sdpa's math
#           path for the packed row's mask). With gradient checkpointing: one hidden vector per layer
#           and token plus one layer's full activations. ACT_SLACK = 1.5 covers autograd temporaries,
#           the LoRA terms (x @ A^T per arm) and allocator fragmentation. act_bytes: 4 on a CPU
#           (fp32), 2 under bf16/fp16 autocast on a GPU.
#   state_k arm k's adapters: per targeted layer r_k * (in + out) fp32 values, held 5 times
#           (ADAPTER_COPIES: weights, gradients, AdamW's two moments, the concatenated copy per forward).
#   logits  without ``train.fused_loss``: K * N * vocab fp32 logits and their gradient (2 copies).
#
# Checked against bench_sweep_step's measured peaks (a Llama-3.2-1B shape with untied head, bf16, SDPA,
# fused loss, HF's own norms and MLPs, LoRA on all 7 linears; see benchmarks/results/nvidia-h200-2026-11-28):
# the act term before ACT_SLACK is close to the measured peak per arm and token, and with the slack the
# estimate stays above the measured peaks of K = 1, 4 and 8 arms.
NF4_BYTES = 0.5 + 4 / 64
ACT_PER_HIDDEN, ACT_PER_INTERMEDIATE, ATTN_SCORES, ACT_SLACK = 8, 4, 2, 1.5
ADAPTER_COPIES = 5
BUDGET_FRACTION = {"cuda": 0.9, "cpu": 0.8}  # share of the free (CUDA) / available (CPU) memory a plan may use


def model_shape(cfg: C.RunConfig) -> dict:
    """What the memory model reads of ``cfg.model``'s config (built on the meta device; no weights loaded;
    once per process for a local model whose ``config.json`` has not changed).

    ``{"params", "target_params", "targets": {name: (in, out)}, "hidden", "intermediate", "layers",
    "heads", "vocab", "tied"}`` (``tied``: the output head is the input embedding).
    """
    cfg = C.parse(cfg)
    return _read_once(_meta_shape, cfg)


def _meta_shape(model, targets) -> dict:
    mcfg, meta = _meta_model(model)
    params = sum(p.numel() for p in meta.parameters())
    dims = _targets_of(meta, targets)
    hidden = int(getattr(mcfg, "hidden_size"))
    return {"params": params, "target_params": sum(i * o for i, o in dims.values()), "targets": dims,
            "hidden": hidden, "intermediate": int(getattr(mcfg, "intermediate_size", 4 * hidden) or 4 * hidden),
            "layers": int(getattr(mcfg, "num_hidden_layers")), "heads": int(getattr(mcfg, "num_attention_heads")),
            "vocab": int(getattr(mcfg, "vocab_size")), "tied": bool(getattr(mcfg, "tie_word_embeddings", False))}


def _activation_bytes(cfg: C.RunConfig, s: dict, device: torch.device) -> float:
    """One arm's (or one full-SFT run's) activations saved for backward over the longest micro-batch (``act``)."""
    t = cfg.train
    n = t.batch_size * cfg.data.max_length
    act_bytes = 2 if device.type == "cuda" and t.precision != "fp32" else 4
    quadratic = cfg.attention == "eager" or device.type == "cpu"
    per_layer = ACT_PER_HIDDEN * s["hidden"] + ACT_PER_INTERMEDIATE * s["intermediate"] \
        + (ATTN_SCORES * s["heads"] * n if quadratic else 0)
    if t.gradient_checkpointing:
        act = n * (s["layers"] * s["hidden"] + per_layer)
    else:
        act = n * s["layers"] * per_layer
    return act * act_bytes * ACT_SLACK


def estimate_peak_bytes(cfg: C.RunConfig, ranks, device=None, shape: dict | None = None) -> int:
    """Estimated peak memory (bytes) of training the arms of ``ranks`` together with ``cfg`` (see the model above).

    Args:
        cfg: the shared config of the arms (a ``RunConfig``, dict or path).
        ranks: one LoRA rank per arm.
        device: where they train (default: ``cfg.train.device`` resolved).
        shape: ``model_shape(cfg)``, when already read.
    """
    cfg = C.parse(cfg)
    s = shape or model_shape(cfg)
    device = torch.device(device) if device is not None else resolve_device(cfg.train.device)
    t = cfg.train
    w_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}.get(cfg.dtype, 4)
    if cfg.quantization == "nf4":
        base = (s["params"] - s["target_params"]) * w_bytes + s["target_params"] * NF4_BYTES
    else:
        base = s["params"] * w_bytes
    n = t.batch_size * cfg.data.max_length
    io = sum(i + o for i, o in s["targets"].values())
    state = ADAPTER_COPIES * 4 * io * sum(int(r) for r in ranks)
    logits = 0 if t.fused_loss else 2 * 4 * n * s["vocab"] * len(ranks)
    return int(base + len(ranks) * _activation_bytes(cfg, s, device) + state + logits)


def estimate_full_peak_bytes(cfg: C.RunConfig, device=None, shape: dict | None = None) -> int:
    """Estimated peak memory (bytes) of full SFT with ``cfg``: every weight four times at its load dtype (the
    weight, its gradient and AdamW's two moments, which torch keeps in the weight's dtype; ``adamw8bit``'s moments
    are 1 byte each), plus one run's activations and logits as in the LoRA model above. Not checked against a
    measured peak yet."""
    cfg = C.parse(cfg)
    s = shape or model_shape(cfg)
    device = torch.device(device) if device is not None else resolve_device(cfg.train.device)
    w_bytes = {"fp32": 4, "bf16": 2, "fp16": 2}.get(cfg.dtype, 4)
    moments = 2 if cfg.train.optimizer == "adamw8bit" else 2 * w_bytes
    n = cfg.train.batch_size * cfg.data.max_length
    logits = 0 if cfg.train.fused_loss else 2 * 4 * n * s["vocab"]
    return int(s["params"] * (2 * w_bytes + moments) + _activation_bytes(cfg, s, device) + logits)


def memory_budget(device) -> int | None:
    """Bytes a together run may plan for on ``device``: the CUDA free memory, or the CPU's ``MemAvailable``
    (``/proc/meminfo``), times ``BUDGET_FRACTION``; None when it cannot be read (no automatic split)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * BUDGET_FRACTION["cuda"])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * BUDGET_FRACTION["cpu"])
    except (OSError, ValueError, IndexError):
        pass
    return None


def plan_groups(cfg: C.RunConfig, ranks, budget_bytes: int, device=None) -> list:
    """Split the arms of ``ranks`` (kept in order) into consecutive groups whose estimated peak fits ``budget_bytes``.

    Returns lists of ranks, e.g. ``[[1, 2, 4], [8]]``. An arm that does not fit even
    alone is a ``ConfigError`` (one line) naming its estimate and the budget.
    """
    cfg = C.parse(cfg)
    shape = model_shape(cfg)
    groups, cur = [], []
    for r in ranks:
        alone = estimate_peak_bytes(cfg, [r], device, shape)
        if alone > budget_bytes:
            raise ConfigError(f"the LoRA arm of rank {r} alone needs about {alone / 2**30:.2f} GiB (estimate: base + "
                              f"activations + adapters + optimizer state), more than the {budget_bytes / 2**30:.2f} "
                              f"GiB available; lower train.batch_size or data.max_length, or use quantization: nf4 "
                              f"or train.gradient_checkpointing")
        if cur and estimate_peak_bytes(cfg, cur + [r], device, shape) > budget_bytes:
            groups.append(cur)
            cur = []
        cur.append(r)
    if cur:
        groups.append(cur)
    return groups
