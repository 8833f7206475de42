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

from importlib import resources

from .atomic import atomic_write_text
from .ownership import check_output_file

DEFAULT_OUT = "rankwise.yaml"
EXAMPLE = "lora.yaml"


def example_text(name: str = EXAMPLE) -> str:
    """The text of the shipped example config ``name`` (a file of ``rankwise.examples``)."""
    return resources.files("rankwise.examples").joinpath(name).read_text(encoding="utf-8")


def write_config(out: str = DEFAULT_OUT, force: bool = False) -> str:
    """Write the commented default config to ``out`` (checked by ``ownership.check_output_file``); returns ``out``."""
    check_output_file(out, force=force)
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
