"""rankwise.analysis.findings and the demo's findings: per-arm summaries with intervals, and verdicts
that follow the data whichever way it falls."""
import numpy as np
import pytest

from rankwise.analysis.findings import summarize_arm
from rankwise.analysis.stats import verdict
from rankwise.demo.report import build_findings
from rankwise.demo.run import DEMO, plan_arms

BUCKETS = ["D0", "D1", "D2", "D3", "D4"]


def _buckets(n_per):
    return [b for b in BUCKETS for _ in range(n_per)]


def test_summarize_arm_means_intervals_counts_and_seeds():
    rng = np.random.default_rng(0)
    labels = {"in_domain": _buckets(20), "out_of_domain": ["D0"] * 30 + ["D4"] * 10}
    correct = {d: rng.integers(0, 2, size=(3, len(v))) for d, v in labels.items()}
    s = summarize_arm(correct, labels, seeds=[0, 1, 2], n_boot=500)
    for dom in labels:
        c = correct[dom]
        lab = np.array(labels[dom])
        for b in BUCKETS:
            if (lab == b).any():
                v = c[:, lab == b].mean()
                assert s[dom][b] == pytest.approx(v)
                lo, hi = s["ci95"][dom][b]
                assert lo - 1e-9 <= v <= hi + 1e-9
                assert s["n"][dom][b] == int((lab == b).sum())
                # the mean over seeds of the per-seed accuracies
                assert s[dom][b] == pytest.approx(np.mean([r[dom][b] for r in s["seeds"]]))
            else:
                assert s[dom][b] is None and s["ci95"][dom][b] == [None, None] and s["n"][dom][b] == 0
        present = [b for b in BUCKETS if (lab == b).any()]
        assert s[dom]["mean"] == pytest.approx(np.mean([s[dom][b] for b in present]))
    d34 = np.isin(np.array(labels["in_domain"]), ["D3", "D4"])
    assert s["in_domain_d34"] == pytest.approx(correct["in_domain"][:, d34].mean())
    assert s["n"]["in_domain_d34"] == 40
    assert [r["seed"] for r in s["seeds"]] == [0, 1, 2]


def test_summarize_arm_one_seed_and_no_d34():
    s = summarize_arm({"in_domain": np.array([1, 0, 1, 1])}, {"in_domain": ["D0", "D0", "D1", "D1"]}, n_boot=200)
    assert s["in_domain"]["D0"] == 0.5 and s["in_domain"]["D1"] == 1.0
    assert s["in_domain_d34"] is None and s["ci95"]["in_domain_d34"] == [None, None]
    assert len(s["seeds"]) == 1
    with pytest.raises(ValueError, match="unknown buckets"):
        summarize_arm({"in_domain": np.ones(2)}, {"in_domain": ["D0", "D9"]})


S = {**DEMO, "ranks": [1, 16], "n_boot": 400, "analysis": False}
F = len(_buckets(30))


def _world(effects: dict, seeds=3, seed=0):
    """Correctness matrices per arm: every arm right on a base share of the facts; ``effects`` adds
    (or removes) a block of facts for one arm, so the true differences are known."""
    rng = np.random.default_rng(seed)
    base = (rng.random((seeds, F)) < 0.4).astype(float)
    C = {}
    for a in plan_arms(S):
        m = base.copy()
        k = int(round(abs(effects.get(a["name"], 0.0)) * F))
        if k:
            m[:, :k] = 1.0 if effects[a["name"]] > 0 else 0.0
        C[a["name"]] = {"in_domain": m, "out_of_domain": m.copy()}
    return C


def _restoration(C, top=0.0):
    R = {}
    for sel in ("top", "bottom", "random"):
        for f in S["restore_fractions"]:
            m = C["full-x8"]["in_domain"].copy()
            if sel == "top" and f == 0.2 and top:
                k = int(round(abs(top) * F))
                m[:, :k] = 1.0 if top > 0 else 0.0
            R[(sel, f)] = {"in_domain": m, "out_of_domain": m.copy()}
    return R


