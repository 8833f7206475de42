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
           "per_seed_strata", "verdict", "borderline", "MARGIN", "CHAIN_MARGIN"]

N_BOOT = 2000
LEVEL = 0.95
MARGIN = 0.005  # half a point: how near 0 an interval end may lie before its verdict is called borderline
# four points for accuracies of generated chains of thought: one changed token changes the rest of a chain, so
# another machine's rounding moves their interval ends further (up to this much in the README's demo
# section, over three floating-point paths); the demo widens those findings' intervals by it
CHAIN_MARGIN = 0.04


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


def _seed_strata(strata, shape: tuple) -> tuple[list, np.ndarray]:
    """Per-seed strata (one row of ``F`` labels per seed): (labels in first-seen order, ``(S, K, F)`` masks)."""
    rows = [[x.item() if isinstance(x, np.generic) else x for x in row] for row in strata]
    if len(rows) != shape[0] or any(len(r) != shape[1] for r in rows):
        raise ValueError(f"per-seed strata must be {shape[0]} rows of {shape[1]} labels (one row per seed)")
    labels = list(dict.fromkeys(x for r in rows for x in r))
    masks = np.array([[[x == lab for x in r] for lab in labels] for r in rows], dtype=np.float64)
    return labels, masks


def per_seed_strata(strata) -> bool:
    """Whether ``strata`` holds one row of labels per seed (a list of lists) rather than one label per item."""
    return strata is not None and len(strata) > 0 and isinstance(strata[0], (list, tuple, np.ndarray))


class Draws:
    """Per-seed stratum sums and counts of one arm, on the data and on each bootstrap draw.

    A statistic of the strata is computed per seed (a stratum's accuracy in seed ``s`` = its sum
    over its count) and then averaged over the seeds with the draw's seed weights (equal weights
    for the point estimate).

    Attributes:
        labels: the strata (``[None]`` without strata).
        n: items per stratum (per-seed strata: the mean count over the seeds, rounded, and at least 1 when
            a seed has items in it).
        point: ``(K,)`` per-stratum means (the mean over seeds of each seed's stratum mean).
        boot: ``(B, K)`` the same on each bootstrap draw.
        seeds: ``(S, K)`` per-seed stratum means.
    """

    def __init__(self, labels, n, data: tuple, draws: tuple, weights: np.ndarray):
        self.labels, self.n = labels, n
        self._data, self._draws, self._weights = data, draws, weights  # (num, cnt) of (1, S, K) and (B, S, K)
        S = data[0].shape[1]
        self._equal = np.full((1, S), 1.0 / S)
        self._one_hot = np.eye(S)
        self.point = _stratum_means(*data, self._equal)[0]
        self.boot = _stratum_means(*draws, weights)
        self.seeds = _stratum_means(np.repeat(data[0], S, 0), np.repeat(data[1], S, 0), self._one_hot)

    def combine(self, how="mean"):
        """``(point, draws, per-seed values)`` of a statistic of the strata: ``"mean"`` (unweighted over the
        non-empty strata), ``"pooled"`` (the share over all items), a stratum label, a list of labels (pooled
        over them), or a function ``f(per_stratum_means (..., K), n (K,)) -> (...)``."""
        if callable(how) or how == "mean":
            f = _combiner(how, self.labels, self.n)
            return float(f(self.point[None, :])[0]), f(self.boot), f(self.seeds)
        pick = self.labels if how == "pooled" else (list(how) if isinstance(how, (list, tuple, set)) else [how])
        unknown = [p for p in pick if p not in self.labels]
        if unknown:
            raise ValueError(f"unknown strata {unknown}; have {self.labels}")
        mask = np.array([lab in pick for lab in self.labels])
        S = self._data[0].shape[1]
        full = (np.repeat(self._data[0], S, 0), np.repeat(self._data[1], S, 0))
        return (float(_pooled(*self._data, mask, self._equal)[0]), _pooled(*self._draws, mask, self._weights),
                _pooled(*full, mask, self._one_hot))


def _stratum_means(num, cnt, weights) -> np.ndarray:
    """``(X, K)``: per stratum, the seed-weighted mean of the per-seed means ``num / cnt`` over the seeds that
    have items in it (NaN where no seed with weight has)."""
    return _weighted(num, cnt, weights[:, :, None])


def _pooled(num, cnt, mask, weights) -> np.ndarray:
    """``(X,)``: the seed-weighted mean of each seed's share over the strata of ``mask``."""
    return _weighted(num[:, :, mask].sum(axis=2), cnt[:, :, mask].sum(axis=2), weights)


