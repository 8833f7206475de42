"""``rankwise study`` with ``study: knowledge``: the knowledge study's protocol end to end on a tiny Llama and
EntityQuestions fixture files in the dataset's own layout and schema: the base's mastery levels, the data-size
plan (two sizes, two draws), the known/unknown arms, restoration with its controls, the findings and a rerun
that reuses everything."""
import json

import pytest
import yaml
from test_data import build_tiny_llama

import rankwise.study.knowledge as K
from rankwise.cli import main as cli

pytestmark = pytest.mark.usefixtures("one_thread")
CITIES = ["Paris", "Oslo", "Lima", "Rome", "Bern"]


def eq_files(root):
    """dataset/<split>/P<id>.<split>.json[l] with {question, answers} rows, as EntityQuestions ships them."""
    for split in ("train", "test"):
        (root / "dataset" / split).mkdir(parents=True)
    def rows(tmpl, n, off, pool):
        return [{"question": tmpl.replace("[X]", f"Pat Doe{i}"), "answers": [pool[i % len(pool)]]}
                for i in range(off, off + n)]
    (root / "dataset/train/P19.train.json").write_text(json.dumps(rows("Where was [X] born?", 14, 0, CITIES)))
    (root / "dataset/train/P20.train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows("Where did [X] die?", 6, 0, CITIES)))
    (root / "dataset/test/P19.test.json").write_text(json.dumps(rows("Where was [X] born?", 6, 50, CITIES)))
    (root / "dataset/test/P20.test.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows("Where did [X] die?", 3, 50, CITIES)))
    (root / "dataset/test/P40.test.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows("Who is [X]'s child?", 4, 50, ["Ann", "Bo"])))
    (root / "templates.json").write_text(json.dumps({"P19": ["[X] was born in", "[X] is from"],
                                                     "P20": ["[X] died in"], "P40": ["The child of [X] is"]}))
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = eq_files(tmp_path_factory.mktemp("knowledge"))
    return {"dir": d, "model": build_tiny_llama(d / "model")}


def config(files, out, **over):
    d = files["dir"]
    cfg = {"study": "knowledge", "output_dir": str(out),
           "run": {"model": files["model"], "data": {"max_length": 64},
                   "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "warmup": 0, "save_every": 0}},
           "seeds": [0, 1],
           "knowledge": {"data": str(d / "dataset"), "templates": str(d / "templates.json"),
                         "in_domain": ["P19", "P20"], "out_of_domain": ["P40"], "sizes": [4, 12], "draws": 2,
                         "compare": [4, 12], "known": [1, 2, 3, 4], "unknown": [0], "level_size": 3,
                         "probe": {"samples": 2, "max_new_tokens": 4, "batch_size": 16},
                         "restore": {"size": 12, "fractions": [0.05, 0.2], "finding_fraction": 0.2}},
           "eval": {"max_new_tokens": 4, "batch_size": 16}, "boot": {"n_boot": 200}}
    cfg.update(over)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_the_knowledge_study_runs_end_to_end_and_reruns_from_its_files(files, tmp_path, monkeypatch):
    out = tmp_path / "k"
    assert cli(["study", config(files, out)]) == 0
    res = json.loads((out / "results.json").read_text())
    levels = [json.loads(x)["level"] for x in (out / "mastery" / "base.jsonl").read_text().splitlines()]
    assert len(levels) == 20 + 9 + 4 and set(levels) <= {0, 1, 2, 3, 4}
    assert sum(res["test_levels"].values()) == 9
    names = [a["name"] for a in res["arms"]]
    assert names[:3] == ["base", "size4", "size12"]
    assert {"top-0.05", "top-0.2", "bottom-0.2", "random-0.2"} <= set(names)
    size4 = res["arms"][1]
    assert len(size4["in"]["rows"]) == 4 and size4["in"]["n"] == 9 and size4["out"]["n"] == 4  # 2 seeds x 2 draws
    assert [f["id"] for f in res["findings"]] == ["data_size", "mastery", "restore_top", "restore_vs_random",
                                                  "restore_vs_bottom"]
    for f in res["findings"]:
        assert f["verdict"] in {"reproduced", "contradicted", "inconclusive"}
    measured = {f["id"] for f in res["findings"] if f["effect"] is not None}
    assert {"data_size", "restore_top", "restore_vs_random", "restore_vs_bottom"} <= measured
    if "known" not in names or "unknown" not in names:  # the tiny model may know too few facts of a level
        assert "fewer than level_size" in next(f for f in res["findings"] if f["id"] == "mastery")["why"]
    assert "data_size" in (out / "report.md").read_text()

    def nothing_again(*a, **k):
        raise AssertionError("a finished study computes again")

    for name in ("train", "generate_answers", "hf_sampler", "restore"):
        monkeypatch.setattr(K, name, nothing_again)
    assert cli(["study", config(files, out)]) == 0
    assert json.loads((out / "results.json").read_text()) == res


@pytest.mark.parametrize("change, words", [
    ({"knowledge": {"templates": "T", "data": "D", "sizes": [4, 12, 40], "compare": [4, 40]}},
     "40 training facts asked for, the data has 20"),
    ({"knowledge": {"templates": "T", "data": "D", "compare": [4, 5]}}, "compare must be two of knowledge.sizes"),
    ({"knowledge": {"templates": "T", "data": "D", "in_domain": ["P36"]}}, "no EntityQuestions files"),
    ({"knowledge": {"templates": "T", "data": "D", "out_of_domain": ["P26"]}}, "no EntityQuestions files"),
    ({"knowledge": {"templates": "T", "data": "D", "prompt": "Q:"}}, "must hold {question}"),
    ({"run": {"model": "m", "train": {"lrr": 1}}}, "lrr"),
    ({"knowledge": {"templates": "T", "data": "D", "draws": 0}}, "knowledge.draws must be a positive integer"),
    ({"knowledge": {"templates": "T", "data": "D", "level_size": -1}}, "knowledge.level_size must be"),
    ({"knowledge": {"templates": "T", "data": "D", "test_per_domain": -3}}, "knowledge.test_per_domain must be"),
    ({"knowledge": {"templates": "T", "data": "D", "known": [0, 1]}}, "share a level"),
    ({"knowledge": {"templates": "T", "data": "D", "compare": [4, 4]}}, "compare must be two of"),
    ({"knowledge": {"templates": "T", "data": "D",
                    "restore": {"size": 12, "fractions": [0.05, 0.2], "finding_fraction": 0.3}}},
     "finding_fraction must be one of its fractions"),
    ({"knowledge": {"templates": "T", "data": "D", "probe": {"samples": "x"}}}, "knowledge.probe.samples must be"),
    ({"boot": {"n_boot": 2.5}}, "boot.n_boot must be a positive integer"),
    ({"knowledge": {"templates": "T", "data": "D", "train_pool": 0}}, "knowledge.train_pool must be a positive"),
    ({"knowledge": {"templates": "T", "data": "D", "train_pool": 8}}, "12 training facts asked for, the data has 8 of "
     "the in-domain relations in knowledge.train_pool"),
    ({"knowledge": {"templates": "T", "data": "D", "probe": {"backend": "tf"}}}, "probe.backend must be hf or vllm"),
])
def test_a_bad_knowledge_study_is_one_line_and_writes_nothing(files, tmp_path, capsys, change, words):
    d = files["dir"]
    change = json.loads(json.dumps(change).replace('"T"', json.dumps(str(d / "templates.json")))
                        .replace('"D"', json.dumps(str(d / "dataset"))))
    out = tmp_path / "never"
    base = yaml.safe_load(open(config(files, out)))
    if "knowledge" in change:
        change["knowledge"] = {**base["knowledge"], **change["knowledge"]}
    assert cli(["study", config(files, out, **change)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_plan_prints_the_facts_memory_and_time_per_size_and_writes_nothing(files, tmp_path, capsys):
    from rankwise import arm_cost
    from rankwise.config import parse
    from rankwise.model import load_tokenizer

    out = tmp_path / "plan"
    cfg = K.validate_knowledge(yaml.safe_load(open(config(files, out, run={
        "model": files["model"], "data": {"max_length": 64}, "train": {"epochs": 2, "batch_size": 4}}))))
    data = K.load_knowledge(cfg)
    run = parse(K.run_config(cfg, "t.jsonl", "o", 0))
    rows = [{"prompt": cfg["knowledge"]["prompt"].format(question=f["question"]), "completion": " " + f["answers"][0]}
            for f in data["train"]]
    flops = arm_cost.train_flops(run, arm_cost.train_tokens(run, rows[:12], load_tokenizer(files["model"])))
    assert cli(["study", str(out.parent / "plan.yaml"), "--plan", "--tflops", f"{flops / 3e14!r}"]) == 0
    text = capsys.readouterr().out
    assert f"knowledge: {len(data['train'])} training facts" in text and "GiB at peak" in text
    assert "  12 facts: 5.0 min to train (each draw)" in text
    assert "  4 facts: " in text and "  3 facts: " in text and "  3 facts: 5.0 min" not in text
    n = len(data["train"]) + len(data["test"]["in"]) + len(data["test"]["out"])
    per = sum(len(data["templates"][f["relation"]]) for f in data["train"] + data["test"]["in"] + data["test"]["out"])
    assert f"{n} facts x {per / n:.3g} templates x 2 samples = {per * 2} generations of up to 4 tokens" in text
    assert not out.exists()


def test_train_pool_is_a_seeded_sample_and_the_probe_can_run_on_vllm(files, tmp_path, monkeypatch):
    """knowledge.train_pool bounds the training facts every arm draws from (and the probe measures) to a seeded
    sample; probe.backend vllm samples through rankwise.mastery.vllm_sampler with the study's settings, and is
    refused in one line where vLLM is not installed."""
    import importlib.util

    from rankwise.errors import ConfigError

    raw = yaml.safe_load(open(config(files, tmp_path / "o")))
    raw["knowledge"] = {**raw["knowledge"], "train_pool": 13, "probe": {**raw["knowledge"]["probe"], "backend": "vllm"}}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match="backend vllm needs vLLM"):
        K.validate_knowledge(raw)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    cfg = K.validate_knowledge(raw)
    data = K.load_knowledge(cfg)
    assert len(data["train"]) == 13 and [f["id"] for f in K.load_knowledge(cfg)["train"]] == [f["id"] for f in data["train"]]
    asked = []

    def fake_vllm(model, samples, temperature, max_new_tokens, dtype, seed):
        asked.append((model, samples, temperature, max_new_tokens, dtype, seed))
        return lambda prompts, s: [["Paris"] * samples for _ in prompts]

    monkeypatch.setattr(K, "vllm_sampler", fake_vllm)
    levels = K.probe_levels(cfg, tmp_path / "o", data)
    p = cfg["knowledge"]["probe"]
    assert asked == [(files["model"], p["samples"], p["temperature"], p["max_new_tokens"], "auto", p["seed"])]
    assert set(levels) == {f["id"] for f in data["train"] + data["test"]["in"] + data["test"]["out"]}
