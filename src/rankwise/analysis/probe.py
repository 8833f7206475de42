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
    if not rows:
        raise ValueError("probe rows must not be empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = _device_of(base_model)
    if _device_of(tuned_model) != device:
        raise ValueError(f"base_model and tuned_model must be on the same device, got {device} and {_device_of(tuned_model)}")
    encoded = encode_prompts(tokenizer, rows, max_length)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0

    att = None  # per layer [hb_sum, ht_sum, js_sum]
    n_queries = 0
    feats_b: list = []
    feats_t: list = []
    n_feat = 0
    kls: list = []

    was_training = (base_model.training, tuned_model.training)
    base_model.eval()
    tuned_model.eval()
    stack = contextlib.ExitStack()
    if attention:  # eager attention for this pass only (the only implementation returning maps)
        stack.enter_context(eager_attention(base_model))
        stack.enter_context(eager_attention(tuned_model))
    batches = _batches(encoded, batch_size, int(pad_id), device)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=(len(encoded) + batch_size - 1) // batch_size, desc="probe", leave=False)
    try:
        with stack:
            for _, ids, mask, lengths in batches:
                kw = dict(input_ids=ids, attention_mask=mask, use_cache=False,
                          output_attentions=attention, output_hidden_states=representations)
                ob = base_model(**kw)
                ot = tuned_model(**kw)
                if attention:
                    if ob.attentions is None or ot.attentions is None:
                        raise RuntimeError("the model returned no attention maps despite eager attention")
                    if att is None:
                        att = [[0.0, 0.0, 0.0] for _ in ob.attentions]
                    for li, (ab, at) in enumerate(zip(ob.attentions, ot.attentions)):
                        hb, ht, js = layer_attention_sums(ab, at, mask)
                        acc = att[li]
                        acc[0] = acc[0] + hb.cpu()
                        acc[1] = acc[1] + ht.cpu()
                        acc[2] = acc[2] + js.cpu()
                    n_queries += int(mask.sum())
                if representations and n_feat < max_tokens:
                    sel = mask.bool()
                    take = min(int(sel.sum()), max_tokens - n_feat)
                    if not feats_b:
                        feats_b = [[] for _ in ob.hidden_states]
                        feats_t = [[] for _ in ot.hidden_states]
                    for li, (hb, ht) in enumerate(zip(ob.hidden_states, ot.hidden_states)):
                        feats_b[li].append(hb[sel][:take].float().cpu())
                        feats_t[li].append(ht[sel][:take].float().cpu())
                    n_feat += take
                if tokens:
                    ar = torch.arange(ids.shape[0], device=ids.device)
                    last = lengths - 1
                    kls.append(first_token_kl(ot.logits[ar, last], ob.logits[ar, last], k=kl_k).cpu())
                del ob, ot
    finally:
        base_model.train(was_training[0])
        tuned_model.train(was_training[1])

    out: dict = {}
    if attention:
        n = max(n_queries, 1)
        out["attention"] = {
            "entropy_base": [[float(v) for v in (a[0] / n)] for a in att],
            "entropy_tuned": [[float(v) for v in (a[1] / n)] for a in att],
            "js_distance": [[float(v) for v in (a[2] / n)] for a in att],
            "n_queries": n_queries,
        }
    if representations:
        cka = []
        for fb, ft in zip(feats_b, feats_t):
            X, Y = torch.cat(fb), torch.cat(ft)
            cka.append(linear_cka(X, Y) if X.shape[0] >= 2 else float("nan"))
        out["representations"] = {"cka": cka, "n_tokens": n_feat}
    if tokens:
        values = torch.cat(kls).tolist()
        res = group_by_bucket(values, rows)
        res["k"] = kl_k
        out["tokens"] = res
    return out


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