def _by_id(fs):
    return {f["id"]: f for f in fs}


REQUIRED = {"data_size", "data_size_lora", "mastery", "restore_top", "restore_vs_random", "lora_forgets_less",
            "intruders"}


def test_findings_reproduced_contradicted_inconclusive():
    buckets = {"in_domain": _buckets(30), "out_of_domain": _buckets(30)}
    # full (small) far better than full-x8; LoRA large better than LoRA small; mastery arms equal
    C = _world({"full": 0.5, "lora-r16-x8": 0.5})
    R = _restoration(C, top=-0.5)
    intr = {s: {"lora-r16": {"m1": 5, "m2": 6, "m3": 7}, "full": {"m1": 1, "m2": 0, "m3": 2}} for s in (0, 1, 2)}
    fs = build_findings(C, R, buckets, intr, S)
    got = _by_id(fs)
    assert REQUIRED <= set(got)
    for f in fs:
        assert {"id", "claim", "source", "effect", "ci95", "verdict"} <= set(f)
        assert f["verdict"] == verdict(f["ci95"])
    assert got["data_size"]["verdict"] == "reproduced" and got["data_size"]["effect"] > 0.2
    assert got["data_size_lora"]["verdict"] == "contradicted" and got["data_size_lora"]["effect"] < -0.2
    assert got["mastery"]["verdict"] == "inconclusive" and got["mastery"]["effect"] == 0.0
    assert got["restore_top"]["verdict"] == "contradicted"
    assert got["restore_vs_random"]["verdict"] == "contradicted"
    assert got["intruders"]["verdict"] == "reproduced" and got["intruders"]["effect"] == pytest.approx(5.0)
    # the claim's direction: lora_forgets_less is LoRA minus full on out-of-domain facts
    # (equal buckets: the unweighted bucket mean is the plain mean)
    assert got["lora_forgets_less"]["effect"] == pytest.approx(
        C["lora-r16"]["out_of_domain"].mean() - C["full"]["out_of_domain"].mean(), abs=1e-9)
    assert got["lora_forgets_less"]["verdict"] == "contradicted"


def test_unmeasurable_findings_say_why():
    buckets = {"in_domain": _buckets(30), "out_of_domain": _buckets(30)}
    C = _world({})
    del C["full-D3D4"]
    fs = _by_id(build_findings(C, {}, buckets, None, S, skipped={"full-D3D4": "only 3 train facts in D3+D4"}))
    assert fs["mastery"]["verdict"] == "inconclusive" and "only 3 train facts" in fs["mastery"]["why"]
    assert fs["restore_top"]["effect"] is None and "restoration" in fs["restore_top"]["why"]
    assert fs["intruders"]["verdict"] == "inconclusive" and "analysis" in fs["intruders"]["why"]


def test_contrast_spread_and_slope_findings_on_known_answers():
    import numpy as np

    from rankwise.analysis.findings import contrast_finding, slope_finding, spread_finding

    rng = np.random.default_rng(0)
    base = (rng.random((3, 400)) < 0.5).astype(float)
    hi = base.copy()
    hi[:, :80] = 1.0  # right on 80 more items at most: +0.1 on average (the half of them already right)
    mid = contrast_finding("m", "middle beats ends", "x", [hi, hi], [base, base], n_boot=400)
    assert mid["effect"] == pytest.approx(hi.mean() - base.mean()) and mid["verdict"] == "reproduced"
    flat = spread_finding("f", "flat", "x", [base, base, base], within=0.05, n_boot=400)
    assert flat["effect"] == pytest.approx(0.05) and flat["verdict"] == "reproduced" and flat["spread"] == 0.0
    apart = spread_finding("f", "flat", "x", [base, hi, (hi + base) / 2], within=0.05, names=["a", "b", "c"],
                           n_boot=400)
    assert apart["spread"] == pytest.approx(hi.mean() - base.mean()) and apart["a"]["arm"] == "b"
    assert apart["verdict"] == "contradicted"  # a spread of ~0.1 is not within 0.05
    # norms growing like sqrt(rank): slope 0.5 < 1; like rank: slope 1 (not below 1)
    noise = 1 + 0.01 * rng.standard_normal((3, 50))
    ranks = [1, 4, 16, 64]
    sub = slope_finding("n", "sub-linear", "x", [np.sqrt(r) * noise for r in ranks], ranks, n_boot=400)
    assert sub["slope"] == pytest.approx(0.5, abs=1e-3) and sub["verdict"] == "reproduced"
    lin = slope_finding("n", "sub-linear", "x", [r * noise for r in ranks], ranks, n_boot=400)
    assert lin["slope"] == pytest.approx(1.0, abs=1e-3) and lin["verdict"] == "inconclusive"


