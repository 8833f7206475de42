"""The one training loop: ``fit(model, arms, batches, ...)``, for a solo run and for K arms on one base.

An ``Arm`` is one run's moving part: its config and settings, what it trains
(``trainable.Trainable``), its optimizer and fp16 ``GradScaler``, its metrics log,
its log window and last row, and its status (``failed``). ``rankwise train`` is
``fit`` with one arm; ``rankwise sweep --together`` and the demo are ``fit`` with K
LoRA arms whose rows are stacked in one pass (``rankwise.together``). The loop does
not know which: the caller gives it ``losses(batch, live)``, the ``(len(live),)``
summed losses of the live arms on one micro-batch (a solo run: its model's
``batch_loss_sum``; K arms: one stacked forward), and optionally ``evaluate(live)``
and ``save(step)``.

One optimizer step of every live arm (``step_arms``, ``clip_arms``, this module
alone): the micro-batches' backward passes (under DDP every one but the last under
``no_sync``), each arm's fp16 scale unscaled, the masked-SFT mask applied to the
gradients, each arm's gradient clipped by its own norm, each arm's AdamW step,
``zero_grad``. The summed losses are divided by the step's target tokens (over every
rank: ``token_norm``), so each arm's step minimises the mean loss over the step's
completion tokens; the K arms' means are summed only to run one backward, and no
term crosses arms.

Nothing is read back from the device between logging, evaluation and saving steps:
the loss sums, the log windows, the step of each arm's first non-finite loss and the
gradient norms stay on the device (``Fit.record``), and ``Fit.check`` reads them,
with whether each arm's weights are finite (``weights_finite``), in one read on
those steps, before anything is logged, evaluated or saved. What a non-finite loss
or non-finite weights then do is ``on_non_finite``: ``"raise"`` stops the run with
one line naming the step where the loss first went non-finite (or the step of the
check, for the weights) and the last good checkpoint (``NonFiniteLossError``; nothing
non-finite is ever saved), ``"drop"`` stops that arm alone (no more steps, no more
rows in the stacked batch, its status ``failed`` with the same line) while the
others go on; no term crosses arms, so an arm's NaN never reaches another arm.

With ``train.cuda_graphs`` on CUDA (``rankwise.graphs``) the step of the live arms is captured once as a CUDA
graph (``graphs.StepGraph``: the micro-batches padded to one shape, the learning rates and the token count in
device tensors) and replayed; the windows, checks, rows and saves around it are the same.

Early stopping (``train.early_stop``): on each evaluation step an arm whose watched
metric has not improved by more than ``min_delta`` for ``patience`` evaluations stops
there, finished (``Arm.stopped``: its outputs are its weights of that step, its summary
says ``stopped_early``); the others go on. Under DDP the master decides and broadcasts.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from . import config as C
from .batches import Batches
from .errors import ConfigError
from .graphs import StepGraph, graph_problem, wanted
from .runlog import MetricsLog
from .runtime import Dist
from .trainable import Trainable

NON_FINITE = ("raise", "drop")


class NonFiniteLossError(ConfigError, RuntimeError):
    """The training loss became NaN or infinite; the last checkpoint is kept.

    A ``ConfigError`` (the settings diverge: the CLI prints one line) and a
    ``RuntimeError`` (a failed run: ``rankwise sweep`` records the arm as failed and goes on).
    """


class NonFiniteWeightsError(NonFiniteLossError):
    """The trainable weights became inf or NaN (the loss may still look finite); the last good checkpoint is kept.

    Checked on every logging step and before every checkpoint and the outputs, so no
    such weights are ever saved.
    """


def lr_at(step: int, total_steps: int, base_lr: float, warmup: float = 0.0, schedule: str = "cosine",
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup from ``base_lr / warmup_steps`` to ``base_lr`` over
    ``warmup_steps`` (``warmup`` is a fraction of ``total_steps`` when < 1, else a
    step count), then ``cosine`` / ``linear`` decay to ``min_lr_ratio * base_lr``
    at the last step, or ``constant``.
    """
    warmup_steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = base_lr * min_lr_ratio
    if schedule == "linear":
        return floor + (base_lr - floor) * (1.0 - progress)
    if schedule == "cosine":
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.schedule must be cosine, linear or constant, got {schedule!r}")


