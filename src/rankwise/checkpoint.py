"""Training checkpoints: tensors in safetensors, everything else in JSON; nothing unpickles.

A checkpoint is a directory ``checkpoint/`` holding two files:

- ``tensors.safetensors``: every tensor of the state (trainable weights,
  optimizer state tensors, masks, RNG states, the log window, ...), each under
  the path of its place in the state (``optimizer/state/0/exp_avg``);
- ``state.json``: the rest of the state, with each tensor replaced by
  ``{"__tensor__": name}``, tuples by ``{"__tuple__": [...]}`` and mappings with
  non-string keys (the optimizer's ``{param index: state}``) by
  ``{"__items__": [[key, value], ...]}``. Python and numpy RNG states are plain
  numbers here.

It is written with ``atomic.replace_dir``, so ``checkpoint/`` is always the old
checkpoint or the new one, never half of one. Loading uses only
``safetensors.torch.load_file`` and ``json``: no file can run code. A
``checkpoint.pt`` of an older rankwise (a pickle) is refused, never loaded or
deleted; so is a checkpoint that cannot be read, with one line naming the file.
"""
from __future__ import annotations

import json
import math
import os
import random

import torch

from .atomic import replace_dir
from .errors import ConfigError


CHECKPOINT_DIR = "checkpoint"
LEGACY_CHECKPOINT = "checkpoint.pt"
TENSORS = "tensors.safetensors"
STATE = "state.json"
FORMAT = 1
_TAGS = ("__tensor__", "__tuple__", "__items__", "__float__")


# ----------------------------------------------------------------------------- RNG states

def rng_state(device) -> dict:
    """torch (CPU and, on CUDA, ``device``), Python and numpy RNG states: tensors and plain numbers only."""
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
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy().astype(np.uint32) if isinstance(keys, torch.Tensor) else np.asarray(keys, dtype=np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ----------------------------------------------------------------------------- state <-> (tensors, JSON)

def split_state(obj, tensors: dict, path: str = ""):
    """``obj`` as JSON-able data; its tensors go to ``tensors`` under their path (CPU, contiguous copies)."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu", copy=True).contiguous()  # copies: safetensors refuses shared storage
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: split_state(v, tensors, f"{path}/{k}" if path else k) for k, v in obj.items()}
        return {"__items__": [[split_state(k, {}, ""), split_state(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [split_state(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    raise TypeError(f"checkpoint: cannot store {type(obj).__name__} at {path!r} (tensors and plain values only)")


def join_state(data, tensors: dict):
    """Undo ``split_state``; a tensor name missing from ``tensors`` raises ``KeyError``."""
    if isinstance(data, list):
        return [join_state(v, tensors) for v in data]
    if isinstance(data, dict):
        if data.keys() == {"__tensor__"}:
            return tensors[data["__tensor__"]]
        if data.keys() == {"__tuple__"}:
            return tuple(join_state(v, tensors) for v in data["__tuple__"])
        if data.keys() == {"__items__"}:
            return {join_state(k, tensors): join_state(v, tensors) for k, v in data["__items__"]}
        if data.keys() == {"__float__"}:
            return float(data["__float__"])
        return {k: join_state(v, tensors) for k, v in data.items()}
    return data


# ----------------------------------------------------------------------------- save and load

def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` as the checkpoint directory ``path`` (replaced whole, see ``atomic.replace_dir``)."""
    from safetensors.torch import save_file

    tensors: dict = {}
    data = {"format": FORMAT, **split_state(state, tensors)}
    text = json.dumps(data, indent=1)

    def write(tmp):
        save_file(tensors, os.path.join(tmp, TENSORS))
        with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as f:
            f.write(text)

    replace_dir(path, write)


def refuse_legacy(path) -> None:
    """Refuse an older rankwise's ``checkpoint.pt``: a pickle, and unpickling can run code. Nothing is touched."""
    raise ConfigError(f"{path}: refusing to load it: it is a pickle checkpoint of an older rankwise, and loading "
                      f"a pickle can run code (it needs full unpickling); move it away and start the run over, or "
                      f"choose another output_dir")


def load_checkpoint(path, required=("step", "total_steps", "settings_hash", "settings")) -> dict:
    """Read the checkpoint directory ``path`` (``json`` and ``safetensors`` only) into the state dict.

    Every problem (missing or unreadable file, bad JSON, a missing key or tensor)
    is a ``ConfigError`` naming the file; the checkpoint is left as it is.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    fix = "move it away to start the run over"
    if os.path.basename(path.rstrip(os.sep)) == LEGACY_CHECKPOINT or os.path.isfile(path):
        if path.endswith(".pt"):
            refuse_legacy(path)
        raise ConfigError(f"checkpoint {path} is a file, not a checkpoint directory; {fix}")
    state_file, tensor_file = os.path.join(path, STATE), os.path.join(path, TENSORS)
    try:
        with open(state_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} is incomplete: {state_file} is missing; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"cannot read checkpoint {state_file}: {_one_line(e)}; {fix}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"cannot read checkpoint {state_file}: not a rankwise checkpoint (format "
                          f"{data.get('format') if isinstance(data, dict) else None!r}, expected {FORMAT}); {fix}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"cannot read checkpoint {state_file}: it lacks {', '.join(missing)}; {fix}")
    try:
        tensors = load_file(tensor_file)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} is incomplete: {tensor_file} is missing; {fix}") from None
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"cannot read checkpoint {tensor_file}: {_one_line(e)}; {fix}") from None
    try:
        state = join_state(data, tensors)
    except KeyError as e:
        raise ConfigError(f"cannot read checkpoint {tensor_file}: it lacks the tensor {e.args[0]!r} that "
                          f"{STATE} names; {fix}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"cannot read checkpoint {state_file}: malformed ({_one_line(e)}); {fix}") from None
    state.pop("format")
    return state


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__
