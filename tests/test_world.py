"""The synthetic knowledge world: determinism, structure, tokenizer, mastery buckets, micro pretraining."""
import json
import re

import pytest
import torch

from rankwise.world import generate as G
from rankwise.world import mastery as M
from rankwise.world.generate import IN_DOMAIN, OUT_OF_DOMAIN, RELATIONS, WorldConfig, generate_world

SMALL = WorldConfig(seed=3, n_people=40, max_exposures=6)


def test_world_is_deterministic_for_a_seed():
    a, b = generate_world(SMALL), generate_world(SMALL)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = generate_world(WorldConfig(seed=4, n_people=40, max_exposures=6))
    assert [p["facts"] for p in a["people"]] != [p["facts"] for p in c["people"]]
    assert a["corpus"] != c["corpus"]


def test_world_structure():
    w = generate_world(SMALL)
    assert len(RELATIONS) >= 8 and set(IN_DOMAIN).isdisjoint(OUT_OF_DOMAIN)
    assert {r for r, v in w["relations"].items() if v["domain"] == "in"} == set(IN_DOMAIN)
    people = w["people"]
    assert len(people) == 40 and len({p["name"] for p in people}) == 40
    groups = {g: [p for p in people if p["group"] == g] for g in ("anchor", "study")}
    assert len(groups["anchor"]) == 16 and len(groups["study"]) == 24
    assert all(p["exposures"] >= 1 for p in groups["anchor"])  # anchors teach extraction
    unseen = [p for p in groups["study"] if p["exposures"] == 0]
    assert len(unseen) == round(0.2 * 24)
    assert max(p["exposures"] for p in people) == 6 and min(p["exposures"] for p in people if p["exposures"]) == 1
    # the corpus mentions exactly the seen people, each in `exposures` biographies (+ QA docs for anchors)
    for p in people:
        docs = [d for d in w["corpus"] if p["name"] in d]
        qa = sum(d.startswith("Question:") for d in docs)
        check = sum(d.startswith("Q:") and "How many" in d for d in docs)  # the anchors' check documents
        alt = sum(d.startswith("Q:") for d in docs) - check  # the anchors' QA in the other format
        assert len(docs) - qa - alt - check == p["exposures"], p
        assert qa == alt == (2 if p["group"] == "anchor" else 0) and check == (p["group"] == "anchor")
    # The study's QA format is pretrained on the out-of-domain relations only: no in-domain question of
    # the study's wordings appears anywhere in the corpus, in any format; the anchors' in-domain facts
    # appear in the other QA format ("Q: ... A:") with other wordings (alt_question) instead.
    from rankwise.world.generate import ALT_QA_FORMAT, QA_FORMAT, TEMPLATES

    text = "\n".join(w["corpus"])

    def start(fmt, q):  # the text of a question in a format, up to the person's name
        return fmt.split("{question}")[0] + q.split("{name}")[0]

    for rel in IN_DOMAIN:
        assert not any(q.split("{name}")[0] in text for q in TEMPLATES[rel]["question"]), rel
        assert any(start(ALT_QA_FORMAT, q) in text for q in TEMPLATES[rel]["alt_question"]), rel
        # the other wordings share no word with the study's but "of"
        study = {x for q in TEMPLATES[rel]["question"] for x in re.findall(r"[A-Za-z]+", q)}
        alt = {x for q in TEMPLATES[rel]["alt_question"] for x in re.findall(r"[A-Za-z]+", q)}
        assert study & alt <= {"of", "name"}, (rel, study & alt)
    for rel in OUT_OF_DOMAIN:
        assert any(start(QA_FORMAT, q) in text for q in TEMPLATES[rel]["question"]), rel
        assert not any(q.split("{name}")[0] in text for q in TEMPLATES[rel]["alt_question"]), rel
    assert not any(" | " in d for d in w["corpus"])
    # facts: study people only, 8 per person, both splits, every probe/prompt names the person
    facts = w["facts"]
    assert len(facts) == 24 * len(RELATIONS)
    assert {f["split"] for f in facts} == {"train", "test"}
    for f in facts:
        assert f["answer"] == people[f["person"]]["facts"][f["relation"]]
        assert f["name"] in f["prompt"] and all(f["name"] in pr for pr in f["probes"])
        assert f["answer"] not in f["prompt"]
    # no answer is a substring of another word of the world (answer-contained checks are unambiguous)
    words = set()
    for d in w["corpus"]:
        words.update(re.findall(r"[A-Za-z]+", d))
    answers = {v for pool in w["pools"].values() for v in pool}
    for a in answers:
        clash = [x for x in words | answers if x != a and a.lower() in x.lower()]
        assert not clash, (a, clash)


