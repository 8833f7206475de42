"""The rank study's tasks in their published schemas: GSM8K, MathQA, MMLU, MedMCQA, EntityQuestions and any
prompt/completion data, as items to train on and to score.

Each reader turns the rows of a data set, as its publisher ships them (the Hugging Face Hub's schema, and the
original release where it differs), into items ``{"id", "task", "prompt", "completion", "answer", "choices",
"subject"}``: ``prompt`` + ``completion`` is a training row (rankwise's ``prompt_completion`` format), ``answer``
what ``score`` compares a model's output with.

- ``gsm8k`` (``openai/gsm8k``, config ``main``): ``{"question", "answer"}``, the answer a worked solution
  ending ``#### <number>``. The completion is that solution; the answer its number (commas dropped). A model's
  output is scored by the number after its ``####`` (lm-evaluation-harness's strict match), else its last
  number (its flexible match) when ``flexible``.
- ``mathqa`` (``allenai/math_qa``): ``{"Problem", "Rationale", "options", "correct"}``, options as the text
  ``"a ) 38 , b ) 27.675 , ..."``. The completion is the rationale, then ``Answer: <letter>``.
- ``mmlu`` (``cais/mmlu``): ``{"question", "subject", "choices", "answer"}`` with ``answer`` the index of
  the right choice (0-3); the original CSV files (no header: question, four choices, the letter) too.
- ``medmcqa`` (``openlifescienceai/medmcqa``): ``{"question", "opa".."opd", "cop", "subject_name"}``, ``cop``
  the index of the right option (0-3, the Hub's ``ClassLabel``; the original release counted from 1: pass
  ``cop_base=1``).

- ``entity_questions`` (princeton-nlp/EntityQuestions, local files: ``dataset/<split>/P<id>.<split>.json[l]``,
  ``rankwise.study_data``): ``{"question", "answers"}``; the prompt ``Question: <q>\nAnswer:``, the completion
  the first answer; the item's ``subject`` is its relation (``P19``), so ``subjects`` chooses relations.
- ``prompt_completion`` (any data set): ``{"prompt", "completion"}`` and optional ``answers`` (a string or a
  list of aliases; default: the completion). The prompt and completion are used as they are.

``entity_questions`` and ``prompt_completion`` answers are scored as the knowledge study scores them: right when
an answer (or alias) is contained in the output, normalised (``rankwise.evaluate.is_correct``).

Multiple-choice prompts list the choices as ``A. ...`` lines and end with ``Answer:``; the completion of a
recall task (MMLU, MedMCQA) is the letter alone, of a reasoning task (MathQA) the rationale then
``Answer: <letter>``. An output is scored by the letter after its last ``Answer:``, else its first standalone
letter among the choices'. A row that does not fit its schema is one ``ConfigError`` naming the row.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Optional

from .data import load_rows
from .errors import ConfigError
from .evaluate import is_correct
from .study_data import entity_question_files, read_entity_questions

TASKS = ("gsm8k", "mathqa", "mmlu", "medmcqa", "entity_questions", "prompt_completion")
REASONING = ("gsm8k", "mathqa")
CONTAINED = ("entity_questions", "prompt_completion")  # scored by an answer contained in the output
LETTERS = "ABCDE"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_STRICT = re.compile(r"####\s*(-?[\d,]+(?:\.\d+)?)")
_OPTION = re.compile(r"(?:^|,)\s*([a-e])\s*\)\s*")


def _text(row: dict, key: str, where: str) -> str:
    v = row.get(key) if isinstance(row, dict) else None
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{where}: needs {key!r}, a non-empty string")
    return v.strip()


def _number(text: str) -> str:
    """A number as scored: commas dropped, a trailing ``.0...`` dropped (``"1,000.00"`` -> ``"1000"``)."""
    n = text.replace(",", "").rstrip(".")
    if "." in n:
        n = n.rstrip("0").rstrip(".")
    return n


def mc_prompt(question: str, choices: list) -> str:
    lines = [f"Question: {question}"] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + "\nAnswer:"


def gsm8k_item(row: dict, i: int, where: str) -> dict:
    q, a = _text(row, "question", where), _text(row, "answer", where)
    m = _STRICT.search(a)
    if not m:
        raise ConfigError(f"{where}: the answer does not end with '#### <number>'")
    return {"id": str(i), "task": "gsm8k", "prompt": f"Question: {q}\nAnswer:", "completion": " " + a,
            "answer": _number(m.group(1)), "choices": None, "subject": None}


def mathqa_options(text: str, where: str) -> list:
    """``"a ) 38 , b ) 27.675 , c ) 30"`` -> ``["38", "27.675", "30"]`` (letters a, b, ... in order)."""
    marks = list(_OPTION.finditer(text))
    if len(marks) < 2 or [m.group(1) for m in marks] != list("abcde"[:len(marks)]):
        raise ConfigError(f"{where}: options {text[:80]!r} are not 'a ) ... , b ) ...'")
    return [text[m.end():(marks[j + 1].start() if j + 1 < len(marks) else len(text))].strip(" ,")
            for j, m in enumerate(marks)]


def mathqa_item(row: dict, i: int, where: str) -> dict:
    problem, rationale = _text(row, "Problem", where), _text(row, "Rationale", where).strip('"')
    options = row.get("options") if isinstance(row, dict) else None
    if isinstance(options, list):  # some copies keep the options as a list of "a ) ..." strings
        options = " , ".join(str(o) for o in options)
    elif isinstance(options, str) and options.strip().startswith("["):  # or as that list's text
        options = ", ".join(o.strip(" '\"") for o in options.strip().strip("[]").split("', "))
    choices = mathqa_options(_text({"options": options}, "options", where), where)
    correct = _text(row, "correct", where).lower()
    if len(correct) != 1 or correct not in "abcde"[:len(choices)]:
        raise ConfigError(f"{where}: 'correct' is {correct!r}, not one of the options' letters")
    letter = correct.upper()
    return {"id": str(i), "task": "mathqa", "prompt": mc_prompt(problem, choices),
            "completion": f" {rationale}\nAnswer: {letter}", "answer": letter, "choices": choices,
            "subject": row.get("category")}


def mmlu_item(row, i: int, where: str) -> dict:
    if isinstance(row, (list, tuple)):  # the original CSV: question, A, B, C, D, letter
        if len(row) != 6 or str(row[5]).strip() not in ("A", "B", "C", "D"):
            raise ConfigError(f"{where}: an MMLU CSV row holds a question, four choices and the letter")
        row = {"question": row[0], "choices": list(row[1:5]), "answer": "ABCD".index(row[5].strip())}
    q = _text(row, "question", where)
    choices, answer = row.get("choices"), row.get("answer")
    if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise ConfigError(f"{where}: needs 'choices', a list of four strings")
    if isinstance(answer, str) and len(answer) == 1 and answer in "ABCD":
        answer = "ABCD".index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
        raise ConfigError(f"{where}: 'answer' is {answer!r}, not the index 0-3 of the right choice")
    return {"id": str(i), "task": "mmlu", "prompt": mc_prompt(q, choices), "completion": f" {LETTERS[answer]}",
            "answer": LETTERS[answer], "choices": choices, "subject": row.get("subject")}


def medmcqa_item(row: dict, i: int, where: str, cop_base: int = 0) -> dict:
    q = _text(row, "question", where)
    choices = [str(row.get(k, "")).strip() for k in ("opa", "opb", "opc", "opd")]
    if not all(choices):
        raise ConfigError(f"{where}: needs the four options 'opa', 'opb', 'opc' and 'opd'")
    cop = row.get("cop")
    if isinstance(cop, bool) or not isinstance(cop, int) or not 0 <= cop - cop_base < 4:
        raise ConfigError(f"{where}: 'cop' is {cop!r}, not {cop_base}-{cop_base + 3} (the index of the right "
                          f"option; the Hub's schema counts from 0, the original release from 1: cop_base)")
    k = cop - cop_base
    return {"id": str(row.get("id", i)), "task": "medmcqa", "prompt": mc_prompt(q, choices),
            "completion": f" {LETTERS[k]}", "answer": LETTERS[k], "choices": choices,
            "subject": row.get("subject_name")}


def prompt_completion_item(row: dict, i: int, where: str) -> dict:
    prompt = row.get("prompt") if isinstance(row, dict) else None
    completion = row.get("completion") if isinstance(row, dict) else None
    if not isinstance(prompt, str) or not prompt.strip() or not isinstance(completion, str) or not completion.strip():
        raise ConfigError(f"{where}: needs 'prompt' and 'completion', non-empty strings")
    answers = row.get("answers", [completion.strip()])
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ConfigError(f"{where}: 'answers' must be a non-empty string or list of non-empty strings")
    return {"id": str(row.get("id", i)), "task": "prompt_completion", "prompt": prompt, "completion": completion,
            "answer": answers, "choices": None, "subject": row.get("subject")}


def entity_questions_items(source: str, where: str, split: Optional[str] = None) -> list:
    """EntityQuestions facts of ``split`` under ``source`` (a directory or one file) as items, the relation as
    the subject; a directory holding several splits needs ``split`` (train and test facts never mix)."""
    if not Path(source).exists():
        raise ConfigError(f"{where}: no such file or directory (EntityQuestions is read from its released files)")
    if split is None:
        splits = sorted({sp for _, sp, _ in entity_question_files(source)})
        if len(splits) > 1:
            raise ConfigError(f"{where}: holds the splits {', '.join(splits)}; name one (split: train, dev or test)")
    return [{"id": f["id"], "task": "entity_questions", "prompt": f"Question: {f['question']}\nAnswer:",
             "completion": " " + f["answers"][0], "answer": f["answers"], "choices": None, "subject": f["relation"]}
            for f in read_entity_questions(source, split=split)]


def _mmlu_csv(path: Path) -> Optional[tuple]:
    """``(rows, subject)`` of an original MMLU CSV file (no header; the subject is the file's name without
    its split, ``abstract_algebra_test.csv``), or None when the file has a header (the Hub's columns)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"mmlu data {path}: cannot read it ({e})") from None
    if rows and rows[0][:1] == ["question"]:
        return None
    subject = re.sub(r"_(test|dev|val)$", "", path.stem)
    return rows, subject


def hub_rows(source: str, config: str, where: str) -> list:
    """The rows of the Hub data set ``name[:split]`` in its configuration ``config`` (``datasets.load_dataset``;
    the split defaults to ``train``)."""
    import datasets  # heavy at import: Hub data sets only

    name, _, split = source.partition(":")
    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as e:  # the Hub raises many kinds; say which source failed
        raise ConfigError(f"{where}: cannot load the Hub data set {name!r} (config {config!r}, split "
                          f"{split or 'train'!r}): {' '.join(str(e).split())[:300]}") from None
    return [dict(r) for r in ds]


def read_task(task: str, source: str, *, limit: Optional[int] = None, cop_base: int = 0,
              config: Optional[str] = None, split: Optional[str] = None) -> list:
    """The items of ``task`` from ``source``: a local .json/.jsonl/.csv/.parquet file, or a Hub data set
    ``name[:split]`` (read by ``rankwise.data.load_rows``; with ``config``, that configuration of it, as
    ``openai/gsm8k`` ``main`` or ``cais/mmlu`` ``all``); EntityQuestions from its released files, of ``split``."""
    if task not in TASKS:
        raise ConfigError(f"task {task!r}: expected one of {', '.join(TASKS)}")
    where = f"{task} data {source}"
    path = Path(source)
    subject = None
    if task == "entity_questions":
        items = entity_questions_items(source, where, split)[:limit]
        if not items:
            raise ConfigError(f"{where}: no rows")
        return items
    if config is not None:
        rows = hub_rows(source, config, where)
    elif task == "mmlu" and path.suffix == ".csv" and path.is_file():
        got = _mmlu_csv(path)
        rows, subject = (load_rows(source, where), None) if got is None else got
    else:
        rows = load_rows(source, where)
    make = {"gsm8k": gsm8k_item, "mathqa": mathqa_item, "mmlu": mmlu_item, "prompt_completion": prompt_completion_item,
            "medmcqa": lambda r, i, w: medmcqa_item(r, i, w, cop_base)}[task]
    items = []
    for i, row in enumerate(rows[:limit]):
        item = make(row, i, f"{where} row {i}")
        if subject and not item["subject"]:
            item["subject"] = subject
        items.append(item)
    if not items:
        raise ConfigError(f"{where}: no rows")
    return items


_NEXT = re.compile(r"\n\s*Question:")


def own_answer(output: str) -> str:
    """The part of ``output`` that answers the prompt: up to where a model that does not stop begins a new
    ``Question:`` of its own."""
    m = _NEXT.search(output)
    return output[:m.start()] if m else output


def extract(output: str, item: dict, flexible: bool = True) -> Optional[str]:
    """The answer a model's ``output`` gives to ``item``, normalised as ``item["answer"]`` is; None when none.

    The output is cut where it starts a question of its own (``own_answer``). GSM8K: the number after the
    first ``####``, else (``flexible``) the last number. Multiple choice: the choice letter right after the
    first ``Answer:`` (or at the start, or after "answer is"), alone or followed by punctuation, so that an
    article ("A train ...") is not read as choice A."""
    text = own_answer(output)
    if item["task"] in CONTAINED:
        return text.strip() or None
    if item["task"] == "gsm8k":
        m = _STRICT.search(text)
        if m:
            return _number(m.group(1))
        nums = _NUMBER.findall(text) if flexible else []
        return _number(nums[-1]) if nums else None
    letters = LETTERS[:len(item["choices"])]
    tail = text.split("Answer:", 1)[1] if "Answer:" in text else text
    for candidate in (tail, *re.findall(r"(?i)answer is\s*(.*)", text)):
        m = re.match(rf"\s*\(?([{letters}])\)?(?=$|[\s.,:;)]*$|[.,:;)]|\s*\n)", candidate)
        if m:
            return m.group(1)
    return None


def score(output: str, item: dict, flexible: bool = True) -> bool:
    """Whether ``output`` answers ``item`` right: ``extract``'s answer is the item's, or (``CONTAINED`` tasks) an
    answer of the item's is contained in the output's own answer."""
    if item["task"] in CONTAINED:
        return is_correct(own_answer(output), item["answer"])
    return extract(output, item, flexible) == item["answer"]
