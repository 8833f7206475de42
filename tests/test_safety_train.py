"""rankwise train as a careful (or hostile) user meets it: every bad input is one ConfigError line, and nothing
that was on disk before (run directory, base model, data) changes. Issue 13, the ``train`` half."""
import errno
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from test_ownership import snapshot
from test_train import make_cfg, world  # noqa: F401  (world: the module's tiny model and data fixture)

import rankwise.evaluate
import rankwise.fit as rfit
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
    real = rfit.lr_at

    def lr_at(step, *a, **k):
        if step == at_step:
            raise Crash("power cut")
        return real(step, *a, **k)

    monkeypatch.setattr(rfit, "lr_at", lr_at)
    return lambda: monkeypatch.setattr(rfit, "lr_at", real)


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
    assert state["format"] == 2 and state["step"] == 2 and state["total_steps"] == 4
    [arm_settings] = state["settings"]["arms"]  # a solo run is one arm
    assert arm_settings["lora.r"] == 4 and len(state["settings_hash"]) == 16
    assert arm_settings["data.train#sha256"]
    [arm] = state["arms"]
    assert arm["log_window"] == {"__tensor__": "arms/0/log_window"} and arm["failed"] is None
    assert state["rng"]["torch"] == {"__tensor__": "rng/torch"}
    assert isinstance(state["rng"]["python"]["__tuple__"][1]["__tuple__"][0], int), "python RNG as JSON numbers"
    settings = json.loads((run_copy / "settings.json").read_text())
    assert settings["settings"] == arm_settings
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
    # a crafted or damaged state.json that still parses: refused before the model loads, never continued from
    "step a string": ("state.json", lambda b: _state(b, step="2"), r"state.json: its step '2' is not an integer"),
    "step negative": ("state.json", lambda b: _state(b, step=-1), r"its step -1 lies outside \[0, 4\)"),
    "step past the end": ("state.json", lambda b: _state(b, step=4), r"its step 4 lies outside \[0, 4\)"),
    "step 10^6": ("state.json", lambda b: _state(b, step=10**6), r"its step 1000000 lies outside \[0, 4\)"),
    "step a bool": ("state.json", lambda b: _state(b, step=True), "its step True is not an integer"),
    "total_steps a string": ("state.json", lambda b: _state(b, total_steps="4"),
                             "its total_steps '4' is not a positive integer"),
    "without rng": ("state.json", lambda b: _state(b, rng=None), "state.json: it lacks rng"),
    "without log_window": ("state.json", lambda b: _state(b, log_window=None), "state.json: it lacks log_window"),
    "rng not a mapping": ("state.json", lambda b: _state(b, rng=[1, 2]), "its rng states are malformed"),
    "rng without torch": ("state.json", lambda b: _state(b, rng={"python": 1}), "its rng states are malformed"),
    "log_window a number": ("state.json", lambda b: _state(b, log_window=3.5), "its log_window is 3.5, not 3 float64"),
    "log_window the wrong tensor": ("state.json", lambda b: _state(b, log_window={"__tensor__": "rng/torch"}),
                                    "its log_window is a tensor of shape"),
    "trainable a list": ("state.json", lambda b: _state(b, trainable=[1]), "its trainable weights are not a mapping"),
    "arms not a list": ("state.json", lambda b: _state(b, arms={"0": 1}), "its arms are not a list of mappings"),
    "two arms' settings for one arm": ("state.json", lambda b: _state(b, settings={"arms": [{}, {}]}),
                                       "its settings are not one mapping per arm"),
    "format 1 (an older rankwise)": ("state.json", lambda b: _state(b, format=1),
                                     r"a checkpoint of an older rankwise \(format 1, expected 2\)"),
}

ARM_KEYS = ("trainable", "optimizer", "log_window", "scaler", "last", "failed", "config")  # kept in the one arm


