"""rankwise under TRL's ``SFTTrainer`` (trl 1.16: a test dependency, requirements-dev.txt).

SFTTrainer installs its own fused LM head (``add_fused_lm_head``: the model's forward with
``fused_lm_head=True`` returns per-token ``log_probs``, ``entropy``, ``is_top1``) and trains
on ``-log_probs``. Checked here, each on a tiny Llama, a prompt-completion data set (prompt
tokens masked), fp32 on the CPU, 4 steps of 2 micro-batches (gradient accumulation, so
``num_items_in_batch`` matters), against the same run unpatched:

- ``patch_model`` before the trainer (TRL's forward then sits over rankwise's), and
  ``patch_model(trainer.model)`` after it (rankwise's over TRL's; the only order with
  ``peft_config=``, run too): every logged loss within 1e-5 relative of the unpatched
  run's, the entropy and token accuracy within 1e-4, and rankwise's fused op ran for every
  micro-batch (its calls counted);
- ``unpatch_model`` restores the forward that was there, TRL's included, and
  ``trainer.evaluate()`` runs after it (TRL's own fused head);
- ``head_stats`` (the chunked entropy / log sum p^2 / mean logit) and the fused head's
  ``log_probs`` (forward and gradient) against a float64 full-logits reference on awkward shapes.
"""
import sys

import pytest
import torch

from test_data import build_tiny_llama, qa_rows

import rankwise
import rankwise.kernels
from rankwise import patch_model, unpatch_model
from rankwise.patch_model import head_stats

trl = pytest.importorskip("trl")  # installed in CI from requirements-dev.txt

LOSS_RTOL = 1e-5
METRIC_ATOL = 1e-4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def data():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in qa_rows(24)])


def config(tmp_path, name):
    return trl.SFTConfig(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, report_to="none",
                         use_cpu=True, bf16=False, save_strategy="no", seed=0, data_seed=0, disable_tqdm=True,
                         dataloader_num_workers=0, lr_scheduler_type="constant", per_device_eval_batch_size=4)


def count_fused_calls(monkeypatch):
    """Count the calls of rankwise's fused linear + cross entropy op from the fused LM head
    (per-token, ``reduction="none"``; patch_model's own check sums)."""
    calls = []
    real = rankwise.kernels.linear_cross_entropy

    def counted(*args, **kwargs):
        if kwargs.get("reduction") == "none":
            calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sys.modules["rankwise.patch_model"], "linear_cross_entropy", counted)
    return calls


