"""Reasoning questions over the world: determinism, right answers, new wordings, disjoint splits, scoring."""
import json
import random
import re
import time

import pytest

from rankwise.world import reasoning as R
from rankwise.world.generate import (ALT_QA_FORMAT, QA_FORMAT, RECORD_FORMAT, RECORD_LABELS, TEMPLATES, WorldConfig,
                                     all_texts, generate_world)
from rankwise.world.pretrain import preset

SMALL = WorldConfig(seed=3, n_people=40, max_exposures=6)


@pytest.fixture(scope="module")
def world():
    """The demo's world: the cpu preset's."""
    return generate_world(WorldConfig.from_dict(preset("cpu")["world"]))


@pytest.fixture(scope="module")
def groups(world):
    """(in-domain people, held-out people): the seen people outside and inside the test split."""
    seen = [p for p in world["people"] if p["exposures"] > 0]
    return [p for p in seen if p["split"] != "test"], [p for p in seen if p["split"] == "test"]


@pytest.fixture(scope="module")
def items(world, groups):
    inside, held = groups
    return R.reasoning_items(world, inside) + R.reasoning_items(world, held)


def dump(items):
    return json.dumps(items, sort_keys=True)


def test_items_are_deterministic():
    w = generate_world(SMALL)
    people = [p for p in w["people"] if p["exposures"] > 0]
    a = R.reasoning_items(w, people, seed=5, n_per_composition=4)
    assert dump(a) == dump(R.reasoning_items(generate_world(SMALL), people, seed=5, n_per_composition=4))
    assert dump(a) != dump(R.reasoning_items(w, people, seed=6, n_per_composition=4))
    # the order of the people and the other kinds asked for do not matter
    shuffled = list(people)
    random.Random(0).shuffle(shuffled)
    assert dump(a) == dump(R.reasoning_items(w, [p["id"] for p in shuffled], seed=5, n_per_composition=4))
    only = R.reasoning_items(w, people, kinds=("arith",), seed=5, n_per_composition=4)
    assert dump(only) == dump([it for it in a if it["kind"] == "arith"])
    # the controls are the same questions
    ctrl = R.reasoning_items(w, people, seed=5, n_per_composition=4, cot=False)
    assert [c["id"] for c in ctrl] == [it["id"] for it in a] and not any(c["cot"] for c in ctrl)
    assert all(c["prompt"] == it["prompt"] + " Answer:" and c["completion"] == f" {it['answer']}."
               for c, it in zip(ctrl, a))


def _expected(world, item):
    """The answer of an item, recomputed from the world's people alone."""
    facts = {p["id"]: p["facts"] for p in world["people"]}
    r2, r1 = item["composition"].split(".")
    x, *cands = item["people"]
    hits = [facts[c][r2] == facts[x][r1] for c in cands]
    if item["kind"] == "compose":
        assert hits.count(True) == 1, item["id"]
        return world["people"][cands[hits.index(True)]]["name"]
    if item["kind"] == "compare":
        return "Yes" if hits[0] else "No"
    return str(sum(hits))


def test_every_answer_follows_from_the_world(world, items):
    people = {p["id"]: p for p in world["people"]}
    n_cands = {"compose": 2, "compare": 1, "arith": 3}
    for it in items:
        r2, r1 = it["composition"].split(".")
        assert world["relations"][r1]["pool"] == world["relations"][r2]["pool"], it["composition"]
        assert it["answer"] == _expected(world, it) and it["answer"] in it["answers"] and it["answer"] in it["choices"]
        x, *cands = it["people"]
        assert len(cands) == n_cands[it["kind"]] and len(set(it["people"])) == len(it["people"])
        assert it["facts"] == [[x, r1]] + [[c, r2] for c in cands]
        assert it["prompt"].startswith("Puzzle: ") and all(people[p]["name"] in it["prompt"] for p in it["people"])
        # the chain states every fact (in its biography sentence), then the answer
        for p, r in it["facts"]:
            sentence = TEMPLATES[r]["bio"][0].format(name=people[p]["name"], v=people[p]["facts"][r])
            assert sentence in it["completion"], (it["id"], sentence)
        assert it["completion"].endswith(f" Answer: {it['answer']}.") and it["cot"]
    assert {it["kind"] for it in items} == set(R.BRIDGE_KINDS)
    assert {it["composition"] for it in items} == set(R.world_compositions(world))
    # the answers are balanced
    for kind, values in (("compare", ["Yes", "No"]), ("arith", ["0", "1", "2", "3"])):
        counts = [sum(it["answer"] == v for it in items if it["kind"] == kind) for v in values]
        assert min(counts) == max(counts) > 0, (kind, counts)
    assert sum(it["answer"] == world["people"][it["people"][1]]["name"] for it in items
               if it["kind"] == "compose") not in (0, sum(it["kind"] == "compose" for it in items))


