"""Smoke run of the whole CPU benchmark suite at its smallest size: every script
runs and its JSON carries every figure. No test asserts a timing.

Also the roofline models of ``benchmarks.roofline``: FLOPs and bytes against
hand-counted tiny shapes, against torch's own FLOP counter and against the bytes
the eager layer's aten ops actually read and write."""
import json

import pytest
import torch

from benchmarks import roofline as rl
from benchmarks import run


@pytest.fixture(scope="module")
def smoke_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_smoke")
    rc = run.main(["--suite", "cpu", "--smoke", "--out", str(out)])
    return rc, out


def test_cpu_suite_smoke_writes_every_figure(smoke_suite):
    rc, tmp_path = smoke_suite
    summary = json.loads((tmp_path / "summary.json").read_text())
    failed = {k: v["error"] for k, v in summary["results"].items() if v.get("error")}
    assert rc == 0 and not failed, f"benchmark scripts failed: {failed}"
    assert set(summary["results"]) == set(run.SCRIPTS)
    for name in run.SCRIPTS:
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["env"]["torch"] and payload["env"]["device"]
        figs = summary["results"][name]["figures"]
        assert figs, f"{name}: no figures"
        for f in figs:
            assert isinstance(f["value"], (int, float)), f"{name}: figure {f['figure']!r} has no number"
    md = (tmp_path / "summary.md").read_text()
    for name in run.SCRIPTS:
        assert f"## {name}" in md


ROOFLINE_FIELDS = ("flops", "bytes", "roofline_ms", "roofline_frac", "bound")


@pytest.mark.parametrize("name", ["bench_lora", "bench_nf4"])
def test_smoke_rows_carry_roofline(smoke_suite, name):
    _, out = smoke_suite
    payload = json.loads((out / f"{name}.json").read_text())
    c = payload["ceilings"]
    assert c["peak_flops"] > 0 and c["peak_bw"] > 0 and c["dtype"] == "float32"
    timed = 0
    for row in payload["rows"]:
        for prefix in ("fwd", "fwd_bwd"):
            for f in ROOFLINE_FIELDS:
                assert f"{prefix}_{f}" in row, f"{name} {row['impl']}: no {prefix}_{f}"
            assert row[f"{prefix}_flops"] > 0 and row[f"{prefix}_bytes"] > 0
            assert row[f"{prefix}_bound"] in ("compute", "memory")
            t = max(row[f"{prefix}_flops"] / c["peak_flops"], row[f"{prefix}_bytes"] / c["peak_bw"]) * 1e3
            assert row[f"{prefix}_roofline_ms"] == pytest.approx(t)
            if row.get(f"{prefix}_ms") is None:  # not timed (Triton under the interpreter): no fraction
                assert row[f"{prefix}_roofline_frac"] is None
            else:
                timed += 1
                assert row[f"{prefix}_roofline_frac"] == pytest.approx(t / row[f"{prefix}_ms"])
    assert timed
    figs = [f for f in payload["summary"] if f["figure"].endswith("fraction of roofline")]
    assert figs and all(isinstance(f["value"], float) and f["value"] > 0 for f in figs)
    # only measured passes become figures: one per timed row
    assert len(figs) == sum(r.get("fwd_bwd_ms") is not None for r in payload["rows"])
    assert {f["unit"] for f in payload["summary"] if f["figure"].startswith("ceiling:")} == {"GFLOP/s", "GB/s"}
    md = (out / "summary.md").read_text()
    assert "fraction of roofline" in md and "ceiling: dense matmul" in md


# --- the models on a tiny shape counted by hand: M=2 tokens, K=3 in, N=4 out, r=1, fp32 (e=4) ---
M, K, N, R, E = 2, 3, 4, 1, 4


def test_flops_by_hand():
    # fwd: x W^T 2*2*4*3 = 48, x A^T 2*2*1*3 = 12, S B^T 2*2*1*4 = 16
    # bwd: dY W 48, dS = dY B 16, dB = dY^T S 16, dS A 12, dA = dS^T x 12
    assert rl.lora_flops(M, K, N, R) == {"fwd": 76, "bwd": 104, "fwd_bwd": 180}
    assert rl.base_linear(M, K, N, E)["fwd_bwd"].flops == 96
    for model in (rl.lora_fused(M, K, N, R, E), rl.lora_peft(M, K, N, R, E)):
        assert {k: v.flops for k, v in model.items()} == {"fwd": 76, "bwd": 104, "fwd_bwd": 180}


