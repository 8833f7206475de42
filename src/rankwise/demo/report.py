"""The demo's results: per-arm accuracies with intervals, the findings with verdicts, plots and report.md.

Every accuracy is the mean over seeds of the per-seed accuracy, with a 95 % bootstrap
interval over test facts and seeds (:mod:`rankwise.analysis.stats`) and the number of
test facts; every finding is a paired difference between two arms tested on the same
facts (:mod:`rankwise.analysis.findings`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..analysis.findings import BUCKETS, difference_finding, spread_finding, summarize_arm, unmeasured_finding
from ..analysis.stats import CHAIN_MARGIN, MARGIN, borderline
from ..atomic import atomic_write_text
from ..world.mastery import bucket_counts

DOMAINS = ("in_domain", "out_of_domain")
KNOWLEDGE = "Ye et al. 2025, SFT and model knowledge (arXiv 2509.16596)"
RANKS = "Rathore et al. 2025, LoRA rank trade-offs (arXiv 2512.15634); Biderman et al. 2024 (arXiv 2405.09673)"
INTRUDERS = "Shuttleworth et al. 2024, LoRA vs full fine-tuning: an illusion of equivalence (arXiv 2410.21228)"


def _matrices(evals: list, domains=DOMAINS) -> dict:
    return {d: np.asarray([e[d]["correct"] for e in evals], dtype=np.float64) for d in domains}


def build_results(*, facts, tests, arms, runs, base_eval, restoration, intruders, settings, bases, scale,
                  together, skipped=None, reasoning=None) -> dict:
    """The results dict (``results.json``) from the per-fact results of every arm and seed.

    ``facts``, ``tests`` and ``base_eval`` are per seed (``{seed: ...}``): each seed fine-tunes its own
    base, so a fact's mastery bucket is that base's, and the strata of every interval are per seed."""
    s = settings
    seeds = list(s["seeds"])
    buckets = {d: [[r["bucket"] for r in tests[seed][d]] for seed in seeds] for d in DOMAINS}
    boot = {"n_boot": s["n_boot"], "boot_seed": s["seed"]}

    base = {"name": "base", "method": "none", "rank": None, "train_size": 0, "data": None,
            "label": "base models (no fine-tuning)", "train_loss": None, "train_seconds": None,
            "trained_together": None}
    C = {"base": _matrices([base_eval[seed] for seed in seeds])}
    base.update(summarize_arm(C["base"], buckets, seeds=seeds, **boot))
    out_arms = [base]
    for a in arms:
        ev = [runs[(seed, a["name"])] for seed in seeds]
        C[a["name"]] = _matrices([r["eval"] for r in ev])
        row = {k: a[k] for k in ("name", "method", "rank", "train_size", "data", "train_buckets", "label")}
        losses = [r.get("train_loss") for r in ev]
        row["train_loss"] = float(np.mean(losses)) if all(v is not None for v in losses) else None
        row["train_losses"] = losses
        secs = [r.get("train_seconds") for r in ev]
        row["train_seconds"] = round(float(sum(secs)), 2) if all(v is not None for v in secs) else None
        row["trained_together"] = ev[0].get("trained_together")
        row.update(summarize_arm(C[a["name"]], buckets, seeds=seeds, **boot))
        out_arms.append(row)

    full_big = next(a for a in arms if a["method"] == "full" and a["data"] == "large")
    points = []
    R = {}
    if restoration and any(restoration.values()):
        zero = next(r for r in out_arms if r["name"] == full_big["name"])
        points.append({"selection": "none", "fraction": 0.0,
                       **{k: zero[k] for k in ("in_domain", "out_of_domain", "in_domain_d34", "ci95", "n", "seeds")}})
        for sel in s["restore_selections"]:
            for f in s["restore_fractions"]:
                got = [restoration[seed][(sel, f)] for seed in seeds]
                R[(sel, f)] = _matrices([g["eval"] for g in got])
                p = {"selection": sel, "fraction": f}
                p.update(summarize_arm(R[(sel, f)], buckets, seeds=seeds, **boot))
                p["stats"] = got[0]["stats"]
                p["stats_by_seed"] = [g["stats"] for g in got]
                points.append(p)

    findings = build_findings(C, R, buckets, intruders, s, skipped or {}, arms)
    if reasoning is not None:
        findings += reasoning["findings"]
    for f in findings:
        f["borderline"] = borderline(f["ci95"])
    tuned = out_arms[1:]
    best = max(tuned, key=lambda a: -1.0 if a["in_domain_d34"] is None else a["in_domain_d34"])
    bd34 = best["in_domain_d34"] or 0.0
    base_mean = base["in_domain"]["mean"] or 0.0
    by_seed = {str(seed): {"all": bucket_counts(facts[seed]),
                      "train": bucket_counts(facts[seed], split="train", domain="in"),
                      **{d: bucket_counts(tests[seed][d]) for d in DOMAINS}} for seed in seeds}
    fewest = {k: {b: min(c[k][b] for c in by_seed.values()) for b in BUCKETS} for k in by_seed[str(seeds[0])]}
    return {
        "buckets": fewest["all"],  # each count is the fewest over the seeds' bases
        "test_buckets": {d: fewest[d] for d in DOMAINS},
        "train_buckets": fewest["train"],
        "buckets_by_seed": by_seed,
        "findings": findings,
        "arms": out_arms,
        "restoration": {"of": full_big["name"], "select": "top", "selections": list(s["restore_selections"]),
                        "score": "relative", "scope": "global", "points": points},
        "summary": {"best_arm": best["name"], "best_d34": best["in_domain_d34"],
                    "best_d34_ci95": best["ci95"]["in_domain_d34"], "best_d0": best["in_domain"]["D0"],
                    "base_in_domain": base["in_domain"]["mean"], "base_in_domain_ci95": base["ci95"]["in_domain"]["mean"],
                    "base_d34": base["in_domain_d34"],
                    "criterion_base_le_15": bool(base_mean <= 0.15),
                    "criterion_best_d34_ge_60": bool(bd34 >= 0.6),
                    "criterion_d34_ge_50": bool(bd34 >= 0.5),
                    "all_buckets_nonempty": all(v > 0 for v in fewest["all"].values()),
                    "test_buckets_ge_60": all(v >= 60 for d in DOMAINS for v in fewest[d].values()),
                    "verdicts": {f["id"]: f["verdict"] for f in findings}},
        "seeds": seeds,
        "settings": {"demo": s, "scale": scale, "world": bases[seeds[0]]["settings"],
                     "bases": {str(seed): {"dir": str(b["base_dir"]), "source": b["source"], "cached": b["cached"],
                                      "model_seed": b["settings"]["model"].get("seed")}
                               for seed, b in bases.items()},
                     "base_cached": all(b["cached"] for b in bases.values())},
        "together": together,
        "skipped_arms": dict(skipped or {}),
        "reasoning": None if reasoning is None else {k: v for k, v in reasoning.items() if k != "findings"},
    }


def build_findings(C: dict, R: dict, buckets: dict, intruders, s: dict, skipped: dict | None = None,
                   arms: list | None = None) -> list:
    """The findings, in the order of the issue; each with ``id``, ``claim``, ``source``, ``effect``,
    ``ci95`` and ``verdict``. ``C``: ``{arm: {domain: (S, F)}}``; ``R``: ``{(selection, fraction): ...}``."""
    f = s["large_factor"]
    rl = s["large_lora_rank"]
    known, unknown = "".join(s["known_buckets"]), "".join(s["unknown_buckets"])
    frac = s["finding_fraction"]
    pct = f"{100 * frac:g} %"
    boot = {"n_boot": s["n_boot"], "boot_seed": s["seed"]}
    mean_in = "in-domain accuracy (unweighted mean over the mastery buckets)"
    mean_out = "out-of-domain accuracy (unweighted mean over the mastery buckets)"

    def diff(fid, claim, source, a, b, dom="in_domain", metric=mean_in, table=C):
        if a not in table or b not in table:
            missing = a if a not in table else b
            why = (skipped or {}).get(missing, "not run with these settings")
            return unmeasured_finding(fid, claim, source, f"no arm {missing!r}: {why}")
        name = (lambda k: k if isinstance(k, str) else f"restore-{k[0]}-{100 * k[1]:g}%")
        return difference_finding(fid, claim, source, table[a][dom], table[b][dom], buckets[dom], combine="mean",
                                  a_name=name(a), b_name=name(b), metric=metric, **boot)

    R0 = dict(R)
    if R:
        R0["unrestored"] = C.get(f"full-x{f}")
    out = [
        _rank_flat(C, buckets, s, boot, mean_in),
        diff("data_size", f"Full SFT on the small set gives higher in-domain accuracy than on the {f}x larger set.",
             KNOWLEDGE, "full", f"full-x{f}"),
        diff("data_size_lora", f"LoRA (r = {rl}) on the small set gives higher in-domain accuracy than on the {f}x "
             "larger set.", KNOWLEDGE, f"lora-r{rl}", f"lora-r{rl}-x{f}"),
        diff("mastery", f"Full SFT on well-known facts ({known}) gives higher in-domain accuracy than on unknown "
             f"facts ({unknown}) of the same number.", KNOWLEDGE, f"full-{known}", f"full-{unknown}"),
    ]
    top, rnd, bot = ("top", frac), ("random", frac), ("bottom", frac)
    if R and top in R and R0.get("unrestored") is not None:
        out.append(diff("restore_top", f"Restoring the top {pct} of relative updates of the {f}x full-SFT model "
                        "raises its in-domain accuracy.", KNOWLEDGE, top, "unrestored", table=R0))
        out.append(diff("restore_vs_random", f"Restoring the top {pct} of relative updates beats restoring a random "
                        f"{pct}.", KNOWLEDGE, top, rnd, table=R0))
        out.append(diff("restore_vs_bottom", f"Restoring the top {pct} of relative updates beats restoring the "
                        f"bottom {pct}.", KNOWLEDGE, top, bot, table=R0))
    else:
        why = f"no restoration at {pct} was run (restore_fractions, restore_selections)"
        for fid, claim in (("restore_top", "Restoring the top updates raises in-domain accuracy."),
                           ("restore_vs_random", "Restoring the top updates beats restoring random ones."),
                           ("restore_vs_bottom", "Restoring the top updates beats restoring the bottom ones.")):
            out.append(unmeasured_finding(fid, claim, KNOWLEDGE, why))
    out.append(diff("lora_forgets_less", f"LoRA (r = {rl}) keeps more out-of-domain accuracy than full SFT on the "
                    "same (small) data.", RANKS, f"lora-r{rl}", "full", dom="out_of_domain", metric=mean_out))
    out.append(diff("lora_forgets_less_large", f"LoRA (r = {rl}) keeps more out-of-domain accuracy than full SFT on "
                    f"the same {f}x larger data.", RANKS, f"lora-r{rl}-x{f}", f"full-x{f}", dom="out_of_domain",
                    metric=mean_out))
    out.append(_intruder_finding(intruders, s, boot))
    return out


def _rank_flat(C: dict, buckets: dict, s: dict, boot: dict, metric: str) -> dict:
    """``recall_rank_flat``: every LoRA rank of the small set within 5 points of the others on recall."""
    claim = "On recall (closed-book QA, in domain) every LoRA rank scores within 5 points of the others."
    names = [f"lora-r{r}" for r in s["ranks"] if f"lora-r{r}" in C]
    if len(names) < 2:
        return unmeasured_finding("recall_rank_flat", claim, RANKS, "fewer than two LoRA ranks on the small set")
    return spread_finding("recall_rank_flat", claim, RANKS, [C[n]["in_domain"] for n in names], buckets["in_domain"],
                          within=0.05, names=names, metric=f"5 points minus the spread (best minus worst rank) of the "
                          f"{metric}", **boot)


def _compared(f: dict) -> str:
    """What a finding compares, in words."""
    if f["effect"] is None:
        return f"not measured: {f['why']}"
    if "slope" in f:
        return f"slope {f['slope']:.2f} over ranks {', '.join(f'{x:g}' for x in f['xs'])}"
    if "spread" in f:
        return f"spread {100 * f['spread']:.1f} points ({f['a']['arm']} − {f['b']['arm']})"
    if f.get("a") and "arms" in f["a"]:
        return f"mean({', '.join(f['a']['arms'])}) − mean({', '.join(f['b']['arms'])})"
    return f"{f['a']['arm']} − {f['b']['arm']}" if f.get("a") else f["metric"]


def _intruder_finding(intruders, s: dict, boot: dict) -> dict:
    rl = s["large_lora_rank"]
    claim = f"LoRA (r = {rl}) updates carry more intruder dimensions than full SFT's (same small data)."
    lora, full = f"lora-r{rl}", "full"
    if not intruders:
        why = "the analysis stage is off (analysis: false)" if not s["analysis"] else \
            f"LoRA rank {rl} is not among the small-set ranks {s['ranks']}"
        return unmeasured_finding("intruders", claim, INTRUDERS, why)
    seeds = list(intruders)
    names = None
    for seed in seeds:
        got = intruders[seed]
        if lora not in got or full not in got:
            return unmeasured_finding("intruders", claim, INTRUDERS, f"seed {seed} has no intruder counts")
        common = set(got[lora]) & set(got[full])
        names = common if names is None else names & common
    names = sorted(names or [])
    if not names:
        return unmeasured_finding("intruders", claim, INTRUDERS, "the LoRA and full-SFT runs share no matrix")
    a = np.asarray([[intruders[seed][lora][n] for n in names] for seed in seeds], dtype=np.float64)
    b = np.asarray([[intruders[seed][full][n] for n in names] for seed in seeds], dtype=np.float64)
    return difference_finding("intruders", claim, INTRUDERS, a, b, None, combine="mean", a_name=lora, b_name=full,
                              metric="intruder dimensions per weight matrix (top-10 left singular vectors of "
                              "W_tuned with max |cos| < 0.5 to W_base's; bootstrap over matrices and seeds)", **boot)


# ----------------------------------------------------------------------------- text

def _pct(v) -> str:
    return "–" if v is None or v != v else f"{100 * v:.1f}"


def _ci(ci) -> str:
    if not ci or ci[0] is None:
        return "–"
    return f"[{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def _cell(value, ci) -> str:
    return "–" if value is None else f"{_pct(value)} {_ci(ci)}"


def _num(v, digits=3) -> str:
    return "–" if v is None else f"{v:+.{digits}f}"


def headline(results: dict) -> str:
    """One line: the base arm, the best arm with intervals, and the verdicts."""
    sm = results["summary"]
    v = sm.get("verdicts", {})
    tally = ", ".join(f"{k} {sum(1 for x in v.values() if x == k)}" for k in ("reproduced", "contradicted",
                                                                             "inconclusive"))
    return (f"base in-domain {_pct(sm['base_in_domain'])}%; best arm {sm['best_arm']}: in-domain D3+D4 "
            f"{_pct(sm['best_d34'])}% {_ci(sm['best_d34_ci95'])}, D0 {_pct(sm['best_d0'])}%; findings: {tally}")


def _findings_table(results: dict) -> list:
    L = ["## Findings", "",
         "Each finding compares arms on the same test items (or, for the update findings, the same weight "
         "matrices). `effect` is defined so that a positive value means \"as the claim says\" (accuracies as "
         "fractions, e.g. +0.050 = 5 points); its 95 % interval is a paired bootstrap over the items and the seeds, "
         "each seed with its own pretrained base. Verdict: **reproduced** when the whole interval is above 0, "
         "**contradicted** when it is below 0, **inconclusive** otherwise; *borderline* when an end of the interval "
         f"lies within {100 * MARGIN:g} points of 0, where another machine's rounding may move it across. The "
         "reasoning accuracies, scored on generated chains of thought, move more with the machine: their "
         f"findings' intervals are the bootstrap's widened by {100 * CHAIN_MARGIN:g} points on each side "
         "(`ci95_sampling` holds the bootstrap's own).", "",
         "| id | claim | effect | 95 % CI | verdict | arms (a − b) | source |", "|---|---|---|---|---|---|---|"]
    for f in results["findings"]:
        ci = f["ci95"]
        ci_s = "–" if ci[0] is None else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"
        arms = _compared(f)
        near = " (*borderline*)" if f.get("borderline") else ""
        L.append(f"| `{f['id']}` | {f['claim']} | {_num(f['effect'])} | {ci_s} | **{f['verdict']}**{near} | {arms} | "
                 f"{f['source']} |")
    L.append("")
    return L


def write_report(out: Path, results: dict, analysis_md: str | None = None) -> None:
    """Plots and ``report.md`` (the findings first)."""
    files = plots(out, results)
    results["plots"] = files
    L = ["# rankwise demo: the knowledge study and the rank study on the embedded synthetic world", ""]
    L += _findings_table(results)
    L += [f"![findings]({files['findings']})", ""]
    L += _headline_lines(results)
    L += _bucket_lines(results)
    L += _accuracy_lines(results)
    L += _per_seed_lines(results)
    L += [f"![accuracy vs rank]({files['rank']})", "", f"![accuracy vs data size]({files['data_size']})", "",
          f"![accuracy by training bucket]({files['mastery']})", ""]
    L += _restoration_lines(results, files)
    L += _reasoning_lines(results, files)
    L += _settings_lines(results)
    L += _times(results)
    if analysis_md:
        L += [analysis_md.rstrip(), ""]
    atomic_write_text(out / "report.md", "\n".join(L))


def _headline_lines(results: dict) -> list:
    """The headline: the base model, the best arm, and how to read the accuracies."""
    sm = results["summary"]
    nseeds = len(results["seeds"])
    L = []
    L += ["## Headline", "",
          f"- Base model, before fine-tuning, in the fine-tuning QA format: in-domain "
          f"{_cell(sm['base_in_domain'], sm['base_in_domain_ci95'])} % (D3+D4 {_pct(sm['base_d34'])} %); "
          f"criterion <= 15 %: {'met' if sm['criterion_base_le_15'] else 'NOT met'}.",
          f"- Best arm **{sm['best_arm']}**: in-domain D3+D4 {_cell(sm['best_d34'], sm['best_d34_ci95'])} %, "
          f"D0 {_pct(sm['best_d0'])} %; criterion D3+D4 >= 60 %: "
          f"{'met' if sm['criterion_best_d34_ge_60'] else 'NOT met'}; all five buckets non-empty: "
          f"{'yes' if sm['all_buckets_nonempty'] else 'NO'}.",
          f"- Every accuracy below is the mean over {nseeds} seed(s) (each seed fine-tunes its own pretrained base "
          "and draws the fine-tuning sample, its order and the adapter init) in %, followed by its 95 % interval "
          "[lo, hi] (bootstrap over test facts and seeds, so over bases too); `n` is the number of test facts.", ""]
    return L


def _bucket_lines(results: dict) -> list:
    """The mastery buckets: how R is measured and how many facts each bucket holds."""
    d = results["settings"]["demo"]
    B = list(BUCKETS)
    L = []
    L += ["## Mastery buckets", "",
          "R = share of (completion probes x samples at temperature "
          f"{d['mastery_temperature']}) whose output contains the answer; "
          f"{d['mastery_samples']} samples per probe, {d['max_new_tokens']} new tokens. Each seed's base has its own "
          "mastery of each fact, so its own buckets; each count below is the fewest over the seeds' bases "
          "(`buckets_by_seed` in results.json has them all).", "",
          "| | " + " | ".join(B) + " |", "|---|" + "---|" * len(B),
          "| all study facts | " + " | ".join(str(results["buckets"][b]) for b in B) + " |",
          "| train pool (in-domain) | " + " | ".join(str(results["train_buckets"][b]) for b in B) + " |",
          "| test, in-domain (n) | " + " | ".join(str(results["test_buckets"]["in_domain"][b]) for b in B) + " |",
          "| test, out-of-domain (n) | " + " | ".join(str(results["test_buckets"]["out_of_domain"][b]) for b in B)
          + " |", ""]
    return L


def _accuracy_lines(results: dict) -> list:
    """The in-domain and out-of-domain tables: every arm's accuracy by mastery bucket."""
    B = list(BUCKETS)
    L = []
    for dom, title in (("in_domain", "In-domain (held-out facts of the location relations)"),
                       ("out_of_domain", "Out-of-domain (the other relations)")):
        n = results["test_buckets"][dom]
        extra = " | D3+D4" if dom == "in_domain" else ""
        L += [f"## {title}: accuracy (%) by mastery bucket", "",
              "| arm | train facts | " + " | ".join(f"{b} (n={n[b]})" for b in B) + f" | mean{extra} |",
              "|---" * (3 + len(B) + (1 if extra else 0)) + "|"]
        for a in results["arms"]:
            cells = [_cell(a[dom][b], a["ci95"][dom][b]) for b in B]
            row = f"| {a['name']} | {a['train_size'] or '–'} | " + " | ".join(cells) + \
                f" | {_cell(a[dom]['mean'], a['ci95'][dom]['mean'])}"
            if extra:
                row += f" | {_cell(a['in_domain_d34'], a['ci95']['in_domain_d34'])}"
            L.append(row + " |")
        L.append("")
    return L


