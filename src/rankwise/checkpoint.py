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
deleted; so is a checkpoint that cannot be read, with one line naming the file,
and one whose step, RNG states or log window a run could not continue from
(``check_step``, ``check_rng``, ``check_log_window``). A save that fails (a full
disk) is one line naming the path and the free space; the old checkpoint stays.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import config as C
from .atomic import replace_dir, reporting_write_errors
from .errors import ConfigError, one_line
from .masking import pack_mask


CHECKPOINT_DIR = "checkpoint"
LEGACY_CHECKPOINT = "checkpoint.pt"
TENSORS = "tensors.safetensors"
STATE = "state.json"
FORMAT = 2  # 1: a train run's state at the top level (before one format for one arm and K)
FIX = "move it away to start the run over"
# what a run's checkpoint must hold to be continued, and each of its arms
RUN_KEYS = ("step", "total_steps", "settings_hash", "settings", "rng", "arms")
ARM_KEYS = ("trainable", "optimizer", "log_window")

log = logging.getLogger("rankwise")
_TAGS = ("__tensor__", "__tuple__", "__items__", "__float__")


# ----------------------------------------------------------------------------- RNG states

def rng_state(device) -> dict:
    """torch (CPU and, on CUDA, ``device``), Python and numpy RNG states: tensors and plain numbers only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    """Undo ``rng_state``."""
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
    tensors: dict = {}
    data = {"format": FORMAT, **split_state(state, tensors)}
    text = json.dumps(data, indent=1)

    def write(tmp):
        save_file(tensors, os.path.join(tmp, TENSORS))
        with open(os.path.join(tmp, STATE), "w", encoding="utf-8") as f:
            f.write(text)

    kept = "; the previous checkpoint there is kept" if os.path.isdir(path) else ""
    with reporting_write_errors(path, "the checkpoint", kept + "; free some space, then --resume"):
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
    path = os.fspath(path)
    fix = FIX
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
        raise ConfigError(f"cannot read checkpoint {state_file}: {one_line(e, 200)}; {fix}") from None
    if isinstance(data, dict) and data.get("format") == 1:
        raise ConfigError(f"cannot read checkpoint {state_file}: it is a checkpoint of an older rankwise (format 1, "
                          f"expected {FORMAT}); {fix}")
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
        raise ConfigError(f"cannot read checkpoint {tensor_file}: {one_line(e, 200)}; {fix}") from None
    try:
        state = join_state(data, tensors)
    except KeyError as e:
        raise ConfigError(f"cannot read checkpoint {tensor_file}: it lacks the tensor {e.args[0]!r} that "
                          f"{STATE} names; {fix}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"cannot read checkpoint {state_file}: malformed ({one_line(e, 200)}); {fix}") from None
    state.pop("format")
    return state


# ----------------------------------------------------------------------------- the state of a run's arms

def run_state(step: int, total_steps: int, arms: list, device) -> dict:
    """Everything a resumed run of ``arms`` (``fit.Arm``: one for ``rankwise train``, K for a together run)
    needs, as one dict of tensors and plain values for ``save_checkpoint``:
    ``{step, total_steps, settings_hash, settings: {"arms": [...]}, rng, arms: [...]}``, each arm's part holding
    its trainable weights, optimizer and fp16 scaler states, masked-SFT mask, PiSSA start, dropout generator,
    log window, last metrics row, status and config."""
    settings = {"arms": [a.settings for a in arms]}
    return {"step": step, "total_steps": total_steps, "settings_hash": C.settings_hash(settings),
            "settings": settings, "rng": rng_state(device), "arms": [arm_state(a) for a in arms]}


def arm_state(arm) -> dict:
    """One arm's part of ``run_state``."""
    tr = arm.trainable
    return {"trainable": {n: p.detach().to("cpu", copy=True) for n, p in tr.named},
            "optimizer": arm.optimizer.state_dict(),
            "scaler": arm.scaler.state_dict() if arm.scaler is not None else None,
            "mask": {n: m.cpu() for (n, _), m in zip(tr.named, tr.masks)} if tr.masks is not None else None,
            "pissa_init": tr.pissa_init,
            "generator": arm.generator.get_state() if arm.generator is not None else None,
            "log_window": arm.window.clone(),  # loss / token sums since the last metrics row
            "last": arm.last, "failed": arm.failed, "config": arm.cfg.to_dict(),
            "early_stop": {"stopped": arm.stopped, "best": arm.best, "bad_evals": arm.bad_evals,
                           "last_eval": arm.last_eval}}


