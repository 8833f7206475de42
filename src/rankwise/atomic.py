"""Atomic file writes: write a temporary file in the target's directory, flush
it to disk, then ``os.replace`` it over the target, so a reader (or a resumed
run after a crash) sees either the old file or the new one, never half of one.
``replace_dir`` does the same for a whole directory, as far as renames allow.

Files and directories get the usual permissions (0666 / 0777 less the umask),
not the 0600 / 0700 of ``tempfile``. ``reporting_write_errors`` turns a failed
write (a full disk, a lost permission) into one ``ConfigError`` line naming the
path and the free space there."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from typing import Callable

from .errors import ConfigError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        os.chmod(tmp, 0o666 & ~_umask())
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
    A symbolic link at ``path`` (dangling or not) is replaced by the new
    directory; what it pointed to is never touched.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.dirname(path), os.path.basename(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-")
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.islink(path):  # a link (dangling or not) is replaced, never written through or followed
        os.unlink(path)  # rename(2) will not put a directory over a link
        os.rename(tmp, path)
        return
    old = None
    if os.path.lexists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f".old-{name}-")
        os.rmdir(old)
        os.rename(path, old)
    os.rename(tmp, path)
    if old is not None:
        remove_path(old)


def remove_path(path) -> None:
    """Remove ``path``: a link (to anything) is unlinked, never followed; a directory is removed whole."""
    path = os.fspath(path)
    if os.path.islink(path) or not os.path.isdir(path):
        if os.path.lexists(path):
            os.unlink(path)
        return
    shutil.rmtree(path, ignore_errors=True)


def file_sha256(path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def free_space(path) -> str:
    """``"1.2 GiB free"``: the free space of the file system holding ``path`` (or its nearest existing parent)."""
    probe = os.path.abspath(os.fspath(path))
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "free space unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
        free /= 1024
    return "free space unknown"  # not reached


@contextlib.contextmanager
def reporting_write_errors(path, what: str, kept: str = ""):
    """Turn an ``OSError`` raised inside the block (``ENOSPC``, ``EDQUOT``, ``EACCES``, ...) into one
    ``ConfigError`` line: ``cannot write {what} {path}: {reason} ({free space} there){kept}``."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise ConfigError(f"cannot write {what} {os.fspath(path)}: {reason} ({free_space(path)} there){kept}") \
            from None