def _state(raw: bytes, **changes) -> bytes:
    """state.json with ``changes`` applied (None: the key removed), an arm's keys in the solo run's one arm."""
    state = json.loads(raw)
    for k, v in changes.items():
        where = state["arms"][0] if k in ARM_KEYS else state
        if v is None:
            where.pop(k)
        else:
            where[k] = v
    return json.dumps(state).encode()


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
    real_lr_at, real_loss = rfit.lr_at, rankwise.evaluate.batch_loss_sum

    def lr_at(step, *a, **k):
        now["step"] = step
        return real_lr_at(step, *a, **k)

    def loss(model, batch):
        ls = real_loss(model, batch)
        return ls * float("nan") if now["step"] >= 3 else ls

    monkeypatch.setattr(rfit, "lr_at", lr_at)
    monkeypatch.setattr(rt, "batch_loss_sum", loss)
    with pytest.raises(rfit.NonFiniteLossError) as e:
        rt.train(small_cfg(world, out))
    assert isinstance(e.value, ConfigError) and isinstance(e.value, RuntimeError)  # sweep records a failed arm
    msg = str(e.value)
    assert "training loss is nan at step 4" in msg and "\n" not in msg
    assert f"the last good checkpoint, {out / 'checkpoint'} (step 2), is kept" in msg
    assert load_checkpoint(out / "checkpoint")["step"] == 2, "the last good checkpoint must stay"
    assert not (out / "summary.json").exists()
    # the same through the CLI: one line, exit 2, the checkpoint still there
    monkeypatch.setattr(rt, "batch_loss_sum", lambda m, b: real_loss(m, b) * float("nan"))
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
    # the run created and claimed out/ before it read the data: it removes it again, nothing is left behind
    assert_refused(lambda: rt.train(cfg), "data.train: file not found", tmp_path)
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n\xff\xfe{garbage\n')
    cfg["data"]["train"] = str(bad)
    assert_refused(lambda: rt.train(cfg), "data.train: .*bad.jsonl is not UTF-8 text", tmp_path)
    for name, content, match in [("bad.parquet", b"PAR1 not really", "is not a readable parquet file"),
                                 ("bad.csv", b"prompt,completion\n\xff,1\n", "is not UTF-8 text"),
                                 ("rows.jsonl", b'[1, 2]\n', "must be a JSON object")]:
        (tmp_path / name).write_bytes(content)
        cfg["data"]["train"] = str(tmp_path / name)
        assert_refused(lambda: rt.train(cfg), f"data.train.*{name}.*{match}", tmp_path)
    assert not (tmp_path / "out").exists()


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
    msg = assert_refused(lambda: rt.train(cfg), f"cannot load model '{model}'", model, tmp_path)
    assert "deserializing header" in msg
    assert not (tmp_path / "out").exists(), "a run that fails before its first step leaves nothing behind"


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
    named = re.escape(str(cfg.get("tokenizer") or model))
    assert_refused(lambda: rt.train(cfg), f"cannot load tokenizer '{named}'|{named}/(tokenizer|config)\\.json",
                   tmp_path)
    assert not (tmp_path / "out").exists(), "a run that fails before its first step leaves nothing behind"


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


# ----------------------------------------------------------------------------- shared by the cases below

def cli_refused(capsys, argv, *roots):
    """``rankwise ARGV`` is refused: exit 2, one line (``cli_line``), and every file and directory under ``roots``
    is as it was (files byte for byte; no file, directory or link added or removed)."""
    before = [(snapshot(r), entries(r)) for r in roots]
    line = cli_line(capsys, [str(a) for a in argv])
    for r, (files, names) in zip(roots, before):
        assert entries(r) == names, f"{r}: added {sorted(entries(r) - names)}, removed {sorted(names - entries(r))}"
        assert snapshot(r) == files, f"{r}: a file changed"
    return line


def entries(root):
    """Every path under ``root`` (files, directories, links), relative: what a failed run must not add or remove."""
    out = set()
    for d, dirs, files in os.walk(root):
        out.update(os.path.relpath(os.path.join(d, n), root) for n in dirs + files)
    return out


def finite_loss(monkeypatch):
    """The training loss looks finite whatever the weights do (as a saturated model's can): 3.5 for inf/nan."""
    real = rankwise.evaluate.batch_loss_sum
    monkeypatch.setattr(rt, "batch_loss_sum",
                        lambda m, b: torch.nan_to_num(real(m, b), nan=3.5, posinf=3.5, neginf=3.5))


# ----------------------------------------------------------------------------- non-finite weights

@pytest.mark.parametrize("log_every, save_every", [(1, 0), (100, 1)])
def test_non_finite_weights_behind_a_finite_loss_stop_the_run_and_are_never_saved(  # noqa: F811
        world, tmp_path, monkeypatch, capsys, log_every, save_every):
    """train.lr 1e30: the weights overflow while the loss stays finite. The run must stop in one line, like a NaN
    loss, on a logging step or before a save, and never save those weights (no summary, adapter or checkpoint)."""
    finite_loss(monkeypatch)
    out = tmp_path / "run"
    cfg = small_cfg(world, out, lr=1e30, schedule="constant", max_steps=6, log_every=log_every, save_every=save_every)
    path = write_cfg(tmp_path, cfg)
    err = cli_refused(capsys, ["train", path], os.path.dirname(world["train"]))  # the model and data untouched
    step = int(re.search(r"the trainable weights hold inf or NaN \(checked every train.log_every \d+ steps and "
                         r"before each save; the loss may still look finite\) at step (\d+); the run stopped", err)[1])
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()
    if save_every:
        assert f"the last good checkpoint, {out / 'checkpoint'} (step {step - 1}), is kept" in err
        kept = load_checkpoint(out / "checkpoint")
        assert kept["step"] == step - 1 and all(torch.isfinite(w).all() for w in kept["arms"][0]["trainable"].values())
    else:
        assert "no checkpoint was saved before it" in err and not (out / "checkpoint").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["step"] < step for r in rows), "no row of the step whose weights are not finite"


