"""``rankwise.fit.fit``, the one loop: K arms in one call are K solo calls, bit for bit (CPU, fp32).

The model here is K independent least-squares problems, arm k's loss depending on arm k's weights alone,
so ``fit`` with K arms must give every arm exactly what ``fit`` with that arm alone gives: the same weights,
optimizer state and logged rows, with each arm's own learning rate, weight decay and clipping norm. A NaN
drops its arm alone (``on_non_finite="drop"``) or stops the run in one line (``"raise"``). The runs'
equivalence on a real model (a together sweep against ``rankwise train``) is ``tests/test_together.py``.
"""
import pytest
import torch

import rankwise.config as C
from rankwise.errors import ConfigError
from rankwise.fit import Arm, NonFiniteLossError, NonFiniteWeightsError, fit
from rankwise.runlog import MetricsLog
from rankwise.train import build_optimizer
from rankwise.trainable import Trainable

pytestmark = pytest.mark.usefixtures("one_thread")

N_STEPS, GA, DIM = 7, 2, 5


class Plan:
    """A stand-in for ``batches.Batches``: step s takes ``GA`` micro-batches of 3 rows of (x, y)."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.data = [(torch.randn(3, DIM, generator=g), torch.randn(3, generator=g)) for _ in range(N_STEPS * GA)]

    def step(self, step, grad_accum, dist):
        return [(0, {"x": x, "y": y, "n_targets": 3, "n_tokens": 4})
                for x, y in self.data[step * grad_accum:(step + 1) * grad_accum]]


class Arms(torch.nn.Module):
    """K independent linear regressions; ``losses`` sums each live arm's squared error on the micro-batch."""

    def __init__(self, k, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(DIM, generator=g)) for _ in range(k)])
        self.b = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(())) for _ in range(k)])
        self.poison = {}  # arm -> step from which its loss is NaN
        self.overflow = {}  # arm -> step whose last micro-batch leaves its weights inf, behind a finite loss
        self.calls = {}  # step -> micro-batches seen

    def losses(self, batch, ids, step):
        """The summed squared errors of the regressions ``ids`` (the live arms' own), in order."""
        out = []
        self.calls[step[0]] = self.calls.get(step[0], 0) + 1
        for i in ids:
            err = batch["x"] @ self.w[i] + self.b[i] - batch["y"]
            loss = (err * err).sum()
            if i in self.poison and step[0] >= self.poison[i]:
                loss = loss * float("nan")
            if self.overflow.get(i) == step[0] and self.calls[step[0]] == GA:
                self.w[i].data.fill_(float("inf"))  # as an overflowing update would leave them
            out.append(loss)
        return torch.stack(out)


def arm_cfg(tmp_path, name, **train):
    t = {"lr": 0.05, "weight_decay": 0.1, "max_grad_norm": 1.0, "max_steps": N_STEPS, "log_every": 2, "grad_accum": GA,
         "save_every": 3, "warmup": 2, **train}
    return C.parse({"model": str(tmp_path), "data": {"train": str(tmp_path / "train.jsonl")}, "output_dir": str(tmp_path / name),
                    "train": t, "log": {"progress": False}})


def make_arm(model, k, cfg, tmp_path):
    tr = Trainable([(f"w{k}", model.w[k]), (f"b{k}", model.b[k])])
    (tmp_path / cfg.output_dir).mkdir(exist_ok=True)
    arm = Arm(cfg, C.settings(cfg), tr, build_optimizer(cfg.train, tr, torch.device("cpu")))
    arm.metrics = MetricsLog(cfg.output_dir, [], False, True)
    return arm


def run(model, arms, ids, on_non_finite="drop", saved=None):
    step = [0]
    plan = Plan()
    real_step = plan.step

    def step_of(s, ga, dist):
        step[0] = s
        return real_step(s, ga, dist)

    plan.step = step_of
    fit(model, arms, plan, losses=lambda b, live: model.losses(b, [ids[k] for k in live], step),
        total_steps=N_STEPS, on_non_finite=on_non_finite,
        save=(lambda s: saved.append((s, [a.params[0].detach().clone() for a in arms]))) if saved is not None else None)
    for a in arms:
        a.metrics.close()


