"""The fused training loss on a tiny Llama: same loss and gradients as the model's own
logits, refused or caught where the head is not a plain linear layer, and the same
training curve with train.fused_loss on and off."""
import json
import logging

import pytest
import torch
from test_data import build_tiny_llama, qa_rows, write_jsonl

import rankwise.train as rt
from rankwise.evaluate import batch_loss_sum
from rankwise.loss import FusedLossLM, check_fused_loss, fused_loss_problem

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def load(path, **config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **config)


def packed_batch(vocab, lengths=(7, 12, 4), seed=0):
    """Padding-free row of three sequences; targets on about two thirds of the positions."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    ids = torch.randint(3, vocab, (1, T), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    tgt = torch.roll(ids, -1, 1)
    tgt[torch.rand(1, T, generator=g) < 0.33] = -100
    return {"input_ids": ids, "position_ids": pos, "targets": tgt, "n_targets": int((tgt != -100).sum())}


def test_fused_loss_and_every_gradient_match_the_models_own(tiny):
    model = load(tiny)
    batch = packed_batch(model.config.vocab_size)
    ref = batch_loss_sum(model, batch)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    fused = FusedLossLM(model, chunk_size=5)  # several chunks, the last one short
    ours = batch_loss_sum(fused, batch)
    our_grads = torch.autograd.grad(ours, list(model.parameters()))
    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for (name, _), a, b in zip(model.named_parameters(), our_grads, ref_grads):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-4, f"{name}: relative gradient error {err:.3g}"


def test_triton_backend_runs_the_kernel_and_matches_the_models_own(tiny, monkeypatch):
    """backend="triton" (under the interpreter) reaches the Triton loss kernel and gives the same loss and
    gradients as the model's own logits; a backend that does not exist is refused by name."""
    import importlib

    import triton

    lce = importlib.import_module("rankwise.kernels.linear_cross_entropy")  # the module, not the function

    calls = []
    model = load(tiny)
    batch = packed_batch(model.config.vocab_size)
    ref = batch_loss_sum(model, batch)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    jitted = [n for n, v in vars(lce).items() if isinstance(v, triton.runtime.jit.KernelInterface)]
    assert jitted, "no @triton.jit kernel found in rankwise.kernels.linear_cross_entropy"
    for name in jitted:  # every kernel the op module launches, whatever it is called
        monkeypatch.setattr(lce, name, _Spy(getattr(lce, name), calls))
    ours = batch_loss_sum(FusedLossLM(model, chunk_size=5, backend="triton"), batch)
    our_grads = torch.autograd.grad(ours, list(model.parameters()))
    assert calls, "the Triton loss kernel never ran"
    assert abs(ours.item() - ref.item()) <= 1e-5 * abs(ref.item())
    for (name, _), a, b in zip(model.named_parameters(), our_grads, ref_grads):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        assert err < 1e-4, f"{name}: relative gradient error {err:.3g}"
    with pytest.raises(ValueError, match="backend"):
        FusedLossLM(model, backend="cuda")


