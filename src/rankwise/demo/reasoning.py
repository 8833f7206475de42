"""The demo's reasoning study: LoRA ranks and full SFT fine-tuned on chain-of-thought reasoning over facts
every base knows, scored in and out of domain, with forgetting, update norms and drift.

1. **People.** The study people whose city facts (the relations the questions compose) every seed's base
   knows: mastery ``R >= min_mastery`` for each city relation under every base (a ``hop`` question needs its
   one fact only, and is asked of everyone who knows that one). The questions are the same for every seed,
   so arms compare paired.
2. **Items** (:mod:`rankwise.world.reasoning`): questions of the ``kinds`` (compose, compare, arith over the
   city compositions; hop, a city's country, when the world states them) over the city relations, each
   answered by a chain that states the facts used, then ``Answer: ...``. A seeded share of the people is held
   out (``ood_people``), some compositions are held out (``ood_composition``), and ``held_out_kind`` is held
   out (``ood_kind``); the rest splits into train, validation and test.
3. **Gate.** Each base's greedy 1-hop recall of every fact the items use (and of the countries of the cities
   hop items go through), in the pretraining's completion format, is reported against ``gate`` (90 %):
   reasoning over facts the base does not know measures recall.
4. **Arms**, per seed on its own base: LoRA at every rank of ``ranks`` (trained together in one pass,
   :func:`rankwise.demo.arms.train_group`) and full SFT, on the train items.
5. **Evaluation** of the base and every arm: exact match of the final answer and the share of the chain's
   facts stated right, on validation, test and the three out-of-domain sets; the no-chain control (the test
   questions with ``Answer:`` appended, the answer alone expected); forgetting: greedy 1-hop recall of the
   people's city facts and of their out-of-domain facts known to every base, before (base) and after.
6. **Updates** (:func:`rankwise.analysis.analyze_runs`, spectral part): per weight matrix, the update's
   Frobenius norm and the similarity of the top singular vectors before and after.

:func:`build_section` turns the cached per-item results into per-arm numbers with 95 % intervals (over items
and seeds, so over bases) and the reasoning findings.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np

from ..analysis import analyze_runs, update_measures
from ..analysis.findings import (contrast_finding, difference_finding, drift_finding, slope_finding,
                                unmeasured_finding, with_machine_margin)
from ..analysis.stats import CHAIN_MARGIN, accuracy_with_ci
from ..evaluate import generate_answers, is_correct
from ..model import load_tokenizer
from ..train import train
from ..world import reasoning as R
from ..world.generate import GEO_PROBE, OUT_OF_DOMAIN, TEMPLATES, load_world
from .arms import (arm_config, arm_model, device, load_base, read_json, seed_arm, train_group, write_json,
                   write_jsonl)

# The reasoning study's settings (the demo's ``reasoning`` key); ``None`` there skips the study.
REASONING = {
    "ranks": [1, 4, 16, 32],  # 1 to d/4 of the cpu base (hidden size 128)
    "relations": ["birth_city", "university_city", "work_city"],  # the compositions' relations
    # hop (a city's country, two hops) is trained; compose is asked only out of domain. The bridge-value kinds
    # (compose, compare, arith) need an in-context comparison the 4-layer base does not learn (README).
    "kinds": ["hop", "compose"],  # the question kinds asked (rankwise.world.reasoning.KINDS)
    "held_out_kind": "compose",  # the kind never trained on: the ood_kind set
    # the held-out compositions: two bridge-value ones, and the hop through the birth city, the city fact the
    # shipped bases know least (so the two better-known ones train). Only those of a trained kind are asked (an
    # item held out twice is dropped): by default ood_composition holds country.birth_city alone.
    "held_out_compositions": list(R.HELD_OUT_COMPOSITIONS),
    "min_mastery": 0.25,  # R of each person's city fact a question uses, under every base (the gate checks the
    # cities' countries too)
    "n_per_composition": 200,  # items per kind and composition, in-domain people (fewer where people are few)
    "n_ood_people": 200,  # items per kind and composition, held-out people
    "held_out_people": 0.25,
    "test_fraction": 0.3,
    "validation_fraction": 0.15,  # of the in-domain training items: chooses the LoRA rank and the lrs
    "max_eval": 100,  # items per evaluation set (a seeded sample)
    "max_train": 600,  # training items (a seeded sample): the demo's time budget
    "epochs": 10,
    "batch_size": 8,
    "lora_lr": 2.0e-3,  # used when lr_grid is None
    "full_lr": 1.0e-3,
    # None: the fixed lrs above. Else {"lora"|"full": [lrs]}: the lr of each method named chosen on the
    # validation items with the first seed (LoRA at select_rank); the best exact match wins, the lower lr on a tie.
    "lr_grid": {"lora": [1.0e-3, 2.0e-3, 5.0e-3], "full": [3.0e-4, 1.0e-3, 3.0e-3]},
    "select_rank": 16,
    "lora_alpha_per_rank": 2.0,
    "max_length": 96,
    "max_new_tokens": 48,
    "gate": 0.9,
    "seed": 0,  # items and splits (the same for every seed)
}
SETS = ("validation", "test", "ood_people", "ood_composition", "ood_kind")
OOD = ("ood_people", "ood_composition", "ood_kind")
RECALL = ("recall_used", "recall_1hop", "recall_ood")


def plan(r: dict) -> list:
    """The reasoning arms (without seeds): LoRA at each rank, then full SFT."""
    arms = [{"name": f"reason-lora-r{k}", "method": "lora", "rank": k, "data": "reasoning",
             "label": f"LoRA r={k}, reasoning"} for k in r["ranks"]]
    arms.append({"name": "reason-full", "method": "full", "rank": None, "data": "reasoning",
                 "label": "full SFT, reasoning"})
    return arms


def reasoning_people(facts_by_seed: dict, r: dict) -> list:
    """Sorted ids of the study people whose facts of ``r["relations"]`` every base knows (R >= min_mastery)."""
    known = None
    for facts in facts_by_seed.values():
        ok: dict = {}
        for f in facts:
            if f["relation"] in r["relations"]:
                ok.setdefault(f["person"], []).append(f["R"] >= r["min_mastery"])
        people = {p for p, v in ok.items() if len(v) == len(r["relations"]) and all(v)}
        known = people if known is None else known & people
    return sorted(known or ())


def known_by_relation(facts_by_seed: dict, r: dict) -> dict:
    """``{relation: sorted ids}``: the study people whose fact of that relation every base knows (R >=
    min_mastery); a ``hop`` item needs its person's one fact only."""
    out = {}
    for rel in r["relations"]:
        sets = [{f["person"] for f in facts if f["relation"] == rel and f["R"] >= r["min_mastery"]}
                for facts in facts_by_seed.values()]
        out[rel] = sorted(set.intersection(*sets)) if sets else []
    return out


