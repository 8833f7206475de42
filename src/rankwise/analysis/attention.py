"""Attention structure: per-head entropy and base-vs-tuned Jensen–Shannon distance.

For an attention row ``p`` (the softmax weights of one query over its keys):

- entropy ``H(p) = -Σ_k p_k log p_k`` (nats), averaged over the valid query
  positions of the probe set, per layer and head;
- Jensen–Shannon distance ``sqrt(JSD(p, q))`` with
  ``JSD = ½ KL(p‖m) + ½ KL(q‖m)``, ``m = (p + q) / 2``, in bits, so it lies in
  ``[0, 1]``; averaged the same way, between the base and tuned rows of the
  same query.

The maps come from eager attention (the only implementation that returns them);
:func:`eager_attention` switches a model to it for one pass and restores the
previous implementation afterwards. Running the models over a probe set is
:mod:`rankwise.analysis.probe`'s job (``compare_attention``); this module holds
the metrics only.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["attention_entropy", "js_distance", "layer_attention_sums", "eager_attention"]

_LN2 = 0.6931471805599453


def attention_entropy(attn: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean entropy (nats) of attention rows, per head.

    Args:
        attn: ``(batch, heads, q_len, k_len)`` attention probabilities (rows sum to 1).
        query_mask: optional ``(batch, q_len)`` 0/1 mask of the queries to average over.

    Returns:
        ``(heads,)`` fp32 tensor.
    """
    if not isinstance(attn, torch.Tensor) or attn.dim() != 4:
        raise ValueError(f"attn must be a (batch, heads, q_len, k_len) tensor, got {getattr(attn, 'shape', type(attn))}")
    p = attn.float()
    h = -torch.special.xlogy(p, p).sum(-1)  # (B, H, Q)
    return _masked_mean_over_queries(h, query_mask)


def js_distance(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Jensen–Shannon distance (base-2, in ``[0, 1]``) between distributions along ``dim``."""
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}")
    p = p.float()
    q = q.float()
    m = 0.5 * (p + q)
    # KL(p‖m) with 0·log(0/·) = 0; where p > 0, m > 0 too.
    kl_pm = (torch.special.xlogy(p, p) - torch.special.xlogy(p, m)).sum(dim)
    kl_qm = (torch.special.xlogy(q, q) - torch.special.xlogy(q, m)).sum(dim)
    jsd = (0.5 * (kl_pm + kl_qm) / _LN2).clamp_(0.0, 1.0)
    return jsd.sqrt()


def _masked_mean_over_queries(x: torch.Tensor, query_mask) -> torch.Tensor:
    """``x``: (B, H, Q) -> (H,), averaging over batch and valid queries."""
    if query_mask is None:
        return x.mean(dim=(0, 2))
    w = query_mask.to(x.dtype)[:, None, :]  # (B, 1, Q)
    if w.shape[0] != x.shape[0] or w.shape[2] != x.shape[2]:
        raise ValueError(f"query_mask must have shape (batch, q_len) = {(x.shape[0], x.shape[2])}, got {tuple(query_mask.shape)}")
    return (x * w).sum(dim=(0, 2)) / w.sum().clamp_min(1.0)


def layer_attention_sums(attn_base: torch.Tensor, attn_tuned: torch.Tensor, query_mask: torch.Tensor):
    """Sums (not means) over the valid queries of one layer, per head.

    Args:
        attn_base, attn_tuned: ``(batch, heads, q_len, k_len)`` attention maps of the same inputs.
        query_mask: ``(batch, q_len)`` 0/1 mask of the valid queries.

    Returns:
        ``(entropy_base, entropy_tuned, js_distance)``, each ``(heads,)`` fp32; divide by the
        number of valid queries for the means.
    """
    w = query_mask.float()[:, None, :]
    pb, pt = attn_base.float(), attn_tuned.float()
    hb = (-torch.special.xlogy(pb, pb).sum(-1) * w).sum(dim=(0, 2))
    ht = (-torch.special.xlogy(pt, pt).sum(-1) * w).sum(dim=(0, 2))
    js = (js_distance(pb, pt) * w).sum(dim=(0, 2))
    return hb, ht, js


@contextmanager
def eager_attention(model):
    """Switch ``model`` to eager attention inside the block, then restore the previous implementation."""
    config = getattr(model, "config", None)
    prev = getattr(config, "_attn_implementation", None)
    switched = prev != "eager"
    if switched:
        if not hasattr(model, "set_attn_implementation"):
            raise TypeError("model must be a transformers PreTrainedModel (needs set_attn_implementation)")
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if switched and prev is not None:
            model.set_attn_implementation(prev)