class _Spy:
    """Stands in for a @triton.jit kernel: counts launches (``kernel[grid](...)``), then runs the real one."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        self.calls.append(grid)
        return self.kernel[grid]

    def __getattr__(self, name):
        return getattr(self.kernel, name)


def test_heads_it_does_not_fit_are_refused(tiny):
    model = load(tiny)
    model.config.final_logit_softcapping = 30.0  # Gemma-2 style
    assert "final_logit_softcapping" in fused_loss_problem(model)
    with pytest.raises(ValueError, match="model: the fused loss cannot be used"):
        FusedLossLM(model)
    from rankwise import inject_lora

    lm = load(tiny)
    inject_lora(lm, ["lm_head"], r=2, alpha=4)
    assert "LoRALinear" in fused_loss_problem(lm)
    assert fused_loss_problem(load(tiny)) is None


def test_a_head_computed_otherwise_is_caught_on_a_real_batch(tiny):
    model = load(tiny)
    batch = packed_batch(model.config.vocab_size)
    fused = FusedLossLM(model)
    assert check_fused_loss(model, fused, batch, torch.autograd.grad_mode.no_grad, rtol=1e-4) is None
    model.get_output_embeddings().register_forward_hook(lambda m, i, out: out * 2.0)  # logits no longer W h
    problem = check_fused_loss(model, fused, batch, torch.autograd.grad_mode.no_grad, rtol=1e-4)
    assert problem and "first batch" in problem


def test_training_curve_is_the_same_with_and_without_it(tiny, tmp_path, caplog, monkeypatch):
    calls = []
    forward = FusedLossLM.forward
    monkeypatch.setattr(FusedLossLM, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(24))
    losses = {}
    for fused in (True, False):
        out = tmp_path / f"fused-{fused}"
        cfg = {"model": tiny, "method": "lora", "lora": {"r": 4, "alpha": 8, "targets": "all-linear"},
               "data": {"train": train, "max_length": 64},
               "train": {"max_steps": 8, "batch_size": 6, "lr": 1e-2, "log_every": 1, "save_every": 0,
                         "fused_loss": fused},
               "eval": {"every": 0}, "log": {"progress": False}, "output_dir": str(out)}
        calls.clear()
        with caplog.at_level(logging.WARNING, logger="rankwise"):
            rt.train(cfg)
        assert "fused_loss" not in caplog.text
        assert (len(calls) > 8) == fused, f"fused_loss={fused}: the fused loss ran {len(calls)} times"
        with open(out / "metrics.jsonl") as f:
            losses[fused] = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses[True]) == 8
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) <= 1e-4 * abs(b), (losses[True], losses[False])


def test_training_falls_back_with_a_warning(tmp_path, caplog):
    path = build_tiny_llama(tmp_path / "capped")
    cfg_path = tmp_path / "capped" / "config.json"
    conf = json.loads(cfg_path.read_text())
    conf["logit_scale"] = 0.5  # Cohere-style: logits = lm_head(h) * logit_scale
    cfg_path.write_text(json.dumps(conf))
    train = write_jsonl(tmp_path / "train.jsonl", qa_rows(8))
    cfg = {"model": path, "method": "lora", "lora": {"r": 2, "alpha": 4, "targets": ["q_proj"]},
           "data": {"train": train, "max_length": 64},
           "train": {"max_steps": 2, "batch_size": 4, "save_every": 0},
           "eval": {"every": 0}, "log": {"progress": False}, "output_dir": str(tmp_path / "out")}
    with caplog.at_level(logging.WARNING, logger="rankwise"):
        summary = rt.train(cfg)
    assert "train.fused_loss: using the model's own logits instead" in caplog.text and "logit_scale" in caplog.text
    assert summary["status"] == "finished" and summary["steps"] == 2


def test_padded_batch_with_attention_mask(tiny):
    """A right-padded batch of two rows: the fused loss equals HF's own loss with labels."""
    model = load(tiny)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    tgt = torch.full_like(ids, -100)
    tgt[:, :-1] = labels[:, 1:]
    fused = FusedLossLM(model)(ids, None, tgt, attention_mask=mask) / (tgt != -100).sum()
    assert abs(fused.item() - ref.item()) <= 1e-5 * abs(ref.item())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_packed_mask_built_on_the_device_is_transformers_own(tiny, attention):
    """``packed_attention_mask`` (built from position_ids with no read) gives the logits transformers gives when it
    finds the packed sequences itself (reading position_ids back), bit for bit, and keeps the sequences apart:
    a token's logits do not change when the other sequences of its row do."""
    from rankwise.loss import packed_attention_mask

    model = load(tiny, attn_implementation=attention).eval()
    b = packed_batch(model.config.vocab_size, lengths=(5, 9, 1, 6))
    mask = packed_attention_mask(model, b["position_ids"])
    assert mask.shape == (1, 1, 21, 21) and mask.dtype == (torch.bool if attention == "sdpa" else torch.float32)
    with torch.no_grad():
        # use_cache=False as in training: with a cache transformers skips its packed-sequence detection
        own = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
        ours = model(input_ids=b["input_ids"], position_ids=b["position_ids"], attention_mask=mask,
                     use_cache=False).logits
        assert torch.equal(own, ours)
        other = b["input_ids"].clone()
        other[0, :5] = (other[0, :5] + 1) % model.config.vocab_size  # the first sequence changed
        moved = model(input_ids=other, position_ids=b["position_ids"],
                      attention_mask=packed_attention_mask(model, b["position_ids"]), use_cache=False).logits
        assert torch.equal(moved[0, 5:], ours[0, 5:]) and not torch.equal(moved[0, :5], ours[0, :5])
    model.config._attn_implementation = "flash_attention_2"  # takes the position ids itself: no mask is made
    assert packed_attention_mask(model, b["position_ids"]) is None


def test_data_outside_the_models_vocabulary_is_one_line_before_training(tmp_path):
    """The token ids are checked once on the host (the fused loss then skips its per-step read of the targets):
    a tokenizer larger than the model is refused in one line, before a step and before the run writes."""
    import shutil

    from transformers import AutoModelForCausalLM

    from rankwise.errors import ConfigError

    path = build_tiny_llama(tmp_path / "model")
    small = tmp_path / "small"
    shutil.copytree(path, small)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.resize_token_embeddings(model.config.vocab_size - 8)  # the char tokenizer's last ids fall outside
    model.save_pretrained(small)
    rows = [{"prompt": "Q: z~}|{ ?", "completion": " zz~~}}||"} for _ in range(4)]
    cfg = {"model": str(small), "data": {"train": write_jsonl(tmp_path / "t.jsonl", rows), "max_length": 64},
           "train": {"max_steps": 1, "batch_size": 2}, "log": {"progress": False}, "output_dir": str(tmp_path / "o")}
    with pytest.raises(ConfigError, match=r"^the data holds token id \d+, outside the model's vocabulary of \d+"):
        rt.train(cfg)
    assert not (tmp_path / "o").exists(), "a run refused before it started leaves nothing behind"
