"""A study's YAML config, checked whole before anything is written or loaded.

    study: rank                      # the protocol: rank here; knowledge (study.knowledge), world (demo.protocol)
    output_dir: runs/study
    run:                             # rankwise train keys every arm shares (not data.train, output_dir, method)
      model: meta-llama/Llama-3.2-1B
      data: {max_length: 512}
      train: {epochs: 1, batch_size: 8, lr: 2.0e-4}
    full: {train: {lr: 1.0e-5}}      # what full SFT changes (merged over run)
    arms: {ranks: [8, 16, 32, 64, 128], full: true, alpha_per_rank: 2.0, together: true}
    seeds: [0, 1, 2]
    experiments:                     # each: one training task, its arms, its evaluation sets
      - name: gsm8k                  # kind: recall | reasoning (default: by the training task)
        train: {task: gsm8k, data: openai/gsm8k:train, limit: 2000, validation: 100}
        eval:
          gsm8k: {task: gsm8k, data: test.jsonl, domain: in, limit: 300}
          mathqa: {task: mathqa, data: mathqa_test.json, domain: out, limit: 300}
    eval: {max_new_tokens: 256, choice_tokens: 8, answer_tokens: 16, batch_size: 32}
    boot: {n_boot: 2000, seed: 0}
    analysis: {probe: 32, attention: true, representations: true}   # false: no update analysis

Tasks (``rankwise.study_tasks``): ``gsm8k``, ``mathqa``, ``mmlu``, ``medmcqa``, ``entity_questions`` (its
``relations``: a list, ``in_domain`` or ``out_of_domain``; ``split``: train, dev or test) and
``prompt_completion``; an experiment's ``kind``
(which findings it gets) defaults to reasoning for GSM8K and MathQA, recall otherwise.

Every task's data is read here (``rankwise.study_tasks.read_task``), and every arm's run config is validated
(``rankwise.config.validate_config``), so a bad key, a missing file or a row off its schema is one line before
the study writes anything.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import random
from pathlib import Path
from typing import Any, Mapping

from ..atomic import atomic_write_text
from ..config import validate_config
from ..errors import ConfigError
from ..study_data import IN_DOMAIN, OUT_OF_DOMAIN, QUESTION_TEMPLATES
from ..study_tasks import REASONING, TASKS, read_task

STUDIES = ("rank", "knowledge", "world")
TOP = {"study", "output_dir", "run", "full", "arms", "seeds", "experiments", "eval", "boot", "analysis"}
ARMS = {"ranks": [8, 16, 32, 64, 128], "full": True, "alpha_per_rank": 2.0, "together": True}
EVAL = {"max_new_tokens": 256, "choice_tokens": 8, "answer_tokens": 16, "batch_size": 32, "flexible": True,
        "lm_eval": None}
LM_EVAL = {"tasks": [], "limit": None, "include_path": None, "num_fewshot": None, "batch_size": 8, "metric": None,
           "filter": None}
BOOT = {"n_boot": 2000, "seed": 0}
ANALYSIS = {"probe": 32, "attention": True, "representations": True}
RUN_OWNED = ("output_dir", "method")  # set per arm by the study
DOMAINS = ("in", "out")


def as_mapping(v, where: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ConfigError(f"study config: {where} must be a mapping, got {type(v).__name__}")
    return dict(v)


def check_keys(d: Mapping, keys, where: str) -> None:
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise ConfigError(f"study config: unknown key {where}{unknown[0]!r} (known: {', '.join(sorted(keys))})")


def merged(base: Mapping, over: Mapping) -> dict:
    """``base`` with ``over`` merged in, mapping by mapping."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else copy.deepcopy(v)
    return out


def int_list(v, where: str, minimum: int) -> list:
    """A non-empty list of distinct integers >= ``minimum``; ``ConfigError`` naming ``where`` otherwise."""
    if not isinstance(v, list) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < minimum
                                               for x in v) or len(set(v)) != len(v):
        raise ConfigError(f"study config: {where} must be a non-empty list of distinct integers >= {minimum}")
    return list(v)


def positive_int(v, where: str, allow_none: bool = False):
    """A positive integer (or None where allowed); ``ConfigError`` naming ``where`` otherwise."""
    if v is None and allow_none:
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"study config: {where} must be a positive integer" + (" or null" if allow_none else ""))
    return v