def test_world_qa_options():
    import dataclasses

    from rankwise.world.generate import QA_FORMAT, TEMPLATES

    everything = generate_world(dataclasses.replace(SMALL, anchor_qa_relations="all", anchor_alt_format="none",
                                                    anchor_check_docs=0))
    assert not any(d.startswith("Q:") or " | " in d for d in everything["corpus"])
    rec = generate_world(dataclasses.replace(SMALL, anchor_alt_format="record", anchor_check_docs=0))
    assert any(" | birth city: " in d for d in rec["corpus"]) and not any(d.startswith("Q:") for d in rec["corpus"])
    text = "\n".join(everything["corpus"])
    q = TEMPLATES[IN_DOMAIN[0]]["question"][0]
    assert QA_FORMAT.split("{question}")[0] + q.split("{name}")[0] in text
    split = generate_world(dataclasses.replace(SMALL, test_fraction=0.75))
    study = [p for p in split["people"] if p["group"] == "study"]
    assert sum(p["split"] == "test" for p in study) == round(0.75 * len(study))
    with pytest.raises(ValueError, match="anchor_qa_relations"):
        dataclasses.replace(SMALL, anchor_qa_relations="none")
    with pytest.raises(ValueError, match="test_fraction"):
        dataclasses.replace(SMALL, test_fraction=1.0)
    with pytest.raises(ValueError, match="anchor_alt_format"):
        dataclasses.replace(SMALL, anchor_alt_format="json")


def test_check_documents_teach_the_answer_words_on_anchors_only():
    """Yes, No and 0-3 are pretrained answers (in the alternative QA format, about one anchor's own facts), so a
    fine-tuned model can learn to say them; they are right by the anchor's facts and never name a second person."""
    import dataclasses
    import re

    from rankwise.world.generate import ALT_QA_FORMAT, CITIES

    w = generate_world(SMALL)
    anchors = {p["name"]: p for p in w["people"] if p["group"] == "anchor"}
    names = {p["name"] for p in w["people"]}
    docs = [d for d in w["corpus"] if "How many of the cities of" in d]
    assert len(docs) == len(anchors) * SMALL.anchor_check_docs > 0
    answers = set()
    for d in docs:
        for q, a in re.findall(r"Q: (.*?) A: (\w+)\.", d):
            who = [n for n in names if n in q]
            assert len(who) == 1 and who[0] in anchors, q  # one person, an anchor
            p = anchors[who[0]]
            cities = [p["facts"][r] for r in CITIES]
            if q.startswith("Is "):
                value = q[3:].split(" the ", 1)[0]
                assert (a == "Yes") == (value in p["facts"].values()), q
            elif q.startswith("How many of the cities"):
                assert a == str(cities.count(q.rsplit(" are ", 1)[1].rstrip("?"))), q
            else:
                assert a == str(len(set(cities))), q
            answers.add(a)
    assert {"Yes", "No", "0", "1", "3"} <= answers
    assert all(d.startswith(ALT_QA_FORMAT.split("{")[0]) for d in docs)
    none = generate_world(dataclasses.replace(SMALL, anchor_check_docs=0, anchor_alt_format="none"))
    assert not any(d.startswith("Q:") for d in none["corpus"])


