"""``rankwise init [--out FILE] [--force]``: write the commented default config to start from.

The file is ``examples/lora.yaml`` of the repository, which the wheel ships as
``rankwise.examples`` (so an installed rankwise has it without a checkout): every
config key with its default and a comment saying what it does. Edit ``model``,
``data.*`` and ``output_dir``, then ``rankwise train FILE``.

``--out`` (default ``rankwise.yaml``) is written atomically. An existing file is
replaced only with ``--force``; a directory, a symbolic link (dangling or not:
rankwise never writes through one) or a path under a file is refused in one line.
"""
from __future__ import annotations

import os
from importlib import resources

from .atomic import atomic_write_text
from .errors import ConfigError

DEFAULT_OUT = "rankwise.yaml"
EXAMPLE = "lora.yaml"


def example_text(name: str = EXAMPLE) -> str:
    """The text of the shipped example config ``name`` (a file of ``rankwise.examples``)."""
    return resources.files("rankwise.examples").joinpath(name).read_text(encoding="utf-8")


def check_out(out: str, force: bool = False) -> None:
    """Refuse, before writing, an ``out`` that is a link, a directory, under a file, unwritable, or (without
    ``force``) an existing file."""
    if not out:
        raise ConfigError("--out must name a file")
    if os.path.islink(out):
        raise ConfigError(f"--out {out} is a symbolic link; rankwise does not write through links, "
                          f"remove it or choose another file")
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a directory; give a file name")
    if os.path.exists(out) and not force:
        raise ConfigError(f"--out {out} exists; pass --force to replace it, or choose another file")
    probe = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"--out {out} lies under the file {probe}; choose a file in a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {probe} is not writable")


def write_config(out: str = DEFAULT_OUT, force: bool = False) -> str:
    """Write the commented default config to ``out`` (checked by :func:`check_out`); returns ``out``."""
    check_out(out, force)
    atomic_write_text(out, example_text())
    return out


def add_arguments(parser) -> None:
    """``--out FILE`` and ``--force``."""
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"config file to write (default: {DEFAULT_OUT}); an existing one needs --force")
    parser.add_argument("--force", action="store_true", help="replace --out if the file exists")


def main(args) -> int:
    """Write the config and say what to do next."""
    out = write_config(args.out, force=args.force)
    print(f"wrote {out}: every config key with its default; set model, data.train (and data.eval) and "
          f"output_dir, then run `rankwise train {out}`")
    return 0