def test_bytes_by_hand():
    # elements: x 6, W 12, A 3, B 4, S / dS 2, y / dY / L 8
    base = rl.base_linear(M, K, N, E)
    assert base["fwd"].bytes == 4 * (6 + 12 + 8) == 104  # read x, W; write y
    assert base["bwd"].bytes == 4 * (8 + 12 + 6) == 104  # read dY, W; write dX
    fused = rl.lora_fused(M, K, N, R, E)
    # k1 x,A->S (11) + k2 x,W,S,B->y (32)
    assert fused["fwd"].bytes == 4 * (11 + 32) == 172
    # k3 dY,B,S->dS,dB (20) + k4 dY,W,dS,A->dX (31) + k5 dS,x->dA (11)
    assert fused["bwd"].bytes == 4 * (20 + 31 + 11) == 248
    assert fused["fwd_bwd"].bytes == 420
    peft = rl.lora_peft(M, K, N, R, E)
    # x W^T (26) + x A^T (11) + S B^T (14) + L*s (16) + base + L (24)
    assert peft["fwd"].bytes == 4 * (26 + 11 + 14 + 16 + 24) == 364
    # dY*s (16) + dS (14) + dB (14) + dS A (11) + dA (11) + dY W (26) + dX sum (18)
    assert peft["bwd"].bytes == 4 * (16 + 14 + 14 + 11 + 11 + 26 + 18) == 440
    # torch.compile estimate: scale and add fused, one (M, N) read and write less
    assert rl.lora_peft(M, K, N, R, E, fused_elementwise=True)["fwd"].bytes == 364 - 2 * 4 * 8
    # dropout: x read, x_d written (fp32) and a bool mask written, both ways
    drop = rl.lora_peft(M, K, N, R, E, p=0.1)
    assert drop["fwd"].bytes == 364 + 4 * 12 + 6 and drop["bwd"].bytes == 440 + 4 * 12 + 6
    # bf16 halves every tensor
    assert rl.lora_fused(M, K, N, R, 2)["fwd_bwd"].bytes == 210


def test_nf4_bytes_by_hand():
    # 8192 values: 4096 packed bytes + 16 fp32 codes + 128 fp32 absmax
    assert rl.nf4_weight_bytes(8192) == 4096 + 64 + 512 == 4672
    # double-quant: 128 uint8 absmax + 1 fp32 nested scale + 256-entry fp32 map + fp32 offset
    assert rl.nf4_weight_bytes(8192, double_quant=True) == 4096 + 64 + 128 + 4 + 1024 + 4 == 5320
    # a 2 x 64 bf16 weight: dequantize reads 136 NF4 bytes, writes 256
    assert rl.nf4_dequant(2, 64, 2) == rl.Cost(0, 64 + 64 + 8 + 256)
    assert rl.nf4_dequant(2, 64, 2, double_quant=True) == rl.Cost(0, 64 + 64 + 2 + 4 + 1024 + 4 + 16 + 256)
    m, k, n, r, e = 2, 64, 2, 1, 2
    dense, peft = rl.lora_fused(m, k, n, r, e), rl.lora_peft(m, k, n, r, e)
    fused = rl.nf4_lora(m, k, n, r, e, "fused")
    for p in ("fwd", "bwd"):  # the kernels read 136 NF4 bytes where the dense ones read 256
        assert fused[p] == rl.Cost(dense[p].flops, dense[p].bytes - 256 + 136)
    deq = rl.nf4_dequant(n, k, e)
    ref, bnb = rl.nf4_lora(m, k, n, r, e, "torch"), rl.nf4_lora(m, k, n, r, e, "bnb_peft")
    assert ref["fwd"] == bnb["fwd"] == deq + peft["fwd"]
    assert ref["bwd"] == peft["bwd"] and bnb["bwd"] == deq + peft["bwd"]  # bnb dequantizes again
    with pytest.raises(ValueError):
        rl.nf4_lora(m, k, n, r, e, "nope")


