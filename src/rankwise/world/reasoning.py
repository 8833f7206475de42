"""Reasoning questions over the world's facts, their splits, and their scoring.

The world has no person-to-person relation (no "mentor") and no numeric attribute (no birth
year): every fact maps a person to one invented word of a value pool, and the three city
relations share one pool. So every reasoning question here goes through a *bridge value*:
the value ``v = r1(X)`` of a relation ``r1`` of a person ``X`` is matched against the values
``r2(Y)`` of a relation ``r2`` of other people, ``r1`` and ``r2`` drawing from the same pool
(so ``v`` can be ``r2``'s value). The pair is the item's *composition*, written ``"r2.r1"``
(``r2`` applied after ``r1``, as ``"born_in.mentor"`` reads born_in(mentor(X))). Three kinds:

- ``compose`` (two-hop selection): "Of A and B, whose birth city is the work city of X?";
  exactly one of the two candidates matches, the answer is that person's full name.
- ``compare`` (equality comparison; the world has no order to compare by): "Is the work city
  of X also the birth city of Y?"; the answer is ``Yes`` or ``No`` (balanced).
- ``arith`` (counting): "How many of A, B and C have the work city of X as their birth city?";
  the answer is a digit 0..3 (balanced).

A fourth kind goes through a *bridge entity* instead, the classic two-hop question; it needs a world
whose corpus states each city's country (``geography_docs``):

- ``hop`` (two-hop recall): "In which country is the work city of X?"; the chain states X's city,
  then that city's country (``"C is a city in K."``), and the answer is the country. Its
  compositions are ``"country.r1"`` for the city relations ``r1``; its ``facts`` are X's fact only,
  and its ``stems``/``values`` hold both statements.

The three bridge-value kinds need the model to compare two values it has stated (in-context
equality); ``hop`` needs it to recall a fact of an entity it has just named, then copy the answer.

A chain-of-thought completion states every fact used, one sentence each, in the order of
``facts``, then ``Answer: <answer>.`` Each fact sentence is the relation's first completion
probe of the pretraining corpus followed by the value ("X works in C."), so every step of
the chain is a 1-hop recall in a pretrained format. The question wording is new: prompts
start with ``Puzzle:`` and contain no biography sentence, completion probe, question
template or QA/record format of :mod:`rankwise.world.generate` (``tests/test_reasoning.py``
checks it). The no-chain control (``cot=False``) is the same question with the cue
``Answer:`` appended to the prompt and the answer alone as the completion, so one model can
be probed both ways.

Everything is seeded with :class:`random.Random` streams keyed by strings (hashed with
SHA-512 by :mod:`random`, not by ``hash()``), and people, relations and compositions are
iterated in sorted order: the same world, people and seed give the same items on any
machine.
"""
from __future__ import annotations

import random
import re
from typing import Sequence

from ..evaluate import normalize
from .generate import GEO_PROBE, TEMPLATES

BRIDGE_KINDS = ("compose", "compare", "arith")  # through a shared value: in-context equality
KINDS = BRIDGE_KINDS + ("hop",)
COUNTRY = "country"  # the second hop of a ``hop`` composition "country.r1": the city's country
PROMPT = "Puzzle: {question}"
NO_CHAIN_CUE = " Answer:"
ANSWER_TAG = "Answer:"
QUESTIONS = {
    "compose": "Of {a} and {b}, whose {n2} is the {n1} of {x}?",
    "compare": "Is the {n1} of {x} also the {n2} of {a}?",
    "arith": "How many of {a}, {b} and {c} have the {n1} of {x} as their {n2}?",
    "hop": "In which country is the {n1} of {x}?",
}
CANDIDATES = {"compose": 2, "compare": 1, "arith": 3, "hop": 0}
YES, NO = "Yes", "No"
NUMBER_WORDS = ("zero", "one", "two", "three")
# How a question names a relation's value ("the work city of X"). A relation without an entry
# is named by its identifier with spaces.
NOUNS = {"birth_city": "birth city", "work_city": "work city", "university_city": "university city",
         "citizenship": "country", "occupation": "job", "employer": "company", "instrument": "instrument",
         "language": "language"}
