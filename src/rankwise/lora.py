"""LoRA modules and model integration.

- ``LoRALinear``: wraps a frozen linear layer (``nn.Linear`` or an NF4 linear
  from ``rankwise.quant``) and computes, through the fused op,
  ``y = base(x) + scaling * B(A(dropout(x)))`` with PEFT's shapes and semantics.
- ``inject_lora``: swaps matching linear layers of a model for ``LoRALinear`` and
  freezes everything else.
- ``patch_peft_model``: makes an existing PEFT LoRA model run its LoRA layers
  through the fused op (instance-level rebinding, undone by ``unpatch_peft_model``).
"""
from __future__ import annotations

import math
import re
import types
from typing import Iterable, Union

import torch
from torch import nn

from rankwise.kernels import lora_linear
from rankwise.quant import NF4Weight, dequantize_nf4, quantize_nf4

INITS = ("default", "gaussian", "pissa")


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


def _peft_lora_forward(self, x, *args, **kwargs):
    """Replacement ``forward`` of a PEFT ``lora.Linear``: the fused op for the plain
    single-adapter case, PEFT's own forward for everything else (merged, disabled,
    several adapters, DoRA, LoRA bias, fan-in-fan-out, quantized bases)."""
    cls_forward = type(self).forward
    if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
        return cls_forward(self, x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    base = self.get_base_layer()
    if len(active) != 1 or not isinstance(base, nn.Linear) or getattr(self, "fan_in_fan_out", False):
        return cls_forward(self, x, *args, **kwargs)
    name = active[0]
    if getattr(self, "use_dora", {}).get(name, False) or self.lora_B[name].bias is not None:
        return cls_forward(self, x, *args, **kwargs)
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    A, B = self.lora_A[name].weight, self.lora_B[name].weight
    return lora_linear(x, base.weight, A, B, self.scaling[name], bias=base.bias, dropout_p=p,
                       backend=self._rankwise_backend)


def patch_peft_model(peft_model: nn.Module, backend: str = "auto") -> int:
    """Route the LoRA layers of an existing PEFT model through rankwise's fused op.

    Rebinds ``forward`` on each PEFT ``lora.Linear`` instance (nothing changes at
    class level, so other models are unaffected). Outputs and gradients are those
    of PEFT's layer; cases the op does not cover fall back to PEFT's forward.

    Returns:
        The number of layers patched. ``unpatch_peft_model`` undoes it.
    """
    try:
        from peft.tuners.lora import Linear as PeftLoraLinear
    except ImportError as e:  # pragma: no cover
        raise ImportError("patch_peft_model needs peft installed (pip install peft)") from e
    n = 0
    for module in peft_model.modules():
        if isinstance(module, PeftLoraLinear):
            module._rankwise_backend = backend
            module.forward = types.MethodType(_peft_lora_forward, module)
            n += 1
    if n == 0:
        raise ValueError("peft_model: found no PEFT LoRA linear layer to patch")
    return n


def unpatch_peft_model(peft_model: nn.Module) -> int:
    """Undo ``patch_peft_model``; returns the number of layers restored."""
    n = 0
    for module in peft_model.modules():
        if "forward" in module.__dict__ and getattr(module.forward, "__func__", None) is _peft_lora_forward:
            del module.forward
            module.__dict__.pop("_rankwise_backend", None)
            n += 1
    return n
