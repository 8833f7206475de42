"""``rankwise sweep``: a LoRA rank sweep against full (and masked) SFT, as in the rank trade-off study.

    rankwise sweep CONFIG.yaml --ranks 1,2,4,8,16,32,64,128 --full-sft [--masked 0.01,0.1] [--backend triton]
    rankwise sweep CONFIG.yaml --ranks 1,4,16,64 --together [--group-size G]
    rankwise sweep CONFIG.yaml --ranks 1,4 [--lrs 1e-4,3e-4] [--alphas 8,16] [--dropouts 0,0.1] [--together]

Every arm is the config with only ``method`` / ``lora.r`` (/ ``mask.fraction``,
and for LoRA arms ``train.lr`` / ``lora.alpha`` / ``lora.dropout``) changed, so
all arms share the seed and therefore the data order and the
evaluation sets. Arms run one after the other in ``OUT/arms/<arm>/`` (each a
``rankwise train`` run directory): a finished arm (``summary.json`` present) is
skipped, an interrupted one resumes from its checkpoint (safetensors and JSON;
an older rankwise's pickle ``checkpoint.pt`` is refused before anything runs,
never loaded), and an arm that fails
(out of memory, NaN loss, another runtime error) is recorded with its reason
while the sweep goes on.

Reusing an arm means it was trained with the settings it would get now. Before
anything is written, every existing arm's recorded settings (``settings.json``,
or for arms of older rankwise versions the settings of its resolved config) are
compared with the arm's new ones (:func:`rankwise.config.settings`: the keys
that change a result, data file contents included); a difference is refused,
naming the arms and keys, unless ``--rerun-changed``, which re-trains exactly
the changed arms and keeps the others. ``sweep.yaml`` is written after these
checks and records the config and each arm's settings hash.

With ``--together`` the LoRA arms train in one process and one pass per step
(``rankwise.together``: one base model, dense or NF4, loaded once; one data
pipeline; the arms' copies of each batch stacked along the batch dimension), in
groups of ``--group-size`` arms (default: the groups that fit the device's memory
by ``rankwise.arm_memory.estimate_peak_bytes``, logged; one arm too big even alone
is refused before anything is written), each arm ending exactly as its
solo run would, in the same ``OUT/arms/<arm>/``; reuse, ``--rerun-changed`` and
the tables work unchanged. A group checkpoints into ``OUT/together/<arms>/``
every ``train.save_every`` steps and resumes from it when the sweep runs again.
Full and masked SFT arms run after, on their own. An empty ``--ranks``, a config
with ``method: full`` and a rank above a targeted layer's dimensions are refused
before anything is written.

Under torchrun (``torchrun --nproc-per-node N rankwise sweep ...``) the jobs (each ``--together`` group, each
other arm) are spread over the processes, each trained in one process as here (not DDP), one GPU per process
(``LOCAL_RANK``'s): rank 0 alone checks and claims ``OUT``, takes its lock and writes ``sweep.yaml``; a
refusal is one line on every process; the jobs go greedily by estimated cost to the least loaded rank
(``rankwise.spread.assign``); rank 0 gathers every arm's summary and writes the same tables and plots.

``--lrs``, ``--alphas`` and ``--dropouts`` (each defaulting to the config's one
value) are crossed with the ranks: the LoRA arms are ranks x lrs x alphas x
dropouts. An arm is named ``lora_r{r}`` when only the rank varies, and otherwise
gets the varying values appended in that order, e.g. ``lora_r4_lr0.0003_a16_d0.1``
(numbers as Python's shortest round-tripping ``repr``, without a trailing ``.0``
or exponent padding: ``1e-5``, ``16``, ``0.1``). A one-value list varies nothing and
adds nothing to the names (its value is still the arms'). ``--alphas`` with
``--alpha-ratio``, an empty or malformed list, a non-positive lr, a negative alpha
or a dropout outside [0, 1) are refused in one line before anything is written.
The varying ones become columns ``lr`` / ``alpha`` / ``dropout`` of the tables, and
the plots draw one line against rank per combination of them.

The sweep directory is rankwise's (marker kind ``sweep``); one that rankwise
did not make, if not empty, needs ``--force``. It may not be, lie inside or
contain the model, tokenizer or data files.

Outputs in ``OUT`` (default: the config's ``output_dir``): ``sweep.csv``,
``sweep.md`` and the PNG plots ``sweep_in_domain.png`` (``data.eval``) and
``sweep_ood.png`` (``data.eval_ood``): loss and QA accuracy against rank, full
and masked SFT as horizontal reference lines.
"""
from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

from tqdm.auto import tqdm

