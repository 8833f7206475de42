"""Data: load rows, tokenize with the loss on the response tokens only, pack without cross-attention.

Rows come from a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file or a
Hugging Face hub data set (``name`` or ``name:split``). Row formats (``data.format``;
the fields each reads, and the converters, are in ``rankwise.formats``; field names
are mapped with ``data.fields``):

- ``prompt_completion``: string fields ``prompt`` and ``completion``; the model sees
  ``tokens(prompt) + tokens(completion) + [eos]`` and the loss covers the completion
  tokens and the EOS only.
- ``alpaca``: ``instruction``, optional ``input``, ``output``: the prompt is the
  Alpaca template (``formats.ALPACA_PROMPT`` / ``ALPACA_PROMPT_NO_INPUT``), then as
  ``prompt_completion`` with ``output`` as the completion.
- ``chat``: a field ``messages`` (a list of ``{"role", "content"}``), rendered with
  ``data.chat_template`` (a built-in name or a ``.jinja`` file) or else the tokenizer's
  chat template; the loss covers what the template emits for assistant turns (their
  content and end-of-turn tokens).
- ``sharegpt``: a field ``conversations`` (a list of ``{"from", "value"}``), turned
  into ``messages`` and rendered as ``chat``.
- ``text``: a field ``text``, language modelling: ``[bos] + tokens(text) + [eos]``,
  every token a target, cut into chunks of ``max_length`` tokens overlapping by
  ``stride`` (the overlap is context, so every token is a target once).

Batches are padding-free: the examples of a micro-batch are concatenated into a
single row of shape ``(1, T)`` with ``position_ids`` restarting at 0 for every
example. Hugging Face models turn restarting positions into a block-diagonal
causal mask (sdpa, eager) or variable-length attention (flash_attention_2), so
no token attends across examples. ``targets[t]`` is the token to predict at
position ``t`` (already shifted) and ``-100`` where there is no loss, including
the last position of every example, so no example predicts its neighbour.

Errors about rows name the data set key and the row number (1-based).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import ConfigError, short
from .formats import (DEFAULT_FIELDS, FORMAT_FIELDS, alpaca_prompt, check_format, get_field, prompt_response,
                      render_chat, resolve_chat_template, row_messages, unused_fields)

log = logging.getLogger("rankwise")

IGNORE = -100
CHAT_FORMATS = ("chat", "sharegpt")
UNK_WARN_RATE = 0.01  # a data set with more of the tokenizer's unknown token than this gets a warning
LOCAL_FORMATS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


# ----------------------------------------------------------------------------- loading rows

def load_rows(source: str, name: str = "data.train") -> list[dict]:
    """Read every row of ``source`` as a list of dicts.

    ``source`` is a local ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file, or a
    Hugging Face data set ``name[:split]`` (hub id or local data set directory,
    loaded with ``datasets.load_dataset``; the split defaults to ``train``).

    ``name`` is the config key the source came from; it prefixes error messages.
    """
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{name} must be a path or a hub data set name, got {source!r}")
    ds_name, split = source, "train"
    if ":" in source and not os.path.exists(source):  # "name:split"
        head, tail = source.rsplit(":", 1)
        if head and tail and "/" not in tail:
            ds_name, split = head, tail
    if os.path.isdir(ds_name):  # a data set directory: `datasets` finds its files and splits
        return _read_hub(ds_name, split, name)
    ext = os.path.splitext(source)[1].lower()
    if os.path.isfile(source):
        if ext not in LOCAL_FORMATS:
            raise ConfigError(f"{name}: unsupported file type {ext!r} for {source}; "
                             f"expected one of {', '.join(LOCAL_FORMATS)}")
        try:
            return _READERS[LOCAL_FORMATS[ext]](source, name)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{name}: {source} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except csv.Error as e:
            raise ConfigError(f"{name}: {source} is not a readable CSV file: {e}") from None
        except OSError as e:
            raise ConfigError(f"{name}: cannot read {source}: {e.strerror or e}") from None
    if ext in LOCAL_FORMATS or source.startswith((".", "/", "~")):
        raise ConfigError(f"{name}: file not found: {source}")
    return _read_hub(ds_name, split, name)


def _read_jsonl(path, name):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{name} row {len(rows) + 1} (line {line_no} of {path}) is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{name} row {len(rows) + 1} (line {line_no} of {path}) must be a JSON object, "
                                 f"got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path, name):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path, name)  # many ".json" files are JSON lines
    if isinstance(data, dict):  # {"data": [...]} or column-oriented {"prompt": [...], ...}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists:
            data = lists[0]
        elif lists and len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            keys = list(data)
            data = [dict(zip(keys, vals)) for vals in zip(*data.values())]
        else:
            raise ConfigError(f"{name}: {path} must hold a list of row objects")
    if not isinstance(data, list):
        raise ConfigError(f"{name}: {path} must hold a list of row objects, got {type(data).__name__}")
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            raise ConfigError(f"{name} row {i} of {path} must be an object, got {type(row).__name__}")
    return data


def _read_csv(path, name):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = []
        for i, row in enumerate(reader, 1):
            if None in row:  # more cells than header columns
                raise ConfigError(f"{name} row {i} (line {reader.line_num} of {path}) has more cells than the header")
            rows.append(row)
    return rows


def _read_parquet(path, name):
    import pyarrow as pa  # heavy at import (installed with datasets): parquet files only
    import pyarrow.parquet as pq  # heavy at import, as pyarrow

    try:
        return pq.read_table(path).to_pylist()
    except pa.ArrowException as e:  # not a parquet file, truncated, corrupt
        raise ConfigError(f"{name}: {path} is not a readable parquet file: {' '.join(str(e).split())[:200]}") from None


def _read_hub(ds_name, split, name):
    import datasets  # heavy at import: hub data sets only

    try:
        ds = datasets.load_dataset(ds_name, split=split)
    except Exception as e:  # the hub raises many kinds; say which source failed
        raise ConfigError(f"{name}: cannot load hub data set {ds_name!r} split {split!r}: "
                          f"{' '.join(str(e).split())[:300]}") from e
    return [dict(r) for r in ds]


_READERS = {"json": _read_json, "jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}


# ----------------------------------------------------------------------------- tokenizing

@dataclass
class Example:
    """One tokenized example: ``input_ids``, a per-token flag ``is_target`` (loss on this token) and ``row``,
    the index of the row it came from (a ``text`` row longer than ``max_length`` gives several examples)."""

    input_ids: list
    is_target: list
    row: int = 0

    def __len__(self):
        return len(self.input_ids)


def get_answers(row: dict, field: str = "answers"):
    """The gold answers of a row as a list of strings (from ``field``, else ``answer``), or None."""
    for key in (field, "answers", "answer"):
        if key in row and row[key] is not None:
            v = row[key]
            if isinstance(v, str):
                return [v]
            if isinstance(v, (list, tuple)) and all(isinstance(a, str) for a in v):
                return list(v)
            return None
    return None


def tokenize_rows(rows, tokenizer, *, format="prompt_completion", fields=None, max_length=512, add_eos=True,
                  chat_template=None, stride=0, name="data.train", progress=False, warn=True):
    """Tokenize ``rows`` of ``format`` (see ``rankwise.formats``) into ``Example``s.

    Examples are truncated to ``max_length`` tokens, except ``text`` ones, which are cut into chunks
    (``chunk``) of ``max_length`` tokens overlapping by ``stride``. ``chat_template`` (``chat`` and
    ``sharegpt``): a built-in name or a ``.jinja`` path; ``None`` takes the tokenizer's own. With ``warn``,
    one warning line names the row fields the format does not use, and one the share of the tokenizer's
    unknown token when it passes ``UNK_WARN_RATE``.

    Returns ``(examples, n_dropped)``: examples whose targets were all cut by truncation are dropped and counted.
    """
    fields = {**DEFAULT_FIELDS, **(fields or {})}
    check_format(format)
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2, got {max_length}")
    if not 0 <= stride < max_length:
        raise ConfigError(f"data.stride must be in [0, data.max_length = {max_length}), got {stride}")
    if warn:
        warn_unused_fields(rows, format, fields, name)
    if format in ("prompt_completion", "alpaca"):
        seqs = _tokenize_prompt_response(rows, tokenizer, format, fields, add_eos, name)
    elif format == "text":
        seqs = _tokenize_text(rows, tokenizer, fields, add_eos, name)
    else:
        template, source = resolve_chat_template(chat_template, tokenizer, format)
        seqs = _tokenize_chat(rows, tokenizer, format, fields, template, source, name, progress)
    if warn:
        warn_unknown_tokens(seqs, tokenizer, name)
    examples, dropped = [], 0
    for r, (ids, tgt) in enumerate(seqs):
        pieces = chunk(ids, max_length, stride) if format == "text" else [(ids[:max_length], tgt[:max_length])]
        for k, (p_ids, p_tgt) in enumerate(pieces):
            if any(p_tgt[1:]):  # position 0 has no predecessor, so it cannot be a target
                examples.append(Example(p_ids, p_tgt, r))
            elif k == 0:  # (a text's last chunk of one token, stride 0, has nothing to predict: no loss)
                dropped += 1
    if not examples:
        raise ConfigError(f"{name}: no example has a target token left within data.max_length={max_length}")
    return examples, dropped


def chunk(ids, max_length, stride=0):
    """``ids`` cut into pieces of at most ``max_length`` tokens, each overlapping the one before by ``stride``:
    a list of ``(ids, is_target)``. A piece's first ``stride`` tokens (the overlap) are context, not targets,
    so every token is a target once; with ``stride`` 0 a piece's first token has no context and no loss."""
    step, out, start = max_length - stride, [], 0
    while True:
        piece = list(ids[start:start + max_length])
        skip = min(stride, len(piece)) if start else 0
        out.append((piece, [False] * skip + [True] * (len(piece) - skip)))
        if start + max_length >= len(ids):
            return out
        start += step


