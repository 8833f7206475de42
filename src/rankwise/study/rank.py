"""The rank study (Rathore et al., 2025) on a real model: LoRA ranks against full SFT, per experiment (one
training task), scored in and out of domain, with intervals over items and seeds, and verdicts.

For each experiment and seed: the training rows (``prompt`` + ``completion`` of the task's items, the last
``validation`` items held back) are written once; the LoRA arms train together in one pass
(``rankwise.together.train_group``, as ``rankwise sweep --together`` and the demo do) or one by one
(``arms.together: false``), full SFT alone (``rankwise.train.train``); every run resumes where it stopped.
The base model and every arm answer every evaluation set greedily (``rankwise.evaluate.generate_answers``),
scored by ``rankwise.study_tasks.score``; the 0/1 results per item are cached per arm and seed.

Findings (``results.json["findings"]``, ``claim``, ``source``, ``effect``, ``ci95``, ``verdict``; a positive
effect is the claim), per experiment: a recall experiment (MMLU, MedMCQA) judges ``recall_rank_flat`` (the
spread between the best and worst rank on in-domain accuracy lies within 5 points); a reasoning experiment
(GSM8K, MathQA) ``reasoning_mid_rank`` (the middle ranks minus the lowest and highest); both
``lora_vs_sft`` (the best rank on the validation items minus full SFT, in domain), ``lora_vs_sft_ood`` (the
same on the out-of-domain sets, each a stratum), ``sft_drifts_more`` (full SFT's drift of the weights' top singular
vectors minus that rank's, per weight matrix both changed) and ``norm_log_rank`` (the adapters' update norm grows
sub-linearly in rank). Findings are named ``<experiment>.<finding>``.

The update analysis (``analysis``, ``rankwise.analysis.analyze_runs``) measures every arm of every seed against
the base: per weight matrix the update's norm and drift, and on ``analysis.probe`` validation prompts the
attention change and the representations' CKA per layer; the report shows their means per arm.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..adapter import load_adapter
from ..analysis import analyze_runs, update_measures
from ..analysis.findings import (contrast_finding, difference_finding, drift_finding, slope_finding, spread_finding,
                                unmeasured_finding)
from ..analysis.stats import accuracy_with_ci
from ..arm_cost import DEFAULT_TFLOPS, duration, train_flops, train_tokens
from ..arm_memory import estimate_full_peak_bytes, estimate_peak_bytes, memory_budget, plan_groups
from ..atomic import atomic_write_text
from ..demo.arms import read_json, write_json
from ..errors import ConfigError
from ..evaluate import generate_answers
from ..model import load_model, load_tokenizer, resolve_device
from ..outputs import SUMMARY
from ..runlog import METRICS, read_metrics
from ..study_tasks import CONTAINED, REASONING, score
from ..together import train_group
from ..config import parse, settings, settings_hash
from ..train import CHECKPOINT, finished_summary, train
from .config import arm_run_config, plan_arms, rows_file

log = logging.getLogger("rankwise")

SOURCE = "Rathore et al. 2025 (arXiv 2512.15634)"
FLAT_WITHIN = 0.05


def arm_dir(out: Path, exp: str, seed: int, arm: dict) -> Path:
    return out / "arms" / exp / f"seed{seed}" / arm["name"]


def lora_groups(cfg: dict, run: dict, ranks: list) -> list:
    """The LoRA ranks trained together, in groups whose estimated peak fits the device's free memory
    (``rankwise.arm_memory.plan_groups``, as ``rankwise sweep`` plans them; one group when it cannot be read,
    each rank alone with ``arms.together: false``)."""
    if not cfg["arms"]["together"]:
        return [[r] for r in ranks]
    parsed = parse(run)
    budget = memory_budget(resolve_device(parsed.train.device))
    return plan_groups(parsed, ranks, budget) if budget and ranks else [list(ranks)]


def train_arms(cfg: dict, out: Path, exp: str, seed: int, train_file: Path) -> dict:
    """Train (or reuse, or resume) every arm of one experiment and seed; ``{arm name: summary}``."""
    arms = plan_arms(cfg)
    runs = {a["name"]: arm_run_config(cfg, a, seed, str(train_file), str(arm_dir(out, exp, seed, a))) for a in arms}
    done = lambda a: any((arm_dir(out, exp, seed, a) / n).exists() for n in (SUMMARY, CHECKPOINT))  # noqa: E731
    todo = [a for a in arms if a["method"] == "lora" and not done(a)]
    summaries = {}
    for ranks in lora_groups(cfg, runs[todo[0]["name"]], [a["rank"] for a in todo]) if todo else []:
        if len(ranks) < 2:
            continue
        names = [f"lora-r{r}" for r in ranks]
        ckpt = out / "together" / exp / f"seed{seed}" / "+".join(names)
        for name, summ in zip(names, train_group(names, [runs[n] for n in names], str(ckpt))):
            summaries[name] = summ
    for a in arms:
        if a["name"] in summaries:
            pass
        elif (arm_dir(out, exp, seed, a) / SUMMARY).exists():  # finished: reused if its settings are these
            run = parse(runs[a["name"]])
            summaries[a["name"]] = finished_summary(run, settings(run))
        else:
            summaries[a["name"]] = train(runs[a["name"]], resume=True)
        if summaries[a["name"]].get("status") != "finished":  # trained together or alone, failed or stopped
            raise ConfigError(f"study arm {exp}/{a['name']} (seed {seed}) did not finish: "
                              f"{summaries[a['name']].get('reason') or summaries[a['name']].get('status')}")
        summaries[a["name"]] = {**summaries[a["name"]], **training_cost(arm_dir(out, exp, seed, a),
                                                                        summaries[a["name"]])}
    return summaries


def training_cost(run_dir: Path, summary: dict) -> dict:
    """An arm's ``runtime_s`` (its run's wall time; an arm trained together: the group's, until its own outputs
    were saved) and ``peak_mem_mb``, the largest CUDA peak its ``metrics.jsonl`` logged (the process's: a
    together group's; None off CUDA)."""
    rows = read_metrics(run_dir / METRICS, summary.get("steps") or 0)
    peaks = [r["peak_mem_mb"] for r in rows if isinstance(r.get("peak_mem_mb"), (int, float))]
    return {"runtime_s": summary.get("runtime_s"), "peak_mem_mb": max(peaks) if peaks else None}


def arm_model(cfg: dict, arm: dict, path: Path, device):
    """The model an arm evaluates: the base (``arm`` None), the base with the LoRA adapter, or the full model."""
    run = cfg["run"]
    kw = dict(dtype=run.get("dtype", "auto"), device=device)
    if arm is not None and arm["method"] == "full":
        return load_model(str(path / "model"), **kw)
    model = load_model(run["model"], quantization=run.get("quantization", "none"), **kw)
    if arm is not None:
        load_adapter(model, str(path / "adapter"))
    model.eval()
    return model


def lm_eval_scores(model, tok, spec: dict, device) -> dict:
    """``{"lm_eval:<task>": [score per sample]}`` of lm-evaluation-harness's ``spec["tasks"]`` on ``model``
    (its ``metric``, else each task's first; of its ``filter``, else each task's first, as gsm8k's strict-match
    before flexible-extract; samples in document order; ``include_path`` for local task YAMLs)."""
    from lm_eval import simple_evaluate  # optional dependency: lm-evaluation-harness
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, device=str(device), batch_size=spec["batch_size"])
    r = simple_evaluate(model=lm, tasks=list(spec["tasks"]), task_manager=TaskManager(include_path=spec["include_path"]),
                        limit=spec["limit"], num_fewshot=spec["num_fewshot"], log_samples=True, bootstrap_iters=0)
    out = {}
    for task in spec["tasks"]:
        samples = r["samples"].get(task, [])
        if not samples:
            raise ConfigError(f"eval.lm_eval: the task {task} gave no samples (a group of tasks: name its members)")
        filters = list(dict.fromkeys(x.get("filter", "none") for x in samples))
        chosen = spec["filter"] or filters[0]
        if chosen not in filters:
            raise ConfigError(f"eval.lm_eval.filter {chosen!r}: the task {task} has the filters {', '.join(filters)}")
        samples = sorted((x for x in samples if x.get("filter", "none") == chosen), key=lambda x: x["doc_id"])
        metric = spec["metric"] or samples[0]["metrics"][0]
        out[f"lm_eval:{task}"] = [float(x[metric]) for x in samples]
    return out


