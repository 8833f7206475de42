"""The knowledge study (Ye et al., 2025) on a real model: ``study: knowledge``.

    study: knowledge
    output_dir: runs/study-knowledge
    run: {model: meta-llama/Llama-3.2-1B, train: {epochs: 1, batch_size: 8, lr: 1.0e-5, schedule: cosine}}
    seeds: [0]
    knowledge:
      data: EntityQuestions/dataset       # dataset/<split>/P<id>.<split>.json[l]
      templates: templates.json           # completion templates per relation (rankwise mastery)
      sizes: [60, 240, 1920]              # full SFT on that many in-domain training facts, ``draws`` draws each
      compare: [240, 1920]                # data_size: the smaller set minus the larger
      known: [3, 4]                       # mastery: level_size facts of these levels minus of ``unknown``
      unknown: [0, 1]
      level_size: 240
      train_pool: 8000                    # at most this many training facts (a seeded sample), each one probed
      probe: {samples: 10, temperature: 0.7, max_new_tokens: 32, backend: hf}   # backend vllm on a GPU
      restore: {size: 1920, fractions: [0.01, 0.05, 0.2], selections: [top, bottom, random], finding_fraction: 0.2}
    eval: {max_new_tokens: 16, batch_size: 64}

Protocol: the base's mastery level of every training and test fact (``rankwise.mastery``: templates x samples at
temperature, cached in ``mastery/``); the arms of each seed, all full SFT on ``prompt`` + `` <answer>`` rows of
in-domain training facts (``rankwise train``); greedy answers (``max_new_tokens``, 16 in the paper) to the test
facts in and out of domain, correct when an answer or alias is in them; accuracy as the unweighted mean over the
test facts' mastery levels, with 95 % intervals over facts and seeds (draws count as seeds); the largest arm
restored (``rankwise.masking.restore``: relative change, global top/bottom/random k % of the weights in the
decoder layers, norms excluded) and evaluated at every fraction. Findings (``claim``, ``source``, ``effect``,
``ci95``, ``verdict``; a positive effect is the claim): ``data_size``, ``mastery``, ``restore_top``,
``restore_vs_random``, ``restore_vs_bottom``.
"""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import torch

from ..analysis.findings import difference_finding, unmeasured_finding
from ..analysis.stats import accuracy_with_ci
from ..arm_cost import DEFAULT_TFLOPS, duration, train_flops, train_tokens
from ..arm_memory import estimate_full_peak_bytes
from ..atomic import atomic_write_text
from ..config import parse, settings, settings_hash
from ..demo.arms import read_json, read_jsonl, write_json, write_jsonl
from ..errors import ConfigError
from ..evaluate import generate_answers, is_correct
from ..masking import restore
from ..mastery import hf_sampler, run_probe, vllm_sampler
from ..model import load_model, load_tokenizer, resolve_device
from ..outputs import SUMMARY
from ..study_data import IN_DOMAIN, OUT_OF_DOMAIN, read_entity_questions, read_templates
from ..train import finished_summary, train
from .config import as_mapping, check_keys, int_list, merged, positive_int, rows_file
from .rank import findings_lines

SOURCE = "Ye et al. 2025 (arXiv 2509.16596)"
TOP = {"study", "output_dir", "run", "seeds", "knowledge", "eval", "boot"}
KNOWLEDGE = {"data": None, "templates": None, "train_split": "train", "test_split": "test",
             "in_domain": list(IN_DOMAIN), "out_of_domain": list(OUT_OF_DOMAIN), "test_per_domain": None,
             "train_pool": None,
             "prompt": "Question: {question}\nAnswer:", "sizes": [60, 240, 1920], "draws": 1, "compare": [240, 1920],
             "known": [3, 4], "unknown": [0, 1], "level_size": 240,
             "probe": {"samples": 10, "temperature": 0.7, "max_new_tokens": 32, "batch_size": 64, "seed": 0,
                       "backend": "hf"},
             "restore": {"size": 1920, "fractions": [0.01, 0.05, 0.2], "selections": ["top", "bottom", "random"],
                         "finding_fraction": 0.2}}
