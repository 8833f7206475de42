"""patch_decoder_kernels on a tiny Llama: which modules it takes, the same logits and
gradients as the model's own forward, modules whose math differs left alone, undo,
and the same training curve with train.fused_kernels on and off."""
import json

import pytest
import torch
from test_data import build_tiny_llama, qa_rows, write_jsonl
from torch import nn

import rankwise
import rankwise.train as rt
from rankwise.decoder_kernels import patch_decoder_kernels, unpatch_decoder_kernels

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def load(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():  # norms start at 1: give them values so a wrong weight use shows
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def logits_and_grads(model, ids):
    out = model(input_ids=ids).logits
    loss = (out.float() ** 2).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    return [out.detach()] + list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patched_model_has_the_same_logits_and_gradients(tiny, backend):
    model = load(tiny)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    want = logits_and_grads(model, ids)
    counts = patch_decoder_kernels(model, backend=backend)
    assert counts == {"rms_norm": 2 * 2 + 1, "swiglu": 2, "skipped": []}
    got = logits_and_grads(model, ids)
    names = ["logits"] + [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, got, want):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-5, f"{name}: relative error {err:.3g}"
    assert unpatch_decoder_kernels(model) == 7
    assert "forward" not in vars(model.model.norm)
    assert patch_decoder_kernels(model, rms_norm=False)["rms_norm"] == 0


def test_with_lora_layers_and_twice(tiny):
    model = load(tiny)
    rankwise.inject_lora(model, "all-linear", r=2, alpha=4, dropout=0.1)
    assert patch_decoder_kernels(model)["swiglu"] == 2
    assert patch_decoder_kernels(model) == {"rms_norm": 0, "swiglu": 0, "skipped": []}, "already patched"
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (1, 7))
    model(input_ids=ids).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


class OnePlusNorm(nn.Module):
    """Gemma-style: x_normed * (1 + weight): not the fused kernel's math."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
                * (1.0 + self.weight)).to(x.dtype)


OnePlusNorm.__name__ = "GemmaLikeRMSNorm"


def test_a_norm_with_other_math_is_left_alone(caplog):
    model = nn.Sequential(OnePlusNorm(16), OnePlusNorm(16))
    with caplog.at_level("WARNING", logger="rankwise"):
        counts = patch_decoder_kernels(model)
    assert counts == {"rms_norm": 0, "swiglu": 0, "skipped": ["GemmaLikeRMSNorm"]}
    assert "computes something else" in caplog.text
    assert "forward" not in vars(model[0])
    with pytest.raises(ValueError, match="backend"):
        patch_decoder_kernels(model, backend="cuda")


def test_training_curve_with_fused_kernels(tiny, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(16))
    losses = {}
    for fused in (True, False):
        out = tmp_path / f"k-{fused}"
        cfg = {"model": tiny, "method": "full",
               "data": {"train": train, "max_length": 64},
               "train": {"max_steps": 5, "batch_size": 4, "lr": 1e-3, "log_every": 1, "save_every": 0,
                         "fused_kernels": fused},
               "eval": {"every": 0}, "log": {"progress": False}, "output_dir": str(out)}
        rt.train(cfg)
        with open(out / "metrics.jsonl") as f:
            losses[fused] = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses[True]) == 5
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) <= 1e-4 * abs(b), losses
