"""One call that routes a Hugging Face causal LM (or a PEFT model around one) through
rankwise's fused kernels, per instance and reversibly, keeping its call signature.

``patch_model(model)`` patches, each only where it checks out:

- ``lora``: PEFT's LoRA layers (``lora.Linear`` and QLoRA's ``lora.bnb.Linear4bit``)
  -> ``rankwise.lora.patch_peft_model`` (the fused LoRA op, NF4 bases read in place);
- ``norms`` / ``mlp``: RMSNorms (Llama's form and Gemma's ``1 + weight``) and gated
  MLPs (SwiGLU, GeGLU, Phi-3's fused ``gate_up_proj``) -> ``rankwise.decoder_kernels.patch_decoder_kernels``;
- ``loss``: the causal LM's ``forward`` is rebound on the instance. In training mode,
  when labels are given, it runs the decoder, then the output head and the model's
  own loss (``ForCausalLMLoss``: labels shifted by one, ``ignore_index`` -100, the mean
  over the target tokens, or the sum divided by ``num_items_in_batch`` when the trainer
  passes it under gradient accumulation) through ``rankwise.kernels.linear_cross_entropy``
  with the final-logit soft-cap of Gemma 2 / 3 (``softcap=``), and returns
  ``CausalLMOutputWithPast(loss=..., logits=None)``: the ``(tokens, vocab)`` logits are
  never held (``return_logits=True``: computed after the loss, without gradient, for
  trainers that log metrics from them, as TRL's ``SFTTrainer`` does). In eval mode, or without labels, the model's own forward runs (eval and
  generation get their logits). The rebound forward keeps the original's signature
  (``inspect.signature`` sees it), so ``Trainer`` and TRL's ``SFTTrainer`` drop the same
  columns and pass ``num_items_in_batch`` as before.

Each kind is checked once at patch time against the module's own forward (the norms
and MLPs on a random input per class, one LoRA layer per layer class and base class,
the loss on a random padded batch with and without ``num_items_in_batch``); a kind that
disagrees is undone and reported. ``unpatch_model`` restores every forward. The checks
leave bitsandbytes' 4-bit weights as they are (``patch.check_mode``: in eval mode without
gradients bitsandbytes rewrites them in place on AVX512-BF16 CPUs), and the LoRA check
takes a 4-bit base's product from its NF4 bytes, not from bitsandbytes' kernels.
"""
from __future__ import annotations

import inspect
import logging
import math
import types
from typing import Optional

import torch
from torch import nn

from rankwise.kernels import linear_cross_entropy
from rankwise.kernels.nf4 import nf4_dequantize
from rankwise.lora import patch_peft_model, peft_fusion_report, unpatch_peft_model
from rankwise.loss import fused_loss_problem
from rankwise.decoder_kernels import agrees, check_mode, patch_decoder_kernels, unpatch_decoder_kernels
from rankwise.quant import bnb_linear4bit_class, from_bnb

log = logging.getLogger("rankwise")

