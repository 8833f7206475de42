"""Compile every Triton kernel variant rankwise launches for a GPU, on a machine without one.

    python -m benchmarks.compile_check [--arch 90] [--out DIR] [--quick]

The interpreter (how the CPU tests run the kernels) never goes through Triton's
GPU compiler, so a layout or op the compiler rejects, a shared-memory footprint
over the device's limit, or register spills stay invisible there. This script
runs each public op, forward and backward, in bf16, fp16 and fp32 over shapes
that reach every code path (ranks below and above a block, dropout, bias,
deterministic reductions, NF4 with and without double quantization, vocabularies
over one block, rows over one block), on CPU tensors, with a stand-in driver:
each launch is compiled for ``sm_<arch>`` down to a cubin with Triton's bundled
ptxas, and nothing is launched. Outputs are garbage; only the compilation counts.

The big LoRA GEMMs (dense and NF4, forward Y and dX) are also compiled in
every tile config they may be tuned over on the architecture (``kernels/utils.py``
``TILES``, pruned by shared memory; cases labelled ``tiles ...``): by default
each config in one dtype of its family (bf16; fp32 for the fp32 list) and one
shape (``--quick``: bf16 only, the configs after the default); ``--all-tiles`` compiles them in bf16, fp16 and fp32 over more shapes.

Written per kernel variant: name, num_warps, num_stages, shared memory (against
the architecture's per-block limit), and, where Triton's bundled ``cuobjdump``
is there, registers and spill stores. Exit status 1 if any launch failed to
compile or exceeds the shared-memory limit. Results go to ``compile_check.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

# per-block shared memory a kernel may opt into, bytes
MAX_SHARED = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


def arch_family(arch: int) -> int:
    """The tile family (``kernels.utils.device_arch``) of a compute capability x10."""
    return 90 if arch >= 90 and arch != 120 else (80 if arch == 80 else 89)


def _child(arch: int, quick: bool, only: str = None, all_tiles: bool = False) -> dict:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime import driver

    target = GPUTarget("cuda", arch, 32)

    class CompileOnlyDriver:
        """Enough of a driver for JITFunction.run to compile for ``target`` and stop."""

        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(CompileOnlyDriver())
    records, seen = [], set()
    current = {"case": None}

    def compile_only(self):
        if self.module is not None:
            return
        self.module, self.function, self._run = "compile-only", None, (lambda *a, **k: None)
        key = self.hash
        if key in seen:
            return
        seen.add(key)
        md = self.metadata
        rec = dict(name=self.name, case=current["case"], num_warps=md.num_warps, num_stages=md.num_stages, shared=md.shared,
                   shared_ok=md.shared <= MAX_SHARED.get(arch, 232448))

        rec.update(_resources(self.asm.get("cubin")))
        records.append(rec)

    CompiledKernel._init_handles = compile_only

    import rankwise.kernels as ops
    from rankwise.kernels import utils as ku

    smem = MAX_SHARED.get(arch, 232448)
    for mod in list(sys.modules.values()):
        if not getattr(mod, "__name__", "").startswith("rankwise.kernels"):
            continue
        if hasattr(mod, "require_gpu_or_interpreter"):  # let CPU tensors through the "GPU or interpreter" guards
            mod.require_gpu_or_interpreter = lambda *a, **k: None
        if hasattr(mod, "max_shared_memory"):  # configs chosen for the target's shared memory
            mod.max_shared_memory = lambda device: smem
        if hasattr(mod, "device_arch"):  # tile lists of the target's architecture
            mod.device_arch = lambda device: arch_family(arch)
    assert not ku.INTERPRET, "run with TRITON_INTERPRET=0"

    failures = []

    def case(label, fn):
        if only and only not in label:
            return
        current["case"] = label
        try:
            fn()
        except Exception as e:
            failures.append(dict(case=label, error=f"{type(e).__name__}: {e}"[:2000],
                                 where=traceback.format_exc().splitlines()[-6:]))

    dtypes = [torch.bfloat16, torch.float16] if quick else [torch.bfloat16, torch.float16, torch.float32]

    def t(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, dtype=torch.float32).to(dtype).requires_grad_(grad)

    from rankwise.quant import quantize_nf4

    for dt in dtypes:
        # aligned; all odd; only the token count odd (packed batches); ranks of one and two blocks
        for (M, K, N, r) in ([(64, 64, 64, 16), (37, 45, 29, 3), (37, 64, 80, 16), (96, 64, 80, 128),
                              (96, 64, 80, 256)][:3 if quick else 5]):
            for dropout, bias in ((0.0, True), (0.1, False)):
                def lora(M=M, K=K, N=N, r=r, dropout=dropout, bias=bias, dt=dt):
                    x, W = t(M, K, dtype=dt, grad=True), t(N, K, dtype=dt)
                    A, B = t(r, K, dtype=dt, grad=True), t(N, r, dtype=dt, grad=True)
                    b = t(N, dtype=dt) if bias else None
                    y = ops.lora_linear(x, W, A, B, 2.0, bias=b, dropout_p=dropout, seed=1, backend="triton")
                    y.backward(torch.ones_like(y))
                case(f"lora_linear {dt} M={M} K={K} N={N} r={r} p={dropout} bias={bias}", lora)
        # the split path's in-place tails (torch's GEMM runs for real on the CPU): odd shape, a rank past one block
        for (M, K, N, r) in ((37, 45, 29, 3), (96, 64, 80, 128)):
            def split(M=M, K=K, N=N, r=r, dt=dt):
                x, W = t(M, K, dtype=dt, grad=True), t(N, K, dtype=dt)
                A, B = t(r, K, dtype=dt, grad=True), t(N, r, dtype=dt, grad=True)
                y = ops.lora_linear(x, W, A, B, 2.0, bias=t(N, dtype=dt), dropout_p=0.1, seed=1, backend="triton",
                                    path="split")
                y.backward(torch.ones_like(y))
            case(f"lora_linear split {dt} M={M} K={K} N={N} r={r} p=0.1 bias=True", split)
        torch.use_deterministic_algorithms(True)
        case(f"lora_linear {dt} deterministic", lambda dt=dt: ops.lora_linear(
            t(40, 64, dtype=dt, grad=True), t(48, 64, dtype=dt), t(8, 64, dtype=dt, grad=True),
            t(48, 8, dtype=dt, grad=True), 1.0, backend="triton").sum().backward())
        torch.use_deterministic_algorithms(False)
        for dq in (False, True):
            def nf4(dq=dq, dt=dt):
                q = quantize_nf4(t(128, 64, dtype=dt), double_quant=dq)
                x = t(40, 64, dtype=dt, grad=True)
                A, B = t(16, 64, dtype=dt, grad=True), t(128, 16, dtype=dt, grad=True)
                ops.lora_linear(x, q, A, B, 2.0, dropout_p=0.1, seed=3, backend="triton").sum().backward()
                ops.lora_linear(x, q, A, B, 2.0, dropout_p=0.1, seed=3, backend="triton",
                                path="split").sum().backward()
                ops.nf4_dequantize(q, backend="triton")
                ops.nf4.nf4_quantize_packed(t(128, 64, dtype=dt), 64, q.code if hasattr(q, "code") else
                                          torch.linspace(-1, 1, 16))
            case(f"nf4 {dt} double_quant={dq}", nf4)
        # K arms over one base: mixed ranks (one and two rank blocks), an empty arm, dense and NF4, dropout
        for ranks, rows, nf4_base, dropout in (((1, 16, 3), (37, 0, 20), False, 0.0),
                                               ((128, 2), (24, 40), False, 0.1),
                                               ((16, 4, 1), (8, 33, 5), True, 0.1)):
            def multi(ranks=ranks, rows=rows, nf4_base=nf4_base, dropout=dropout, dt=dt):
                K, N, R = 64, 80, sum(ranks)
                W = quantize_nf4(t(N, K, dtype=dt)) if nf4_base else t(N, K, dtype=dt)
                x = t(sum(rows), K, dtype=dt, grad=True)
                A, B = t(R, K, dtype=dt, grad=True), t(N, R, dtype=dt, grad=True)
                y = ops.multi_lora_linear(x, W, A, B, ranks, [2.0] * len(ranks), rows,
                                          bias=None if nf4_base else t(N, dtype=dt), dropout_p=dropout,
                                          seeds=list(range(1, len(ranks) + 1)), backend="triton")
                y.backward(torch.ones_like(y))
            case(f"multi_lora_linear {dt} ranks={ranks} rows={rows} nf4={nf4_base} p={dropout}", multi)
        for (N, H, V, red) in ((48, 32, 1000, "mean"), (48, 32, 70000, "none"), (16, 32, 100, "sum")):
            def lce(N=N, H=H, V=V, red=red, dt=dt):
                h, W = t(N, H, dtype=dt, grad=True), t(V, H, dtype=dt, grad=True)
                tg = torch.randint(0, V, (N,))
                ops.linear_cross_entropy(h, W, tg, reduction=red, backend="triton").sum().backward()
            case(f"linear_cross_entropy {dt} N={N} H={H} V={V} {red}", lce)
        for H in (37, 4096, 20000):
            def rms(H=H, dt=dt):
                x, w = t(24, H, dtype=dt, grad=True), t(H, dtype=dt, grad=True)
                ops.rms_norm(x, w, 1e-6, backend="triton").sum().backward()
            case(f"rms_norm {dt} H={H}", rms)
        case(f"swiglu {dt}", lambda dt=dt: ops.swiglu(t(24, 11008, dtype=dt, grad=True), t(24, 11008, dtype=dt, grad=True),
                                                    backend="triton").sum().backward())
        case(f"geglu {dt}", lambda dt=dt: ops.geglu(t(24, 11008, dtype=dt, grad=True), t(24, 11008, dtype=dt, grad=True),
                                                  backend="triton").sum().backward())
    # every tile config the big GEMMs may be tuned over on this architecture
    ll, nl = sys.modules["rankwise.kernels.lora_linear"], sys.modules["rankwise.kernels.nf4_lora"]
    tile_dtypes = ([torch.bfloat16, torch.float16, torch.float32] if all_tiles else
                   [torch.bfloat16] if quick else [torch.bfloat16, torch.float32])
    tile_shapes = [(256, 128, 192, 16), (37, 45, 29, 3), (96, 64, 80, 128)] if all_tiles else [(256, 128, 192, 16)]
    cpu = torch.device("cpu")
    for dt in tile_dtypes:
        for (M, K, N, r) in tile_shapes:
            # --quick: the configs after the default (the cases above compile the default)
            for cfg in ll.tile_configs(dt, cpu, r)[1 if quick else 0:]:
                def dense(M=M, K=K, N=N, r=r, dt=dt, cfg=cfg):
                    x, W, dY = t(M, K, dtype=dt), t(N, K, dtype=dt), t(M, N, dtype=dt)
                    A, B, S, dS = t(r, K, dtype=dt), t(N, r, dtype=dt), t(M, r, dtype=dt), t(M, r, dtype=dt)
                    ll._fwd_gemm(x, W, S, B, 2.0, t(N, dtype=dt), cfg)
                    ll._bwd_dX(dY, W, dS, A, 0.1, 1, cfg)
                case(f"tiles lora {ku.config_name(cfg)} {dt} M={M} K={K} N={N} r={r}", dense)
            for cfg in nl.nf4_tile_configs(dt, cpu, r)[1 if quick else 0:]:
                def nf4(M=M, K=K, N=N, r=r, dt=dt, cfg=cfg):
                    q = quantize_nf4(t(N, K, dtype=dt), double_quant=True)
                    tensors, const = sys.modules["rankwise.kernels.nf4"].nf4_kernel_args(q)
                    meta = (const["BLOCKSIZE"], const["DOUBLE"], const["NESTED_BLOCKSIZE"], q.dtype)
                    x, dY = t(M, K, dtype=dt), t(M, N, dtype=dt)
                    A, B, S, dS = t(r, K, dtype=dt), t(N, r, dtype=dt), t(M, r, dtype=dt), t(M, r, dtype=dt)
                    nl._nf4_fwd_gemm(x, tensors, meta, S, B, 2.0, None, cfg)
                    nl._nf4_bwd_dX(dY, tensors, meta, dS, A, 0.1, 1, cfg)
                case(f"tiles nf4 {ku.config_name(cfg)} {dt} M={M} K={K} N={N} r={r}", nf4)

    def adamw():
        n = 1000
        p, g, m, v = (torch.randn(n) for _ in range(4))
        packed = torch.randint(0, 255, ((n + 7) // 8,), dtype=torch.uint8)
        ops.masked_adamw_step(p, g, m, v.abs(), packed, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                            weight_decay=0.0, step=1)
        ops.apply_mask(p, packed)
    case("masked_adamw_step / apply_mask", adamw)
    case("dropout_mask", lambda: ops.dropout_mask((37, 45), 0.1, 5, device="cpu"))
    return dict(arch=f"sm_{arch}", triton=triton.__version__, torch=torch.__version__, kernels=records,
                failures=failures, over_shared=[r for r in records if not r["shared_ok"]],
                spilling=[r for r in records if r.get("spills")])


def _resources(cubin) -> dict:
    """Registers and spill stores of a cubin, read by Triton's bundled cuobjdump (if present)."""
    if not cubin:
        return {}
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    res = {}
    for key, name in (("REG", "registers"), ("STACK", "stack_bytes"), ("LOCAL", "local_bytes")):
        m = re.search(key + r":(\d+)", out)
        if m:
            res[name] = int(m.group(1))
    if "stack_bytes" in res:  # a stack frame in these kernels means registers spilled to local memory
        res["spills"] = res["stack_bytes"] > 0 or res.get("local_bytes", 0) > 0
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--out", default=None, help="directory for compile_check.json (default: benchmarks/results/_scratch)")
    ap.add_argument("--quick", action="store_true", help="bf16 and fp16 only, fewer shapes")
    ap.add_argument("--only", default=None, help="only the cases whose label contains this text")
    ap.add_argument("--all-tiles", action="store_true",
                    help="compile every tuned tile config in bf16, fp16 and fp32 over several shapes "
                         "(default: each config in one dtype of its family, one shape)")
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out_dir = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "_scratch"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "compile_check.json"
    if not args._child:  # triton must be imported with the interpreter off: a fresh process
        env = dict(os.environ, TRITON_INTERPRET="0")
        cmd = [sys.executable, "-m", "benchmarks.compile_check", "--_child", "--arch", str(args.arch),
               "--out", str(out_dir)] + (["--quick"] if args.quick else []) + (["--only", args.only] if args.only else []) + (["--all-tiles"] if args.all_tiles else [])
        return subprocess.run(cmd, env=env, cwd=str(Path(__file__).resolve().parent.parent)).returncode
    result = _child(args.arch, args.quick, args.only, args.all_tiles)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"{len(result['kernels'])} kernel variants compiled for {result['arch']} (triton {result['triton']}); "
          f"{len(result['failures'])} failed, {len(result['over_shared'])} over the shared-memory limit, "
          f"{len(result['spilling'])} spilling registers; wrote {path}")
    for f in result["failures"]:
        print(f"  FAILED {f['case']}: {f['error'][:300]}")
    for r in result["over_shared"]:
        print(f"  OVER SHARED {r['name']}: {r['shared']} bytes")
    for r in result["spilling"]:
        print(f"  SPILLS {r['name']} ({r['case']}; {r['num_warps']} warps, {r['registers']} registers): "
              f"{r['stack_bytes']} bytes of stack")
    return 1 if result["failures"] or result["over_shared"] else 0


if __name__ == "__main__":
    sys.exit(main())