def _held_out(ids: list, r: dict, salt: str = "") -> list:
    """A seeded share ``held_out_people`` of ``ids``, sorted."""
    ids = list(ids)
    random.Random(f"rankwise.demo.reasoning:{r['seed']}{salt}").shuffle(ids)
    return sorted(ids[:int(round(r["held_out_people"] * len(ids)))])


def _hop_items(world: dict, known: dict, held: list, r: dict) -> list:
    """The hop items of each relation over the people who know that fact, the held-out ones apart."""
    items = []
    for rel, ids in sorted(known.items()):
        comp = [f"{R.COUNTRY}.{rel}"]
        for group, seed, n in ((sorted(set(ids) - set(held)), r["seed"], r["n_per_composition"]),
                               (sorted(set(ids) & set(held)), r["seed"] + 1, r["n_ood_people"])):
            if group:
                items += R.reasoning_items(world, group, kinds=("hop",), seed=seed, n_per_composition=n,
                                           compositions=comp)
    return items


def build_sets(world: dict, people: list, r: dict, known: dict | None = None) -> dict:
    """The items of every set (chain-of-thought; ``no_chain`` holds the test set's controls). The bridge-value
    kinds ask about ``people`` (who know every city fact); ``hop`` about each relation's ``known`` people (default:
    ``people``), whose held-out share extends ``people``'s by the same rule."""
    comps = sorted(f"{a}.{b}" for a in r["relations"] for b in r["relations"])
    held = _held_out(people, r)
    rest = sorted(set(people) - set(held))
    bridge = [k for k in r["kinds"] if k != "hop"]
    items = R.reasoning_items(world, rest, kinds=bridge, seed=r["seed"], n_per_composition=r["n_per_composition"],
                              compositions=comps) if len(rest) >= 4 and bridge else []
    if len(held) >= 4 and bridge:
        items += R.reasoning_items(world, held, kinds=bridge, seed=r["seed"] + 1,
                                   n_per_composition=r["n_ood_people"], compositions=comps)
    if "hop" in r["kinds"]:
        known = known or {rel: list(people) for rel in r["relations"]}
        extra = sorted({p for ids in known.values() for p in ids} - set(people))
        held = sorted(set(held) | set(_held_out(extra, r, ":hop")))
        items += _hop_items(world, known, held, r)
    sets = R.split_reasoning(items, held_out_people=held, held_out_compositions=r["held_out_compositions"],
                             held_out_kind=r["held_out_kind"],
                             test_fraction=r["test_fraction"], seed=r["seed"])
    train_items = sorted(sets["train"], key=lambda it: it["id"])
    random.Random(f"rankwise.demo.reasoning.validation:{r['seed']}").shuffle(train_items)
    n_val = int(round(r["validation_fraction"] * len(train_items)))
    out = {"train": train_items[n_val:][:r["max_train"]], "validation": train_items[:n_val],
           **{k: sets[k] for k in ("test", *OOD)}, "people": people,
           "held_out_people": sorted(set(held) & set(people)),  # of people; hop's own below
           "hop_people": sorted({p for ids in (known or {}).values() for p in ids}) if "hop" in r["kinds"] else [],
           "hop_held_out": sorted(set(held) - set(people))}
    for k in SETS:  # evaluation sets: a seeded sample of at most max_eval items each, in item order
        if len(out[k]) > r["max_eval"]:
            keep = set(random.Random(f"rankwise.demo.reasoning.{k}:{r['seed']}").sample(range(len(out[k])),
                                                                                        r["max_eval"]))
            out[k] = [it for i, it in enumerate(out[k]) if i in keep]
    out["no_chain"] = [R.without_chain(it) for it in out["test"]]
    return out


