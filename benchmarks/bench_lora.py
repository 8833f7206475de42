"""Fused LoRA layer vs a PEFT-style eager layer vs that layer under torch.compile,
vs the frozen base layer alone; forward and forward+backward; time, peak memory
and the bytes autograd saves for backward. Writes ``bench_lora.json``.

    python -m benchmarks.bench_lora [--out DIR] [--smoke] [--no-compile]

On a GPU the grid is 7B-class (bf16; 2k-16k tokens; 4096->4096, 4096->11008,
11008->4096; r = 8..256). On the CPU the shapes are small, times are ratios
within this run only, and the fused op's Triton kernels are not timed (they run
under the interpreter there); its saved-for-backward bytes are still measured.

Every row also carries the roofline of each pass (``benchmarks.roofline``): model
FLOPs and bytes, ``max(FLOPs / matmul ceiling, bytes / copy bandwidth)`` with
both ceilings measured in this run, the attained fraction of it (timed passes
only) and the bound (compute or memory).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from benchmarks import roofline as rl
from benchmarks.common import environment, peak_memory_mb, saved_for_backward_mb, time_ms, write_json  # noqa: E402

GPU_GRID = dict(tokens=[2048, 8192, 16384], shapes=[(4096, 4096), (4096, 11008), (11008, 4096)],
                ranks=[8, 16, 64, 256], dtype=torch.bfloat16)
CPU_GRID = dict(tokens=[512], shapes=[(256, 256), (256, 688), (688, 256)], ranks=[8, 64], dtype=torch.float32)
SMOKE_GRID = dict(tokens=[64], shapes=[(64, 96)], ranks=[4], dtype=torch.float32)
TARGET = dict(tokens=8192, shape=(4096, 4096), r=16)
IMPL_LABEL = dict(rankwise="rankwise fused LoRA", rankwise_fused="rankwise LoRA, path=fused",
                  rankwise_split="rankwise LoRA, path=split", peft_eager="peft_eager LoRA", torch_compile="torch_compile LoRA",
                  base="base layer")


def peft_style(x, W, b, A, B, s, p):
    """What PEFT's lora.Linear computes in eager mode."""
    return F.linear(x, W, b) + F.linear(F.linear(F.dropout(x, p, True) if p else x, A), B) * s


def base_only(x, W, b, A, B, s, p):
    return F.linear(x, W, b)


def make_impls(compile_ok: bool, cuda: bool):
    from rankwise.kernels import lora_linear

    impls = {"base": base_only, "peft_eager": peft_style}
    if compile_ok:  # compiled afresh for every shape (see main), so no shape hits dynamo's recompile limit
        impls["torch_compile"] = peft_style
    impls["rankwise"] = lambda x, W, b, A, B, s, p: lora_linear(x, W, A, B, s, b, p, backend="triton")
    if cuda:  # each GEMM path forced, to check what path="auto" (the tuning cache) picks against both
        impls["rankwise_fused"] = lambda x, W, b, A, B, s, p: lora_linear(x, W, A, B, s, b, p, backend="triton",
                                                                          path="fused")
        impls["rankwise_split"] = lambda x, W, b, A, B, s, p: lora_linear(x, W, A, B, s, b, p, backend="triton",
                                                                          path="split")
    return impls


MODEL_NAME = dict(base="base_linear", peft_eager="lora_peft", torch_compile="lora_peft(fused_elementwise)",
                  rankwise="lora_fused", rankwise_fused="lora_fused", rankwise_split="lora_fused")


def cost_model(name, n, k_in, k_out, r, dtype, dropout):
    """The FLOP / byte model (``benchmarks.roofline``) of each impl, per pass."""
    e = rl.dtype_bytes(dtype)
    if name == "base":
        return rl.base_linear(n, k_in, k_out, e)
    if name == "peft_eager":
        return rl.lora_peft(n, k_in, k_out, r, e, p=dropout)
    if name == "torch_compile":
        return rl.lora_peft(n, k_in, k_out, r, e, p=dropout, fused_elementwise=True)
    if name in ("rankwise", "rankwise_fused", "rankwise_split"):  # the split path's extra bytes: 2 x n x r, small
        return rl.lora_fused(n, k_in, k_out, r, e)
    raise KeyError(name)


