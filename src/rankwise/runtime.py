"""Where and how a run computes: its processes (torchrun's environment, DDP), the backend check, and the precision.

``rankwise train`` and ``together.train_together`` call these before anything is loaded:
``setup_processes`` reads torchrun's environment and starts the process group under DDP,
``check_backend`` refuses ``train.backend: triton`` off CUDA without the Triton interpreter, and
``setup_precision`` picks autocast / GradScaler on GPUs (the CPU trains in fp32).
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from .errors import ConfigError
from .model import resolve_device

log = logging.getLogger("rankwise")


@dataclass
class Dist:
    """This process's place in the run: ``world`` processes, this one is ``rank``, on ``device``."""
    world: int
    rank: int
    device: torch.device
    own_group: bool = False  # whether this call started the process group (and so ends it)

    @property
    def ddp(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0


def check_backend(backend: str, device: torch.device) -> None:
    """``train.backend: triton`` off CUDA needs the Triton interpreter, switched on before Python starts."""
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"train.backend triton on device {device.type} needs the Triton interpreter: "
                          f"set TRITON_INTERPRET=1 in the environment before starting Python")


def setup_processes(device_name: str) -> Dist:
    """Read torchrun's environment, pick the device, start the process group under DDP."""
    dist = Dist(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")), resolve_device(device_name))
    if dist.ddp:
        if dist.device.type == "cuda":
            dist.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dist.device)
        if not tdist.is_initialized():
            tdist.init_process_group(backend="nccl" if dist.device.type == "cuda" else "gloo")
            dist.own_group = True
    return dist


def setup_precision(precision: str, device: torch.device, master: bool):
    """``(autocast factory, GradScaler or None, amp dtype or None)``: autocast on GPUs, fp32 on the CPU."""
    if device.type == "cuda":
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        if precision not in ("auto", "fp32") and master:
            log.info("train.precision %s applies on GPUs only; the CPU trains in fp32", precision)
        amp_dtype = None  # the CPU trains in fp32
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return autocast, scaler, amp_dtype

