"""Benchmark of the sparse update-masking ops (CPU).

Three measurements, appended as rows to a JSON file
(``<out>/bench_masking.json`` with ``env``, ``rows`` and a ``summary`` of ratios
for ``python -m benchmarks.run``):

* ``select``: choose the top ``fraction`` of ``n`` fp32 values (a list of
  chunks, as the tensors of a model) with ``rankwise.masking.topk_mask`` (radix
  select, packed mask out) vs ``torch.topk`` and ``torch.kthvalue`` on the flat
  tensor. Time (best of ``--repeat``) and peak extra resident memory.
* ``mask_memory``: bytes of a bit-packed mask vs a bool mask.
* ``restore``: ``rankwise restore`` (streaming) on a generated safetensors
  checkpoint vs the reference method (load both, one flat tensor of relative
  changes, ``torch.topk``, restore, save).

Peak memory is measured on Linux by resetting the kernel's high-water mark
(``/proc/self/clear_refs``) before each case and reading ``VmHWM`` after, minus
the resident size before; elsewhere it is reported as null.

Usage::

    python -m benchmarks.bench_masking --smoke
    python -m benchmarks.bench_masking --sizes 1e7 1e8 --restore-sizes 1e7 1e8 --out benchmarks/results/cpu
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time

import torch


def _status_kb(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(fn, repeat: int = 1):
    """(best seconds, peak extra resident MiB or None, result of the last call)."""
    best, peak, out = float("inf"), None, None
    for _ in range(repeat):
        out = None
        gc.collect()
        ok = _reset_peak()
        before = _status_kb("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        hwm = _status_kb("VmHWM")
        if ok and before is not None and hwm is not None:
            extra = (hwm - before) / 1024
            peak = extra if peak is None else max(peak, extra)
    return best, peak, out


def bench_select(n: int, fraction: float, repeat: int, chunk: int = 1 << 22, torch_ops: bool = True):
    from rankwise import masking as M

    g = torch.Generator().manual_seed(0)
    flat = torch.rand(n, generator=g)  # non-negative, like the relative change
    chunks = list(flat.split(chunk))
    k = M.select_count(n, fraction)
    rows = []
    t, mem, masks = measure(lambda: M.topk_mask(chunks, fraction, packed=True), repeat)
    assert sum(M.mask_count(m, c.numel()) for m, c in zip(masks, chunks)) == k
    del masks
    rows.append(dict(bench="select", method="rankwise.topk_mask", n=n, k=k, seconds=t, peak_mib=mem))
    if torch_ops:
        t, mem, _ = measure(lambda: torch.topk(flat, k).indices.numel(), repeat)
        rows.append(dict(bench="select", method="torch.topk", n=n, k=k, seconds=t, peak_mib=mem))
        t, mem, _ = measure(lambda: float(torch.kthvalue(flat, n - k + 1).values), repeat)
        rows.append(dict(bench="select", method="torch.kthvalue", n=n, k=k, seconds=t, peak_mib=mem))
    return rows


def bench_mask_memory(n: int):
    from rankwise import masking as M

    mask = torch.rand(n) < 0.2
    packed = M.pack_mask(mask)
    return [dict(bench="mask_memory", n=n, bool_bytes=mask.numel() * mask.element_size(),
                 packed_bytes=packed.numel(), ratio=mask.numel() / max(packed.numel(), 1))]


def _make_checkpoint(root: str, n: int, shard_bytes: int):
    """A base/tuned pair of ~n fp32 decoder-layer weights (plus an embedding and norms), sharded."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    hidden = 1024 if n >= 2**25 else (512 if n >= 2**22 else 128)
    per_layer = 4 * hidden * hidden  # four hidden x hidden matrices per layer
    layers = max(1, n // per_layer)
    names = [(f"model.layers.{i}.{m}.weight", (hidden, hidden)) for i in range(layers)
             for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    names += [(f"model.layers.{i}.input_layernorm.weight", (hidden,)) for i in range(layers)]
    names += [("model.embed_tokens.weight", (1000, hidden))]  # out of scope, copied
    paths = {}
    for kind in ("base", "tuned"):
        d = os.path.join(root, kind)
        os.makedirs(d)
        shard, size, idx, weight_map = {}, 0, 0, {}

        def flush():
            nonlocal shard, size, idx
            if shard:
                fname = f"model-{idx:05d}.safetensors"
                save_file(shard, os.path.join(d, fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
                shard, size, idx = {}, 0, idx + 1

        g.manual_seed(1)
        for name, shape in names:
            t = torch.randn(shape, generator=g)
            if kind == "tuned":
                t += torch.randn(shape) * 0.01
            shard[name] = t
            size += t.numel() * 4
            if size >= shard_bytes:
                flush()
        flush()
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"model_type": "synthetic"}, f)
        paths[kind] = d
    return paths, layers * per_layer


def _reference_restore(base_dir, tuned_dir, out_dir, fraction):
    """The reference method: whole models in memory, one flat tensor, torch.topk."""
    from safetensors.torch import load_file, save_file

    def load(d):
        sd = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                sd.update(load_file(os.path.join(d, f)))
        return sd

    base, tuned = load(base_dir), load(tuned_dir)
    names = [n for n in tuned if "layers" in n and "norm" not in n]
    flat = torch.cat([((tuned[n] - base[n]).abs() / (base[n].abs() + 1e-8)).reshape(-1) for n in names])
    k = int(flat.numel() * fraction)
    idx = torch.topk(flat, k).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[idx] = True
    off = 0
    for n in names:
        m = mask[off:off + tuned[n].numel()].view(tuned[n].shape)
        tuned[n][m] = base[n][m]
        off += tuned[n].numel()
    os.makedirs(out_dir, exist_ok=True)
    save_file(tuned, os.path.join(out_dir, "model.safetensors"))
    return k


def bench_restore(n: int, fraction: float, shard_bytes: int):
    from rankwise.restore import restore_checkpoint

    root = tempfile.mkdtemp(prefix="rankwise-bench-")
    try:
        paths, n_scope = _make_checkpoint(root, n, shard_bytes)
        rows = []
        t, mem, stats = measure(lambda: restore_checkpoint(
            paths["base"], paths["tuned"], os.path.join(root, "out"), fraction, max_shard_size=shard_bytes,
            progress=False))
        rows.append(dict(bench="restore", method="rankwise restore (streaming)", n=n_scope, k=stats["k"],
                         seconds=t, peak_mib=mem, shard_mib=shard_bytes / 2**20))
        t, mem, k = measure(lambda: _reference_restore(paths["base"], paths["tuned"], os.path.join(root, "ref"), fraction))
        rows.append(dict(bench="restore", method="flat tensor + torch.topk", n=n_scope, k=k, seconds=t, peak_mib=mem,
                         shard_mib=shard_bytes / 2**20))
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def summarize(rows):
    """Ratios of each baseline to rankwise measured in the same run (speed-up, memory saving)."""
    out = []
    for bench, ours, bases in (("select", "rankwise.topk_mask", ("torch.topk", "torch.kthvalue")),
                               ("restore", "rankwise restore (streaming)", ("flat tensor + torch.topk",))):
        for r in [r for r in rows if r.get("bench") == bench and r["method"] == ours]:
            for b in [x for x in rows if x.get("bench") == bench and x["method"] in bases and x["n"] == r["n"]]:
                out.append(dict(figure=f"{bench} n={r['n']:.0e}: speed-up vs {b['method']}",
                                value=b["seconds"] / r["seconds"], unit="x", baseline=b["method"]))
                if r["peak_mib"] and b["peak_mib"]:
                    out.append(dict(figure=f"{bench} n={r['n']:.0e}: peak memory saving vs {b['method']}",
                                    value=b["peak_mib"] / max(r["peak_mib"], 1e-3), unit="x", baseline=b["method"]))
    for r in rows:
        if r.get("bench") == "mask_memory":
            out.append(dict(figure=f"mask n={r['n']:.0e}: bool / packed bytes", value=r["ratio"], unit="x", baseline="bool mask"))
    return out


def main(argv=None) -> int:
    """Run the benchmark; print the rows and write ``<out>/bench_masking.json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=float, default=[1e7, 1e8], help="selection sizes (up to 1e9)")
    p.add_argument("--restore-sizes", nargs="+", type=float, default=[1e7, 1e8], help="checkpoint sizes for restore")
    p.add_argument("--fraction", type=float, default=0.2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--shard-mib", type=float, default=256, help="checkpoint shard size in MiB")
    p.add_argument("--no-torch-above", type=float, default=3e8, help="skip torch.topk/kthvalue above this n (memory)")
    p.add_argument("--out", default=None, help="directory for bench_masking.json (default benchmarks/results/_scratch)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.restore_sizes, args.repeat, args.shard_mib = [2e5], [5e5], 1, 0.25

    import rankwise  # noqa: F401
    from rankwise import _C

    from benchmarks.common import environment, write_json

    # The same record as every script (device, date, versions), plus the threads the C++ ops use.
    env = dict(environment(), omp_threads=_C.num_threads(), cpu_count=os.cpu_count())
    rows = []
    for n in args.sizes:
        rows += bench_select(int(n), args.fraction, args.repeat, torch_ops=n <= args.no_torch_above)
        rows += bench_mask_memory(int(min(n, 1e8)))
    for n in args.restore_sizes:
        rows += bench_restore(int(n), args.fraction, int(args.shard_mib * 2**20))
    for r in rows:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    payload = dict(benchmark="bench_masking", env=env, args=vars(args), rows=rows, summary=summarize(rows))
    path = write_json(payload, "bench_masking", args.out)
    for f in payload["summary"]:
        print(f"{f['figure']}: {f['value']:.3g}{f['unit']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
