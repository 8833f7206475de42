"""One forward pass of base and tuned model over a probe set, feeding every probe metric.

The attention maps, hidden states and first-answer-token logits of a batch are
consumed as soon as both models have produced them, so memory stays at one batch
of maps (plus the capped hidden-state sample for CKA).

Imports run one way: this module imports the pure metric functions of
:mod:`.attention`, :mod:`.representations` and :mod:`.tokens` (which import no
other analysis module) and holds every entry point that needs the models:
:func:`compare_on_probe`, :func:`compare_attention`, :func:`compare_representations`
and :func:`token_kl_by_bucket`.
"""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from .attention import eager_attention, layer_attention_sums
from .representations import linear_cka
from .tokens import first_token_kl, group_by_bucket

__all__ = ["compare_on_probe", "compare_attention", "compare_representations", "token_kl_by_bucket",
           "encode_prompts"]


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def encode_prompts(tokenizer, rows, max_length: int) -> list:
    """Token ids of each row's ``prompt``; long prompts keep their last ``max_length`` tokens."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"probe row {i} must be a dict with a string 'prompt' field, got {row!r:.80}")
        ids = tokenizer(row["prompt"])["input_ids"]
        if len(ids) == 0:
            raise ValueError(f"probe row {i}: prompt encodes to zero tokens")
        out.append(list(ids[-max_length:]))
    return out


def _batches(encoded, batch_size: int, pad_id: int, device):
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        T = max(len(x) for x in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, x in enumerate(chunk):  # right padding: positions stay 0..len-1
            ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[b, : len(x)] = 1
        lengths = mask.sum(1)
        yield start, ids.to(device), mask.to(device), lengths.to(device)


def _probe_inputs(base_model, tuned_model, tokenizer, rows: list, batch_size: int, max_length: int):
    """Checked inputs of a probe pass: ``(encoded prompts, pad id, device)``."""
    if not rows:
        raise ValueError("probe rows must not be empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = _device_of(base_model)
    if _device_of(tuned_model) != device:
        raise ValueError(f"base_model and tuned_model must be on the same device, "
                         f"got {device} and {_device_of(tuned_model)}")
    encoded = encode_prompts(tokenizer, rows, max_length)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    return encoded, pad_id, device


class _ProbeTotals:
    """Running sums of one probe pass, fed batch by batch with both models' outputs."""

    def __init__(self, attention: bool, representations: bool, tokens: bool, kl_k: int, max_tokens: int):
        self.attention, self.representations, self.tokens = attention, representations, tokens
        self.kl_k, self.max_tokens = kl_k, max_tokens
        self.att = None  # per layer [hb_sum, ht_sum, js_sum]
        self.n_queries = 0
        self.feats_b: list = []
        self.feats_t: list = []
        self.n_feat = 0
        self.kls: list = []

    def add(self, ob, ot, ids, mask, lengths) -> None:
        """Fold one batch's outputs (``ob`` of the base, ``ot`` of the tuned model) into the sums."""
        if self.attention:
            self._add_attention(ob, ot, mask)
        if self.representations and self.n_feat < self.max_tokens:
            self._add_hidden_states(ob, ot, mask)
        if self.tokens:
            ar = torch.arange(ids.shape[0], device=ids.device)
            last = lengths - 1
            self.kls.append(first_token_kl(ot.logits[ar, last], ob.logits[ar, last], k=self.kl_k).cpu())

    def _add_attention(self, ob, ot, mask) -> None:
        """Per layer and head: entropy of base and tuned attention rows and their JS distance, summed over queries."""
        if ob.attentions is None or ot.attentions is None:
            raise RuntimeError("the model returned no attention maps despite eager attention")
        if self.att is None:
            self.att = [[0.0, 0.0, 0.0] for _ in ob.attentions]
        for li, (ab, at) in enumerate(zip(ob.attentions, ot.attentions)):
            hb, ht, js = layer_attention_sums(ab, at, mask)
            acc = self.att[li]
            acc[0] = acc[0] + hb.cpu()
            acc[1] = acc[1] + ht.cpu()
            acc[2] = acc[2] + js.cpu()
        self.n_queries += int(mask.sum())

    def _add_hidden_states(self, ob, ot, mask) -> None:
        """Hidden states of the batch's non-padding tokens, on the CPU in fp32, up to ``max_tokens`` in all."""
        sel = mask.bool()
        take = min(int(sel.sum()), self.max_tokens - self.n_feat)
        if not self.feats_b:
            self.feats_b = [[] for _ in ob.hidden_states]
            self.feats_t = [[] for _ in ot.hidden_states]
        for li, (hb, ht) in enumerate(zip(ob.hidden_states, ot.hidden_states)):
            self.feats_b[li].append(hb[sel][:take].float().cpu())
            self.feats_t[li].append(ht[sel][:take].float().cpu())
        self.n_feat += take

    def results(self, rows: list) -> dict:
        """The requested metrics: mean attention entropy / JS distance per query, CKA per layer, KL per bucket."""
        out: dict = {}
        if self.attention:
            n = max(self.n_queries, 1)
            out["attention"] = {
                "entropy_base": [[float(v) for v in (a[0] / n)] for a in self.att],
                "entropy_tuned": [[float(v) for v in (a[1] / n)] for a in self.att],
                "js_distance": [[float(v) for v in (a[2] / n)] for a in self.att],
                "n_queries": self.n_queries,
            }
        if self.representations:
            cka = []
            for fb, ft in zip(self.feats_b, self.feats_t):
                X, Y = torch.cat(fb), torch.cat(ft)
                cka.append(linear_cka(X, Y) if X.shape[0] >= 2 else float("nan"))
            out["representations"] = {"cka": cka, "n_tokens": self.n_feat}
        if self.tokens:
            values = torch.cat(self.kls).tolist()
            res = group_by_bucket(values, rows)
            res["k"] = self.kl_k
            out["tokens"] = res
        return out


