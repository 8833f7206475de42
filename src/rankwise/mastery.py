"""``rankwise mastery``: the knowledge study's mastery probe, for any causal LM and any set of facts.

    rankwise mastery --model M --data FILE_OR_DIR --templates FILE --out FILE.jsonl
                     [--samples 10] [--temperature 0.7] [--max-new-tokens 32] [--relations P19,P20]
                     [--split test] [--limit N] [--batch-size 64] [--seed 0] [--backend hf|vllm] [--force]

As in Ye et al. (2025): each fact's subject fills every completion template of its relation (21 in the
paper), each template is sampled ``--samples`` times at ``--temperature`` for at most ``--max-new-tokens``
tokens, and the fact's mastery ``R`` is the share of those outputs that contain one of its answers
(normalised, as ``rankwise.evaluate.is_correct``: the answer and its aliases). Its level is 0 when ``R = 0``,
else ``i`` in 1-4 for ``R`` in ``((i-1)/4, i/4]`` (``level_of``).

Facts (``rankwise.study_data.load_facts``): EntityQuestions files (a directory, or ``P<id>.<split>.json[l]``)
or JSON lines ``{"subject", "relation", "answers"}``. Templates (``study_data.read_templates``): ``{relation:
["[X] was born in", ...]}``. Every fact's relation must have templates: checked before the model loads.

The probe runs in chunks of ``CHUNK`` facts; each chunk samples with its own seed (from ``--seed`` and the
chunk's number), so the result does not depend on where a run stopped. Finished chunks are appended to
``OUT.partial`` (its first line the run's settings); a run stopped for any reason continues from it with the
same settings (other settings: one line, and ``--force`` starts over), and at the end ``OUT`` is written
atomically, one fact per line: ``{"id", "relation", "subject", "answers", "R", "level", "hits", "samples"}``.

Backends: ``hf`` (transformers' ``generate``, batched, left-padded) and ``vllm`` (an optional dependency, for a
GPU: ~200 samples per fact), each given the same prompts, samples and seeds.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .atomic import atomic_write_text, remove_path
from .config import settings_hash
from .errors import ConfigError
from .evaluate import generate_answers, is_correct
from .model import load_model, load_tokenizer
from .ownership import check_output_file
from .study_data import load_facts, read_templates

FORMAT = "rankwise-mastery"
CHUNK = 32  # facts per chunk: the unit of sampling seeds and of resuming
LEVELS = (0, 1, 2, 3, 4)


def level_of(r: float) -> int:
    """The mastery level of a score ``r`` in [0, 1]: 0 when ``r = 0``, else ``i`` for ``r`` in ``((i-1)/4, i/4]``."""
    if not isinstance(r, (int, float)) or isinstance(r, bool) or math.isnan(r) or not 0.0 <= r <= 1.0:
        raise ValueError(f"mastery score must be a number in [0, 1], got {r!r}")
    if r == 0:
        return 0
    return min(4, max(1, math.ceil(r * 4 - 1e-9)))


def probe_prompts(fact: dict, templates: dict) -> list:
    """The completion prompts of ``fact``: its relation's templates with its subject in ``[X]``."""
    return [t.replace("[X]", fact["subject"]) for t in templates[fact["relation"]]]


def score_fact(fact: dict, outputs: Sequence) -> dict:
    """``fact``'s row of the output from the sampled ``outputs`` of its prompts (one list per prompt)."""
    flat = [o for outs in outputs for o in ([outs] if isinstance(outs, str) else outs)]
    hits = sum(bool(is_correct(o, fact["answers"])) for o in flat)
    r = hits / len(flat) if flat else 0.0
    return {"id": fact["id"], "relation": fact["relation"], "subject": fact["subject"], "answers": fact["answers"],
            "R": r, "level": level_of(r), "hits": hits, "samples": len(flat)}


