"""Train K LoRA arms together: one base model, one data pipeline, one pass per step.

    from rankwise.together import train_together
    summaries = train_together([cfg_r1, cfg_r8, cfg_r64])   # one config per arm, as for rankwise train

    rankwise sweep CONFIG.yaml --ranks 1,8,64 --together

The loop is ``rankwise.fit.fit`` with K arms (``rankwise train`` is ``fit`` with one):
this module gives it the stacked loss (``arm_loss_sums``), the batched evaluation
(``evaluate_arms``) and the checkpoint of every arm (``checkpoint.run_state``, the
format a solo run saves), and asks it to drop an arm whose loss or weights go
non-finite. Every arm is the run ``rankwise train`` would make of its own config, and ends
with that run's outputs in its own ``output_dir`` (marker, ``resolved_config.yaml``,
``settings.json``, ``metrics.jsonl``, ``adapter/``, ``summary.json``). The configs
may differ only in the per-arm keys (``PER_ARM``: rank, alpha, dropout, learning
rate, weight decay, clipping norm, output directory and logging); everything else
(model, data, seed, schedule, batch size, steps) is shared, so the arms see the
same batches in the same order.

How the K arms share one pass:

- **Stacking.** The solo run's micro-batch is one padding-free row ``(1, T)``; here
  it is repeated K times along the batch dimension, ``(K, T)``. Hugging Face
  attention (and the packed-sequence mask built from ``position_ids``) works per
  batch row, so no arm ever attends to another's tokens; every frozen linear sees
  ``K*T`` rows, arm k's being the k-th block of ``T``.
- **Layers.** Each targeted linear becomes a ``MultiLoRALinear`` (``rankwise.arm_layers``) that calls
  ``rankwise.kernels.multi_lora.multi_lora_linear_arms`` (``multi_lora_linear`` with
  each arm's adapters as tensors of their own): one base GEMM over all rows, each
  arm's low-rank term on its own rows.
- **Parameters.** Arm k's ``A_k`` (r_k, in) and ``B_k`` (out, r_k) are Parameters
  of their own (``arm_A[k]``, ``arm_B[k]``), passed to the op as they are (the torch
  path gives each its gradient directly; the Triton path concatenates them, not
  padded, into the kernels' ``(sum r, in)`` / ``(out, sum r)`` layout).
  Separate leaves make everything per arm exact and plain: arm k's gradient norm
  is ``clip_grad_norm_``'s over its own leaves (``fit.clip_arms`` computes every arm's
  at once, bit for bit the same), and its optimizer is the very
  optimizer its solo run builds (``train.build_optimizer`` over the arm's
  parameters, in the solo run's order), so one step of the K optimizers *is* K
  independent AdamW steps, with each arm's own learning rate and weight decay
  (on a CPU ``fit.step_arms`` runs them as one set of foreach ops over every arm's
  tensors, bit for bit the values of the K ``step()`` calls).
  (A single concatenated Parameter would need a hand-written AdamW over slices to
  get the same; on a GPU the concatenation costs one copy of sum(r) x (in + out)
  numbers per layer and forward, small next to the activations.)
- **Initialisation.** Arm k's ``A_k`` is drawn exactly as its solo run draws it:
  ``torch.manual_seed(seed)`` then ``rankwise.lora.inject_lora`` with the arm's
  rank, whose LoRA layers are then taken apart again (``inject_multi_lora``);
  ``B_k`` is zero. Arm k's dropout seeds come from a generator holding the RNG
  state its solo run has after that draw, one seed per layer and forward, as
  ``lora_linear`` draws them; ``multi_lora_linear`` draws arm k's mask from its
  seed for the arm's rows alone, so with dropout the masks equal the solo run's too.
- **Loss.** Each arm's loss is its own mean over its completion tokens (the same
  tokens for every arm); the K losses are summed only to run one backward, and
  no gradient crosses arms (each arm's term depends on its own rows only).
- **fp16.** Under fp16 autocast every arm has its own ``GradScaler``, the one its
  solo run makes: arm k's loss term is multiplied by its own scale before the one
  backward, and its ``unscale_`` / ``step`` / ``update`` run on its own optimizer,
  so an inf or NaN in arm k's gradients skips arm k's step alone and halves its
  scale alone, and each scale grows on its own count of good steps, as solo.
- **Failures.** A non-finite loss or non-finite weights (read on the next logging,
  evaluation or saving step: ``rankwise.fit``) stop that arm alone: it takes no more
  steps, is dropped from the stacked batch, and its summary is
  ``{"status": "failed", "reason": "non-finite loss: ..."}``; the others go on.

**Evaluation.** The eval loss of every arm comes from one stacked pass per eval
batch (``evaluate_arms``; each arm's own token-weighted mean, as the solo run's
``eval_loss``), and the greedy QA answers of every arm from one batched decoding
(``generate_arms``: each chunk of prompts repeated once per arm, one stacked
forward per new token with the KV cache; each arm's answers are its solo model's,
token for token). Saving runs arm by arm on the same model (``select_arms`` makes
the model compute one arm; the adapter helpers then see arm k's solo model).
**Checkpoint.** With ``checkpoint_dir``, the run saves one checkpoint of every arm
(weights, optimizer state, dropout generator, log window, fp16 GradScaler, stopped or not) every
``train.save_every`` steps, and ``resume=True`` continues from it.

**Memory** (``rankwise.arm_memory``). ``estimate_peak_bytes`` models a together run's peak (base weights +
K x one micro-batch's activations + every arm's adapter, gradient and AdamW
state; the constants are stated next to it) and ``plan_groups`` splits the arms
into groups that fit a budget (``memory_budget``: the CUDA free memory or the
CPU's available memory, times a safety fraction); ``rankwise sweep --together``
uses it when ``--group-size`` is not given.

Not here: DDP (``rankwise sweep`` spreads groups over processes instead), and the ``lora.init: pissa``
initialisation (its base weights depend on the rank, so the arms could not share one).
"""
from __future__ import annotations

