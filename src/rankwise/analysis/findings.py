"""A study's numbers with their uncertainty: per-arm accuracies with intervals, and findings with verdicts.

An arm is a set of models (one per seed) evaluated on the same test items; its results
are, per domain, a ``(seeds, items)`` matrix of 1/0 (right/wrong) with a mastery bucket
per item. :func:`summarize_arm` turns that into the per-bucket means over seeds with
their 95 % bootstrap intervals (over items and seeds, see :mod:`rankwise.analysis.stats`),
the item counts and the per-seed accuracies.

A finding compares two arms on the same items: its ``effect`` is defined so that a
positive value means "as the claim says", its interval comes from the paired bootstrap,
and its ``verdict`` follows :func:`rankwise.analysis.stats.verdict`. A finding that
cannot be measured (an arm missing, no items) is ``inconclusive`` and says why.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .stats import N_BOOT, accuracy_with_ci, bootstrap_draws, difference_ci, interval, per_seed_strata, verdict

__all__ = ["BUCKETS", "D34", "summarize_arm", "difference_finding", "contrast_finding", "spread_finding",
           "slope_finding", "unmeasured_finding", "drift_finding", "with_machine_margin"]

BUCKETS = ("D0", "D1", "D2", "D3", "D4")
D34 = ("D3", "D4")


def summarize_arm(correct: Mapping[str, np.ndarray], buckets: Mapping[str, Sequence[str]], *,
                  seeds: Sequence | None = None, n_boot: int = N_BOOT, boot_seed: int = 0) -> dict:
    """One arm's accuracies, intervals, counts and per-seed values.

    Args:
        correct: ``{domain: (S, F_domain) 0/1 matrix}`` (rows: seeds).
        buckets: ``{domain: F_domain bucket labels}``, or ``{domain: one row of F_domain labels per seed}``
            when each seed has its own buckets.
        seeds: the ``S`` seed names (default ``0..S-1``).

    Returns:
        ``{domain: {D0..D4, "mean"}, "in_domain_d34", "ci95": {domain: {D0..D4, "mean"}, "in_domain_d34"},
        "n": {domain: {D0..D4, "mean"}, "in_domain_d34"}, "seeds": [{"seed", domain: {...}, "in_domain_d34"}]}``;
        ``mean`` is the unweighted mean over the non-empty buckets, ``in_domain_d34`` the
        accuracy over the in-domain D3 and D4 items together; an empty bucket is ``None``.
    """
    out: dict = {"ci95": {}, "n": {}}
    per_seed: dict = {}
    S = None
    for dom, c in correct.items():
        c = np.asarray(c, dtype=np.float64)
        c = c[None, :] if c.ndim == 1 else c
        S = c.shape[0] if S is None else S
        if c.shape[0] != S:
            raise ValueError(f"domain {dom!r} has {c.shape[0]} seeds, another has {S}")
        labels = [list(row) for row in buckets[dom]] if per_seed_strata(buckets[dom]) else list(buckets[dom])
        flat = [b for row in labels for b in row] if per_seed_strata(labels) else labels
        has34 = dom == "in_domain" and any(b in D34 for b in flat)
        combine = ("mean", D34) if has34 else ("mean",)
        _full_strata(flat)
        r = accuracy_with_ci(c, labels, combine=combine, n_boot=n_boot, seed=boot_seed)
        keys = [*BUCKETS, "mean"]
        out[dom] = {k: r["value"].get(k) for k in keys}
        out["ci95"][dom] = {k: r["ci95"].get(k, [None, None]) for k in keys}
        out["n"][dom] = {k: r["n"].get(k, 0) for k in keys}
        per_seed[dom] = {k: r["seeds"].get(k, [None] * S) for k in keys}
        if dom == "in_domain":
            key = str(D34)
            out["in_domain_d34"] = r["value"].get(key)
            out["ci95"]["in_domain_d34"] = r["ci95"].get(key, [None, None])
            out["n"]["in_domain_d34"] = r["n"].get(key, 0)
            per_seed["in_domain_d34"] = r["seeds"].get(key, [None] * S)
    names = list(seeds) if seeds is not None else list(range(S or 0))
    if len(names) != (S or 0):
        raise ValueError(f"{len(names)} seed names for {S} seeds")
    out["seeds"] = []
    for i, name in enumerate(names):
        row: dict = {"seed": name}
        for dom in correct:
            row[dom] = {k: v[i] for k, v in per_seed[dom].items()}
        if "in_domain_d34" in per_seed:
            row["in_domain_d34"] = per_seed["in_domain_d34"][i]
        out["seeds"].append(row)
    return out


def _full_strata(labels: Sequence[str]):
    bad = sorted({b for b in labels if b not in BUCKETS})
    if bad:
        raise ValueError(f"unknown buckets {bad}; expected {BUCKETS}")
    return labels


def difference_finding(fid: str, claim: str, source: str, a: np.ndarray, b: np.ndarray, strata=None, *,
                       combine="mean", a_name: str = "a", b_name: str = "b", metric: str = "",
                       n_boot: int = N_BOOT, boot_seed: int = 0, pair_seeds: bool = True) -> dict:
    """A finding whose effect is ``stat(a) - stat(b)`` over the same items (paired bootstrap).

    Returns ``{"id", "claim", "source", "effect", "ci95", "verdict", "a", "b", "n", "metric", "why"}``.
    """
    r = difference_ci(a, b, strata, combine=combine, n_boot=n_boot, seed=boot_seed, pair_seeds=pair_seeds)
    if r["effect"] is None:
        return unmeasured_finding(fid, claim, source, f"no test items in {combine!r} for {a_name} or {b_name}")
    return {"id": fid, "claim": claim, "source": source, "effect": r["effect"], "ci95": r["ci95"],
            "verdict": verdict(r["ci95"]), "a": {"arm": a_name, "value": r["a"]},
            "b": {"arm": b_name, "value": r["b"]}, "n": r["n"], "seeds": [int(np.shape(a)[0]) if np.ndim(a) == 2
                                                                           else 1, int(np.shape(b)[0])
                                                                           if np.ndim(b) == 2 else 1],
            "metric": metric, "why": None}


def unmeasured_finding(fid: str, claim: str, source: str, why: str) -> dict:
    """A finding that could not be measured: ``inconclusive``, with the reason."""
    return {"id": fid, "claim": claim, "source": source, "effect": None, "ci95": [None, None],
            "verdict": "inconclusive", "a": None, "b": None, "n": 0, "seeds": None, "metric": "", "why": why}


def with_machine_margin(finding: dict, margin: float) -> dict:
    """``finding`` with its interval widened by ``margin`` on each side, for a quantity that another machine's
    floating-point path moves by up to that much (e.g. accuracies of generated chains of thought): the verdict
    follows the widened interval, so it holds on such a machine too. The bootstrap interval is kept as
    ``ci95_sampling``, the margin as ``machine_margin``. An unmeasured finding is returned unchanged."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    lo, hi = finding["ci95"]
    if lo is None or hi is None:
        return dict(finding)
    ci = [float(lo) - margin, float(hi) + margin]
    return {**finding, "ci95": ci, "verdict": verdict(ci), "ci95_sampling": [lo, hi], "machine_margin": margin}


