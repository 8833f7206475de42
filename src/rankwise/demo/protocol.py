"""``study: world``: the demo as a study config, so ``rankwise demo`` is ``rankwise study`` on the embedded world.

``rankwise demo --out DIR --scale S`` builds the config :func:`world_config` returns and runs it with
:func:`run_world`; ``rankwise study CONFIG.yaml`` runs the same function on a config file
(``examples/studies/world-cpu.yaml`` is the demo's), so both commands give the same results. Keys:

- ``study: world``;
- ``output_dir`` (default ``runs/demo``);
- ``scale``: ``cpu`` or ``gpu``, the world, base and protocol preset;
- ``settings``: overrides of the demo's settings (:data:`rankwise.demo.DEMO`, ``reasoning`` merged key by key);
- ``world``: ``{world|model|train: {...}}`` overrides of the pretraining preset (the bases are then pretrained
  and cached, not shipped);
- ``cache_dir``: where pretrained worlds and bases are cached (default: the user cache);
- ``threads``: torch CPU threads (default on a machine without CUDA: half the cores, at least 1).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ConfigError
from ..world import shipped
from ..world.pretrain import preset, seeded, settings_key
from .reasoning import plan as reasoning_plan
from .report import headline
from .run import check_world, plan_arms, run_demo, settings_for, ship_bases

KEYS = ("study", "output_dir", "scale", "settings", "world", "cache_dir", "threads")


def world_config(scale: str = "cpu", out: str = "runs/demo", threads: int | None = None) -> dict:
    """The demo's study config at ``scale`` writing to ``out`` (what ``rankwise demo`` runs)."""
    return {"study": "world", "output_dir": str(out), "scale": scale, "settings": {}, "world": {},
            "cache_dir": None, "threads": threads}


def validate_world(raw: Mapping) -> dict:
    """The checked ``study: world`` config, every key present; one ``ConfigError`` line for a bad key or value."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"study config must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"study config: unknown key {unknown[0]!r} for study: world (known: {', '.join(KEYS)})")
    cfg = {**world_config(), **raw}
    for key in ("settings", "world"):
        cfg[key] = {} if cfg[key] is None else cfg[key]
        if not isinstance(cfg[key], Mapping):
            raise ConfigError(f"study config: {key} must be a mapping, got {type(cfg[key]).__name__}")
        cfg[key] = dict(cfg[key])
    if not isinstance(cfg["output_dir"], (str, os.PathLike)) or not str(cfg["output_dir"]):
        raise ConfigError("study config: output_dir must be a path")
    if cfg["cache_dir"] is not None and not isinstance(cfg["cache_dir"], (str, os.PathLike)):
        raise ConfigError("study config: cache_dir must be a path or null")
    t = cfg["threads"]
    if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
        raise ConfigError(f"study config: threads must be a positive integer or null, got {t!r}")
    # the scale, every setting's name and value, the pretraining overrides, and a world the settings can use
    check_world(settings_for(cfg["scale"], cfg["settings"]), preset(cfg["scale"], cfg["world"]))
    return cfg


def plan_lines(cfg: dict) -> list:
    """What ``rankwise study --plan`` prints for the world: the seeds, the bases and every arm with its data."""
    s = settings_for(cfg["scale"], cfg["settings"])
    bases = {seed: preset(cfg["scale"], seeded(cfg["world"], seed)) for seed in s["seeds"]}
    m, n = bases[s["seeds"][0]]["model"], bases[s["seeds"][0]]["world"]["n_people"]
    ship = [seed for seed, b in bases.items() if shipped.entry_for(settings_key(b))]
    lines = [f"world ({cfg['scale']}): {n} people; one base per seed ({m['num_hidden_layers']} layers, hidden size "
             f"{m['hidden_size']}); seeds {s['seeds']}; shipped bases: {ship or 'none'}; pretrained on first use and "
             f"cached: {[seed for seed in s['seeds'] if seed not in ship] or 'none'}",
             "knowledge arms (each seed, on its base):"]
    lines += [f"  {a['name']}: {a['label']}" for a in plan_arms(s)]
    if s["reasoning"]:
        lines.append("reasoning arms (each seed, on its base): " +
                     ", ".join(a["name"] for a in reasoning_plan(s["reasoning"])))
    return lines


def set_threads(threads: int | None) -> None:
    """Torch's CPU threads: ``threads``, else half the cores on a machine without CUDA (a busy machine slows
    oversubscribed threads down many times over)."""
    if threads is not None:
        torch.set_num_threads(threads)
    elif not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


def run_world(cfg: dict, *, fresh: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Run the demo's studies as ``cfg`` (checked by :func:`validate_world`) says; returns the results."""
    set_threads(cfg["threads"])
    return run_demo(cfg["output_dir"], scale=cfg["scale"], fresh=fresh, settings=cfg["settings"] or None,
                    world_overrides=cfg["world"] or None, cache_dir=cfg["cache_dir"], progress=progress, force=force)


def add_arguments(parser) -> None:
    """Arguments of ``rankwise demo``."""
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--scale", default="cpu", choices=["cpu", "gpu"],
                        help="world, model and protocol preset: cpu (minutes on 2 cores) or gpu (the studies' "
                        "sizes: 240 vs 1,920 fine-tuning facts, a larger world and model; for one GPU)")
    parser.add_argument("--fresh", action="store_true", help="discard this output directory's cached stages "
                        "(the pretrained base stays cached; only a stage directory rankwise made is deleted)")
    parser.add_argument("--force", action="store_true",
                        help="use --out even if it is a non-empty directory rankwise did not make")
    parser.add_argument("--ship-bases", action="store_true",
                        help="for maintainers: pretrain the bases of the demo's seeds (or take them from the cache), "
                        "measure their mastery with the demo's settings, write both with their hashes into the "
                        "package's world/bases/ folder, and exit")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default on a CPU-only machine: half the cores, at least 1: "
                        "a busy machine slows oversubscribed threads down many times over)")


def main(args) -> int:
    """``rankwise demo``: ``rankwise study`` on the world config of ``--scale`` and ``--out``; returns 0."""
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    cfg = validate_world(world_config(args.scale, args.out, args.threads))
    if args.ship_bases:
        set_threads(cfg["threads"])
        for entry in ship_bases(args.scale):
            print(f"seed {entry['seed']}: {shipped.SHIPPED_DIR / entry['dir']}")
        return 0
    res = run_world(cfg, fresh=args.fresh, force=args.force)
    print(f"report: {Path(args.out) / 'report.md'}  ({res['seconds']:.0f} s); {headline(res)}")
    return 0
