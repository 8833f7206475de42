"""rankwise.adapter against PEFT itself: a PEFT-saved adapter merges into the same weights as PEFT's own
``merge_and_unload`` (plain and rsLoRA scaling), the per-layer update norms equal PEFT's ``get_delta_weight``,
and the PEFT options rankwise does not implement are refused by name instead of silently misread."""
import json

import pytest
import torch
from test_data import build_tiny_llama

from rankwise.adapter import (check_adapter_config, lora_delta, lora_delta_norms, merge_adapter, read_adapter, scaling_of,
                              unwrap_lora)
from rankwise.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def peft_adapter(base_path, out, r, alpha, rslora):
    """A PEFT LoRA adapter with non-zero B (so the merge is not the identity), saved by PEFT."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = get_peft_model(load(base_path), LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora,
                                                       target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return model


@pytest.mark.parametrize("r,alpha,rslora", [(3, 8, False), (5, 7.5, True), (1, 2, False)])
def test_merge_equals_peft_merge_and_unload(tiny, tmp_path, r, alpha, rslora):
    peft_model = peft_adapter(tiny, tmp_path / "adapter", r, alpha, rslora)
    delta_peft = {n.split("base_model.model.", 1)[1]: m.get_delta_weight("default").float()
                  for n, m in peft_model.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "lora_A")}
    want = {n: p.detach().clone() for n, p in peft_model.merge_and_unload().named_parameters()}
    cfg, _ = read_adapter(tmp_path / "adapter")
    assert scaling_of(cfg) == pytest.approx(alpha / (r ** 0.5 if rslora else r))
    got = dict(merge_adapter(load(tiny), tmp_path / "adapter").named_parameters())
    assert set(got) == set(want)
    changed = 0
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=1e-6, atol=1e-6, msg=lambda m: f"{n}: {m}")
        changed += int(not torch.equal(w, load_param(tiny, n)))
    assert changed == 2 * 3  # q_proj, v_proj and down_proj of both layers moved

    # the same update through rankwise's own LoRA layers: norms and the unwrapped weights
    from rankwise.adapter import load_adapter

    ours = load_adapter(load(tiny), tmp_path / "adapter")
    norms = lora_delta_norms(ours)
    assert set(norms) == set(delta_peft)
    for name, d in delta_peft.items():
        assert norms[name] == pytest.approx(float(d.norm()), rel=1e-5)
    for n, p in unwrap_lora(ours).named_parameters():
        torch.testing.assert_close(p, want[n], rtol=1e-6, atol=1e-6)


_BASE = {}


def load_param(path, name):
    if path not in _BASE:
        _BASE[path] = dict(load(path).named_parameters())
    return _BASE[path][name]


@pytest.mark.parametrize("key,value", [("rank_pattern", {"q_proj": 8}), ("alpha_pattern", {"v_proj": 3.0}),
                                       ("use_dora", True), ("fan_in_fan_out", True)])
def test_unsupported_peft_options_are_refused(tiny, tmp_path, key, value):
    peft_adapter(tiny, tmp_path / "adapter", 2, 4, False)
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(ValueError, match=key):
        merge_adapter(load(tiny), tmp_path / "adapter")


def test_lora_delta_checks_shapes():
    A, B = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(lora_delta(A, B, 0.5), (0.5 * B @ A).float())
    with pytest.raises(ValueError, match="do not chain"):
        lora_delta(B, A, 1.0)


PEFT_CONFIG = {"peft_type": "LORA", "base_model_name_or_path": "m", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
               "target_modules": ["q_proj", "v_proj"], "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}


@pytest.mark.parametrize("change, message", [
    ({"r": "two"}, "r must be a positive integer (the rank), got 'two'"),
    ({"r": 0}, "r must be a positive integer (the rank), got 0"),
    ({"r": 2.5}, "r must be a positive integer"),
    ({"r": True}, "r must be a positive integer"),
    ({"lora_alpha": None}, "lora_alpha must be a finite number >= 0, got None"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number >= 0, got nan"),
    ({"lora_alpha": -1}, "lora_alpha must be a finite number >= 0, got -1"),
    ({"target_modules": 5}, "target_modules must be a list of module names (or one pattern string), got 5"),
    ({"target_modules": []}, "target_modules must be a list of module names"),
    ({"target_modules": ""}, "target_modules must be a list of module names"),
    ({"lora_dropout": 1.0}, "lora_dropout must be a number in [0, 1) or null, got 1.0"),
    ({"use_rslora": 1}, "use_rslora must be true, false or null, got 1"),
    ({"base_model_name_or_path": 1}, "base_model_name_or_path must be a model path or hub id (a string) or null, got 1"),
    ({"peft_type": "IA3"}, "peft_type must be LORA, got 'IA3'"),
    ({"r": None, "drop": "r"}, "missing key 'r'"),
    ({"r": list(range(10**5))}, "got [0, 1, 2, 3, ...]"),
])
def test_adapter_config_fields_are_checked_by_name(change, message):
    cfg = {**PEFT_CONFIG, **{k: v for k, v in change.items() if k != "drop"}}
    cfg.pop(change.get("drop"), None)
    with pytest.raises(ConfigError) as e:
        check_adapter_config(cfg, "a/adapter_config.json")
    assert str(e.value).startswith("a/adapter_config.json: ") and message in str(e.value), str(e.value)
    assert len(str(e.value)) < 200 and "\n" not in str(e.value)


def test_a_valid_peft_config_passes_and_other_json_is_refused():
    assert check_adapter_config(dict(PEFT_CONFIG), "c") == PEFT_CONFIG
    assert check_adapter_config({**PEFT_CONFIG, "target_modules": "all-linear", "lora_dropout": None,
                                 "use_rslora": None, "base_model_name_or_path": None}, "c")
    with pytest.raises(ConfigError, match="^c: expected a JSON object, got list$"):
        check_adapter_config([1], "c")


def test_tensors_of_another_rank_than_r_are_refused(tiny, tmp_path):
    peft_adapter(tiny, tmp_path / "adapter", 2, 4, False)
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 3}))
    with pytest.raises(ConfigError, match=r"lora_A.weight has shape \(2, \d+\), not \(r, in\) with r = 3"):
        read_adapter(tmp_path / "adapter")
