"""Build the world's files and pretrain its small Llama base model, cached.

The base model is pretrained with the project's own loop (:func:`rankwise.train.train`,
``method: full``) on the corpus, written as prompt_completion rows with an empty prompt
(so every corpus token is a target) and packed. The result is a plain
``save_pretrained`` directory holding the model and the tokenizer, which later steps
load with ``from_pretrained`` like any hub model.

Everything is cached under ``cache_root()/<key>/`` where the key hashes the world,
model and training settings: ``world/`` (world.json, corpus.jsonl, facts.jsonl,
tokenizer), ``pretrain/`` (the training run, resumable) and ``base/`` (the final model).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from ..errors import ConfigError
from ..model import load_tokenizer
from ..ownership import check_output, claim
from ..train import train
from .generate import WorldConfig, all_texts, generate_world, load_world, save_world
from . import shipped
from .reasoning import reasoning_vocabulary
from .tokenizer import build_tokenizer, save_tokenizer

log = logging.getLogger("rankwise")

FORMAT_VERSION = 3  # bump when the files or the recipe change in a way the settings do not show

# Presets. "cpu": a few minutes on 2 CPU cores; "gpu": a larger world and model for one GPU.
SCALES = {
    "cpu": {
        "world": {"n_people": 640, "max_exposures": 16, "anchor_fraction": 0.3, "test_fraction": 0.75,
                  "geography_docs": 80},
        "model": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "intermediate_size": 512, "max_position_embeddings": 256, "seed": 0},
        "train": {"max_steps": 1000, "batch_size": 4, "grad_accum": 4, "lr": 6.0e-3, "warmup": 0.08,
                  "schedule": "cosine", "weight_decay": 0.0, "max_length": 128, "seed": 0},
    },
    "gpu": {
        "world": {"n_people": 5000, "max_exposures": 40, "geography_docs": 80},
        "model": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                  "intermediate_size": 2048, "max_position_embeddings": 256, "seed": 0},
        "train": {"max_steps": 6000, "batch_size": 64, "grad_accum": 1, "lr": 1.0e-3, "warmup": 0.03,
                  "schedule": "cosine", "weight_decay": 0.0, "max_length": 128, "seed": 0},
    },
}


def preset(scale: str = "cpu", overrides: dict | None = None) -> dict:
    """The settings of a scale (``cpu`` or ``gpu``), with ``overrides`` ({section: {key: value}}) applied."""
    if scale not in SCALES:
        raise ConfigError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    s = copy.deepcopy(SCALES[scale])
    for section, values in (overrides or {}).items():
        if section not in s:
            raise ConfigError(f"unknown settings section {section!r} (expected one of {', '.join(s)})")
        if not isinstance(values, dict):
            raise ConfigError(f"settings section {section!r} must be a mapping, got {values!r}")
        if section != "world":
            unknown = set(values) - set(s[section])
            if unknown:
                raise ConfigError(f"unknown {section} settings: {sorted(unknown)}")
        s[section].update(values)
    WorldConfig.from_dict(s["world"])  # validates the world keys
    return s


def seeded(overrides: dict | None, seed: int) -> dict:
    """``overrides`` with the base's seed set: the model's initialisation and the pretraining's data order.
    The world keeps its own seed, so the bases of different seeds know the same world."""
    out = copy.deepcopy(overrides or {})
    out.setdefault("model", {})["seed"] = int(seed)
    out.setdefault("train", {})["seed"] = int(seed)
    return out


def cache_root() -> Path:
    """``$RANKWISE_CACHE`` if set, else ``$XDG_CACHE_HOME/rankwise`` or ``~/.cache/rankwise``."""
    env = os.environ.get("RANKWISE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rankwise"


def settings_key(settings: dict) -> str:
    """A short hash of the full settings (world config resolved to all its fields)."""
    full = {"version": FORMAT_VERSION, "world": WorldConfig.from_dict(settings["world"]).to_dict(),
            "model": settings["model"], "train": settings["train"]}
    return hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:12]


def build_world_dir(world_settings: dict, out_dir) -> Path:
    """Generate the world and its tokenizer into ``out_dir`` (skipped when already there)."""
    out = Path(out_dir)
    done = out / "BUILT"
    cfg = WorldConfig.from_dict(world_settings)
    if done.exists() and done.read_text().strip() == cfg.digest():
        return out
    world = generate_world(cfg)
    save_world(world, out)
    save_tokenizer(build_tokenizer(all_texts(world) + reasoning_vocabulary()), out / "tokenizer")
    atomic_write_text(done, cfg.digest() + "\n")
    return out


def write_pretrain_rows(world: dict, path) -> Path:
    """The corpus as prompt_completion rows with an empty prompt (one document per row)."""
    atomic_write_text(path, "".join(json.dumps({"prompt": "", "completion": doc}) + "\n" for doc in world["corpus"]))
    return Path(path)


def init_model(tokenizer_dir, model_settings: dict, out_dir) -> Path:
    """A randomly initialised ``LlamaForCausalLM`` saved with its tokenizer into ``out_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy at import: transformers

    tok = load_tokenizer(str(tokenizer_dir))
    m = dict(model_settings)
    seed = int(m.pop("seed", 0))
    heads = m["num_attention_heads"]
    config = LlamaConfig(vocab_size=len(tok), num_key_value_heads=heads, tie_word_embeddings=True,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, rms_norm_eps=1e-5, **m)
    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def train_config(settings: dict, model_dir, rows_path, output_dir, progress: bool = True) -> dict:
    """The ``rankwise.train`` config that pretrains ``model_dir`` on ``rows_path``."""
    t = settings["train"]
    return {
        "model": str(model_dir),
        "method": "full",
        "dtype": "fp32",
        "data": {"train": str(rows_path), "format": "prompt_completion", "max_length": int(t["max_length"]),
                 "packing": True, "add_eos": True},
        "train": {"max_steps": int(t["max_steps"]), "batch_size": int(t["batch_size"]),
                  "grad_accum": int(t["grad_accum"]), "lr": float(t["lr"]), "schedule": t["schedule"],
                  "warmup": float(t["warmup"]), "weight_decay": float(t["weight_decay"]),
                  "betas": [0.9, 0.98], "seed": int(t["seed"]),
                  "log_every": max(1, min(50, int(t["max_steps"]) // 10)),
                  "save_every": max(50, int(t["max_steps"]) // 4)},
        "eval": {"every": 0, "generate": False},
        "log": {"progress": progress},
        "output_dir": str(output_dir),
    }


def pretrain(scale: str = "cpu", out_dir=None, overrides: dict | None = None, progress: bool = True,
             force: bool = False) -> dict:
    """Build the world (if needed) and pretrain its base model (if not cached).

    Args:
        scale: ``cpu`` or ``gpu`` preset.
        out_dir: where to keep world/, pretrain/ and base/ (default: ``cache_root()/<key>``).
        overrides: ``{"world"|"model"|"train": {key: value}}`` changes to the preset.
        progress: show the training progress bar.
        force: pretrain again even if ``base/`` exists; also allows an ``out_dir`` that is a
            non-empty directory rankwise did not make (otherwise refused: world/, pretrain/ and
            base/ are replaced there).

    Without a finished ``base/``, the shipped base of these settings (:mod:`rankwise.world.shipped`)
    is installed when there is one and it passes its checks; otherwise the base is pretrained here.

    Returns:
        ``{"dir", "world_dir", "base_dir", "settings", "key", "seconds", "cached", "source", "why_pretrained"}``:
        ``source`` is ``shipped`` or ``pretrained`` (where the base came from, cached or not);
        ``why_pretrained`` says why a base pretrained by this call did not come from the shipped ones.
    """
    settings = preset(scale, overrides)
    key = settings_key(settings)
    root = Path(out_dir) if out_dir else cache_root() / f"world-{scale}-{key}"
    if out_dir:  # a directory the user named: rankwise's (a world) or forced; the cache is rankwise's by name
        check_output(root, force=force, flag="--out", kinds=["world"])
    claim(root, "world")
    atomic_write_text(root / "settings.json", json.dumps({"scale": scale, "key": key, **settings}, indent=1))
    base = root / "base"
    t0 = time.time()
    world_dir = build_world_dir(settings["world"], root / "world")
    found = {"dir": root, "world_dir": world_dir, "base_dir": base, "settings": settings, "key": key, "seconds": 0.0}
    done = _read_done(base)
    if done is not None and not force:
        entry = shipped.entry_for(key) if done.get("source") == "shipped" else None
        if entry is None or shipped.check_files(base, entry) is None:  # a shipped base is checked at every load
            return {**found, "cached": True, "source": done.get("source", "pretrained"), "why_pretrained": None}
    why = "--force" if force else shipped.install(key, world_dir / "tokenizer", base)
    if why is None:
        atomic_write_text(base / "DONE", json.dumps({"seconds": 0.0, "key": key, "source": "shipped"}) + "\n")
        return {**found, "seconds": time.time() - t0, "cached": False, "source": "shipped", "why_pretrained": None}
    if shipped.entry_for(key) is not None and not force:
        log.warning("the shipped base of these settings is not used (%s): pretraining it here instead", why)

    world = load_world(world_dir)
    rows = write_pretrain_rows(world, root / "pretrain_rows.jsonl")
    init = root / "init"
    if not (init / "config.json").exists():
        init_model(world_dir / "tokenizer", settings["model"], init)
    run_dir = root / "pretrain"
    # resume=True: an interrupted pretraining continues from its last checkpoint
    result = train(train_config(settings, init, rows, run_dir, progress=progress), resume=True)
    model_dir = Path(result.get("output_dir", run_dir)) / "model"
    tmp = base.with_name("base.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    load_tokenizer(str(world_dir / "tokenizer")).save_pretrained(str(tmp))
    secs = time.time() - t0
    atomic_write_text(tmp / "DONE", json.dumps({"seconds": secs, "key": key, "source": "pretrained"}) + "\n")
    shutil.rmtree(base, ignore_errors=True)
    os.replace(tmp, base)
    return {**found, "seconds": secs, "cached": False, "source": "pretrained", "why_pretrained": why,
            "metrics": {k: v for k, v in result.items() if k != "output_dir"}}


def _read_done(base: Path) -> dict | None:
    """The ``DONE`` record of a finished base (``{}`` for an old one without JSON), or None."""
    try:
        text = (base / "DONE").read_text()
    except OSError:
        return None
    try:
        got = json.loads(text)
    except ValueError:
        return {}
    return got if isinstance(got, dict) else {}
