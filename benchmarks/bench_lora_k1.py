"""K = 1 of the multi-arm LoRA op against the single-arm op (issue 24): is one arm
of ``multi_lora_linear`` as fast as ``lora_linear``, so that the single-arm op
can be a thin call into the multi-arm one?

    .venv/bin/python -m benchmarks.bench_lora_k1 [--out DIR] [--repeats N] [--label NAME]

CPU torch path (``backend="torch"``, ``torch.set_num_threads(1)``): forward +
backward (gradients of x, A and B; W frozen, a frozen bias) of

- ``single``: ``lora_linear(x, W, A, B, s, b, p, seed, backend="torch")``, the
  single-arm op as the tree under test has it;
- ``k1``: ``multi_lora_linear_arms(x, W, [A], [B], [s], [M], b, p, [seed], backend="torch")``,
  the multi-arm op with one arm;
- ``autograd``: ``lora_linear`` with its torch path swapped for
  ``autograd_single_arm_torch`` below, the single-arm torch path as it was
  before it became a call into the multi-arm one (plain torch ops differentiated
  by autograd). Before that change it is the same code as ``single`` (an A/A
  pair: the noise floor); after it, the baseline the new path is held to;

on a dense fp32 W and on an NF4 W (``rankwise.quant.quantize_nf4``, dequantized to
fp32 by the torch path), without and with dropout (p = 0.1, one fixed seed).
Repeats are interleaved (each repeat runs every impl once, the order rotated
each repeat), after one warm-up call each. Reported per impl: median and IQR of
the wall times; per pair: the ratio of medians and the median and IQR of the
per-repeat paired ratios, all from the same run.

Before timing, every impl's output and gradients are checked against a float64
reference (``reference64``) computed with the keep-mask the torch path documents
(``torch.rand`` of x's shape from a ``torch.Generator`` seeded with the seed,
kept where ``>= p``), and against each other: max |a - b| / max |reference| must
be at most ``TOL`` for y, dx, dA and dB. A different mask would move the LoRA
term by far more than that, so the check also pins the mask to today's draw.

Triton launch count: a child process with ``TRITON_INTERPRET=1`` runs one small
layer forward + backward through ``backend="triton"`` of both ops (dense and
NF4, with and without dropout) and counts kernel launches by kernel name, by
wrapping ``InterpretedFunction.run`` (every ``kernel[grid](...)`` launch goes
through it; ``JITFunction.run`` is wrapped too, for a run with a GPU).

Writes ``results.json`` (environment: torch and triton versions, ``git rev-parse
HEAD``, thread count, CPU model, the sha256 of the op source files measured) and
``README.md`` to ``--out``. Runs are kept under ``runs[<label>]``: a run with a
new ``--label`` adds to the file, one with an existing label replaces it.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from rankwise.kernels import lora_linear, multi_lora_linear
from rankwise.kernels.multi_lora import multi_lora_linear_arms
from rankwise.quant import dequantize_nf4, quantize_nf4

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "lora-k1-cpu"
OP_FILES = ("kernels/lowrank.py", "kernels/lora_linear.py", "kernels/nf4_lora.py", "kernels/multi_lora.py",
            "kernels/multi_lora_kernels.py", "kernels/lora_torch.py")
#: (tokens M, in_features K, out_features N, rank r) per base weight
SHAPES = {
    "dense": [(512, 1024, 1024, 8), (512, 1024, 1024, 64), (2048, 1024, 1024, 64), (512, 4096, 1024, 8),
              (512, 1024, 4096, 64)],
    "nf4": [(512, 1024, 1024, 8), (2048, 1024, 1024, 64), (512, 4096, 1024, 64)],
}
DROPOUTS = (0.0, 0.1)
SEED = 1234
SCALING = 2.0
TOL = 1e-5
IMPLS = ("single", "k1", "autograd")
PAIRS = (("k1", "single"), ("single", "autograd"), ("k1", "autograd"))
#: the modules whose ``lora_linear_torch`` the ``autograd`` impl swaps (the module objects: the
#: package exports a function named ``lora_linear`` too)
TORCH_PATH_CALLERS = tuple(importlib.import_module(f"rankwise.kernels.{m}") for m in ("lora_linear", "nf4_lora"))


def autograd_single_arm_torch(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p: float = 0.0,
                              seed: Optional[int] = None, keep_mask: Optional[torch.Tensor] = None):
    """The single-arm torch path (``lowrank.lora_linear_torch``) as it was before it became
    a call into the multi-arm implementation, verbatim: plain torch ops, autograd."""
    y = torch.nn.functional.linear(x, weight, bias)
    if dropout_p > 0.0:
        if keep_mask is None:
            g = torch.Generator(device=x.device)
            g.manual_seed(int(seed) if seed is not None else 0)
            keep_mask = torch.rand(x.shape, generator=g, device=x.device) >= dropout_p
        xd = x * keep_mask.to(x.dtype) / (1.0 - dropout_p)
    else:
        xd = x
    lora = torch.nn.functional.linear(torch.nn.functional.linear(xd, lora_A), lora_B)
    return y + scaling * lora


@contextmanager
def autograd_torch_path():
    """``lora_linear``'s torch path swapped for ``autograd_single_arm_torch`` (in the
    modules that call ``lora_linear_torch``, as tests/test_convergence.py swaps it)."""
    saved = [m.lora_linear_torch for m in TORCH_PATH_CALLERS]
    try:
        for m in TORCH_PATH_CALLERS:
            m.lora_linear_torch = autograd_single_arm_torch
        yield
    finally:
        for m, f in zip(TORCH_PATH_CALLERS, saved):
            m.lora_linear_torch = f


def make_case(base: str, M: int, K: int, N: int, r: int, seed: int = 0) -> dict:
    """Inputs of one layer, fp32 on the CPU: x, A, B require grad; W (dense or NF4) and b frozen."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) / K ** 0.5
    weight = quantize_nf4(W) if base == "nf4" else W
    return dict(
        x=torch.randn(M, K, generator=g).requires_grad_(),
        weight=weight,
        W=dequantize_nf4(weight) if base == "nf4" else W,
        A=(torch.randn(r, K, generator=g) / K ** 0.5).requires_grad_(),
        B=(torch.randn(N, r, generator=g) / r ** 0.5).requires_grad_(),
        b=torch.randn(N, generator=g),
        dy=torch.randn(M, N, generator=g),
    )


