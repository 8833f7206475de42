"""One call that routes a Hugging Face causal LM (or a PEFT model around one) through
rankwise's fused kernels, per instance and reversibly, keeping its call signature.

``patch_model(model)`` patches, each only where it checks out:

- ``lora``: PEFT's LoRA layers (``lora.Linear`` and QLoRA's ``lora.bnb.Linear4bit``)
  -> ``rankwise.lora.patch_peft_model`` (the fused LoRA op, NF4 bases read in place);
- ``norms`` / ``mlp``: RMSNorms (Llama's form and Gemma's ``1 + weight``), gated
  MLPs (SwiGLU, GeGLU, Phi-3's / GLM-4's fused ``gate_up_proj``, ``w1``/``w3``/``w2``) and MoE expert
  banks (transformers 5's 3D ``*Experts`` of Mixtral, Qwen3-MoE, Granite-MoE: each expert's SwiGLU
  fused, transformers' grouped / batched experts dispatch kept) -> ``rankwise.decoder_kernels.patch_decoder_kernels``;
  the report's ``modules`` says per class what runs fused and why the rest is left;
- ``loss``: the causal LM's ``forward`` is rebound on the instance. In training mode,
  when labels are given, it runs the decoder, then the output head and the model's
  own loss (``ForCausalLMLoss``: labels shifted by one, ``ignore_index`` -100, the mean
  over the target tokens, or the sum divided by ``num_items_in_batch`` when the trainer
  passes it under gradient accumulation) through ``rankwise.kernels.linear_cross_entropy``
  with the final-logit soft-cap of Gemma 2 / 3 (``softcap=``), and returns
  ``CausalLMOutputWithPast(loss=..., logits=None)``: the ``(tokens, vocab)`` logits are
  never held (``return_logits=True``: computed after the loss, without gradient, for
  trainers that log metrics from ``outputs.logits``). In eval mode, or without labels, the
  model's own forward runs (eval and generation get their logits). The rebound forward keeps the original's signature
  (``inspect.signature`` sees it), so ``Trainer`` and TRL's ``SFTTrainer`` drop the same
  columns and pass ``num_items_in_batch`` as before.
- TRL's fused LM head (trl >= 1.16: ``SFTTrainer`` installs ``add_fused_lm_head`` as the
  model's forward and calls it with ``fused_lm_head=True``, reading ``log_probs``,
  ``entropy`` and ``is_top1``): such a call, in training and eval mode, returns TRL's
  ``FusedCausalLMOutput`` computed by rankwise: ``log_probs`` (with gradient) and
  ``is_top1`` by ``linear_cross_entropy(reduction="none", return_token_accuracy=True)``,
  ``entropy`` (and ``log_sum_sq_probs`` / ``mean_logits`` when TRL asks) by ``head_stats``
  (chunked, no gradient), only at the positions whose label is not -100, the logits never
  held. Either order works: ``patch_model`` before the trainer (TRL's forward then wraps
  rankwise's; a forward pre-hook turns ``fused_lm_head=True`` into a call TRL's forward hands
  down to rankwise's) or ``patch_model(trainer.model)`` after it (rankwise's wraps TRL's; the
  only order with ``peft_config=``). A TRL head rankwise does not compute (temperature or logit
  scale other than 1, MoE router logits) is left to TRL.

Each kind is checked once at patch time against the module's own forward (the norms
and MLPs on a random input per class, one LoRA layer per layer class and base class,
the loss on a random padded batch with and without ``num_items_in_batch``); a kind that
disagrees is undone and reported. A loss the fused head cannot compute exactly (a config logit
transform other than Gemma's soft-cap: Granite's ``logits_scaling != 1``, Cohere's ``logit_scale``, ...;
a MoE router auxiliary loss, ``output_router_logits=True``) is not refused: the model's own head
and loss keep running, exactly as unpatched, and ``left["loss"]`` says why. ``unpatch_model`` restores every forward (TRL's fused
head included: set after ``patch_model``, it stays, and the rankwise forward it calls passes
every call on to the forward it replaced) and removes the pre-hook. The checks
leave bitsandbytes' 4-bit weights as they are (``patch.check_mode``: in eval mode without
gradients bitsandbytes rewrites them in place on AVX512-BF16 CPUs), and the LoRA check
takes a 4-bit base's product from its NF4 bytes, not from bitsandbytes' kernels.
"""
from __future__ import annotations

import inspect
import logging
import math
import types
from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