def _task(spec, where: str, eval_set: bool) -> dict:
    spec = as_mapping(spec, where)
    keys = {"task", "data", "config", "limit", "cop_base", "subjects", "relations", "split"} | (
        {"domain"} if eval_set else {"validation"})
    check_keys(spec, keys, f"{where}.")
    if "relations" in spec:
        spec = _relations(spec, where)
    if spec.setdefault("split", None) is not None and (spec.get("task") != "entity_questions" or
                                                       spec["split"] not in ("train", "dev", "test")):
        raise ConfigError(f"study config: {where}.split is EntityQuestions' train, dev or test (task entity_questions)")
    if spec.get("cop_base", 0) not in (0, 1) or isinstance(spec.get("cop_base"), bool):
        raise ConfigError(f"study config: {where}.cop_base must be 0 (the Hub's MedMCQA) or 1 (its original release)")
    if spec.get("task") not in TASKS:
        raise ConfigError(f"study config: {where}.task must be one of {', '.join(TASKS)}, got {spec.get('task')!r}")
    if not isinstance(spec.get("data"), str) or not spec["data"]:
        raise ConfigError(f"study config: {where}.data must name a file or a hub data set name[:split]")
    for k in ("limit", "validation"):
        positive_int(spec.get(k), f"{where}.{k}", allow_none=True)
    if eval_set and spec.setdefault("domain", "in") not in DOMAINS:
        raise ConfigError(f"study config: {where}.domain must be in or out, got {spec['domain']!r}")
    if not eval_set:
        spec.setdefault("validation", 0)
    spec.setdefault("cop_base", 0)
    spec.setdefault("limit", None)
    if spec.setdefault("config", None) is not None and not isinstance(spec["config"], str):
        raise ConfigError(f"study config: {where}.config must be the Hub data set's configuration name")
    if spec["config"] is not None and spec["task"] == "entity_questions":
        raise ConfigError(f"study config: {where}: entity_questions is read from its released files (no config)")
    subjects = spec.setdefault("subjects", None)
    if subjects is not None and (not isinstance(subjects, list) or not subjects
                                 or not all(isinstance(x, str) and x for x in subjects)):
        raise ConfigError(f"study config: {where}.subjects must be a non-empty list of subject names")
    return spec


def _relations(spec: dict, where: str) -> dict:
    """``relations`` (EntityQuestions only): a list of relation ids, ``in_domain`` or ``out_of_domain`` (the
    knowledge study's 10 location relations, or the other 14), kept as the spec's ``subjects``."""
    rel = spec.pop("relations")
    if spec.get("task") != "entity_questions" or "subjects" in spec:
        raise ConfigError(f"study config: {where}.relations is for task entity_questions (instead of subjects)")
    rel = {"in_domain": list(IN_DOMAIN), "out_of_domain": list(OUT_OF_DOMAIN)}.get(rel, rel) \
        if isinstance(rel, str) else rel
    if not isinstance(rel, list) or not rel or any(not isinstance(r, str) or r not in QUESTION_TEMPLATES for r in rel):
        raise ConfigError(f"study config: {where}.relations must be in_domain, out_of_domain or a list of "
                          f"EntityQuestions relations ({', '.join(QUESTION_TEMPLATES)})")
    return {**spec, "subjects": rel}


def _experiment(spec, i: int) -> dict:
    where = f"experiments[{i}]"
    spec = as_mapping(spec, where)
    check_keys(spec, {"name", "kind", "train", "eval"}, f"{where}.")
    name = spec.get("name")
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"study config: {where}.name must be a word (letters, digits, - and _)")
    train = _task(spec.get("train"), f"{where}.train", False)
    evals = as_mapping(spec.get("eval"), f"{where}.eval")
    if not evals:
        raise ConfigError(f"study config: {where}.eval needs at least one evaluation set")
    taken = sorted({"train", "validation", "base"} & set(map(str, evals)))
    if taken:
        raise ConfigError(f"study config: {where}.eval.{taken[0]}: that name is the study's own; choose another")
    sets = {str(k): _task(v, f"{where}.eval.{k}", True) for k, v in evals.items()}
    if not any(s["domain"] == "in" for s in sets.values()):
        raise ConfigError(f"study config: {where}.eval needs an in-domain set (domain: in)")
    kind = spec.get("kind")
    kind = ("reasoning" if train["task"] in REASONING else "recall") if kind is None else kind
    if kind not in ("recall", "reasoning"):
        raise ConfigError(f"study config: {where}.kind must be recall or reasoning, got {kind!r}")
    return {"name": name, "kind": kind, "train": train, "eval": sets}