@dataclass
class Arm:
    """One run's moving part in ``fit``; ``failed`` holds the reason once the arm stopped (``on_non_finite="drop"``)."""
    cfg: C.RunConfig
    settings: dict
    trainable: Trainable
    optimizer: object
    scaler: Optional[object] = None  # fp16: the GradScaler its solo run makes
    metrics: Optional[MetricsLog] = None
    generator: Optional[torch.Generator] = None  # K arms on one base: the arm's dropout seeds
    window: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))  # loss, targets, tokens
    last: dict = field(default_factory=dict)  # the last metrics row
    failed: Optional[str] = None
    stopped: Optional[int] = None  # early stopping: the step the arm stopped at (finished, not failed)
    best: Optional[float] = None  # early stopping: the best value of its metric so far
    bad_evals: int = 0  # early stopping: evaluations since the last improvement
    last_eval: dict = field(default_factory=dict)  # the last eval row (an arm stopped early ends with it)

    @property
    def live(self) -> bool:
        """Whether the arm still trains (neither failed nor stopped early)."""
        return self.failed is None and self.stopped is None

    @property
    def params(self) -> list:
        return self.trainable.params

    def lr(self, step: int, total_steps: int) -> float:
        t = self.cfg.train
        return lr_at(step, total_steps, t.lr, t.warmup, t.schedule, t.min_lr_ratio)

    def stop(self, reason: str) -> None:
        """The arm fails alone: it takes no more steps (its gradients dropped)."""
        self.failed = reason[:300]
        self.freeze()

    def freeze(self) -> None:
        for p in self.params:
            p.grad = None
            p.requires_grad_(False)

    def watch(self, row: dict, step: int) -> None:
        """Early stopping (``train.early_stop``) on the eval ``row`` of ``step``: a loss must fall and an accuracy
        rise by more than ``min_delta`` within ``patience`` evaluations, else the arm stops here, finished."""
        stop = self.cfg.train.early_stop
        if not stop.patience:
            return
        if stop.metric not in row:
            raise ConfigError(f"train.early_stop.metric {stop.metric}: the evaluation gives no {stop.metric} (its "
                              f"rows have no answers, or eval.generate is false); choose another metric")
        value = row[stop.metric] if stop.metric.endswith("_accuracy") else -row[stop.metric]  # higher is better
        if self.best is None or value > self.best + stop.min_delta:
            self.best, self.bad_evals = value, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= stop.patience:
            self.stopped = step
            self.freeze()


# ----------------------------------------------------------------------------- one step of every arm

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
    one device and dtype. ``None`` as a max norm: no clipping (infinity).
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


def _adamw_lists(optimizers) -> dict:
    """``{(beta1, beta2, eps): [params, grads, exp_avgs, exp_avg_sqs, steps, lrs, weight decays]}`` over every
    optimizer's parameters that have a gradient, each state made as AdamW's first step makes it."""
    step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # torch's choice
    by_hyper = {}
    for opt in optimizers:
        for g in opt.param_groups:
            lists = by_hyper.setdefault((*g["betas"], g["eps"]), [[] for _ in range(7)])
            for p in g["params"]:
                if p.grad is None:
                    continue
                state = opt.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=step_dtype)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                for lst, v in zip(lists, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"], g["lr"],
                                          g["weight_decay"])):
                    lst.append(v)
    return by_hyper


def step_arms(optimizers) -> None:
    """``opt.step()`` for each of ``optimizers``, every arm's AdamW in one pass where that is exact.

    When every optimizer is a plain CPU ``torch.optim.AdamW`` (``_plain_cpu_adamw``: what
    ``train.build_optimizer`` makes on a CPU, where torch runs its single-tensor AdamW),
    the step is a handful of ``torch._foreach_*`` ops over all the arms' tensors with
    each tensor's own learning rate and weight decay, in the single-tensor AdamW's
    order of operations (a CPU foreach op applies the same per-tensor op to each
    tensor), so every value is the one ``opt.step()`` would give, bit for bit (tested):
    ``p *= 1 - lr wd``; ``m = lerp(m, g, 1 - b1)``; ``v = b2 v + (1 - b2) g^2``;
    ``p -= lr / (1 - b1^n) * m / (sqrt(v) / sqrt(1 - b2^n) + eps)``. Each optimizer's
    ``state`` is kept as torch keeps it (``step``, ``exp_avg``, ``exp_avg_sq``), so
    checkpoints and ``load_state_dict`` see torch's AdamW. Else, and on a GPU (fused
    AdamW), one ``opt.step()`` after the other.
    """
    if not all(_plain_cpu_adamw(o) for o in optimizers):
        for o in optimizers:
            o.step()
        return
    with torch.no_grad():
        for (beta1, beta2, eps), lists in _adamw_lists(optimizers).items():
            params, grads, exp_avgs, exp_avg_sqs, steps, lrs, wds = lists
            if not params:  # groups whose parameters have no gradient this step
                continue
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