import inspect
import logging
import os
import random
import time

import torch

from rankwise.kernels import linear_cross_entropy

from . import config as C
from . import ownership
from .arm_layers import arm_parameters, inject_multi_lora, multi_lora_layers, select_arms
from .arm_memory import target_dims
from .atomic import remove_path
from .batches import check_token_ids, count_steps, load_data
from .checkpoint import check_settings, load_run_checkpoint, restore_run_state, run_state, save_checkpoint
from .errors import ConfigError
from .evaluate import generate_copies, is_correct
from .fit import Arm, fit
from .loss import FusedLossLM, packed_attention_mask
from .model import load_tokenizer
from .outputs import SUMMARY, failure_reason, final_eval_of, finish_arm, needs_final_eval, release_memory, write_failed
from .runlog import METRICS, MetricsLog, read_metrics, report_args, require_tensorboard
from .runtime import Dist, check_backend, setup_precision, setup_processes
from .train import (CHECKPOINT, RUN_ENTRIES, build_optimizer, evaluate, load_base_model, prepare_output_dir,
                    run_inputs, start_writing, wrap_model)
from .trainable import Trainable

log = logging.getLogger("rankwise")

# Keys that may differ between the arms of one together run; all others must be equal.
PER_ARM = ("lora.r", "lora.alpha", "lora.dropout", "train.lr", "train.weight_decay", "train.max_grad_norm",
           "output_dir", "log.tensorboard", "log.progress", "log.report_to", "log.wandb_project")


# ----------------------------------------------------------------------------- checks

def check_ranks(cfg: C.RunConfig, ranks) -> None:
    """Refuse a rank above ``min(in, out)`` of a targeted layer (one line; nothing is loaded or written)."""
    dims = target_dims(cfg)
    name, (i, o) = min(dims.items(), key=lambda kv: min(kv[1]))
    too_big = sorted(r for r in ranks if r > min(i, o))
    if too_big:
        raise ConfigError(f"ranks {too_big} exceed the dimensions of {name} ({i} -> {o}): a LoRA rank can be at "
                          f"most {min(i, o)} there")


