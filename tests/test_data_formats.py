"""The row formats of ``data.format`` (``rankwise.formats``): which tokens carry the loss, checked by decoding
them; each format trained end to end on a tiny Llama; the warnings, the seeded eval split, text chunking,
chat templates by name and by path, and one-line refusals.

The README's "Your own data" blocks (a ``data:`` line and a JSONL row per format) are what the
end-to-end runs train on, so the README shows what is tested.
"""
import json
import logging
import math
import re
import string
from pathlib import Path

import pytest
import torch
import yaml
from test_data import CHAT_TEMPLATE, write_jsonl

import rankwise.train as rt
from rankwise import cli
from rankwise import config as C
from rankwise.batches import load_data
from rankwise.data import IGNORE, chunk, collate, qa_items, split_rows, tokenize_rows
from rankwise.errors import ConfigError
from rankwise.formats import (ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, CHAT_TEMPLATES, DEFAULT_FIELDS, FORMATS)

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- builders

def build_tokenizer(path, template=CHAT_TEMPLATE):
    """A character-level tokenizer over printable ASCII (so every template's text round-trips), with the
    built-in templates' special tokens; ``template`` is its own chat template (None: none)."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + chars)}, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tk.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.add_tokens(SPECIALS, special_tokens=True)
    fast.chat_template = template
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def build_model(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """The same tokenizer without a chat template."""
    return build_tokenizer(tmp_path_factory.mktemp("bare"), template=None)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("model"))


def tokens(tok, ids):
    return "".join(tok.convert_ids_to_tokens(ids))


def target_text(tok, examples):
    """The text of the tokens that carry the loss (collate's targets), example by example."""
    out = []
    for ex in examples:
        targets = collate([ex])["targets"][0].tolist()
        out.append(tokens(tok, [t for t in targets if t != IGNORE]))
    return out


def readme_formats() -> dict:
    """format -> (the data keys of its README block, its JSONL row), from README's "Your own data"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own data\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```\n```jsonl\n(.*?)```", section, re.S)
    out = {}
    for cfg, row in blocks:
        data = yaml.safe_load(cfg)["data"]
        out[data["format"]] = (data, json.loads(row))
    return out


# ----------------------------------------------------------------------------- declared once

def test_the_config_offers_every_format_and_field():
    assert C.SCHEMA["data.format"].choices == FORMATS
    assert {k.rpartition(".")[2]: v.default for k, v in C.SCHEMA.items() if k.startswith("data.fields.")} \
        == DEFAULT_FIELDS
    assert C.SCHEMA["data.stride"].default == 0 and C.SCHEMA["data.eval_fraction"].default == 0
    assert C.SCHEMA["data.chat_template"].default is None


def test_the_readme_shows_every_format():
    assert sorted(readme_formats()) == sorted(FORMATS)


# ----------------------------------------------------------------------------- the loss mask, by decoding

def test_prompt_completion_renamed_fields(tok):
    rows = [{"question": "Where?", "answer": " Paris"}]
    (ex,), _ = tokenize_rows(rows, tok, fields={"prompt": "question", "completion": "answer"})
    assert tokens(tok, ex.input_ids) == "<s>Where? Paris</s>"
    assert target_text(tok, [ex]) == [" Paris</s>"]


def test_alpaca_uses_the_stated_template_and_trains_on_output_only(tok):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "output": "hi"}, {"instruction": "Say yo.", "input": "", "output": "yo"}]
    exs, _ = tokenize_rows(rows, tok, format="alpaca")
    with_input = ALPACA_PROMPT.format(instruction="Add the numbers.", input="2 and 3")
    assert "### Input:\n2 and 3\n\n### Response:\n" in with_input
    assert tokens(tok, exs[0].input_ids) == "<s>" + with_input + "5</s>"
    assert tokens(tok, exs[1].input_ids) == "<s>" + ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.") + "hi</s>"
    assert "### Input" not in tokens(tok, exs[2].input_ids)
    assert target_text(tok, exs) == ["5</s>", "hi</s>", "yo</s>"]
    # mapped field names
    (ex,), _ = tokenize_rows([{"task": "Say hi.", "context": "now", "reply": "hi"}], tok, format="alpaca",
                             fields={"instruction": "task", "input": "context", "output": "reply"})
    assert "### Input:\nnow\n" in tokens(tok, ex.input_ids) and target_text(tok, [ex]) == ["hi</s>"]


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "no"}]


def test_sharegpt_is_chat_on_assistant_turns(tok):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    conv = [{"from": names[m["role"]], "value": m["content"]} for m in CONVERSATION]
    (ex,), _ = tokenize_rows([{"conversations": conv}], tok, format="sharegpt")
    (chat,), _ = tokenize_rows([{"messages": CONVERSATION}], tok, format="chat")
    assert ex.input_ids == chat.input_ids and ex.is_target == chat.is_target
    assert tokens(tok, ex.input_ids) == "<s>S:be brief\nU:hi\nA:yo</s>\nU:and?\nA:no</s>\n"
    assert target_text(tok, [ex]) == ["yo</s>\nno</s>\n"]
    # user/assistant are read too; QA prompts are the conversation up to the last assistant turn
    conv2 = [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]
    prompts, golds, add_special = qa_items([{"conversations": conv2, "answer": "yo"}], tok, format="sharegpt")
    assert prompts == ["<s>U:hi\nA:"] and golds == [["yo"]] and add_special is False


@pytest.mark.parametrize("name, full, targets", [
    ("chatml", "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
               "yo<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\nno<|im_end|>\n",
     "yo<|im_end|>\nno<|im_end|>\n"),
    ("llama3", "<s><|start_header_id|>system<|end_header_id|>\n\nbe brief<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nand?<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\nno<|eot_id|>", "yo<|eot_id|>no<|eot_id|>"),
])
def test_chat_template_by_name(bare, name, full, targets):
    (ex,), _ = tokenize_rows([{"messages": CONVERSATION}], bare, format="chat", chat_template=name)
    assert tokens(bare, ex.input_ids) == full
    assert target_text(bare, [ex]) == [targets]
    assert name in CHAT_TEMPLATES


def test_chat_template_by_path_is_read_as_text(bare, tmp_path):
    path = tmp_path / "tiny.jinja"
    path.write_text(CHAT_TEMPLATE)
    (ex,), _ = tokenize_rows([{"messages": CONVERSATION}], bare, format="chat", chat_template=str(path))
    assert tokens(bare, ex.input_ids) == "<s>S:be brief\nU:hi\nA:yo</s>\nU:and?\nA:no</s>\n"
    assert target_text(bare, [ex]) == ["yo</s>\nno</s>\n"]
    prompts, _, _ = qa_items([{"messages": CONVERSATION, "answer": "no"}], bare, format="chat",
                             chat_template=str(path))
    assert prompts == ["<s>S:be brief\nU:hi\nA:yo</s>\nU:and?\nA:"]


def test_text_every_token_is_a_target(tok):
    (ex,), _ = tokenize_rows([{"text": "one two."}], tok, format="text")
    assert tokens(tok, ex.input_ids) == "<s>one two.</s>"
    assert target_text(tok, [ex]) == ["one two.</s>"]


def test_text_chunks_without_and_with_stride(tok):
    text = "abcdefghijklmnopqrstuvwxy"  # 25 characters: 27 tokens with BOS and EOS
    whole = "<s>" + text + "</s>"
    exs, dropped = tokenize_rows([{"text": text}], tok, format="text", max_length=10)
    assert dropped == 0 and [len(e) for e in exs] == [10, 10, 7] and {e.row for e in exs} == {0}
    assert "".join(tokens(tok, e.input_ids) for e in exs) == whole
    # no overlap: the first token of each chunk has no context, so it is nobody's target
    assert target_text(tok, exs) == ["abcdefghi", "klmnopqrs", "uvwxy</s>"]
    assert sum(collate([e])["n_targets"] for e in exs) == 27 - 3
    exs, _ = tokenize_rows([{"text": text}], tok, format="text", max_length=10, stride=3)
    assert [len(e) for e in exs] == [10, 10, 10, 6]  # chunks start at 0, 7, 14, 21
    assert tokens(tok, exs[1].input_ids) == "ghijklmnop"  # repeats the last 3 tokens of the first chunk
    # overlapped tokens are context: every token but the BOS is a target exactly once
    assert "".join(target_text(tok, exs)) == text + "</s>"
    assert sum(collate([e])["n_targets"] for e in exs) == 27 - 1
    # a last chunk of one token (stride 0) has nothing to predict: left out, not counted as dropped
    exs, dropped = tokenize_rows([{"text": text[:19]}], tok, format="text", max_length=10)
    assert [len(e) for e in exs] == [10, 10] and dropped == 0
    assert chunk(list(range(5)), 4, 2) == [([0, 1, 2, 3], [True] * 4), ([2, 3, 4], [False, False, True])]


# ----------------------------------------------------------------------------- warnings

def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "rankwise"]


def test_unused_fields_and_unknown_tokens_warn_once_per_data_set(tok, caplog):
    rows = [{"prompt": f"p{i}", "completion": f" c{i}", "id": i, "source": "web", "answers": ["c"]}
            for i in range(20)]
    with caplog.at_level(logging.WARNING, "rankwise"):
        tokenize_rows(rows, tok)
    (line,) = warnings_of(caplog)
    assert line == ("data.train: data.format prompt_completion reads 'prompt', 'completion' and not the fields "
                    "'id', 'source' of its rows (map names with data.fields)")
    caplog.clear()
    rows = [{"text": "caf\u00e9 \u20ac5 na\u00efve"} for _ in range(20)]  # three characters the tokenizer lacks
    with caplog.at_level(logging.WARNING, "rankwise"):
        tokenize_rows(rows, tok, format="text", name="data.eval")
    (line,) = warnings_of(caplog)
    assert line.startswith("data.eval: 20.0 % of the tokens (60 of 300) are the tokenizer's unknown token <unk>")
    caplog.clear()
    with caplog.at_level(logging.WARNING, "rankwise"):  # clean data: no warning; warn=False: none either
        tokenize_rows([{"text": "clean"}], tok, format="text")
        tokenize_rows(rows, tok, format="text", warn=False)
    assert warnings_of(caplog) == []


# ----------------------------------------------------------------------------- the eval split

def test_eval_fraction_split_is_seeded_disjoint_and_machine_independent():
    train, held = split_rows(10, 0.3, 0)
    assert held == [0, 6, 9] and train == [1, 2, 3, 4, 5, 7, 8]  # random.Random(0): the same everywhere
    assert split_rows(10, 0.3, 0) == (train, held)
    assert split_rows(10, 0.3, 1) != (train, held)
    for n, frac in ((2, 0.01), (2, 0.99), (7, 0.5), (1000, 0.1)):
        a, b = split_rows(n, frac, 5)
        assert sorted(a + b) == list(range(n)) and not set(a) & set(b) and a and b
    assert len(split_rows(1000, 0.1, 5)[1]) == 100
    with pytest.raises(ConfigError, match="needs at least 2 rows"):
        split_rows(1, 0.5, 0)


def test_eval_fraction_in_load_data_moves_whole_rows(tok, tmp_path):
    rows = [{"text": f"row {i} " + "xyz " * (i % 4) * 5} for i in range(20)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = C.parse({"model": "unused", "data": {"train": path, "format": "text", "max_length": 16, "stride": 4,
                                               "eval_fraction": 0.25}, "train": {"seed": 3},
                   "log": {"progress": False}})
    batches, evals = load_data(cfg, tok, master=True)
    _, held = split_rows(20, 0.25, 3)
    eval_batches_, qa = evals["eval"]
    assert qa is None and set(evals) == {"eval"}
    train_rows = {e.row for e in batches.examples}
    assert train_rows == set(range(20)) - set(held)
    n_eval = sum(b["n_tokens"] for b in eval_batches_)
    n_all = sum(len(e) for e in tokenize_rows(rows, tok, format="text", max_length=16, stride=4)[0])
    assert n_eval + sum(batches.lengths) == n_all  # every chunk on one side, none lost
    again, _ = load_data(cfg, tok, master=True)
    assert [e.input_ids for e in again.examples] == [e.input_ids for e in batches.examples]
    with pytest.raises(ConfigError, match=r"'data\.eval' and 'data\.eval_fraction' are both set"):
        C.parse({"model": "m", "data": {"train": path, "eval": path, "eval_fraction": 0.1}})


# ----------------------------------------------------------------------------- refusals, one line each

def refusal(tok, rows, **kw) -> str:
    """The message of the ConfigError tokenizing ``rows`` raises (the test fails if none is raised)."""
    with pytest.raises(ConfigError) as e:
        tokenize_rows(rows, tok, **kw)
    return str(e.value)


PC = {"prompt": "a", "completion": "b"}
OK_CONV = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]


@pytest.mark.parametrize("fmt, rows, match", [
    ("alpaca", [{"instruction": "a", "output": "b"}, {"instruction": "a"}],
     r"^data\.train row 2: missing field 'output'"),
    ("alpaca", [{"instruction": "a", "input": 3, "output": "b"}],
     r"row 1: field 'input' must be str or absent, got int"),
    ("alpaca", [{"instruction": "a", "output": ""}], r"row 1: field 'output' is empty"),
    ("alpaca", [{"instruction": " ", "output": "b"}], r"row 1: field 'instruction' is empty"),
    ("sharegpt", [{"conversations": OK_CONV}, {"conversations": []}], r"row 2: 'conversations' is empty"),
    ("sharegpt", [{"conversations": [{"from": "bot", "value": "a"}]}], r"row 1: turn 0 has the unknown speaker 'bot'"),
    ("sharegpt", [{"conversations": ["hi"]}], r"row 1: turn 0 must be an object with string 'from' and 'value'"),
    ("sharegpt", [{"conversations": [{"from": "human", "value": "a"}]}], r"row 1: no assistant message to train on"),
    ("sharegpt", [{"conversations": "hi"}], r"row 1: field 'conversations' must be list, got str"),
    ("chat", [{"messages": []}], r"row 1: 'messages' is empty"),
    ("chat", [{"messages": [{"role": "user", "content": None}]}], r"row 1: message 0 must be an object"),
    ("text", [{"text": "a"}, {"text": ""}], r"row 2: field 'text' is empty"),
    ("text", [{"text": ["a"]}], r"row 1: field 'text' must be str, got list"),
    ("text", [PC], r"row 1: missing field 'text' \(fields present: 'prompt', 'completion'\); rename with data\.fields"),
])
def test_bad_rows_are_one_line(tok, fmt, rows, match):
    msg = refusal(tok, rows, format=fmt)
    assert re.search(match, msg) and "\n" not in msg, msg
    assert msg.startswith("data.train row "), "a bad row is named by its data set and row number"


def test_chat_template_refusals(tok, bare, tmp_path):
    rows = [{"messages": CONVERSATION}]
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    strict = tmp_path / "strict.jinja"
    strict.write_text("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}"
                      "{% endif %}{{ m.content }}{% endfor %}")
    cases = [
        (bare, rows, dict(format="chat"), r"data\.format is 'chat' but the tokenizer has no chat template: set "
                                          r"data\.chat_template to chatml or llama3, or to the path of a \.jinja file"),
        (bare, [{"conversations": OK_CONV}], dict(format="sharegpt"),
         "data.format is 'sharegpt' but the tokenizer has no chat template"),
        (tok, rows, dict(format="chat", chat_template="vicuna"),
         r"data\.chat_template: 'vicuna' is neither a built-in template \(chatml, llama3\) nor a file"),
        (tok, rows, dict(format="chat", chat_template=str(broken)),
         r"^data\.train: data\.chat_template .*broken\.jinja is not a valid Jinja template: .*\(line 1\)"),
        (tok, rows, dict(format="chat", chat_template=str(strict)),
         r"^data\.train row 1: data\.chat_template .* cannot render the conversation: no system role"),
    ]
    for tokenizer, case_rows, kw, match in cases:
        msg = refusal(tokenizer, case_rows, **kw)
        assert re.search(match, msg) and "\n" not in msg, msg


@pytest.mark.parametrize("data, match", [
    ({"format": "alpaca", "chat_template": "chatml"}, r"'data\.chat_template' applies to data\.format 'chat' and "
                                                       r"'sharegpt' only, got format 'alpaca'"),
    ({"format": "chat", "stride": 2}, r"'data\.stride' applies to data\.format 'text' only"),
    ({"format": "text", "stride": 8, "max_length": 8}, r"'data\.stride' must be smaller than data\.max_length \(8\)"),
    ({"format": "csv"}, r"'data\.format' must be one of prompt_completion, chat, alpaca, sharegpt, text"),
    ({"eval_fraction": 1.0}, r"'data\.eval_fraction' must be in \[0, 1\)"),
    ({"chat_template": " ", "format": "chat"}, r"'data\.chat_template' must not be empty"),
])
def test_bad_data_keys_are_one_line(data, match):
    with pytest.raises(ConfigError, match=match) as e:
        C.parse({"model": "m", "data": {"train": "t.jsonl", **data}})
    assert "\n" not in str(e.value)


def test_cli_refuses_a_bad_row_in_one_line_before_the_model_loads(model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"conversations": OK_CONV}, {"conversations": [
        {"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": model, "data": {"train": data, "format": "sharegpt"},
                                   "output_dir": str(tmp_path / "o"), "log": {"progress": False}}))
    assert cli.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("rankwise train: error: data.train row 2: turn 1 has the unknown speaker 'robot' (expected human, "
                   "user, gpt, assistant, system)")


# ----------------------------------------------------------------------------- the README's rows

README_TARGETS = {"prompt_completion": " In Paris.</s>", "alpaca": "Paris</s>", "chat": "In Paris.<|im_end|>\n",
                  "sharegpt": "In Paris.<|eot_id|>"}


def readme_keys(fmt):
    data, row = readme_formats()[fmt]
    keys = {k: v for k, v in data.items() if k != "train"}
    if fmt == "text":  # the README's sizes, cut so that its row spans several chunks
        keys.update(max_length=32, stride=8)
    return keys, row


@pytest.mark.parametrize("fmt", FORMATS)
def test_readme_rows_train_on_the_response_only(bare, fmt):
    keys, row = readme_keys(fmt)
    exs, _ = tokenize_rows([row], bare, **keys)
    if fmt == "text":
        assert len(exs) > 1 and "".join(target_text(bare, exs)) == row["text"] + "</s>"
    else:
        assert target_text(bare, exs) == [README_TARGETS[fmt]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_trains_end_to_end(model, tmp_path, fmt, caplog):
    keys, row = readme_keys(fmt)
    train = write_jsonl(tmp_path / "train.jsonl", [row] * 6)
    data = {"train": train, **keys, "max_length": keys.get("max_length", 384)}
    if fmt in ("alpaca", "text"):
        data["eval_fraction"] = 0.5  # an eval set held out of the training file
    out = tmp_path / "run"
    cfg = {"model": model, "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}, "data": data,
           "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2, "log_every": 1, "save_every": 0},
           "eval": {"every": 0}, "log": {"progress": False}, "output_dir": str(out)}
    with caplog.at_level(logging.WARNING, "rankwise"):
        summary = rt.train(cfg)
    assert summary["steps"] == 2 and math.isfinite(summary["train_loss"])
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    if "eval_fraction" in data:
        assert math.isfinite(summary["eval_loss"])
    assert not [w for w in warnings_of(caplog) if "data.format" in w or "unknown token" in w]
