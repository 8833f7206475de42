"""What rankwise may write: directories it created, or that carry its marker file.

Every command that writes (``train``, ``sweep``, ``merge``, ``restore``, ``analyze``,
``demo``) checks its output path here before any work starts:

- the output must not be, lie inside, or contain any input the command reads
  (base model, run, adapter, tokenizer, data file): refused even with ``--force``;
- it must not be a file, or lie under a file, or be a symbolic link (its parents may be);
- an existing, non-empty directory is written to (or replaced) only if rankwise
  owns it, that is it holds the marker ``.rankwise-run.json`` written when rankwise
  created it; anything else needs ``--force``;
- a symbolic link among the entries a command writes in it (``check_links``) may not
  lead into an input (refused even with ``--force``); the writers replace such links,
  never write through them.

``claim`` creates the directory, marks it and, for a run, takes its lock
(``rankwise.runlock``); the returned ``Claim`` knows what it created, so a run that
fails before it started writing can remove exactly that (``Claim.undo``).

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
from .atomic import atomic_write_text, remove_path
from .errors import ConfigError
from .runlock import LOCK_FILE, RunLock

MARKER = ".rankwise-run.json"


def _real(path) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def owner(path) -> Optional[dict]:
    """The marker of a rankwise-owned directory (its ``kind`` and more), or None."""
    marker = os.path.join(os.fspath(path), MARKER)
    if os.path.islink(marker) or not os.path.isfile(marker):
        return None
    try:
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def overlap(out, inputs: Iterable):
    """``(relation, description, input path)`` of the first input that ``out`` is (``"is"``), lies inside
    (``"lies inside"``) or contains (``"contains"``), symbolic links resolved; None when it overlaps none
    (local paths only; hub ids and missing paths are skipped)."""
    o = _real(out)
    for item in inputs:
        if item is None:
            continue
        what, path = item if isinstance(item, tuple) else ("input", item)
        if path is None or not os.path.exists(os.fspath(path)):
            continue
        i = _real(path)
        if o == i:
            return "is", what, path
        if _inside(o, i):
            return "lies inside", what, path
        if _inside(i, o):
            return "contains", what, path
    return None


def check_disjoint(out, inputs: Iterable, flag: str = "output") -> None:
    """Refuse an output equal to, inside, or containing an input (local paths only; hub ids are skipped)."""
    found = overlap(out, inputs)
    if found is None:
        return
    relation, what, path = found
    fix = {"is": "choose another directory", "lies inside": "choose a directory outside it",
           "contains": "choose a directory that does not"}[relation]
    raise ConfigError(f"{flag} {out} {relation} the {what} ({path}); {fix}")


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
    if os.path.isdir(path) and set(os.listdir(path)) - {LOCK_FILE}:  # a lock file alone: a run that died at once
        info = owner(path)
        if info is None and not force:
            raise ConfigError(f"{flag} {path} exists and was not made by rankwise (no {MARKER}); "
                              "pass --force to write into it, or choose another directory")
        if info is not None and kinds is not None and info.get("kind") not in set(kinds) and not force:
            raise ConfigError(f"{flag} {path} holds a rankwise {info.get('kind')!r} output, not a "
                              f"{'/'.join(sorted(kinds))} one; pass --force to replace it, or choose another directory")


def check_output_file(out, *, force: bool = False, inputs: Iterable = (), flag: str = "--out") -> None:
    """Check, before any work, that rankwise may write the file ``out``: not an input (nor inside or around
    one), not a symbolic link, not a directory, not under a file, in a writable directory, and not an
    existing file unless ``force``. Raises ``ConfigError`` naming the problem; changes nothing."""
    out = os.fspath(out)
    if not out:
        raise ConfigError(f"{flag} must name a file")
    check_disjoint(out, inputs, flag)
    if os.path.islink(out):
        raise ConfigError(f"{flag} {out} is a symbolic link; rankwise does not write through links, "
                          f"remove it or choose another file")
    if os.path.isdir(out):
        raise ConfigError(f"{flag} {out} is a directory; give a file name")
    probe = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"{flag} {out} lies under the file {probe}; choose a file in a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: {probe} is not writable")
    if os.path.exists(out) and not force:
        raise ConfigError(f"{flag} {out} exists; pass --force to replace it, or choose another file")


def marker_text(kind: str) -> str:
    return json.dumps({"kind": kind, "rankwise": __version__,
                       "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2) + "\n"


def write_marker(directory, kind: str) -> None:
    """Mark ``directory`` as rankwise's (kept if already there)."""
    if owner(directory) is None:
        atomic_write_text(os.path.join(os.fspath(directory), MARKER), marker_text(kind))


