"""Tuned tiles of the big LoRA GEMMs (kernels/utils.py ``TILES``, ``gemm_configs``;
kernels/tuning.py): the curated lists are well-formed per architecture, pruned by
shared memory with the heuristic config always first; the tuner keeps the fastest
(path, config) and caches it, reuses a cached config without timing, and ignores a
cached config the current list no longer holds (stale) with a warning; and the
interpreter runs the fused dense and NF4 kernels in listed non-default configs
against a float64 reference (small shapes; TRITON_INTERPRET=1 from conftest)."""
import json
import sys

import pytest
import torch

from rankwise.kernels import tuning, utils
from rankwise.kernels.tuning import Tuner, parse_choice, shape_key
from helpers import FakeTimer
from test_split_path import compare

DEVICE = "NVIDIA H100 80GB HBM3"
KEY = shape_key("lora_fwd", 8192, 4096, 4096, torch.bfloat16)
ARCH_SHARED = {90: 232448, 80: 166912, 89: 101376}
LL = sys.modules["rankwise.kernels.lora_linear"]
NL = sys.modules["rankwise.kernels.nf4_lora"]


def no_timing(fn):
    raise AssertionError("timed although the choice was cached or tuning is off")


def candidates(*configs):
    names = ["fused", "split"] + [f"fused:{c}" for c in configs]
    return lambda: {n: (lambda n=n: n) for n in names}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path))
    monkeypatch.delenv("RANKWISE_TUNE", raising=False)
    return tmp_path / "tuning.json"


@pytest.fixture
def gpu(monkeypatch):
    """``gemm_configs`` as on a GPU of a chosen architecture: interpreter off, that arch's shared memory."""
    def set_arch(arch, shared=None):
        monkeypatch.setattr(utils, "INTERPRET", False)
        monkeypatch.setattr(utils, "device_arch", lambda device: arch)
        monkeypatch.setattr(utils, "max_shared_memory", lambda device: shared or ARCH_SHARED[arch])
    return set_arch


# ------------------------------------------------------------------ the lists


@pytest.mark.parametrize("arch", [90, 89, 80])
def test_each_architecture_lists_a_few_well_formed_configs_per_kind_and_dtype_family(arch):
    lists = utils.TILES[arch]
    assert set(lists) == {(k, f) for k in ("dense", "nf4") for f in ("16bit", "fp32")}
    pow2 = lambda v: v & (v - 1) == 0  # noqa: E731
    for (kind, family), configs in lists.items():
        assert 1 <= len(configs) <= 6 and len(set(configs)) == len(configs), (kind, family)
        for bm, bn, bk, warps, stages in configs:
            assert all(pow2(v) and 16 <= v <= 256 for v in (bm, bn, bk)), (kind, family, bm, bn, bk)
            assert warps in (4, 8) and 2 <= stages <= 5
            assert bm * bn // (32 * warps) <= 64  # fp32 accumulators per thread (the dX kernel holds two)
            if kind == "nf4":
                assert stages <= 3


