"""The ``rankwise`` command line.

Each verb lives in its own module, which defines ``add_arguments(parser)`` and
``main(args) -> int | None``; ``build_parser`` imports every verb's module (a
missing one is an error, never a silently absent verb).

Errors: a ``rankwise.errors.ConfigError`` (bad input the user can fix: a config
key or value, a path, a data row) is printed as one line,
``rankwise VERB: error: ...``, with exit status 2; ``--debug`` shows its
traceback too. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import ConfigError, one_line

# verb -> (module, one-line help)
VERBS = {
    "train": ("rankwise.train", "train one run (LoRA, full SFT or masked SFT) from a YAML config"),
    "sweep": ("rankwise.sweep", "run a LoRA rank sweep (and optional full/masked SFT arms)"),
    "merge": ("rankwise.merge", "merge a trained adapter into its base model"),
    "restore": ("rankwise.restore", "restore the top/bottom/random k%% of updates to base values"),
    "analyze": ("rankwise.analysis.cli", "spectral, attention, representation and token-level analysis"),
    "world": ("rankwise.world.cli", "build the synthetic knowledge world and pretrain its base model"),
    "demo": ("rankwise.demo", "run the knowledge study end to end on the embedded world"),
    "mastery": ("rankwise.mastery", "measure each fact's knowledge mastery (the knowledge study's probe) for any model"),
    "study": ("rankwise.study", "run a study's protocol (LoRA ranks against full SFT) on a real model and data sets"),
    "tune": ("rankwise.tune", "measure ahead of a run which GEMM path (fused or split) each LoRA layer shape takes on this GPU"),
    "init": ("rankwise.init", "write the commented default config (every key with its default) to start from"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankwise",
        description="Train, sweep and analyse LoRA adapters and full fine-tuning with fused kernels.")
    parser.add_argument("--version", action="version", version=f"rankwise {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of configuration errors too (other errors always show it)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module_name, help_text) in VERBS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    try:
        rc = args._main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ConfigError as e:  # bad input: one clear line; anything else is a bug and keeps its traceback
        if args.debug:
            raise
        sys.stderr.write(f"rankwise {args.verb}: error: {one_line(e, 2000)}\n")  # one write: ranks' lines never mix
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
