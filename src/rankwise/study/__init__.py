"""``rankwise study CONFIG.yaml [--out DIR] [--force]``: a study's protocol on a real model and real data sets.

The config (``rankwise.study.config``) names the model and every arm's training keys, the experiments (a
training task and its evaluation sets, in and out of domain, read by ``rankwise.study_tasks`` from local files
or the Hub through ``datasets``), the arms (LoRA ranks, full SFT), the seeds and the bootstrap. Everything is
read and checked before the output directory is claimed: a bad key, a missing data set or a row off its schema
is one line, and nothing is written. The output directory holds the arms' runs (``arms/<experiment>/seed<N>/``),
the training rows (``data/``), each arm's per-item results (``eval/``), ``results.json`` (per arm and set: the
mean with its 95 % interval, n and per-seed values; the findings with their verdicts) and ``report.md``. A
study stopped for any reason continues where it was when run again.

Protocols: ``rank`` (``rankwise.study.rank``: LoRA ranks against full SFT on recall and reasoning tasks) and
``knowledge`` (``rankwise.study.knowledge``: full SFT on EntityQuestions by data size and mastery level, and
restoration).
"""
from __future__ import annotations

from pathlib import Path

from ..arm_memory import estimate_full_peak_bytes
from ..config import load_yaml, parse
from ..ownership import check_output, claim
from .config import check_lm_eval_tasks, load_sets, validate_study
from .knowledge import load_knowledge, run_config, run_knowledge_study, validate_knowledge
from .rank import plan_lines, run_rank_study


def add_arguments(p) -> None:
    p.add_argument("config", help="the study's YAML config (see rankwise.study.config)")
    p.add_argument("--out", default=None, help="the output directory (default: the config's output_dir)")
    p.add_argument("--force", action="store_true", help="write into an existing directory rankwise did not make")
    p.add_argument("--plan", action="store_true", help="read and check everything, print the experiments' sizes and "
                   "the LoRA groups with their estimated peak memory, and stop (nothing is written)")


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
        lines = plan_lines(cfg, data) if cfg["study"] == "rank" else [
            f"knowledge: {len(data['train'])} training facts, {len(data['test']['in'])} in-domain and "
            f"{len(data['test']['out'])} out-of-domain test facts; sizes {cfg['knowledge']['sizes']} x "
            f"{cfg['knowledge']['draws']} draw(s); {len(cfg['seeds'])} seed(s); each full-SFT arm about "
            f"{estimate_full_peak_bytes(parse(run_config(cfg, 'train.jsonl', 'plan', 0))) / 2**30:.1f} GiB at peak "
            "(estimate)"]
        print("\n".join(lines))
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
    for f in results["findings"]:
        eff = "-" if f["effect"] is None else f"{f['effect']:+.3f}"
        print(f"{f['id']}: {eff} {f['verdict']}")
    print(f"results: {out / 'results.json'}, report: {out / 'report.md'}")
    return 0
