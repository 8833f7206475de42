"""rankwise benchmarks: scripts that time and measure memory, writing JSON under
benchmarks/results/. Run one with ``python -m benchmarks.bench_lora``, all with
``python -m benchmarks.run``.

Without CUDA the Triton kernels can only run under the interpreter, and the flag
must be set before triton is first imported, so it is set here.
"""
import os as _os


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if not _cuda_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")