def _per_seed_lines(results: dict) -> list:
    """Every fine-tuned arm's accuracies, one column per seed."""
    nseeds = len(results["seeds"])
    L = []
    L += ["## Per seed", "", "In-domain mean and D3+D4, out-of-domain mean (%), one column per seed.", "",
          "| arm | " + " | ".join(f"seed {x}" for x in results["seeds"]) + " |",
          "|---" * (1 + nseeds) + "|"]
    for a in results["arms"][1:]:
        L.append(f"| {a['name']} | " + " | ".join(
            f"{_pct(r['in_domain']['mean'])} / {_pct(r['in_domain_d34'])} / {_pct(r['out_of_domain']['mean'])}"
            for r in a["seeds"]) + " |")
    L.append("")
    return L


def _restoration_lines(results: dict, files: dict) -> list:
    """The restoration section: its table and plot, or why there is none."""
    L = []
    r = results["restoration"]
    L += ["## Restoring updates of the large full-SFT model", ""]
    if r["points"]:
        L += [f"Model: {r['of']} (each seed's). r_i = |tuned - base| / (|base| + 1e-8) over the decoder-layer "
              "weights (`layers`, no norms), one global ranking; the top, bottom or a random k% are set back to the "
              "base values (random: drawn with the seed).", "",
              "| selection | restored % | in mean | in D3+D4 | in D0 | out mean |", "|---" * 6 + "|"]
        for p in r["points"]:
            L.append(f"| {p['selection']} | {100 * p['fraction']:g} | "
                     f"{_cell(p['in_domain']['mean'], p['ci95']['in_domain']['mean'])} | "
                     f"{_cell(p['in_domain_d34'], p['ci95']['in_domain_d34'])} | "
                     f"{_cell(p['in_domain']['D0'], p['ci95']['in_domain']['D0'])} | "
                     f"{_cell(p['out_of_domain']['mean'], p['ci95']['out_of_domain']['mean'])} |")
        L += ["", f"![accuracy vs restored fraction]({files['restoration']})", ""]
    else:
        L += ["No restoration fractions were asked for.", ""]
    return L


