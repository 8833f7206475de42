"""Issue 13 from the command line: nothing the user owns is touched, no file runs code, every bad input is one line.

Each case runs ``rankwise.cli.main([...])`` as a user would and asserts the
exit status (2), the one-line message on stderr, and that every file that
existed before is byte-identical afterwards (the snapshot of every directory
involved: the base model, the run, the user's directories).
"""
import json
import os
import shutil

import pytest
import torch
import yaml
from helpers import forbid
from test_data import build_tiny_llama, qa_rows, write_jsonl
from test_ownership import snapshot

import rankwise.train as rt
from rankwise import cli
from rankwise.ownership import owner, write_marker
from rankwise.sweep import recorded_settings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model, its data, a finished LoRA run, and a "tuned" checkpoint for restore."""
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("safety")
    base = build_tiny_llama(d / "base")
    data = d / "data"
    data.mkdir()
    cfg = {"model": base, "lora": {"r": 2, "alpha": 8, "targets": ["q_proj", "v_proj"]},
           "data": {"train": write_jsonl(data / "train.jsonl", qa_rows(8)), "max_length": 40},
           "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "log_every": 1, "save_every": 0},
           "eval": {"every": 0}, "log": {"progress": False}, "output_dir": str(d / "run")}
    rt.train(cfg)
    tuned = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tuned.save_pretrained(d / "tuned")
    return {"root": d, "base": base, "run": str(d / "run"), "tuned": str(d / "tuned"), "cfg": cfg, "data": str(data)}


def cli_rc(argv):
    return cli.main([str(a) for a in argv])


def assert_refused(capsys, argv, *words, roots=()):
    """Run the CLI; assert exit 2, one line ``rankwise VERB: error: ...`` holding ``words``, nothing changed."""
    before = {str(r): snapshot(r) for r in roots}
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"rankwise {argv[0]}: error: ")]
    assert rc == 2 and len(lines) == 1, err
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    for r in roots:
        assert snapshot(r) == before[str(r)], f"a file under {r} changed"
    return lines[0]


def mine(path, files=("notes.txt",)):
    """A directory of the user's with files in it."""
    os.makedirs(path, exist_ok=True)
    for f in files:
        with open(os.path.join(path, f), "w") as fh:
            fh.write(f"the user's {f}\n")
    return str(path)


# ----------------------------------------------------------------------------- merge

def test_merge_refuses_outputs_that_overlap_its_inputs(world, capsys, tmp_path):
    roots = [world["root"]]
    run, base = world["run"], world["base"]
    assert_refused(capsys, ["merge", run, "--out", run, "--force"], f"--out {run} is the run", roots=roots)
    assert_refused(capsys, ["merge", run, "--out", base, "--force"], f"--out {base} is the base model", roots=roots)
    assert_refused(capsys, ["merge", run, "--out", os.path.join(run, "merged")], "lies inside the run", roots=roots)
    adapter = os.path.join(run, "adapter")
    assert_refused(capsys, ["merge", adapter, "--out", adapter, "--force"], f"--out {adapter} is the adapter", roots=roots)
    assert_refused(capsys, ["merge", adapter, "--out", os.path.join(adapter, "m")], "lies inside the adapter", roots=roots)
    assert_refused(capsys, ["merge", run, "--out", os.path.join(base, "merged")], "lies inside the base model", roots=roots)
    assert_refused(capsys, ["merge", run, "--out", world["root"], "--force"], "contains the run", roots=roots)


def test_merge_into_a_users_directory_needs_force_and_a_file_is_refused(world, capsys, tmp_path):
    roots = [world["root"], tmp_path]
    users = mine(tmp_path / "users", ["notes.txt", "model.safetensors"])
    assert_refused(capsys, ["merge", world["run"], "--out", users], f"--out {users} exists and was not made by rankwise",
                   "--force", roots=roots)
    a_file = tmp_path / "merged.txt"
    a_file.write_text("the user's file\n")
    assert_refused(capsys, ["merge", world["run"], "--out", a_file, "--force"], "is a file", roots=roots)
    assert_refused(capsys, ["merge", world["run"], "--out", a_file / "sub"], "lies under the file", roots=roots)
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".tmp", ".old"))], "temporary directory left behind"
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        assert_refused(capsys, ["merge", world["run"], "--out", ro / "merged"], "is not writable", roots=roots)


