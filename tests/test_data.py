"""Data loading, tokenization with completion-only targets, padding-free batching.

Also home of the tiny tokenizer / Llama / data set builders that test_train.py
and test_sweep.py import (pytest puts tests/ on sys.path).
"""
import json
import os
import string

import pytest
import torch

from rankwise.data import (IGNORE, collate, load_rows, plan_epoch, qa_items, tokenize_rows)
from rankwise.errors import ConfigError

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}U:{{ m['content'] }}\n"
    "{% elif m['role'] == 'system' %}S:{{ m['content'] }}\n"
    "{% else %}A:{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)


# ----------------------------------------------------------------------------- builders (shared)

def build_tokenizer(path):
    """A character-level fast tokenizer saved to ``path`` and loaded back through AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = sorted(set(string.ascii_letters + string.digits + " .,:;?!'-\n"))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    from tokenizers.processors import TemplateProcessing

    tk.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def build_tiny_llama(path, hidden=32, layers=2, seed=0):
    """A tiny LlamaForCausalLM with the char tokenizer, saved to ``path`` (loadable by from_pretrained)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden + 8,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, initializer_range=0.2, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return str(path)


CITIES = ["Paris", "Oslo", "Lima", "Rome", "Cairo", "Quito", "Bern", "Doha"]


def qa_rows(n, offset=0):
    """Toy closed-book QA rows: 'Where was person N born?' -> a city."""
    rows = []
    for i in range(offset, offset + n):
        city = CITIES[(i * 5) % len(CITIES)]
        rows.append({"prompt": f"Q: where was p{i} born? A:", "completion": f" {city}", "answers": [city]})
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_load_rows_formats_agree(tmp_path):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c, d", "completion": "e"}]
    write_jsonl(tmp_path / "x.jsonl", rows)
    (tmp_path / "x.json").write_text(json.dumps(rows))
    (tmp_path / "x.csv").write_text('prompt,completion\na,b\n"c, d",e\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    for ext in ("jsonl", "json", "csv", "parquet"):
        assert load_rows(str(tmp_path / f"x.{ext}")) == rows, ext


def test_dataset_directory_and_hub_names_go_through_datasets(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    write_jsonl(d / "train.jsonl", rows)
    write_jsonl(d / "test.jsonl", rows[:1])
    assert load_rows(str(d)) == rows
    assert load_rows(f"{d}:test") == rows[:1]
    with pytest.raises(ConfigError, match=r"data\.eval: cannot load hub data set 'no-such-org/no-such-set' split 'dev'"):
        load_rows("no-such-org/no-such-set:dev", "data.eval")  # offline in tests (conftest)


def test_malformed_rows_name_the_row(tmp_path, tok):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", oops}\n')
    with pytest.raises(ConfigError, match=r"data\.train row 2 \(line 3"):
        load_rows(str(p), "data.train")
    p.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    with pytest.raises(ConfigError, match=r"row 2 .*must be a JSON object"):
        load_rows(str(p), "data.train")
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "b"}, {"question": "a", "completion": "b"}]
    with pytest.raises(ConfigError, match=r"data\.train row 3: missing field 'prompt'.*'question'"):
        tokenize_rows(rows, tok)
    with pytest.raises(ConfigError, match=r"data\.eval row 1: field 'completion' must be str, got int"):
        tokenize_rows([{"prompt": "a", "completion": 3}], tok, name="data.eval")
    with pytest.raises(ConfigError, match=r"row 2: message 0 must be an object"):
        tokenize_rows([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                       {"messages": ["hi"]}], tok, format="chat")
    with pytest.raises(ConfigError, match="data.train: file not found"):
        load_rows(str(tmp_path / "missing.jsonl"), "data.train")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ConfigError, match="unsupported file type '.txt'"):
        load_rows(str(tmp_path / "x.txt"))