REASONING_SETS = (("test", "in domain"), ("ood_people", "new people"), ("ood_composition", "new compositions"),
                  ("ood_kind", "new kind"), ("no_chain", "in domain, no chain"))


def _reasoning_lrs(rs: dict) -> str:
    """The reasoning arms' learning rates and how they were set."""
    sel = rs.get("lr_selection") or {"chosen": {"lora": rs["settings"]["lora_lr"], "full": rs["settings"]["full_lr"]},
                                     "validation": {}, "why": "fixed"}
    lrs = f"LoRA lr {sel['chosen']['lora']:g}, full SFT lr {sel['chosen']['full']:g}"
    if not sel["validation"]:
        return lrs + " (fixed, not tuned)"
    tried = "; ".join(f"{m}: " + ", ".join(f"{lr} {_pct(acc)} %" for lr, acc in v.items())
                      for m, v in sel["validation"].items())
    fixed = [m for m in ("lora", "full") if m not in sel["validation"]]
    return lrs + (f" ({' and '.join(sel['validation'])} chosen on the validation items' exact match with the first "
                  f"seed: {tried}" + (f"; {', '.join(fixed)} fixed" if fixed else "") + ")")


def _reasoning_lines(results: dict, files: dict) -> list:
    """The reasoning study: its items, the recall gate, exact match per arm and set, forgetting, updates."""
    rs = results.get("reasoning")
    if rs is None:
        return []
    r = rs["settings"]
    L = ["## Reasoning: LoRA ranks and full SFT on chain-of-thought questions", ""]
    if rs.get("skipped"):
        return L + [f"Not run: {rs['skipped']}.", ""]
    sz = rs["sizes"]
    gate = ", ".join(f"seed {k} {_pct(v)} %" for k, v in rs["gate"].items())
    L += [f"- {rs['people']} people whose {', '.join(r['relations'])} facts every base knows (R >= "
          f"{r['min_mastery']}); {rs['held_out_people']} of them held out"
          + (f"; hop questions also of {rs['hop_people']} people who know that one fact ({rs['hop_held_out']} more "
             "held out)" if rs.get("hop_people") else "")
          + f". Kinds trained: {', '.join(k for k in r['kinds'] if k != r['held_out_kind'])}; held out: "
          f"{', '.join(rs['ood_kinds']) or 'none'} (new kind) and {', '.join(rs['ood_compositions']) or 'none'} "
          f"(new compositions). Items: train {sz['train']}, validation "
          f"{sz['validation']}, test {sz['test']}, new people {sz['ood_people']}, new compositions "
          f"{sz['ood_composition']}, new kind {sz['ood_kind']}.",
          f"- Gate, 1-hop recall of the {sz['recall_used']} facts the items use (greedy, pretraining's completion "
          f"format): {gate}; >= {_pct(r['gate'])} %: {'met' if rs['gate_met'] else 'NOT met'}.",
          f"- Arms per seed, on that seed's base: LoRA r = {', '.join(map(str, r['ranks']))} trained together, "
          f"and full SFT; {r['epochs']} epochs, batch {r['batch_size']}, alpha = {r['lora_alpha_per_rank']:g} r; "
          f"{_reasoning_lrs(rs)}. Rank chosen on validation items: r = {rs['chosen_rank']}.",
          "- Exact match of the final answer in %, mean over seeds [95 % interval over items and seeds (bases)]; "
          "chain: the share of the chain's facts stated right (test); 1-hop and OOD recall: greedy completion "
          "of the test people's city facts and of their out-of-domain facts every base knows (before: the base).",
          "", "| arm | " + " | ".join(label for _, label in REASONING_SETS) + " | chain | 1-hop recall | OOD recall "
          "| update norm |", "|---|" + "---|" * (len(REASONING_SETS) + 4)]
    for a in rs["arms"]:
        cells = [_cell(*(_get(a, f"{k}.exact"))) for k, _ in REASONING_SETS]
        cells += [_cell(*_get(a, "test.chain")), _cell(*_get(a, "recall_1hop.exact")),
                  _cell(*_get(a, "recall_ood.exact"))]
        norm = rs["update_norms"].get(a["name"])
        L.append(f"| {a['name']} | " + " | ".join(cells) + f" | {'–' if norm is None else f'{norm:.3g}'} |")
    L += [""]
    if "reasoning" in files:
        L += [f"![reasoning vs rank]({files['reasoning']})", ""]
    layers = rs.get("layers") or {}
    if any(layers.values()):
        L += ["Per layer (mean over seeds): attention change (Jensen-Shannon distance of the attention maps to "
              "the base's, mean over heads) / representation similarity to the base (linear CKA), on 32 test "
              "items.", "", "| arm | " + " | ".join(f"layer {i}" for i in range(len(next(
                  v for v in layers.values() if v).get("attention_js", [])))) + " |"]
        L += ["|---|" + "---|" * len(next(v for v in layers.values() if v).get("attention_js", []))]
        for name, v in layers.items():
            if v:
                L.append(f"| {name} | " + " | ".join(f"{j:.3f} / {c:.3f}" for j, c in
                                                     zip(v.get("attention_js", []), v.get("cka", []))) + " |")
        L += [""]
    return L


