"""One run per output directory: an exclusive lock held for the run's lifetime.

``RunLock(directory).acquire()`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the
file ``.rankwise-lock`` in ``directory`` and writes this process's pid into it;
a second process gets a one-line ``ConfigError`` naming the holder's pid. The
kernel drops the lock when its holder exits, however it ends, so a killed run
never leaves a directory locked; ``release()`` removes the file (while still
holding the lock), so a directory holds it only while a run uses it.

The file is opened with ``O_NOFOLLOW`` (a symbolic link in its place is refused,
never written through), and after the lock is taken the path must still name the
file that was locked (the usual check against a holder removing it meanwhile).
"""
from __future__ import annotations

import errno
import fcntl
import os

from .errors import ConfigError

LOCK_FILE = ".rankwise-lock"


def holder(path) -> str:
    """The pid recorded in the lock file ``path`` ("an unknown pid" when it cannot be read)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(32).strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return f"pid {text}" if text.isdigit() else "an unknown pid"


class RunLock:
    """The exclusive lock of one output directory (see the module docstring).

    Args:
        directory: the output directory (it must exist).
        flag: how the user named it (``output_dir``, ``--out``), for the message.
    """

    def __init__(self, directory, flag: str = "output_dir"):
        self.directory, self.flag = os.fspath(directory), flag
        self.path = os.path.join(self.directory, LOCK_FILE)
        self.fd = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.path, flags, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConfigError(f"{self.flag} {self.directory}: {self.path} is a symbolic link; rankwise never "
                                  f"writes through one: remove it") from None
            raise ConfigError(f"{self.flag} {self.directory}: cannot open its lock file {self.path}: "
                              f"{e.strerror or e}") from None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise a one-line ``ConfigError`` naming the pid of the run that holds it."""
        for _ in range(100):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(f"{self.flag} {self.directory} is in use by another rankwise run ({holder(self.path)}"
                                  f"; lock file {self.path}); wait for it to end, or choose another "
                                  f"{self.flag}") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file as we opened it: take the lock on the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return self
        raise ConfigError(f"{self.flag} {self.directory}: could not take the lock {self.path}")

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing when not held)."""
        if self.fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self.fd), os.lstat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