def bench_one(impl, name, n, k_in, k_out, r, dtype, device, cuda, dropout, ceilings=None):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, k_in, generator=g).to(device, dtype).requires_grad_()
    W = (torch.randn(k_out, k_in, generator=g) / k_in**0.5).to(device, dtype)
    b = None
    A = (torch.randn(r, k_in, generator=g) / k_in**0.5).to(device, dtype).requires_grad_()
    B = (torch.randn(k_out, r, generator=g) / r**0.5).to(device, dtype).requires_grad_()
    dy = torch.randn(n, k_out, generator=g).to(device, dtype)
    args = (x, W, b, A, B, 2.0, dropout)
    params = [W, A, B]
    grads_of = [x] if name == "base" else [x, A, B]

    def fwd():
        with torch.no_grad():
            return impl(*args)

    def fwd_bwd():
        y = impl(*args)
        return torch.autograd.grad(y, grads_of, dy)

    row = dict(impl=name, tokens=n, in_features=k_in, out_features=k_out, r=r, dtype=str(dtype).split(".")[-1],
               dropout=dropout)
    timed = cuda or not name.startswith("rankwise")
    if timed:
        f = time_ms(fwd)
        fb = time_ms(fwd_bwd)
        row.update(fwd_ms=f["ms"], fwd_bwd_ms=fb["ms"], fwd_stats=f, fwd_bwd_stats=fb)
        row["peak_mem_mb"] = peak_memory_mb(fwd_bwd)
    else:
        row.update(fwd_ms=None, fwd_bwd_ms=None,
                   note="not timed: Triton kernels run under the interpreter on the CPU")
    row["saved_for_backward_mb"] = saved_for_backward_mb(lambda: impl(*args), exclude=params)
    if ceilings is not None:
        cost = cost_model(name, n, k_in, k_out, r, dtype, dropout)
        row["roofline_model"] = MODEL_NAME[name]
        for prefix in ("fwd", "fwd_bwd"):
            rl.annotate(row, prefix, cost[prefix], row[f"{prefix}_ms"], ceilings)
    return row


