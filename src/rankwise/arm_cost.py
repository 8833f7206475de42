"""How long an arm trains, estimated before it runs: the matmul FLOPs of its weights over the tokens it trains
on, at a sustained rate the user states for their GPU (``tflops``).

The model: a token costs 2 FLOPs per weight it multiplies in the forward and 2 in the input gradient of the
backward. Full SFT adds 2 for the weights' gradients (the usual 6 N per token); LoRA does not (the frozen
weights have no gradient) but adds 6 FLOPs per adapter parameter. Gradient checkpointing runs the forward
again (+2 N). Arms trained together each make their own pass (their activations differ after the first
adapted layer), so K arms cost K times one. The tokens are the rows' own (prompt, completion and EOS, cut at
``data.max_length``; ``data.eval_fraction``'s share held out), per epoch, or ``max_steps`` optimizer steps of the
mean row. Attention's scores, padding, the optimizer, evaluation and the host are not counted: the estimate is
a lower bound at that rate, and a small step that the host bounds takes longer.
"""
from __future__ import annotations

from . import config as C
from .arm_memory import model_shape
from .data import tokenize_rows

DEFAULT_TFLOPS = 80.0  # an assumed sustained bf16 rate for one 24 GB GPU; --tflops states the user's own


def matmul_params(shape: dict) -> int:
    """Weights a token multiplies: every parameter but the input embedding's (the output head counts)."""
    return shape["params"] - (0 if shape["tied"] else shape["vocab"] * shape["hidden"])


def train_tokens(cfg: C.RunConfig, rows: list, tokenizer) -> int:
    """The tokens one arm of ``cfg`` trains on over ``rows`` (prompt/completion rows, as the study writes them)."""
    cfg = C.parse(cfg)
    examples, _ = tokenize_rows(rows, tokenizer, max_length=cfg.data.max_length, warn=False)
    per_epoch = sum(len(e) for e in examples) * (1.0 - cfg.data.eval_fraction)  # the held-out rows do not train
    t = cfg.train
    if t.epochs is not None:
        return int(round(per_epoch * t.epochs))
    per_row = cfg.data.max_length if cfg.data.packing else per_epoch / max(1, len(examples))
    return int(round(t.max_steps * t.grad_accum * t.batch_size * per_row))


def train_flops(cfg: C.RunConfig, tokens: int, ranks=None, shape: dict | None = None) -> float:
    """FLOPs of training ``tokens`` with ``cfg``: full SFT (``ranks`` None) or LoRA arms of ``ranks`` together."""
    cfg = C.parse(cfg)
    s = shape or model_shape(cfg)
    n = matmul_params(s)
    recompute = 2 if cfg.train.gradient_checkpointing else 0
    if ranks is None:
        return float((6 + recompute) * n * tokens)
    io = sum(i + o for i, o in s["targets"].values())
    return float(sum((4 + recompute) * n + 6 * int(r) * io for r in ranks) * tokens)


def duration(flops: float, tflops: float) -> str:
    """``flops`` at ``tflops`` TFLOP/s, as a short duration (``"3.2 min"``)."""
    seconds = flops / (tflops * 1e12)
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
