"""`rankwise demo` is `rankwise study` on the embedded world's config (study: world): the same function runs
with the same arguments, the shipped example is the demo's config, and a bad world config is one line before
anything is written. (The whole protocol run through `rankwise study` is in test_demo's end-to-end test.)"""
import argparse
import re

import pytest
import yaml

from rankwise.cli import main as cli_main
from rankwise.demo import protocol
from rankwise.demo.protocol import validate_world, world_config
from rankwise.errors import ConfigError

EXAMPLES = "examples/studies"


def _spy(monkeypatch):
    calls = []

    def fake(out_dir, **kw):
        calls.append((str(out_dir), kw))
        return {"seconds": 0.0, "findings": [{"id": "x", "effect": 0.1, "verdict": "inconclusive"}],
                "summary": {"base_in_domain": 0.1, "best_arm": "full", "best_d34": 0.5, "best_d34_ci95": [0.4, 0.6],
                            "best_d0": 0.0, "verdicts": {"x": "inconclusive"}}}

    monkeypatch.setattr(protocol, "run_demo", fake)
    monkeypatch.setattr(protocol, "set_threads", lambda n: calls.append(("threads", n)))
    return calls


def test_demo_and_study_run_the_same_protocol(tmp_path, monkeypatch, capsys):
    calls = _spy(monkeypatch)
    out = str(tmp_path / "d")
    assert cli_main(["demo", "--out", out, "--threads", "1"]) == 0
    cfg = {**world_config("cpu", out, 1)}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["study", str(tmp_path / "w.yaml")]) == 0
    assert calls[0] == calls[2] == ("threads", 1) and calls[1] == calls[3]
    assert calls[1] == (out, {"scale": "cpu", "fresh": False, "settings": None, "world_overrides": None,
                              "cache_dir": None, "progress": True, "force": False})
    assert "x: +0.100 inconclusive" in capsys.readouterr().out
    calls.clear()  # --out overrides the config's output_dir; --force and --fresh reach the demo's claim
    assert cli_main(["study", str(tmp_path / "w.yaml"), "--out", str(tmp_path / "e"), "--force", "--fresh"]) == 0
    assert calls[1][0] == str(tmp_path / "e") and calls[1][1]["force"] and calls[1][1]["fresh"]
    calls.clear()
    assert cli_main(["demo", "--out", out, "--fresh"]) == 0 and calls[1][1]["fresh"]


def test_the_example_is_the_demos_config():
    for scale in ("cpu", "gpu"):
        raw = yaml.safe_load(open(f"{EXAMPLES}/world-{scale}.yaml"))
        cfg = validate_world(raw)
        expected = world_config(scale, "runs/demo" if scale == "cpu" else "runs/demo-gpu")
        assert cfg == expected, scale


def test_plan_names_every_arm_and_writes_nothing(tmp_path, capsys):
    cfg = {"study": "world", "output_dir": str(tmp_path / "o"), "settings": {"ranks": [2, 8], "reasoning": None}}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["study", str(tmp_path / "w.yaml"), "--plan"]) == 0
    text = capsys.readouterr().out
    assert "shipped bases: [0, 1, 2]; pretrained on first use and cached: none" in text
    assert "lora-r2: LoRA r=2, 24 facts" in text and "lora-r8:" in text and "full-x8: full SFT, 192 facts" in text
    assert "lora-r4" not in text and "reasoning arms" not in text
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("raw,msg", [
    ({"scale": "tpu"}, "scale must be one of"),
    ({"settings": {"rank": [3]}}, "unknown demo settings"),
    ({"settings": {"seeds": []}}, "seeds"),
    ({"settings": {"reasoning": {"epoch": 1}}}, "reasoning"),
    ({"world": {"modl": {}}}, "unknown settings section"),
    ({"world": {"model": {"hidden": 8}}}, "unknown model settings"),
    ({"settings": [1]}, "settings must be a mapping"),
    ({"settings": {"ranks": "abc"}}, "ranks must be a non-empty list"),
    ({"settings": {"ranks": [0, 4]}}, "ranks[] must be an integer >= 1"),
    ({"settings": {"restore_selections": None}}, "restore_selections must be a non-empty list"),
    ({"settings": {"reasoning": {"epochs": "x"}}}, "reasoning.epochs must be an integer >= 1"),
    ({"settings": {"restore_fractions": [0.2, 1.5]}}, "must lie in (0, 1]"),
    ({"scale": ["cpu"]}, "scale must be one of"),
    ({"world": {"world": {"geography_docs": 0}}}, "hop, which needs a world with geography_docs"),
    ({"settings": {"reasoning": {"held_out_compositions": ["country.citizenship"]}}},
     "held_out_compositions must be compositions"),
    ({"settings": {"reasoning": {"held_out_compositions": ["work_city"]}}}, "held_out_compositions must be"),
    ({"settings": {"reasoning": {"relations": ["birth_city", "citizenship"]}}}, "reasoning.relations must be city"),
    ({"settings": {"reasoning": {"relations": ["birth_city", "work_city"]}}}, "set the held-out compositions too"),
    ({"settings": {"reasoning": {"kinds": ["compose", "compose"]}}}, "at least two distinct of"),
    ({"threads": 0}, "threads must be a positive integer"),
    ({"threads": True}, "threads must be a positive integer"),
    ({"cache_dir": 3}, "cache_dir must be a path"),
    ({"ranks": [1]}, "unknown key 'ranks'"),
])
def test_bad_world_configs_are_one_line_before_anything_is_written(tmp_path, capsys, raw, msg):
    with pytest.raises(ConfigError, match=re.escape(msg)):
        validate_world({"study": "world", **raw})
    (tmp_path / "w.yaml").write_text(yaml.safe_dump({"study": "world", "output_dir": str(tmp_path / "o"), **raw}))
    assert cli_main(["study", str(tmp_path / "w.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and msg.split()[0] in err
    assert not (tmp_path / "o").exists()


def test_demo_threads_are_checked_before_anything_runs(monkeypatch):
    calls = _spy(monkeypatch)
    p = argparse.ArgumentParser()
    protocol.add_arguments(p)
    with pytest.raises(ConfigError, match="--threads"):
        protocol.main(p.parse_args(["--threads", "0"]))
    assert calls == []


def test_fresh_is_for_the_world_protocol_only(tmp_path, capsys, monkeypatch):
    import rankwise.study as study

    monkeypatch.setattr(study, "prepare", lambda raw: ({"study": "rank", "output_dir": str(tmp_path / "o")}, {}))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"study": "rank"}))
    assert cli_main(["study", str(tmp_path / "r.yaml"), "--fresh"]) == 2
    assert "--fresh is for study: world" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_the_bridge_kinds_example_plans_the_shipped_bases(capsys):
    """The bridge-kinds example changes only reasoning settings: its plan names the shipped bases."""
    assert cli_main(["study", f"{EXAMPLES}/world-bridge-kinds.yaml", "--plan"]) == 0
    text = capsys.readouterr().out
    assert "shipped bases: [0, 1, 2]" in text
    assert "reason-lora-r16" in text and "reason-full" in text


def test_a_world_override_plans_pretrained_bases(tmp_path, capsys):
    """A world override (here fewer geography documents) matches no shipped base: the plan says they are
    pretrained."""
    cfg = {"study": "world", "output_dir": str(tmp_path / "o"), "world": {"world": {"geography_docs": 20}}}
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["study", str(tmp_path / "w.yaml"), "--plan"]) == 0
    assert "shipped bases: none; pretrained on first use and cached: [0, 1, 2]" in capsys.readouterr().out
