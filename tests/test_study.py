"""``rankwise study``: the rank protocol end to end on a tiny Llama with fixture files in each data set's real
schema (a reasoning experiment, GSM8K in domain and MathQA out of domain, and a recall one, MMLU), the results'
intervals and verdicts, a second run that reuses everything, and the refusals (one line, nothing written)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from test_data import build_tiny_llama

import rankwise.study.rank as rank
from rankwise.cli import main as cli

pytestmark = pytest.mark.usefixtures("one_thread")

VERDICTS = {"reproduced", "contradicted", "inconclusive"}


def gsm8k_rows(n, offset=0):
    rows = []
    for i in range(offset, offset + n):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append({"question": f"Ann has {a} pens and buys {b} more. How many pens?",
                     "answer": f"{a}+{b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"})
    return rows


def mathqa_rows(n):
    return [{"Problem": f"what is {i} + 1 ?", "Rationale": f"\"{i} + 1 = {i + 1}\"",
             "options": f"a ) {i + 1} , b ) {i} , c ) {i + 2} , d ) 0 , e ) 1", "correct": "a",
             "annotated_formula": f"add({i}, const_1)", "linear_formula": f"add(n0,const_1)|", "category": "general"}
            for i in range(n)]


def mmlu_rows(n):
    return [{"question": f"Which letter is number {i % 4}?", "subject": "letters", "choices": ["a", "b", "c", "d"],
             "answer": i % 4} for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    (d / "gsm8k_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows(14)))
    (d / "gsm8k_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows(6, 50)))
    (d / "mathqa_test.json").write_text(json.dumps(mathqa_rows(5)))
    pq.write_table(pa.Table.from_pylist(mmlu_rows(12)), d / "mmlu_train.parquet")
    pq.write_table(pa.Table.from_pylist(mmlu_rows(8)), d / "mmlu_test.parquet")
    return {"dir": d, "model": build_tiny_llama(d / "model")}


def config(files, out, **over):
    d = files["dir"]
    cfg = {"study": "rank", "output_dir": str(out),
           "run": {"model": files["model"], "data": {"max_length": 192},
                   "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "warmup": 0, "save_every": 0}},
           "full": {"train": {"lr": 1e-3}},
           "arms": {"ranks": [1, 2, 4], "full": True}, "seeds": [0, 1],
           "experiments": [
               {"name": "gsm8k", "train": {"task": "gsm8k", "data": str(d / "gsm8k_train.jsonl"), "validation": 4},
                "eval": {"gsm8k": {"task": "gsm8k", "data": str(d / "gsm8k_test.jsonl")},
                         "mathqa": {"task": "mathqa", "data": str(d / "mathqa_test.json"), "domain": "out"}}},
               {"name": "mmlu", "train": {"task": "mmlu", "data": str(d / "mmlu_train.parquet")},
                "eval": {"mmlu": {"task": "mmlu", "data": str(d / "mmlu_test.parquet")}}}],
           "eval": {"max_new_tokens": 6, "batch_size": 16}, "boot": {"n_boot": 200}}
    cfg.update(over)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_the_rank_study_runs_end_to_end_and_reruns_from_its_files(files, tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    assert cli(["study", config(files, out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["experiments"]) == {"gsm8k", "mmlu"}
    g = res["experiments"]["gsm8k"]
    assert g["kind"] == "reasoning" and g["sizes"] == {"train": 10, "validation": 4, "gsm8k": 6, "mathqa": 5}
    assert [r["name"] for r in g["arms"]] == ["base", "lora-r1", "lora-r2", "lora-r4", "full"]
    for row in g["arms"]:
        for s, n in (("validation", 4), ("gsm8k", 6), ("mathqa", 5)):
            cell = row[s]
            assert cell["n"] == n and set(cell["seeds"]) == {"0", "1"} and len(cell["ci95"]) == 2
            assert cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1]
    assert all(len(r["delta_norm"]) == 2 for r in g["arms"][1:4])
    # the training cost per arm and seed: the run's wall time, no CUDA peak here
    for row in g["arms"][1:]:
        assert all(t > 0 for t in row["runtime_s"]) and row["peak_mem_mb"] == [None, None], row["name"]
    ids = [f["id"] for f in res["findings"]]
    assert ids == ["gsm8k.reasoning_mid_rank", "gsm8k.lora_vs_sft", "gsm8k.lora_vs_sft_ood", "gsm8k.sft_drifts_more",
                   "gsm8k.norm_log_rank", "mmlu.recall_rank_flat", "mmlu.lora_vs_sft", "mmlu.lora_vs_sft_ood",
                   "mmlu.sft_drifts_more", "mmlu.norm_log_rank"]
    # the update analysis: every trained arm of every seed, its drift in [0, 1], CKA at most 1, attention changed
    for row in g["arms"][1:]:
        assert len(row["drift"]) == len(row["attention_js"]) == len(row["cka"]) == 2, row["name"]
        assert all(0.0 <= x <= 1.0 + 1e-6 for x in row["drift"] + row["cka"]) and all(x > 0 for x in row["attention_js"])
    drift = next(f for f in res["findings"] if f["id"] == "gsm8k.sft_drifts_more")
    assert drift["b"]["arm"] == f"lora-r{g['chosen_rank']}" and drift["a"]["arm"] == "full" and drift["effect"] is not None
    by_hand = []  # the effect: full's drift minus LoRA's over the matrices both changed, mean over them and seeds
    for seed in (0, 1):
        updates = json.loads((out / "analysis" / "gsm8k" / f"seed{seed}.json").read_text())["updates"]
        lo, fu = ({n[n.find("layers."):]: d for n, d in zip(updates[a]["names"], updates[a]["drift"])}
                  for a in (f"lora-r{g['chosen_rank']}", "full"))
        assert lo and set(lo) <= set(fu)  # LoRA adapts (some of) the matrices full SFT changes
        by_hand.append(sum(fu[n] - lo[n] for n in lo) / len(lo))
    assert drift["effect"] == pytest.approx(sum(by_hand) / 2, abs=1e-9)
    assert "singular-vector drift" in (out / "report.md").read_text()
    assert "| training time per seed (s) |" in (out / "report.md").read_text()
    for f in res["findings"]:
        assert f["verdict"] in VERDICTS and {"claim", "source", "effect", "ci95"} <= set(f)
    assert next(f for f in res["findings"] if f["id"] == "mmlu.lora_vs_sft_ood")["why"] == \
        "no out-of-domain evaluation set"
    assert "gsm8k.reasoning_mid_rank" in (out / "report.md").read_text()
    assert (out / "arms" / "gsm8k" / "seed1" / "lora-r2" / "adapter" / "adapter_config.json").exists()
    assert "results:" in capsys.readouterr().out

    def no_training(*a, **k):
        raise AssertionError("a finished study trains again")

    monkeypatch.setattr(rank, "train", no_training)
    monkeypatch.setattr(rank, "train_group", no_training)
    monkeypatch.setattr(rank, "generate_answers", no_training)
    monkeypatch.setattr(rank, "analyze_runs", no_training)
    assert cli(["study", config(files, out)]) == 0
    assert json.loads((out / "results.json").read_text()) == res
    changed = config(files, out, full={"train": {"lr": 2e-3}})  # a finished arm of other settings: refused
    assert cli(["study", changed]) == 2
    err = capsys.readouterr().err
    assert "finished run trained with other settings" in err and "train.lr" in err
    exps = yaml.safe_load(open(config(files, out)))["experiments"]
    exps[0]["train"]["limit"] = 13  # other training rows: the finished arms trained on others
    assert cli(["study", config(files, out, experiments=exps)]) == 2
    assert "finished run trained with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("change, words", [
    ({"arms": {"ranks": [0, 2]}}, "arms.ranks must be a non-empty list of distinct integers >= 1"),
    ({"runs": {}}, "unknown key 'runs'"),
    ({"run": {"model": "m", "train": {"lrr": 1}}}, "lrr"),
    ({"run": {"output_dir": "x"}}, "run.output_dir is set by the study"),
    ({"study": "ranks"}, "study must be one of rank"),
    ({"eval": {"choice_tokens": 0}}, "eval.choice_tokens must be a positive integer"),
    ({"analysis": {"probe": -1}}, "analysis.probe must be an integer >= 0"),
    ({"experiments": [{"name": "x", "kind": "memory", "train": {"task": "gsm8k", "data": "GSM"},
                       "eval": {"y": {"task": "gsm8k", "data": "GSM"}}}]}, "experiments[0].kind must be recall or reasoning"),
    ({"eval": {"answer_tokens": 0}}, "eval.answer_tokens must be a positive integer"),
    ({"experiments": [{"name": "x", "kind": "", "train": {"task": "gsm8k", "data": "GSM"},
                       "eval": {"y": {"task": "gsm8k", "data": "GSM"}}}]}, "experiments[0].kind must be recall or"),
    ({"boot": {"n_boot": 0}}, "boot.n_boot must be a positive integer"),
    ({"boot": {"seed": "x"}}, "boot.seed must be an integer >= 0"),
    ({"analysis": {"attention": "yes"}}, "analysis.attention must be true or false"),
    ({"analysis": {"spectra": True}}, "unknown key analysis.'spectra'"),
    ({"analysis": [1]}, "analysis must be a mapping"),
    ({"experiments": [{"name": "x", "train": {"task": "gsm8k", "data": "GSM"},
                       "eval": {"y": {"task": "mmlu", "data": "MMLU", "subjects": ["law"]}}}]},
     "x.eval.y: no rows of the subjects law"),
    ({"experiments": [{"name": "x", "train": {"task": "gsm8k", "data": "/no/such.jsonl"},
                       "eval": {"x": {"task": "gsm8k", "data": "/no/such.jsonl"}}}]}, "/no/such.jsonl"),
    ({"experiments": [{"name": "x", "train": {"task": "mathqa", "data": "GSM"}, "eval": {"x": {"task": "gsm8k",
                                                                                              "data": "GSM"}}}]},
     "needs 'Problem'"),
    ({"experiments": [{"name": "x", "train": {"task": "gsm8k", "data": "GSM"},
                       "eval": {"validation": {"task": "gsm8k", "data": "GSM"}}}]}, "that name is the study's own"),
])
def test_a_bad_study_is_one_line_and_writes_nothing(files, tmp_path, capsys, change, words):
    change = json.loads(json.dumps(change).replace("GSM", str(files["dir"] / "gsm8k_test.jsonl"))
                        .replace("MMLU", str(files["dir"] / "mmlu_test.parquet")))
    out = tmp_path / "never"
    assert cli(["study", config(files, out, **change)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_the_example_studies_are_valid_configs():
    from pathlib import Path

    from rankwise.config import load_yaml
    from rankwise.demo.protocol import validate_world
    from rankwise.study.config import plan_arms, validate_study
    from rankwise.study.knowledge import validate_knowledge
    from rankwise.study_data import QUESTION_TEMPLATES, read_templates

    assert set(read_templates(Path(__file__).resolve().parent.parent / "examples" / "studies" /
                              "entity_questions_templates.json")) == set(QUESTION_TEMPLATES)

    root = Path(__file__).resolve().parent.parent / "examples" / "studies"
    found = sorted(root.glob("*.yaml"))
    assert len(found) >= 2
    for path in found:
        raw = load_yaml(path)
        if raw["study"] == "knowledge":
            cfg = validate_knowledge(raw)
            assert read_templates(root.parent.parent / cfg["knowledge"]["templates"])
            continue
        if raw["study"] == "world":
            assert validate_world(raw)["scale"] in ("cpu", "gpu")
            continue
        cfg = validate_study(raw)
        assert [a["name"] for a in plan_arms(cfg)][-1] == "full" and cfg["experiments"]
    assert {load_yaml(p)["study"] for p in found} == {"rank", "knowledge", "world"}


def test_a_hub_data_set_that_cannot_load_is_one_line(tmp_path):
    from rankwise.errors import ConfigError
    from rankwise.study_tasks import read_task

    with pytest.raises(ConfigError, match="cannot load the Hub data set 'no-such/dataset' \\(config 'main', split "
                                          "'test'\\)") as e:
        read_task("gsm8k", "no-such/dataset:test", config="main")
    assert "\n" not in str(e.value)


def test_lm_eval_tasks_are_scored_for_every_arm_and_folded_into_the_tables(files, tmp_path):
    """eval.lm_eval runs lm-evaluation-harness (a local task YAML: no download) on the base and every arm; its
    per-sample scores get the same intervals as the study's own sets."""
    d = tmp_path / "tasks"
    d.mkdir()
    rows = tmp_path / "mc.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in mmlu_rows(9)))
    (d / "tiny_mc.yaml").write_text(yaml.safe_dump({
        "task": "tiny_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(rows)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}))
    out = tmp_path / "lme"
    base = yaml.safe_load(open(config(files, out)))
    over = {"experiments": base["experiments"][1:], "arms": {"ranks": [1, 2], "full": False}, "seeds": [0],
            "eval": {**base["eval"], "lm_eval": {"tasks": ["tiny_mc"], "limit": 7, "include_path": str(d)}}}
    assert cli(["study", config(files, out, **over)]) == 0
    rows = json.loads((out / "results.json").read_text())["experiments"]["mmlu"]["arms"]
    assert [r["name"] for r in rows] == ["base", "lora-r1", "lora-r2"]
    for r in rows:
        cell = r["lm_eval:tiny_mc"]
        assert cell["n"] == 7 and cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1]
    assert "lm_eval:tiny_mc" in (out / "report.md").read_text()


def test_an_unknown_lm_eval_task_is_one_line_before_anything_is_written(files, tmp_path, capsys):
    out = tmp_path / "never"
    base = yaml.safe_load(open(config(files, out)))
    assert cli(["study", config(files, out, eval={**base["eval"], "lm_eval": {"tasks": ["no_such_task_x"]}})]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no task 'no_such_task_x'" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_plan_prints_the_sizes_and_the_memory_estimates_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    from rankwise import arm_memory
    from rankwise.study.config import validate_study

    out = tmp_path / "plan"
    assert cli(["study", config(files, out), "--plan"]) == 0
    text = capsys.readouterr().out
    assert "gsm8k (reasoning): train 10, validation 4, gsm8k 6, mathqa 5 items; 2 seed(s)" in text
    assert "LoRA r = 1, 2, 4 together: about" in text and "full SFT: alone, about" in text
    assert not out.exists()
    study = validate_study(yaml.safe_load(open(config(files, out))))
    run = rank.parse(rank.arm_run_config(study, {"name": "lora-r1", "method": "lora", "rank": 1}, 0, "t.jsonl", "o"))
    two = arm_memory.estimate_peak_bytes(run, [1, 2])
    monkeypatch.setattr(rank, "memory_budget", lambda device: two + 1)  # room for two arms, not three
    assert cli(["study", config(files, out), "--plan"]) == 0
    text = capsys.readouterr().out
    assert "LoRA r = 1, 2 together" in text and "LoRA r = 4 together" in text
    # the training time at a stated rate: the arms' FLOPs over the tokens of the rows the study trains on
    from rankwise import arm_cost
    from rankwise.model import load_tokenizer
    from rankwise.study.config import load_sets

    sets = load_sets(study)
    rows = [{"prompt": it["prompt"], "completion": it["completion"]} for it in sets["gsm8k"]["train"]]
    flops = arm_cost.train_flops(run, arm_cost.train_tokens(run, rows, load_tokenizer(files["model"])), [1, 2])
    assert cli(["study", config(files, out), "--plan", "--tflops", f"{flops / 3e14!r}"]) == 0  # 300 s at that rate
    text = capsys.readouterr().out
    assert "LoRA r = 1, 2 together: about" in text and "GiB at peak, 5.0 min to train per seed" in text
    assert cli(["study", config(files, out), "--plan", "--tflops", "0"]) == 2
    assert "--tflops must be a positive rate" in capsys.readouterr().err
    assert not out.exists()


def test_lm_eval_scores_take_one_filter_in_document_order(monkeypatch):
    """A task with several filters (gsm8k: strict-match, flexible-extract) logs one sample per filter and document:
    the scores are the chosen filter's (the first by default), one per document, in document order."""
    import lm_eval
    import lm_eval.models.huggingface
    import lm_eval.tasks

    samples = [{"doc_id": d, "filter": f, "metrics": ["exact_match"], "exact_match": float(v)}
               for d, f, v in ((1, "strict-match", 1), (1, "flexible-extract", 0), (0, "strict-match", 0),
                               (0, "flexible-extract", 1), (2, "strict-match", 1), (2, "flexible-extract", 1))]
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **k: {"samples": {"g": samples}})
    monkeypatch.setattr(lm_eval.models.huggingface, "HFLM", lambda **k: None)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda include_path=None: None)
    spec = {"tasks": ["g"], "limit": None, "include_path": None, "num_fewshot": None, "batch_size": 1,
            "metric": None, "filter": None}
    assert rank.lm_eval_scores(None, None, spec, "cpu") == {"lm_eval:g": [0.0, 1.0, 1.0]}
    assert rank.lm_eval_scores(None, None, {**spec, "filter": "flexible-extract"}, "cpu") == {"lm_eval:g": [1.0, 0.0, 1.0]}
    from rankwise.errors import ConfigError
    with pytest.raises(ConfigError, match="has the filters strict-match, flexible-extract"):
        rank.lm_eval_scores(None, None, {**spec, "filter": "none"}, "cpu")


def test_the_full_sft_memory_estimate_counts_weights_gradients_and_moments(files):
    from rankwise.arm_memory import _activation_bytes, estimate_full_peak_bytes, model_shape
    from rankwise.config import parse

    cfg = parse({"model": files["model"], "method": "full", "data": {"train": "t.jsonl", "max_length": 32},
                 "dtype": "fp32", "train": {"batch_size": 2}})
    s = model_shape(cfg)
    act = _activation_bytes(cfg, s, torch.device("cpu"))
    assert estimate_full_peak_bytes(cfg, "cpu") == int(s["params"] * 16 + act)  # fp32: weight, grad, two moments
    cheap = parse({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "optimizer": "adamw8bit"}})
    assert estimate_full_peak_bytes(cheap, "cpu") == int(s["params"] * 10 + act)