_LOSS_MARK = "_rankwise_fused_loss"  # on the causal LM: (softcap, backend, return_logits) while its forward is rebound
_LOSS_PREV = "_rankwise_loss_prev_forward"  # an instance-level forward it had before


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT model (``get_base_model``), else the model."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _fused_loss_output(lm: nn.Module, arguments: dict, extra: dict):
    """The causal LM's forward with labels, the head and loss fused; ``arguments`` are
    the bound named arguments of its forward, ``extra`` its ``**kwargs``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast  # heavy at import: transformers

    softcap, backend, return_logits = getattr(lm, _LOSS_MARK)
    arguments, extra = dict(arguments), dict(extra)
    labels = arguments.pop("labels", None)
    arguments.pop("logits_to_keep", None)
    num_items = extra.pop("num_items_in_batch", None)
    shift_labels = extra.pop("shift_labels", None)
    ignore_index = extra.pop("ignore_index", -100)
    return_dict = extra.pop("return_dict", None)
    out = lm.base_model(**arguments, **extra)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    head = lm.get_output_embeddings()
    hidden = hidden.to(head.weight.device)  # a model split over devices: the head's
    if shift_labels is None:  # ForCausalLMLoss: position t predicts labels[t + 1]
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    keep = (targets != ignore_index).nonzero().squeeze(1)
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1])[keep], head.weight, targets[keep], head.bias,
                                ignore_index=ignore_index, reduction="sum", softcap=softcap, backend=backend)
    if num_items is None:
        loss = loss / keep.numel()  # the mean over the target tokens (nan when there are none, as torch's)
    else:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    logits = None
    if return_logits:  # for trainers that log metrics from them; outside autograd: the loss never uses them
        with torch.no_grad():
            logits = nn.functional.linear(hidden, head.weight, head.bias)
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
    result = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=getattr(out, "past_key_values", None),
                                    hidden_states=getattr(out, "hidden_states", None),
                                    attentions=getattr(out, "attentions", None))
    if return_dict is None:
        return_dict = getattr(lm.config, "return_dict", True)
    return result if return_dict else result.to_tuple()


class _FusedLossForward:
    """The ``forward`` that ``patch_model`` sets on a causal LM instance: the fused head +
    loss in training mode with labels, the model's own forward otherwise. A callable
    object rather than a closure so that ``copy.deepcopy`` (a reference model, say)
    rebinds it to the copy and ``pickle`` finds it; ``__signature__`` is the original
    forward's, which is what ``inspect.signature`` (and so ``Trainer``) reads."""

    def __init__(self, lm: nn.Module, signature: inspect.Signature):
        self.lm = lm
        self.__signature__ = signature
        self.var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    def original(self):
        """The forward the model had: an instance-level one (a hook) or its class's."""
        prev = self.lm.__dict__.get(_LOSS_PREV)
        return prev if prev is not None else types.MethodType(type(self.lm).forward, self.lm)

    def split(self, args, kwargs) -> tuple[dict, dict]:
        """(the named arguments bound to the original signature, its ``**kwargs``)."""
        arguments = dict(self.__signature__.bind(*args, **kwargs).arguments)
        return arguments, (arguments.pop(self.var_kw, {}) if self.var_kw else {})

    def __call__(self, *args, **kwargs):
        if not self.lm.training:
            return self.original()(*args, **kwargs)
        arguments, extra = self.split(args, kwargs)
        if arguments.get("labels") is None and extra.get("shift_labels") is None:
            return self.original()(*args, **kwargs)
        if arguments.get("labels") is None:
            arguments["labels"] = extra["shift_labels"]  # only its shape is used then
        return _fused_loss_output(self.lm, arguments, extra)


def _loss_problem(lm: nn.Module) -> Optional[str]:
    problem = fused_loss_problem(lm, allow_softcap=True)
    if problem:
        return problem
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss  # heavy at import: transformers
    except ImportError:  # pragma: no cover
        return "transformers has no ForCausalLMLoss"
    if getattr(lm, "loss_function", None) is not ForCausalLMLoss:
        return "its loss_function is not transformers' ForCausalLMLoss"
    try:
        params = inspect.signature(lm.forward).parameters
    except (TypeError, ValueError):
        return "its forward has no signature"
    if "labels" not in params:
        return "its forward takes no labels"
    return None


def _check_batch(lm: nn.Module):
    """A random right-padded batch of 2 x 7 tokens with ignored label positions."""
    gen = torch.Generator().manual_seed(0)
    vocab = lm.get_output_embeddings().weight.shape[0]
    device = lm.get_output_embeddings().weight.device
    ids = torch.randint(0, vocab, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :2] = -100
    return ids.to(device), mask.to(device), labels.to(device)


@torch.no_grad()
def _loss_agrees(lm: nn.Module, fused: _FusedLossForward) -> Optional[str]:
    """Compare the fused loss with the model's own on ``_check_batch`` (eval mode, torch's
    RNG untouched), as the mean and with ``num_items_in_batch``; a mismatch (or the
    error the fused path raised) described, or None."""
    ids, mask, labels = _check_batch(lm)
    dtype = lm.get_output_embeddings().weight.dtype
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    with check_mode(lm), torch.random.fork_rng(devices=[]):  # check_mode: bitsandbytes' weights left as they are
        for extra in ({}, {"num_items_in_batch": torch.tensor(9)}):
            kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, **extra)
            ref = float(fused.original()(**kwargs).loss)
            try:
                ours = float(_fused_loss_output(lm, *fused.split((), kwargs)).loss)
            except Exception as e:  # noqa: BLE001  (any failure leaves the model's own loss in place)
                return f"the fused loss failed on a random batch: {type(e).__name__}: {e}"
            if not (math.isfinite(ref) and math.isfinite(ours)) or abs(ours - ref) > rtol * max(abs(ref), 1e-6):
                return f"fused loss {ours:.6g} vs the model's {ref:.6g} on a random batch"
    return None


