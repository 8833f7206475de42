"""How sure a number is: bootstrap intervals over test items and seeds, paired differences, verdicts.

Every accuracy of a study is a mean over seeds (each seed a separately trained model)
and test items (facts), often split into strata (mastery buckets) whose accuracies are
then averaged without weights. Its sampling noise has two sources, the items drawn into
the test set and the seeds, so the bootstrap here resamples both:

- an arm's results are a matrix ``C`` of shape ``(S, F)``: one row per seed, one column
  per test item (1/0 for right/wrong, or any number per item such as a count);
- one bootstrap draw picks ``S`` seeds with replacement and, within each stratum,
  as many items as the stratum has, with replacement; the statistic is recomputed on
  that draw (a stratum's accuracy = the mean of the drawn rows over its drawn items);
- the interval is the percentile interval of the draws (95 % by default).

Two arms tested on the same items are compared *paired*: both arms use the same item
draws (and, when they have the same number of seeds, the same seed draws, since seed
``i`` of both arms draws the same fine-tuning sample), so noise they share cancels in
the difference. With one seed the seed draw is trivial and only items are resampled,
which for one stratum is the ordinary binomial bootstrap.

:func:`verdict` turns an effect's interval into ``reproduced`` (``lo > 0``),
``contradicted`` (``hi < 0``) or ``inconclusive``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["N_BOOT", "LEVEL", "Draws", "bootstrap_draws", "accuracy_with_ci", "difference_ci", "interval",
           "verdict"]

N_BOOT = 2000
LEVEL = 0.95


def _matrix(c, name: str) -> np.ndarray:
    a = np.asarray(c, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a (seeds, items) matrix or one row of items, got shape {a.shape}")
    if a.shape[0] < 1:
        raise ValueError(f"{name} has no seeds (rows)")
    if np.isnan(a).any():
        raise ValueError(f"{name} holds NaN")
    return a


def _strata(strata, n_items: int) -> tuple[list, list]:
    """(labels in first-seen order, item indices of each)."""
    if strata is None:
        return [None], [np.arange(n_items)]
    labels = [x.item() if isinstance(x, np.generic) else x for x in strata]
    if len(labels) != n_items:
        raise ValueError(f"strata has {len(labels)} labels for {n_items} items")
    order: dict = {}
    for i, s in enumerate(labels):
        order.setdefault(s, []).append(i)
    return list(order), [np.asarray(v, dtype=np.int64) for v in order.values()]


class Draws:
    """Point estimates and bootstrap draws of the per-stratum means of one arm.

    Attributes:
        labels: the strata (``[None]`` without strata).
        n: items per stratum.
        point: ``(K,)`` per-stratum means over all seeds and items (NaN for an empty stratum).
        boot: ``(B, K)`` the same on each bootstrap draw.
        seeds: ``(S, K)`` per-seed stratum means.
    """

    def __init__(self, labels, n, point, boot, seeds):
        self.labels, self.n, self.point, self.boot, self.seeds = labels, n, point, boot, seeds

    def combine(self, how="mean"):
        """``(point, draws)`` of a statistic of the strata: ``"mean"`` (unweighted over the non-empty
        strata), ``"pooled"`` (weighted by item counts), a stratum label, a list of labels (pooled
        over them), or a function ``f(per_stratum_means (..., K), n (K,)) -> (...)``."""
        f = _combiner(how, self.labels, self.n)
        return float(f(self.point[None, :])[0]), f(self.boot), f(self.seeds)


def _combiner(how, labels, n) -> Callable:
    n = np.asarray(n, dtype=np.float64)
    if callable(how):
        return lambda m: np.asarray(how(m, n), dtype=np.float64)
    if how == "mean":
        keep = n > 0
        return lambda m: m[:, keep].mean(axis=1) if keep.any() else np.full(m.shape[0], np.nan)
    if how == "pooled":
        return _pooled(np.ones(len(labels), dtype=bool), n)
    pick = list(how) if isinstance(how, (list, tuple, set)) else [how]
    unknown = [p for p in pick if p not in labels]
    if unknown:
        raise ValueError(f"unknown strata {unknown}; have {labels}")
    return _pooled(np.array([lab in pick for lab in labels]), n)


def _pooled(mask, n) -> Callable:
    w = np.where(mask, n, 0.0)
    tot = w.sum()
    if tot == 0:
        return lambda m: np.full(m.shape[0], np.nan)
    return lambda m: (np.nan_to_num(m) * w).sum(axis=1) / tot


def bootstrap_draws(arms: Sequence, strata=None, *, n_boot: int = N_BOOT, seed: int = 0,
                    pair_seeds: bool = True) -> list:
    """Bootstrap the per-stratum means of one or more arms tested on the same items.

    Args:
        arms: one ``(S_i, F)`` matrix per arm (rows: seeds, columns: the same ``F`` items
            for every arm, in the same order); a 1-D array is one seed.
        strata: ``F`` labels (e.g. mastery buckets), or ``None`` for one stratum.
        n_boot: bootstrap draws.
        seed: seed of the resampling (the result is deterministic).
        pair_seeds: draw the same seed rows for arms with equal seed counts (seed ``i``
            of every arm shares its fine-tuning sample); otherwise independent draws.

    Returns:
        one :class:`Draws` per arm; draw ``b`` of every arm uses the same item draw.
    """
    mats = [_matrix(c, f"arms[{i}]") for i, c in enumerate(arms)]
    if not mats:
        raise ValueError("no arms")
    F = mats[0].shape[1]
    if any(m.shape[1] != F for m in mats):
        raise ValueError(f"arms are tested on different numbers of items: {[m.shape[1] for m in mats]}")
    if not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    labels, idx = _strata(strata, F)
    rng = np.random.default_rng(seed)
    # Item draws: per stratum, (B, n_k) indices into the items.
    item_draws = [g[rng.integers(0, len(g), size=(n_boot, len(g)))] if len(g) else None for g in idx]
    seed_weights: dict = {}

    def weights(S: int, key) -> np.ndarray:
        if key not in seed_weights:
            picks = rng.integers(0, S, size=(n_boot, S))
            w = np.zeros((n_boot, S))
            np.add.at(w, (np.arange(n_boot)[:, None], picks), 1.0 / S)
            seed_weights[key] = w
        return seed_weights[key]

    out = []
    for i, m in enumerate(mats):
        S = m.shape[0]
        W = weights(S, S if pair_seeds else (S, i))
        V = W @ m  # (B, F): each draw's seed-weighted mean per item
        K = len(labels)
        boot = np.full((n_boot, K), np.nan)
        point = np.full(K, np.nan)
        per_seed = np.full((S, K), np.nan)
        for k, (g, d) in enumerate(zip(idx, item_draws)):
            if d is None:
                continue
            boot[:, k] = np.take_along_axis(V, d, axis=1).mean(axis=1)
            point[k] = m[:, g].mean()
            per_seed[:, k] = m[:, g].mean(axis=1)
        out.append(Draws(labels, [len(g) for g in idx], point, boot, per_seed))
    return out


def interval(draws, level: float = LEVEL) -> list:
    """The percentile interval ``[lo, hi]`` of bootstrap draws (``[None, None]`` if none are finite)."""
    d = np.asarray(draws, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return [None, None]
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(d, [a, 1.0 - a])
    return [float(lo), float(hi)]


def accuracy_with_ci(correct, strata=None, *, combine=("mean",), n_boot: int = N_BOOT, seed: int = 0,
                     level: float = LEVEL) -> dict:
    """An arm's accuracy per stratum and combined, each with its interval.

    Args:
        correct: ``(S, F)`` results (rows: seeds), or one row.
        strata: ``F`` labels, or ``None``.
        combine: extra statistics over the strata (see :meth:`Draws.combine`), keyed by
            their name (``str(how)``).

    Returns:
        ``{"value": {label: v}, "ci95": {label: [lo, hi]}, "n": {label: items},
        "seeds": {label: [per-seed values]}}``, with an entry per stratum and per ``combine``
        (an empty stratum has ``None`` for its value and interval).
    """
    d = bootstrap_draws([correct], strata, n_boot=n_boot, seed=seed)[0]
    out: dict = {"value": {}, "ci95": {}, "n": {}, "seeds": {}}
    for k, lab in enumerate(d.labels):
        empty = d.n[k] == 0
        out["value"][lab] = None if empty else float(d.point[k])
        out["ci95"][lab] = [None, None] if empty else interval(d.boot[:, k], level)
        out["n"][lab] = int(d.n[k])
        out["seeds"][lab] = [None if empty else float(v) for v in d.seeds[:, k]]
    for how in combine:
        p, b, s = d.combine(how)
        key = how if isinstance(how, str) else str(how)
        out["value"][key] = None if math.isnan(p) else p
        out["ci95"][key] = interval(b, level)
        out["n"][key] = int(sum(d.n)) if how in ("mean", "pooled") else _n_of(how, d)
        out["seeds"][key] = [None if math.isnan(v) else float(v) for v in s]
    return out


def _n_of(how, d: Draws) -> int:
    if callable(how):
        return int(sum(d.n))
    pick = list(how) if isinstance(how, (list, tuple, set)) else [how]
    return int(sum(n for lab, n in zip(d.labels, d.n) if lab in pick))


def difference_ci(a, b, strata=None, *, combine="mean", n_boot: int = N_BOOT, seed: int = 0,
                  level: float = LEVEL, pair_seeds: bool = True) -> dict:
    """The paired difference ``stat(a) - stat(b)`` of two arms tested on the same items.

    Returns ``{"effect", "ci95": [lo, hi], "a", "b", "n"}``; ``effect`` is ``None`` when a
    side has no items in the chosen strata.
    """
    da, db = bootstrap_draws([a, b], strata, n_boot=n_boot, seed=seed, pair_seeds=pair_seeds)
    pa, ba, _ = da.combine(combine)
    pb, bb, _ = db.combine(combine)
    if math.isnan(pa) or math.isnan(pb):
        return {"effect": None, "ci95": [None, None], "a": None, "b": None, "n": 0}
    return {"effect": pa - pb, "ci95": interval(ba - bb, level), "a": pa, "b": pb,
            "n": int(sum(da.n)) if combine in ("mean", "pooled") else _n_of(combine, da)}


def verdict(ci95) -> str:
    """``"reproduced"`` when the interval lies above 0, ``"contradicted"`` below 0, else ``"inconclusive"``
    (also for a missing or NaN interval)."""
    if ci95 is None or len(ci95) != 2:
        return "inconclusive"
    lo, hi = ci95
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)) or \
            (isinstance(hi, float) and math.isnan(hi)):
        return "inconclusive"
    if lo > 0:
        return "reproduced"
    if hi < 0:
        return "contradicted"
    return "inconclusive"