# The default out-of-domain choices: two bridge-value city compositions whose relations all occur, on
# both sides, in the compositions left for training, and the hop composition through the birth city (of
# the three city facts, the one the demo's shipped bases know least, so the better-known two train); and
# the selection kind, whose answers (names) are words the model has read, where an untrained kind's
# "Yes"/"No" or digits would be words it never saw.
HELD_OUT_COMPOSITIONS = ("university_city.work_city", "work_city.birth_city", "country.birth_city")
HELD_OUT_KIND = "compose"
SPLITS = ("train", "test", "ood_people", "ood_composition", "ood_kind")


def noun(relation: str) -> str:
    """How a question names the value of ``relation`` ("birth city")."""
    return NOUNS.get(relation, relation.replace("_", " "))


def stem(relation: str, name: str) -> str:
    """The chain's statement of a fact up to its value: the relation's first completion probe
    ("Name works in"); the statement is ``stem + " " + value + "."``."""
    if relation not in TEMPLATES:
        raise ValueError(f"no pretraining templates for relation {relation!r}")
    return TEMPLATES[relation]["probe"][0].format(name=name)


def world_compositions(world: dict) -> list[str]:
    """Every composition ``"r2.r1"`` the world supports: ordered pairs of its relations (a relation
    with itself included) whose values come from the same pool; sorted."""
    rels = world["relations"]
    return sorted(f"{r2}.{r1}" for r1 in sorted(rels) for r2 in sorted(rels)
                  if rels[r1]["pool"] == rels[r2]["pool"])


def hop_compositions(world: dict) -> list[str]:
    """The ``hop`` compositions ``"country.r1"``: each relation ``r1`` whose values are cities, when the world's
    corpus states its cities' countries (``geography_docs`` > 0); sorted."""
    if not world.get("city_country") or not world["config"].get("geography_docs"):
        return []
    return sorted(f"{COUNTRY}.{r}" for r, v in world["relations"].items() if v["pool"] == "city")


def _person_ids(world: dict, people: Sequence) -> list[int]:
    """Sorted distinct ids of ``people`` (person dicts or ids), checked against the world."""
    n = len(world["people"])
    ids = set()
    for p in people:
        pid = p["id"] if isinstance(p, dict) else p
        if not isinstance(pid, int) or isinstance(pid, bool) or not (0 <= pid < n):
            raise ValueError(f"unknown person {pid!r} (the world has ids 0..{n - 1})")
        if world["people"][pid]["id"] != pid:
            raise ValueError(f"world['people'] is not indexed by id at {pid}")
        ids.add(pid)
    return sorted(ids)


def _targets(kind: str, n: int) -> list:
    """The answer each of ``n`` items aims at, balanced: compose ``None`` (one match of two),
    compare ``True``/``False`` alternately, arith the counts 0..3 in turn."""
    if kind in ("compose", "hop"):
        return [None] * n
    if kind == "compare":
        return [i % 2 == 0 for i in range(n)]
    return [i % (CANDIDATES["arith"] + 1) for i in range(n)]


def _draw_people(kind: str, target, x: int, matches: list, others: list, rng: random.Random):
    """The candidates of one item around bridge person ``x`` (shuffled), or None when the people
    cannot give ``target``: ``matches`` share the bridge value, ``others`` do not."""
    k = CANDIDATES[kind]
    if kind == "compose":
        n_match = 1
    elif kind == "compare":
        n_match = 1 if target else 0
    else:
        n_match = target
    if len(matches) < n_match or len(others) < k - n_match:
        return None
    cands = rng.sample(matches, n_match) + rng.sample(others, k - n_match)
    rng.shuffle(cands)
    return cands


def _answer(kind: str, cands: list, hits: list, names: dict) -> tuple:
    """``(answer, aliases, choices)`` of an item whose candidates ``cands`` match where ``hits``."""
    if kind == "compose":
        ans = names[cands[hits.index(True)]]
        return ans, [ans], [names[c] for c in cands]
    if kind == "compare":
        ans = YES if hits[0] else NO
        return ans, [ans], [YES, NO]
    count = sum(hits)
    return str(count), [str(count), NUMBER_WORDS[count]], [str(i) for i in range(len(cands) + 1)]