def recall_rows(world: dict, people: list, relations, facts_by_seed: dict | None = None,
                min_mastery: float = 0.0) -> list:
    """1-hop recall rows (the relation's first completion probe, the value as answer) of ``people``'s facts of
    ``relations``; with ``facts_by_seed``, only the facts whose R >= ``min_mastery`` under every base."""
    keep = None
    if facts_by_seed is not None:
        keep = set.intersection(*[{f["id"] for f in fs if f["R"] >= min_mastery} for fs in facts_by_seed.values()])
    rows = []
    for pid in people:
        p = world["people"][pid]
        for rel in relations:
            fid = f"{pid}:{rel}"
            if keep is None or fid in keep:
                rows.append({"id": fid, "prompt": TEMPLATES[rel]["probe"][0].format(name=p["name"]),
                             "answers": [p["facts"][rel]]})
    return rows


def prepare(world_dir, facts_by_seed: dict, r: dict, work: Path) -> dict:
    """The study's people, item sets and recall rows (cached in ``work/reasoning/sets.json``)."""
    path = work / "reasoning" / "sets.json"
    got = read_json(path)
    if got is not None:
        return got
    world = load_world(world_dir)
    people = reasoning_people(facts_by_seed, r)
    sets = build_sets(world, people, r, known_by_relation(facts_by_seed, r))
    used = sorted({f"{p}:{rel}" for it in sets["train"] + [x for k in SETS for x in sets[k]]
                   for p, rel in it["facts"]})
    hop = {row["id"]: row for row in recall_rows(world, sorted({int(i.split(":")[0]) for i in used}), r["relations"])}
    cities = sorted({it["values"][0] for it in sets["train"] + [x for k in SETS for x in sets[k]]
                     if it["kind"] == "hop"})
    sets["recall_used"] = [hop[i] for i in used] + [  # the gate: every fact the items use, cities' countries too
        {"id": f"city:{c}", "prompt": GEO_PROBE.format(city=c), "answers": [world["city_country"][c]]}
        for c in cities]
    test_people = sorted({p for k in ("test", *OOD) for it in sets[k] for p in it["people"]})
    sets["recall_1hop"] = recall_rows(world, test_people, r["relations"], facts_by_seed, r["min_mastery"])
    sets["recall_ood"] = recall_rows(world, test_people, OUT_OF_DOMAIN, facts_by_seed, r["min_mastery"])
    write_json(path, sets)
    return sets


