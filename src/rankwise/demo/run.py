"""The demo's stages, each cached so an interrupted demo continues where it stopped.

1. build the world and install every seed's base model: the shipped one
   (:mod:`rankwise.world.shipped`, the same weights on every machine), or one pretrained with
   that seed when none is shipped for these settings (cached under ``~/.cache/rankwise``). The
   anchors' question-answer text covers only the out-of-domain relations, so a base model
   stores the in-domain facts but was never shown questions about them;
2. each base's mastery ``R`` of every study fact and its bucket D0..D4 (shipped with the base, or
   measured), so every seed has its own buckets;
3. for every seed, draw the fine-tuning sets from the train people's in-domain facts: a
   small set and an 8x larger one (the small set is its prefix), and two small sets of
   well-known (D3+D4) and unknown (D0) facts; the test sets are every in-domain and
   out-of-domain fact of the test people, the same for every seed;
4. fine-tune every arm once per seed (the seed draws the sample, the order and the
   adapter init): LoRA at several ranks and full SFT on the small set (the LoRA arms in
   one together run, :func:`rankwise.together.train_together`), full SFT on the known and
   unknown sets, LoRA and full SFT on the large set;
5. evaluate the base model and every arm on every test fact (greedy, answer contained in
   the output), keeping the per-fact results;
6. restore the top, bottom and random k% relative updates of each seed's large full-SFT
   model (:func:`rankwise.masking.restore`) and evaluate each;
7. analyse the updates (:func:`rankwise.analysis.analyze_runs`): every arm of the first
   seed for the report's analysis section, and the intruder dimensions of the compared
   LoRA and full-SFT arms of every seed for the ``intruders`` finding;
8. the reasoning study (:mod:`rankwise.demo.reasoning`): LoRA ranks and full SFT on
   chain-of-thought questions over facts every base knows, per seed on its base;
9. :mod:`rankwise.demo.report`: means over seeds (so over bases) with bootstrap intervals,
   the findings of both studies with verdicts, plots, ``report.md`` and ``results.json``.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..analysis import analyze_runs, markdown_section
from ..errors import ConfigError
from ..masking import restore
from ..model import load_tokenizer
from ..ownership import MARKER, check_output, claim, owner
from ..train import train
from ..world import mastery, shipped
from ..world.generate import CITIES, load_world
from ..world.pretrain import preset, pretrain, seeded, settings_key
from ..world.reasoning import COUNTRY, KINDS
from . import report
from .arms import (arm_config, arm_model, data_dir_of, device, evaluate_model, load_base, read_json, read_jsonl,
                   seed_arm, train_group, write_json, write_jsonl)
from .reasoning import REASONING, run_study

# The demo's settings (cpu scale). Every number in the report comes from these and the world preset.
DEMO = {
    "seeds": [0, 1, 2],
    "ranks": [1, 4, 16, 32],  # 1 to d/4 of the cpu base (hidden size 128), trained together
    "small_size": 24,
    "large_factor": 8,
    "train_bucket": "all",
    "known_buckets": ["D3", "D4"],
    "unknown_buckets": ["D0"],
    "lora_alpha_per_rank": 2.0,  # alpha = 2 r
    "lora_lr": 3.0e-3,  # used when lr_grid is None (or no validation set can be drawn)
    "full_lr": 3.0e-4,
    # Learning rates chosen on validation facts (the train people's in-domain facts outside the first
    # seed's large set), never on the test facts: each candidate fine-tunes the large set (LoRA at
    # large_lora_rank, full SFT) once with the first seed; the best validation accuracy wins, for
    # every arm of that method.
    "lr_grid": {"lora": [1.0e-3, 2.0e-3, 3.0e-3], "full": [1.0e-4, 3.0e-4, 6.0e-4]},
    "min_validation": 20,
    "epochs": 10,
    "batch_size": 8,
    "large_lora_rank": 16,
    "restore_fractions": [0.01, 0.05, 0.2, 0.6],
    "restore_selections": ["top", "bottom", "random"],
    "finding_fraction": 0.2,
    "mastery_samples": 4,
    "mastery_temperature": 0.7,
    "max_new_tokens": 3,
    "analysis": True,  # run rankwise.analysis over the arms and append its section (spectra, probes)
    "seed": 0,  # mastery sampling and the bootstrap
    "n_boot": 2000,
    "reasoning": REASONING,  # the reasoning study's settings (merged key by key); None skips it
}

# The gpu scale's learning-rate candidates, for the recall arms and the reasoning arms alike.
GPU_LR_GRID = {"lora": [3.0e-4, 1.0e-3, 3.0e-3], "full": [3.0e-5, 1.0e-4, 3.0e-4]}

# Per scale, what differs from DEMO. "gpu" runs the knowledge study's sizes (240 and 1,920
# fine-tuning facts) on the gpu world preset; it is meant for one GPU, not for this CPU.
SCALE_SETTINGS = {
    "cpu": {},
    "gpu": {"small_size": 240, "epochs": 3, "ranks": [1, 8, 32, 128], "mastery_samples": 10, "max_new_tokens": 4,
            "large_lora_rank": 32,
            "reasoning": {"ranks": [1, 8, 32, 128], "n_per_composition": 2000, "n_ood_people": 2000, "epochs": 3,
                          "max_train": 3000, "max_eval": 300, "select_rank": 32,
                          "lr_grid": GPU_LR_GRID},
            "lora_lr": 1.0e-3, "full_lr": 1.0e-4, "batch_size": 16,
            "lr_grid": GPU_LR_GRID},
}


ZERO_OK = ("seed", "seeds", "min_validation", "n_ood_people")  # integer settings that may be 0 (the others are >= 1)


def check_value(where: str, value, default) -> None:
    """``value`` has ``default``'s type (a list: each element that of the default's first): booleans, integers
    >= 1 (>= 0 for ``ZERO_OK``), numbers >= 0, non-empty strings; ``ConfigError`` naming ``where`` otherwise."""
    name = where.rsplit(".", 1)[-1].removesuffix("[]")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= (0 if name in ZERO_OK else 1)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    elif isinstance(default, str):
        ok = isinstance(value, str) and bool(value)
    elif isinstance(default, list) and default:
        ok = isinstance(value, list) and bool(value)
        for x in value if ok else []:
            check_value(where + "[]", x, default[0])
    else:
        return
    if not ok:
        what = ("a non-empty list" if isinstance(default, list) else "true or false" if isinstance(default, bool)
                else f"an integer >= {0 if name in ZERO_OK else 1}" if isinstance(default, int)
                else "a number >= 0" if isinstance(default, float) else "a non-empty string")
        raise ConfigError(f"demo setting {where} must be {what} (default {default!r}), got {value!r}")


def _check_compositions(r: dict | None) -> None:
    """``reasoning.relations`` are city relations, and each of ``reasoning.held_out_compositions`` is ``"r2.r1"``:
    ``r1`` one of those relations, ``r2`` one of them too (a bridge-value composition) or ``country`` (a hop one);
    ``ConfigError`` otherwise."""
    if r is None:
        return
    if set(r["relations"]) - set(CITIES):
        raise ConfigError(f"demo setting reasoning.relations must be city relations ({', '.join(CITIES)}), got "
                          f"{r['relations']}")
    bad = [c for c in r["held_out_compositions"] if len(c.split(".")) != 2 or c.split(".")[1] not in r["relations"]
           or c.split(".")[0] not in [*r["relations"], COUNTRY]]
    if bad:
        raise ConfigError(f"demo setting reasoning.held_out_compositions must be compositions 'r2.r1' of "
                          f"reasoning.relations (r2 may be {COUNTRY!r}), got {bad} (with fewer relations than the "
                          "default, set the held-out compositions too)")


def settings_for(scale: str = "cpu", overrides: dict | None = None) -> dict:
    """The demo settings of ``scale`` with ``overrides`` applied (unknown keys are refused, each value is checked
    against its default's type by ``check_value``)."""
    if not isinstance(scale, str) or scale not in SCALE_SETTINGS:
        raise ConfigError(f"scale must be one of {', '.join(SCALE_SETTINGS)}, got {scale!r}")
    unknown = set(overrides or {}) - set(DEMO)
    if unknown:
        raise ConfigError(f"unknown demo settings: {sorted(unknown)}")
    s = copy.deepcopy(DEMO)
    for layer in (SCALE_SETTINGS[scale], overrides or {}):
        for k, v in copy.deepcopy(layer).items():
            s[k] = {**s[k], **v} if k == "reasoning" and isinstance(v, dict) and s[k] is not None else v
    r = s["reasoning"]
    if r is not None and (not isinstance(r, dict) or set(r) - set(REASONING)):
        raise ConfigError(f"demo setting reasoning must be None or a mapping of {sorted(REASONING)}, got {r!r}")
    for k, v in s.items():
        check_value(k, v, DEMO[k])
    for k, v in (r or {}).items():
        check_value(f"reasoning.{k}", v, REASONING[k])
    if r is not None and (set(r["kinds"]) - set(KINDS) or r["held_out_kind"] not in r["kinds"] or
                          len(set(r["kinds"])) < 2 or len(set(r["kinds"])) != len(r["kinds"])):
        raise ConfigError(f"demo settings reasoning.kinds must be at least two distinct of {', '.join(KINDS)}, one "
                          f"of them reasoning.held_out_kind; got {r['kinds']} and {r['held_out_kind']!r}")
    _check_compositions(r)
    bad = [f for f in s["restore_fractions"] if not 0 < f <= 1]
    if bad or not 0 < s["finding_fraction"] <= 1:
        raise ConfigError(f"demo settings restore_fractions and finding_fraction must lie in (0, 1], got "
                          f"{bad or s['finding_fraction']}")
    seeds = s["seeds"]
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) or \
            not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds):
        raise ConfigError(f"demo setting seeds must be a non-empty list of distinct ints >= 0, got {seeds!r}")
    for where, grid in (("lr_grid", s["lr_grid"]), ("reasoning.lr_grid", (r or {}).get("lr_grid"))):
        if grid is not None and (not isinstance(grid, dict) or set(grid) - {"lora", "full"} or not all(
                isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0
                                                  for x in v) for v in grid.values())):
            raise ConfigError(f"demo setting {where} must be None or {{'lora'|'full': [positive lrs]}}, got {grid!r}")
    bad = [x for x in s["restore_selections"] if x not in ("top", "bottom", "random")]
    if bad:
        raise ConfigError(f"restore_selections must be among top, bottom, random; got {bad}")
    return s


