"""Training checkpoints and output directories: one dict on disk, written atomically.

A checkpoint is one ``torch.save``'d dict with everything a resumed run needs
(trainable weights, optimizer, scaler, RNG states, step, config, ...); it is
written to a temporary file beside ``checkpoint.pt`` and renamed over it. The
RNG states are stored as tensors and plain Python values only, so the file
loads with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

Old checkpoints that need full unpickling are refused: unpickling can run code.
"""
from __future__ import annotations

import logging
import os
import pickle
import random

import torch

from .atomic import atomic_write, replace_dir  # noqa: F401  (replace_dir re-exported)
from .errors import ConfigError

log = logging.getLogger("rankwise")


def rng_state(device) -> dict:
    """torch (CPU and, on CUDA, ``device``), Python and numpy RNG states; tensors and plain values only."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    """Undo ``rng_state``."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy().astype(np.uint32) if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path) -> dict:
    """Load a checkpoint on the CPU with ``weights_only=True``.

    A file that needs full unpickling (a checkpoint of an older rankwise, which
    pickled a numpy RNG state, or a crafted one) is refused with a ``ConfigError``:
    unpickling arbitrary objects can run code. The file is left as it is.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: refusing to load it: it needs full unpickling, which can run code (an older "
                          f"rankwise wrote checkpoints that way); move it away to start the run over "
                          f"({str(e).splitlines()[0][:120]})") from None
