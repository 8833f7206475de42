"""`rankwise demo` end to end on a micro world: every stage runs and leaves its outputs,
the numbers obey what holds by construction, and a rerun reuses the cached stages."""
import json
import math
import os

import pytest
import torch
import yaml

from rankwise.cli import main as cli_main
from rankwise.demo import run_demo

MICRO = {"world": {"n_people": 40, "max_exposures": 3, "seed": 2, "geography_docs": 2},
         "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
         "train": {"max_steps": 10, "batch_size": 4, "max_length": 128, "lr": 1e-2}}
SETTINGS = {"seeds": [0, 1], "ranks": [1, 2], "small_size": 2, "large_factor": 4, "large_lora_rank": 2, "epochs": 1,
            "batch_size": 2, "mastery_samples": 2, "max_new_tokens": 2, "restore_fractions": [0.05, 0.2],
            "n_boot": 200,
            "reasoning": {"min_mastery": 0.0, "ranks": [1, 2, 4], "n_per_composition": 3, "n_ood_people": 2,
                          "epochs": 1, "max_new_tokens": 8, "held_out_people": 0.3, "batch_size": 4,
                          "lr_grid": {"lora": [1e-3, 1e-2], "full": [1e-3]}, "select_rank": 2}}
BUCKETS = ["D0", "D1", "D2", "D3", "D4"]
ALL_ARMS = ["lora-r1", "lora-r2", "full", "full-D3D4", "full-D0", "lora-r2-x4", "full-x4"]
FINDINGS = {"data_size", "data_size_lora", "mastery", "restore_top", "restore_vs_random", "lora_forgets_less",
            "intruders", "recall_rank_flat", "reasoning_mid_rank", "lora_vs_sft_reasoning", "lora_ood_reasoning",
            "sft_drifts_more", "norm_log_rank"}


def _expected_n(by_seed, dom):
    """Items per bucket as results.json counts them when each seed's base has its own buckets: the mean over
    the seeds, rounded, at least 1 when a seed has any."""
    out = {}
    for b in BUCKETS:
        mean = sum(c[dom][b] for c in by_seed.values()) / len(by_seed)
        out[b] = max(1, round(mean)) if mean > 0 else 0
    return out


def _check_accuracy(acc, counts, where):
    """One domain's accuracy by bucket: None exactly for the buckets no seed has, values in [0, 1],
    mean the unweighted mean of the non-empty buckets."""
    assert set(acc) == set(BUCKETS) | {"mean"}, where
    for b in BUCKETS:
        if counts[b] == 0:
            assert acc[b] is None, (where, b)
        else:
            assert 0.0 <= acc[b] <= 1.0, (where, b)
    vals = [acc[b] for b in BUCKETS if counts[b]]
    assert acc["mean"] == (pytest.approx(sum(vals) / len(vals)) if vals else None), where