from rankwise.kernels import linear_cross_entropy
from rankwise.kernels.nf4 import nf4_dequantize
from rankwise.lora import patch_peft_model, peft_fusion_report, unpatch_peft_model
from rankwise.loss import fused_loss_problem
from rankwise.decoder_kernels import agrees, check_mode, module_report, patch_decoder_kernels, unpatch_decoder_kernels
from rankwise.quant import bnb_linear4bit_class, from_bnb

log = logging.getLogger("rankwise")

_LOSS_MARK = "_rankwise_fused_loss"  # on the causal LM: (softcap, backend, return_logits) while its forward is rebound
_LOSS_PREV = "_rankwise_loss_prev_forward"  # an instance-level forward it had before
_LOSS_FWD = "_rankwise_loss_forward"  # the _FusedLossForward patch_model made (made inert by unpatch_model)
_FUSED_HEAD = "rankwise_fused_lm_head"  # the keyword the pre-hook passes down in place of TRL's fused_lm_head=True
_OWN_HEAD = "; the model's own head and loss run instead (exact)"
_TRL_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_TRL_DEFAULTS = {"temperature": 1.0, "cast_lm_head_to_fp32": False, "logit_scale": 1.0,
                 "outputs": ("log_probs", "entropy", "is_top1")}  # SFTTrainer's, when no TRL head is found


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


@torch.no_grad()
def head_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               softcap: Optional[float] = None, *, entropy: bool = True, log_sum_sq_probs: bool = False,
               mean_logits: bool = False, chunk_rows: Optional[int] = None) -> dict:
    """Per-row statistics of the logits ``c = softcap(hidden @ weight.T + bias)`` (``hidden``
    ``(N, H)``), computed chunk by chunk of rows so that the ``(N, V)`` logits are never held:
    ``entropy`` ``-sum_v p_v log p_v``, ``log_sum_sq_probs`` ``log sum_v p_v^2`` and
    ``mean_logits`` ``mean_v c_v``, each fp32 ``(N,)``, without gradient, in a dict of those
    asked for. The logits are computed in ``hidden``'s dtype (the autocast dtype under autocast),
    as ``linear_cross_entropy`` computes them, and reduced in fp32. ``chunk_rows``: rows per
    chunk (None: about 2^22 logits a chunk)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    rows = chunk_rows or max(1, (1 << 22) // max(vocab, 1))
    asked = {"entropy": entropy, "log_sum_sq_probs": log_sum_sq_probs, "mean_logits": mean_logits}
    out = {k: hidden.new_empty(n, dtype=torch.float32) for k, want in asked.items() if want}
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    W = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type, enabled=False):
        for i in range(0, n, rows):
            c = nn.functional.linear(hidden[i:i + rows].to(dtype), W, b).float()
            if softcap is not None:
                c = torch.tanh(c / softcap) * softcap
            lse = torch.logsumexp(c, -1)
            if entropy:
                out["entropy"][i:i + rows] = lse - (torch.exp(c - lse[:, None]) * c).sum(-1)
            if log_sum_sq_probs:
                out["log_sum_sq_probs"][i:i + rows] = torch.logsumexp(2 * c, -1) - 2 * lse
            if mean_logits:
                out["mean_logits"][i:i + rows] = c.mean(-1)
    return out


def _trl_head_settings(lm: nn.Module) -> dict:
    """The settings of TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, which
    ``SFTTrainer`` installs as the model's instance-level forward), read from its closure:
    ``temperature``, ``cast_lm_head_to_fp32``, ``logit_scale``, ``outputs``; SFTTrainer's
    (``_TRL_DEFAULTS``) when no TRL head is found. The head sits over rankwise's forward
    (``patch_model`` before the trainer) or under it (``patch_model(trainer.model)``)."""
    fn = lm.__dict__.get("forward")
    if isinstance(fn, _FusedLossForward):
        fn = fn.prev
    func = getattr(fn, "__func__", fn)
    code = getattr(func, "__code__", None)
    if code is None or code.co_name != "_fused_forward" or not func.__closure__:
        return dict(_TRL_DEFAULTS)
    cells = {}
    for name, cell in zip(code.co_freevars, func.__closure__):
        try:
            cells[name] = cell.cell_contents
        except ValueError:  # an empty cell
            pass
    settings = {k: cells.get(k, v) for k, v in _TRL_DEFAULTS.items()}
    settings["outputs"] = tuple(settings["outputs"])
    return settings


def _trl_head_problem(lm: nn.Module, settings: dict) -> Optional[str]:
    """Why rankwise leaves a TRL fused-LM-head call to TRL's own head, or None."""
    if float(settings["temperature"]) != 1.0:
        return f"temperature {settings['temperature']} (rankwise computes temperature 1)"
    if float(settings["logit_scale"]) != 1.0:
        return f"logit scale {settings['logit_scale']}"
    unknown = set(settings["outputs"]) - set(_TRL_FIELDS)
    if unknown:
        return f"outputs {sorted(unknown)}"
    if getattr(lm.config.get_text_config(), "output_router_logits", False):
        return "router logits (a MoE auxiliary loss)"
    return None