def _patch_loss(lm: nn.Module, backend: str, return_logits: bool) -> Optional[str]:
    """Rebind ``lm.forward`` to the fused loss; returns why not, or None."""
    if getattr(lm, _LOSS_MARK, None) is not None:  # patched already: only the options change
        setattr(lm, _LOSS_MARK, (getattr(lm, _LOSS_MARK)[0], backend, bool(return_logits)))
        return None
    problem = _loss_problem(lm)
    if problem:
        return problem
    signature = inspect.signature(lm.forward)  # the class's, or an instance-level forward's (a hook's)
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return "its forward takes no **kwargs (num_items_in_batch could not reach the loss)"
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    setattr(lm, _LOSS_MARK, (None if softcap is None else float(softcap), backend, bool(return_logits)))
    prev = lm.__dict__.get("forward")
    if prev is not None:
        setattr(lm, _LOSS_PREV, prev)
    fused = _FusedLossForward(lm, signature)
    why = _loss_agrees(lm, fused)
    if why is not None:
        delattr(lm, _LOSS_MARK)
        lm.__dict__.pop(_LOSS_PREV, None)
        return why
    lm.forward = fused
    return None


def _unpatch_loss(lm: nn.Module) -> int:
    if getattr(lm, _LOSS_MARK, None) is None:
        return 0
    del lm.forward
    if _LOSS_PREV in lm.__dict__:
        lm.forward = lm.__dict__.pop(_LOSS_PREV)
    delattr(lm, _LOSS_MARK)
    return 1


def _hidden_dtype(lm: nn.Module) -> torch.dtype:
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32


def _bnb_decoded_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a bitsandbytes NF4 ``Linear4bit`` computes, from its bytes as the format defines
    them (``quant.from_bnb``, dequantized straight to the compute dtype) instead of by its
    kernels: x cast to the compute dtype (set from the first input when unset, as the
    layer does), the bias too, the output in x's dtype."""
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    dtype = base.compute_dtype or x.dtype
    W = nf4_dequantize(from_bnb(base.weight, base.weight.quant_state, dtype=dtype), backend="torch")
    bias = None if base.bias is None else base.bias.to(dtype)
    return nn.functional.linear(x.to(dtype), W, bias).to(x.dtype)


def _lora_reference(module, x):
    """PEFT's own forward (the class's, under the patched instance's). Over a bitsandbytes
    4-bit base, the base layer's product is ``_bnb_decoded_forward``, not bitsandbytes'
    kernel: on CPUs with AVX512-BF16 that kernel gives wrong values for some shapes, and in
    eval mode without gradients ``Linear4bit.forward`` repacks the weight in place for its
    inference kernel (lossily: bf16 scales; rankwise cannot read it after that). What the
    check compares is PEFT's LoRA semantics; the NF4 values are the format's."""
    base = module.get_base_layer()
    linear4bit = bnb_linear4bit_class()
    if linear4bit is None or not isinstance(base, linear4bit):
        return type(module).forward(module, x)
    prev = base.__dict__.get("forward")  # an instance-level forward (a hook) to restore
    base.forward = types.MethodType(_bnb_decoded_forward, base)
    try:
        return type(module).forward(module, x)
    finally:
        del base.forward
        if prev is not None:
            base.forward = prev


def _lora_fused(module, x):
    return module.forward(x)


def _patch_lora(model: nn.Module, lm: nn.Module, backend: str, patched: dict, left: dict) -> None:
    try:
        layers = peft_fusion_report(model)
    except ImportError:
        left["lora"] = "peft is not installed"
        return
    if not layers:
        left["lora"] = "the model has no PEFT LoRA layer"
        return
    n = patch_peft_model(model, backend=backend)
    report = peft_fusion_report(model)
    dtype = _hidden_dtype(lm)
    modules = dict(model.named_modules())
    checked = set()
    for name, why in report.items():
        module = modules[name]
        key = (type(module), type(module.get_base_layer()))
        if why is not None or key in checked:
            continue
        checked.add(key)
        width = getattr(module, "in_features", None)
        if width is None or not agrees(module, _lora_fused, width, reference=_lora_reference, dtype=dtype):
            unpatch_peft_model(model)
            left["lora"] = (f"the fused {type(module).__name__} over {type(module.get_base_layer()).__name__} "
                            "computes something else than PEFT's forward; all LoRA layers left to PEFT")
            return
    patched["lora"] = n
    reasons = {}
    for why in report.values():
        if why is not None:
            reasons[why] = reasons.get(why, 0) + 1
    if reasons:
        left["lora"] = "left to PEFT's forward: " + "; ".join(f"{why} ({count} layers)" for why, count in reasons.items())