def check_arms(cfgs: list) -> None:
    """The configs of one together run: LoRA, no PiSSA, equal in everything but ``PER_ARM``."""
    if not cfgs:
        raise ConfigError("a together run needs at least one arm")
    first = C.flatten(cfgs[0].to_dict())
    dirs = set()
    for cfg in cfgs:
        if cfg.method != "lora":
            raise ConfigError(f"arms trained together are LoRA arms; method {cfg.method!r} "
                              f"({cfg.output_dir}) trains on its own")
        if cfg.lora.init.startswith("pissa"):
            raise ConfigError(f"lora.init {cfg.lora.init} cannot train together: PiSSA rewrites the base weights "
                              f"for each rank, and the arms share one base")
        if cfg.train.gradient_checkpointing and cfg.lora.dropout > 0:
            raise ConfigError("lora.dropout with train.gradient_checkpointing cannot train together yet (the "
                              "recomputed forward would draw other dropout masks)")
        flat = C.flatten(cfg.to_dict())
        differ = sorted(k for k in set(first) | set(flat) if k not in PER_ARM and first.get(k) != flat.get(k))
        if differ:
            raise ConfigError(f"arms trained together must share every key but {', '.join(PER_ARM)}; "
                              f"{cfg.output_dir} differs in {', '.join(differ)}")
        real = os.path.realpath(cfg.output_dir)
        if real in dirs:
            raise ConfigError(f"two arms share the output_dir {cfg.output_dir}")
        dirs.add(real)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("a together run is one process; DDP (torchrun) is not supported")


# ----------------------------------------------------------------------------- the loss of the stacked batch

def stacked(batch: dict, n: int, device) -> dict:
    """The solo micro-batch ``(1, T)`` repeated ``n`` times along the batch dimension: ``(n, T)``."""
    return {k: batch[k].to(device).expand(n, -1) for k in ("input_ids", "position_ids", "targets")}


def arm_loss_sums(model, batch: dict, n: int, fused: bool, backend: str) -> torch.Tensor:
    """``(n,)`` fp32: each arm's summed cross entropy over the completion tokens of its copy of ``batch``.

    ``fused``: the output head and the loss through ``linear_cross_entropy`` (the solo
    run's ``FusedLossLM``), one call over every arm's target rows with per-row losses
    summed per arm; else the model's logits at the target positions.
    """
    dev = next(model.parameters()).device
    b = stacked(batch, n, dev)
    index = batch.get("target_index")
    keep = (batch["targets"][0] != -100).nonzero().squeeze(1) if index is None else index  # on the host
    targets = batch["targets"][0][keep].to(dev)
    keep = keep.to(dev)
    mask = packed_attention_mask(model, batch["position_ids"].to(dev))  # (1, 1, T, T): the same for every arm
    extra = {} if mask is None else {"attention_mask": mask}
    if fused:
        out = model.base_model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False, **extra)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        head = model.get_output_embeddings()
        rows = linear_cross_entropy(hidden[:, keep].reshape(n * len(keep), -1), head.weight, targets.repeat(n),
                                    head.bias, reduction="none", backend=backend, check_targets=False)
        return rows.view(n, -1).sum(1)
    inputs = {"input_ids": b["input_ids"], "position_ids": b["position_ids"], "use_cache": False, **extra}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, keep]
    return torch.stack([torch.nn.functional.cross_entropy(logits[i].float(), targets, reduction="sum")
                        for i in range(n)])


def wrap_base_model(model, cfg: C.RunConfig, first_batch, autocast, amp_dtype) -> bool:
    """``train.wrap_model`` on the base model: the fused decoder kernels when ``train.fused_kernels``;
    returns whether the solo run would train through the fused loss (its choice, with its check).

    Called before the arms are injected (the checks run the modules on inputs of
    their own shape): with B = 0 the LoRA layers add exactly nothing, so the checks
    see the outputs the solo run's checks see.
    """
    wrapped = wrap_model(model, cfg, first_batch, autocast, amp_dtype, Dist(1, 0, first_device(model)))
    return isinstance(wrapped, FusedLossLM)


def first_device(model) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- the run

def check_outputs(cfgs: list, force: bool, checkpoint_dir) -> None:
    """Every arm's output directory may be written (as ``rankwise train`` checks its own), and holds no run
    unless ``force``; the checkpoint directory overlaps no input."""
    for cfg in cfgs:
        ownership.check_output(cfg.output_dir, force=force, inputs=run_inputs(cfg), flag="output_dir",
                               kinds=["train"])
        ownership.check_links(cfg.output_dir, RUN_ENTRIES, run_inputs(cfg), flag="output_dir")
        held = [n for n in (SUMMARY, CHECKPOINT) if os.path.exists(os.path.join(cfg.output_dir, n))]
        if held and not force:
            raise ConfigError(f"output_dir {cfg.output_dir} already holds a run ({held[0]}); pass --force "
                              f"(force=True) to train it again from step 0, or choose another output_dir")
    if checkpoint_dir is not None:
        ownership.check_disjoint(checkpoint_dir, run_inputs(cfgs[0]), flag="checkpoint_dir")


