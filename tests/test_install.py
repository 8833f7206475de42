"""``pip install .`` works: the isolated build compiles the extension with the flags torch chooses.

An isolated build (what ``pip install .`` and ``pip wheel .`` do) installs the build requirements of
pyproject.toml into a fresh environment, torch included, and compiles ``csrc/`` against that torch's
headers; a newer torch's headers need C++20, so setup.py must leave the ``-std=`` flag to torch's
``BuildExtension``. The slow test runs one such build, pinned by a build constraint to the torch of
this environment (so the package index or pip's cache provides it, and the built extension can be
imported here to prove it works); it compiles ``csrc/`` once. It is skipped only when the index cannot
provide that torch. The fast tests check setup.py's choices without building.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SKIP = (".git", ".venv", "build", "dist", "runs", "tests", "benchmarks", "*.egg-info", "__pycache__", "*.so",
        ".pytest_cache")


def load_setup():
    """setup.py as a module (it runs setuptools only as ``__main__``)."""
    spec = importlib.util.spec_from_file_location("rankwise_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_setup_leaves_the_cxx_standard_to_torch(monkeypatch):
    monkeypatch.chdir(ROOT)
    ext = load_setup()._extension()
    flags = ext.extra_compile_args["cxx"]
    assert not [f for f in flags if f.startswith("-std=")], flags
    assert sorted(os.path.basename(s) for s in ext.sources) == sorted(p.name for p in (ROOT / "csrc").glob("*.cpp"))


def test_the_wheel_requires_the_torch_series_it_was_built_against():
    major, minor = torch.__version__.split(".")[:2]
    assert load_setup()._torch_requirement() == f"torch=={major}.{minor}.*"


def _index_provides(requirement: str) -> str:
    """Empty when pip can resolve ``requirement`` (index, find-links or cache), else pip's last line why not."""
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                           "--quiet", requirement], capture_output=True, text=True, timeout=600)
    if proc.returncode == 0:
        return ""
    return ((proc.stderr or proc.stdout).strip().splitlines() or ["pip failed"])[-1]


class IsolatedBuild:
    """``pip wheel -v --no-deps`` of a copy of the tree with build isolation, its torch pinned to this
    environment's, started in the background: the compile is serial, so it runs on the second core while
    the rest of the suite runs (``conftest.pytest_collection_finish`` starts it when the test is collected).

    pip >= 25.3 takes build constraints with ``--build-constraint`` (and ignores the regular ones in the
    build environment); older pips apply ``PIP_CONSTRAINT`` there, so both are given.
    """

    def __init__(self, root: Path):
        self.root, self.pin = root, f"torch=={torch.__version__}"
        self.skip = _index_provides(self.pin)
        self.proc = None
        if self.skip:
            return
        (root / "constraints.txt").write_text(self.pin + "\n")
        shutil.copytree(ROOT, root / "src", ignore=shutil.ignore_patterns(*SKIP))
        env = dict(os.environ, PIP_NO_INPUT="1", PIP_CONSTRAINT=str(root / "constraints.txt"))
        env.pop("PIP_NO_BUILD_ISOLATION", None)
        cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", str(root / "src"), "-w", str(root / "wheel")]
        helptext = subprocess.run([sys.executable, "-m", "pip", "wheel", "--help"], capture_output=True,
                                  text=True).stdout
        if "--build-constraint" in helptext:
            cmd[4:4] = ["--build-constraint", str(root / "constraints.txt")]
        self.log = open(root / "pip.log", "w+")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def result(self, timeout: float = 1800) -> tuple:
        """(return code, pip's log) once the build has ended."""
        rc = self.proc.wait(timeout=timeout)
        self.log.seek(0)
        return rc, self.log.read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.slow
def test_an_isolated_build_compiles_an_extension_that_imports(request, tmp_path):
    build = getattr(request.config, "rankwise_isolated_build", None) or IsolatedBuild(tmp_path)
    if build.skip:
        pytest.skip(f"the package index cannot provide {build.pin} for the isolated build: {build.skip}")
    rc, log = build.result()
    assert rc == 0, log[-6000:]
    compiles = [line for line in log.splitlines() if re.search(r"\s-c\s+\S*csrc/\w+\.cpp", line)]
    assert compiles, "no compile command of csrc/ in pip's log:\n" + log[-3000:]
    for line in compiles:  # exactly one standard, the one torch's BuildExtension added
        assert len(re.findall(r"\s-std=", line)) == 1, line
    root = build.root
    [wheel] = (root / "wheel").glob("rankwise-*.whl")
    site = root / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    major, minor = torch.__version__.split(".")[:2]
    assert f"Requires-Dist: torch=={major}.{minor}.*" in meta
    script = ("import rankwise._C as C, rankwise.examples as E, os\n"
              f"assert C.__file__.startswith({str(site)!r}), C.__file__\n"
              "assert C.num_threads() >= 1\n"
              "assert os.path.isfile(os.path.join(E.__path__[0], 'lora.yaml'))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=root, env=dict(os.environ, PYTHONPATH=str(site)),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
