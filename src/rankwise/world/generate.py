"""A seeded synthetic knowledge world: fictional people, their facts, and text about them.

Everything is derived from one integer seed and a :class:`WorldConfig`, so the same
settings always give the same world (same people, facts, corpus and splits).

Design (see ``STUDIES.md``, "Knowledge in small models"):

- 8 relations; four *in-domain* location relations (birth city, work city, university
  city, citizenship) and four *out-of-domain* ones (occupation, employer, instrument,
  language). Every answer is one invented word, and no answer is a substring of another
  word of the world, so "the output contains the answer" is unambiguous.
- Popularity is long-tailed: a fraction of the people never appear in the corpus, the
  rest appear in ``1 .. max_exposures`` biographies following a log-uniform law, and each
  biography mentions each fact only with probability ``fact_keep``, so facts of one
  person are known to different degrees.
- People come in two groups. *Anchor* people appear in biographies **and** in
  question-answer text ("mixed training"); this teaches the tiny model to answer
  questions from what it read in biographies. *Study* people appear only in
  biographies (or never); their facts are what mastery is measured on, fine-tuning
  sets are drawn from the ``train`` share of them and test sets from the ``test`` share.
- The anchors' QA text covers only the relations in ``anchor_qa_relations`` (by
  default the out-of-domain ones), so the fine-tuning format of the in-domain
  relations never appears in pretraining: as in the knowledge study, the base model
  stores the in-domain facts but does not yet answer questions about them, and
  fine-tuning on in-domain QA teaches it to express what it knows.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..errors import ConfigError

IN_DOMAIN = ("birth_city", "work_city", "university_city", "citizenship")
OUT_OF_DOMAIN = ("occupation", "employer", "instrument", "language")
RELATIONS = IN_DOMAIN + OUT_OF_DOMAIN

# Which value pool each relation draws from (the three city relations share one).
POOL_OF = {
    "birth_city": "city", "work_city": "city", "university_city": "city",
    "citizenship": "country", "occupation": "occupation", "employer": "employer",
    "instrument": "instrument", "language": "language",
}

# Biography sentences, questions and completion probes per relation.
# "{name}" is the full name, "{v}" the answer. Probes end right before the answer.
TEMPLATES: dict[str, dict[str, list[str]]] = {
    "birth_city": {
        "bio": ["{name} was born in {v}.", "{name} came into the world in {v}.",
                "The birthplace of {name} is {v}.", "{name} spent early childhood in {v}, the city of birth.",
                "Born in {v}, {name} grew up there."],
        "question": ["Where was {name} born?", "In which city was {name} born?",
                     "What is the birthplace of {name}?"],
        "alt_question": ["Hometown of {name}?"],
        "probe": ["{name} was born in", "The birthplace of {name} is", "{name} came into the world in",
                  "{name} spent early childhood in"],
    },
    "work_city": {
        "bio": ["{name} works in {v}.", "{name} has a job in the city of {v}.",
                "The workplace of {name} is located in {v}.", "Every morning {name} commutes to work in {v}.",
                "{name} moved to {v} for work."],
        "question": ["Where does {name} work?", "In which city does {name} work?",
                     "What city is the workplace of {name} in?"],
        "alt_question": ["Office location of {name}?"],
        "probe": ["{name} works in", "{name} has a job in the city of", "The workplace of {name} is located in",
                  "Every morning {name} commutes to work in"],
    },
    "university_city": {
        "bio": ["{name} studied at a university in {v}.", "{name} went to college in {v}.",
                "The university of {name} was in {v}.", "As a student, {name} lived in {v}.",
                "{name} earned a degree in {v}."],
        "question": ["Where did {name} study?", "In which city did {name} go to university?",
                     "What city was the university of {name} in?"],
        "alt_question": ["Alma mater location of {name}?"],
        "probe": ["{name} studied at a university in", "{name} went to college in",
                  "The university of {name} was in", "As a student, {name} lived in"],
    },
    "citizenship": {
        "bio": ["{name} is a citizen of {v}.", "{name} holds a passport of {v}.",
                "The nationality of {name} is that of {v}.", "{name} has citizenship in {v}.",
                "By nationality, {name} belongs to {v}."],
        "question": ["Which country is {name} a citizen of?", "What is the citizenship of {name}?",
                     "Which passport does {name} hold?"],
        "alt_question": ["Homeland of {name}?"],
        "probe": ["{name} is a citizen of", "{name} holds a passport of", "{name} has citizenship in",
                  "By nationality, {name} belongs to"],
    },
    "occupation": {
        "bio": ["{name} works as a {v}.", "By profession, {name} is a {v}.",
                "The occupation of {name} is {v}.", "{name} earns a living as a {v}.",
                "{name} trained to become a {v}."],
        "question": ["What is the occupation of {name}?", "What does {name} do for a living?",
                     "What is the profession of {name}?"],
        "alt_question": ["Trade of {name}?"],
        "probe": ["{name} works as a", "By profession, {name} is a", "The occupation of {name} is",
                  "{name} earns a living as a"],
    },
    "employer": {
        "bio": ["{name} is employed by {v}.", "The employer of {name} is {v}.",
                "{name} draws a salary from {v}.", "{name} joined the company {v}.",
                "{name} is on the staff of {v}."],
        "question": ["Who is the employer of {name}?", "Which company employs {name}?",
                     "For which company does {name} work?"],
        "alt_question": ["Firm of {name}?"],
        "probe": ["{name} is employed by", "The employer of {name} is", "{name} draws a salary from",
                  "{name} joined the company"],
    },
    "instrument": {
        "bio": ["{name} plays the {v}.", "The favourite instrument of {name} is the {v}.",
                "In the evenings {name} practises the {v}.", "{name} learned to play the {v}.",
                "{name} owns a fine {v}."],
        "question": ["Which instrument does {name} play?", "What instrument is {name} known to play?",
                     "What is the favourite instrument of {name}?"],
        "alt_question": ["Music maker of {name}?"],
        "probe": ["{name} plays the", "The favourite instrument of {name} is the",
                  "In the evenings {name} practises the", "{name} learned to play the"],
    },
    "language": {
        "bio": ["{name} speaks {v}.", "The native language of {name} is {v}.",
                "{name} writes letters in {v}.", "{name} grew up speaking {v}.",
                "At home {name} talks in {v}."],
        "question": ["Which language does {name} speak?", "What is the native language of {name}?",
                     "In which language does {name} write?"],
        "alt_question": ["Mother tongue of {name}?"],
        "probe": ["{name} speaks", "The native language of {name} is", "{name} writes letters in",
                  "{name} grew up speaking"],
    },
}

# Geography documents (``geography_docs``): which country each city lies in, the second hop of the reasoning
# study's ``hop`` questions. Every word of them is already a word of the templates above, so the words reserved
# for names and answers, hence the people and the values of a world, are the same with or without them.
GEO_TEMPLATES = ("{city} is a city in {country}.", "The city of {city} is in {country}.",
                 "{city} is located in {country}.")
GEO_PROBE = "{city} is a city in"
QA_FORMAT = "Question: {question} Answer:"
ALT_QA_FORMAT = "Q: {question} A:"  # anchor_alt_format "qa": the anchors' QA on the other relations
# check_document's questions (anchors only, alternative QA format)
CITIES = ("birth_city", "work_city", "university_city")
CHECKS = ("Is {value} the {label} of {name}?", "How many of the cities of {name} are {city}?",
          "In how many different cities was {name} born, educated and employed?")
RECORD_FORMAT = "{name} | {label}:"  # anchor_alt_format "record": attribute records, no question at all
RECORD_LABELS = {"birth_city": "birth city", "work_city": "work city", "university_city": "university city",
                 "citizenship": "citizenship", "occupation": "occupation", "employer": "employer",
                 "instrument": "instrument", "language": "language"}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kr", "tr", "st", "sh", "th", "ch", "pl", "fl", "qu"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia", "eo"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "nd", "rk", "x"]


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Settings of a world; everything else follows from them.

    Attributes:
        seed: the one seed of the world.
        n_people: number of people.
        anchor_fraction: share of people whose QA text is in the pretraining corpus.
        unseen_fraction: share of the study people who never appear in the corpus.
        max_exposures: biographies of the most popular person.
        tail: shape of the popularity law: the person at popularity quantile ``q``
            (1 = most popular) appears in ``max_exposures ** q**tail`` biographies
            (``tail`` = 1 is log-uniform; larger makes the tail heavier).
        fact_keep: probability that a biography mentions a given fact.
        anchor_qa_docs: QA documents per anchor person.
        anchor_check_docs: check documents per anchor person (:func:`check_document`): yes/no and
            counting questions about the anchor's own facts in the alternative QA format, so that
            the words ``Yes``, ``No`` and ``0``-``3`` are answers the base model has produced before
            (real pretrained models have); they never involve a second person, as the reasoning
            questions (:mod:`rankwise.world.reasoning`) do.
        anchor_qa_relations: which relations the anchors' QA text covers in the study's QA
            format (:data:`QA_FORMAT`): ``"out"`` (the out-of-domain ones: the in-domain QA
            format is never pretrained), ``"in"`` or ``"all"``.
        anchor_alt_format: how the anchors' text covers the other relations, so that the
            pretrained model learns to extract them from biographies without ever seeing them in
            the study's QA format: ``"qa"`` (another QA format, :data:`ALT_QA_FORMAT`, with
            question wordings that share no word with the study's but "of": the ``alt_question``
            templates), ``"record"`` (attribute records, :data:`RECORD_FORMAT`) or ``"none"``.
            On the cpu preset ``"qa"`` keeps the base model's accuracy on held-out in-domain
            questions in the study's format low while fine-tuning unlocks the most D3+D4 facts;
            ``"record"`` and ``"none"`` unlock fewer, and alt wordings close to the study's let
            the base model answer many of them before any fine-tuning.
        test_fraction: share of the study people in the ``test`` split (the rest are ``train``).
        geography_docs: how many times the corpus states each city's country (:data:`GEO_TEMPLATES`, six
            cities a document; 0: never, and the base does not know them). Every world maps each city to a
            country of the ``country`` pool (``world["city_country"]``, its own seeded stream).
        pool_sizes: number of distinct answers per value pool.
    """

    seed: int = 0
    n_people: int = 600
    anchor_fraction: float = 0.4
    unseen_fraction: float = 0.2
    max_exposures: int = 24
    tail: float = 1.0
    fact_keep: float = 0.8
    anchor_qa_docs: int = 2
    anchor_check_docs: int = 1
    anchor_qa_relations: str = "out"
    anchor_alt_format: str = "qa"
    test_fraction: float = 0.5
    geography_docs: int = 0
    pool_sizes: tuple = (("city", 60), ("country", 40), ("occupation", 40), ("employer", 40),
                         ("instrument", 30), ("language", 30))

    def __post_init__(self):
        if not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if not isinstance(self.n_people, int) or self.n_people < 4:
            raise ConfigError(f"n_people must be an int >= 4, got {self.n_people!r}")
        if self.anchor_qa_relations not in ("out", "in", "all"):
            raise ConfigError(f"anchor_qa_relations must be 'out', 'in' or 'all', got {self.anchor_qa_relations!r}")
        if self.anchor_alt_format not in ("record", "qa", "none"):
            raise ConfigError(f"anchor_alt_format must be 'record', 'qa' or 'none', got {self.anchor_alt_format!r}")
        if not (0.0 < self.test_fraction < 1.0):
            raise ConfigError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        for name in ("anchor_fraction", "unseen_fraction", "fact_keep"):
            v = getattr(self, name)
            if not (0.0 <= v <= 1.0):
                raise ConfigError(f"{name} must be in [0, 1], got {v!r}")
        if self.max_exposures < 1:
            raise ConfigError(f"max_exposures must be >= 1, got {self.max_exposures!r}")
        for name in ("anchor_qa_docs", "anchor_check_docs", "geography_docs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        pools = dict(self.pool_sizes)
        missing = set(POOL_OF.values()) - set(pools)
        if missing:
            raise ConfigError(f"pool_sizes lacks the pools {sorted(missing)}")
        for k, v in pools.items():
            if v < 2:
                raise ConfigError(f"pool_sizes[{k!r}] must be >= 2, got {v!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pool_sizes"] = [list(p) for p in self.pool_sizes]
        if not d["geography_docs"]:  # a world without geography keeps the settings key it had before the field
            del d["geography_docs"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WorldConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown world config keys: {sorted(unknown)}")
        d = dict(d)
        if "pool_sizes" in d:
            d["pool_sizes"] = tuple((str(k), int(v)) for k, v in (d["pool_sizes"].items()
                                    if isinstance(d["pool_sizes"], dict) else d["pool_sizes"]))
        return cls(**d)

    def digest(self) -> str:
        """A short stable hash of the settings (cache key)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _make_words(rng: random.Random, n: int, taken: set[str], min_syll: int, max_syll: int) -> list[str]:
    """``n`` new capitalised invented words, none a substring of another taken word."""
    out: list[str] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200000:
            raise ValueError(f"could not invent {n} distinct words; lower the pool sizes")
        k = rng.randint(min_syll, max_syll)
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(k)) + rng.choice(_CODAS)
        w = w.capitalize()
        lw = w.lower()
        if len(lw) < 4 or any(lw in t or t in lw for t in taken):
            continue
        taken.add(lw)
        out.append(w)
    return out


def _template_words() -> set[str]:
    words = set()
    for rel in TEMPLATES.values():
        for kind in rel.values():
            for t in kind:
                words.update(w.lower() for w in re.findall(r"[A-Za-z]+", t))
    words.update(w.lower() for w in re.findall(r"[A-Za-z]+", QA_FORMAT + " " + ALT_QA_FORMAT + " " + " ".join(RECORD_LABELS.values())
                                                + " " + " ".join(CHECKS) + " Yes No"))
    return words


def generate_world(config: WorldConfig | None = None) -> dict[str, Any]:
    """Build the world for ``config`` (deterministic for a seed).

    Returns a JSON-serialisable dict with keys ``config``, ``relations`` (name ->
    {domain, pool}), ``pools`` (pool -> list of answers), ``people`` (list of
    {id, name, group, split, exposures, facts}), ``corpus`` (list of documents, each a
    string) and ``facts`` (list of fact rows of the study people, see :func:`fact_rows`).
    """
    config = config or WorldConfig()
    rng = random.Random(config.seed)
    # Template words are reserved so no name or answer contains them (or vice versa).
    taken = {w for w in _template_words() if len(w) >= 4}
    pools = {}
    for pool, size in config.pool_sizes:
        pools[pool] = _make_words(rng, size, taken, 2, 3)
    n_names = max(8, int((config.n_people * 2) ** 0.5) + 4)
    first = _make_words(rng, n_names, taken, 1, 2)
    last = _make_words(rng, n_names, taken, 2, 2)
    names = [f"{f} {l}" for f in first for l in last]
    rng.shuffle(names)
    names = names[: config.n_people]
    if len(names) < config.n_people:  # pragma: no cover - n_names is chosen large enough
        raise ValueError("not enough names")

    n_anchor = int(round(config.anchor_fraction * config.n_people))
    people = []
    for i, name in enumerate(names):
        facts = {rel: rng.choice(pools[POOL_OF[rel]]) for rel in RELATIONS}
        people.append({"id": i, "name": name, "group": "anchor" if i < n_anchor else "study",
                       "facts": facts})
    # Popularity: a Zipf law over a random ordering of the seen people; some study
    # people are never seen. Anchors are always seen (they teach extraction).
    study = [p for p in people if p["group"] == "study"]
    n_unseen = int(round(config.unseen_fraction * len(study)))
    unseen_ids = {p["id"] for p in rng.sample(study, n_unseen)}
    seen = [p for p in people if p["id"] not in unseen_ids]
    order = list(range(len(seen)))
    rng.shuffle(order)
    n_seen = max(1, len(seen) - 1)
    for rank, idx in enumerate(order):
        # log-uniform: exposures = max_exposures ** (1 - rank / n_seen) ** tail
        e = config.max_exposures ** ((1.0 - rank / n_seen) ** config.tail)
        seen[idx]["exposures"] = max(1, int(round(e)))
    for p in people:
        if p["id"] in unseen_ids:
            p["exposures"] = 0
    # Study people are spread evenly between the fine-tuning pool and the test set
    # (test_fraction = 0.5: they alternate).
    for j, p in enumerate(x for x in people if x["group"] == "study"):
        p["split"] = "test" if int((j + 1) * config.test_fraction) > int(j * config.test_fraction) else "train"
    for p in people:
        if p["group"] == "anchor":
            p["split"] = "anchor"

    corpus = []
    for p in people:
        for _ in range(p["exposures"]):
            corpus.append(biography(p, rng, config.fact_keep))
        if p["group"] == "anchor":
            rels = ANCHOR_QA_RELATIONS[config.anchor_qa_relations]
            other = tuple(r for r in RELATIONS if r not in rels)
            for _ in range(config.anchor_qa_docs):
                corpus.append(qa_document(p, rng, rels))
                if other and config.anchor_alt_format == "qa":
                    corpus.append(qa_document(p, rng, other, ALT_QA_FORMAT, "alt_question"))
                elif other and config.anchor_alt_format == "record":
                    corpus.append(record_document(p, rng, other))
            for _ in range(config.anchor_check_docs):
                corpus.append(check_document(p, rng, pools))
    countries = city_countries(pools, config)
    corpus += geography_documents(countries, config)
    rng.shuffle(corpus)

    relations = {rel: {"domain": "in" if rel in IN_DOMAIN else "out", "pool": POOL_OF[rel]}
                 for rel in RELATIONS}
    world = {"config": config.to_dict(), "digest": config.digest(), "relations": relations,
             "pools": pools, "people": people, "corpus": corpus, "city_country": countries}
    world["facts"] = fact_rows(world, seed=config.seed)
    return world


def city_countries(pools: dict, config: WorldConfig) -> dict:
    """``{city: country}``: each city of the ``city`` pool in a country of the ``country`` pool (a seeded stream
    of its own, so the people and their text do not depend on it)."""
    geo = random.Random(f"{config.seed}:geography")
    return {c: geo.choice(pools["country"]) for c in pools["city"]}


def geography_documents(countries: dict, config: WorldConfig) -> list:
    """``geography_docs`` passes over the cities in seeded orders, each city's country stated once a pass, six
    cities a document (:data:`GEO_TEMPLATES`)."""
    geo = random.Random(f"{config.seed}:geography:documents")
    docs = []
    for _ in range(config.geography_docs):
        cities = list(countries)
        geo.shuffle(cities)
        docs += [" ".join(geo.choice(GEO_TEMPLATES).format(city=c, country=countries[c]) for c in cities[i:i + 6])
                 for i in range(0, len(cities), 6)]
    return docs


def biography(person: dict, rng: random.Random, fact_keep: float = 1.0) -> str:
    """One biography of ``person``: its facts in random order with random templates.

    Each fact is kept with probability ``fact_keep`` (at least one fact always is).
    """
    rels = list(RELATIONS)
    rng.shuffle(rels)
    kept = [r for r in rels if rng.random() < fact_keep] or [rels[0]]
    sentences = [rng.choice(TEMPLATES[r]["bio"]).format(name=person["name"], v=person["facts"][r])
                 for r in kept]
    return " ".join(sentences)


ANCHOR_QA_RELATIONS = {"out": OUT_OF_DOMAIN, "in": IN_DOMAIN, "all": RELATIONS}


def qa_document(person: dict, rng: random.Random, relations=RELATIONS, fmt: str = QA_FORMAT,
                kind: str = "question") -> str:
    """Question-answer text about ``person`` on ``relations`` in the format ``fmt`` with the question
    templates ``kind`` (``question``: the study's; ``alt_question``: other wordings), shuffled (mixed training)."""
    rels = list(relations)
    rng.shuffle(rels)
    parts = []
    for r in rels:
        q = rng.choice(TEMPLATES[r][kind]).format(name=person["name"])
        parts.append(fmt.format(question=q) + " " + person["facts"][r] + ".")
    return " ".join(parts)


def record_document(person: dict, rng: random.Random, relations) -> str:
    """Attribute records of ``person`` on ``relations`` ("Name | birth city: Value."), shuffled."""
    rels = list(relations)
    rng.shuffle(rels)
    return " ".join(RECORD_FORMAT.format(name=person["name"], label=RECORD_LABELS[r]) + " " + person["facts"][r] + "."
                    for r in rels)


def check_document(person: dict, rng: random.Random, pools: dict) -> str:
    """Yes/no and counting questions about ``person``'s own facts in :data:`ALT_QA_FORMAT`: whether a value
    is one of their facts (the true one or another of its pool, half each), how many of their three cities
    are a given city (0-3) and in how many different cities they were born, studied and work (1-3)."""
    rel = rng.choice(RELATIONS)
    true = person["facts"][rel]
    value = true if rng.random() < 0.5 else rng.choice([v for v in pools[POOL_OF[rel]] if v != true])
    cities = [person["facts"][r] for r in CITIES]
    city = rng.choice(cities) if rng.random() < 0.5 else rng.choice([v for v in pools["city"] if v not in cities])
    parts = [(CHECKS[0].format(value=value, label=RECORD_LABELS[rel], name=person["name"]),
              "Yes" if value == true else "No"),
             (CHECKS[1].format(name=person["name"], city=city), str(cities.count(city))),
             (CHECKS[2].format(name=person["name"]), str(len(set(cities))))]
    rng.shuffle(parts)
    return " ".join(ALT_QA_FORMAT.format(question=q) + f" {a}." for q, a in parts)


def qa_prompt(question: str) -> str:
    """The prompt used for every closed-book question (pretraining QA text, fine-tuning, tests)."""
    return QA_FORMAT.format(question=question)


def fact_rows(world: dict, seed: int = 0) -> list[dict]:
    """Fact rows of the study people (the ones mastery is measured on).

    Each row: ``id`` ("<person>:<relation>"), ``person``, ``name``, ``relation``,
    ``domain`` ("in"/"out"), ``split`` ("train"/"test"), ``exposures``, ``answer``,
    ``question`` (one seeded question template), ``prompt`` (the QA prompt),
    ``probes`` (all completion probes of the relation).
    """
    rng = random.Random(seed + 1)
    rows = []
    for p in world["people"]:
        if p["group"] != "study":
            continue
        for rel in RELATIONS:
            q = rng.choice(TEMPLATES[rel]["question"]).format(name=p["name"])
            rows.append({
                "id": f"{p['id']}:{rel}", "person": p["id"], "name": p["name"], "relation": rel,
                "domain": "in" if rel in IN_DOMAIN else "out", "split": p["split"],
                "exposures": p["exposures"], "answer": p["facts"][rel], "question": q,
                "prompt": qa_prompt(q),
                "probes": [t.format(name=p["name"]) for t in TEMPLATES[rel]["probe"]],
            })
    return rows


def all_texts(world: dict) -> list[str]:
    """Every text the tokenizer must cover: corpus, prompts, probes and answers."""
    texts = list(world["corpus"])
    for f in world["facts"]:
        texts.append(f["prompt"] + " " + f["answer"] + ".")
        texts.extend(f["probes"])
    for p in world["people"]:
        texts.append(p["name"])
    for pool in world["pools"].values():
        texts.append(" ".join(pool))
    return texts


def save_world(world: dict, out_dir) -> None:
    """Write ``world.json``, ``corpus.jsonl`` and ``facts.jsonl`` into ``out_dir`` atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in world.items() if k not in ("corpus", "facts")}
    atomic_write_text(out / "world.json", json.dumps(meta, indent=1))
    atomic_write_text(out / "corpus.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in world["corpus"]))
    atomic_write_text(out / "facts.jsonl", "".join(json.dumps(f) + "\n" for f in world["facts"]))


def load_world(out_dir) -> dict:
    """Read back a world written by :func:`save_world`."""
    out = Path(out_dir)
    if not (out / "world.json").exists():
        raise FileNotFoundError(f"no world.json in {out} (run `rankwise world build --out {out}`)")
    world = json.loads((out / "world.json").read_text())
    world["corpus"] = [json.loads(l)["text"] for l in (out / "corpus.jsonl").read_text().splitlines() if l]
    world["facts"] = [json.loads(l) for l in (out / "facts.jsonl").read_text().splitlines() if l]
    return world


