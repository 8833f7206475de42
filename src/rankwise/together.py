"""Train K LoRA arms together: one base model, one data pipeline, one pass per step.

    from rankwise.together import train_together
    summaries = train_together([cfg_r1, cfg_r8, cfg_r64])   # one config per arm, as for rankwise train

    rankwise sweep CONFIG.yaml --ranks 1,8,64 --together

Every arm is the run ``rankwise train`` would make of its own config, and ends
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
  is ``clip_grad_norm_``'s over its own leaves (``clip_arms`` computes every arm's
  at once, bit for bit the same), and its optimizer is the very
  optimizer its solo run builds (``train.build_optimizer`` over the arm's
  parameters, in the solo run's order), so one step of the K optimizers *is* K
  independent AdamW steps, with each arm's own learning rate and weight decay
  (on a CPU ``step_arms`` runs them as one set of foreach ops over every arm's
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
- **Failures.** A non-finite loss stops that arm alone: it takes no optimizer
  step, is dropped from the stacked batch from the next step on, and its summary
  is ``{"status": "failed", "reason": "non-finite loss: ..."}``; the others go on.

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

Not yet here: DDP, and the ``lora.init: pissa``
initialisation (its base weights depend on the rank, so the arms could not share one).
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import random
import time

import torch

from . import config as C
from . import ownership
from .arm_layers import arm_parameters, inject_multi_lora, multi_lora_layers, select_arms
from .arm_memory import target_dims
from .atomic import atomic_write_text, remove_path, reporting_write_errors
from .checkpoint import (check_log_window, check_rng, check_step, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .errors import ConfigError
from .runlog import METRICS, MetricsLog, read_metrics, require_tensorboard

log = logging.getLogger("rankwise")

# Keys that may differ between the arms of one together run; all others must be equal.
PER_ARM = ("lora.r", "lora.alpha", "lora.dropout", "train.lr", "train.weight_decay", "train.max_grad_norm",
           "output_dir", "log.tensorboard", "log.progress")
# what a together checkpoint must hold to be continued
TOGETHER_KEYS = ("step", "total_steps", "settings_hash", "settings", "rng", "arms")


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
    keep = (batch["targets"][0] != -100).nonzero().squeeze(1).to(dev)
    targets = batch["targets"][0].to(dev)[keep]
    if fused:
        from rankwise.kernels import linear_cross_entropy

        out = model.base_model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        head = model.get_output_embeddings()
        rows = linear_cross_entropy(hidden[:, keep].reshape(n * len(keep), -1), head.weight, targets.repeat(n),
                                    head.bias, reduction="none", backend=backend)
        return rows.view(n, -1).sum(1)
    inputs = {"input_ids": b["input_ids"], "position_ids": b["position_ids"], "use_cache": False}
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
    from .loss import FusedLossLM
    from .train import Dist, wrap_model

    wrapped = wrap_model(model, cfg, first_batch, autocast, amp_dtype, Dist(1, 0, first_device(model)))
    return isinstance(wrapped, FusedLossLM)


def first_device(model) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- one AdamW step for every arm

def _plain_cpu_adamw(opt) -> bool:
    """Whether ``opt.step()`` runs torch's single-tensor AdamW: a ``torch.optim.AdamW`` whose groups take no
    fused, foreach, AMSGrad, maximize, capturable or differentiable path, with float lrs and betas, over
    fp32 CPU parameters."""
    if type(opt) is not torch.optim.AdamW:
        return False
    for g in opt.param_groups:
        if g.get("fused") or g.get("foreach") or g.get("amsgrad") or g.get("maximize") or g.get("capturable") \
                or g.get("differentiable") or not g.get("decoupled_weight_decay", True):
            return False
        if not isinstance(g["lr"], float) or not all(isinstance(b, float) for b in g["betas"]):
            return False
        for p in g["params"]:
            if p.device.type != "cpu" or p.dtype != torch.float32 or (p.grad is not None and p.grad.is_sparse):
                return False
    return True


def clip_arms(arm_params, max_norms) -> list:
    """``clip_grad_norm_(arm_params[i], max_norms[i])`` for every arm; returns the arms' total norms.

    One ``torch._foreach_norm`` over every arm's gradients (each tensor's norm, as
    ``clip_grad_norm_`` takes them), each arm's total norm from its own tensors'
    norms, and per arm one ``torch._foreach_mul_`` of its gradients by its clamped
    coefficient ``min(max_norm / (norm + 1e-6), 1)``: ``clip_grad_norm_``'s
    operations per tensor, so the same values bit for bit (tested). Falls back to
    one ``clip_grad_norm_`` per arm when the gradients are not all dense tensors of
    one device and dtype. ``None`` as a max norm: no clipping (infinity), as solo.
    """
    grads = [[p.grad for p in ps if p.grad is not None] for ps in arm_params]
    maxes = [float(m) if m is not None else float("inf") for m in max_norms]
    flat = [g for gs in grads for g in gs]
    if not flat or len({(g.device, g.dtype) for g in flat}) > 1 or any(g.is_sparse for g in flat):
        return [torch.nn.utils.clip_grad_norm_(ps, m) for ps, m in zip(arm_params, maxes)]
    with torch.no_grad():
        norms = torch._foreach_norm(flat, 2.0)
        totals, i = [], 0
        for gs, max_norm in zip(grads, maxes):
            if not gs:
                totals.append(torch.tensor(0.0))
                continue
            total = torch.linalg.vector_norm(torch.stack(norms[i:i + len(gs)]), 2.0)
            i += len(gs)
            totals.append(total)
            torch._foreach_mul_(gs, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return totals


def step_arms(optimizers) -> None:
    """``opt.step()`` for each of ``optimizers``, every arm's AdamW in one pass where that is exact.

    When every optimizer is a plain CPU ``torch.optim.AdamW`` (``_plain_cpu_adamw``: what
    ``train.build_optimizer`` makes on a CPU, where torch runs its single-tensor AdamW),
    the step is a handful of ``torch._foreach_*`` ops over all the arms' tensors with
    each tensor's own learning rate and weight decay, in the single-tensor AdamW's
    order of operations (a CPU foreach op applies the same per-tensor op to each
    tensor), so every value is the one ``opt.step()`` would give, bit for bit (tested);
    each optimizer's ``state`` is kept as torch keeps it (``step``, ``exp_avg``,
    ``exp_avg_sq``), so checkpoints and ``load_state_dict`` see torch's AdamW. Else,
    and on a GPU (fused AdamW), one ``opt.step()`` after the other.
    """
    if not all(_plain_cpu_adamw(o) for o in optimizers):
        for o in optimizers:
            o.step()
        return
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # torch's choice
    by_hyper = {}  # (beta1, beta2, eps) -> [params, grads, exp_avgs, exp_avg_sqs, steps, lrs, weight decays]
    for opt in optimizers:
        for g in opt.param_groups:
            lists = by_hyper.setdefault((*g["betas"], g["eps"]), [[] for _ in range(7)])
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = opt.state[p]
                if not state:  # as AdamW's first step makes it
                    state["step"] = torch.tensor(0.0, dtype=step_dtype)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                for lst, v in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], g["lr"],
                                          g["weight_decay"])):
                    lst.append(v)
    with torch.no_grad():
        for (beta1, beta2, eps), (params, grads, exp_avgs, exp_avg_sqs, steps, lrs, wds) in by_hyper.items():
            torch._foreach_add_(steps, 1)
            decayed = [i for i, wd in enumerate(wds) if wd != 0]
            if decayed:
                torch._foreach_mul_([params[i] for i in decayed], [1 - lrs[i] * wds[i] for i in decayed])
            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
            counts = [t.item() for t in steps]
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denom, [(1 - beta2 ** n) ** 0.5 for n in counts])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, [-(lr / (1 - beta1 ** n)) for lr, n in zip(lrs, counts)])


# ----------------------------------------------------------------------------- the run

def _write_failed(cfg: C.RunConfig, reason: str) -> dict:
    """The summary of a stopped arm, also written to its ``failed.json`` (as ``rankwise sweep`` records failures)."""
    summary = {"status": "failed", "reason": reason}
    atomic_write_text(os.path.join(cfg.output_dir, "failed.json"), json.dumps(summary) + "\n")
    return summary


def train_together(configs, force: bool = False, checkpoint_dir=None, resume: bool = False) -> list:
    """Train the LoRA arms of ``configs`` (one ``rankwise train`` config each) in one pass per step.

    Args:
        configs: ``RunConfig``s, config dicts or YAML paths, one per arm (see ``PER_ARM``).
        force: write into output directories rankwise did not make, or train finished arms again.
        checkpoint_dir: where the run's one checkpoint (every arm) is saved every
            ``train.save_every`` steps (``rankwise.checkpoint``: safetensors + JSON);
            None: no checkpoint. Removed when the run finishes.
        resume: continue from ``checkpoint_dir`` when it holds a checkpoint (refused,
            naming the keys, when the arms or their settings differ from it).

    Returns one summary per arm, in order: the solo run's summary (also written
    to the arm's ``summary.json``), or ``{"status": "failed", "reason": ...}`` for
    an arm stopped by a non-finite loss or non-finite weights. Every user error is a
    ``ConfigError`` raised before anything is written; each arm's directory is locked
    for the run's lifetime (as ``rankwise train`` locks it), and a run that fails
    before it starts writing removes what it created (as ``rankwise train``).
    """
    from . import train as T

    cfgs = [C.parse(c) for c in configs]
    check_arms(cfgs)
    check_ranks(cfgs[0], [c.lora.r for c in cfgs])
    t_start = time.time()
    arm_settings = [C.settings(c) for c in cfgs]

    # ---- setup: every output directory checked before any is written ------------------------
    device = T.setup_processes(cfgs[0].train.device).device
    T.check_backend(cfgs[0].train.backend, device)
    for cfg in cfgs:
        ownership.check_output(cfg.output_dir, force=force, inputs=T.run_inputs(cfg), flag="output_dir",
                               kinds=["train"])
        ownership.check_links(cfg.output_dir, T.RUN_ENTRIES, T.run_inputs(cfg), flag="output_dir")
        held = [n for n in (T.SUMMARY, T.CHECKPOINT) if os.path.exists(os.path.join(cfg.output_dir, n))]
        if held and not force:
            raise ConfigError(f"output_dir {cfg.output_dir} already holds a run ({held[0]}); pass --force "
                              f"(force=True) to train it again from step 0, or choose another output_dir")
    if checkpoint_dir is not None:
        ownership.check_disjoint(checkpoint_dir, T.run_inputs(cfgs[0]), flag="checkpoint_dir")
    claims = []
    try:
        for cfg, s in zip(cfgs, arm_settings):  # each arm's directory created, locked and marked
            claims.append(T.prepare_output_dir(cfg, resume=False, force=force, run_settings=s)[2])
        ckpt = None
        if resume and checkpoint_dir is not None and os.path.exists(checkpoint_dir):
            ckpt = load_checkpoint(checkpoint_dir, required=TOGETHER_KEYS)
            check_step(ckpt, checkpoint_dir)
            check_rng(ckpt["rng"], checkpoint_dir)
            check_checkpoint(ckpt, cfgs, arm_settings, checkpoint_dir)
        return run_together(cfgs, arm_settings, claims, ckpt, checkpoint_dir, force, device, t_start)
    except BaseException:
        for claim in claims:
            claim.undo()  # nothing once the run started writing (committed)
        raise
    finally:
        for claim in claims:
            claim.release()


def run_together(cfgs, arm_settings, claims, ckpt, checkpoint_dir, force: bool, device, t_start: float) -> list:
    """``train_together`` once the arms' directories are claimed: data, one model with K arms, the loop, outputs."""
    from . import train as T
    from .model import load_tokenizer

    cfg0, K = cfgs[0], len(cfgs)
    t = cfg0.train
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    autocast, scaler, amp_dtype = T.setup_precision(t.precision, device, True)
    # fp16: one GradScaler per arm, each the one its solo run makes (its own scale, growth and skipped steps)
    scalers = [scaler] + [T.setup_precision(t.precision, device, False)[1] for _ in range(K - 1)] \
        if scaler is not None else None
    tokenizer = load_tokenizer(cfg0.tokenizer or cfg0.model)
    batches, evals = T.load_data(cfg0, tokenizer, True)
    total_steps = T.count_steps(t, batches, 1)

    # ---- one base model, K arms, K optimizers -----------------------------------------------
    model = T.load_base_model(cfg0, device)
    fused = wrap_base_model(model, cfg0, batches.micro_batch(0)[1], autocast, amp_dtype)
    lc = cfg0.lora
    inject_multi_lora(model, lc.targets, [c.lora.r for c in cfgs], [c.lora.alpha for c in cfgs],
                      [c.lora.dropout for c in cfgs], lc.rslora, lc.init, t.seed, t.backend)
    trainables = [T.Trainable(arm_parameters(model, k)) for k in range(K)]
    optimizers = [T.build_optimizer(c.train, tr, device) for c, tr in zip(cfgs, trainables)]
    log.info("together: %d LoRA arms (ranks %s), %s trainable parameters in all", K, [c.lora.r for c in cfgs],
             f"{sum(tr.numel for tr in trainables):,}")
    generators = multi_lora_layers(model)[0][1].generators  # per arm, shared by its layers
    run = TogetherRun(cfgs, arm_settings, model, trainables, optimizers, scalers, generators, device, t_start)
    if ckpt is not None:
        run.start_step = restore(ckpt, trainables, optimizers, generators, run.windows, run.last, run.failed,
                                 total_steps, device, checkpoint_dir, scalers)
        log.info("together: resumed from %s at step %d", checkpoint_dir, run.start_step)
    del ckpt
    rows = [read_metrics(os.path.join(c.output_dir, METRICS), run.start_step) if run.start_step else []
            for c in cfgs]
    if any(c.log.tensorboard for c in cfgs):
        require_tensorboard()
    for cfg, s, claim in zip(cfgs, arm_settings, claims):  # every check passed: the arms' files are written
        T.start_writing(cfg, s, claim, force)
    run.metrics = [MetricsLog(c.output_dir, r, c.log.tensorboard, True) for c, r in zip(cfgs, rows)]
    run.loop(batches, evals, tokenizer, autocast, fused, total_steps, checkpoint_dir)
    return run.finish(evals, tokenizer, autocast, fused, total_steps, checkpoint_dir)


