"""Atomic file writes: write a temporary file in the target's directory, flush
it to disk, then ``os.replace`` it over the target, so a reader (or a resumed
run after a crash) sees either the old file or the new one, never half of one."""
from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(path, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)`` to produce the file, then move it to ``path``.

    The temporary file lives in ``path``'s directory (created if missing) and is
    removed if ``writer`` fails.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