def check_world(s: dict, pre: dict) -> None:
    """The world the settings need: ``hop`` questions need one whose corpus states its cities' countries."""
    if s["reasoning"] and "hop" in s["reasoning"]["kinds"] and not pre["world"].get("geography_docs"):
        raise ConfigError("demo settings reasoning.kinds has hop, which needs a world with geography_docs > 0 "
                          "(world overrides: {world: {geography_docs: N}})")


def ship_bases(scale: str = "cpu", settings: dict | None = None) -> list:
    """The bases of the demo's seeds (pretrained, or taken from the cache) with their mastery measured with the
    demo's settings, written into the package's ``world/bases/`` (:func:`rankwise.world.shipped.ship`);
    returns the manifest entries."""
    s = settings_for(scale, settings)
    entries = []
    for seed in s["seeds"]:
        pr = pretrain(scale, overrides=seeded(None, seed))
        facts = mastery.measure(pr["base_dir"], load_world(pr["world_dir"])["facts"], **mastery_settings(s),
                                device=device())
        entries.append(shipped.ship(pr["base_dir"], pr["key"], scale, seed, pr["settings"],
                                    {"facts": facts, "settings": mastery_settings(s)}))
    return entries


# ----------------------------------------------------------------------------- helpers

def _quiet_transformers():
    from transformers.utils import logging as hf_logging  # heavy at import: transformers

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------- the plan