@pytest.mark.parametrize("shape", [(128, 64), (3, 37), (5, 100)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_match_quantized_weight(shape, double_quant):
    from rankwise.quant import quantize_nf4

    q = quantize_nf4(torch.randn(*shape), double_quant=double_quant)
    assert rl.nf4_weight_bytes(q.numel, q.blocksize, double_quant) == q.nbytes


def test_roofline_time_fraction_bound():
    c = dict(peak_flops=1e12, peak_bw=1e9)
    assert rl.roofline(2e9, 1e6, 4.0, c) == dict(roofline_ms=pytest.approx(2.0), fraction=pytest.approx(0.5),
                                                  bound="compute")
    r = rl.roofline(1e9, 3e6, 6.0, c)  # 1 ms of FLOPs, 3 ms of bytes
    assert r["bound"] == "memory" and r["roofline_ms"] == pytest.approx(3.0) and r["fraction"] == pytest.approx(0.5)
    assert rl.roofline(1e9, 3e6, None, c)["fraction"] is None
    row = rl.annotate({}, "fwd_bwd", rl.Cost(2e9, 1e6), 4.0, c)
    assert row == {"fwd_bwd_flops": 2_000_000_000, "fwd_bwd_bytes": 1_000_000, "fwd_bwd_roofline_ms": 2.0,
                   "fwd_bwd_roofline_frac": 0.5, "fwd_bwd_bound": "compute"}
    fig = rl.roofline_figure("x fwd+bwd", row)
    assert fig["value"] == 0.5 and fig["figure"] == "x fwd+bwd, fraction of roofline"
    assert "compute-bound" in fig["baseline"]


def _eager_traffic(fn, grads_of, dy):
    """FLOPs (torch's counter) and the bytes every non-view aten op reads and
    writes, for ``fn()`` forward and then backward."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import FlopCounterMode

    class Bytes(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view and func.overloadpacket not in (torch.ops.aten.detach,):
                self.total += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                                  if isinstance(t, torch.Tensor))
            return out

    with FlopCounterMode(display=False) as fc:
        with Bytes() as fwd:
            y = fn()
        with Bytes() as bwd:
            torch.autograd.grad(y, grads_of, dy)
    return fc.get_total_flops(), fwd.total, bwd.total


def test_eager_models_match_aten_traffic():
    """The base and PEFT-style models count exactly what torch's ops move
    (forward and backward, fp32, no dropout), and the matmul FLOPs torch counts."""
    from benchmarks.bench_lora import base_only, peft_style

    m, k, n, r = 8, 12, 20, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g, requires_grad=True)
    W = torch.randn(n, k, generator=g)
    A = torch.randn(r, k, generator=g, requires_grad=True)
    B = torch.randn(n, r, generator=g, requires_grad=True)
    dy = torch.randn(m, n, generator=g)
    for fn, grads, model in (
            (lambda: base_only(x, W, None, A, B, 2.0, 0.0), [x], rl.base_linear(m, k, n, 4)),
            (lambda: peft_style(x, W, None, A, B, 2.0, 0.0), [x, A, B], rl.lora_peft(m, k, n, r, 4))):
        flops, fwd, bwd = _eager_traffic(fn, grads, dy)
        assert (flops, fwd, bwd) == (model["fwd_bwd"].flops, model["fwd"].bytes, model["bwd"].bytes)


def test_ceilings_measured_once_per_process():
    c = rl.measure_ceilings(torch.float32, "cpu")
    assert rl.measure_ceilings(torch.float32, "cpu") is c
    assert c["peak_flops"] == pytest.approx(2 * c["matmul_n"] ** 3 / (c["matmul_ms"] * 1e-3))
    assert c["peak_bw"] == pytest.approx(2 * c["copy_bytes"] / (c["copy_ms"] * 1e-3))
    figs = rl.ceiling_figures(c)
    assert [f["unit"] for f in figs] == ["GFLOP/s", "GB/s"]


def test_readme_table_is_generated_between_the_markers(tmp_path):
    from benchmarks import readme_table

    env = {"device": "cpu (x86_64, 2 threads)", "date": "2026-11-23T00:00:00Z", "torch": "2.13.0", "triton": "3.6.0"}
    res = {"bench_train": {"figures": [
        {"figure": "fp32 rankwise vs baseline: tokens/s", "value": 1.234, "unit": "x", "baseline": "PEFT"},
        {"figure": "fp32 rankwise: tokens/s", "value": 999.0, "unit": "tok/s", "baseline": "-"}]},
        "bench_loss": {"error": "RuntimeError: boom"}}
    run_dir = tmp_path / "cpu-2026-11-23"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"env": env, "suite": "cpu", "smoke": False, "results": res}))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- perf-table:start -->\nold\n<!-- perf-table:end -->\nrest\n")
    assert readme_table.main(["--results", str(run_dir), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert "No GPU results yet" in text and "| 1.23 x | PEFT |" in text
    assert "999" not in text, "only ratios go into the CPU table"
    assert "failed: RuntimeError: boom" in text


def test_summarize_assembles_runs_made_in_separate_calls(tmp_path):
    env = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-23T00:00:00Z", "torch": "2.11", "triton": "3.6.0"}
    for name, value in (("bench_loss", 0.5), ("bench_train", 2.0)):
        (tmp_path / f"{name}.json").write_text(json.dumps(
            {"env": env, "summary": [{"figure": f"{name} ratio", "value": value, "unit": "x", "baseline": "b"}]}))
    assert run.main(["--summarize", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["suite"] == "gpu" and set(summary["results"]) == {"bench_loss", "bench_train"}
    md = (tmp_path / "summary.md").read_text()
    assert "| bench_train ratio | 2 | x | b |" in md and "assembled from: bench_loss, bench_train" in md
    with pytest.raises(SystemExit, match="no benchmark JSON"):
        run.main(["--summarize", str(tmp_path / "empty")])


def test_readme_table_prefers_gpu_results(tmp_path):
    from benchmarks import readme_table

    for device, value in (("cpu (x86_64, 2 threads)", 1.5), ("NVIDIA H100 80GB HBM3", 0.97)):
        d = tmp_path / device.split()[0].lower()
        d.mkdir()
        env = {"device": device, "date": "2026-11-23T00:00:00Z", "torch": "2.11", "triton": "3.6.0"}
        res = {"bench_lora": {"figures": [{"figure": "fused fwd+bwd over base", "value": value, "unit": "x",
                                           "baseline": "base"}]}}
        (d / "summary.json").write_text(json.dumps({"env": env, "suite": "gpu", "smoke": False, "results": res}))
    assert readme_table.newest_results(tmp_path, gpu=True).parent.name == "nvidia"
    readme = tmp_path / "README.md"
    readme.write_text("<!-- perf-table:start -->\n<!-- perf-table:end -->\n")
    readme_table.main(["--results", str(tmp_path / "nvidia"), "--readme", str(readme)])
    text = readme.read_text()
    assert "Measured on NVIDIA H100" in text and "| 0.97 x | base |" in text and "No GPU results" not in text


def test_profile_step_writes_its_diagnosis(tmp_path, one_thread):
    """``benchmarks.profile_step`` (a GPU diagnosis script) runs on the CPU at its tiny shape and
    writes the wall time per step and the operators that took the CPU's time."""
    from benchmarks import profile_step

    assert profile_step.main(["--out", str(tmp_path), "--steps", "1", "--rank", "2"]) == 0
    payload = json.loads((tmp_path / "profile_step.json").read_text())
    assert payload["shape"] == "tiny" and payload["rank"] == 2 and payload["wall_ms_per_step"] > 0
    names = [r["name"] for r in payload["top_cpu_self"]]
    assert names and any("mm" in n or "linear" in n for n in names), names


def test_results_record_the_commit_measured(monkeypatch):
    import re
    import subprocess
    from pathlib import Path

    from benchmarks import common

    root = Path(common.__file__).resolve().parent.parent
    monkeypatch.delenv("RANKWISE_COMMIT", raising=False)
    commit = common.environment()["commit"]
    if (root / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit), commit
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert commit.split("+")[0] == head.strip()
    else:
        assert commit is None

    def no_git(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(common.subprocess, "run", no_git)
    assert common.source_commit() is None
    monkeypatch.setenv("RANKWISE_COMMIT", "abc123")  # a copy of the tree without .git, told its commit
    assert common.source_commit() == "abc123"


# --- bench_train: the peers (Liger-Kernel, Unsloth) and the GPU-busy fraction ---


@pytest.mark.skipif(torch.cuda.is_available(), reason="off CUDA the peers are skipped; on a GPU they run")
def test_bench_train_smoke_records_the_skipped_peers(smoke_suite):
    """The peers are never dropped: off CUDA every group has them with a one-line reason, the summary
    says they were skipped, and no row has a GPU-busy fraction (null, with the reason)."""
    from benchmarks import bench_train as bt

    _, out = smoke_suite
    payload = json.loads((out / "bench_train.json").read_text())
    assert payload["complete"] is True and set(payload["peers"]) >= {"liger-kernel", "unsloth"}
    assert payload["rows"], "no groups"
    for group in payload["rows"]:
        arms = group["arms"]
        assert set(bt.SMOKE_ARMS) <= set(arms)
        for name in ("liger", "unsloth"):
            reason = arms[name].get("skipped")
            assert reason and "\n" not in reason and "no CUDA device" in reason, arms[name]
        for name, row in arms.items():
            if "skipped" not in row and "error" not in row:
                assert row["gpu_busy_frac"] is None and "no CUDA" in row["gpu_busy_reason"]
    skipped = [f for f in payload["summary"] if f["figure"].endswith(": skipped")]
    assert {f["figure"].split()[2].rstrip(":") for f in skipped} == {"liger", "unsloth"}
    assert all("no CUDA device" in f["baseline"] for f in skipped)
    assert "liger: skipped" in (out / "summary.md").read_text()


def test_bench_train_peer_skip_reasons(monkeypatch):
    from benchmarks import bench_train as bt

    assert bt.peer_skip_reason("baseline", cuda=False) is None and bt.peer_skip_reason("rankwise", cuda=True) is None
    assert "no CUDA device" in bt.peer_skip_reason("liger", cuda=False)
    monkeypatch.setattr(bt.importlib.util, "find_spec", lambda name: None)
    reason = bt.peer_skip_reason("unsloth", cuda=True)
    assert reason.startswith("unsloth not installed") and "no CUDA" not in reason
    assert "; " in bt.peer_skip_reason("liger", cuda=False)  # both reasons, one line


def test_bench_train_gpu_busy_is_the_union_of_kernel_intervals(tmp_path):
    from benchmarks import bench_train as bt

    assert bt.union_length([]) == 0
    # two streams overlapping (0-10 and 5-12 -> 12), a gap, then 20-25 inside 20-30
    assert bt.union_length([(20, 30), (5, 12), (0, 10), (20, 25)]) == 22
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [
        {"cat": "kernel", "name": "k1", "ts": 100.5, "dur": 10},
        {"cat": "kernel", "name": "k2", "ts": 105.5, "dur": 10},
        {"cat": "gpu_memcpy", "name": "copy", "ts": 0, "dur": 1000},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 100, "dur": 50},
        {"ph": "M", "name": "process_name"}]}))
    spans = bt.kernel_intervals(trace)
    assert spans == [(100.5, 110.5), (105.5, 115.5)] and bt.union_length(spans) == 15
    calls = []
    row = bt.gpu_busy(calls.append, 3, "cpu")
    assert row["gpu_busy_frac"] is None and "no CUDA" in row["gpu_busy_reason"] and not calls


