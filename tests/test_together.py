"""LoRA arms trained together (``rankwise sweep --together``, ``rankwise.together``) against their solo runs.

Each arm of a together run must be the run ``rankwise train`` makes of the same
config: the same logged losses, the same final update ``scaling * B @ A`` (the
issue asks for 5e-3 and 5e-2 relative; on this CPU both agree to ~1e-5, see
``test_together_sweep_arms_equal_their_solo_runs``), and the same files.
"""
import json
import os

import pytest
import torch
from test_data import build_tiny_llama, qa_rows, write_jsonl

import rankwise.arm_layers as rlay
import rankwise.arm_memory as rmem
import rankwise.together as rtog
import rankwise.fit as rfit
import rankwise.train as rt
from rankwise import cli
from rankwise.adapter import lora_delta, lora_pairs, scaling_of
from rankwise.arm_layers import MultiLoRALinear, inject_multi_lora
from rankwise.errors import ConfigError
from rankwise.ownership import owner
from rankwise.sweep import sweep
from rankwise.kernels import multi_lora_linear
from rankwise.together import train_together

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_RTOL, DELTA_RTOL = 5e-3, 5e-2  # the bounds; the measured errors are printed (pytest -s)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("togetherworld")
    return {"model": build_tiny_llama(d / "model"),
            "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
            "data": {"train": write_jsonl(d / "train.jsonl", qa_rows(16)),
                     "eval": write_jsonl(d / "eval.jsonl", qa_rows(4)), "max_length": 40},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "log_every": 2, "save_every": 0},
            "eval": {"every": 0, "max_new_tokens": 3}, "log": {"progress": False}, "output_dir": str(d / "unused")}


def arm_cfg(cfg, r, out, **train):
    return {**cfg, "lora": {**cfg["lora"], "r": r}, "train": {**cfg["train"], **train}, "output_dir": str(out)}


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def rel(a, b) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare_with_solo(arm_dir, solo_dir) -> tuple:
    """(worst relative loss error over the logged rows, worst relative ||ΔW - ΔW_solo|| / ||ΔW_solo||)."""
    ours, solo = read_rows(arm_dir), read_rows(solo_dir)
    assert [r["step"] for r in ours] == [r["step"] for r in solo]
    loss_err = 0.0
    for a, b in zip(ours, solo):
        for key in ("loss", "eval_loss"):
            if key in b:
                loss_err = max(loss_err, rel(a[key], b[key]))
        assert a.get("eval_accuracy") == b.get("eval_accuracy"), f"step {b['step']}: QA accuracy differs"
    cfg_a, pairs_a = lora_pairs(os.path.join(arm_dir, "adapter"))
    cfg_b, pairs_b = lora_pairs(os.path.join(solo_dir, "adapter"))
    assert cfg_a == cfg_b, "adapter_config.json differs from the solo run's"
    assert pairs_a.keys() == pairs_b.keys()
    delta_err = 0.0
    for name in pairs_b:
        da, db = lora_delta(*pairs_a[name], scaling_of(cfg_a)), lora_delta(*pairs_b[name], scaling_of(cfg_b))
        delta_err = max(delta_err, float((da - db).norm() / db.norm()))
    return loss_err, delta_err