def plan_arms(settings: dict, work: Path | None = None) -> list:
    """The fine-tuning arms (without seeds): the rank sweep and full SFT on the small set, full SFT on
    the known and unknown sets, then LoRA and full SFT on the large set."""
    s = settings
    n, f = s["small_size"], s["large_factor"]
    big = n * f
    rl = s["large_lora_rank"]
    known = "".join(s["known_buckets"])
    unknown = "".join(s["unknown_buckets"])
    arms = [{"name": f"lora-r{r}", "method": "lora", "rank": r, "data": "small", "train_size": n}
            for r in s["ranks"]]
    arms.append({"name": "full", "method": "full", "rank": None, "data": "small", "train_size": n})
    arms.append({"name": f"full-{known}", "method": "full", "rank": None, "data": "known", "train_size": n})
    arms.append({"name": f"full-{unknown}", "method": "full", "rank": None, "data": "unknown", "train_size": n})
    arms.append({"name": f"lora-r{rl}-x{f}", "method": "lora", "rank": rl, "data": "large", "train_size": big})
    arms.append({"name": f"full-x{f}", "method": "full", "rank": None, "data": "large", "train_size": big})
    buckets = {"small": s["train_bucket"], "large": s["train_bucket"], "known": "+".join(s["known_buckets"]),
               "unknown": "+".join(s["unknown_buckets"])}
    for a in arms:
        a["train_buckets"] = buckets[a["data"]] if isinstance(buckets[a["data"]], str) else \
            "+".join(buckets[a["data"]])
        what = f"LoRA r={a['rank']}" if a["method"] == "lora" else "full SFT"
        facts = f"{a['train_size']} facts" + ("" if a["data"] in ("small", "large") else f" ({a['train_buckets']})")
        a["label"] = f"{what}, {facts}"
    return arms