from . import arm_memory
from . import config as C
from . import spread, train
from .arm_memory import plan_groups
from .atomic import atomic_write, atomic_write_text, remove_path
from .checkpoint import LEGACY_CHECKPOINT, refuse_legacy
from .errors import ConfigError
from .model import resolve_device
from .outputs import FAILED, failure_reason, release_memory, write_failed
from .ownership import MARKER, check_disjoint, check_links, check_output, claim
from .runlock import LOCK_FILE
from .together import check_ranks, train_group

log = logging.getLogger("rankwise")

COLUMNS = ["arm", "method", "rank", "fraction", "status", "reason", "steps", "train_loss", "eval_loss",
           "eval_accuracy", "eval_ood_loss", "eval_ood_accuracy", "trainable_params", "delta_norm", "runtime_s",
           "output_dir"]


# Hyperparameters a sweep may cross with the ranks: (column / name, config key, name prefix, sweep() argument).
HYPER = (("lr", "train.lr", "lr", "lrs"), ("alpha", "lora.alpha", "a", "alphas"),
         ("dropout", "lora.dropout", "d", "dropouts"))

TOGETHER_DIR = "together"  # OUT/together/<arm names>: the checkpoint of a group of arms trained together
# what a sweep writes in its directory (a link among them may not lead into an input: ownership.check_links)
SWEEP_ENTRIES = (MARKER, LOCK_FILE, "arms", TOGETHER_DIR, "sweep.yaml", "sweep.csv", "sweep.md", "sweep_in_domain.png",
                 "sweep_ood.png")

# The keys an arm sets on top of the sweep's config (recorded per arm in sweep.yaml).
ARM_KEYS = ("method", "lora.r", "lora.alpha", "lora.dropout", "train.lr", "mask.fraction", "quantization")


def number(v) -> str:
    """A compact, filesystem-safe text of ``v`` that ``float()`` reads back exactly: ``3e-4`` -> ``0.0003``,
    ``16.0`` -> ``16``, ``1e-05`` -> ``1e-5``."""
    s = repr(float(v))
    mant, _, exp = s.partition("e")
    if mant.endswith(".0"):
        mant = mant[:-2]
    return f"{mant}e{int(exp)}" if exp else mant


def arm_name(method: str, rank=None, fraction=None, **varying) -> str:
    """Directory name of an arm: ``lora_r8``, ``full_sft``, ``masked_0.1``; with ``varying``
    hyperparameters (``lr``, ``alpha``, ``dropout``) e.g. ``lora_r8_lr0.0003_a16_d0.1``."""
    if method == "lora":
        return f"lora_r{rank}" + "".join(f"_{prefix}{number(varying[col])}"
                                         for col, _, prefix, _ in HYPER if col in varying)
    if method == "full":
        return "full_sft"
    return f"masked_{fraction:g}"


def _hyper_lists(base: dict, alpha_ratio, given: dict) -> dict:
    """``{column: sorted distinct values}`` of the hyperparameters crossed with the ranks, checked (one-line
    ``ConfigError``s); a list not given is the config's one value."""
    if given.get("alphas") is not None and alpha_ratio is not None:
        raise ConfigError("--alphas and --alpha-ratio both set lora.alpha; give one of them")
    checks = {"lr": (lambda v: v > 0, "> 0"), "alpha": (lambda v: v >= 0, ">= 0"),
              "dropout": (lambda v: 0 <= v < 1, "in [0, 1)")}
    out = {}
    for col, key, _, arg in HYPER:
        values = given.get(arg)
        if values is None:
            section, name = key.split(".")
            out[col] = [base[section][name]]
            continue
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            values = [values]
        values = list(values)
        if not values:
            raise ConfigError(f"--{arg} is empty")
        try:
            if any(isinstance(v, bool) for v in values):
                raise TypeError
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ConfigError(f"--{arg} must be numbers, got {values!r}") from None
        ok, rule = checks[col]
        bad = [v for v in values if not (math.isfinite(v) and ok(v))]
        if bad:
            shown = ", ".join(number(v) if math.isfinite(v) else str(v) for v in bad)
            raise ConfigError(f"--{arg}: {col} must be {rule}, got {shown}")
        if len(set(values)) != len(values):
            raise ConfigError(f"--{arg} has repeated values: {', '.join(map(number, values))}")
        out[col] = sorted(values)
    return out


def _parse_list(text, kind, what):
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    try:
        values = [kind(s) for s in items]
    except ValueError:
        raise ConfigError(f"{what} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} is empty")
    return values


