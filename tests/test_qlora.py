"""QLoRA models built the usual way (``from_pretrained(..., quantization_config=
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))`` + ``get_peft_model``)
through ``patch_peft_model``: loss and every LoRA gradient against the same model with each
bitsandbytes layer replaced by dense torch math on its weight decoded from the same bytes
(``helpers.decoded_dense_copy``; bitsandbytes' dequantize and matmul kernels are never the
reference: they are wrong on some CPUs), zero-copy reads of bitsandbytes' storage,
fallbacks, unpatching, ``quant.from_bnb_model``.

Tolerances (relative: norm of the difference / norm):
- fp32 compute, against the float64 oracle (the decoded model in float64): the fp32 run's
  own rounding, measured at a few 1e-7 (loss) and 1e-6 (gradients); loss within 1e-6
  and gradients within 1e-5.
- fp16 / bf16 compute: the fused op rounds differently from PEFT's layer (PEFT rounds
  the base output, the LoRA output and their sum to the compute dtype, the fused op
  once; PEFT runs the LoRA branch in its fp32 adapter dtype, the op in the compute
  dtype). Judged against the float64 oracle: the patched error is at most 2x the error
  of the dense PEFT model in the same dtypes (``decoded_dense_copy`` in the compute
  dtype), plus a floor of 1e-3.
- Where PEFT's own forward is what must run (fallbacks, unpatching, fp4), its result
  before patching, bit for bit, whatever bitsandbytes' kernels compute on this host.
"""
import logging

import pytest
import torch
from helpers import causal_lm_loss64, decode_nf4_bnb, decoded_dense_copy, lora_linear_ref64
from torch import nn

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import rankwise.lora as rl  # noqa: E402
from rankwise import patch_peft_model, unpatch_peft_model  # noqa: E402
from rankwise.lora import peft_fusion_report  # noqa: E402
from rankwise.quant import (  # noqa: E402
    NF4Linear,
    dequantize_nf4,
    from_bnb,
    from_bnb_model,
    quantize_nf4,
    to_bnb_params,
)

VOCAB = 128
N_LORA = 2 * 7  # 2 decoder layers x (q, k, v, o, gate, up, down); lm_head is not a target


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def qlora(ckpt, dtype=torch.float32, compute=torch.float32, double_quant=False, quant_type="nf4",
          **lora_kwargs):
    """A tiny Llama loaded in 4 bits by transformers + bitsandbytes, with PEFT LoRA on every
    linear layer of the decoder; lora_B drawn (not zero) so that every gradient is non-trivial.
    In training mode, as QLoRA trains (in eval mode without gradients, bitsandbytes repacks
    its weights in place on CPUs with AVX512-BF16)."""
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, quantization_config=cfg)
    torch.manual_seed(1)
    lora = dict(r=4, lora_alpha=8, target_modules="all-linear")
    lora.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model.train()


