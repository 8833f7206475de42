"""Train one run: LoRA, full SFT or masked SFT of a Hugging Face causal LM.

    rankwise train CONFIG.yaml [--set key=value ...] [--resume] [--force]
    torchrun --nproc_per_node N -m rankwise.cli train CONFIG.yaml   # DDP, same config

    from rankwise.train import train
    summary = train("examples/lora.yaml", overrides={"lora.r": 8})

The file reads top to bottom: the output directory, the model, the optimizer,
evaluation, and then ``train``, which makes one ``rankwise.fit.Arm`` of the run and
trains it with ``rankwise.fit.fit``, the loop every run shares (a together run is
``fit`` with K arms). The processes and the precision are set up by
``rankwise.runtime``, the data by ``rankwise.batches`` (``load_data``), what
trains by ``rankwise.trainable`` (``setup_trainable``: LoRA / full / masked; the
mask, ``setup_mask``); the checkpoint is ``rankwise.checkpoint.run_state`` of the
one arm, the outputs ``rankwise.outputs.finish_arm``.
Method-specific choices live in those functions, not in the loop. The config is
parsed once, at the top of ``train``, into a ``rankwise.config.RunConfig``;
the functions below receive its sections or plain values. Config keys are
documented in ``rankwise.config`` and ``examples/lora.yaml``.

Outputs in ``output_dir``: ``.rankwise-run.json`` (the ownership marker, see
``rankwise.ownership``), ``resolved_config.yaml`` (the config with every default
filled in; a ``config.yaml`` of the user's there is never touched),
``settings.json`` (``{"hash", "settings"}``: the keys that change the result, see
``config.settings``), ``metrics.jsonl`` (one JSON object per logging step: step,
loss, lr, tokens_per_s, grad_norm, and on CUDA peak_mem_mb, the peak allocated
since the previous row; eval rows carry eval_loss / eval_accuracy / eval_ood_*),
``checkpoint/`` (the latest, for ``--resume``: ``{step, rng, arms: [one arm]}``, see
``rankwise.checkpoint``; removed when the run finishes), ``adapter/`` (PEFT format, LoRA) or ``model/``
(``save_pretrained``, full and masked SFT; masked SFT adds
``mask.safetensors``), and ``summary.json`` (final metrics and the settings
hash; its presence marks the run as finished). With ``lora.init: pissa`` the
adapter is saved as a rank-2r update of the original base weights (see
``adapter.pissa_to_lora``).

Safety: the output directory is checked before any work (``ownership.check_output``:
never an input, never a file or a link, a directory of someone else's only with
``--force``; no link among the entries a run writes leads into an input,
``ownership.check_links``, and every entry is replaced, never written through);
it is locked for the run's lifetime (``.rankwise-lock``, ``rankwise.runlock``: a
second run is refused naming the first one's pid); a resume must have the
settings of the checkpoint (or of the finished run), else it is refused naming
the keys that differ, and a step it could not continue from is refused too; the
run files are written only after every check passed, and a run that fails before
that removes what it created. A NaN/inf loss stops the run with one line naming
the step it first appeared and the last good checkpoint, which is kept; so do
trainable weights that became inf/NaN (both read from the device on logging,
evaluation and saving steps only, before anything is saved: ``rankwise.fit``). A
write that fails (a full disk) is one line naming the path and the free space.

Departures from the studies' protocol worth knowing: the loss is the mean over
completion tokens of each optimizer step (not per example); masked SFT chooses
among decoder-layer weights except norms, as the knowledge study's restoration.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from . import config as C
from . import ownership, shapes
from .atomic import atomic_write_text, remove_path, reporting_write_errors
from .batches import check_token_ids, count_steps, load_data
from .checkpoint import (CHECKPOINT_DIR, LEGACY_CHECKPOINT, check_settings, load_run_checkpoint, refuse_legacy,
                         restore_run_state, run_state, save_checkpoint)
from .errors import ConfigError
from .evaluate import batch_loss_sum, eval_loss, generate_answers, is_correct
from .fit import Arm, fit
from .loss import FusedLossLM, check_fused_loss, fused_head_fp32, fused_loss_problem
from .masking import MaskedAdamW
from .model import check_model_files, check_tokenizer_files, load_model, load_tokenizer
from .outputs import FAILED, SUMMARY, final_eval_of, finish_arm, needs_final_eval, summary_of
from .decoder_kernels import patch_decoder_kernels
from .runlock import LOCK_FILE
from .runlog import METRICS, TENSORBOARD, WANDB, MetricsLog, read_metrics, report_args, require_tensorboard
from .runtime import Dist, check_backend, setup_precision, setup_processes
from .trainable import Trainable, setup_mask, setup_trainable

log = logging.getLogger("rankwise")

CHECKPOINT = CHECKPOINT_DIR
RESOLVED_CONFIG = "resolved_config.yaml"
SETTINGS = "settings.json"
# every entry a run writes in output_dir (a link among them may not lead into an input: ownership.check_links)
RUN_ENTRIES = (ownership.MARKER, LOCK_FILE, RESOLVED_CONFIG, SETTINGS, METRICS, TENSORBOARD, CHECKPOINT, "adapter",
               "model", "mask.safetensors", SUMMARY, FAILED, WANDB)


# ----------------------------------------------------------------------------- output directory and resume

def run_inputs(cfg: C.RunConfig) -> list:
    """``(description, path)`` of everything the run reads: the output directory may overlap none of them."""
    template = cfg.data.chat_template if cfg.data.chat_template and os.path.isfile(cfg.data.chat_template) else None
    return [("base model", cfg.model), ("tokenizer", cfg.tokenizer), ("data.train", cfg.data.train),
            ("data.eval", cfg.data.eval), ("data.eval_ood", cfg.data.eval_ood), ("mask.from run", cfg.mask.from_),
            ("data.chat_template", template)]


def read_json(path, what: str):
    """A JSON file of a run; unreadable -> one ``ConfigError`` line naming it (the file is left as it is)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read {what} {path}: {' '.join(str(e).split())[:200]}") from None


