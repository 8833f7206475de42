"""Training checkpoints and output directories: one dict on disk, written atomically.

A checkpoint is one ``torch.save``'d dict with everything a resumed run needs
(trainable weights, optimizer, scaler, RNG states, step, config, ...); it is
written to a temporary file beside ``checkpoint.pt`` and renamed over it. The
RNG states are stored as tensors and plain Python values only, so the file
loads with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

``replace_dir`` gives a directory (``model/``) the strongest guarantee a
directory rename allows; see its docstring.
"""
from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import tempfile

import torch

from .atomic import atomic_write

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

    Checkpoints written before the RNG states were stored as tensors pickle a
    numpy array; those are loaded with ``weights_only=False`` after a warning
    (they were written by this user's own earlier run in this output_dir).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.warning("%s was written by an older rankwise (a pickled numpy RNG state); loading it with "
                    "weights_only=False", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def replace_dir(path, write) -> None:
    """Produce the directory ``path`` with ``write(tmp_dir)``, replacing any old one as atomically as POSIX allows.

    ``write`` fills a fresh temporary directory beside ``path`` (same file
    system). Then the old ``path`` (if any) is renamed aside, the new one renamed
    into place, and the old one deleted. Guarantee: at every instant ``path`` is
    either absent or a complete directory (the old one or the new one), never a
    half-written one; if ``write`` fails, the old directory is untouched. A crash
    between the two renames leaves ``path`` absent with the old copy kept as
    ``.old-*`` beside it (directories cannot be swapped in one rename on Linux
    without ``renameat2(RENAME_EXCHANGE)``, which Python does not expose).
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.dirname(path), os.path.basename(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-")
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f".old-{name}-")
        os.rmdir(old)
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
