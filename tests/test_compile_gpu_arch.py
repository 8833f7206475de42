"""Every Triton kernel compiles for the H100/H200 (sm_90) and the RTX 4090 / L4 class
(sm_89, 99 KiB of shared memory per block; the A100's sm_80 takes the same configs), checked on this
machine without a GPU: benchmarks/compile_check.py runs each op with a compile-only
driver, through Triton's GPU compiler and bundled ptxas down to a cubin. The
interpreter, which runs the kernels in the other tests, never meets that compiler
(it found an fp64 constant that broke the NF4 quantizer's compile, and NF4 GEMMs over
the shared memory per block of an H100 and of consumer GPUs, none visible to the
interpreter). The big LoRA GEMMs are also compiled in every tile config they may be
tuned over (``tiles ...`` cases; ~25 s per architecture with Triton's cache cold)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ptxas():
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas(), reason="triton without its bundled ptxas")
@pytest.mark.parametrize("arch", [90, 89])  # sm_80 takes sm_89's configs (below Hopper's shared memory)
def test_every_kernel_compiles_for_the_gpu(tmp_path, arch):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_check", "--quick", "--arch", str(arch),
                           "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert (tmp_path / "compile_check.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "compile_check.json").read_text())
    assert not result["failures"], json.dumps(result["failures"], indent=1)[:4000]
    assert not result["over_shared"], result["over_shared"]
    assert proc.returncode == 0, proc.stdout[-2000:]
    compiled = {r["name"] for r in result["kernels"]}
    defined = set()
    for f in (ROOT / "kernels").glob("*.py"):
        defined |= set(re.findall(r"@triton\.jit\s*\ndef (_\w+_kernel)\(", f.read_text()))
    assert defined and defined <= compiled, f"kernels never compiled by the check: {sorted(defined - compiled)}"
    # every tile config the big LoRA GEMMs may be tuned over (kernels/utils.py TILES; all fit both
    # architectures' shared memory), compiled in bf16 (the fp32 lists: the script without --quick)
    from rankwise.kernels.utils import TILES, config_name

    cases = {r["case"] for r in result["kernels"]}
    for kind, label in (("dense", "lora"), ("nf4", "nf4")):
        for bm, bn, bk, warps, stages in TILES[arch][(kind, "16bit")]:
            name = config_name(dict(BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages))
            assert any(c.startswith(f"tiles {label} {name} ") for c in cases), f"{kind} tiles {name} not compiled"
    # 16-bit variants of realistic shapes (hidden sizes multiples of 16, any token count, rank <= 256) keep
    # their registers: no stack frame
    spills = [r for r in result["spilling"] if "float32" not in (r["case"] or "") and "K=45" not in (r["case"] or "")]
    assert not spills, spills