def test_merge_writes_a_marked_directory_and_replaces_only_its_own(world, capsys, tmp_path):
    out = tmp_path / "merged"
    assert cli.main(["merge", world["run"], "--out", str(out)]) == 0
    assert owner(out)["kind"] == "merge"
    assert cli.main(["merge", world["run"], "--out", str(out), "--dtype", "fp32"]) == 0  # ours: replaced
    # a train run is rankwise's, but not a merge output: --force needed
    run_copy = tmp_path / "run_copy"
    shutil.copytree(world["run"], run_copy)
    write_marker(run_copy, "train")
    assert_refused(capsys, ["merge", world["run"], "--out", run_copy], "holds a rankwise 'train' output, not a merge one",
                   roots=[world["root"], tmp_path])
    users = mine(tmp_path / "users")
    capsys.readouterr()
    assert cli.main(["merge", world["run"], "--out", users, "--force"]) == 0
    assert not os.path.exists(os.path.join(users, "notes.txt")) and owner(users)["kind"] == "merge"
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".tmp", ".old"))]


@pytest.mark.parametrize("damage, named", [
    ("bad_json", "adapter_config.json"),
    ("not_an_object", "adapter_config.json"),
    ("missing_key", "adapter_config.json"),
    ("truncated_weights", "adapter_model.safetensors"),
    ("garbage_weights", "adapter_model.safetensors"),
    ("unpaired_tensor", "lora_B"),
    ({"r": "two"}, "adapter_config.json: r must be a positive integer (the rank), got 'two'"),
    ({"r": 0}, "adapter_config.json: r must be a positive integer (the rank), got 0"),
    ({"r": 3}, "lora_A.weight has shape (2, 32), not (r, in) with r = 3 as adapter_config.json gives"),
    ({"lora_alpha": None}, "adapter_config.json: lora_alpha must be a finite number >= 0, got None"),
    ({"base_model_name_or_path": 1}, "adapter_config.json: base_model_name_or_path must be a model path or hub id"),
    ({"target_modules": 5}, "adapter_config.json: target_modules must be a list of module names"),
    ({"target_modules": ["q_proj", 7]}, "adapter_config.json: target_modules must be a list of module names"),
    ({"lora_dropout": 2}, "adapter_config.json: lora_dropout must be a number in [0, 1) or null, got 2"),
    ({"use_rslora": "yes"}, "adapter_config.json: use_rslora must be true, false or null, got 'yes'"),
    ({"peft_type": "IA3"}, "adapter_config.json: peft_type must be LORA, got 'IA3'"),
    ({"r": "x" * 5000}, "got 'xxxxxxxxxx"),  # a long value is shown cut short, on one line
])
def test_merge_of_a_corrupt_adapter_is_one_line_naming_the_file(world, capsys, tmp_path, damage, named):
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "adapter"
    shutil.copytree(os.path.join(world["run"], "adapter"), adapter)
    cfg_path, w_path = adapter / "adapter_config.json", adapter / "adapter_model.safetensors"
    if isinstance(damage, dict):  # valid JSON, a field of the wrong type or range
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **damage}))
    elif damage == "bad_json":
        cfg_path.write_text(cfg_path.read_text()[:-10])
    elif damage == "not_an_object":
        cfg_path.write_text("[1, 2]")
    elif damage == "missing_key":
        c = json.loads(cfg_path.read_text())
        del c["r"]
        cfg_path.write_text(json.dumps(c))
    elif damage == "truncated_weights":
        w_path.write_bytes(w_path.read_bytes()[: w_path.stat().st_size // 2])
    elif damage == "garbage_weights":
        w_path.write_bytes(b"\x00" * 3)
    else:
        t = load_file(w_path)
        del t[next(k for k in sorted(t) if "lora_B" in k)]
        save_file(t, w_path)
    out = tmp_path / "merged"
    line = assert_refused(capsys, ["merge", adapter, "--base", world["base"], "--out", out], named,
                          roots=[world["root"], tmp_path])
    assert not out.exists() and len(line) < 500


def test_merge_of_a_truncated_base_model_is_one_line(world, capsys, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(world["base"], base)
    w = base / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    assert_refused(capsys, ["merge", world["run"], "--base", base, "--out", tmp_path / "merged"], "cannot load base model",
                   roots=[world["root"], tmp_path])


@pytest.mark.parametrize("dangling", [False, True])
def test_merge_out_a_symbolic_link_is_refused_and_nothing_is_left_behind(world, capsys, tmp_path, dangling):
    """--out L, L a link to an earlier merge (or to nothing): refused before any work; the link, what it points
    to and the directory around it stay as they were (no .tmp-L-* holding a model, no .old-L-*)."""
    earlier = tmp_path / "earlier"
    assert cli.main(["merge", world["run"], "--out", str(earlier)]) == 0
    target = tmp_path / "gone" if dangling else earlier
    link = tmp_path / "L"
    os.symlink(target, link)
    entries = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    assert_refused(capsys, ["merge", world["run"], "--out", link], f"--out {link} is a symbolic link", f"to {target}",
                   roots=[world["root"], earlier])
    assert sorted(os.listdir(tmp_path)) == entries, "something was left beside --out"
    assert os.path.islink(link) and os.readlink(link) == str(target) and os.path.exists(link) != dangling


# ----------------------------------------------------------------------------- restore

def test_restore_refuses_overlaps_users_directories_files_and_other_kinds(world, capsys, tmp_path):
    roots = [world["root"], tmp_path]
    base, tuned = world["base"], world["tuned"]

    def argv(out, *extra):
        return ["restore", "--base", base, "--tuned", tuned, "--out", out, "--fraction", "0.1", *extra]

    assert_refused(capsys, argv(tuned, "--force"), f"--out {tuned} is the tuned", roots=roots)
    assert_refused(capsys, argv(base, "--force"), f"--out {base} is the base", roots=roots)
    assert_refused(capsys, argv(os.path.join(base, "restored")), "lies inside the base", roots=roots)
    assert_refused(capsys, argv(world["root"], "--force"), "contains the base", roots=roots)
    users = mine(tmp_path / "users")
    assert_refused(capsys, argv(users), "was not made by rankwise", "--force", roots=roots)
    a_file = tmp_path / "out.txt"
    a_file.write_text("mine")
    assert_refused(capsys, argv(a_file, "--force"), "is a file", roots=roots)
    merged = tmp_path / "merged"
    assert cli.main(["merge", world["run"], "--out", str(merged)]) == 0
    assert_refused(capsys, argv(merged), "holds a rankwise 'merge' output, not a restore one", roots=roots)
    assert_refused(capsys, ["analyze", world["run"], "--base", base, "--out", merged], "holds a rankwise 'merge' output",
                   roots=roots)
    out = tmp_path / "restored"
    assert cli_rc(argv(out)) == 0 and owner(out)["kind"] == "restore"
    assert cli_rc(argv(out)) == 0  # its own output: replaced without --force
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".tmp", ".old"))]


