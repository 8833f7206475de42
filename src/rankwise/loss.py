"""The training loss of a causal LM through the fused linear + cross entropy op.

``FusedLossLM`` wraps a Hugging Face causal LM: its forward runs the decoder
(``model.base_model``) and hands the final hidden states at the target positions
with the output head's weight to ``rankwise.kernels.linear_cross_entropy``, so
the ``(tokens, vocab)`` logits are never held in memory (one chunk at a time).
``batch_loss_sum(model, batch)`` is the summed training loss of one padding-free
batch for either kind of model (a plain causal LM or a ``FusedLossLM``); the
training loop and ``rankwise.evaluate`` both call it, so this module sits below
``rankwise.evaluate`` and imports nothing from it.

Models whose logits are not ``lm_head(hidden)`` (Gemma's soft-capping, Cohere's
logit scale, a LoRA-wrapped or quantized head, ...) are refused by
``fused_loss_problem``; ``check_fused_loss`` also compares the two losses on a
real batch, so a head computed some other way is caught rather than trained on.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
from torch import nn

from rankwise.kernels import linear_cross_entropy

# config attributes that change the logits after the output head
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                     "mup_width_multiplier", "dim_model_base")


def fused_loss_problem(model: nn.Module, allow_softcap: bool = False) -> Optional[str]:
    """Why the fused loss cannot stand in for ``model``'s own logits, or None when it can.

    ``allow_softcap``: the caller applies ``config.final_logit_softcapping`` itself
    (``linear_cross_entropy(..., softcap=)``), so it is no problem."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return "the model has no output embeddings (get_output_embeddings() is None)"
    if type(head) is not nn.Linear:
        return f"its output head is a {type(head).__name__}, not a plain nn.Linear"
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return "the model has no separate decoder (base_model)"
    cfg = getattr(model, "config", None)
    for key in _LOGIT_TRANSFORMS:
        if allow_softcap and key == "final_logit_softcapping":
            continue
        if getattr(cfg, key, None) not in (None, 1, 1.0):
            return f"its config sets {key}={getattr(cfg, key)!r}, which changes the logits after the head"
    return None


def fused_head_fp32(model: nn.Module) -> bool:
    """Whether the output head computes in fp32 (the loss check's tolerance depends on it)."""
    return model.get_output_embeddings().weight.dtype == torch.float32


def packed_attention_mask(model: nn.Module, position_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """The attention mask of padding-free rows of packed sequences, built on the device with no value read back.

    ``position_ids`` ``(B, T)`` restart for each sequence of a row; a sequence starts where the position does
    not follow the previous one (``diff != 1``), as transformers finds them. Token i attends to tokens j <= i of
    its own sequence: ``(B, 1, T, T)``, bool for ``sdpa`` attention and 0 / ``finfo.min`` in the embeddings'
    dtype for ``eager``, the masks transformers would build from ``position_ids`` after reading them back to
    the host to see whether a row is packed (a sync per forward on a GPU). Given a 4D mask, transformers uses it
    as it is. None for other attention implementations (flash attention, flex, ...), which take the position
    ids themselves.
    """
    core = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    impl = getattr(getattr(core, "config", None), "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return None
    first = position_ids[:, :1] - 1
    sequence = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    n = position_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    mask = ((sequence[:, :, None] == sequence[:, None, :]) & causal)[:, None]
    if impl == "eager":
        dtype = core.get_input_embeddings().weight.dtype
        mask = torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)
    return mask


class FusedLossLM(nn.Module):
    """``forward(input_ids, position_ids, targets, attention_mask=None, target_index=None)`` -> summed
    cross entropy (fp32) over the positions where ``targets != -100``.

    Wrap the model with this before ``DistributedDataParallel`` so gradients are
    synchronised through DDP's forward.

    Args:
        model: a Hugging Face causal LM whose logits are ``lm_head(hidden)``.
        chunk_size: rows of logits per chunk (None: the op's default).
        backend: passed to ``rankwise.kernels.linear_cross_entropy`` ("auto", "triton", "torch").
        check_targets: whether the op reads the targets back to refuse a class index outside the
            vocabulary (one read per forward); ``rankwise train`` checks its data's token ids once
            on the host instead and passes False.
    """

    def __init__(self, model: nn.Module, chunk_size: Optional[int] = None, backend: str = "auto",
                 check_targets: bool = True):
        super().__init__()
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
        problem = fused_loss_problem(model)
        if problem:
            raise ValueError(f"model: the fused loss cannot be used: {problem}")
        self.model = model
        self.chunk_size = chunk_size
        self.backend = backend
        self.check_targets = check_targets

    def forward(self, input_ids, position_ids, targets, attention_mask=None, target_index=None):
        """``targets`` has ``input_ids``' shape and is already aligned (the next token
        at each position, -100 where no loss is wanted); ``attention_mask`` for padded
        batches (2D), or a prepared 4D one; rankwise's own rows are padding-free and get
        ``packed_attention_mask``'s. ``target_index``: the flat positions of the targets
        that are not -100, when the caller knows them (else found with ``nonzero``, a read)."""
        if attention_mask is None and position_ids is not None:
            attention_mask = packed_attention_mask(self.model, position_ids)
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        out = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        targets = targets.reshape(-1)
        keep = (targets != -100).nonzero().squeeze(1) if target_index is None else target_index
        head = self.model.get_output_embeddings()
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1])[keep], head.weight, targets[keep],
                                    head.bias, reduction="sum", chunk_size=self.chunk_size,
                                    backend=self.backend, check_targets=self.check_targets)