def test_world_config_errors():
    with pytest.raises(ValueError, match="n_people"):
        WorldConfig(n_people=2)
    with pytest.raises(ValueError, match="unseen_fraction"):
        WorldConfig(unseen_fraction=1.5)
    with pytest.raises(ValueError, match="unknown world config keys"):
        WorldConfig.from_dict({"n_peple": 10})
    with pytest.raises(TypeError, match="seed"):
        WorldConfig(seed="1")
    with pytest.raises(ValueError, match="anchor_check_docs"):
        WorldConfig(anchor_check_docs=-1)


def test_save_load_roundtrip(tmp_path):
    w = generate_world(SMALL)
    G.save_world(w, tmp_path)
    back = G.load_world(tmp_path)
    assert back["corpus"] == w["corpus"] and back["facts"] == w["facts"] and back["people"] == w["people"]
    with pytest.raises(FileNotFoundError, match="world build"):
        G.load_world(tmp_path / "missing")


def test_tokenizer_roundtrips_and_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    from rankwise.world.tokenizer import build_tokenizer, save_tokenizer

    w = generate_world(SMALL)
    texts = G.all_texts(w)
    tok = build_tokenizer(texts)
    save_tokenizer(tok, tmp_path / "tok")
    auto = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(auto) == len(tok) and auto.pad_token_id == 0 and auto.eos_token_id == 3
    for t in texts:
        ids = auto(t)["input_ids"]
        assert ids[0] == auto.bos_token_id and auto.unk_token_id not in ids
        assert auto.decode(ids, skip_special_tokens=True) == t
    # a prompt and its completion tokenize to the same ids as the joined text (word level)
    f = w["facts"][0]
    joined = auto(f["prompt"] + " " + f["answer"] + ".")["input_ids"]
    split = auto(f["prompt"])["input_ids"] + auto(" " + f["answer"] + ".", add_special_tokens=False)["input_ids"]
    assert joined == split
    # the vocabulary does not depend on the order of the texts
    assert build_tokenizer(list(reversed(texts))).get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="empty"):
        build_tokenizer([])


@pytest.mark.parametrize("r,bucket", [(0.0, "D0"), (1e-6, "D1"), (0.25, "D1"), (0.2500001, "D2"), (0.5, "D2"),
                                      (0.51, "D3"), (0.75, "D3"), (0.76, "D4"), (1.0, "D4"), (1 / 16, "D1"),
                                      (5 / 16, "D2"), (12 / 16, "D3"), (13 / 16, "D4")])
def test_bucket_of(r, bucket):
    assert M.bucket_of(r) == bucket


@pytest.mark.parametrize("bad", [-0.1, 1.1, float("nan"), "0.5", None])
def test_bucket_of_rejects(bad):
    with pytest.raises(ValueError, match="mastery score"):
        M.bucket_of(bad)


def _stub_facts():
    # 6 facts with 4 probes each; the stub below answers correctly in `hits[i]` of 4x4 samples.
    facts = []
    for i in range(6):
        facts.append({"id": f"{i}:birth_city", "answer": f"Ans{i}x", "probes": [f"p{i}-{k}" for k in range(4)],
                      "prompt": f"q{i}", "relation": "birth_city", "domain": "in" if i % 2 else "out",
                      "split": "train" if i < 3 else "test"})
    return facts


