"""What a finished or failed arm leaves in its ``output_dir``, for ``rankwise train``, together runs and sweeps.

A finished arm: ``adapter/`` (PEFT format, LoRA; with ``lora.init: pissa`` a rank-2r
update of the original base weights, see ``adapter.pissa_to_lora``) or ``model/``
(``save_pretrained``, full and masked SFT; masked SFT adds ``mask.safetensors``), then
``summary.json`` (final metrics and the settings hash; its presence marks the run as
finished), each replaced whole. A failed arm: ``failed.json``
(``{"status": "failed", "reason"}``), which ``rankwise sweep`` also writes for an
arm that failed on its own and removes once the arm finishes.
"""
from __future__ import annotations

import gc
import json
import math
import os

import torch
from safetensors.torch import save_file

from . import config as C
from .adapter import adapter_state_dict, lora_delta_norms, pissa_to_lora, save_adapter
from .atomic import atomic_write, atomic_write_text, reporting_write_errors, replace_dir
from .fit import NonFiniteLossError, NonFiniteWeightsError
from .lora import lora_scaling
from .trainable import Trainable

SUMMARY = "summary.json"
FAILED = "failed.json"


def save_pretrained_dir(model, tokenizer, path) -> None:
    """``save_pretrained`` of model and tokenizer into ``path``, replaced whole (see ``atomic.replace_dir``)."""
    def write(tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    replace_dir(path, write)


def save_outputs(cfg: C.RunConfig, model, tokenizer, trainable: Trainable) -> dict:
    """Write ``adapter/`` (LoRA) or ``model/`` (+ ``mask.safetensors``); returns summary entries (``delta_norm``)."""
    out_dir = cfg.output_dir
    if cfg.method != "lora":
        save_pretrained_dir(model, tokenizer, os.path.join(out_dir, "model"))
        if trainable.masks is not None:
            tensors = {n: m.to(torch.uint8).cpu().contiguous() for (n, _), m in zip(trainable.named, trainable.masks)}
            atomic_write(os.path.join(out_dir, "mask.safetensors"), lambda p: save_file(tensors, p))
        return {}
    lc = cfg.lora
    targets = getattr(model, "rankwise_lora", {}).get("target_modules", lc.targets)
    tensors, r_out, alpha_out = adapter_state_dict(model), lc.r, lc.alpha
    if trainable.pissa_init is None:
        norms = lora_delta_norms(model).values()
    else:  # saved relative to the original base weights: a rank-2r update s [B, -B0] [A; A0]
        tensors, r_out, alpha_out = pissa_to_lora(tensors, trainable.pissa_init, r_out, alpha_out, lc.rslora)
        scale = lora_scaling(r_out, alpha_out, lc.rslora)
        norms = [float((scale * tensors[k.replace("lora_A", "lora_B")].float() @ tensors[k].float()).norm())
                 for k in tensors if k.endswith("lora_A.weight")]
    replace_dir(os.path.join(out_dir, "adapter"),  # replaced whole: a link there is replaced, never written through
                lambda tmp: save_adapter(model, tmp, base_model=cfg.model, r=r_out, alpha=alpha_out,
                                         dropout=lc.dropout, targets=targets, use_rslora=lc.rslora, tensors=tensors))
    return {"delta_norm": math.sqrt(sum(n * n for n in norms))}  # ||update||_F over all adapted weights


def summary_of(arm, total_steps: int) -> dict:
    """The summary entries every process knows of a finished ``fit.Arm``; one stopped early (``train.early_stop``)
    has the steps it trained and ``stopped_early`` (that step)."""
    cfg = arm.cfg
    summary = {"status": "finished", "output_dir": os.path.abspath(cfg.output_dir), "method": cfg.method,
               "rank": cfg.lora.r if cfg.method == "lora" else None, "steps": arm.stopped or total_steps,
               "train_loss": arm.last.get("loss"), "trainable_params": arm.trainable.n_changing}
    if arm.stopped is not None:
        summary["stopped_early"] = arm.stopped
    return summary


def finish_arm(arm, model, tokenizer, total_steps: int, final_eval: dict, runtime_s: float) -> dict:
    """A finished arm's outputs: its final eval row, ``adapter/`` or ``model/``, ``summary.json``; returns the
    summary. ``model`` computes this arm alone. An arm stopped early ends with the eval row of its stop
    (``needs_final_eval``: no second evaluation of the same weights)."""
    cfg = arm.cfg
    summary = summary_of(arm, total_steps)
    if final_eval and arm.stopped is None:  # an arm stopped early has its eval row of that step already
        arm.metrics.write({"step": summary["steps"], **final_eval})
    summary.update(final_eval)
    with reporting_write_errors(cfg.output_dir, "the outputs into"):
        summary.update(save_outputs(cfg, model, tokenizer, arm.trainable))
        summary["runtime_s"] = round(runtime_s, 3)
        summary["settings_hash"] = C.settings_hash(arm.settings)
        atomic_write_text(os.path.join(cfg.output_dir, SUMMARY), json.dumps(summary, indent=2) + "\n")
    return summary


def needs_final_eval(arm) -> bool:
    """Whether the run's end evaluates ``arm``: not when it stopped early with its eval row of that step."""
    return not (arm.stopped is not None and arm.last_eval)


def final_eval_of(arm, evaluated: dict) -> dict:
    """The final eval row of ``arm``: ``evaluated`` (the end's evaluation), or the row of its early stop."""
    return evaluated if needs_final_eval(arm) else dict(arm.last_eval)


def write_failed(out_dir: str, reason: str) -> dict:
    """The summary of a failed arm, ``{"status": "failed", "reason"}``, also written to its ``failed.json``."""
    summary = {"status": "failed", "reason": reason}
    with reporting_write_errors(out_dir, "the failure record into"):
        atomic_write_text(os.path.join(out_dir, FAILED), json.dumps(summary) + "\n")
    return summary


def failure_reason(e: BaseException) -> str:
    """What a failed arm's summary says of ``e``: its kind (``out of memory``, ``non-finite weights``,
    ``non-finite loss``, else the exception's type) and its first line, at most 300 characters."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in msg.lower() or isinstance(e, MemoryError):
        kind = "out of memory"
    elif isinstance(e, NonFiniteWeightsError):
        kind = "non-finite weights"
    elif isinstance(e, NonFiniteLossError):
        kind = "non-finite loss"
    else:
        kind = type(e).__name__
    return f"{kind}: {msg}"[:300] if msg else kind


def release_memory() -> None:
    """What a failed or finished job held, given back before the next one (Python objects, CUDA's cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