def load_run_checkpoint(path) -> dict:
    """``load_checkpoint`` of a run's checkpoint, checked before any model loads: its keys (``RUN_KEYS``, and
    ``ARM_KEYS`` in every arm), a step in ``[0, total_steps)``, RNG states and log windows a run can continue
    from, trainable weights as a mapping."""
    ckpt = load_checkpoint(path, required=RUN_KEYS)
    check_step(ckpt, path)
    check_rng(ckpt["rng"], path)
    where = f"cannot read checkpoint {os.path.join(os.fspath(path), STATE)}"
    arms = ckpt["arms"]
    if not isinstance(arms, list) or not arms or not all(isinstance(a, dict) for a in arms):
        raise ConfigError(f"{where}: its arms are not a list of mappings; {FIX}")
    for k, arm in enumerate(arms):
        of = "" if len(arms) == 1 else f"arm {k}'s "
        missing = [key for key in ARM_KEYS if key not in arm]
        if missing:
            raise ConfigError(f"{where}: it lacks {of}{', '.join(missing)}; {FIX}")
        check_log_window(arm["log_window"], path, f"{of}log_window")
        if not isinstance(arm["trainable"], dict):
            raise ConfigError(f"{where}: its {of}trainable weights are not a mapping; {FIX}")
    settings = ckpt["settings"].get("arms") if isinstance(ckpt["settings"], dict) else None
    if not isinstance(settings, list) or len(settings) != len(arms) or not all(isinstance(s, dict) for s in settings):
        raise ConfigError(f"{where}: its settings are not one mapping per arm; {FIX}")
    return ckpt


def check_settings(ckpt: dict, arm_settings: list, names: list, path) -> None:
    """``--resume`` continues the same run: the checkpoint must hold these arms with these settings
    (``config.NOT_SETTINGS`` aside); else one line naming the keys that differ."""
    old = ckpt["settings"]["arms"]
    if len(old) != len(arm_settings):
        raise ConfigError(f"--resume: the checkpoint {path} holds {len(old)} arms, this run has {len(arm_settings)}; "
                          f"choose another checkpoint directory for these arms")
    for name, o, now in zip(names, old, arm_settings):
        if not C.changed_settings(o, now):
            continue
        if len(names) == 1:
            raise ConfigError(f"--resume: settings changed since the checkpoint {path}: "
                              f"{C.describe_changes(o, now)}; put them back to resume, or choose another "
                              f"output_dir for a new run")
        raise ConfigError(f"--resume: the settings of the arm {name} changed since the checkpoint {path}: "
                          f"{C.describe_changes(o, now)}")
    if ckpt["settings_hash"] != C.settings_hash({"arms": arm_settings}):
        raise ConfigError(f"--resume: settings changed since the checkpoint {path}: the settings hash; put them "
                          f"back to resume, or choose another output_dir for a new run")


#: an optimizer's group keys that say how this run steps, not what it learned: kept over the checkpoint's
#: (a run captured as a CUDA graph saves a device tensor lr and capturable=True; a resumed run may not be)
OWN_GROUP_KEYS = ("lr", "fused", "foreach", "capturable")


