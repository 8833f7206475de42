"""``torchrun --nproc-per-node 2 rankwise sweep ... --together``: the groups spread over two CPU processes (gloo)
end exactly as in one process; a refusal is one line from each process, and nobody hangs."""
import csv
import json
import os
import pytest
import yaml
from safetensors.torch import load_file
from launcher import torchrun
from test_data import build_tiny_llama, qa_rows, write_jsonl

from rankwise import spread
from rankwise.sweep import sweep

pytestmark = pytest.mark.usefixtures("one_thread")

RANKS = [1, 2, 4, 8]
TIMING = {"runtime_s", "output_dir"}  # columns that differ between the two sweeps by nature


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("torchrunworld")
    return {"model": build_tiny_llama(d / "model"), "method": "lora",
            "lora": {"r": 16, "alpha": 8, "targets": ["q_proj", "v_proj"]},
            "data": {"train": write_jsonl(d / "train.jsonl", qa_rows(16)), "eval": write_jsonl(d / "eval.jsonl", qa_rows(4)),
                     "max_length": 40},
            "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "log_every": 2, "save_every": 2},
            "eval": {"every": 0, "max_new_tokens": 3}, "log": {"progress": False}, "output_dir": str(d / "unused")}


def delta(arm_dir):
    """``scaling * B @ A`` of every adapted layer of an arm's adapter."""
    ad = os.path.join(arm_dir, "adapter")
    with open(os.path.join(ad, "adapter_config.json")) as f:
        conf = json.load(f)
    scaling = conf["lora_alpha"] / (conf["r"] ** 0.5 if conf.get("use_rslora") else conf["r"])
    w = load_file(os.path.join(ad, "adapter_model.safetensors"))
    return {k: scaling * w[k.replace("lora_A", "lora_B")].double() @ w[k].double() for k in w if "lora_A" in k}


def read_rows(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


@pytest.mark.slow
def test_torchrun_sweep_spreads_the_groups_and_matches_one_process(cfg, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out1, out2 = tmp_path / "spread", tmp_path / "one"
    rc, stdout, err = torchrun(["sweep", str(config), "--ranks", ",".join(map(str, RANKS)), "--together",
                                "--group-size", "2", "--out", str(out1)])
    assert rc == 0, err[-3000:]
    assert stdout.count("# Rank sweep") == 1  # rank 0 prints the table
    assert "rank 0 of 2 trains lora_r1+lora_r2" in err and "rank 1 of 2 trains lora_r4+lora_r8" in err
    sweep(cfg, RANKS, together=True, group_size=2, out_dir=str(out2))

    def files(root):
        return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)

    assert files(out1) == files(out2)  # the same arms, tables, plots, sweep.yaml; no checkpoint left
    for r in RANKS:
        a, b = delta(out1 / "arms" / f"lora_r{r}"), delta(out2 / "arms" / f"lora_r{r}")
        assert a.keys() == b.keys() and a
        for k in a:
            rel = (a[k] - b[k]).norm() / b[k].norm()
            assert rel <= 1e-4, (r, k, float(rel))
    assert read_rows(out1 / "sweep.csv") == read_rows(out2 / "sweep.csv")
    assert all(row["status"] == "finished" for row in read_rows(out1 / "sweep.csv"))
    # run again: every arm is reused, on both ranks
    rc, _, err = torchrun(["sweep", str(config), "--ranks", ",".join(map(str, RANKS)), "--together",
                           "--group-size", "2", "--out", str(out1)])
    assert rc == 0, err[-3000:]
    assert "rank 0 of 2 trains nothing" in err and "rank 1 of 2 trains nothing" in err
    assert read_rows(out1 / "sweep.csv") == read_rows(out2 / "sweep.csv")


@pytest.mark.slow
def test_torchrun_sweep_refusal_is_one_line_on_every_process(cfg, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("not rankwise's\n")
    rc, _, err = torchrun(["sweep", str(config), "--ranks", "1,2", "--together", "--out", str(theirs)], timeout=120)
    # each process prints the same one line (two processes share the launcher's stderr, and ``print`` writes a
    # line and its newline apart, so the two may run together: count them, do not split them)
    line = next(x for x in err.splitlines() if x.startswith("rankwise sweep: error:")).split(" directory")[0]
    assert err.count(line) == 2 and "pass --force" in err, err[-3000:]
    assert rc != 0 and "exitcode  : 2" in err, err[-3000:]
    assert sorted(os.listdir(theirs)) == ["notes.txt"]  # nothing written, no lock taken


def test_assign_balances_estimated_costs():
    assert spread.assign([2.0, 2.0], 2) == [0, 1]
    assert spread.assign([2.0, 2.0, 1.0, 2.0], 2) == [0, 1, 1, 0]
    assert spread.assign([1.0, 1.0, 1.0], 4) == [0, 1, 2]
    assert spread.assign([], 2) == []


def test_one_process_hides_torchrun_and_restores_it(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with spread.one_process():
        assert (os.environ["WORLD_SIZE"], os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("1", "0", "1")
    assert spread.launch() == spread.Launch(2, 1, 1)