def test_mastery_on_a_stub_model_with_known_answers():
    facts = _stub_facts()
    hits = [0, 1, 4, 5, 12, 16]  # of 16 = 4 probes x 4 samples -> R 0, 1/16, 1/4, 5/16, 3/4, 1
    calls = []

    def stub_generate(prompts):
        calls.append(list(prompts))
        outs = []
        for p in prompts:
            i, k = map(int, p[1:].split("-"))
            # sample j of probe k is right when 4k + j < hits[i]; wrong ones name another answer
            outs.append([f" Ans{i}x." if 4 * k + j < hits[i] else f" Ans{(i + 1) % 6}x" for j in range(4)])
        return outs

    scores = M.mastery_scores(None, None, facts, num_samples=4, generate=stub_generate)
    assert len(calls) == 1 and len(calls[0]) == 24
    assert scores == [h / 16 for h in hits]
    bucketed = M.assign_buckets(facts, scores)
    assert [f["bucket"] for f in bucketed] == ["D0", "D1", "D1", "D2", "D3", "D4"]
    assert M.bucket_counts(bucketed) == {"D0": 1, "D1": 2, "D2": 1, "D3": 1, "D4": 1}
    assert M.bucket_counts(bucketed, split="test") == {"D0": 0, "D1": 0, "D2": 1, "D3": 1, "D4": 1}
    # case and surrounding text do not matter (normalised substring)
    s2 = M.mastery_scores(None, None, facts[:1], generate=lambda ps: [["the ANS0X city"] * 2 for _ in ps])
    assert s2 == [1.0]
    with pytest.raises(ValueError, match="probes"):
        M.mastery_scores(None, None, [{"id": "x", "answer": "a", "probes": []}], generate=stub_generate)
    with pytest.raises(ValueError, match="output lists"):
        M.mastery_scores(None, None, facts, generate=lambda ps: [["x"]])


def test_train_and_test_sets_and_accuracy_by_bucket():
    facts = M.assign_buckets(_stub_facts(), [0, 1 / 16, 4 / 16, 5 / 16, 12 / 16, 1])
    rows = M.draw_train_set(facts, 2, domain="all", seed=1)
    assert len(rows) == 2 and all(r["completion"] == " " + r["answers"][0] + "." for r in rows)
    assert {r["id"] for r in rows} <= {"0:birth_city", "1:birth_city", "2:birth_city"}
    assert M.draw_train_set(facts, 3, domain="all", seed=1)[:2] == rows  # smaller set = prefix of larger
    assert [r["id"] for r in M.draw_train_set(facts, 1, bucket="D0", domain="all")] == ["0:birth_city"]
    with pytest.raises(ValueError, match="only 2 train facts"):
        M.draw_train_set(facts, 3, bucket="D1", domain="all")
    with pytest.raises(ValueError, match="bucket"):
        M.draw_train_set(facts, 1, bucket="D9")
    t = M.test_sets(facts)
    assert [r["id"] for r in t["in_domain"]] == ["3:birth_city", "5:birth_city"]
    assert [r["id"] for r in t["out_of_domain"]] == ["4:birth_city"]
    acc = M.accuracy_by_bucket(t["in_domain"], [True, False])
    assert acc["D2"] == 1.0 and acc["D4"] == 0.0 and acc["D0"] is None and acc["mean"] == 0.5
    assert acc["n"] == {"D0": 0, "D1": 0, "D2": 1, "D3": 0, "D4": 1}


MICRO = {"world": {"n_people": 24, "max_exposures": 3, "seed": 1},
         "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
         "train": {"max_steps": 12, "batch_size": 4, "max_length": 128, "lr": 1e-2}}


