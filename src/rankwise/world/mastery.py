"""Knowledge mastery of each fact, buckets, fine-tuning sets and per-bucket accuracy.

As in the knowledge study (Ye et al., 2025): the mastery ``R`` of a fact is the share of
(completion probes x samples at temperature 0.7) whose output contains the answer.
Buckets: D0 (R = 0), D1 (0, 1/4], D2 (1/4, 1/2], D3 (1/2, 3/4], D4 (3/4, 1].
Fine-tuning sets are drawn from the ``train`` people's in-domain facts (one bucket, a
list of buckets, or all), test sets are the ``test`` people's in-domain and
out-of-domain facts; accuracy is reported per bucket and as the unweighted mean.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

from ..evaluate import generate_answers, is_correct
from ..mastery import level_of
from ..model import load_model, load_tokenizer

BUCKETS = ("D0", "D1", "D2", "D3", "D4")


def bucket_of(r: float) -> str:
    """The mastery bucket of a score ``r`` in [0, 1]: ``D<level>`` (``rankwise.mastery.level_of``)."""
    return f"D{level_of(r)}"


def mastery_scores(model, tokenizer, facts: Sequence[dict], *, num_samples: int = 4, temperature: float = 0.7,
                   max_new_tokens: int = 4, batch_size: int = 256, seed: int = 0,
                   generate: Callable | None = None, progress: bool = False) -> list[float]:
    """``R`` for each fact: the share of (probe x sample) outputs containing ``fact["answer"]``.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        facts: rows with ``probes`` (list of completion prompts) and ``answer``.
        num_samples: samples per probe (temperature sampling).
        temperature: sampling temperature (0.7 in the study).
        max_new_tokens: tokens generated per sample.
        batch_size: prompts per generation batch.
        seed: sampling seed.
        generate: ``generate(prompts) -> list[list[str]]`` (``num_samples`` outputs per
            prompt); defaults to :func:`rankwise.evaluate.generate_answers` with the
            settings above. Tests pass a stub here.
        progress: show a progress bar.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if generate is None:
        def generate(prompts):
            return generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, do_sample=True, temperature=temperature,
                                    num_samples=num_samples, seed=seed, progress=progress)

    prompts, owner = [], []
    for i, f in enumerate(facts):
        probes = f.get("probes")
        if not probes or not isinstance(probes, list):
            raise ValueError(f"fact {i} ({f.get('id', '?')}): needs a non-empty list 'probes'")
        if not isinstance(f.get("answer"), str) or not f["answer"]:
            raise ValueError(f"fact {i} ({f.get('id', '?')}): needs a non-empty string 'answer'")
        prompts.extend(probes)
        owner.extend([i] * len(probes))
    outputs = generate(prompts) if prompts else []
    if len(outputs) != len(prompts):
        raise ValueError(f"generate returned {len(outputs)} output lists for {len(prompts)} prompts")
    hits = [0] * len(facts)
    total = [0] * len(facts)
    for i, outs in zip(owner, outputs):
        if isinstance(outs, str):
            outs = [outs]
        hits[i] += sum(bool(is_correct(o, facts[i]["answer"])) for o in outs)
        total[i] += len(outs)
    return [h / t if t else 0.0 for h, t in zip(hits, total)]


def measure(base_dir, facts: Sequence[dict], *, num_samples: int, temperature: float, max_new_tokens: int,
            seed: int, device="cpu", batch_size: int = 512) -> list[dict]:
    """The facts with the mastery ``R`` and bucket the base model in ``base_dir`` gives them."""
    model = load_model(str(base_dir), dtype="fp32", device=device)
    scores = mastery_scores(model, load_tokenizer(str(base_dir)), facts, num_samples=num_samples,
                            temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    return assign_buckets(facts, scores)


def assign_buckets(facts: Sequence[dict], scores: Sequence[float]) -> list[dict]:
    """Copies of ``facts`` with ``R`` and ``bucket`` set."""
    if len(facts) != len(scores):
        raise ValueError(f"{len(facts)} facts but {len(scores)} scores")
    return [{**f, "R": float(r), "bucket": bucket_of(float(r))} for f, r in zip(facts, scores)]


def bucket_counts(facts: Sequence[dict], **where) -> dict:
    """Number of facts per bucket (all five keys), among facts matching ``where`` (field=value)."""
    counts = {b: 0 for b in BUCKETS}
    for f in facts:
        if all(f.get(k) == v for k, v in where.items()):
            counts[f["bucket"]] += 1
    return counts


def _completion(answer: str) -> str:
    return " " + answer + "."


def qa_row(fact: dict) -> dict:
    """A prompt_completion row (with ``answers`` and ``bucket`` for evaluation) for one fact."""
    return {"prompt": fact["prompt"], "completion": _completion(fact["answer"]), "answers": [fact["answer"]],
            "id": fact["id"], "bucket": fact.get("bucket"), "relation": fact["relation"]}


def draw_train_set(facts: Sequence[dict], size: int, *, bucket="all", domain: str = "in", seed: int = 0) -> list[dict]:
    """``size`` QA rows drawn without replacement from the ``train`` people's facts.

    Args:
        facts: bucketed fact rows (from :func:`assign_buckets`).
        size: number of rows.
        bucket: ``"all"`` (the natural mix), one bucket name, or a list of them.
        domain: ``"in"``, ``"out"`` or ``"all"``.
        seed: sampling seed. A smaller set with the same seed is a prefix of a larger one.
    """
    if isinstance(bucket, str):
        buckets = set(BUCKETS) if bucket == "all" else {bucket}
    else:
        buckets = set(bucket)
    bad = buckets - set(BUCKETS)
    if bad:
        raise ValueError(f"bucket must be 'all' or among {BUCKETS}, got {sorted(bad)}")
    if domain not in ("in", "out", "all"):
        raise ValueError(f"domain must be 'in', 'out' or 'all', got {domain!r}")
    pool = [f for f in facts if f["split"] == "train" and f["bucket"] in buckets
            and (domain == "all" or f["domain"] == domain)]
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if size > len(pool):
        raise ValueError(f"size={size} but only {len(pool)} train facts in bucket(s) {sorted(buckets)} "
                         f"and domain {domain!r}")
    order = list(pool)
    random.Random(seed).shuffle(order)
    return [qa_row(f) for f in order[:size]]


def test_sets(facts: Sequence[dict]) -> dict:
    """``{"in_domain": rows, "out_of_domain": rows}``: QA rows of the ``test`` people."""
    test = [f for f in facts if f["split"] == "test"]
    return {"in_domain": [qa_row(f) for f in test if f["domain"] == "in"],
            "out_of_domain": [qa_row(f) for f in test if f["domain"] == "out"]}


def accuracy_by_bucket(rows: Sequence[dict], correct: Sequence[bool]) -> dict:
    """Accuracy per bucket (``None`` for an empty bucket), and ``mean``: the unweighted mean
    over the non-empty buckets; ``n`` holds the bucket sizes."""
    if len(rows) != len(correct):
        raise ValueError(f"{len(rows)} rows but {len(correct)} correctness flags")
    hit = {b: 0 for b in BUCKETS}
    n = {b: 0 for b in BUCKETS}
    for r, c in zip(rows, correct):
        n[r["bucket"]] += 1
        hit[r["bucket"]] += bool(c)
    out = {b: (hit[b] / n[b] if n[b] else None) for b in BUCKETS}
    vals = [v for v in out.values() if v is not None]
    out["mean"] = sum(vals) / len(vals) if vals else None
    out["n"] = n
    return out