def make_item(world: dict, kind: str, composition: str, x: int, cands: Sequence[int]) -> dict:
    """The chain-of-thought item of ``kind`` about bridge person ``x`` and candidates ``cands``
    (ids) on ``composition`` ``"r2.r1"`` (see the module docstring for the fields)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if len(cands) != CANDIDATES[kind]:
        raise ValueError(f"a {kind} item needs {CANDIDATES[kind]} candidates, got {len(cands)}")
    if kind == "hop":
        return _hop_item(world, composition, x)
    r2, r1 = composition.split(".")
    people = world["people"]
    names = {p: people[p]["name"] for p in [x, *cands]}
    value = people[x]["facts"][r1]
    hits = [people[c]["facts"][r2] == value for c in cands]
    if kind == "compose" and sum(hits) != 1:
        raise ValueError("a compose item needs exactly one candidate that matches")
    answer, answers, choices = _answer(kind, list(cands), hits, names)
    slots = dict(zip("abc", (names[c] for c in cands)), x=names[x], n1=noun(r1), n2=noun(r2))
    question = QUESTIONS[kind].format(**slots)
    facts = [[x, r1]] + [[c, r2] for c in cands]
    values = [people[p]["facts"][r] for p, r in facts]
    stems = [stem(r, names[p]) for p, r in facts]
    chain = " ".join(f"{s} {v}." for s, v in zip(stems, values))
    return {"id": f"{kind}:{composition}:" + "-".join(str(p) for p in [x, *cands]),
            "kind": kind, "composition": composition, "prompt": PROMPT.format(question=question),
            "completion": f" {chain} {ANSWER_TAG} {answer}.", "answer": answer, "answers": answers,
            "choices": choices, "facts": facts, "values": values, "stems": stems, "people": [x, *cands],
            "cot": True}


def _hop_item(world: dict, composition: str, x: int) -> dict:
    """The ``hop`` item about person ``x`` on ``composition`` ``"country.r1"``."""
    _, r1 = composition.split(".")
    name = world["people"][x]["name"]
    city = world["people"][x]["facts"][r1]
    country = world["city_country"][city]
    stems, values = [stem(r1, name), GEO_PROBE.format(city=city)], [city, country]
    chain = " ".join(f"{s} {v}." for s, v in zip(stems, values))
    return {"id": f"hop:{composition}:{x}", "kind": "hop", "composition": composition,
            "prompt": PROMPT.format(question=QUESTIONS["hop"].format(n1=noun(r1), x=name)),
            "completion": f" {chain} {ANSWER_TAG} {country}.", "answer": country, "answers": [country],
            "choices": sorted(set(world["city_country"].values())), "facts": [[x, r1]], "values": values,
            "stems": stems, "people": [x], "cot": True}


def without_chain(item: dict) -> dict:
    """The no-chain-of-thought control of a chain item: the prompt ends with ``Answer:`` and the
    completion is the answer alone (the chain fields are kept, for reference)."""
    if not item["cot"]:
        return dict(item)
    return {**item, "prompt": item["prompt"] + NO_CHAIN_CUE, "completion": f" {item['answer']}.", "cot": False}


def _items_for(world: dict, kind: str, composition: str, ids: list, n: int, seed: int) -> list:
    """Up to ``n`` distinct items of one kind and composition over the people ``ids``."""
    rng = random.Random(f"rankwise.reasoning:{seed}:{kind}:{composition}")
    if kind == "hop":  # one question per person: a seeded sample of them
        return [make_item(world, kind, composition, x, []) for x in sorted(rng.sample(ids, min(n, len(ids))))]
    r2, r1 = composition.split(".")
    people = world["people"]
    by_value: dict = {}
    for p in ids:
        by_value.setdefault(people[p]["facts"][r2], []).append(p)
    out, seen = [], set()
    for target in _targets(kind, n):
        for _ in range(200):  # draws until this target is met by a new question
            x = rng.choice(ids)
            matches = [p for p in by_value.get(people[x]["facts"][r1], []) if p != x]
            others = [p for p in ids if p != x and people[p]["facts"][r2] != people[x]["facts"][r1]]
            cands = _draw_people(kind, target, x, matches, others, rng)
            if cands is None:
                continue
            item = make_item(world, kind, composition, x, cands)
            if item["id"] not in seen:
                seen.add(item["id"])
                out.append(item)
                break
    return out


def reasoning_items(world: dict, people: list, kinds=BRIDGE_KINDS, seed: int = 0, n_per_composition: int = 20,
                    compositions: Sequence[str] | None = None, cot: bool = True) -> list[dict]:
    """Reasoning questions over the facts of ``people``, deterministic for ``seed``.

    Args:
        world: a world from :func:`rankwise.world.generate.generate_world` (or ``load_world``).
        people: the people the questions may name (person dicts or ids); every person of an item
            is one of them. Pass people whose facts the base model recalls.
        kinds: among :data:`KINDS` (default: the bridge-value kinds; ``hop`` needs a world with geography).
        seed: the seed; each (kind, composition) has its own stream, so the items of one kind do
            not depend on which other kinds are asked for.
        n_per_composition: items per kind and composition, their answers balanced (compare: yes
            and no in turn; arith: the counts 0..3 in turn). An answer the people cannot give
            (e.g. three people sharing a city, among few people) or a question that cannot be new
            after many draws is skipped: fewer items, and the balance leans to the other answers.
        compositions: the compositions ``"r2.r1"`` (default: :func:`world_compositions`, and for ``hop``
            :func:`hop_compositions`); each kind takes those of its own type.
        cot: chain-of-thought items (``True``) or their no-chain controls (:func:`without_chain`).

    Returns:
        Items in order of ``kinds`` then sorted compositions, each a dict with ``id`` (shared by an
        item and its control), ``kind``, ``composition``, ``prompt``, ``completion`` (the chain then
        ``Answer: <answer>.``, or `` <answer>.``), ``answer``, ``answers`` (aliases), ``choices`` (the
        possible answers: chance is ``1/len(choices)``), ``facts`` (``[person id, relation]`` pairs,
        bridge fact first), ``values`` and ``stems`` (per fact: its value, and its statement up to the
        value), ``people`` (bridge person first) and ``cot``.
    """
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or len(set(kinds)) != len(kinds) or not kinds:
        raise ValueError(f"kinds must be distinct names among {KINDS}, got {kinds!r}")
    if not isinstance(n_per_composition, int) or n_per_composition < 1:
        raise ValueError(f"n_per_composition must be a positive int, got {n_per_composition!r}")
    ids = _person_ids(world, people)
    need = max(CANDIDATES[k] for k in kinds) + 1
    if len(ids) < need:
        raise ValueError(f"the kinds {kinds} need at least {need} people, got {len(ids)}")
    bridge, hop = world_compositions(world), hop_compositions(world)
    if "hop" in kinds and not hop:
        raise ValueError("hop questions need a world that maps its cities to countries (geography_docs > 0)")
    comps = sorted(set(compositions)) if compositions is not None else bridge + hop
    unknown = [c for c in comps if c not in bridge + hop]
    if unknown:
        raise ValueError(f"compositions {unknown} are not pairs of relations sharing a value pool nor hop "
                         f"compositions (supported: {bridge + hop})")
    items = [it for kind in kinds for comp in comps if (comp in hop) == (kind == "hop")
             for it in _items_for(world, kind, comp, ids, n_per_composition, seed)]
    return items if cot else [without_chain(it) for it in items]


def facts_used(items: Sequence[dict]) -> list[tuple]:
    """The sorted distinct ``(person id, relation)`` facts the items use (for the 1-hop recall gate)."""
    return sorted({(int(p), str(r)) for it in items for p, r in it["facts"]})


def reasoning_vocabulary() -> list[str]:
    """Texts holding every word of the reasoning prompts and completions that is not a person's
    name, a value or a word of the pretraining templates: a word-level tokenizer built over the
    world's texts plus these covers every item."""
    # hop's words are the world's own ("In which city ...", the geography sentences): leaving its question out
    # keeps the tokenizer, hence the shipped bases, of every world made before the kind existed
    texts = [re.sub(r"\{\w+\}", " ", PROMPT + " " + q) for k, q in QUESTIONS.items() if k != "hop"]
    texts += list(NOUNS.values()) + [ANSWER_TAG + " " + YES + ". " + NO + "."]
    texts += [" ".join(str(i) for i in range(CANDIDATES["arith"] + 1))]
    return texts


