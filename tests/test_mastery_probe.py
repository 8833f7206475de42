"""``rankwise mastery`` and the studies' data readers: EntityQuestions in its published schema, templates, levels,
the probe's chunks and seeds, resuming, the backends, and the command's refusals (one line, nothing written)."""
import json
import sys
import types

import pytest
from test_data import build_tiny_llama

from rankwise import mastery as M
from rankwise.cli import main as cli
from rankwise.errors import ConfigError
from rankwise.study_data import (IN_DOMAIN, OUT_OF_DOMAIN, QUESTION_TEMPLATES, load_facts, read_entity_questions,
                                 read_templates)

pytestmark = pytest.mark.usefixtures("one_thread")


def eq_dataset(root):
    """A few rows of EntityQuestions as the dataset ships them: dataset/<split>/P<id>.<split>.json (a JSON list)
    or .jsonl, rows {question, answers}."""
    test, dev = root / "dataset" / "test", root / "dataset" / "dev"
    test.mkdir(parents=True)
    dev.mkdir(parents=True)
    (test / "P19.test.json").write_text(json.dumps([
        {"question": "Where was Michael Jack born?", "answers": ["Folkestone"]},
        {"question": "Where was Lucie, Lady Duff-Gordon born?", "answers": ["London", "City of London"]},
        {"question": "Where was Ali born?", "answers": ["Issy-les-Moulineaux"]}], indent=4))
    (test / "P40.test.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"question": "Who is Emperor Go-Daigo's child?", "answers": ["Emperor Go-Murakami"]},
        {"question": "Who is Ann's child?", "answers": ["Bo"]}]) + "\n")
    (test / "P20.test.jsonl").write_text(json.dumps({"question": "Where did Ida Ray die?", "answers": ["Rome"]}) + "\n")
    (dev / "P19.dev.json").write_text(json.dumps([{"question": "Where was Ed Ho born?", "answers": ["Oslo"]}]))
    return root / "dataset"


def test_entity_questions_are_read_in_their_published_schema(tmp_path):
    root = eq_dataset(tmp_path)
    facts = read_entity_questions(root, split="test")
    assert [(f["relation"], f["subject"]) for f in facts] == [
        ("P19", "Michael Jack"), ("P19", "Lucie, Lady Duff-Gordon"), ("P19", "Ali"), ("P20", "Ida Ray"),
        ("P40", "Emperor Go-Daigo"), ("P40", "Ann")]
    assert facts[1]["answers"] == ["London", "City of London"] and facts[0]["id"] == "P19.test.0"
    assert len(read_entity_questions(root)) == 7 and len(read_entity_questions(root, relations=["P40"])) == 2
    assert len(IN_DOMAIN) == 10 and len(OUT_OF_DOMAIN) == 14 and set(IN_DOMAIN) | set(OUT_OF_DOMAIN) == set(
        QUESTION_TEMPLATES)
    assert load_facts(root / "test" / "P20.test.jsonl")[0]["subject"] == "Ida Ray"  # auto: by the file name


@pytest.mark.parametrize("row, words", [
    ({"question": "Who was born in Michael Jack?", "answers": ["x"]}, "does not fit P19's template"),
    ({"question": "Where was Ed born?", "answers": []}, "needs 'answers'"),
    ({"question": "Where was Ed born?"}, "needs 'answers'"),
    (["not", "a", "row"], "does not fit")])
def test_a_row_that_does_not_fit_is_one_line_naming_it(tmp_path, row, words):
    d = tmp_path / "d"
    d.mkdir()
    (d / "P19.test.json").write_text(json.dumps([{"question": "Where was A born?", "answers": ["B"]}, row]))
    with pytest.raises(ConfigError, match=words) as e:
        read_entity_questions(d)
    assert "P19.test.json row 1" in str(e.value) and "\n" not in str(e.value)