def train_together(configs, force: bool = False, checkpoint_dir=None, resume: bool = False) -> list:
    """Train the LoRA arms of ``configs`` (one ``rankwise train`` config each) in one pass per step.

    Args:
        configs: ``RunConfig``s, config dicts or YAML paths, one per arm (see ``PER_ARM``).
        force: write into output directories rankwise did not make, or train finished arms again.
        checkpoint_dir: where the run's one checkpoint (every arm, ``checkpoint.run_state``) is saved every
            ``train.save_every`` steps; None: no checkpoint. Removed when the run finishes.
        resume: continue from ``checkpoint_dir`` when it holds a checkpoint (refused,
            naming the keys, when the arms or their settings differ from it).

    Returns one summary per arm, in order: the solo run's summary (also written
    to the arm's ``summary.json``), or ``{"status": "failed", "reason": ...}`` for
    an arm stopped by a non-finite loss or non-finite weights. Every user error is a
    ``ConfigError`` raised before anything is written; each arm's directory is locked
    for the run's lifetime (as ``rankwise train`` locks it), and a run that fails
    before it starts writing removes what it created (as ``rankwise train``).
    """
    cfgs = [C.parse(c) for c in configs]
    check_arms(cfgs)
    check_ranks(cfgs[0], [c.lora.r for c in cfgs])
    t_start = time.time()
    arm_settings = [C.settings(c) for c in cfgs]
    device = setup_processes(cfgs[0].train.device).device
    check_backend(cfgs[0].train.backend, device)
    check_outputs(cfgs, force, checkpoint_dir)
    claims = []
    try:
        for cfg, s in zip(cfgs, arm_settings):  # each arm's directory created, locked and marked
            claims.append(prepare_output_dir(cfg, resume=False, force=force, run_settings=s)[2])
        ckpt = None
        if resume and checkpoint_dir is not None and os.path.exists(checkpoint_dir):
            ckpt = load_run_checkpoint(checkpoint_dir)
            check_settings(ckpt, arm_settings, [c.output_dir for c in cfgs], checkpoint_dir)
        return run_together(cfgs, arm_settings, claims, ckpt, checkpoint_dir, force, device, t_start)
    except BaseException:
        for claim in claims:
            claim.undo()  # nothing once the run started writing (committed)
        raise
    finally:
        for claim in claims:
            claim.release()


def arm_precision(t: C.TrainCfg, n_arms: int, device) -> tuple:
    """``(autocast, amp dtype, scalers)``: the solo run's precision, and under fp16 one GradScaler per arm, each
    the one its solo run makes (its own scale, growth and skipped steps); else ``None`` for every arm."""
    autocast, scaler, amp_dtype = setup_precision(t.precision, device, True)
    return autocast, amp_dtype, [scaler] + [setup_precision(t.precision, device, False)[1] for _ in range(n_arms - 1)]


