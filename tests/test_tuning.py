"""The measured choice between the fused and the split LoRA path, and its cache
(kernels/tuning.py), on a CPU with a fake timer: the faster path is kept, cached
in memory and on disk, read back by a second process without re-timing; a
corrupt, foreign or version-mismatched cache file is ignored with a warning;
RANKWISE_TUNE=0 turns timing off. The last test runs only on a CUDA machine."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rankwise.kernels import tuning
from rankwise.kernels.tuning import Tuner, choose_path, shape_key
from helpers import FakeTimer

DEVICE = "NVIDIA H100 80GB HBM3"
KEY = shape_key("lora_fwd", 8192, 4096, 4096, torch.bfloat16)


def candidates():
    return {"fused": lambda: "fused", "split": lambda: "split"}


def no_timing(fn):
    raise AssertionError("timed although the choice was cached or tuning is off")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    monkeypatch.delenv("RANKWISE_TUNE", raising=False)
    return tmp_path / "tuning.json"


@pytest.mark.parametrize("costs,best", [({"fused": 2.0, "split": 1.0}, "split"),
                                        ({"fused": 1.0, "split": 1.5}, "fused")])
def test_picks_the_faster_path_and_caches_it_in_memory_and_on_disk(cache, costs, best):
    timer = FakeTimer(costs)
    t = Tuner(timer=timer)
    assert t.choose(DEVICE, KEY, candidates) == best
    assert sorted(timer.calls) == ["fused", "split"]
    assert t.choose(DEVICE, KEY, lambda: pytest.fail("candidates built again")) == best
    assert len(timer.calls) == 2
    data = json.loads(cache.read_text())
    assert data["format"] == "rankwise-tuning"
    assert data["devices"][DEVICE] == {"versions": tuning.library_versions(), "choices": {KEY: best}}
    # a fresh tuner (new process state) reads the file instead of timing
    assert Tuner(timer=no_timing).choose(DEVICE, KEY, candidates) == best


def test_entries_of_other_shapes_and_devices_are_kept_when_writing(cache):
    Tuner(timer=FakeTimer({"fused": 1.0, "split": 2.0})).choose("GPU A", KEY, candidates)
    key2 = shape_key("lora_dx", 100, 11008, 4096, torch.float16)
    Tuner(timer=FakeTimer({"fused": 3.0, "split": 2.0})).choose("GPU B", key2, candidates)
    Tuner(timer=FakeTimer({"fused": 3.0, "split": 2.0})).choose("GPU A", key2, candidates)
    devices = json.loads(cache.read_text())["devices"]
    assert devices["GPU A"]["choices"] == {KEY: "fused", key2: "split"}
    assert devices["GPU B"]["choices"] == {key2: "split"}
    assert not [p for p in cache.parent.iterdir() if p.name != "tuning.json"]  # no temporary file left


def test_a_second_process_reads_the_cache_without_timing(cache):
    Tuner(timer=FakeTimer({"fused": 5.0, "split": 1.0})).choose(DEVICE, KEY, candidates)
    code = ("from rankwise.kernels.tuning import Tuner\n"
            "def timer(fn):\n    raise SystemExit('timed again')\n"
            f"print(Tuner(timer=timer).choose({DEVICE!r}, {KEY!r}, lambda: {{}}))\n")
    env = dict(os.environ, RANKWISE_CACHE=str(cache.parent))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "split"


@pytest.mark.parametrize("content,why", [
    ("{not json", "not valid JSON"),
    ('["a", "list"]', "not a rankwise tuning file"),
    ('{"format": "someone-else", "devices": {}}', "not a rankwise tuning file"),
    ('{"format": "rankwise-tuning", "devices": "x"}', "not a rankwise tuning file"),
])
def test_corrupt_or_foreign_file_is_ignored_with_a_warning_and_replaced(cache, content, why):
    cache.write_text(content)
    timer = FakeTimer({"fused": 2.0, "split": 1.0})
    with pytest.warns(UserWarning, match=why):
        assert Tuner(timer=timer).choose(DEVICE, KEY, candidates) == "split"
    assert len(timer.calls) == 2
    assert json.loads(cache.read_text())["devices"][DEVICE]["choices"] == {KEY: "split"}


def test_entries_measured_with_other_versions_are_ignored_with_a_warning(cache):
    old = dict(tuning.library_versions(), triton="0.0.1")
    Tuner(timer=FakeTimer({"fused": 1.0, "split": 2.0}), versions=old).choose(DEVICE, KEY, candidates)
    timer = FakeTimer({"fused": 2.0, "split": 1.0})
    with pytest.warns(UserWarning, match="measured with"):
        assert Tuner(timer=timer).choose(DEVICE, KEY, candidates) == "split"
    assert len(timer.calls) == 2
    section = json.loads(cache.read_text())["devices"][DEVICE]
    assert section == {"versions": tuning.library_versions(), "choices": {KEY: "split"}}


def test_invalid_choices_in_a_valid_file_are_dropped(cache):
    cache.write_text(json.dumps({"format": "rankwise-tuning", "devices": {DEVICE: {
        "versions": tuning.library_versions(), "choices": {KEY: "warp-speed", "other": "split"}}}}))
    t = Tuner(timer=FakeTimer({"fused": 1.0, "split": 2.0}))
    assert t.cached(DEVICE, "other") == "split"
    assert t.choose(DEVICE, KEY, candidates) == "fused"


def test_rankwise_tune_0_uses_the_cached_or_the_default_choice(cache, monkeypatch):
    Tuner(timer=FakeTimer({"fused": 2.0, "split": 1.0})).choose(DEVICE, KEY, candidates)
    monkeypatch.setenv("RANKWISE_TUNE", "0")
    t = Tuner(timer=no_timing)
    assert t.choose(DEVICE, KEY, candidates) == "split"
    other = shape_key("lora_fwd", 8192, 4096, 11008, torch.bfloat16)
    assert t.choose(DEVICE, other, candidates) == tuning.DEFAULT_PATH == "fused"
    assert t.cached(DEVICE, other) is None  # the default is not recorded as a measurement
    assert other not in json.loads(cache.read_text())["devices"][DEVICE]["choices"]


def test_an_unwritable_cache_warns_and_still_chooses(tmp_path, monkeypatch):
    monkeypatch.delenv("RANKWISE_TUNE", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    t = Tuner(path=blocker / "tuning.json", timer=FakeTimer({"fused": 2.0, "split": 1.0}))
    with pytest.warns(UserWarning, match="not written"):
        assert t.choose(DEVICE, KEY, candidates) == "split"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert t.choose(DEVICE, KEY, candidates) == "split"  # remembered in memory, not timed again


def test_cache_dir_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "a"))
    assert tuning.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("RANKWISE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert tuning.cache_dir() == tmp_path / "x" / "rankwise"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tuning.cache_dir() == Path.home() / ".cache" / "rankwise"
    assert Tuner().path == Path.home() / ".cache" / "rankwise" / "tuning.json"


def test_shape_keys_bucket_rows_only():
    assert shape_key("lora_fwd", 100, 64, 32, torch.float16) == shape_key("lora_fwd", 128, 64, 32, torch.float16)
    assert shape_key("lora_fwd", 100, 64, 32, torch.float16) != shape_key("lora_fwd", 129, 64, 32, torch.float16)
    assert shape_key("lora_fwd", 1, 64, 32, torch.float16) == "lora_fwd|M1|N64|K32|float16"
    assert len({shape_key(*a) for a in [("lora_fwd", 8, 4, 2, torch.float16), ("lora_dx", 8, 4, 2, torch.float16),
                                        ("lora_fwd", 8, 2, 4, torch.float16), ("lora_fwd", 8, 4, 2, torch.float32)]}) == 4


def test_choose_path_times_nothing_off_cuda_and_keeps_explicit_paths(cache):
    old = tuning.set_tuner(Tuner(timer=no_timing))
    try:
        x = torch.zeros(3, 4)
        assert choose_path("auto", "lora_fwd", 3, 5, 4, x, candidates) == "fused"
        assert choose_path("split", "lora_fwd", 3, 5, 4, x, candidates) == "split"
        assert choose_path("fused", "lora_dx", 3, 5, 4, x, candidates) == "fused"
    finally:
        tuning.set_tuner(old)
    assert not cache.exists()
    with pytest.raises(ValueError, match="path"):
        tuning.check_path("fastest")


def test_a_settled_choice_is_planned_once_per_shape_and_rank(cache, monkeypatch):
    """The launch plan is cached: after the first call of a (path, shape, rank) no choice is made again and no
    tile list is built (the host's cost per launch); another rank or a new tuner plans again."""
    chosen, built = [], []
    monkeypatch.setattr(tuning, "choose_path", lambda path, op, *a: chosen.append((path, op)) or "fused:T")

    def configs():
        built.append(1)
        return {"fused:T": {"BM": 16}}

    old = tuning.set_tuner(Tuner(timer=no_timing))
    try:
        x = torch.zeros(3, 4)
        ran = [tuning.run_path("auto", "lora_fwd", 3, 5, 4, x, lambda c: c, lambda: "split", configs, rank=r)
               for r in (8, 8, 8, 16, 16)]
        assert ran == [{"BM": 16}] * 5
        assert chosen == [("auto", "lora_fwd")] * 2 and len(built) == 2
        tuning.set_tuner(Tuner(timer=no_timing))
        tuning.run_path("auto", "lora_fwd", 3, 5, 4, x, lambda c: c, lambda: "split", configs, rank=8)
        assert len(chosen) == 3
        tuning.run_path("auto", "lora_fwd", 200, 5, 4, x, lambda c: c, lambda: "split", configs, rank=8)
        assert len(chosen) == 4, "another row bucket is another plan"
    finally:
        tuning.set_tuner(old)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_times_both_gemms_once_and_matches_float64(cache):
    from rankwise.kernels import lora_linear

    old = tuning.set_tuner(Tuner())
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(300, 256, device="cuda", generator=g, dtype=torch.float16, requires_grad=True)
        W = torch.randn(512, 256, device="cuda", generator=g, dtype=torch.float16) / 16
        A = (torch.randn(16, 256, device="cuda", generator=g, dtype=torch.float16) / 16).requires_grad_()
        B = (torch.randn(512, 16, device="cuda", generator=g, dtype=torch.float16) / 4).requires_grad_()
        y = lora_linear(x, W, A, B, 2.0, backend="triton")
        y.backward(torch.ones_like(y))
        ref = x.double() @ W.double().t() + 2.0 * (x.double() @ A.double().t()) @ B.double().t()
        assert (y.double() - ref).abs().max() / ref.abs().max() < 5e-3
        choices = json.loads(cache.read_text())["devices"][torch.cuda.get_device_name()]["choices"]
        assert sorted(k.split("|")[0] for k in choices) == ["lora_dx", "lora_fwd"]
    finally:
        tuning.set_tuner(old)


# ---------------------------------------------------------------- rankwise tune


def test_tune_cli_on_a_cpu_says_nothing_to_tune_in_one_line(capsys):
    from rankwise import cli

    root = Path(__file__).resolve().parents[1]
    assert cli.main(["tune", str(root / "examples" / "lora.yaml"), "--set", "train.device=cpu"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("rankwise tune: nothing to tune (") and "cpu" in out[0]


def test_tune_runs_each_distinct_lora_shape_through_the_path_choice(monkeypatch):
    """The GPU half of ``rankwise tune`` on the CPU (Triton interpreter): every distinct LoRA
    layer shape goes forward and backward once per row bucket, each of its two GEMMs and its
    three skinny products (S, dS/dB, dA) asking the path choice (here a recorder standing in
    for the CUDA timing) once per distinct product: two layers' identical products share a plan."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rankwise.lora import inject_lora
    from rankwise.tune import distinct_layers, row_buckets, tune_layers

    seen = []

    def record(path, op, M, N, K, t, cands):
        seen.append((op, tuning.m_bucket(M), N, K))
        return "split"

    monkeypatch.setattr(sys.modules["rankwise.kernels.tuning"], "choose_path", record)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    inject_lora(model, ["q_proj", "v_proj", "down_proj"], 4, 8, backend="triton")
    layers = distinct_layers(model)
    assert sorted((m.out_features, m.in_features) for m in layers) == [(16, 32), (32, 32), (32, 40)]
    assert tune_layers(layers, [5, 40], torch.device("cpu"), None) == 6
    want = {(op, M, N, K) for (n_out, n_in) in ((16, 32), (32, 32), (32, 40)) for M in (8, 64)
            for op, N, K in (("lora_fwd", n_out, n_in), ("lora_dx", n_in, n_out), ("lora_down", 4, n_in),
                             ("lora_ds_db", n_out, 4), ("lora_da", 4, n_in))}
    assert set(seen) == want and len(seen) == len(want) == 24
    assert all(p.grad is None for m in layers for p in m.parameters())

    class Batches:  # data.plan_epoch's micro-batches over examples of these lengths
        examples = [[0] * 3, [0] * 5, [0] * 60, [0] * 70]

        @staticmethod
        def epoch_plan(e):
            return [[0, 1], [2], [3, 0]]

    assert row_buckets(Batches) == [8, 64, 128]
