"""What rankwise may write: directories it created, or that carry its marker file.

Every command that writes (``train``, ``sweep``, ``merge``, ``restore``, ``analyze``,
``demo``) checks its output path here before any work starts:

- the output must not be, lie inside, or contain any input the command reads
  (base model, run, adapter, tokenizer, data file): refused even with ``--force``;
- it must not be a file, or lie under a file, or be a symbolic link (its parents may be);
- an existing, non-empty directory is written to (or replaced) only if rankwise
  owns it, that is it holds the marker ``.rankwise-run.json`` written when rankwise
  created it; anything else needs ``--force``.

The marker is a small JSON file naming what made the directory (``{"kind":
"train", "rankwise": "0.1.0", "created": ...}``). Every error is a
``ConfigError``: one line, nothing touched.
"""
from __future__ import annotations

import json
import os
import time
from typing import Iterable, Optional

from . import __version__
from .atomic import atomic_write_text
from .errors import ConfigError

MARKER = ".rankwise-run.json"


def _real(path) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def owner(path) -> Optional[dict]:
    """The marker of a rankwise-owned directory (its ``kind`` and more), or None."""
    marker = os.path.join(os.fspath(path), MARKER)
    if not os.path.isfile(marker):
        return None
    try:
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def check_disjoint(out, inputs: Iterable, flag: str = "output") -> None:
    """Refuse an output equal to, inside, or containing an input (local paths only; hub ids are skipped)."""
    o = _real(out)
    for item in inputs:
        if item is None:
            continue
        what, path = item if isinstance(item, tuple) else ("input", item)
        if path is None or not os.path.exists(os.fspath(path)):
            continue
        i = _real(path)
        if o == i:
            raise ConfigError(f"{flag} {out} is the {what} ({path}); choose another directory")
        if _inside(o, i):
            raise ConfigError(f"{flag} {out} lies inside the {what} ({path}); choose a directory outside it")
        if _inside(i, o):
            raise ConfigError(f"{flag} {out} contains the {what} ({path}); choose a directory that does not")


def check_output(out, *, force: bool = False, inputs: Iterable = (), flag: str = "output",
                 kinds: Optional[Iterable[str]] = None) -> None:
    """Check, before any work, that rankwise may write the directory ``out``.

    Args:
        out: the output directory (it may not exist yet).
        force: allow writing into (or replacing) an existing non-empty directory rankwise does not own.
        inputs: paths the command reads, or ``(description, path)`` pairs naming them in the message.
        flag: how the user named the output (``--out``, ``output_dir``), for the message.
        kinds: marker kinds this command may reuse (None: any rankwise-owned directory).

    Raises ``ConfigError`` naming the problem; changes nothing.
    """
    path = os.fspath(out)
    check_disjoint(path, inputs, flag)
    if os.path.islink(path):  # written through, a link would send the output somewhere the user did not name
        raise ConfigError(f"{flag} {path} is a symbolic link (to {os.readlink(path)}); "
                          "name a real directory, or remove the link")
    probe = os.path.abspath(path)
    while True:  # the path, or the first ancestor that exists, must be a directory
        if os.path.exists(probe):
            if not os.path.isdir(probe):
                where = "is a file" if probe == os.path.abspath(path) else f"lies under the file {probe}"
                raise ConfigError(f"{flag} {path} {where}; choose a directory")
            break
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {probe} is not writable")
    if os.path.isdir(path) and os.listdir(path):
        info = owner(path)
        if info is None and not force:
            raise ConfigError(f"{flag} {path} exists and was not made by rankwise (no {MARKER}); "
                              "pass --force to write into it, or choose another directory")
        if info is not None and kinds is not None and info.get("kind") not in set(kinds) and not force:
            raise ConfigError(f"{flag} {path} holds a rankwise {info.get('kind')!r} output, not a "
                              f"{'/'.join(sorted(kinds))} one; pass --force to replace it, or choose another directory")


def marker_text(kind: str) -> str:
    return json.dumps({"kind": kind, "rankwise": __version__,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n"


def write_marker(directory, kind: str) -> None:
    """Mark ``directory`` as rankwise's (kept if already there)."""
    if owner(directory) is None:
        atomic_write_text(os.path.join(os.fspath(directory), MARKER), marker_text(kind))


def claim(out, kind: str) -> None:
    """Create ``out`` (with its parents) and mark it as rankwise's; call after :func:`check_output`."""
    try:
        os.makedirs(out, exist_ok=True)
        write_marker(out, kind)
    except OSError as e:
        raise ConfigError(f"cannot create {out}: {e.strerror or e}") from None