def together_group(arms: list) -> list:
    """The LoRA arms of the small set: they differ only in rank and alpha, so they train together."""
    g = [a for a in arms if a["method"] == "lora" and a["data"] == "small"]
    return g if len(g) > 1 else []


def draw_sets(facts: list, s: dict, seed: int) -> tuple:
    """The fine-tuning sets of one seed: ``({"small", "large", "known", "unknown"}: QA rows}, {name: why skipped})``.

    The small and large sets are required (a world too small for them is a one-line error);
    a known or unknown set whose bucket pool is smaller than ``small_size`` is skipped, with
    the reason, and the arms and findings that need it report why they are missing.
    """
    n = s["small_size"]
    try:
        large = mastery.draw_train_set(facts, n * s["large_factor"], bucket=s["train_bucket"], seed=seed)
    except ValueError as e:
        raise ConfigError(f"the world is too small for the demo's fine-tuning sets: {e}") from None
    sets, skipped = {"small": large[:n], "large": large}, {}
    for name in ("known", "unknown"):
        try:
            sets[name] = mastery.draw_train_set(facts, n, bucket=list(s[f"{name}_buckets"]), seed=seed)
        except ValueError as e:
            skipped[name] = str(e)
    return sets, skipped


def validation_rows(facts: list, s: dict, seed: int) -> list:
    """QA rows of the train people's in-domain facts outside ``seed``'s large set (never test facts)."""
    sets, _ = draw_sets(facts, s, seed)
    used = {r["id"] for r in sets["large"]}
    return [mastery.qa_row(f) for f in facts if f["split"] == "train" and f["domain"] == "in" and f["id"] not in used]


def select_lrs(facts: list, arms: list, s: dict, base_dir, work: Path, seed: int) -> dict:
    """The learning rate of each method, chosen on validation facts (cached in ``work/select/``).

    Each candidate of ``s["lr_grid"][method]`` fine-tunes the large set once with ``seed`` (LoRA at
    ``large_lora_rank``); the one with the highest accuracy on :func:`validation_rows` wins (the first
    in grid order on a tie). Returns ``{"chosen": {method: lr}, "validation": {method: {lr: acc}},
    "n_validation", "why"}``; without a grid, or with fewer than ``min_validation`` validation facts,
    the fixed ``lora_lr`` / ``full_lr`` are kept and ``why`` says so.
    """
    chosen = {"lora": s["lora_lr"], "full": s["full_lr"]}
    out = {"chosen": chosen, "validation": {}, "n_validation": 0, "why": None, "seed": seed}
    if not s["lr_grid"]:
        out["why"] = "lr_grid is None: the fixed lora_lr and full_lr"
        return out
    val = validation_rows(facts, s, seed)
    out["n_validation"] = len(val)
    if len(val) < s["min_validation"]:
        out["why"] = f"only {len(val)} validation facts (< min_validation {s['min_validation']}): the fixed lrs"
        return out

    sel = work / "select"
    sel.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir_of(work, seed)
    by_method = {"lora": next((a for a in arms if a["method"] == "lora" and a["data"] == "large"), None),
                 "full": next((a for a in arms if a["method"] == "full" and a["data"] == "large"), None)}
    for method, lrs in s["lr_grid"].items():
        arm = by_method.get(method)
        if arm is None:
            continue
        accs = {}
        for lr in lrs:
            cpath = sel / f"{method}-lr{lr:g}.json"
            got = read_json(cpath)
            if got is None:
                run = {**arm, "seed": seed, "output_dir": str(sel / f"{method}-lr{lr:g}")}
                train(arm_config(run, base_dir, data_dir, {**s, f"{method}_lr": lr}), resume=True)
                model = arm_model(run, base_dir)
                ev = evaluate_model(model, load_tokenizer(str(base_dir)), {"validation": val}, s["max_new_tokens"])
                del model
                got = {"lr": lr, "accuracy": sum(ev["validation"]["correct"]) / len(val)}
                write_json(cpath, got)
                shutil.rmtree(run["output_dir"], ignore_errors=True)  # only its accuracy is kept
            accs[f"{lr:g}"] = got["accuracy"]
        best = max(lrs, key=lambda x: (accs[f"{x:g}"], -lrs.index(x)))
        chosen[method] = best
        out["validation"][method] = accs
    return out