# ----------------------------------------------------------------------------- analyze

def test_analyze_refuses_outputs_in_its_inputs_and_users_directories(world, capsys, tmp_path):
    roots = [world["root"], tmp_path]
    run, base = world["run"], world["base"]

    def argv(out, *extra):
        return ["analyze", run, "--base", base, "--out", out, "--quiet", "--no-intruders", "--no-plots", *extra]

    assert_refused(capsys, argv(run, "--force"), f"--out {run} is the run", roots=roots)
    assert_refused(capsys, argv(os.path.join(run, "analysis")), "lies inside the run", roots=roots)
    assert_refused(capsys, argv(os.path.join(base, "analysis")), "lies inside the base model", roots=roots)
    assert_refused(capsys, argv(world["root"], "--force"), "contains the run", roots=roots)
    users = mine(tmp_path / "users")
    assert_refused(capsys, argv(users), "was not made by rankwise", "--force", roots=roots)
    a_file = tmp_path / "a.txt"
    a_file.write_text("mine")
    assert_refused(capsys, argv(a_file, "--force"), "is a file", roots=roots)
    out = tmp_path / "analysis"
    assert cli_rc(argv(out)) == 0 and owner(out)["kind"] == "analyze"
    assert cli_rc(argv(out)) == 0  # its own output: rewritten without --force
    assert cli_rc(argv(users, "--force")) == 0 and (tmp_path / "users" / "notes.txt").exists()