def answer_length(task: str, kind: str = "recall") -> str:
    """The ``eval`` key of the new tokens an answer of ``task`` gets: a choice letter (MMLU, MedMCQA), a short
    answer (EntityQuestions; prompt/completion in a recall experiment) or a worked one (GSM8K, MathQA's
    rationale; prompt/completion in a reasoning experiment)."""
    if task in REASONING or (task == "prompt_completion" and kind == "reasoning"):
        return "max_new_tokens"
    return "answer_tokens" if task in CONTAINED else "choice_tokens"


def evaluate_sets(model, tok, sets: dict, ev: dict, kind: str = "recall") -> dict:
    """``{set: [0/1 per item]}``: greedy answers, scored; one batched pass per answer length (``answer_length``
    in an experiment of ``kind``)."""
    got = {name: [0] * len(xs) for name, xs in sets.items()}
    for length in ("choice_tokens", "answer_tokens", "max_new_tokens"):
        items = [(name, i, it) for name, xs in sets.items() for i, it in enumerate(xs)
                 if answer_length(it["task"], kind) == length]
        if not items:
            continue
        outs = generate_answers(model, tok, [it["prompt"] for _, _, it in items], batch_size=ev["batch_size"],
                                max_new_tokens=ev[length])
        for (name, i, it), o in zip(items, outs):
            got[name][i] = int(score(o[0], it, ev["flexible"]))
    return got


