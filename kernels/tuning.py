"""The measured choice between a LoRA layer's two GEMM paths, and its cache.

Each big GEMM of a LoRA layer (forward Y and backward dX) has two paths:

    fused: one Triton GEMM with the low-rank term in its accumulator
           (Y = x @ W.T + s * S @ B.T + b in one kernel);
    split: the base product by torch (cuBLAS on CUDA), then one Triton kernel
           that adds each row's low-rank term in place (one read, one write of Y).

Which one is faster depends on the GPU, the dtype and the shape (an untuned
Triton GEMM can trail cuBLAS by 10-30 %; the split path pays one extra pass
over Y). With ``path="auto"`` on CUDA, the first call that meets a shape key
``(op, M bucket, N, K, dtype)`` times the split path and the fused path in each
of its tile configs (``utils.gemm_configs``: the heuristic one, named plain
``"fused"``, then the architecture's curated list, named ``"fused:BMxBNxBK-wW-sS"``)
with CUDA events (one warm-up, then the median of a few repeats) and keeps the
fastest; off CUDA, "auto" is the fused path in its heuristic config and
nothing is timed. A cached ``"fused:<config>"`` that the current list no longer
holds (other architecture, edited list) is stale: ignored with a warning and
measured again.

The same choice, with the same two names, covers other products: the K-arm
op's big GEMMs (``multi_lora``: ops ``multi_fwd`` / ``multi_dx`` / ``multi_nf4_*``,
no tile configs) and a layer's three skinny low-rank products (``lowrank``: ops
``lora_down`` / ``lora_ds_db`` / ``lora_da``, where "fused" is the Triton kernel
and "split" torch's GEMMs).

Cache: in memory per process, and on disk in ``$RANKWISE_CACHE/tuning.json``
(the cache directory as ``rankwise`` computes it: ``$RANKWISE_CACHE``, else
``$XDG_CACHE_HOME/rankwise``, else ``~/.cache/rankwise``), one section per
device name holding the library versions it was measured with (torch, triton,
``KERNELS_VERSION``). A second process reads the file and does not re-time.
The file is written atomically (a temporary file in the same directory, then
``os.replace``), merged with what is on disk at that moment. A file that is
not JSON, not ours (no ``"format": "rankwise-tuning"``), or a device section
measured with other versions is ignored with a ``warnings.warn``, never an
error; the next write replaces it.

``RANKWISE_TUNE=0`` turns timing off: a cached choice is used, else the
default (fused, heuristic tiles).

Imports nothing of the ``rankwise`` package (kernels sit at the bottom).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import triton

#: the ``path`` argument of the LoRA layers
PATHS = ("auto", "fused", "split")
#: the path "auto" takes when nothing is measured (off CUDA, RANKWISE_TUNE=0 without a cached choice)
DEFAULT_PATH = "fused"
#: bump when a kernel's tiles or code change what is faster: cached choices of other versions are ignored
KERNELS_VERSION = "2"  # 2: the fused path's choices name a tile config
FORMAT = "rankwise-tuning"
FILE_NAME = "tuning.json"


def parse_choice(choice: str) -> tuple:
    """``(path, config name or None)`` of a cached choice: ``"split"``, ``"fused"`` (the
    heuristic tiles) or ``"fused:<config name>"`` (``utils.config_name``)."""
    path, _, config = choice.partition(":")
    return path, (config or None)


def valid_choice(choice) -> bool:
    """Whether ``choice`` has the form of a choice (``parse_choice``)."""
    if not isinstance(choice, str):
        return False
    path, config = parse_choice(choice)
    return path in PATHS[1:] and (choice == path or (path == "fused" and config is not None))


def check_path(path) -> None:
    """A ValueError naming ``path`` unless it is one of ``PATHS``."""
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")


def cache_dir() -> Path:
    """``$RANKWISE_CACHE``, else ``$XDG_CACHE_HOME/rankwise``, else ``~/.cache/rankwise``
    (the rule of ``rankwise.world.pretrain.cache_root``, restated: kernels import no rankwise)."""
    if os.environ.get("RANKWISE_CACHE"):
        return Path(os.environ["RANKWISE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rankwise"


def tuning_enabled() -> bool:
    """False when ``RANKWISE_TUNE`` is 0 / false / no / off."""
    return os.environ.get("RANKWISE_TUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def library_versions() -> dict:
    """What a measured choice depends on besides the device: torch, triton, the kernels."""
    return {"torch": torch.__version__, "triton": triton.__version__, "kernels": KERNELS_VERSION}


def m_bucket(M: int) -> int:
    """Rows rounded up to a power of two: token counts that differ a little share one measurement."""
    return 1 if M <= 1 else 1 << (int(M) - 1).bit_length()


def shape_key(op: str, M: int, N: int, K: int, dtype) -> str:
    """The cache key of one GEMM: op, M bucket, N (output columns), K (reduction), dtype."""
    return f"{op}|M{m_bucket(M)}|N{int(N)}|K{int(K)}|{str(dtype).replace('torch.', '')}"


def cuda_event_timer(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after one warm-up, by CUDA events."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Tuner:
    """Measured path choices for one process: an in-memory table backed by a JSON file.

    Args:
        path: the cache file (default ``cache_dir() / "tuning.json"``, resolved on first use).
        timer: ``timer(fn) -> cost`` (lower is faster); default ``cuda_event_timer``.
            Tests inject a fake.
        versions: what a section's choices were measured with (default ``library_versions()``).
    """

    def __init__(self, path: Optional[Path] = None, timer: Optional[Callable] = None,
                 versions: Optional[dict] = None):
        self._path = Path(path) if path is not None else None
        self.timer = timer or cuda_event_timer
        self.versions = dict(versions) if versions is not None else library_versions()
        self._memory: dict = {}       # device -> {key: path}
        self._loaded: set = set()     # devices whose disk section has been read
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else cache_dir() / FILE_NAME

    def _read_file(self) -> dict:
        """The file's content when it is ours, else {} (with a warning unless it is simply absent)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            warnings.warn(f"rankwise tuning cache {self.path} unreadable ({e}); ignored", stacklevel=3)
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            warnings.warn(f"rankwise tuning cache {self.path} is not valid JSON; ignored", stacklevel=3)
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("devices"), dict):
            warnings.warn(f"rankwise tuning cache {self.path} is not a rankwise tuning file; ignored",
                          stacklevel=3)
            return {}
        return data

    def _valid_section(self, section) -> Optional[dict]:
        """The choices of a device section measured with our versions, else None."""
        if not isinstance(section, dict) or section.get("versions") != self.versions:
            return None
        choices = section.get("choices")
        if not isinstance(choices, dict):
            return None
        return {k: v for k, v in choices.items() if valid_choice(v)}

    def _load(self, device: str) -> dict:
        if device not in self._loaded:
            self._loaded.add(device)
            section = self._read_file().get("devices", {}).get(device)
            if section is not None:
                choices = self._valid_section(section)
                if choices is None:
                    warnings.warn(f"rankwise tuning cache {self.path}: the entries for {device!r} were measured "
                                  f"with {section.get('versions') if isinstance(section, dict) else None}, not "
                                  f"{self.versions}; ignored (they will be measured again)", stacklevel=3)
                else:
                    self._memory.setdefault(device, {}).update(choices)
        return self._memory.setdefault(device, {})

    def _save(self, device: str) -> None:
        """Merge this device's choices into the file and replace it atomically; a failed write warns."""
        try:
            data = self._read_file_quietly()
            section = data["devices"].get(device)
            old = self._valid_section(section) or {}
            data["devices"][device] = {"versions": self.versions, "choices": {**old, **self._memory[device]}}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tuning.", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as e:
            warnings.warn(f"rankwise tuning cache {self.path} not written ({e})", stacklevel=3)

    def _read_file_quietly(self) -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = self._read_file()
        return data if data else {"format": FORMAT, "devices": {}}

    def cached(self, device: str, key: str) -> Optional[str]:
        """The cached choice for ``key`` on ``device`` (memory, then disk), or None."""
        with self._lock:
            return self._load(device).get(key)

    def choose(self, device: str, key: str, candidates: Callable[[], dict], default: str = DEFAULT_PATH) -> str:
        """The choice for ``key`` on ``device``: cached, else (tuning on) the one whose
        callable ``timer`` finds fastest, recorded in memory and on disk; else ``default``.
        ``candidates()`` returns ``{choice: zero-argument callable}`` (choices as in
        ``parse_choice``); it is called to time, and to check that a cached
        ``"fused:<config>"`` is still one of them (else it is stale: warned about, dropped)."""
        with self._lock:
            table = self._load(device)
            if key in table:
                choice = table[key]
                if parse_choice(choice)[1] is None or choice in candidates():
                    return choice
                warnings.warn(f"rankwise tuning cache {self.path}: {key} on {device!r} chose tile config "
                              f"{choice!r}, not in the current list; ignored (measured again)", stacklevel=3)
                del table[key]
            if not tuning_enabled():
                return default
            costs = {name: self.timer(fn) for name, fn in candidates().items()}
            best = min(costs, key=costs.get)
            table[key] = best
            self._save(device)
            return best


