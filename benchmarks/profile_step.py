"""Where one LoRA training step's time goes: torch.profiler over solo steps of ``bench_sweep_step``.

    python -m benchmarks.profile_step [--out DIR] [--shape 1b|tiny] [--micro 1x512] [--rank 16] [--steps 3]

On an H200 a solo LoRA step of the 1B shape took 170-210 ms at 1x512 and at 4x2048
tokens alike (benchmarks/results/nvidia-h200-2026-11-28), several times its matrix
work: something other than GPU arithmetic bounds it. This script profiles such steps
with CPU and CUDA activities and writes ``profile_step.json``: the wall time per step,
the GPU busy time (sum of kernel times) per step, the number of kernel launches per
step, and the top operators by CPU self time and by CUDA time. Not a test, not a figure
of merit: a diagnosis for the next GPU session.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.bench_sweep_step import SHAPES, build_base, solo_step_fn
from benchmarks.common import environment, write_json


def _rows(events, key: str, n: int) -> list:
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
    return [{"name": e.key[:120], "calls": e.count, "cpu_self_ms": e.self_cpu_time_total / 1e3,
             "device_ms": getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) / 1e3} for e in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--micro", default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = args.shape or ("1b" if cuda else "tiny")
    B, T = (int(v) for v in (args.micro or ("1x512" if cuda else "1x32")).split("x"))
    model = build_base(shape, device, torch.bfloat16 if cuda else torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    step = solo_step_fn(model, args.rank, ids, cuda, autocast)
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.steps
    events = prof.key_averages()
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total for e in kernels)
    payload = dict(benchmark="profile_step", env=environment(), shape=shape, micro=f"{B}x{T}", rank=args.rank,
                   steps=args.steps, wall_ms_per_step=wall * 1e3,
                   gpu_busy_ms_per_step=busy / 1e3 / args.steps if cuda else None,
                   kernel_launches_per_step=len(kernels) / args.steps if cuda else None,
                   top_cpu_self=_rows(events, "self_cpu_time_total", 25),
                   top_device=_rows(events, "device_time_total" if hasattr(events[0], "device_time_total")
                                    else "cuda_time_total", 25) if cuda else [])
    path = write_json(payload, "profile_step", args.out)
    print(f"wrote {path}: {wall * 1e3:.1f} ms per step"
          + (f", GPU busy {payload['gpu_busy_ms_per_step']:.1f} ms, {payload['kernel_launches_per_step']:.0f} "
             f"kernels per step" if cuda else ""))
    for r in payload["top_cpu_self"][:12]:
        print(f"  {r['cpu_self_ms']:9.2f} ms CPU self  {r['calls']:6d} calls  {r['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