def finished_summary(cfg: C.RunConfig, run_settings: dict) -> dict:
    """``--resume`` of a finished run: its summary, if it was trained with these settings; else refused."""
    out_dir = cfg.output_dir
    summary = read_json(os.path.join(out_dir, SUMMARY), "the summary of the finished run")
    settings_path = os.path.join(out_dir, SETTINGS)
    if os.path.exists(settings_path):
        recorded = read_json(settings_path, "the settings of the finished run")
        old = recorded.get("settings") if isinstance(recorded, dict) else None
        if not isinstance(old, dict):
            raise ConfigError(f"cannot read the settings of the finished run {settings_path}: no 'settings' mapping")
        if C.settings_hash(old) != C.settings_hash(run_settings):
            raise ConfigError(f"--resume: {out_dir} is a finished run trained with other settings: "
                              f"{C.describe_changes(old, run_settings)}; choose another output_dir for these settings")
    else:
        log.warning("%s: no %s (a run of an older rankwise): its settings cannot be checked", out_dir, SETTINGS)
    log.info("%s already finished; nothing to resume", out_dir)
    return summary


def prepare_output_dir(cfg: C.RunConfig, resume: bool, force: bool, run_settings: dict):
    """Check ``output_dir`` and what it holds, then claim and lock it.

    Returns ``(finished summary, checkpoint, claim)``: the summary of a finished run
    resumed with the same settings (then nothing is claimed), else the checkpoint to
    resume (or None) and the ``ownership.Claim`` holding the directory's lock until the
    run ends. The directory may be written (``ownership.check_output``; no link among
    the run's entries leads into an input, ``ownership.check_links``); then it is
    created, locked and marked, and under the lock the checkpoint to resume is read
    and must have been made with these settings. A refusal after the claim undoes it:
    nothing is left behind.
    """
    out_dir = cfg.output_dir
    legacy = os.path.join(out_dir, LEGACY_CHECKPOINT)
    if resume and os.path.isfile(legacy):
        refuse_legacy(legacy)
    ownership.check_output(out_dir, force=force, inputs=run_inputs(cfg), flag="output_dir", kinds=["train"])
    ownership.check_links(out_dir, RUN_ENTRIES, run_inputs(cfg), flag="output_dir")
    done = os.path.join(out_dir, SUMMARY)
    if resume and os.path.exists(done):
        return finished_summary(cfg, run_settings), None, None
    check_model_files(cfg.model)  # malformed model or tokenizer files: refused before anything is written
    check_tokenizer_files(cfg.tokenizer or cfg.model)
    if cfg.method == "lora":  # targets that match no layer: refused before anything is written or loaded
        shapes.check_targets(cfg.model, cfg.lora.targets)
    claim = ownership.claim(out_dir, "train", lock=True)
    try:
        if resume and os.path.exists(done):  # finished by the run that held the lock a moment ago
            claim.undo()
            return finished_summary(cfg, run_settings), None, None
        return None, read_checkpoint(cfg, resume, force, run_settings), claim
    except BaseException:
        claim.undo()
        raise


