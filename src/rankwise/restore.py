"""``rankwise restore``: reset the top/bottom/random k% of fine-tuning updates to
their pre-trained values, on Hugging Face safetensors checkpoints, streaming.

Two passes over the checkpoints, one tensor at a time (``safe_open``, memory-mapped):

1. selection: a two-level radix select of the score keys (each level reads every
   in-scope tensor pair once) gives the exact threshold and the number of ties
   at it to take;
2. writing: each tensor's bit mask is rebuilt from the threshold, the chosen
   elements take the base values, and output shards of at most
   ``--max-shard-size`` are written as they fill.

Peak memory is one output shard plus one base and one tuned tensor; the whole
model is never held, let alone twice. The output (a temporary directory renamed
into place) holds the restored safetensors (+ index when sharded), every other
file of the tuned checkpoint (config, generation config, tokenizer) and
``restore_stats.json``. The selection is exactly :func:`rankwise.masking.restore`
on the same tensors (ties: sorted names, then index).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from typing import Dict, Tuple

import torch

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
STATS_FILE = "restore_stats.json"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def add_arguments(parser) -> None:
    """CLI arguments of ``rankwise restore``."""
    parser.add_argument("--base", required=True, help="pre-trained checkpoint directory (save_pretrained, safetensors)")
    parser.add_argument("--tuned", required=True, help="fine-tuned checkpoint directory (same architecture)")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--fraction", type=float, required=True, help="fraction of in-scope elements to restore, in [0, 1]")
    parser.add_argument("--score", default="relative", choices=["relative", "abs"], help="per-element score (default relative)")
    parser.add_argument("--select", default="top", choices=["top", "bottom", "random"], help="which elements to restore")
    parser.add_argument("--scope", default="global", choices=["global", "per_tensor"], help="one ranking or one per tensor")
    parser.add_argument("--include", default=r"layers", help="regex a parameter name must match (default 'layers')")
    parser.add_argument("--exclude", default=r"norm", help="regex that removes matching names (default 'norm'); '' for none")
    parser.add_argument("--seed", type=int, default=0, help="seed of --select random")
    parser.add_argument("--rescale", action="store_true", help="DARE: scale kept deltas by 1/(1-fraction)")
    parser.add_argument("--max-shard-size", default="auto", help="output shard size, e.g. 2GB, 500MB (default: largest input shard)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")


def parse_size(text) -> int:
    """Bytes from ``'2GB'``, ``'500MB'``, ``'64KB'``, ``'1234'`` (decimal units, as transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise ValueError(f"--max-shard-size must look like 2GB, 500MB or a byte count, got {text!r}")
    unit = m.group(2).rstrip("B") or ""
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(float(m.group(1)) * mult)
    if size <= 0:
        raise ValueError(f"--max-shard-size must be positive, got {text!r}")
    return size


def checkpoint_files(path: str) -> Dict[str, str]:
    """``{tensor name: safetensors file}`` of a save_pretrained directory (sharded or not)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    index = os.path.join(path, SAFE_INDEX)
    single = os.path.join(path, SAFE_SINGLE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = {}
        for name, rel in weight_map.items():
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{index} lists {rel}, which is missing")
            files[name] = full
        return files
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"no {SAFE_SINGLE} or {SAFE_INDEX} in {path} (only safetensors checkpoints are supported)")


class _Reader:
    """Lazy per-tensor access to a checkpoint through memory-mapped safe_open handles."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        self.files = checkpoint_files(path)
        self.handles = {f: safe_open(f, framework="pt") for f in sorted(set(self.files.values()))}
        self.meta: Dict[str, Tuple[tuple, torch.dtype]] = {}
        for name, f in self.files.items():
            sl = self.handles[f].get_slice(name)
            dtype = sl.get_dtype()
            if dtype not in _ST_DTYPES:
                raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
            self.meta[name] = (tuple(sl.get_shape()), _ST_DTYPES[dtype])

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.files[name]].get_tensor(name)

    def nbytes(self, name: str) -> int:
        shape, dtype = self.meta[name]
        n = 1
        for s in shape:
            n *= s
        return n * torch.empty((), dtype=dtype).element_size()

    def shard_sizes(self) -> Dict[str, int]:
        sizes: Dict[str, int] = {}
        for name, f in self.files.items():
            sizes[f] = sizes.get(f, 0) + self.nbytes(name)
        return sizes


def _plan_shards(names, nbytes, max_size):
    shards, cur, cur_size = [], [], 0
    for n in names:
        if cur and cur_size + nbytes[n] > max_size:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append(n)
        cur_size += nbytes[n]
    if cur or not shards:
        shards.append(cur)
    return shards


