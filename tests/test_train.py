"""End-to-end training on a tiny Llama: loss falls, masking, resume, PEFT round trip, merge, CLI, eval helpers."""
import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file
from launcher import torchrun
from test_data import build_tiny_llama, qa_rows, write_jsonl

import rankwise.fit as rfit
import rankwise.train as rt
from rankwise import cli
from rankwise.checkpoint import load_checkpoint
from rankwise.errors import ConfigError
from rankwise.evaluate import eval_loss, generate_answers, is_correct, qa_accuracy


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("world")
    model = build_tiny_llama(d / "model")
    return {"model": model, "train": write_jsonl(d / "train.jsonl", qa_rows(32)),
            "eval": write_jsonl(d / "eval.jsonl", qa_rows(8)), "ood": write_jsonl(d / "ood.jsonl", qa_rows(8, 100))}


def make_cfg(world, out, method="lora", **train):
    return {"model": world["model"], "method": method, "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
            "mask": {"fraction": 0.1, "warmup_steps": 2},
            "data": {"train": world["train"], "eval": world["eval"], "max_length": 64},
            "train": {"max_steps": 30, "batch_size": 8, "lr": 1e-2 if method == "lora" else 3e-3, "log_every": 5,
                      "save_every": 0, **train},
            "eval": {"every": 0, "max_new_tokens": 4}, "log": {"progress": False}, "output_dir": str(out)}


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("method", ["lora", "full", "masked"])
def test_loss_falls_and_outputs_are_written(world, tmp_path, method):
    out = tmp_path / method
    summary = rt.train(make_cfg(world, out, method))
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    assert all({"lr", "tokens_per_s", "grad_norm"} <= set(r) for r in train_rows)
    first, final = train_rows[0]["loss"], train_rows[-1]["loss"]
    assert final < 0.8 * first, f"{method}: loss {first:.3f} -> {final:.3f}"
    assert rows[-1]["step"] == 30 and "eval_loss" in rows[-1] and "eval_accuracy" in rows[-1]
    assert summary["train_loss"] == final and summary["eval_loss"] == rows[-1]["eval_loss"]
    with open(out / "resolved_config.yaml") as f:
        resolved = yaml.safe_load(f)
    assert resolved["method"] == method and resolved["train"]["schedule"] == "cosine"
    assert not (out / "config.yaml").exists(), "config.yaml is the user's name; the run writes resolved_config.yaml"
    settings = json.loads((out / "settings.json").read_text())
    assert settings["settings"]["method"] == method and summary["settings_hash"] == settings["hash"]
    assert not (out / "checkpoint").exists() and (out / "summary.json").exists()
    if method == "lora":
        assert sorted(os.listdir(out / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
        keys = load_file(out / "adapter" / "adapter_model.safetensors")
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
        assert keys["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape[1] == 4
        assert len(keys) == 2 * 3 * 2  # (A, B) x 3 targets x 2 layers
    else:
        assert (out / "model" / "config.json").exists()


def test_masked_sft_changes_only_masked_weights(world, tmp_path):
    out = tmp_path / "masked"
    rt.train(make_cfg(world, out, "masked", max_steps=6))
    base = load_file(os.path.join(world["model"], "model.safetensors"))
    tuned = load_file(out / "model" / "model.safetensors")
    masks = load_file(out / "mask.safetensors")
    assert set(masks) == {n for n in base if ".layers." in n and "norm" not in n}
    n_mask = sum(int(m.sum()) for m in masks.values())
    n_cand = sum(m.numel() for m in masks.values())
    assert abs(n_mask - round(0.1 * n_cand)) <= 1
    changed_inside = 0
    for name, w0 in base.items():
        w1 = tuned[name]
        if name not in masks:
            assert torch.equal(w0, w1), f"{name} is outside the candidates but changed"
            continue
        m = masks[name].bool()
        assert torch.equal(w0[~m], w1[~m]), f"{name}: {(w0[~m] != w1[~m]).sum()} unmasked elements changed"
        changed_inside += int((w0[m] != w1[m]).sum())
    assert changed_inside > 0.9 * n_mask


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["lora", "full", "masked"])
def test_resume_is_bit_identical(world, tmp_path, monkeypatch, method):
    extra = dict(max_steps=9, grad_accum=2, batch_size=2, save_every=3, seed=3)
    cfg = make_cfg(world, tmp_path / "a", method, **extra)
    cfg["lora"]["dropout"] = 0.1  # exercises the RNG state in the checkpoint
    cfg["data"]["packing"] = True
    cfg["data"]["max_length"] = 40
    full = rt.train(cfg)

    cfg_b = {**cfg, "output_dir": str(tmp_path / "b")}
    real_lr_at = rfit.lr_at

    def crashing_lr_at(step, *a, **k):
        if step == 7:
            raise Crash("power cut")
        return real_lr_at(step, *a, **k)

    monkeypatch.setattr(rfit, "lr_at", crashing_lr_at)
    with pytest.raises(Crash):
        rt.train(cfg_b)
    monkeypatch.setattr(rfit, "lr_at", real_lr_at)
    assert sorted(os.listdir(tmp_path / "b" / "checkpoint")) == ["state.json", "tensors.safetensors"]
    ckpt = load_checkpoint(tmp_path / "b" / "checkpoint")  # safetensors and JSON only
    assert ckpt["step"] == 6 and set(ckpt) >= {"step", "total_steps", "settings", "settings_hash", "rng", "arms"}
    assert len(ckpt["arms"]) == 1, "a solo run is one arm, in the format of a together run's checkpoint"
    assert set(ckpt["arms"][0]) >= {"trainable", "optimizer", "scaler", "log_window", "last", "failed", "config"}
    with pytest.raises(ValueError, match="already holds a run"):
        rt.train(cfg_b)
    resumed = rt.train(cfg_b, resume=True)
    if method == "lora":
        assert (tmp_path / "a" / "adapter").exists()
        a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
        b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    else:
        a = load_file(tmp_path / "a" / "model" / "model.safetensors")
        b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max()}"
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))
    assert resumed["train_loss"] == full["train_loss"]
    # a finished run is returned as is by --resume
    assert rt.train(cfg_b, resume=True)["train_loss"] == full["train_loss"]


