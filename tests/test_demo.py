"""`rankwise demo` end to end on a micro world: outputs, results.json keys, resumption."""
import json
import os

import pytest

from rankwise.demo import run_demo

MICRO = {"world": {"n_people": 40, "max_exposures": 3, "seed": 2},
         "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
         "train": {"max_steps": 10, "batch_size": 4, "max_length": 128, "lr": 1e-2}}
SETTINGS = {"ranks": [1, 2], "small_size": 2, "large_factor": 4, "large_lora_rank": 2, "epochs": 1,
            "batch_size": 2, "mastery_samples": 2, "max_new_tokens": 2, "restore_fractions": [0.05, 0.6]}
BUCKETS = ["D0", "D1", "D2", "D3", "D4"]


def test_demo_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    res = run_demo(out, settings=SETTINGS, world_overrides=MICRO, cache_dir=tmp_path / "cache", progress=False)
    for f in ("report.md", "results.json", "accuracy_vs_rank.png", "accuracy_vs_data_size.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["buckets"]) == set(BUCKETS)
    assert sum(saved["buckets"].values()) == len([l for l in (out / "work" / "mastery.jsonl").read_text().splitlines()])
    names = [a["name"] for a in saved["arms"]]
    assert names == ["base", "lora-r1", "lora-r2", "full", "lora-r2-x4", "full-x4"]
    for a in saved["arms"]:
        assert {"name", "method", "rank", "train_size", "in_domain", "out_of_domain"} <= set(a)
        for dom in ("in_domain", "out_of_domain"):
            assert set(a[dom]) == set(BUCKETS) | {"mean"}
            vals = [v for k, v in a[dom].items() if k != "mean" and v is not None]
            assert all(0.0 <= v <= 1.0 for v in vals)
            if vals:
                assert a[dom]["mean"] == pytest.approx(sum(vals) / len(vals))
    assert [a["train_size"] for a in saved["arms"][1:]] == [2, 2, 2, 8, 8]
    assert saved["seconds"] > 0 and isinstance(saved["stage_seconds"], dict)
    report = (out / "report.md").read_text()
    assert "lora-r1" in report and "D3+D4" in report and "## Settings" in report and "## Analysis" in report
    rest = saved["restoration"]
    if rest["points"]:  # rankwise.masking is installed
        assert [p["fraction"] for p in rest["points"]] == [0.0, 0.05, 0.6]
        assert (out / "accuracy_vs_restored_fraction.png").exists()
    else:
        assert "not importable" in rest["note"]
    # Re-running reuses every cached stage: no arm is trained again.
    adapter = out / "work" / "arms" / "lora-r1" / "adapter" / "adapter_model.safetensors"
    mtime = os.path.getmtime(adapter)
    res2 = run_demo(out, settings=SETTINGS, world_overrides=MICRO, cache_dir=tmp_path / "cache", progress=False)
    assert os.path.getmtime(adapter) == mtime
    assert res2["arms"] == res["arms"] and res2["settings"]["base_cached"]
    # changed settings invalidate the demo's own cached stages
    with pytest.raises(ValueError, match="unknown demo settings"):
        run_demo(out, settings={"rank": [3]}, world_overrides=MICRO, cache_dir=tmp_path / "cache")


def test_demo_cli_parses():
    import argparse

    from rankwise import demo

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    a = p.parse_args(["--out", "x", "--scale", "gpu"])
    assert a.out == "x" and a.scale == "gpu" and not a.fresh


def test_demo_rejects_bad_threads():
    import argparse

    from rankwise import demo

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    with pytest.raises(ValueError, match="--threads"):
        demo.main(p.parse_args(["--threads", "0"]))