def test_bench_train_compare_names_the_peers_and_their_skips():
    from benchmarks import bench_train as bt

    def row(arm, tps, mem):
        return dict(arm=arm, **bt.ARMS[arm], tokens_per_s=tps, peak_mem_mb=mem, losses=[2.0, 1.5],
                    gpu_busy_frac=0.5, gpu_window_steps=2)

    rows = {"rankwise": row("rankwise", 300.0, 100.0), "liger": row("liger", 200.0, 150.0),
            "unsloth": dict(arm="unsloth", **bt.ARMS["unsloth"], skipped="import unsloth failed: NotImplementedError: x")}
    figs = {f["figure"]: f for f in bt.compare(rows, "bf16", 2, label="bf16 1x512")}
    ratio = figs["bf16 1x512 rankwise vs liger (vs PEFT with Liger's RoPE, RMSNorm, SwiGLU, fused linear + cross "
                 "entropy): tokens/s"]
    assert ratio["value"] == pytest.approx(1.5) and ratio["baseline"] == "transformers+PEFT+Liger-Kernel"
    assert figs["bf16 1x512 unsloth: skipped"]["baseline"].startswith("import unsloth failed")
    assert not [f for f in figs if "vs unsloth" in f]
    assert figs["bf16 1x512 liger: GPU busy fraction of wall time"]["value"] == 0.5
    nf4 = bt.compare({"rankwise": rows["rankwise"], "liger": rows["liger"]}, "nf4", 2)
    assert nf4[0]["baseline"] == "transformers+PEFT+Liger-Kernel+bitsandbytes"