def _accepts_logits_to_keep(model) -> bool:
    core = getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module
    try:
        return "logits_to_keep" in inspect.signature(core.forward).parameters
    except (TypeError, ValueError):
        return False


def batch_loss_sum(model, batch) -> torch.Tensor:
    """Summed cross entropy (fp32) over the target tokens of a padding-free batch.

    ``batch`` is a dict from ``rankwise.data.collate`` (``input_ids``,
    ``position_ids``, ``targets``, each of shape (1, tokens), and ``target_index``, the
    target positions found on the host; a batch without it has them found on the device). A
    ``FusedLossLM`` (or DDP around one) computes the sum without any full logits.
    Otherwise, when the model takes ``logits_to_keep`` (Hugging Face causal LMs do), the
    output head runs only at the target positions, which saves the ``(tokens, vocab)``
    logits of the prompt tokens. The packed sequences' attention mask is built on the
    device (``packed_attention_mask``), so the forward reads nothing back to the host.
    """
    dev = next(model.parameters()).device
    index = batch.get("target_index")
    position_ids = batch["position_ids"].to(dev)
    if isinstance(getattr(model, "module", model), FusedLossLM):  # through DDP's forward when wrapped
        return model(batch["input_ids"].to(dev), position_ids, batch["targets"].to(dev),
                     target_index=None if index is None else index.to(dev))
    targets = batch["targets"][0]
    inputs = {"input_ids": batch["input_ids"].to(dev), "position_ids": position_ids, "use_cache": False}
    mask = packed_attention_mask(model, position_ids)
    if mask is not None:
        inputs["attention_mask"] = mask
    if _accepts_logits_to_keep(model):
        keep = (targets != -100).nonzero().squeeze(1) if index is None else index  # on the host
        logits = model(**inputs, logits_to_keep=keep.to(dev)).logits[0]
        targets = targets[keep]
    else:
        logits = model(**inputs).logits[0]
    return torch.nn.functional.cross_entropy(logits.float(), targets.to(dev), ignore_index=-100, reduction="sum")


@torch.no_grad()
def check_fused_loss(model: nn.Module, fused: FusedLossLM, batch, autocast, rtol: float) -> Optional[str]:
    """Compare the fused loss with the model's own on ``batch`` (eval mode, no
    gradients, torch's RNG untouched); returns a description of a mismatch or None."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]), autocast():
            ref = float(batch_loss_sum(model, batch))
            ours = float(batch_loss_sum(fused, batch))
    finally:
        model.train(was_training)
    if not (math.isfinite(ref) and math.isfinite(ours)) or abs(ours - ref) > rtol * max(abs(ref), 1e-6):
        return f"fused loss {ours:.6g} vs the model's {ref:.6g} on the first batch"
    return None