def arm_config(base: dict, method: str, rank, fraction, arm_dir: str, alpha_ratio=None, hyper=None) -> dict:
    """The train config of one arm: ``base`` with the arm's method, rank / mask fraction and directory
    (and for a LoRA arm the ``hyper`` values, ``{"lr", "alpha", "dropout"}``, that it sets)."""
    cfg = copy.deepcopy(base)
    cfg["method"], cfg["output_dir"] = method, arm_dir
    if method == "lora":
        cfg["lora"]["r"] = rank
        for col, key, _, _ in HYPER:
            if hyper and col in hyper:
                section, name = key.split(".")
                cfg[section][name] = hyper[col]
        if alpha_ratio is not None:
            cfg["lora"]["alpha"] = float(alpha_ratio) * rank
    elif method == "masked":
        cfg["mask"]["fraction"] = fraction
    if method != "lora" and cfg["quantization"] != "none":
        cfg["quantization"] = "none"  # SFT arms train the base weights, which cannot stay quantized
    return cfg


def recorded_settings(arm_dir: str):
    """The settings an existing arm was trained with, or None when it records none.

    ``settings.json`` (``{"hash", "settings"}``, written by ``rankwise train``), or
    for runs of older rankwise versions the settings of ``resolved_config.yaml`` /
    ``config.yaml`` (their data files are hashed as they are now).
    """
    path = os.path.join(arm_dir, train.SETTINGS)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                recorded = json.load(f)["settings"]
            if not isinstance(recorded, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is not a rankwise settings file (expected {{\"hash\", \"settings\"}}); "
                              "pass --rerun-changed to re-train this arm") from None
        return recorded
    for name in (train.RESOLVED_CONFIG, "config.yaml"):  # config.yaml: arms of older rankwise versions
        path = os.path.join(arm_dir, name)
        if os.path.isfile(path):
            try:
                return C.settings(C.parse(path))
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    return None


def _inputs(base: dict) -> list:
    data = base["data"]
    return [("model", base["model"]), ("tokenizer", base.get("tokenizer")), ("train data", data.get("train")),
            ("eval data", data.get("eval")), ("eval_ood data", data.get("eval_ood"))]


@dataclass(frozen=True)
class SweepArm:
    """One arm of a sweep: its name (also its directory, ``OUT/arms/<name>``), method, LoRA rank or mask
    fraction, its ``rankwise train`` config (a dict) and that config's ``config.settings``."""
    name: str
    method: str
    rank: Optional[int]
    fraction: Optional[float]
    config: dict
    settings: dict

    @property
    def output_dir(self) -> str:
        return self.config["output_dir"]


@dataclass
class Prepared:
    """A sweep checked and ready to claim its directory: its arms (``SweepArm``), the existing arms to train
    again (``changed``: name -> keys), and what ``sweep.yaml`` records."""
    base: dict
    ranks: list
    full_sft: bool
    fractions: list
    alpha_ratio: object
    hyper: dict
    varying: list
    together: bool
    group_size: object
    out_dir: str
    flag: str
    arms: list
    changed: dict
    budget: object = None


@dataclass
class Job:
    """What one process trains at a time: a group of ``--together`` arms (``checkpoint``: its
    ``OUT/together/<arms>/``), or one arm on its own; ``cost``: its estimated share of the work."""
    arms: list
    configs: list
    together: bool
    checkpoint: Optional[str] = None
    cost: float = 1.0


def sweep(config, ranks, full_sft: bool = False, masked=None, out_dir=None, overrides=None,
          alpha_ratio=None, backend=None, rerun_changed: bool = False, force: bool = False,
          together: bool = False, group_size=None, lrs=None, alphas=None, dropouts=None) -> list[dict]:
    """Run the arms of a rank sweep; returns one result row per arm (also written to ``sweep.csv``).

    Args:
        config: a config dict or YAML path (its ``method`` and ``lora.r`` are set per arm).
        ranks: LoRA ranks, e.g. ``[1, 2, 4]``.
        full_sft: add a full-SFT reference arm.
        masked: a mask fraction or a list of them: masked-SFT arms.
        out_dir: sweep directory (default: the config's ``output_dir``).
        overrides: dotted overrides applied to ``config`` first.
        alpha_ratio: when set, each LoRA arm uses ``alpha = alpha_ratio * r`` (e.g. 2);
            otherwise ``lora.alpha`` is the same for every rank.
        backend: ``train.backend`` of every arm (``auto``, ``triton``, ``torch``); None keeps the config's.
        rerun_changed: re-train the existing arms whose recorded settings differ from their
            settings now (otherwise such arms are refused with a ``ConfigError``).
        force: write into ``out_dir`` even if it is a non-empty directory rankwise did not make.
        together: train the LoRA arms in one process and one pass per step
            (``rankwise.together.train_together``: one base model, one data pipeline); each arm
            ends as its solo run would, in the same directory. Full and masked SFT arms still
            run on their own, after them. Needs a config with ``method: lora``.
        group_size: with ``together``, train at most this many LoRA arms at a time (None: the groups
            that fit the device's free memory, ``rankwise.arm_memory.plan_groups``; all when it is unknown).
        lrs, alphas, dropouts: ``train.lr`` / ``lora.alpha`` / ``lora.dropout`` values crossed with the
            ranks (None: the config's one value); when one has several values the arm names, the tables
            and the plots show it (``lora_r4_lr0.0003_a16_d0.1``). ``alphas`` excludes ``alpha_ratio``.

    Under torchrun (``WORLD_SIZE`` > 1) the jobs (groups, or single arms) are spread over the processes
    (``sweep_spread``); every process returns the same rows.
    """
    def prepare():
        return prepare_sweep(config, ranks, full_sft, masked, out_dir, overrides, alpha_ratio, backend,
                             rerun_changed, force, together, group_size, lrs, alphas, dropouts)

    me = spread.launch()
    if me.world > 1:
        return sweep_spread(me, prepare)
    p = prepare()
    claimed = claim(p.out_dir, "sweep", lock=True, flag=p.flag)  # held until the sweep ends: one sweep per directory
    try:
        write_sweep_yaml(p)
        return run_arms(p.arms, p.changed, p.together, p.group_size, p.out_dir, p.budget, p.base, p.varying)
    finally:
        claimed.release()


def check_arguments(base: dict, ranks: list, together: bool, group_size, fractions: list) -> None:
    """The sweep's arguments, checked before anything is read or written (one-line ``ConfigError``s)."""
    if any(r < 1 for r in ranks) or len(set(ranks)) != len(ranks):
        raise ConfigError(f"ranks must be distinct integers >= 1, got {ranks}")
    if together:
        if not ranks:
            raise ConfigError("--together: --ranks is empty; give the LoRA ranks to train together")
        if base["method"] != "lora":
            raise ConfigError(f"--together trains LoRA arms, but the config has method {base['method']!r}; "
                              "set method: lora (full and masked SFT arms come from --full-sft / --masked)")
        if group_size is not None and (isinstance(group_size, bool) or int(group_size) != group_size
                                       or group_size < 1):
            raise ConfigError(f"--group-size must be an integer >= 1, got {group_size!r}")
    elif group_size is not None:
        raise ConfigError("--group-size applies to --together sweeps only")
    for f in fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"masked fraction must be in (0, 1], got {f}")


def prepare_sweep(config, ranks, full_sft, masked, out_dir, overrides, alpha_ratio, backend, rerun_changed, force,
                  together, group_size, lrs, alphas, dropouts) -> Prepared:
    """Every check of ``sweep`` that comes before its directory is claimed: the arguments, the arms, the
    directories and links, the ranks the layers hold and the memory plan, and the settings of existing arms."""
    if backend is not None:
        overrides = {**(C.parse_overrides(overrides) if overrides and not isinstance(overrides, dict)
                        else dict(overrides or {})), "train.backend": backend}
    base = C.resolve(config, overrides)
    ranks = [int(r) for r in ranks]
    fractions = [] if masked is None else ([masked] if isinstance(masked, (int, float)) else list(masked))
    check_arguments(base, ranks, together, group_size, fractions)
    hyper = _hyper_lists(base, alpha_ratio, {"lrs": lrs, "alphas": alphas, "dropouts": dropouts})
    varying = [col for col, values in hyper.items() if len(values) > 1]
    flag = "--out" if out_dir else "output_dir"
    out_dir = out_dir or base["output_dir"]
    check_output(out_dir, force=force, inputs=_inputs(base), flag=flag, kinds=["sweep"])
    arms = []
    combos = [dict(zip(hyper, values)) for values in itertools.product(*hyper.values())]
    for method, rank, fraction, combo in [("lora", r, None, h) for r in sorted(ranks) for h in combos] \
            + ([("full", None, None, None)] if full_sft else []) + [("masked", None, f, None) for f in fractions]:
        name = arm_name(method, rank, fraction, **{c: combo[c] for c in varying} if combo else {})
        cfg = arm_config(base, method, rank, fraction, os.path.join(out_dir, "arms", name), alpha_ratio,
                         combo if lrs is not None or alphas is not None or dropouts is not None else None)
        arms.append(SweepArm(name, method, rank, fraction, cfg, C.settings(cfg)))
    check_links(out_dir, SWEEP_ENTRIES, _inputs(base), flag=flag)
    for arm in arms:  # no arm directory is a link, a file, or leads into an input
        check_output(arm.output_dir, force=True, inputs=_inputs(base), flag=f"the directory of arm {arm.name}")
    check_disjoint(os.path.join(out_dir, TOGETHER_DIR), _inputs(base), flag=f"the {TOGETHER_DIR}/ directory of {flag}")
    budget = memory_plan(arms, ranks) if together and group_size is None else None
    if together and group_size is not None:
        check_ranks(C.parse(arms[0].config), ranks)
    return Prepared(base, ranks, full_sft, fractions, alpha_ratio, hyper, varying, together, group_size, out_dir,
                    flag, arms, changed_arms(arms, out_dir, rerun_changed), budget)


def memory_plan(arms, ranks):
    """``--together`` without ``--group-size``: a rank the layers cannot hold, or an arm too big for memory, is
    refused before anything is written; the device's memory budget (None when unknown), its plan logged."""
    first = C.parse(arms[0].config)
    check_ranks(first, ranks)
    budget = arm_memory.memory_budget(resolve_device(first.train.device))  # through the module: tests replace it
    if budget is not None:
        plan = plan_groups(first, [arm.rank for arm in arms if arm.method == "lora"], budget)
        log.info("sweep: memory plan for %.2f GiB: %s", budget / 2**30,
                 " then ".join("ranks " + ",".join(map(str, g)) for g in plan))
    return budget


def changed_arms(arms, out_dir, rerun_changed: bool) -> dict:
    """An existing arm is reused only if it was trained with the settings it would get now: ``{name: keys}``
    of those that were not (refused, naming them, without ``rerun_changed``)."""
    changed = {}
    for arm in arms:
        name, arm_dir, now = arm.name, arm.output_dir, arm.settings
        try:
            old = recorded_settings(arm_dir) if os.path.isdir(arm_dir) else None
        except ConfigError:
            if not rerun_changed:
                raise
            changed[name] = ["(unreadable settings record)"]
            continue
        keys = C.changed_settings(old, now) if old is not None else []
        if keys:
            changed[name] = keys
        elif os.path.isfile(os.path.join(arm_dir, LEGACY_CHECKPOINT)) \
                and not os.path.exists(os.path.join(arm_dir, train.SUMMARY)):
            refuse_legacy(os.path.join(arm_dir, LEGACY_CHECKPOINT))  # a pickle is never loaded: refused up front
    if changed and not rerun_changed:
        listed = "; ".join(f"{name} ({', '.join(keys)})" for name, keys in changed.items())
        raise ConfigError(f"{out_dir} holds arms trained with other settings: {listed}; pass --rerun-changed "
                          "to re-train them (the other arms are kept), or choose another output directory")
    return changed


def write_sweep_yaml(p: Prepared) -> None:
    """``sweep.yaml``: the config, the sweep's arguments, and each arm's keys and settings hash."""
    C.dump_yaml({"config": p.base, "ranks": sorted(p.ranks), "full_sft": p.full_sft, "masked": p.fractions,
                 "alpha_ratio": p.alpha_ratio, **{arg: p.hyper[col] for col, _, _, arg in HYPER if col in p.varying},
                 "together": bool(p.together), "group_size": p.group_size,
                 "arms": {arm.name: {"method": arm.method, "rank": arm.rank, "fraction": arm.fraction,
                                     "settings_hash": C.settings_hash(arm.settings),
                                     "settings": {k: v for k, v in arm.settings.items() if k in ARM_KEYS}}
                          for arm in p.arms}},
                os.path.join(p.out_dir, "sweep.yaml"))


def arm_preparer(changed: dict):
    """``prepare_arm(name, arm_dir)``: an arm trained with other settings is removed (its directory is
    rankwise's), then the arm's directory is claimed for ``rankwise train``."""
    def prepare_arm(name, arm_dir):
        if name in changed:
            log.info("sweep: %s was trained with other %s; training it again", name, ", ".join(changed.pop(name)))
            remove_path(arm_dir)
        claim(arm_dir, "train")

    return prepare_arm


def run_arms(arms, changed: dict, together: bool, group_size, out_dir, budget, base, varying) -> list:
    """Train (or reuse) every arm in turn (the LoRA arms first in groups with ``together``); the result rows."""
    prepare_arm = arm_preparer(changed)
    grouped = train_groups(arms, group_size, prepare_arm, out_dir, budget) if together else {}
    return result_rows(arms, grouped, prepare_arm, out_dir, base, varying)


def result_rows(arms, trained: dict, prepare_arm, out_dir, base, varying) -> list:
    """Each arm's row from its summary (``trained``: the summaries of arms just trained; a finished arm's
    ``summary.json``; else the arm trains now), its ``failed.json`` written or removed; the tables and plots."""
    results = []
    bar = tqdm(arms, desc="sweep", disable=not base["log"]["progress"])
    for arm in bar:
        name, method, cfg, arm_dir = arm.name, arm.method, arm.config, arm.output_dir
        bar.set_postfix(arm=name)
        prepare_arm(name, arm_dir)
        row = {"arm": name, "method": method, "rank": arm.rank, "fraction": arm.fraction, "output_dir": arm_dir}
        if method == "lora":
            row.update({"lr": cfg["train"]["lr"], "alpha": cfg["lora"]["alpha"], "dropout": cfg["lora"]["dropout"]})
        summary_path = os.path.join(arm_dir, train.SUMMARY)
        if name in trained:
            summary = trained[name]
        elif os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
            log.info("sweep: %s already finished, skipped", name)
        else:
            summary = train_arm(cfg)
        if summary.get("status") == "failed":
            log.warning("sweep: arm %s failed: %s", name, summary.get("reason"))
            write_failed(arm_dir, summary.get("reason"))
        row.update({k: summary.get(k) for k in COLUMNS if k not in row})
        row["status"] = summary.get("status", "finished")
        if row["status"] == "finished" and os.path.lexists(os.path.join(arm_dir, FAILED)):
            os.unlink(os.path.join(arm_dir, FAILED))
        results.append(row)
        write_tables(results, out_dir, varying)  # partial results are visible while the sweep runs
    plot(results, out_dir, varying)
    write_tables(results, out_dir, varying)  # again, now linking the plots
    return results


def train_arm(cfg: dict) -> dict:
    """One arm trained on its own (resuming from its checkpoint when it has one); a failure (out of memory,
    a NaN loss, a CUDA error) is its summary ``{"status": "failed", "reason"}``."""
    try:
        return train.train(cfg, resume=True)
    except (RuntimeError, MemoryError) as e:
        release_memory()
        return {"status": "failed", "reason": failure_reason(e)}


def group_plan(arms, group_size, prepare_arm, budget=None) -> list:
    """``--together``: the LoRA arms (``SweepArm``) that need training (each claimed first), in groups of
    ``group_size``; without it, as ``rankwise.arm_memory.plan_groups`` makes them for ``budget`` bytes (the
    device's memory), or one group when ``budget`` is None. An arm with ``summary.json`` or a solo checkpoint
    is in none (reused, or resumed on its own)."""
    todo = []
    for arm in arms:
        if arm.method != "lora":
            continue
        prepare_arm(arm.name, arm.output_dir)
        held = [os.path.exists(os.path.join(arm.output_dir, n)) for n in (train.SUMMARY, train.CHECKPOINT)]
        if not any(held):
            todo.append(arm)
    if group_size:
        sizes = [group_size] * -(-len(todo) // group_size)
    elif budget is not None and todo:
        sizes = [len(g) for g in plan_groups(C.parse(todo[0].config), [arm.rank for arm in todo], budget)]
    else:
        sizes = [len(todo)] if todo else []
    starts = list(itertools.accumulate([0] + sizes))
    return [todo[a:b] for a, b in zip(starts, starts[1:])]


def train_groups(arms, group_size, prepare_arm, out_dir, budget=None) -> dict:
    """``--together``: train the LoRA arms that need training in groups (``group_plan``); ``{arm name: summary}``.

    An arm with ``summary.json`` is reused and one with a solo checkpoint (an
    interrupted sequential sweep) resumes on its own, as without ``--together``.
    A group that fails as a whole (out of memory, a CUDA error) records every
    arm of it as failed; an arm stopped by a non-finite loss fails alone. Each
    group checkpoints (every ``train.save_every`` steps) into
    ``OUT/together/<arm>+<arm>...``, and a sweep run again resumes it from there.
    """
    out = {}
    for group in group_plan(arms, group_size, prepare_arm, budget):
        names = [arm.name for arm in group]
        summaries = train_group(names, [arm.config for arm in group],
                                os.path.join(out_dir, TOGETHER_DIR, "+".join(names)))
        out.update(zip(names, summaries))
    return out


# ----------------------------------------------------------------------------- under torchrun

SFT_COST = 2.0  # an SFT arm's estimated work against a LoRA arm's: weight gradients and AdamW over every weight


def plan_jobs(p: Prepared) -> list:
    """Rank 0's plan of a spread sweep: every arm claimed (and a changed one removed), then the jobs: the
    ``--together`` groups (``group_plan``), then each other arm without ``summary.json`` on its own."""
    prepare_arm = arm_preparer(p.changed)
    groups = group_plan(p.arms, p.group_size, prepare_arm, p.budget) if p.together else []
    jobs = []
    for group in groups:
        names = [arm.name for arm in group]
        jobs.append(Job(names, [arm.config for arm in group], True,
                        os.path.join(p.out_dir, TOGETHER_DIR, "+".join(names)), float(len(names))))
    grouped = {name for job in jobs for name in job.arms}
    for arm in p.arms:
        if arm.name in grouped:
            continue
        prepare_arm(arm.name, arm.output_dir)
        if not os.path.exists(os.path.join(arm.output_dir, train.SUMMARY)):
            jobs.append(Job([arm.name], [arm.config], False, None, 1.0 if arm.method == "lora" else SFT_COST))
    return jobs


def run_jobs(jobs: list, owners: list, rank: int) -> dict:
    """This rank's jobs, each trained as one process; ``{arm name: summary}``."""
    done = {}
    for job, owner in zip(jobs, owners):
        if owner != rank:
            continue
        with spread.one_process():
            summaries = train_group(job.arms, job.configs, job.checkpoint) if job.together \
                else [train_arm(job.configs[0])]
        done.update(zip(job.arms, summaries))
        release_memory()
    return done


def sweep_spread(me: spread.Launch, prepare) -> list:
    """The sweep under torchrun: rank 0 alone checks and claims ``OUT`` (its lock), writes ``sweep.yaml``,
    claims the arms and plans the jobs (``plan_jobs``), which every rank learns (or rank 0's refusal, raised on
    every rank); each rank trains its share (``spread.assign``) as one process; rank 0 gathers every arm's
    summary and writes the tables and plots as one process would; every rank returns the rows."""
    spread.start(me)
    held = {}  # rank 0's: the claim of OUT, the checked sweep

    def plan():
        held["sweep"] = p = prepare()
        held["claim"] = claim(p.out_dir, "sweep", lock=True, flag=p.flag)
        write_sweep_yaml(p)
        return plan_jobs(p)

    try:
        jobs = [Job(**j) for j in spread.on_master(me, plan)]
        owners = spread.assign([job.cost for job in jobs], me.world)
        log.info("sweep: rank %d of %d trains %s", me.rank, me.world,
                 "; ".join("+".join(j.arms) for j, o in zip(jobs, owners) if o == me.rank) or "nothing")
        trained = {}
        for done in spread.everywhere(me, lambda: run_jobs(jobs, owners, me.rank)):
            trained.update(done)

        def tables():
            p = held["sweep"]
            return result_rows(p.arms, trained, arm_preparer(p.changed), p.out_dir, p.base, p.varying)

        rows = spread.on_master(me, tables)
    except BaseException:
        spread.stop_at_exit(me)  # every rank raises, prints its line, then waits for the others to exit
        raise
    finally:
        if "claim" in held:
            held["claim"].release()
    spread.stop(me)
    return rows


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def columns(varying=()) -> list:
    """The table columns: ``COLUMNS`` with the ``varying`` hyperparameters (``lr``, ``alpha``, ``dropout``)
    after ``rank``."""
    i = COLUMNS.index("rank") + 1
    return COLUMNS[:i] + [col for col, _, _, _ in HYPER if col in varying] + COLUMNS[i:]


def write_tables(results, out_dir, varying=()) -> None:
    """Write ``sweep.csv`` (every column) and ``sweep.md`` (a readable table) atomically; ``varying``: the
    hyperparameters crossed with the ranks that have several values (each a column after ``rank``)."""
    cols = columns(varying)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in results:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_write_text(os.path.join(out_dir, "sweep.csv"), buf.getvalue())
    shown = [c for c in cols if c not in ("output_dir", "reason")
             and any(r.get(c) is not None for r in results)]
    lines = ["# Rank sweep", "", "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    for r in results:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in shown) + " |")
    failed = [r for r in results if r.get("status") == "failed"]
    if failed:
        lines += ["", "## Failed arms", ""] + [f"- {r['arm']}: {r.get('reason')}" for r in failed]
    plots = [(f, t) for f, t in (("sweep_in_domain.png", "in-domain"), ("sweep_ood.png", "out-of-domain"))
             if os.path.exists(os.path.join(out_dir, f))]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{t}]({f})" for f, t in plots]
    atomic_write_text(os.path.join(out_dir, "sweep.md"), "\n".join(lines) + "\n")


def plot(results, out_dir, varying=()) -> list[str]:
    """PNG plots of the in-domain and out-of-domain metrics against rank; returns the paths written.

    With ``varying`` hyperparameters (``lr``, ``alpha``, ``dropout``) each combination of them is its own
    line against rank, labelled with its values."""
    from matplotlib.figure import Figure  # heavy to import: only when plotting

    written = []
    ok = [r for r in results if r.get("status") == "finished"]
    lora = sorted((r for r in ok if r["method"] == "lora"), key=lambda r: r["rank"])
    refs = [r for r in ok if r["method"] != "lora"]
    for prefix, fname, title in (("eval", "sweep_in_domain.png", "in-domain (data.eval)"),
                                 ("eval_ood", "sweep_ood.png", "out-of-domain (data.eval_ood)")):
        metrics = [m for m in (f"{prefix}_loss", f"{prefix}_accuracy") if any(r.get(m) is not None for r in ok)]
        if prefix == "eval" and not metrics:
            metrics = ["train_loss"] if any(r.get("train_loss") is not None for r in ok) else []
            title = "training loss (no data.eval)"
        if not metrics:
            continue
        fig = Figure(figsize=(5.2 * len(metrics), 4.0), layout="constrained")
        for i, metric in enumerate(metrics):
            ax = fig.add_subplot(1, len(metrics), i + 1)
            lines = {}
            for r in lora:
                if r.get(metric) is not None:
                    lines.setdefault(tuple(r.get(c) for c in varying), []).append((r["rank"], r[metric]))
            for combo, pts in lines.items():
                label = "LoRA" + "".join(f" {c}={number(v)}" for c, v in zip(varying, combo) if v is not None)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            ticks = sorted({p[0] for pts in lines.values() for p in pts})
            if ticks:
                ax.set_xscale("log", base=2)
                ax.set_xticks(ticks, [str(t) for t in ticks])
            for j, r in enumerate(refs):
                if r.get(metric) is None:
                    continue
                label = "full SFT" if r["method"] == "full" else f"masked SFT ({r['fraction']:g})"
                ax.axhline(r[metric], linestyle="--" if r["method"] == "full" else ":",
                           color=f"C{j + max(len(lines), 1)}", label=label)
            ax.set_xlabel("LoRA rank")
            ax.set_ylabel(metric)
            ax.grid(True, alpha=0.3)
            ax.legend()
        fig.suptitle(f"rank sweep: {title}")
        path = os.path.join(out_dir, fname)
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))  # a link there is replaced
        written.append(path)
    return written


def add_arguments(parser) -> None:
    """Arguments of ``rankwise sweep``."""
    parser.add_argument("config", help="YAML config file (method and lora.r are set per arm)")
    parser.add_argument("--ranks", required=True, help="comma-separated LoRA ranks, e.g. 1,2,4,8")
    parser.add_argument("--full-sft", action="store_true", help="add a full-SFT reference arm")
    parser.add_argument("--masked", default=None, metavar="FRACTION[,FRACTION...]",
                        help="add masked-SFT arms with these mask fractions")
    parser.add_argument("--alpha-ratio", type=float, default=None,
                        help="use alpha = ratio * r for every LoRA arm (default: the config's lora.alpha)")
    parser.add_argument("--lrs", default=None, metavar="LR[,LR...]",
                        help="learning rates crossed with the ranks (default: the config's train.lr)")
    parser.add_argument("--alphas", default=None, metavar="ALPHA[,ALPHA...]",
                        help="LoRA alphas crossed with the ranks (default: the config's lora.alpha; "
                             "not with --alpha-ratio)")
    parser.add_argument("--dropouts", default=None, metavar="P[,P...]",
                        help="LoRA dropouts crossed with the ranks (default: the config's lora.dropout)")
    parser.add_argument("--out", default=None, help="sweep directory (default: the config's output_dir)")
    parser.add_argument("--backend", default=None, choices=list(C.BACKENDS),
                        help="kernels of every arm: auto (Triton on CUDA, torch elsewhere), triton (on a CPU: "
                             "TRITON_INTERPRET=1), torch (default: the config's train.backend)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every arm; repeatable")
    parser.add_argument("--rerun-changed", action="store_true",
                        help="re-train the existing arms whose settings differ from their settings now "
                             "(default: refuse, naming the arms and keys); the other arms are kept")
    parser.add_argument("--together", action="store_true",
                        help="train the LoRA arms together: one base model and one data pass for all ranks "
                             "(each arm's result is its solo run's); full/masked arms run after, on their own")
    parser.add_argument("--group-size", type=int, default=None, metavar="G",
                        help="with --together: at most G LoRA arms at a time (default: the groups that fit "
                             "the device's memory, by an estimate of the peak; logged)")
    parser.add_argument("--force", action="store_true",
                        help="write into the sweep directory even if it is a non-empty directory rankwise did not make")


def main(args) -> int:
    """Entry point of ``rankwise sweep``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ranks = _parse_list(args.ranks, int, "--ranks")
    masked = _parse_list(args.masked, float, "--masked") if args.masked else None
    hyper = {arg: _parse_list(getattr(args, arg), float, f"--{arg}")
             for arg in ("lrs", "alphas", "dropouts") if getattr(args, arg) is not None}
    results = sweep(args.config, ranks, full_sft=args.full_sft, masked=masked, out_dir=args.out,
                    overrides=args.overrides, alpha_ratio=args.alpha_ratio, backend=args.backend,
                    rerun_changed=args.rerun_changed, force=args.force, together=args.together,
                    group_size=args.group_size, **hyper)
    out = args.out or C.parse(args.config, args.overrides).output_dir
    if spread.launch().master:  # under torchrun every rank returns the rows; rank 0 prints the table
        print(open(os.path.join(out, "sweep.md")).read(), end="")
    failed = [r for r in results if r["status"] == "failed"]
    return 1 if failed and len(failed) == len(results) else 0