def impl_fn(name: str, c: dict, p: float):
    """The layer call ``name`` stands for, as a closure returning y."""
    x, w, A, B, b = c["x"], c["weight"], c["A"], c["B"], c["b"]
    if name == "k1":
        return lambda: multi_lora_linear_arms(x, w, [A], [B], [SCALING], [x.shape[0]], b, p, [SEED], backend="torch")

    def single():
        return lora_linear(x, w, A, B, SCALING, b, p, SEED, backend="torch")

    if name == "single":
        return single

    def autograd():
        with autograd_torch_path():
            return single()

    return autograd


def fwd_bwd(fn, c: dict) -> tuple:
    """One forward + backward; returns (y, dx, dA, dB) and clears the gradients."""
    y = fn()
    y.backward(c["dy"])
    out = (y.detach(), c["x"].grad, c["A"].grad, c["B"].grad)
    c["x"].grad = c["A"].grad = c["B"].grad = None
    return out


def reference64(c: dict, p: float) -> tuple:
    """(y, dx, dA, dB) in float64 by autograd on einsums, with the torch path's documented keep-mask."""
    x, W, A, B = (c[k].detach().double().requires_grad_(k in "xAB") for k in ("x", "W", "A", "B"))
    if p > 0.0:
        keep = torch.rand(x.shape, generator=torch.Generator().manual_seed(SEED)) >= p
        xd = torch.where(keep, x / (1.0 - p), torch.zeros_like(x))
    else:
        xd = x
    y = x @ W.t() + SCALING * torch.einsum("mr,nr->mn", xd @ A.t(), B) + c["b"].double()
    y.backward(c["dy"].double())
    return y.detach(), x.grad, A.grad, B.grad


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def check_case(c: dict, p: float) -> dict:
    """Max relative error (see ``TOL``) of each impl against float64 and of k1 against single; raises past TOL."""
    ref = reference64(c, p)
    outs = {name: fwd_bwd(impl_fn(name, c, p), c) for name in IMPLS}
    errs = {f"{name}_vs_float64": max(rel_err(a, b) for a, b in zip(outs[name], ref)) for name in IMPLS}
    errs["k1_vs_single"] = max(rel_err(a, b) for a, b in zip(outs["k1"], outs["single"]))
    errs["single_vs_autograd"] = max(rel_err(a, b) for a, b in zip(outs["single"], outs["autograd"]))
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    if bad:
        raise AssertionError(f"outputs or gradients differ by more than {TOL} (max |a-b| / max |ref|): {bad}")
    return errs


def iqr(v: list) -> list:
    q = statistics.quantiles(v, n=4, method="inclusive")
    return [q[0], q[2]]


