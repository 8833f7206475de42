"""Reading run directories and analysing them against their base model.

A run directory (written by ``rankwise train``) holds ``resolved_config.yaml``
(``config.yaml`` in runs of older rankwise versions) and either
``adapter/`` (PEFT format, read with :func:`rankwise.merge.checked_lora_pairs`) or
``model/`` (``save_pretrained`` output of full or masked SFT, read tensor by
tensor with :class:`rankwise.model.SafetensorsCheckpoint`). The spectral pass
holds one base matrix and one update at a time, in fp32 on the analysis device.
"""
from __future__ import annotations

import math
import os
import re
import time
from typing import Callable, Iterable, Mapping, Sequence

import torch
import yaml
from tqdm.auto import tqdm

from ..adapter import lora_delta, merge_adapter, scaling_of
from ..config import safe_load_text
from ..data import load_rows
from ..errors import ConfigError
from ..merge import checked_lora_pairs
from ..model import DTYPES, SafetensorsCheckpoint, load_model, load_tokenizer, resolve_device, resolve_dtype
from ..ownership import check_output, claim
from ..restore import check_pattern
from . import render, spectral
from .probe import compare_on_probe
from .restoration import DEFAULT_FRACTIONS, SELECTIONS, restoration_curve

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+?)(?:\.weight)?$")
# The analysis CLI's dtype spellings of rankwise.model's dtype names.
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def resolve_model_dir(model: str) -> str:
    """A local directory for ``model`` (a path, or a name already in the Hugging Face cache)."""
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download  # heavy at import (its download machinery)

        return snapshot_download(model, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not available offline"
        raise ConfigError(f"base model {model!r} is neither a directory nor in the local cache ({e})") from None


# --------------------------------------------------------------------------- runs
RUN_CONFIGS = ("resolved_config.yaml", "config.yaml")  # config.yaml: runs of older rankwise versions


def read_run_config(path: str) -> dict:
    """The resolved config of a run directory (``resolved_config.yaml``, else ``config.yaml``), or ``{}``."""
    for name in RUN_CONFIGS:
        cfg_path = os.path.join(path, name)
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path, encoding="utf-8") as f:
                    cfg = safe_load_text(f.read(), cfg_path) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
                raise ConfigError(f"{cfg_path}: not a readable YAML file ({str(e).splitlines()[0]})") from None
            if not isinstance(cfg, dict):
                raise ConfigError(f"{cfg_path}: expected a mapping at the top level")
            return cfg
    return {}