def ratios(rows):
    """fwd+bwd time of each impl over base and over peft_eager at the same shape."""
    out = []
    key = lambda r: (r["tokens"], r["in_features"], r["out_features"], r["r"], r["dtype"])  # noqa: E731
    by = {}
    for row in rows:
        by.setdefault(key(row), {})[row["impl"]] = row
    for k, group in by.items():
        base, peft = group.get("base"), group.get("peft_eager")
        for name, row in group.items():
            if row.get("fwd_bwd_ms") is None:
                continue
            entry = dict(zip(("tokens", "in_features", "out_features", "r", "dtype"), k), impl=name)
            if base and base.get("fwd_bwd_ms"):
                entry["fwd_bwd_vs_base"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
            if peft and peft.get("fwd_bwd_ms"):
                entry["fwd_bwd_vs_peft"] = row["fwd_bwd_ms"] / peft["fwd_bwd_ms"]
                entry["fwd_vs_peft"] = row["fwd_ms"] / peft["fwd_ms"]
            out.append(entry)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for bench_lora.json (default benchmarks/results/_scratch)")
    ap.add_argument("--smoke", action="store_true", help="one tiny configuration, seconds")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--tokens", default=None, help="comma-separated token counts instead of the grid's")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    grid = dict(SMOKE_GRID if args.smoke else (GPU_GRID if cuda else CPU_GRID))
    if args.tokens:
        grid["tokens"] = [int(t) for t in args.tokens.split(",")]
    device = "cuda" if cuda else "cpu"
    impls = make_impls(compile_ok=not (args.no_compile or args.smoke), cuda=cuda)
    ceilings = rl.measure_ceilings(grid["dtype"], device)
    rows = []
    from tqdm import tqdm

    configs = [(n, s, r) for n in grid["tokens"] for s in grid["shapes"] for r in grid["ranks"]]
    for n, (k_in, k_out), r in tqdm(configs, desc="bench_lora", disable=args.smoke):
        for name, impl in impls.items():
            if name == "torch_compile" and cuda and r != TARGET["r"]:
                continue  # one compile per shape is minutes; keep it to the target rank on GPU
            if name == "torch_compile":
                torch._dynamo.reset()
                impl = torch.compile(peft_style, dynamic=False)
            try:
                rows.append(bench_one(impl, name, n, k_in, k_out, r, grid["dtype"], device, cuda, args.dropout,
                                      ceilings))
            except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
                rows.append(dict(impl=name, tokens=n, in_features=k_in, out_features=k_out, r=r, error=f"OOM: {e}"))
                torch.cuda.empty_cache()
        # the rows so far, so a run cut off by a time limit (a device lease) keeps what it measured
        write_json(dict(benchmark="bench_lora", env=environment(), partial=True, rows=rows, ratios=ratios(rows)),
                   "bench_lora.partial", args.out)
    payload = dict(benchmark="bench_lora", env=environment(), grid={k: str(v) for k, v in grid.items()},
                   ceilings=ceilings, rows=rows, ratios=ratios(rows))
    if cuda and not args.smoke:
        t = [x for x in payload["ratios"] if x["impl"] == "rankwise" and x["tokens"] == TARGET["tokens"]
             and (x["in_features"], x["out_features"]) == TARGET["shape"] and x["r"] == TARGET["r"]]
        if t:
            payload["target"] = dict(goal="fused fwd+bwd <= 1.05x base layer, faster than PEFT-style eager",
                                     fwd_bwd_vs_base=t[0].get("fwd_bwd_vs_base"),
                                     fwd_bwd_vs_peft=t[0].get("fwd_bwd_vs_peft"))
    payload["summary"] = [
        dict(figure=f"{x['impl']} fwd+bwd, {x['tokens']} tok, {x['in_features']}->{x['out_features']}, r={x['r']}",
             value=x[k], unit="x", baseline=k.split("_vs_")[1])
        for x in payload["ratios"] if x["impl"] != "base" for k in ("fwd_bwd_vs_base", "fwd_bwd_vs_peft")
        if k in x and not (x["impl"] == "peft_eager" and k == "fwd_bwd_vs_peft")
    ] + [
        dict(figure=f"{x['impl']} saved for backward, {x['tokens']} tok, {x['in_features']}->{x['out_features']}, "
             f"r={x['r']}", value=x["saved_for_backward_mb"], unit="MB", baseline="-")
        for x in rows if "saved_for_backward_mb" in x and x["impl"] in ("peft_eager", "rankwise")
    ]

    def headline(x):  # roofline figures: the target shape on a full GPU run, every shape otherwise
        return args.smoke or not cuda or (x["tokens"] == TARGET["tokens"] and x["r"] == TARGET["r"]
                                          and (x["in_features"], x["out_features"]) == TARGET["shape"])

    payload["summary"] += rl.ceiling_figures(ceilings) + [
        f for x in rows if "error" not in x and headline(x)
        for f in [rl.roofline_figure(f"{IMPL_LABEL.get(x['impl'], x['impl'])} fwd+bwd, {x['tokens']} tok, "
                                     f"{x['in_features']}->{x['out_features']}, r={x['r']}", x)] if f
    ]
    path = write_json(payload, "bench_lora", args.out)
    (path.parent / "bench_lora.partial.json").unlink(missing_ok=True)
    print(f"wrote {path}")
    c = ceilings
    print(f"  ceilings ({c['dtype']}, {c['threads']} threads): matmul {c['peak_flops'] / 1e9:.1f} GFLOP/s, "
          f"copy {c['peak_bw'] / 1e9:.1f} GB/s")
    for x in rows:
        if "fwd_bwd_flops" in x:
            frac = x["fwd_bwd_roofline_frac"]
            print(f"  {x['tokens']:>6} {x['in_features']}->{x['out_features']} r={x['r']:<3} {x['impl']:<14} "
                  f"fwd+bwd {x['fwd_bwd_flops'] / 1e6:.1f} MFLOP {x['fwd_bwd_bytes'] / 2**20:.2f} MiB  "
                  f"roofline {x['fwd_bwd_roofline_ms']:.4f} ms ({x['fwd_bwd_bound']})  "
                  + (f"attained {frac:.3f}" if frac is not None else "not timed"))
    for x in payload["ratios"]:
        if x["impl"] != "base":
            print(f"  {x['tokens']:>6} {x['in_features']}->{x['out_features']} r={x['r']:<3} {x['impl']:<14} "
                  f"fwd+bwd vs base {x.get('fwd_bwd_vs_base', float('nan')):.2f}x  "
                  f"vs peft {x.get('fwd_bwd_vs_peft', float('nan')):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
