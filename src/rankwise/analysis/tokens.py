"""Token-level shift at the first answer token (as in Ye et al., 2025).

For a prompt, take the next-token logits of the tuned model, keep its top-``k``
token ids (k = 10), take the base model's logits at the same ids, softmax each
restricted set, and report ``KL(tuned ‖ base) = Σ p_t log(p_t / p_b)``. The
mean is reported per mastery bucket (rows may carry a ``bucket`` field; rows
without one form the group ``"all"``). Running the models is
:mod:`rankwise.analysis.probe`'s job (``token_kl_by_bucket``).
"""
from __future__ import annotations

import torch

__all__ = ["first_token_kl", "group_by_bucket"]


def first_token_kl(tuned_logits: torch.Tensor, base_logits: torch.Tensor, k: int = 10) -> torch.Tensor:
    """KL(tuned top-k ‖ base at the same ids), per row.

    Args:
        tuned_logits, base_logits: ``(n, vocab)`` next-token logits of the same prompts.
        k: how many of the tuned model's top logits to keep (capped at the vocabulary size).

    Returns:
        ``(n,)`` fp32 tensor of non-negative KL values (nats).
    """
    if tuned_logits.dim() != 2 or tuned_logits.shape != base_logits.shape:
        raise ValueError(
            f"tuned_logits and base_logits must both be (n, vocab) of the same shape, got "
            f"{tuple(tuned_logits.shape)} and {tuple(base_logits.shape)}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    k = min(k, tuned_logits.shape[-1])
    t = tuned_logits.float()
    b = base_logits.float().to(t.device)
    top, ids = t.topk(k, dim=-1)
    log_pt = torch.log_softmax(top, dim=-1)
    log_pb = torch.log_softmax(b.gather(-1, ids), dim=-1)
    return (log_pt.exp() * (log_pt - log_pb)).sum(-1).clamp_min(0.0)


def group_by_bucket(values, rows) -> dict:
    """Mean of ``values`` per ``bucket`` of ``rows`` (``"all"`` when rows carry none), plus ``"overall"``."""
    groups: dict = {}
    for v, row in zip(values, rows):
        key = str(row.get("bucket", "all")) if isinstance(row, dict) else "all"
        groups.setdefault(key, []).append(float(v))
    out = {key: {"mean": sum(vs) / len(vs), "n": len(vs)} for key, vs in sorted(groups.items())}
    allv = [float(v) for v in values]
    out_all = {"mean": (sum(allv) / len(allv)) if allv else 0.0, "n": len(allv)}
    return {"by_bucket": out, "overall": out_all}
