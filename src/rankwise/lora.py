"""LoRA modules and model integration.

- ``LoRALinear``: wraps a frozen linear layer (``nn.Linear`` or an NF4 linear
  from ``rankwise.quant``) and computes, through the fused op,
  ``y = base(x) + scaling * B(A(dropout(x)))`` with PEFT's shapes and semantics.
- ``inject_lora``: swaps matching linear layers of a model for ``LoRALinear`` and
  freezes everything else.
- ``patch_peft_model``: makes an existing PEFT LoRA model (QLoRA included: PEFT's
  bitsandbytes 4-bit layers) run its LoRA layers through the fused op
  (instance-level rebinding, undone by ``unpatch_peft_model``); ``peft_fusion_report``
  says which layers run fused and why the others do not.
"""
from __future__ import annotations

import logging
import math
import re
import types
from typing import Iterable, Union

import torch
from torch import nn

from rankwise.kernels import lora_linear
from rankwise.kernels.lowrank import compute_dtype
from rankwise.quant import NF4Weight, bnb_linear4bit_class, dequantize_nf4, from_bnb, quantize_nf4

INITS = ("default", "gaussian", "pissa")
logger = logging.getLogger(__name__)


def _is_nf4_linear(module: nn.Module) -> bool:
    """A linear layer whose weight is an ``NF4Weight`` (``rankwise.quant.NF4Linear``)."""
    return isinstance(getattr(module, "weight", None), NF4Weight)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_nf4_linear(module)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    ``y = x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T`` with ``A`` of shape
    (r, in_features) and ``B`` of shape (out_features, r), as PEFT stores them, and
    ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).

    Args:
        base: the layer to adapt (``nn.Linear`` or ``rankwise.quant.NF4Linear``); frozen.
        r: rank, >= 1.
        alpha: LoRA alpha.
        dropout: dropout probability on the LoRA branch's input (training only).
        use_rslora: rank-stabilised scaling.
        init: ``"default"`` (kaiming-uniform A, zero B: the layer starts equal to
            ``base``), ``"gaussian"`` (A ~ N(0, 1/r), zero B), ``"pissa"`` (A, B from
            the top-r singular triplets of W, which keeps the residual; fast variant
            ``"pissa_niter_N"`` uses N subspace iterations).
        backend: passed to ``rankwise.kernels.lora_linear`` ("auto", "triton", "torch").
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "default", backend: str = "auto"):
        super().__init__()
        if not _is_linear(base):
            raise TypeError(f"base: expected an nn.Linear (or rankwise NF4 linear), got {type(base).__name__}")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r: expected an integer >= 1, got {r!r}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        if not (init in INITS or re.fullmatch(r"pissa_niter_\d+", str(init))):
            raise ValueError(f"init: expected one of {INITS} or 'pissa_niter_N', got {init!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.alpha = alpha
        self.dropout = float(dropout)
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.init = init
        self.backend = backend
        self.merged = False
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else getattr(base, "compute_dtype", torch.float32)
        if _is_nf4_linear(base):
            dtype = getattr(base, "compute_dtype", None) or w.dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=w.device, dtype=dtype))
        self.reset_lora_parameters(init)

    # -- initialisation -------------------------------------------------------
    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "default") -> None:
        if init == "default":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
        elif init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)
        else:
            self._init_pissa(init)

    @torch.no_grad()
    def _init_pissa(self, init: str) -> None:
        if _is_nf4_linear(self.base):
            raise ValueError("init: 'pissa' needs a full-precision base weight; initialise before quantizing")
        W = self.base.weight
        W32 = W.float()
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(W32, full_matrices=False)
            U, S, Vh = U[:, : self.r], S[: self.r], Vh[: self.r]
        else:
            niter = int(init.rsplit("_", 1)[1])
            U, S, V = torch.svd_lowrank(W32, q=self.r, niter=niter)
            Vh = V.T
        root = torch.sqrt(S / self.scaling)
        A = root[:, None] * Vh
        B = U * root[None, :]
        self.lora_A.copy_(A.to(self.lora_A.dtype))
        self.lora_B.copy_(B.to(self.lora_B.dtype))
        W.copy_((W32 - self.scaling * B @ A).to(W.dtype))

    # -- merge ------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shape (out_features, in_features)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``scaling * B @ A`` into the base weight; forward then uses the base alone."""
        if self.merged:
            return
        self._add_to_base(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (exact up to the base dtype's rounding)."""
        if not self.merged:
            return
        self._add_to_base(-self.delta_weight())
        self.merged = False

    def _add_to_base(self, delta: torch.Tensor) -> None:
        if _is_nf4_linear(self.base):
            q = self.base.weight
            W = dequantize_nf4(q).float() + delta.to(q.device)
            self.base.weight = quantize_nf4(W.to(q.dtype), blocksize=q.blocksize,
                                            double_quant=q.double_quant)
        else:
            W = self.base.weight
            W.copy_((W.float() + delta.to(W.device)).to(W.dtype))

    # -- forward ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        p = self.dropout if self.training else 0.0
        return lora_linear(x, self.base.weight, self.lora_A, self.lora_B, self.scaling,
                           bias=self.base.bias, dropout_p=p, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
                f"rslora={self.use_rslora}, merged={self.merged}")


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        if targets == "all-linear":
            return True
        return re.fullmatch(targets, name) is not None
    leaf = name.rsplit(".", 1)[-1]
    return any(name == t or leaf == t or name.endswith("." + t) for t in targets)


def inject_lora(model: nn.Module, target_modules: Union[str, Iterable[str]], r: int, alpha: float,
                dropout: float = 0.0, use_rslora: bool = False, init: str = "default",
                backend: str = "auto") -> nn.Module:
    """Replace the matching linear layers of ``model`` with ``LoRALinear`` and freeze the rest.

    Args:
        model: any ``nn.Module`` (e.g. a transformers causal LM); modified in place and returned.
        target_modules: a list of module names matched like PEFT (the last name component,
            e.g. ``["q_proj", "v_proj"]``, or a dotted suffix), a regex string matched against
            the full module name, or ``"all-linear"`` (every linear layer except the output head).
        r, alpha, dropout, use_rslora, init, backend: as in ``LoRALinear``.

    Returns:
        ``model``, whose only trainable parameters are the LoRA ``A`` and ``B`` matrices.

    Raises:
        ValueError: if no linear layer matches ``target_modules``.
    """
    if isinstance(target_modules, (list, tuple, set)):
        targets = list(target_modules)
        if not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"target_modules: expected a non-empty list of module names, got {target_modules!r}")
        if targets == ["all-linear"]:  # e.g. `targets: all-linear` in a YAML config, read as a one-item list
            targets = "all-linear"
    elif isinstance(target_modules, str):
        targets = target_modules
    else:
        raise TypeError(f"target_modules: expected a list of names or a regex string, got {type(target_modules).__name__}")

    head = None
    if targets == "all-linear" and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    replaced, linear_names = [], []
    for name, module in list(model.named_modules()):
        if not _is_linear(module) or module is head or id(module) in wrapped:
            continue
        linear_names.append(name)
        if not _matches(name, targets):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, r, alpha, dropout, use_rslora, init, backend))
        replaced.append(name)
    if not replaced and not linear_names and wrapped:
        raise ValueError("model: every linear layer already carries a LoRA adapter (inject_lora was called before)")
    if not replaced:
        shown = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
        raise ValueError(f"target_modules: {target_modules!r} matched no linear layer; "
                         f"linear layers in this model are named {shown}")
    model.rankwise_lora = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init,
                               target_modules=sorted({n.rsplit(".", 1)[-1] for n in replaced}),
                               replaced=replaced)
    return model


