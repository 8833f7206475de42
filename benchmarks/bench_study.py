"""``rankwise study`` (the rank protocol) on a randomly initialised model of a real shape: each arm's measured
training time and peak memory beside the estimates ``rankwise study --plan`` prints.

    python -m benchmarks.bench_study [--out DIR] [--smoke] [--rows 512] [--seq 512] [--ranks 8,16,32,64,128]
                                     [--batch 8] [--tflops 80]      (defaults: on a GPU; a CPU runs a small model)

No weights and no data can be downloaded on the device machine, so the script builds what the study reads:
a Llama with Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192, vocabulary 128256;
random weights, bf16) on a GPU, a small one on a CPU (or ``--smoke``); a word-level tokenizer over the data's
words; GSM8K rows in the data set's own schema (a question, a worked answer ending ``#### <number>``) whose
lengths spread up to about ``--seq`` tokens. The study trains every LoRA rank (together, in the groups the
memory model plans) and full SFT for one seed and one epoch, evaluates the base and every arm on a few items and
runs the update analysis; the accuracies of a random model say nothing. What is measured per arm: ``runtime_s``
(its run's wall time) and ``peak_mem_mb`` (the largest CUDA peak its ``metrics.jsonl`` logged), against the
memory model's peak (``rankwise.arm_memory``) and the FLOP model's time at ``--tflops`` (``rankwise.arm_cost``).
The JSON (``bench_study.json``) also keeps the whole study's wall time and the ``--plan`` lines.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.bench_train import CPU_MODEL, GPU_MODEL, SMOKE_MODEL, build_checkpoint
from benchmarks.common import environment, write_json

WORDS = ("apples", "pens", "books", "cars", "coins", "stamps", "cards", "boxes", "bags", "cups", "Ann", "Ben",
         "Cleo", "Dev", "has", "buys", "gives", "away", "more", "each", "day", "week", "then", "sells", "how",
         "many", "does", "have", "left", "now", "the", "of", "and", "to", "a", "in", "is", "so", "total", "=")


def gsm8k_rows(n: int, max_words: int, seed: int) -> list:
    """``n`` rows in GSM8K's schema whose question and worked answer together run up to ``max_words`` words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.randint(max(8, max_words // 8), max(9, max_words - 12))
        q = " ".join(rng.choice(WORDS) for _ in range(words // 3))
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        steps = " ".join(rng.choice(WORDS) for _ in range(words - words // 3))
        rows.append({"question": f"{q} {a} {b} ?", "answer": f"{steps} {a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n"
                                                            f"#### {a + b}"})
    return rows


def save_word_tokenizer(path: Path, rows: list, vocab_size: int) -> None:
    """A word-level tokenizer (whitespace split) over the rows' words, numbers and GSM8K's marks."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for r in rows for w in (r["question"] + " " + r["answer"]).split()} |
                   {"Question:", "Answer:", "####"} | {str(i) for i in range(200)})
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + words[:vocab_size - len(specials)])}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)


def study_config(root: Path, model: str, args, cuda: bool) -> dict:
    return {"study": "rank", "output_dir": str(root / "study"),
            "run": {"model": model, "dtype": "bf16" if cuda else "fp32", "data": {"max_length": args.seq},
                    "train": {"epochs": 1, "batch_size": args.batch, "lr": 2.0e-4, "warmup": 0.03,
                              "save_every": 0}},
            "full": {"train": {"lr": 1.0e-5}},
            "arms": {"ranks": args.ranks, "full": True}, "seeds": [0],
            "experiments": [{"name": "gsm8k",
                             "train": {"task": "gsm8k", "data": str(root / "train.jsonl"), "validation": 8},
                             "eval": {"gsm8k": {"task": "gsm8k", "data": str(root / "test.jsonl")}}}],
            "eval": {"max_new_tokens": 16, "batch_size": 16}, "analysis": {"probe": 4}, "boot": {"n_boot": 100}}


def estimates(cfg: dict, tflops: float) -> dict:
    """Per arm (a LoRA group's arms share their group's): the study's own estimates (``rankwise.study.rank``)."""
    from rankwise.study.config import load_sets, validate_study
    from rankwise.study.rank import estimates as study_estimates

    study = validate_study(cfg)
    out = {}
    for e in study_estimates(study, load_sets(study))["gsm8k"]:
        for name in ["full"] if e["ranks"] is None else [f"lora-r{r}" for r in e["ranks"]]:
            out[name] = {"group": e["ranks"], "peak_gib": e["peak_bytes"] / 2**30,
                         "train_s": e["flops"] / (tflops * 1e12), "tokens": e["tokens"]}
    return out


def main(argv=None) -> int:
    from rankwise.cli import main as cli

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--rows", type=int, default=None, help="training rows (default 512 on a GPU, 48 otherwise)")
    ap.add_argument("--seq", type=int, default=None, help="data.max_length (default 512 on a GPU, 64 otherwise)")
    ap.add_argument("--ranks", default=None, help="LoRA ranks (default 8,16,32,64,128 on a GPU, 1,2,4 otherwise)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tflops", type=float, default=80.0)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    arch = SMOKE_MODEL if args.smoke else (GPU_MODEL if cuda else CPU_MODEL)
    args.rows = args.rows or (512 if cuda and not args.smoke else 48)
    args.seq = args.seq or (512 if cuda and not args.smoke else 64)
    args.ranks = [int(r) for r in (args.ranks or ("8,16,32,64,128" if cuda and not args.smoke else "1,2,4")).split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_study_") as tmp:
        root = Path(tmp)
        train_rows, test_rows = gsm8k_rows(args.rows, args.seq, 0), gsm8k_rows(16, args.seq, 1)
        for name, rows in (("train", train_rows), ("test", test_rows)):
            (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        build_checkpoint(root / "model", arch, torch.bfloat16 if cuda else torch.float32)
        save_word_tokenizer(root / "model", train_rows + test_rows, arch["vocab_size"])
        cfg = study_config(root, str(root / "model"), args, cuda)
        (root / "study.yaml").write_text(yaml.safe_dump(cfg))
        plan = io.StringIO()
        with contextlib.redirect_stdout(plan):
            rc = cli(["study", str(root / "study.yaml"), "--plan", "--tflops", str(args.tflops)])
        if rc:
            return rc
        est = estimates(cfg, args.tflops)
        t0 = time.time()
        rc = cli(["study", str(root / "study.yaml")])
        wall = time.time() - t0
        res = json.loads((root / "study" / "results.json").read_text()) if rc == 0 else None
    arms = []
    for row in (res or {"experiments": {"gsm8k": {"arms": []}}})["experiments"]["gsm8k"]["arms"][1:]:
        e = est[row["name"]]
        peak = row["peak_mem_mb"][0]
        arms.append({"arm": row["name"], "trained_with": e["group"], "tokens": e["tokens"],
                     "runtime_s": row["runtime_s"][0], "estimated_train_s": float(f"{e['train_s']:.4g}"),
                     "peak_mem_gib": None if peak is None else round(peak / 1024, 3),
                     "estimated_peak_gib": float(f"{e['peak_gib']:.4g}")})
    payload = dict(benchmark="bench_study", env=environment(), model=arch, rows=args.rows, seq=args.seq,
                   batch=args.batch, ranks=args.ranks, tflops_assumed=args.tflops, rc=rc, study_wall_s=round(wall, 1),
                   plan=plan.getvalue().splitlines(), arms=arms)
    path = write_json(payload, "bench_study", args.out)
    print(f"wrote {path}")
    for a in arms:
        print(f"  {a['arm']}: {a['runtime_s']} s (estimate {a['estimated_train_s']} s at {args.tflops:g} TFLOP/s), "
              f"peak {a['peak_mem_gib']} GiB (estimate {a['estimated_peak_gib']} GiB)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
