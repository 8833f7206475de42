"""Shared test setup.

Triton kernels run under the interpreter when no CUDA device is present; the
variable must be set before any kernel module is imported, so it is set here,
before the tests import rankwise.
"""
import os
import shutil
import tempfile
from pathlib import Path

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_launch_plans():
    """Each test resolves its GEMMs' choices afresh: a test that stands in for the choice (a recorder, a
    forced path) must not leave its plans to the next test."""
    yield
    from rankwise.kernels.tuning import forget_plans
    forget_plans()


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: tiny models on a shared 2-core CPU are
    several times faster than with oversubscribed threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_finish(session):
    """Start the isolated ``pip wheel`` of ``test_install.py`` as soon as it is collected, so its serial
    compile overlaps the rest of the suite instead of adding to it."""
    if not any(item.name == "test_an_isolated_build_compiles_an_extension_that_imports" for item in session.items):
        return
    from test_install import IsolatedBuild

    root = Path(tempfile.mkdtemp(prefix="rankwise-isolated-build-"))
    session.config.rankwise_isolated_build = IsolatedBuild(root)


def pytest_unconfigure(config):
    build = getattr(config, "rankwise_isolated_build", None)
    if build is not None:
        build.stop()
        shutil.rmtree(build.root, ignore_errors=True)