def eval_key(cfg: dict, sets: dict, summary, kind: str = "recall") -> str:
    """What an arm's cached results depend on: its run's settings (the base: the model and its loading keys),
    the generation settings its items use (their answer lengths, the batch, the scoring, lm-eval's) and every
    item's prompt and answer."""
    run = {k: cfg["run"].get(k) for k in ("model", "tokenizer", "dtype", "quantization")}
    items = {name: [[it["prompt"], it["answer"]] for it in xs] for name, xs in sets.items()}
    used = {answer_length(it["task"], kind) for xs in sets.values() for it in xs}
    ev = {k: v for k, v in cfg["eval"].items() if k in used | {"batch_size", "flexible", "lm_eval"}}
    return settings_hash({"arm": summary["settings_hash"] if summary else run, "eval": ev, "items": items})


def evaluate_arms(cfg: dict, out: Path, exp: str, seed: int, sets: dict, summaries: dict,
                  kind: str = "recall") -> dict:
    """``{"base" | arm name: {set: [0/1]}}`` of one experiment and seed (cached in ``eval/``, keyed by
    ``eval_key``: results of other settings or items are computed again)."""
    device = resolve_device(cfg["run"].get("train", {}).get("device", "auto"))
    tok = load_tokenizer(cfg["run"].get("tokenizer") or cfg["run"]["model"])
    res = {}
    for arm in [None, *plan_arms(cfg)]:
        name = "base" if arm is None else arm["name"]
        cache = out / "eval" / exp / (f"{name}.json" if arm is None else f"seed{seed}-{name}.json")
        key = eval_key(cfg, sets, None if arm is None else summaries[name], kind)
        got = read_json(cache)
        if not isinstance(got, dict) or got.get("key") != key:
            model = arm_model(cfg, arm, None if arm is None else arm_dir(out, exp, seed, arm), device)
            results = evaluate_sets(model, tok, sets, cfg["eval"], kind)
            if cfg["eval"]["lm_eval"]:
                results.update(lm_eval_scores(model, tok, cfg["eval"]["lm_eval"], device))
            got = {"key": key, "results": results}
            del model
            write_json(cache, got)
        res[name] = got["results"]
    return res