def _lm_eval(spec):
    """``eval.lm_eval`` checked: lm-evaluation-harness tasks every arm is scored on too (None: none)."""
    if spec is None:
        return None
    spec = merged(LM_EVAL, as_mapping(spec, "eval.lm_eval"))
    check_keys(spec, LM_EVAL, "eval.lm_eval.")
    tasks = spec["tasks"]
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError("study config: eval.lm_eval.tasks must be a non-empty list of lm-evaluation-harness task names")
    positive_int(spec["limit"], "eval.lm_eval.limit", allow_none=True)
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("study config: eval.lm_eval needs lm-evaluation-harness (pip install lm-eval)")
    return spec


def _analysis(raw) -> dict | None:
    """``analysis``: false skips it; true or a mapping: the update analysis's settings over ``ANALYSIS``."""
    if raw is False:
        return None
    a = merged(ANALYSIS, as_mapping(None if raw is True else raw, "analysis"))
    check_keys(a, ANALYSIS, "analysis.")
    if isinstance(a["probe"], bool) or not isinstance(a["probe"], int) or a["probe"] < 0:
        raise ConfigError("study config: analysis.probe must be an integer >= 0 (0: no probe pass)")
    for key in ("attention", "representations"):
        if not isinstance(a[key], bool):
            raise ConfigError(f"study config: analysis.{key} must be true or false")
    return a


def validate_study(raw: Any) -> dict:
    """The checked study config with defaults filled (see the module docstring); ``ConfigError`` otherwise."""
    raw = as_mapping(raw, "the file")
    check_keys(raw, TOP, "")
    if raw.get("study") not in STUDIES:
        raise ConfigError(f"study config: study must be one of {', '.join(STUDIES)}, got {raw.get('study')!r}")
    if raw["study"] != "rank":  # the others have their own checks (rankwise.study.prepare routes them)
        raise ConfigError(f"study config: study: {raw['study']} is not checked here (rankwise.study.prepare)")
    run, full = as_mapping(raw.get("run"), "run"), as_mapping(raw.get("full"), "full")
    for d, where in ((run, "run"), (full, "full")):
        owned = [k for k in RUN_OWNED if k in d] + (["data.train"] if "train" in as_mapping(d.get("data"), "data")
                                                    else [])
        if owned:
            raise ConfigError(f"study config: {where}.{owned[0]} is set by the study for each arm; remove it")
    arms = merged(ARMS, as_mapping(raw.get("arms"), "arms"))
    check_keys(arms, ARMS, "arms.")
    arms["ranks"] = int_list(arms["ranks"], "arms.ranks", 1)
    if not isinstance(arms["alpha_per_rank"], (int, float)) or isinstance(arms["alpha_per_rank"], bool) \
            or arms["alpha_per_rank"] <= 0:
        raise ConfigError("study config: arms.alpha_per_rank must be a positive number")
    seeds = int_list(raw.get("seeds", [0]), "seeds", 0)
    experiments = raw.get("experiments")
    if not isinstance(experiments, list) or not experiments:
        raise ConfigError("study config: experiments must be a non-empty list")
    exps = [_experiment(e, i) for i, e in enumerate(experiments)]
    if len({e["name"] for e in exps}) != len(exps):
        raise ConfigError("study config: two experiments share a name")
    ev, boot = merged(EVAL, as_mapping(raw.get("eval"), "eval")), merged(BOOT, as_mapping(raw.get("boot"), "boot"))
    check_keys(ev, EVAL, "eval.")
    for key in ("max_new_tokens", "choice_tokens", "answer_tokens", "batch_size"):
        positive_int(ev[key], f"eval.{key}")
    ev["lm_eval"] = _lm_eval(ev["lm_eval"])
    check_keys(boot, BOOT, "boot.")
    positive_int(boot["n_boot"], "boot.n_boot")
    if isinstance(boot["seed"], bool) or not isinstance(boot["seed"], int) or boot["seed"] < 0:
        raise ConfigError("study config: boot.seed must be an integer >= 0")
    analysis = _analysis(raw.get("analysis", {}))
    out = raw.get("output_dir")
    if not isinstance(out, str) or not out:
        raise ConfigError("study config: output_dir must name a directory (or pass --out)")
    cfg = {"study": raw["study"], "output_dir": out, "run": run, "full": full, "arms": arms, "seeds": seeds,
           "experiments": exps, "eval": ev, "boot": boot, "analysis": analysis}
    for arm in plan_arms(cfg):  # every arm's run config, checked now (with a stand-in data file)
        validate_config(arm_run_config(cfg, arm, 0, "train.jsonl", "out"))
    return cfg