def run_together(cfgs, arm_settings, claims, ckpt, checkpoint_dir, force: bool, device, t_start: float) -> list:
    """``train_together`` once the arms' directories are claimed: data, one model with K arms, ``fit`` with K
    arms (an arm whose loss or weights go non-finite drops out alone), the outputs."""
    cfg0, K = cfgs[0], len(cfgs)
    t = cfg0.train
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    autocast, amp_dtype, scalers = arm_precision(t, K, device)
    tokenizer = load_tokenizer(cfg0.tokenizer or cfg0.model)
    batches, evals = load_data(cfg0, tokenizer, True)
    total_steps = count_steps(t, batches, 1)

    model = load_base_model(cfg0, device)
    check_token_ids(batches, evals, model)  # once, on the host: the stacked loss does not check its targets
    fused = wrap_base_model(model, cfg0, batches.micro_batch(0)[1], autocast, amp_dtype)
    lc = cfg0.lora
    inject_multi_lora(model, lc.targets, [c.lora.r for c in cfgs], [c.lora.alpha for c in cfgs],
                      [c.lora.dropout for c in cfgs], lc.rslora, lc.init, t.seed, t.backend)
    generators = multi_lora_layers(model)[0][1].generators  # per arm, shared by its layers
    arms = []
    for k, (cfg, s) in enumerate(zip(cfgs, arm_settings)):
        tr = Trainable(arm_parameters(model, k))
        arms.append(Arm(cfg, s, tr, build_optimizer(cfg.train, tr, device), scalers[k], generator=generators[k]))
    log.info("together: %d LoRA arms (ranks %s), %s trainable parameters in all", K, [c.lora.r for c in cfgs],
             f"{sum(a.trainable.numel for a in arms):,}")
    start_step = 0
    if ckpt is not None:
        start_step = restore_run_state(ckpt, arms, device, total_steps, checkpoint_dir)
        log.info("together: resumed from %s at step %d", checkpoint_dir, start_step)
    del ckpt
    rows = [read_metrics(os.path.join(c.output_dir, METRICS), start_step) if start_step else [] for c in cfgs]
    if any(report_args(c)[0] for c in cfgs):
        require_tensorboard()
    for cfg, s, claim in zip(cfgs, arm_settings, claims):  # every check passed: the arms' files are written
        start_writing(cfg, s, claim, force)
    for arm, r in zip(arms, rows):
        tensorboard, wandb = report_args(arm.cfg)
        arm.metrics = MetricsLog(arm.cfg.output_dir, r, tensorboard, True, wandb=wandb)
    selected = []  # the arms whose row blocks the layers compute now

    def losses(batch, live):
        if selected != live:  # the first step, or an arm stopped: the row blocks change
            select_arms(model, live)
            selected[:] = live
        with autocast():
            return arm_loss_sums(model, batch, len(live), fused, t.backend)

    def evaluate(live):
        selected[:] = live  # evaluate_arms leaves them selected
        return evaluate_arms(model, live, tokenizer, evals, cfgs, autocast, fused, t.backend)

    def save(step):
        save_checkpoint(checkpoint_dir, run_state(step, total_steps, arms, device))

    fit(model, arms, batches, losses=losses, total_steps=total_steps, start_step=start_step,
        evaluate=evaluate if evals else None, save=save if checkpoint_dir is not None else None,
        on_non_finite="drop", checkpoint=checkpoint_dir or "", last_saved=start_step or None, t_start=t_start,
        progress=f"together {K} arms" if cfg0.log.progress else None)
    return finish(arms, model, tokenizer, evals, autocast, fused, total_steps, checkpoint_dir, t_start)


def finish(arms: list, model, tokenizer, evals, autocast, fused: bool, total_steps: int, checkpoint_dir,
           t_start: float) -> list:
    """The outputs, arm by arm (``outputs.finish_arm`` on the model computing that arm alone; a failed arm's
    ``failed.json``); the checkpoint removed. Returns the summaries."""
    finished = [k for k, a in enumerate(arms) if a.failed is None and needs_final_eval(a)]
    final_evals = evaluate_arms(model, finished, tokenizer, evals, [a.cfg for a in arms], autocast, fused,
                                arms[0].cfg.train.backend) if evals and finished else {}
    summaries = []
    for k, arm in enumerate(arms):
        if arm.failed is not None:
            log.warning("together: arm %s stopped: %s", arm.cfg.output_dir, arm.failed)
            summaries.append(write_failed(arm.cfg.output_dir, arm.failed))
        else:
            select_arms(model, [k])
            final_eval = final_eval_of(arm, final_evals.get(k, {}))
            summaries.append(finish_arm(arm, model, tokenizer, total_steps, final_eval,
                                        time.time() - t_start))  # the together run's runtime, for every arm
        arm.metrics.close()
    select_arms(model, range(len(arms)))
    if checkpoint_dir is not None:
        remove_path(checkpoint_dir)  # a link there is unlinked, never followed
    return summaries


def train_group(names: list, configs: list, checkpoint_dir: str) -> list:
    """One group of arms (``names``, for the log) trained together by ``rankwise sweep`` or the demo,
    checkpointing into (and resuming from) ``checkpoint_dir``, which rankwise owns: a checkpoint there of other
    arms or settings is removed and the group starts over. Returns the arms' summaries; a group that fails as
    a whole (out of memory, a CUDA error) records every arm as failed, an arm stopped by a non-finite loss or
    weights fails alone."""
    log.info("training %s together", ", ".join(names))
    if os.path.lexists(checkpoint_dir) and not checkpoint_matches(checkpoint_dir, configs):
        log.info("%s is a checkpoint of other arms or settings; the group starts over", checkpoint_dir)
        remove_path(checkpoint_dir)
    try:
        return train_together(configs, checkpoint_dir=checkpoint_dir, resume=True)
    except (RuntimeError, MemoryError) as e:
        release_memory()
        return [{"status": "failed", "reason": failure_reason(e)}] * len(names)