# ----------------------------------------------------------------------------- the demo

def run_demo(out_dir="runs/demo", scale: str = "cpu", fresh: bool = False, settings: dict | None = None,
             world_overrides: dict | None = None, cache_dir=None, progress: bool = True,
             force: bool = False) -> dict:
    """Run both studies; returns the results dict (also written to ``out_dir/results.json``).

    Args:
        out_dir: output directory (report.md, results.json, plots, and the cached stages in ``work/``).
        scale: world, model and protocol preset (``cpu`` or ``gpu``).
        fresh: delete ``out_dir/work`` first (only if rankwise made it, or with ``force``).
        settings: overrides of the scale's demo settings (:data:`DEMO`, :data:`SCALE_SETTINGS`).
        world_overrides: ``{"world"|"model"|"train": {...}}`` overrides of the pretraining preset.
        cache_dir: where the world and base live (default: the user cache keyed by the settings).
        progress: show the stage progress bar.
        force: use ``out_dir`` even if it is a non-empty directory rankwise did not make.

    ``out_dir`` is rankwise's (marker kind ``demo``); it may not be, lie inside or contain
    ``cache_dir``. Stale cached stages are deleted only from a ``work/`` rankwise made.
    """
    _quiet_transformers()
    s = settings_for(scale, settings)
    check_world(s, preset(scale, world_overrides))
    out = Path(out_dir)
    work = out / "work"
    _claim_output(out, work, s, scale, world_overrides, cache_dir, fresh, force)

    arms = plan_arms(s)
    group = together_group(arms)
    solo = [a for a in arms if a not in group]
    seeds = list(s["seeds"])
    per_seed = (1 if group else 0) + len(solo) + 2 + (1 if s["reasoning"] else 0)  # training, eval, restore
    total = 4 + len(seeds) * per_seed + (1 if s["analysis"] else 0) + (2 if s["reasoning"] else 0) + 1
    st = _Stages(tqdm(total=total, desc="demo", disable=not progress, dynamic_ncols=True))
    t_all = time.time()
    try:
        bases, facts, tests, skipped_arms, arms = _first_stages(scale, cache_dir, world_overrides, progress, s,
                                                                work, arms, st)
        base_dirs = {seed: Path(bases[seed]["base_dir"]) for seed in seeds}

        t0 = st.stage("select lr")
        selection = select_lrs(facts[seeds[0]], arms, s, base_dirs[seeds[0]], work, seeds[0])
        s_run = {**s, "lora_lr": selection["chosen"]["lora"], "full_lr": selection["chosen"]["full"]}
        st.done("select lr", t0)

        runs: dict = {}  # (seed, arm name) -> arm dict with summary and eval
        together_runs, restoration, base_eval = [], {}, {}
        for seed in seeds:
            tok, base_eval[seed], base_sd = _evaluate_base(base_dirs[seed], tests[seed], s, work, seed)
            sarms, together_run, restoration[seed] = _run_seed(seed, arms, group, base_dirs[seed], s, s_run, work,
                                                               tok, tests[seed], base_sd, st)
            if together_run is not None:
                together_runs.append(together_run)
            runs.update({(seed, a["name"]): a for a in sarms})

        reasoning = run_study(s["reasoning"], bases[seeds[0]]["world_dir"], facts, base_dirs, work, seeds,
                              {"n_boot": s["n_boot"], "boot_seed": s["seed"]}, st) if s["reasoning"] else None
        analysis_md, intruders = None, None
        if s["analysis"]:
            t0 = st.stage("analysis")
            analysis_md, intruders = _analysis(runs, arms, seeds, base_dirs, tests, out, work, s)
            st.done("analysis", t0)

        results = _report(out, st, t_all, selection, analysis_md, facts=facts, tests=tests, arms=arms, runs=runs,
                          base_eval=base_eval, restoration=restoration, intruders=intruders, settings=s,
                          bases=bases, scale=scale, together=together_runs, skipped=skipped_arms,
                          reasoning=reasoning)
    finally:
        st.bar.close()
    results["stage_seconds"] = st.times
    results["seconds"] = round(time.time() - t_all, 1)
    write_json(out / "results.json", results)
    return results