def _fused_lm_head_hook(module: nn.Module, args, kwargs):
    """Forward pre-hook on a causal LM whose loss ``patch_model`` fused: a call with TRL's
    ``fused_lm_head=True`` goes on with ``fused_lm_head=False`` and ``rankwise_fused_lm_head=True``,
    so that TRL's forward, where it was set over rankwise's (``patch_model`` before
    ``SFTTrainer``), hands the call to rankwise's forward instead of running its own head."""
    if not kwargs.get("fused_lm_head") or getattr(module, _LOSS_MARK, None) is None:
        return None
    if _trl_head_problem(module, _trl_head_settings(module)) is not None:
        return None
    return args, {**kwargs, "fused_lm_head": False, _FUSED_HEAD: True}


def _head_fields(h, head: nn.Linear, t, softcap, backend: str, outputs) -> dict:
    """TRL's per-token fields at the target rows ``h`` / ``t``: ``log_probs`` (with gradient)
    and ``is_top1`` from rankwise's fused op, the rest from ``head_stats``."""
    res = linear_cross_entropy(h, head.weight, t, head.bias, reduction="none", softcap=softcap, backend=backend,
                               return_token_accuracy="is_top1" in outputs)
    nll = res.loss if "is_top1" in outputs else res
    fields = {"log_probs": -nll, "is_top1": res.token_accuracy.bool() if "is_top1" in outputs else None}
    fields.update(head_stats(h.detach(), head.weight.detach(), None if head.bias is None else head.bias.detach(),
                             softcap, entropy="entropy" in outputs, log_sum_sq_probs="log_sum_sq_probs" in outputs,
                             mean_logits="mean_logits" in outputs))
    return fields