def analyze_arms(cfg: dict, out: Path, exp: str, seed: int, probe: list, summaries: dict) -> dict | None:
    """``{arm name: update measures}`` of one experiment and seed (``rankwise.analysis.update_measures``: per
    weight matrix the update's norm and its top singular vectors' drift, per layer the attention change and the
    representations' CKA to the base on the ``probe`` prompts); cached in ``analysis/``, keyed by the arms'
    settings, the probe and the analysis settings. None with ``analysis: false``."""
    a = cfg["analysis"]
    if a is None:
        return None
    path = out / "analysis" / exp / f"seed{seed}.json"
    key = settings_hash({"arms": {n: s["settings_hash"] for n, s in sorted(summaries.items())}, "probe": probe,
                         "analysis": a})
    got = read_json(path)
    if isinstance(got, dict) and got.get("key") == key:
        return got["updates"]
    dirs = [str(arm_dir(out, exp, seed, arm)) for arm in plan_arms(cfg)]
    rows = [{"prompt": p} for p in probe]
    res = analyze_runs(dirs, cfg["run"]["model"], rows, str(out / "analysis" / exp / f"seed{seed}"),
                       device=resolve_device(cfg["run"].get("train", {}).get("device", "auto")),
                       attention=a["attention"] and bool(rows), representations=a["representations"] and bool(rows),
                       tokens=False, plots=False, progress=False)
    got = {"key": key, "updates": update_measures(res)}
    write_json(path, got)
    return got["updates"]


def run_experiment(cfg: dict, out: Path, exp: dict, sets: dict) -> dict:
    """Every seed of one experiment: ``{"evals": {seed: {arm: {set: [0/1]}}}, "summaries": {seed: ...},
    "updates": {seed: {arm: measures} or None}}``."""
    name = exp["name"]
    eval_sets = {"validation": sets["validation"], **{k: sets[k] for k in exp["eval"]}}
    probe = [it["prompt"] for it in (sets["validation"] or sets["train"])][:cfg["analysis"]["probe"]] \
        if cfg["analysis"] else []
    evals, summaries, updates = {}, {}, {}
    for seed in cfg["seeds"]:
        train_file = rows_file(out / "data" / name, "train", [{"prompt": it["prompt"], "completion": it["completion"]}
                                                              for it in sets["train"]])
        summaries[seed] = train_arms(cfg, out, name, seed, train_file)
        evals[seed] = evaluate_arms(cfg, out, name, seed, eval_sets, summaries[seed], exp["kind"])
        updates[seed] = analyze_arms(cfg, out, name, seed, probe, summaries[seed])
    return {"evals": evals, "summaries": summaries, "updates": updates}


# ----------------------------------------------------------------------------- numbers and findings

def matrix(evals: dict, seeds: list, arm: str, name: str) -> np.ndarray:
    return np.asarray([evals[s][arm][name] for s in seeds], dtype=np.float64)


def lm_eval_sets(cfg: dict) -> list:
    spec = cfg["eval"]["lm_eval"]
    return [f"lm_eval:{t}" for t in spec["tasks"]] if spec else []


def summarize(cfg: dict, exp: dict, got: dict) -> list:
    """Per arm (the base first), per set: the mean over items and seeds, its 95 % interval, n and per-seed means."""
    seeds, b = cfg["seeds"], cfg["boot"]
    rows = []
    for arm in [{"name": "base", "method": "none", "rank": None}, *plan_arms(cfg)]:
        row = {"name": arm["name"], "method": arm["method"], "rank": arm["rank"]}
        for name in ["validation", *exp["eval"], *lm_eval_sets(cfg)]:
            m = matrix(got["evals"], seeds, arm["name"], name)
            if m.shape[1] == 0:
                row[name] = None
                continue
            a = accuracy_with_ci(m, n_boot=b["n_boot"], seed=b["seed"])
            row[name] = {"mean": a["value"]["mean"], "ci95": a["ci95"]["mean"], "n": a["n"]["mean"],
                         "seeds": dict(zip(map(str, seeds), a["seeds"]["mean"]))}
        if arm["method"] != "none":
            row["train_loss"] = [got["summaries"][s][arm["name"]].get("train_loss") for s in seeds]
            for key in ("delta_norm", "runtime_s", "peak_mem_mb"):
                row[key] = [got["summaries"][s][arm["name"]].get(key) for s in seeds]
            row.update(_update_means(got["updates"], seeds, arm["name"]))
        rows.append(row)
    return rows


def _update_means(updates: dict, seeds: list, arm: str) -> dict:
    """Per seed, an arm's mean drift over its weight matrices, mean attention change and mean CKA over layers."""
    out = {}
    for key in ("drift", "attention_js", "cka"):
        vals = [[x for x in (updates[s] or {}).get(arm, {}).get(key, []) if x is not None] for s in seeds]
        out[key] = [float(np.mean(v)) if v else None for v in vals]
    return out