def _split_name(name: str):
    m = _LAYER_RE.search(name)
    if not m:
        return None, name[:-7] if name.endswith(".weight") else name
    return int(m.group(1)), m.group(2)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class Run:
    """One run directory: its method, LoRA settings and a streaming source of its updates."""

    def __init__(self, path: str, *, include: str = r"layers", exclude: str = r"norm"):
        if not os.path.isdir(path):
            raise ConfigError(f"run directory {path!r} does not exist")
        self.path = os.path.abspath(path)
        self.name = os.path.basename(os.path.normpath(path))
        cfg = read_run_config(path)
        adapter_dir = os.path.join(path, "adapter")
        model_dir = os.path.join(path, "model")
        self.config = cfg
        self.rank = None
        self.alpha = None
        self.rslora = False
        self.model_dir = None
        self.adapter_dir = None
        if os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
            self.kind = "adapter"
            self.method = str(cfg.get("method", "lora"))
            self.adapter_dir = adapter_dir
            acfg, self._pairs = checked_lora_pairs(adapter_dir)  # a corrupt file is one line naming it
            self.rank = int(acfg["r"])
            self.alpha = float(acfg["lora_alpha"])
            self.rslora = bool(acfg.get("use_rslora", False))
            self.scaling = scaling_of(acfg)
            if not self._pairs:
                raise ConfigError(f"{adapter_dir}: no lora_A/lora_B weight pairs found")
            self.matrices = sorted((mod + ".weight" for mod in self._pairs), key=_natural_key)
        elif os.path.isdir(model_dir):
            self.kind = "model"
            self.method = str(cfg.get("method", "full"))
            self.model_dir = model_dir
            try:
                self.weights = SafetensorsCheckpoint(model_dir)
            except FileNotFoundError as e:
                raise ConfigError(str(e)) from None
            inc, exc = check_pattern("--include", include), check_pattern("--exclude", exclude)
            self.matrices = sorted(
                (k for k in self.weights.keys()
                 if (inc is None or inc.search(k)) and not (exc and exc.search(k))
                 and len(self.weights.shape(k)) == 2),
                key=_natural_key,
            )
        else:
            raise ConfigError(f"{path!r} has neither adapter/adapter_config.json nor model/")

    @property
    def label(self) -> str:
        return f"r={self.rank}" if self.kind == "adapter" else self.method

    def lora_A(self, name: str, device=None) -> torch.Tensor:
        """The ``A`` matrix ``(r, in)`` of the module whose weight is ``name``, in fp32."""
        return self._pairs[name[: -len(".weight")]][0].to(device).float()

    def delta(self, name: str, base: SafetensorsCheckpoint, device, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW of matrix ``name`` in fp32 on ``device`` (``base_weight``: the base matrix, if already loaded)."""
        if self.kind == "adapter":
            A, B = self._pairs[name[: -len(".weight")]]
            try:
                return lora_delta(A.to(device), B.to(device), self.scaling)
            except ValueError as e:
                raise ConfigError(f"{self.path}: {name}: {e}") from None
        tuned = self.weights.get(name, device).float()
        W = base_weight if base_weight is not None else base.get(name, device)
        if W.shape != tuned.shape:
            raise ConfigError(f"{self.path}: {name} has shape {tuple(tuned.shape)}, the base {tuple(W.shape)}")
        return tuned.sub_(W.to(device=tuned.device, dtype=torch.float32))

    def to_dict(self) -> dict:
        d = {"name": self.name, "path": self.path, "method": self.method, "kind": self.kind, "label": self.label}
        if self.kind == "adapter":
            d.update(rank=self.rank, alpha=self.alpha, rslora=self.rslora)
        return d


def sort_runs(runs: Sequence[Run]) -> list:
    """LoRA runs by rank, then full and masked SFT runs by name."""
    return sorted(runs, key=lambda r: (r.kind != "adapter", r.rank or 0, r.method, r.name))


# --------------------------------------------------------------------------- spectral pass
def _pow2_grid(r: int) -> list:
    out, v = [], 1
    while v < r:
        out.append(v)
        v *= 2
    return out + [r]


def spectral_analysis(runs: Sequence[Run], base: SafetensorsCheckpoint, *, device=None,
                      intruders: bool = True, intruder_k: int = 10, intruder_eps: float = 0.5,
                      top_k: Sequence[int] = (1, 4, 16), keep: int = 64, progress: bool = True) -> dict:
    """Spectral statistics of every run's updates, one matrix at a time.

    The loop runs over matrices outside and runs inside, so the SVD of each base
    matrix (needed for intruder dimensions) is computed once for all runs.

    Returns:
        ``{run_name: {aggregates..., "by_layer", "by_module", "matrices": [records]}}``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    names = sorted({n for r in runs for n in r.matrices}, key=_natural_key)
    for r in runs:
        missing = [n for n in r.matrices if n not in base]
        if missing:
            raise ConfigError(f"run {r.name!r} updates {missing[0]!r}, which the base model does not have")
    records = {r.name: [] for r in runs}
    member = {r.name: set(r.matrices) for r in runs}
    it: Iterable = names
    if progress:
        it = tqdm(names, desc="spectra", leave=False)
    for name in it:
        users = [r for r in runs if name in member[r.name]]
        if not users:
            continue
        W = base.get(name, device).float() if intruders else None
        Ub = spectral._svd(W)[0] if intruders else None
        layer, module = _split_name(name)
        for r in users:
            delta = r.delta(name, base, device, base_weight=W)
            if W is not None and delta.shape != W.shape:
                raise ConfigError(f"run {r.name!r}: ΔW of {name} has shape {tuple(delta.shape)}, base {tuple(W.shape)}")
            rec = {"name": name, "layer": layer, "module": module}
            rec.update(spectral.spectrum_summary(delta, top_k=top_k, keep=keep))
            if intruders:
                k = min(intruder_k, min(W.shape))
                Ut = spectral._svd(W + delta)[0][:, :k]
                sims = spectral._max_abs_cos(Ut, Ub)
                rec["intruders"] = int((sims < intruder_eps).sum())
                rec["top_sv_similarity"] = [float(v) for v in (Ub[:, :k] * Ut).sum(0).abs().cpu()]
                del Ut
            records[r.name].append(rec)
            del delta
        del W, Ub
    return {r.name: _aggregate(records[r.name], keep) for r in runs}


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _aggregate(recs: list, keep: int) -> dict:
    out = {
        "n_matrices": len(recs),
        "update_norm": math.sqrt(sum(r["fro_norm"] ** 2 for r in recs)),
        "mean_fro_norm": _mean([r["fro_norm"] for r in recs]),
        "mean_effective_rank": _mean([r["effective_rank"] for r in recs]),
        "mean_stable_rank": _mean([r["stable_rank"] for r in recs]),
    }
    if recs:
        out["mean_energy_top"] = {k: _mean([r["energy_top"][k] for r in recs]) for k in recs[0]["energy_top"]}
    if recs and "intruders" in recs[0]:
        out["intruders_total"] = int(sum(r["intruders"] for r in recs))
        out["intruders_per_matrix"] = _mean([r["intruders"] for r in recs])
        out["mean_top_sv_similarity"] = _mean([_mean(r["top_sv_similarity"]) for r in recs])
    # Mean normalised spectrum σ_i / σ_1 over matrices (zero updates left out).
    spec = [0.0] * keep
    cnt = [0] * keep
    for r in recs:
        sv = r["singular_values"]
        if sv and sv[0] > 0:
            for i, v in enumerate(sv):
                spec[i] += v / sv[0]
                cnt[i] += 1
    out["mean_normalized_spectrum"] = [s / c for s, c in zip(spec, cnt) if c]

    def group(key):
        g: dict = {}
        for r in recs:
            g.setdefault(r[key], []).append(r)
        res = {}
        for k, rs in g.items():
            e = {"fro_norm": math.sqrt(sum(x["fro_norm"] ** 2 for x in rs)),
                 "effective_rank": _mean([x["effective_rank"] for x in rs]),
                 "stable_rank": _mean([x["stable_rank"] for x in rs])}
            if "intruders" in rs[0]:
                e["intruders"] = int(sum(x["intruders"] for x in rs))
            res[str(k)] = e
        return res

    out["by_layer"] = group("layer")
    out["by_module"] = group("module")
    out["matrices"] = recs
    return out


def subspace_similarities(runs: Sequence[Run], device=None) -> list:
    """φ(A_a, A_b, i, j) between every pair of LoRA runs, averaged over their common modules."""
    lora = [r for r in runs if r.kind == "adapter"]
    out = []
    for ai in range(len(lora)):
        for bi in range(ai + 1, len(lora)):
            a, b = lora[ai], lora[bi]
            bset = set(b.matrices)
            common = [n for n in a.matrices if n in bset]
            if not common:
                continue
            grid = None
            iis = jjs = None
            used = 0
            for name in common:
                A1, A2 = a.lora_A(name, device), b.lora_A(name, device)
                if A1.shape[1] != A2.shape[1]:
                    continue
                ri, rj = min(A1.shape), min(A2.shape)
                if iis is None:
                    iis, jjs = _pow2_grid(ri), _pow2_grid(rj)
                if iis[-1] > ri or jjs[-1] > rj:
                    continue
                g = spectral.subspace_similarity_grid(A1, A2, iis, jjs)
                grid = g if grid is None else [[x + y for x, y in zip(r1, r2)] for r1, r2 in zip(grid, g)]
                used += 1
            if used:
                out.append({"a": a.name, "b": b.name, "rank_a": a.rank, "rank_b": b.rank, "i": iis, "j": jjs,
                            "n_modules": used, "phi": [[v / used for v in row] for row in grid]})
    return out


# --------------------------------------------------------------------------- models
def dtype_name(dtype) -> str:
    """``dtype`` (``None``, a ``torch.dtype``, or a name) as one of :data:`rankwise.model.DTYPES`' names or ``auto``."""
    if dtype is None:
        return "auto"
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise ConfigError(f"dtype must be one of {', '.join(map(str, names))}, got {dtype}")
        return names[dtype]
    return _DTYPE_ALIASES.get(dtype, dtype)


def load_base_model(base_dir: str, device, dtype: str = "auto"):
    """The base model in eval mode (:func:`rankwise.model.load_model`, SDPA attention)."""
    return load_model(base_dir, dtype=dtype_name(dtype), attention="sdpa", device=device).eval()


def load_tuned_model(run: Run, base_dir: str, device, dtype: str = "auto"):
    """The fine-tuned model of ``run``: ``model/`` as saved, or the base with the adapter merged
    (:func:`rankwise.adapter.merge_adapter`: ``scaling * B @ A`` added in fp32, rounded once)."""
    if run.kind == "model":
        return load_model(run.model_dir, dtype=dtype_name(dtype), attention="sdpa", device=device).eval()
    return merge_adapter(load_base_model(base_dir, device, dtype), run.adapter_dir)


def load_jsonl(path: str) -> list:
    """Rows of a probe / eval file (jsonl, json, csv or parquet, read by :func:`rankwise.data.load_rows`);
    a bad file or row is a :class:`~rankwise.errors.ConfigError` naming it."""
    try:
        rows = load_rows(str(path), name="probe")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


# --------------------------------------------------------------------------- everything
def _checked_arguments(run_dirs, out_dir, device, dtype):
    """``analyze_runs``' run directories, device and dtype name, checked before any work.

    Returns:
        ``(run_dirs, device, dtype)``.
    """
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    run_dirs = [os.fspath(p) for p in run_dirs]
    if not run_dirs:
        raise ConfigError("run_dirs must name at least one run directory")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    try:
        device = resolve_device("auto") if device is None else torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device must name a torch device (cpu, cuda, cuda:1), got {device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} was asked for, but CUDA is not available")
    dtype = dtype_name(dtype)
    try:
        resolve_dtype(dtype, device)  # checked before the long spectral pass
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return run_dirs, device, dtype


def _read_runs(run_dirs: Sequence[str], base: str | None, include: str, exclude: str):
    """The runs (sorted, with unique names), the base model's name and its local directory: ``(runs, base, base_dir)``.

    ``base=None`` takes the ``model`` that the runs' resolved configs name (they must agree).
    """
    runs = sort_runs([Run(p, include=include, exclude=exclude) for p in run_dirs])
    seen: dict = {}
    for r in runs:  # unique names for the JSON and the plots
        if r.name in seen:
            seen[r.name] += 1
            r.name = f"{r.name}#{seen[r.name]}"
        else:
            seen[r.name] = 0
    if base is None:  # fall back to the runs' own resolved config's "model"
        models = {str(r.config.get("model")) for r in runs if r.config.get("model")}
        if len(models) != 1:
            raise ConfigError("base must be given: the runs' config files name "
                             + (f"different models {sorted(models)}" if models else "no model"))
        base = models.pop()
    return runs, base, resolve_model_dir(base)


def _claim_output(out_dir: str, run_dirs: Sequence[str], base_dir: str, force: bool) -> None:
    """Claim ``out_dir`` for the analysis (marker kind ``analyze``), before any work.

    The output may not be, lie inside or contain a run or the base model; an existing non-empty
    directory rankwise did not make needs ``force``.
    """
    check_output(out_dir, force=force, flag="--out", kinds=["analyze"],
                 inputs=[("run", p) for p in run_dirs] + [("base model", base_dir)])
    claim(out_dir, "analyze")


def _open_base(base: str, base_dir: str) -> SafetensorsCheckpoint:
    """The base model's weights, read tensor by tensor from ``base_dir``."""
    try:
        return SafetensorsCheckpoint(base_dir)
    except FileNotFoundError as e:
        raise ConfigError(f"base model {base}: {e}") from None


def _model_passes(runs: Sequence[Run], base_dir: str, device, dtype: str, probe_rows: list,
                  restore_sets: Mapping[str, Sequence[dict]] | None, timings: dict, *,
                  probe_kw: dict, restore_kw: dict):
    """Probe comparisons and restoration curves, loading the base and one tuned model at a time.

    Every run gets :func:`compare_on_probe` (with ``probe_kw``, when there are probe rows and an
    analysis asked for); every full/masked run gets :func:`restoration_curve` (with ``restore_kw``,
    when there are eval sets). Their durations go into ``timings``.

    Returns:
        ``(probe, restoration, notes)``: ``{run_name: result}`` twice, and notes for the report.
    """
    want_probe = bool(probe_rows) and (probe_kw["attention"] or probe_kw["representations"] or probe_kw["tokens"])
    want_restore = bool(restore_sets) and any(r.kind == "model" for r in runs)
    probe: dict = {}
    restoration: dict = {}
    notes: list = []
    if bool(restore_sets) and not want_restore:
        notes.append("restoration curves asked for, but no full/masked SFT run was given")
    if not (want_probe or want_restore):
        return probe, restoration, notes
    tokenizer = load_tokenizer(base_dir)
    base_model = load_base_model(base_dir, device, dtype)
    for r in runs:
        needs_restore = want_restore and r.kind == "model"
        if not (want_probe or needs_restore):
            continue
        tuned = load_tuned_model(r, base_dir, device, dtype)
        if want_probe:
            t = time.time()
            probe[r.name] = compare_on_probe(base_model, tuned, tokenizer, probe_rows, **probe_kw)
            timings[f"probe_{r.name}_s"] = time.time() - t
        if needs_restore:
            t = time.time()
            restoration[r.name] = restoration_curve(base_model, tuned, tokenizer, restore_sets, **restore_kw)
            timings[f"restoration_{r.name}_s"] = time.time() - t
        del tuned
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del base_model
    return probe, restoration, notes


def _analysis_dict(base: str, device, settings: dict, runs: Sequence[Run], spec: dict, probe: dict,
                   restoration: dict, subspace: list, notes: list) -> dict:
    """The analysis dict (as written to ``analysis.json``, before its timings and files)."""
    return {
        "version": 1,
        "base": base,
        "device": str(device),
        "settings": settings,
        "runs": [
            {**r.to_dict(), "spectral": spec[r.name], "probe": probe.get(r.name),
             "restoration": restoration.get(r.name)}
            for r in runs
        ],
        "subspace_similarity": subspace,
        "notes": notes,
    }
def analyze_runs(
    run_dirs: Sequence[str],
    base: str | None,
    probe_rows: Sequence[dict] | str | None,
    out_dir: str,
    *,
    device=None,
    dtype=None,
    intruders: bool = True,
    intruder_k: int = 10,
    intruder_eps: float = 0.5,
    top_k: Sequence[int] = (1, 4, 16),
    keep: int = 64,
    include: str = r"layers",
    exclude: str = r"norm",
    attention: bool = True,
    representations: bool = True,
    tokens: bool = True,
    kl_k: int = 10,
    batch_size: int = 8,
    max_length: int = 256,
    max_tokens: int = 2048,
    restore_sets: Mapping[str, Sequence[dict]] | None = None,
    restore_fractions: Sequence[float] = DEFAULT_FRACTIONS,
    restore_selections: Sequence[str] = SELECTIONS,
    accuracy_fn: Callable | None = None,
    restore_fn: Callable | None = None,
    seed: int = 0,
    plots: bool = True,
    progress: bool = True,
    force: bool = False,
) -> dict:
    """Analyse fine-tuning runs against their base model and write the results to ``out_dir``.

    Args:
        run_dirs: run directories (``adapter/`` for LoRA, ``model/`` for full or masked SFT).
        base: the base model (a directory, or a name in the local Hugging Face cache);
            ``None`` takes the ``model`` named by the runs' resolved configs (they must agree).
        probe_rows: probe rows (``prompt``, optional ``bucket``), or the path of a jsonl file of
            them, for the attention, representation and token-level analyses; ``None`` or
            empty skips them.
        out_dir: where ``analysis.json``, the PNG plots and ``analysis.md`` go; rankwise's
            (marker kind ``analyze``). It may not be, lie inside or contain a run or the base
            model; an existing non-empty directory rankwise did not make needs ``force``.
        device: analysis device (default: CUDA if available, else CPU). SVDs run there in fp32.
        dtype: model dtype for the probe pass: ``auto`` (as :func:`rankwise.model.resolve_dtype`:
            bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on the CPU), ``bf16``,
            ``fp16``, ``fp32`` (or ``bfloat16``, ``float16``, ``float32``, or a ``torch.dtype``).
        intruders, intruder_k, intruder_eps: intruder-dimension settings (needs an SVD
            of every base and tuned matrix).
        top_k, keep: energy shares to report, and how many singular values to keep per matrix.
        include, exclude: regexes choosing the matrices of full/masked runs (and of restoration).
        attention, representations, tokens: which probe analyses to run.
        restore_sets: ``{name: rows}`` eval sets; when given, every full/masked run gets
            a restoration curve (see :func:`rankwise.analysis.restoration_curve`).
        accuracy_fn, restore_fn: overrides for ``rankwise.evaluate.qa_accuracy`` and
            ``rankwise.masking.restore``.

    Returns:
        The analysis dict (also written as ``analysis.json``), with ``"files"`` naming
        the plots and the markdown file.
    """
    run_dirs, device, dtype = _checked_arguments(run_dirs, out_dir, device, dtype)
    t0 = time.time()
    runs, base, base_dir = _read_runs(run_dirs, base, include, exclude)
    # before any work: the output is not an input, and it is ours (an analysis) or forced
    _claim_output(out_dir, run_dirs, base_dir, force)
    base_w = _open_base(base, base_dir)

    timings = {}
    t = time.time()
    spec = spectral_analysis(runs, base_w, device=device, intruders=intruders, intruder_k=intruder_k,
                             intruder_eps=intruder_eps, top_k=top_k, keep=keep, progress=progress)
    subspace = subspace_similarities(runs, device=device)
    timings["spectral_s"] = time.time() - t

    if isinstance(probe_rows, (str, os.PathLike)):
        probe_rows = load_jsonl(os.fspath(probe_rows))
    probe_rows = list(probe_rows or [])
    probe, restoration, notes = _model_passes(
        runs, base_dir, device, dtype, probe_rows, restore_sets, timings,
        probe_kw=dict(attention=attention, representations=representations, tokens=tokens, kl_k=kl_k,
                      batch_size=batch_size, max_length=max_length, max_tokens=max_tokens, progress=progress),
        restore_kw=dict(fractions=restore_fractions, selections=restore_selections, accuracy_fn=accuracy_fn,
                        restore_fn=restore_fn, include=include, exclude=exclude, seed=seed, progress=progress))
    settings = {
        "intruders": intruders, "intruder_k": intruder_k, "intruder_eps": intruder_eps,
        "top_k": list(top_k), "keep": keep, "include": include, "exclude": exclude,
        "kl_k": kl_k, "max_length": max_length, "max_tokens": max_tokens,
        "probe_rows": len(probe_rows), "restore_sets": {k: len(v) for k, v in (restore_sets or {}).items()},
        "restore_fractions": [float(f) for f in restore_fractions], "seed": seed,
    }
    analysis = _analysis_dict(base, device, settings, runs, spec, probe, restoration, subspace, notes)
    timings["total_s"] = time.time() - t0
    analysis["timings"] = timings
    render.write_outputs(analysis, out_dir, plots=plots)
    return analysis


def update_measures(analysis: dict) -> dict:
    """``{run name: measures}`` of an :func:`analyze_runs` result, per weight matrix (sorted by name): the update's
    Frobenius norm (``fro_norm``) and its drift (``1 -`` the mean |cos| of the top singular vectors before and
    after; None where not measured), and per layer the attention change (``attention_js``: the Jensen-Shannon
    distance of the attention maps, mean over heads) and the representation similarity to the base (``cka``)."""
    got = {}
    for run in analysis["runs"]:
        mats = sorted(run["spectral"].get("matrices", []), key=lambda m: m["name"])
        pr = run.get("probe") or {}
        got[run["name"]] = {
            "names": [m["name"] for m in mats], "fro_norm": [m["fro_norm"] for m in mats],
            "drift": [1.0 - sum(m["top_sv_similarity"]) / len(m["top_sv_similarity"])
                      if m.get("top_sv_similarity") else None for m in mats],
            "attention_js": [sum(h) / len(h) for h in pr.get("attention", {}).get("js_distance", [])],
            "cka": pr.get("representations", {}).get("cka", [])}
    return got