@pytest.mark.parametrize("init, rslora", [("gaussian", True), ("pissa", False)])
def test_peft_round_trip_and_merge_give_same_logits(world, tmp_path, init, rslora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rankwise.adapter import load_adapter

    out = tmp_path / "run"
    cfg = make_cfg(world, out, "lora", max_steps=8)
    cfg["lora"]["rslora"] = rslora
    cfg["lora"]["targets"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(cfg_path), "--set", "train.log_every=4", "--set", f"lora.init={init}"]) == 0
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [4, 8]

    x = torch.randint(4, 60, (2, 11))

    def logits(m):
        with torch.no_grad():
            return m.eval()(input_ids=x).logits.double()

    base = lambda: AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float32)  # noqa: E731
    ref = logits(base())
    ours = logits(load_adapter(base(), out / "adapter"))
    # the trained model itself, rebuilt from the checkpoint-free outputs: the run's final eval loss must match
    from rankwise.data import eval_batches, load_rows, tokenize_rows
    from rankwise.evaluate import eval_loss as _eval_loss
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["model"])
    exs, _ = tokenize_rows(load_rows(world["eval"]), tok, max_length=64)
    summary = json.loads((out / "summary.json").read_text())
    got = _eval_loss(load_adapter(base(), out / "adapter").eval(), eval_batches(exs, 32, 64))
    assert abs(got - summary["eval_loss"]) < 1e-5, (got, summary["eval_loss"])
    peft_model = logits(PeftModel.from_pretrained(base(), str(out / "adapter")))
    assert (ours - ref).abs().max() > 1e-3, "the adapter changed nothing; the round trip would prove nothing"
    assert (ours - peft_model).abs().max() < 1e-5
    assert cli.main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32))
    assert (merged - peft_model).abs().max() < 1e-5