def lora_params(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def loss_and_grads(model, ids):
    out = model(ids, labels=ids)
    names, params = zip(*lora_params(model))
    grads = torch.autograd.grad(out.loss, params)
    return out.loss.detach().double(), dict(zip(names, (g.double() for g in grads)))


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_matches(got, ref, rtol_loss, rtol_grad, what):
    loss, grads = got
    loss_ref, grads_ref = ref
    assert rel(loss, loss_ref) <= rtol_loss, f"{what} loss: {loss.item():.8g} vs {loss_ref.item():.8g}"
    assert grads.keys() == grads_ref.keys()
    worst = max(grads, key=lambda n: rel(grads[n], grads_ref[n]))
    err = rel(grads[worst], grads_ref[worst])
    assert err <= rtol_grad, f"{what}: gradient of {worst} off by {err:.3e} relative (limit {rtol_grad:g})"


def oracle(model, ids):
    """Loss and LoRA gradients of ``model``'s decoded float64 twin (same bytes, same LoRA
    values), the loss in float64 too (``helpers.causal_lm_loss64``)."""
    twin = decoded_dense_copy(model, float64=True)
    loss = causal_lm_loss64(twin(ids).logits, ids)
    names, params = zip(*lora_params(twin))
    return loss.detach(), dict(zip(names, torch.autograd.grad(loss, params)))


def assert_low_precision(got, dense, truth, what):
    """At most 2x the dense model's own error in the same dtypes against float64, plus a floor of 1e-3."""
    for name, a, d, t in [("loss", got[0], dense[0], truth[0])] + \
            [(n, got[1][n], dense[1][n], truth[1][n]) for n in truth[1]]:
        ours, theirs = rel(a, t), rel(d, t)
        assert ours <= 2 * theirs + 1e-3, f"{what} {name}: patched {ours:.3e} vs float64, dense {theirs:.3e}"


@pytest.fixture
def no_dequantize(monkeypatch):
    """Fail on any full dequantization of a weight (bitsandbytes' or rankwise's)."""
    import bitsandbytes.functional as bnbF

    import rankwise.kernels.nf4 as nf4_kernels
    import rankwise.quant as quant

    def boom(*a, **k):
        raise AssertionError("a full-precision copy of an NF4 weight was made")

    def arm():
        for mod, name in ((bnbF, "dequantize_4bit"), (quant, "dequantize_nf4"), (nf4_kernels, "dequantize_nf4"),
                          (nf4_kernels, "nf4_dequantize"), (nf4_kernels, "_nf4_dequantize_torch"),
                          (nf4_kernels, "_nf4_dequantize_triton")):
            monkeypatch.setattr(mod, name, boom)
    return arm


@pytest.fixture
def no_bnb_matmul(monkeypatch):
    """Fail on any bitsandbytes 4-bit layer forward (``matmul_4bit``, the kernels that are
    wrong on some CPUs): a fused model never calls it."""
    def boom(*a, **k):
        raise AssertionError("bitsandbytes' 4-bit matmul was called")

    return lambda: monkeypatch.setattr(bnb, "matmul_4bit", boom)


# (weight dtype, compute dtype, double quant, backend): the Triton path under the interpreter for
# fp32 and fp16 (bf16 tl.dot is wrong under the interpreter), the torch path for the rest
CASES = [
    (torch.float32, torch.float32, False, "triton"),
    (torch.float32, torch.float32, True, "torch"),
    (torch.float16, torch.float16, True, "triton"),
    (torch.bfloat16, torch.bfloat16, True, "torch"),
    (torch.bfloat16, torch.float32, False, "torch"),
]


@pytest.mark.parametrize("dtype,compute,double_quant,backend", CASES)
def test_patched_qlora_matches_decoded_model(ckpt, dtype, compute, double_quant, backend, no_dequantize,
                                             no_bnb_matmul):
    model = qlora(ckpt, dtype, compute, double_quant)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
    assert layer.get_base_layer().weight.quant_state.nested == double_quant
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    truth = oracle(model, ids)
    low = dtype != torch.float32 or compute != torch.float32
    dense = loss_and_grads(decoded_dense_copy(model), ids) if low else None
    assert patch_peft_model(model, backend=backend) == N_LORA
    assert all(why is None for why in peft_fusion_report(model).values()), peft_fusion_report(model)
    no_bnb_matmul()
    if backend == "triton":
        no_dequantize()  # the Triton path dequantizes W tiles in registers only
    got = loss_and_grads(model, ids)
    what = f"{dtype}/{compute}/dq={double_quant}/{backend}"
    if low:
        assert_low_precision(got, dense, truth, what)
    else:
        assert_matches(got, truth, 1e-6, 1e-5, what)


def test_zero_copy_and_bitsandbytes_state_untouched(ckpt, monkeypatch):
    model = qlora(ckpt, torch.bfloat16, torch.bfloat16, double_quant=True)
    bases = [m.get_base_layer() for m in model.modules() if type(m).__name__ == "Linear4bit"
             and hasattr(m, "get_base_layer")]
    assert len(bases) == N_LORA
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    real = rl.lora_linear

    def spy(x, weight, *args, **kwargs):
        seen.append(weight)
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(rl, "lora_linear", spy)
    patch_peft_model(model, backend="torch")
    ids = torch.randint(0, VOCAB, (1, 5))
    model(ids, labels=ids).loss.backward()
    assert len(seen) == N_LORA
    for q, base in zip(seen, bases):
        qs = base.weight.quant_state
        assert q.packed.data_ptr() == base.weight.data_ptr()  # bitsandbytes' bytes, not a copy
        assert q.absmax.data_ptr() == qs.absmax.data_ptr()
        assert q.nested_absmax.data_ptr() == qs.state2.absmax.data_ptr()
        assert q.nested_quant_map.data_ptr() == qs.state2.code.data_ptr()
        assert q.quant_map.data_ptr() == qs.code.data_ptr()
        assert q.dtype == torch.bfloat16 and q.blocksize == qs.blocksize
    after = model.state_dict()
    for k, v in before.items():
        if "lora_" not in k:
            assert torch.equal(after[k], v), f"{k} changed"
    # from_bnb without a model: the same storage too
    q = from_bnb(bases[0].weight)
    assert q.packed.data_ptr() == bases[0].weight.data_ptr() and q.dtype == torch.bfloat16


def test_unpatch_restores_peft_exactly(ckpt):
    model = qlora(ckpt, double_quant=True)
    ids = torch.randint(0, VOCAB, (2, 6))
    ref = loss_and_grads(model, ids)
    forwards = {n: m.forward for n, m in model.named_modules()}
    n = patch_peft_model(model, backend="torch")
    loss_and_grads(model, ids)
    assert unpatch_peft_model(model) == n == N_LORA
    for name, m in model.named_modules():
        assert "forward" not in m.__dict__ and "_rankwise_backend" not in m.__dict__, name
        assert m.forward == forwards[name]
    got = loss_and_grads(model, ids)
    assert torch.equal(got[0], ref[0]) and all(torch.equal(got[1][k], ref[1][k]) for k in ref[1])
    assert set(peft_fusion_report(model).values()) == {"not patched"}


def test_fp4_is_left_to_peft(ckpt, caplog):
    model = qlora(ckpt, quant_type="fp4")
    ids = torch.randint(0, VOCAB, (2, 6))
    ref = loss_and_grads(model, ids)
    with caplog.at_level(logging.WARNING, logger="rankwise.lora"):
        assert patch_peft_model(model, backend="torch") == 0
    assert "0 of 14" in caplog.text and "quant_type 'nf4', got 'fp4'" in caplog.text
    report = peft_fusion_report(model)
    assert len(report) == N_LORA and all("fp4" in why for why in report.values())
    got = loss_and_grads(model, ids)
    assert torch.equal(got[0], ref[0]) and all(torch.equal(got[1][k], ref[1][k]) for k in ref[1])


def test_per_call_fallbacks_match_peft(ckpt):
    """DoRA, two active adapters, disabled adapters, training-mode dropout's eval twin:
    PEFT's own forward, bit for bit; the plain calls around them stay fused."""
    ids = torch.randint(0, VOCAB, (2, 6))
    # DoRA: patched (the base is fusable), every call falls back
    dora = qlora(ckpt, use_dora=True)
    ref = loss_and_grads(dora, ids)
    assert patch_peft_model(dora, backend="torch") == N_LORA
    assert all("variant" in why for why in peft_fusion_report(dora).values())
    got = loss_and_grads(dora, ids)
    assert torch.equal(got[0], ref[0]) and all(torch.equal(got[1][k], ref[1][k]) for k in ref[1])

    model = qlora(ckpt, double_quant=True)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.other" in n:
                p.normal_(std=0.1)
    with torch.no_grad():
        single = decoded_dense_copy(model)(ids).logits  # the fused path's reference: the decoded weights
        model.base_model.set_adapter(["default", "other"])
        both = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert patch_peft_model(model, backend="torch") == N_LORA
    assert all(why == "2 active adapters" for why in peft_fusion_report(model).values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, both)
        with model.disable_adapter():
            assert torch.equal(model(ids).logits, plain)
        model.base_model.set_adapter("default")
        assert all(why is None for why in peft_fusion_report(model).values())
        torch.testing.assert_close(model(ids).logits, single, rtol=1e-6, atol=1e-6)


def test_dropout_is_fused_in_training(ckpt):
    """LoRA dropout (nn.Dropout) stays fused in training, with rankwise's own mask (same
    keep probability, another random stream than torch's); in eval it is the identity."""
    model = qlora(ckpt, lora_dropout=0.5)
    ids = torch.randint(0, VOCAB, (2, 6))
    model.eval()
    ref = oracle(model, ids)
    assert patch_peft_model(model, backend="torch") == N_LORA
    assert_matches(loss_and_grads(model, ids), ref, 1e-6, 1e-5, "eval with dropout configured")
    model.train()
    assert all(why is None for why in peft_fusion_report(model).values())
    torch.manual_seed(5)
    a = loss_and_grads(model, ids)
    torch.manual_seed(6)
    b = loss_and_grads(model, ids)
    assert torch.isfinite(a[0]) and a[0] != b[0] and a[0] != ref[0]


def test_cpu_repacked_weight_is_left(ckpt):
    """bitsandbytes repacks a 4-bit weight in place for its AVX512-BF16 inference kernel
    (eval, no grad, on such CPUs): those bytes are not NF4's layout, the layer is left."""
    model = qlora(ckpt)
    qs = model.base_model.model.model.layers[1].mlp.up_proj.get_base_layer().weight.quant_state
    qs.packing_format_for_cpu = True
    assert patch_peft_model(model, backend="torch") == N_LORA - 1
    report = peft_fusion_report(model)
    assert "packing_format_for_cpu" in report["base_model.model.model.layers.1.mlp.up_proj"]
    del qs.packing_format_for_cpu
    assert unpatch_peft_model(model) == N_LORA - 1


@pytest.mark.parametrize("peft_class,wdtype,compute", [("bnb", torch.float32, torch.float16),
                                                      ("plain", torch.float32, torch.float16),
                                                      ("bnb", torch.bfloat16, torch.float32)])
def test_single_layer_blocksize_32_bias_and_compute_dtype(peft_class, wdtype, compute):
    """A bitsandbytes Linear4bit with blocksize 32, a bias and odd sizes, its weight quantized
    from ``wdtype`` and computing in ``compute`` under fp32 inputs, wrapped by PEFT's QLoRA
    layer or by a plain ``lora.Linear`` (which used to crash in the patched forward): the
    Triton path against the layer's math in float64, forward and gradients. bitsandbytes
    dequantizes straight to its compute dtype (bf16-stored weights compute with fp32 values
    of code * absmax), and so must the op: the oracle's W is the decoded weight rounded
    once to the compute dtype, and rankwise reads exactly those values from the bytes."""
    from peft.tuners.lora import Linear as PeftLinear
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    g = torch.Generator().manual_seed(4)
    K, N = 70, 45
    base = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=compute, quant_type="nf4")
    W = (torch.randn(N, K, generator=g) / K**0.5).to(wdtype)
    base.weight = to_bnb_params(quantize_nf4(W, blocksize=32, double_quant=True))
    base.weight.module = base
    base.bias = nn.Parameter(torch.randn(N, generator=g), requires_grad=False)
    cfg = LoraConfig(r=3, lora_alpha=5, lora_dropout=0.0)
    layer = (PeftLinear4bit if peft_class == "bnb" else PeftLinear)(base, "default", config=cfg, r=3, lora_alpha=5)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(generator=g)
    x = torch.randn(3, 7, K, generator=g)
    dy = torch.randn(3, 7, N, generator=g)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    Wc = decode_nf4_bnb(base.weight.data, base.weight.quant_state).float().to(compute)
    assert torch.equal(dequantize_nf4(from_bnb(base.weight, dtype=compute)), Wc), "rankwise reads other values"

    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    y64 = lora_linear_ref64(x64, Wc.double(), A64, B64, 5 / 3, base.bias.to(compute).double())
    ref = [y64.detach()] + list(torch.autograd.grad(y64, (x64, A64, B64), dy.double()))
    assert patch_peft_model(nn.ModuleDict({"layer": layer}), backend="triton") == 1
    xl = x.clone().requires_grad_()
    y = layer(xl)
    got = [y.detach()] + list(torch.autograd.grad(y, (xl, A, B), dy))
    assert got[0].dtype == torch.float32  # bitsandbytes returns the input's dtype
    # fp32 compute: fp32 sums (K = 70, r = 3), measured 1e-7: 1e-5. fp16 compute: x, W, the
    # LoRA branch and the output in fp16 (2^-11 relative each), measured 4e-4: 2e-3.
    tol = 2e-3 if compute == torch.float16 else 1e-5
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, ref):
        assert rel(a.double(), b) < tol, f"{name}: {rel(a.double(), b):.3e}"


