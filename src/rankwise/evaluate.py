"""Evaluation: token-weighted eval loss, and closed-book QA accuracy by generation.

QA follows the knowledge study (Ye et al., 2025): greedy decoding of at most
16 new tokens; an output is correct when the gold answer, or one of its
aliases, is a substring of it after normalisation (Unicode NFKC, case folding,
whitespace collapsed).
"""
from __future__ import annotations

import re
import unicodedata

import torch
from tqdm.auto import tqdm

from .loss import batch_loss_sum

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed to single spaces, stripped."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def is_correct(output: str, answers) -> bool:
    """True when any non-empty gold answer (str or list of aliases) occurs in ``output`` after normalisation."""
    if isinstance(answers, str):
        answers = [answers]
    out = normalize(output)
    return any(a and normalize(a) in out for a in answers if normalize(a))


@torch.no_grad()
def eval_loss(model, batches) -> float:
    """Mean cross entropy per target token over ``batches`` (dicts from ``rankwise.data.collate``)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        for b in batches:
            total += float(batch_loss_sum(model, b))
            n += int(b["n_targets"])
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("eval_loss: the batches hold no target tokens")
    return total / n


@torch.no_grad()
def generate_answers(model, tokenizer, prompts, max_new_tokens=16, batch_size=32, do_sample=False,
                     temperature=1.0, num_samples=1, seed=0, add_special_tokens=True, progress=False):
    """Generate continuations of ``prompts``; returns ``num_samples`` decoded strings per prompt.

    Prompts are left-padded in batches of ``batch_size``; only the new tokens are
    decoded (special tokens skipped). Greedy unless ``do_sample``; sampling uses
    its own RNG stream seeded with ``seed`` and leaves the global RNG untouched.
    (``generate_copies`` with one copy.)
    """
    return generate_copies(model, tokenizer, prompts, 1, max_new_tokens, batch_size, do_sample, temperature,
                           num_samples, seed, add_special_tokens, progress)[0]


@torch.no_grad()
def generate_copies(model, tokenizer, prompts, copies: int, max_new_tokens=16, batch_size=32, do_sample=False,
                    temperature=1.0, num_samples=1, seed=0, add_special_tokens=True, progress=False) -> list:
    """``generate_answers`` with each chunk of prompts repeated ``copies`` times along the batch, copy g
    being the g-th block of rows, decoded in one ``generate`` per chunk; returns one answer list per copy.

    A model that computes each block of rows differently (K LoRA arms on one base,
    ``rankwise.arm_layers``) answers as each arm alone would: greedy decoding is row by row,
    a row that meets EOS is filled with the pad token until the chunk stops (as in a chunk of
    one copy whose other rows go on), and decoding skips special tokens.
    """
    if isinstance(prompts, str):
        raise TypeError("generate_answers: prompts must be a list of strings, not one string")
    if num_samples < 1 or batch_size < 1 or max_new_tokens < 1 or copies < 1:
        raise ValueError(f"generate_answers: num_samples, batch_size, max_new_tokens and copies must be >= 1, "
                         f"got {num_samples}, {batch_size}, {max_new_tokens}, {copies}")
    if num_samples > 1 and not do_sample:
        raise ValueError("generate_answers: num_samples > 1 needs do_sample=True (greedy outputs are identical)")
    dev = next(model.parameters()).device
    was_training, old_side = model.training, tokenizer.padding_side
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, num_return_sequences=num_samples)
    if do_sample:
        kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    model.eval()
    tokenizer.padding_side = "left"
    results = [[] for _ in range(copies)]
    it = range(0, len(prompts), batch_size)
    if progress:
        it = tqdm(it, desc="generating", leave=False)
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [], enabled=do_sample):
            if do_sample:
                torch.manual_seed(seed)
            for s in it:
                chunk = list(prompts[s:s + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
                enc = {k: v.to(dev).repeat(copies, 1) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                out = model.generate(**enc, **kwargs)
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for g in range(copies):
                    for i in range(len(chunk)):
                        row = (g * len(chunk) + i) * num_samples
                        results[g].append(texts[row:row + num_samples])
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return results


def qa_accuracy(model, tokenizer, rows, max_new_tokens=16, batch_size=32, add_special_tokens=True,
                return_outputs=False, **generate_kwargs) -> dict:
    """Closed-book QA accuracy over ``rows`` (dicts with ``prompt`` and ``answers`` or ``answer``).

    Greedy by default. Returns ``{"accuracy", "correct", "total"}`` (plus
    ``"outputs"`` when ``return_outputs``); with several samples per prompt,
    accuracy is the share of correct samples.
    """
    prompts, golds = [], []
    for i, row in enumerate(rows, 1):
        if "prompt" not in row or not isinstance(row["prompt"], str):
            raise ValueError(f"qa_accuracy: row {i} needs a string field 'prompt'")
        ans = row.get("answers", row.get("answer"))
        if isinstance(ans, str):
            ans = [ans]
        if not ans or not all(isinstance(a, str) for a in ans):
            raise ValueError(f"qa_accuracy: row {i} needs 'answers' (a string or list of strings) or 'answer'")
        prompts.append(row["prompt"])
        golds.append(ans)
    if not prompts:
        raise ValueError("qa_accuracy: no rows")
    outputs = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               add_special_tokens=add_special_tokens, **generate_kwargs)
    correct = sum(is_correct(o, g) for outs, g in zip(outputs, golds) for o in outs)
    total = sum(len(outs) for outs in outputs)
    res = {"accuracy": correct / total, "correct": correct, "total": total}
    if return_outputs:
        res["outputs"] = outputs
    return res
