"""What the demo's two studies share: an arm's training config, training a group of LoRA arms together,
loading an arm's model, greedy evaluation, and the stage files (JSON, JSONL) they cache.

An arm is a dict with ``name``, ``method`` (``lora`` or ``full``), ``rank``, ``data`` (its fine-tuning set,
``train-<data>.jsonl`` in the seed's data directory), and once planned for a seed, ``seed`` and
``output_dir``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import together
from ..adapter import merge_adapter
from ..atomic import atomic_write_text
from ..errors import ConfigError
from ..evaluate import generate_answers, is_correct
from ..model import load_model, load_tokenizer, resolve_device
from ..outputs import SUMMARY
from ..train import CHECKPOINT
from ..world import mastery


def write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None  # unreadable: the cached stage counts as missing or stale


def read_jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_jsonl(path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def evaluate_model(model, tokenizer, sets: dict, max_new_tokens: int = 4, batch_size: int = 256) -> dict:
    """Greedy closed-book QA on each test set: ``{set: {"correct": [0/1 per row], "accuracy": by bucket}}``."""
    out = {}
    for name, rows in sets.items():
        outs = generate_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                                batch_size=batch_size)
        correct = [int(bool(is_correct(o[0], r["answers"]))) for o, r in zip(outs, rows)]
        out[name] = {"correct": correct, "accuracy": mastery.accuracy_by_bucket(rows, correct)}
    return out


def device() -> torch.device:
    return resolve_device("auto")


def load_base(base_dir):
    return load_model(str(base_dir), dtype="fp32", device=device()), load_tokenizer(str(base_dir))


def arm_model(arm: dict, base_dir):
    """The fine-tuned model of an arm: LoRA merged into the base, or the saved full model."""
    run = Path(arm["output_dir"])
    if arm["method"] == "lora":
        model, _ = load_base(base_dir)
        return merge_adapter(model, str(run / "adapter"))
    return load_model(str(run / "model"), dtype="fp32", device=device())


def seed_arm(arm: dict, work: Path, seed: int) -> dict:
    """``arm`` for one seed: its ``seed`` and ``output_dir`` (``work/arms/seed<N>/<name>``)."""
    return {**arm, "seed": seed, "output_dir": str(Path(work) / "arms" / f"seed{seed}" / arm["name"])}


def data_dir_of(work: Path, seed: int) -> Path:
    return Path(work) / "data" / f"seed{seed}"


def arm_config(arm: dict, base_dir, data_dir, settings: dict) -> dict:
    """The ``rankwise.train`` config of one arm (its ``seed`` and ``output_dir`` set by :func:`seed_arm`)."""
    lora = arm["method"] == "lora"
    cfg = {
        "model": str(base_dir),
        "method": arm["method"],
        "dtype": "fp32",
        "data": {"train": str(Path(data_dir) / f"train-{arm['data']}.jsonl"), "format": "prompt_completion",
                 "max_length": int(settings.get("max_length", 64)), "packing": False},
        "train": {"epochs": float(settings["epochs"]), "batch_size": settings["batch_size"],
                  "lr": settings["lora_lr"] if lora else settings["full_lr"], "schedule": "cosine",
                  "warmup": 0.1, "seed": int(arm.get("seed", settings["seeds"][0])), "save_every": 0,
                  "log_every": 5},
        "eval": {"every": 0, "generate": False},
        "log": {"progress": False},
        "output_dir": str(arm["output_dir"]),
    }
    if lora:
        cfg["lora"] = {"r": arm["rank"], "alpha": settings["lora_alpha_per_rank"] * arm["rank"]}
    return cfg


def train_group(group: list, base_dir, data_dir, settings: dict, ckpt_root: Path) -> tuple:
    """Train the arms of ``group`` that need it in one together run; ``({arm name: summary}, names trained)``.

    An arm with a ``summary.json`` (finished) or a solo checkpoint is left to
    :func:`rankwise.train.train` (reused or resumed); with fewer than two arms left nothing
    trains here. The run checkpoints into
    ``ckpt_root/<arms>`` and resumes from it when that checkpoint holds these arms with these settings.
    """
    todo = [a for a in group if not any((Path(a["output_dir"]) / n).exists() for n in (SUMMARY, CHECKPOINT))]
    if len(todo) < 2:
        return {}, []
    cfgs = [arm_config(a, base_dir, data_dir, settings) for a in todo]
    names = [a["name"] for a in todo]
    summaries = together.train_group(names, cfgs, str(Path(ckpt_root) / "+".join(names)))
    for a, summ in zip(todo, summaries):
        if summ.get("status") == "failed":
            raise ConfigError(f"demo arm {a['name']} (seed {a['seed']}) failed: {summ.get('reason')}")
    return dict(zip(names, summaries)), names