def evaluate_reasoning(model, tok, sets: dict, r: dict) -> dict:
    """Per set, per item: ``exact`` (0/1) and, on chain sets, ``chain`` (share of facts stated right);
    the recall sets hold ``exact`` only (the answer contained in the greedy output). The chain sets are
    generated in one call, as are the no-chain and the recall prompts (one model pass per new token)."""
    out = {}
    chain_items = [it for name in SETS for it in sets[name]]
    outs = _generate(model, tok, [it["prompt"] for it in chain_items], r["max_new_tokens"])
    records = R.score_reasoning(outs, chain_items)["records"]
    for name in SETS:
        mine, records = records[:len(sets[name])], records[len(sets[name]):]
        out[name] = {"exact": [int(x["exact_match"]) for x in mine], "chain": [x["chain"] for x in mine]}
    records = R.score_reasoning(_generate(model, tok, [it["prompt"] for it in sets["no_chain"]], 8),
                                sets["no_chain"])["records"]
    out["no_chain"] = {"exact": [int(x["exact_match"]) for x in records]}
    recall = [x for name in RECALL for x in sets[name]]
    hits = [int(bool(is_correct(o[0], x["answers"]))) for o, x in
            zip(_generate(model, tok, [x["prompt"] for x in recall], 3), recall)]
    for name in RECALL:
        out[name], hits = {"exact": hits[:len(sets[name])]}, hits[len(sets[name]):]
    return out


def _generate(model, tok, prompts: list, max_new_tokens: int) -> list:
    return generate_answers(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=1024) if prompts else []


def select_lrs(r: dict, sets: dict, base_dir, work: Path, seeds: list) -> dict:
    """Each method's lr: ``r``'s fixed ones without ``lr_grid``, else the candidate with the best exact match on the
    validation items after fine-tuning the first seed's base on the training items (cached in
    ``work/reasoning/select/``; the lower lr on a tie). ``{"chosen": {method: lr}, "validation": {method: {lr:
    exact match}}, "why"}``."""
    chosen = {"lora": r["lora_lr"], "full": r["full_lr"]}
    out = {"chosen": chosen, "validation": {}, "why": None}
    if not r["lr_grid"]:
        out["why"] = "lr_grid is None: the fixed lora_lr and full_lr"
        return out
    sel, seed = work / "reasoning" / "select", seeds[0]
    data_dir = sel / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(data_dir / "train-reasoning.jsonl", [{"prompt": it["prompt"], "completion": it["completion"]}
                                                     for it in sets["train"]])
    tok = load_tokenizer(str(base_dir))
    for method, lrs in r["lr_grid"].items():
        accs = {}
        for lr in sorted(lrs):
            path = sel / f"{method}-lr{lr:g}.json"
            got = read_json(path)
            if got is None:
                arm = {"name": f"select-{method}", "method": method, "data": "reasoning", "seed": seed,
                       "rank": r["select_rank"] if method == "lora" else None,
                       "output_dir": str(sel / f"{method}-lr{lr:g}")}
                train(arm_config(arm, base_dir, data_dir, {**r, "seeds": seeds, f"{method}_lr": lr}), resume=True)
                outs = _generate(arm_model(arm, base_dir), tok, [it["prompt"] for it in sets["validation"]],
                                 r["max_new_tokens"])
                got = {"lr": lr, "exact": R.score_reasoning(outs, sets["validation"])["exact_match"]}
                write_json(path, got)
                shutil.rmtree(arm["output_dir"], ignore_errors=True)  # only its score is kept
            accs[f"{lr:g}"] = got["exact"]
        chosen[method] = max(sorted(lrs), key=lambda x: (accs[f"{x:g}"], -x))
        out["validation"][method] = accs
    return out