class _Stages:
    """The demo's stage progress bar and the seconds spent in each stage (summed over the seeds)."""

    def __init__(self, bar):
        self.bar = bar
        self.times: dict = {}

    def stage(self, name):
        """Show ``name`` on the bar; returns its start time."""
        self.bar.set_description(f"demo: {name}")
        return time.time()

    def done(self, name, t0):
        """Add the seconds since ``t0`` to stage ``name`` and advance the bar."""
        self.times[name] = round(self.times.get(name, 0.0) + time.time() - t0, 2)
        self.bar.update(1)


def _claim_output(out: Path, work: Path, s: dict, scale: str, pre: dict | None, cache_dir, fresh: bool,
                  force: bool) -> None:
    """Check and claim ``out`` and ``work``; delete ``work`` first when ``fresh`` or its stages are stale
    (made with other settings), then stamp it with these settings."""
    check_output(out, force=force, flag="--out", kinds=["demo"], inputs=[("world cache", cache_dir)])
    key = {"demo": s, "scale": scale, "base_keys": {seed: settings_key(preset(scale, seeded(pre, seed)))
                                                    for seed in s["seeds"]}}
    stamp = work / "settings.json"
    if work.exists() and (fresh or read_json(stamp) != json.loads(json.dumps(key))):
        if owner(work) is None and not force:  # the cached stages are stale: delete them, if they are ours
            raise ConfigError(f"{work} holds stages rankwise did not make (no {MARKER}); delete it yourself, "
                              "pass --force, or choose another --out")
        shutil.rmtree(work)
    claim(out, "demo")
    claim(work, "demo")
    write_json(stamp, key)


def _first_stages(scale, cache_dir, world_overrides, progress, s: dict, work: Path, arms: list,
                  st: _Stages) -> tuple:
    """Every seed's base (shipped, cached or pretrained), its mastery of every fact and the data; the arms whose
    fine-tuning set was skipped are dropped. Returns ``({seed: pretrain result}, {seed: facts with that base's
    buckets}, {seed: test sets}, {arm name: why skipped}, arms kept)``."""
    seeds = list(s["seeds"])
    t0 = st.stage("pretrain")
    bases = {seed: _pretrain(scale, cache_dir, seeded(world_overrides, seed), progress, seed) for seed in seeds}
    st.done("pretrain", t0)
    st.times["pretrain_cached"] = all(b["cached"] for b in bases.values())

    t0 = st.stage("mastery")
    facts = {seed: _mastery(bases[seed], s, work, seed) for seed in seeds}
    st.done("mastery", t0)

    t0 = st.stage("data")
    tests, skipped = _data(facts, s, work, seeds)
    st.done("data", t0)
    skipped_arms = {a["name"]: f"its fine-tuning set was skipped: {skipped[a['data']]}" for a in arms
                    if a["data"] in skipped}
    if skipped_arms:
        st.bar.total -= len(seeds) * len(skipped_arms)
        arms = [a for a in arms if a["name"] not in skipped_arms]
    return bases, facts, tests, skipped_arms, arms


def _evaluate_base(base_dir, tests: dict, s: dict, work: Path, seed: int) -> tuple:
    """The results of ``seed``'s base on the test sets (cached in ``work/eval-base-seed<N>.json``):
    ``(tokenizer, base eval, a copy of the base state dict)``."""
    base_model, tok = load_base(base_dir)
    bpath = work / f"eval-base-seed{seed}.json"
    if read_json(bpath) is None:
        write_json(bpath, evaluate_model(base_model, tok, tests, s["max_new_tokens"]))
    base_eval = read_json(bpath)
    base_sd = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    del base_model
    return tok, base_eval, base_sd


def _run_seed(seed: int, arms: list, group: list, base_dir, s: dict, s_run: dict, work: Path, tok, tests: dict,
              base_sd: dict, st: _Stages) -> tuple:
    """One seed: train every arm, evaluate each on every test fact, restore the large full-SFT model.
    Returns ``(the seed's arms with summary and eval, the together run or None, restoration points)``."""
    sarms = [seed_arm(a, work, seed) for a in arms]
    together_run = _train_seed(seed, sarms, group, base_dir, s_run, work, st)
    # evaluation of every arm on every test fact
    t0 = st.stage(f"seed {seed}: eval")
    for a in sarms:
        epath = Path(a["output_dir"]) / "demo-eval.json"
        if read_json(epath) is None:
            model = arm_model(a, base_dir)
            write_json(epath, evaluate_model(model, tok, tests, s["max_new_tokens"]))
            del model
        a["eval"] = read_json(epath)
    st.done("eval", t0)
    # restoration of this seed's large full-SFT model
    t0 = st.stage(f"seed {seed}: restore")
    full_big = next(a for a in sarms if a["method"] == "full" and a["data"] == "large")
    points = _restore(full_big, base_dir, base_sd, tok, tests, s, work / "restore" / f"seed{seed}", seed)
    st.done("restore", t0)
    return sarms, together_run, points