def chunk_seed(seed: int, chunk: int) -> int:
    """The sampling seed of chunk number ``chunk``."""
    return (int(seed) * 1_000_003 + chunk) % 2**31


def hf_sampler(model_path: str, samples: int, temperature: float, max_new_tokens: int, batch_size: int,
               device: str = "auto", dtype: str = "auto") -> Callable:
    """``sample(prompts, seed) -> [[str] * samples per prompt]`` by transformers' ``generate``."""
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model = load_model(model_path, dtype=dtype, device=dev)
    model.eval()
    tok = load_tokenizer(model_path)

    def sample(prompts, seed):
        return generate_answers(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                do_sample=True, temperature=temperature, num_samples=samples, seed=seed)
    return sample


VLLM_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # rankwise's names -> vLLM's


def vllm_sampler(model_path: str, samples: int, temperature: float, max_new_tokens: int, dtype: str = "auto",
                 seed: int = 0) -> Callable:
    """The same sampler through vLLM (``pip install vllm``; a GPU): one request per prompt, ``n = samples``,
    each request seeded from the chunk's seed and its position."""
    try:
        from vllm import LLM, SamplingParams  # optional dependency: the GPU backend of the probe
    except ImportError:
        raise ConfigError("--backend vllm needs vLLM (pip install vllm, on a machine with a GPU); "
                          "--backend hf runs everywhere") from None
    llm = LLM(model=model_path, dtype=VLLM_DTYPES.get(dtype, dtype), seed=seed)

    def sample(prompts, seed):
        params = [SamplingParams(n=samples, temperature=temperature, max_tokens=max_new_tokens, seed=seed + i)
                  for i in range(len(prompts))]
        return [[c.text for c in out.outputs] for out in llm.generate(list(prompts), params, use_tqdm=False)]
    return sample


def read_partial(path: Path, settings: dict, force: bool) -> list:
    """The finished rows of an earlier run with these settings (its last line dropped when cut off mid-write);
    ``[]`` when there is none or ``force``; another run's settings are a ``ConfigError``."""
    if not path.exists() or force:
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    try:
        head = json.loads(lines[0])
    except json.JSONDecodeError:
        head = None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a rankwise mastery run's progress; remove it, or --force starts over")
    if head.get("settings") != settings:
        changed = sorted(k for k in settings if head.get("settings", {}).get(k) != settings[k])
        raise ConfigError(f"{path} holds a run with other settings ({', '.join(changed)}); put them back to "
                          f"continue it, or --force starts over")
    rows = []
    for line in lines[1:]:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # the end, or a line cut off by the stop: its chunk runs again
    return rows


