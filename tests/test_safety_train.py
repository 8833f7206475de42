"""rankwise train as a careful (or hostile) user meets it: every bad input is one ConfigError line, and nothing
that was on disk before (run directory, base model, data) changes. Issue 13, the ``train`` half."""
import json
import os
import shutil

import pytest
import torch
from test_ownership import snapshot
from test_train import make_cfg, world  # noqa: F401  (world: the module's tiny model and data fixture)

import rankwise.evaluate
import rankwise.train as rt
from rankwise import cli
from rankwise.checkpoint import load_checkpoint, save_checkpoint
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def small_cfg(world, out, method="lora", **train):  # noqa: F811
    return make_cfg(world, out, method, **{"max_steps": 4, "batch_size": 4, "save_every": 2, **train})


class Crash(Exception):
    pass


def interrupt(monkeypatch, at_step):
    """Make the next train() lose power at optimizer step ``at_step`` (0-based), after its checkpoints before it."""
    real = rt.lr_at

    def lr_at(step, *a, **k):
        if step == at_step:
            raise Crash("power cut")
        return real(step, *a, **k)

    monkeypatch.setattr(rt, "lr_at", lr_at)
    return lambda: monkeypatch.setattr(rt, "lr_at", real)


@pytest.fixture(scope="module")
def interrupted(world, tmp_path_factory):  # noqa: F811
    """A LoRA run stopped at step 3 of 4 with its step-2 checkpoint: copy it before changing it."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    mp = pytest.MonkeyPatch()
    try:
        interrupt(mp, 3)
        with pytest.raises(Crash):
            rt.train(small_cfg(world, out))
    finally:
        mp.undo()
    assert load_checkpoint(out / "checkpoint")["step"] == 2
    return out


@pytest.fixture
def run_copy(interrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    return out


def assert_refused(call, match, *roots, new=()):
    """``call()`` raises a one-line ConfigError matching ``match``; every file under ``roots`` is unchanged.

    ``new``: files (relative to the first root) the failed call may have added, e.g. the marker of an output
    directory it created and claimed before failing on the data.
    """
    before = [snapshot(r) for r in roots]
    with pytest.raises(ConfigError, match=match) as e:
        call()
    assert "\n" not in str(e.value), f"not one line: {e.value}"
    for i, (r, b) in enumerate(zip(roots, before)):
        after = snapshot(r)
        added = sorted(after.keys() - b.keys() - (set(new) if i == 0 else set()))
        assert not added and not b.keys() - after.keys(), \
            f"{r}: files added {added} or removed {sorted(b.keys() - after.keys())}"
        changed = [k for k in b if after[k] != b[k]]
        assert not changed, f"{r}: changed {changed}"
    return str(e.value)


def cli_line(capsys, argv):
    """``rankwise ARGV`` -> its error line, asserted to be the one line of the error (no traceback), exit status 2."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err  # may hold progress bars of the model loading before the error
    lines = [ln for ln in err.splitlines() if ln.startswith("rankwise ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"rankwise {argv[0]}: error: ") and err.rstrip().endswith(lines[0]), err
    return lines[0]


# ----------------------------------------------------------------------------- the checkpoint

def test_checkpoint_layout_is_safetensors_and_json(run_copy):
    assert sorted(os.listdir(run_copy / "checkpoint")) == ["state.json", "tensors.safetensors"]
    state = json.loads((run_copy / "checkpoint" / "state.json").read_text())
    assert state["format"] == 1 and state["step"] == 2 and state["total_steps"] == 4
    assert state["settings"]["lora.r"] == 4 and len(state["settings_hash"]) == 16
    assert state["settings"]["data.train#sha256"]
    assert state["rng"]["torch"] == {"__tensor__": "rng/torch"}
    assert isinstance(state["rng"]["python"]["__tuple__"][1]["__tuple__"][0], int), "python RNG as JSON numbers"
    settings = json.loads((run_copy / "settings.json").read_text())
    assert settings["hash"] == state["settings_hash"]
    assert (run_copy / "resolved_config.yaml").exists() and (run_copy / ".rankwise-run.json").exists()


BAD_CHECKPOINTS = {
    "state.json truncated": ("state.json", lambda b: b[: len(b) // 2], "cannot read checkpoint .*state.json"),
    "state.json empty": ("state.json", lambda b: b"", "cannot read checkpoint .*state.json"),
    "state.json garbage": ("state.json", lambda b: os.urandom(64), "cannot read checkpoint .*state.json"),
    "state.json a JSON list": ("state.json", lambda b: b"[1, 2]", "state.json: not a rankwise checkpoint"),
    "state.json without step": ("state.json", lambda b: json.dumps(
        {k: v for k, v in json.loads(b).items() if k != "step"}).encode(), "state.json: it lacks step"),
    "state.json names a missing tensor": ("state.json", lambda b: b.replace(b'"rng/torch"', b'"rng/nowhere"'),
                                          "tensors.safetensors: it lacks the tensor 'rng/nowhere'"),
    "state.json missing": ("state.json", None, "incomplete: .*state.json is missing"),
    "tensors truncated": ("tensors.safetensors", lambda b: b[: len(b) // 2], "cannot read checkpoint .*tensors"),
    "tensors empty": ("tensors.safetensors", lambda b: b"", "cannot read checkpoint .*tensors.safetensors"),
    "tensors garbage": ("tensors.safetensors", lambda b: b"\xff" * 100, "cannot read checkpoint .*tensors"),
    "tensors missing": ("tensors.safetensors", None, "incomplete: .*tensors.safetensors is missing"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_an_unreadable_checkpoint_is_one_line_naming_the_file_and_is_kept(world, run_copy, case):  # noqa: F811
    name, damage, match = BAD_CHECKPOINTS[case]
    path = run_copy / "checkpoint" / name
    if damage is None:
        path.unlink()
    else:
        path.write_bytes(damage(path.read_bytes()))
    assert_refused(lambda: rt.train(small_cfg(world, run_copy), resume=True), match, run_copy)


def test_a_checkpoint_that_is_a_file_or_an_empty_directory(world, run_copy):  # noqa: F811
    shutil.rmtree(run_copy / "checkpoint")
    (run_copy / "checkpoint").mkdir()
    assert_refused(lambda: rt.train(small_cfg(world, run_copy), resume=True), "incomplete: .*state.json is missing",
                   run_copy)
    (run_copy / "checkpoint").rmdir()
    (run_copy / "checkpoint").write_text("not a directory")
    assert_refused(lambda: rt.train(small_cfg(world, run_copy), resume=True), "is a file, not a checkpoint directory",
                   run_copy)


def test_a_pickle_checkpoint_next_to_a_run_is_never_loaded(world, run_copy, capsys):  # noqa: F811
    torch.save({"step": 1}, run_copy / "checkpoint.pt")
    err = cli_line(capsys, ["train", str(write_cfg(run_copy.parent, small_cfg(world, run_copy))), "--resume"])
    assert "checkpoint.pt: refusing to load it: it is a pickle checkpoint" in err and "can run code" in err


def write_cfg(d, cfg):
    import yaml

    path = d / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------- resume means the same run

@pytest.mark.parametrize("change, match", [
    ({"lora": {"r": 8}}, r"settings changed since the checkpoint .*: lora\.r \(4 -> 8\)"),
    ({"lora": {"targets": ["q_proj"]}}, r'lora\.targets \(\["q_proj", "v_proj", "down_proj"\] -> \["q_proj"\]\)'),
    ({"train": {"lr": 0.5}}, r"train\.lr \(0\.01 -> 0\.5\)"),
    ({"train": {"max_steps": 6}}, r"train\.max_steps \(4 -> 6\)"),
])
def test_resume_with_changed_settings_is_refused_and_nothing_is_rewritten(world, run_copy, change, match):  # noqa: F811
    cfg = small_cfg(world, run_copy)
    for section, values in change.items():
        cfg[section] = {**cfg[section], **values}
    msg = assert_refused(lambda: rt.train(cfg, resume=True), match, run_copy)
    assert "put them back to resume, or choose another output_dir" in msg


def test_resume_after_the_data_file_changed_is_refused(world, run_copy, tmp_path):  # noqa: F811
    data = tmp_path / "train.jsonl"
    shutil.copy(world["train"], data)
    cfg = small_cfg(world, run_copy)
    cfg["data"] = {**cfg["data"], "train": str(data)}
    msg = assert_refused(lambda: rt.train(cfg, resume=True), r"data\.train \(", run_copy)  # the path changed
    assert "data.train#sha256" not in msg, "same content under another name: only the path differs"
    with open(data, "a") as f:
        f.write('{"prompt": "Q: new? A:", "completion": " yes"}\n')
    assert_refused(lambda: rt.train(cfg, resume=True), r"data\.train#sha256 \(", run_copy)


def test_resume_across_keys_that_do_not_change_the_result(world, run_copy):  # noqa: F811
    cfg = small_cfg(world, run_copy, log_every=1, save_every=1, backend="torch")
    cfg["eval"]["every"] = 3
    summary = rt.train(cfg, resume=True)
    assert summary["steps"] == 4 and not (run_copy / "checkpoint").exists()
    assert json.loads((run_copy / "settings.json").read_text())["hash"] == summary["settings_hash"]


def test_resume_of_a_finished_run(world, run_copy):  # noqa: F811
    cfg = small_cfg(world, run_copy)
    done = rt.train(cfg, resume=True)
    again = rt.train(cfg, resume=True)  # the same settings: the finished run, as it is
    assert again == json.loads((run_copy / "summary.json").read_text()) and again["train_loss"] == done["train_loss"]
    cfg["lora"] = {**cfg["lora"], "r": 8}
    assert_refused(lambda: rt.train(cfg, resume=True),
                   r"is a finished run trained with other settings: lora\.r \(4 -> 8\); choose another output_dir", run_copy)
    assert_refused(lambda: rt.train(cfg), "already holds a run; pass --resume", run_copy)
    (run_copy / "settings.json").write_text("{not json")
    assert_refused(lambda: rt.train(cfg, resume=True), "cannot read the settings of the finished run .*settings.json",
                   run_copy)


def test_force_trains_a_finished_run_again_from_step_0(world, run_copy):  # noqa: F811
    cfg = small_cfg(world, run_copy, save_every=0)
    rt.train(cfg, resume=True)
    cfg["lora"] = {**cfg["lora"], "r": 2}
    summary = rt.train(cfg, force=True)
    assert summary["rank"] == 2
    assert json.loads((run_copy / "settings.json").read_text())["settings"]["lora.r"] == 2


# ----------------------------------------------------------------------------- a NaN loss

def test_a_nan_loss_stops_the_run_naming_the_step_and_the_kept_checkpoint(world, tmp_path, monkeypatch,  # noqa: F811
                                                                          capsys):
    out = tmp_path / "run"
    now = {"step": 0}
    real_lr_at, real_loss = rt.lr_at, rankwise.evaluate.batch_loss_sum

    def lr_at(step, *a, **k):
        now["step"] = step
        return real_lr_at(step, *a, **k)

    def loss(model, batch):
        ls = real_loss(model, batch)
        return ls * float("nan") if now["step"] >= 3 else ls

    monkeypatch.setattr(rt, "lr_at", lr_at)
    monkeypatch.setattr(rankwise.evaluate, "batch_loss_sum", loss)
    with pytest.raises(rt.NonFiniteLossError) as e:
        rt.train(small_cfg(world, out))
    assert isinstance(e.value, ConfigError) and isinstance(e.value, RuntimeError)  # sweep records a failed arm
    msg = str(e.value)
    assert "training loss is nan at step 4" in msg and "\n" not in msg
    assert f"the last good checkpoint, {out / 'checkpoint'} (step 2), is kept" in msg
    assert load_checkpoint(out / "checkpoint")["step"] == 2, "the last good checkpoint must stay"
    assert not (out / "summary.json").exists()
    # the same through the CLI: one line, exit 2, the checkpoint still there
    monkeypatch.setattr(rankwise.evaluate, "batch_loss_sum", lambda m, b: real_loss(m, b) * float("nan"))
    cfg = small_cfg(world, tmp_path / "cli")
    err = cli_line(capsys, ["train", str(write_cfg(tmp_path, cfg))])
    assert "training loss is nan at step 1" in err and "no checkpoint was saved before it" in err


# ----------------------------------------------------------------------------- the config

def test_config_errors_are_one_line_and_touch_nothing(world, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    cfg_path = write_cfg(tmp_path, small_cfg(world, out))
    text = cfg_path.read_text()
    cases = [
        (["--set", "lora.targets=[q_proj"], "--set lora.targets: the value '\\[q_proj' is not valid YAML"),
        (["--set", "train.lr=.inf"], "'train.lr' must be a finite number, got inf"),
        (["--set", "train.lr=.nan"], "'train.lr' must be a finite number, got nan"),
        (["--set", "lora.alpha=-.inf"], "'lora.alpha' must be a finite number"),
        (["--set", "train.betas=[0.9, .nan]"], "'train.betas' must be"),
        (["--set", "lora.r=0"], "'lora.r' must be > 0"),
        (["--set", "train.device=tpu"], "train.device must be auto, cpu, cuda or cuda:N"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--set", "train.device=cuda"], "train.device cuda: no CUDA device is available"))
        cases.append((["--set", "train.device=cuda:1"], "train.device cuda:1: no CUDA device is available"))
    for extra, match in cases:
        import re

        err = cli_line(capsys, ["train", str(cfg_path), *extra])
        assert re.search(match, err), (extra, err)
    for bad in ["1: 2\n", "train: {null: 3}\n", "? [a, b]\n: c\n", "lora: {r: [\n"]:
        cfg_path.write_text(text + bad)
        err = cli_line(capsys, ["train", str(cfg_path)])
        assert "must be a string" in err or "is not valid YAML" in err, (bad, err)
    assert not out.exists(), "a refused config creates nothing"


def test_data_errors_are_one_line(world, tmp_path):  # noqa: F811
    cfg = small_cfg(world, tmp_path / "out")
    cfg["data"] = {**cfg["data"], "train": str(tmp_path / "missing.jsonl")}
    claimed = {"out/.rankwise-run.json"}  # the new output directory was claimed before the data was read
    assert_refused(lambda: rt.train(cfg), "data.train: file not found", tmp_path, new=claimed)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n\xff\xfe{garbage\n')
    cfg["data"]["train"] = str(bad)
    assert_refused(lambda: rt.train(cfg), "data.train: .*bad.jsonl is not UTF-8 text", tmp_path, new=claimed)
    for name, content, match in [("bad.parquet", b"PAR1 not really", "is not a readable parquet file"),
                                 ("bad.csv", b"prompt,completion\n\xff,1\n", "is not UTF-8 text"),
                                 ("rows.jsonl", b'[1, 2]\n', "must be a JSON object")]:
        (tmp_path / name).write_bytes(content)
        cfg["data"]["train"] = str(tmp_path / name)
        assert_refused(lambda: rt.train(cfg), f"data.train.*{name}.*{match}", tmp_path, new=claimed)


# ----------------------------------------------------------------------------- the output directory

def test_output_dir_that_is_a_file_or_lies_under_one(world, tmp_path):  # noqa: F811
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert_refused(lambda: rt.train(small_cfg(world, f)), "output_dir .*notes.txt is a file", tmp_path)
    assert_refused(lambda: rt.train(small_cfg(world, f / "run")), "lies under the file .*notes.txt", tmp_path)


def test_a_read_only_output_dir(world, tmp_path, monkeypatch):  # noqa: F811
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if os.fspath(p) == str(ro) else real(p, mode, **k))
    assert_refused(lambda: rt.train(small_cfg(world, ro / "run")), f"output_dir .* {ro} is not writable", tmp_path)
    if os.geteuid() != 0:  # root writes anywhere: the real permission check only means something for a user
        monkeypatch.setattr(os, "access", real)
        ro.chmod(0o555)
        try:
            assert_refused(lambda: rt.train(small_cfg(world, ro / "run")), "is not writable", tmp_path)
        finally:
            ro.chmod(0o755)


@pytest.mark.parametrize("where", ["the model", "inside the model", "contains the model", "the data",
                                   "the mask.from run"])
def test_output_dir_overlapping_an_input_is_refused_even_with_force(world, tmp_path, where):  # noqa: F811
    model, data = world["model"], os.path.dirname(world["train"])
    cfg = small_cfg(world, tmp_path / "x")
    out = {"the model": model, "inside the model": os.path.join(model, "run"), "contains the model": data,
           "the data": world["train"], "the mask.from run": str(tmp_path / "full")}[where]
    if where == "the mask.from run":
        (tmp_path / "full").mkdir()
        cfg = small_cfg(world, tmp_path / "x", "masked")
        cfg["mask"] = {"fraction": 0.1, "score": "update", "from": out}
    cfg["output_dir"] = out
    word = {"the model": "is the base model", "inside the model": "lies inside the base model",
            "contains the model": "contains the base model", "the data": "is the data.train",
            "the mask.from run": "is the mask.from run"}[where]
    assert_refused(lambda: rt.train(cfg, force=True), word, data, tmp_path)


def test_a_users_directory_needs_force_and_their_config_yaml_is_never_overwritten(world, tmp_path,  # noqa: F811
                                                                                   capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("# my notes, with comments\nmodel: keep-me\n")
    before = (out / "config.yaml").read_bytes()
    assert_refused(lambda: rt.train(small_cfg(world, out, save_every=0)), "was not made by rankwise .*pass --force", out)
    err = cli_line(capsys, ["train", str(write_cfg(tmp_path, small_cfg(world, out, save_every=0)))])
    assert "pass --force" in err
    assert cli.main(["train", str(tmp_path / "cfg.yaml"), "--force"]) == 0
    capsys.readouterr()
    assert (out / "config.yaml").read_bytes() == before
    assert (out / "resolved_config.yaml").exists() and (out / "summary.json").exists()


def test_an_output_of_another_kind_is_refused(world, tmp_path):  # noqa: F811
    from rankwise.ownership import claim

    out = tmp_path / "merged"
    claim(out, "merge")
    (out / "model.safetensors").write_bytes(b"weights")
    assert_refused(lambda: rt.train(small_cfg(world, out)), "holds a rankwise 'merge' output, not a train one", out)


def test_a_run_is_not_started_over_without_resume_or_force(world, run_copy):  # noqa: F811
    assert_refused(lambda: rt.train(small_cfg(world, run_copy)), "already holds a run; pass --resume", run_copy)


# ----------------------------------------------------------------------------- the model

@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_corrupt_model_is_one_line_naming_the_model(world, tmp_path, damage):  # noqa: F811
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    weights = model / "model.safetensors"
    b = weights.read_bytes()
    weights.write_bytes({"truncated": b[: len(b) // 2], "empty": b"", "garbage": b"\x00garbage" * 20}[damage])
    cfg = small_cfg(world, tmp_path / "out")
    cfg["model"] = str(model)
    msg = assert_refused(lambda: rt.train(cfg), f"cannot load model '{model}'", model)
    assert "deserializing header" in msg


@pytest.mark.parametrize("damage", ["no tokenizer", "tokenizer.json garbage", "config.json garbage"])
def test_a_missing_or_corrupt_tokenizer_or_config(world, tmp_path, damage):  # noqa: F811
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    cfg = small_cfg(world, tmp_path / "out")
    cfg["model"] = str(model)
    if damage == "no tokenizer":
        cfg["tokenizer"] = str(tmp_path / "no-tokenizer")
    else:
        (model / damage.split()[0]).write_text("{garbage")
    assert_refused(lambda: rt.train(cfg), f"cannot load tokenizer '{cfg.get('tokenizer') or model}'", tmp_path,
                   new={"out/.rankwise-run.json"})


def test_a_crash_while_saving_the_checkpoint_is_not_a_silent_restart(world, run_copy):  # noqa: F811
    os.rename(run_copy / "checkpoint", run_copy / ".old-checkpoint-abc123")  # between replace_dir's two renames
    assert_refused(lambda: rt.train(small_cfg(world, run_copy), resume=True),
                   r"checkpoint is missing but .*\.old-checkpoint-abc123 is there .*rename it", run_copy)


def test_empty_model_or_output_dir_in_the_config(world, tmp_path):  # noqa: F811
    for key in ("model", "output_dir"):
        cfg = small_cfg(world, tmp_path / "out")
        cfg[key] = " "
        assert_refused(lambda: rt.train(cfg), f"config key '{key}' must not be empty", tmp_path)


# ----------------------------------------------------------------------------- optimizers through the checkpoint

def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 80, generator=g)), torch.nn.Parameter(torch.randn(80, generator=g))]


def _grads(params, k):
    g = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _optimizers():
    def adamw(fused):
        return lambda ps: torch.optim.AdamW([{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:]}], lr=1e-2,
                                            fused=fused)

    def masked(ps):
        from rankwise.masking import MaskedAdamW

        g = torch.Generator().manual_seed(5)
        return MaskedAdamW(ps, [torch.rand(p.shape, generator=g) < 0.3 for p in ps], lr=1e-2, weight_decay=0.1)

    def adamw8bit(ps):
        bnb = pytest.importorskip("bitsandbytes")
        return bnb.optim.AdamW8bit([{"params": ps[:1]}, {"params": ps[1:], "weight_decay": 0.0}], lr=1e-2,
                                   min_8bit_size=1024)

    return {"adamw": adamw(False), "adamw fused": adamw(True), "masked adamw": masked, "adamw8bit": adamw8bit}


@pytest.mark.parametrize("name", list(_optimizers()))
def test_optimizer_state_survives_the_checkpoint_bit_for_bit(tmp_path, name):
    make = _optimizers()[name]
    a = _params()
    try:
        opt_a = make(a)
        for k in range(3):
            _grads(a, k)
            opt_a.step()
    except RuntimeError as e:  # e.g. bitsandbytes without a CPU backend
        pytest.skip(f"{name} does not step on this machine: {e}")
    save_checkpoint(tmp_path / "ckpt", {"step": 3, "total_steps": 6, "settings_hash": "x", "settings": {},
                                        "optimizer": opt_a.state_dict(), "params": [p.detach() for p in a]})
    state = load_checkpoint(tmp_path / "ckpt")
    b = [torch.nn.Parameter(t.clone()) for t in state["params"]]
    opt_b = make(b)
    opt_b.load_state_dict(state["optimizer"])
    if name == "adamw8bit":
        quant = [opt_b.state[p] for p in b]
        assert any(v.dtype == torch.uint8 for s in quant for v in s.values() if isinstance(v, torch.Tensor)), \
            "the 8-bit states came back as uint8"
    for k in range(3, 6):
        _grads(a, k)
        _grads(b, k)
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb), f"{name}: max diff {(pa - pb).abs().max()}"