def run_seed(seed: int, base_dir, sets: dict, r: dict, work: Path, seeds: list) -> dict:
    """Train (or reuse) one seed's reasoning arms on its base and evaluate them and the base; returns
    ``{"base": eval, arm name: eval}`` with each arm's ``train_loss`` under ``"_train"``."""
    data_dir = work / "reasoning" / "data" / f"seed{seed}"
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": it["prompt"], "completion": it["completion"]} for it in sets["train"]]
    write_jsonl(data_dir / "train-reasoning.jsonl", rows)
    rs = {**r, "seeds": seeds}
    arms = [seed_arm(a, work / "reasoning", seed) for a in plan(r)]
    lora = [a for a in arms if a["method"] == "lora"]
    trained, _ = train_group(lora, base_dir, data_dir, rs, work / "reasoning" / "together" / f"seed{seed}")
    losses = {}
    for a in arms:
        summ = trained.get(a["name"]) or train(arm_config(a, base_dir, data_dir, rs), resume=True)
        losses[a["name"]] = summ.get("train_loss")
    tok = load_tokenizer(str(base_dir))
    out = {"_train": losses, "_dirs": {a["name"]: a["output_dir"] for a in arms}}
    cached = work / "reasoning" / f"eval-base-seed{seed}.json"
    out["base"] = read_json(cached)
    if out["base"] is None:
        out["base"] = evaluate_reasoning(load_base(base_dir)[0], tok, sets, r)
        write_json(cached, out["base"])
    for a in arms:
        path = Path(a["output_dir"]) / "demo-reasoning-eval.json"
        got = read_json(path)
        if got is None:
            got = evaluate_reasoning(arm_model(a, base_dir), tok, sets, r)
            write_json(path, got)
        out[a["name"]] = got
    return out


def updates(dirs: dict, base_dir, probe: list, work: Path, seed: int) -> dict:
    """Per arm: per weight matrix, the update's Frobenius norm and its drift (``1 -`` the mean |cos| of the top
    singular vectors before and after); per layer, the attention change (Jensen-Shannon distance of the attention
    maps, mean over heads) and the representation similarity (linear CKA) to the base on ``probe`` (cached in
    ``work/reasoning/updates-seed<N>.json``)."""
    path = work / "reasoning" / f"updates-seed{seed}.json"
    got = read_json(path)
    if got is not None:
        return got
    res = analyze_runs(list(dirs.values()), str(base_dir), probe, str(work / "reasoning" / "analysis" / f"seed{seed}"),
                       device=device(), attention=True, representations=True, tokens=False, plots=False,
                       progress=False)
    got = update_measures(res)
    write_json(path, got)
    return got


# ----------------------------------------------------------------------------- results

RANKS_PAPER = "Rathore et al. 2025, LoRA rank trade-offs (arXiv 2512.15634)"
MEASURES = {"exact": (*SETS, "no_chain", *RECALL), "chain": SETS}


def _matrix(evals: dict, seeds: list, arm: str, name: str, measure: str = "exact") -> np.ndarray:
    return np.asarray([evals[seed][arm][name][measure] for seed in seeds], dtype=np.float64)


def summarize(evals: dict, seeds: list, r: dict, boot: dict) -> list:
    """Per arm (the base first): for every set and measure, the mean over seeds with its interval, ``n``
    and the per-seed (per-base) values."""
    rows = []
    for arm in ["base", *[a["name"] for a in plan(r)]]:
        row = {"name": arm, "rank": next((a["rank"] for a in plan(r) if a["name"] == arm), None),
               "method": "none" if arm == "base" else ("full" if arm.endswith("full") else "lora")}
        for measure, names in MEASURES.items():
            for name in names:
                got = accuracy_with_ci(_matrix(evals, seeds, arm, name, measure), n_boot=boot["n_boot"],
                                       seed=boot["boot_seed"]) if evals[seeds[0]][arm][name][measure] else None
                row[f"{name}.{measure}"] = None if got is None else {
                    "mean": got["value"]["mean"], "ci95": got["ci95"]["mean"], "n": got["n"]["mean"],
                    "seeds": dict(zip([str(x) for x in seeds], got["seeds"]["mean"]))}
        row["train_loss"] = None if arm == "base" else [evals[seed]["_train"].get(arm) for seed in seeds]
        rows.append(row)
    return rows