def chosen_rank(cfg: dict, rows: list):
    """The rank with the best validation accuracy (the lower rank on a tie); the highest without validation."""
    lora = [r for r in rows if r["method"] == "lora"]
    if not lora[0].get("validation"):
        return cfg["arms"]["ranks"][-1]
    return max(lora, key=lambda r: (r["validation"]["mean"], -r["rank"]))["rank"]


def findings(cfg: dict, exp: dict, got: dict, rows: list) -> list:
    """The experiment's findings (see the module docstring)."""
    seeds, ranks, e = cfg["seeds"], cfg["arms"]["ranks"], exp["name"]
    b = {"n_boot": cfg["boot"]["n_boot"], "boot_seed": cfg["boot"]["seed"]}
    ins = [k for k, s in exp["eval"].items() if s["domain"] == "in"]
    side = lambda arm, names: (np.concatenate([matrix(got["evals"], seeds, arm, n) for n in names], axis=1),  # noqa
                               [n for n in names for _ in range(len(got["evals"][seeds[0]][arm][n]))])
    lora = {k: side(f"lora-r{k}", ins) for k in ranks}
    res = []
    if exp["kind"] == "recall" and len(ranks) < 2:
        res.append(unmeasured_finding(f"{e}.recall_rank_flat", "Every LoRA rank scores alike on recall.", SOURCE,
                                      "fewer than two ranks"))
    elif exp["kind"] == "recall":
        res.append(spread_finding(
            f"{e}.recall_rank_flat", f"On in-domain recall every LoRA rank scores within {FLAT_WITHIN:.0%} of the "
            "others (the spread between the best and worst rank).", SOURCE, [lora[k][0] for k in ranks],
            lora[ranks[0]][1], within=FLAT_WITHIN, names=[f"lora-r{k}" for k in ranks],
            metric="in-domain accuracy", **b))
    elif len(ranks) >= 3:
        mid, ends = ranks[1:-1], [ranks[0], ranks[-1]]
        res.append(contrast_finding(
            f"{e}.reasoning_mid_rank", f"On in-domain reasoning the middle ranks ({', '.join(map(str, mid))}) beat "
            f"the lowest and highest ({ranks[0]}, {ranks[-1]}).", SOURCE, [lora[k][0] for k in mid],
            [lora[k][0] for k in ends], lora[ranks[0]][1], plus_names=[f"lora-r{k}" for k in mid],
            minus_names=[f"lora-r{k}" for k in ends], metric="in-domain accuracy", **b))
    else:
        res.append(unmeasured_finding(f"{e}.reasoning_mid_rank", "Middle ranks beat the ends on reasoning.",
                                      SOURCE, "fewer than three ranks"))
    res += _versus_sft(cfg, exp, got, rows, side, b)
    res.append(_drift(cfg, exp, got, rows, b))
    res.append(_norm(cfg, exp, got, b))
    return res


def _drift(cfg: dict, exp: dict, got: dict, rows: list, b: dict) -> dict:
    fid = f"{exp['name']}.sft_drifts_more"
    if not cfg["arms"]["full"] or cfg["analysis"] is None:
        return unmeasured_finding(fid, "Full SFT moves the weights' top singular vectors more than LoRA.", SOURCE,
                                  "no full SFT arm" if not cfg["arms"]["full"] else "analysis: false")
    return drift_finding(fid, SOURCE, got["updates"], cfg["seeds"], f"lora-r{chosen_rank(cfg, rows)}", "full", **b)


