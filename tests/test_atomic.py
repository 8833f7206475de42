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


def test_a_failed_write_is_one_line_naming_the_path_and_the_free_space(tmp_path):
    import errno

    from rankwise.atomic import free_space, reporting_write_errors
    from rankwise.errors import ConfigError

    path = tmp_path / "out" / "summary.json"
    with pytest.raises(ConfigError) as e:
        with reporting_write_errors(path, "the summary", "; the old one is kept"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    assert str(e.value) == f"cannot write the summary {path}: No space left on device ({free_space(path)} there); " \
                           f"the old one is kept"
    assert free_space(path).endswith(" free") and free_space(path)[0].isdigit()


def test_replace_dir_replaces_a_link_and_never_touches_its_target(tmp_path):
    from rankwise.atomic import replace_dir

    target = tmp_path / "base"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"base weights")
    os.symlink(target, tmp_path / "adapter")
    replace_dir(tmp_path / "adapter", lambda tmp: (open(os.path.join(tmp, "adapter.bin"), "wb").write(b"new")))
    assert not os.path.islink(tmp_path / "adapter") and os.listdir(tmp_path / "adapter") == ["adapter.bin"]
    assert os.listdir(target) == ["weights.bin"] and (target / "weights.bin").read_bytes() == b"base weights"
