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
file of the tuned checkpoint (config, generation config, tokenizer),
``restore_stats.json`` and rankwise's marker (``.rankwise-run.json``, kind
``restore``). ``--out`` may not be, lie inside or contain ``--base`` or
``--tuned`` (refused even with ``--force``); an existing non-empty ``--out`` is
replaced only when it is a restore output of rankwise, otherwise only with
``--force``. The selection is exactly :func:`rankwise.masking.restore`
on the same tensors (ties: sorted names, then index).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time

from safetensors.torch import save_file
from tqdm.auto import tqdm

from .atomic import replace_dir
from .errors import ConfigError, one_line, short
from .masking import plan_restore
from .model import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, SafetensorsCheckpoint
from .ownership import MARKER, check_output, write_marker

STATS_FILE = "restore_stats.json"


def add_arguments(parser) -> None:
    """CLI arguments of ``rankwise restore``."""
    parser.add_argument("--base", required=True, help="pre-trained checkpoint directory (save_pretrained, safetensors)")
    parser.add_argument("--tuned", required=True, help="fine-tuned checkpoint directory (same architecture), or a "
                        "full or masked SFT run directory (its model/)")
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
    parser.add_argument("--force", action="store_true", help="replace --out even if it is a non-empty directory rankwise did not make")


def parse_size(text) -> int:
    """Bytes from ``'2GB'``, ``'500MB'``, ``'64KB'``, ``'1234'`` (decimal units, as transformers)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise ConfigError(f"--max-shard-size must look like 2GB, 500MB or a byte count, got {short(text)}")
    unit = m.group(2).rstrip("B") or ""
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    try:
        size = int(float(m.group(1)) * mult)
    except OverflowError:  # so many digits that the float is inf
        raise ConfigError(f"--max-shard-size is too large, got {short(text)}") from None
    if size <= 0:
        raise ConfigError(f"--max-shard-size must be positive, got {short(text)}")
    return size


def find_checkpoint(path: str) -> str:
    """``path`` itself if it holds safetensors weights, else ``path/model`` when that does (the model of a
    full or masked SFT run directory); a LoRA run (``adapter/`` only) is refused, naming ``rankwise merge``."""
    for cand in (path, os.path.join(path, "model")):
        if any(os.path.isfile(os.path.join(cand, f)) for f in (SAFETENSORS_SINGLE, SAFETENSORS_INDEX)):
            return cand
    if os.path.isfile(os.path.join(path, "adapter", "adapter_config.json")):
        raise ConfigError(f"--tuned {path} is a LoRA run (adapter/, no model/): merge it first "
                          f"(rankwise merge {path} --out DIR) and pass --tuned DIR")
    return path  # SafetensorsCheckpoint says what is missing


def check_pattern(flag: str, pattern):
    """``pattern`` (a regex, or None / '' for none) compiled, or a ``ConfigError`` naming ``flag``."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as e:
        raise ConfigError(f"{flag} {short(pattern)} is not a valid regular expression ({one_line(e, 120)})") from None


def _check_arguments(base_dir, tuned_dir, out_dir, include, exclude, max_shard_size, force):
    """Before any work: the patterns and the shard size parse, ``--out`` is not an input (the run of a run
    directory included), not a file, and ours (a restore output) or ``--force``. Returns the tuned checkpoint
    directory and the shard size (None: auto)."""
    check_pattern("--include", include)
    check_pattern("--exclude", exclude)
    max_size = None if str(max_shard_size) == "auto" else parse_size(max_shard_size)
    checkpoint = find_checkpoint(tuned_dir)
    inputs = [("base", base_dir), ("tuned", checkpoint)]
    if os.path.realpath(tuned_dir) != os.path.realpath(checkpoint):
        inputs.append(("run", tuned_dir))
    check_output(out_dir, force=force, inputs=inputs, flag="--out", kinds=["restore"])
    return checkpoint, max_size


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
    include = include or None
    exclude = exclude or None
    tuned_dir, max_size = _check_arguments(base_dir, tuned_dir, out_dir, include, exclude, max_shard_size, force)
    t0 = time.time()
    try:
        base, tuned = SafetensorsCheckpoint(base_dir), SafetensorsCheckpoint(tuned_dir)
        # the planner checks the arguments and that the checkpoints match (names, shapes, float dtypes)
        plan = plan_restore(base.meta(), tuned.meta(), fraction, score=score, select=select, scope=scope,
                            include=include, exclude=exclude, seed=seed, rescale=rescale)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None

    def pairs(desc):
        for n in tqdm(plan.names, desc=desc, unit="tensor", disable=not progress, leave=False):
            yield n, base.get(n).reshape(-1).contiguous(), tuned.get(n).reshape(-1).contiguous()

    levels = iter(["select (high digits)", "select (low digits)"])
    plan.select(lambda: pairs(next(levels, "select")))  # streaming: one tensor pair at a time
    t_select = time.time() - t0

    # Output shards in sorted-name order (the tie order), sized like the input by default.
    all_names = sorted(tuned.keys())
    nbytes = {n: tuned.nbytes(n) for n in all_names}
    if max_size is None:  # auto: the largest input shard
        sizes = {}
        for n, f in tuned.files.items():
            sizes[f] = sizes.get(f, 0) + nbytes[n]
        max_size = max(sizes.values())
    shards = _plan_shards(all_names, nbytes, max_size)
    stats = {}

    def write(tmp):
        weight_map = {}
        scope_set = set(plan.names)
        bar = tqdm(total=len(all_names), desc="write", unit="tensor", disable=not progress, leave=False)
        for i, shard in enumerate(shards):
            fname = SAFETENSORS_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
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
            with open(os.path.join(tmp, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        # Everything else of the tuned checkpoint: config, generation config, tokenizer files.
        skip = {SAFETENSORS_SINGLE, SAFETENSORS_INDEX, STATS_FILE, MARKER} | {os.path.basename(p) for p in tuned.files.values()}
        for entry in sorted(os.listdir(tuned_dir)):
            src = os.path.join(tuned_dir, entry)
            if entry in skip or entry.endswith((".safetensors", ".bin")) or not os.path.isfile(src):
                continue
            shutil.copy2(src, os.path.join(tmp, entry))
        stats.update(plan.stats())
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
        write_marker(tmp, "restore")

    replace_dir(out_dir, write)  # out_dir is the old directory or the new one, never half of one
    return stats


def main(args) -> int:
    """Run ``rankwise restore`` from parsed arguments."""
    stats = restore_checkpoint(
        args.base, args.tuned, args.out, args.fraction,
        score=args.score, select=args.select, scope=args.scope,
        include=args.include, exclude=args.exclude, seed=args.seed, rescale=args.rescale,
        max_shard_size=args.max_shard_size, force=args.force,
    )
    print(
        f"restored {stats['restored']} of {stats['n']} elements ({stats['select']} {stats['fraction']:g} by "
        f"{stats['score']}, {stats['scope']}); they held {100 * stats['score_share']:.2f}% of the total score; "
        f"wrote {args.out} ({stats['shards']} shard(s)) in {stats['seconds_total']:.1f}s"
    )
    return 0