@torch.no_grad()
def compare_on_probe(base_model, tuned_model, tokenizer, rows, *, attention: bool = True,
                     representations: bool = True, tokens: bool = True, kl_k: int = 10,
                     batch_size: int = 8, max_length: int = 256, max_tokens: int = 2048,
                     progress: bool = False) -> dict:
    """Run both models over ``rows`` once and return the requested probe metrics.

    Returns a dict with keys ``"attention"``, ``"representations"``, ``"tokens"``
    (only those requested); see :func:`rankwise.analysis.compare_attention`,
    :func:`rankwise.analysis.compare_representations` and
    :func:`rankwise.analysis.token_kl_by_bucket` for their contents.
    """
    rows = list(rows)
    encoded, pad_id, device = _probe_inputs(base_model, tuned_model, tokenizer, rows, batch_size, max_length)
    totals = _ProbeTotals(attention, representations, tokens, kl_k, max_tokens)

    was_training = (base_model.training, tuned_model.training)
    base_model.eval()
    tuned_model.eval()
    stack = contextlib.ExitStack()
    if attention:  # eager attention for this pass only (the only implementation returning maps)
        stack.enter_context(eager_attention(base_model))
        stack.enter_context(eager_attention(tuned_model))
    batches = _batches(encoded, batch_size, int(pad_id), device)
    if progress:
        batches = tqdm(batches, total=(len(encoded) + batch_size - 1) // batch_size, desc="probe", leave=False)
    try:
        with stack:
            for _, ids, mask, lengths in batches:
                kw = dict(input_ids=ids, attention_mask=mask, use_cache=False,
                          output_attentions=attention, output_hidden_states=representations)
                ob = base_model(**kw)
                ot = tuned_model(**kw)
                totals.add(ob, ot, ids, mask, lengths)
                del ob, ot
    finally:
        base_model.train(was_training[0])
        tuned_model.train(was_training[1])
    return totals.results(rows)


def _as_rows(prompts) -> list:
    return [p if isinstance(p, dict) else {"prompt": p} for p in prompts]


def compare_attention(base_model, tuned_model, tokenizer, prompts, *, batch_size: int = 8,
                      max_length: int = 256, progress: bool = False) -> dict:
    """Per layer and head: attention entropy of both models and their JS distance on ``prompts``.

    Args:
        base_model, tuned_model: causal LMs of the same architecture, on the same device.
        tokenizer: tokenizer of the base model.
        prompts: list of strings (or probe rows with a ``prompt`` field).

    Returns:
        ``{"entropy_base": [[H] * L], "entropy_tuned": ..., "js_distance": ..., "n_queries": int}``.
    """
    res = compare_on_probe(base_model, tuned_model, tokenizer, _as_rows(prompts), attention=True,
                           representations=False, tokens=False, batch_size=batch_size,
                           max_length=max_length, progress=progress)
    return res["attention"]


def compare_representations(base_model, tuned_model, tokenizer, prompts, *, batch_size: int = 8,
                            max_length: int = 256, max_tokens: int = 2048, progress: bool = False) -> dict:
    """Linear CKA between base and tuned hidden states, per layer (index 0 = embeddings).

    Hidden states of every non-padding prompt token are collected (at most
    ``max_tokens`` tokens, on the CPU in fp32) and compared layer by layer.

    Returns:
        ``{"cka": [float] * (num_layers + 1), "n_tokens": int}``.
    """
    res = compare_on_probe(base_model, tuned_model, tokenizer, _as_rows(prompts), attention=False,
                           representations=True, tokens=False, batch_size=batch_size,
                           max_length=max_length, max_tokens=max_tokens, progress=progress)
    return res["representations"]


def token_kl_by_bucket(base_model, tuned_model, tokenizer, rows, *, k: int = 10, batch_size: int = 8,
                       max_length: int = 256, progress: bool = False) -> dict:
    """Mean first-answer-token KL(tuned ‖ base) per mastery bucket on probe ``rows``.

    Args:
        rows: dicts with a ``prompt`` (the text right before the answer) and optionally ``bucket``.

    Returns:
        ``{"by_bucket": {bucket: {"mean", "n"}}, "overall": {"mean", "n"}, "k": k}``.
    """
    res = compare_on_probe(base_model, tuned_model, tokenizer, rows, attention=False,
                           representations=False, tokens=True, kl_k=k, batch_size=batch_size,
                           max_length=max_length, progress=progress)
    return res["tokens"]