def apply_steps(arms: list, zero: bool = True) -> list:
    """The optimizer step of ``arms`` (their gradients in place, fp16 ones unscaled): masked-SFT masks, each
    arm's clipping by its own norm, its AdamW step (its GradScaler's, which skips the step when the arm's
    gradients hold an inf or NaN), ``zero_grad`` (``zero``; a CUDA graph keeps its gradients' memory). Returns
    the arms' gradient norms."""
    for arm in arms:
        arm.trainable.keep_masked_grads()
    grad_norms = clip_arms([a.params for a in arms], [a.cfg.train.max_grad_norm for a in arms])
    plain = [a.optimizer for a in arms if a.scaler is None]
    for arm in arms:
        if arm.scaler is not None:
            arm.scaler.step(arm.optimizer)
            arm.scaler.update()
    step_arms(plain)
    for arm in arms if zero else ():
        arm.optimizer.zero_grad(set_to_none=True)
    return grad_norms


# ----------------------------------------------------------------------------- step arithmetic and log rows

def token_norm(n_tgt: int, dist: Dist) -> float:
    """What each rank divides its summed loss by, so that the step's loss is the mean over every target token
    of the step on all ranks together (DDP averages gradients over ranks: the mean token count per rank)."""
    if not dist.ddp:
        return n_tgt
    count = torch.tensor([float(n_tgt)], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(count)
    return count.item() / dist.world


def train_row(step, window, lr, grad_norm, epoch, t_window, t_start, peak_mb=None) -> dict:
    """One ``metrics.jsonl`` row from the window of (loss sum, target tokens, tokens) since the last row (host
    floats); ``peak_mb``: the process's peak allocated CUDA memory since the last row, when on CUDA."""
    dt = max(time.time() - t_window, 1e-9)
    row = {"step": step, "loss": window[0] / max(window[1], 1), "lr": lr, "tokens_per_s": window[2] / dt,
           "grad_norm": float(grad_norm), "epoch": epoch, "elapsed_s": round(time.time() - t_start, 3)}
    if peak_mb is not None:
        row["peak_mem_mb"] = peak_mb
    return row


def peak_memory_mb(device) -> Optional[float]:
    """This rank's peak allocated CUDA memory since the last call (model, optimizer, activations), reset here;
    None off CUDA. One value for every arm of a step: the arms share the process."""
    if device.type != "cuda":
        return None
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def non_finite_message(problem: str, step: int, ckpt_path: str, last_saved: Optional[int], t: C.TrainCfg) -> str:
    """The one line of a diverged run (``problem``: ``training loss is nan``, ...): the step, and the last good
    checkpoint (kept) if there is one."""
    kept = (f"the last good checkpoint, {ckpt_path} (step {last_saved}), is kept" if last_saved
            else f"no checkpoint was saved before it (train.save_every {t.save_every})")
    return (f"{problem} at step {step}; the run stopped, and {kept}; a lower train.lr (now {t.lr}) "
            f"or train.max_grad_norm (now {t.max_grad_norm}) makes a new run (another output_dir)")


def weights_problem(t: C.TrainCfg) -> str:
    """What ``non_finite_message`` says of weights found non-finite on a logging or saving step."""
    return (f"the trainable weights hold inf or NaN (checked every train.log_every {t.log_every} steps and before "
            f"each save; the loss may still look finite)")


def weights_finite(params) -> torch.Tensor:
    """A device-side bool: whether every tensor of ``params`` is finite (one max-|w| reduction per tensor, as
    ``clip_grad_norm_`` takes an inf-norm: no overflow, no copy of the weights); the caller reads it, on logging
    and saving steps only."""
    groups = {}
    for p in params:  # _foreach_norm takes one device and dtype at a time
        groups.setdefault((p.device, p.dtype), []).append(p.detach())
    if not groups:
        return torch.tensor(True)
    with torch.no_grad():
        flags = [torch.isfinite(torch.stack(torch._foreach_norm(ts, float("inf")))).all() for ts in groups.values()]
        return torch.stack([f.to(flags[0].device) for f in flags]).all()


# ----------------------------------------------------------------------------- the loop

@dataclass
class Fit:
    """What one ``fit`` call runs with (see ``fit``) and its device-side state: every arm's log window
    (``windows``, each ``Arm.window`` a view of its row), and the step and value of its first non-finite loss
    since the last check (``bad_step``: inf when none; ``bad_loss``). ``last_saved``: the step of the last good
    checkpoint."""
    model: torch.nn.Module
    arms: list
    batches: Batches
    losses: Callable
    total_steps: int
    dist: Dist
    evaluate: Optional[Callable]
    save: Optional[Callable]
    on_non_finite: str
    checkpoint: str
    last_saved: Optional[int]
    t_start: float

    def __post_init__(self):
        dev, k = self.dist.device, len(self.arms)
        self.windows = torch.stack([a.window.to(torch.float64) for a in self.arms]).to(dev)
        for i, arm in enumerate(self.arms):
            arm.window = self.windows[i]  # a view: the checkpoint and the rows read the arm's own
        self.bad_step = torch.full((k,), math.inf, dtype=torch.float64, device=dev)
        self.bad_loss = torch.zeros(k, dtype=torch.float64, device=dev)
        self.live_index = None  # (live arms, their indices as a device tensor), rebuilt when an arm drops out
        self.graph = None  # the step as a CUDA graph (``train.cuda_graphs``), set by ``fit``

    def fail(self, arm: Arm, kind: str, problem: str, step: int) -> None:
        """A non-finite loss or weights of ``arm`` at ``step``: the run stops (``raise``) or the arm does."""
        t = arm.cfg.train
        if self.on_non_finite == "raise":
            message = non_finite_message(problem, step, self.checkpoint, self.last_saved, t)
            raise (NonFiniteWeightsError if kind == "weights" else NonFiniteLossError)(message)
        arm.stop(f"non-finite {kind}: {problem} at step {step}; the run stopped (the other arms went on); a lower "
                 f"train.lr (now {t.lr}) or train.max_grad_norm (now {t.max_grad_norm}) makes a new run")

    def index(self, live: list) -> torch.Tensor:
        if self.live_index is None or self.live_index[0] != live:
            self.live_index = (list(live), torch.tensor(live, device=self.dist.device))
        return self.live_index[1]

    def backward(self, live: list, step_batches: list) -> tuple:
        """Every micro-batch's forward and backward for the live arms; returns the (device) loss sums and the
        step's target tokens (counted on the host by the data plan)."""
        arms, dist, model = self.arms, self.dist, self.model
        n_tgt = sum(b["n_targets"] for _, b in step_batches)
        norm = token_norm(n_tgt, dist)
        sums = torch.zeros(len(live), dtype=torch.float64, device=dist.device)
        last = len(step_batches) - 1
        for j, (_, b) in enumerate(step_batches):
            with contextlib.nullcontext() if (not dist.ddp or j == last) else model.no_sync():
                ls = self.losses(b, live)
                terms = ls / norm  # the arms' means, summed for one backward: no term crosses arms
                if any(arms[k].scaler is not None for k in live):  # each arm's term times its own fp16 scale
                    terms = torch.stack([arms[k].scaler.scale(terms[i]) for i, k in enumerate(live)])
                terms.sum().backward()
            sums += ls.detach().double()
        return sums, n_tgt

    def record(self, live: list, step: int, sums: torch.Tensor, n_tgt: int, n_tokens: int) -> None:
        """Add the step to the live arms' windows and note a first non-finite loss, all on the device."""
        idx = self.index(live)
        rows = torch.stack([sums, torch.full_like(sums, n_tgt), torch.full_like(sums, n_tokens)], dim=1)  # no copy
        self.windows.index_add_(0, idx, rows)
        now = self.bad_step.index_select(0, idx)
        new = torch.isinf(now) & ~torch.isfinite(sums)
        self.bad_step.index_copy_(0, idx, torch.where(new, float(step + 1), now))
        self.bad_loss.index_copy_(0, idx, torch.where(new, sums / max(n_tgt, 1), self.bad_loss.index_select(0, idx)))

    def check(self, live: list, done: int) -> None:
        """The one read of a logging, evaluation or saving step: every live arm's first non-finite loss since
        the last check and whether its weights are finite (under DDP agreed over the ranks); such an arm fails."""
        idx = self.index(live)
        finite = torch.stack([weights_finite(self.arms[k].params).to(self.dist.device) for k in live])
        state = torch.cat([self.bad_step.index_select(0, idx), self.bad_loss.index_select(0, idx),
                           (~finite).double()])
        if self.dist.ddp:  # the earliest step and any rank's non-finite weights: every rank stops alike
            n = len(live)
            torch.distributed.all_reduce(state[:n], op=torch.distributed.ReduceOp.MIN)
            torch.distributed.all_reduce(state[2 * n:], op=torch.distributed.ReduceOp.MAX)
        values = state.cpu().tolist()
        n = len(live)
        for i, k in enumerate(live):
            if math.isfinite(values[i]):
                self.fail(self.arms[k], "loss", f"training loss is {values[n + i]}", int(values[i]))
            elif values[2 * n + i]:
                self.fail(self.arms[k], "weights", weights_problem(self.arms[k].cfg.train), done)

    def one_step(self, step: int, live: list) -> tuple:
        """Optimizer step ``step`` of the live arms, with no read of a device value; returns (their grad norms,
        the step's micro-batches)."""
        arms = self.arms
        lrs = [arms[k].lr(step, self.total_steps) for k in live]
        t = arms[live[0]].cfg.train
        step_batches = self.batches.step(step, t.grad_accum, self.dist)  # this rank's share of the step
        n_tokens = sum(b["n_tokens"] for _, b in step_batches)
        if self.graph is not None:
            n_tgt = sum(b["n_targets"] for _, b in step_batches)
            sums, grad_norms = self.graph.step(live, step_batches, lrs, n_tgt)
            self.record(live, step, sums, n_tgt, n_tokens)
            return grad_norms, step_batches
        for k, lr in zip(live, lrs):
            for group in arms[k].optimizer.param_groups:
                group["lr"] = lr
        sums, n_tgt = self.backward(live, step_batches)
        self.record(live, step, sums, n_tgt, n_tokens)
        for k in live:
            if arms[k].scaler is not None:
                arms[k].scaler.unscale_(arms[k].optimizer)
        return apply_steps([arms[k] for k in live]), step_batches

    def log_rows(self, stepped: list, done: int, epoch, t_window: float, bar) -> None:
        """A metrics row for every arm that stepped, from its window since the last row."""
        if not stepped:
            return
        if self.dist.ddp:
            torch.distributed.all_reduce(self.windows)  # on the device: nccl reduces GPU tensors only
        dev = self.dist.device
        norms = torch.stack([torch.as_tensor(g, dtype=torch.float64).to(dev) for _, g in stepped])
        windows = self.windows.cpu().tolist()  # with the norms: one read each per logging step, every arm
        norms, peak = norms.cpu().tolist(), peak_memory_mb(dev)
        for (k, _), grad_norm in zip(stepped, norms):
            arm = self.arms[k]
            arm.last = train_row(done, windows[k], arm.lr(done - 1, self.total_steps), grad_norm, epoch,
                                 t_window, self.t_start, peak)
            if arm.metrics is not None:
                arm.metrics.write(arm.last)
            arm.window.zero_()
        if bar is not None:
            losses = [self.arms[k].last["loss"] for k, _ in stepped]
            bar.set_postfix(loss="/".join(f"{x:.4f}" for x in losses[:4]) + ("/..." if len(losses) > 4 else ""),
                            tok_s=f"{self.arms[stepped[0][0]].last['tokens_per_s']:.0f}")

    def evaluate_and_watch(self, done: int, grad_norms: dict, epoch, t_window: float, bar, logged: bool) -> None:
        """An evaluation step: every live arm's eval row (the master evaluates; under DDP the others wait), then
        early stopping: an arm that stops here gets its training row now (if this was no logging step)."""
        arms = self.arms
        live = [k for k, a in enumerate(arms) if a.live]
        rows = self.evaluate(live) if self.dist.master and live else {}
        for k, row in rows.items():
            arms[k].metrics.write({"step": done, **row})
            arms[k].last_eval = dict(row)
            arms[k].watch(row, done)
        if self.dist.ddp:  # the master's verdict, for every rank
            flags = torch.tensor([float(arms[k].stopped is not None) for k in live], device=self.dist.device)
            torch.distributed.broadcast(flags, 0)
            for k, flag in zip(live, flags.cpu().tolist()):
                if flag and arms[k].stopped is None:
                    arms[k].stopped = done
                    arms[k].freeze()
        stopped = [(k, grad_norms[k]) for k in live if arms[k].stopped == done]
        if stopped and not logged:
            self.log_rows(stopped, done, epoch, t_window, bar)

    def run(self, start_step: int, bar) -> None:
        """Optimizer steps ``start_step`` to ``total_steps`` of every live arm: logging, evaluation, checkpoints.
        Between those steps nothing is read back from the device."""
        arms, total = self.arms, self.total_steps
        t, master = arms[0].cfg.train, self.dist.master
        every = arms[0].cfg.eval.every if self.evaluate is not None else 0
        self.model.train()
        t_window = time.time()
        for step in range(start_step, total):
            live = [k for k, a in enumerate(arms) if a.live]
            if not live:
                break
            grad_norms, step_batches = self.one_step(step, live)
            done = step + 1
            log_now = done % t.log_every == 0 or done == total  # the last step: before the outputs
            save_now = self.save is not None and bool(t.save_every) and done % t.save_every == 0 and done != total
            eval_now = bool(every) and done % every == 0 and done != total
            if log_now or save_now or eval_now:
                self.check(live, done)
            if log_now:
                stepped = [(k, g) for k, g in zip(live, grad_norms) if arms[k].failed is None]
                self.log_rows(stepped, done, step_batches[-1][0], t_window, bar)
                t_window = time.time()
            if bar is not None:
                bar.update(1)
            if eval_now:
                self.evaluate_and_watch(done, dict(zip(live, grad_norms)), step_batches[-1][0], t_window, bar,
                                        logged=log_now)
                t_window = time.time()
            if save_now:
                self.save(done)
                self.last_saved = done


def fit(model, arms: list, batches: Batches, *, losses: Callable, total_steps: int, start_step: int = 0,
        dist: Optional[Dist] = None, evaluate: Optional[Callable] = None, save: Optional[Callable] = None,
        on_non_finite: str = "raise", checkpoint: str = "", last_saved: Optional[int] = None,
        t_start: Optional[float] = None, progress: Optional[str] = None) -> None:
    """Train ``arms`` on ``model`` from ``start_step`` to ``total_steps``; each arm's state is updated in place.

    Args:
        model: the module ``losses`` runs (DDP-wrapped under torchrun: its ``no_sync`` is used).
        arms: ``Arm``s, in the order ``losses`` stacks them; an arm with ``failed`` set does not train.
        batches: the data plan (``batches.Batches``); step ``s`` takes its micro-batches for this rank.
        losses: ``losses(batch, live)`` -> ``(len(live),)`` summed losses of the arms ``live`` (indices into
            ``arms``) on one micro-batch, with their graph.
        dist: the processes (``runtime.Dist``); None: one process on the arms' device.
        evaluate: ``evaluate(live)`` -> ``{k: row}`` every ``eval.every`` steps (master only; the rows are
            written to each arm's metrics).
        save: ``save(step)`` writes the checkpoint every ``train.save_every`` steps, after the weights were
            found finite; called on every rank (it writes on the master).
        on_non_finite: ``"raise"`` (the run stops) or ``"drop"`` (that arm stops; the others go on).
        checkpoint, last_saved: where the checkpoint is, and the step of the one there, for the messages.
        progress: a progress bar's label (None: no bar; shown on the master only).
    """
    if on_non_finite not in NON_FINITE:
        raise ValueError(f"fit: on_non_finite must be one of {NON_FINITE}, got {on_non_finite!r}")
    if not arms:
        raise ValueError("fit: expected at least one arm")
    if dist is None:
        dist = Dist(1, 0, next(model.parameters()).device)
    run = Fit(model, list(arms), batches, losses, total_steps, dist, evaluate, save, on_non_finite, checkpoint,
              last_saved, time.time() if t_start is None else t_start)
    t = run.arms[0].cfg.train
    if wanted(t.cuda_graphs, dist.device, graph_problem(run.arms, dist.ddp), getattr(batches, "packing", False)):
        shape = batches.static_shape(total_steps * t.grad_accum * dist.world)
        run.graph = StepGraph(run.arms, losses, functools.partial(apply_steps, zero=False), shape, dist.device)
    bar = tqdm(total=total_steps, initial=start_step, desc=progress, dynamic_ncols=True) \
        if progress is not None and dist.master else None
    try:
        run.run(start_step, bar)
    finally:
        if bar is not None:
            bar.close()
