"""Run every benchmark script and summarise them side by side.

    python -m benchmarks.run --suite cpu|gpu [--out DIR] [--smoke] [--only bench_lora,...]
    python -m benchmarks.run --summarize DIR

``--summarize`` rebuilds ``summary.md`` / ``summary.json`` from the script JSONs in
DIR, e.g. after a GPU session ran the scripts in several calls (one call has a
time limit) and their outputs were copied into one directory.

Writes one JSON per script plus ``summary.md`` (device, date, versions, and each
figure as a ratio against its baseline measured in the same run) into DIR,
by default ``benchmarks/results/<device>-<date>/``. A script that fails is
recorded as failed in the summary; the others still run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import RESULTS, device_slug, environment

SCRIPTS = ["bench_lora", "bench_nf4", "bench_loss", "bench_masking", "bench_train", "bench_sweep",
           "bench_sweep_step"]


def figures(name: str, payload: dict) -> list:
    """The headline figures of one script's JSON: its ``summary`` list when it has
    one (dicts with figure, value, unit, baseline, ratio), else its ``ratios`` rows."""
    if isinstance(payload.get("summary"), list) and payload["summary"]:
        return payload["summary"]
    out = []
    for row in payload.get("ratios", []) or []:
        label = ", ".join(f"{k}={v}" for k, v in row.items() if not isinstance(v, float))
        for k, v in row.items():
            if isinstance(v, float):
                out.append(dict(figure=f"{label}: {k}", value=v, unit="x", baseline=k.split("_vs_")[-1]))
    return out


def summary_markdown(env: dict, results: dict, suite: str, seconds: float) -> str:
    lines = [f"# rankwise benchmarks ({suite} suite)", "",
             f"- device: {env['device']}", f"- date: {env['date']}",
             f"- torch {env['torch']}, triton {env.get('triton')}, transformers {env.get('transformers')}, "
             f"peft {env.get('peft')}, bitsandbytes {env.get('bitsandbytes')}",
             f"- command: `python -m benchmarks.run --suite {suite.replace(' smoke', ' --smoke')}`", f"- wall time: {seconds:.0f} s", "",
             "Every ratio is against a baseline measured in the same run on the same machine.", ""]
    for name, res in results.items():
        lines.append(f"## {name}")
        lines.append("")
        if res.get("error"):
            lines += [f"failed: `{res['error']}`", ""]
            continue
        figs = res.get("figures", [])
        if not figs:
            lines += ["(no figures)", ""]
            continue
        lines += ["| figure | value | unit | baseline |", "| --- | ---: | --- | --- |"]
        for f in figs:
            v = f.get("value")
            vs = f"{v:.3g}" if isinstance(v, (int, float)) else str(v)
            lines.append(f"| {f.get('figure')} | {vs} | {f.get('unit', '')} | {f.get('baseline', '')} |")
        lines.append("")
    return "\n".join(lines)


def summarize(out: Path) -> int:
    """summary.md / summary.json from the ``bench_*.json`` files already in ``out``."""
    found = {name: json.loads((out / f"{name}.json").read_text()) for name in SCRIPTS if (out / f"{name}.json").exists()}
    if not found:
        raise SystemExit(f"--summarize: no benchmark JSON ({', '.join(SCRIPTS)}) in {out}")
    env = next(iter(found.values()))["env"]
    results = {name: dict(figures=figures(name, payload)) for name, payload in found.items()}
    suite = "gpu" if not str(env.get("device", "cpu")).startswith("cpu") else "cpu"
    md = summary_markdown(env, results, suite, float("nan"))
    md = md.replace("- wall time: nan s", f"- assembled from: {', '.join(sorted(found))} (separate runs)")
    (out / "summary.md").write_text(md + "\n")
    (out / "summary.json").write_text(json.dumps(dict(env=env, suite=suite, smoke=False, results=results,
                                                      assembled=True), indent=2) + "\n")
    print(f"wrote {out / 'summary.md'} from {len(found)} scripts")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="each script at its smallest size (seconds)")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(SCRIPTS))
    ap.add_argument("--summarize", default=None, metavar="DIR",
                    help="only rebuild DIR/summary.md and summary.json from the script JSONs in DIR")
    args = ap.parse_args(argv)
    if args.summarize:
        return summarize(Path(args.summarize))
    if args.suite == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--suite gpu needs a CUDA device")
    env = environment()
    out = Path(args.out) if args.out else RESULTS / f"{device_slug(env)}-{env['date'][:10]}"
    out.mkdir(parents=True, exist_ok=True)
    scripts = args.only.split(",") if args.only else SCRIPTS
    unknown = [s for s in scripts if s not in SCRIPTS]
    if unknown:
        raise SystemExit(f"--only: unknown scripts {unknown}; known: {SCRIPTS}")
    results = {}
    t0 = time.time()
    for name in scripts:
        t = time.time()
        print(f"== {name}", flush=True)
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
            argv_s = ["--out", str(out)] + (["--smoke"] if args.smoke else [])
            rc = mod.main(argv_s)
            if rc:
                raise RuntimeError(f"exit status {rc}")
            payload = json.loads((out / f"{name}.json").read_text())
            results[name] = dict(figures=figures(name, payload), seconds=time.time() - t)
        except Exception as e:  # record and go on
            traceback.print_exc()
            results[name] = dict(error=f"{type(e).__name__}: {e}", seconds=time.time() - t)
    md = summary_markdown(env, results, args.suite + (" smoke" if args.smoke else ""), time.time() - t0)
    (out / "summary.md").write_text(md + "\n")
    (out / "summary.json").write_text(json.dumps(dict(env=env, suite=args.suite, smoke=args.smoke,
                                                      results=results), indent=2) + "\n")
    print(f"wrote {out / 'summary.md'}")
    return 1 if any(r.get("error") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