def test_other_refusals_of_the_readers(tmp_path):
    with pytest.raises(ConfigError, match="no EntityQuestions files"):
        read_entity_questions(tmp_path)
    (tmp_path / "P999.test.json").write_text("[]")
    with pytest.raises(ConfigError, match="not one of EntityQuestions'"):
        read_entity_questions(tmp_path)
    (tmp_path / "facts.jsonl").write_text('{"subject": "A", "relation": "born", "answers": ["B"]}\n{"subject": ""}\n')
    with pytest.raises(ConfigError, match="facts.jsonl row 1: needs 'subject'"):
        load_facts(tmp_path / "facts.jsonl")
    (tmp_path / "t.json").write_text('{"P19": ["[X] was born in", "born in"]}')
    with pytest.raises(ConfigError, match="must hold \\[X\\]"):
        read_templates(tmp_path / "t.json")
    (tmp_path / "t.jsonl").write_text('{"relation": "P19", "template": "{subject} was born in"}\n')
    assert read_templates(tmp_path / "t.jsonl") == {"P19": ["[X] was born in"]}


def test_levels_follow_the_studys_buckets():
    cases = {0.0: 0, 1e-9: 1, 0.25: 1, 0.2500001: 2, 0.5: 2, 0.51: 3, 0.75: 3, 0.76: 4, 1.0: 4}
    assert {r: M.level_of(r) for r in cases} == cases
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError):
            M.level_of(bad)


# ----------------------------------------------------------------------------- the probe


FACTS = [{"id": str(i), "relation": "born" if i % 2 else "died", "subject": f"S{i}", "answers": [f"C{i}", f"alias{i}"]}
         for i in range(75)]
TEMPLATES = {"born": ["[X] was born in", "The birthplace of [X] is"], "died": ["[X] died in"]}


