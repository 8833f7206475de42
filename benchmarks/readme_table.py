"""Regenerate README's performance table from the newest GPU results.

    python -m benchmarks.readme_table [--results DIR] [--readme README.md]

Reads ``benchmarks/results/<device>-<date>/summary.json`` (the newest one whose
device is not a CPU, or the one given; until a GPU run exists, the newest CPU
run's ratios, labelled as such) and rewrites the text between
``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->``. Never typed by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.common import RESULTS

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def newest_results(root: Path = RESULTS, gpu: bool = True):
    """The newest non-smoke ``summary.json`` of a GPU run (``gpu``) or of a CPU run."""
    found = []
    for p in root.glob("*/summary.json"):
        d = json.loads(p.read_text())
        on_cpu = str(d["env"].get("device", "cpu")).startswith("cpu")
        if not d.get("smoke") and on_cpu != gpu:
            found.append((d["env"]["date"], p))
    return max(found)[1] if found else None


def newest_gpu_results(root: Path = RESULTS):
    return newest_results(root, gpu=True)


def cpu_table(summary: dict, rel_dir: str, per_benchmark: int = 6) -> str:
    """Until a GPU run exists: the CPU run's ratios (unit x), a few per benchmark."""
    env = summary["env"]
    lines = ["No GPU results yet. On the CPU the Triton kernels run only under the interpreter, so these",
             "ratios compare torch paths (rankwise's reference paths against the baselines), measured in one",
             f"run on {env['device']}, {env['date'][:10]}, torch {env['torch']} "
             f"(`python -m benchmarks.run --suite cpu`; every figure in `{rel_dir}/summary.md`).", "",
             "| benchmark | figure | value | baseline |", "| --- | --- | ---: | --- |"]
    ratio = lambda f: f.get("unit") == "x" and isinstance(f.get("value"), (int, float))  # noqa: E731
    return "\n".join(lines + rows(summary, keep=ratio, limit=per_benchmark))


def rows(summary: dict, keep=lambda f: True, limit=None) -> list:
    """Table rows, one a figure that ``keep`` accepts (at most ``limit`` per benchmark)."""
    lines = []
    for name, res in summary["results"].items():
        if res.get("error"):
            lines.append(f"| {name} | failed: {res['error'][:80]} | | |")
            continue
        for f in [f for f in res.get("figures", []) if keep(f)][:limit]:
            v = f.get("value")
            vs = f"{v:.3g} {f.get('unit', '')}" if isinstance(v, (int, float)) else str(v)
            lines.append(f"| {name} | {f.get('figure')} | {vs} | {f.get('baseline', '')} |")
    return lines


def table(summary: dict, rel_dir: str) -> str:
    env = summary["env"]
    lines = [f"Measured on {env['device']}, {env['date'][:10]}, torch {env['torch']}, triton {env.get('triton')} "
             f"(`python -m benchmarks.run --suite {summary['suite']}`; raw JSON in `{rel_dir}`).", "",
             "| benchmark | figure | value | baseline |", "| --- | --- | ---: | --- |"]
    return "\n".join(lines + rows(summary))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=None, help="a results directory holding summary.json")
    ap.add_argument("--readme", default=str(Path(__file__).resolve().parent.parent / "README.md"))
    args = ap.parse_args(argv)
    path = Path(args.results) / "summary.json" if args.results else newest_gpu_results()
    render = table
    if path is None:
        path, render = newest_results(gpu=False), cpu_table
        if path is None:
            print("no results under benchmarks/results/; README left as it is")
            return 0
    summary = json.loads(Path(path).read_text())
    if args.results and str(summary["env"].get("device", "cpu")).startswith("cpu"):
        render = cpu_table
    readme = Path(args.readme)
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme}: markers {START} / {END} not found")
    rel_dir = os.path.relpath(Path(path).parent, readme.parent)
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + START + "\n" + render(summary, rel_dir) + "\n" + END + tail
    tmp = readme.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, readme)
    print(f"README table regenerated from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