def test_drift_finding_pairs_the_matrices_both_arms_changed():
    """Full SFT's matrices are every decoder weight, LoRA's its targets (named by the adapter's module path): the
    finding pairs them by their name from `layers.` on, drops the ones either did not measure, and its effect is
    full's mean drift minus LoRA's over those, per seed."""
    from rankwise.analysis.findings import drift_finding

    def arm(names, drifts):
        return {"names": names, "drift": drifts}

    full = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.self_attn.q_proj.weight"]
    lora = ["base_model.model.model.layers.0.self_attn.q_proj.weight",
            "base_model.model.model.layers.1.self_attn.q_proj.weight"]
    upd = {0: {"full": arm(full, [0.9, 0.5, 0.3]), "lora-r4": arm(lora, [0.1, 0.2])},
           1: {"full": arm(full, [0.9, 0.4, None]), "lora-r4": arm(lora, [0.2, 0.1])}}
    f = drift_finding("x.sft_drifts_more", "src", upd, [0, 1], "lora-r4", "full", n_boot=200)
    # layer 1's q_proj has no drift for seed 1's full arm: only layer 0's q_proj is paired
    assert f["effect"] == pytest.approx(((0.5 - 0.1) + (0.4 - 0.2)) / 2)
    assert f["a"]["arm"] == "full" and f["b"]["arm"] == "lora-r4"
    none = {s: {"full": arm(full, [0.9, None, 0.3]), "lora-r4": arm(lora, [0.1, None])} for s in (0, 1)}
    assert drift_finding("x", "src", none, [0, 1], "lora-r4", "full")["why"] == \
        "no weight matrix with both arms' drifts measured"
    assert drift_finding("x", "src", {0: {"full": arm(full, [0.1] * 3)}}, [0], "lora-r4", "full")["why"] == \
        "no singular-vector similarity measured"


def test_a_machine_margin_widens_the_interval_and_the_verdict_follows_it():
    """with_machine_margin: the bootstrap interval kept as ci95_sampling, ci95 widened by the margin on each side,
    the verdict that of the widened interval; an unmeasured finding unchanged; a negative margin refused."""
    from rankwise.analysis.findings import unmeasured_finding, with_machine_margin

    f = {"id": "x", "effect": 0.15, "ci95": [0.007, 0.3], "verdict": "reproduced"}
    g = with_machine_margin(f, 0.04)
    assert g["ci95"] == pytest.approx([-0.033, 0.34]) and g["ci95_sampling"] == [0.007, 0.3]
    assert g["verdict"] == "inconclusive" and g["machine_margin"] == 0.04 and g["effect"] == 0.15
    assert f["ci95"] == [0.007, 0.3] and f["verdict"] == "reproduced"  # the input is not changed
    assert with_machine_margin({**f, "ci95": [0.05, 0.3]}, 0.04)["verdict"] == "reproduced"
    assert with_machine_margin({**f, "ci95": [-0.3, -0.05]}, 0.04)["verdict"] == "contradicted"
    u = unmeasured_finding("x", "c", "s", "why")
    assert with_machine_margin(u, 0.04) == u
    with pytest.raises(ValueError, match="margin"):
        with_machine_margin(f, -0.01)