def check_like_solo(arm_dir, solo_dir, solo_summary, label):
    loss_err, delta_err = compare_with_solo(arm_dir, solo_dir)
    print(f"{label}: losses within {loss_err:.2g}, scaling*B@A within {delta_err:.2g} (relative)")
    assert loss_err <= LOSS_RTOL, f"{label}: logged loss off by {loss_err:.3g} relative"
    assert delta_err <= DELTA_RTOL, f"{label}: scaling*B@A off by {delta_err:.3g} relative"
    with open(os.path.join(arm_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary.keys() == solo_summary.keys()
    assert summary["status"] == "finished" and summary["steps"] == solo_summary["steps"]
    assert summary["trainable_params"] == solo_summary["trainable_params"]
    assert summary["settings_hash"] == solo_summary["settings_hash"], "the arm's settings are the solo run's"
    assert rel(summary["delta_norm"], solo_summary["delta_norm"]) <= DELTA_RTOL
    for name in (rt.RESOLVED_CONFIG, rt.SETTINGS):
        assert os.path.isfile(os.path.join(arm_dir, name)), name
    assert owner(arm_dir)["kind"] == "train"
    assert not os.path.exists(os.path.join(arm_dir, "checkpoint"))
    return summary


def test_inject_multi_lora_draws_each_arms_solo_init(cfg):
    from rankwise.lora import inject_lora, lora_layers
    from rankwise.model import load_model

    ranks = [1, 5, 16]
    model = inject_multi_lora(load_model(cfg["model"], dtype="fp32"), ["q_proj", "v_proj"], ranks, [2.0, 8.0, 4.0],
                              seed=3)
    layers = rlay.multi_lora_layers(model)
    assert len(layers) == 4 and all(m.ranks == ranks for _, m in layers)
    assert not [n for n, p in model.named_parameters() if p.requires_grad and "arm_" not in n]
    for k, r in enumerate(ranks):
        torch.manual_seed(3)
        solo = dict(lora_layers(inject_lora(load_model(cfg["model"], dtype="fp32"), ["q_proj", "v_proj"], r, 1.0)))
        for name, m in layers:
            assert torch.equal(m.arm_A[k], solo[name].lora_A), f"arm {k} (r={r}) {name}: A is not the solo draw"
            assert not m.arm_B[k].any()
    x = torch.randn(3 * 2, 5, 32)  # three row blocks of (2, 5): the same input for each arm
    x[2:4], x[4:] = x[:2], x[:2]
    name, m = layers[0]
    with torch.no_grad():
        for k in range(3):
            m.arm_B[k].normal_()
        y = m(x)
        for k in range(3):
            rlay.select_arms(model, [k])
            assert m.lora_A is m.arm_A[k] and m.scaling == m.scalings[k]
            torch.testing.assert_close(y[2 * k:2 * k + 2], m(x[:2]), rtol=1e-5, atol=1e-5)
    rlay.select_arms(model, [0, 2])
    assert m.lora_A is None
    with pytest.raises(ValueError, match="one block of rows per selected arm"):
        m(torch.randn(3, 4, 32))
    assert isinstance(m, MultiLoRALinear) and "ranks=[1, 5, 16]" in repr(m)
    # the arms' adapters concatenated, not padded: arm k at offsets[k]
    assert m.offsets == [0, 1, 6] and m.A_cat.shape == (22, 32) and m.B_cat.shape == (m.out_features, 22)
    for k, (o, r) in enumerate(zip(m.offsets, ranks)):
        assert torch.equal(m.A_cat[o:o + r], m.arm_A[k]) and torch.equal(m.B_cat[:, o:o + r], m.arm_B[k])
    with torch.no_grad():  # the op on the concatenated layout computes what the layer computes
        rlay.select_arms(model, [0, 1, 2])
        y_cat = multi_lora_linear(x, m.base.weight, m.A_cat, m.B_cat, m.ranks, m.scalings, [10, 10, 10],
                                  bias=m.base.bias, backend="torch")
        torch.testing.assert_close(y_cat, m(x), rtol=0, atol=0)


def test_together_sweep_arms_equal_their_solo_runs(cfg, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    ranks = [1, 4, 16]  # 16: the most v_proj (32 -> 16) can hold
    results = sweep(cfg, ranks, out_dir=str(out), alpha_ratio=2, together=True)
    assert [r["arm"] for r in results] == ["lora_r1", "lora_r4", "lora_r16"]
    assert all(r["status"] == "finished" for r in results)
    md = (out / "sweep.md").read_text()
    assert "| lora_r16 |" in md and (out / "sweep_in_domain.png").exists()
    for r in ranks:
        solo_dir = tmp_path / f"solo_r{r}"
        solo = rt.train({**arm_cfg(cfg, r, solo_dir), "lora": {**cfg["lora"], "r": r, "alpha": 2.0 * r}})
        check_like_solo(out / "arms" / f"lora_r{r}", solo_dir, solo, f"r={r}")
        assert [x["step"] for x in read_rows(solo_dir)] == [2, 4, 6, 6]  # three loss rows, then the final eval

    # a second sweep reuses every finished arm: nothing trains
    def refuse(*a, **k):
        raise AssertionError("a finished arm was trained again")

    monkeypatch.setattr(rtog, "train_together", refuse)
    monkeypatch.setattr(rt, "train", refuse)
    again = sweep(cfg, ranks, out_dir=str(out), alpha_ratio=2, together=True)
    assert [r["train_loss"] for r in again] == [r["train_loss"] for r in results]


def test_nf4_base_arms_equal_their_solo_runs(cfg, tmp_path):
    base = {**cfg, "quantization": "nf4"}
    ranks = [2, 8]
    summaries = train_together([arm_cfg(base, r, tmp_path / f"arm_r{r}") for r in ranks])
    assert [s["rank"] for s in summaries] == ranks
    for r in ranks:
        solo = rt.train(arm_cfg(base, r, tmp_path / f"solo_r{r}"))
        check_like_solo(tmp_path / f"arm_r{r}", tmp_path / f"solo_r{r}", solo, f"nf4 r={r}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision,quantization", [("bf16", None), ("fp16", None), ("bf16", "nf4")])
def test_arms_equal_their_solo_runs_on_gpu(cfg, tmp_path, precision, quantization):
    """On a GPU the arms run the multi-LoRA Triton kernels and each solo run the single-arm ones
    (each GEMM by its measured path), under bf16 / fp16 autocast (fp16: a GradScaler per arm),
    dense and NF4: the issue's bounds, losses within 5e-3 and scaling*B@A within 5e-2 relative."""
    base = {**cfg, "train": {**cfg["train"], "device": "cuda", "precision": precision}}
    if quantization:
        base["quantization"] = quantization
    ranks = [1, 4, 16]
    train_together([arm_cfg(base, r, tmp_path / f"arm_r{r}") for r in ranks])
    for r in ranks:
        solo = rt.train(arm_cfg(base, r, tmp_path / f"solo_r{r}"))
        check_like_solo(tmp_path / f"arm_r{r}", tmp_path / f"solo_r{r}", solo, f"cuda {precision} {quantization} r={r}")


def test_a_nan_arm_stops_alone(cfg, tmp_path):
    # log_every 3: the NaN loss of step 3 comes before the first weight check (its weights overflow at step 2)
    cfgs = [arm_cfg(cfg, 2, tmp_path / "ok_r2", log_every=3),
            arm_cfg(cfg, 4, tmp_path / "bad_r4", lr=1e30, log_every=3), arm_cfg(cfg, 8, tmp_path / "ok_r8", log_every=3)]
    summaries = train_together(cfgs)
    bad = summaries[1]
    assert bad["status"] == "failed" and bad["reason"].startswith("non-finite loss: training loss is nan at step ")
    assert json.loads((tmp_path / "bad_r4" / "failed.json").read_text())["reason"] == bad["reason"]
    assert not (tmp_path / "bad_r4" / "summary.json").exists()
    for r, k in ((2, 0), (8, 2)):
        assert summaries[k]["status"] == "finished"
        solo = rt.train(arm_cfg(cfg, r, tmp_path / f"solo_r{r}", log_every=3))
        check_like_solo(tmp_path / f"ok_r{r}", tmp_path / f"solo_r{r}", solo, f"next to a NaN arm, r={r}")


def test_an_arm_whose_weights_overflow_behind_a_finite_loss_stops_alone(cfg, tmp_path, monkeypatch):
    """Its weights go inf/NaN while its loss still looks finite: found on a logging step (one device-side
    reduction per arm), that arm fails alone and nothing of it is saved as finished; the other is its solo run."""
    real = rtog.arm_loss_sums
    monkeypatch.setattr(rtog, "arm_loss_sums",
                        lambda *a, **k: torch.nan_to_num(real(*a, **k), nan=3.5, posinf=3.5, neginf=3.5))
    summaries = train_together([arm_cfg(cfg, 2, tmp_path / "ok_r2"), arm_cfg(cfg, 4, tmp_path / "bad_r4", lr=1e30)])
    bad = summaries[1]
    assert bad["status"] == "failed", bad
    assert bad["reason"].startswith("non-finite weights: the trainable weights hold inf or NaN (checked every "
                                    "train.log_every 2 steps and before each save; the loss may still look finite) "
                                    "at step 2; the run stopped"), bad["reason"]
    assert json.loads((tmp_path / "bad_r4" / "failed.json").read_text())["reason"] == bad["reason"]
    assert not (tmp_path / "bad_r4" / "summary.json").exists() and not (tmp_path / "bad_r4" / "adapter").exists()
    assert all(r["step"] < 2 for r in read_rows(tmp_path / "bad_r4")), "no row of the step that broke it"
    assert summaries[0]["status"] == "finished"
    solo = rt.train(arm_cfg(cfg, 2, tmp_path / "solo_r2"))
    check_like_solo(tmp_path / "ok_r2", tmp_path / "solo_r2", solo, "next to an arm with overflowing weights")


def test_arms_are_locked_and_a_refused_run_leaves_nothing_behind(cfg, tmp_path):
    """Each arm's directory is locked as ``rankwise train`` locks it: a together run meeting a locked arm is
    refused in one line naming the holder, and removes the directories it had already created for other arms."""
    from rankwise.ownership import claim
    from rankwise.runlock import RunLock

    busy = tmp_path / "busy_r4"
    claim(busy, "train")
    with RunLock(busy):
        with pytest.raises(ConfigError, match=f"output_dir {busy} is in use by another rankwise run "
                                              rf"\(pid {os.getpid()};") as e:
            train_together([arm_cfg(cfg, 2, tmp_path / "new_r2"), arm_cfg(cfg, 4, busy)])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "new_r2").exists(), "the arm directory the refused run created is removed"
    assert sorted(os.listdir(busy)) == [".rankwise-run.json"]
    missing = {**cfg, "data": {**cfg["data"], "train": str(tmp_path / "missing.jsonl")}}
    with pytest.raises(ConfigError, match="data.train: file not found"):  # after the claims: they are undone
        train_together([arm_cfg(missing, 2, tmp_path / "t_r2"), arm_cfg(missing, 4, tmp_path / "t_r4")])
    assert not (tmp_path / "t_r2").exists() and not (tmp_path / "t_r4").exists()


def test_group_size_trains_the_arms_in_groups(cfg, tmp_path, monkeypatch):
    groups, real = [], rtog.train_together

    def recording(cfgs, *a, **k):
        groups.append([c["lora"]["r"] for c in cfgs])
        return real(cfgs, *a, **k)

    monkeypatch.setattr(rtog, "train_together", recording)
    results = sweep(cfg, [1, 2, 4], out_dir=str(tmp_path / "g"), together=True, group_size=2)
    assert groups == [[1, 2], [4]]
    assert [r["status"] for r in results] == ["finished"] * 3
    whole = sweep(cfg, [1, 2, 4], out_dir=str(tmp_path / "whole"), together=True)
    for a, b in zip(results, whole):
        assert rel(a["train_loss"], b["train_loss"]) <= 1e-5


@pytest.mark.parametrize("kwargs,match", [
    ({"ranks": []}, "--ranks is empty"),
    ({"ranks": [2], "overrides": ["method=full"]}, "--together trains LoRA arms, but the config has method 'full'"),
    ({"ranks": [1, 17]}, r"ranks \[17\] exceed the dimensions of model.layers.0.self_attn.v_proj \(32 -> 16\)"),
    ({"ranks": [1], "group_size": 0}, "--group-size must be an integer >= 1"),
    ({"ranks": [1], "together": False, "group_size": 2}, "--group-size applies to --together sweeps only"),
])
def test_bad_input_is_one_line_and_writes_nothing(cfg, tmp_path, kwargs, match):
    out = tmp_path / "bad"
    kwargs = {"together": True, **kwargs}
    with pytest.raises(ConfigError, match=match) as e:
        sweep(cfg, out_dir=str(out), **kwargs)
    assert "\n" not in str(e.value)
    assert not out.exists()


def test_cli_together_and_its_refusals(cfg, tmp_path, capsys):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp_path / "cli")}))
    assert cli.main(["sweep", str(path), "--ranks", "1,2", "--together", "--set", "train.max_steps=2"]) == 0
    assert "lora_r2" in capsys.readouterr().out
    assert (tmp_path / "cli" / "arms" / "lora_r2" / "adapter" / "adapter_config.json").exists()
    for argv, message in (([",", "--together"], "--ranks is empty"),
                          (["1", "--together", "--set", "method=full"], "--together trains LoRA arms"),
                          (["1,64", "--together"], "ranks [64] exceed the dimensions")):
        out = tmp_path / "refused"
        assert cli.main(["sweep", str(path), "--ranks", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_train_together_refuses_arms_that_differ_in_shared_keys(cfg, tmp_path):
    cfgs = [arm_cfg(cfg, 1, tmp_path / "a"), arm_cfg(cfg, 2, tmp_path / "b", max_steps=3)]
    with pytest.raises(ConfigError, match="differs in train.max_steps"):
        train_together(cfgs)
    with pytest.raises(ConfigError, match="share the output_dir"):
        train_together([arm_cfg(cfg, 1, tmp_path / "a"), arm_cfg(cfg, 2, tmp_path / "a")])
    with pytest.raises(ConfigError, match="PiSSA"):
        train_together([{**arm_cfg(cfg, 1, tmp_path / "a"), "lora": {**cfg["lora"], "init": "pissa"}}])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


class Crash(Exception):
    pass


def test_an_interrupted_together_sweep_resumes_from_its_checkpoint(cfg, tmp_path, monkeypatch):
    """Stopped after the step-4 checkpoint, run again: every arm ends bit for bit as in an uninterrupted sweep."""
    c = {**cfg, "train": {**cfg["train"], "save_every": 2}, "lora": {**cfg["lora"], "dropout": 0.1}}
    whole = sweep(c, [1, 4], out_dir=str(tmp_path / "whole"), together=True)
    real_lr_at = rfit.lr_at

    def crash_at_step_5(step, *a, **k):
        if step == 4:
            raise Crash("power cut")
        return real_lr_at(step, *a, **k)

    out = tmp_path / "cut"
    monkeypatch.setattr(rfit, "lr_at", crash_at_step_5)
    with pytest.raises(Crash):
        sweep(c, [1, 4], out_dir=str(out), together=True)
    ckpt = out / "together" / "lora_r1+lora_r4"
    assert (ckpt / "tensors.safetensors").exists() and not (out / "arms" / "lora_r1" / "summary.json").exists()
    monkeypatch.setattr(rfit, "lr_at", real_lr_at)
    resumed = sweep(c, [1, 4], out_dir=str(out), together=True)
    assert not ckpt.exists(), "the checkpoint is removed when the group finishes"
    for a, b in zip(resumed, whole):
        assert a["train_loss"] == b["train_loss"] and a["eval_loss"] == b["eval_loss"]
        _, pa = lora_pairs(out / "arms" / a["arm"] / "adapter")
        _, pb = lora_pairs(tmp_path / "whole" / "arms" / b["arm"] / "adapter")
        assert all(torch.equal(pa[n][i], pb[n][i]) for n in pb for i in (0, 1))
        rows = lambda d: [(r["step"], r.get("loss")) for r in read_rows(d)]  # noqa: E731
        assert rows(out / "arms" / a["arm"]) == rows(tmp_path / "whole" / "arms" / b["arm"])


def test_dropout_masks_are_the_solo_runs(cfg, tmp_path):
    """With dropout each arm draws its solo run's seeds, and the op its solo run's masks: the runs agree."""
    c = {**cfg, "lora": {**cfg["lora"], "dropout": 0.2}}
    train_together([arm_cfg(c, r, tmp_path / f"arm_r{r}") for r in (1, 4)])
    for r in (1, 4):
        solo = rt.train(arm_cfg(c, r, tmp_path / f"solo_r{r}"))
        check_like_solo(tmp_path / f"arm_r{r}", tmp_path / f"solo_r{r}", solo, f"dropout 0.2, r={r}")


def test_fused_kernels_model_logits_and_checkpointing_like_solo(cfg, tmp_path):
    """The other paths of the solo run: fused RMSNorm/SwiGLU, the model's own logits, gradient checkpointing."""
    c = {**cfg, "train": {**cfg["train"], "fused_kernels": True, "fused_loss": False, "gradient_checkpointing": True}}
    train_together([arm_cfg(c, r, tmp_path / f"arm_r{r}") for r in (1, 4)])
    for r in (1, 4):
        solo = rt.train(arm_cfg(c, r, tmp_path / f"solo_r{r}"))
        check_like_solo(tmp_path / f"arm_r{r}", tmp_path / f"solo_r{r}", solo, f"fused kernels, logits, r={r}")


def test_a_group_that_fails_whole_is_recorded_and_the_sweep_goes_on(cfg, tmp_path, monkeypatch):
    def out_of_memory(cfgs, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(rtog, "train_together", out_of_memory)
    out = tmp_path / "oom"
    results = sweep({**cfg, "train": {**cfg["train"], "max_steps": 2}}, [1, 2], full_sft=True, out_dir=str(out),
                    together=True)
    by_arm = {r["arm"]: r for r in results}
    for arm in ("lora_r1", "lora_r2"):
        assert by_arm[arm]["status"] == "failed" and by_arm[arm]["reason"].startswith("out of memory")
        assert json.loads((out / "arms" / arm / "failed.json").read_text())["status"] == "failed"
    assert by_arm["full_sft"]["status"] == "finished", "full SFT runs on its own, after the LoRA group"


def test_resume_refuses_a_checkpoint_of_other_settings(cfg, tmp_path, monkeypatch):
    c = {**cfg, "train": {**cfg["train"], "save_every": 2}}
    real_lr_at = rfit.lr_at

    def crash_at_step_3(step, *a, **k):
        if step == 2:
            raise Crash("power cut")
        return real_lr_at(step, *a, **k)

    monkeypatch.setattr(rfit, "lr_at", crash_at_step_3)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Crash):
        train_together([arm_cfg(c, r, tmp_path / f"r{r}") for r in (1, 2)], checkpoint_dir=str(ckpt))
    monkeypatch.setattr(rfit, "lr_at", real_lr_at)
    assert (ckpt / "state.json").exists()
    with pytest.raises(ConfigError, match=r"the settings of the arm .*r2 changed since the checkpoint .*train.lr"):
        train_together([arm_cfg(c, 1, tmp_path / "r1"), arm_cfg(c, 2, tmp_path / "r2", lr=0.5)],
                       checkpoint_dir=str(ckpt), resume=True)
    with pytest.raises(ConfigError, match="holds 2 arms, this run has 1"):
        train_together([arm_cfg(c, 1, tmp_path / "r1")], checkpoint_dir=str(ckpt), resume=True)
    summaries = train_together([arm_cfg(c, r, tmp_path / f"r{r}") for r in (1, 2)], checkpoint_dir=str(ckpt),
                               resume=True)
    assert [s["status"] for s in summaries] == ["finished", "finished"] and not ckpt.exists()


def test_peak_estimate_is_linear_in_the_arms_and_their_ranks(cfg):
    """base + K * activations + (adapters, grads, AdamW moments, concat copy) * sum r: as modelled, exactly."""
    c = {**cfg, "method": "lora"}
    est = lambda ranks: rmem.estimate_peak_bytes(c, ranks, device="cpu")  # noqa: E731
    shape = rmem.model_shape(rt.C.parse(c))
    per_rank = rmem.ADAPTER_COPIES * 4 * sum(i + o for i, o in shape["targets"].values())
    act = est([4, 4]) - est([4]) - 4 * per_rank
    assert act > 0
    for k in (1, 2, 5):
        assert abs(est([4] * (k + 1)) - est([4] * k) - (act + 4 * per_rank)) <= 1, k  # linear in K
    assert abs(est([1, 5]) - est([2, 4])) <= 1  # same K, same sum of ranks
    assert abs(est([1, 13]) - est([1, 5]) - 8 * per_rank) <= 1  # linear in sum r
    nf4 = rmem.estimate_peak_bytes({**c, "quantization": "nf4"}, [4], device="cpu")
    assert abs(est([4]) - nf4 - shape["target_params"] * (4 - rmem.NF4_BYTES)) <= 1  # NF4: targeted weights only
    ckpt = rmem.estimate_peak_bytes({**c, "train": {**cfg["train"], "gradient_checkpointing": True}}, [4], device="cpu")
    assert ckpt < est([4])


def test_a_small_memory_budget_splits_the_arms_into_groups_that_fit(cfg, tmp_path, monkeypatch):
    c = {**cfg, "method": "lora"}
    budget = rmem.estimate_peak_bytes(c, [1, 2], device="cpu") + 1  # room for ranks 1+2, then 4 and 8 alone
    assert rmem.plan_groups(c, [1, 2, 4, 8], budget, device="cpu") == [[1, 2], [4], [8]]
    groups, real = [], rtog.train_together

    def recording(cfgs, *a, **k):
        groups.append([x["lora"]["r"] for x in cfgs])
        return real(cfgs, *a, **k)

    monkeypatch.setattr(rmem, "memory_budget", lambda device: budget)
    monkeypatch.setattr(rtog, "train_together", recording)
    out = tmp_path / "planned"
    results = sweep(cfg, [1, 2, 4, 8], out_dir=str(out), together=True)
    assert groups == [[1, 2], [4], [8]]
    assert [r["status"] for r in results] == ["finished"] * 4
    for r in (1, 2, 4, 8):
        solo = rt.train(arm_cfg(cfg, r, tmp_path / f"solo_r{r}"))
        check_like_solo(out / "arms" / f"lora_r{r}", tmp_path / f"solo_r{r}", solo, f"planned group, r={r}")


def test_an_arm_too_big_for_memory_alone_is_refused_in_one_line(cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(rmem, "memory_budget", lambda device: 4096)
    out = tmp_path / "too_big"
    with pytest.raises(ConfigError, match=r"the LoRA arm of rank 1 alone needs about .* GiB .* more than the") as e:
        sweep(cfg, [1, 2], out_dir=str(out), together=True)
    assert "\n" not in str(e.value) and not out.exists()
    monkeypatch.setattr(rmem, "memory_budget", lambda device: None)  # unknown memory: one group, no refusal
    assert [r["status"] for r in sweep({**cfg, "train": {**cfg["train"], "max_steps": 2}}, [1, 2], out_dir=str(out),
                                       together=True)] == ["finished"] * 2


@pytest.mark.parametrize("fused", [False, True])
def test_batched_evaluation_equals_arm_by_arm(cfg, fused):
    """evaluate_arms: every arm's eval loss from one stacked pass equals its own pass; accuracies are the same."""
    import contextlib

    from rankwise.model import load_model, load_tokenizer

    c = rt.C.parse({**cfg, "method": "lora"})
    tok = load_tokenizer(cfg["model"])
    _, evals = rt.load_data(c, tok, True)
    assert evals["eval"][0] is not None and evals["eval"][1] is not None  # loss batches and QA items
    model = inject_multi_lora(load_model(cfg["model"], dtype="fp32"), cfg["lora"]["targets"], [1, 4, 16],
                              [2.0, 8.0, 32.0], seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, m in rlay.multi_lora_layers(model):
            for B in m.arm_B:
                B.normal_(std=0.5)
    model.train()
    nullctx = contextlib.nullcontext
    batched = rtog.evaluate_arms(model, [0, 2, 1], tok, evals, [c] * 3, nullctx, fused, "torch")
    assert model.training and rlay.multi_lora_layers(model)[0][1].arms == [0, 2, 1]
    for k in range(3):
        one = rtog.evaluate_arm(model, k, tok, evals, c, nullctx)
        assert batched[k].keys() == one.keys() == {"eval_loss", "eval_accuracy"}
        assert rel(batched[k]["eval_loss"], one["eval_loss"]) <= 1e-5, (k, batched[k], one)
        assert batched[k]["eval_accuracy"] == one["eval_accuracy"]
    assert len({round(batched[k]["eval_loss"], 6) for k in range(3)}) == 3  # the arms differ: no arm got another's


def _arms_with_distinct_adapters(cfg, ranks, alphas):
    from rankwise.model import load_model

    model = inject_multi_lora(load_model(cfg["model"], dtype="fp32"), cfg["lora"]["targets"], ranks, alphas, seed=0)
    torch.manual_seed(7)
    with torch.no_grad():
        for _, m in rlay.multi_lora_layers(model):
            for B in m.arm_B:
                B.normal_(std=1.0)
    return model


def _solo_model(cfg, model, k, eos):
    """Arm k of ``model`` as a LoRA-injected solo model (``inject_lora`` with its rank, its A and B copied)."""
    from rankwise.lora import inject_lora, lora_layers
    from rankwise.model import load_model

    layers = dict(rlay.multi_lora_layers(model))
    m0 = next(iter(layers.values()))
    solo = inject_lora(load_model(cfg["model"], dtype="fp32"), cfg["lora"]["targets"], m0.ranks[k], m0.alphas[k])
    with torch.no_grad():
        for name, lm in lora_layers(solo):
            lm.lora_A.copy_(layers[name].arm_A[k])
            lm.lora_B.copy_(layers[name].arm_B[k])
    solo.generation_config.eos_token_id = eos
    return solo


def test_batched_generation_equals_each_arms_solo_generation(cfg):
    """generate_arms: each arm's greedy answers, token for token, are its solo model's (generate_answers), with
    mixed ranks (1, 3, 8), prompts of awkward lengths in chunks of 3 (the last one short) and an EOS that stops
    some rows of a chunk early; the arms answer differently, so arms swapped between streams would fail."""
    from rankwise.evaluate import generate_answers
    from rankwise.model import load_tokenizer

    tok = load_tokenizer(cfg["model"])
    ranks, alphas = [1, 3, 8], [4.0, 3.0, 16.0]
    model = _arms_with_distinct_adapters(cfg, ranks, alphas)
    prompts = ["Q: a?", "Q: where was p12 born? A:", "x", "Q: where was p3 born, and when? A:", "ab cd", "Q:", "z."]
    plain = rtog.generate_arms(model, [0, 1, 2], tok, prompts, max_new_tokens=6, batch_size=3)
    eos = tok.convert_tokens_to_ids(plain[1][1][0][1])  # a token arm 1 emits: some rows now stop early
    model.generation_config.eos_token_id = eos
    model.train()
    outs = rtog.generate_arms(model, [2, 0, 1], tok, prompts, max_new_tokens=6, batch_size=3)
    assert model.training and rlay.multi_lora_layers(model)[0][1].arms == [2, 0, 1]
    assert sorted(outs) == [0, 1, 2] and all(len(outs[k]) == len(prompts) for k in outs)
    assert any(len(o[0]) < 6 for o in outs[1]), "no row met the EOS: the early stop is not exercised"
    for k in range(3):
        solo = generate_answers(_solo_model(cfg, model, k, eos), tok, prompts, max_new_tokens=6, batch_size=3)
        assert outs[k] == solo, f"arm {k} (r={ranks[k]}): {outs[k]} != its solo model's {solo}"
    assert len({tuple(o[0] for o in outs[k]) for k in range(3)}) == 3, "the arms answer alike: a mix-up would pass"


class RecordingScaler(torch.amp.GradScaler):
    """A CPU GradScaler that records its scale after every update (fast growth, so growth shows in six steps)."""

    def __init__(self, init_scale=2.0 ** 10, growth_interval=2):
        super().__init__("cpu", init_scale=init_scale, growth_interval=growth_interval)
        self.history = []

    def update(self, new_scale=None):
        super().update(new_scale)
        self.history.append(self.get_scale())


def fp16_precision(monkeypatch, made, autocast_fp16=False, **scaler_kw):
    """``train.setup_precision`` as on a GPU without bf16: a GradScaler (recorded in ``made``, one per call) with
    CPU fp16 autocast, or with fp32 math (the scaler's logic alone, exactly)."""
    import contextlib

    def setup(precision, device, master):
        made.append(RecordingScaler(**scaler_kw))
        if autocast_fp16:
            return (lambda: torch.autocast("cpu", dtype=torch.float16)), made[-1], torch.float16
        return contextlib.nullcontext, made[-1], None

    for module in (rt, rtog):  # the solo run's and the together run's
        monkeypatch.setattr(module, "setup_precision", setup)


def inject_inf(monkeypatch, rank, calls):
    """An inf in one gradient element of the rank-``rank`` LoRA's first ``lora_A`` at these backward calls
    (0-based), in a solo run and in a together run alike (a hook on the leaf the optimizer is built over)."""
    real = rt.build_optimizer

    def build(t, trainable, device):
        _, p = trainable.named[0]
        if p.shape[0] == rank:
            seen = [0]

            def hook(g):
                seen[0] += 1
                if seen[0] - 1 in calls:
                    g = g.clone()
                    g.view(-1)[0] = float("inf")
                return g

            p.register_hook(hook)
        return real(t, trainable, device)

    for module in (rt, rtog):  # the solo run's and the together run's
        monkeypatch.setattr(module, "build_optimizer", build)


def test_fp16_loss_scaling_skips_and_scales_per_arm_like_solo(cfg, tmp_path, monkeypatch):
    """GradScaler semantics per arm: an inf in the rank-4 arm's gradients at steps 2 and 3 skips that arm's steps
    and halves its scale alone; the scales grow per arm; every arm ends as its solo run with the same scaler."""
    made = []
    fp16_precision(monkeypatch, made)
    inject_inf(monkeypatch, 4, {1, 2})
    ranks = [2, 4, 8]
    summaries = train_together([arm_cfg(cfg, r, tmp_path / f"arm_r{r}") for r in ranks])
    assert [s["status"] for s in summaries] == ["finished"] * 3
    together = [s.history for s in made]
    assert len(together) == 3, "one GradScaler per arm"
    assert together[1] == [1024, 512, 256, 256, 512, 512], "the rank-4 arm: two skipped steps, then growth"
    assert together[0] == together[2] == [1024, 2048, 2048, 4096, 4096, 8192], "the other arms never skip"
    for k, r in enumerate(ranks):
        made.clear()
        solo = rt.train(arm_cfg(cfg, r, tmp_path / f"solo_r{r}"))
        assert [s.history for s in made] == [together[k]], f"r={r}: the scale history is not the solo run's"
        check_like_solo(tmp_path / f"arm_r{r}", tmp_path / f"solo_r{r}", solo, f"fp16 scaler, r={r}")


def test_fp16_autocast_arms_overflow_and_resume_like_solo(cfg, tmp_path, monkeypatch):
    """CPU fp16 autocast with a 2**16 initial scale: the arms overflow on their own, at other steps (ranks 1 and 4
    differ), each exactly when its solo run does; an interrupted run resumes every arm's scaler bit for bit."""
    made = []
    fp16_precision(monkeypatch, made, autocast_fp16=True, init_scale=2.0 ** 16)
    c = {**cfg, "train": {**cfg["train"], "save_every": 2}}
    ranks = [1, 4]
    train_together([arm_cfg(c, r, tmp_path / f"arm_r{r}") for r in ranks])
    together = [s.history for s in made]
    skipped = [[b < a for a, b in zip([2.0 ** 16] + h, h)] for h in together]  # a scale that fell: an overflow
    assert all(any(s) for s in skipped) and skipped[0] != skipped[1], together
    for k, r in enumerate(ranks):
        made.clear()
        solo = rt.train(arm_cfg(c, r, tmp_path / f"solo_r{r}"))
        assert [s.history for s in made] == [together[k]], f"r={r}: the scale history is not the solo run's"
        check_like_solo(tmp_path / f"arm_r{r}", tmp_path / f"solo_r{r}", solo, f"fp16 autocast, r={r}")

    real_lr_at = rfit.lr_at

    def crash_at_step_5(step, *a, **k):
        if step == 4:
            raise Crash("power cut")
        return real_lr_at(step, *a, **k)

    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(rfit, "lr_at", crash_at_step_5)
    with pytest.raises(Crash):
        train_together([arm_cfg(c, r, tmp_path / f"cut_r{r}") for r in ranks], checkpoint_dir=str(ckpt))
    monkeypatch.setattr(rfit, "lr_at", real_lr_at)
    made.clear()
    train_together([arm_cfg(c, r, tmp_path / f"cut_r{r}") for r in ranks], checkpoint_dir=str(ckpt), resume=True)
    assert [s.history for s in made] == [h[4:] for h in together], "the scalers did not resume their state"
    for r in ranks:
        _, pa = lora_pairs(tmp_path / f"cut_r{r}" / "adapter")
        _, pb = lora_pairs(tmp_path / f"arm_r{r}" / "adapter")
        assert all(torch.equal(pa[n][i], pb[n][i]) for n in pb for i in (0, 1)), f"r={r}: resumed != uninterrupted"


def test_model_shapes_are_read_once_per_config_file(tmp_path, monkeypatch):
    """target_dims / model_shape build the meta model once per (config.json stamp, targets); a rewritten config
    is read again; callers get copies."""
    from test_data import build_tiny_llama

    c = {"model": build_tiny_llama(tmp_path / "m"), "lora": {"r": 1, "targets": ["q_proj"]},
         "data": {"train": "unused.jsonl"}, "output_dir": str(tmp_path / "out")}
    builds, real = [], rmem._meta_model
    monkeypatch.setattr(rmem, "_meta_model", lambda path: builds.append(path) or real(path))
    dims = rmem.target_dims(c)
    dims.clear()
    assert len(rmem.target_dims(c)) == 2 and len(builds) == 1
    assert rmem.model_shape(c)["layers"] == 2 and rmem.model_shape(c)["targets"] == rmem.target_dims(c)
    assert len(builds) == 2
    assert len(rmem.target_dims({**c, "lora": {"r": 1, "targets": ["q_proj", "v_proj"]}})) == 4 and len(builds) == 3
    path = tmp_path / "m" / "config.json"
    path.write_text(path.read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 12'))
    assert len(rmem.target_dims(c)) == 12 and len(builds) == 4


def test_step_arms_is_bit_for_bit_k_independent_adamw_steps():
    """step_arms (foreach ops over every arm's tensors) equals each arm's own AdamW.step(): parameters and state
    bit for bit, with per-arm lr and weight decay, a no-decay group, and a parameter without a gradient."""
    def arms():
        torch.manual_seed(0)
        out = []
        for r, lr, wd in ((1, 1e-3, 0.01), (4, 3e-4, 0.0), (16, 1e-2, 0.1)):
            ps = [torch.nn.Parameter(torch.randn(r, 32)), torch.nn.Parameter(torch.randn(16, r)),
                  torch.nn.Parameter(torch.randn(5))]
            groups = [{"params": ps[:2], "weight_decay": wd}, {"params": ps[2:], "weight_decay": 0.0}]
            out.append((ps, torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)))
        return out

    solo, together = arms(), arms()
    for step in range(4):
        for side in (solo, together):
            g = torch.Generator().manual_seed(step)
            for k, (ps, opt) in enumerate(side):
                for i, p in enumerate(ps):
                    p.grad = None if (k, i, step) == (1, 2, 1) else torch.randn(p.shape, generator=g)
                for group in opt.param_groups:
                    group["lr"] *= 0.9
        for _, opt in solo:
            opt.step()
        rfit.step_arms([opt for _, opt in together])
    for (ps, opt), (qs, qopt) in zip(solo, together):
        for p, q in zip(ps, qs):
            assert torch.equal(p, q), float((p - q).abs().max())
            assert opt.state[p].keys() == qopt.state[q].keys()
            for key in opt.state[p]:
                a, b = opt.state[p][key], qopt.state[q][key]
                assert a.dtype == b.dtype and torch.equal(a, b), key


def test_clip_arms_is_bit_for_bit_clip_grad_norm_per_arm():
    """clip_arms (one foreach norm and one foreach mul over every arm's gradients) equals clip_grad_norm_ arm by
    arm: the norms and the clipped gradients, with arms clipped, unclipped (None) and without gradients."""
    def arms():
        torch.manual_seed(0)
        return [[torch.nn.Parameter(torch.randn(r, 8)) for _ in range(3)] for r in (1, 4, 16, 2)]

    solo, together = arms(), arms()
    for side in (solo, together):
        g = torch.Generator().manual_seed(1)
        for k, ps in enumerate(side):
            for p in ps:
                p.grad = None if k == 3 else torch.randn(p.shape, generator=g) * (k + 1)
    max_norms = [0.5, None, 100.0, 1.0]
    want = [torch.nn.utils.clip_grad_norm_(ps, m if m is not None else float("inf")) for ps, m in zip(solo, max_norms)]
    got = rfit.clip_arms(together, max_norms)
    assert [float(n) for n in got] == [float(n) for n in want]
    for ps, qs in zip(solo, together):
        assert all((p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad) for p, q in zip(ps, qs))


def test_resume_from_a_crafted_step_of_a_together_checkpoint_is_refused(cfg, tmp_path, monkeypatch):
    """A together checkpoint's step is checked as a solo run's: outside [0, total_steps) it is one line, nothing
    changed (before, ``int(step)`` took a string, and a step past the end wrote finished arms)."""
    from test_ownership import snapshot

    c = {**cfg, "train": {**cfg["train"], "save_every": 2}}
    cfgs = [arm_cfg(c, 1, tmp_path / "a_r1"), arm_cfg(c, 2, tmp_path / "a_r2")]
    ckpt = tmp_path / "ckpt"
    real_lr_at = rfit.lr_at

    def crash_at_step_5(step, *a, **k):
        if step == 4:
            raise Crash("power cut")
        return real_lr_at(step, *a, **k)

    monkeypatch.setattr(rfit, "lr_at", crash_at_step_5)
    with pytest.raises(Crash):
        train_together(cfgs, checkpoint_dir=ckpt)
    monkeypatch.setattr(rfit, "lr_at", real_lr_at)
    state = ckpt / "state.json"
    raw = json.loads(state.read_text())
    for step, match in ((10**6, r"its step 1000000 lies outside \[0, 6\)"), ("4", "its step '4' is not an integer"),
                        (-1, r"its step -1 lies outside \[0, 6\)")):
        state.write_text(json.dumps({**raw, "step": step}))
        before = snapshot(tmp_path)
        with pytest.raises(ConfigError, match=match) as e:
            train_together(cfgs, checkpoint_dir=ckpt, resume=True)
        assert "\n" not in str(e.value) and snapshot(tmp_path) == before
