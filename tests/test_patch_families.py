"""``rankwise.patch_model`` on the families it did not list before (issue 27): tiny random-init
Mixtral, Qwen3-MoE, Granite-MoE, Granite (``logits_scaling`` 1 and 4), OLMo2 and GLM-4, built
from the config classes of the installed transformers (5.x: MoE experts are 3D ``*Experts``
banks), no hub. Each: patch, the report names what was patched and what was left, and the loss
and every trainable gradient match the unpatched model's.

Tolerances (fp32, torch backend; relative: max|a - b| / max|b| per tensor, as in
test_patch_model.py): loss 2e-6, every trainable gradient 2e-5.
"""
import pytest
import torch
from torch import nn

from helpers import build_perturbed
from test_patch_model import assert_same, batch, loss_and_grads

from rankwise import patch_model, unpatch_model
from rankwise.decoder_kernels import _experts_forward, _fused_apply_gate, patch_decoder_kernels, unpatch_decoder_kernels

VOCAB = 96
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1)
MOE = dict(num_experts_per_tok=2)
GRANITE = dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3)

# family -> (config class, model class, extra config, patched kinds, expert banks patched, the loss fused)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(MOE, num_local_experts=4), {"rms_norm": 5}, 2, True),
    "mixtral_eager": ("MixtralConfig", "MixtralForCausalLM", dict(MOE, num_local_experts=4,
                      experts_implementation="eager"), {"rms_norm": 5}, 2, True),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(MOE, num_experts=4, moe_intermediate_size=16, head_dim=8), {"rms_norm": 9}, 2, True),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(MOE, num_local_experts=4, **GRANITE),
                   {"rms_norm": 5}, 2, True),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(GRANITE, logits_scaling=1.0),
                {"rms_norm": 5, "swiglu": 2}, 0, True),
    "granite_scaled": ("GraniteConfig", "GraniteForCausalLM", dict(GRANITE, logits_scaling=4.0),
                       {"rms_norm": 5, "swiglu": 2}, 0, False),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, {"rms_norm": 9, "swiglu": 2}, 0, True),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {"head_dim": 8}, {"rms_norm": 9, "swiglu_gate_up": 2}, 0, True),
}
KINDS = ("lora", "loss", "rms_norm", "rms_norm_offset", "swiglu", "geglu", "swiglu_gate_up")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def build(family, seed=0, **overrides):
    return build_perturbed(FAMILIES, family, SMALL, seed, **overrides).train()