def _finding(fid, claim, source, effect, draws, n, seeds, metric, **extra) -> dict:
    """A measured finding from its point ``effect`` and its bootstrap ``draws``."""
    ci = interval(draws)
    return {"id": fid, "claim": claim, "source": source, "effect": float(effect), "ci95": ci, "verdict": verdict(ci),
            "a": None, "b": None, "n": int(n), "seeds": seeds, "metric": metric, "why": None, **extra}


def _stats(arms: Sequence, strata, combine, n_boot: int, boot_seed: int) -> tuple:
    """Paired draws of each arm's statistic: ``(points (A,), draws (A, B), items)``."""
    ds = bootstrap_draws(arms, strata, n_boot=n_boot, seed=boot_seed)
    got = [d.combine(combine) for d in ds]
    return np.array([g[0] for g in got]), np.stack([g[1] for g in got]), int(sum(ds[0].n))


def contrast_finding(fid: str, claim: str, source: str, plus: Sequence, minus: Sequence, strata=None, *,
                     combine="mean", plus_names=(), minus_names=(), metric: str = "", n_boot: int = N_BOOT,
                     boot_seed: int = 0) -> dict:
    """A finding whose effect is the mean statistic of the ``plus`` arms minus that of the ``minus`` arms
    (every arm a ``(seeds, items)`` matrix over the same items; paired draws)."""
    pts, draws, n = _stats([*plus, *minus], strata, combine, n_boot, boot_seed)
    k = len(plus)
    if np.isnan(pts).any():
        return unmeasured_finding(fid, claim, source, "an arm has no test items")
    return _finding(fid, claim, source, pts[:k].mean() - pts[k:].mean(), draws[:k].mean(0) - draws[k:].mean(0), n,
                    [int(np.shape(a)[0]) if np.ndim(a) == 2 else 1 for a in [*plus, *minus]], metric,
                    a={"arms": list(plus_names), "value": float(pts[:k].mean())},
                    b={"arms": list(minus_names), "value": float(pts[k:].mean())})