def rows(arm):
    import json

    with open(f"{arm.cfg.output_dir}/metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")} for line in f]


def test_k_arms_in_one_fit_are_k_solo_fits_bit_for_bit(tmp_path):
    hyper = [{"lr": 0.05}, {"lr": 0.2, "weight_decay": 0.0}, {"lr": 0.1, "max_grad_norm": 0.05}]
    together = Arms(3)
    arms = [make_arm(together, k, arm_cfg(tmp_path, f"k{k}", **h), tmp_path) for k, h in enumerate(hyper)]
    saved = []
    run(together, arms, [0, 1, 2], saved=saved)
    assert [s for s, _ in saved] == [3, 6], "a checkpoint every train.save_every steps, not at the last step"
    for k, h in enumerate(hyper):
        solo_model = Arms(3)
        solo = make_arm(solo_model, k, arm_cfg(tmp_path, f"solo{k}", **h), tmp_path)
        run(solo_model, [solo], [k])
        assert torch.equal(together.w[k], solo_model.w[k]) and torch.equal(together.b[k], solo_model.b[k]), k
        st_a, st_b = arms[k].optimizer.state_dict()["state"], solo.optimizer.state_dict()["state"]
        assert all(torch.equal(st_a[i][n], st_b[i][n]) for i in st_b for n in st_b[i]), k
        assert rows(arms[k]) == rows(solo) and [r["step"] for r in rows(solo)] == [2, 4, 6, 7]
    assert not torch.equal(together.w[0], Arms(3).w[0]), "the arms trained"


def test_a_nan_drops_its_arm_alone_or_stops_the_run(tmp_path):
    model = Arms(2)
    model.poison = {1: 4}  # arm 1's loss is NaN from step index 4 (the 5th step)
    arms = [make_arm(model, k, arm_cfg(tmp_path, f"k{k}"), tmp_path) for k in range(2)]
    run(model, arms, [0, 1])
    assert arms[0].failed is None
    assert arms[1].failed.startswith("non-finite loss: training loss is nan at step 5; the run stopped (the other")
    assert [r["step"] for r in rows(arms[1])] == [2, 4] and [r["step"] for r in rows(arms[0])] == [2, 4, 6, 7]
    assert not any(p.requires_grad for p in arms[1].params)
    clean = Arms(2)  # arm 0 is what it is without arm 1
    solo = make_arm(clean, 0, arm_cfg(tmp_path, "solo0"), tmp_path)
    run(clean, [solo], [0])
    assert torch.equal(clean.w[0], model.w[0])

    model = Arms(1)
    model.poison = {0: 4}
    arm = make_arm(model, 0, arm_cfg(tmp_path, "raise"), tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"^training loss is nan at step 5; the run stopped, and "):
        run(model, [arm], [0], on_non_finite="raise")


def test_non_finite_weights_are_found_on_logging_steps(tmp_path):
    model = Arms(1)
    model.overflow = {0: 2}  # in the third step, behind its finite loss: found on that logging step
    arm = make_arm(model, 0, arm_cfg(tmp_path, "big", log_every=3, save_every=0), tmp_path)
    with pytest.raises(NonFiniteWeightsError, match=r"the trainable weights hold inf or NaN .* at step 3; the run"):
        run(model, [arm], [0], on_non_finite="raise")


def test_fit_refuses_bad_arguments(tmp_path):
    model = Arms(1)
    with pytest.raises(ValueError, match="on_non_finite"):
        fit(model, [make_arm(model, 0, arm_cfg(tmp_path, "x"), tmp_path)], Plan(), losses=None, total_steps=1,
            on_non_finite="ignore")
    with pytest.raises(ValueError, match="at least one arm"):
        fit(model, [], Plan(), losses=None, total_steps=1)


