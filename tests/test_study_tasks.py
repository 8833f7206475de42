"""The rank study's tasks read in their published schemas (rows as the Hub and the original releases ship them),
their training rows, and the scoring of a model's output."""
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rankwise.errors import ConfigError
from rankwise.study_tasks import extract, mathqa_options, read_task, score

GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
               "altogether in April and May.\n#### 72"},
    {"question": "A shop sold 1,200 pens. How many?", "answer": "It sold 1,200 pens.\n#### 1,200"}]
MATHQA = [{"Problem": "the banker ' s gain of a certain sum due 3 years hence at 10 % per annum is rs . 36 . what "
                      "is the present worth ?",
           "Rationale": "\"explanation : t = 3 years r = 10 % td = ( bg × 100 ) / tr = ( 36 × 100 ) / ( 3 × 10 ) "
                        "= 12 × 10 = rs . 120 answer : option a\"",
           "options": "a ) rs . 400 , b ) rs . 300 , c ) rs . 500 , d ) rs . 350 , e ) none of these",
           "correct": "a", "annotated_formula": "divide(multiply(const_100, divide(multiply(36, const_100), "
                                                "multiply(3, 10))), multiply(3, 10))", "category": "gain"}]
MMLU = [{"question": "Find the degree for the given field extension Q(sqrt(2)) over Q.", "subject": "abstract_algebra",
         "choices": ["0", "2", "1", "3"], "answer": 1}]
MEDMCQA = [{"id": "e9ad821a-c438-4965-9f77-760819dfa155", "question": "Chronic urethral obstruction due to benign "
            "prismatic hyperplasia can lead to the following change in kidney parenchyma",
            "opa": "Hyperplasia", "opb": "Hyperophy", "opc": "Atrophy", "opd": "Dyplasia", "cop": 2,
            "choice_type": "single", "exp": "Chronic urethral obstruction ...", "subject_name": "Anatomy",
            "topic_name": "Urinary tract"}]


def write(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_gsm8k_items_train_on_the_solution_and_score_its_number(tmp_path):
    items = read_task("gsm8k", write(tmp_path / "test.jsonl", GSM8K))
    a, b = items
    assert a["prompt"].startswith("Question: Natalia") and a["prompt"].endswith("\nAnswer:")
    assert a["completion"] == " " + GSM8K[0]["answer"] and a["answer"] == "72" and b["answer"] == "1200"
    assert score("She sold 24 in May, 72 in all.\n#### 72", a) and score(" #### 72.00", a)
    assert score("so 70 + 2 = 72", a) and not score("so 70 + 2 = 72", a, flexible=False)
    assert not score("#### 71 because 72", a) and extract("no number", a) is None
    assert score("#### 1,200", b) and score("1200 pens", b)


def test_mathqa_items_train_on_the_rationale_then_the_letter(tmp_path):
    (item,) = read_task("mathqa", write(tmp_path / "train.json", MATHQA))
    assert item["choices"] == ["rs . 400", "rs . 300", "rs . 500", "rs . 350", "none of these"]
    assert item["prompt"].splitlines()[1:] == ["A. rs . 400", "B. rs . 300", "C. rs . 500", "D. rs . 350",
                                               "E. none of these", "Answer:"]
    assert item["completion"].startswith(" explanation : t = 3") and item["completion"].endswith("\nAnswer: A")
    assert item["answer"] == "A" and item["subject"] == "gain"
    assert score("t = 3 ... so option a.\nAnswer: A", item) and not score("Answer: B. A is wrong", item)
    assert mathqa_options("a ) 1 , b ) 2,5 , c ) - 3", "x") == ["1", "2,5", "- 3"]
    with pytest.raises(ConfigError, match="are not 'a \\) ... , b \\) ...'"):
        mathqa_options("1, 2, 3", "x")


def test_mmlu_from_the_hub_schema_and_from_the_original_csv(tmp_path):
    (item,) = read_task("mmlu", write(tmp_path / "test.parquet", MMLU))
    assert item["answer"] == "B" and item["completion"] == " B" and item["subject"] == "abstract_algebra"
    assert item["prompt"].splitlines()[1:] == ["A. 0", "B. 2", "C. 1", "D. 3", "Answer:"]
    path = tmp_path / "college_biology_test.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["Which of these, if any, is a cell?", "A, or B", "virus", "prion", "none", "A"],
                                 ["2+2?", "3", "4", "5", "6", "B"]])
    items = read_task("mmlu", str(path))
    assert [(i["answer"], i["subject"]) for i in items] == [("A", "college_biology"), ("B", "college_biology")]
    assert items[0]["choices"][0] == "A, or B"
    assert score(" B", items[1]) and score("The answer is B.", items[1]) and not score("Answer: C", items[1])


def test_medmcqa_from_the_hub_schema_and_the_original_count(tmp_path):
    (item,) = read_task("medmcqa", write(tmp_path / "validation.jsonl", MEDMCQA))
    assert item["answer"] == "C" and item["id"] == MEDMCQA[0]["id"] and item["subject"] == "Anatomy"
    (orig,) = read_task("medmcqa", write(tmp_path / "dev.json", MEDMCQA), cop_base=1)
    assert orig["answer"] == "B"
    bad = [dict(MEDMCQA[0], cop=4)]
    with pytest.raises(ConfigError, match="'cop' is 4, not 0-3") as e:
        read_task("medmcqa", write(tmp_path / "bad.jsonl", bad))
    assert "bad.jsonl row 0" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("task, row, words", [
    ("gsm8k", {"question": "q", "answer": "no final line"}, "does not end with '#### <number>'"),
    ("gsm8k", {"question": "q"}, "needs 'answer'"),
    ("mathqa", dict(MATHQA[0], correct="f"), "'correct' is 'f'"),
    ("mmlu", dict(MMLU[0], answer=4), "'answer' is 4"),
    ("mmlu", dict(MMLU[0], choices=["a", "b"]), "a list of four strings"),
    ("medmcqa", dict(MEDMCQA[0], opd=""), "needs the four options")])
