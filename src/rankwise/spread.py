"""A sweep spread over torchrun's processes: who this process is, one-process training inside torchrun, and
the sweep's coordination (broadcast from rank 0, gather from every rank, barriers).

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) ``rankwise sweep`` is a sweep of jobs (groups of
``--together`` arms, or single arms) spread over the processes, not DDP: each job trains in one process as a
one-process run (``one_process``), on the process's own GPU (``LOCAL_RANK``) or the CPU. The process group
(gloo, whatever the device: only small JSON messages travel, so no GPU memory and no NCCL watchdog is
involved) carries the coordination alone. Messages are JSON, never pickles; a failure on any rank is raised on
every rank (one line each from the CLI), so no process waits for one that stopped.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
from dataclasses import asdict, dataclass, is_dataclass
from typing import Callable, Optional

import torch
import torch.distributed as tdist

from .errors import ConfigError

# A job may keep the other ranks waiting at the final gather for as long as it trains.
TIMEOUT = datetime.timedelta(days=7)


@dataclass
class Launch:
    """This process in torchrun's launch: ``world`` processes, this one ``rank`` (``local_rank`` on its node)."""
    world: int
    rank: int
    local_rank: int
    own_group: bool = False  # whether ``start`` made the process group (and so ``stop`` ends it)

    @property
    def master(self) -> bool:
        return self.rank == 0


@dataclass
class Outcome:
    """What a step gave on one rank: a value, or the one-line error (``config``: a ``ConfigError``'s)."""
    value: object = None
    error: Optional[str] = None
    config: bool = False

    def raise_error(self, rank: int) -> None:
        if self.error is None:
            return
        if self.config:
            raise ConfigError(self.error)
        raise RuntimeError(f"the sweep stopped on rank {rank}: {self.error}")


def launch() -> Launch:
    """Read torchrun's environment (one process without it)."""
    return Launch(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                  int(os.environ.get("LOCAL_RANK", "0")))


def start(me: Launch) -> None:
    """Join the sweep's process group (gloo), and on a GPU machine make ``LOCAL_RANK``'s GPU this process's."""
    if torch.cuda.is_available() and torch.cuda.device_count() > me.local_rank:
        torch.cuda.set_device(me.local_rank)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="gloo", timeout=TIMEOUT)
        me.own_group = True


def stop(me: Launch) -> None:
    """Leave the sweep's process group (when ``start`` made it)."""
    if me.own_group and tdist.is_initialized():
        tdist.destroy_process_group()
        me.own_group = False


def stop_at_exit(me: Launch) -> None:
    """After a failure every rank shares: leave the process group only at interpreter exit, after a barrier, so
    each rank prints its one line before any exits (torchrun ends the others when one exits)."""
    def final():
        if me.own_group and tdist.is_initialized():
            tdist.barrier()
        stop(me)

    atexit.register(final)


@contextlib.contextmanager
def one_process():
    """Inside torchrun, make ``rankwise.train`` / ``rankwise.together`` (which read ``WORLD_SIZE`` and ``RANK``)
    train as one process; ``LOCAL_RANK`` stays, so ``train.device: auto`` is still this process's GPU."""
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK")}
    os.environ.update(WORLD_SIZE="1", RANK="0")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def attempt(fn: Callable[[], object]) -> tuple[Outcome, Optional[BaseException]]:
    """Run ``fn``; its outcome, and the exception to re-raise on this rank (None when it returned)."""
    try:
        return Outcome(value=fn()), None
    except ConfigError as e:
        return Outcome(error=str(e), config=True), e
    except BaseException as e:  # noqa: B036 - a bug or an interrupt still reaches the other ranks
        return Outcome(error=f"{type(e).__name__}: {e}"), e


def encode(outcome: Outcome) -> bytes:
    return json.dumps({"value": outcome.value, "error": outcome.error, "config": outcome.config},
                      default=_as_dict).encode()


def _as_dict(obj):
    if is_dataclass(obj):
        return asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON")


def decode(data: bytes) -> Outcome:
    return Outcome(**json.loads(data.decode()))


def on_master(me: Launch, fn: Callable[[], object]):
    """``fn()`` on rank 0 alone; its value (as JSON: dataclasses become dicts) on every rank. When it fails,
    every rank raises: rank 0 its own exception, the others its one-line message."""
    outcome, exc = attempt(fn) if me.master else (Outcome(), None)
    data = encode(outcome) if me.master else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    tdist.broadcast(size, src=0)
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if me.master else torch.empty(int(size), dtype=torch.uint8)
    tdist.broadcast(buf, src=0)
    shared = decode(buf.numpy().tobytes())
    if exc is not None:
        raise exc
    shared.raise_error(0)
    return shared.value


def everywhere(me: Launch, fn: Callable[[], object]) -> list:
    """``fn()`` on every rank; the list of their values (as JSON), by rank, on every rank. When it fails on
    any rank, every rank raises: that rank its own exception, the others the first failed rank's message."""
    outcome, exc = attempt(fn)
    data = encode(outcome)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(me.world)]
    tdist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64))
    longest = max(int(s) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(me.world)]
    tdist.all_gather(bufs, mine)
    outcomes = [decode(b[:int(s)].numpy().tobytes()) for b, s in zip(bufs, sizes)]
    if exc is not None:
        raise exc
    for rank, o in enumerate(outcomes):
        o.raise_error(rank)
    return [o.value for o in outcomes]


def assign(costs: list, world: int) -> list[int]:
    """Greedy balance: the jobs by estimated cost, largest first (ties: the earlier job), each to the rank with
    the least work so far (ties: the lowest rank); the rank of each job, in the jobs' order."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += costs[i]
    return owner