def test_choice_answers_are_generated_short_and_worked_answers_long(monkeypatch):
    asked = []

    def fake(model, tok, prompts, max_new_tokens, batch_size):
        asked.append((len(prompts), max_new_tokens))
        return [[" B"] if "Which" in p else [" #### 3"] for p in prompts]

    monkeypatch.setattr(rank, "generate_answers", fake)
    from rankwise.study_tasks import gsm8k_item, mmlu_item
    g = gsm8k_item({"question": "1+2?", "answer": "1+2=3\n#### 3"}, 0, "x")
    m = mmlu_item({"question": "Which?", "choices": ["a", "b", "c", "d"], "answer": 1}, 0, "x")
    got = rank.evaluate_sets(None, None, {"g": [g, g], "m": [m, m, m], "both": [m, g]},
                             {"max_new_tokens": 64, "choice_tokens": 4, "batch_size": 8, "flexible": True})
    assert got == {"g": [1, 1], "m": [1, 1, 1], "both": [1, 1]}
    assert asked == [(4, 4), (3, 64)]


def test_analysis_false_skips_the_update_analysis(files, tmp_path):
    out = tmp_path / "plain"
    exps = yaml.safe_load(open(config(files, out)))["experiments"][1:]
    assert cli(["study", config(files, out, analysis=False, experiments=exps, seeds=[0],
                                arms={"ranks": [1, 2], "full": True})]) == 0
    res = json.loads((out / "results.json").read_text())
    drift = next(f for f in res["findings"] if f["id"] == "mmlu.sft_drifts_more")
    assert drift["verdict"] == "inconclusive" and drift["why"] == "analysis: false"
    assert not (out / "analysis").exists()
    assert all(r["drift"] == [None] for r in res["experiments"]["mmlu"]["arms"][1:])


