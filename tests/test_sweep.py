"""Rank sweep: table and plots, skipping finished arms, resuming an interrupted one, recording failures."""
import csv
import json
import os

import pytest
import torch
from test_data import build_tiny_llama, qa_rows, write_jsonl

import rankwise.fit as rfit
import rankwise.train as rt
from rankwise import cli
from rankwise.checkpoint import load_checkpoint
from rankwise.errors import ConfigError
from rankwise.sweep import sweep


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweepworld")
    return {"model": build_tiny_llama(d / "model"),
            "lora": {"r": 16, "alpha": 8, "targets": ["q_proj", "v_proj"]},
            "data": {"train": write_jsonl(d / "train.jsonl", qa_rows(16)), "eval": write_jsonl(d / "eval.jsonl", qa_rows(4)),
                     "eval_ood": write_jsonl(d / "ood.jsonl", qa_rows(4, 50)), "max_length": 40},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "log_every": 2, "save_every": 2},
            "eval": {"every": 0, "max_new_tokens": 3}, "log": {"progress": False}, "output_dir": str(d / "unused")}


class Crash(Exception):
    pass


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_rank_sweep_writes_table_plots_and_resumes(cfg, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    real_train, real_lr_at = rt.train, rfit.lr_at
    calls = []

    def counting_train(c, overrides=None, resume=False):
        calls.append(os.path.basename(c["output_dir"]))
        return real_train(c, overrides, resume=resume)

    monkeypatch.setattr(rt, "train", counting_train)

    def crash_in_rank_2(step, *a, **k):  # the r=2 arm "loses power" at step 5, after its step-4 checkpoint
        if calls[-1] == "lora_r2" and step == 4:
            raise Crash("power cut")
        return real_lr_at(step, *a, **k)

    monkeypatch.setattr(rfit, "lr_at", crash_in_rank_2)
    with pytest.raises(Crash):
        sweep(cfg, [2, 1], out_dir=str(out))
    assert calls == ["lora_r1", "lora_r2"]
    assert (out / "arms" / "lora_r1" / "summary.json").exists()
    assert load_checkpoint(out / "arms" / "lora_r2" / "checkpoint")["step"] == 4  # safetensors + JSON
    monkeypatch.setattr(rfit, "lr_at", real_lr_at)

    # the full-SFT arm "runs out of memory"; it is recorded and the sweep goes on
    def oom_for_full(c, overrides=None, resume=False):
        calls.append(os.path.basename(c["output_dir"]))
        if c["method"] == "full":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return real_train(c, overrides, resume=resume)

    monkeypatch.setattr(rt, "train", oom_for_full)
    results = sweep(cfg, [1, 2], full_sft=True, masked=0.2, out_dir=str(out))
    assert calls[2:] == ["lora_r2", "full_sft", "masked_0.2"], "r=1 must be skipped, r=2 resumed"
    by_arm = {r["arm"]: r for r in results}
    assert [r["arm"] for r in results] == ["lora_r1", "lora_r2", "full_sft", "masked_0.2"]
    assert by_arm["full_sft"]["status"] == "failed" and by_arm["full_sft"]["reason"].startswith("out of memory")
    assert by_arm["lora_r2"]["status"] == "finished" and by_arm["masked_0.2"]["status"] == "finished"
    assert by_arm["lora_r1"]["trainable_params"] < by_arm["lora_r2"]["trainable_params"]
    metrics = [json.loads(x) for x in open(out / "arms" / "lora_r2" / "metrics.jsonl")]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4, 6]

    rows = read_csv(out / "sweep.csv")
    assert [r["arm"] for r in rows] == ["lora_r1", "lora_r2", "full_sft", "masked_0.2"]
    for r in rows:
        if r["status"] == "finished":
            for col in ("eval_loss", "eval_accuracy", "eval_ood_loss", "eval_ood_accuracy", "train_loss"):
                float(r[col])
    md = (out / "sweep.md").read_text()
    assert "| lora_r1 |" in md and "## Failed arms" in md and "full_sft: out of memory" in md
    for png in ("sweep_in_domain.png", "sweep_ood.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    # same data order and seed per arm: the r=1 arm's run equals a plain train() of the same config
    solo = real_train({**cfg, "lora": {**cfg["lora"], "r": 1}, "output_dir": str(tmp_path / "solo"),
                       "train": {**cfg["train"], "save_every": 0}})
    assert solo["train_loss"] == by_arm["lora_r1"]["train_loss"]
    assert solo["eval_loss"] == by_arm["lora_r1"]["eval_loss"]


def test_sweep_cli_and_bad_arguments(cfg, tmp_path, capsys):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp_path / "cli")}))
    assert cli.main(["sweep", str(path), "--ranks", "1", "--set", "train.max_steps=2", "--alpha-ratio", "2",
                     "--backend", "torch"]) == 0
    assert "lora_r1" in capsys.readouterr().out
    with open(tmp_path / "cli" / "arms" / "lora_r1" / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["lora_alpha"] == 2.0
    arm = tmp_path / "cli" / "arms" / "lora_r1"
    resolved = arm / "resolved_config.yaml"  # config.yaml before rankwise train stopped writing it
    arm_cfg = yaml.safe_load((resolved if resolved.exists() else arm / "config.yaml").read_text())
    assert arm_cfg["train"]["backend"] == "torch"  # --backend reaches every arm's train.backend
    with pytest.raises(SystemExit):
        cli.main(["sweep", str(path), "--ranks", "1", "--backend", "cuda"])
    assert cli.main(["sweep", str(path), "--ranks", "1,x"]) == 2
    assert "--ranks must be a comma-separated list of ints" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="ranks must be distinct integers >= 1"):
        sweep(cfg, [0, 1], out_dir=str(tmp_path / "bad"))


