"""``train.cuda_graphs``: the whole step as one CUDA graph, checked on the CPU with a stand-in for the capture.

This machine has no GPU, so ``graphs.capture`` is replaced by ``Recorder.capture``, which does what a CUDA
graph does to the run's state (the capture changes no weight and no optimizer state; each replay runs the
recorded step) and checks what a real capture would refuse or get wrong:

- the capture reads nothing back from the device (a read fails a real capture);
- every replay runs the same ops, with the same shapes and the same host values (floats, ints, flags), as the
  capture: a host value that changes from step to step (a learning rate, a token count) would be baked into
  a real graph and silently kept, so it must live in a device tensor written before the replay.

The stand-in re-runs the step's Python on each replay where a real graph would not; the op-by-op comparison is
what makes that difference visible. Runs use ``train.backend: torch`` so that every kernel goes through torch's
dispatcher, where the recorder sees it.
"""
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from helpers import Crash, crash_at
from test_data import build_tiny_llama, qa_rows, write_jsonl
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import rankwise.fit as rfit
from rankwise import graphs
from rankwise.batches import Batches
from rankwise.config import validate_config
from rankwise.data import Example, collate, pad_batch
from rankwise.errors import ConfigError
from rankwise.loss import FusedLossLM, batch_loss_sum
from rankwise.together import train_together
from rankwise.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)


class Ops(TorchDispatchMode):
    """Every op run inside it: its name, and its arguments as shapes and dtypes (tensors) or values."""

    def __init__(self):
        super().__init__()
        self.calls, self.reads = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        if not str(func).startswith("profiler."):  # record_function's markers (the optimizer's step), no kernels
            self.calls.append((str(func), tuple((tuple(a.shape), a.dtype, a.device.type)
                                                if isinstance(a, torch.Tensor) else repr(a) for a in flat)))
        if func in READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


class Recorder:
    """``graphs.capture`` on the CPU (see the module docstring); ``captures`` holds, per capture, its ops and
    those of each of its replays."""

    def __init__(self):
        self.captures = []

    def capture(self, body):
        graph = body.__self__
        before = self.state(graph.arms)
        with Ops() as ops:
            outputs = body()
        assert not ops.reads, f"the capture read the device: {ops.reads}"
        with torch.no_grad():  # a capture records; it runs nothing
            for t, saved in zip(self.tensors(graph.arms), before):
                t.copy_(saved)
        replays = []
        self.captures.append({"ops": ops.calls, "replays": replays})

        def replay():
            graph.zero_grad()  # a replay's backward writes the gradients, it does not add to them
            with Ops() as again:
                sums, norms = body()
            replays.append(again.calls)
            with torch.no_grad():
                outputs[0].copy_(sums)
                for mine, new in zip(outputs[1], norms):
                    mine.copy_(new)

        return replay, outputs

    @staticmethod
    def tensors(arms):
        for arm in arms:
            yield from (p for g in arm.optimizer.param_groups for p in g["params"])
            for st in arm.optimizer.state.values():
                yield from (v for v in st.values() if isinstance(v, torch.Tensor))

    def state(self, arms):
        return [t.detach().clone() for t in self.tensors(arms)]

    def check_replays(self):
        for c in self.captures:
            assert c["replays"], "a capture was never replayed"
            for i, r in enumerate(c["replays"]):
                diff = next((j for j, (a, b) in enumerate(zip(c["ops"], r)) if a != b), None)
                assert len(r) == len(c["ops"]) and diff is None, \
                    f"replay {i} ran other ops or host values than the capture: at op {diff}: " \
                    f"{c['ops'][diff] if diff is not None else ''} vs {r[diff] if diff is not None else ''}"


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(graphs, "CAPTURE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(graphs, "capture", rec.capture)
    return rec


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("graphworld")
    return {"model": build_tiny_llama(d / "model"),
            "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
            "data": {"train": write_jsonl(d / "train.jsonl", qa_rows(24)), "max_length": 40, "packing": True},
            "train": {"max_steps": 7, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "log_every": 1,
                      "save_every": 0, "backend": "torch", "warmup": 2, "cuda_graphs": "on"},
            "eval": {"every": 0}, "log": {"progress": False}, "output_dir": str(d / "unused")}


def losses_of(out_dir):
    import json
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def adapter(out_dir):
    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


def close(a: dict, b: dict, tol: float) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a) <= tol


# ----------------------------------------------------------------------------- fixed shapes

