"""``rankwise demo``: the knowledge study end to end on the embedded synthetic world.

    rankwise demo [--out runs/demo] [--scale cpu|gpu] [--fresh]

Stages (each cached, so an interrupted demo continues where it stopped):

1. build the world and pretrain its base model (cached under ``~/.cache/rankwise``);
2. measure the mastery ``R`` of every study fact and put it in a bucket D0..D4;
3. draw a small fine-tuning set and an 8x larger one from the train people's in-domain
   facts, and test sets from the test people (in-domain and out-of-domain);
4. fine-tune: LoRA at several ranks and full SFT on the small set, LoRA and full SFT on
   the large set. The LoRA arms of one data set (configs that differ only in rank and
   alpha) train together, one base model and one pass per step
   (:func:`rankwise.together.train_together`, each arm ending exactly as its solo run;
   checkpointed in ``work/together/`` so an interrupted demo resumes); the other arms with
   :func:`rankwise.train.train`;
5. restore the top-k% relative updates of the large full-SFT model for a few k
   (:func:`rankwise.masking.restore`);
6. analyse the updates of every arm (:func:`rankwise.analysis.analyze_runs`: spectra,
   attention, representations, token shift) into ``--out/analysis/``;
7. evaluate everything (greedy, answer contained in the output) per bucket and write
   ``report.md``, ``results.json`` and PNG plots into ``--out``.

The study uses the library's public API only: :func:`rankwise.train.train`,
:func:`rankwise.together.train_together`,
:func:`rankwise.model.load_model`, :func:`rankwise.adapter.merge_adapter`,
:func:`rankwise.evaluate.generate_answers`, :func:`rankwise.masking.restore`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

# The demo's settings. Every number in the report comes from these and the world preset.
DEMO = {
    "ranks": [1, 4, 16],
    "small_size": 24,
    "large_factor": 8,
    "train_bucket": "all",
    "lora_alpha_per_rank": 2.0,  # alpha = 2 r
    "lora_lr": 3.0e-3,
    "full_lr": 3.0e-4,
    "epochs": 5,
    "batch_size": 8,
    "large_lora_rank": 16,
    "restore_fractions": [0.01, 0.05, 0.2, 0.6],
    "mastery_samples": 4,
    "mastery_temperature": 0.7,
    "max_new_tokens": 3,
    "analysis": True,  # run rankwise.analysis over the arms and append its section (spectra, probes)
    "seed": 0,
}


def add_arguments(parser) -> None:
    """Arguments of ``rankwise demo``."""
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--scale", default="cpu", choices=["cpu", "gpu"], help="world and model preset")
    parser.add_argument("--fresh", action="store_true", help="discard this output directory's cached stages "
                        "(the pretrained base stays cached; only a stage directory rankwise made is deleted)")
    parser.add_argument("--force", action="store_true",
                        help="use --out even if it is a non-empty directory rankwise did not make")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default on a CPU-only machine: half the cores, at least 1: "
                        "a busy machine slows oversubscribed threads down many times over)")


def main(args) -> int:
    """Run the demo; returns 0."""
    from .errors import ConfigError

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    elif not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    res = run_demo(args.out, scale=args.scale, fresh=args.fresh, force=args.force)
    best = res["summary"]
    print(f"report: {Path(args.out) / 'report.md'}  ({res['seconds']:.0f} s); best arm {best['best_arm']}: "
          f"in-domain D3+D4 {_pct(best['best_d34'])}%, D0 {_pct(best['best_d0'])}%")
    return 0


# ----------------------------------------------------------------------------- helpers

def _write_json(path, obj) -> None:
    from .atomic import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def _read_stamp(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None  # unreadable: the cached stages count as stale


def _read_jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _write_jsonl(path, rows) -> None:
    from .atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def evaluate_model(model, tokenizer, sets: dict, max_new_tokens: int = 4, batch_size: int = 128) -> dict:
    """Greedy closed-book QA on each test set; ``{set: accuracy_by_bucket}`` plus the raw outputs."""
    from .evaluate import generate_answers, is_correct
    from .world.mastery import accuracy_by_bucket

    out = {}
    for name, rows in sets.items():
        outs = generate_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                                batch_size=batch_size)
        correct = [is_correct(o[0], r["answers"]) for o, r in zip(outs, rows)]
        out[name] = accuracy_by_bucket(rows, correct)
    return out


def _device() -> torch.device:
    from .model import resolve_device

    return resolve_device("auto")


def _load_base(base_dir):
    from .model import load_model, load_tokenizer

    return load_model(str(base_dir), dtype="fp32", device=_device()), load_tokenizer(str(base_dir))


def arm_model(arm: dict, base_dir):
    """The fine-tuned model of an arm: LoRA merged into the base, or the saved full model."""
    from .adapter import merge_adapter
    from .model import load_model

    run = Path(arm["output_dir"])
    if arm["method"] == "lora":
        model, _ = _load_base(base_dir)
        return merge_adapter(model, str(run / "adapter"))
    return load_model(str(run / "model"), dtype="fp32", device=_device())


def arm_config(arm: dict, base_dir, data_dir, settings: dict) -> dict:
    """The ``rankwise.train`` config of one arm."""
    lora = arm["method"] == "lora"
    cfg = {
        "model": str(base_dir),
        "method": arm["method"],
        "dtype": "fp32",
        "data": {"train": str(Path(data_dir) / f"train-{arm['data']}.jsonl"), "format": "prompt_completion",
                 "max_length": 64, "packing": False},
        "train": {"epochs": float(settings["epochs"]), "batch_size": settings["batch_size"],
                  "lr": settings["lora_lr"] if lora else settings["full_lr"], "schedule": "cosine",
                  "warmup": 0.1, "seed": settings["seed"], "save_every": 0, "log_every": 5},
        "eval": {"every": 0, "generate": False},
        "log": {"progress": False},
        "output_dir": str(arm["output_dir"]),
    }
    if lora:
        cfg["lora"] = {"r": arm["rank"], "alpha": settings["lora_alpha_per_rank"] * arm["rank"]}
    return cfg


def plan_arms(settings: dict, work: Path) -> list:
    """The fine-tuning arms: the rank sweep on the small set, then the large-set arms."""
    n = settings["small_size"]
    big = n * settings["large_factor"]
    arms = [{"name": f"lora-r{r}", "method": "lora", "rank": r, "data": "small", "train_size": n}
            for r in settings["ranks"]]
    arms.append({"name": "full", "method": "full", "rank": None, "data": "small", "train_size": n})
    rl = settings["large_lora_rank"]
    arms.append({"name": f"lora-r{rl}-x{settings['large_factor']}", "method": "lora", "rank": rl,
                 "data": "large", "train_size": big})
    arms.append({"name": f"full-x{settings['large_factor']}", "method": "full", "rank": None, "data": "large",
                 "train_size": big})
    for a in arms:
        a["output_dir"] = str(work / "arms" / a["name"])
    return arms


def together_groups(arms: list) -> list:
    """The LoRA arms that train together: those of one data set (their configs differ only in rank and
    alpha), in plan order; a data set with one LoRA arm makes no group."""
    by_data: dict = {}
    for a in arms:
        if a["method"] == "lora":
            by_data.setdefault(a["data"], []).append(a)
    return [g for g in by_data.values() if len(g) > 1]


def train_group(group: list, base_dir, data_dir, settings: dict, work: Path) -> tuple:
    """Train the arms of ``group`` that need it in one together run; ``({arm name: summary}, names trained)``.

    An arm with a ``summary.json`` (finished) or a solo checkpoint is left to
    :func:`rankwise.train.train` (reused or resumed, as before); with fewer than two
    arms left, or on a GPU without bf16 (fp16 needs loss scaling), nothing trains here. The run checkpoints into ``work/together/<arms>``
    and resumes from it when that checkpoint holds these arms with these settings.
    """
    from . import train as T
    from . import together as TG
    from .errors import ConfigError

    todo = [a for a in group if not any((Path(a["output_dir"]) / n).exists() for n in (T.SUMMARY, T.CHECKPOINT))]
    if len(todo) < 2:
        return {}, []
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return {}, []  # fp16 autocast needs loss scaling, which a together run does not do yet: solo runs
    cfgs = [arm_config(a, base_dir, data_dir, settings) for a in todo]
    ckpt = work / "together" / "+".join(a["name"] for a in todo)
    if ckpt.exists() and not TG.checkpoint_matches(ckpt, cfgs):
        shutil.rmtree(ckpt)  # a checkpoint of other settings (work/ is rankwise's): start the group over
    summaries = TG.train_together(cfgs, checkpoint_dir=str(ckpt), resume=True)
    for a, summ in zip(todo, summaries):
        if summ.get("status") == "failed":
            raise ConfigError(f"demo arm {a['name']} failed: {summ.get('reason')}")
    return {a["name"]: summ for a, summ in zip(todo, summaries)}, [a["name"] for a in todo]


# ----------------------------------------------------------------------------- the demo

def run_demo(out_dir="runs/demo", scale: str = "cpu", fresh: bool = False, settings: dict | None = None,
             world_overrides: dict | None = None, cache_dir=None, progress: bool = True,
             force: bool = False) -> dict:
    """Run the whole study; returns the results dict (also written to ``out_dir/results.json``).

    Args:
        out_dir: output directory (report.md, results.json, plots, and the cached stages in ``work/``).
        scale: world/model preset (``cpu`` or ``gpu``).
        fresh: delete ``out_dir/work`` first (only if rankwise made it, or with ``force``).
        settings: overrides of :data:`DEMO`.
        world_overrides: ``{"world"|"model"|"train": {...}}`` overrides of the pretraining preset.
        cache_dir: where the world and base live (default: the user cache keyed by the settings).
        progress: show the stage progress bar.
        force: use ``out_dir`` even if it is a non-empty directory rankwise did not make.

    ``out_dir`` is rankwise's (marker kind ``demo``); it may not be, lie inside or contain
    ``cache_dir``. Stale cached stages are deleted only from a ``work/`` rankwise made.
    """
    from tqdm.auto import tqdm

    from .errors import ConfigError
    from .masking import restore
    from .ownership import MARKER, check_output, claim, owner
    from .train import train
    from .world import mastery as M
    from .world.pretrain import pretrain, preset, settings_key

    _quiet_transformers()
    s = dict(DEMO)
    unknown = set(settings or {}) - set(DEMO)
    if unknown:
        raise ConfigError(f"unknown demo settings: {sorted(unknown)}")
    s.update(settings or {})
    out = Path(out_dir)
    work = out / "work"
    pre = preset(scale, world_overrides)
    check_output(out, force=force, flag="--out", kinds=["demo"], inputs=[("world cache", cache_dir)])
    key = {"demo": s, "scale": scale, "base_key": settings_key(pre)}
    stamp = work / "settings.json"
    if work.exists() and (fresh or not stamp.exists() or _read_stamp(stamp) != json.loads(json.dumps(key))):
        if owner(work) is None and not force:  # the cached stages are stale: delete them, if they are ours
            raise ConfigError(f"{work} holds stages rankwise did not make (no {MARKER}); delete it yourself, "
                              "pass --force, or choose another --out")
        shutil.rmtree(work)
    claim(out, "demo")
    claim(work, "demo")
    _write_json(stamp, key)

    arms = plan_arms(s, work)
    groups = together_groups(arms)
    for g in groups:
        for a in g:
            a["together"] = "+".join(b["name"] for b in g)
    fractions = list(s["restore_fractions"])
    stages = ["pretrain", "mastery", "data"] + [f"train together {g[0]['together']}" for g in groups] + \
             [f"train {a['name']}" for a in arms if "together" not in a] + \
             [f"eval {a['name']}" for a in arms] + ["restore"] + (["analysis"] if s["analysis"] else []) + ["report"]
    bar = tqdm(total=len(stages), desc="demo", disable=not progress, dynamic_ncols=True)
    times: dict = {}
    t_all = time.time()

    def stage(name):
        bar.set_description(f"demo: {name}")
        return time.time()

    def done(name, t0):
        times[name] = round(time.time() - t0, 2)
        bar.update(1)

    try:
        # 1. world + base model
        t0 = stage("pretrain")
        pr = pretrain(scale, out_dir=cache_dir, overrides=world_overrides, progress=progress)
        base_dir = Path(pr["base_dir"])
        done("pretrain", t0)
        times["pretrain_cached"] = pr["cached"]

        # 2. mastery
        t0 = stage("mastery")
        mpath = work / "mastery.jsonl"
        if mpath.exists():
            facts = _read_jsonl(mpath)
        else:
            from .world.generate import load_world

            world = load_world(pr["world_dir"])
            model, tok = _load_base(base_dir)
            scores = M.mastery_scores(model, tok, world["facts"], num_samples=s["mastery_samples"],
                                      temperature=s["mastery_temperature"], max_new_tokens=s["max_new_tokens"],
                                      seed=s["seed"])
            facts = M.assign_buckets(world["facts"], scores)
            _write_jsonl(mpath, facts)
        done("mastery", t0)

        # 3. data
        t0 = stage("data")
        data_dir = work / "data"
        data_dir.mkdir(exist_ok=True)
        big = s["small_size"] * s["large_factor"]
        large = M.draw_train_set(facts, big, bucket=s["train_bucket"], seed=s["seed"])
        small = large[: s["small_size"]]  # the small set is a subset of the large one
        _write_jsonl(data_dir / "train-small.jsonl", small)
        _write_jsonl(data_dir / "train-large.jsonl", large)
        tests = M.test_sets(facts)
        for k, rows in tests.items():
            _write_jsonl(data_dir / f"test-{k}.jsonl", rows)
        done("data", t0)

        # 4. fine-tuning arms: each group of LoRA arms together, then every other arm on its own
        together_runs, trained = [], {}
        for g in groups:
            name = f"train together {g[0]['together']}"
            t0 = stage(name)
            summ, names = train_group(g, base_dir, data_dir, s, work)
            trained.update(summ)
            done(name, t0)
            together_runs.append({"arms": [a["name"] for a in g], "trained": names, "seconds": times[name],
                                  "checkpoint_dir": str(work / "together" / "+".join(names)) if names else None})
        for a in arms:
            if a["name"] in trained:
                summ = trained[a["name"]]
            else:
                t0 = stage(f"train {a['name']}")
                summ = train(arm_config(a, base_dir, data_dir, s), resume=True)  # a finished arm is returned as is
                if "together" not in a:
                    done(f"train {a['name']}", t0)
            a["train_loss"] = summ.get("train_loss")
            a["train_seconds"] = summ.get("runtime_s")

        # 5. evaluation (base model as a reference arm, then every arm)
        base_model, tok = _load_base(base_dir)
        bpath = work / "eval-base.json"
        if not bpath.exists():
            _write_json(bpath, evaluate_model(base_model, tok, tests, s["max_new_tokens"]))
        base_eval = json.loads(bpath.read_text())
        for a in arms:
            t0 = stage(f"eval {a['name']}")
            epath = Path(a["output_dir"]) / "demo-eval.json"
            if not epath.exists():
                model = arm_model(a, base_dir)
                _write_json(epath, evaluate_model(model, tok, tests, s["max_new_tokens"]))
                del model
            a["eval"] = json.loads(epath.read_text())
            done(f"eval {a['name']}", t0)

        # 6. restoration of the large full-SFT model
        t0 = stage("restore")
        restoration = []
        full_big = next(a for a in arms if a["method"] == "full" and a["data"] == "large")
        base_sd = {k: v.clone() for k, v in base_model.state_dict().items()}
        tuned = arm_model(full_big, base_dir)
        tuned_sd = {k: v.clone() for k, v in tuned.state_dict().items()}
        for f in fractions:
            rpath = work / "restore" / f"top-{f:g}.json"
            if not rpath.exists():
                rpath.parent.mkdir(parents=True, exist_ok=True)
                restored, stats = restore(base_sd, tuned_sd, f, score="relative", select="top",
                                          scope="global", include=r"layers", exclude=r"norm", seed=s["seed"])
                tuned.load_state_dict(restored)
                ev = evaluate_model(tuned, tok, tests, s["max_new_tokens"])
                brief = {k: v for k, v in stats.items() if k != "tensors"}
                _write_json(rpath, {"fraction": f, "eval": ev, "stats": _jsonable(brief)})
            restoration.append(json.loads(rpath.read_text()))
        del tuned
        done("restore", t0)

        # 7. analysis of the updates (rankwise.analysis)
        analysis_md = None
        if s["analysis"]:
            t0 = stage("analysis")
            analysis_md = _analysis_section(arms, base_dir, tests, out, work)
            done("analysis", t0)

        # 8. report
        t0 = stage("report")
        seconds = round(time.time() - t_all, 1)
        results = _results(facts, tests, arms, base_eval, restoration, s, pr, scale, times, seconds)
        results["together"] = together_runs
        _write_report(out, results, analysis_md)
        done("report", t0)
    finally:
        bar.close()
    results["seconds"] = round(time.time() - t_all, 1)
    _write_json(out / "results.json", results)
    return results


def _analysis_section(arms, base_dir, tests, out: Path, work: Path) -> str:
    """``rankwise.analysis``'s markdown section for the demo's runs; the analysis is cached in ``work/``."""
    from .analysis import analyze_runs, markdown_section

    adir = out / "analysis"
    done = work / "analysis.json"
    if done.exists():
        analysis = json.loads(done.read_text())
    else:
        probe = tests["in_domain"][:32] + tests["out_of_domain"][:32]
        analysis = analyze_runs([a["output_dir"] for a in arms], str(base_dir), probe, str(adir),
                                device=_device(), progress=False)
        _write_json(done, analysis)
    return markdown_section(analysis, str(adir), relative_to=str(out))


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


def _strip(acc: dict) -> dict:
    from .world.mastery import BUCKETS

    return {k: acc[k] for k in (*BUCKETS, "mean")}


def _d34(acc: dict) -> float:
    """Accuracy over the D3 and D4 facts together (weighted by their counts)."""
    n3, n4 = acc["n"]["D3"], acc["n"]["D4"]
    if n3 + n4 == 0:
        return None
    return ((acc["D3"] or 0) * n3 + (acc["D4"] or 0) * n4) / (n3 + n4)


def _results(facts, tests, arms, base_eval, restoration, s, pr, scale, times, seconds) -> dict:
    from .world.mastery import bucket_counts

    out_arms = [{"name": "base", "method": "none", "rank": None, "train_size": 0,
                 "in_domain": _strip(base_eval["in_domain"]), "out_of_domain": _strip(base_eval["out_of_domain"]),
                 "in_domain_d34": _d34(base_eval["in_domain"])}]
    for a in arms:
        out_arms.append({"name": a["name"], "method": a["method"], "rank": a["rank"], "train_size": a["train_size"],
                         "in_domain": _strip(a["eval"]["in_domain"]),
                         "out_of_domain": _strip(a["eval"]["out_of_domain"]),
                         "in_domain_d34": _d34(a["eval"]["in_domain"]),
                         "train_loss": a.get("train_loss"), "train_seconds": a.get("train_seconds"),
                         "trained_together": a.get("together")})
    tuned = [a for a in out_arms if a["name"] != "base"]
    best = max(tuned, key=lambda a: -1.0 if a["in_domain_d34"] is None else a["in_domain_d34"])
    full_big = next(a for a in out_arms if a["method"] == "full" and a["train_size"] == s["small_size"] * s["large_factor"])
    rest = [{"fraction": 0.0, "in_domain": full_big["in_domain"], "out_of_domain": full_big["out_of_domain"]}]
    for r in restoration:
        rest.append({"fraction": r["fraction"], "in_domain": _strip(r["eval"]["in_domain"]),
                     "out_of_domain": _strip(r["eval"]["out_of_domain"]), "stats": r.get("stats")})
    return {
        "buckets": bucket_counts(facts),
        "test_buckets": {"in_domain": bucket_counts(tests["in_domain"]),
                         "out_of_domain": bucket_counts(tests["out_of_domain"])},
        "train_buckets": bucket_counts(facts, split="train", domain="in"),
        "arms": out_arms,
        "restoration": {"of": full_big["name"], "select": "top", "score": "relative", "scope": "global",
                        "points": rest if restoration else []},
        "summary": {"best_arm": best["name"], "best_d34": best["in_domain_d34"], "best_d0": best["in_domain"]["D0"],
                    "criterion_d34_ge_50": bool((best["in_domain_d34"] or 0.0) >= 0.5),
                    "all_buckets_nonempty": all(v > 0 for v in bucket_counts(facts).values())},
        "settings": {"demo": s, "scale": scale, "world": pr["settings"], "base_dir": str(pr["base_dir"]),
                     "base_cached": pr["cached"]},
        "stage_seconds": times,
        "seconds": seconds,
    }


# ----------------------------------------------------------------------------- report

def _pct(v) -> str:
    return "–" if v is None or v != v else f"{100 * v:.1f}"


def _plots(out: Path, results: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    B = ["D0", "D1", "D2", "D3", "D4", "mean"]
    small = results["settings"]["demo"]["small_size"]
    sweep = [a for a in results["arms"] if a["train_size"] == small]
    base = next((a for a in results["arms"] if a["name"] == "base"), None)
    labels = [f"r={a['rank']}" if a["method"] == "lora" else "full SFT" for a in sweep]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, dom, title in zip(axes, ("in_domain", "out_of_domain"), ("in-domain", "out-of-domain")):
        for b in B:
            ys = [a[dom][b] if a[dom][b] is not None else float("nan") for a in sweep]
            ax.plot(range(len(sweep)), ys, marker="o", lw=2.5 if b == "mean" else 1.2,
                    ls="-" if b == "mean" else "--", label=b)
        if base is not None and base[dom]["mean"] is not None:
            ax.axhline(base[dom]["mean"], color="grey", ls=":", lw=1.5, label="base model, mean")
        ax.set_xticks(range(len(sweep)), labels)
        ax.set_title(f"{title} accuracy vs rank ({small} training facts)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend(title="mastery bucket", fontsize=8)
    fig.tight_layout()
    files["rank"] = "accuracy_vs_rank.png"
    fig.savefig(out / files["rank"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, label in (("lora", "LoRA"), ("full", "full SFT")):
        for dom, ls in (("in_domain", "-"), ("out_of_domain", "--")):
            rank = results["settings"]["demo"]["large_lora_rank"]
            pts = sorted((a["train_size"], a[dom]["mean"]) for a in results["arms"]
                         if a["method"] == method and (method == "full" or a["rank"] == rank))
            if len(pts) > 1:
                name = f"{label} r={rank}" if method == "lora" else label
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls=ls,
                        label=f"{name}, {dom.replace('_', '-')}")
    ax.set_xscale("log", base=2)
    sizes = sorted({a["train_size"] for a in results["arms"] if a["train_size"]})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("fine-tuning set size")
    ax.set_ylabel("mean accuracy over buckets")
    ax.set_title("accuracy vs data size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files["data_size"] = "accuracy_vs_data_size.png"
    fig.savefig(out / files["data_size"], dpi=110)
    plt.close(fig)

    pts = results["restoration"]["points"]
    if pts:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        xs = [100 * p["fraction"] for p in pts]
        for ax, dom, title in zip(axes, ("in_domain", "out_of_domain"), ("in-domain", "out-of-domain")):
            for b in B:
                ys = [p[dom][b] if p[dom][b] is not None else float("nan") for p in pts]
                ax.plot(xs, ys, marker="o", lw=2.5 if b == "mean" else 1.2, ls="-" if b == "mean" else "--",
                        label=b)
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
            ax.set_xlabel("top-k% relative updates restored to the base (%)")
            ax.set_title(f"{title}: restoring {results['restoration']['of']}")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("accuracy")
        axes[1].legend(title="mastery bucket", fontsize=8)
        fig.tight_layout()
        files["restoration"] = "accuracy_vs_restored_fraction.png"
        fig.savefig(out / files["restoration"], dpi=110)
        plt.close(fig)
    return files


def _write_report(out: Path, results: dict, analysis_md: str | None = None) -> None:
    from .atomic import atomic_write_text

    files = _plots(out, results)
    results["plots"] = files
    s = results["settings"]
    d = s["demo"]
    w = s["world"]
    B = ["D0", "D1", "D2", "D3", "D4"]
    L = ["# rankwise demo: the knowledge study on the embedded synthetic world", ""]
    sm = results["summary"]
    L += [f"Best arm **{sm['best_arm']}**: in-domain accuracy on held-out D3+D4 facts "
          f"**{_pct(sm['best_d34'])}%**, on D0 facts {_pct(sm['best_d0'])}% "
          f"(criterion D3+D4 >= 50%: {'met' if sm['criterion_d34_ge_50'] else 'NOT met'}; "
          f"all five buckets non-empty: {'yes' if sm['all_buckets_nonempty'] else 'NO'}).", ""]
    L += ["## Mastery buckets", "",
          "R = share of (completion probes x samples at temperature "
          f"{d['mastery_temperature']}) whose output contains the answer; "
          f"{d['mastery_samples']} samples per probe, {d['max_new_tokens']} new tokens.", "",
          "| | " + " | ".join(B) + " |", "|---|" + "---|" * len(B),
          "| all study facts | " + " | ".join(str(results["buckets"][b]) for b in B) + " |",
          "| train pool (in-domain) | " + " | ".join(str(results["train_buckets"][b]) for b in B) + " |",
          "| test, in-domain | " + " | ".join(str(results["test_buckets"]["in_domain"][b]) for b in B) + " |",
          "| test, out-of-domain | " + " | ".join(str(results["test_buckets"]["out_of_domain"][b]) for b in B)
          + " |", ""]
    for dom, title in (("in_domain", "In-domain (held-out facts of the location relations)"),
                       ("out_of_domain", "Out-of-domain (the other relations)")):
        L += [f"## {title}: accuracy (%) by mastery bucket", "",
              "| arm | method | rank | train size | " + " | ".join(B) + " | mean |", "|---" * (5 + len(B)) + "|"]
        for a in results["arms"]:
            L.append(f"| {a['name']} | {a['method']} | {a['rank'] if a['rank'] else '–'} | {a['train_size']} | "
                     + " | ".join(_pct(a[dom][b]) for b in B) + f" | {_pct(a[dom]['mean'])} |")
        L.append("")
    L += ["![accuracy vs rank](" + files["rank"] + ")", "", "![accuracy vs data size](" + files["data_size"] + ")",
          ""]
    r = results["restoration"]
    L += ["## Restoring the top-k% relative updates", ""]
    if r["points"]:
        L += [f"Model: {r['of']}. r_i = |tuned - base| / (|base| + 1e-8) over the decoder-layer weights "
              "(`layers`, no norms), one global ranking; the top k% are set back to the base values.", "",
              "| restored % | " + " | ".join(f"in {b}" for b in B) + " | in mean | out mean |",
              "|---" * (len(B) + 3) + "|"]
        for p in r["points"]:
            L.append(f"| {100 * p['fraction']:g} | " + " | ".join(_pct(p["in_domain"][b]) for b in B)
                     + f" | {_pct(p['in_domain']['mean'])} | {_pct(p['out_of_domain']['mean'])} |")
        L += ["", "![accuracy vs restored fraction](" + files["restoration"] + ")", ""]
    else:
        L += ["No restoration fractions were asked for.", ""]
    L += ["## Settings", "",
          f"- world ({s['scale']} preset): {json.dumps(w['world'])}",
          f"- base model: {json.dumps(w['model'])}; pretraining: {json.dumps(w['train'])}",
          f"- base directory: `{s['base_dir']}` ({'cached' if s['base_cached'] else 'pretrained in this run'})",
          "- what makes the tiny model's knowledge extractable: each seen person appears in several "
          "biographies (templates and sentence order drawn at random, each fact kept with probability "
          "`fact_keep`), and question-answer text about the *anchor* people (`anchor_fraction` of everybody) is "
          "mixed into the corpus; the *study* people (mastery, fine-tuning and test sets) never appear in QA text, "
          "so answering their questions needs knowledge read in biographies only",
          f"- fine-tuning: {d['small_size']} and {d['small_size'] * d['large_factor']} in-domain facts of the train "
          f"people (bucket: {d['train_bucket']}), {d['epochs']} epochs, batch {d['batch_size']}, cosine, "
          f"LoRA lr {d['lora_lr']} (alpha = {d['lora_alpha_per_rank']:g} r, all linear layers of the blocks), "
          f"full SFT lr {d['full_lr']}; seed {d['seed']}",
          *[f"- LoRA arms {', '.join(g['arms'])} trained together (`rankwise.together`: one base model, one pass "
            f"per step, each arm its solo run's result); this run trained "
            f"{', '.join(g['trained']) if g['trained'] else 'none of them (all cached)'} in {g['seconds']} s"
            for g in results.get("together", [])],
          f"- evaluation: greedy, {d['max_new_tokens']} new tokens, correct when the answer is contained in the "
          "output; mean = unweighted mean over the buckets",
          "", "## Times (s)", "",
          "| stage | seconds |", "|---|---|"]
    for k, v in results["stage_seconds"].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            L.append(f"| {k} | {v} |")
    L += [f"| total | {results['seconds']} |", ""]
    if analysis_md:
        L += [analysis_md.rstrip(), ""]
    atomic_write_text(out / "report.md", "\n".join(L))