def _check_intervals(row, counts, seeds, where):
    """An arm's (or restoration point's) intervals, counts and per-seed values, as results.json promises."""
    from rankwise.analysis.stats import verdict  # noqa: F401  (the same module the report uses)

    for dom in ("in_domain", "out_of_domain"):
        _check_accuracy(row[dom], counts[dom], (where, dom))
        assert set(row["ci95"][dom]) == set(row[dom]) == set(row["n"][dom]), where
        for b in BUCKETS:
            assert row["n"][dom][b] == counts[dom][b], (where, dom, b)
            lo, hi = row["ci95"][dom][b]
            if counts[dom][b] == 0:
                assert lo is None and hi is None
            else:
                assert 0.0 <= lo <= row[dom][b] + 1e-9 and row[dom][b] - 1e-9 <= hi <= 1.0, (where, dom, b)
                per_seed = [r[dom][b] for r in row["seeds"] if r[dom][b] is not None]  # None: no item in that seed
                assert row[dom][b] == pytest.approx(sum(per_seed) / len(per_seed)), (where, dom, b)
        assert row["n"][dom]["mean"] == sum(counts[dom].values())
    assert [r["seed"] for r in row["seeds"]] == seeds, where


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
    from rankwise.analysis.stats import verdict

    calls, real = [], rtog.train_together

    def spy(cfgs, *a, **k):  # the small-set LoRA arms of each seed go through train_together, in one call
        calls.append(([c["lora"]["r"] for c in cfgs], [c["train"]["seed"] for c in cfgs], k.get("checkpoint_dir")))
        return real(cfgs, *a, **k)

    monkeypatch.setattr(rtog, "train_together", spy)
    out = tmp_path / "demo"
    res = run_demo(out, settings=SETTINGS, world_overrides=MICRO, cache_dir=tmp_path / "cache", progress=False)
    # the recall study's small-set LoRA arms, then the reasoning study's LoRA ranks, one together run per seed
    assert [c[:2] for c in calls] == [([1, 2], [0, 0]), ([1, 2], [1, 1]), ([1, 2, 4], [0, 0, 0]), ([1, 2, 4], [1, 1, 1])]
    assert calls[0][2] == str(out / "work" / "together" / "seed0" / "lora-r1+lora-r2") and not os.path.exists(calls[0][2])
    for f in ("report.md", "results.json", "accuracy_vs_rank.png", "accuracy_vs_data_size.png",
              "accuracy_vs_restored_fraction.png", "accuracy_by_train_bucket.png", "findings.png"):
        assert (out / f).exists(), f
    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"] == [0, 1]
    assert set(saved["buckets"]) == set(BUCKETS)
    by_seed = saved["buckets_by_seed"]
    for seed in ("0", "1"):  # each seed's base measured its own mastery of every fact
        lines = (out / "work" / f"mastery-seed{seed}.jsonl").read_text().splitlines()
        assert sum(by_seed[seed]["all"].values()) == len(lines)
        assert all(saved["buckets"][b] <= by_seed[seed]["all"][b] for b in BUCKETS)  # the fewest over the bases
    bases = saved["settings"]["bases"]
    assert set(bases) == {"0", "1"} and bases["0"]["dir"] != bases["1"]["dir"]
    assert [bases[x]["model_seed"] for x in ("0", "1")] == [0, 1] and bases["0"]["source"] == "pretrained"

    # the arms: base, then every planned arm whose fine-tuning set the world could fill (a skipped one says why)
    names = [a["name"] for a in saved["arms"]]
    skipped = saved["skipped_arms"]
    assert set(skipped) <= {"full-D3D4", "full-D0"}
    assert names == ["base"] + [n for n in ALL_ARMS if n not in skipped]
    counts = {dom: _expected_n(by_seed, dom) for dom in ("in_domain", "out_of_domain")}
    for dom in ("in_domain", "out_of_domain"):
        ids = [[json.loads(r)["id"] for r in (out / "work" / "data" / f"seed{x}" / f"test-{dom}.jsonl").read_text()
                .splitlines()] for x in (0, 1)]
        assert ids[0] == ids[1] and all(sum(by_seed[x][dom].values()) == len(ids[0]) > 0 for x in ("0", "1"))
    for a in saved["arms"]:
        assert {"name", "method", "rank", "train_size", "in_domain", "out_of_domain", "ci95", "n", "seeds",
                "label"} <= set(a)
        _check_intervals(a, counts, [0, 1], a["name"])  # the base arm too: one base per seed
    by = {a["name"]: a for a in saved["arms"]}
    assert [by[n]["train_size"] for n in ("lora-r1", "lora-r2", "full", "lora-r2-x4", "full-x4")] == [2, 2, 2, 8, 8]
    assert saved["seconds"] > 0 and isinstance(saved["stage_seconds"], dict)
    # each seed drew its own fine-tuning sample; the small set is the prefix of the large one
    d0, d1 = (out / "work" / "data" / "seed0"), (out / "work" / "data" / "seed1")
    large0 = (d0 / "train-large.jsonl").read_text().splitlines()
    assert (d0 / "train-small.jsonl").read_text().splitlines() == large0[:2]
    assert large0 != (d1 / "train-large.jsonl").read_text().splitlines()

    # the findings: every required id, the verdict rule, a reason for each one not measured
    fs = {f["id"]: f for f in saved["findings"]}
    assert FINDINGS <= set(fs)
    for f in saved["findings"]:
        assert f["verdict"] == verdict(f["ci95"]), f["id"]
        assert f["borderline"] == (f["ci95"][0] is not None and min(abs(f["ci95"][0]), abs(f["ci95"][1])) <= 0.005)
        if f["id"] in ("reasoning_mid_rank", "lora_vs_sft_reasoning", "lora_ood_reasoning") and f["effect"] is not None:
            # chain accuracies: the bootstrap interval widened by the machine margin, the verdict on the widened one
            lo, hi = f["ci95_sampling"]
            assert f["machine_margin"] == 0.04 and f["ci95"] == pytest.approx([lo - 0.04, hi + 0.04]), f["id"]
        else:
            assert "machine_margin" not in f, f["id"]
        assert f["verdict"] in ("reproduced", "contradicted", "inconclusive")
        if f["effect"] is None:
            assert f["verdict"] == "inconclusive" and f["why"], f["id"]
    for n in skipped:
        assert n in fs["mastery"]["why"] and fs["mastery"]["effect"] is None
    # data_size is full minus full-x4 over the same facts, paired; its effect is the difference of the means
    assert fs["data_size"]["effect"] == pytest.approx(by["full"]["in_domain"]["mean"] - by["full-x4"]["in_domain"]["mean"])
    report = (out / "report.md").read_text()
    assert report.split("\n## ")[1].startswith("Findings")  # the report opens with the findings table
    for fid in FINDINGS:
        assert f"`{fid}`" in report

    # the reasoning study: items over people every base knows (here min_mastery 0: everyone), the same items for
    # every seed, each arm with its interval, n and per-base values on every set; its findings follow the rule
    rs = saved["reasoning"]
    assert rs["skipped"] is None and rs["people"] > 0 and rs["sizes"]["test"] > 0 and rs["sizes"]["train"] > 0
    # the out-of-domain sets name what they hold: by default the held-out kind, and the one held-out composition
    # of a trained kind (hop's); the bridge-value ones held out are of the held-out kind only, so never asked
    assert rs["ood_kinds"] == ["compose"] and rs["ood_compositions"] == ["country.birth_city"]
    assert all(fs[k]["effect"] is not None and "machine_margin" in fs[k]
               for k in ("reasoning_mid_rank", "lora_vs_sft_reasoning", "lora_ood_reasoning"))
    assert [a["name"] for a in rs["arms"]] == ["base", "reason-lora-r1", "reason-lora-r2", "reason-lora-r4",
                                                "reason-full"]
    for a in rs["arms"]:
        for key in ("test.exact", "ood_kind.exact", "no_chain.exact", "recall_1hop.exact", "test.chain"):
            v = a[key]
            assert v["n"] == rs["sizes"][key.split(".")[0]] and set(v["seeds"]) == {"0", "1"}, (a["name"], key)
            assert v["ci95"][0] <= v["mean"] + 1e-9 and v["mean"] - 1e-9 <= v["ci95"][1], (a["name"], key)
            assert v["mean"] == pytest.approx(sum(v["seeds"].values()) / 2)
    assert set(rs["gate"]) == {"0", "1"} and rs["gate_met"] == all(g >= 0.9 for g in rs["gate"].values())
    # each method's lr chosen on the validation items (first seed), and every arm of every seed trained with it
    sel = rs["lr_selection"]
    assert set(sel["validation"]["lora"]) == {"0.001", "0.01"} and set(sel["validation"]["full"]) == {"0.001"}
    best = max([1e-3, 1e-2], key=lambda lr: (sel["validation"]["lora"][f"{lr:g}"], -lr))
    assert sel["chosen"] == {"lora": best, "full": 1e-3}
    for seed in (0, 1):
        for name, method in (("reason-lora-r1", "lora"), ("reason-full", "full")):
            got = yaml.safe_load(next((out / "work" / "reasoning").rglob(f"seed{seed}/{name}/resolved_config.yaml"))
                                 .read_text())
            assert got["train"]["lr"] == sel["chosen"][method], (seed, name)
    assert "chosen on the validation items' exact match" in report
    val = {a["rank"]: a["validation.exact"]["mean"] for a in rs["arms"] if a["method"] == "lora"}
    assert rs["chosen_rank"] == max(val, key=lambda k: (val[k], -k))
    assert fs["norm_log_rank"]["xs"] == [1.0, 2.0, 4.0] and len(fs["norm_log_rank"]["values"]) == 3
    flat = fs["recall_rank_flat"]
    assert flat["effect"] == pytest.approx(0.05 - flat["spread"])
    spread = [by[n]["in_domain"]["mean"] for n in ("lora-r1", "lora-r2")]
    assert flat["spread"] == pytest.approx(max(spread) - min(spread))
    assert "## Reasoning" in report and (out / "reasoning_vs_rank.png").exists()

    # the LoRA arms of the small set trained together, each ending as its solo run
    tg = saved["together"]
    assert [(g["seed"], g["arms"], g["trained"]) for g in tg] == [(s, ["lora-r1", "lora-r2"], ["lora-r1", "lora-r2"])
                                                                   for s in (0, 1)]
    assert "train together" in saved["stage_seconds"] and "train lora-r1" not in saved["stage_seconds"]
    assert by["lora-r2"]["trained_together"] == "lora-r1+lora-r2" and by["full"]["trained_together"] is None
    from rankwise.demo import DEMO, arm_config, plan_arms
    from rankwise.demo.arms import data_dir_of, seed_arm
    from rankwise.train import train

    arm = seed_arm(plan_arms({**DEMO, **SETTINGS})[1], out / "work", 1)
    assert arm["name"] == "lora-r2"
    # the learning rates were chosen on validation facts (train people, outside seed 0's large set)
    sel = saved["lr_selection"]
    assert sel["why"] is None and sel["n_validation"] >= 20
    for method, lrs in DEMO["lr_grid"].items():
        accs = sel["validation"][method]
        assert list(accs) == [f"{lr:g}" for lr in lrs]
        assert sel["chosen"][method] in lrs and accs[f"{sel['chosen'][method]:g}"] == max(accs.values())
    from rankwise.demo.run import draw_sets, validation_rows

    facts = [json.loads(r) for r in (out / "work" / "mastery-seed0.jsonl").read_text().splitlines()]
    val_ids = {r["id"] for r in draw_sets(facts, {**DEMO, **SETTINGS}, 0)[0]["large"]}
    test_ids = {json.loads(r)["id"] for d in ("in_domain", "out_of_domain")
                for r in (out / "work" / "data" / "seed0" / f"test-{d}.jsonl").read_text().splitlines()}
    val = validation_rows(facts, {**DEMO, **SETTINGS}, 0)
    assert len(val) == sel["n_validation"] and not ({r["id"] for r in val} & (val_ids | test_ids))
    assert "learning rates chosen on" in report
    run_settings = {**saved["settings"]["demo"], "lora_lr": sel["chosen"]["lora"], "full_lr": sel["chosen"]["full"]}
    solo = train(arm_config({**arm, "output_dir": str(tmp_path / "solo-r2")}, bases["1"]["dir"],
                            data_dir_of(out / "work", 1), run_settings))
    assert by["lora-r2"]["train_losses"][1] == pytest.approx(solo["train_loss"], rel=1e-5)
    assert _adapter_delta_error(out / "work" / "arms" / "seed1" / "lora-r2", tmp_path / "solo-r2") <= 1e-4
    assert "trained together" in report

    # restoration of each seed's large full-SFT arm: the 0% point is that arm; top, bottom and random at
    # every asked fraction follow
    rest = saved["restoration"]
    assert (rest["of"], rest["score"], rest["scope"]) == ("full-x4", "relative", "global")
    points = rest["points"]
    assert [(p["selection"], p["fraction"]) for p in points] == [("none", 0.0)] + [
        (s, f) for s in ("top", "bottom", "random") for f in (0.05, 0.2)]
    full_big = by["full-x4"]
    assert points[0]["in_domain"] == full_big["in_domain"] and points[0]["ci95"] == full_big["ci95"]
    n = _layer_elements(bases["0"]["dir"])
    shares = {}
    for p in points:
        _check_intervals(p, counts, [0, 1], ("restore", p["selection"], p["fraction"]))
        if p["fraction"] == 0.0:
            continue
        for st in p["stats_by_seed"]:
            assert st["n"] == n and st["k"] == math.floor(n * p["fraction"]) and st["restored"] == st["k"], st
            assert st["select"] == p["selection"]
        shares.setdefault(p["selection"], []).append(p["stats"]["score_share"])
    assert shares["top"] == sorted(shares["top"])  # a larger top-k holds more of the score
    assert all(t >= b for t, b in zip(shares["top"], shares["bottom"]))

    # the analysis stage ran over every arm of the first seed and wrote its outputs
    adir = out / "analysis"
    analysis = json.loads((adir / "analysis.json").read_text())
    assert sorted(r["name"] for r in analysis["runs"]) == sorted(names[1:])
    for r in analysis["runs"]:
        sp = r["spectral"]
        assert sp["n_matrices"] > 0, r["name"]
        if r["kind"] == "adapter":  # a rank-r update has effective and stable rank at most r
            assert all(m["effective_rank"] <= r["rank"] + 1e-3 and m["stable_rank"] <= r["rank"] + 1e-3
                       for m in sp["matrices"]), r["name"]
    assert fs["intruders"]["effect"] is not None and fs["intruders"]["seeds"] == [2, 2]
    assert "## Analysis" in report and "](analysis/" in report and "## Where the time went" in report
    assert "analysis" in saved["stage_seconds"] and "restore" in saved["stage_seconds"]

    # every directory the demo wrote is marked as rankwise's, so a rerun (or --fresh) may replace it
    from rankwise.ownership import owner

    assert owner(out)["kind"] == "demo" and owner(out / "work")["kind"] == "demo"
    assert owner(adir)["kind"] == "analyze" and owner(out / "work" / "arms" / "seed0" / "lora-r1")["kind"] == "train"
    assert owner(tmp_path / "cache" / "seed0")["kind"] == "world" and owner(tmp_path / "cache" / "seed1")["kind"] == "world"

    # Re-running reuses every cached stage: no arm is trained again, the numbers are the same.
    adapter = out / "work" / "arms" / "seed0" / "lora-r1" / "adapter" / "adapter_model.safetensors"
    mtime = os.path.getmtime(adapter)
    # ... and so does `rankwise study` on the same world config: the demo is that command (study: world).
    cfg = {"study": "world", "output_dir": str(out), "scale": "cpu", "settings": SETTINGS, "world": MICRO,
           "cache_dir": str(tmp_path / "cache"), "threads": torch.get_num_threads()}
    (tmp_path / "world.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["study", str(tmp_path / "world.yaml")]) == 0
    res2, res = json.loads((out / "results.json").read_text()), json.loads(json.dumps(res))  # as the file holds it
    assert os.path.getmtime(adapter) == mtime and len(calls) == 4
    assert [g["trained"] for g in res2["together"]] == [[], []]
    assert res2["arms"] == res["arms"] and res2["restoration"] == res["restoration"]
    assert res2["findings"] == res["findings"]
    assert res2["settings"]["base_cached"]
    with pytest.raises(ValueError, match="unknown demo settings"):
        run_demo(out, settings={"rank": [3]}, world_overrides=MICRO, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="seeds"):
        run_demo(out, settings={"seeds": []}, world_overrides=MICRO, cache_dir=tmp_path / "cache")


def test_demo_cli_parses():
    import argparse

    from rankwise import demo

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    a = p.parse_args(["--out", "x", "--scale", "gpu"])
    assert a.out == "x" and a.scale == "gpu" and not a.fresh and not a.force
    assert p.parse_args(["--fresh", "--force"]).force
    assert p.parse_args(["--ship-bases"]).ship_bases and not a.ship_bases


def test_reasoning_settings_merge_key_by_key_and_none_skips():
    from rankwise.demo import settings_for
    from rankwise.demo.reasoning import REASONING
    from rankwise.errors import ConfigError

    s = settings_for("cpu", {"reasoning": {"epochs": 1}})
    assert s["reasoning"] == {**REASONING, "epochs": 1}
    assert settings_for("gpu")["reasoning"]["ranks"] == [1, 8, 32, 128]
    assert settings_for("cpu", {"reasoning": None})["reasoning"] is None
    with pytest.raises(ConfigError, match="reasoning"):
        settings_for("cpu", {"reasoning": {"epoch": 1}})


def test_seeded_overrides_set_the_base_seed_only():
    from rankwise.world.pretrain import preset, seeded, settings_key

    over = {"train": {"max_steps": 5}}
    s = preset("cpu", seeded(over, 2))
    assert (s["model"]["seed"], s["train"]["seed"], s["train"]["max_steps"]) == (2, 2, 5)
    assert over == {"train": {"max_steps": 5}}  # not changed in place
    assert s["world"] == preset("cpu")["world"]  # the same world for every base
    assert len({settings_key(preset("cpu", seeded(None, k))) for k in range(3)}) == 3


def test_demo_rejects_bad_threads():
    import argparse

    from rankwise import demo
    from rankwise.errors import ConfigError

    p = argparse.ArgumentParser()
    demo.add_arguments(p)
    with pytest.raises(ConfigError, match="--threads"):
        demo.main(p.parse_args(["--threads", "0"]))


def test_gpu_scale_runs_the_studies_sizes():
    """`--scale gpu` is the knowledge study's protocol: 240 and 1,920 fine-tuning facts (and 240 known and
    240 unknown ones) drawn from its world, every seed, with no set skipped. The buckets here come from a
    proxy of mastery (exposures), since the gpu base model is not trained in a test."""
    from rankwise.demo.run import draw_sets, settings_for
    from rankwise.world.generate import WorldConfig, generate_world
    from rankwise.world.mastery import test_sets
    from rankwise.world.pretrain import preset

    s = settings_for("gpu")
    assert (s["small_size"], s["small_size"] * s["large_factor"]) == (240, 1920) and len(s["seeds"]) >= 3
    world = generate_world(WorldConfig.from_dict(preset("gpu")["world"]))

    def bucket(e):
        return "D0" if e == 0 else "D1" if e == 1 else "D2" if e == 2 else "D3" if e <= 4 else "D4"

    facts = [{**f, "bucket": bucket(f["exposures"])} for f in world["facts"]]
    for seed in s["seeds"]:
        sets, skipped = draw_sets(facts, s, seed)
        assert not skipped
        assert {k: len(v) for k, v in sets.items()} == {"small": 240, "large": 1920, "known": 240, "unknown": 240}
        assert sets["small"] == sets["large"][:240]
    tests = test_sets(facts)
    for dom in ("in_domain", "out_of_domain"):
        counts = {b: sum(r["bucket"] == b for r in tests[dom]) for b in BUCKETS}
        assert min(counts.values()) >= 60, (dom, counts)
