"""``metrics.jsonl`` of a run (and its TensorBoard events): read back on resume, appended to while it trains.

One JSON object per line. A resumed run keeps the rows up to its checkpoint's
step (``read_metrics``) and rewrites the file with them before it appends. The
file is appended to one whole row at a time, and every row is written before
the checkpoint of its step, so a run killed (or stopped by a full disk) while
writing leaves at most a partial *last* line, of a step after its last
checkpoint. ``read_metrics`` refuses it in one line saying so (the user deletes
that line; the resumed run logs that step again), and any other unreadable line
too (the file was edited or damaged), naming the file and the line, before
anything is written: nothing of the user's is dropped or rewritten unasked.

The file is rewritten atomically (a link in its place is replaced, not written
through) and then opened for appending with ``O_NOFOLLOW``; a link in place of
``tb/`` is replaced by a directory.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from .atomic import atomic_write_text, remove_path, reporting_write_errors
from .errors import ConfigError

METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
WANDB = "wandb"


def read_metrics(path, upto_step: int) -> list:
    """The rows of ``path`` with ``step <= upto_step`` (what a resumed run keeps); see the module docstring."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, "rb") as f:
            data = f.read()
        lines = data.decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {' '.join(str(e).split())[:200]}; move it away to resume "
                          f"without the rows logged so far") from None
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as e:
            if i == len(lines) - 1:  # no newline after it: a row cut short by a kill or a full disk
                raise ConfigError(f"cannot read {path}: its last line (line {i + 1}) is a partial row, as a run "
                                  f"stopped while writing it leaves (a kill, a full disk); it is a step after the "
                                  f"checkpoint, which the resumed run logs again: delete that line, then --resume "
                                  f"again") from None
            raise ConfigError(f"cannot read {path}: line {i + 1} is not a JSON row ({' '.join(str(e).split())[:80]})"
                              f"; a stopped run leaves at most a partial last line, so the file was changed: "
                              f"repair or move it away to resume") from None
        rows.append(row)
    return [r for r in rows if not isinstance(r.get("step"), (int, float)) or r["step"] <= upto_step]


def require_tensorboard() -> None:
    """``log.tensorboard`` needs the tensorboard package: checked before a run writes anything."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (optional: tensorboard)
    except ImportError:
        raise ConfigError("log.tensorboard needs the tensorboard package (pip install tensorboard)") from None


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard events, a W&B run) of the master process; a no-op on the other ranks.

    ``rows``: the rows kept from before (``read_metrics``), written first. ``wandb``: ``{"project", "config"}``
    to report every row to a Weights & Biases run named after ``out_dir``, its files in ``out_dir/wandb``
    (a resumed run is a new W&B run; ``WANDB_MODE=offline`` keeps everything local).
    """

    def __init__(self, out_dir: str, rows: list, tensorboard: bool, master: bool, wandb: Optional[dict] = None):
        self.file = self.tb = self.wandb = None
        if not master:
            return
        if wandb is not None:
            self.wandb = start_wandb(out_dir, **wandb)
        self.path = os.path.join(out_dir, METRICS)
        with reporting_write_errors(self.path, "the metrics"):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
            self.file = os.fdopen(fd, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard

            tb_dir = os.path.join(out_dir, TENSORBOARD)
            if os.path.islink(tb_dir):  # replaced, never written through
                remove_path(tb_dir)
            self.tb = SummaryWriter(tb_dir)

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        with reporting_write_errors(self.path, "the metrics"):
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(values, step=int(row["step"]))

    def close(self) -> None:
        for f in (self.file, self.tb):
            if f is not None:
                f.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def start_wandb(out_dir: str, project: str, config: dict):
    """A W&B run for the run in ``out_dir`` (named after it, its files in ``out_dir/wandb``, a link there
    replaced by a directory): one per ``MetricsLog``, so the arms of a together run are runs of their own."""
    import wandb  # optional: log.report_to [wandb] only (checked with the config, before anything loads)

    root = os.path.join(out_dir, WANDB)
    if os.path.islink(root):
        remove_path(root)
    os.makedirs(root, exist_ok=True)
    return wandb.init(project=project, name=os.path.basename(os.path.abspath(out_dir)), dir=out_dir,
                      config=config, reinit="create_new")


def report_args(cfg) -> tuple:
    """``(tensorboard, wandb)`` arguments of ``MetricsLog`` from a run's ``log`` keys."""
    log_cfg = cfg.log
    wandb = {"project": log_cfg.wandb_project, "config": cfg.to_dict()} if "wandb" in log_cfg.report_to else None
    return log_cfg.tensorboard or "tensorboard" in log_cfg.report_to, wandb
