"""Shared test setup.

Triton kernels run under the interpreter when no CUDA device is present; the
variable must be set before any kernel module is imported, so it is set here,
before the tests import rankwise.
"""
import os

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


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: tiny models on a shared 2-core CPU are
    several times faster than with oversubscribed threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