class TogetherRun:
    """The state of a together run's loop: the arms, their optimizers, which still train, their log windows."""

    def __init__(self, cfgs, arm_settings, model, trainables, optimizers, scalers, generators, device, t_start):
        self.cfgs, self.arm_settings, self.model = cfgs, arm_settings, model
        self.trainables, self.optimizers, self.scalers, self.generators = trainables, optimizers, scalers, generators
        self.device, self.t_start = device, t_start
        K = len(cfgs)
        self.start_step, self.failed, self.metrics = 0, {}, []  # failed: arm -> reason
        self.windows = torch.zeros(K, 3, dtype=torch.float64)  # per arm: loss sum, target tokens, tokens since a row
        self.last = [{} for _ in range(K)]

    def stop(self, k: int, reason: str) -> None:
        """Arm k fails alone: it takes no more steps (its gradients dropped), the others go on."""
        self.failed[k] = reason[:300]
        log.warning("together: arm %s stopped: %s", self.cfgs[k].output_dir, self.failed[k])
        for p in self.trainables[k].params:
            p.grad = None
            p.requires_grad_(False)

    def stop_non_finite_weights(self, arms, done: int) -> None:
        """Stop the arms among ``arms`` whose weights hold inf or NaN: one device-side reduction per arm, read
        once (called on logging and saving steps only)."""
        from . import train as T

        if not arms:
            return
        finite = torch.stack([T.weights_finite(self.trainables[k].params) for k in arms]).cpu().tolist()
        for k, ok in zip(arms, finite):
            if not ok:
                t = self.cfgs[k].train
                self.stop(k, "non-finite weights: " + T.non_finite_message(
                    T.weights_problem(t), done, "(a together run keeps no checkpoint of its own)", None, t))

    def loop(self, batches, evals, tokenizer, autocast, fused: bool, total_steps: int, checkpoint_dir) -> None:
        """Optimizer steps ``start_step`` to ``total_steps`` of every live arm in one pass each."""
        from . import train as T

        cfgs, model, trainables, optimizers, scalers = self.cfgs, self.model, self.trainables, self.optimizers, \
            self.scalers
        t, device, K = cfgs[0].train, self.device, len(cfgs)
        one = T.Dist(1, 0, device)
        live = [k for k in range(K) if k not in self.failed]  # arms still training, in row-block order
        bar = None
        if cfgs[0].log.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=self.start_step, desc=f"together {K} arms", dynamic_ncols=True)
        model.train()
        t_window, selected = time.time(), None
        try:
            for step in range(self.start_step, total_steps):
                if not live:
                    break
                lrs = [T.lr_at(step, total_steps, c.train.lr, t.warmup, t.schedule, t.min_lr_ratio) for c in cfgs]
                for k in live:
                    for group in optimizers[k].param_groups:
                        group["lr"] = lrs[k]
                if selected != live:  # the first step, or an arm stopped: the row blocks change
                    select_arms(model, live)
                    selected = list(live)
                step_batches = batches.step(step, t.grad_accum, one)
                n_tgt = sum(b["n_targets"] for _, b in step_batches)
                sums = torch.zeros(len(live), dtype=torch.float64, device=device)
                for _, b in step_batches:
                    with autocast():
                        ls = arm_loss_sums(model, b, len(live), fused, t.backend)
                    terms = ls / n_tgt  # the arms' means, summed for one backward: no term crosses arms
                    if scalers is not None:  # each arm's mean times its own scale, as its solo run's scaler.scale
                        terms = torch.stack([scalers[k].scale(terms[i]) for i, k in enumerate(live)])
                    terms.sum().backward()
                    sums += ls.detach().double()
                sums = sums.tolist()  # one device sync per step
                n_tokens = sum(b["n_tokens"] for _, b in step_batches)
                stepping = []  # the arms that step (a non-finite loss stops its arm instead)
                for i, k in enumerate(live):
                    if not math.isfinite(sums[i]):
                        self.stop(k, "non-finite loss: " + T.non_finite_message(
                            f"training loss is {sums[i] / n_tgt}", step + 1, "(a together run keeps no checkpoint)",
                            None, cfgs[k].train))
                        continue
                    if scalers is not None:
                        scalers[k].unscale_(optimizers[k])
                    self.windows[k] += torch.tensor([sums[i], n_tgt, n_tokens], dtype=torch.float64)
                    stepping.append(k)
                # each arm's gradient clipped by its own norm, then its own AdamW step (the GradScaler's, which
                # skips the step when the arm's gradients hold an inf or NaN, as solo); all arms in one pass
                grad_norms = clip_arms([trainables[k].params for k in stepping],
                                       [cfgs[k].train.max_grad_norm for k in stepping])
                if scalers is not None:
                    for k in stepping:
                        scalers[k].step(optimizers[k])
                        scalers[k].update()
                else:
                    step_arms([optimizers[k] for k in stepping])
                for k in stepping:
                    optimizers[k].zero_grad(set_to_none=True)
                done = step + 1
                log_now = done % t.log_every == 0 or done == total_steps  # the last step: before the outputs
                save_now = checkpoint_dir is not None and bool(t.save_every) and done % t.save_every == 0 \
                    and done != total_steps
                if log_now or save_now:
                    self.stop_non_finite_weights(stepping, done)
                stepped = [(k, g) for k, g in zip(stepping, grad_norms) if k not in self.failed]
                live = [k for k in live if k not in self.failed]
                if log_now:
                    for k, grad_norm in stepped:
                        self.last[k] = T.train_row(done, self.windows[k], lrs[k], grad_norm, step_batches[-1][0],
                                                   t_window, self.t_start, device)
                        self.metrics[k].write(self.last[k])
                    self.windows.zero_()
                    t_window = time.time()
                if bar is not None:
                    bar.update(1)
                if evals and cfgs[0].eval.every and done % cfgs[0].eval.every == 0 and done != total_steps:
                    rows = evaluate_arms(model, live, tokenizer, evals, cfgs, autocast, fused, t.backend)
                    for k in live:
                        self.metrics[k].write({"step": done, **rows[k]})
                    select_arms(model, live)
                    t_window = time.time()
                if save_now:
                    save_checkpoint(checkpoint_dir, checkpoint_state(
                        done, total_steps, self.arm_settings, trainables, optimizers, self.generators, self.windows,
                        self.last, self.failed, device, scalers))
        finally:
            if bar is not None:
                bar.close()

    def finish(self, evals, tokenizer, autocast, fused: bool, total_steps: int, checkpoint_dir) -> list:
        """The outputs, arm by arm: each finished arm's solo-run files and summary, each failed arm's
        ``failed.json``; the checkpoint removed. Returns the summaries."""
        from . import train as T

        cfgs, model, K = self.cfgs, self.model, len(self.cfgs)
        finished = [k for k in range(K) if k not in self.failed]
        final_evals = evaluate_arms(model, finished, tokenizer, evals, cfgs, autocast, fused, cfgs[0].train.backend) \
            if evals and finished else {}
        summaries = []
        for k, cfg in enumerate(cfgs):
            if k in self.failed:
                self.metrics[k].close()
                summaries.append(_write_failed(cfg, self.failed[k]))
                continue
            summary = {"status": "finished", "output_dir": os.path.abspath(cfg.output_dir), "method": "lora",
                       "rank": cfg.lora.r, "steps": total_steps, "train_loss": self.last[k].get("loss"),
                       "trainable_params": self.trainables[k].n_changing}
            final_eval = final_evals.get(k, {})
            if final_eval:
                self.metrics[k].write({"step": total_steps, **final_eval})
            summary.update(final_eval)
            select_arms(model, [k])
            with reporting_write_errors(cfg.output_dir, "the outputs into"):
                summary.update(T.save_outputs(cfg, model, tokenizer, self.trainables[k]))
                summary["runtime_s"] = round(time.time() - self.t_start, 3)  # the together run's, for every arm
                summary["settings_hash"] = C.settings_hash(self.arm_settings[k])
                atomic_write_text(os.path.join(cfg.output_dir, T.SUMMARY), json.dumps(summary, indent=2) + "\n")
            self.metrics[k].close()
            summaries.append(summary)
        select_arms(model, range(K))
        if checkpoint_dir is not None:
            remove_path(checkpoint_dir)  # a link there is unlinked, never followed
        return summaries