def chosen_rank(rows: list) -> int | None:
    """The LoRA rank with the best validation exact match (mean over seeds); the lower rank on a tie."""
    lora = [x for x in rows if x["method"] == "lora" and x.get("validation.exact")]
    if not lora:
        return None
    return max(lora, key=lambda x: (x["validation.exact"]["mean"], -x["rank"]))["rank"]


def _ood(evals: dict, seeds: list, arm: str) -> tuple:
    """The three out-of-domain sets side by side: ``(matrix, set labels)`` (each set a stratum)."""
    mats = [_matrix(evals, seeds, arm, name) for name in OOD]
    return np.concatenate(mats, axis=1), [name for name, m in zip(OOD, mats) for _ in range(m.shape[1])]


def findings(evals: dict, upd: dict, seeds: list, r: dict, rows: list, boot: dict) -> list:
    """The reasoning findings, each positive when the claim holds (see the issue's definitions). The three that
    compare accuracies of generated chains carry ``CHAIN_MARGIN`` in their intervals
    (:func:`rankwise.analysis.findings.with_machine_margin`)."""
    b = {"n_boot": boot["n_boot"], "boot_seed": boot["boot_seed"]}
    ranks = list(r["ranks"])
    name = {k: f"reason-lora-r{k}" for k in ranks}
    test = {k: _matrix(evals, seeds, name[k], "test") for k in ranks}
    out = []
    if len(ranks) >= 3:
        mid, ends = ranks[1:-1], [ranks[0], ranks[-1]]
        out.append(contrast_finding(
            "reasoning_mid_rank", f"On in-domain reasoning the middle LoRA ranks ({', '.join(map(str, mid))}) beat "
            f"the lowest and highest ({ranks[0]}, {ranks[-1]}).", RANKS_PAPER, [test[k] for k in mid],
            [test[k] for k in ends], plus_names=[name[k] for k in mid], minus_names=[name[k] for k in ends],
            metric="in-domain reasoning exact match", **b))
    else:
        out.append(unmeasured_finding("reasoning_mid_rank", "Middle LoRA ranks beat the ends on reasoning.",
                                      RANKS_PAPER, "fewer than three ranks"))
    k = chosen_rank(rows)
    lora, full = name.get(k), "reason-full"
    out.append(difference_finding(
        "lora_vs_sft_reasoning", f"LoRA (r = {k}, the best rank on validation items) matches or beats full SFT on "
        "in-domain reasoning.", RANKS_PAPER, test[k], _matrix(evals, seeds, full, "test"), a_name=lora,
        b_name=full, metric="in-domain reasoning exact match", **b))
    (la, labels), (fa, _) = _ood(evals, seeds, lora), _ood(evals, seeds, full)
    out.append(difference_finding(
        "lora_ood_reasoning", f"LoRA (r = {k}) matches or beats full SFT on out-of-domain reasoning.", RANKS_PAPER,
        la, fa, labels, a_name=lora, b_name=full,
        metric="out-of-domain reasoning exact match (unweighted mean of new people, new compositions, new kind)",
        **b))
    # the three accuracies of generated chains: intervals widened by what the floating-point path moves them
    out = [with_machine_margin(f, CHAIN_MARGIN) for f in out]
    out.append(drift_finding("sft_drifts_more", RANKS_PAPER, upd, seeds, lora, full, **b))
    out.append(_norm_finding(upd, seeds, ranks, name, b))
    return out


def _per_matrix(upd: dict, seeds: list, arm: str, key: str) -> np.ndarray:
    return np.asarray([upd[seed][arm][key] for seed in seeds], dtype=np.float64)