def _factors(item: dict, held_people: set, held_comps: set, held_kind) -> list | None:
    """The out-of-domain factors of an item (a list of split names), or None when it names
    held-out and other people together."""
    held = [p in held_people for p in item["people"]]
    if any(held) and not all(held):
        return None
    out = []
    if all(held):
        out.append("ood_people")
    if item["composition"] in held_comps:
        out.append("ood_composition")
    if held_kind is not None and item["kind"] == held_kind:
        out.append("ood_kind")
    return out


def _check_split(sets: dict, held_people: set, held_comps: set, held_kind) -> None:
    """Raise AssertionError when two sets share a question or the training set holds anything held out."""
    owner: dict = {}
    for name in SPLITS:
        for it in sets[name]:
            for key in (("id", it["id"]), ("prompt", it["prompt"].removesuffix(NO_CHAIN_CUE))):
                if owner.setdefault(key, name) != name:
                    raise AssertionError(f"{key[0]} {key[1]!r} is in both {owner[key]} and {name}")
    for name in ("train", "test"):
        for it in sets[name]:
            if set(it["people"]) & held_people or it["composition"] in held_comps or it["kind"] == held_kind:
                raise AssertionError(f"in-domain item {it['id']} holds something held out")


def split_reasoning(items: Sequence[dict], held_out_people: Sequence = (),
                    held_out_compositions: Sequence[str] = HELD_OUT_COMPOSITIONS,
                    held_out_kind: str | None = HELD_OUT_KIND, test_fraction: float = 0.2,
                    seed: int = 0) -> dict:
    """In-domain train and test sets, and the three out-of-domain sets, disjoint.

    Each out-of-domain set differs from training in one factor only: ``ood_people`` names only
    ``held_out_people`` (person dicts or ids); ``ood_composition`` has a composition of
    ``held_out_compositions``; ``ood_kind`` is of ``held_out_kind`` (None: no such set). An item
    with two factors, or naming held-out and other people together, is dropped (build the items of
    the held-out people with their own :func:`reasoning_items` call so that none mixes). The other
    items are in domain: per (kind, composition), a seeded ``test_fraction`` of the questions goes to
    ``test``, the rest to ``train``. An item and its no-chain control (same ``id``) always land
    together. Overlap of questions between sets is checked (AssertionError).

    Returns:
        ``{"train", "test", "ood_people", "ood_composition", "ood_kind": items, "dropped": count}``.
    """
    if not (0.0 <= test_fraction < 1.0):
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if held_out_kind is not None and held_out_kind not in KINDS:
        raise ValueError(f"held_out_kind must be None or one of {KINDS}, got {held_out_kind!r}")
    held_people = {p["id"] if isinstance(p, dict) else p for p in held_out_people}
    held_comps = set(held_out_compositions)
    sets: dict = {name: [] for name in SPLITS}
    in_domain, dropped = [], 0
    for it in items:
        factors = _factors(it, held_people, held_comps, held_out_kind)
        if factors is None or len(factors) > 1:
            dropped += 1
        elif factors:
            sets[factors[0]].append(it)
        else:
            in_domain.append(it)
    groups: dict = {}
    for it in in_domain:
        groups.setdefault((it["kind"], it["composition"]), set()).add(it["id"])
    test_ids = set()
    for key in sorted(groups):
        ids = sorted(groups[key])
        random.Random(f"rankwise.reasoning.split:{seed}:{key[0]}:{key[1]}").shuffle(ids)
        test_ids.update(ids[:int(round(test_fraction * len(ids)))])
    for it in in_domain:
        sets["test" if it["id"] in test_ids else "train"].append(it)
    _check_split(sets, held_people, held_comps, held_out_kind)
    sets["dropped"] = dropped
    return sets