EVAL = {"max_new_tokens": 16, "batch_size": 64}
BOOT = {"n_boot": 2000, "seed": 0}


def _check_numbers(k: dict, ev: dict, boot: dict) -> None:
    """Every number of the knowledge, eval and boot sections, before anything runs."""
    positive_int(k["draws"], "knowledge.draws")
    positive_int(k["level_size"], "knowledge.level_size")
    positive_int(k["test_per_domain"], "knowledge.test_per_domain", allow_none=True)
    positive_int(k["train_pool"], "knowledge.train_pool", allow_none=True)
    for key in ("samples", "max_new_tokens", "batch_size"):
        positive_int(k["probe"][key], f"knowledge.probe.{key}")
    t = k["probe"]["temperature"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
        raise ConfigError("study config: knowledge.probe.temperature must be a number > 0 (the probe samples)")
    if isinstance(k["probe"]["seed"], bool) or not isinstance(k["probe"]["seed"], int) or k["probe"]["seed"] < 0:
        raise ConfigError("study config: knowledge.probe.seed must be an integer >= 0")
    if k["probe"]["backend"] not in ("hf", "vllm"):
        raise ConfigError(f"study config: knowledge.probe.backend must be hf or vllm, got {k['probe']['backend']!r}")
    if k["probe"]["backend"] == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("study config: knowledge.probe.backend vllm needs vLLM (pip install vllm, on a machine "
                          "with a GPU); hf runs everywhere")
    for key in ("max_new_tokens", "batch_size"):
        positive_int(ev[key], f"eval.{key}")
    positive_int(boot["n_boot"], "boot.n_boot")
    if isinstance(boot["seed"], bool) or not isinstance(boot["seed"], int):
        raise ConfigError("study config: boot.seed must be an integer")


def _check_plan(k: dict) -> None:
    """The data plan and the restoration of the knowledge section."""
    sizes = int_list(k["sizes"], "knowledge.sizes", 1)
    if not isinstance(k["compare"], list) or len(k["compare"]) != 2 or any(c not in sizes for c in k["compare"]) \
            or k["compare"][0] == k["compare"][1]:
        raise ConfigError("study config: knowledge.compare must be two of knowledge.sizes (smaller, larger)")
    for key in ("known", "unknown"):
        if not isinstance(k[key], list) or not k[key] or any(x not in (0, 1, 2, 3, 4) for x in k[key]):
            raise ConfigError(f"study config: knowledge.{key} must be a list of mastery levels 0-4")
    if set(k["known"]) & set(k["unknown"]):
        raise ConfigError("study config: knowledge.known and knowledge.unknown share a level")
    r = k["restore"]
    if r["size"] is None:
        return
    if r["size"] not in sizes:
        raise ConfigError("study config: knowledge.restore.size must be one of knowledge.sizes (or null: none)")
    if not isinstance(r["fractions"], list) or not r["fractions"] or any(
            isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1 for f in r["fractions"]):
        raise ConfigError("study config: knowledge.restore.fractions must be a non-empty list of numbers in (0, 1)")
    if not isinstance(r["selections"], list) or not r["selections"] or any(
            s not in ("top", "bottom", "random") for s in r["selections"]):
        raise ConfigError("study config: knowledge.restore.selections must be a list of top, bottom and random")
    if r["finding_fraction"] not in r["fractions"]:
        raise ConfigError("study config: knowledge.restore.finding_fraction must be one of its fractions")


def validate_knowledge(raw: dict) -> dict:
    """The checked ``study: knowledge`` config with defaults filled (see the module docstring)."""
    check_keys(raw, TOP, "")
    k = merged(KNOWLEDGE, as_mapping(raw.get("knowledge"), "knowledge"))
    check_keys(k, KNOWLEDGE, "knowledge.")
    check_keys(k["probe"], KNOWLEDGE["probe"], "knowledge.probe.")
    check_keys(k["restore"], KNOWLEDGE["restore"], "knowledge.restore.")
    for key in ("data", "templates"):
        if not isinstance(k[key], str) or not k[key]:
            raise ConfigError(f"study config: knowledge.{key} must name a file or directory")
    _check_plan(k)
    if not isinstance(k["prompt"], str) or "{question}" not in k["prompt"]:
        raise ConfigError("study config: knowledge.prompt must hold {question}")
    run = as_mapping(raw.get("run"), "run")
    if not isinstance(raw.get("output_dir"), str) or not raw["output_dir"]:
        raise ConfigError("study config: output_dir must name a directory (or pass --out)")
    seeds = int_list(raw.get("seeds", [0]), "seeds", 0)
    ev, boot = merged(EVAL, as_mapping(raw.get("eval"), "eval")), merged(BOOT, as_mapping(raw.get("boot"), "boot"))
    check_keys(ev, EVAL, "eval.")
    check_keys(boot, BOOT, "boot.")
    _check_numbers(k, ev, boot)
    cfg = {"study": "knowledge", "output_dir": raw["output_dir"], "run": run, "seeds": seeds, "knowledge": k,
           "eval": ev, "boot": boot}
    parse(run_config(cfg, "train.jsonl", "out", 0))  # every key of the arms' runs, checked now
    return cfg


def plan_lines(cfg: dict, data: dict, tflops: float = DEFAULT_TFLOPS) -> list:
    """What ``rankwise study --plan`` prints: the facts, and per data size one full-SFT arm's estimated peak
    memory (``rankwise.arm_memory``) and training time at ``tflops`` (``rankwise.arm_cost``)."""
    k = cfg["knowledge"]
    run = parse(run_config(cfg, "train.jsonl", "plan", 0))
    tok = load_tokenizer(cfg["run"].get("tokenizer") or cfg["run"]["model"])
    rows = [{"prompt": k["prompt"].format(question=f["question"]), "completion": " " + f["answers"][0]}
            for f in data["train"]]
    lines = [f"estimates, not measurements: time is the weights' matmul FLOPs at {tflops:g} TFLOP/s (--tflops), "
             "training only",
             f"knowledge: {len(data['train'])} training facts, {len(data['test']['in'])} in-domain and "
             f"{len(data['test']['out'])} out-of-domain test facts; sizes {k['sizes']} x {k['draws']} draw(s); "
             f"{len(cfg['seeds'])} seed(s); each full-SFT arm about {estimate_full_peak_bytes(run) / 2**30:.1f} GiB "
             "at peak"]
    for size in sorted({*k["sizes"], k["level_size"]}):
        took = duration(train_flops(run, train_tokens(run, rows[:size], tok)), tflops)
        lines.append(f"  {size} facts: {took} to train" + (" (each draw)" if size in k["sizes"] else ""))
    facts = len(data["train"]) + len(data["test"]["in"]) + len(data["test"]["out"])
    per = sum(len(data["templates"].get(f["relation"], [])) for f in data["train"] + data["test"]["in"] +
              data["test"]["out"]) / max(1, facts)
    lines.append(f"  mastery probe (not modelled; the bulk of the time): {facts} facts x {per:.3g} templates x "
                 f"{k['probe']['samples']} samples = {round(facts * per * k['probe']['samples'])} generations of "
                 f"up to {k['probe']['max_new_tokens']} tokens (knowledge.train_pool bounds the training facts)")
    return lines


def run_config(cfg: dict, train_file, output_dir, seed: int) -> dict:
    """The ``rankwise train`` config of one arm: full SFT on ``train_file``."""
    run = merged(cfg["run"], {"method": "full", "output_dir": str(output_dir),
                              "data": {"train": str(train_file), "format": "prompt_completion"},
                              "train": {"seed": int(seed)}, "eval": {"every": 0, "generate": False}})
    run.setdefault("log", {}).setdefault("progress", False)
    run.pop("lora", None)
    run.pop("quantization", None)
    return run


def load_knowledge(cfg: dict) -> dict:
    """The training facts (in domain; at most ``train_pool``, the pool every arm draws from and the probe measures)
    and the test facts (in and out of domain, at most ``test_per_domain`` each), samples drawn with a fixed seed,
    with every relation's templates checked."""
    k = cfg["knowledge"]
    train_facts = read_entity_questions(k["data"], k["train_split"], k["in_domain"])
    if k["train_pool"] and len(train_facts) > k["train_pool"]:  # the pool the arms draw from, all probed
        keep = sorted(random.Random("train:pool").sample(range(len(train_facts)), k["train_pool"]))
        train_facts = [train_facts[i] for i in keep]
    tests = {}
    for dom, rels in (("in", k["in_domain"]), ("out", k["out_of_domain"])):
        facts = read_entity_questions(k["data"], k["test_split"], rels)
        if k["test_per_domain"] and len(facts) > k["test_per_domain"]:
            keep = sorted(random.Random(f"test:{dom}").sample(range(len(facts)), k["test_per_domain"]))
            facts = [facts[i] for i in keep]
        tests[dom] = facts
    templates = read_templates(k["templates"])
    missing = sorted({f["relation"] for f in train_facts + tests["in"] + tests["out"]} - set(templates))
    if missing:
        raise ConfigError(f"knowledge.templates {k['templates']}: no templates for the relations {', '.join(missing)}")
    if max(k["sizes"]) > len(train_facts):
        raise ConfigError(f"knowledge.sizes: {max(k['sizes'])} training facts asked for, the data has "
                          f"{len(train_facts)} of the in-domain relations" +
                          (" in knowledge.train_pool" if k["train_pool"] else ""))
    return {"train": train_facts, "test": tests, "templates": templates}


def probe_levels(cfg: dict, out: Path, data: dict) -> dict:
    """``{fact id: mastery level}`` of the base for every training and test fact (``mastery/base.jsonl``)."""
    path = out / "mastery" / "base.jsonl"
    facts = data["train"] + data["test"]["in"] + data["test"]["out"]
    p, run = cfg["knowledge"]["probe"], cfg["run"]
    key = {"model": run["model"], "dtype": run.get("dtype", "auto"), "probe": p,
           "templates": settings_hash(data["templates"]),
           "facts": settings_hash({"facts": [[f["id"], f["subject"], f["answers"]] for f in facts]})}
    rows = read_jsonl(path) if path.exists() else None
    if not rows or read_json(out / "mastery" / "key.json") != key:
        if p["backend"] == "vllm":
            sample = vllm_sampler(run["model"], p["samples"], p["temperature"], p["max_new_tokens"],
                                  run.get("dtype", "auto"), p["seed"])
        else:
            sample = hf_sampler(run["model"], p["samples"], p["temperature"], p["max_new_tokens"], p["batch_size"],
                                device=run.get("train", {}).get("device", "auto"), dtype=run.get("dtype", "auto"))
        partial = out / "mastery" / "base.partial"
        try:  # a stopped probe of these settings continues; one of other settings starts over
            rows = run_probe(facts, data["templates"], sample, partial, key, p["seed"], progress=False)
        except ConfigError:
            rows = run_probe(facts, data["templates"], sample, partial, key, p["seed"], force=True, progress=False)
        write_jsonl(path, rows)
        write_json(out / "mastery" / "key.json", key)
    return {r["id"]: r["level"] for r in rows}


def plan(cfg: dict, data: dict, levels: dict, seed: int) -> tuple:
    """``(arms, skipped)``: each arm ``{"name", "facts"}`` of one seed; an arm without enough facts is skipped
    with the reason."""
    k, train_facts = cfg["knowledge"], data["train"]
    arms, skipped = [], {}
    for size in k["sizes"]:
        for d in range(k["draws"]):
            idx = random.Random(f"size:{size}:{d}:{seed}").sample(range(len(train_facts)), size)
            arms.append({"name": f"size{size}-d{d}", "facts": [train_facts[i] for i in sorted(idx)]})
    for name in ("known", "unknown"):
        pool = [f for f in train_facts if levels[f["id"]] in k[name]]
        if len(pool) < k["level_size"]:
            skipped[name] = f"{len(pool)} training facts of levels {k[name]}, fewer than level_size {k['level_size']}"
            continue
        idx = random.Random(f"{name}:{seed}").sample(range(len(pool)), k["level_size"])
        arms.append({"name": name, "facts": [pool[i] for i in sorted(idx)]})
    return arms, skipped


def train_arm(cfg: dict, out: Path, arm: dict, seed: int) -> Path:
    """Train (or reuse with the same settings, or resume) one arm; its run directory."""
    k = cfg["knowledge"]
    rows = [{"prompt": k["prompt"].format(question=f["question"]), "completion": " " + f["answers"][0]}
            for f in arm["facts"]]
    data = rows_file(out / "data" / f"seed{seed}", arm["name"], rows)
    run_dir = out / "arms" / f"seed{seed}" / arm["name"]
    run = run_config(cfg, data, run_dir, seed)
    summary = finished_summary(parse(run), settings(parse(run))) if (run_dir / SUMMARY).exists() else \
        train(run, resume=True)
    if summary.get("status") != "finished":
        raise ConfigError(f"study arm {arm['name']} (seed {seed}) did not finish: {summary.get('reason')}")
    return run_dir


def eval_key(cfg: dict, tests: dict, *what) -> str:
    """What a cached evaluation depends on: ``what`` (the arm's settings, a restored point), the prompt, the
    generation settings and the test facts."""
    return settings_hash({"what": list(what), "prompt": cfg["knowledge"]["prompt"], "eval": cfg["eval"],
                          "tokenizer": cfg["run"].get("tokenizer") or cfg["run"]["model"],
                          "tests": {d: [[f["id"], f["question"], f["answers"]] for f in fs]
                                    for d, fs in tests.items()}})


def cached(path: Path, key: str, compute) -> dict:
    """``compute()`` (an evaluation), or its copy in ``path`` when that was made with ``key``."""
    got = read_json(path)
    if not isinstance(got, dict) or got.get("key") != key:
        got = {"key": key, **compute()}
        write_json(path, got)
    return {"in": got["in"], "out": got["out"]}


def evaluate(model, tok, cfg: dict, tests: dict) -> dict:
    """``{"in": [0/1 per fact], "out": [...]}``: greedy answers, correct when an answer or alias is in them."""
    k, ev = cfg["knowledge"], cfg["eval"]
    facts = tests["in"] + tests["out"]
    outs = generate_answers(model, tok, [k["prompt"].format(question=f["question"]) for f in facts],
                            max_new_tokens=ev["max_new_tokens"], batch_size=ev["batch_size"])
    hits = [int(bool(is_correct(o[0], f["answers"]))) for o, f in zip(outs, facts)]
    return {"in": hits[:len(tests["in"])], "out": hits[len(tests["in"]):]}


def restore_points(cfg: dict, out: Path, run_dir: Path, seed: int, tests: dict, tok, device) -> dict:
    """``{"<selection>-<fraction>": eval}`` of the restored ``run_dir`` model (cached per point)."""
    r, points, held = cfg["knowledge"]["restore"], {}, {}
    arm = read_json(run_dir / SUMMARY).get("settings_hash")

    def point(sel, f):
        if not held:  # the base's and the tuned model's weights, loaded once for every point, in the same dtype
            dtype = cfg["run"].get("dtype", "auto")  # (an fp32 base against a bf16 tuned model: rounding looks like
            held["tuned"] = load_model(str(run_dir / "model"), dtype=dtype, device=device)  # an update everywhere)
            as_tuned = {n: v.dtype for n, v in held["tuned"].state_dict().items()}
            base = load_model(cfg["run"]["model"], dtype=dtype, device="cpu").state_dict()
            held["base"] = {n: v.to(as_tuned.get(n, v.dtype)).to(torch.float32) for n, v in base.items()}
            held["sd"] = {n: v.detach().to("cpu", torch.float32, copy=True)
                          for n, v in held["tuned"].state_dict().items()}
        restored, _ = restore(held["base"], held["sd"], f, score="relative", select=sel, scope="global",
                              include=r"layers", exclude=r"norm", seed=seed)
        held["tuned"].load_state_dict(restored)
        return evaluate(held["tuned"].eval(), tok, cfg, tests)

    for sel in r["selections"]:
        for f in r["fractions"]:
            path = out / "eval" / f"seed{seed}" / f"restore-{sel}-{f:.10g}.json"
            points[f"{sel}-{f:.10g}"] = cached(path, eval_key(cfg, tests, arm, sel, f, seed),
                                            lambda sel=sel, f=f: point(sel, f))
    return points


def run_seed(cfg: dict, out: Path, data: dict, levels: dict, seed: int, tok, device) -> tuple:
    """``({arm: eval}, skipped)`` of one seed: the base, every arm, and the restored points."""
    arms, skipped = plan(cfg, data, levels, seed)
    dtype, tests = cfg["run"].get("dtype", "auto"), data["test"]
    evals = {"base": cached(out / "eval" / "base.json", eval_key(cfg, tests, cfg["run"]["model"], dtype),
                            lambda: evaluate(load_model(cfg["run"]["model"], dtype=dtype, device=device).eval(), tok,
                                             cfg, tests))}
    for arm in arms:
        run_dir = train_arm(cfg, out, arm, seed)
        key = eval_key(cfg, tests, read_json(run_dir / SUMMARY).get("settings_hash"), dtype)
        evals[arm["name"]] = cached(out / "eval" / f"seed{seed}" / f"{arm['name']}.json", key,
                                    lambda: evaluate(load_model(str(run_dir / "model"), dtype=dtype,
                                                                device=device).eval(), tok, cfg, tests))
    r = cfg["knowledge"]["restore"]
    if r["size"] is not None and r["fractions"] and r["selections"]:
        evals.update(restore_points(cfg, out, out / "arms" / f"seed{seed}" / f"size{r['size']}-d0", seed,
                                    data["test"], tok, device))
    return evals, skipped


# ----------------------------------------------------------------------------- numbers and findings

def rows_of(evals: dict, seeds: list, arm: str, dom: str, draws: int = 1) -> np.ndarray:
    """``(rows, facts)``: an arm's results per seed (a size arm: per seed and draw)."""
    names = [arm.replace("-d0", f"-d{d}") for d in range(draws)] if arm.endswith("-d0") else [arm]
    return np.asarray([evals[s][n][dom] for s in seeds for n in names], dtype=np.float64)


def summarize(cfg: dict, evals: dict, strata: dict) -> list:
    """Per arm: in- and out-of-domain accuracy (unweighted mean over the test facts' mastery levels) with its
    interval, n and per-row values, and per level."""
    seeds, b, draws = cfg["seeds"], cfg["boot"], cfg["knowledge"]["draws"]
    out = []
    for arm in evals[seeds[0]]:
        if "-d" in arm and not arm.endswith("-d0"):
            continue  # the draws of a size are rows of its d0 entry
        row = {"name": arm.removesuffix("-d0")}
        for dom in ("in", "out"):
            a = accuracy_with_ci(rows_of(evals, seeds, arm, dom, draws), strata[dom], n_boot=b["n_boot"],
                                 seed=b["seed"])
            row[dom] = {"mean": a["value"]["mean"], "ci95": a["ci95"]["mean"], "n": a["n"]["mean"],
                        "rows": a["seeds"]["mean"], "by_level": {lab: a["value"][lab] for lab in sorted(strata[dom])
                                                                   if lab in a["value"]}}
        out.append(row)
    return out


def findings(cfg: dict, evals: dict, strata: dict, skipped: dict) -> list:
    k, seeds, draws = cfg["knowledge"], cfg["seeds"], cfg["knowledge"]["draws"]
    b = {"n_boot": cfg["boot"]["n_boot"], "boot_seed": cfg["boot"]["seed"]}
    have = evals[seeds[0]]
    metric = "in-domain accuracy (unweighted mean over the mastery levels)"

    def diff(fid, claim, a, c, n_draws=draws):
        missing = next((x for x in (a, c) if x not in have), None)
        if missing:
            return unmeasured_finding(fid, claim, SOURCE, f"no arm {missing!r}: " + skipped.get(missing, "not run"))
        return difference_finding(fid, claim, SOURCE, rows_of(evals, seeds, a, "in", n_draws),
                                  rows_of(evals, seeds, c, "in", n_draws), strata["in"], combine="mean",
                                  a_name=a, b_name=c, metric=metric, **b)

    small, large = k["compare"]
    frac = f"{k['restore']['finding_fraction']:.10g}" if k["restore"]["size"] is not None else "none"
    pct = f"{100 * k['restore']['finding_fraction']:g} %"
    return [
        diff("data_size", f"Full SFT on {small} facts gives higher in-domain accuracy than on {large}.",
             f"size{small}-d0", f"size{large}-d0"),
        diff("mastery", f"Full SFT on known facts (levels {k['known']}) gives higher in-domain accuracy than on "
             f"unknown ones (levels {k['unknown']}) of the same number.", "known", "unknown"),
        diff("restore_top", f"Restoring the top {pct} of relative updates raises in-domain accuracy.",
             f"top-{frac}", f"size{k['restore']['size']}-d0", n_draws=1),  # the restored model is draw 0's
        diff("restore_vs_random", f"Restoring the top {pct} beats restoring a random {pct}.", f"top-{frac}",
             f"random-{frac}"),
        diff("restore_vs_bottom", f"Restoring the top {pct} beats restoring the bottom {pct}.", f"top-{frac}",
             f"bottom-{frac}"),
    ]


def report(results: dict) -> str:
    """``report.md``: the findings first, then every arm in and out of domain."""
    lines = findings_lines("rankwise study: fine-tuning and model knowledge", results["findings"])
    lines += ["", "## Arms", "", "| arm | in domain | out of domain |", "| --- | ---: | ---: |"]
    for r in results["arms"]:
        cell = lambda c: f"{c['mean']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]" if c["mean"] is not None else "-"  # noqa
        lines.append(f"| {r['name']} | {cell(r['in'])} | {cell(r['out'])} |")
    return "\n".join(lines) + "\n"


def run_knowledge_study(cfg: dict, out: Path, data: dict) -> dict:
    """Every seed, then ``results.json`` and ``report.md``."""
    device = resolve_device(cfg["run"].get("train", {}).get("device", "auto"))
    tok = load_tokenizer(cfg["run"].get("tokenizer") or cfg["run"]["model"])
    levels = probe_levels(cfg, out, data)
    strata = {dom: [f"D{levels[f['id']]}" for f in data["test"][dom]] for dom in ("in", "out")}
    evals, skipped = {}, {}
    for seed in cfg["seeds"]:
        evals[seed], skipped = run_seed(cfg, out, data, levels, seed, tok, device)
    counts = {lab: strata["in"].count(lab) for lab in ("D0", "D1", "D2", "D3", "D4")}
    results = {"study": "knowledge", "seeds": cfg["seeds"], "test_levels": counts, "skipped_arms": skipped,
               "arms": summarize(cfg, evals, strata), "findings": findings(cfg, evals, strata, skipped)}
    write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", report(results))
    return results