def test_a_row_off_its_schema_is_one_line_naming_it(tmp_path, task, row, words):
    with pytest.raises(ConfigError, match=words) as e:
        read_task(task, write(tmp_path / "d.jsonl", [row]))
    assert "d.jsonl row 0" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="expected one of gsm8k"):
        read_task("gsm9k", str(tmp_path / "d.jsonl"))


def test_the_scorer_reads_the_models_own_answer_not_a_question_it_goes_on_to(tmp_path):
    (mc,) = read_task("mmlu", write(tmp_path / "m.jsonl", MMLU))
    gsm = read_task("gsm8k", write(tmp_path / "g.jsonl", GSM8K))[0]
    assert score(" B\n\nQuestion: What is 2+2?\nA. 3\nB. 4\nAnswer: D", mc)
    assert extract(" A train goes to town.", mc) is None and extract(" (B)", mc) == "B"
    assert extract(" B.", mc) == "B" and extract("The answer is B.", mc) == "B" and extract(" Bob", mc) is None
    assert score("24 in May, 72 in all.\n#### 72\n\nQuestion: Tom has 5 apples.\nAnswer: 5 + 1 = 6\n#### 6", gsm)
    assert score("so 72 clips\nQuestion: Tom has 5 apples, eats 2; 3 left.", gsm)  # the last number of its own


def test_mathqa_options_as_a_list_or_its_text(tmp_path):
    rows = [dict(MATHQA[0], options=["a ) rs . 400", "b ) rs . 300", "c ) rs . 500", "d ) rs . 350", "e ) none"]),
            dict(MATHQA[0], options="['a ) rs . 400', 'b ) rs . 300', 'c ) rs . 500', 'd ) rs . 350', 'e ) none']")]
    for item in read_task("mathqa", write(tmp_path / "l.jsonl", rows)):
        assert item["choices"] == ["rs . 400", "rs . 300", "rs . 500", "rs . 350", "none"]
    path = tmp_path / "x_test.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerow(["q?", "1", "2", "3", "4", "AB"])
    with pytest.raises(ConfigError, match="four choices and the letter"):
        read_task("mmlu", str(path))


def test_entity_questions_items_from_the_released_layout_scored_by_containment(tmp_path):
    d = tmp_path / "dataset" / "test"
    d.mkdir(parents=True)
    (d / "P19.test.json").write_text(json.dumps([{"question": "Where was Ada Roe born?",
                                                  "answers": ["New York City", "NYC"]}]))
    (d / "P20.test.jsonl").write_text(json.dumps({"question": "Where did Bo Li die?", "answers": ["Oslo"]}) + "\n")
    items = read_task("entity_questions", str(tmp_path / "dataset"))
    assert [(it["subject"], it["prompt"], it["completion"]) for it in items] == [
        ("P19", "Question: Where was Ada Roe born?\nAnswer:", " New York City"),
        ("P20", "Question: Where did Bo Li die?\nAnswer:", " Oslo")]
    assert score(" in NYC, in 1815.", items[0]) and score(" new york city", items[0])
    assert not score(" Boston\nQuestion: Where was X born?\nAnswer: New York City", items[0])  # its own answer only
    assert not score(" Paris", items[0])
    assert len(read_task("entity_questions", str(d / "P19.test.json"))) == 1
    with pytest.raises(ConfigError, match="no such file or directory"):
        read_task("entity_questions", str(tmp_path / "nope"))
    (d / "P19.test.json").write_text(json.dumps([{"question": "Who is Ada?", "answers": ["x"]}]))
    with pytest.raises(ConfigError, match="does not fit P19's template"):
        read_task("entity_questions", str(tmp_path / "dataset"))


def test_prompt_completion_items_with_and_without_answers(tmp_path):
    rows = [{"prompt": "2+2=", "completion": " 4"}, {"prompt": "Capital of Peru?", "completion": " Lima, a city.",
                                                   "answers": ["Lima", "Ciudad de los Reyes"]},
            {"prompt": "x", "completion": " y", "answers": "Y"}]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = read_task("prompt_completion", str(tmp_path / "pc.jsonl"))
    assert [it["answer"] for it in items] == [["4"], ["Lima", "Ciudad de los Reyes"], ["Y"]]
    assert [it["prompt"] + it["completion"] for it in items] == [r["prompt"] + r["completion"] for r in rows]
    assert score(" 4.", items[0]) and not score(" 5", items[0]) and score(" ciudad de los reyes", items[1])
    for bad, words in (({"prompt": "p"}, "needs 'prompt' and 'completion'"),
                       ({"prompt": "p", "completion": "c", "answers": []}, "'answers' must be")):
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(ConfigError, match=words):
            read_task("prompt_completion", str(tmp_path / "bad.jsonl"))