def restore_arm(saved: dict, arm, where: str, master: bool) -> None:
    """Load one arm's weights, optimizer, mask, scaler, generator, log window, last row and status."""
    tr, weights = arm.trainable, saved["trainable"]
    for n, p in tr.named:
        if n not in weights or not isinstance(weights[n], torch.Tensor) or weights[n].shape != p.shape:
            got = "is missing" if n not in weights else f"has shape {tuple(getattr(weights[n], 'shape', ()))}"
            raise ConfigError(f"--resume: {where} does not match this model: {n} {got}")
    with torch.no_grad():
        for n, p in tr.named:
            p.copy_(weights[n])
    own = [{k: g[k] for k in OWN_GROUP_KEYS if k in g} for g in arm.optimizer.param_groups]
    try:
        arm.optimizer.load_state_dict(saved["optimizer"])
        for group, keep in zip(arm.optimizer.param_groups, own):  # how this run steps (a CUDA graph's or not)
            group.update(keep)
        if arm.scaler is not None and saved.get("scaler"):
            arm.scaler.load_state_dict(saved["scaler"])
        if arm.generator is not None:
            arm.generator.set_state(saved["generator"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"--resume: {where} holds an optimizer, scaler or generator state this run cannot take: "
                          f"{one_line(e, 200)}") from None
    if tr.masks is not None:  # torch's load_state_dict casts every state tensor, the packed masks too
        for p, m in zip(tr.params, tr.masks):
            arm.optimizer.state[p]["mask"] = pack_mask(m)
    tr.pissa_init = saved.get("pissa_init") or tr.pissa_init
    arm.window = saved["log_window"].clone()
    arm.last = dict(saved.get("last") or {})
    if saved.get("failed"):
        arm.stop(str(saved["failed"]))
    early = saved.get("early_stop") or {}
    arm.best, arm.bad_evals = early.get("best"), int(early.get("bad_evals") or 0)
    arm.last_eval = dict(early.get("last_eval") or {})
    if early.get("stopped"):
        arm.stopped = int(early["stopped"])
        arm.freeze()
    now, then = C.flatten(arm.cfg.to_dict()), C.flatten(saved.get("config") or {})
    changed = sorted(k for k, v in now.items() if k in then and then[k] != v)  # NOT_SETTINGS keys only
    if changed and master:
        log.info("--resume: keys changed since the checkpoint (they do not change the result): %s", ", ".join(changed))


def restore_run_state(ckpt: dict, arms: list, device, total_steps: int, path, master: bool = True) -> int:
    """Load every arm's state from ``ckpt`` (``load_run_checkpoint``, settings checked by ``check_settings``)
    and the RNG states; returns the step to continue from."""
    where = f"the checkpoint {path}"
    if ckpt.get("total_steps") != total_steps:
        raise ConfigError(f"--resume: {where} was made for {ckpt.get('total_steps')} steps, "
                          f"the config now gives {total_steps}")
    if len(ckpt["arms"]) != len(arms):
        raise ConfigError(f"--resume: {where} holds {len(ckpt['arms'])} arms, this run has {len(arms)}")
    for saved, arm in zip(ckpt["arms"], arms):
        restore_arm(saved, arm, where, master)
    set_rng_state(ckpt["rng"], device)
    return ckpt["step"]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_step(state: dict, path) -> int:
    """The step of the loaded checkpoint ``path``: an integer in ``[0, total_steps)`` of an integer
    ``total_steps >= 1`` (a run can continue from it); anything else is one ``ConfigError`` line."""
    where = f"cannot read checkpoint {os.path.join(os.fspath(path), STATE)}"
    step, total = state.get("step"), state.get("total_steps")
    if not _is_int(total) or total < 1:
        raise ConfigError(f"{where}: its total_steps {total!r} is not a positive integer; {FIX}")
    if not _is_int(step):
        raise ConfigError(f"{where}: its step {step!r} is not an integer; {FIX}")
    if not 0 <= step < total:
        raise ConfigError(f"{where}: its step {step} lies outside [0, {total}), the steps of its run; {FIX}")
    return step


def check_rng(rng, path) -> None:
    """The RNG states of the loaded checkpoint ``path`` must be ones ``set_rng_state`` takes (tried on, then the
    generators are put back as they were); else one ``ConfigError`` line."""
    device = torch.device("cuda", torch.cuda.current_device()) if isinstance(rng, dict) and "cuda" in rng \
        and torch.cuda.is_available() else torch.device("cpu")
    now = rng_state(device)
    try:
        if not isinstance(rng, dict):
            raise TypeError(f"a {type(rng).__name__}, not a mapping")
        set_rng_state(rng, device)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise ConfigError(f"cannot read checkpoint {os.path.join(os.fspath(path), STATE)}: its rng states are "
                          f"malformed ({one_line(e, 200)}); {FIX}") from None
    finally:
        set_rng_state(now, device)


def check_log_window(window, path, what: str = "log_window") -> None:
    """A log window of the loaded checkpoint ``path``: 3 float64 sums (loss, target tokens, tokens)."""
    if not (isinstance(window, torch.Tensor) and window.shape == (3,) and window.dtype == torch.float64):
        shown = f"a tensor of shape {tuple(window.shape)} and {window.dtype}" if isinstance(window, torch.Tensor) \
            else repr(window)[:60]
        raise ConfigError(f"cannot read checkpoint {os.path.join(os.fspath(path), STATE)}: its {what} is {shown}, "
                          f"not 3 float64 sums; {FIX}")