def restore_checkpoint(
    base_dir: str,
    tuned_dir: str,
    out_dir: str,
    fraction: float,
    score: str = "relative",
    select: str = "top",
    scope: str = "global",
    include=r"layers",
    exclude=r"norm",
    seed: int = 0,
    rescale: bool = False,
    max_shard_size="auto",
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Streaming :func:`rankwise.masking.restore` from checkpoint directories to ``out_dir``; returns the stats."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .masking import plan_restore

    include = include or None
    exclude = exclude or None
    for arg, d in (("--base", base_dir), ("--tuned", tuned_dir)):
        if os.path.abspath(out_dir) == os.path.abspath(d):
            raise ValueError(f"--out must differ from {arg} ({d})")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise ValueError(f"--out {out_dir} exists and is not empty (pass --force to replace it)")
    t0 = time.time()
    base, tuned = _Reader(base_dir), _Reader(tuned_dir)
    plan = plan_restore(base.meta, tuned.meta, fraction, score=score, select=select, scope=scope,
                        include=include, exclude=exclude, seed=seed, rescale=rescale)

    def pairs(desc):
        for n in tqdm(plan.names, desc=desc, unit="tensor", disable=not progress, leave=False):
            yield n, base.get(n).reshape(-1).contiguous(), tuned.get(n).reshape(-1).contiguous()

    levels = iter(["select (high digits)", "select (low digits)"])
    plan.select(lambda: pairs(next(levels, "select")))  # streaming: one tensor pair at a time
    t_select = time.time() - t0

    # Output shards in sorted-name order (the tie order), sized like the input by default.
    all_names = sorted(tuned.meta)
    nbytes = {n: tuned.nbytes(n) for n in all_names}
    max_size = max(tuned.shard_sizes().values()) if str(max_shard_size) == "auto" else parse_size(max_shard_size)
    shards = _plan_shards(all_names, nbytes, max_size)
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
    try:
        weight_map = {}
        scope_set = set(plan.names)
        bar = tqdm(total=len(all_names), desc="write", unit="tensor", disable=not progress, leave=False)
        for i, shard in enumerate(shards):
            fname = SAFE_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            out = {}
            for n in shard:
                t = tuned.get(n)
                if n in scope_set:
                    t = plan.restore_tensor(n, base.get(n), t)
                out[n] = t.contiguous()
                weight_map[n] = fname
                bar.update(1)
            save_file(out, os.path.join(tmp, fname), metadata={"format": "pt"})
            del out
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
            with open(os.path.join(tmp, SAFE_INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        # Everything else of the tuned checkpoint: config, generation config, tokenizer files.
        skip = {SAFE_SINGLE, SAFE_INDEX, STATS_FILE} | {os.path.basename(p) for p in tuned.files.values()}
        for entry in sorted(os.listdir(tuned_dir)):
            src = os.path.join(tuned_dir, entry)
            if entry in skip or entry.endswith((".safetensors", ".bin")) or not os.path.isfile(src):
                continue
            shutil.copy2(src, os.path.join(tmp, entry))
        stats = plan.stats()
        stats.update(
            base=os.path.abspath(base_dir),
            tuned=os.path.abspath(tuned_dir),
            include=include,
            exclude=exclude,
            shards=len(shards),
            max_shard_size=max_size,
            seconds_select=round(t_select, 3),
            seconds_total=round(time.time() - t0, 3),
        )
        with open(os.path.join(tmp, STATS_FILE), "w", encoding="utf-8") as f:
            json.dump(stats, f, indent=2)
        os.chmod(tmp, 0o755)
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.old-", dir=parent)
            os.replace(out_dir, os.path.join(old, "x"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def main(args) -> int:
    """Run ``rankwise restore`` from parsed arguments."""
    try:
        stats = restore_checkpoint(
            args.base, args.tuned, args.out, args.fraction,
            score=args.score, select=args.select, scope=args.scope,
            include=args.include, exclude=args.exclude, seed=args.seed, rescale=args.rescale,
            max_shard_size=args.max_shard_size, force=args.force,
        )
    except TypeError as e:  # non-float tensors in scope, wrong argument types: one-line errors too
        raise ValueError(str(e)) from e
    print(
        f"restored {stats['restored']} of {stats['n']} elements ({stats['select']} {stats['fraction']:g} by "
        f"{stats['score']}, {stats['scope']}); they held {100 * stats['score_share']:.2f}% of the total score; "
        f"wrote {args.out} ({stats['shards']} shard(s)) in {stats['seconds_total']:.1f}s"
    )
    return 0
