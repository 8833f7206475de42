"""Wall time of ``rankwise sweep`` over several ranks against the same arms run
one by one with ``rankwise train`` (the baseline that training several adapters
in one pass will have to beat).

    python -m benchmarks.bench_sweep [--out DIR] [--smoke] [--ranks 4,8,16]

The model is a small Llama built from a config with a word-level tokenizer
(no hub); the data is a toy closed-book QA set. Both sides use the same config,
seed and number of steps, after one untimed warm-up run (first-call costs:
imports, kernel and tokenizer caches). Reported: seconds per arm on each side
and the ratio of the totals. Today the sweep runs its arms one after the other.
"""
from __future__ import annotations

import argparse
import json
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


def build_setup(root: Path, hidden: int, layers: int, n_train: int) -> dict:
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
            "log": {"progress": False}, "output_dir": str(root / "unused")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--ranks", default=None, help="comma-separated ranks")
    args = ap.parse_args(argv)
    from rankwise.sweep import sweep
    from rankwise.train import train

    cuda = torch.cuda.is_available()
    if args.smoke:
        hidden, layers, steps, ranks = 32, 1, 3, [2, 4]
    elif cuda:
        hidden, layers, steps, ranks = 1024, 8, 100, [8, 16, 32, 64]
    else:
        hidden, layers, steps, ranks = 64, 2, 30, [4, 8, 16]
    if args.ranks:
        ranks = [int(r) for r in args.ranks.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = build_setup(root, hidden, layers, n_train=64)
        cfg["train"] = {"max_steps": steps, "batch_size": 8, "lr": 1e-3, "log_every": max(1, steps // 3),
                        "save_every": 0, "seed": 0}
        cfg["eval"] = {"every": 0, "generate": False}
        warm = json.loads(json.dumps(cfg))
        warm["train"]["max_steps"], warm["output_dir"] = 1, str(root / "warmup")
        train(warm)
        t0 = time.perf_counter()
        results = sweep(cfg, ranks, out_dir=str(root / "sweep"))
        sweep_s = time.perf_counter() - t0
        per_arm_sweep = {r_["arm"]: r_.get("runtime_s") for r_ in results}
        one_by_one = {}
        for r in ranks:
            c = json.loads(json.dumps(cfg))
            c["lora"]["r"] = r
            c["output_dir"] = str(root / f"single_r{r}")
            t = time.perf_counter()
            train(c)
            one_by_one[f"lora_r{r}"] = time.perf_counter() - t
    total_single = sum(one_by_one.values())
    payload = dict(benchmark="bench_sweep", env=environment(), ranks=ranks, steps=steps,
                   model=dict(hidden=hidden, layers=layers), sweep_total_s=sweep_s, sweep_arm_s=per_arm_sweep,
                   one_by_one_s=one_by_one, one_by_one_total_s=total_single,
                   summary=[dict(figure=f"sweep of {len(ranks)} ranks, wall time over one-by-one train",
                                 value=sweep_s / total_single, unit="x", baseline="rankwise train per arm"),
                            dict(figure="sweep wall time", value=sweep_s, unit="s", baseline="-"),
                            dict(figure="one-by-one wall time", value=total_single, unit="s", baseline="-")])
    path = write_json(payload, "bench_sweep", args.out)
    print(f"wrote {path}")
    print(f"  sweep {sweep_s:.1f}s vs one by one {total_single:.1f}s ({sweep_s / total_single:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