def checkpoint_state(step, total_steps, arm_settings, trainables, optimizers, generators, windows, last, failed,
                     device, scalers=None) -> dict:
    """Everything a resumed together run needs, every arm's part in ``arms`` (see ``rankwise.checkpoint``)."""
    return {"step": step, "total_steps": total_steps, "settings_hash": C.settings_hash({"arms": arm_settings}),
            "settings": {"arms": arm_settings}, "rng": rng_state(device),
            "arms": [{"trainable": {n: p.detach().to("cpu", copy=True) for n, p in tr.named},
                      "optimizer": opt.state_dict(), "generator": g.get_state(), "log_window": windows[k].clone(),
                      "last": last[k], "failed": failed.get(k),
                      "scaler": scalers[k].state_dict() if scalers is not None else None}
                     for k, (tr, opt, g) in enumerate(zip(trainables, optimizers, generators))]}


def check_checkpoint(ckpt: dict, cfgs: list, arm_settings: list, path) -> None:
    """``resume``: the checkpoint must hold these arms with these settings (``config.NOT_SETTINGS`` aside)."""
    from .train import describe_changes

    old = (ckpt.get("settings") or {}).get("arms") if isinstance(ckpt.get("settings"), dict) else None
    if not isinstance(old, list) or not all(isinstance(o, dict) for o in old):
        raise ConfigError(f"cannot read checkpoint {path}: not a checkpoint of a together run")
    if len(old) != len(cfgs):
        raise ConfigError(f"--resume: the checkpoint {path} holds {len(old)} arms, this run has {len(cfgs)}; "
                          f"choose another checkpoint directory for these arms")
    for cfg, o, now in zip(cfgs, old, arm_settings):
        if C.changed_settings(o, now):
            raise ConfigError(f"--resume: the settings of the arm {cfg.output_dir} changed since the checkpoint "
                              f"{path}: {describe_changes(o, now)}")