def spread_finding(fid: str, claim: str, source: str, arms: Sequence, strata=None, *, within: float,
                   combine="mean", names=(), metric: str = "", n_boot: int = N_BOOT, boot_seed: int = 0) -> dict:
    """A finding whose effect is ``within`` minus the spread (best minus worst) of the arms' statistic: positive
    when the arms lie within ``within`` of each other. So ``reproduced`` means the spread's whole interval lies
    below ``within``, ``contradicted`` that its lower end lies above it."""
    pts, draws, n = _stats(arms, strata, combine, n_boot, boot_seed)
    if np.isnan(pts).any():
        return unmeasured_finding(fid, claim, source, "an arm has no test items")
    spread, boot = pts.max() - pts.min(), draws.max(0) - draws.min(0)
    return _finding(fid, claim, source, within - spread, within - boot, n,
                    [int(np.shape(a)[0]) if np.ndim(a) == 2 else 1 for a in arms], metric,
                    spread=float(spread), spread_ci95=interval(boot), within=within,
                    a={"arm": names[int(pts.argmax())] if names else None, "value": float(pts.max())},
                    b={"arm": names[int(pts.argmin())] if names else None, "value": float(pts.min())})


def slope_finding(fid: str, claim: str, source: str, arms: Sequence, xs: Sequence[float], *, below: float = 1.0,
                  metric: str = "", n_boot: int = N_BOOT, boot_seed: int = 0) -> dict:
    """A finding whose effect is ``below`` minus the least-squares slope of log(mean statistic) on log(x) over the
    arms (one per ``x``; positive statistics such as update norms; the items are resampled, paired): positive
    when the statistic grows slower than ``x ** below``."""
    pts, draws, n = _stats(arms, None, "mean", n_boot, boot_seed)
    if (pts <= 0).any() or np.isnan(pts).any():
        return unmeasured_finding(fid, claim, source, "a statistic is not positive")
    lx = np.log(np.asarray(xs, dtype=np.float64))
    lx = lx - lx.mean()

    def slope(y):  # y: (A, ...) -> (...)
        ly = np.log(np.clip(y, 1e-300, None))
        return (lx.reshape(-1, *([1] * (ly.ndim - 1))) * (ly - ly.mean(0))).sum(0) / (lx ** 2).sum()

    s = float(slope(pts))
    return _finding(fid, claim, source, below - s, below - slope(draws), n,
                    [int(np.shape(a)[0]) if np.ndim(a) == 2 else 1 for a in arms], metric, slope=s,
                    slope_ci95=interval(slope(draws)), values=[float(v) for v in pts], xs=[float(x) for x in xs])


def drift_finding(fid: str, source: str, updates: Mapping, seeds: Sequence, lora: str, full: str, *,
                  n_boot: int = N_BOOT, boot_seed: int = 0) -> dict:
    """``fid``: full SFT moves the weights' top singular vectors more than the LoRA arm ``lora`` (the effect: full's
    drift minus LoRA's, per weight matrix, paired over the matrices and the seeds). ``updates``: ``{seed: {arm:
    measures}}`` as :func:`rankwise.analysis.update_measures` gives them; unmeasured when a drift is missing."""
    claim = "Full SFT moves the weights' top singular vectors more than LoRA."
    try:
        fd, ld = _common_matrices([updates[s][full] for s in seeds], [updates[s][lora] for s in seeds], "drift")
    except (KeyError, TypeError, ValueError):
        return unmeasured_finding(fid, claim, source, "no singular-vector similarity measured")
    if fd.size == 0 or np.isnan(fd).any() or np.isnan(ld).any():
        return unmeasured_finding(fid, claim, source, "no weight matrix with both arms' drifts measured")
    return difference_finding(fid, claim, source, fd, ld, a_name=full, b_name=lora,
                              metric="drift = 1 - mean |cos| of the top-10 singular vectors before and after, "
                              "per weight matrix", n_boot=n_boot, boot_seed=boot_seed)


def _common_matrices(a: Sequence[Mapping], b: Sequence[Mapping], key: str) -> tuple:
    """Two ``(seeds, matrices)`` arrays of ``key`` over the weight matrices both arms measured (full SFT's every
    decoder matrix, LoRA's adapted ones), matched by their name from ``layers.`` on, in ``a``'s order."""
    def by_name(m: Mapping) -> dict:
        return {n[n.find("layers."):] if "layers." in n else n: v for n, v in zip(m["names"], m[key])}

    ma, mb = [by_name(m) for m in a], [by_name(m) for m in b]
    names = [n for n in ma[0] if all(m.get(n) is not None for m in ma + mb)]
    return (np.asarray([[m[n] for n in names] for m in ma], dtype=np.float64),
            np.asarray([[m[n] for n in names] for m in mb], dtype=np.float64))
