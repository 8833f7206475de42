"""LoRALinear, inject_lora and patch_peft_model: PEFT semantics and parity."""
import math

import pytest
import torch
from torch import nn

import rankwise
from rankwise import LoRALinear, inject_lora, patch_peft_model, unpatch_peft_model


def tiny_llama(tmp_path=None, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    if tmp_path is not None:  # through the real from_pretrained path
        model.save_pretrained(tmp_path / "base")
        model = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    return model.eval()


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scaling(rslora, expected):
    m = LoRALinear(nn.Linear(10, 12), r=4, alpha=16, use_rslora=rslora)
    assert m.scaling == pytest.approx(expected)


@pytest.mark.parametrize("init", ["default", "gaussian", "pissa", "pissa_niter_4"])
def test_init_keeps_the_base_output(init):
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    ref = nn.Linear(24, 20)
    ref.load_state_dict(base.state_dict())
    m = LoRALinear(base, r=4, alpha=8, init=init)
    x = torch.randn(5, 24)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    if init in ("default", "gaussian"):
        assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
    if init == "gaussian":
        assert abs(m.lora_A.std().item() - 1 / 4) < 0.05
    if init == "pissa":  # the adapter holds the top-4 singular directions of W
        s_ref = torch.linalg.svdvals(ref.weight.detach())[:4]
        s_ad = torch.linalg.svdvals(m.delta_weight())
        torch.testing.assert_close(s_ad[:4], s_ref, rtol=1e-4, atol=1e-4)


def test_merge_unmerge_and_frozen_base():
    torch.manual_seed(0)
    m = LoRALinear(nn.Linear(16, 9), r=3, alpha=6, init="gaussian")
    nn.init.normal_(m.lora_B)
    assert not m.base.weight.requires_grad and m.lora_A.requires_grad
    x = torch.randn(4, 16)
    y = m(x)
    w0 = m.base.weight.detach().clone()
    m.merge()
    torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(m.base.weight, w0)
    m.unmerge()
    torch.testing.assert_close(m.base.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(x), y, rtol=1e-6, atol=1e-6)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="r"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(ValueError, match="init"):
        LoRALinear(nn.Linear(4, 4), r=1, alpha=1, init="xavier")
    with pytest.raises(TypeError, match="base"):
        LoRALinear(nn.Conv1d(4, 4, 1), r=1, alpha=1)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), r=1, alpha=1, dropout=1.5)


def _peft_pair(r=4, alpha=8, dropout=0.0, rslora=False):
    """The same weights in a PEFT LoraLayer and in a rankwise LoRALinear."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("proj", nn.Linear(37, 23))
    base_sd = {k: v.clone() for k, v in net.state_dict().items()}
    peft_model = get_peft_model(net, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                target_modules=["proj"], use_rslora=rslora))
    layer = peft_model.base_model.model.proj
    nn.init.normal_(layer.lora_B["default"].weight)
    base = nn.Linear(37, 23)
    base.load_state_dict({k.split(".", 1)[1]: v for k, v in base_sd.items()})
    ours = LoRALinear(base, r=r, alpha=alpha, dropout=dropout, use_rslora=rslora, backend="triton")
    with torch.no_grad():
        ours.lora_A.copy_(layer.lora_A["default"].weight)
        ours.lora_B.copy_(layer.lora_B["default"].weight)
    return layer, ours


@pytest.mark.parametrize("rslora", [False, True])
def test_same_outputs_and_grads_as_peft_layer(rslora):
    layer, ours = _peft_pair(r=5, alpha=10, rslora=rslora)
    x = torch.randn(3, 11, 37)
    y_peft, y_ours = layer(x), ours(x)
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y_peft)
    gp = torch.autograd.grad(y_peft, (layer.lora_A["default"].weight, layer.lora_B["default"].weight), dy)
    go = torch.autograd.grad(y_ours, (ours.lora_A, ours.lora_B), dy)
    for a, b in zip(go, gp):  # fp32 sums over 33 rows in another order: 1e-5 of the largest entry
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_inject_lora_on_a_causal_lm(tmp_path):
    model = tiny_llama(tmp_path)
    ids = torch.randint(0, 61, (2, 9))
    ref = model(ids).logits
    inject_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    layers = rankwise.lora_layers(model)
    assert len(layers) == 2 * 3
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    torch.testing.assert_close(model(ids).logits, ref)  # B = 0 at init
    # training signal reaches the adapters
    model(ids).logits.sum().backward()
    assert all(m.lora_B.grad is not None for _, m in layers)
    # regex and all-linear targets; a second injection does not wrap wrapped layers
    m2 = inject_lora(tiny_llama(), r".*layers\.0\.self_attn\.(q|k)_proj", r=2, alpha=2)
    assert len(rankwise.lora_layers(m2)) == 2
    m3 = inject_lora(tiny_llama(), "all-linear", r=2, alpha=2)
    assert len(rankwise.lora_layers(m3)) == 2 * 7  # lm_head excluded
    with pytest.raises(ValueError, match="already"):
        inject_lora(m3, "all-linear", r=2, alpha=2)
    assert len(rankwise.lora_layers(m3)) == 2 * 7
    with pytest.raises(ValueError, match="matched no linear layer"):
        inject_lora(tiny_llama(), ["c_attn"], r=2, alpha=2)


def test_patch_peft_model_keeps_outputs_and_grads():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"]))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 61, (2, 7))
    y_ref = peft_model(ids).logits
    g_ref = torch.autograd.grad(y_ref.square().mean(), [p for p in peft_model.parameters() if p.requires_grad])
    n = patch_peft_model(peft_model, backend="triton")
    assert n == 2 * 3
    y = peft_model(ids).logits
    g = torch.autograd.grad(y.square().mean(), [p for p in peft_model.parameters() if p.requires_grad])
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert unpatch_peft_model(peft_model) == n
    with pytest.raises(ValueError, match="no PEFT LoRA"):
        patch_peft_model(nn.Linear(3, 3))


def test_lora_over_nf4_base_forward_merge_and_inject():
    from rankwise.quant import NF4Linear, dequantize_nf4, quantize_model_nf4

    torch.manual_seed(0)
    lin = nn.Linear(64, 40)
    base = NF4Linear.from_linear(lin, compute_dtype=torch.float32)
    m = LoRALinear(base, r=4, alpha=8, backend="triton")
    nn.init.normal_(m.lora_B, std=0.1)
    assert m.lora_A.dtype == torch.float32
    x = torch.randn(3, 64)
    W = dequantize_nf4(base.weight).float()
    want = x @ W.T + base.bias + m.scaling * (x @ m.lora_A.T) @ m.lora_B.T
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    m.merge()  # re-quantizes W + sBA: within NF4's rounding of the merged weight
    merged = dequantize_nf4(m.base.weight).float()
    step = (W + m.delta_weight()).abs().max().item() / 7  # coarsest NF4 step of a block, bounded
    assert (merged - (W + m.delta_weight())).abs().max().item() <= step
    model = tiny_llama()
    quantize_model_nf4(model)
    inject_lora(model, ["q_proj", "up_proj"], r=2, alpha=4)
    assert all(isinstance(layer.base, NF4Linear) for _, layer in rankwise.lora_layers(model))
    out = model(torch.randint(0, 61, (1, 5))).logits
    assert torch.isfinite(out).all()
