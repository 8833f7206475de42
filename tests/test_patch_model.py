"""``rankwise.patch_model`` on tiny random-init models of each family the installed
transformers provides (built from their config classes, no hub): what it patches,
the same loss and gradients as the unpatched model, ``logits=None`` in training, the
call signature kept, a Hugging Face ``Trainer`` run with gradient accumulation whose
logged losses match the unpatched run, the Triton path under the interpreter (Llama,
Gemma 2), a QLoRA model (bitsandbytes 4-bit + PEFT), and exact unpatching.

Tolerances (fp32 throughout; relative: max|a - b| / max|b| per tensor):
- loss: 2e-6 (the fused loss sums the same fp32 logits in chunks, in another order);
- every trainable gradient: 2e-5 (torch backend) / 5e-5 (Triton kernels, their own
  tile order of the sums), against the unpatched model's autograd;
- Trainer: each logged loss within 1e-5 relative of the unpatched run's;
- QLoRA: loss and LoRA gradients 1e-5, against the float64 model decoded from the same
  bytes (bitsandbytes' kernels are never the reference: they are wrong on some CPUs);
- bf16 / fp16 Llama and Gemma 2: loss within 1e-2 relative (the fused head and kernels
  round once where torch rounds twice).
"""
import inspect
import sys

import pytest
import torch
import transformers as T

from helpers import build_perturbed, causal_lm_loss64, decoded_dense_copy, is_bnb_4bit_layer
from test_data import build_tiny_llama, build_tokenizer

import rankwise
import rankwise.kernels
from rankwise import patch_model, unpatch_model
from rankwise.lora import peft_fusion_report

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

# family -> (config class name, model class name, extra config, the kinds patch_model must report)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, {"rms_norm": 5, "swiglu": 2}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, {"rms_norm": 5, "swiglu": 2}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, {"rms_norm": 5, "swiglu": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}, {"rms_norm": 9, "swiglu": 2}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}, {"rms_norm_offset": 5, "geglu": 2}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0},
               {"rms_norm_offset": 9, "geglu": 2}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 8, "final_logit_softcapping": 2.0, "sliding_window": 4}, {"rms_norm_offset": 13, "geglu": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1},
             {"rms_norm": 5, "swiglu_gate_up": 2}),
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def build(family, dtype=torch.float32, seed=0):
    """A tiny random model whose every parameter is perturbed (norm weights, Gemma's
    zero-initialised offsets included), so that every patched part shows in the loss."""
    return build_perturbed(FAMILIES, family, SMALL, seed).to(dtype)


