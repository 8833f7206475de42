"""`rankwise demo` end to end on a micro world: every stage runs and leaves its outputs,
the numbers obey what holds by construction, and a rerun reuses the cached stages."""
import json
import math
import os

import pytest

from rankwise.demo import run_demo

MICRO = {"world": {"n_people": 40, "max_exposures": 3, "seed": 2},
         "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
         "train": {"max_steps": 10, "batch_size": 4, "max_length": 128, "lr": 1e-2}}
SETTINGS = {"ranks": [1, 2], "small_size": 2, "large_factor": 4, "large_lora_rank": 2, "epochs": 1,
            "batch_size": 2, "mastery_samples": 2, "max_new_tokens": 2, "restore_fractions": [0.05, 0.6]}
BUCKETS = ["D0", "D1", "D2", "D3", "D4"]
ARMS = ["lora-r1", "lora-r2", "full", "lora-r2-x4", "full-x4"]


def _check_accuracy(acc, counts, where):
    """One domain's accuracy by bucket: None exactly for the empty buckets, values in [0, 1],
    mean the unweighted mean of the non-empty buckets."""
    assert set(acc) == set(BUCKETS) | {"mean"}, where
    for b in BUCKETS:
        if counts[b] == 0:
            assert acc[b] is None, (where, b)
        else:
            assert 0.0 <= acc[b] <= 1.0 and acc[b] * counts[b] == pytest.approx(round(acc[b] * counts[b])), (where, b)
    vals = [acc[b] for b in BUCKETS if counts[b]]
    assert acc["mean"] == (pytest.approx(sum(vals) / len(vals)) if vals else None), where


def _layer_elements(base_dir):
    """Elements restoration ranks: the decoder layers' tensors, norms excluded."""
    from rankwise.model import SafetensorsCheckpoint

    ck = SafetensorsCheckpoint(base_dir)
    return sum(math.prod(ck.shape(k)) for k in ck.keys() if "layers" in k and "norm" not in k)


def _adapter_delta_error(run_dir, solo_dir) -> float:
    """Worst relative ||scaling B A - (scaling B A)_solo|| / ||(scaling B A)_solo|| over the adapted layers."""
    from rankwise.adapter import lora_delta, lora_pairs, scaling_of

    cfg_a, pa = lora_pairs(os.path.join(run_dir, "adapter"))
    cfg_b, pb = lora_pairs(os.path.join(solo_dir, "adapter"))
    assert cfg_a == cfg_b and pa.keys() == pb.keys()
    worst = 0.0
    for n in pb:
        da, db = lora_delta(*pa[n], scaling_of(cfg_a)), lora_delta(*pb[n], scaling_of(cfg_b))
        worst = max(worst, float((da - db).norm() / db.norm()))
    return worst