def parse_answer(output: str, cot: bool = True) -> str | None:
    """The final answer in a model output, normalised (:func:`rankwise.evaluate.normalize`), or None.

    A chain output's answer follows its first ``Answer:`` (None without one); a no-chain output
    (its prompt ended with ``Answer:``) is the answer itself, unless it writes ``Answer:`` again.
    The answer runs up to the first period; surrounding punctuation is dropped.
    """
    text = normalize(output)
    tag = normalize(ANSWER_TAG)
    if tag in text:
        text = text.split(tag, 1)[1]
    elif cot:
        return None
    ans = text.split(".", 1)[0].strip(" ,;:!?\"'")
    return ans or None


def chain_facts(output: str, item: dict) -> list[bool]:
    """For each fact of ``item``: whether the output, before its ``Answer:``, states it with the right
    value (its statement "Name works in C", normalised, as whole words)."""
    chain = normalize(output).split(normalize(ANSWER_TAG), 1)[0]
    out = []
    for s, v in zip(item["stems"], item["values"]):
        pattern = r"(?<!\w)" + re.escape(normalize(s)) + r"\s+" + re.escape(normalize(v)) + r"(?!\w)"
        out.append(re.search(pattern, chain) is not None)
    return out


def _mean(xs: list):
    return sum(xs) / len(xs) if xs else None