def _pretraining_patterns():
    """Regexes of every pretraining sentence, probe, question and QA/record format, a name being any two
    words and a value any word."""
    def rx(template):
        out = re.escape(template)
        for slot, pat in (("name", r"\w+ \w+"), ("v", r"\w+")):
            out = out.replace(re.escape("{" + slot + "}"), pat)
        return out

    pats = [rx(t) for rel in TEMPLATES.values() for kind in rel.values() for t in kind]
    for fmt, kind in ((QA_FORMAT, "question"), (ALT_QA_FORMAT, "alt_question")):
        head, tail = fmt.split("{question}")
        pats += [re.escape(head) + rx(q) + re.escape(tail) for rel in TEMPLATES.values() for q in rel[kind]]
        pats.append("^" + re.escape(head.strip()))
    pats += [rx(RECORD_FORMAT.replace("{label}", label)) for label in RECORD_LABELS.values()]
    return [re.compile(p, re.IGNORECASE) for p in pats]


def test_no_prompt_matches_a_pretraining_template(items):
    pats = _pretraining_patterns()
    planted = ["Puzzle: Where was Ab Cd born?", "Puzzle: is Ab Cd speaks", "Q: Trade of Ab Cd? A:",
               "Ab Cd | birth city:", "Question: anything"]
    assert all(any(p.search(t) for p in pats) for t in planted)  # the check sees a template when there is one
    for it in items + [R.without_chain(it) for it in items]:
        hit = [p.pattern for p in pats if p.search(it["prompt"])]
        assert not hit, (it["prompt"], hit)
    # the questions are new wordings: none of them is a question template of the world
    questions = {q.split("{name}")[0].strip().lower() for rel in TEMPLATES.values()
                 for q in rel["question"] + rel["alt_question"]}
    assert not any(it["prompt"][len("Puzzle: "):].lower().startswith(q) for it in items for q in questions)


