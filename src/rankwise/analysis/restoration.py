"""Restoration curves for a full-SFT model (Ye et al., 2025, parameter level).

For each selection (``top`` = largest relative updates, with ``bottom`` and
``random`` as controls) and each fraction k, the chosen k% of the update
elements (one global ranking over tensors whose name contains ``layers`` and not
``norm``) are put back to their pre-trained values and the model is evaluated
on every eval set, per mastery bucket. The selection itself is
``rankwise.masking.restore``; accuracy is ``rankwise.evaluate.qa_accuracy`` unless
another ``accuracy_fn`` is given.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..evaluate import qa_accuracy
from ..masking import restore

__all__ = ["DEFAULT_FRACTIONS", "restoration_curve", "bucket_accuracy"]

DEFAULT_FRACTIONS = (0.01, 0.03, 0.05, 0.10, 0.20, 0.40, 0.60)
SELECTIONS = ("top", "bottom", "random")


def _as_float(result) -> float:
    if isinstance(result, Mapping):
        for key in ("accuracy", "acc", "mean"):
            if key in result:
                return float(result[key])
        raise KeyError(f"accuracy_fn returned a dict without an 'accuracy' entry: keys {sorted(result)}")
    return float(result)


def bucket_accuracy(model, tokenizer, rows, accuracy_fn: Callable) -> dict:
    """Accuracy per ``bucket`` of ``rows`` (``"all"`` when rows carry none) and their unweighted mean.

    ``accuracy_fn(model, tokenizer, rows)`` returns a float in [0, 1] or a dict with ``"accuracy"``.

    Returns:
        ``{"by_bucket": {bucket: acc}, "n": {bucket: count}, "mean": unweighted mean over buckets}``.
    """
    groups: dict = {}
    for row in rows:
        groups.setdefault(str(row.get("bucket", "all")), []).append(row)
    if not groups:
        raise ValueError("eval rows must not be empty")
    by = {b: _as_float(accuracy_fn(model, tokenizer, rs)) for b, rs in sorted(groups.items())}
    return {"by_bucket": by, "n": {b: len(rs) for b, rs in sorted(groups.items())},
            "mean": sum(by.values()) / len(by)}


def _scalar_stats(stats) -> dict:
    """Keep the JSON-friendly scalars of ``restore``'s stats."""
    if not isinstance(stats, Mapping):
        return {}
    out = {}
    for k, v in stats.items():
        if isinstance(v, bool) or isinstance(v, (int, float, str)):
            out[str(k)] = v
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            out[str(k)] = v.item()
    return out


def restoration_curve(
    base_model,
    tuned_model,
    tokenizer,
    eval_sets: Mapping[str, Sequence[dict]],
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    selections: Sequence[str] = SELECTIONS,
    accuracy_fn: Callable | None = None,
    restore_fn: Callable | None = None,
    include: str = r"layers",
    exclude: str = r"norm",
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Accuracy after restoring the top/bottom/random k% of a full-SFT model's relative updates.

    Args:
        base_model, tuned_model: the pre-trained and the fine-tuned model (same architecture).
            ``tuned_model`` is modified during the sweep and put back to its tuned weights at the end.
        tokenizer: passed to ``accuracy_fn``.
        eval_sets: ``{name: rows}``, e.g. ``{"in_domain": [...], "out_of_domain": [...]}``;
            rows may carry ``bucket``.
        fractions: fractions in (0, 1] (the study's k% as 0.01 ... 0.60).
        selections: subset of ``("top", "bottom", "random")``.
        accuracy_fn: ``f(model, tokenizer, rows) -> float | {"accuracy": float}``;
            default ``rankwise.evaluate.qa_accuracy``.
        restore_fn: default ``rankwise.masking.restore`` (same signature).
        include, exclude: regexes on parameter names selecting the ranked tensors.
        seed: seed of the random control.

    Returns:
        ``{"fractions", "selections", "baseline": {"tuned": {set: acc}, "base": {set: acc}},
        "curves": {selection: {set: [{"fraction", "by_bucket", "mean", "stats"}]}}}``,
        where each ``acc`` is the dict of :func:`bucket_accuracy`.
    """
    if not isinstance(eval_sets, Mapping) or not eval_sets:
        raise ValueError("eval_sets must be a non-empty {name: rows} mapping")
    fractions = [float(f) for f in fractions]
    for f in fractions:
        if not (0.0 < f <= 1.0) or math.isnan(f):
            raise ValueError(f"fractions must lie in (0, 1], got {f}")
    selections = list(selections)
    for s in selections:
        if s not in SELECTIONS:
            raise ValueError(f"selections must be among {SELECTIONS}, got {s!r}")
    accuracy_fn = qa_accuracy if accuracy_fn is None else accuracy_fn
    restore_fn = restore if restore_fn is None else restore_fn

    base_sd = {k: v.detach() for k, v in base_model.state_dict().items()}
    tuned_sd = {k: v.detach().clone() for k, v in tuned_model.state_dict().items()}
    missing = sorted(set(tuned_sd) - set(base_sd))
    if missing:
        raise ValueError(f"base_model lacks parameters of tuned_model, e.g. {missing[:3]}")

    def evaluate(model) -> dict:
        return {name: bucket_accuracy(model, tokenizer, rows, accuracy_fn) for name, rows in eval_sets.items()}

    result = {
        "fractions": fractions,
        "selections": selections,
        "baseline": {"tuned": evaluate(tuned_model), "base": evaluate(base_model)},
        "curves": {s: {name: [] for name in eval_sets} for s in selections},
    }
    jobs = [(s, f) for s in selections for f in fractions]
    it = jobs
    if progress:
        it = tqdm(jobs, desc="restoration", leave=False)
    try:
        for sel, frac in it:
            restored, stats = restore_fn(base_sd, tuned_sd, frac, score="relative", select=sel,
                                         scope="global", include=include, exclude=exclude, seed=seed)
            unknown = sorted(set(restored) - set(tuned_sd))
            if unknown:
                raise ValueError(f"restore returned tensors the model does not have, e.g. {unknown[:3]}")
            # Start from the tuned weights every time, then overwrite with the restored tensors.
            tuned_model.load_state_dict({**tuned_sd, **restored}, strict=True)
            accs = evaluate(tuned_model)
            for name, acc in accs.items():
                result["curves"][sel][name].append({"fraction": frac, **acc, "stats": _scalar_stats(stats)})
            del restored
    finally:
        tuned_model.load_state_dict(tuned_sd, strict=True)
    return result