def _weighted(num, cnt, w) -> np.ndarray:
    """The ``w``-weighted mean over axis 1 of ``num / cnt``, over the entries with items and weight."""
    valid = (cnt > 0) & (w > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_seed = np.where(valid, num / np.where(cnt > 0, cnt, 1.0), 0.0)
        return (np.where(valid, w, 0.0) * per_seed).sum(axis=1) / np.where(valid, w, 0.0).sum(axis=1)


def _combiner(how, labels, n) -> Callable:
    n = np.asarray(n, dtype=np.float64)
    if callable(how):
        return lambda m: np.asarray(how(m, n), dtype=np.float64)
    keep = n > 0
    return lambda m: m[:, keep].mean(axis=1) if keep.any() else np.full(m.shape[0], np.nan)


def _sums(mat: np.ndarray, idx: list, item_draws: list) -> tuple:
    """Shared strata: ``(num, cnt)`` on the data ``(1, S, K)`` and on the draws ``(B, S, K)``."""
    S, K = mat.shape[0], len(idx)
    B = next((d.shape[0] for d in item_draws if d is not None), 1)
    num, cnt = np.zeros((1, S, K)), np.zeros((1, S, K))
    bnum, bcnt = np.zeros((B, S, K)), np.zeros((B, S, K))
    for k, (g, d) in enumerate(zip(idx, item_draws)):
        num[0, :, k], cnt[0, :, k] = mat[:, g].sum(axis=1), len(g)
        if d is not None:
            bnum[:, :, k] = mat[:, d].sum(axis=2).T  # (S, B, n_k) -> (B, S)
            bcnt[:, :, k] = len(g)
    return (num, cnt), (bnum, bcnt)


def _seed_sums(mat: np.ndarray, masks: np.ndarray, counts: np.ndarray) -> tuple:
    """Per-seed strata: ``(num, cnt)`` on the data and on draws whose item multiplicities are ``counts`` (B, F)."""
    num = np.einsum("skf,sf->sk", masks, mat)[None]
    cnt = masks.sum(axis=2)[None]
    bnum = np.einsum("bf,skf,sf->bsk", counts, masks, mat)
    bcnt = np.einsum("bf,skf->bsk", counts, masks)
    return (num, cnt), (bnum, bcnt)


def bootstrap_draws(arms: Sequence, strata=None, *, n_boot: int = N_BOOT, seed: int = 0,
                    pair_seeds: bool = True) -> list:
    """Bootstrap the per-stratum means of one or more arms tested on the same items.

    Args:
        arms: one ``(S_i, F)`` matrix per arm (rows: seeds, columns: the same ``F`` items
            for every arm, in the same order); a 1-D array is one seed.
        strata: ``F`` labels (e.g. mastery buckets) shared by every seed, one row of ``F`` labels
            per seed (each seed's own strata, e.g. buckets measured on each seed's own base; every
            arm then has that many seeds), or ``None`` for one stratum.
        n_boot: bootstrap draws.
        seed: seed of the resampling (the result is deterministic).
        pair_seeds: draw the same seed rows for arms with equal seed counts (seed ``i``
            of every arm shares its fine-tuning sample); otherwise independent draws.

    Shared strata are resampled within themselves (each keeps its size); per-seed strata cannot be,
    so their items are resampled all together and each stratum's size varies from draw to draw.

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
    rng = np.random.default_rng(seed)
    if per_seed_strata(strata):
        labels, masks = _seed_strata(strata, (len(strata), F))
        if any(m.shape[0] != masks.shape[0] for m in mats):
            raise ValueError(f"per-seed strata have {masks.shape[0]} rows (one row per seed); the arms have "
                             f"{[m.shape[0] for m in mats]} seeds")
        picks = rng.integers(0, F, size=(n_boot, F))
        counts = np.zeros((n_boot, F))
        np.add.at(counts, (np.arange(n_boot)[:, None], picks), 1.0)
        sums = [_seed_sums(m, masks, counts) for m in mats]
        n = [max(1, int(round(v))) if v > 0 else 0 for v in masks.sum(axis=2).mean(axis=0)]
    else:
        labels, idx = _strata(strata, F)
        # Item draws: per stratum, (B, n_k) indices into the items.
        item_draws = [g[rng.integers(0, len(g), size=(n_boot, len(g)))] if len(g) else None for g in idx]
        sums = [_sums(m, idx, item_draws) for m in mats]
        n = [len(g) for g in idx]
    seed_weights: dict = {}

    def weights(S: int, key) -> np.ndarray:
        if key not in seed_weights:
            picks = rng.integers(0, S, size=(n_boot, S))
            w = np.zeros((n_boot, S))
            np.add.at(w, (np.arange(n_boot)[:, None], picks), 1.0 / S)
            seed_weights[key] = w
        return seed_weights[key]

    return [Draws(labels, n, data, draws, weights(m.shape[0], m.shape[0] if pair_seeds else (m.shape[0], i)))
            for i, (m, (data, draws)) in enumerate(zip(mats, sums))]


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
        out["seeds"][lab] = [None if empty or math.isnan(v) else float(v) for v in d.seeds[:, k]]
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


def borderline(ci95, margin: float = MARGIN) -> bool:
    """Whether an end of the interval lies within ``margin`` of 0: its verdict may change with the rounding of
    another machine (a verdict of ``inconclusive`` included: an end just across 0 would make it one)."""
    if ci95 is None or len(ci95) != 2 or any(x is None or x != x for x in ci95):
        return False
    return any(abs(x) <= margin for x in ci95)