def _fused_head_output(lm: nn.Module, arguments: dict, extra: dict, settings: dict):
    """What TRL's fused LM head returns (``FusedCausalLMOutput``), through rankwise's fused op:
    the labels shifted by one (or TRL's pre-shifted ``shift_labels``), only the positions whose
    label is not -100 scored, each per-token field 0 elsewhere, ``loss`` the negative
    log-likelihood summed and divided by ``num_items_in_batch`` (else the target count)."""
    from trl.trainer.utils import FusedCausalLMOutput  # optional dependency: only TRL's fused_lm_head calls get here

    softcap, backend, _ = getattr(lm, _LOSS_MARK)
    arguments, extra = dict(arguments), dict(extra)
    labels = arguments.pop("labels", None)
    for key in ("logits_to_keep", "use_cache"):
        arguments.pop(key, None)
    for key in ("return_dict", "use_cache", "fused_lm_head"):
        extra.pop(key, None)
    shift_labels = extra.pop("shift_labels", None)
    num_items = extra.pop("num_items_in_batch", None)
    out = lm.base_model(**arguments, **extra, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    head = lm.get_output_embeddings()
    hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
    mask = labels != -100
    context = nullcontext()
    if settings["cast_lm_head_to_fp32"]:
        hidden, context = hidden.float(), torch.autocast(hidden.device.type, enabled=False)
    with context:
        fields = _head_fields(hidden[mask], head, labels[mask], softcap, backend, settings["outputs"])
    per_token = {k: None if v is None else v.new_zeros(mask.shape).masked_scatter(mask, v) for k, v in fields.items()}
    count = mask.sum().clamp(min=1) if num_items is None else num_items
    loss = -per_token["log_probs"].sum() / count
    return FusedCausalLMOutput(loss=loss, label_mask=mask, **per_token)


class _FusedLossForward:
    """The ``forward`` that ``patch_model`` sets on a causal LM instance: the fused head +
    loss in training mode with labels, the model's own forward otherwise. A callable
    object rather than a closure so that ``copy.deepcopy`` (a reference model, say)
    rebinds it to the copy and ``pickle`` finds it; ``__signature__`` is the original
    forward's, which is what ``inspect.signature`` (and so ``Trainer``) reads."""

    def __init__(self, lm: nn.Module, signature: inspect.Signature, prev=None):
        self.lm = lm
        self.__signature__ = signature
        self.var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        self.prev = prev  # the instance-level forward it replaced (a hook, TRL's fused LM head), or None
        self.active = True  # False after unpatch_model: every call goes to the forward it replaced

    def original(self):
        """The forward the model had: an instance-level one (a hook) or its class's."""
        return self.prev if self.prev is not None else types.MethodType(type(self.lm).forward, self.lm)

    def split(self, args, kwargs) -> tuple[dict, dict]:
        """(the named arguments bound to the original signature, its ``**kwargs``)."""
        arguments = dict(self.__signature__.bind(*args, **kwargs).arguments)
        return arguments, (arguments.pop(self.var_kw, {}) if self.var_kw else {})

    def __call__(self, *args, **kwargs):
        routed = bool(kwargs.pop(_FUSED_HEAD, False))  # TRL's fused_lm_head=True, passed down by the pre-hook
        if not self.active:  # unpatched while another forward (TRL's) still calls this one
            return self.original()(*args, **kwargs)
        if routed or kwargs.get("fused_lm_head"):
            settings = _trl_head_settings(self.lm)
            if routed or _trl_head_problem(self.lm, settings) is None:
                kwargs.pop("fused_lm_head", None)
                return _fused_head_output(self.lm, *self.split(args, kwargs), settings)
            return self.original()(*args, **kwargs)  # a fused head rankwise does not compute: TRL's own
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
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if getattr(text, "output_router_logits", False):
        return ("its config sets output_router_logits=True: its loss adds router_aux_loss_coef x the MoE "
                "load-balancing loss, which the fused loss does not compute")
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
        return problem + _OWN_HEAD
    signature = inspect.signature(lm.forward)  # the class's, or an instance-level forward's (a hook's)
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return "its forward takes no **kwargs (num_items_in_batch could not reach the loss)" + _OWN_HEAD
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    setattr(lm, _LOSS_MARK, (None if softcap is None else float(softcap), backend, bool(return_logits)))
    prev = lm.__dict__.get("forward")
    if prev is not None:
        setattr(lm, _LOSS_PREV, prev)
    fused = _FusedLossForward(lm, signature, prev)
    why = _loss_agrees(lm, fused)
    if why is not None:
        delattr(lm, _LOSS_MARK)
        lm.__dict__.pop(_LOSS_PREV, None)
        return why + _OWN_HEAD
    lm.forward = fused
    setattr(lm, _LOSS_FWD, fused)
    lm.register_forward_pre_hook(_fused_lm_head_hook, with_kwargs=True)
    return None


def _unpatch_loss(lm: nn.Module) -> int:
    """Restore the forward ``_patch_loss`` replaced. When another forward was set over
    rankwise's after ``patch_model`` (TRL's fused LM head, by ``SFTTrainer``), that one stays
    the model's forward, and the rankwise forward it calls turns inert: it passes every call
    to the forward it replaced, so the model computes exactly what it would have unpatched."""
    if getattr(lm, _LOSS_MARK, None) is None:
        return 0
    fused = lm.__dict__.pop(_LOSS_FWD, None)
    if fused is not None:
        fused.active = False
    prev = lm.__dict__.pop(_LOSS_PREV, None)
    if isinstance(lm.__dict__.get("forward"), _FusedLossForward):
        del lm.forward
        if prev is not None:
            lm.forward = prev
    for key, hook in list(lm._forward_pre_hooks.items()):
        if hook is _fused_lm_head_hook:
            del lm._forward_pre_hooks[key]
            lm._forward_pre_hooks_with_kwargs.pop(key, None)
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


def _patch_kernels(model: nn.Module, backend: str, norms: bool, mlp: bool, patched: dict, left: dict):
    """The norms and gated MLPs (MoE expert banks included) through ``patch_decoder_kernels``;
    fills ``patched`` and ``left``, returns (the report's ``experts`` entry, the class names whose
    check against their own forward failed)."""
    counts = {"skipped": [], "swiglu_experts": 0}
    if norms or mlp:
        counts = patch_decoder_kernels(model, rms_norm=norms, swiglu=mlp, backend=backend, all_kinds=True)
        for kind in ("rms_norm", "rms_norm_offset", "swiglu", "geglu", "swiglu_gate_up"):
            patched[kind] = counts[kind]
        for name in counts["skipped"]:
            left[name] = "computes something else than the fused kernel (checked on a random input); left as it is"
        if norms and not (counts["rms_norm"] or counts["rms_norm_offset"]):
            left.setdefault("norms", "no RMSNorm the kernels cover left to patch (none found, or patched already)")
        if mlp and not (counts["swiglu"] or counts["geglu"] or counts["swiglu_gate_up"] or counts["swiglu_experts"]):
            left.setdefault("mlp", "no gated MLP the kernels cover (SwiGLU, GeGLU, fused gate_up, MoE experts) left "
                                   "to patch (none found, or patched already)")
    if not norms:
        left["norms"] = "not asked for (norms=False)"
    if not mlp:
        left["mlp"] = "not asked for (mlp=False)"
    banks = {name: row for name, row in module_report(model, counts["skipped"], norms, mlp).items()
             if row["part"] == "experts"}
    total = sum(row["count"] for row in banks.values())
    done = sum(row["patched"] for row in banks.values())
    why = "; ".join(f"{name}: {row['why']}" for name, row in banks.items() if row["why"]) or None
    if total > done:
        left["experts"] = f"{total - done} MoE expert banks left to their own forward: {why}"
    return {"patched": done, "left": total - done, "why": why}, counts["skipped"]


def patch_model(model: nn.Module, *, lora: bool = True, loss: bool = True, norms: bool = True, mlp: bool = True,
                backend: str = "auto", return_logits: bool = False) -> dict:
    """Route a Hugging Face causal LM, or a PEFT model around one, through rankwise's
    fused kernels, in place, per instance and reversibly (``unpatch_model``).

    After it, ``model(input_ids, attention_mask=..., labels=...)`` returns the loss the
    model defines (``num_items_in_batch`` included, as ``Trainer`` passes it under
    gradient accumulation), computed in training mode by the fused head + loss with
    ``logits=None``; the call signature is unchanged, so ``transformers.Trainer`` and
    TRL's ``SFTTrainer`` take the patched model as they took the original. Under TRL's
    fused LM head (``fused_lm_head=True``: SFTTrainer's ``log_probs``, ``entropy``,
    ``is_top1``) rankwise computes those fields; patch the model before building the trainer
    or patch ``trainer.model`` after (with ``peft_config=``, only after).

    Args:
        model: a transformers causal LM (``*ForCausalLM``; bf16, fp16, fp32 or a
            bitsandbytes-4-bit base) or a PEFT model around one.
        lora: patch PEFT's LoRA layers (fused LoRA op; QLoRA's NF4 bases read in place).
        loss: fuse the output head and the loss (Gemma 2/3's final-logit soft-cap included).
        norms: RMSNorms (Llama's form and Gemma's ``1 + weight``).
        mlp: gated MLPs: SwiGLU, GeGLU (gelu-tanh), Phi-3's fused ``gate_up_proj``, ``w1``/``w3``/``w2``,
            and MoE expert banks stored as 3D ``gate_up_proj`` / ``down_proj`` with a SiLU ``act_fn``.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        return_logits: in training mode also return the logits, computed after the fused
            loss under ``torch.no_grad`` (the loss and its backward never hold them), for
            trainers that log metrics from ``outputs.logits`` (not TRL's ``SFTTrainer``:
            since trl 1.16 it reads its fused LM head's fields, which rankwise computes).
            False (the default): ``logits=None``, as Liger returns.

    Returns:
        ``{"backend": backend, "patched": {kind: count}, "left": {part: reason},
        "experts": {"patched": n, "left": n, "why": reason or None}, "modules": {class: row}}``:
        kinds ``lora``, ``loss``, ``rms_norm``, ``rms_norm_offset``, ``swiglu``, ``geglu``,
        ``swiglu_gate_up`` (0 where none); ``left`` names each part not patched and why
        (not asked for, not present, or its check against the module's own forward failed;
        ``"experts"`` when MoE expert banks are left to their own forward; ``"loss"`` when the
        model's own head and loss run, e.g. Granite's ``logits_scaling != 1``, Cohere's
        ``logit_scale``, ``output_router_logits=True``). ``experts``: the MoE expert banks
        (transformers 5's 3D ``*Experts``) run through the fused SwiGLU, and those left.
        ``modules``: per class that looks like a norm, an MLP or an expert bank,
        ``{"part", "count", "patched", "as": kind, "why": why the rest are left}``
        (``decoder_kernels.module_report``).
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
    experts, skipped = _patch_kernels(model, backend, norms, mlp, patched, left)
    if loss:
        why = _patch_loss(lm, backend, return_logits)
        if why is None:
            patched["loss"] = 1
        else:
            left["loss"] = why
    else:
        left["loss"] = "not asked for (loss=False)"
    report = {"backend": backend, "patched": patched, "left": left, "experts": experts,
              "modules": module_report(model, skipped, norms, mlp)}
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