_TUNER: Optional[Tuner] = None


def default_tuner() -> Tuner:
    """The process's tuner (created on first use: nothing happens at import)."""
    global _TUNER
    if _TUNER is None:
        _TUNER = Tuner()
    return _TUNER


def set_tuner(tuner: Optional[Tuner]) -> Optional[Tuner]:
    """Replace the process's tuner (None: a fresh default on next use); returns the old one."""
    global _TUNER
    old, _TUNER = _TUNER, tuner
    forget_plans()
    return old


def device_name(device: torch.device) -> str:
    """The name a device's choices are filed under (``torch.cuda.get_device_name``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def choose_path(path: str, op: str, M: int, N: int, K: int, t: torch.Tensor,
                candidates: Callable[[], dict]) -> str:
    """``path`` itself unless it is ``"auto"`` (so ``"fused"`` runs the heuristic tiles);
    "auto" is the measured choice (``parse_choice``: a path and maybe a tile config) for
    the GEMM (op, M, N, K) in ``t``'s dtype on ``t``'s CUDA device, and the
    default (fused) elsewhere or while torch.compile traces. While a CUDA graph
    is being captured nothing is timed (events and synchronisation are not
    allowed there): a cached choice is used, else the default."""
    if path != "auto":
        return path
    if t.device.type != "cuda" or torch.compiler.is_compiling():
        return DEFAULT_PATH
    tuner, device, key = default_tuner(), device_name(t.device), shape_key(op, M, N, K, t.dtype)
    if torch.cuda.is_current_stream_capturing():
        return tuner.cached(device, key) or DEFAULT_PATH
    return tuner.choose(device, key, candidates)


# The launch plan of each GEMM once its choice is settled, ``(path, op, M bucket, N, K, dtype, rank, device) ->
# (path, tile config or None)``: a call after the first builds no candidate table and no tile list, only a dict lookup (the
# host's cost per launch bounds a small step on a GPU). A choice is settled when nothing in this process can
# change it: a path given, "auto" off CUDA, or a choice measured and cached. ``set_tuner`` empties it.
_PLANS: dict = {}


def forget_plans() -> None:
    """Empty the launch plans (the next call of each GEMM resolves its choice again)."""
    _PLANS.clear()


def _settled(path: str, t: torch.Tensor, key: str) -> bool:
    if torch.compiler.is_compiling():
        return False
    if path != "auto" or t.device.type != "cuda":
        return True
    return default_tuner().cached(device_name(t.device), key) is not None


def run_path(path: str, op: str, M: int, N: int, K: int, t: torch.Tensor, fused: Callable, split: Callable,
             configs: Callable[[], dict], rank: int = 0) -> torch.Tensor:
    """Run the GEMM (op, M, N, K) by the path ``path`` names (``choose_path``): ``fused(cfg)`` with
    ``cfg`` None for the heuristic tiles or one of ``configs()`` (``{name: config}``), or ``split()``.
    ``rank``: what ``configs()`` depends on besides the shape key (the tiles that fit depend on it)."""
    plan_key = (path, op, m_bucket(M), N, K, t.dtype, rank, t.device)  # no string built per call
    plan = _PLANS.get(plan_key)
    if plan is None:
        choice = choose_path(path, op, M, N, K, t, lambda: {
            "fused": lambda: fused(None), "split": split,
            **{name: (lambda c=c: fused(c)) for name, c in configs().items()}})
        kind, config = parse_choice(choice)
        plan = (kind, configs()[choice] if config else None)
        if _settled(path, t, shape_key(op, M, N, K, t.dtype)):
            _PLANS[plan_key] = plan
    kind, config = plan
    return split() if kind == "split" else fused(config)