def checkpoint_matches(path, configs) -> bool:
    """Whether ``path`` holds a readable checkpoint of these arms with their settings now."""
    cfgs = [C.parse(c) for c in configs]
    try:
        check_settings(load_run_checkpoint(path), [C.settings(c) for c in cfgs], [c.output_dir for c in cfgs], path)
    except ConfigError:
        return False
    return True


def evaluate_arms(model, arms, tokenizer, evals: dict, cfgs: list, autocast, fused: bool, backend: str) -> dict:
    """``{k: train.evaluate's metrics of arm k}`` for the arms ``arms``, every arm in one stacked pass.

    Each eval batch is stacked once per arm (``arm_loss_sums``, as in training: one
    base GEMM over every arm's rows) and each arm's loss is its own token-weighted
    mean, as ``rankwise.evaluate.eval_loss`` computes it for the solo run; the greedy
    QA answers of every arm come from one batched decoding (``generate_arms``), each
    arm's equal to what ``generate_answers`` gives on its solo model. The arms share
    the ``eval`` keys (not ``PER_ARM``), so one ``max_new_tokens`` and ``batch_size``
    hold for all. Leaves ``arms`` selected.
    """
    arms = [int(k) for k in arms]
    res = {k: {} for k in arms}
    e = cfgs[arms[0]].eval if arms else None
    was_training = model.training
    model.eval()
    try:
        for prefix, (batches, qa) in evals.items():
            if batches is not None:
                select_arms(model, arms)
                sums, n = torch.zeros(len(arms), dtype=torch.float64), 0
                with torch.no_grad():
                    for b in batches:
                        if not int(b["n_targets"]):
                            continue
                        with autocast():
                            sums += arm_loss_sums(model, b, len(arms), fused, backend).double().cpu()
                        n += int(b["n_targets"])
                if n == 0:
                    raise ValueError("eval_loss: the batches hold no target tokens")
                for i, k in enumerate(arms):
                    res[k][f"{prefix}_loss"] = float(sums[i]) / n
            if qa is not None and arms:
                prompts, golds, add_special = qa
                with autocast():
                    outs = generate_arms(model, arms, tokenizer, prompts, max_new_tokens=e.max_new_tokens,
                                         batch_size=e.batch_size, add_special_tokens=add_special)
                for k in arms:
                    res[k][f"{prefix}_accuracy"] = sum(is_correct(o[0], g) for o, g in zip(outs[k], golds)) / len(golds)
    finally:
        model.train(was_training)
    select_arms(model, arms)
    return res


@torch.no_grad()
def generate_arms(model, arms, tokenizer, prompts, max_new_tokens: int = 16, batch_size: int = 32,
                  add_special_tokens: bool = True) -> dict:
    """Greedy answers of every arm of ``arms`` to ``prompts``, all arms decoded in one batch per token.

    ``{k: [[text], ...]}``: for each arm, what ``rankwise.evaluate.generate_answers``
    (greedy, ``num_samples=1``) returns on that arm's solo model, prompt for prompt:
    ``evaluate.generate_copies`` with one copy of each chunk per arm, arm g's the g-th
    block of rows (the layout ``MultiLoRALinear`` reads). Leaves ``arms`` selected.

    Args:
        model: a causal LM carrying ``MultiLoRALinear`` layers (``inject_multi_lora``).
        arms: arm indices, in any order.
        tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens: as ``generate_answers``.
    """
    arms = [int(k) for k in arms]
    if not arms:
        raise ValueError("generate_arms: expected at least one arm")
    select_arms(model, arms)
    outs = generate_copies(model, tokenizer, prompts, len(arms), max_new_tokens=max_new_tokens,
                           batch_size=batch_size, add_special_tokens=add_special_tokens)
    return dict(zip(arms, outs))


def evaluate_arm(model, k: int, tokenizer, evals: dict, cfg: C.RunConfig, autocast) -> dict:
    """``train.evaluate`` of arm k alone (the model computes only that arm meanwhile)."""
    select_arms(model, [k])
    return evaluate(model, tokenizer, evals, cfg.eval, autocast)