# ------------------------------------------------------------- lr / alpha / dropout crossed with the ranks

def test_arm_names_and_number_format():
    from rankwise.sweep import arm_name, number

    assert arm_name("lora", 4) == "lora_r4"
    assert arm_name("lora", 4, lr=3e-4, alpha=16.0, dropout=0.1) == "lora_r4_lr0.0003_a16_d0.1"
    assert arm_name("lora", 1, dropout=0.0, lr=1e-5) == "lora_r1_lr1e-5_d0"  # fixed order: lr, alpha, dropout
    for v in (3e-4, 1e-5, 16.0, 0.1, 2.5e-7, 1e20, 0.30000000000000004, 123456.789):
        s = number(v)
        assert float(s) == v and all(c in "0123456789.e-" for c in s), s


def test_crossed_hyperparameters_name_the_arms_and_reach_their_configs(cfg, tmp_path):
    import yaml

    out = tmp_path / "cross"
    small = {**cfg, "data": {k: v for k, v in cfg["data"].items() if k not in ("eval", "eval_ood")},
             "train": {**cfg["train"], "max_steps": 1, "save_every": 0}}
    results = sweep(small, [2, 1], out_dir=str(out), lrs=[3e-2, 1e-2], alphas=[8], dropouts=[0, 0.1],
                    together=True)
    names = [f"lora_r{r}_lr{lr}_d{d}" for r in (1, 2) for lr in ("0.01", "0.03") for d in ("0", "0.1")]
    assert [r["arm"] for r in results] == names  # ranks x lrs x dropouts; the one-value alphas is not in the names
    assert all(r["status"] == "finished" for r in results)
    for r in results:
        arm = yaml.safe_load((out / "arms" / r["arm"] / "resolved_config.yaml").read_text())
        rank, lr, d = r["arm"].removeprefix("lora_r").split("_")
        assert (arm["lora"]["r"], arm["train"]["lr"], arm["lora"]["dropout"], arm["lora"]["alpha"]) == \
            (int(rank), float(lr[2:]), float(d[1:]), 8.0)
        assert (r["lr"], r["dropout"]) == (float(lr[2:]), float(d[1:]))
    rows = read_csv(out / "sweep.csv")
    header = list(rows[0])
    assert header[:5] == ["arm", "method", "rank", "lr", "dropout"] and "alpha" not in header
    assert [float(x["lr"]) for x in rows] == [r["lr"] for r in results]
    assert "| lr | dropout |" in (out / "sweep.md").read_text()
    assert (out / "sweep_in_domain.png").read_bytes()[:4] == b"\x89PNG"  # one line per (lr, dropout)
    recorded = yaml.safe_load((out / "sweep.yaml").read_text())
    assert recorded["lrs"] == [0.01, 0.03] and recorded["dropouts"] == [0.0, 0.1] and "alphas" not in recorded
    assert recorded["arms"][names[-1]]["settings"]["train.lr"] == 0.03


def test_a_together_sweep_of_two_lrs_equals_the_solo_runs(cfg, tmp_path):
    from test_together import check_like_solo

    small = {**cfg, "data": {k: v for k, v in cfg["data"].items() if k != "eval_ood"},
             "train": {**cfg["train"], "max_steps": 4, "save_every": 0}}
    out = tmp_path / "sweep"
    results = sweep(small, [2], out_dir=str(out), lrs=[1e-2, 3e-2], together=True)
    assert [r["arm"] for r in results] == ["lora_r2_lr0.01", "lora_r2_lr0.03"]
    for lr, r in zip((1e-2, 3e-2), results):
        solo_dir = tmp_path / f"solo_{lr}"
        solo = rt.train({**small, "lora": {**cfg["lora"], "r": 2}, "train": {**small["train"], "lr": lr},
                         "output_dir": str(solo_dir)})
        check_like_solo(out / "arms" / r["arm"], solo_dir, solo, f"lr={lr}")
    assert results[0]["train_loss"] != results[1]["train_loss"]