def _versus_sft(cfg, exp, got, rows, side, b) -> list:
    e, outs = exp["name"], [k for k, s in exp["eval"].items() if s["domain"] == "out"]
    ins = [k for k, s in exp["eval"].items() if s["domain"] == "in"]
    if not cfg["arms"]["full"]:
        why = "no full SFT arm (arms.full: false)"
        return [unmeasured_finding(f"{e}.lora_vs_sft", "LoRA matches or beats full SFT.", SOURCE, why),
                unmeasured_finding(f"{e}.lora_vs_sft_ood", "LoRA matches or beats full SFT out of domain.", SOURCE, why)]
    k = chosen_rank(cfg, rows)
    res = []
    for fid, names, where in ((f"{e}.lora_vs_sft", ins, "in domain"), (f"{e}.lora_vs_sft_ood", outs, "out of domain")):
        if not names:
            res.append(unmeasured_finding(fid, f"LoRA matches or beats full SFT {where}.", SOURCE,
                                          "no out-of-domain evaluation set"))
            continue
        (la, labels), (fa, _) = side(f"lora-r{k}", names), side("full", names)
        res.append(difference_finding(fid, f"LoRA (r = {k}, the best rank on validation items) matches or beats "
                                      f"full SFT {where}.", SOURCE, la, fa, labels, a_name=f"lora-r{k}",
                                      b_name="full", metric=f"accuracy {where} (each set a stratum)", **b))
    return res


def _norm(cfg: dict, exp: dict, got: dict, b: dict) -> dict:
    ranks, seeds, e = cfg["arms"]["ranks"], cfg["seeds"], exp["name"]
    norms = [[got["summaries"][s][f"lora-r{k}"].get("delta_norm") for s in seeds] for k in ranks]
    if len(ranks) < 3 or len(seeds) < 2 or any(x is None for xs in norms for x in xs):
        return unmeasured_finding(f"{e}.norm_log_rank", "The update's norm grows sub-linearly in rank.", SOURCE,
                                  "fewer than three ranks or two seeds (the seeds are its only resampled "
                                  "unit), or an adapter without its update norm")
    arms = [np.asarray(xs, dtype=np.float64).reshape(len(seeds), 1) for xs in norms]
    return slope_finding(f"{e}.norm_log_rank", "The update's Frobenius norm grows sub-linearly in rank (log-log "
                         "slope below 1).", SOURCE, arms, ranks, metric="adapter update Frobenius norm", **b)


def findings_lines(title: str, findings: list) -> list:
    """A study report's opening: its title and the findings' table (effect, interval, verdict, and why a finding
    could not be measured)."""
    lines = [f"# {title}", "", "## Findings", "", "| finding | effect | 95 % interval | verdict |",
             "| --- | ---: | --- | --- |"]
    for f in findings:
        eff = "-" if f.get("effect") is None else f"{f['effect']:+.3f}"
        ci = "-" if None in (f.get("ci95") or [None]) else f"[{f['ci95'][0]:+.3f}, {f['ci95'][1]:+.3f}]"
        lines.append(f"| {f['id']} | {eff} | {ci} | {f['verdict']}{' (' + f['why'] + ')' if f.get('why') else ''} |")
    return lines


def report(results: dict) -> str:
    """``report.md``: the findings first, then each experiment's arms."""
    lines = findings_lines("rankwise study: LoRA ranks against full SFT", results["findings"])
    for name, exp in results["experiments"].items():
        sets = [k for k in exp["arms"][0] if isinstance(exp["arms"][0][k], dict)]
        lines += ["", f"## {name} ({exp['kind']})", "", "| arm | " + " | ".join(sets) + " |",
                  "| --- |" + " ---: |" * len(sets)]
        for row in exp["arms"]:
            cells = [f"{row[s]['mean']:.3f} [{row[s]['ci95'][0]:.3f}, {row[s]['ci95'][1]:.3f}]" if row.get(s) else "-"
                     for s in sets]
            lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
        lines += _updates_table(exp["arms"]) + _cost_table(exp["arms"])
    return "\n".join(lines) + "\n"


def _cost_table(rows: list) -> list:
    """The arms' training time and peak memory per seed (arms trained together share their group's)."""
    def cells(xs, fmt):
        return ", ".join("-" if x is None else fmt.format(x) for x in xs or [])

    arms = [r for r in rows if r["method"] != "none"]
    lines = ["", "| arm | training time per seed (s) | peak CUDA memory per seed (MiB) |", "| --- | ---: | ---: |"]
    return lines + [f"| {r['name']} | {cells(r.get('runtime_s'), '{:.0f}')} | {cells(r.get('peak_mem_mb'), '{:.0f}')} |"
                    for r in arms]


