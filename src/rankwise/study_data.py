"""The studies' datasets in their published schemas, read into plain rows.

EntityQuestions (Sciavolino et al., 2021; princeton-nlp/EntityQuestions) ships one file per relation and split,
``dataset/<split>/<relation>.<split>.json`` (a JSON list) or ``.jsonl``, each row ``{"question", "answers"}``.
The relation is in the file name; the subject is the part of the question its relation's template leaves open
(``QUESTION_TEMPLATES``, the dataset's ``relation_query_templates.json``). ``read_entity_questions`` returns
facts ``{"id", "relation", "subject", "question", "answers"}``; a row whose question does not fit its template
is one clear error naming the file and the row. Facts can also come as JSON lines ``{"subject", "relation",
"answers"}`` (``read_facts``; ``question`` optional), the generic form of any closed-book QA set.

The knowledge study (Ye et al., 2025) trains and tests in domain on ten location relations (``IN_DOMAIN``) and
tests out of domain on the other fourteen (``OUT_OF_DOMAIN``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional

from .errors import ConfigError, one_line

#: EntityQuestions' question template of each relation; ``[X]`` is the subject
QUESTION_TEMPLATES = {
    "P17": "Which country is [X] located in?", "P19": "Where was [X] born?", "P20": "Where did [X] die?",
    "P26": "Who is [X] married to?", "P36": "What is the capital of [X]?", "P40": "Who is [X]'s child?",
    "P50": "Who is the author of [X]?", "P69": "Where was [X] educated?", "P106": "What kind of work does [X] do?",
    "P112": "Who founded [X]?", "P127": "Who owns [X]?", "P131": "Where is [X] located?",
    "P136": "What type of music does [X] play?", "P159": "Where is the headquarter of [X]?",
    "P170": "Who was [X] created by?", "P175": "Who performed [X]?", "P176": "Which company is [X] produced by?",
    "P264": "What music label is [X] represented by?", "P276": "Where is [X] located?",
    "P407": "Which language was [X] written in?", "P413": "What position does [X] play?",
    "P495": "Which country was [X] created in?", "P740": "Where was [X] founded?",
    "P800": "What is [X] famous for?",
}
IN_DOMAIN = ("P17", "P19", "P20", "P36", "P69", "P131", "P159", "P276", "P495", "P740")
OUT_OF_DOMAIN = tuple(r for r in QUESTION_TEMPLATES if r not in IN_DOMAIN)
_FILE = re.compile(r"^(P\d+)\.(\w+)\.jsonl?$")


def _template_regex(template: str) -> re.Pattern:
    head, _, tail = template.partition("[X]")
    return re.compile(re.escape(head) + r"(.+)" + re.escape(tail) + r"$", re.DOTALL)


_REGEXES = {r: _template_regex(t) for r, t in QUESTION_TEMPLATES.items()}


def _rows_of(path: Path) -> list:
    """A ``.json`` file's list, or a ``.jsonl`` file's lines, as dicts; one clear error otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {one_line(e)}") from None
    try:
        if path.suffix == ".json":
            rows = json.loads(text)
            if not isinstance(rows, list):
                raise ConfigError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
            return rows
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}: line {n} is not JSON ({e.msg})") from None
        return rows
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None


def _answers(row, where: str) -> list:
    answers = row.get("answers") if isinstance(row, dict) else None
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ConfigError(f"{where}: needs 'answers', a non-empty list of non-empty strings")
    return answers


