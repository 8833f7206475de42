"""The time estimate `rankwise study --plan` prints (rankwise.arm_cost), against counts made here by hand: the
weights a token multiplies (tied and untied heads), the tokens a run trains on (epochs, max_steps, packing,
truncation) and the FLOPs of full SFT and of LoRA arms trained together."""
import json

import pytest
import torch
from test_data import build_tiny_llama
from transformers import AutoConfig, AutoModelForCausalLM

from rankwise import arm_cost
from rankwise.arm_memory import model_shape
from rankwise.config import parse
from rankwise.model import load_tokenizer

ROWS = [{"prompt": f"Q: where was p{i} born? A:", "completion": " " + "Lima" * (i % 3 + 1)} for i in range(7)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("cost") / "m", hidden=32, layers=2)


def run(model, **train):
    return parse({"model": model, "data": {"train": "x.jsonl", "max_length": 34},
                  "train": {"batch_size": 2, **train}})


def by_hand_tokens(tok, max_length):
    """prompt tokens (with BOS) + completion tokens + EOS, cut at max_length, per row."""
    out = []
    for r in ROWS:
        ids = tok(r["prompt"], add_special_tokens=True)["input_ids"] + \
            tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append(min(len(ids), max_length))
    return out


def test_matmul_params_count_the_head_once_and_not_the_embedding(model, tmp_path):
    shape = model_shape(run(model))
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
    rest = sum(p.numel() for n, p in m.named_parameters() if "embed_tokens" not in n)
    assert not shape["tied"] and arm_cost.matmul_params(shape) == rest
    tied_dir = tmp_path / "tied"
    tied_dir.mkdir()
    c = json.loads(open(f"{model}/config.json").read())
    c["tie_word_embeddings"] = True
    (tied_dir / "config.json").write_text(json.dumps(c))
    tied = model_shape(run(str(tied_dir)))
    assert tied["tied"] and tied["params"] == shape["params"] - shape["vocab"] * shape["hidden"]
    assert arm_cost.matmul_params(tied) == tied["params"]  # the one matrix is the head


def test_train_tokens_per_epoch_per_step_and_packed(model):
    tok = load_tokenizer(model)
    lens = by_hand_tokens(tok, 34)
    assert max(lens) == 34 and min(lens) < 34  # truncation is exercised
    assert arm_cost.train_tokens(run(model, epochs=2), ROWS, tok) == 2 * sum(lens)
    assert arm_cost.train_tokens(run(model, epochs=0.5), ROWS, tok) == round(0.5 * sum(lens))
    assert arm_cost.train_tokens(run(model, max_steps=5, grad_accum=3), ROWS, tok) == round(5 * 3 * 2 * sum(lens) / 7)
    held = parse({"model": model, "data": {"train": "x.jsonl", "max_length": 34, "eval_fraction": 0.25},
                  "train": {"batch_size": 2, "epochs": 2}})
    assert arm_cost.train_tokens(held, ROWS, tok) == round(2 * 0.75 * sum(lens))  # the held-out rows do not train
    packed = parse({"model": model, "data": {"train": "x.jsonl", "max_length": 34, "packing": True},
                    "train": {"batch_size": 2, "max_steps": 5}})
    assert arm_cost.train_tokens(packed, ROWS, tok) == 5 * 2 * 34


def test_train_flops_full_lora_together_and_checkpointing(model):
    cfg = run(model, epochs=1)
    s = model_shape(cfg)
    n = arm_cost.matmul_params(s)
    io = sum(i + o for i, o in s["targets"].values())
    assert io > 0 and arm_cost.train_flops(cfg, 1000) == 6 * n * 1000
    assert arm_cost.train_flops(cfg, 1000, [4]) == (4 * n + 6 * 4 * io) * 1000
    assert arm_cost.train_flops(cfg, 10, [1, 8]) == (4 * n + 6 * io) * 10 + (4 * n + 48 * io) * 10
    gc = run(model, epochs=1, gradient_checkpointing=True)
    assert arm_cost.train_flops(gc, 10) == 8 * n * 10 and arm_cost.train_flops(gc, 10, [2]) == (6 * n + 12 * io) * 10


@pytest.mark.parametrize("flops,tflops,text", [(0, 1, "0 s"), (119e12, 1, "119 s"), (120e12, 1, "2.0 min"),
                                               (7199e12, 1, "120.0 min"), (7200e12, 2, "60.0 min"),
                                               (7200e12, 1, "2.0 h")])
def test_duration(flops, tflops, text):
    assert arm_cost.duration(flops, tflops) == text