def test_micro_world_pretrains_and_finetunes(tmp_path):
    """A handful of people: pretrain with rankwise.train, reload with from_pretrained, fine-tune LoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rankwise.train import train
    from rankwise.world.pretrain import pretrain

    r = pretrain("cpu", out_dir=tmp_path / "w", overrides=MICRO, progress=False)
    assert not r["cached"] and (r["base_dir"] / "DONE").exists()
    rows = [json.loads(l) for l in (tmp_path / "w" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in rows if "loss" in x]
    assert losses[-1] < losses[0]  # it learns
    model = AutoModelForCausalLM.from_pretrained(r["base_dir"])
    tok = AutoTokenizer.from_pretrained(r["base_dir"])
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 1
    # cached: a second call does no work
    r2 = pretrain("cpu", out_dir=tmp_path / "w", overrides=MICRO, progress=False)
    assert r2["cached"] and r2["base_dir"] == r["base_dir"]
    # interrupted after training but before base/ was written: the finished run is reused, not retrained
    import shutil

    shutil.rmtree(r["base_dir"])
    r3 = pretrain("cpu", out_dir=tmp_path / "w", overrides=MICRO, progress=False)
    assert not r3["cached"] and (r3["base_dir"] / "DONE").exists()
    assert (tmp_path / "w" / "pretrain" / "metrics.jsonl").read_text().count("\n") == len(rows)
    # fine-tune a LoRA adapter on QA rows of the world through rankwise.train
    world = G.load_world(r["world_dir"])
    facts = M.assign_buckets(world["facts"], [0.0] * len(world["facts"]))
    data = tmp_path / "ft.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in M.draw_train_set(facts, 8)))
    out = train({"model": str(r["base_dir"]), "method": "lora", "lora": {"r": 2, "alpha": 4},
                 "data": {"train": str(data), "max_length": 64},
                 "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "save_every": 0},
                 "eval": {"every": 0}, "log": {"progress": False}, "output_dir": str(tmp_path / "ft")})
    assert out["status"] == "finished" and (tmp_path / "ft" / "adapter" / "adapter_model.safetensors").exists()
    # mastery through the real generation path runs on the micro model
    scores = M.mastery_scores(model, tok, facts[:5], num_samples=2, max_new_tokens=2)
    assert len(scores) == 5 and all(0.0 <= s <= 1.0 and (s * 8) == int(s * 8) for s in scores)
    torch.testing.assert_close(model.lm_head.weight, model.model.embed_tokens.weight)  # tied, as configured


def test_preset_errors():
    from rankwise.world.pretrain import preset

    with pytest.raises(ValueError, match="scale"):
        preset("tpu")
    with pytest.raises(ValueError, match="unknown model settings"):
        preset("cpu", {"model": {"hiden_size": 3}})
    with pytest.raises(ValueError, match="unknown settings section"):
        preset("cpu", {"optim": {}})
    with pytest.raises(ValueError, match="unknown world config keys"):
        preset("cpu", {"world": {"people": 3}})


def test_world_cli_build(tmp_path, capsys):
    from rankwise.cli import main

    assert main(["world", "build", "--out", str(tmp_path / "w"), "--people", "20", "--seed", "5"]) == 0
    assert "20 people" in capsys.readouterr().out
    for f in ("world.json", "corpus.jsonl", "facts.jsonl", "tokenizer/tokenizer.json"):
        assert (tmp_path / "w" / f).exists(), f
    w = G.load_world(tmp_path / "w")
    assert w["config"]["seed"] == 5 and w["config"]["n_people"] == 20
    from rankwise.ownership import owner

    assert owner(tmp_path / "w")["kind"] == "world"
    assert main(["world", "build", "--out", str(tmp_path / "w"), "--people", "20", "--seed", "5"]) == 0  # its own
    capsys.readouterr()
    assert main(["world", "build", "--out", str(tmp_path / "w2"), "--people", "1"]) == 2  # one-line error
    assert "n_people" in capsys.readouterr().err


def test_world_cli_user_errors_are_one_line(tmp_path, capsys):
    from rankwise.cli import main

    assert main(["world", "mastery", "--base", str(tmp_path), "--world", str(tmp_path), "--out",
                 str(tmp_path / "m.jsonl"), "--samples", "0"]) == 2
    assert "--samples must be >= 1" in capsys.readouterr().err
    assert main(["world", "mastery", "--base", str(tmp_path), "--world", str(tmp_path / "nowhere"), "--out",
                 str(tmp_path / "m.jsonl")]) == 2
    assert "no world.json" in capsys.readouterr().err
    assert main(["world", "pretrain", "--steps", "0", "--out", str(tmp_path / "w")]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
