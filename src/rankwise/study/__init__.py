"""``rankwise study CONFIG.yaml [--out DIR] [--force] [--fresh] [--plan [--tflops R]]``: a study's protocol on a real model and real data sets.

The config (``rankwise.study.config``) names the model and every arm's training keys, the experiments (a
training task and its evaluation sets, in and out of domain, read by ``rankwise.study_tasks`` from local files
or the Hub through ``datasets``), the arms (LoRA ranks, full SFT), the seeds and the bootstrap. Everything is
read and checked before the output directory is claimed: a bad key, a missing data set or a row off its schema
is one line, and nothing is written. The output directory holds the arms' runs (``arms/<experiment>/seed<N>/``),
the training rows (``data/``), each arm's per-item results (``eval/``), ``results.json`` (per arm and set: the
mean with its 95 % interval, n and per-seed values; the findings with their verdicts) and ``report.md``. A
study stopped for any reason continues where it was when run again.

Protocols: ``rank`` (``rankwise.study.rank``: LoRA ranks against full SFT on recall and reasoning tasks),
``knowledge`` (``rankwise.study.knowledge``: full SFT on EntityQuestions by data size and mastery level, and
restoration) and ``world`` (``rankwise.demo.protocol``: both studies on the embedded synthetic world, which is
what ``rankwise demo`` runs; its output directory is the demo's, with its cached stages).
"""
from __future__ import annotations

from pathlib import Path

from ..arm_cost import DEFAULT_TFLOPS
from ..config import load_yaml
from ..errors import ConfigError
from ..demo import protocol as world
from ..demo.report import headline
from ..ownership import check_output, claim
from .config import check_lm_eval_tasks, load_sets, validate_study
from .knowledge import load_knowledge, run_knowledge_study, validate_knowledge
from .knowledge import plan_lines as knowledge_plan_lines
from .rank import plan_lines, run_rank_study


def add_arguments(p) -> None:
    p.add_argument("config", help="the study's YAML config (see rankwise.study.config)")
    p.add_argument("--out", default=None, help="the output directory (default: the config's output_dir)")
    p.add_argument("--force", action="store_true", help="write into an existing directory rankwise did not make")
    p.add_argument("--fresh", action="store_true", help="study: world only: discard the output's cached stages "
                   "(as rankwise demo --fresh); the other protocols reuse only what was made with the same settings")
    p.add_argument("--plan", action="store_true", help="read and check everything, print the experiments' sizes and "
                   "the LoRA groups with their estimated peak memory and training time, and stop (nothing is written)")
    p.add_argument("--tflops", type=float, default=DEFAULT_TFLOPS,
                   help=f"with --plan (rank and knowledge studies): the sustained TFLOP/s the time estimates assume "
                   f"(default {DEFAULT_TFLOPS:g}, about half a 24 GB RTX 4090's dense bf16 peak; measure yours with "
                   "benchmarks/bench_train.py)")


def _inputs(cfg: dict) -> list:
    """The files the study reads, which its output may not be or hold."""
    paths = [("model", cfg["run"].get("model"))]
    if cfg["study"] == "knowledge":
        paths += [("data", cfg["knowledge"]["data"]), ("templates", cfg["knowledge"]["templates"])]
    for e in cfg.get("experiments", []):
        paths += [(f"{e['name']} data", s["data"]) for s in [e["train"], *e["eval"].values()]]
    return [(what, p) for what, p in paths if isinstance(p, str) and Path(p).exists()]


def prepare(raw: dict) -> tuple:
    """``(config, data)``: the study's checked config and everything it reads, before anything is written."""
    if isinstance(raw, dict) and raw.get("study") == "world":
        return world.validate_world(raw), None
    if isinstance(raw, dict) and raw.get("study") == "knowledge":
        cfg = validate_knowledge(raw)
        return cfg, load_knowledge(cfg)
    cfg = validate_study(raw)
    sets = load_sets(cfg)
    check_lm_eval_tasks(cfg)
    return cfg, sets


def main(args) -> int:
    raw = load_yaml(args.config)
    if args.out:
        raw["output_dir"] = args.out
    cfg, data = prepare(raw)
    if args.plan:
        if not args.tflops > 0:
            raise ConfigError(f"--tflops must be a positive rate, got {args.tflops}")
        print("\n".join(_plan(cfg, data, args.tflops)))
        return 0
    if args.fresh and cfg["study"] != "world":
        raise ConfigError(f"--fresh is for study: world (the demo's cached stages); study: {cfg['study']} reuses a "
                          "finished arm only when its settings are the config's")
    if cfg["study"] == "world":  # the demo's protocol claims its own directory (kind demo) and caches its stages
        res = world.run_world(cfg, fresh=args.fresh, force=args.force)
        _print_findings(res["findings"])
        print(f"report: {Path(cfg['output_dir']) / 'report.md'}  ({res['seconds']:.0f} s); {headline(res)}")
        return 0
    out = Path(cfg["output_dir"])
    check_output(out, force=args.force, flag="--out", kinds=["study"], inputs=_inputs(cfg))
    c = claim(out, "study", lock=True, flag="--out")
    try:
        c.commit()
        run = run_rank_study if cfg["study"] == "rank" else run_knowledge_study
        results = run(cfg, out, data)
    finally:
        c.release()
    _print_findings(results["findings"])
    print(f"results: {out / 'results.json'}, report: {out / 'report.md'}")
    return 0


def _print_findings(findings: list) -> None:
    for f in findings:
        eff = "-" if f["effect"] is None else f"{f['effect']:+.3f}"
        print(f"{f['id']}: {eff} {f['verdict']}")


def _plan(cfg: dict, data, tflops: float) -> list:
    """The lines ``--plan`` prints."""
    if cfg["study"] == "world":
        return world.plan_lines(cfg)
    return (plan_lines if cfg["study"] == "rank" else knowledge_plan_lines)(cfg, data, tflops)