def batch(seed=0, B=2, L=9, vocab=VOCAB):
    """Right-padded token ids, the mask, and labels with the pads and a prompt ignored."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L - 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :2] = -100
    return ids, mask, labels


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def loss_and_grads(model, ids, mask, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out, grads


def assert_same(got, ref, loss_tol, grad_tol, what):
    (out, grads), (out_ref, grads_ref) = got, ref
    assert rel(out.loss, out_ref.loss) <= loss_tol, f"{what}: loss {out.loss.item():.8g} vs {out_ref.loss.item():.8g}"
    assert grads.keys() == grads_ref.keys()
    worst = max(grads, key=lambda n: rel(grads[n], grads_ref[n]))
    assert rel(grads[worst], grads_ref[worst]) <= grad_tol, \
        f"{what}: gradient of {worst} off by {rel(grads[worst], grads_ref[worst]):.3e} (limit {grad_tol:g})"


def instance_forwards(model):
    return {name for name, m in model.named_modules() if "forward" in vars(m)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_same_loss_and_gradients(family):
    model = build(family).train()
    ids, mask, labels = batch()
    signature = inspect.signature(model.forward)
    ref = loss_and_grads(model, ids, mask, labels)
    ref_n = loss_and_grads(model, ids, mask, labels, num_items_in_batch=torch.tensor(23))
    model.eval()
    with torch.no_grad():
        logits_before = model(input_ids=ids, attention_mask=mask).logits
    model.train()

    report = patch_model(model, backend="torch")
    expected = {"lora": 0, "loss": 1, "rms_norm": 0, "rms_norm_offset": 0, "swiglu": 0, "geglu": 0,
                "swiglu_gate_up": 0, **FAMILIES[family][3]}
    assert report["patched"] == expected, report
    assert set(report["left"]) == {"lora"} and "no PEFT LoRA layer" in report["left"]["lora"]
    assert inspect.signature(model.forward) == signature, "the call signature must not change"

    got = loss_and_grads(model, ids, mask, labels)
    assert got[0].logits is None, "training mode: no logits"
    assert_same(got, ref, 2e-6, 2e-5, family)
    assert_same(loss_and_grads(model, ids, mask, labels, num_items_in_batch=torch.tensor(23)), ref_n,
                2e-6, 2e-5, f"{family} num_items_in_batch")

    assert unpatch_model(model)["loss"] == 1
    assert instance_forwards(model) == set(), "unpatch must leave no instance-level forward"
    assert not any(k.startswith("_rankwise") for m in model.modules() for k in vars(m))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits_before)


def test_eval_mode_and_no_labels_take_the_models_own_forward():
    model = build("gemma2")
    ids, mask, labels = batch(1)
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels)
    patch_model(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits is not None and rel(out.logits, ref.logits) < 1e-5 and rel(out.loss, ref.loss) < 1e-6
        model.train()
        assert model(input_ids=ids, attention_mask=mask).logits.shape == (2, 9, VOCAB)
        tup = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
        assert isinstance(tup, tuple) and rel(tup[0], ref.loss) < 2e-6


def test_what_is_left_and_why():
    model = build("llama")
    model.config.logit_scale = 0.5  # a logit transform the fused loss does not know
    report = patch_model(model, lora=False, norms=False, backend="torch")
    assert report["patched"]["loss"] == 0 and "logit_scale" in report["left"]["loss"]
    assert report["patched"]["swiglu"] == 2 and report["patched"]["rms_norm"] == 0
    assert "norms=False" in report["left"]["norms"] and "lora=False" in report["left"]["lora"]
    unpatch_model(model)

    model = build("llama")
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    assert "loss_function" in patch_model(model)["left"]["loss"]
    with pytest.raises(ValueError, match="backend"):
        patch_model(model, backend="cuda")


def test_a_loss_that_disagrees_is_left_alone(monkeypatch):
    """The patch-time check compares the fused loss with the model's own: a decoder
    forward the fused path does not reproduce (here a changed final norm) is caught."""
    model = build("llama")
    real = type(model).forward

    def forward(self, *args, **kwargs):  # the model's own loss, of a head that scales its logits by 2
        out = real(self, *args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss * 2
        return out

    model.forward = forward.__get__(model)
    model.forward.__func__.__signature__ = inspect.signature(real)
    report = patch_model(model, lora=False, norms=False, mlp=False)
    assert report["patched"]["loss"] == 0 and "fused loss" in report["left"]["loss"]
    assert model.forward.__func__ is forward


def peft_llama(dtype=torch.float32):
    peft = pytest.importorskip("peft")
    model = build("llama", dtype)
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            lora_dropout=0.0))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return peft_model.train()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_peft_llama_all_parts(backend):
    """A PEFT LoRA Llama: the LoRA layers, norms, MLPs and the loss all patched; the
    Triton backend runs every kernel under the interpreter."""
    model = peft_llama()
    ids, mask, labels = batch(2, L=7)
    ref = loss_and_grads(model, ids, mask, labels, num_items_in_batch=torch.tensor(11))
    report = patch_model(model, backend=backend)
    assert report["patched"] == {"lora": 14, "loss": 1, "rms_norm": 5, "rms_norm_offset": 0, "swiglu": 2,
                                 "geglu": 0, "swiglu_gate_up": 0}, report
    assert report["left"] == {}
    got = loss_and_grads(model, ids, mask, labels, num_items_in_batch=torch.tensor(11))
    assert got[0].logits is None
    assert_same(got, ref, 2e-6, 2e-5 if backend == "torch" else 5e-5, f"peft llama {backend}")
    assert unpatch_model(model) == {"loss": 1, "kernels": 7, "lora": 14}
    assert instance_forwards(model) == set()


def test_gemma2_triton_softcap_and_geglu():
    model = build("gemma2").train()
    ids, mask, labels = batch(5, L=6)
    ref = loss_and_grads(model, ids, mask, labels)
    report = patch_model(model, backend="triton")
    assert report["patched"]["geglu"] == 2 and report["patched"]["loss"] == 1
    assert_same(loss_and_grads(model, ids, mask, labels), ref, 2e-6, 5e-5, "gemma2 triton")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loss(family, dtype):
    """A model loaded in bf16 / fp16: every kind still passes its check (Gemma's norm in
    its fp32-then-round rule), and the loss is the model's within 1e-2 relative."""
    model = build(family, dtype).train()
    ids, mask, labels = batch(6)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        report = patch_model(model, backend="torch")
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert report["patched"]["loss"] == 1 and out.logits is None
    assert set(report["left"]) == {"lora"}, report["left"]
    assert rel(out.loss, ref) < 1e-2


QLORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def qlora_llama(path, hidden=64, targets=QLORA_TARGETS):
    """A tiny Llama (``test_data.build_tiny_llama``; hidden 64: 64 x 64 and 32 x 64
    attention weights, MLP rows of 136) loaded the usual QLoRA way: bitsandbytes NF4 with
    double quantization and fp32 compute, PEFT LoRA r=8 on ``targets`` (default: every
    projection of the decoder), norm weights and lora_B drawn so that every patched part
    and every gradient shows; in training mode."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    build_tiny_llama(path, hidden=hidden)
    quant = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
    base = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=quant)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # norms start at 1: give them values, so that the patched norms' use of them shows
        for name, p in base.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
    torch.manual_seed(3)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.train()


@pytest.fixture
def no_bnb_kernels(monkeypatch):
    """Fail on any call of bitsandbytes' 4-bit matmul or dequantization, the kernels that are
    wrong on some CPUs (every bitsandbytes layer's forward goes through ``matmul_4bit``)."""
    bnb = pytest.importorskip("bitsandbytes")

    def boom(*args, **kwargs):
        raise AssertionError("a bitsandbytes 4-bit kernel was called")

    def arm():
        monkeypatch.setattr(bnb, "matmul_4bit", boom)
        monkeypatch.setattr(bnb.functional, "dequantize_4bit", boom)
    return arm


def decoded_oracle(model, ids, mask, labels):
    """Loss and LoRA gradients of the model's float64 twin: every bitsandbytes layer replaced
    by its weight decoded from the same bytes (``helpers.decoded_dense_copy``), the loss in
    float64 (``helpers.causal_lm_loss64``)."""
    twin = decoded_dense_copy(model, float64=True)
    loss = causal_lm_loss64(twin(input_ids=ids, attention_mask=mask).logits, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in twin.named_parameters() if p.requires_grad}
    return T.modeling_outputs.CausalLMOutputWithPast(loss=loss.detach()), grads


@pytest.mark.parametrize("backend,hidden", [("torch", 64), ("triton", 32)])  # the interpreter: the smaller model
def test_qlora_model_matches_the_decoded_model(tmp_path, backend, hidden, no_bnb_kernels):
    """``patch_model`` on a QLoRA model (``qlora_llama``): the LoRA layers run the fused NF4
    op on bitsandbytes' bytes, norms, MLPs and the loss are fused; the loss and every LoRA
    gradient within 1e-5 relative of the float64 oracle decoded from the same bytes (the
    fp32 run's own rounding, measured: 1e-7 on the loss, 2e-6 - 3e-6 on the gradients).

    The bitsandbytes layers are set to repack their weights as they do on CPUs with
    AVX512-BF16 (``support_avx512bf16_for_cpu``: in eval mode without gradients,
    ``Linear4bit.forward`` rewrites the weight in place for bitsandbytes' inference
    kernel, the scales rounded to bf16). patch_model's checks must not trigger it: they
    used to (PEFT's forward over layers.0's q_proj), leaving that layer unreadable to
    rankwise and run by bitsandbytes with bf16 scales: on an AVX512-BF16 CPU the loss was
    2e-4 off and layer 0's k_proj gradients 4e-2 (hidden 64), or the repacking raised
    (hidden 32: rows shorter than a block)."""
    model = qlora_llama(tmp_path, hidden)
    layers = [m for m in model.modules() if is_bnb_4bit_layer(m)]
    assert len(layers) == 14
    for m in layers:
        m.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on an AVX512-BF16 CPU
    ids, mask, labels = batch(7, L=7, vocab=model.config.vocab_size)
    ref = decoded_oracle(model, ids, mask, labels)
    no_bnb_kernels()  # neither patch_model's checks nor the patched model may depend on them
    report = patch_model(model, backend=backend)
    assert report["patched"] == {"lora": 14, "loss": 1, "rms_norm": 5, "rms_norm_offset": 0, "swiglu": 2,
                                 "geglu": 0, "swiglu_gate_up": 0}, report
    got = loss_and_grads(model, ids, mask, labels)
    assert_same(got, ref, 1e-5, 1e-5, f"qlora {backend}")
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers), "repacked"
    assert set(peft_fusion_report(model).values()) == {None}, "every LoRA layer through the fused NF4 op"
    assert unpatch_model(model)["lora"] == 14 and instance_forwards(model) == set()