def patch_model(model: nn.Module, *, lora: bool = True, loss: bool = True, norms: bool = True, mlp: bool = True,
                backend: str = "auto", return_logits: bool = False) -> dict:
    """Route a Hugging Face causal LM, or a PEFT model around one, through rankwise's
    fused kernels, in place, per instance and reversibly (``unpatch_model``).

    After it, ``model(input_ids, attention_mask=..., labels=...)`` returns the loss the
    model defines (``num_items_in_batch`` included, as ``Trainer`` passes it under
    gradient accumulation), computed in training mode by the fused head + loss with
    ``logits=None``; the call signature is unchanged, so ``transformers.Trainer`` and
    TRL's ``SFTTrainer`` take the patched model as they took the original (SFTTrainer
    reads ``outputs.logits`` for its metrics: patch with ``return_logits=True`` for it).

    Args:
        model: a transformers causal LM (``*ForCausalLM``; bf16, fp16, fp32 or a
            bitsandbytes-4-bit base) or a PEFT model around one.
        lora: patch PEFT's LoRA layers (fused LoRA op; QLoRA's NF4 bases read in place).
        loss: fuse the output head and the loss (Gemma 2/3's final-logit soft-cap included).
        norms: RMSNorms (Llama's form and Gemma's ``1 + weight``).
        mlp: gated MLPs: SwiGLU, GeGLU (gelu-tanh), Phi-3's fused ``gate_up_proj``.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        return_logits: in training mode also return the logits, computed after the fused
            loss under ``torch.no_grad`` (the loss and its backward never hold them), for
            trainers that log metrics from ``outputs.logits``: TRL's ``SFTTrainer`` computes
            its entropy and token accuracy from them unless ``use_liger_kernel`` is set.
            False (the default): ``logits=None``, as Liger returns.

    Returns:
        ``{"backend": backend, "patched": {kind: count}, "left": {part: reason}}``:
        kinds ``lora``, ``loss``, ``rms_norm``, ``rms_norm_offset``, ``swiglu``, ``geglu``,
        ``swiglu_gate_up`` (0 where none); ``left`` names each part not patched and why
        (not asked for, not present, or its check against the module's own forward failed).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    lm = _causal_lm(model)
    patched = {"lora": 0, "loss": 0, "rms_norm": 0, "rms_norm_offset": 0, "swiglu": 0, "geglu": 0,
               "swiglu_gate_up": 0}
    left = {}
    if lora:
        _patch_lora(model, lm, backend, patched, left)
    else:
        left["lora"] = "not asked for (lora=False)"
    if norms or mlp:
        counts = patch_decoder_kernels(model, rms_norm=norms, swiglu=mlp, backend=backend, all_kinds=True)
        for kind in ("rms_norm", "rms_norm_offset", "swiglu", "geglu", "swiglu_gate_up"):
            patched[kind] = counts[kind]
        for name in counts["skipped"]:
            left[name] = "computes something else than the fused kernel (checked on a random input); left as it is"
        if norms and not (counts["rms_norm"] or counts["rms_norm_offset"]):
            left.setdefault("norms", "no RMSNorm the kernels cover left to patch (none found, or patched already)")
        if mlp and not (counts["swiglu"] or counts["geglu"] or counts["swiglu_gate_up"]):
            left.setdefault("mlp", "no gated MLP the kernels cover (SwiGLU, GeGLU, fused gate_up) left to patch "
                                   "(none found, or patched already)")
    if not norms:
        left["norms"] = "not asked for (norms=False)"
    if not mlp:
        left["mlp"] = "not asked for (mlp=False)"
    if loss:
        why = _patch_loss(lm, backend, return_logits)
        if why is None:
            patched["loss"] = 1
        else:
            left["loss"] = why
    else:
        left["loss"] = "not asked for (loss=False)"
    report = {"backend": backend, "patched": patched, "left": left}
    log.info("patch_model: patched %s; left %s", {k: v for k, v in patched.items() if v}, left or "nothing")
    return report


def unpatch_model(model: nn.Module) -> dict:
    """Undo ``patch_model``: every forward it rebound is restored.

    Returns:
        ``{"loss": n, "kernels": n, "lora": n}``: how many forwards of each were restored.
    """
    lm = _causal_lm(model)
    restored = {"loss": _unpatch_loss(lm), "kernels": unpatch_decoder_kernels(model), "lora": 0}
    try:
        restored["lora"] = unpatch_peft_model(model)
    except ImportError:  # pragma: no cover
        pass
    return restored