def checkpoint_matches(path, configs) -> bool:
    """Whether ``path`` holds a readable checkpoint of these arms with their settings now (see ``check_checkpoint``)."""
    cfgs = [C.parse(c) for c in configs]
    try:
        check_checkpoint(load_checkpoint(path), cfgs, [C.settings(c) for c in cfgs], path)
    except ConfigError:
        return False
    return True


def restore(ckpt: dict, trainables, optimizers, generators, windows, last, failed, total_steps, device, path,
            scalers=None) -> int:
    """Load every arm's weights, optimizer, dropout generator, log window, status and (fp16) GradScaler;
    returns the step."""
    if ckpt.get("total_steps") != total_steps:
        raise ConfigError(f"--resume: the checkpoint {path} was made for {ckpt.get('total_steps')} steps, the "
                          f"config now gives {total_steps}")
    arms = ckpt.get("arms")
    if not isinstance(arms, list) or len(arms) != len(trainables):
        raise ConfigError(f"cannot read checkpoint {path}: it does not hold {len(trainables)} arms")
    for k, arm in enumerate(arms):
        check_log_window(arm.get("log_window") if isinstance(arm, dict) else None, path, f"arm {k}'s log_window")
    try:
        with torch.no_grad():
            for k, (arm, tr, opt, g) in enumerate(zip(arms, trainables, optimizers, generators)):
                for n, p in tr.named:
                    p.copy_(arm["trainable"][n])
                opt.load_state_dict(arm["optimizer"])
                g.set_state(arm["generator"])
                if scalers is not None and arm.get("scaler"):
                    scalers[k].load_state_dict(arm["scaler"])
                windows[k] = arm["log_window"]
                last[k] = dict(arm["last"] or {})
                if arm.get("failed"):
                    failed[k] = arm["failed"]
                    for p in tr.params:
                        p.requires_grad_(False)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"--resume: the checkpoint {path} does not fit these arms: "
                          f"{' '.join(str(e).split())[:200]}") from None
    set_rng_state(ckpt["rng"], device)
    return check_step(ckpt, path)


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
    from .evaluate import is_correct

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
    (greedy, ``num_samples=1``) returns on that arm's solo model, prompt for prompt.
    The prompts are cut into the same chunks of ``batch_size`` and left-padded the
    same way; each chunk's ``(b, L)`` tokens are then repeated once per arm,
    ``(G * b, L)``, arm g's copy being the g-th block of ``b`` rows (the layout
    ``MultiLoRALinear`` reads), and ``model.generate`` decodes all of them with its
    KV cache: one stacked forward per new token, each row attending to its own
    tokens only. Greedy decoding is row by row, so each row's tokens are its solo
    run's; a row that meets EOS is filled with the pad token (as in a solo chunk
    whose other rows go on) until every row of the chunk stops, and decoding skips
    special tokens, so the texts are the solo run's. Leaves ``arms`` selected.

    Args:
        model: a causal LM carrying ``MultiLoRALinear`` layers (``inject_multi_lora``).
        arms: arm indices, in any order.
        tokenizer, prompts, max_new_tokens, batch_size, add_special_tokens: as ``generate_answers``.
    """
    if isinstance(prompts, str):
        raise TypeError("generate_arms: prompts must be a list of strings, not one string")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"generate_arms: batch_size and max_new_tokens must be >= 1, got {batch_size}, "
                         f"{max_new_tokens}")
    arms = [int(k) for k in arms]
    if not arms:
        raise ValueError("generate_arms: expected at least one arm")
    G, dev = len(arms), first_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training, old_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    select_arms(model, arms)
    results = {k: [] for k in arms}
    try:
        for s in range(0, len(prompts), batch_size):
            chunk = list(prompts[s:s + batch_size])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
            enc = {k: v.to(dev).repeat(G, 1) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad_id, num_return_sequences=1,
                                 do_sample=False, temperature=None, top_k=None, top_p=None)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for g, k in enumerate(arms):
                results[k] += [[t] for t in texts[g * len(chunk):(g + 1) * len(chunk)]]
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return results


def evaluate_arm(model, k: int, tokenizer, evals: dict, cfg: C.RunConfig, autocast) -> dict:
    """``train.evaluate`` of arm k alone (the model computes only that arm meanwhile)."""
    from .train import evaluate

    select_arms(model, [k])
    return evaluate(model, tokenizer, evals, cfg.eval, autocast)
