"""``rankwise analyze RUN_DIR... --base MODEL --probe DATA --out DIR``.

Writes ``analysis.json``, PNG plots and ``analysis.md`` (a markdown section) for
the given runs against their base model. ``--out`` is rankwise's (marker kind
``analyze``): it may not be, lie inside or contain a run or the base model, and
an existing non-empty directory rankwise did not make needs ``--force``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from ..errors import ConfigError
from .runs import analyze_runs, load_jsonl


def _fractions(text: str) -> list:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated percentages, got {text!r}") from None
    if not vals or any(not (0 < v <= 100) for v in vals):
        raise argparse.ArgumentTypeError(f"percentages must lie in (0, 100], got {text!r}")
    return [v / 100.0 for v in vals]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``analyze`` verb's arguments."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories (adapter/ for LoRA, model/ for full or masked SFT)")
    parser.add_argument("--base", default=None,
                        help="base model directory (or a name in the local HF cache); default: the 'model' "
                             "of the runs' resolved_config.yaml (config.yaml in older runs)")
    parser.add_argument("--probe", default=None,
                        help="probe jsonl (prompt, optional bucket) for attention, CKA and token KL")
    parser.add_argument("--out", required=True, help="output directory (outside the runs and the base model)")
    parser.add_argument("--force", action="store_true",
                        help="write into --out even if it is a non-empty directory rankwise did not make")
    parser.add_argument("--device", default=None, help="analysis device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype for the probe pass (auto: bf16 on a GPU that supports it, fp16 on "
                             "other GPUs, fp32 on the CPU)")
    parser.add_argument("--max-probe", type=int, default=256, help="use at most this many probe rows (default 256)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256, help="prompt tokens kept (the last ones)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="tokens sampled for CKA")
    parser.add_argument("--no-intruders", action="store_true", help="skip intruder dimensions (saves two SVDs per matrix)")
    parser.add_argument("--intruder-k", type=int, default=10)
    parser.add_argument("--intruder-eps", type=float, default=0.5)
    parser.add_argument("--no-attention", action="store_true", help="skip attention entropy / JS distance")
    parser.add_argument("--no-cka", action="store_true", help="skip hidden-state CKA")
    parser.add_argument("--no-kl", action="store_true", help="skip first-answer-token KL")
    parser.add_argument("--restore", action="append", default=[], metavar="[NAME=]EVAL.jsonl",
                        help="eval set for restoration curves of full/masked runs (repeatable, e.g. "
                             "in_domain=test_in.jsonl out_of_domain=test_out.jsonl)")
    parser.add_argument("--restore-fractions", type=_fractions, default=[0.01, 0.03, 0.05, 0.1, 0.2, 0.4, 0.6],
                        metavar="PCTS", help="restored percentages (default 1,3,5,10,20,40,60)")
    parser.add_argument("--restore-selections", default="top,bottom,random",
                        help="comma-separated subset of top,bottom,random")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random restoration control")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _parse_restore(specs) -> dict:
    sets = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            name = os.path.splitext(os.path.basename(spec))[0]
        if not name or not path:
            raise ConfigError(f"--restore expects [NAME=]PATH, got {spec!r}")
        if name in sets:
            raise ConfigError(f"--restore: eval set name {name!r} given twice")
        if not os.path.isfile(path):
            raise ConfigError(f"--restore: eval file {path!r} does not exist")
        sets[name] = load_jsonl(path)
    return sets


def main(args) -> int:
    """Run the analysis and print where the outputs went."""
    t0 = time.time()

    for name in ("max_probe", "batch_size", "max_length", "max_tokens", "intruder_k"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    probe_rows = None
    if args.probe:
        if not os.path.isfile(args.probe):
            raise ConfigError(f"--probe: file {args.probe!r} does not exist")
        probe_rows = load_jsonl(args.probe)[: args.max_probe]
    selections = [s.strip() for s in args.restore_selections.split(",") if s.strip()]
    analysis = analyze_runs(
        args.run_dirs, args.base, probe_rows, args.out,
        device=args.device, dtype=args.dtype,
        intruders=not args.no_intruders, intruder_k=args.intruder_k, intruder_eps=args.intruder_eps,
        attention=not args.no_attention, representations=not args.no_cka, tokens=not args.no_kl,
        batch_size=args.batch_size, max_length=args.max_length, max_tokens=args.max_tokens,
        restore_sets=_parse_restore(args.restore) or None, restore_fractions=args.restore_fractions,
        restore_selections=selections, seed=args.seed, plots=not args.no_plots, progress=not args.quiet,
        force=args.force,
    )
    files = analysis["files"]
    print(f"wrote {os.path.join(args.out, files['json'])}, {os.path.join(args.out, files['markdown'])} "
          f"and {len(files['plots'])} plot(s) in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0