def test_splits_are_disjoint_and_large_enough_on_the_demo_world(world, groups):
    inside, held = groups
    t0 = time.time()
    items = R.reasoning_items(world, inside) + R.reasoning_items(world, held)
    controls = [R.without_chain(it) for it in items]
    sets = R.split_reasoning(items + controls, held)
    assert time.time() - t0 < 5.0
    held_ids = {p["id"] for p in held}
    sizes = {k: len(v) // 2 for k, v in sets.items() if k != "dropped"}  # each question twice: chain, control
    assert sizes["train"] >= 300 and sizes["test"] >= 60 and min(sizes[k] for k in R.SPLITS[2:]) >= 60, sizes
    owners = {}
    for name in R.SPLITS:
        for it in sets[name]:
            assert owners.setdefault(it["id"], name) == name, it["id"]
            assert owners.setdefault(it["prompt"].removesuffix(" Answer:"), name) == name
        ids = [it["id"] for it in sets[name]]
        assert sorted(ids) == sorted(2 * sorted(set(ids)))  # every question with its control
    for it in sets["train"] + sets["test"]:
        assert not set(it["people"]) & held_ids and it["composition"] not in R.HELD_OUT_COMPOSITIONS
        assert it["kind"] != R.HELD_OUT_KIND
    assert all(set(it["people"]) <= held_ids and it["composition"] not in R.HELD_OUT_COMPOSITIONS
               and it["kind"] != R.HELD_OUT_KIND for it in sets["ood_people"])
    assert all(not set(it["people"]) & held_ids and it["composition"] in R.HELD_OUT_COMPOSITIONS
               and it["kind"] != R.HELD_OUT_KIND for it in sets["ood_composition"])
    assert all(not set(it["people"]) & held_ids and it["composition"] not in R.HELD_OUT_COMPOSITIONS
               and it["kind"] == R.HELD_OUT_KIND for it in sets["ood_kind"])
    # in-domain test: every trained (kind, composition) is tested
    assert {(it["kind"], it["composition"]) for it in sets["test"]} == \
        {(it["kind"], it["composition"]) for it in sets["train"]}
    # the same split for the same seed; the facts the gate must check cover every set
    assert dump(R.split_reasoning(items + controls, held)) == dump(sets)
    used = set(R.facts_used(items))
    assert all((p, r) in used for name in R.SPLITS for it in sets[name] for p, r in it["facts"])


def test_split_drops_mixed_and_doubly_held_out_items():
    w = generate_world(SMALL)
    people = [p["id"] for p in w["people"] if p["exposures"] > 0]
    items = R.reasoning_items(w, people, n_per_composition=3)
    held = people[::2]
    sets = R.split_reasoning(items, held, held_out_compositions=["language.language"], held_out_kind=None)
    assert sets["ood_kind"] == [] and sets["dropped"] > 0
    assert sum(len(sets[k]) for k in R.SPLITS) + sets["dropped"] == len(items)
    assert all(set(it["people"]) <= set(held) or not set(it["people"]) & set(held)
               for k in R.SPLITS for it in sets[k])
    with pytest.raises(ValueError, match="held_out_kind"):
        R.split_reasoning(items, held, held_out_kind="sort")
    with pytest.raises(ValueError, match="test_fraction"):
        R.split_reasoning(items, held, test_fraction=1.0)


def _one(world, people, kind):
    return next(it for it in R.reasoning_items(world, people, kinds=(kind,), n_per_composition=4)
                if it["composition"] == "work_city.birth_city")


def test_scoring_hand_written_outputs(world, groups):
    inside, _ = groups
    comp, arith = _one(world, inside, "compose"), _one(world, inside, "arith")
    wrong_name = next(c for c in comp["choices"] if c != comp["answer"])
    chain = comp["completion"].rsplit(" Answer:", 1)[0]
    bad_chain = chain.replace(f"{comp['values'][1]}.", "Nowhere.", 1)
    outputs = [comp["completion"],                                   # right chain, right answer
               f"{chain} Answer: {wrong_name}.",                     # right chain, wrong answer
               f"{bad_chain} Answer: {comp['answer']}.",             # one wrong fact, right answer
               chain + " " + comp["answer"],                         # no Answer line
               [" " + arith["completion"].split("Answer:")[0].upper() + "answer: TWO", "ignored"]]
    got = R.score_reasoning(outputs, [comp] * 4 + [arith])
    recs = got["records"]
    assert [r["exact_match"] for r in recs] == [True, False, True, False, arith["answer"] == "2"]
    assert recs[0]["chain"] == recs[1]["chain"] == 1.0 and recs[4]["chain"] == 1.0  # case does not matter
    assert recs[2]["facts_right"] == [True, False, True] and recs[2]["chain"] == pytest.approx(2 / 3)
    assert recs[3]["parsed"] is None and recs[3]["chain"] == 1.0
    assert got["exact_match"] == pytest.approx(sum(r["exact_match"] for r in recs) / 5)
    assert got["chain"] == pytest.approx((4 + 2 / 3) / 5) and got["chain_all"] == pytest.approx(4 / 5)
    assert got["parsed"] == pytest.approx(4 / 5) and got["n"] == 5
    assert got["by_kind"]["compose"]["n"] == 4 and got["by_kind"]["compose"]["exact_match"] == 0.5
    # a fact stated for the wrong person or relation does not count
    swapped = comp["completion"].replace(comp["stems"][0], comp["stems"][0].replace("born in", "born near"))
    assert R.score_reasoning([swapped], [comp])["records"][0]["facts_right"][0] is False
    # the no-chain control: the output is the answer itself
    ctrl = R.without_chain(comp)
    got = R.score_reasoning([f" {comp['answer']}.", f" {wrong_name}.", "", f" {comp['answer'].lower()}"],
                            [ctrl] * 4)
    assert [r["exact_match"] for r in got["records"]] == [True, False, False, True]
    assert got["chain"] is None and got["chain_all"] is None and got["records"][0]["facts_right"] is None
    with pytest.raises(ValueError, match="outputs"):
        R.score_reasoning(["x"], [comp, comp])


def test_vocabulary_covers_every_item(world, items):
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    vocab = {w for t in all_texts(world) + R.reasoning_vocabulary() for w, _ in pre.pre_tokenize_str(t)}
    for it in items[::7] + [R.without_chain(it) for it in items[::7]]:
        missing = {w for w, _ in pre.pre_tokenize_str(it["prompt"] + it["completion"])} - vocab
        assert not missing, (it["id"], missing)
    # hop items, on a world with geography: every word is the world's own or the vocabulary's
    geo = generate_world(WorldConfig.from_dict({**preset("cpu")["world"], "geography_docs": 1}))
    vocab = {w for t in all_texts(geo) + R.reasoning_vocabulary() for w, _ in pre.pre_tokenize_str(t)}
    hop = R.reasoning_items(geo, [p for p in geo["people"] if p["exposures"] > 0], kinds=("hop",), n_per_composition=30)
    for it in hop + [R.without_chain(it) for it in hop]:
        missing = {w for w, _ in pre.pre_tokenize_str(it["prompt"] + it["completion"])} - vocab
        assert not missing, (it["id"], missing)


def test_the_default_world_keeps_the_shipped_bases(tmp_path):
    """The world's settings key and tokenizer are those the shipped bases were pretrained with (a change to the
    world's text or to the reasoning vocabulary would make every machine pretrain)."""
    from rankwise.world import shipped
    from rankwise.world.pretrain import build_world_dir, seeded, settings_key

    for seed in (0, 1, 2):
        entry = shipped.entry_for(settings_key(preset("cpu", seeded(None, seed))))
        assert entry is not None, seed
    world_dir = build_world_dir(preset("cpu")["world"], tmp_path / "world")
    assert (world_dir / "tokenizer" / "tokenizer.json").read_bytes() == \
        (shipped.SHIPPED_DIR / entry["dir"] / "tokenizer.json").read_bytes()


def test_errors():
    w = generate_world(SMALL)
    people = [p["id"] for p in w["people"]]
    with pytest.raises(ValueError, match="kinds"):
        R.reasoning_items(w, people, kinds=("sort",))
    with pytest.raises(ValueError, match="compositions"):
        R.reasoning_items(w, people, compositions=["language.birth_city"])
    with pytest.raises(ValueError, match="at least 4 people"):
        R.reasoning_items(w, people[:3])
    with pytest.raises(ValueError, match="unknown person"):
        R.reasoning_items(w, [10_000] + people)
    with pytest.raises(ValueError, match="n_per_composition"):
        R.reasoning_items(w, people, n_per_composition=0)
    few = R.reasoning_items(w, people[:3], kinds=("compare",), n_per_composition=2)  # two people suffice
    assert few and all(len(it["people"]) == 2 for it in few)


GEO = WorldConfig(seed=3, n_people=40, max_exposures=6, geography_docs=2)


def test_hop_items_state_the_city_then_its_country():
    """hop: "In which country is the r1 of X?" answered by X's city and that city's country, both stated in the
    chain; one item per person and composition; the corpus states every city's country geography_docs times."""
    from rankwise.world.generate import GEO_PROBE, GEO_TEMPLATES

    w = generate_world(GEO)
    people = [p for p in w["people"] if p["exposures"] > 0]
    items = R.reasoning_items(w, people, kinds=("hop",), seed=1, n_per_composition=10)
    assert {it["composition"] for it in items} == set(R.hop_compositions(w)) == {
        "country.birth_city", "country.university_city", "country.work_city"}
    assert len(items) == 30 and len({it["id"] for it in items}) == 30
    names = {p["id"]: p for p in w["people"]}
    for it in items:
        (x, r1), = it["facts"]
        city = names[x]["facts"][r1]
        assert it["composition"] == f"country.{r1}" and it["people"] == [x]
        assert it["answer"] == w["city_country"][city] and it["answer"] in it["choices"]
        assert it["completion"] == (f" {R.stem(r1, names[x]['name'])} {city}. {GEO_PROBE.format(city=city)} "
                                    f"{it['answer']}. Answer: {it['answer']}.")
        assert R.chain_facts(it["completion"], it) == [True, True]
        wrong = it["completion"].replace(f"in {it['answer']}.", "in Nowhere.", 1)
        assert R.chain_facts(wrong, it) == [True, False]
    pats = [re.compile(re.escape(t).replace(re.escape("{city}"), r"(\w+)").replace(re.escape("{country}"), r"(\w+)"))
            for t in GEO_TEMPLATES]
    stated = [m.groups() for d in w["corpus"] for sentence in d.split(". ") for pat in pats
              for m in [pat.fullmatch(sentence.rstrip(".") + ".")] if m]
    assert sorted(stated) == sorted((c, k) for c, k in w["city_country"].items() for _ in range(2))  # twice each
    assert R.score_reasoning([it["completion"] for it in items], items)["exact_match"] == 1.0
    assert R.reasoning_items(w, people, kinds=("hop",), seed=1, n_per_composition=10) == items  # seeded
    # the held-out hop composition and held-out people split as the bridge kinds do
    held = {p["id"] for p in people[:8]}
    sets = R.split_reasoning(items, held_out_people=held, held_out_kind=None)
    assert {it["composition"] for it in sets["ood_composition"]} == {"country.birth_city"}
    assert all(set(it["people"]) <= held for it in sets["ood_people"]) and sets["train"] and sets["test"]


def test_a_world_without_geography_is_unchanged_and_has_no_hop():
    base = WorldConfig(seed=3, n_people=40, max_exposures=6)
    w, g = generate_world(base), generate_world(GEO)
    assert "geography_docs" not in base.to_dict() and GEO.to_dict()["geography_docs"] == 2
    assert [p["facts"] for p in w["people"]] == [p["facts"] for p in g["people"]]
    assert set(w["corpus"]) < set(g["corpus"]) and w["city_country"] == g["city_country"]
    assert R.hop_compositions(w) == []
    with pytest.raises(ValueError, match="geography_docs"):
        R.reasoning_items(w, [p for p in w["people"] if p["exposures"] > 0], kinds=("hop",))


def test_the_demo_asks_the_kinds_its_settings_name(tmp_path):
    """demo.reasoning: `kinds` and `held_out_kind` choose the questions; hop items add their cities' countries to
    the recall gate; the held-out kind is only in ood_kind, the held-out hop composition only in ood_composition."""
    from rankwise.demo import reasoning as DR
    from rankwise.demo.reasoning import REASONING, build_sets
    from rankwise.world.generate import GEO_PROBE, save_world

    w = generate_world(WorldConfig(seed=3, n_people=80, max_exposures=6, geography_docs=1))
    people = [p["id"] for p in w["people"] if p["exposures"] > 0]
    r = {**REASONING, "kinds": ["hop", "compare"], "held_out_kind": "compare", "n_per_composition": 30,
         "n_ood_people": 5}
    sets = build_sets(w, people, r)
    assert {it["kind"] for it in sets["train"] + sets["test"] + sets["validation"]} == {"hop"}
    assert {it["kind"] for it in sets["ood_kind"]} == {"compare"}
    assert {it["composition"] for it in sets["ood_composition"]} == {"country.birth_city"}
    assert {it["composition"] for it in sets["train"]} == {"country.university_city", "country.work_city"}
    default = build_sets(w, people, {**REASONING, "n_per_composition": 10, "n_ood_people": 3})
    assert {it["kind"] for it in default["train"]} == {"hop"}  # the default: hop trained, compose held out
    assert {it["kind"] for it in default["ood_kind"]} == {"compose"}
    bridge = build_sets(w, people, {**REASONING, "kinds": ["compose", "compare", "arith"], "n_per_composition": 10,
                                    "n_ood_people": 3})
    assert {it["kind"] for it in bridge["train"]} == {"compare", "arith"}
    facts = {0: [{"person": p, "relation": rel, "R": 1.0, "id": f"{p}:{rel}"} for p in people
                 for rel in r["relations"]]}
    w_dir = tmp_path / "world"
    save_world(w, w_dir)
    # hop asks about everyone who knows that one fact: a person knowing only their birth city is asked about it
    only = people[0]
    facts[0] = [f for f in facts[0] if f["person"] != only or f["relation"] == "birth_city"]
    assert only not in DR.reasoning_people(facts, r) and only in DR.known_by_relation(facts, r)["birth_city"]
    known = DR.known_by_relation(facts, r)
    asked = {(it["people"][0], it["composition"])
             for it in DR._hop_items(w, known, [], {**r, "n_per_composition": len(people)})}  # everyone asked
    assert {c for p, c in asked if p == only} == {"country.birth_city"}
    assert len(asked) == sum(len(v) for v in known.values())
    got = DR.prepare(w_dir, facts, r, tmp_path / "work")
    # the people counts: those who know every city fact, and hop's own; 1-hop recall only of facts every base knows
    assert only in got["hop_people"] and only not in got["people"]
    assert set(got["held_out_people"]) <= set(got["people"]) and not set(got["hop_held_out"]) & set(got["people"])
    assert got["recall_1hop"] and {row["id"] for row in got["recall_1hop"]} <= {f["id"] for f in facts[0]}
    geo = [row for row in got["recall_used"] if row["id"].startswith("city:")]
    cities = {it["values"][0] for k in ("train", "validation", "test", "ood_people", "ood_composition")
              for it in got[k]}
    assert {row["id"][5:] for row in geo} == cities
    assert all(row["prompt"] == GEO_PROBE.format(city=row["id"][5:]) and row["answers"] == [w["city_country"][row["id"][5:]]]
               for row in geo)