def time_case(c: dict, p: float, repeats: int) -> dict:
    """Interleaved repeats of forward + backward per impl (order rotated each repeat), in ms."""
    fns = {name: impl_fn(name, c, p) for name in IMPLS}
    for fn in fns.values():
        fwd_bwd(fn, c)
    times = {name: [] for name in IMPLS}
    for i in range(repeats):
        order = IMPLS[i % len(IMPLS):] + IMPLS[:i % len(IMPLS)]
        for name in order:
            t0 = time.perf_counter()
            fwd_bwd(fns[name], c)
            times[name].append((time.perf_counter() - t0) * 1e3)
    row = {name: dict(median_ms=statistics.median(v), iqr_ms=iqr(v), ms=v) for name, v in times.items()}
    for a, b in PAIRS:
        paired = [ta / tb for ta, tb in zip(times[a], times[b])]
        row[f"{a}/{b}"] = dict(ratio_of_medians=row[a]["median_ms"] / row[b]["median_ms"],
                               paired_median=statistics.median(paired), paired_iqr=iqr(paired))
    return row


def run_cpu(repeats: int) -> list:
    rows = []
    for base, shapes in SHAPES.items():
        for M, K, N, r in shapes:
            c = make_case(base, M, K, N, r)
            for p in DROPOUTS:
                errs = check_case(c, p)
                row = dict(base=base, M=M, K=K, N=N, r=r, dropout_p=p, max_rel_err=errs,
                           **time_case(c, p, repeats))
                rows.append(row)
                print(f"{base:5s} M={M:4d} K={K:4d} N={N:4d} r={r:2d} p={p}: "
                      + "  ".join(f"{n} {row[n]['median_ms']:.2f} ms" for n in IMPLS)
                      + f"  k1/single {row['k1/single']['ratio_of_medians']:.3f}", flush=True)
    return rows


# ----------------------------------------------------------------------------
# Triton launch count (child process, TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------


def count_launches() -> dict:
    """Kernel launches by kernel name for one layer forward + backward of each op on the
    Triton backend (run in a process started with ``TRITON_INTERPRET=1``)."""
    counts: dict = {}

    def spy(cls):
        real = cls.run

        def run(fn, *args, **kwargs):
            name = getattr(getattr(fn, "fn", None), "__name__", None) or getattr(fn, "__name__", "?")
            counts[name] = counts.get(name, 0) + 1
            return real(fn, *args, **kwargs)

        cls.run = run

    spy(InterpretedFunction)
    spy(JITFunction)
    M, K, N, r = 48, 64, 40, 8
    out = {"shape": dict(M=M, K=K, N=N, r=r, dtype="float32"), "rows": []}
    for base in ("dense", "nf4"):
        c = make_case(base, M, K, N, r)
        for p in DROPOUTS:
            x, w, A, B, b = c["x"], c["weight"], c["A"], c["B"], c["b"]
            calls = {"single": lambda: lora_linear(x, w, A, B, SCALING, b, p, SEED, backend="triton"),
                     "k1": lambda: multi_lora_linear(x, w, A, B, [r], [SCALING], [M], b, p, [SEED],
                                                     backend="triton")}
            row, res = dict(base=base, dropout_p=p), {}
            for name, fn in calls.items():
                fwd_bwd(fn, c)  # warm-up: the interpreter's first call of a kernel
                counts.clear()
                t0 = time.perf_counter()
                res[name] = fwd_bwd(fn, c)
                row[f"{name}_interpreter_s"] = time.perf_counter() - t0
                row[f"{name}_launches"] = sum(counts.values())
                row[f"{name}_kernels"] = dict(sorted(counts.items()))
            row["k1_vs_single_max_rel_err"] = max(rel_err(a, b) for a, b in zip(res["k1"], res["single"]))
            out["rows"].append(row)
    return out


def launch_counts_child() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--count-launches"], env=env,
                          cwd=str(ROOT), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"launch count failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# Environment, output
# ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        head = None
    sources = {f: hashlib.sha256((ROOT / f).read_bytes()).hexdigest()[:16] for f in OP_FILES if (ROOT / f).exists()}
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                git_head=head, git_note="HEAD only: uncommitted changes are not detected; see op_sources_sha256",
                op_sources_sha256=sources, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), cpu=cpu_model(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), dtype="float32")


def fmt_t(d: dict) -> str:
    return f"{d['median_ms']:.2f} [{d['iqr_ms'][0]:.2f}, {d['iqr_ms'][1]:.2f}]"


def fmt_r(d: dict) -> str:
    lo, hi = d["paired_iqr"]
    return f"{d['ratio_of_medians']:.3f} ({d['paired_median']:.3f} [{lo:.3f}, {hi:.3f}])"