class Sampler:
    """Stands in for generation: sample j of a prompt answers right when (seed + j + the subject's number) % 3 is 0,
    via the alias for even j; it can be told to fail at a call, like a run cut off."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, prompts, seed):
        self.calls.append((len(prompts), seed))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        out = []
        for p in prompts:
            i = int(p.split("S")[1].split()[0])
            out.append([(f"in alias{i} town" if j % 2 == 0 else f"C{i}.") if (seed + j + i) % 3 == 0 else "Nowhere"
                        for j in range(2)])
        return out


def expected(seed):
    rows = []
    for c in range(0, len(FACTS), M.CHUNK):
        s = M.chunk_seed(seed, c // M.CHUNK)
        for f in FACTS[c:c + M.CHUNK]:
            i, k = int(f["id"]), len(TEMPLATES[f["relation"]])
            hits = k * sum((s + j + i) % 3 == 0 for j in range(2))
            rows.append((f["id"], hits / (2 * k)))
    return rows


def test_the_probe_scores_every_fact_chunk_by_chunk_and_resumes_where_it_stopped(tmp_path):
    settings = {"x": 1}
    full = M.run_probe(FACTS, TEMPLATES, Sampler(), tmp_path / "a.partial", settings, seed=5, progress=False)
    assert [(r["id"], r["R"]) for r in full] == expected(5)
    assert all(r["level"] == M.level_of(r["R"]) and r["samples"] == 2 * len(TEMPLATES[r["relation"]]) for r in full)
    assert any(r["R"] > 0 for r in full) and any(r["R"] == 0 for r in full)
    cut = Sampler(fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        M.run_probe(FACTS, TEMPLATES, cut, tmp_path / "b.partial", settings, seed=5, progress=False)
    lines = (tmp_path / "b.partial").read_text().splitlines()
    assert len(lines) == 1 + 2 * M.CHUNK
    with open(tmp_path / "b.partial", "a") as f:
        f.write('{"id": "64", "rel')  # a line cut off mid-write
    again = Sampler()
    resumed = M.run_probe(FACTS, TEMPLATES, again, tmp_path / "b.partial", settings, seed=5, progress=False)
    assert resumed == full  # the finished chunks kept, the rest sampled with their own seeds
    assert again.calls == [(sum(len(TEMPLATES[f["relation"]]) for f in FACTS[64:]), M.chunk_seed(5, 2))]
    done = Sampler()  # stopped after the last chunk was saved, before --out was written: nothing samples again
    assert M.run_probe(FACTS, TEMPLATES, done, tmp_path / "b.partial", settings, seed=5, progress=False) == full
    assert done.calls == []
    with pytest.raises(ConfigError, match="other settings \\(x\\)"):
        M.run_probe(FACTS, TEMPLATES, Sampler(), tmp_path / "b.partial", {"x": 2}, seed=5, progress=False)
    assert M.run_probe(FACTS, TEMPLATES, Sampler(), tmp_path / "b.partial", {"x": 2}, seed=5, force=True,
                       progress=False) == full


def test_the_vllm_backend_asks_for_the_same_samples(monkeypatch):
    made = {}

    class LLM:
        def __init__(self, **kw):
            made["llm"] = kw

        def generate(self, prompts, params, use_tqdm=False):
            made["params"] = params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"{p}#{k}") for k in range(sp.n)])
                    for p, sp in zip(prompts, params)]

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    sample = M.vllm_sampler("m", samples=3, temperature=0.7, max_new_tokens=32, dtype="bfloat16", seed=1)
    assert sample(["a", "b"], 40) == [["a#0", "a#1", "a#2"], ["b#0", "b#1", "b#2"]]
    assert made["llm"] == {"model": "m", "dtype": "bfloat16", "seed": 1}
    assert [(p.n, p.temperature, p.max_tokens, p.seed) for p in made["params"]] == [(3, 0.7, 32, 40), (3, 0.7, 32, 41)]
    M.vllm_sampler("m", samples=3, temperature=0.7, max_new_tokens=32, dtype="bf16", seed=1)
    assert made["llm"]["dtype"] == "bfloat16"  # rankwise's dtype names, as vLLM spells them
    M.vllm_sampler("m", samples=3, temperature=0.7, max_new_tokens=32, dtype="auto", seed=1)
    assert made["llm"]["dtype"] == "auto"


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("mastery") / "model")


def test_the_command_probes_a_model_on_entity_questions(model_dir, tmp_path, capsys):
    data = eq_dataset(tmp_path)
    (tmp_path / "t.json").write_text(json.dumps({"P19": ["[X] was born in", "[X] is from"],
                                                 "P20": ["[X] died in"], "P40": ["The child of [X] is"]}))
    out = tmp_path / "out" / "mastery.jsonl"
    args = ["mastery", "--model", model_dir, "--data", str(data), "--templates", str(tmp_path / "t.json"),
            "--out", str(out), "--split", "test", "--samples", "2", "--max-new-tokens", "4"]
    assert cli(args) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["subject"] for r in rows][:2] == ["Michael Jack", "Lucie, Lady Duff-Gordon"] and len(rows) == 6
    assert [r["samples"] for r in rows] == [4, 4, 4, 2, 2, 2]
    assert all(r["level"] == M.level_of(r["R"]) for r in rows)
    assert not (tmp_path / "out" / "mastery.jsonl.partial").exists()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["facts"] == 6
    assert cli(args) == 2 and "exists; pass --force" in capsys.readouterr().err
    assert cli(args + ["--force"]) == 0
    assert [json.loads(x) for x in out.read_text().splitlines()] == rows  # seeded: the same samples


@pytest.mark.parametrize("extra, words", [
    (["--relations", "P26"], "no EntityQuestions files"),
    (["--templates-missing"], "no templates for the relations P40"),
    (["--backend", "vllm"], "--backend vllm needs vLLM"),
    (["--samples", "0"], "--samples must be >= 1")])
def test_the_command_refuses_in_one_line_and_writes_nothing(model_dir, tmp_path, capsys, monkeypatch, extra, words):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    data = eq_dataset(tmp_path)
    (tmp_path / "t.json").write_text(json.dumps({"P19": ["[X] was born in"], "P20": ["[X] died in"]}
                                                if "--templates-missing" in extra else
                                                {"P19": ["[X] was born in"], "P20": ["[X] died in"], "P40": ["[X]"]}))
    extra = [x for x in extra if x != "--templates-missing"]
    out = tmp_path / "o" / "m.jsonl"
    rc = cli(["mastery", "--model", model_dir, "--data", str(data), "--templates", str(tmp_path / "t.json"),
              "--out", str(out)] + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