def check_links(out, names: Iterable[str], inputs: Iterable = (), flag: str = "output") -> None:
    """Refuse a symbolic link among the entries ``names`` of ``out`` that leads into, onto or around an input.

    A command writes (or replaces) these entries; written through, such a link would
    put the output into the base model or the data. Refused even with ``--force``;
    links elsewhere are left to the writers, which replace them (``atomic``). Changes nothing.
    """
    inputs = list(inputs)
    for name in names:
        entry = os.path.join(os.fspath(out), name)
        found = overlap(entry, inputs) if os.path.islink(entry) else None
        if found is not None:
            relation, what, path = found
            raise ConfigError(f"{flag} {out}: its entry {name} is a symbolic link to {os.readlink(entry)}, which "
                              f"{relation} the {what} ({path}); rankwise would write through it: remove the link "
                              f"(refused even with --force)")


class Claim:
    """An output directory ``claim`` made ready: what it created, and the run's lock (if it took one)."""

    def __init__(self, out, created: list, marker: Optional[str], lock: Optional[RunLock]):
        self.out, self.created, self.marker, self.lock = os.fspath(out), created, marker, lock
        self.committed = False

    def commit(self) -> None:
        """The run started writing its files: from now on what the claim created stays."""
        self.committed = True

    def undo(self) -> None:
        """Remove what the claim created (the directories it made, else the marker it wrote), never anything
        that was there before; then release the lock. Nothing once committed."""
        if not self.committed:
            if self.created:
                remove_path(self.created[0])  # the topmost directory this claim made, with all in it
            elif self.marker is not None and os.path.isfile(self.marker) and not os.path.islink(self.marker):
                os.unlink(self.marker)
        self.release()

    def release(self) -> None:
        """Release the lock (the run ended, however)."""
        if self.lock is not None:
            self.lock.release()


def claim(out, kind: str, lock: bool = False, flag: str = "output_dir") -> Claim:
    """Create ``out`` (with its parents) and mark it as rankwise's; call after :func:`check_output`.

    With ``lock``, take the run's lock (``rankwise.runlock``) before writing the
    marker: a second run on ``out`` is refused in one line naming the holder. Returns
    the ``Claim`` (what was created, the lock); a refused lock leaves everything as it was.
    """
    out = os.fspath(out)
    missing, probe = [], os.path.abspath(out)
    while not os.path.lexists(probe) and os.path.dirname(probe) != probe:
        missing.append(probe)
        probe = os.path.dirname(probe)
    created = []
    try:
        for d in reversed(missing):  # top down; a directory another process made meanwhile is not ours
            try:
                os.mkdir(d)
                created.append(d)
            except FileExistsError:
                pass
        run_lock = RunLock(out, flag).acquire() if lock else None
    except OSError as e:
        raise ConfigError(f"cannot create {out}: {e.strerror or e}") from None
    marker = None
    try:
        if owner(out) is None:
            marker = os.path.join(out, MARKER)
            write_marker(out, kind)
    except OSError as e:
        Claim(out, created, marker, run_lock).undo()
        raise ConfigError(f"cannot create {out}: {e.strerror or e}") from None
    return Claim(out, created, marker, run_lock)
