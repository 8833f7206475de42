"""No device value is read back to the host inside a training step, for a solo run and for a group of arms.

On a GPU every read (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``nonzero``) drains the queue, so
the host's launch cost is never hidden. The counter is a ``TorchDispatchMode`` on ``aten._local_scalar_dense``
and ``aten.nonzero`` plus a wrapper around ``Tensor.tolist``, over ``rankwise.fit.Fit.one_step`` (the whole
optimizer step: data, forward, backward, clipping, the optimizer). It leaves out what is host-side on a GPU
too: the optimizer's step counters (torch's AdamW reads them to form its bias corrections) and the data
pipeline (``rankwise.batches``, ``rankwise.data``: CPU tensors before they move). The CPU runs the same code
as a GPU here, so a read counted here is a read there. The reads of logging, evaluation and saving steps
(``Fit.check``: one) are outside the step and allowed.
"""
import collections
import os
import traceback

import pytest
import torch
from test_data import build_tiny_llama, qa_rows, write_jsonl
from torch.utils._python_dispatch import TorchDispatchMode

import rankwise.fit as rfit
from rankwise.together import train_together
from rankwise.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

HOST_SIDE = (os.sep + os.path.join("torch", "optim") + os.sep, os.path.join("rankwise", "batches.py"),
             os.path.join("rankwise", "data.py"))


class Reads(TorchDispatchMode):
    """Counts the reads of device values (see the module docstring), with where each came from."""

    def __init__(self, counters):
        super().__init__()
        self.counters = counters  # ids of the optimizers' step counters
        self.seen = []

    def note(self, what, tensor=None):
        if tensor is not None and id(tensor) in self.counters():
            return
        stack = traceback.extract_stack()[:-2]
        if any(any(h in f.filename for h in HOST_SIDE) for f in stack):
            return
        ours = [f for f in stack if "rankwise" in f.filename or "transformers" in f.filename][-3:]
        self.seen.append((what, " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in ours)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.note(str(func), args[0])
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_reads(monkeypatch):
    """Per optimizer step: the reads inside ``Fit.one_step``."""
    steps, runs = [], []
    real_init, real_step, real_tolist = rfit.Fit.__post_init__, rfit.Fit.one_step, torch.Tensor.tolist
    mode = [None]

    def post_init(self):
        runs.append(self)
        real_init(self)

    def counters():
        return {id(st["step"]) for fit in runs for a in fit.arms for st in a.optimizer.state.values()
                if isinstance(st.get("step"), torch.Tensor)}

    def tolist(t):
        if mode[0] is not None:
            mode[0].note("Tensor.tolist", t)
        return real_tolist(t)

    def one_step(self, step, live):
        mode[0] = Reads(counters)
        try:
            with mode[0]:
                return real_step(self, step, live)
        finally:
            steps.append(mode[0].seen)
            mode[0] = None

    monkeypatch.setattr(rfit.Fit, "__post_init__", post_init)
    monkeypatch.setattr(rfit.Fit, "one_step", one_step)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return steps


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("readsworld")
    return {"model": build_tiny_llama(d / "model"),
            "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]},
            "data": {"train": write_jsonl(d / "train.jsonl", qa_rows(16)), "max_length": 40},
            "train": {"max_steps": 4, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "log_every": 100,
                      "save_every": 0},
            "eval": {"every": 0}, "log": {"progress": False}, "output_dir": str(d / "unused")}


def listing(steps) -> str:
    """Each kind of read with its count over the steps and where it came from."""
    counts = collections.Counter(r for s in steps for r in s)
    return f"{sum(counts.values())} reads in {len(steps)} steps:\n" + "\n".join(
        f"{n} x {what} at {where}" for (what, where), n in counts.most_common())


@pytest.mark.parametrize("fused_loss", [True, False])
def test_a_solo_step_reads_nothing_back(cfg, tmp_path, count_reads, fused_loss):
    train({**cfg, "train": {**cfg["train"], "fused_loss": fused_loss}, "output_dir": str(tmp_path / "solo")})
    assert len(count_reads) == 4
    assert all(not s for s in count_reads), listing(count_reads)


def test_a_group_step_reads_nothing_back(cfg, tmp_path, count_reads):
    arms = [{**cfg, "lora": {**cfg["lora"], "r": r}, "output_dir": str(tmp_path / f"r{r}")} for r in (2, 4)]
    train_together(arms)
    assert len(count_reads) == 4
    assert all(not s for s in count_reads), listing(count_reads)