def entity_question_files(path, split: Optional[str] = None, relations: Optional[Iterable] = None) -> list:
    """The EntityQuestions files under ``path`` (a directory, searched recursively, or one file) as sorted
    ``(relation, split, file)``, of ``split`` and ``relations`` when given; a ``.json`` and a ``.jsonl`` of
    the same relation and split count once (the ``.jsonl``)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    candidates = [path] if path.is_file() else sorted(p for p in path.rglob("P*.json*") if p.is_file())
    found = {}
    for p in candidates:
        m = _FILE.match(p.name)
        if not m:
            if path.is_file():
                raise ConfigError(f"{p}: not an EntityQuestions file name (P<id>.<split>.json or .jsonl)")
            continue
        rel, sp = m.groups()
        if (split is None or sp == split) and (relations is None or rel in set(relations)):
            key = (rel, sp)
            if key not in found or p.suffix == ".jsonl":
                found[key] = p
    if not found:
        what = f" of split {split!r}" if split else ""
        raise ConfigError(f"{path}: no EntityQuestions files{what} (P<id>.<split>.json or .jsonl)")
    return [(rel, sp, p) for (rel, sp), p in sorted(found.items(), key=lambda kv: (int(kv[0][0][1:]), kv[0][1]))]


def read_entity_questions(path, split: Optional[str] = None, relations: Optional[Iterable] = None) -> list:
    """Facts ``{"id", "relation", "subject", "question", "answers"}`` of the EntityQuestions files under
    ``path`` (see ``entity_question_files``), ids ``"<relation>.<split>.<row>"``."""
    facts = []
    for rel, sp, p in entity_question_files(path, split, relations):
        regex = _REGEXES.get(rel)
        if regex is None:
            raise ConfigError(f"{p}: relation {rel} is not one of EntityQuestions' ({', '.join(QUESTION_TEMPLATES)})")
        for i, row in enumerate(_rows_of(p)):
            where = f"{p} row {i}"
            q = row.get("question") if isinstance(row, dict) else None
            m = regex.match(q.strip()) if isinstance(q, str) else None
            if not m:
                raise ConfigError(f"{where}: the question {q!r} does not fit {rel}'s template "
                                  f"{QUESTION_TEMPLATES[rel]!r}")
            facts.append({"id": f"{rel}.{sp}.{i}", "relation": rel, "subject": m.group(1).strip(),
                          "question": q.strip(), "answers": _answers(row, where)})
    return facts


def read_facts(path) -> list:
    """Facts from JSON lines ``{"subject", "relation", "answers"}`` (``id`` and ``question`` optional; an id
    defaults to the line number)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    facts, seen = [], set()
    for i, row in enumerate(_rows_of(path)):
        where = f"{path} row {i}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected a JSON object")
        for key in ("subject", "relation"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ConfigError(f"{where}: needs {key!r}, a non-empty string")
        fid = str(row.get("id", i))
        if fid in seen:
            raise ConfigError(f"{where}: the id {fid!r} occurs twice")
        seen.add(fid)
        facts.append({"id": fid, "relation": row["relation"].strip(), "subject": row["subject"].strip(),
                      "question": row.get("question"), "answers": _answers(row, where)})
    return facts


def load_facts(path, data_format: str = "auto", split: Optional[str] = None,
               relations: Optional[Iterable] = None) -> list:
    """Facts from ``path`` in ``data_format``: ``entity_questions`` (a directory or file of EntityQuestions),
    ``facts`` (JSON lines), or ``auto`` (EntityQuestions for a directory or a ``P<id>.<split>.json[l]`` file)."""
    p = Path(path)
    if data_format == "auto":
        data_format = "entity_questions" if (p.is_dir() or _FILE.match(p.name)) else "facts"
    if data_format == "entity_questions":
        return read_entity_questions(p, split, relations)
    if data_format != "facts":
        raise ConfigError(f"data format {data_format!r}: expected auto, entity_questions or facts")
    facts = read_facts(p)
    if relations is not None:
        keep = set(relations)
        facts = [f for f in facts if f["relation"] in keep]
    return facts


def read_templates(path) -> dict:
    """Completion templates per relation from a JSON file ``{relation: [template, ...]}`` or JSON lines
    ``{"relation", "template"}``; each template holds the subject's slot ``[X]`` (or ``{subject}``) once and
    reads as the start of a sentence the answer completes (``"[X] was born in"``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--templates: {path}: no such file")
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"--templates: cannot read {path}: {one_line(e)}") from None
        if not isinstance(rows, dict):
            raise ConfigError(f"--templates: {path}: expected a JSON object {{relation: [templates]}}")
        pairs = [(rel, t) for rel, ts in rows.items() for t in (ts if isinstance(ts, list) else [ts])]
    else:
        pairs = [(r.get("relation"), r.get("template")) if isinstance(r, dict) else (None, None)
                 for r in _rows_of(path)]
    out: dict = {}
    for i, (rel, t) in enumerate(pairs):
        if not isinstance(rel, str) or not isinstance(t, str):
            raise ConfigError(f"--templates: {path}: entry {i} needs a relation and a template string")
        t = t.replace("{subject}", "[X]")
        if t.count("[X]") != 1:
            raise ConfigError(f"--templates: {path}: the template {t!r} of {rel} must hold [X] (the subject) once")
        out.setdefault(rel, []).append(t)
    if not out:
        raise ConfigError(f"--templates: {path} holds no templates")
    return out