def run_with_evals(model, arms, ids, evals, every=2):
    """``run`` with an evaluation every ``every`` steps whose eval_loss of arm k at its i-th evaluation is
    ``evals[k][i]`` (the same for every call in a run)."""
    seen = {k: 0 for k in range(len(arms))}

    def evaluate(live):
        rows = {}
        for k in live:
            rows[k] = {"eval_loss": evals[k][seen[k]]}
            seen[k] += 1
        return rows

    fit(model, arms, Plan(), losses=lambda b, live: model.losses(b, [ids[k] for k in live], [0]),
        total_steps=N_STEPS, evaluate=evaluate, on_non_finite="drop")
    for a in arms:
        a.metrics.close()
    return seen


def test_early_stopping_stops_an_arm_after_patience_evaluations_without_improvement(tmp_path):
    """eval.every 2 over 7 steps: evaluations after steps 2, 4 and 6. Arm 0 improves, then not twice by more
    than min_delta (patience 2): it stops at step 6, finished, and trains no more; arm 1 keeps improving and
    trains to the end, exactly as it would alone."""
    model = Arms(2)
    stop = {"early_stop": {"patience": 2, "metric": "eval_loss", "min_delta": 0.01}}
    cfgs = [C.parse({**arm_cfg(tmp_path, f"k{k}").to_dict(), "data": {"train": str(tmp_path / "t.jsonl"),
                                                                     "eval": str(tmp_path / "e.jsonl")},
                     "eval": {"every": 2}, "train": {**arm_cfg(tmp_path, f"k{k}").to_dict()["train"], **stop}})
            for k in range(2)]
    arms = [make_arm(model, k, cfgs[k], tmp_path) for k in range(2)]
    seen = run_with_evals(model, arms, [0, 1], {0: [2.0, 1.995, 1.999], 1: [2.0, 1.5, 1.0]})
    assert arms[0].stopped == 6 and arms[0].failed is None and arms[1].stopped is None
    assert seen == {0: 3, 1: 3} and not any(p.requires_grad for p in arms[0].params)
    assert [r["step"] for r in rows(arms[0]) if "loss" in r] == [2, 4, 6], "its last training row at its stop"
    alone = Arms(2)
    solo = make_arm(alone, 1, cfgs[1], tmp_path)
    run_with_evals(alone, [solo], [1], {0: [2.0, 1.5, 1.0]})
    assert torch.equal(alone.w[1], model.w[1]) and solo.stopped is None
    with pytest.raises(ConfigError, match="the evaluation gives no eval_accuracy"):
        arms[1].cfg = C.parse({**cfgs[1].to_dict(), "train": {**cfgs[1].to_dict()["train"],
                                                               "early_stop": {"patience": 1,
                                                                              "metric": "eval_accuracy"}}})
        arms[1].watch({"eval_loss": 1.0}, 2)


def test_an_arms_early_stopping_state_survives_the_checkpoint(tmp_path):
    from rankwise.checkpoint import load_run_checkpoint, restore_run_state, run_state, save_checkpoint

    model = Arms(2)
    arms = [make_arm(model, k, arm_cfg(tmp_path, f"k{k}"), tmp_path) for k in range(2)]
    arms[0].best, arms[0].bad_evals = -1.25, 1
    arms[1].best, arms[1].bad_evals, arms[1].stopped = -2.5, 2, 4
    save_checkpoint(tmp_path / "ckpt", run_state(5, N_STEPS, arms, torch.device("cpu")))
    again = [make_arm(model, k, arm_cfg(tmp_path, f"k{k}"), tmp_path) for k in range(2)]
    assert restore_run_state(load_run_checkpoint(tmp_path / "ckpt"), again, torch.device("cpu"), N_STEPS,
                             tmp_path / "ckpt") == 5
    assert [(a.best, a.bad_evals, a.stopped) for a in again] == [(-1.25, 1, None), (-2.5, 2, 4)]
    assert again[0].live and not again[1].live and not any(p.requires_grad for p in again[1].params)
    for a in arms + again:
        a.metrics.close()