def read_checkpoint(cfg: C.RunConfig, resume: bool, force: bool, run_settings: dict):
    """The checkpoint ``--resume`` continues (checked: readable, a step the run can continue from, these
    settings), or None; refuses to start over a run without ``--resume`` or ``--force``."""
    out_dir = cfg.output_dir
    done, ckpt_path = os.path.join(out_dir, SUMMARY), os.path.join(out_dir, CHECKPOINT)
    if resume and not os.path.lexists(ckpt_path):
        half = sorted(n for n in os.listdir(out_dir) if n.startswith(f".old-{CHECKPOINT}-"))
        if half:  # a crash between the two renames of replace_dir: the last checkpoint is kept under that name
            raise ConfigError(f"--resume: {ckpt_path} is missing but {os.path.join(out_dir, half[-1])} is there (a "
                              f"crash while a checkpoint was saved); rename it to {ckpt_path} to resume from it")
    if not (os.path.exists(done) or os.path.exists(ckpt_path)):
        return None
    if not resume and not force:
        raise ConfigError(f"output_dir {out_dir} already holds a run; pass --resume (resume=True) to continue "
                          f"it, --force to train it again from step 0, or choose another output_dir")
    if not resume:
        return None
    ckpt = load_run_checkpoint(ckpt_path)
    check_settings(ckpt, [run_settings], [out_dir], ckpt_path)
    return ckpt


def write_run_files(cfg: C.RunConfig, run_settings: dict) -> None:
    """``resolved_config.yaml`` and ``settings.json``: written once every check passed."""
    out_dir = cfg.output_dir
    C.dump_yaml(cfg, os.path.join(out_dir, RESOLVED_CONFIG))
    atomic_write_text(os.path.join(out_dir, SETTINGS),
                      json.dumps({"hash": C.settings_hash(run_settings), "settings": run_settings}, indent=1) + "\n")


# ----------------------------------------------------------------------------- model

def load_base_model(cfg: C.RunConfig, device):
    """The model as loaded (trained weights keep fp32 master copies outside LoRA), checkpointing switched on."""

    dtype = cfg.dtype
    if cfg.method != "lora" and dtype == "auto":
        dtype = "fp32"  # trained weights keep fp32 master copies; compute runs under autocast
    model = load_model(cfg.model, dtype=dtype, attention=cfg.attention, device=device,
                       quantization=cfg.quantization, double_quant=cfg.double_quant)
    if cfg.train.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def wrap_model(model, cfg: C.RunConfig, first_batch, autocast, amp_dtype, dist: Dist):
    """Fused decoder kernels, the fused loss head, DDP; returns the module the loop calls."""
    backend = cfg.train.backend
    if cfg.train.fused_kernels:
        counts = patch_decoder_kernels(model, backend=backend)
        if dist.master:
            log.info("fused kernels: %d RMSNorm, %d SwiGLU MLP modules%s", counts["rms_norm"], counts["swiglu"],
                     f" (left as they are: {', '.join(sorted(set(counts['skipped'])))})" if counts["skipped"] else "")
    if cfg.train.fused_loss:  # output head + loss without the (tokens, vocab) logits
        problem = fused_loss_problem(model)
        if problem is None:
            fused = FusedLossLM(model, backend=backend, check_targets=False)  # train checks the ids first
            problem = check_fused_loss(model, fused, first_batch, autocast,
                                       rtol=1e-4 if amp_dtype is None and fused_head_fp32(model) else 2e-2)
            if problem is None:
                model = fused
        if problem is not None and dist.master:
            log.warning("train.fused_loss: using the model's own logits instead: %s", problem)
    if dist.ddp:
        model = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return model


# ----------------------------------------------------------------------------- optimizer