def test_demo_end_to_end_and_resume(tmp_path, monkeypatch):
    import rankwise.together as rtog

    calls, real = [], rtog.train_together

    def spy(cfgs, *a, **k):  # the small-set LoRA arms go through train_together, in one call
        calls.append(([c["lora"]["r"] for c in cfgs], k.get("checkpoint_dir")))
        return real(cfgs, *a, **k)

    monkeypatch.setattr(rtog, "train_together", spy)
    out = tmp_path / "demo"
    res = run_demo(out, settings=SETTINGS, world_overrides=MICRO, cache_dir=tmp_path / "cache", progress=False)
    assert [c[0] for c in calls] == [[1, 2]]
    assert calls[0][1] == str(out / "work" / "together" / "lora-r1+lora-r2") and not os.path.exists(calls[0][1])
    for f in ("report.md", "results.json", "accuracy_vs_rank.png", "accuracy_vs_data_size.png",
              "accuracy_vs_restored_fraction.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["buckets"]) == set(BUCKETS)
    assert sum(saved["buckets"].values()) == len((out / "work" / "mastery.jsonl").read_text().splitlines())
    names = [a["name"] for a in saved["arms"]]
    assert names == ["base"] + ARMS
    counts = saved["test_buckets"]
    for dom in ("in_domain", "out_of_domain"):
        rows = (out / "work" / "data" / f"test-{dom}.jsonl").read_text().splitlines()
        assert sum(counts[dom].values()) == len(rows) > 0
    for a in saved["arms"]:
        assert {"name", "method", "rank", "train_size", "in_domain", "out_of_domain"} <= set(a)
        for dom in ("in_domain", "out_of_domain"):
            _check_accuracy(a[dom], counts[dom], (a["name"], dom))
    assert [a["train_size"] for a in saved["arms"][1:]] == [2, 2, 2, 8, 8]
    assert saved["seconds"] > 0 and isinstance(saved["stage_seconds"], dict)

    # the LoRA arms of the small set trained together, each ending as its solo run
    tg = saved["together"]
    assert [(g["arms"], g["trained"]) for g in tg] == [(["lora-r1", "lora-r2"], ["lora-r1", "lora-r2"])]
    assert "train together lora-r1+lora-r2" in saved["stage_seconds"] and "train lora-r1" not in saved["stage_seconds"]
    assert [a.get("trained_together") for a in saved["arms"]] == [None, "lora-r1+lora-r2", "lora-r1+lora-r2", None,
                                                                   None, None]
    from rankwise.demo import DEMO, arm_config, plan_arms
    from rankwise.train import train

    arm = plan_arms({**DEMO, **SETTINGS}, out / "work")[1]
    assert arm["name"] == "lora-r2"
    solo = train(arm_config({**arm, "output_dir": str(tmp_path / "solo-r2")}, saved["settings"]["base_dir"],
                            out / "work" / "data", saved["settings"]["demo"]))
    together_r2 = saved["arms"][names.index("lora-r2")]
    assert together_r2["train_loss"] == pytest.approx(solo["train_loss"], rel=1e-5)
    assert _adapter_delta_error(out / "work" / "arms" / "lora-r2", tmp_path / "solo-r2") <= 1e-4
    assert "trained together" in (out / "report.md").read_text()

    # restoration of the large full-SFT arm: the 0% point is that arm, every asked fraction follows
    rest = saved["restoration"]
    assert (rest["of"], rest["select"], rest["score"], rest["scope"]) == ("full-x4", "top", "relative", "global")
    points = rest["points"]
    assert [p["fraction"] for p in points] == [0.0, 0.05, 0.6]
    full_big = saved["arms"][names.index("full-x4")]
    assert points[0]["in_domain"] == full_big["in_domain"] and points[0]["out_of_domain"] == full_big["out_of_domain"]
    n = _layer_elements(saved["settings"]["base_dir"])
    shares = []
    for p in points:
        for dom in ("in_domain", "out_of_domain"):
            _check_accuracy(p[dom], counts[dom], ("restore", p["fraction"], dom))
        if p["fraction"] == 0.0:
            continue
        st = p["stats"]
        # floor(n * k%) elements of the layers' weights (no norms) are put back, and the top
        # selection holds at least that share of the total score (the top-k mean >= the mean)
        assert st["n"] == n and st["k"] == math.floor(n * p["fraction"]) and st["restored"] == st["k"], st
        assert st["k"] / n - 1e-9 <= st["score_share"] <= 1.0, st
        shares.append(st["score_share"])
    assert shares == sorted(shares)  # a larger top-k holds more of the score

    # the analysis stage ran over every arm and wrote its outputs
    adir = out / "analysis"
    assert (adir / "analysis.json").exists() and (adir / "analysis.md").exists()
    analysis = json.loads((adir / "analysis.json").read_text())
    assert sorted(r["name"] for r in analysis["runs"]) == sorted(ARMS)
    n_probe = min(32, len((out / "work" / "data" / "test-in_domain.jsonl").read_text().splitlines())) + \
        min(32, len((out / "work" / "data" / "test-out_of_domain.jsonl").read_text().splitlines()))
    for r in analysis["runs"]:
        sp = r["spectral"]
        assert sp["n_matrices"] > 0, r["name"]
        if r["kind"] == "adapter":  # a rank-r update has effective and stable rank at most r
            assert all(m["effective_rank"] <= r["rank"] + 1e-3 and m["stable_rank"] <= r["rank"] + 1e-3
                       for m in sp["matrices"]), r["name"]
        assert r["probe"]["tokens"]["overall"]["n"] == n_probe, r["name"]
    for name in analysis["files"]["plots"].values():
        assert (adir / name).exists(), name
    report = (out / "report.md").read_text()
    assert "lora-r1" in report and "D3+D4" in report and "## Settings" in report
    assert "## Restoring the top-k% relative updates" in report
    assert "## Analysis" in report and "](analysis/" in report
    assert "analysis" in saved["stage_seconds"] and "restore" in saved["stage_seconds"]

    # every directory the demo wrote is marked as rankwise's, so a rerun (or --fresh) may replace it
    from rankwise.ownership import owner

    assert owner(out)["kind"] == "demo" and owner(out / "work")["kind"] == "demo"
    assert owner(adir)["kind"] == "analyze" and owner(out / "work" / "arms" / "lora-r1")["kind"] == "train"
    assert owner(tmp_path / "cache")["kind"] == "world"

    # Re-running reuses every cached stage: no arm is trained again.
    adapter = out / "work" / "arms" / "lora-r1" / "adapter" / "adapter_model.safetensors"
    mtime = os.path.getmtime(adapter)
    res2 = run_demo(out, settings=SETTINGS, world_overrides=MICRO, cache_dir=tmp_path / "cache", progress=False)
    assert os.path.getmtime(adapter) == mtime and len(calls) == 1
    assert res2["together"][0]["trained"] == []
    assert res2["arms"] == res["arms"] and res2["restoration"] == res["restoration"]
    assert res2["settings"]["base_cached"]
    with pytest.raises(ValueError, match="unknown demo settings"):
        run_demo(out, settings={"rank": [3]}, world_overrides=MICRO, cache_dir=tmp_path / "cache")


def test_demo_cli_parses():
    import argparse

    from rankwise import demo

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    a = p.parse_args(["--out", "x", "--scale", "gpu"])
    assert a.out == "x" and a.scale == "gpu" and not a.fresh and not a.force
    assert p.parse_args(["--fresh", "--force"]).force


def test_demo_rejects_bad_threads():
    import argparse

    from rankwise import demo
    from rankwise.errors import ConfigError

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    with pytest.raises(ConfigError, match="--threads"):
        demo.main(p.parse_args(["--threads", "0"]))
