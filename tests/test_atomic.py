"""Atomic writes: a failed write leaves the old file and no temporary behind."""
import os

import pytest

from rankwise.atomic import atomic_write, atomic_write_text


def test_atomic_write_replaces_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    atomic_write_text(path, "one")
    assert path.read_text() == "one"

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "one"
    assert os.listdir(path.parent) == ["f.txt"]
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["f.txt"]
