"""Shared helpers of the benchmark scripts: environment record, timing, memory,
JSON output. Benchmarks are scripts, never tests; every figure written is measured."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def source_commit() -> Optional[str]:
    """The git commit of the code being measured, with ``+dirty`` when tracked files differ
    from it. Outside a git checkout (the device machine's copy of the tree has no ``.git``)
    it is ``$RANKWISE_COMMIT`` when set (``RANKWISE_COMMIT=<sha> bash benchmarks/gpu_quick.sh``),
    else None."""
    root = str(Path(__file__).resolve().parent.parent)
    given = os.environ.get("RANKWISE_COMMIT") or None
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return given
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return given
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    """Device, date, the commit measured and library versions, recorded with every result file."""
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": source_commit(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    for mod in ("triton", "transformers", "peft", "bitsandbytes"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"cpu ({env['cpu']}, {env['cpu_threads']} threads)"
    return env


def device_slug(env: dict) -> str:
    name = env["device"].split("(")[0].strip().lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-") or "cpu"


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], warmup: int = 2, reps: int = 5) -> dict:
    """Median and spread of ``fn``'s wall time in ms. On CUDA uses
    ``triton.testing.do_bench`` (L2 flushed, quantiles); on the CPU a
    perf_counter loop after warm-up."""
    if torch.cuda.is_available():
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2]}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}


def peak_memory_mb(fn: Callable[[], object]) -> Optional[float]:
    """Peak CUDA memory allocated during ``fn`` above what was allocated before (MB); None on CPU."""
    if not torch.cuda.is_available():
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def saved_for_backward_mb(fn: Callable[[], torch.Tensor], exclude=()) -> float:
    """Bytes autograd keeps for the backward pass of ``fn()``'s graph (MB),
    counting each storage once and leaving out ``exclude`` (the parameters)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in excluded:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values()) / 2**20


def write_json(payload: dict, name: str, out_dir: Optional[str] = None) -> Path:
    """Write ``payload`` as ``<out_dir>/<name>.json`` atomically; returns the path."""
    out = Path(out_dir) if out_dir else RESULTS / "_scratch"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def print_summary(summary: list, path) -> None:
    """Echo where the JSON went and its headline figures (dicts with figure, value, unit, baseline)."""
    print(f"wrote {path}")
    for f in summary:
        print(f"  {f['figure']}: {f['value']:.4g} {f['unit']} (vs {f['baseline']})")