def test_analyze_reads_resolved_config_and_a_bad_one_is_one_line(world, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    for name in ("config.yaml", "resolved_config.yaml"):
        if (run / name).exists():
            (run / name).unlink()
    (run / "resolved_config.yaml").write_text(yaml.safe_dump({"model": world["base"], "method": "lora"}))
    out = tmp_path / "a"
    assert cli.main(["analyze", str(run), "--out", str(out), "--quiet", "--no-intruders", "--no-plots"]) == 0
    assert json.loads((out / "analysis.json").read_text())["base"] == world["base"]
    (run / "resolved_config.yaml").write_text("model: [unclosed\n")
    assert_refused(capsys, ["analyze", run, "--out", tmp_path / "b"], "resolved_config.yaml", "not a readable YAML file",
                   roots=[world["root"], tmp_path])
    (run / "resolved_config.yaml").unlink()
    w = run / "adapter" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:50])
    assert_refused(capsys, ["analyze", run, "--base", world["base"], "--out", tmp_path / "b"],
                   f"{w}: not a readable safetensors file", roots=[world["root"], tmp_path])
    w.unlink()
    (run / "adapter" / "adapter_config.json").write_text("{")
    assert_refused(capsys, ["analyze", run, "--base", world["base"], "--out", tmp_path / "b"],
                   "adapter_config.json: not a readable JSON file", roots=[world["root"], tmp_path])


# ----------------------------------------------------------------------------- demo and world

def test_demo_and_world_outputs_go_through_ownership(world, capsys, tmp_path):
    roots = [tmp_path]
    users = mine(tmp_path / "users", ["notes.txt", "report.md"])
    assert_refused(capsys, ["demo", "--out", users], "was not made by rankwise", "--force", roots=roots)
    a_file = tmp_path / "a.txt"
    a_file.write_text("mine")
    assert_refused(capsys, ["demo", "--out", a_file], "is a file", roots=roots)
    # --fresh deletes only a stage directory rankwise made
    demo = tmp_path / "demo"
    demo.mkdir()
    write_marker(demo, "demo")
    mine(demo / "work", ["thesis.tex"])
    assert_refused(capsys, ["demo", "--out", demo, "--fresh"], "holds stages rankwise did not make", roots=roots)

    assert_refused(capsys, ["world", "build", "--out", users], "was not made by rankwise", roots=roots)
    assert_refused(capsys, ["world", "build", "--out", a_file], "is a file", roots=roots)
    assert_refused(capsys, ["world", "pretrain", "--out", users], "was not made by rankwise", roots=roots)
    wdir = tmp_path / "w"
    wdir.mkdir()
    (wdir / "world.json").write_text("{}")
    argv = ["world", "mastery", "--base", world["base"], "--world", wdir]
    assert_refused(capsys, argv + ["--out", wdir / "world.json", "--force"], "lies inside the world", roots=roots)
    assert_refused(capsys, argv + ["--out", os.path.join(world["base"], "m.jsonl")], "lies inside the base model",
                   roots=roots + [world["root"]])
    assert_refused(capsys, argv + ["--out", a_file], "exists; pass --force", roots=roots)
    assert_refused(capsys, argv + ["--out", users], "is a directory", roots=roots)
    assert_refused(capsys, argv + ["--out", a_file / "m.jsonl"], "lies under the file", roots=roots)


# ----------------------------------------------------------------------------- sweep