def lora_layers(model: nn.Module):
    """``(name, LoRALinear)`` pairs of a model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


# -- PEFT integration ------------------------------------------------------------
#
# A PEFT LoRA layer runs fused when its base is one of
#   - a dense ``nn.Linear`` with a floating-point weight: ``lora_linear`` on that weight;
#   - a bitsandbytes NF4 ``Linear4bit`` (QLoRA, PEFT's ``lora.bnb.Linear4bit``): ``lora_linear``
#     on an ``NF4Weight`` over bitsandbytes' own packed bytes and quant state (``quant.from_bnb``,
#     zero-copy), in bitsandbytes' compute dtype, W's values rounded once to it as its matmul does;
#   - a ``rankwise.quant.NF4Linear`` (e.g. after ``quant.from_bnb_model``): the same, on its weight;
# and its call is the plain single-adapter one (``_adapter_reason``). Anything else takes PEFT's own
# forward: a base of another kind is left unpatched, a call PEFT handles differently falls back per call.


def _base_reason(base: nn.Module):
    """``(kind, None)`` for a base the fused op runs ("dense", "bnb" or "nf4"), ``(None, why)`` otherwise."""
    bnb_cls = bnb_linear4bit_class()
    if bnb_cls is not None and isinstance(base, bnb_cls):
        qs = getattr(base.weight, "quant_state", None)
        if qs is None:
            return None, "bitsandbytes 4-bit weight without a quant state"
        try:
            q = from_bnb(base.weight, qs)
        except (ValueError, TypeError, AttributeError) as e:  # a state this format does not describe
            return None, str(e).split(": ", 1)[-1]
        if q.dim() != 2 or tuple(q.shape) != (base.out_features, base.in_features):
            return None, f"bitsandbytes weight of shape {tuple(q.shape)}"
        return "bnb", None
    if _is_nf4_linear(base):
        return "nf4", None
    w = getattr(base, "weight", None)
    if isinstance(base, nn.Linear) and isinstance(w, torch.Tensor) and w.dtype.is_floating_point \
            and not hasattr(w, "quant_state"):
        return "dense", None
    return None, f"base layer {type(base).__module__}.{type(base).__name__} (weight {getattr(w, 'dtype', None)})"


def _adapter_reason(layer: nn.Module, args=(), kwargs=None):
    """``(adapter name, None)`` when a call of a PEFT LoRA layer is the plain single-adapter
    one the fused op computes, ``(None, why)`` otherwise."""
    if getattr(layer, "disable_adapters", False):
        return None, "adapters disabled"
    if getattr(layer, "merged", False):
        return None, "adapter merged"
    if args or kwargs:
        return None, "extra forward arguments (adapter_names, variant arguments)"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None, f"{len(active)} active adapters"
    name = active[0]
    if getattr(layer, "fan_in_fan_out", False):
        return None, "fan_in_fan_out"
    if getattr(layer, "use_dora", {}).get(name, False) or name in getattr(layer, "lora_variant", {}):
        return None, "a LoRA variant (DoRA, aLoRA, ...)"
    A, B = layer.lora_A[name], layer.lora_B[name]
    if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
        return None, "LoRA bias or LoRA modules other than nn.Linear"
    drop = layer.lora_dropout[name]
    if type(drop) not in (nn.Identity, nn.Dropout):
        return None, f"dropout module {type(drop).__name__}"
    return name, None


def _peft_lora_forward(self, x, *args, **kwargs):
    """Replacement ``forward`` of a patched PEFT LoRA layer: the fused op for a fusable
    base and call (see above), PEFT's own forward for everything else."""
    kind, _ = _base_reason(self.get_base_layer())
    name, _ = _adapter_reason(self, args, kwargs) if kind else (None, None)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.get_base_layer()
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    if kind == "dense":
        return lora_linear(x, base.weight, A, B, s, bias=base.bias, dropout_p=p, backend=self._rankwise_backend)
    if kind == "bnb":
        # bitsandbytes' Linear4bit: x cast to its compute dtype (chosen from the first input when
        # unset, as it does), W dequantized straight to the dtype of the matmul, the output in x's dtype
        if not base.compute_type_is_set:
            base.set_compute_type(x)
            base.compute_type_is_set = True
        xc = x if base.compute_dtype is None else x.to(base.compute_dtype)
        weight = from_bnb(base.weight, base.weight.quant_state, dtype=compute_dtype(xc))
    else:  # NF4Linear: the same rules with its compute dtype, the output in it unless it casts back
        xc = x.to(base.compute_dtype or base.weight.dtype)
        q = base.weight
        weight = NF4Weight(q.packed, q.absmax, q.quant_map, q.blocksize, q.shape, compute_dtype(xc),
                           q.nested_absmax, q.nested_quant_map, q.offset, q.nested_blocksize)
    y = lora_linear(xc, weight, A, B, s, bias=base.bias, dropout_p=p, backend=self._rankwise_backend)
    return y.to(x.dtype) if kind == "bnb" or base.cast_output else y