def test_generate_answers_left_padding_matches_one_by_one(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["model"])
    model = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float32)
    prompts = ["Q: where was p1 born? A:", "Q: hi", "Q: where was person number 12345 born? A:"]
    batched = generate_answers(model, tok, prompts, max_new_tokens=5, batch_size=3)
    single = [generate_answers(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == single and all(len(o) == 1 for o in batched)
    state = torch.get_rng_state()
    s1 = generate_answers(model, tok, prompts[:2], max_new_tokens=5, do_sample=True, num_samples=3, seed=7)
    s2 = generate_answers(model, tok, prompts[:2], max_new_tokens=5, do_sample=True, num_samples=3, seed=7)
    assert s1 == s2 and [len(o) for o in s1] == [3, 3]
    assert torch.equal(state, torch.get_rng_state()), "sampling must not move the global RNG"
    assert batched[0][0].strip(), "the seeded tiny model generates visible text"
    res = qa_accuracy(model, tok, [{"prompt": prompts[0], "answer": batched[0][0].upper()},
                                   {"prompt": prompts[1], "answers": ["zzzzzz"]}], max_new_tokens=5)
    assert res == {"accuracy": 0.5, "correct": 1, "total": 2}
    with pytest.raises(ValueError, match="row 1 needs 'answers'"):
        qa_accuracy(model, tok, [{"prompt": "x"}])


def test_is_correct_and_eval_loss():
    assert is_correct("It is  PARIS, France", ["paris"])
    assert is_correct("the answer: New\nYork", "new york")
    assert not is_correct("Lyon", ["Paris", "Marseille"])
    assert not is_correct("anything", ["", "  "])

    class Fixed(torch.nn.Module):  # logits independent of input: uniform over 4 tokens
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(4))

        def forward(self, input_ids, position_ids=None, use_cache=False):
            return type("O", (), {"logits": self.w.expand(*input_ids.shape, 4)})()

    from rankwise.data import Example, collate

    b = collate([Example([0, 1, 2], [False, True, True]), Example([3, 1], [False, True])])
    assert b["n_targets"] == 3
    assert abs(eval_loss(Fixed(), [b]) - torch.log(torch.tensor(4.0)).item()) < 1e-6


def test_lr_schedule():
    lrs = [rfit.lr_at(s, 10, 1.0, warmup=2, schedule="cosine") for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0 and abs(lrs[-1]) < 1e-12
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert rfit.lr_at(5, 10, 2.0, warmup=0.0, schedule="linear", min_lr_ratio=0.5) == pytest.approx(2.0 - 1.0 * 5 / 9)
    assert rfit.lr_at(9, 10, 2.0, schedule="constant") == 2.0


def test_non_finite_loss_is_reported(world, tmp_path):
    cfg = make_cfg(world, tmp_path / "nan", "full", max_steps=5, lr=1e30, max_grad_norm=None)
    with pytest.raises(rfit.NonFiniteLossError, match="training loss is"):
        rt.train(cfg)


def test_mask_from_a_full_sft_update(world, tmp_path):
    from rankwise.masking import topk_mask

    full_dir = tmp_path / "full"
    rt.train(make_cfg(world, full_dir, "full", max_steps=4))
    cfg = make_cfg(world, tmp_path / "masked", "masked", max_steps=4)
    cfg["mask"] = {"fraction": 0.05, "score": "update", "from": str(full_dir)}
    rt.train(cfg)
    base = load_file(os.path.join(world["model"], "model.safetensors"))
    full = load_file(full_dir / "model" / "model.safetensors")
    masks = load_file(tmp_path / "masked" / "mask.safetensors")
    names = list(masks)
    expected = topk_mask([(full[n] - base[n]).abs() for n in names], 0.05)
    for n, e in zip(names, expected):
        assert torch.equal(masks[n].bool(), e), n
    cfg["output_dir"] = str(tmp_path / "bad")
    cfg["mask"]["from"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="mask.from: no model/ directory"):
        rt.train(cfg)


def test_chat_packing_epochs_and_checkpointing(world, tmp_path):
    rows = qa_rows(12)
    chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
             "answers": r["answers"]} for r in rows]
    path = write_jsonl(tmp_path / "chat.jsonl", chat)
    cfg = make_cfg(world, tmp_path / "chat", "lora", max_steps=1000, epochs=2, batch_size=2, log_every=1,
                   gradient_checkpointing=True)
    cfg["data"] = {"train": path, "eval": path, "format": "chat", "packing": True, "max_length": 40}
    summary = rt.train(cfg)
    # 12 examples of ~34 tokens, packed into 2 x 40 tokens per micro-batch -> 6 micro-batches per epoch
    assert summary["steps"] == 12
    losses = [r["loss"] for r in read_metrics(tmp_path / "chat") if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert 0.0 <= summary["eval_accuracy"] <= 1.0 and summary["eval_loss"] > 0


def test_ddp_with_torchrun_on_two_cpu_processes(world, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): each rank takes its share of every step; rank 0 writes the outputs."""
    cfg = make_cfg(world, tmp_path / "ddp", "lora", max_steps=4, batch_size=4, log_every=2)
    cfg["data"]["eval"] = None
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    rc, _, err = torchrun(["train", str(tmp_path / "c.yaml")], timeout=120)
    assert rc == 0, err[-3000:]
    # same examples as one process taking both micro-batches (grad_accum=2)
    single = rt.train({**make_cfg(world, tmp_path / "one", "lora", max_steps=4, batch_size=4, log_every=2, grad_accum=2),
                       "data": cfg["data"]})
    ddp_rows = [r for r in read_metrics(tmp_path / "ddp") if "loss" in r]
    one_rows = [r for r in read_metrics(tmp_path / "one") if "loss" in r]
    assert [r["step"] for r in ddp_rows] == [2, 4]
    # the same examples and the same global token-mean loss: equal up to the order of float reductions
    for a, b in zip(ddp_rows, one_rows):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * b["loss"], (a, b)
    ddp_ad = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    one_ad = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    for k in one_ad:
        torch.testing.assert_close(ddp_ad[k], one_ad[k], rtol=1e-4, atol=1e-6)
    assert single["steps"] == 4


def test_qa_only_eval_set_gets_accuracy_without_loss(world, tmp_path):
    qa_only = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": r["prompt"], "answer": r["answers"][0]} for r in qa_rows(4)])
    cfg = make_cfg(world, tmp_path / "run", "full", max_steps=3)
    cfg["data"]["eval_ood"] = qa_only
    summary = rt.train(cfg)
    assert "eval_ood_accuracy" in summary and "eval_ood_loss" not in summary and "eval_loss" in summary
    cfg = make_cfg(world, tmp_path / "run2", "full", max_steps=3)
    cfg["data"]["eval"] = qa_only
    cfg["eval"]["generate"] = False  # without answers to score, the eval rows need completions
    with pytest.raises(ValueError, match=r"data\.eval row 1: missing field 'completion'"):
        rt.train(cfg)


def test_lora_on_nf4_base(world, tmp_path, caplog):
    import logging

    cfg = make_cfg(world, tmp_path / "nf4", "lora", max_steps=20)
    cfg["quantization"], cfg["double_quant"] = "nf4", True
    with caplog.at_level(logging.INFO, logger="rankwise"):
        summary = rt.train(cfg)
    assert any("nf4 quantization (double quant): weights" in r.getMessage() for r in caplog.records)
    losses = [r["loss"] for r in read_metrics(tmp_path / "nf4") if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]
    assert summary["eval_loss"] < losses[0]
    keys = load_file(tmp_path / "nf4" / "adapter" / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].dtype == torch.float32


def test_save_pretrained_dir_replaces_the_directory_whole(tmp_path):
    """model/ is the old directory or the new one, never a mix: a failed write leaves the old one untouched."""
    from rankwise.atomic import replace_dir

    target = tmp_path / "model"
    replace_dir(target, lambda d: (open(os.path.join(d, "a.txt"), "w").write("old"),))
    assert (target / "a.txt").read_text() == "old"

    def failing(d):
        open(os.path.join(d, "b.txt"), "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_dir(target, failing)
    assert os.listdir(target) == ["a.txt"] and (target / "a.txt").read_text() == "old"
    replace_dir(target, lambda d: (open(os.path.join(d, "b.txt"), "w").write("new"),))
    assert os.listdir(target) == ["b.txt"], "the old files must not survive the replacement"
    assert sorted(os.listdir(tmp_path)) == ["model"], "no temporary or old directory is left behind"


def test_train_backend_reaches_the_lora_layers(world, tmp_path, monkeypatch):
    import rankwise.lora
    import rankwise.trainable

    seen = []
    real = rankwise.lora.inject_lora

    def spy(model, *a, **k):
        if next(model.parameters()).device.type != "meta":  # not the targets check on the meta-device model
            seen.append(k.get("backend"))
        return real(model, *a, **k)

    monkeypatch.setattr(rankwise.trainable, "inject_lora", spy)
    rt.train(make_cfg(world, tmp_path / "b", "lora", max_steps=1, backend="torch"))
    assert seen == ["torch"]


class _RunsCode:
    """Unpickling this runs code: here it only creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_checkpoint_is_refused_and_runs_no_code(world, tmp_path):
    cfg = make_cfg(world, tmp_path / "run", "lora", max_steps=2, save_every=1)
    os.makedirs(tmp_path / "run")
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "run" / "checkpoint.pt"
    torch.save({"step": 1, "payload": _RunsCode(str(marker))}, ckpt)
    before = ckpt.read_bytes()
    for force in (False, True):
        with pytest.raises(ConfigError, match="refusing to load it: it is a pickle checkpoint.*can run code"):
            rt.train(cfg, resume=True, force=force)
    assert not marker.exists(), "unpickling the checkpoint ran code"
    assert ckpt.read_bytes() == before, "the refused checkpoint must be left as it was"
    assert os.listdir(tmp_path / "run") == ["checkpoint.pt"], "nothing is written beside a refused checkpoint"


def test_written_files_and_directories_follow_the_umask(tmp_path):
    from rankwise.atomic import atomic_write_text, replace_dir

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
        replace_dir(tmp_path / "d", lambda d: None)
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


def test_early_stopping_ends_the_run_finished_at_its_step_and_resumes_as_stopped(world, tmp_path, monkeypatch):
    """train.early_stop: eval_loss watched every 2 steps; it stops improving after the first evaluation, so with
    patience 2 the run stops at step 6, finished: its adapter and summary say so, the metrics end there."""
    losses = iter([3.0, 3.1, 3.2, 3.3])
    real = rt.evaluate
    monkeypatch.setattr(rt, "evaluate", lambda *a, **k: {**real(*a, **k), "eval_loss": next(losses)})
    out = tmp_path / "stop"
    cfg = make_cfg(world, out, max_steps=12, log_every=4, early_stop={"patience": 2, "min_delta": 0.0})
    cfg["eval"] = {**cfg["eval"], "every": 2}
    summary = rt.train(cfg)
    assert summary["status"] == "finished" and summary["stopped_early"] == 6 and summary["steps"] == 6
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "summary.json").exists()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [2, 4, 4, 6, 6], rows  # eval 2, train 4, eval 4, eval 6 and the row at 6
    assert [r["eval_loss"] for r in rows if "eval_loss" in r] == [3.0, 3.1, 3.2]
    assert rt.train(cfg, resume=True)["stopped_early"] == 6, "a finished run resumed is returned as it is"