def sweep_config(world, tmp_path):
    path = tmp_path / "sweep.yaml"
    cfg = {**world["cfg"], "train": {**world["cfg"]["train"], "save_every": 1}, "output_dir": str(tmp_path / "sw")}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_sweep_restarted_with_other_settings_is_refused_then_rerun_changed_retrains_only_those(
        world, capsys, tmp_path):
    config = sweep_config(world, tmp_path)
    out = tmp_path / "sw"
    assert cli.main(["sweep", config, "--ranks", "1,2"]) == 0
    assert owner(out)["kind"] == "sweep"
    assert_refused(capsys, ["sweep", config, "--ranks", "1,2", "--set", "train.lr=0.5"],
                   "lora_r1 (train.lr)", "lora_r2 (train.lr)", "--rerun-changed", roots=[tmp_path, world["root"]])

    capsys.readouterr()
    assert cli.main(["sweep", config, "--ranks", "1,2", "--set", "train.lr=0.5", "--rerun-changed"]) == 0
    for arm in ("lora_r1", "lora_r2"):
        assert recorded_settings(out / "arms" / arm)["train.lr"] == 0.5
    recorded = yaml.safe_load((out / "sweep.yaml").read_text())
    assert recorded["config"]["train"]["lr"] == 0.5
    r2_summary = (out / "arms" / "lora_r2" / "summary.json").read_bytes()
    r1_summary = (out / "arms" / "lora_r1" / "summary.json").read_bytes()

    # --alpha-ratio 4 changes r=1's alpha (8 -> 4) but not r=2's (8 = 4 * 2): only lora_r1 is named, and re-trained
    line = assert_refused(capsys, ["sweep", config, "--ranks", "1,2", "--set", "train.lr=0.5", "--alpha-ratio", "4"],
                          "lora_r1 (lora.alpha)", roots=[tmp_path])
    assert "lora_r2" not in line
    assert cli.main(["sweep", config, "--ranks", "1,2", "--set", "train.lr=0.5", "--alpha-ratio", "4",
                     "--rerun-changed"]) == 0
    assert (out / "arms" / "lora_r2" / "summary.json").read_bytes() == r2_summary, "an unchanged arm was re-trained"
    assert (out / "arms" / "lora_r1" / "summary.json").read_bytes() != r1_summary
    assert recorded_settings(out / "arms" / "lora_r1")["lora.alpha"] == 4.0
    arms = yaml.safe_load((out / "sweep.yaml").read_text())["arms"]
    assert arms["lora_r1"]["settings"]["lora.alpha"] == 4.0 and arms["lora_r2"]["settings"]["lora.alpha"] == 8.0


def test_sweep_refuses_users_directories_inputs_and_bad_records(world, capsys, tmp_path):
    config = sweep_config(world, tmp_path)
    roots = [tmp_path, world["root"]]
    users = mine(tmp_path / "users")
    assert_refused(capsys, ["sweep", config, "--ranks", "1", "--out", users], "was not made by rankwise", "--force",
                   roots=roots)
    assert_refused(capsys, ["sweep", config, "--ranks", "1", "--out", world["data"], "--force"], "contains the train data",
                   roots=roots)
    assert_refused(capsys, ["sweep", config, "--ranks", "1", "--out", os.path.join(world["base"], "sw")],
                   "lies inside the model", roots=roots)
    out = tmp_path / "bad"
    arm = out / "arms" / "lora_r1"
    arm.mkdir(parents=True)
    write_marker(out, "sweep")
    (arm / "settings.json").write_text("{not json")
    assert_refused(capsys, ["sweep", config, "--ranks", "1", "--out", out], "settings.json", roots=roots)
    # an arm of an older rankwise records its settings only in config.yaml: compared all the same
    legacy = tmp_path / "legacy"
    arm = legacy / "arms" / "lora_r1"
    arm.mkdir(parents=True)
    write_marker(legacy, "sweep")
    old = yaml.safe_load(open(config))
    old["lora"]["r"], old["train"]["lr"], old["output_dir"] = 1, 0.3, str(arm)
    (arm / "config.yaml").write_text(yaml.safe_dump(old))
    (arm / "summary.json").write_text('{"status": "finished"}\n')
    assert_refused(capsys, ["sweep", config, "--ranks", "1", "--out", legacy], "lora_r1 (train.lr)", roots=roots)


