"""The training step as one CUDA graph (``train.cuda_graphs: auto | on | off``).

A captured step replays every kernel of one optimizer step of the live arms (the micro-batches' forwards and
backwards, each arm's clipping and fused AdamW) from one call on the host, so a small step is no longer bound
by the host's Python and launch cost. A graph replays fixed kernels on fixed memory, so:

- **Fixed shapes.** Each micro-batch is padded (``data.pad_batch``) to the most tokens and the most target
  tokens of any micro-batch of the run (``Batches.static_shape``, over the whole run so that a resumed run
  pads alike). The padding is a sequence of its own with no targets: no real token's value changes, only the
  row counts of the GEMMs.
- **What changes from step to step lives on the device,** written before each replay: the micro-batches
  (copied into the graph's input buffers), each arm's learning rate (AdamW's ``lr`` as a device tensor, fused
  and capturable) and the step's target-token count the losses are divided by.
- **Nothing in the step reads the device** (tests/test_host_reads.py) **or draws on the host:** what would
  (``graph_problem``: fp16's GradScaler, LoRA dropout's seeds, DDP's all-reduce, optimizers other than
  torch's AdamW, gradient checkpointing's RNG stash) keeps the step eager.

The first ``WARMUP_STEPS`` steps of a set of live arms run the same code eagerly (on a side stream on CUDA),
so the kernels' measured choices and the optimizer's states exist before the capture; then the step is
captured once and replayed. When the live arms change (one stops) it is captured again. Logging, evaluation
and saving steps read the graph's outputs after its replay, outside it, as before.

``auto`` captures on CUDA when nothing stands in the way and the data is packed (packed micro-batches nearly
fill ``batch_size x max_length`` tokens, so the padding costs little; unpacked ones of short examples can pad
a lot: ``on`` asks for it anyway). ``on`` captures on CUDA and refuses what stands in the way in one line.
Off CUDA the key is accepted and does nothing.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional

import torch

from .data import pad_batch
from .errors import ConfigError

log = logging.getLogger("rankwise")

WARMUP_STEPS = 2
#: where a step can be captured (tests add "cpu" with a stand-in for ``capture``)
CAPTURE_DEVICES = ("cuda",)


def graph_problem(arms: list, ddp: bool) -> Optional[str]:
    """Why the step of ``arms`` cannot be captured, in a few words; None when it can."""
    if ddp:
        return "under torchrun (DDP) the gradients' all-reduce runs outside a graph"
    for arm in arms:
        t = arm.cfg.train
        if arm.scaler is not None:
            return "fp16's GradScaler decides on the host whether to step (train.precision bf16 can be captured)"
        if arm.cfg.method == "lora" and arm.cfg.lora.dropout > 0:
            return "lora.dropout draws its masks' seeds on the host each step"
        if type(arm.optimizer) is not torch.optim.AdamW:
            return f"the optimizer {type(arm.optimizer).__name__} is not capturable (torch's AdamW is)"
        if t.gradient_checkpointing:
            return "train.gradient_checkpointing keeps the RNG state on the host to recompute the forward"
    return None


def wanted(mode: str, device: torch.device, problem: Optional[str], packing: bool) -> bool:
    """Whether ``train.cuda_graphs: mode`` captures the step on ``device``; ``on`` with a ``problem`` is a
    ``ConfigError``."""
    if mode == "off" or device.type not in CAPTURE_DEVICES:
        return False
    if mode == "on":
        if problem:
            raise ConfigError(f"train.cuda_graphs on: the step cannot be captured: {problem}; set it to auto or off")
        return True
    if problem or not packing:
        log.info("train.cuda_graphs auto: the step runs eagerly: %s",
                 problem or "data.packing is off (padding every micro-batch to one shape can cost a lot; on asks)")
        return False
    return True


def capture(body: Callable) -> tuple:
    """``(replay, outputs)``: ``body()`` captured as a CUDA graph (its kernels recorded, not run), its outputs
    the graph's static tensors, and the function that runs it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = body()
    return graph.replay, outputs


