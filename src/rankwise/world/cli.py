"""``rankwise world``: build the synthetic knowledge world, pretrain its base model, measure mastery.

    rankwise world build --out DIR [--scale cpu|gpu] [--seed N] [--people N] [--force]
    rankwise world pretrain [--scale cpu|gpu] [--out DIR] [--steps N] [--force]
    rankwise world mastery --base DIR --world DIR --out FILE [--samples N] [--force]

Output directories are rankwise's (marker kind ``world``): a non-empty one that
rankwise did not make needs ``--force``. ``mastery``'s ``--out`` file may not lie
inside ``--base`` or ``--world``, and an existing file is replaced only with ``--force``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import ConfigError
from ..ownership import check_output, check_output_file, claim
from .generate import load_world
from .mastery import bucket_counts, measure
from .pretrain import build_world_dir, preset, pretrain, seeded


def add_arguments(parser) -> None:
    """Sub-verbs ``build``, ``pretrain`` and ``mastery``."""
    sub = parser.add_subparsers(dest="world_verb", metavar="SUBVERB")
    b = sub.add_parser("build", help="generate the world (people, facts, corpus, QA splits, tokenizer)")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--scale", default="cpu", choices=["cpu", "gpu"], help="world size preset")
    b.add_argument("--seed", type=int, default=None, help="world seed (default: the preset's)")
    b.add_argument("--people", type=int, default=None, help="number of people (default: the preset's)")
    b.add_argument("--force", action="store_true",
                   help="write into --out even if it is a non-empty directory rankwise did not make")
    p = sub.add_parser("pretrain", help="pretrain (or find cached) the world's base model")
    p.add_argument("--scale", default="cpu", choices=["cpu", "gpu"], help="world, model and training preset")
    p.add_argument("--out", default=None, help="directory for world/, pretrain/ and base/ "
                   "(default: a cache directory keyed by the settings)")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the preset's)")
    p.add_argument("--seed", type=int, default=None, help="the base's seed: its initialisation and data order "
                   "(default: the preset's; the world stays the same)")
    p.add_argument("--force", action="store_true", help="pretrain again even when cached; also allows an --out "
                   "that is a non-empty directory rankwise did not make")
    m = sub.add_parser("mastery", help="measure the mastery R and bucket of every study fact")
    m.add_argument("--base", required=True, help="base model directory (save_pretrained, with tokenizer)")
    m.add_argument("--world", required=True, help="world directory (from `world build`)")
    m.add_argument("--out", required=True, help="output jsonl: one fact per line with R and bucket")
    m.add_argument("--samples", type=int, default=4, help="samples per completion probe (temperature 0.7)")
    m.add_argument("--seed", type=int, default=0, help="sampling seed")
    m.add_argument("--force", action="store_true", help="replace --out if the file exists")


def _world_overrides(args) -> dict:
    w = {}
    if getattr(args, "seed", None) is not None:
        w["seed"] = args.seed
    if getattr(args, "people", None) is not None:
        w["n_people"] = args.people
    return w


def main(args) -> int:
    """Run the chosen sub-verb; returns the exit code."""
    verb = getattr(args, "world_verb", None)
    if verb == "build":
        s = preset(args.scale, {"world": _world_overrides(args)})
        check_output(args.out, force=args.force, flag="--out", kinds=["world"])
        claim(args.out, "world")
        out = build_world_dir(s["world"], args.out)
        w = load_world(out)
        seen = sum(p["exposures"] > 0 for p in w["people"])
        print(f"world in {out}: {len(w['people'])} people ({seen} in the corpus), "
              f"{len(w['facts'])} study facts, {len(w['corpus'])} corpus documents")
        return 0
    if verb == "pretrain":
        if args.steps is not None and args.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {args.steps}")

        over = {"train": {"max_steps": args.steps}} if args.steps else {}
        if args.seed is not None:
            over = seeded(over, args.seed)
        r = pretrain(args.scale, out_dir=args.out, overrides=over or None, force=args.force)
        state = "cached" if r["cached"] else ("the shipped base" if r["source"] == "shipped" else
                                              f"pretrained in {r['seconds']:.0f} s")
        print(f"base model ({state}): {r['base_dir']}")
        return 0
    if verb == "mastery":
        if args.samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {args.samples}")
        if not (Path(args.world) / "world.json").is_file():
            raise ConfigError(f"--world: no world.json in {args.world} (run `rankwise world build --out DIR`)")
        if not Path(args.base).is_dir():
            raise ConfigError(f"--base: {args.base} is not a model directory")
        check_output_file(args.out, inputs=[("base model", args.base), ("world", args.world)], force=args.force)

        world = load_world(args.world)
        facts = measure(args.base, world["facts"], num_samples=args.samples, temperature=0.7, max_new_tokens=4,
                        seed=args.seed)

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "".join(json.dumps(f) + "\n" for f in facts))
        print(json.dumps(bucket_counts(facts)))
        return 0
    print("usage: rankwise world {build,pretrain,mastery} ... (see rankwise world --help)", file=sys.stderr)
    return 2