def _train_seed(seed: int, sarms: list, group: list, base_dir, s_run: dict, work: Path, st: _Stages):
    """Train one seed's arms: the small-set LoRA arms together, every other arm on its own (a finished arm
    is reused as is). Sets each arm's ``train_loss``, ``train_seconds`` and ``trained_together``; returns
    the together run's record, or None without a group."""
    data_dir = data_dir_of(work, seed)
    trained: dict = {}
    together_run = None
    if group:
        t0 = st.stage(f"seed {seed}: train together")
        sgroup = [a for a in sarms if a["name"] in {g["name"] for g in group}]
        trained, names = train_group(sgroup, base_dir, data_dir, s_run, work / "together" / f"seed{seed}")
        st.done("train together", t0)
        together_run = {"seed": seed, "arms": [a["name"] for a in sgroup], "trained": names,
                        "seconds": round(time.time() - t0, 2)}
    for a in sarms:
        if a["name"] in trained:
            summ = trained[a["name"]]
        else:
            t0 = st.stage(f"seed {seed}: train {a['name']}")
            summ = train(arm_config(a, base_dir, data_dir, s_run), resume=True)  # a finished arm: as is
            if a["name"] not in {g["name"] for g in group}:
                st.done(f"train {a['name']}", t0)
        a["train_loss"] = summ.get("train_loss")
        a["train_seconds"] = summ.get("runtime_s")
        a["trained_together"] = "+".join(g["name"] for g in group) if a["name"] in \
            {g["name"] for g in group} else None
    return together_run


def _report(out: Path, st: _Stages, t_all: float, selection: dict, analysis_md, **parts) -> dict:
    """The results (:func:`rankwise.demo.report.build_results` of ``parts``, with the lr selection and the
    stage times) and the report written from them."""
    t0 = st.stage("report")
    results = report.build_results(**parts)
    results["lr_selection"] = selection
    st.times["report"] = 0.0
    results["stage_seconds"] = st.times
    results["seconds"] = round(time.time() - t_all, 1)
    report.write_report(out, results, analysis_md)
    st.done("report", t0)
    return results


def _pretrain(scale, cache_dir, overrides, progress, seed: int) -> dict:
    """``seed``'s base: in ``cache_dir/seed<N>`` when a cache directory is given, else in the user cache."""
    return pretrain(scale, out_dir=Path(cache_dir) / f"seed{seed}" if cache_dir else None, overrides=overrides,
                    progress=progress)


def mastery_settings(s: dict) -> dict:
    """How the demo measures mastery (a shipped base's mastery is used only when measured the same way)."""
    return {"num_samples": s["mastery_samples"], "temperature": s["mastery_temperature"],
            "max_new_tokens": s["max_new_tokens"], "seed": s["seed"]}


def _mastery(pr: dict, s: dict, work: Path, seed: int) -> list:
    """Every study fact with its mastery ``R`` and bucket under ``seed``'s base: the shipped base's own when
    there is one (measured once, so the buckets do not depend on this machine's sampling), else measured
    here (cached in ``work/mastery-seed<N>.jsonl``)."""
    mpath = work / f"mastery-seed{seed}.jsonl"
    if mpath.exists():
        return read_jsonl(mpath)
    world = load_world(pr["world_dir"])
    rows = shipped.shipped_mastery(pr["base_dir"], pr["key"], mastery_settings(s)) \
        if pr["source"] == "shipped" else None
    by_id = {r["id"]: r for r in rows or []}
    if rows is not None and set(by_id) == {f["id"] for f in world["facts"]}:
        facts = [{**f, "R": by_id[f["id"]]["R"], "bucket": by_id[f["id"]]["bucket"]} for f in world["facts"]]
        write_jsonl(mpath, facts)
        return facts
    facts = mastery.measure(pr["base_dir"], world["facts"], **mastery_settings(s), device=device())
    write_jsonl(mpath, facts)
    return facts