class _RunsCode:
    """Unpickling this runs code: here it only creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_sweep_never_unpickles_a_crafted_arm_checkpoint(world, capsys, tmp_path):
    config = sweep_config(world, tmp_path)
    out = tmp_path / "sw"
    arm = out / "arms" / "lora_r1"
    arm.mkdir(parents=True)
    write_marker(out, "sweep")
    ran = tmp_path / "code-ran"
    torch.save({"step": 1, "payload": _RunsCode(str(ran))}, arm / "checkpoint.pt")
    before = (arm / "checkpoint.pt").read_bytes()
    line = assert_refused(capsys, ["sweep", config, "--ranks", "1"], "checkpoint.pt", "pickle", roots=[world["root"], tmp_path])
    assert not ran.exists(), "loading the arm's checkpoint ran code"
    assert (arm / "checkpoint.pt").read_bytes() == before, "the refused checkpoint must be left as it was"
    assert os.listdir(arm) == ["checkpoint.pt"] and not (out / "sweep.yaml").exists(), "refused before any write"
    assert "move it away" in line


# ----------------------------------------------------------------------------- train: the config file

def billion_laughs(leaf="lol"):
    """Ten lines whose aliases expand to 9**9 values under ``model:`` (formatting it whole would never end)."""
    lines = [f"  a0: &a0 [{', '.join([leaf] * 9)}]"]
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    return "lols:\n" + "\n".join(lines) + "\nmodel: *a9\n"


@pytest.mark.parametrize("text, words", [
    (billion_laughs(), ["aliases (*name) expand to more than 100000 values", "write the values out"]),
    ("model: &m [1, *m]\n", ["the alias *m at line 1, column 15 lies inside the node it names"]),
    ("model: " + "[" * 5000 + "]" * 5000 + "\n", ["nests deeper than 64 levels"]),
    ("".join("  " * i + f"k{i}:\n" for i in range(5000)), ["nests deeper than 64 levels"]),
    (b"model: m\ndata: {train: t}\nlora: {targets: [q_pr\xffoj]}\n", ["is not UTF-8 text: byte 0xff at line 3, column 22"]),
    ("model: m\ndata: {train: t}\ntrain: {seed: 18446744073709551616}\n",
     ["config key 'train.seed' must be in [0, 18446744073709551615], got 18446744073709551616"]),
    ("model: m\ndata: {train: t}\ntrain: {seed: -1}\n", ["config key 'train.seed' must be in [0, 18446744073709551615], got -1"]),
    ("model: m\ndata: {train: t}\ntrain: {seed: " + "9" * 5000 + "}\n", ["cannot read the value", "line 3, column 15"]),
    ("model: m\ndata: {train: t}\ntrain: {max_steps: " + "9" * 40 + "}\n", ["'train.max_steps' must fit in 64 bits"]),
    ("model: m\ndata: {train: t}\nlora: {r: [" + ", ".join(["x"] * 1000) + "]}\n", ["'lora.r' must be int, got list"]),
    ("model: 2001-13-45\n", ["cannot read the value '2001-13-45': month must be in 1..12 at line 1, column 8"]),
])
def test_a_hostile_or_broken_config_file_is_one_short_line_at_once(world, capsys, tmp_path, text, words):
    import time

    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    config = cfg_dir / "c.yaml"
    if isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text.replace("model: m\n", f"model: {world['base']}\n")
                          .replace("{train: t}", f"{{train: {world['data']}/train.jsonl}}")
                          + f"output_dir: {tmp_path / 'out'}\n")
    t0 = time.time()
    line = assert_refused(capsys, ["train", config], *words, roots=[cfg_dir, world["root"]])
    assert time.time() - t0 < 20, "refusing the config took too long"
    assert len(line) < 400, line
    assert not (tmp_path / "out").exists()


def test_tensorboard_without_the_package_is_refused_before_the_model_loads(world, capsys, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # absent, whether or not it is installed here
    forbid(monkeypatch, "load_model", "the model was loaded")
    forbid(monkeypatch, "load_tokenizer", "the tokenizer was loaded")
    config = tmp_path / "cfg" / "c.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({**world["cfg"], "log": {"tensorboard": True, "progress": False},
                                      "output_dir": str(tmp_path / "out")}))
    assert_refused(capsys, ["train", config], "config key 'log.tensorboard' is true but the tensorboard package is "
                   "not installed", "pip install tensorboard", roots=[config.parent, world["root"]])
    assert not (tmp_path / "out").exists(), "the output directory was created"


# ----------------------------------------------------------------------------- train: the model's files

def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage, words", [
    ("tokenizer.json list", ["tokenizer.json is not a tokenizer file the tokenizers library reads",
                             "expected struct Tokenizer"]),
    ("tokenizer.json object", ["tokenizer.json is not a tokenizer file the tokenizers library reads"]),
    ("tokenizer_config.json list", ["tokenizer_config.json: expected a JSON object, got list"]),
    ("tokenizer_config.json pad 5", ["cannot load tokenizer", "a value in its tokenizer files has the wrong type",
                                     "pad_token"]),
    ("model_type unknown", ["config.json: model_type 'blorp' is unknown to transformers", "pip install -U transformers"]),
    ("model_type missing", ["config.json: model_type must name the architecture"]),
    ("model_type t5", ["config.json: model_type 't5' is not a causal language model"]),
    ("config.json missing", ["is not a model directory: it has no config.json"]),
    ("config.json list", ["config.json: expected a JSON object, got list"]),
    ("config.json garbage", ["config.json"]),
    ("config.json hidden_size", ["config.json: Validation error for field 'hidden_size'"]),
    ("config.json dtype", ["config.json: dtype must name a torch dtype", "'blorp'"]),
    ("config.json shapes", ["its weights do not have the shapes its config.json gives"]),
    ("weights truncated", ["cannot load model", "deserializing header"]),
])
def test_a_malformed_model_directory_is_one_line_naming_the_file(world, capsys, tmp_path, damage, words):
    model = tmp_path / "model"
    shutil.copytree(world["base"], model)
    what, _, how = damage.partition(" ")
    if what == "tokenizer.json":
        (model / what).write_text("[1, 2]" if how == "list" else '{"a": 1}')
    elif what == "tokenizer_config.json":
        if how == "list":
            (model / what).write_text("[1]")
        else:
            _edit_json(model / what, pad_token=5)
    elif what == "model_type":
        _edit_json(model / "config.json", model_type={"unknown": "blorp", "missing": None, "t5": "t5"}[how])
    elif how == "missing":
        (model / what).unlink()
    elif how in ("list", "garbage"):
        (model / what).write_text("[1]" if how == "list" else "{garbage")
    elif what == "config.json":
        _edit_json(model / what, **{"hidden_size": {"hidden_size": "big"}, "dtype": {"dtype": "blorp"},
                                    "shapes": {"intermediate_size": 100}}[how])
    else:
        w = model / "model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    config = tmp_path / "cfg" / "c.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({**world["cfg"], "model": str(model), "output_dir": str(tmp_path / "out")}))
    line = assert_refused(capsys, ["train", config], *words, roots=[model, config.parent, world["root"]])
    assert len(line) < 500, line


# ----------------------------------------------------------------------------- restore: arguments and checkpoints

def restore_argv(world, tuned, out, *extra):
    return ["restore", "--base", world["base"], "--tuned", tuned, "--out", out, "--fraction", "0.1", *extra]


@pytest.mark.parametrize("flag, pattern", [("--include", "layers.(q_proj"), ("--exclude", "[norm")])
def test_restore_with_a_bad_pattern_is_one_line(world, capsys, tmp_path, flag, pattern):
    out = tmp_path / "out"
    assert_refused(capsys, restore_argv(world, world["tuned"], out, flag, pattern),
                   f"{flag} {pattern!r} is not a valid regular expression", roots=[world["root"], tmp_path])
    assert not out.exists()


def sharded_copy(src, dst):
    """``src``'s single model.safetensors split into two shards and an index, as save_pretrained shards."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, part in halves.items():
        save_file({n: tensors[n] for n in part}, dst / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("damage, words", [
    ("truncated single file", ["model.safetensors: not a readable safetensors file", "deserializing header"]),
    ("index not json", ["model.safetensors.index.json: not a readable JSON file"]),
    ("index a list", ["model.safetensors.index.json: expected a JSON object, got list"]),
    ("no weight_map", ["model.safetensors.index.json: weight_map must be a non-empty object", "got None"]),
    ("weight_map a list", ["weight_map must be a non-empty object of tensor name -> shard file, got ['a']"]),
    ("shard missing", ["lists model-00002-of-00002.safetensors, which is missing"]),
    ("shard not a name", ["must be a file name, got 5"]),
    ("shard outside", ["the shard '../outside.safetensors' of tensor", "lies outside"]),
    ("shard absolute", ["lies outside"]),
    ("tensor not in its shard", ["which does not hold it; the index is damaged"]),
    ("truncated shard", ["model-00002-of-00002.safetensors: not a readable safetensors file"]),
])
def test_restore_of_a_damaged_tuned_checkpoint_is_one_line(world, capsys, tmp_path, damage, words):
    tuned = tmp_path / "tuned"
    if damage == "truncated single file":
        shutil.copytree(world["tuned"], tuned)
        w = tuned / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size - 8])
    else:
        sharded_copy(world["tuned"], tuned)
        index = tuned / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        first = sorted(data["weight_map"])[0]
        second = "model-00002-of-00002.safetensors"
        outside = tmp_path / "outside.safetensors"
        shutil.copy(tuned / second, outside)
        edit = {"index not json": lambda: index.write_text("{"),
                "index a list": lambda: index.write_text("[]"),
                "no weight_map": lambda: index.write_text('{"metadata": {}}'),
                "weight_map a list": lambda: index.write_text('{"weight_map": ["a"]}'),
                "shard missing": lambda: (tuned / second).unlink(),
                "shard not a name": lambda: data["weight_map"].update({first: 5}),
                "shard outside": lambda: data["weight_map"].update({first: "../outside.safetensors"}),
                "shard absolute": lambda: data["weight_map"].update({first: str(outside)}),
                "tensor not in its shard": lambda: data["weight_map"].update({first: second}),
                "truncated shard": lambda: (tuned / second).write_bytes((tuned / second).read_bytes()[:50])}
        edit[damage]()
        if damage.startswith(("shard not", "shard outside", "shard absolute", "tensor not")):
            index.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert_refused(capsys, restore_argv(world, tuned, out), *words, roots=[world["root"], tmp_path])
    assert not out.exists()