def test_checks_leave_bitsandbytes_weights_as_they_are(tmp_path):
    """LoRA on the attention only: the MLPs are bare bitsandbytes 4-bit layers (no
    floating-point parameter), so patch_model's MLP check and its loss check run
    bitsandbytes' own forward, in eval mode without gradients. Set to repack as on an
    AVX512-BF16 CPU, no weight may be repacked by them (the MLP and loss checks keep the
    4-bit layers in training mode), and the MLPs, the loss and every LoRA layer are patched."""
    model = qlora_llama(tmp_path, targets=QLORA_TARGETS[:4])
    layers = [m for m in model.modules() if is_bnb_4bit_layer(m)]
    assert len(layers) == 14
    for m in layers:
        m.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on an AVX512-BF16 CPU
    report = patch_model(model, backend="torch")
    assert report["patched"] == {"lora": 8, "loss": 1, "rms_norm": 5, "rms_norm_offset": 0, "swiglu": 2,
                                 "geglu": 0, "swiglu_gate_up": 0}, report
    repacked = [i for i, m in enumerate(layers) if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    assert repacked == [], f"{len(repacked)} of {len(layers)} weights repacked by patch_model's checks"
    assert set(peft_fusion_report(model).values()) == {None}


class TokenRows(torch.utils.data.Dataset):
    """Rows of different lengths (so micro-batches hold different token counts and
    num_items_in_batch matters), each a dict the default collator pads below."""

    def __init__(self, n=40, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.rows = [torch.randint(0, VOCAB, (int(torch.randint(4, 12, (1,), generator=gen)),), generator=gen)
                     for _ in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def collate(rows):
    L = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["input_ids"])] = r["input_ids"]
        mask[i, :len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def trainer_losses(tmp_path, patched, monkeypatch, peft=False):
    model = peft_llama() if peft else build("llama", seed=1)
    calls = []
    if patched:
        assert patch_model(model, backend="torch")["patched"]["loss"] == 1
        real = rankwise.kernels.linear_cross_entropy
        monkeypatch.setattr(sys.modules["rankwise.patch_model"], "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = T.TrainingArguments(output_dir=str(tmp_path / f"run{int(patched)}"), max_steps=10,
                               gradient_checkpointing=peft,
                               per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2,
                               logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
                               data_seed=0, disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant")
    trainer = T.Trainer(model=model, args=args, train_dataset=TokenRows(), data_collator=collate)
    trainer.train()
    if patched and peft:
        assert set(peft_fusion_report(model).values()) == {None}, "the LoRA layers stay fused under Trainer"
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, len(calls)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "peft-lora-checkpointing"])
def test_hf_trainer_gradient_accumulation_matches(tmp_path, monkeypatch, peft):
    """10 steps of 2 micro-batches of rows of different lengths: Trainer passes
    num_items_in_batch, and the patched model's logged losses are the unpatched ones
    (a full fine-tune; a PEFT LoRA model with gradient checkpointing)."""
    ref, _ = trainer_losses(tmp_path, False, monkeypatch, peft)
    got, fused_calls = trainer_losses(tmp_path, True, monkeypatch, peft)
    assert fused_calls == 20, "every micro-batch's loss through the fused op"
    assert len(ref) == len(got) == 10
    for step, (a, b) in enumerate(zip(got, ref)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: patched {a} vs unpatched {b}"


def test_trl_sft_trainer_takes_the_patched_model(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model = build("llama", seed=2)
    patch_model(model, backend="torch")  # TRL's fused LM head asks for log_probs, entropy, is_top1: tests/test_trl.py
    rows = TokenRows(8)
    data = Dataset.from_list([{"input_ids": r.tolist()} for r in rows.rows])
    cfg = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, report_to="none",
                        use_cpu=True, bf16=False, save_strategy="no", logging_steps=1)
    trainer = trl.SFTTrainer(model=model, args=cfg, train_dataset=data,
                             processing_class=build_tokenizer(tmp_path / "tok"))
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_deepcopy_of_a_patched_model_is_patched_on_its_own():
    """A copy (a reference model, an EMA) computes with its own weights, not the original's."""
    import copy

    model = build("qwen3").train()
    ids, mask, labels = batch(8)
    patch_model(model, backend="torch")
    twin = copy.deepcopy(model)
    assert twin.forward.lm is twin
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        a = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        b = twin(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert twin(input_ids=ids, attention_mask=mask).logits is not None
    unpatch_model(twin)
    with torch.no_grad():
        ref = twin(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert not torch.equal(a, b) and rel(b, ref) < 2e-6


def test_return_logits_for_trainers_that_log_from_them(tmp_path):
    """``return_logits=True``: training mode returns the model's logits (soft-capped, no
    gradient) beside the fused loss; a Trainer whose compute_loss reads them for a token
    accuracy, as TRL's SFTTrainer does, runs; the loss and gradients stay the fused ones."""
    model = build("gemma2").train()
    ids, mask, labels = batch(9)
    ref = loss_and_grads(model, ids, mask, labels)
    patch_model(model, backend="torch", return_logits=True)
    got = loss_and_grads(model, ids, mask, labels)
    assert not got[0].logits.requires_grad and rel(got[0].logits, ref[0].logits.detach()) < 1e-6
    assert_same(got, ref, 2e-6, 2e-5, "return_logits")
    patch_model(model, backend="torch")  # again, without: the option changes, nothing else
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is None

    accuracies = []

    class MetricsTrainer(T.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            with torch.no_grad():
                pred = outputs.logits[..., :-1, :].argmax(-1)
                target = inputs["labels"][..., 1:]
                accuracies.append(((pred == target) & (target != -100)).sum().item() / (target != -100).sum().item())
            return (loss, outputs) if return_outputs else loss

    model = build("llama", seed=3)
    patch_model(model, backend="torch", return_logits=True)
    args = T.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                               report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    MetricsTrainer(model=model, args=args, train_dataset=TokenRows(8), data_collator=collate).train()
    assert len(accuracies) == 2 and all(0 <= a <= 1 for a in accuracies)