def _data(facts: dict, s: dict, work: Path, seeds: list) -> tuple:
    """Write every seed's fine-tuning sets (drawn with its base's buckets) and test sets (the same facts for
    every seed, each with its base's bucket); returns ``({seed: test sets}, {set: why skipped})``."""
    skipped: dict = {}
    tests: dict = {}
    for seed in seeds:
        d = data_dir_of(work, seed)
        d.mkdir(parents=True, exist_ok=True)
        sets, why = draw_sets(facts[seed], s, seed)
        skipped.update(why)
        for name, rows in sets.items():  # what training reads, nothing else
            write_jsonl(d / f"train-{name}.jsonl", [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        tests[seed] = mastery.test_sets(facts[seed])
        for k, rows in tests[seed].items():
            write_jsonl(d / f"test-{k}.jsonl", rows)
    first = tests[seeds[0]]
    assert all([r["id"] for r in t[k]] == [r["id"] for r in first[k]] for t in tests.values() for k in first)
    write_json(work / "data" / "skipped.json", skipped)
    return tests, skipped


def _restore(full_big: dict, base_dir, base_sd: dict, tok, tests: dict, s: dict, rdir: Path, seed: int) -> dict:
    """``{(selection, fraction): {"eval", "stats"}}`` for one seed's large full-SFT model (cached per point)."""
    points = {}
    tuned = None
    tuned_sd = None
    for sel in s["restore_selections"]:
        for f in s["restore_fractions"]:
            rpath = rdir / f"{sel}-{f:g}.json"
            got = read_json(rpath)
            if got is None:
                if tuned is None:
                    tuned = arm_model(full_big, base_dir)
                    tuned_sd = {k: v.detach().clone() for k, v in tuned.state_dict().items()}
                rdir.mkdir(parents=True, exist_ok=True)
                restored, stats = restore(base_sd, tuned_sd, f, score="relative", select=sel, scope="global",
                                          include=r"layers", exclude=r"norm", seed=seed)
                tuned.load_state_dict(restored)
                ev = evaluate_model(tuned, tok, tests, s["max_new_tokens"])
                brief = {k: v for k, v in stats.items() if k != "tensors"}
                got = {"selection": sel, "fraction": f, "eval": ev, "stats": _jsonable(brief)}
                write_json(rpath, got)
            points[(sel, f)] = got
    return points


def _analysis(runs: dict, arms: list, seeds: list, base_dirs: dict, tests: dict, out: Path, work: Path, s: dict):
    """The analysis section (every arm of the first seed, against its base) and the per-seed intruder counts
    of the compared LoRA and full-SFT arms: ``(markdown, {seed: {arm name: {matrix: intruders}}})``."""
    first = seeds[0]
    adir = out / "analysis"
    cached = work / "analysis.json"
    analysis = read_json(cached)
    if analysis is None:
        probe = tests[first]["in_domain"][:32] + tests[first]["out_of_domain"][:32]
        analysis = analyze_runs([runs[(first, a["name"])]["output_dir"] for a in arms], str(base_dirs[first]), probe,
                                str(adir), device=device(), progress=False)
        write_json(cached, analysis)
    md = markdown_section(analysis, str(adir), relative_to=str(out))
    names = intruder_arms(s)
    intr = {first: _intruder_counts(analysis, names)}
    for seed in seeds[1:]:
        cpath = work / f"analysis-seed{seed}.json"
        got = read_json(cpath)
        if got is None:
            res = analyze_runs([runs[(seed, n)]["output_dir"] for n in names], str(base_dirs[seed]), None,
                               str(work / "analysis" / f"seed{seed}"), device=device(), attention=False,
                               representations=False, tokens=False, plots=False, progress=False)
            got = _intruder_counts(res, names)
            write_json(cpath, got)
        intr[seed] = got
    return md, intr


def intruder_arms(s: dict) -> list:
    """The arms the ``intruders`` finding compares: LoRA at the large-set rank and full SFT, small set."""
    return [f"lora-r{s['large_lora_rank']}", "full"] if s["large_lora_rank"] in s["ranks"] else []


def _intruder_counts(analysis: dict, names: list) -> dict:
    out = {}
    for r in analysis["runs"]:
        if r["name"] in names:
            out[r["name"]] = {m["name"]: m["intruders"] for m in r["spectral"].get("matrices", [])
                              if "intruders" in m}
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return str(x)