def build_optimizer(t: C.TrainCfg, trainable: Trainable, device):
    """AdamW over the trainable weights (decay on matrices only), or MaskedAdamW for masked SFT."""
    betas = tuple(t.betas)
    if trainable.masks is not None:
        if t.optimizer != "adamw":
            raise ConfigError(f"train.optimizer {t.optimizer!r} is not available for method masked (adamw only)")
        return MaskedAdamW(trainable.params, trainable.masks, lr=t.lr, betas=betas, eps=t.eps,
                           weight_decay=t.weight_decay)
    params = trainable.params
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if t.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # optional: only this optimizer needs it
        except ImportError:
            raise ConfigError("train.optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=betas, eps=t.eps)
    return torch.optim.AdamW(groups, lr=t.lr, betas=betas, eps=t.eps, fused=device.type == "cuda")


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, tokenizer, evals: dict, e: C.EvalCfg, autocast) -> dict:
    """``{prefix_loss, prefix_accuracy}`` for every eval set (``eval``, ``eval_ood``)."""
    res = {}
    for prefix, (batches, qa) in evals.items():
        if batches is not None:
            with autocast():
                res[f"{prefix}_loss"] = eval_loss(model, batches)
        if qa is not None:
            prompts, golds, add_special = qa
            with autocast():
                outs = generate_answers(model, tokenizer, prompts, max_new_tokens=e.max_new_tokens,
                                        batch_size=e.batch_size, add_special_tokens=add_special)
            res[f"{prefix}_accuracy"] = sum(is_correct(o[0], g) for o, g in zip(outs, golds)) / len(golds)
    return res


# ----------------------------------------------------------------------------- the run

def train(config, overrides=None, resume: bool = False, force: bool = False) -> dict:
    """Run one training job; returns the summary dict (also written to ``output_dir/summary.json``).

    Args:
        config: a ``RunConfig``, a config dict or a YAML path (keys: ``rankwise.config``).
        overrides: ``{"lora.r": 8}`` or ``["lora.r=8"]`` applied on top of ``config``.
        resume: continue from ``output_dir/checkpoint/`` (a finished run is returned as is); refused when
            the settings (``config.settings``) differ from the checkpoint's or the finished run's.
        force: write into an existing directory rankwise did not make, or train a finished run again from step 0.

    Every user error (config, paths, an unreadable checkpoint, changed settings on
    resume, a NaN loss, non-finite weights, a full disk) is a ``ConfigError``; the
    output directory is checked before the model is loaded, and locked for the
    run's lifetime (a second run on it is refused, naming the first one's pid). A
    run that fails before it starts writing its files (model, data, targets, a
    checkpoint it cannot continue) removes what it created: the output directory if
    it made it, else its marker and lock file.

    The summary holds at least ``output_dir``, ``status``, ``steps``, ``train_loss``
    (mean over the last logging window), ``trainable_params``, and the final eval
    metrics (``eval_loss``, ``eval_accuracy``, ``eval_ood_loss``, ``eval_ood_accuracy``
    when the data exists).
    """
    t_start = time.time()
    cfg = C.parse(config, overrides)
    run_settings = C.settings(cfg)
    dist = setup_processes(cfg.train.device)
    check_backend(cfg.train.backend, dist.device)
    ckpt = claim = None
    if dist.master:
        finished, ckpt, claim = prepare_output_dir(cfg, resume, force, run_settings)
        if finished is not None:
            return finished
    elif resume and os.path.isdir(os.path.join(cfg.output_dir, CHECKPOINT)):
        ckpt = load_run_checkpoint(os.path.join(cfg.output_dir, CHECKPOINT))
    try:
        return train_claimed(cfg, run_settings, dist, ckpt, claim, resume, force, t_start)
    except BaseException:
        if claim is not None:
            claim.undo()  # nothing once the run started writing (committed)
        raise
    finally:
        if claim is not None:
            claim.release()


def start_writing(cfg: C.RunConfig, run_settings: dict, claim, restart: bool) -> None:
    """Every check passed: from here the run's files are written and kept (``claim.commit``); a finished run
    trained again (``restart``: ``--force``) is no longer finished; ``resolved_config.yaml``, ``settings.json``."""
    claim.commit()
    done = os.path.join(cfg.output_dir, SUMMARY)
    if restart and os.path.lexists(done):
        os.unlink(done)
    with reporting_write_errors(cfg.output_dir, "the run files into"):
        write_run_files(cfg, run_settings)