def test_renamed_fields_and_completion_only_targets(tok):
    rows = [{"q": "Q: 12?", "a": " ok"}]
    (ex,), dropped = tokenize_rows(rows, tok, fields={"prompt": "q", "completion": "a"})
    assert dropped == 0
    p_ids = tok("Q: 12?")["input_ids"]
    c_ids = tok(" ok", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == p_ids + c_ids
    assert ex.is_target == [False] * len(p_ids) + [True] * len(c_ids)
    b = collate([ex])
    # targets are shifted: position t predicts token t+1, only completion tokens count
    expected = [IGNORE] * (len(p_ids) - 1) + c_ids + [IGNORE]
    assert b["targets"][0].tolist() == expected
    assert b["n_targets"] == len(c_ids)


def test_chat_targets_are_assistant_turns_only(tok):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "no"}]
    (ex,), _ = tokenize_rows([{"messages": msgs}], tok, format="chat")
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert "".join(tok.convert_ids_to_tokens(ex.input_ids)) == full
    target_text = "".join(t for t, m in zip(tok.convert_ids_to_tokens(ex.input_ids), ex.is_target) if m)
    assert target_text == "yo</s>\nno</s>\n"
    prompts, golds, add_special = qa_items([{"messages": msgs, "answer": "no"}], tok, format="chat")
    assert prompts == ["<s>S:be brief\nU:hi\nA:yo</s>\nU:and?\nA:"] and golds == [["no"]] and add_special is False


def test_truncation_drops_examples_without_targets(tok):
    rows = [{"prompt": "x" * 30, "completion": "yy"}, {"prompt": "a", "completion": "b"}]
    exs, dropped = tokenize_rows(rows, tok, max_length=8)
    assert dropped == 1 and len(exs) == 1 and len(exs[0]) == 4


def test_plan_epoch_is_seeded_permutation_and_packs_within_budget():
    lengths = [5, 9, 3, 7, 2, 8, 6, 4, 1, 10]
    a = plan_epoch(lengths, 3, seed=1, epoch=0)
    assert a == plan_epoch(lengths, 3, seed=1, epoch=0)
    assert a != plan_epoch(lengths, 3, seed=1, epoch=1)
    top = plan_epoch(lengths, 3, seed=2**64 - 1, epoch=5)  # any seed the config takes gives an order
    assert sorted(i for b in top for i in b) == list(range(len(lengths)))
    assert sorted(i for b in a for i in b) == list(range(10)) and [len(b) for b in a] == [3, 3, 3, 1]
    packed = plan_epoch(lengths, 2, packing=True, max_length=8, seed=1)
    assert sorted(i for b in packed for i in b) == list(range(10))
    assert all(sum(lengths[i] for i in b) <= 16 or len(b) == 1 for b in packed)
    # greedy: the next example would not have fit
    order = [i for b in packed for i in b]
    for b, nxt in zip(packed, packed[1:]):
        assert sum(lengths[i] for i in b) + lengths[nxt[0]] > 16
    assert order == [i for b in plan_epoch(lengths, 1, seed=1) for i in b]


def test_padding_free_batch_equals_separate_examples(tmp_path, tok):
    """Concatenated examples with restarting position_ids give each example's own logits (no cross-attention)."""
    from transformers import AutoModelForCausalLM

    path = build_tiny_llama(tmp_path / "m")
    rows = qa_rows(5)
    exs, _ = tokenize_rows(rows, tok)
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32).eval()
        b = collate(exs)
        with torch.no_grad():
            packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits[0]
            start = 0
            for ex in exs:
                alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
                seg = packed[start:start + len(ex)]
                err = (seg.double() - alone.double()).abs().max().item()
                assert err < 1e-5, f"{attn}: example at offset {start} differs by {err}"
                start += len(ex)
        # the loss helper (output head at target positions only) equals cross entropy on the full logits
        from rankwise.evaluate import batch_loss_sum

        full = torch.nn.functional.cross_entropy(packed.double(), b["targets"][0], ignore_index=IGNORE, reduction="sum")
        with torch.no_grad():
            ours = batch_loss_sum(model, b)
        assert abs(ours.item() - full.item()) < 1e-4 * full.item()
        # and the mask really matters: without position_ids later examples would see earlier ones
        with torch.no_grad():
            leaky = model(input_ids=b["input_ids"], use_cache=False).logits[0]
        assert (leaky[len(exs[0]):] - packed[len(exs[0]):]).abs().max() > 1e-3