def same_as_unpatched(model, **patch_kwargs):
    """Patch ``model``; assert the loss and gradients (with and without num_items_in_batch) match."""
    ids, mask, labels = batch()
    ref = loss_and_grads(model, ids, mask, labels)
    ref_n = loss_and_grads(model, ids, mask, labels, num_items_in_batch=torch.tensor(23))
    report = patch_model(model, backend="torch", **patch_kwargs)
    got = loss_and_grads(model, ids, mask, labels)
    assert_same(got, ref, 2e-6, 2e-5, type(model).__name__)
    assert_same(loss_and_grads(model, ids, mask, labels, num_items_in_batch=torch.tensor(23)), ref_n, 2e-6, 2e-5,
                f"{type(model).__name__} num_items_in_batch")
    return report, got[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_report_loss_and_gradients(family):
    *_, kinds, banks, fused = FAMILIES[family]
    model = build(family)
    report, out = same_as_unpatched(model)
    assert report["patched"] == {**dict.fromkeys(KINDS, 0), "loss": int(fused), **kinds}, report
    assert report["experts"] == {"patched": banks, "left": 0, "why": None}, report
    expected_left = {"lora"} | ({"loss"} if not fused else set())
    assert set(report["left"]) == expected_left, report["left"]
    assert (out.logits is None) == fused  # the model's own forward (with its logits) where the loss is left
    rows = report["modules"]
    assert all(row["patched"] == row["count"] and row["why"] is None for row in rows.values()), rows
    patched_as = {row["as"] for row in rows.values()}
    assert patched_as == {k for k in kinds} | ({"swiglu_experts"} if banks else set())
    assert sum(row["count"] for row in rows.values() if row["part"] == "experts") == banks
    if not fused:
        assert "logits_scaling=4.0" in report["left"]["loss"] and "own head" in report["left"]["loss"]
    experts = [m for m in model.modules() if type(m).__name__.endswith("Experts")]
    assert all(vars(m)["forward"].__func__ is _experts_forward for m in experts)
    if family != "mixtral_eager":  # transformers' grouped_mm experts keep running, with the fused gate
        assert experts == [] or model.config._experts_implementation == "grouped_mm"
        assert all(vars(m)["_apply_gate"].__func__ is _fused_apply_gate for m in experts)
    unpatch_model(model)
    assert not any("forward" in vars(m) or "_apply_gate" in vars(m) for m in model.modules()), \
        "unpatch must restore every forward"


def test_router_aux_loss_leaves_the_loss_to_the_model():
    model = build("mixtral", output_router_logits=True, router_aux_loss_coef=0.5)
    report, out = same_as_unpatched(model)
    assert report["patched"]["loss"] == 0 and "output_router_logits" in report["left"]["loss"]
    assert report["experts"]["patched"] == 2 and out.aux_loss is not None


def test_experts_not_swiglu_are_reported_left():
    model = build("mixtral", hidden_act="gelu")
    report, _ = same_as_unpatched(model)
    assert report["experts"]["patched"] == 0 and report["experts"]["left"] == 2
    assert "not SiLU" in report["left"]["experts"] and "MixtralExperts" in report["left"]["experts"]
    row = report["modules"]["MixtralExperts"]
    assert row["patched"] == 0 and "not SiLU" in row["why"]
    assert "no gated MLP" in report["left"]["mlp"]


def test_experts_whose_forward_differs_are_left():
    model = build("qwen3_moe")
    for m in model.modules():
        if type(m).__name__ == "Qwen3MoeExperts":
            m.forward = (lambda self: lambda h, i, w: 0.5 * type(self).forward(self, h, i, w))(m)
    report, _ = same_as_unpatched(model)
    assert report["experts"] == {"patched": 0, "left": 2, "why": report["experts"]["why"]}
    assert "computes something else" in report["experts"]["why"]
    assert "Qwen3MoeExperts" in report["left"]


def test_mlp_false_leaves_the_experts():
    report, _ = same_as_unpatched(build("mixtral"), mlp=False)
    assert report["experts"]["left"] == 2 and "mlp=False" in report["left"]["experts"]


class W13(nn.Module):
    """The older Mixtral expert layout: w2(silu(w1 x) * w3 x)."""

    def __init__(self):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(8, 12, bias=False), nn.Linear(8, 12, bias=False), nn.Linear(12, 8)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


def test_w1_w3_w2_mlp_runs_the_fused_swiglu():
    torch.manual_seed(0)
    m = nn.Sequential(W13(), W13())
    x = torch.randn(3, 8, requires_grad=True)
    ref = m(x)
    ref.sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    assert patch_decoder_kernels(m, backend="torch", all_kinds=True)["swiglu"] == 2
    x2 = x.detach().clone().requires_grad_()
    out = m(x2)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
    assert unpatch_decoder_kernels(m) == 2


def test_peft_lora_on_the_expert_parameters():
    """PEFT's ``target_parameters`` (LoRA on the 3D expert weights, ``ParamWrapper``): the expert
    banks under it run the fused SwiGLU on the LoRA-updated weights, the LoRA gradients unchanged."""
    peft = pytest.importorskip("peft")
    model = build("mixtral")
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    try:
        model = peft.get_peft_model(model, config)
    except (TypeError, ValueError) as e:  # a peft without target_parameters
        pytest.skip(f"peft {peft.__version__}: {e}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
    report, _ = same_as_unpatched(model)
    assert report["experts"] == {"patched": 2, "left": 0, "why": None}
    assert report["patched"]["lora"] == 4 and "ParamWrapper" in report["left"]["lora"]
    unpatch_model(model)


def test_mixtral_triton_experts():
    """The Triton backend (the interpreter without CUDA): norms, the experts' fused SwiGLU and the
    loss; gradients within 5e-5 (the kernels' own order of sums), as test_patch_model.py's Triton tests."""
    model = build("mixtral")
    ids, mask, labels = batch(5, L=6)
    ref = loss_and_grads(model, ids, mask, labels)
    report = patch_model(model, backend="triton")
    assert report["experts"]["patched"] == 2 and report["patched"]["loss"] == 1, report
    assert_same(loss_and_grads(model, ids, mask, labels), ref, 2e-6, 5e-5, "mixtral triton")
    unpatch_model(model)