def run(tmp_path, tiny, order, peft=False):
    """(trainer, logged training rows) of an SFTTrainer run; ``order``: None (unpatched),
    ``"before"`` (patch_model, then the trainer) or ``"after"`` (patch_model(trainer.model))."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    if order == "before":
        assert patch_model(model, backend="torch")["patched"]["loss"] == 1
    kwargs = {}
    if peft:
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    torch.manual_seed(0)  # the LoRA weights PEFT draws
    trainer = trl.SFTTrainer(model=model, args=config(tmp_path, f"{order}-{peft}"), train_dataset=data(),
                             eval_dataset=data().select(range(8)), processing_class=AutoTokenizer.from_pretrained(tiny),
                             **kwargs)
    if order == "after":
        assert patch_model(trainer.model, backend="torch")["patched"]["loss"] == 1
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


def assert_same_run(got, ref):
    assert len(got) == len(ref) == 4
    for step, (a, b) in enumerate(zip(got, ref)):
        assert abs(a["loss"] - b["loss"]) <= LOSS_RTOL * abs(b["loss"]), f"step {step}: {a['loss']} vs {b['loss']}"
        for key in ("entropy", "mean_token_accuracy"):
            assert abs(a[key] - b[key]) <= METRIC_ATOL, f"step {step} {key}: {a[key]} vs {b[key]}"


@pytest.mark.parametrize("order,peft", [("before", False), ("after", False), ("after", True)],
                         ids=["patch-before-trainer", "patch-trainer-model", "patch-trainer-model-peft-config"])
def test_sft_trainer_runs_the_fused_loss_with_the_same_losses(tmp_path, tiny, monkeypatch, order, peft):
    _, ref = run(tmp_path, tiny, None, peft)
    calls = count_fused_calls(monkeypatch)
    trainer, got = run(tmp_path, tiny, order, peft)
    assert len(calls) == 8, "each of the 8 micro-batches' log-probs through rankwise's fused op"
    assert_same_run(got, ref)
    lm = trainer.model.get_base_model() if peft else trainer.model
    if peft:
        from rankwise.lora import peft_fusion_report

        assert set(peft_fusion_report(trainer.model).values()) == {None}, "the LoRA layers fused too"
    trl_forward = lm.forward if order == "before" else lm.forward.prev
    assert trl_forward.__func__.__name__ == "forward" and trl_forward.__func__.__code__.co_name == "_fused_forward"
    n = len(calls)
    patched_eval = trainer.evaluate()
    assert len(calls) > n, "eval's fused_lm_head calls through rankwise too"
    unpatch_model(trainer.model)
    assert lm.__dict__["forward"] is trl_forward, "TRL's forward is the model's forward again"
    assert not lm._forward_pre_hooks, "the pre-hook is gone"
    n = len(calls)
    plain_eval = trainer.evaluate()
    assert len(calls) == n, "after unpatch_model, TRL's own head"
    assert abs(plain_eval["eval_loss"] - patched_eval["eval_loss"]) <= LOSS_RTOL * abs(plain_eval["eval_loss"])


def reference64(h, W, b, t, softcap):
    c = h.double() @ W.double().T + (0 if b is None else b.double())
    if softcap is not None:
        c = torch.tanh(c / softcap) * softcap
    logp = torch.log_softmax(c, -1)
    p = logp.exp()
    return {"log_probs": logp.gather(1, t[:, None])[:, 0], "entropy": -(p * logp).sum(-1),
            "log_sum_sq_probs": torch.log((p * p).sum(-1)), "mean_logits": c.mean(-1),
            "is_top1": c.argmax(-1) == t}


@pytest.mark.parametrize("N,H,V,bias,softcap,chunk", [(1, 3, 5, False, None, None), (37, 24, 1000, True, None, 7),
                                                       (19, 16, 97, False, 3.0, 4), (0, 8, 11, False, None, None)])
def test_head_fields_match_float64(N, H, V, bias, softcap, chunk):
    """The fused head's fields (rankwise's op for log_probs / is_top1, head_stats for the rest)
    vs float64 full logits: values within 1e-5, the gradient of sum(w * log_probs) to the hidden
    states, the weight and the bias within 1e-5 relative."""
    from rankwise.patch_model import _head_fields

    gen = torch.Generator().manual_seed(N * 7 + V)
    h = torch.randn(N, H, generator=gen, requires_grad=True)
    head = torch.nn.Linear(H, V, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=gen) * 0.5)
        if bias:
            head.bias.copy_(torch.randn(V, generator=gen))
    t = torch.randint(0, V, (N,), generator=gen)
    ref = reference64(h, head.weight, head.bias, t, softcap)
    stats = head_stats(h, head.weight, head.bias, softcap, entropy=True, log_sum_sq_probs=True, mean_logits=True,
                       chunk_rows=chunk)
    for key, value in stats.items():
        assert not value.requires_grad
        torch.testing.assert_close(value.double(), ref[key], rtol=1e-5, atol=1e-5, msg=key)
    fields = _head_fields(h, head, t, softcap, "torch", ("log_probs", "entropy", "is_top1"))
    torch.testing.assert_close(fields["log_probs"].double(), ref["log_probs"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fields["entropy"].double(), ref["entropy"], rtol=1e-5, atol=1e-5)
    assert torch.equal(fields["is_top1"], ref["is_top1"])
    if N == 0:
        return
    w = torch.randn(N, generator=gen)
    params = [h, head.weight] + ([head.bias] if bias else [])
    got = torch.autograd.grad((fields["log_probs"] * w).sum(), params)
    want = torch.autograd.grad((ref["log_probs"] * w.double()).sum(), params)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-6)
