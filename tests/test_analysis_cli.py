"""End-to-end analysis of a tiny fine-tuned Llama through `rankwise analyze`.

The fixture builds a tiny base model with a word-level tokenizer, a "full SFT"
run (a perturbed copy saved with save_pretrained), and two hand-written PEFT
adapter directories (r=2, and r=4 with rsLoRA scaling).
"""
import json
import math
import os

import pytest
import torch
import yaml

from rankwise import cli
from rankwise.analysis import (
    analyze_runs,
    compare_attention,
    compare_on_probe,
    compare_representations,
    markdown_section,
    token_kl_by_bucket,
)
from rankwise.analysis.runs import Run, load_tuned_model, read_run_config
from rankwise.errors import ConfigError

WORDS = ("who what where is the of in city river lives born works capital paris rome oslo lima "
         "alice bob carol dave eve answer question").split()
N_LAYERS = 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def _write_adapter(run_dir, base_dir, r, alpha, rslora, seed):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    os.makedirs(os.path.join(run_dir, "adapter"))
    tensors, deltas = {}, {}
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    for layer in range(N_LAYERS):
        for mod, out_f in (("q_proj", 32), ("v_proj", 16)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            A = torch.randn(r, 32, generator=gen) * 0.3
            B = torch.randn(out_f, r, generator=gen) * 0.3
            tensors[prefix + ".lora_A.weight"] = A
            tensors[prefix + ".lora_B.weight"] = B
            deltas[f"model.layers.{layer}.self_attn.{mod}.weight"] = scaling * B.double() @ A.double()
    save_file(tensors, os.path.join(run_dir, "adapter", "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_dir, "r": r,
           "lora_alpha": alpha, "use_rslora": rslora, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0,
           "bias": "none", "fan_in_fan_out": False, "inference_mode": True}
    with open(os.path.join(run_dir, "adapter", "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    # rankwise train writes resolved_config.yaml; runs of older versions hold config.yaml: both are read
    with open(os.path.join(run_dir, "config.yaml" if r == 2 else "resolved_config.yaml"), "w") as f:
        yaml.safe_dump({"model": base_dir, "method": "lora", "lora": {"r": r, "alpha": alpha, "rslora": rslora}}, f)
    return deltas


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("analysis")
    base_dir = str(root / "base")
    tok = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    base = LlamaForCausalLM(config)
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    # "full SFT": every layer matrix moved, norms and embeddings left alone
    full_dir = str(root / "full")
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "layers" in name and "norm" not in name:
                p.add_(0.05 * torch.randn_like(p))
    base.save_pretrained(os.path.join(full_dir, "model"))
    with open(os.path.join(full_dir, "config.yaml"), "w") as f:
        yaml.safe_dump({"model": base_dir, "method": "full"}, f)
    r2 = str(root / "lora_r2")
    r4 = str(root / "lora_r4")
    deltas = {"lora_r2": _write_adapter(r2, base_dir, 2, 4, False, 1),
              "lora_r4": _write_adapter(r4, base_dir, 4, 8, True, 2)}
    probe = str(root / "probe.jsonl")
    rows = []
    for i, (who, city) in enumerate([("alice", "paris"), ("bob", "rome"), ("carol", "oslo"), ("dave", "lima"),
                                     ("eve", "paris"), ("alice", "rome"), ("bob", "lima")]):
        q = "question where is the city of " + who + (" born" if i % 2 else "") + " answer"
        rows.append({"prompt": q, "answer": city, "bucket": ["D0", "D2", "D4"][i % 3]})
    with open(probe, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"root": root, "base": base_dir, "full": full_dir, "r2": r2, "r4": r4, "deltas": deltas,
            "probe": probe, "rows": rows}


def test_analyze_cli_end_to_end(world, capsys):
    out = str(world["root"] / "out")
    rc = cli.main(["analyze", world["full"], world["r4"], world["r2"], "--base", world["base"],
                   "--probe", world["probe"], "--out", out, "--quiet", "--batch-size", "3", "--intruder-k", "4"])
    assert rc == 0, capsys.readouterr().err
    with open(os.path.join(out, "analysis.json")) as f:
        a = json.load(f)
    assert [r["name"] for r in a["runs"]] == ["lora_r2", "lora_r4", "full"]  # sorted by rank, SFT last
    assert [r["label"] for r in a["runs"]] == ["r=2", "r=4", "full"]
    for run in a["runs"][:2]:
        sp = run["spectral"]
        assert sp["n_matrices"] == 2 * N_LAYERS
        r = run["rank"]
        for rec in sp["matrices"]:
            ref = world["deltas"][run["name"]][rec["name"]]
            # ΔW = scaling · B @ A, rsLoRA for r=4: against the float64 delta built by the test
            assert rec["fro_norm"] == pytest.approx(ref.norm().item(), rel=1e-5)
            assert rec["singular_values"][:r] == pytest.approx(torch.linalg.svdvals(ref)[:r].tolist(), rel=1e-4)
            assert max(rec["singular_values"][r:]) < 1e-5 * rec["singular_values"][0]
            assert 1.0 <= rec["effective_rank"] <= r + 1e-3 and rec["stable_rank"] <= r + 1e-3
            assert 0 <= rec["intruders"] <= 4 and len(rec["top_sv_similarity"]) == 4
        assert sp["update_norm"] == pytest.approx(
            math.sqrt(sum(d.norm().item() ** 2 for d in world["deltas"][run["name"]].values())), rel=1e-5)
    full = a["runs"][2]["spectral"]
    assert full["n_matrices"] == 7 * N_LAYERS  # q k v o gate up down per layer; norms excluded
    assert full["mean_effective_rank"] > a["runs"][1]["spectral"]["mean_effective_rank"]
    assert set(full["by_layer"]) == {"0", "1"} and "mlp.down_proj" in full["by_module"]
    for run in a["runs"]:
        p = run["probe"]
        att = p["attention"]
        assert len(att["entropy_base"]) == N_LAYERS and all(len(h) == 4 for h in att["js_distance"])
        assert all(0 < v <= 1 for h in att["js_distance"] for v in h)
        assert len(p["representations"]["cka"]) == N_LAYERS + 1
        assert p["representations"]["cka"][0] == pytest.approx(1.0)  # embeddings are not tuned
        assert set(p["tokens"]["by_bucket"]) == {"D0", "D2", "D4"} and p["tokens"]["overall"]["n"] == 7
    assert a["runs"][2]["probe"]["tokens"]["overall"]["mean"] > 0
    sub = a["subspace_similarity"]
    assert len(sub) == 1 and sub[0]["i"] == [1, 2] and sub[0]["j"] == [1, 2, 4]
    assert all(0 <= v <= 1 + 1e-6 for row in sub[0]["phi"] for v in row)
    for key, name in a["files"]["plots"].items():
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == PNG_MAGIC, key
    assert set(a["files"]["plots"]) == {"spectra", "rank_norm", "intruders", "attention", "cka", "kl"}
    md = open(os.path.join(out, "analysis.md")).read()
    assert md.startswith("## Analysis") and "| lora_r4 | lora | 4 |" in md and "](token_kl.png)" in md
    # the section can be placed in a report one directory up
    sec = markdown_section(a, out, relative_to=str(world["root"]))
    assert "](out/cka.png)" in sec
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_lora_tuned_model_matches_peft(world):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    run = Run(world["r4"])
    ours = load_tuned_model(run, world["base"], "cpu", torch.float32)
    ref = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["base"]),
                                         os.path.join(world["r4"], "adapter")).eval()
    ids = torch.tensor([[1, 5, 9, 12, 7, 20, 3]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def test_probe_metrics_self_and_batch_invariance(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["base"])
    model = AutoModelForCausalLM.from_pretrained(world["base"], attn_implementation="sdpa")
    tuned = AutoModelForCausalLM.from_pretrained(os.path.join(world["full"], "model"), attn_implementation="sdpa")
    rows = world["rows"]
    kl = token_kl_by_bucket(model, model, tok, rows, batch_size=4)
    assert set(kl["by_bucket"]) == {"D0", "D2", "D4"} and kl["overall"]["n"] == len(rows)
    assert all(v["mean"] == 0.0 for v in kl["by_bucket"].values())  # KL of a model vs itself
    att = compare_attention(model, model, tok, [r["prompt"] for r in rows], batch_size=4)
    assert model.config._attn_implementation == "sdpa"  # eager only for the pass
    assert all(abs(v) < 1e-6 for h in att["js_distance"] for v in h)
    assert att["entropy_base"] == att["entropy_tuned"]
    cka = compare_representations(model, model, tok, rows, batch_size=4)["cka"]
    assert cka == pytest.approx([1.0] * (N_LAYERS + 1), abs=1e-9)
    # a change confined to layer 1's attention: layer 0 maps and states untouched, layer 1 moved
    layer1 = AutoModelForCausalLM.from_pretrained(world["base"])
    with torch.no_grad():
        layer1.model.layers[1].self_attn.q_proj.weight.mul_(3.0)
        layer1.model.layers[1].self_attn.o_proj.weight.add_(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    part = compare_on_probe(model, layer1, tok, rows, batch_size=4)
    js = part["attention"]["js_distance"]
    assert max(js[0]) < 1e-6 and min(js[1]) > 1e-3, js
    c = part["representations"]["cka"]
    assert c[0] == pytest.approx(1.0, abs=1e-9) and c[1] == pytest.approx(1.0, abs=1e-9) and c[2] < 1 - 1e-4, c
    assert part["tokens"]["overall"]["mean"] > 0
    # padding must not leak into any metric: batch size 1 (no padding) and 4 agree
    a = compare_on_probe(model, tuned, tok, rows, batch_size=4)
    b = compare_on_probe(model, tuned, tok, rows, batch_size=1)
    for key in ("entropy_base", "entropy_tuned", "js_distance"):
        for la, lb in zip(a["attention"][key], b["attention"][key]):
            assert la == pytest.approx(lb, abs=1e-5), key
    assert a["representations"]["cka"] == pytest.approx(b["representations"]["cka"], abs=1e-6)
    assert a["tokens"]["by_bucket"]["D2"]["mean"] == pytest.approx(b["tokens"]["by_bucket"]["D2"]["mean"], abs=1e-6)
    assert a["attention"]["n_queries"] == b["attention"]["n_queries"] == sum(
        len(tok(r["prompt"])["input_ids"]) for r in rows)


def test_analyze_runs_restoration_with_stubs(world):
    out = str(world["root"] / "out_restore")
    eval_rows = [dict(r) for r in world["rows"]]

    def restore_stub(base_sd, tuned_sd, fraction, **kw):
        # put back whole tensors in name order until the fraction of tensors is reached
        names = sorted(k for k in tuned_sd if "layers" in k and "norm" not in k)
        chosen = names[: round(fraction * len(names))] if kw["select"] != "bottom" else names[::-1][: round(fraction * len(names))]
        return {k: base_sd[k].clone() for k in chosen}, {"share": fraction}

    def acc_stub(model, tokenizer, rows):
        return {"accuracy": float(model.model.layers[0].self_attn.q_proj.weight.detach().sum().abs() % 1.0)}

    a = analyze_runs([world["full"], world["r2"]], world["base"], None, out, restore_sets={"in_domain": eval_rows},
                     restore_fractions=[0.1, 0.6], accuracy_fn=acc_stub, restore_fn=restore_stub, progress=False,
                     intruders=False)
    lora, full = a["runs"]
    assert lora["restoration"] is None and lora["probe"] is None and "intruders_total" not in lora["spectral"]
    res = full["restoration"]
    assert set(res["curves"]) == {"top", "bottom", "random"}
    assert [p["fraction"] for p in res["curves"]["top"]["in_domain"]] == [0.1, 0.6]
    assert set(res["curves"]["top"]["in_domain"][0]["by_bucket"]) == {"D0", "D2", "D4"}
    assert "restoration" in a["files"]["plots"] and "intruders" not in a["files"]["plots"]
    md = open(os.path.join(out, "analysis.md")).read()
    assert "### Restoration curve: full" in md and "| top |" in md
    assert "Per bucket (top selection):" in md and "| D2 |" in md


def test_analyze_cli_restore_with_real_masking(world, capsys):
    out = str(world["root"] / "out_real_restore")
    rc = cli.main(["analyze", world["full"], "--base", world["base"], "--out", out, "--quiet", "--no-intruders",
                   "--restore", f"in_domain={world['probe']}", "--restore-fractions", "1,60",
                   "--restore-selections", "top,random"])
    assert rc == 0, capsys.readouterr().err
    a = json.load(open(os.path.join(out, "analysis.json")))
    res = a["runs"][0]["restoration"]
    assert [p["fraction"] for p in res["curves"]["top"]["in_domain"]] == [0.01, 0.6]
    assert all(0.0 <= p["mean"] <= 1.0 for p in res["curves"]["random"]["in_domain"])


def test_analyze_cli_bad_input(world, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert cli.main(["analyze", str(tmp_path / "nope"), "--base", world["base"], "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert cli.main(["analyze", str(empty), "--base", world["base"], "--out", out]) == 2
    assert "neither adapter/adapter_config.json nor model/" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "who"}\nnot json\n')
    assert cli.main(["analyze", world["r2"], "--base", world["base"], "--probe", str(bad), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "probe row 2 (line 2 of" in err and "bad.jsonl) is not valid JSON" in err
    assert cli.main(["analyze", world["r2"], "--base", str(tmp_path / "nobase"), "--out", out]) == 2
    assert "base model" in capsys.readouterr().err
    assert cli.main(["analyze", world["r2"], "--base", world["base"], "--out", out, "--device", "nonsense"]) == 2
    assert "device must name a torch device" in capsys.readouterr().err
    assert cli.main(["analyze", world["r2"], "--base", world["base"], "--out", out, "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_unsupported_adapters_and_sharded_base_are_read_through_the_library(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from rankwise.model import SafetensorsCheckpoint

    # an adapter whose modules have their own ranks is refused, not misread
    odd = tmp_path / "odd" / "adapter"
    odd.mkdir(parents=True)
    os.symlink(os.path.join(world["r2"], "adapter", "adapter_model.safetensors"), odd / "adapter_model.safetensors")
    cfg = json.load(open(os.path.join(world["r2"], "adapter", "adapter_config.json")))
    (odd / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(ConfigError, match="rank_pattern"):
        Run(str(odd.parent))
    # a sharded save_pretrained base reads the same tensors as the single-file one
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(world["base"]).save_pretrained(str(sharded), max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    one, many = SafetensorsCheckpoint(world["base"]), SafetensorsCheckpoint(sharded)
    assert sorted(one.keys()) == sorted(many.keys()) and len(set(many.files.values())) > 1
    for k in one.keys():
        assert many.shape(k) == one.shape(k)
        assert torch.equal(many.get(k), one.get(k)), k


def test_base_defaults_to_the_runs_config_model(world, tmp_path):
    out = str(tmp_path / "o")
    # r4 holds resolved_config.yaml, full an older run's config.yaml
    assert cli.main(["analyze", world["r4"], world["full"], "--out", out, "--quiet", "--no-intruders",
                     "--no-plots"]) == 0
    a = json.load(open(os.path.join(out, "analysis.json")))
    assert a["base"] == world["base"] and a["files"]["plots"] == {}
    assert [r["spectral"]["n_matrices"] for r in a["runs"]] == [2 * N_LAYERS, 7 * N_LAYERS]
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(os.path.join(world["r2"], "adapter"), other / "adapter")
    (other / "config.yaml").write_text("model: somewhere/else\nmethod: lora\n")
    with pytest.raises(ValueError, match="different models"):
        analyze_runs([world["r2"], str(other)], None, None, out, progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_analysis_on_cuda_matches_cpu(world, tmp_path):
    kw = dict(progress=False, plots=False, dtype="float32", intruder_k=4)
    runs = [world["r4"], world["full"]]
    cpu = analyze_runs(runs, world["base"], world["rows"], str(tmp_path / "cpu"), device="cpu", **kw)
    gpu = analyze_runs(runs, world["base"], world["rows"], str(tmp_path / "gpu"), device="cuda", **kw)
    assert gpu["device"].startswith("cuda")
    for rc, rg in zip(cpu["runs"], gpu["runs"]):
        sc, sg = rc["spectral"], rg["spectral"]
        assert sg["update_norm"] == pytest.approx(sc["update_norm"], rel=1e-4)
        assert sg["mean_effective_rank"] == pytest.approx(sc["mean_effective_rank"], rel=1e-3)
        assert sg["intruders_total"] == sc["intruders_total"]
        pc, pg = rc["probe"], rg["probe"]
        assert pg["representations"]["cka"] == pytest.approx(pc["representations"]["cka"], abs=1e-3)
        assert pg["tokens"]["overall"]["mean"] == pytest.approx(pc["tokens"]["overall"]["mean"], abs=1e-4)
        for lg, lc in zip(pg["attention"]["js_distance"], pc["attention"]["js_distance"]):
            assert lg == pytest.approx(lc, abs=1e-3)


def test_run_reading_refuses_bad_patterns_and_hostile_configs(world, tmp_path):
    """A bad include/exclude regex is one ConfigError naming the flag, and a run's config is read as untrusted
    YAML (an alias bomb is refused, not expanded)."""
    with pytest.raises(ConfigError, match="--include"):
        Run(world["full"], include="layers(")
    with pytest.raises(ConfigError, match="--exclude"):
        Run(world["full"], exclude="[norm")
    assert Run(world["full"], include="", exclude="").matrices  # empty patterns: every 2-D matrix
    bomb = tmp_path / "bomb"
    (bomb / "model").mkdir(parents=True)
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    (bomb / "resolved_config.yaml").write_text("\n".join(lines) + "\nmodel: *a8\n")
    with pytest.raises(ConfigError):
        read_run_config(str(bomb))
