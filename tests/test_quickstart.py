"""The README's quickstart runs offline: its sample data, its config, and its commands end to end.

The sample data (``examples/data/quickstart-*.jsonl``) are question-answer rows about the embedded
world of ``rankwise world pretrain``'s cpu preset, so every word is in that world's tokenizer; they
are generated here, and ``python tests/test_quickstart.py`` writes them again (after a change to the
world's generator). The end-to-end test runs the commands of the README's quickstart block, as
written, in a scratch copy of ``examples/``, with only their step counts cut (``--steps`` for the
pretraining, ``--set train.max_steps=...`` for training) so it takes seconds, not minutes.
"""
from __future__ import annotations

import json
import random
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from rankwise import cli
from rankwise import config as C
from rankwise.world.generate import WorldConfig, generate_world
from rankwise.world.mastery import qa_row
from rankwise.world.pretrain import preset

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
CONFIG = ROOT / "examples" / "quickstart.yaml"
# file name -> (people's split, relations' domain, rows)
SETS = {"quickstart-train.jsonl": ("train", "in", 128),
        "quickstart-eval.jsonl": ("test", "in", 64),
        "quickstart-eval-ood.jsonl": ("test", "out", 64)}


def quickstart_rows() -> dict:
    """File name -> rows (``prompt``, ``completion``, ``answers``): a seeded sample of the cpu world's facts."""
    world = generate_world(WorldConfig.from_dict(preset("cpu")["world"]))
    out = {}
    for name, (split, domain, n) in SETS.items():
        facts = [f for f in world["facts"] if f["split"] == split and f["domain"] == domain]
        picked = random.Random(0).sample(facts, n)
        out[name] = [{k: qa_row(f)[k] for k in ("prompt", "completion", "answers")} for f in picked]
    return out


def write_quickstart_data() -> None:
    """Write the sample data files from :func:`quickstart_rows`."""
    DATA.mkdir(parents=True, exist_ok=True)
    for name, rows in quickstart_rows().items():
        (DATA / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def readme_commands() -> list:
    """The ``rankwise`` command lines of the README's quickstart block (between its markers), as argv lists."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- quickstart:start -->(.*?)<!-- quickstart:end -->", text, re.S)
    assert m, "README.md has no <!-- quickstart:start --> ... <!-- quickstart:end --> block"
    lines = [line.split("#", 1)[0].strip() for line in m.group(1).splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("rankwise ")]


def test_the_sample_data_are_the_worlds_facts():
    for name, rows in quickstart_rows().items():
        path = DATA / name
        assert path.is_file(), f"{path} is missing; write it with `python tests/test_quickstart.py`"
        have = [json.loads(line) for line in path.read_text().splitlines() if line]
        assert have == rows, f"{path} is not the world's sample any more; write it with `python tests/test_quickstart.py`"


def test_the_quickstart_config_reads_the_sample_data_and_the_world_base(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = C.parse(str(CONFIG))
    assert (cfg.data.train, cfg.data.eval, cfg.data.eval_ood) == tuple(
        f"examples/data/{n}" for n in SETS)
    assert cfg.model == "runs/world/base"
    argvs = readme_commands()
    verbs = [a[1] for a in argvs]
    assert verbs[:2] == ["world", "train"] and {"sweep", "merge"} <= set(verbs), verbs
    assert ["world", "pretrain", "--out", "runs/world"] == argvs[0][1:5]
    # every command writes somewhere of its own: none refuses the directory an earlier one left
    outs = [a[a.index("--out") + 1] for a in argvs if "--out" in a] + [cfg.output_dir]
    assert len(outs) == len(set(outs)), outs


def test_init_writes_the_commented_default_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init"]) == 0
    text = (tmp_path / "rankwise.yaml").read_text()
    assert text == (ROOT / "examples" / "lora.yaml").read_text()
    assert "rankwise train rankwise.yaml" in capsys.readouterr().out
    assert cli.main(["init", "--out", "sub/dir/my.yaml"]) == 0  # missing directories are made
    assert (tmp_path / "sub" / "dir" / "my.yaml").read_text() == text
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dir", "my.yaml", "rankwise.yaml", "sub"]


def _refused(argv, capsys, *words) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rankwise init: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    return err


def test_init_refuses_to_overwrite_without_force_and_never_writes_through_a_link(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("model: mine\n")
    _refused(["init", "--out", "mine.yaml"], capsys, "exists", "--force")
    assert (tmp_path / "mine.yaml").read_text() == "model: mine\n"
    assert cli.main(["init", "--out", "mine.yaml", "--force"]) == 0
    assert (tmp_path / "mine.yaml").read_text() == (ROOT / "examples" / "lora.yaml").read_text()
    (tmp_path / "target.yaml").write_text("keep\n")
    (tmp_path / "link.yaml").symlink_to(tmp_path / "target.yaml")
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "nowhere.yaml")
    for name in ("link.yaml", "dangling.yaml"):
        for force in ([], ["--force"]):
            _refused(["init", "--out", name, *force], capsys, "symbolic link")
    assert (tmp_path / "target.yaml").read_text() == "keep\n"
    assert not (tmp_path / "nowhere.yaml").exists()
    (tmp_path / "adir").mkdir()
    _refused(["init", "--out", "adir", "--force"], capsys, "is a directory")
    _refused(["init", "--out", "target.yaml/x.yaml"], capsys, "under the file")
    assert not [p for p in tmp_path.rglob(".tmp*")]


def _cheap(argv: list) -> list:
    """``argv`` with its step counts cut: the commands as the README gives them, in seconds."""
    if argv[1:3] == ["world", "pretrain"]:
        return argv + ["--steps", "4"]
    if argv[1] in ("train", "sweep"):
        return argv + ["--set", "train.max_steps=3", "--set", "train.epochs=null", "--set", "eval.max_examples=8"]
    return argv


@pytest.mark.slow
def test_the_readme_quickstart_runs_offline(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))
    for argv in readme_commands():
        assert cli.main(_cheap(argv)[1:]) == 0, argv
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 3, summary
    assert (tmp_path / "runs" / "quickstart" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "runs" / "quickstart-sweep" / "sweep.csv").is_file()
    assert (tmp_path / "runs" / "quickstart-merged" / "config.json").is_file()


if __name__ == "__main__":
    write_quickstart_data()
    print(f"wrote {', '.join(SETS)} in {DATA}", file=sys.stderr)