def _get(arm: dict, key: str) -> tuple:
    v = arm.get(key)
    return (None, None) if not v else (v["mean"], v["ci95"])


def _settings_lines(results: dict) -> list:
    """The settings: the world, the base model, the fine-tuning protocol and the evaluation."""
    s = results["settings"]
    d = s["demo"]
    w = s["world"]
    L = []
    L += ["## Settings", "",
          f"- world ({s['scale']} preset): {json.dumps(w['world'])}",
          f"- base model: {json.dumps(w['model'])}; pretraining: {json.dumps(w['train'])}",
          *[f"- seed {seed}'s base: `{b['dir']}` ({_source(b)})" for seed, b in s["bases"].items()],
          "- the regime: each seen person appears in several biographies (templates and sentence order drawn at "
          "random, each fact kept with probability `fact_keep`); question-answer text about the *anchor* people "
          "(the mixed training that makes facts extractable) uses the fine-tuning format (`Question: ... "
          "Answer:`) for the out-of-domain relations only, and another format (`Q: ... A:`) with other wordings "
          f"for the in-domain ones (`anchor_alt_format`: {w['world'].get('anchor_alt_format', 'qa')}), so no "
          "in-domain question of the study's wordings appears in pretraining: the base model stores those facts "
          "(mastery is measured with completion probes) but has to be taught by fine-tuning to answer them in "
          "the study's format; the *study* people (mastery, fine-tuning and test sets) never appear in QA text",
          f"- fine-tuning, for each of the seeds {results['seeds']}: {d['small_size']} in-domain facts of the train "
          f"people (bucket: {d['train_bucket']}) and the {d['large_factor']}x larger set that contains them; "
          f"{d['small_size']} facts of buckets {'+'.join(d['known_buckets'])} and of {'+'.join(d['unknown_buckets'])}; "
          f"{d['epochs']} epochs, batch {d['batch_size']}, cosine, LoRA lr {_lr(results, 'lora')} (alpha = "
          f"{d['lora_alpha_per_rank']:g} r, all linear layers of the blocks), full SFT lr {_lr(results, 'full')}",
          _selection_line(results),
          *[f"- seed {g['seed']}: LoRA arms {', '.join(g['arms'])} trained together (`rankwise.together`: one base "
            f"model, one pass per step, each arm its solo run's result); this run trained "
            f"{', '.join(g['trained']) if g['trained'] else 'none of them (all cached)'} in {g['seconds']} s"
            for g in results.get("together", [])],
          f"- evaluation: greedy, {d['max_new_tokens']} new tokens, correct when the answer is contained in the "
          "output; mean = unweighted mean over the non-empty buckets; intervals: percentile bootstrap, "
          f"{d['n_boot']} draws, test facts resampled (each seed's bucket means from its own buckets), seeds "
          "(bases) resampled, paired across arms",
          ""]
    return L