def test_entity_questions_and_prompt_completion_experiments(files, tmp_path, monkeypatch):
    """EntityQuestions in its released layout (relations choosing in and out of domain) and a generic
    prompt/completion set with an explicit kind: read, trained, scored by containment (in `answer_tokens` new
    tokens, or `max_new_tokens` in a reasoning experiment), and judged by their kind's findings."""
    from test_study_knowledge import eq_files

    d = eq_files(tmp_path / "eq")
    pc = tmp_path / "pc.jsonl"
    pc.write_text("".join(json.dumps({"prompt": f"Add {i} and 1:", "completion": f" {i + 1}"}) + "\n" for i in range(9)))
    exps = [{"name": "eq", "train": {"task": "entity_questions", "data": str(d / "dataset" / "train"),
                                     "relations": ["P19"], "validation": 2},
             "eval": {"eq_in": {"task": "entity_questions", "data": str(d / "dataset" / "test"), "relations": ["P19"]},
                      "eq_out": {"task": "entity_questions", "data": str(d / "dataset" / "test"),
                                 "relations": ["P20"], "domain": "out"}}},
            {"name": "pc", "kind": "reasoning", "train": {"task": "prompt_completion", "data": str(pc)},
             "eval": {"pc": {"task": "prompt_completion", "data": str(pc), "limit": 4}}}]
    lengths = []
    real = rank.generate_answers
    monkeypatch.setattr(rank, "generate_answers", lambda *a, **k: lengths.append(k["max_new_tokens"]) or real(*a, **k))
    out = tmp_path / "study"
    assert cli(["study", config(files, out, experiments=exps, seeds=[0], analysis=False,
                                eval={"max_new_tokens": 9, "choice_tokens": 2, "answer_tokens": 5,
                                      "batch_size": 8})]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["experiments"]["eq"]["sizes"] == {"train": 12, "validation": 2, "eq_in": 6, "eq_out": 3}
    assert res["experiments"]["eq"]["kind"] == "recall" and res["experiments"]["pc"]["kind"] == "reasoning"
    ids = [f["id"] for f in res["findings"]]
    assert "eq.recall_rank_flat" in ids and "pc.reasoning_mid_rank" in ids
    assert sorted(set(lengths)) == [5, 9]  # EntityQuestions' answers short, the reasoning experiment's worked
    data = (out / "data" / "eq").glob("train-*.jsonl")
    rows = [json.loads(x) for x in next(data).read_text().splitlines()]
    assert rows[0]["prompt"].startswith("Question: Where was Pat Doe") and rows[0]["completion"].strip() in \
        ("Paris", "Oslo", "Lima", "Rome", "Bern")


@pytest.mark.parametrize("spec, words", [
    ({"task": "gsm8k", "data": "X", "relations": ["P19"]}, "relations is for task entity_questions"),
    ({"task": "entity_questions", "data": "X", "relations": ["P999"]}, "relations must be in_domain"),
    ({"task": "entity_questions", "data": "X", "relations": "in_domain", "config": "c"}, "no config"),
    ({"task": "entity_questions", "data": "X", "relations": [["P19"]]}, "relations must be in_domain"),
    ({"task": "gsm8k", "data": "X", "split": "train"}, "split is EntityQuestions' train, dev or test"),
    ({"task": "entity_questions", "data": "X", "split": "valid"}, "split is EntityQuestions' train, dev or test"),
    ({"task": "medmcqa", "data": "X", "cop_base": 2}, "cop_base must be 0"),
    ({"task": "entity_questions", "data": "EQ"}, "holds the splits test, train; name one"),
])
def test_bad_entity_questions_specs_are_one_line(files, tmp_path, capsys, spec, words):
    exps = [{"name": "x", "train": spec, "eval": {"y": {"task": "gsm8k", "data": "X"}}}]
    from test_study_knowledge import eq_files

    eq = eq_files(tmp_path / "eq")
    exps = json.loads(json.dumps(exps).replace('"X"', json.dumps(str(files["dir"] / "gsm8k_test.jsonl")))
                      .replace('"EQ"', json.dumps(str(eq / "dataset"))))
    assert cli(["study", config(files, tmp_path / "never", experiments=exps)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_entity_questions_split_and_a_limit_that_samples_every_relation(tmp_path):
    from test_study_knowledge import eq_files

    from rankwise.study.config import read_spec

    eq = eq_files(tmp_path / "eq")
    spec = {"task": "entity_questions", "data": str(eq / "dataset"), "cop_base": 0, "config": None,
            "subjects": None, "limit": None, "split": "test"}
    test = read_spec(spec, "t")
    assert {it["id"].split(".")[1] for it in test} == {"test"} and len(test) == 6 + 3 + 4  # P19, P20, P40
    train = read_spec({**spec, "split": "train", "limit": 10}, "t")  # P19 has 14 train rows, P20 6: both drawn
    assert {it["id"].split(".")[1] for it in train} == {"train"} and {it["subject"] for it in train} == {"P19", "P20"}
    assert read_spec({**spec, "split": "train", "limit": 10}, "t") == train  # seeded


def test_the_eval_key_holds_only_the_generation_settings_its_items_use():
    from rankwise.study_tasks import gsm8k_item, prompt_completion_item

    g = gsm8k_item({"question": "1+2?", "answer": "1+2=3\n#### 3"}, 0, "x")
    p = prompt_completion_item({"prompt": "a", "completion": " b"}, 0, "x")
    cfg = {"run": {"model": "m"}, "eval": {"max_new_tokens": 64, "choice_tokens": 4, "answer_tokens": 16,
                                           "batch_size": 8, "flexible": True, "lm_eval": None}}
    other = {**cfg, "eval": {**cfg["eval"], "answer_tokens": 32}}
    assert rank.eval_key(cfg, {"g": [g]}, None) == rank.eval_key(other, {"g": [g]}, None)
    assert rank.eval_key(cfg, {"p": [p]}, None) != rank.eval_key(other, {"p": [p]}, None)
    assert rank.eval_key(cfg, {"p": [p]}, None, "reasoning") == rank.eval_key(other, {"p": [p]}, None, "reasoning")
    longer = {**cfg, "eval": {**cfg["eval"], "max_new_tokens": 99}}
    assert rank.eval_key(cfg, {"g": [g]}, None) != rank.eval_key(longer, {"g": [g]}, None)


def test_an_nf4_base_runs_the_study(files, tmp_path):
    """run.quantization nf4: the LoRA arms train and are evaluated on the NF4 base (full SFT, which quantization
    does not apply to, on the dense one), and the study reports as with a dense base."""
    out = tmp_path / "nf4"
    exps = yaml.safe_load(open(config(files, out)))["experiments"][1:]
    run = {**yaml.safe_load(open(config(files, out)))["run"], "quantization": "nf4"}
    assert cli(["study", config(files, out, run=run, experiments=exps, seeds=[0], analysis=False,
                                arms={"ranks": [1, 2], "full": True})]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["experiments"]["mmlu"]["arms"]] == ["base", "lora-r1", "lora-r2", "full"]
    resolved = yaml.safe_load((out / "arms" / "mmlu" / "seed0" / "lora-r1" / "resolved_config.yaml").read_text())
    assert resolved["quantization"] == "nf4"