def test_from_bnb_model_matches_the_decoded_model(ckpt):
    """``from_bnb_model``: NF4Linear layers over bitsandbytes' own tensors, computing what the
    bitsandbytes layers define (the decoded weights in the compute dtype, the output in the
    input's dtype): logits as the decoded dense model's, to fp32 rounding (1e-5)."""
    for dtype, compute, dq in ((torch.float32, torch.float32, True), (torch.bfloat16, torch.float32, False)):
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq,
                                 bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, quantization_config=cfg)
        ids = torch.randint(0, VOCAB, (2, 7))
        with torch.no_grad():
            ref = decoded_dense_copy(model)(ids).logits
        ptrs = {n: m.weight.data_ptr() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert from_bnb_model(model) == N_LORA == len(ptrs)
        for name, ptr in ptrs.items():
            m = model.get_submodule(name)
            assert isinstance(m, NF4Linear) and m.weight.packed.data_ptr() == ptr and m.compute_dtype == compute
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
    # a converted QLoRA model patches too (the base is then an NF4Linear)
    peft_model = qlora(ckpt, double_quant=True)
    ids = torch.randint(0, VOCAB, (2, 6))
    ref = oracle(peft_model, ids)
    assert from_bnb_model(peft_model) == N_LORA
    assert patch_peft_model(peft_model, backend="torch") == N_LORA
    assert_matches(loss_and_grads(peft_model, ids), ref, 1e-6, 1e-5, "from_bnb_model + patch")
