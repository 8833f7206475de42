"""``rankwise sweep --together`` against the same sweep run arm after arm, for K = 4 and 8 ranks.

    python -m benchmarks.bench_sweep [--out DIR] [--smoke] [--ranks 4,8,16]

The model is a small Llama built from a config with a word-level tokenizer
(no hub); the data is a toy closed-book QA set. Both sides are ``rankwise.sweep.sweep``
calls on the same config, seed and number of steps (each arm the run ``rankwise train``
makes of it), one with ``together=True``; each starts from an empty sweep directory,
after untimed warm-up runs of both (first-call costs: imports, kernel and tokenizer
caches). Reported per K: wall time, CPU time of the process with torch on one thread
(``time.process_time``), on CUDA the peak allocated memory, and the ratios
together / sequential (the issue's target on a CPU: wall time at most 0.6x for K = 4).
On a GPU the whole sweeps use a small model; the JSON's ``step_1b`` (and its summary figures)
adds ``bench_sweep_step``'s measurement: the training step of a 1B-class Llama shape at
micro-batches 1x512 and 4x2048, K = 4 and 8, stacked against the K solo steps.
Each side runs ``--repeat`` times, alternating; the figures take each side's
best time (every sample is in the JSON): on a shared machine the minimum is the
least disturbed measure of the work itself. Because the load of a shared machine
drifts, the JSON also holds the ratio of each alternating pair (a together run
and the sequential run right after it) with their median and worst, and the
1-minute load average before and after each run (``/proc/loadavg``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import environment, write_json

CITIES = ["Paris", "Oslo", "Lima", "Rome", "Cairo", "Quito", "Bern", "Doha", "Kyiv", "Riga"]


def qa_rows(n, offset=0):
    return [{"prompt": f"Q: where was p{i} born ? A:", "completion": f" {CITIES[(i * 7) % len(CITIES)]}",
             "answers": [CITIES[(i * 7) % len(CITIES)]]} for i in range(offset, offset + n)]


def build_setup(root: Path, hidden: int, layers: int, n_train: int, steps: int) -> dict:
    """A small Llama (word-level tokenizer, no hub), a toy QA set, and the sweep config training it ``steps`` steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankwise.world.tokenizer import build_tokenizer, save_tokenizer

    train, ev = qa_rows(n_train), qa_rows(32, 1000)
    tok = build_tokenizer([r["prompt"] + r["completion"] for r in train + ev])
    model_dir = root / "model"
    save_tokenizer(tok, model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden + 8,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    paths = {}
    for name, rows in (("train", train), ("eval", ev)):
        p = root / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[name] = str(p)
    return {"model": str(model_dir), "method": "lora",
            "lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "data": {"train": paths["train"], "eval": paths["eval"], "max_length": 48},
            "train": {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "log_every": max(1, steps // 3),
                      "save_every": 0, "seed": 0},
            "eval": {"every": 0, "generate": False},
            "log": {"progress": False}, "output_dir": str(root / "unused")}


def load_average():
    """The 1-minute load average (None where ``os.getloadavg`` is not available)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_side(cfg, ranks, out, together: bool) -> dict:
    """One sweep (``together`` or arm after arm) into ``out``: wall, CPU time and peak memory."""
    from rankwise.sweep import sweep

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    load0 = load_average()
    w0, c0 = time.perf_counter(), time.process_time()
    rows = sweep(cfg, ranks, out_dir=str(out), together=together)
    if cuda:
        torch.cuda.synchronize()
    res = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0, "load_avg": [load0, load_average()],
           "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
           "arms": {r["arm"]: r["status"] for r in rows}}
    failed = [a for a, st in res["arms"].items() if st != "finished"]
    if failed:
        raise RuntimeError(f"bench_sweep: arms {failed} failed")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--ranks", default=None, help="comma-separated ranks: one K instead of the default K = 4, 8")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs of each side, alternating (default: 5, smoke 1; on a shared machine one run's "
                         "ratio moves by about +-0.07 with the load)")
    args = ap.parse_args(argv)
    from rankwise.sweep import sweep

    cuda = torch.cuda.is_available()
    if args.smoke:
        hidden, layers, steps, rank_sets = 32, 1, 3, [[2, 4]]
    elif cuda:
        hidden, layers, steps, rank_sets = 1024, 8, 100, [[1, 8, 32, 128], [1, 2, 4, 8, 16, 32, 64, 128]]
    else:
        hidden, layers, steps, rank_sets = 128, 2, 30, [[1, 4, 16, 64], [1, 2, 4, 8, 16, 32, 48, 64]]
    if args.ranks:
        rank_sets = [[int(r) for r in args.ranks.split(",")]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time with one thread: the work each side does, not how it spreads
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            cfg = build_setup(root, hidden, layers, n_train=64, steps=steps)
            warm = json.loads(json.dumps(cfg))
            warm["train"]["max_steps"] = 1
            for together in (False, True):
                sweep(warm, rank_sets[0][:2], out_dir=str(root / f"warmup_{together}"), together=together)
            runs = []
            repeat = args.repeat or (1 if args.smoke else 5)
            for i, ranks in enumerate(rank_sets):
                samples = {"sequential": [], "together": []}
                for j in range(repeat):  # alternating, so a busy spell of a shared machine hits both sides
                    for side in ("together", "sequential"):
                        samples[side].append(run_side(cfg, ranks, root / f"{side}_{i}_{j}", side == "together"))
                best = {side: {m: min(x[m] for x in xs) for m in ("wall_s", "cpu_s")} | {
                    "peak_mem_mb": xs[0]["peak_mem_mb"], "samples": xs} for side, xs in samples.items()}
                seq, tog = best["sequential"], best["together"]
                pairs = [t["wall_s"] / s["wall_s"] for t, s in zip(samples["together"], samples["sequential"])]
                runs.append({"K": len(ranks), "ranks": ranks, "repeat": repeat, "sequential": seq, "together": tog,
                             "wall_ratio": tog["wall_s"] / seq["wall_s"], "cpu_ratio": tog["cpu_s"] / seq["cpu_s"],
                             "pair_wall_ratios": pairs, "pair_wall_ratio_median": statistics.median(pairs),
                             "pair_wall_ratio_worst": max(pairs)})
    finally:
        torch.set_num_threads(threads)
    summary = []
    for r in runs:
        K = r["K"]
        summary += [dict(figure=f"together sweep of {K} ranks, wall time over the sequential sweep",
                         value=r["wall_ratio"], unit="x", baseline="rankwise sweep, arm after arm"),
                    dict(figure=f"together sweep of {K} ranks, wall time over the sequential run right after it "
                                f"(median of {r['repeat']} alternating pairs)", value=r["pair_wall_ratio_median"],
                         unit="x", baseline="rankwise sweep, arm after arm"),
                    dict(figure=f"together sweep of {K} ranks, CPU time (1 thread) over the sequential sweep",
                         value=r["cpu_ratio"], unit="x", baseline="rankwise sweep, arm after arm"),
                    dict(figure=f"together sweep of {K} ranks, wall time", value=r["together"]["wall_s"], unit="s",
                         baseline="-"),
                    dict(figure=f"sequential sweep of {K} ranks, wall time", value=r["sequential"]["wall_s"],
                         unit="s", baseline="-")]
        if r["together"]["peak_mem_mb"] is not None:
            summary.append(dict(figure=f"together sweep of {K} ranks, peak memory over the sequential sweep's",
                                value=r["together"]["peak_mem_mb"] / r["sequential"]["peak_mem_mb"], unit="x",
                                baseline="rankwise sweep, arm after arm"))
    step_1b = None
    if cuda and not args.smoke and not args.ranks:  # the GPU figures: the 1B-shape step, 1x512 and 4x2048
        from benchmarks import bench_sweep_step

        d = bench_sweep_step.defaults(cuda=True, smoke=False)
        step_runs, step_summary = bench_sweep_step.run(d["shape"], d["micros"], d["rank_sets"], d["steps"])
        step_1b = dict(shape=d["shape"], model=bench_sweep_step.SHAPES[d["shape"]], steps=d["steps"], runs=step_runs)
        summary += step_summary
    payload = dict(benchmark="bench_sweep", env=environment(), steps=steps, model=dict(hidden=hidden, layers=layers),
                   torch_threads=1, niceness=os.nice(0), runs=runs, summary=summary, step_1b=step_1b)
    path = write_json(payload, "bench_sweep", args.out)
    print(f"wrote {path}")
    for r in runs:
        print(f"  K={r['K']} {r['ranks']}: together {r['together']['wall_s']:.2f}s vs sequential "
              f"{r['sequential']['wall_s']:.2f}s wall ({r['wall_ratio']:.2f}x; pairs: median "
              f"{r['pair_wall_ratio_median']:.2f}x, worst {r['pair_wall_ratio_worst']:.2f}x), CPU {r['cpu_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