def run_probe(facts: list, templates: dict, sample: Callable, partial: Path, settings: dict, seed: int,
              force: bool = False, progress: bool = True) -> list:
    """Every fact's row (``score_fact``), chunk by chunk, appending finished chunks to ``partial``."""
    done = read_partial(partial, settings, force)
    n_done = len(done) - len(done) % CHUNK if len(done) < len(facts) else len(facts)
    done = done[:n_done]
    if not done:
        atomic_write_text(partial, json.dumps({"format": FORMAT, "settings": settings}) + "\n")
    else:  # keep the finished chunks only
        atomic_write_text(partial, json.dumps({"format": FORMAT, "settings": settings}) + "\n"
                          + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done))
    rows = list(done)
    chunks = range(math.ceil(n_done / CHUNK), math.ceil(len(facts) / CHUNK))
    for c in tqdm(chunks, desc="mastery", unit="chunk", disable=not progress):
        part = facts[c * CHUNK:(c + 1) * CHUNK]
        prompts = [probe_prompts(f, templates) for f in part]
        outputs = sample([p for ps in prompts for p in ps], chunk_seed(seed, c))
        new, i = [], 0
        for f, ps in zip(part, prompts):
            new.append(score_fact(f, outputs[i:i + len(ps)]))
            i += len(ps)
        with open(partial, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
            fh.flush()
            os.fsync(fh.fileno())
        rows += new
    return rows


# ----------------------------------------------------------------------------- the command


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a causal LM directory (or hub id) with its tokenizer")
    p.add_argument("--data", required=True, help="EntityQuestions files (a directory or P<id>.<split>.json[l]) "
                   "or JSON lines {subject, relation, answers}")
    p.add_argument("--templates", required=True, help="completion templates: JSON {relation: [\"[X] was born "
                   "in\", ...]} or JSON lines {relation, template}")
    p.add_argument("--out", required=True, help="output JSON lines: one fact per line with R and level")
    p.add_argument("--format", default="auto", choices=("auto", "entity_questions", "facts"), dest="data_format",
                   help="the --data format (auto: EntityQuestions for a directory or a P<id>.<split> file)")
    p.add_argument("--split", default=None, help="EntityQuestions split to read (train, dev, test; default all)")
    p.add_argument("--relations", default=None, help="comma-separated relations to probe (default all)")
    p.add_argument("--limit", type=int, default=None, help="probe the first N facts only")
    p.add_argument("--samples", type=int, default=10, help="samples per template (10 in the study)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0.7 in the study)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per sample (32 in the study)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate call (hf)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--backend", default="hf", choices=("hf", "vllm"), help="hf: transformers generate; vllm: "
                   "vLLM on a GPU (optional dependency)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (bf16/fp16 on a GPU, fp32 on a CPU), "
                   "fp32, bf16, fp16")
    p.add_argument("--force", action="store_true", help="replace --out, and start over instead of continuing "
                   "an earlier run's progress")


def _check_args(args) -> None:
    for name in ("samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if not args.temperature > 0:
        raise ConfigError(f"--temperature must be > 0 (the probe samples), got {args.temperature}")


def settings_of(args, facts: list, templates: dict) -> dict:
    """What decides the result: a run continues only from progress with these."""
    return {"model": os.path.abspath(args.model) if os.path.exists(args.model) else args.model,
            "facts": settings_hash({"facts": [[f["id"], f["relation"], f["subject"], f["answers"]] for f in facts]}),
            "templates": settings_hash(templates), "samples": args.samples, "temperature": args.temperature,
            "max_new_tokens": args.max_new_tokens, "seed": args.seed, "backend": args.backend, "dtype": args.dtype,
            "batch_size": args.batch_size}  # the samples of a batch come from one generator: the batches count


def main(args) -> int:
    """Probe every fact; write ``--out``; print the facts per level."""
    _check_args(args)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    inputs = [("data", args.data), ("templates", args.templates)]
    if os.path.exists(args.model):
        inputs.append(("model", args.model))
    check_output_file(out, inputs=inputs, force=args.force)
    check_output_file(partial, inputs=inputs, force=True, flag="--out (its progress file)")
    relations = args.relations.split(",") if args.relations else None
    facts = load_facts(args.data, args.data_format, args.split, relations)[:args.limit]
    if not facts:
        raise ConfigError(f"--data {args.data}: no facts" + (f" of the relations {args.relations}" if relations else ""))
    templates = read_templates(args.templates)
    missing = sorted({f["relation"] for f in facts} - set(templates))
    if missing:
        raise ConfigError(f"--templates {args.templates}: no templates for the relations {', '.join(missing)}")
    settings = settings_of(args, facts, templates)
    if args.backend == "vllm":
        sample = vllm_sampler(args.model, args.samples, args.temperature, args.max_new_tokens, args.dtype, args.seed)
    else:
        sample = hf_sampler(args.model, args.samples, args.temperature, args.max_new_tokens, args.batch_size,
                            dtype=args.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = run_probe(facts, templates, sample, partial, settings, args.seed, force=args.force)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    remove_path(partial)
    counts = {f"level {k}": sum(r["level"] == k for r in rows) for k in LEVELS}
    print(json.dumps({"facts": len(rows), **counts, "out": str(out)}))
    return 0
