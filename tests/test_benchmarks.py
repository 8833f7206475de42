"""Smoke run of the whole CPU benchmark suite at its smallest size: every script
runs and its JSON carries every figure. No test asserts a timing."""
import json

from benchmarks import run


def test_cpu_suite_smoke_writes_every_figure(tmp_path):
    rc = run.main(["--suite", "cpu", "--smoke", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    failed = {k: v["error"] for k, v in summary["results"].items() if v.get("error")}
    assert rc == 0 and not failed, f"benchmark scripts failed: {failed}"
    assert set(summary["results"]) == set(run.SCRIPTS)
    for name in run.SCRIPTS:
        payload = json.loads((tmp_path / f"{name}.json").read_text())
        assert payload["env"]["torch"] and payload["env"]["device"]
        figs = summary["results"][name]["figures"]
        assert figs, f"{name}: no figures"
        for f in figs:
            assert isinstance(f["value"], (int, float)), f"{name}: figure {f['figure']!r} has no number"
    md = (tmp_path / "summary.md").read_text()
    for name in run.SCRIPTS:
        assert f"## {name}" in md