@pytest.mark.parametrize("arch", [90, 89, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nf4", [False, True])
def test_the_heuristic_config_comes_first_and_the_rest_fit_the_shared_memory(gpu, arch, dtype, nf4):
    gpu(arch)
    cpu = torch.device("cpu")
    default = (NL.nf4_gemm_config if nf4 else lambda dt, dev: LL.default_tiles(dt, dev, 16))(dtype, cpu)
    configs = (NL.nf4_tile_configs if nf4 else LL.tile_configs)(dtype, cpu, 16)
    assert configs[0] == default
    names = [utils.config_name(c) for c in configs]
    assert len(set(names)) == len(names) >= 2
    for c in configs[1:]:
        assert utils.shared_estimate(c, dtype, 16, nf4) <= ARCH_SHARED[arch]
        assert c["GROUP_M"] == 8
    assert set(utils.fused_variants(configs)) == {f"fused:{n}" for n in names[1:]}


def test_pruning_by_shared_memory_drops_what_does_not_fit_but_never_the_default(gpu):
    cpu = torch.device("cpu")
    gpu(90)
    full = LL.tile_configs(torch.bfloat16, cpu, 16)
    assert len(full) == 1 + len(utils.TILES[90][("dense", "16bit")])
    limit = 80 * 1024
    gpu(90, shared=limit)
    small = LL.tile_configs(torch.bfloat16, cpu, 16)
    assert small[0] == full[0] and utils.shared_estimate(full[0], torch.bfloat16, 16) > limit
    kept = [c for c in full[1:] if utils.shared_estimate(c, torch.bfloat16, 16) <= limit]
    assert 0 < len(kept) < len(full) - 1 and small[1:] == kept
    # NF4 tiles cost more shared memory than dense ones of the same size
    c = dict(BM=128, BN=128, BK=64, num_stages=2)
    assert utils.shared_estimate(c, torch.bfloat16, 16, nf4=True) > utils.shared_estimate(c, torch.bfloat16, 16)


def test_the_interpreter_and_the_cpu_get_the_heuristic_config_only():
    cpu = torch.device("cpu")
    assert utils.INTERPRET
    assert LL.tile_configs(torch.float32, cpu, 16) == [LL.default_tiles(torch.float32, cpu, 16)]
    assert NL.nf4_tile_configs(torch.bfloat16, cpu, 16) == [NL.nf4_gemm_config(torch.bfloat16, cpu)]
    assert utils.device_arch(cpu) == 90


# ------------------------------------------------------------------ the tuner


def test_the_fastest_config_is_chosen_and_cached_then_reused_without_timing(cache):
    timer = FakeTimer({"fused": 3.0, "split": 2.0, "fused:128x64x64-w4-s4": 1.0, "fused:64x128x64-w8-s4": 1.5})
    cands = candidates("128x64x64-w4-s4", "64x128x64-w8-s4")
    assert Tuner(timer=timer).choose(DEVICE, KEY, cands) == "fused:128x64x64-w4-s4"
    assert sorted(timer.calls) == sorted(cands())
    assert json.loads(cache.read_text())["devices"][DEVICE]["choices"] == {KEY: "fused:128x64x64-w4-s4"}
    assert parse_choice("fused:128x64x64-w4-s4") == ("fused", "128x64x64-w4-s4")
    assert parse_choice("split") == ("split", None) and parse_choice("fused") == ("fused", None)
    # a second process: read from disk, not timed; also with RANKWISE_TUNE=0
    assert Tuner(timer=no_timing).choose(DEVICE, KEY, cands) == "fused:128x64x64-w4-s4"


def test_a_cached_config_is_used_with_tuning_off(cache, monkeypatch):
    cands = candidates("128x64x64-w4-s4")
    Tuner(timer=FakeTimer({"fused": 3.0, "split": 2.0, "fused:128x64x64-w4-s4": 1.0})).choose(DEVICE, KEY, cands)
    monkeypatch.setenv("RANKWISE_TUNE", "0")
    assert Tuner(timer=no_timing).choose(DEVICE, KEY, cands) == "fused:128x64x64-w4-s4"


def test_a_stale_cached_config_is_ignored_with_a_warning_and_measured_again(cache, monkeypatch):
    Tuner(timer=FakeTimer({"fused": 3.0, "split": 2.0, "fused:256x256x64-w8-s3": 1.0})).choose(
        DEVICE, KEY, candidates("256x256x64-w8-s3"))
    now = candidates("128x64x64-w4-s4")  # the list changed: 256x256x64 is gone
    timer = FakeTimer({"fused": 3.0, "split": 2.0, "fused:128x64x64-w4-s4": 2.5})
    with pytest.warns(UserWarning, match="not in the current list"):
        assert Tuner(timer=timer).choose(DEVICE, KEY, now) == "split"
    assert len(timer.calls) == 3
    assert json.loads(cache.read_text())["devices"][DEVICE]["choices"] == {KEY: "split"}
    # tuning off: a stale config falls back to the default (fused, heuristic tiles), still with the warning
    Tuner(timer=FakeTimer({"fused": 3.0, "split": 2.0, "fused:256x256x64-w8-s3": 1.0})).choose(
        DEVICE, "other", candidates("256x256x64-w8-s3"))
    monkeypatch.setenv("RANKWISE_TUNE", "0")
    with pytest.warns(UserWarning, match="not in the current list"):
        assert Tuner(timer=no_timing).choose(DEVICE, "other", now) == "fused"


def test_malformed_choices_in_the_file_are_dropped(cache):
    cache.write_text(json.dumps({"format": "rankwise-tuning", "devices": {DEVICE: {
        "versions": tuning.library_versions(),
        "choices": {"a": "split:64x64x64-w4-s4", "b": "fused:64x64x64-w4-s4", "c": 7, "d": "fused:"}}}}))
    t = Tuner(timer=no_timing)
    assert [t.cached(DEVICE, k) for k in "abcd"] == [None, "fused:64x64x64-w4-s4", None, None]


# ------------------------------------------------ the kernels in listed configs


def interp_config(arch_entry, group_m=8):
    bm, bn, bk, warps, stages = arch_entry
    return dict(BM=bm, BN=bn, BK=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages)


# two non-default listed configs per kind (BM != BN, so a swapped tile axis would show)
DENSE_CONFIGS = [interp_config(utils.TILES[90][("dense", "16bit")][0]), interp_config(utils.TILES[89][("dense", "16bit")][1])]
NF4_CONFIGS = [interp_config(utils.TILES[90][("nf4", "16bit")][0]), interp_config(utils.TILES[89][("nf4", "16bit")][0])]


@pytest.fixture
def force_config(monkeypatch):
    """Every big GEMM runs in ``cfg``, through the same choice plumbing as a cached ``"fused:<cfg>"``."""
    used = []

    def force(cfg):
        name = f"fused:{utils.config_name(cfg)}"
        for mod, lister in ((LL, "tile_configs"), (NL, "nf4_tile_configs")):
            default = getattr(mod, lister)
            monkeypatch.setattr(mod, lister, lambda dt, dev, r, default=default: default(dt, dev, r) + [cfg])
        skinny = ("lora_down", "lora_ds_db", "lora_da")  # their choice has no tile configs: the kernels
        monkeypatch.setattr(sys.modules["rankwise.kernels.tuning"], "choose_path",
                            lambda path, op, *a: "fused" if op in skinny else used.append(op) or name)
        for mod, fns in ((LL, ("_fwd_gemm", "_bwd_dX")), (NL, ("_nf4_fwd_gemm", "_nf4_bwd_dX"))):
            for fn in fns:
                real = getattr(mod, fn)

                def spy(*a, real=real, fn=fn):
                    assert a[-1] is cfg, f"{fn} ran in {a[-1]}, not {cfg}"
                    used.append(fn)
                    return real(*a)
                monkeypatch.setattr(mod, fn, spy)
        return used
    return force


@pytest.mark.parametrize("cfg", DENSE_CONFIGS, ids=utils.config_name)
@pytest.mark.parametrize("dtype,dropout_p", [(torch.float32, 0.3), (torch.float16, 0.0)])
def test_dense_fused_kernels_in_listed_configs_match_float64(force_config, cfg, dtype, dropout_p):
    used = force_config(cfg)
    compare((70,), 100, 90, 5, dtype, dropout_p=dropout_p, path="auto")  # odd shapes, over one tile in rows
    assert used == ["lora_fwd", "_fwd_gemm", "lora_dx", "_bwd_dX"]


@pytest.mark.parametrize("cfg", NF4_CONFIGS, ids=utils.config_name)
def test_nf4_fused_kernels_in_listed_configs_match_float64(force_config, cfg):
    used = force_config(cfg)
    compare((37,), 64, 29, 3, torch.float32, dropout_p=0.3, path="auto", nf4=(True, torch.bfloat16))
    assert used == ["nf4_fwd", "_nf4_fwd_gemm", "nf4_dx", "_nf4_bwd_dX"]