def _peft_lora_layers(peft_model: nn.Module):
    """``(name, module, patchable)`` for every PEFT LoRA layer (a ``LoraLayer``); patchable: a
    ``lora.Linear`` or ``lora.bnb.Linear4bit``, the classes whose forward the fused op replaces."""
    try:
        from peft.tuners.lora import Linear as PeftLoraLinear  # optional: peft, for PEFT models only
        from peft.tuners.lora import LoraLayer
    except ImportError as e:  # pragma: no cover
        raise ImportError("patch_peft_model needs peft installed (pip install peft)") from e
    classes = [PeftLoraLinear]
    if bnb_linear4bit_class() is not None:
        try:
            from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit  # optional: peft + bitsandbytes
            classes.append(PeftLoraLinear4bit)
        except ImportError:  # pragma: no cover
            pass
    return [(n, m, type(m) in classes) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


def peft_fusion_report(peft_model: nn.Module) -> dict:
    """Whether each PEFT LoRA layer of a model runs through the fused op now.

    Returns:
        ``{layer name: None if it does (patched, fusable base, plain single-adapter
        call), else the reason it takes PEFT's own forward}``; ``patch_peft_model``
        logs the same reasons, counted.
    """
    report = {}
    for name, module, patchable in _peft_lora_layers(peft_model):
        if not patchable:
            report[name] = f"PEFT layer {type(module).__name__}"
            continue
        _, why = _base_reason(module.get_base_layer())
        if why is None:
            _, why = _adapter_reason(module)
        if why is None and not _is_patched(module):
            why = "not patched"
        report[name] = why
    return report


def _is_patched(module: nn.Module) -> bool:
    return "forward" in module.__dict__ and getattr(module.forward, "__func__", None) is _peft_lora_forward


def patch_peft_model(peft_model: nn.Module, backend: str = "auto") -> int:
    """Route the LoRA layers of an existing PEFT model through rankwise's fused op.

    Rebinds ``forward`` on each PEFT ``lora.Linear`` and QLoRA ``lora.bnb.Linear4bit``
    instance whose base the op runs: a dense ``nn.Linear``, a bitsandbytes NF4
    ``Linear4bit`` (read in place: its packed bytes and quant state, double
    quantization and compute dtype as bitsandbytes uses them; no dequantized or
    second copy of W) or a ``rankwise.quant.NF4Linear``. Nothing changes at class
    level, so other models are unaffected. Outputs and gradients are those of PEFT's
    layer up to rounding; a call the op does not cover (merged or disabled adapters,
    several active adapters, DoRA and other variants, LoRA bias, dropout modules other
    than ``nn.Dropout``, extra arguments) takes PEFT's forward. Layers whose base the
    op cannot run (fp4, 8-bit, bitsandbytes' CPU-repacked weights, other layer types)
    are left unpatched. The counts and reasons are logged (logger ``rankwise.lora``);
    ``peft_fusion_report`` lists them per layer.

    Returns:
        The number of layers patched. ``unpatch_peft_model`` undoes it.

    Raises:
        ValueError: the model has no PEFT LoRA layer at all.
    """
    layers = _peft_lora_layers(peft_model)
    if not layers:
        raise ValueError("peft_model: found no PEFT LoRA linear layer to patch")
    n, left = 0, {}
    for name, module, patchable in layers:
        why = f"PEFT layer {type(module).__name__}" if not patchable else _base_reason(module.get_base_layer())[1]
        if why is not None:
            left[why] = left.get(why, 0) + 1
            continue
        module._rankwise_backend = backend
        module.forward = types.MethodType(_peft_lora_forward, module)
        n += 1
    msg = f"patch_peft_model: {n} of {len(layers)} PEFT LoRA layers run through the fused op"
    if left:
        msg += "; left to PEFT: " + "; ".join(f"{k} ({v})" for k, v in left.items())
    (logger.warning if left else logger.info)(msg)
    return n


def unpatch_peft_model(peft_model: nn.Module) -> int:
    """Undo ``patch_peft_model``; returns the number of layers restored."""
    n = 0
    for module in peft_model.modules():
        if _is_patched(module):
            del module.forward
            module.__dict__.pop("_rankwise_backend", None)
            n += 1
    return n