def train_claimed(cfg: C.RunConfig, run_settings: dict, dist: Dist, ckpt, claim, resume: bool, force: bool,
                  t_start: float) -> dict:
    """``train`` once its output directory is claimed: data, model, what trains, ``fit`` with one arm, outputs."""
    t, out_dir, device, master = cfg.train, cfg.output_dir, dist.device, dist.master
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    autocast, scaler, amp_dtype = setup_precision(t.precision, device, master)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    batches, evals = load_data(cfg, tokenizer, master)
    total_steps = count_steps(t, batches, dist.world)

    raw_model = load_base_model(cfg, device)
    check_token_ids(batches, evals, raw_model)
    trainable = setup_trainable(raw_model, cfg)
    if master:
        log.info("method %s: %s trainable parameters of %s", cfg.method, f"{trainable.numel:,}",
                 f"{sum(p.numel() for p in raw_model.parameters()):,}")
    model = wrap_model(raw_model, cfg, batches.micro_batch(0)[1], autocast, amp_dtype, dist)

    def loss_sum_of(batch):
        with autocast():
            return batch_loss_sum(model, batch)

    setup_mask(cfg, trainable, ckpt, loss_sum_of, batches, dist)
    arm = Arm(cfg, run_settings, trainable, build_optimizer(t, trainable, device), scaler)
    ckpt_path, start_step = os.path.join(out_dir, CHECKPOINT), 0
    if ckpt is not None:
        start_step = restore_run_state(ckpt, [arm], device, total_steps, ckpt_path, master)
        if master:
            log.info("resumed from %s at step %d", ckpt_path, start_step)
    elif resume and master:
        log.info("--resume: no checkpoint in %s, starting from step 0", out_dir)
    del ckpt
    rows = []
    if master:
        rows = read_metrics(os.path.join(out_dir, METRICS), start_step) if start_step else []
        if report_args(cfg)[0]:
            require_tensorboard()
        start_writing(cfg, run_settings, claim, force and not resume)
    tensorboard, wandb = report_args(cfg)
    arm.metrics = MetricsLog(out_dir, rows, tensorboard, master, wandb=wandb)

    def save(step):
        if master:
            save_checkpoint(ckpt_path, run_state(step, total_steps, [arm], device))

    def evaluate_arm(live):
        return {0: evaluate(raw_model, tokenizer, evals, cfg.eval, autocast)}

    fit(model, [arm], batches, losses=lambda b, live: loss_sum_of(b).reshape(1), total_steps=total_steps,
        start_step=start_step, dist=dist, evaluate=evaluate_arm if evals else None, save=save,
        on_non_finite="raise", checkpoint=ckpt_path, last_saved=start_step or None, t_start=t_start,
        progress=f"train {cfg.method}" if cfg.log.progress else None)
    summary = summary_of(arm, total_steps)
    if master:
        final_eval = evaluate(raw_model, tokenizer, evals, cfg.eval, autocast) if evals and needs_final_eval(arm) \
            else {}
        final_eval = final_eval_of(arm, final_eval)
        summary = finish_arm(arm, raw_model, tokenizer, total_steps, final_eval, time.time() - t_start)
        remove_path(ckpt_path)  # a link there is unlinked, never followed
    arm.metrics.close()
    if dist.ddp:
        torch.distributed.barrier()
        if dist.own_group:
            torch.distributed.destroy_process_group()
    return summary


# ----------------------------------------------------------------------------- CLI verb

def add_arguments(parser) -> None:
    """Arguments of ``rankwise train``."""
    parser.add_argument("config", help="YAML config file (`rankwise init` writes the commented default one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted (e.g. --set lora.r=8 --set train.lr=1e-4); repeatable")
    parser.add_argument("--resume", action="store_true",
                        help="continue from output_dir/checkpoint/ (refused if the settings changed)")
    parser.add_argument("--force", action="store_true",
                        help="write into an output_dir rankwise did not make, or train a finished run again")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def main(args) -> int:
    """Entry point of ``rankwise train``."""
    if args.print_config:
        print(yaml.safe_dump(C.resolve(args.config, args.overrides), sort_keys=False), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary = train(args.config, args.overrides, resume=args.resume, force=args.force)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