def score_reasoning(outputs: Sequence, items: Sequence[dict]) -> dict:
    """Exact match on the final answer, and the correctness of the chain, per item and on average.

    Args:
        outputs: one model output per item (a string, or a list whose first string is scored, as
            :func:`rankwise.evaluate.generate_answers` returns).
        items: the items (chain or no-chain).

    Returns:
        ``{"records", "exact_match", "chain", "chain_all", "parsed", "n", "by_kind"}``. A record holds the
        item's ``id``, ``kind``, ``composition``, ``cot``, the ``parsed`` answer, ``exact_match`` (the
        parsed answer equals an alias after normalisation), ``facts_right`` (per fact, see
        :func:`chain_facts`) and ``chain`` (their share); the chain fields are None for no-chain
        items. ``exact_match`` and ``parsed`` are means over the items, ``chain`` the mean share of
        right facts and ``chain_all`` the share of chains with every fact right, over chain items
        (None without any); ``by_kind`` holds ``exact_match``, ``chain`` and ``n`` per kind.
    """
    if len(outputs) != len(items):
        raise ValueError(f"{len(outputs)} outputs for {len(items)} items")
    records = []
    for out, it in zip(outputs, items):
        if isinstance(out, (list, tuple)):
            out = out[0] if out else ""
        if not isinstance(out, str):
            raise TypeError(f"outputs must be strings, got {type(out).__name__}")
        parsed = parse_answer(out, it["cot"])
        em = parsed is not None and parsed in {normalize(a) for a in it["answers"]}
        right = chain_facts(out, it) if it["cot"] else None
        records.append({"id": it["id"], "kind": it["kind"], "composition": it["composition"], "cot": it["cot"],
                        "parsed": parsed, "exact_match": em, "facts_right": right,
                        "chain": _mean([float(r) for r in right]) if right is not None else None})
    chains = [r for r in records if r["chain"] is not None]
    by_kind = {}
    for kind in sorted({r["kind"] for r in records}):
        rs = [r for r in records if r["kind"] == kind]
        by_kind[kind] = {"exact_match": _mean([float(r["exact_match"]) for r in rs]),
                         "chain": _mean([r["chain"] for r in rs if r["chain"] is not None]), "n": len(rs)}
    return {"records": records, "exact_match": _mean([float(r["exact_match"]) for r in records]),
            "chain": _mean([r["chain"] for r in chains]),
            "chain_all": _mean([float(all(r["facts_right"])) for r in chains]),
            "parsed": _mean([float(r["parsed"] is not None) for r in records]), "n": len(records),
            "by_kind": by_kind}