def rows_file(directory, stem: str, rows: list) -> Path:
    """``rows`` as JSON lines in ``directory/<stem>-<their hash>.jsonl`` (written once): other rows are another
    file, so a finished run's training file is never rewritten, and its settings (the file's hash) tell it."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path = Path(directory) / f"{stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return path


def plan_arms(cfg: dict) -> list:
    """The arms of every experiment: LoRA at each rank, then full SFT (``name``, ``method``, ``rank``)."""
    arms = [{"name": f"lora-r{r}", "method": "lora", "rank": r} for r in cfg["arms"]["ranks"]]
    if cfg["arms"]["full"]:
        arms.append({"name": "full", "method": "full", "rank": None})
    return arms


def arm_run_config(cfg: dict, arm: dict, seed: int, train_file: str, output_dir: str) -> dict:
    """The ``rankwise train`` config of one arm of one seed."""
    run = merged(cfg["run"], cfg["full"]) if arm["method"] == "full" else copy.deepcopy(cfg["run"])
    run["method"] = arm["method"]
    run["output_dir"] = str(output_dir)
    run["data"] = merged(run.get("data") or {}, {"train": str(train_file), "format": "prompt_completion"})
    run["train"] = merged(run.get("train") or {}, {"seed": int(seed)})
    run["eval"] = merged(run.get("eval") or {}, {"every": 0, "generate": False})
    run.setdefault("log", {}).setdefault("progress", False)
    if arm["method"] == "lora":
        run["lora"] = merged(run.get("lora") or {}, {"r": arm["rank"],
                                                     "alpha": cfg["arms"]["alpha_per_rank"] * arm["rank"]})
    else:
        run.pop("lora", None)
        run.pop("quantization", None)
    return run


def read_spec(spec: dict, where: str) -> list:
    """The items of one task spec: its rows, those of its ``subjects`` only, the first ``limit`` (of
    EntityQuestions, whose files come relation by relation, a seeded sample of ``limit``)."""
    items = read_task(spec["task"], spec["data"], cop_base=spec["cop_base"], config=spec["config"],
                      split=spec["split"])
    if spec["subjects"] is not None:
        keep = set(spec["subjects"])
        items = [it for it in items if it["subject"] in keep]
        if not items:
            raise ConfigError(f"study config: {where}: no rows of the subjects {', '.join(spec['subjects'])}")
    if spec["task"] == "entity_questions" and spec["limit"] is not None:  # files come by relation: a seeded sample
        items = random.Random(f"entity_questions:{spec['data']}:{spec['split']}").sample(items, len(items))
    return items[:spec["limit"]]


def check_lm_eval_tasks(cfg: dict) -> None:
    """Every ``eval.lm_eval`` task is one lm-evaluation-harness knows (with ``include_path``'s own), before any
    work; ``ConfigError`` naming the first unknown one."""
    spec = cfg["eval"]["lm_eval"]
    if not spec:
        return
    from lm_eval.tasks import TaskManager  # optional dependency: lm-evaluation-harness

    known = set(TaskManager(include_path=spec["include_path"]).all_tasks)
    missing = [t for t in spec["tasks"] if t not in known]
    if missing:
        raise ConfigError(f"study config: eval.lm_eval.tasks: lm-evaluation-harness has no task {missing[0]!r}"
                          + (f" (nor has {spec['include_path']})" if spec["include_path"] else ""))


def load_sets(cfg: dict) -> dict:
    """Every experiment's items: ``{experiment: {"train": [...], "validation": [...], set: [...]}}``; the
    validation items are ``validation`` rows of the training set drawn with a fixed seed (never trained on)."""
    out = {}
    for e in cfg["experiments"]:
        t = e["train"]
        items = read_spec(t, f"{e['name']}.train")
        n_val = t["validation"]
        if n_val >= len(items):
            raise ConfigError(f"study config: experiment {e['name']}: validation ({n_val}) leaves no training rows "
                              f"of {len(items)}")
        held = set(random.Random(f"validation:{e['name']}").sample(range(len(items)), n_val))
        sets = {"train": [it for i, it in enumerate(items) if i not in held],
                "validation": [it for i, it in enumerate(items) if i in held]}
        for name, s in e["eval"].items():
            sets[name] = read_spec(s, f"{e['name']}.eval.{name}")
        out[e["name"]] = sets
    return out