@contextlib.contextmanager
def side_stream(device: torch.device):
    """Eager warm-up steps on a side stream, as torch asks before a capture (on CUDA; nothing elsewhere)."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


class StepGraph:
    """One optimizer step of the live arms of a ``fit.Fit`` as a CUDA graph (see the module docstring).

    ``body`` is ``fit``'s step on the graph's input buffers: ``losses`` of each micro-batch divided by the
    step's target tokens (a device scalar), one backward per micro-batch, then ``apply``: clipping and each
    arm's AdamW step with no ``zero_grad`` (the captured backward writes the gradients afresh on every replay).
    ``arms``: objects with an ``optimizer`` (``fit.Arm``s); ``shape``: ``(tokens, targets)`` each micro-batch is
    padded to, or None when the batches come in one shape already (every tensor in them is copied as it is).
    """

    def __init__(self, arms: list, losses: Callable, apply: Callable, shape: Optional[tuple], device: torch.device):
        self.arms, self.losses, self.apply = arms, losses, apply
        self.shape = shape
        self.device = device
        self.norm = torch.ones((), dtype=torch.float32, device=device)
        self.lrs = [torch.zeros((), dtype=torch.float32, device=device) for _ in arms]
        for arm, lr in zip(arms, self.lrs):
            for group in arm.optimizer.param_groups:  # torch's fused AdamW takes its lr from a device tensor
                group.update(lr=lr, fused=True, foreach=False, capturable=device.type == "cuda")
        self.live, self.inputs, self.replay, self.outputs, self.warm = None, [], None, None, 0
        self.captures = 0

    def load(self, step_batches: list) -> None:
        """Copy the step's micro-batches (padded) into the input buffers, made on the first step."""
        padded = [b if self.shape is None else pad_batch(b, *self.shape) for _, b in step_batches]
        if len(self.inputs) != len(padded):
            self.inputs = [{k: torch.empty_like(v, device=self.device) if isinstance(v, torch.Tensor) else v
                            for k, v in b.items()} for b in padded]
        for buf, b in zip(self.inputs, padded):
            for k, v in b.items():
                if not isinstance(v, torch.Tensor):
                    buf[k] = v  # host values (the real token counts): not seen by the captured kernels
                    continue
                if buf[k].shape != v.shape:
                    raise ValueError(f"StepGraph: {k} of shape {tuple(v.shape)} differs from the captured "
                                     f"{tuple(buf[k].shape)}")
                pin = self.device.type == "cuda" and v.device.type == "cpu"
                buf[k].copy_(v.pin_memory() if pin else v, non_blocking=pin)

    def body(self) -> tuple:
        """The step on the input buffers: ``((len(live),) fp64 loss sums, the arms' gradient norms)``."""
        live = self.live
        sums = torch.zeros(len(live), dtype=torch.float64, device=self.device)
        for b in self.inputs:
            ls = self.losses(b, live)
            (ls / self.norm).sum().backward()  # the arms' means, summed for one backward: no term crosses arms
            sums += ls.detach().double()
        return sums, self.apply([self.arms[k] for k in live])

    def zero_grad(self) -> None:
        for arm in self.arms:
            arm.optimizer.zero_grad(set_to_none=True)

    def step(self, live: list, step_batches: list, lrs: list, n_targets: int) -> tuple:
        """One optimizer step of the ``live`` arms at learning rates ``lrs``: eager while warming up, then the
        captured graph's replay. Returns the device loss sums and gradient norms (the graph's own tensors, valid
        until the next step)."""
        if live != self.live:  # the first step, or an arm stopped: warm up and capture again
            self.live, self.replay, self.outputs, self.warm = list(live), None, None, 0
        for k, lr in zip(live, lrs):
            self.lrs[k].fill_(lr)
        self.norm.fill_(float(n_targets))
        self.load(step_batches)
        if self.warm < WARMUP_STEPS:
            self.warm += 1
            self.zero_grad()
            with side_stream(self.device):
                return self.body()
        if self.replay is None:
            self.zero_grad()  # the captured backward allocates the gradients in the graph's memory
            self.replay, self.outputs = capture(self.body)
            self.captures += 1
        self.replay()
        return self.outputs