def test_solo_alphas_sweep_and_cli(cfg, tmp_path, capsys):
    import yaml

    path = tmp_path / "c.yaml"
    small = {**cfg, "data": {k: v for k, v in cfg["data"].items() if k not in ("eval", "eval_ood")},
             "train": {**cfg["train"], "max_steps": 1, "save_every": 0}, "output_dir": str(tmp_path / "cli")}
    path.write_text(yaml.safe_dump(small))
    assert cli.main(["sweep", str(path), "--ranks", "1", "--alphas", "16,4", "--lrs", "0.02"]) == 0
    assert "lora_r1_a4" in capsys.readouterr().out
    for alpha in (4, 16):
        arm = tmp_path / "cli" / "arms" / f"lora_r1_a{alpha}"
        with open(arm / "adapter" / "adapter_config.json") as f:
            assert json.load(f)["lora_alpha"] == alpha
        resolved = yaml.safe_load((arm / "resolved_config.yaml").read_text())
        assert resolved["train"]["lr"] == 0.02  # a one-value list: every arm's value, not in the names
    assert [r["alpha"] for r in read_csv(tmp_path / "cli" / "sweep.csv")] == ["4.0", "16.0"]
    for argv, message in ((["--lrs", "1e-3,x"], "--lrs must be a comma-separated list of floats"),
                          (["--dropouts", ","], "--dropouts is empty"),
                          (["--alphas", "4,8", "--alpha-ratio", "2"], "--alphas and --alpha-ratio"),
                          (["--lrs", "0,1e-3"], "--lrs: lr must be > 0, got 0"),
                          (["--dropouts", "0.5,1", "--together"], "--dropouts: dropout must be in [0, 1), got 1")):
        out = tmp_path / "refused"
        assert cli.main(["sweep", str(path), "--ranks", "1", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()


@pytest.mark.parametrize("kwargs,match", [
    ({"lrs": []}, "--lrs is empty"),
    ({"lrs": [-1e-3]}, "lr must be > 0"),
    ({"lrs": [float("nan")]}, "lr must be > 0, got nan"),
    ({"alphas": [-1, 8]}, "alpha must be >= 0, got -1"),
    ({"alphas": [8, 16], "alpha_ratio": 2}, "--alphas and --alpha-ratio"),
    ({"dropouts": [0.1, -0.1]}, r"dropout must be in \[0, 1\)"),
    ({"dropouts": ["x"]}, "--dropouts must be numbers"),
    ({"lrs": [1e-3, 0.001]}, "--lrs has repeated values"),
])
def test_bad_hyperparameter_lists_are_one_line_and_write_nothing(cfg, tmp_path, kwargs, match):
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match=match) as e:
        sweep(cfg, [1], out_dir=str(out), **kwargs)
    assert "\n" not in str(e.value)
    assert not out.exists()


# ------------------------------------------------------------- the sweep directory: one sweep at a time, no links

def _refused(capsys, argv, root):
    """``rankwise ARGV``: exit 2, one line ``rankwise sweep: error: ...``, every file and directory under root kept."""
    from test_ownership import snapshot

    def names():
        return {os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs}

    before = (snapshot(root), names())
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("rankwise sweep: error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert (snapshot(root), names()) == before, "a refused sweep changed something"
    return lines[0]


def test_a_sweep_directory_in_use_is_refused_naming_the_holder(cfg, tmp_path, capsys):
    import yaml

    from rankwise.ownership import claim
    from rankwise.runlock import RunLock

    out = tmp_path / "busy"
    claim(out, "sweep")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with RunLock(out):
        err = _refused(capsys, ["sweep", path, "--ranks", "1", "--out", out], tmp_path)
    assert f"--out {out} is in use by another rankwise run (pid {os.getpid()};" in err


@pytest.mark.parametrize("entry", ["arms", "together", "sweep.csv"])
def test_a_link_in_the_sweep_directory_into_an_input_is_refused(cfg, tmp_path, capsys, entry):
    import shutil

    import yaml

    from rankwise.ownership import claim

    base = tmp_path / "base"
    shutil.copytree(cfg["model"], base)
    out = tmp_path / "out"
    claim(out, "sweep")
    os.symlink(base if entry != "sweep.csv" else base / "config.json", out / entry)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**cfg, "model": str(base)}))
    err = _refused(capsys, ["sweep", path, "--ranks", "1", "--out", out, "--together"], tmp_path)
    assert f"{base}" in err and ("is the model" in err or "lies inside the model" in err), err


def test_failure_reasons_name_non_finite_weights():
    from rankwise.outputs import failure_reason

    assert failure_reason(rfit.NonFiniteWeightsError("the trainable weights hold inf")) == \
        "non-finite weights: the trainable weights hold inf"
    assert failure_reason(rfit.NonFiniteLossError("training loss is nan")) == "non-finite loss: training loss is nan"