def warn_unused_fields(rows, format, fields, name) -> None:
    """One warning line naming the fields of ``rows`` that ``format`` does not read (if any)."""
    extra = unused_fields(rows, format, fields)
    if not extra:
        return
    shown = ", ".join(short(k, 40) for k in extra[:8]) + (f" and {len(extra) - 8} more" if len(extra) > 8 else "")
    reads = ", ".join(short(fields[k], 40) for k in FORMAT_FIELDS[format])
    log.warning("%s: data.format %s reads %s and not the field%s %s of its rows (map names with data.fields)",
                name, format, reads, "s" if len(extra) > 1 else "", shown)


def warn_unknown_tokens(seqs, tokenizer, name) -> None:
    """One warning line when more than ``UNK_WARN_RATE`` of the tokens of ``seqs`` are the unknown token."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    total = sum(len(ids) for ids, _ in seqs)
    n = sum(ids.count(unk) for ids, _ in seqs)
    if total and n > UNK_WARN_RATE * total:
        log.warning("%s: %.1f %% of the tokens (%d of %d) are the tokenizer's unknown token %s: the tokenizer "
                    "does not cover this text (is it the model's own?)", name, 100 * n / total, n, total,
                    tokenizer.unk_token)


def _tokenize_prompt_response(rows, tokenizer, format, fields, add_eos, name):
    pairs = [prompt_response(r, format, fields, i, name) for i, r in enumerate(rows, 1)]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    out = []
    chunk_rows = 2048
    for s in range(0, len(pairs), chunk_rows):
        part = pairs[s:s + chunk_rows]
        p_ids = tokenizer([p for p, _ in part], add_special_tokens=True)["input_ids"]
        c_ids = tokenizer([c for _, c in part], add_special_tokens=False)["input_ids"]
        for p, c in zip(p_ids, c_ids):
            c = list(c) + eos
            out.append((list(p) + c, [False] * len(p) + [True] * len(c)))
    return out


def _tokenize_text(rows, tokenizer, fields, add_eos, name):
    tf = fields["text"]
    texts = [get_field(r, tf, i, name) for i, r in enumerate(rows, 1)]
    for i, t in enumerate(texts, 1):
        if not t.strip():
            raise ConfigError(f"{name} row {i}: field {short(tf, 40)} is empty")
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    out = []
    for s in range(0, len(texts), 2048):  # long texts are chunked afterwards: no length warning
        for ids in tokenizer(texts[s:s + 2048], add_special_tokens=True, verbose=False)["input_ids"]:
            ids = list(ids) + eos
            out.append((ids, [True] * len(ids)))
    return out


def chat_prompt(tokenizer, messages, chat_template=None) -> str:
    """The rendered chat prompt for generation: every message before the last assistant turn
    (``chat_template``: the template's text; ``None``: the tokenizer's own)."""
    return _chat_prompt(tokenizer, messages, chat_template, "the chat template", 1, "the conversation")


def _chat_prompt(tokenizer, messages, template, source, i, name):
    last = max((j for j, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return render_chat(tokenizer, messages[:last], template, source, i, name, generation=True)


def _tokenize_chat(rows, tokenizer, format, fields, template, source, name, progress):
    out = []
    it = enumerate(rows, 1)
    if progress:
        it = tqdm(it, total=len(rows), desc=f"tokenizing {name}", leave=False)
    for i, row in it:
        messages = row_messages(row, format, fields, i, name)
        # Render the conversation prefix by prefix; assistant turns are the text
        # the template adds between "prefix + generation prompt" and "prefix + reply".
        pieces, done = [], ""
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = render_chat(tokenizer, messages[:j], template, source, i, name, generation=True) if j else ""
            full = render_chat(tokenizer, messages[:j + 1], template, source, i, name)
            if not prefix.startswith(done) or not full.startswith(prefix):
                raise ConfigError(f"{name} row {i}: {source} does not render conversations "
                                  f"prefix by prefix; cannot locate assistant message {j}")
            pieces += [(prefix[len(done):], False), (full[len(prefix):], True)]
            done = full
        ids, tgt = [], []
        for text, is_target in pieces:
            if text:
                t = tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += t
                tgt += [is_target] * len(t)
        out.append((ids, tgt))
    return out


def qa_items(rows, tokenizer, *, format="prompt_completion", fields=None, chat_template=None, name="data.eval"):
    """Rows with gold answers -> ``(prompts, answers, add_special_tokens)`` for generation QA.

    Returns ``None`` when no row has an ``answers`` / ``answer`` field, and for ``text`` rows (no prompt).
    """
    fields = {**DEFAULT_FIELDS, **(fields or {})}
    check_format(format)
    if format == "text":
        return None
    answers = [get_answers(r, fields["answers"]) for r in rows]
    if not any(a for a in answers):
        return None
    chat = format in CHAT_FORMATS
    template, source = resolve_chat_template(chat_template, tokenizer, format) if chat else (None, "")
    prompts, golds = [], []
    for i, (row, ans) in enumerate(zip(rows, answers), 1):
        if not ans:
            continue
        if chat:
            messages = row_messages(row, format, fields, i, name)
            prompts.append(_chat_prompt(tokenizer, messages, template, source, i, name))
        elif format == "alpaca":
            prompts.append(alpaca_prompt(row, fields, i, name))
        else:
            prompts.append(get_field(row, fields["prompt"], i, name))
        golds.append(ans)
    return prompts, golds, not chat


def split_rows(n: int, fraction: float, seed: int):
    """Hold ``round(n * fraction)`` of ``n`` rows out for eval (at least 1, and 1 left to train on):
    ``(train indices, eval indices)``, each in file order. The choice depends on ``n``, ``fraction`` and
    ``seed`` alone (``random.Random(seed)``), the same on every machine."""
    if not 0 < fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in (0, 1) to split data.train, got {fraction}")
    if n < 2:
        raise ConfigError(f"data.eval_fraction needs at least 2 rows in data.train to split, got {n}")
    k = min(n - 1, max(1, round(n * fraction)))
    held = set(random.Random(seed).sample(range(n), k))
    return [i for i in range(n) if i not in held], sorted(held)


# ----------------------------------------------------------------------------- batching

def plan_epoch(lengths, batch_size, *, packing=False, max_length=512, seed=0, epoch=0, shuffle=True):
    """Split example indices into micro-batches for one epoch (a list of lists of indices).

    The order is a permutation drawn from a generator seeded with ``(seed, epoch)``,
    so every run with the same seed sees the same batches, whatever else it does.
    Without packing a micro-batch holds ``batch_size`` examples (the last one may
    hold fewer); with packing it holds as many consecutive examples as fit in
    ``batch_size * max_length`` tokens.
    """
    n = len(lengths)
    if shuffle:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % 2**64)  # any 64-bit seed
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    if not packing:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    budget = batch_size * max_length
    batches, cur, used = [], [], 0
    for idx in order:
        if cur and used + lengths[idx] > budget:
            batches.append(cur)
            cur, used = [], 0
        cur.append(idx)
        used += lengths[idx]
    if cur:
        batches.append(cur)
    return batches


def collate(examples, indices=None) -> dict:
    """Concatenate examples into one padding-free row.

    Returns a dict with ``input_ids``, ``position_ids`` and ``targets`` (all
    ``(1, T)`` int64), ``target_index`` (the positions of the tokens with a loss, int64,
    found here on the host so that the loss never has to look for them on the device),
    ``n_targets`` (their count) and ``n_tokens``.
    """
    chosen = examples if indices is None else [examples[i] for i in indices]
    ids, pos, tgt = [], [], []
    for ex in chosen:
        n = len(ex.input_ids)
        ids += ex.input_ids
        pos += range(n)
        # targets[t] = input_ids[t + 1] when token t + 1 is a completion token; nothing after the last token.
        tgt += [ex.input_ids[t + 1] if ex.is_target[t + 1] else IGNORE for t in range(n - 1)] + [IGNORE]
    as_row = lambda x: torch.tensor(x, dtype=torch.long).unsqueeze(0)  # noqa: E731
    index = torch.tensor([t for t, v in enumerate(tgt) if v != IGNORE], dtype=torch.long)
    return {"input_ids": as_row(ids), "position_ids": as_row(pos), "targets": as_row(tgt), "target_index": index,
            "n_targets": len(index), "n_tokens": len(ids)}


def pad_batch(batch: dict, tokens: int, targets: int) -> dict:
    """``batch`` (from ``collate``) padded to ``tokens`` tokens and ``targets`` target slots, for a step of fixed
    shapes (a CUDA graph). The padding tokens (id 0) form sequences of their own, their positions restarting at
    0 and never beyond the batch's longest real sequence (no position the model was not given), with no targets,
    so no real token attends to them; the extra target slots point at the row's last position, whose target is
    always ignored (every example ends with one). ``n_targets`` and ``n_tokens`` stay the real counts. Refuses
    a batch larger than the shape."""
    n, m = batch["n_tokens"], batch["n_targets"]
    if n > tokens or m > targets:
        raise ValueError(f"pad_batch: a batch of {n} tokens and {m} targets does not fit {tokens} and {targets}")
    extra = tokens - n
    longest = int(batch["position_ids"].max()) + 1 if n else 1  # a host tensor: no device read
    row = lambda t, fill: torch.cat([t, fill.unsqueeze(0)], dim=1)  # noqa: E731
    return {"input_ids": row(batch["input_ids"], torch.zeros(extra, dtype=torch.long)),
            "position_ids": row(batch["position_ids"], torch.arange(extra, dtype=torch.long) % longest),
            "targets": row(batch["targets"], torch.full((extra,), IGNORE, dtype=torch.long)),
            "target_index": torch.cat([batch["target_index"], torch.full((targets - m,), tokens - 1, dtype=torch.long)]),
            "n_targets": m, "n_tokens": n}


def eval_batches(examples, batch_size, max_length, packing=False):
    """Deterministic (unshuffled) padding-free batches over ``examples``."""
    plan = plan_epoch([len(e) for e in examples], batch_size, packing=packing, max_length=max_length, shuffle=False)
    return [collate(examples, b) for b in plan]