def run_markdown(label: str, run: dict) -> list:
    env = run["env"]
    lines = [f"## run `{label}`", ""] + ([f"- {run['note']}"] if run.get("note") else []) + [
             f"- {env['date']}, git HEAD `{env['git_head']}`; sha256 of the op sources: "
             + ", ".join(f"{Path(f).name} `{h}`" for f, h in env["op_sources_sha256"].items()),
             f"- torch {env['torch']}, triton {env['triton']}, CPU {env['cpu']} ({env['cpu_count']} cores), "
             f"{env['torch_threads']} torch thread, {run['repeats']} interleaved repeats",
             f"- command: `{run['command']}`", "",
             "Forward + backward in ms, median [IQR]; ratios: of medians (paired per-repeat median [IQR]).", "",
             "| base | M | K | N | r | p | single | k1 | autograd | k1/single | single/autograd | k1/autograd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in run["cpu_rows"]:
        lines.append(f"| {w['base']} | {w['M']} | {w['K']} | {w['N']} | {w['r']} | {w['dropout_p']} | "
                     + " | ".join(fmt_t(w[n]) for n in IMPLS) + " | "
                     + " | ".join(fmt_r(w[f"{a}/{b}"]) for a, b in PAIRS) + " |")
    worst = ", ".join(f"{a}/{b} {max(w[f'{a}/{b}']['ratio_of_medians'] for w in run['cpu_rows']):.3f}"
                      f" (paired median {max(w[f'{a}/{b}']['paired_median'] for w in run['cpu_rows']):.3f})"
                      for a, b in PAIRS)
    err = max(max(w["max_rel_err"].values()) for w in run["cpu_rows"])
    lines += ["", f"Largest ratio over the rows: {worst}. Largest max |a-b| / max |ref| of y, dx, dA, dB "
              f"(each impl vs float64, k1 vs single, single vs autograd): {err:.2e} (tolerance {TOL:g}).", ""]
    lc = run.get("launches")
    if lc:
        s = lc["shape"]
        lines += [f"Triton launches per layer forward + backward (TRITON_INTERPRET=1, M={s['M']} K={s['K']} "
                  f"N={s['N']} r={s['r']} fp32):", "",
                  "| base | p | single | k1 | single kernels | k1 kernels |", "|---|---|---|---|---|---|"]
        for w in lc["rows"]:
            lines.append(f"| {w['base']} | {w['dropout_p']} | {w['single_launches']} | {w['k1_launches']} | "
                         + ", ".join(f"{k} {v}" for k, v in w["single_kernels"].items()) + " | "
                         + ", ".join(f"{k} {v}" for k, v in w["k1_kernels"].items()) + " |")
        lines.append("")
    return lines


def write_outputs(out: Path, label: str, run: Optional[dict]) -> None:
    """Add ``run`` to ``out/results.json`` under ``label`` (None: add nothing), then write
    ``out/README.md`` from every run in the file."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if run is not None:
        data.setdefault("runs", {})[label] = run
        data["runs"] = dict(sorted(data["runs"].items()))
        path.write_text(json.dumps(data, indent=1) + "\n")
    md = ["# K = 1 multi-arm LoRA op vs the single-arm op (CPU torch path)", "",
          "Written by `benchmarks/bench_lora_k1.py` (its docstring says what each impl is). `single`: "
          "`lora_linear(backend=\"torch\")` of the tree measured; `k1`: `multi_lora_linear_arms` with one arm; "
          "`autograd`: the single-arm torch path before it became a call into the multi-arm one "
          "(plain torch ops under autograd). Ratios below 1: the numerator is faster.", ""]
    for name, r in data.get("runs", {}).items():
        md += run_markdown(name, r)
    (out / "README.md").write_text("\n".join(md))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=15, help="interleaved timed repeats per case")
    ap.add_argument("--label", default="current", help="name of this run in results.json")
    ap.add_argument("--note", default="", help="one line on what the tree measured is")
    ap.add_argument("--no-launches", action="store_true", help="skip the Triton launch count")
    ap.add_argument("--readme-only", action="store_true", help="rewrite README.md from results.json, run nothing")
    ap.add_argument("--count-launches", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.count_launches:
        print(json.dumps(count_launches()))
        return 0
    if args.readme_only:
        write_outputs(Path(args.out), args.label, None)
        return 0
    t0 = time.perf_counter()
    run = dict(env=environment(), note=args.note, repeats=args.repeats,
               command=shlex.join(["python", "-m", "benchmarks.bench_lora_k1",
                                   *(argv if argv is not None else sys.argv[1:])]))
    run["cpu_rows"] = run_cpu(args.repeats)
    run["launches"] = None if args.no_launches else launch_counts_child()
    run["wall_s"] = time.perf_counter() - t0
    write_outputs(Path(args.out), args.label, run)
    print(f"wrote {args.out}/results.json and README.md ({run['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
