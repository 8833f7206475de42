"""Output head + cross entropy: rankwise's fused ``linear_cross_entropy`` vs the
Hugging Face way (``lm_head`` on every position, logits upcast to fp32, then
``F.cross_entropy``) and vs ``torch.compile`` of that. Forward+backward time and
the memory each leaves beyond its inputs. Writes ``bench_loss.json``.

    python -m benchmarks.bench_loss [--out DIR] [--smoke]

The head is frozen, as in LoRA training: gradients flow to the hidden states only.
On a GPU: bf16, Llama-3 (128256) and Llama-2 (32000) vocabularies at 4096-8192
tokens. On the CPU the shapes are small and the fused op runs its
``backend="torch"`` path (the same chunked loop with torch ops; the Triton kernel
runs only under the interpreter there); memory there is what autograd keeps for
backward (``saved_for_backward_mb``), on a GPU the peak allocated.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import environment, print_summary, peak_memory_mb, saved_for_backward_mb, time_ms, write_json

GPU_GRID = dict(shapes=[(8192, 4096, 128256), (4096, 2048, 128256), (8192, 4096, 32000)], dtype=torch.bfloat16)
CPU_GRID = dict(shapes=[(1024, 256, 8192), (512, 128, 32000)], dtype=torch.float32)
SMOKE_GRID = dict(shapes=[(64, 32, 500)], dtype=torch.float32)


def hf_loss(h, W, t):
    return F.cross_entropy(F.linear(h, W).float(), t, ignore_index=-100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    from rankwise.kernels import linear_cross_entropy

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    grid = SMOKE_GRID if args.smoke else (GPU_GRID if cuda else CPU_GRID)
    dtype = grid["dtype"]
    backend = "triton" if cuda else "torch"
    compiled = torch.compile(hf_loss, dynamic=False)
    rows, summary = [], []
    for N, H, V in grid["shapes"]:
        g = torch.Generator(device="cpu").manual_seed(0)
        h = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_()
        W = (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype)
        t = torch.randint(0, V, (N,), generator=g).to(device)
        t[::5] = -100
        variants = {"rankwise": lambda: linear_cross_entropy(h, W, t, backend=backend),
                    "hf_eager": lambda: hf_loss(h, W, t), "torch_compile": lambda: compiled(h, W, t)}
        row = dict(tokens=N, hidden=H, vocab=V, dtype=str(dtype).split(".")[-1], backend=backend,
                   logits_fp32_mb=N * V * 4 / 2**20)
        losses = {}
        for name, fn in variants.items():
            def step(fn=fn):
                loss = fn()
                loss.backward()
                h.grad = None
                return loss.detach()

            try:
                losses[name] = step().item()
                row[f"{name}_ms"] = time_ms(step)["ms"]
                row[f"{name}_peak_mb"] = peak_memory_mb(step)
                row[f"{name}_saved_mb"] = saved_for_backward_mb(fn, exclude=(h, W))
            except Exception as e:  # e.g. torch.compile without a working C++ compiler
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["max_loss_diff"] = max(abs(v - losses["hf_eager"]) for v in losses.values()) if "hf_eager" in losses else None
        rows.append(row)
        label = f"{N} tok, H={H}, V={V}"
        for other in ("hf_eager", "torch_compile"):
            if f"{other}_ms" in row and "rankwise_ms" in row:
                summary.append(dict(figure=f"fused loss fwd+bwd time, {label}", value=row["rankwise_ms"] / row[f"{other}_ms"],
                                    unit="x", baseline=other))
            key = "peak_mb" if cuda else "saved_mb"
            if row.get(f"{other}_{key}") and row.get(f"rankwise_{key}") is not None:
                summary.append(dict(figure=f"fused loss {'peak memory' if cuda else 'saved for backward'}, {label}",
                                    value=row[f"rankwise_{key}"] / row[f"{other}_{key}"], unit="x", baseline=other))
    payload = dict(benchmark="bench_loss", env=environment(), rows=rows, summary=summary,
                   note=("GPU: the Triton kernel" if cuda else
                         "CPU: the fused op's torch path (chunked loop); the Triton kernel is not timed here"))
    path = write_json(payload, "bench_loss", args.out)
    print_summary(summary, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