def _updates_table(rows: list) -> list:
    """The arms' updates, means over seeds: the update's Frobenius norm, the drift of the weights' top singular
    vectors, the attention change and the representations' CKA to the base."""
    def mean(xs):
        xs = [x for x in xs or [] if x is not None]
        return f"{np.mean(xs):.4g}" if xs else "-"

    arms = [r for r in rows if r["method"] != "none"]
    if not any(mean(r.get(k)) != "-" for r in arms for k in ("delta_norm", "drift")):
        return []
    lines = ["", "| arm | update norm | singular-vector drift | attention JS | CKA to base |",
             "| --- |" + " ---: |" * 4]
    for r in arms:
        lines.append(f"| {r['name']} | " + " | ".join(mean(r.get(k)) for k in ("delta_norm", "drift", "attention_js",
                                                                                "cka")) + " |")
    return lines


def estimates(cfg: dict, sets: dict) -> dict:
    """``{experiment: [{"ranks" (None: full SFT), "tokens", "peak_bytes", "flops"}]}``: per LoRA group (as
    ``lora_groups`` plans them) and for full SFT, the memory model's peak (``rankwise.arm_memory``) and the FLOP
    model's work over the experiment's training rows (``rankwise.arm_cost``), each run's tokens counted once."""
    tok = load_tokenizer(cfg["run"].get("tokenizer") or cfg["run"]["model"])
    lora = [a for a in plan_arms(cfg) if a["method"] == "lora"]
    out = {}
    for exp in cfg["experiments"]:
        rows = [{"prompt": it["prompt"], "completion": it["completion"]} for it in sets[exp["name"]]["train"]]
        out[exp["name"]] = []
        if lora:
            run = parse(arm_run_config(cfg, lora[0], 0, "train.jsonl", "plan"))
            tokens = train_tokens(run, rows, tok)
            out[exp["name"]] += [{"ranks": ranks, "tokens": tokens, "peak_bytes": estimate_peak_bytes(run, ranks),
                                  "flops": train_flops(run, tokens, ranks)}
                                 for ranks in lora_groups(cfg, run, [a["rank"] for a in lora])]
        if cfg["arms"]["full"]:
            full = parse(arm_run_config(cfg, {"name": "full", "method": "full", "rank": None}, 0, "train.jsonl",
                                        "plan"))
            tokens = train_tokens(full, rows, tok)
            out[exp["name"]].append({"ranks": None, "tokens": tokens, "peak_bytes": estimate_full_peak_bytes(full),
                                     "flops": train_flops(full, tokens)})
    return out


def plan_lines(cfg: dict, sets: dict, tflops: float = DEFAULT_TFLOPS) -> list:
    """What ``rankwise study --plan`` prints: per experiment, its items and, per LoRA group and for full SFT, the
    estimated peak memory and training time at ``tflops`` (``estimates``)."""
    lines = [f"estimates, not measurements: time is the weights' matmul FLOPs at {tflops:g} TFLOP/s (--tflops), "
             "training only"]
    est = estimates(cfg, sets)
    for exp in cfg["experiments"]:
        lines.append(f"{exp['name']} ({exp['kind']}): " +
                     ", ".join(f"{k} {len(v)}" for k, v in sets[exp["name"]].items()) +
                     f" items; {len(cfg['seeds'])} seed(s)")
        for e in est[exp["name"]]:
            what = "full SFT: alone," if e["ranks"] is None else \
                f"LoRA r = {', '.join(map(str, e['ranks']))} together:"
            lines.append(f"  {what} about {e['peak_bytes'] / 2**30:.1f} GiB at peak, "
                         f"{duration(e['flops'], tflops)} to train per seed")
    return lines


def run_rank_study(cfg: dict, out: Path, sets: dict) -> dict:
    """Every experiment, then ``results.json`` and ``report.md`` in ``out``; returns the results."""
    results = {"study": "rank", "seeds": cfg["seeds"], "experiments": {}, "findings": []}
    for exp in cfg["experiments"]:
        got = run_experiment(cfg, out, exp, sets[exp["name"]])
        rows = summarize(cfg, exp, got)
        results["experiments"][exp["name"]] = {"kind": exp["kind"], "arms": rows, "chosen_rank": chosen_rank(cfg, rows),
                                               "sizes": {k: len(v) for k, v in sets[exp["name"]].items()}}
        results["findings"] += findings(cfg, exp, got, rows)
    write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", report(results))
    return results