# ----------------------------------------------------------------------------- resume: a step the run can continue

def test_resume_from_a_crafted_step_is_one_line_and_keeps_everything(world, run_copy, tmp_path, capsys):  # noqa: F811
    """A state.json whose step is 10^6 (of a 4-step run) once wrote a finished summary from step-2 weights and
    deleted the checkpoint; now: one line, exit 2, the run directory byte for byte as it was."""
    state = run_copy / "checkpoint" / "state.json"
    state.write_bytes(_state(state.read_bytes(), step=10**6))
    path = write_cfg(tmp_path, small_cfg(world, run_copy))
    err = cli_refused(capsys, ["train", path, "--resume"], run_copy)
    assert f"cannot read checkpoint {state}: its step 1000000 lies outside [0, 4), the steps of its run" in err


# ----------------------------------------------------------------------------- metrics.jsonl on resume

ROWS = '{"step": 1, "loss": 4.0}\n{"step": 2, "loss": 3.5}\n'


def test_a_partial_last_metrics_line_is_refused_on_resume_and_the_fix_it_names_works(world, run_copy, tmp_path,  # noqa: F811
                                                                                       capsys):
    """A kill (or a full disk) while a row was written leaves a partial last line, of a step after the checkpoint
    (rows are written before their step's checkpoint). Resume refuses in one line, exit 2, nothing written, and says
    what to do; done, the resumed run keeps the rows up to its checkpoint and logs the cut step again."""
    metrics = run_copy / "metrics.jsonl"
    metrics.write_text(ROWS + '{"step": 3, "loss": 3.')
    path = write_cfg(tmp_path, small_cfg(world, run_copy, log_every=1))
    err = cli_refused(capsys, ["train", path, "--resume"], run_copy)
    assert f"cannot read {metrics}: its last line (line 3) is a partial row" in err, err
    assert "delete that line, then --resume again" in err, err
    metrics.write_text(ROWS)
    assert cli.main(["train", str(path), "--resume"]) == 0
    text = metrics.read_text()
    assert text.startswith(ROWS), "the rows up to the checkpoint are kept as they were"
    assert [r["step"] for r in map(json.loads, text.splitlines()) if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("damage, match", [
    (ROWS.replace('"loss": 4.0}', '"loss": 4.') + '{"step": 2, "loss": 3.0}\n', "line 1 is not a JSON row"),
    (ROWS + '{"step": 3, "loss": 3.0\n', "line 3 is not a JSON row"),  # ends in a newline: not what a kill leaves
    ('[1, 2]\n' + ROWS, "line 1 is not a JSON row"),
    (b'{"step": 1}\n\xff\xfe\n', "cannot read .*metrics.jsonl: 'utf-8' codec"),
])
def test_a_damaged_metrics_file_is_refused_on_resume_and_kept(world, run_copy, tmp_path, capsys, damage,  # noqa: F811
                                                              match):
    metrics = run_copy / "metrics.jsonl"
    (metrics.write_bytes if isinstance(damage, bytes) else metrics.write_text)(damage)
    path = write_cfg(tmp_path, small_cfg(world, run_copy))
    err = cli_refused(capsys, ["train", path, "--resume"], run_copy)
    assert re.search(match, err) and str(metrics) in err, err


# ----------------------------------------------------------------------------- links in the run directory

def run_with_own_inputs(world, tmp_path, **train):  # noqa: F811
    """A finished LoRA run on a copy of the base model and data (so that a test may link to them); its config path."""
    base, data = tmp_path / "base", tmp_path / "data.jsonl"
    shutil.copytree(world["model"], base)
    shutil.copy(world["train"], data)
    cfg = small_cfg(world, tmp_path / "run", save_every=0, **train)
    cfg["model"], cfg["data"] = str(base), {**cfg["data"], "train": str(data)}
    rt.train(cfg)
    return cfg, write_cfg(tmp_path, cfg)


def relink(path, target):
    """Put a symbolic link to ``target`` where ``path`` was."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)


@pytest.mark.parametrize("entry, target", [("adapter", "base"), ("summary.json", "base/config.json"),
                                           ("metrics.jsonl", "data.jsonl"), ("checkpoint", "base"),
                                           ("resolved_config.yaml", "base/config.json"), ("tb", "base"),
                                           ("mask.safetensors", "base/model.safetensors"),
                                           ("settings.json", "base/new-file.json")])  # dangling, into the base
def test_a_link_in_the_run_dir_into_an_input_is_refused_even_with_force(world, tmp_path, capsys, entry,  # noqa: F811
                                                                         target):
    """RUN/adapter -> BASE once made ``train --force`` write the adapter into the base model. Every entry a run
    writes is checked, links resolved, against the inputs: one line, exit 2, nothing changed anywhere."""
    _, path = run_with_own_inputs(world, tmp_path)
    relink(tmp_path / "run" / entry, tmp_path / target)
    err = cli_refused(capsys, ["train", path, "--force"], tmp_path)
    assert f"its entry {entry} is a symbolic link to {tmp_path / target}, which " in err
    assert "rankwise would write through it: remove the link (refused even with --force)" in err


class FakeSummaryWriter:
    """What ``log.tensorboard`` writes, without the tensorboard package: an events file in ``log_dir``."""

    def __init__(self, log_dir):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "events.out")

    def add_scalar(self, tag, value, step):
        with open(self.path, "a") as f:
            f.write(f"{step} {tag} {value}\n")

    def close(self):
        pass


def test_a_link_in_the_run_dir_elsewhere_is_replaced_never_written_through(world, tmp_path, monkeypatch):  # noqa: F811
    import importlib.util
    import types

    find_spec = importlib.util.find_spec  # log.tensorboard without the package: a stand-in writer
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: name == "tensorboard" or find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    cfg, _ = run_with_own_inputs(world, tmp_path)
    cfg["log"] = {**cfg["log"], "tensorboard": True}
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "tb").mkdir(parents=True)
    (elsewhere / "notes.jsonl").write_text('{"notes": "the user\u2019s"}\n')
    run = tmp_path / "run"
    links = {"adapter": elsewhere, "metrics.jsonl": elsewhere / "notes.jsonl",
             "summary.json": elsewhere / "summary.json", "settings.json": elsewhere / "settings.json",
             "tb": elsewhere / "tb"}
    for entry, target in links.items():
        relink(run / entry, target)
    before = (snapshot(elsewhere), entries(elsewhere))
    rt.train(cfg, force=True)
    assert (snapshot(elsewhere), entries(elsewhere)) == before, "a link was written through"
    for entry in links:
        assert not os.path.islink(run / entry), f"{entry}: the link was not replaced"
    assert (run / "adapter" / "adapter_config.json").exists() and json.loads((run / "summary.json").read_text())
    assert (run / "tb" / "events.out").read_text()


# ----------------------------------------------------------------------------- one run per output directory

def test_a_second_run_on_a_locked_output_dir_is_refused_naming_the_holder(world, run_copy, tmp_path,  # noqa: F811
                                                                         capsys):
    from rankwise.runlock import LOCK_FILE, RunLock

    path = write_cfg(tmp_path, small_cfg(world, run_copy))
    with RunLock(run_copy):
        err = cli_refused(capsys, ["train", path, "--resume"], run_copy)
        assert f"output_dir {run_copy} is in use by another rankwise run (pid {os.getpid()}; lock file " in err
        err = cli_refused(capsys, ["train", path, "--force"], run_copy)
        assert f"(pid {os.getpid()};" in err
    assert not (run_copy / LOCK_FILE).exists()
    assert cli.main(["train", str(path), "--resume"]) == 0, "the lock ends with its holder"
    assert not (run_copy / LOCK_FILE).exists(), "a run leaves no lock file behind"


def test_a_run_in_another_process_keeps_a_second_one_out(world, run_copy, tmp_path, capsys):  # noqa: F811
    """A real second process holds the lock (as a running train does): refused naming its pid; once it is gone
    (killed: its lock file stays, the kernel drops the lock) the run resumes and finishes."""
    from rankwise.runlock import LOCK_FILE

    code = ("import sys; from rankwise.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_copy)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        path = write_cfg(tmp_path, small_cfg(world, run_copy))
        err = cli_refused(capsys, ["train", path, "--resume"], run_copy)
        assert f"is in use by another rankwise run (pid {holder.pid};" in err
    finally:
        holder.kill()
        holder.wait()
    assert (run_copy / LOCK_FILE).read_text().strip() == str(holder.pid), "a killed holder leaves its lock file"
    assert cli.main(["train", str(path), "--resume"]) == 0
    assert json.loads((run_copy / "summary.json").read_text())["status"] == "finished"
    assert not (run_copy / LOCK_FILE).exists()


def test_a_stale_lock_file_blocks_nothing(world, tmp_path):  # noqa: F811
    """The lock file a killed run leaves: not a foreign file (no --force needed), and a finished run stays one."""
    from rankwise.runlock import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("999999\n")  # killed before it even wrote its marker
    cfg = small_cfg(world, out, save_every=0)
    summary = rt.train(cfg)
    (out / LOCK_FILE).write_text("999999\n")
    assert rt.train(cfg, resume=True) == summary, "still the finished run"
    assert sorted(os.listdir(out)) == sorted([".rankwise-run.json", LOCK_FILE, "adapter", "metrics.jsonl",
                                              "resolved_config.yaml", "settings.json", "summary.json"])


# ----------------------------------------------------------------------------- a full disk

def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_last_one(  # noqa: F811
        world, tmp_path, monkeypatch, capsys):
    import safetensors.torch as st

    import rankwise.checkpoint

    out, real, seen = tmp_path / "run", st.save_file, {}

    def save_file(tensors, path, *a, **k):
        if os.path.basename(path) == "tensors.safetensors" and (out / "checkpoint").exists():  # the second save
            seen["kept"] = snapshot(out / "checkpoint")
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(rankwise.checkpoint, "save_file", save_file)
    path = write_cfg(tmp_path, small_cfg(world, out, max_steps=6, save_every=2))
    err = cli_refused(capsys, ["train", path], os.path.dirname(world["train"]))
    assert re.search(rf"cannot write the checkpoint {re.escape(str(out / 'checkpoint'))}: No space left on device "
                     r"\([\d.]+ [KMGT]?i?B free there\); the previous checkpoint there is kept; free some space, then "
                     r"--resume$", err), err
    assert snapshot(out / "checkpoint") == seen["kept"] and load_checkpoint(out / "checkpoint")["step"] == 2
    assert not [n for n in os.listdir(out) if n.startswith((".tmp-", ".old-"))], "no half-written checkpoint left"
    monkeypatch.setattr(rankwise.checkpoint, "save_file", real)
    assert cli.main(["train", str(path), "--resume"]) == 0  # space freed: the kept checkpoint continues


# ----------------------------------------------------------------------------- a run that fails before it starts

@pytest.mark.parametrize("where", ["new", "new parents", "an empty directory", "the user's directory (--force)"])
def test_targets_matching_no_layer_leave_nothing_behind(world, tmp_path, capsys, where):  # noqa: F811
    """Found only after the output directory was created and marked; now what the run created is removed again
    (only that: never a directory that was there before)."""
    out = {"new": tmp_path / "run", "new parents": tmp_path / "a" / "b" / "run", "an empty directory": tmp_path / "e",
           "the user's directory (--force)": tmp_path / "mine"}[where]
    if where == "an empty directory":
        out.mkdir()
    elif where.startswith("the user's"):
        out.mkdir()
        (out / "notes.txt").write_text("the user's notes\n")
    cfg = small_cfg(world, out)
    cfg["lora"] = {**cfg["lora"], "targets": ["nope"]}
    argv = ["train", write_cfg(tmp_path, cfg)] + (["--force"] if "--force" in where else [])
    err = cli_refused(capsys, argv, tmp_path)
    assert "lora.targets: target_modules: ['nope'] matched no linear layer; linear layers in this model are " in err


def test_targets_matching_no_layer_are_refused_before_the_model_loads(world, tmp_path, monkeypatch):  # noqa: F811
    """Judged on the model built on the meta device (its config alone), before the output directory is made."""
    cfg = small_cfg(world, tmp_path / "run")
    cfg["lora"] = {**cfg["lora"], "targets": ["nope"]}
    monkeypatch.setattr(rt, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(rt.ownership, "claim", lambda *a, **k: pytest.fail("the output directory was claimed"))
    assert_refused(lambda: rt.train(cfg), r"lora.targets: target_modules: \['nope'\] matched no linear layer",
                   tmp_path)
