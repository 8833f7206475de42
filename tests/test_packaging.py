"""A normal (non-editable) install works: the wheel holds every module of ``src/rankwise``,
``kernels/`` and ``examples/``, the example configs and the quickstart's sample data, the C++ extension
and the console script, and, unpacked on its own, imports every module, lists every CLI verb and writes
the example config with ``rankwise init``.

The wheel is built from a copy of the source tree (a ``build/`` directory left by an earlier build
would otherwise leak stale modules into it) with ``pip wheel --no-build-isolation --no-deps``, the
command the README gives. ``RANKWISE_PREBUILT_EXT`` hands setup.py the extension that ``make install``
compiled from the same sources, so the test does not spend minutes compiling ``csrc/`` a second time.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERBS = ("train", "sweep", "merge", "restore", "analyze", "world", "demo", "tune", "init")
# source directory -> its package in the wheel
PACKAGES = ((ROOT / "src" / "rankwise", "rankwise"), (ROOT / "kernels", "rankwise/kernels"),
            (ROOT / "examples", "rankwise/examples"))
SKIP = (".git", ".venv", "build", "dist", "runs", "tests", "benchmarks", "*.egg-info", "__pycache__", "*.so",
        ".pytest_cache")


def expected_modules() -> set[str]:
    """Wheel paths of every module in the source tree."""
    out = set()
    for base, prefix in PACKAGES:
        for path in base.rglob("*.py"):
            if "__pycache__" not in path.parts:
                out.add(f"{prefix}/{path.relative_to(base).as_posix()}")
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    import rankwise._C

    src = tmp_path_factory.mktemp("src") / "rankwise"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*SKIP))
    out = tmp_path_factory.mktemp("wheel")
    env = dict(os.environ, RANKWISE_PREBUILT_EXT=rankwise._C.__file__, PIP_NO_INPUT="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                           "--no-index", str(src), "-w", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(out.glob("rankwise-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_holds_every_module_the_extension_and_the_script(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = z.read(entry).decode()
    missing = sorted(expected_modules() - names)
    assert not missing, f"modules missing from {wheel.name}: {missing}"
    assert any(n.startswith("rankwise/_C.") and n.endswith(".so") for n in names), "no rankwise._C in the wheel"
    assert "rankwise = rankwise.cli:main" in scripts
    stale = sorted(n for n in names if n.endswith(".py") and n not in expected_modules())
    assert not stale, f"modules in the wheel that the source tree no longer has: {stale}"


def expected_data() -> set[str]:
    """Wheel paths of the example configs and the sample data."""
    base = ROOT / "examples"
    files = list(base.glob("*.yaml")) + list((base / "data").glob("*.jsonl"))
    assert files, "no example configs in examples/"
    return {f"rankwise/examples/{p.relative_to(base).as_posix()}" for p in files}


def test_the_wheel_ships_the_example_configs_and_the_sample_data(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        missing = sorted(expected_data() - names)
        assert not missing, f"example files missing from {wheel.name}: {missing}"
        for name in expected_data():
            assert z.read(name) == (ROOT / "examples" / name[len("rankwise/examples/"):]).read_bytes(), name


def test_the_wheel_ships_the_pretrained_bases_byte_for_byte(wheel):
    """The demo's shipped bases (``rankwise/world/bases/``): the manifest and every file it lists, as in the tree."""
    base = ROOT / "src" / "rankwise" / "world" / "bases"
    files = [p for p in base.rglob("*") if p.is_file()]
    manifest = json.loads((base / "manifest.json").read_text())["bases"]
    listed = {f"{e['dir']}/{name}" for e in manifest.values() for name in e["files"]} | {"manifest.json"}
    assert {p.relative_to(base).as_posix() for p in files} == listed, "files in bases/ the manifest does not list"
    with zipfile.ZipFile(wheel) as z:
        for rel in sorted(listed):
            assert z.read(f"rankwise/world/bases/{rel}") == (base / rel).read_bytes(), rel


def test_the_unpacked_wheel_imports_every_module_lists_every_verb_and_writes_the_config(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    env = dict(os.environ, PYTHONPATH=str(site))
    script = (
        "import importlib, pkgutil, rankwise\n"
        f"assert rankwise.__file__.startswith({str(site)!r}), rankwise.__file__\n"
        "names = [m.name for m in pkgutil.walk_packages(rankwise.__path__, 'rankwise.')]\n"
        "for n in names:\n"
        "    importlib.import_module(n)\n"
        "print(' '.join(names))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = {p[: -len(".py")].replace("/", ".").removesuffix(".__init__") for p in expected_modules()} - {"rankwise"}
    missing = sorted(want - set(proc.stdout.split()))
    assert not missing, f"modules the installed wheel does not import: {missing}"
    proc = subprocess.run([sys.executable, "-m", "rankwise.cli", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    missing = [v for v in VERBS if v not in proc.stdout]
    assert not missing, f"verbs missing from `rankwise --help` of the installed wheel: {missing}\n{proc.stdout}"
    proc = subprocess.run([sys.executable, "-m", "rankwise.cli", "init", "--out", "my.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "my.yaml").read_text() == (ROOT / "examples" / "lora.yaml").read_text()