def weights(directory):
    """Every tensor of a checkpoint directory, its shards merged."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, f)))
    return out


def test_a_sharded_tuned_checkpoint_restores_like_the_single_file(world, capsys, tmp_path):
    """The sharded copy the damage cases start from is itself good: restored, the same tensors as the original."""
    sharded = sharded_copy(world["tuned"], tmp_path / "tuned")
    assert cli_rc(restore_argv(world, world["tuned"], tmp_path / "a")) == 0
    assert cli_rc(restore_argv(world, sharded, tmp_path / "b")) == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.fixture(scope="module")
def full_run(world):
    """A finished full-SFT run: its model is in RUN/model/."""
    out = world["root"].parent / (world["root"].name + "-full") / "run"
    rt.train({**world["cfg"], "method": "full", "output_dir": str(out)})
    return out


def test_restore_tuned_takes_a_full_sft_run_directory(world, full_run, capsys, tmp_path):
    roots = [world["root"], full_run]
    assert cli_rc(restore_argv(world, full_run, tmp_path / "from-run")) == 0
    assert cli_rc(restore_argv(world, full_run / "model", tmp_path / "from-model")) == 0
    a, b = weights(tmp_path / "from-run"), weights(tmp_path / "from-model")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    stats = json.loads((tmp_path / "from-run" / "restore_stats.json").read_text())
    assert stats["tuned"] == str(full_run / "model") and stats["restored"] > 0
    assert_refused(capsys, restore_argv(world, full_run, full_run / "restored"), "lies inside the run", roots=roots)
    assert_refused(capsys, restore_argv(world, world["run"], tmp_path / "lora"), f"--tuned {world['run']} is a LoRA run",
                   f"rankwise merge {world['run']} --out DIR", roots=roots + [tmp_path])
