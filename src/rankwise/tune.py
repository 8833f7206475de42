"""``rankwise tune CONFIG.yaml``: measure, before a run, which path each LoRA GEMM takes.

Every LoRA layer's forward Y and backward dX run either fused (one Triton GEMM
with the low-rank term in its accumulator) or split (torch's cuBLAS GEMM, then
one Triton kernel adding the low-rank term in place). With the Triton backend on
CUDA the first call that meets a shape times both and keeps the faster, cached in
``$RANKWISE_CACHE/tuning.json`` (``rankwise.kernels.tuning``); so are the three
skinny low-rank products (S, dS/dB, dA: Triton kernel or torch's GEMMs). This verb makes
those first calls ahead of the run: it parses the config as ``rankwise train``
does, loads the model, injects the LoRA layers, plans the first epoch's
micro-batches, and runs each distinct layer shape forward and backward once per
row count (rounded up to a power of two, as the cache keys are) under the run's
autocast dtype. Nothing is trained or written but the tuning cache.

Where nothing would be measured (a CPU, ``train.backend: torch``, a method other
than lora, ``RANKWISE_TUNE=0``) it says so in one line and exits 0.
"""
from __future__ import annotations

import torch

from rankwise.kernels.tuning import default_tuner, m_bucket, tuning_enabled

from . import config as C
from .batches import load_data
from .lora import lora_layers
from .model import load_tokenizer
from .runtime import check_backend, setup_precision
from .train import load_base_model
from .trainable import setup_trainable

__all__ = ["add_arguments", "main", "nothing_to_tune", "row_buckets", "distinct_layers", "tune_layers"]


def nothing_to_tune(cfg: C.RunConfig, device: torch.device):
    """Why a run of ``cfg`` on ``device`` has no path choice to measure, or None when it has."""
    if device.type != "cuda":
        return f"the run's device is {device.type}; the path choice is measured on CUDA only"
    if cfg.method != "lora":
        return f"method {cfg.method} has no LoRA layers"
    if cfg.train.backend == "torch":
        return "train.backend is torch (no Triton kernels)"
    if not tuning_enabled():
        return "RANKWISE_TUNE=0"
    return None


def row_buckets(batches) -> list:
    """The rows (tokens) a LoRA layer sees per micro-batch of the first epoch, rounded up
    to the tuning cache's power-of-two buckets, ascending."""
    # micro-batches are padding-free rows (data.collate): a layer sees the sum of the examples' lengths
    return sorted({m_bucket(sum(len(batches.examples[i]) for i in idx)) for idx in batches.epoch_plan(0)})


def distinct_layers(model) -> list:
    """One LoRA layer per distinct (weight kind, out, in, r): the shapes the cache keys on."""
    seen = {}
    for _, m in lora_layers(model):
        w = m.base.weight
        key = (type(w).__name__, m.out_features, m.in_features, m.r, getattr(w, "dtype", None))
        seen.setdefault(key, m)
    return list(seen.values())


def tune_layers(layers, rows, device, amp_dtype) -> int:
    """Run each layer forward and backward once per row count under autocast (``amp_dtype``;
    None: the layer's own dtype); returns the number of (layer, rows) pairs run."""
    n = 0
    for m in layers:
        dtype = amp_dtype or m.lora_A.dtype
        for M in rows:
            x = torch.randn(M, m.in_features, device=device, dtype=dtype, requires_grad=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                y = m(x)
            y.float().sum().backward()
            n += 1
    for m in layers:
        m.zero_grad(set_to_none=True)
    return n


def add_arguments(parser) -> None:
    """Arguments of ``rankwise tune``."""
    parser.add_argument("config", help="the YAML config of the run to tune for (as given to rankwise train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted, as rankwise train does; repeatable")


def main(args) -> int:
    """Entry point of ``rankwise tune``."""
    cfg = C.parse(args.config, args.overrides)
    name = cfg.train.device
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                          ("cpu" if name == "auto" else name))
    reason = nothing_to_tune(cfg, device)
    if reason:
        print(f"rankwise tune: nothing to tune ({reason})")
        return 0
    check_backend(cfg.train.backend, device)
    _, _, amp_dtype = setup_precision(cfg.train.precision, device, master=True)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    batches, _ = load_data(cfg, tokenizer, master=True)
    model = load_base_model(cfg, device)
    setup_trainable(model, cfg)
    layers, rows = distinct_layers(model), row_buckets(batches)
    n = tune_layers(layers, rows, device, amp_dtype)
    print(f"rankwise tune: {len(layers)} LoRA layer shapes x {len(rows)} row counts ({n} forward+backward runs); "
          f"choices in {default_tuner().path}")
    return 0