def test_report_to_wandb_writes_an_offline_run_inside_the_output_dir(world, tmp_path, monkeypatch):
    """log.report_to [wandb]: every metrics row goes to a W&B run named after the output directory, its files
    under output_dir/wandb (offline here: nothing leaves the machine, nothing is written outside the run)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "wb"
    cfg = make_cfg(world, out, max_steps=4, log_every=2)
    cfg["log"] = {**cfg["log"], "report_to": ["wandb"], "wandb_project": "rankwise-test"}
    rt.train(cfg)
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    data = runs[0].read_bytes()  # W&B's record log: each history value is stored as its JSON text
    assert data.startswith(b":W&B") and len(data) < 32768, "one block: no record is split across blocks"
    rows = read_metrics(out)
    assert len(rows) == 3 and all(json.dumps(v).encode() in data for r in rows for k, v in r.items() if k != "step")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wb"], "nothing written outside the run's directory"


def test_report_to_a_package_that_is_not_there_is_one_line_before_anything(world, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = make_cfg(world, tmp_path / "nope", max_steps=1)
    cfg["log"] = {**cfg["log"], "report_to": ["wandb"]}
    with pytest.raises(ConfigError, match=r"^config key 'log.report_to' names wandb but the wandb package is not "):
        rt.train(cfg)
    assert not (tmp_path / "nope").exists()


def test_an_arm_stopped_early_is_not_evaluated_again_at_the_end(world, tmp_path, monkeypatch):
    """Its weights are those of its stop, whose eval row it already has: the end reuses that row (one evaluation
    fewer, the summary the same as that row)."""
    calls, real = [], rt.evaluate
    losses = iter([3.0, 3.1, 3.2])

    def counting(*a, **k):
        calls.append(1)
        return {**real(*a, **k), "eval_loss": next(losses)}

    monkeypatch.setattr(rt, "evaluate", counting)
    cfg = make_cfg(world, tmp_path / "once", max_steps=12, log_every=4, early_stop={"patience": 2})
    cfg["eval"] = {**cfg["eval"], "every": 2}
    summary = rt.train(cfg)
    assert summary["stopped_early"] == 6 and len(calls) == 3 and summary["eval_loss"] == 3.2