def _norm_finding(upd: dict, seeds: list, ranks: list, name: dict, b: dict) -> dict:
    claim = "The LoRA update's Frobenius norm grows sub-linearly in rank (about logarithmically)."
    try:
        arms = [_per_matrix(upd, seeds, name[k], "fro_norm") for k in ranks]
    except (KeyError, TypeError, ValueError):
        return unmeasured_finding("norm_log_rank", claim, RANKS_PAPER, "no update norms measured")
    if len(ranks) < 2:
        return unmeasured_finding("norm_log_rank", claim, RANKS_PAPER, "fewer than two ranks")
    return slope_finding("norm_log_rank", claim, RANKS_PAPER, arms, ranks, below=1.0,
                         metric="1 - slope of log(mean per-matrix update norm) on log(rank)", **b)


# ----------------------------------------------------------------------------- the study

def run_study(r: dict, world_dir, facts_by_seed: dict, base_dirs: dict, work: Path, seeds: list, boot: dict,
              st) -> dict:
    """Prepare, train, evaluate and measure the reasoning study on every seed's base; returns its results
    (``results.json["reasoning"]``) with its ``findings``. ``st`` shows and times the stages."""
    t0 = st.stage("reasoning: items")
    sets = prepare(world_dir, facts_by_seed, r, work)
    st.done("reasoning items", t0)
    sizes = {k: len(sets[k]) for k in ("train", *SETS, "no_chain", *RECALL)}
    out = {"settings": r, "sizes": sizes, "people": len(sets["people"]),
           "held_out_people": len(sets["held_out_people"]), "hop_people": len(sets.get("hop_people", [])),
           "hop_held_out": len(sets.get("hop_held_out", [])),
           # the held-out kinds and compositions the out-of-domain sets hold (an item held out twice is dropped)
           "ood_kinds": sorted({it["kind"] for it in sets["ood_kind"]}),
           "ood_compositions": sorted({it["composition"] for it in sets["ood_composition"]})}
    empty = [k for k in ("train", *SETS) if not sets[k]]
    if empty:
        why = (f"the reasoning study has no {', '.join(empty)} items ({len(sets['people'])} people whose "
               f"{', '.join(r['relations'])} facts every base knows)")
        return {**out, "skipped": why, "findings": [unmeasured_finding(f, "", RANKS_PAPER, why) for f in
                                                    ("reasoning_mid_rank", "lora_vs_sft_reasoning",
                                                     "lora_ood_reasoning", "sft_drifts_more", "norm_log_rank")]}
    evals, upd = {}, {}
    probe = [{"prompt": it["prompt"], "completion": it["completion"]} for it in sets["test"][:32]]
    t0 = st.stage("reasoning: select lr")
    selection = select_lrs(r, sets, base_dirs[seeds[0]], work, seeds)
    r_run = {**r, "lora_lr": selection["chosen"]["lora"], "full_lr": selection["chosen"]["full"]}
    st.done("reasoning select lr", t0)
    out["lr_selection"] = selection
    for seed in seeds:
        t0 = st.stage(f"seed {seed}: reasoning")
        evals[seed] = run_seed(seed, base_dirs[seed], sets, r_run, work, seeds)
        upd[seed] = updates(evals[seed]["_dirs"], base_dirs[seed], probe, work, seed)
        st.done("reasoning", t0)
    rows = summarize(evals, seeds, r, boot)
    gate = {str(seed): float(np.mean(evals[seed]["base"]["recall_used"]["exact"])) for seed in seeds}
    arms = [a["name"] for a in plan(r)]
    layers = {a: {key: np.mean([upd[seed][a][key] for seed in seeds], axis=0).tolist()
                  for key in ("attention_js", "cka") if all(upd[seed][a][key] for seed in seeds)} for a in arms}
    norms = {a: float(np.mean([np.sqrt(np.sum(np.square(upd[seed][a]["fro_norm"]))) for seed in seeds]))
             for a in arms}
    return {**out, "skipped": None, "gate": gate, "gate_met": all(v >= r["gate"] for v in gate.values()),
            "arms": rows, "chosen_rank": chosen_rank(rows), "layers": layers, "update_norms": norms,
            "findings": findings(evals, upd, seeds, r, rows, boot)}