def test_bench_train_cli_help_and_shapes():
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks import bench_train as bt

    assert bt.parse_shapes("1x512, 4X2048") == [(1, 512), (4, 2048)]
    for bad in ("", "4", "0x8", "axb"):
        with pytest.raises(Exception):
            bt.parse_shapes(bad)
    with pytest.raises(SystemExit):
        bt.parse_args(["--arms", "nope"])
    root = Path(bt.__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--help"], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--shapes" in proc.stdout and "unsloth" in proc.stdout


def test_bench_train_graph_arm_trains_as_the_plain_loop(monkeypatch):
    """The ``rankwise+graph`` arm's step (``StepGraph`` around the arm's own loss and AdamW) gives the plain
    loop's losses, through a capture stood in for on the CPU (tests/test_graphs.py's recorder)."""
    from test_graphs import Recorder
    from transformers import LlamaConfig, LlamaForCausalLM

    import rankwise
    from benchmarks import bench_train as bt
    from rankwise import graphs

    rec = Recorder()
    monkeypatch.setattr(graphs, "capture", rec.capture)
    spec = dict(batch=2, seq=12, lr=1e-2, device="cpu")
    losses = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2))
        rankwise.inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, backend="torch")
        for _, m in rankwise.lora_layers(model):
            torch.nn.init.normal_(m.lora_B, std=0.1)
        loss_of = bt.make_loss(model, bt.ARMS["rankwise"])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"], fused=True)
        batches = bt.make_batches(64, spec["batch"], spec["seq"], 6, "cpu")
        if graph:
            step, first = bt.graph_step(loss_of, opt, batches, spec)
            assert first == graphs.WARMUP_STEPS + 1
        else:
            def step(i):
                loss = loss_of(batches[i])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss
        losses.append([float(step(i)) for i in range(6)])
    assert len(rec.captures) == 1 and len(rec.captures[0]["replays"]) == 6 - graphs.WARMUP_STEPS
    rec.check_replays()
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(*losses)), losses
    assert losses[0][0] != losses[0][-1]


def test_bench_study_smoke_records_each_arms_cost_beside_its_estimates(tmp_path, one_thread):
    """bench_study runs `rankwise study` on a random model of a real architecture and GSM8K-schema rows, and
    keeps per arm the measured time (and, on CUDA, peak) beside the --plan estimates; no timing is asserted."""
    from benchmarks import bench_study

    assert bench_study.main(["--smoke", "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "bench_study.json").read_text())
    assert got["rc"] == 0 and [a["arm"] for a in got["arms"]] == ["lora-r1", "lora-r2", "lora-r4", "full"]
    for a in got["arms"]:
        assert a["runtime_s"] > 0 and a["estimated_train_s"] > 0 and a["estimated_peak_gib"] > 0 and a["tokens"] > 0
        assert a["peak_mem_gib"] is None  # no CUDA here
    assert got["arms"][0]["trained_with"] == [1, 2, 4] and got["arms"][-1]["trained_with"] is None
    assert any("to train per seed" in line for line in got["plan"])
    rows = bench_study.gsm8k_rows(20, 64, 0)
    from rankwise.study_tasks import gsm8k_item

    assert all(gsm8k_item(r, i, "x")["answer"].isdigit() for i, r in enumerate(rows))  # GSM8K's own schema