def _source(b: dict) -> str:
    """Where a seed's base came from, in words."""
    where = ("the shipped base (the same weights on every machine)" if b["source"] == "shipped" else
             "pretrained on this machine, not the shipped base: verdicts may differ from the README's")
    return f"{where}; {'cached' if b['cached'] else 'installed or pretrained in this run'}"


def _lr(results: dict, method: str):
    sel = results.get("lr_selection")
    return sel["chosen"][method] if sel else results["settings"]["demo"][f"{method}_lr"]


def _selection_line(results: dict) -> str:
    sel = results.get("lr_selection")
    if not sel:
        return "- learning rates: fixed"
    if sel.get("why"):
        return f"- learning rates: {sel['why']}"
    parts = [f"{m}: " + ", ".join(f"{lr} → {100 * acc:.1f} %" for lr, acc in accs.items())
             for m, accs in sel["validation"].items()]
    return (f"- learning rates chosen on {sel['n_validation']} validation facts (the train people's in-domain facts "
            f"outside seed {sel['seed']}'s large set; never the test facts), each candidate fine-tuning the large set "
            f"once: {'; '.join(parts)}")


def _times(results: dict) -> list:
    st = {k: v for k, v in results["stage_seconds"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    total = results["seconds"] or sum(st.values()) or 1.0
    L = ["## Where the time went", "",
         f"Stages summed over the {len(results['seeds'])} seeds; the base model was "
         f"{'taken from the cache' if results['settings']['base_cached'] else 'installed or pretrained in this run'}"
         ".", "",
         "| stage | seconds | share |", "|---|---|---|"]
    for k, v in sorted(st.items(), key=lambda kv: -kv[1]):
        L.append(f"| {k} | {v:.1f} | {100 * v / total:.0f} % |")
    L += [f"| total | {total:.1f} | |", ""]
    return L


# ----------------------------------------------------------------------------- plots

def _err(value, ci):
    if value is None or not ci or ci[0] is None:
        return float("nan"), [[0.0], [0.0]]
    return value, [[max(0.0, value - ci[0])], [max(0.0, ci[1] - value)]]


def _errorbar(ax, xs, pts, **kw):
    """Points ``pts = [(value, ci), ...]`` at ``xs`` with their intervals as error bars."""
    ys, lo, hi = [], [], []
    for v, ci in pts:
        y, e = _err(v, ci)
        ys.append(y)
        lo.append(e[0][0])
        hi.append(e[1][0])
    ax.errorbar(xs, ys, yerr=[lo, hi], capsize=3, marker="o", **kw)


def _save(plt, fig, out: Path, files: dict, key: str, name: str) -> None:
    fig.tight_layout()
    files[key] = name
    fig.savefig(out / name, dpi=110)
    plt.close(fig)


def plots(out: Path, results: dict) -> dict:
    """The PNG plots; returns ``{kind: file name}``."""
    import matplotlib  # heavy at import: matplotlib, loaded only to plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy at import: matplotlib

    files = {}
    for plot in (_plot_rank, _plot_data_size, _plot_train_buckets, _plot_restoration, _plot_findings, _plot_reasoning):
        plot(plt, out, results, files)
    return files


def _plot_reasoning(plt, out: Path, results: dict, files: dict) -> None:
    """Reasoning exact match vs rank (LoRA ranks, then full SFT) in domain and on each out-of-domain set."""
    rs = results.get("reasoning")
    if not rs or rs.get("skipped"):
        return
    arms = [a for a in rs["arms"] if a["name"] != "base"]
    xs = np.arange(len(arms))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (key, label) in enumerate(REASONING_SETS):
        _errorbar(ax, xs + 0.05 * (i - 2), [_get(a, f"{key}.exact") for a in arms], label=label)
    ax.set_xticks(xs, [f"r={a['rank']}" if a["method"] == "lora" else "full SFT" for a in arms])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("exact match (mean over seeds, 95 % CI)")
    ax.set_title(f"reasoning vs rank ({len(results['seeds'])} seeds, one base each)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, out, files, "reasoning", "reasoning_vs_rank.png")


def _plot_rank(plt, out: Path, results: dict, files: dict) -> None:
    """Accuracy vs rank on the small set (LoRA ranks, then full SFT), in- and out-of-domain."""
    arms = results["arms"]
    small = results["settings"]["demo"]["small_size"]
    base = {a["name"]: a for a in arms}["base"]
    nseeds = len(results["seeds"])
    sweep = [a for a in arms if a.get("data") == "small"]
    labels = [f"r={a['rank']}" if a["method"] == "lora" else "full SFT" for a in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    xs = np.arange(len(sweep))
    for ax, dom, title in zip(axes, DOMAINS, ("in-domain", "out-of-domain")):
        series = [("mean", lambda a: (a[dom]["mean"], a["ci95"][dom]["mean"]), "-")]
        if dom == "in_domain":
            series += [("D3+D4", lambda a: (a["in_domain_d34"], a["ci95"]["in_domain_d34"]), "--"),
                       ("D0", lambda a: (a["in_domain"]["D0"], a["ci95"]["in_domain"]["D0"]), ":")]
        for i, (name, get, ls) in enumerate(series):
            _errorbar(ax, xs + 0.06 * (i - 1), [get(a) for a in sweep], ls=ls, label=f"{name}, {small} facts")
        ax.axhline(base[dom]["mean"] or 0.0, color="grey", ls=":", lw=1.5, label="base model, mean")
        ax.set_xticks(xs, labels)
        ax.set_title(f"{title} accuracy vs rank ({small} training facts, {nseeds} seeds)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy (mean over seeds, 95 % CI)")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    _save(plt, fig, out, files, "rank", "accuracy_vs_rank.png")


def _plot_data_size(plt, out: Path, results: dict, files: dict) -> None:
    """Accuracy vs data size (LoRA at the large-set rank, full SFT)."""
    d = results["settings"]["demo"]
    arms = results["arms"]
    nseeds = len(results["seeds"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    rl = d["large_lora_rank"]
    for method, label in (("lora", f"LoRA r={rl}"), ("full", "full SFT")):
        group = sorted((a for a in arms if a.get("data") in ("small", "large") and a["method"] == method
                        and (method == "full" or a["rank"] == rl)), key=lambda a: a["train_size"])
        if len(group) < 2:
            continue
        for dom, ls in (("in_domain", "-"), ("out_of_domain", "--")):
            _errorbar(ax, [a["train_size"] for a in group], [(a[dom]["mean"], a["ci95"][dom]["mean"]) for a in group],
                      ls=ls, label=f"{label}, {dom.replace('_', '-')}")
    ax.set_xscale("log", base=2)
    sizes = sorted({a["train_size"] for a in arms if a.get("data") in ("small", "large")})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("fine-tuning set size (facts)")
    ax.set_ylabel("mean accuracy over buckets (95 % CI)")
    ax.set_title(f"accuracy vs data size ({nseeds} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, out, files, "data_size", "accuracy_vs_data_size.png")


def _plot_train_buckets(plt, out: Path, results: dict, files: dict) -> None:
    """Full SFT on the natural mix, the known and the unknown facts (same size)."""
    arms = results["arms"]
    nseeds = len(results["seeds"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    group = [a for a in arms if a["method"] == "full" and a.get("data") in ("small", "known", "unknown")]
    xs = np.arange(len(group))
    for i, (name, get) in enumerate((("in-domain mean", lambda a: (a["in_domain"]["mean"],
                                                                     a["ci95"]["in_domain"]["mean"])),
                                     ("in-domain D3+D4", lambda a: (a["in_domain_d34"], a["ci95"]["in_domain_d34"])),
                                     ("out-of-domain mean", lambda a: (a["out_of_domain"]["mean"],
                                                                       a["ci95"]["out_of_domain"]["mean"])))):
        _errorbar(ax, xs + 0.08 * (i - 1), [get(a) for a in group], ls="none", label=name)
    ax.set_xticks(xs, [f"{a['train_buckets']}\n({a['train_size']} facts)" for a in group])
    ax.set_xlabel("buckets of the fine-tuning facts (full SFT)")
    ax.set_ylabel("accuracy (95 % CI)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"what the fine-tuning facts are ({nseeds} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, out, files, "mastery", "accuracy_by_train_bucket.png")


def _plot_restoration(plt, out: Path, results: dict, files: dict) -> None:
    """Restoration: top / bottom / random vs the restored fraction (none without points)."""
    nseeds = len(results["seeds"])
    pts = results["restoration"]["points"]
    if pts:
        zero = next(p for p in pts if p["selection"] == "none")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, dom, title in zip(axes, DOMAINS, ("in-domain", "out-of-domain")):
            for i, sel in enumerate(results["restoration"]["selections"]):
                ps = [p for p in pts if p["selection"] == sel]
                _errorbar(ax, [100 * p["fraction"] * (1 + 0.04 * (i - 1)) for p in ps],
                          [(p[dom]["mean"], p["ci95"][dom]["mean"]) for p in ps], label=f"{sel} k%")
            v, ci = zero[dom]["mean"], zero["ci95"][dom]["mean"]
            ax.axhline(v or 0.0, color="grey", ls=":", label=f"{results['restoration']['of']}, unrestored")
            if ci and ci[0] is not None:
                ax.axhspan(ci[0], ci[1], color="grey", alpha=0.15)
            xs = sorted({100 * p["fraction"] for p in pts if p["fraction"] > 0})
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
            ax.set_xlabel("updates restored to the base (%)")
            ax.set_title(f"{title}: restoring {results['restoration']['of']} ({nseeds} seeds)")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("mean accuracy over buckets (95 % CI)")
        axes[1].legend(fontsize=8)
        _save(plt, fig, out, files, "restoration", "accuracy_vs_restored_fraction.png")


def _plot_findings(plt, out: Path, results: dict, files: dict) -> None:
    """The findings: effects with their intervals (intruders only in the table)."""
    nseeds = len(results["seeds"])
    fs = [f for f in results["findings"] if f["effect"] is not None and f["id"] != "intruders"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * max(3, len(fs)) + 1.2))
    ys = np.arange(len(fs))[::-1]
    colors = {"reproduced": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:grey"}
    for y, f in zip(ys, fs):
        lo, hi = f["ci95"]
        ax.errorbar([f["effect"]], [y], xerr=[[f["effect"] - lo], [hi - f["effect"]]], fmt="o", capsize=3,
                    color=colors[f["verdict"]])
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(ys, [f"{f['id']} ({f['verdict']})" for f in fs])
    ax.set_xlabel("effect (accuracy difference; > 0: as the claim says), 95 % CI")
    ax.set_title(f"findings ({nseeds} seeds; intruders in the table)")
    ax.grid(alpha=0.3, axis="x")
    _save(plt, fig, out, files, "findings", "findings.png")
