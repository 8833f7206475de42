"""``torchrun --nproc-per-node 2 rankwise sweep ... --together --group-size G`` against the same sweep in one process.

    python -m benchmarks.bench_sweep_torchrun [--out DIR] [--smoke] [--repeat N] [--ranks 1,2,4,8] [--group-size 2]

Both sides are the ``rankwise sweep`` command (``python -m rankwise.cli``), one thread per process
(``OMP_NUM_THREADS=1``), on a small Llama built from a config with a word-level tokenizer (no hub) and a toy
closed-book QA set (``benchmarks.bench_sweep.build_setup``); each run starts from an empty sweep directory. The
wall time is the whole command's, startup included (the model is sized so that training dominates it). With
``--repeat`` the sides alternate and the figures take each side's best time (every sample is in the JSON). The
JSON also records the largest relative difference of any arm's ``scaling * B @ A`` between the two sides (the
issue's target: <= 1e-4, and the two-process sweep in <= 0.8x the one-process wall time).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

from benchmarks.bench_sweep import build_setup, load_average
from benchmarks.common import environment, write_json


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_side(config: Path, ranks: str, group_size: int, out: Path, processes: int) -> dict:
    """One ``rankwise sweep`` command, in ``processes`` processes (torchrun when more than one): its wall time."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
                "127.0.0.1", "--master-port", str(free_port())] if processes > 1 else [sys.executable]
    cmd = launcher + ["-m", "rankwise.cli", "sweep", str(config), "--ranks", ranks, "--together", "--group-size",
                      str(group_size), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    load0, w0 = load_average(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - w0
    if proc.returncode != 0:
        raise RuntimeError(f"bench_sweep_torchrun: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "load_avg": [load0, load_average()]}


def deltas(arm_dir: Path) -> dict:
    conf = json.loads((arm_dir / "adapter" / "adapter_config.json").read_text())
    scaling = conf["lora_alpha"] / (conf["r"] ** 0.5 if conf.get("use_rslora") else conf["r"])
    w = load_file(arm_dir / "adapter" / "adapter_model.safetensors")
    return {k: scaling * w[k.replace("lora_A", "lora_B")].double() @ w[k].double() for k in w if "lora_A" in k}


def max_relative_difference(a: Path, b: Path, arms: list) -> float:
    worst = 0.0
    for arm in arms:
        da, db = deltas(a / "arms" / arm), deltas(b / "arms" / arm)
        worst = max([worst] + [float((da[k] - db[k]).norm() / db[k].norm()) for k in db])
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--ranks", default="1,2,4,8")
    ap.add_argument("--group-size", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=None, help="runs of each side, alternating (default 2, smoke 1)")
    ap.add_argument("--steps", type=int, default=1000, help="training steps of every arm (not with --smoke)")
    args = ap.parse_args(argv)
    hidden, layers, steps = (32, 1, 3) if args.smoke else (128, 4, args.steps)
    repeat = args.repeat or (1 if args.smoke else 2)
    arms = [f"lora_r{r}" for r in args.ranks.split(",")]
    samples = {"one_process": [], "torchrun_2": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = build_setup(root, hidden, layers, n_train=64, steps=steps)
        config = root / "sweep.yaml"
        config.write_text(yaml.safe_dump(cfg))
        rel = 0.0
        for j in range(repeat):  # alternating, so a busy spell of a shared machine hits both sides
            for side, n in (("torchrun_2", 2), ("one_process", 1)):
                samples[side].append(run_side(config, args.ranks, args.group_size, root / f"{side}_{j}", n))
            rel = max(rel, max_relative_difference(root / f"torchrun_2_{j}", root / f"one_process_{j}", arms))
    best = {side: min(x["wall_s"] for x in xs) for side, xs in samples.items()}
    ratio = best["torchrun_2"] / best["one_process"]
    pairs = [t["wall_s"] / o["wall_s"] for t, o in zip(samples["torchrun_2"], samples["one_process"])]
    summary = [dict(figure=f"torchrun 2-process together sweep of ranks {args.ranks} (groups of {args.group_size}), "
                           "wall time over one process", value=ratio, unit="x", baseline="the same sweep, one process"),
               dict(figure="largest relative difference of an arm's scaling*B@A, 2 processes vs 1", value=rel,
                    unit="", baseline="one process"),
               dict(figure="one-process sweep, wall time", value=best["one_process"], unit="s", baseline="-"),
               dict(figure="torchrun 2-process sweep, wall time", value=best["torchrun_2"], unit="s", baseline="-")]
    env = environment()
    env["cpu_threads"] = 1  # per process: OMP_NUM_THREADS=1 in every command measured
    payload = dict(benchmark="bench_sweep_torchrun", env=env, cpu_count=os.cpu_count(), steps=steps,
                   model=dict(hidden=hidden, layers=layers), ranks=args.ranks, group_size=args.group_size,
                   threads_per_process=1, repeat=repeat, samples=samples, best=best, wall_ratio=ratio,
                   pair_wall_ratios=pairs, max_rel_diff=rel, summary=summary)
    path = write_json(payload, "bench_sweep_torchrun", args.out)
    print(f"wrote {path}")
    print(f"  one process {best['one_process']:.2f}s, torchrun x2 {best['torchrun_2']:.2f}s: {ratio:.2f}x "
          f"(pairs {', '.join(f'{p:.2f}' for p in pairs)}); max relative difference of scaling*B@A {rel:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