def test_padding_changes_no_loss_and_no_gradient(cfg):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], torch_dtype=torch.float64, attn_implementation="sdpa")
    examples = [Example([5, 6, 7, 8, 9], [0, 0, 1, 1, 1]), Example([4, 3, 9], [0, 1, 1])]
    batch = collate(examples)
    padded = pad_batch(batch, 13, 9)
    assert padded["input_ids"].shape == (1, 13) and padded["target_index"].shape == (9,)
    assert (padded["n_targets"], padded["n_tokens"]) == (batch["n_targets"], batch["n_tokens"])
    for wrap in (lambda m: m, lambda m: FusedLossLM(m, backend="torch")):
        m = wrap(model)
        results = []
        for b in (batch, padded):
            model.zero_grad()
            loss = batch_loss_sum(m, b)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (l0, g0), (l1, g1) = results
        assert torch.allclose(l0, l1, rtol=1e-12, atol=0), (l0, l1)
        assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(g0, g1))
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch(batch, 7, 9)
    long_pad = pad_batch(batch, 30, 9)  # 22 padding tokens after sequences of 5 and 3: positions 0-4, 0-4, ...
    assert int(long_pad["position_ids"].max()) == 4 and long_pad["position_ids"][0, 8:14].tolist() == [0, 1, 2, 3, 4, 0]


def test_the_static_shape_is_the_largest_micro_batch_of_the_run():
    examples = [Example(list(range(n)), [0] * (n // 2) + [1] * (n - n // 2)) for n in (3, 9, 4, 12, 7, 5, 8)]
    b = Batches(examples, batch_size=2, packing=False, max_length=16, seed=1)
    count = 11  # more micro-batches than one epoch holds: the next epoch's order counts too
    seen = [b.micro_batch(g)[1] for g in range(count)]
    tokens, targets = b.static_shape(count)
    assert targets == max(s["n_targets"] for s in seen)
    assert tokens == math.ceil(max(s["n_tokens"] for s in seen) / 8) * 8


# ----------------------------------------------------------------------------- the key and what it refuses

def test_the_key_is_checked_and_is_no_setting():
    assert validate_config({"model": "m", "data": {"train": "t"}}).train.cuda_graphs == "auto"
    with pytest.raises(ConfigError, match="cuda_graphs"):
        validate_config({"model": "m", "data": {"train": "t"}, "train": {"cuda_graphs": "yes"}})
    from rankwise.config import NOT_SETTINGS
    assert "train.cuda_graphs" in NOT_SETTINGS


def test_off_cuda_the_key_does_nothing(cfg, tmp_path):
    """No stand-in here: on the CPU ``on`` trains exactly as ``off``."""
    runs = {}
    for mode in ("on", "off"):
        out = str(tmp_path / mode)
        train({**cfg, "train": {**cfg["train"], "cuda_graphs": mode}, "output_dir": out})
        runs[mode] = adapter(out)
    assert all(torch.equal(runs["on"][k], runs["off"][k]) for k in runs["on"])


class _Arm:
    def __init__(self, method="lora", dropout=0.0, scaler=None, optimizer=None, ckpt=False):
        self.cfg = validate_config({"model": "m", "data": {"train": "t"}, "method": method,
                                    "lora": {"dropout": dropout}, "train": {"gradient_checkpointing": ckpt}})
        self.scaler = scaler
        self.optimizer = optimizer or torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])


@pytest.mark.parametrize("arm, ddp, words", [
    (_Arm(), True, "DDP"), (_Arm(scaler=object()), False, "GradScaler"), (_Arm(dropout=0.1), False, "dropout"),
    (_Arm(optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)), False, "SGD"),
    (_Arm(ckpt=True), False, "gradient_checkpointing")])
def test_what_stands_in_the_way_is_named_and_on_refuses_it(arm, ddp, words):
    problem = graphs.graph_problem([_Arm(), arm], ddp)
    assert words in problem
    cuda = torch.device("cuda")
    with pytest.raises(ConfigError, match=f"cuda_graphs on: .*{words}") as e:
        graphs.wanted("on", cuda, problem, packing=True)
    assert "\n" not in str(e.value)
    assert graphs.wanted("auto", cuda, problem, packing=True) is False


def test_auto_captures_packed_steps_on_cuda_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert graphs.graph_problem([_Arm(), _Arm(method="full")], False) is None
    assert graphs.wanted("auto", cuda, None, packing=True) is True
    assert graphs.wanted("auto", cuda, None, packing=False) is False
    assert graphs.wanted("on", cuda, None, packing=False) is True
    assert graphs.wanted("off", cuda, None, packing=True) is False
    assert not any(graphs.wanted(m, cpu, None, packing=True) for m in ("auto", "on", "off"))


# ----------------------------------------------------------------------------- the captured step

def test_a_solo_run_captured_trains_as_the_eager_run(cfg, tmp_path, recorder):
    out_g, out_e = str(tmp_path / "graph"), str(tmp_path / "eager")
    train({**cfg, "output_dir": out_g})
    assert len(recorder.captures) == 1 and len(recorder.captures[0]["replays"]) == 7 - graphs.WARMUP_STEPS
    recorder.check_replays()
    train({**cfg, "train": {**cfg["train"], "cuda_graphs": "off"}, "output_dir": out_e})
    lg, le = losses_of(out_g), losses_of(out_e)
    assert len(lg) == len(le) == 7
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(lg, le)), (lg, le)
    assert close(adapter(out_g), adapter(out_e), 1e-5)


def test_a_group_captured_trains_as_the_eager_group(cfg, tmp_path, recorder):
    arms = lambda tag, mode: [{**cfg, "lora": {**cfg["lora"], "r": r},  # noqa: E731
                               "train": {**cfg["train"], "cuda_graphs": mode}, "output_dir": str(tmp_path / f"{tag}{r}")}
                              for r in (2, 4)]
    train_together(arms("g", "on"))
    assert len(recorder.captures) == 1
    recorder.check_replays()
    train_together(arms("e", "off"))
    for r in (2, 4):
        lg, le = losses_of(tmp_path / f"g{r}"), losses_of(tmp_path / f"e{r}")
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(lg, le)), (r, lg, le)
        assert close(adapter(tmp_path / f"g{r}"), adapter(tmp_path / f"e{r}"), 1e-5)


def test_an_arm_that_stops_leads_to_a_new_capture_of_the_others(cfg, tmp_path, recorder, monkeypatch):
    """Arm r=2's loss goes NaN at step 3: the group drops it and captures the step of the arm left."""
    real = rfit.Fit.record

    def record(self, live, step, sums, n_tgt, n_tokens):
        if step == 3 and len(live) == 2:
            sums = sums * torch.tensor([math.nan, 1.0], dtype=sums.dtype)
        return real(self, live, step, sums, n_tgt, n_tokens)

    monkeypatch.setattr(rfit.Fit, "record", record)
    arms = [{**cfg, "lora": {**cfg["lora"], "r": r}, "output_dir": str(tmp_path / f"r{r}"),
             "train": {**cfg["train"], "max_steps": 9, "log_every": 4}} for r in (2, 4)]
    results = train_together(arms)
    assert results[0]["status"] == "failed" and results[1]["status"] != "failed", results
    assert len(recorder.captures) == 2
    recorder.check_replays()
    assert [len(c["replays"]) for c in recorder.captures] == [2, 9 - 4 - graphs.WARMUP_STEPS]


def test_a_captured_run_resumes_bit_identically(cfg, tmp_path, recorder):
    run = {**cfg, "train": {**cfg["train"], "max_steps": 9, "save_every": 3, "log_every": 3}}
    train({**run, "output_dir": str(tmp_path / "a")})
    with crash_at(7), pytest.raises(Crash):
        train({**run, "output_dir": str(tmp_path / "b")})
    train({**run, "output_dir": str(tmp_path / "b")}, resume=True)
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses_of(tmp_path / "a") == losses_of(tmp_path / "b")
    recorder.check_replays()
    # a captured run's checkpoint resumes eagerly too (its optimizer's device lr and flags are not taken)
    with crash_at(7), pytest.raises(Crash):
        train({**run, "output_dir": str(tmp_path / "c")})
    train({**run, "train": {**run["train"], "cuda_graphs": "off"}, "output_dir": str(tmp_path / "c")}, resume=True)
    assert close(adapter(tmp_path / "c"), a, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_captured_run_trains_as_the_eager_run(cfg, tmp_path):
    """The real capture (torch.cuda.graph, fused capturable AdamW): one capture, replayed; the losses and
    adapters match the eager run's (padding changes GEMM row counts, so within fp32 rounding)."""
    captured = []
    real = graphs.capture

    def counting(body):
        captured.append(1)
        return real(body)

    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(graphs, "capture", counting)
        for mode in ("on", "off"):
            out = str(tmp_path / mode)
            train({**cfg, "train": {**cfg["train"], "cuda_graphs": mode, "device": "cuda", "precision": "fp32",
                                    "backend": "auto"}, "output_dir": out})
            runs[mode] = (losses_of(out), adapter(out))
    assert len(captured) == 1
    (lg, ag), (le, ae) = runs["on"], runs["off"]
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(lg, le)), (lg, le)
    assert close(ag, ae, 1e-4)
