"""Route a Hugging Face decoder's RMSNorm and SwiGLU MLP through rankwise's fused kernels.

``patch_decoder_kernels(model)`` rebinds ``forward`` on the matching module
instances (never on their classes, so nothing leaks into other models):

- RMSNorm modules (a ``weight`` and ``variance_epsilon``; Llama, Mistral, Qwen2/3, ...)
  -> ``rankwise.kernels.rms_norm``;
- MLPs with ``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``
  -> ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` (the projections stay whatever
  they are: nn.Linear, LoRALinear, NF4Linear).

Each kind is checked once, on a random input, against the module's own forward;
a module whose math differs (Gemma's ``1 + weight`` norm, say) is left alone and
reported. ``unpatch_decoder_kernels`` restores the original forwards.
"""
from __future__ import annotations

import logging
import types

import torch
from torch import nn

from rankwise.kernels import rms_norm, swiglu

log = logging.getLogger("rankwise")

_MARK = "_rankwise_fused_forward"


def _rms_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, backend=self._rankwise_backend)


def _mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self._rankwise_backend))


def _is_rms_norm(m: nn.Module) -> bool:
    return (type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 1 and isinstance(getattr(m, "variance_epsilon", None), float))


def _is_swiglu_mlp(m: nn.Module) -> bool:
    act = getattr(m, "act_fn", None)
    return (all(isinstance(getattr(m, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and act is not None and (isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")))


@torch.no_grad()
def _agrees(module: nn.Module, fused, width: int) -> bool:
    """The fused forward gives the module's own output on a random (2, 5, width) input."""
    p = next(module.parameters())
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()  # no dropout in LoRA projections: both forwards must see the same function
    try:
        with torch.random.fork_rng(devices=[]):
            ref = module.forward(x)
            out = fused(module, x)
    finally:
        for m, mode in modes:
            m.training = mode
    tol = 1e-5 if p.dtype == torch.float32 else 2e-2
    return out.shape == ref.shape and out.dtype == ref.dtype and bool(
        ((out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max().clamp_min(1e-6)))


def patch_decoder_kernels(model: nn.Module, rms_norm: bool = True, swiglu: bool = True,
                          backend: str = "auto") -> dict:
    """Rebind the RMSNorm and SwiGLU-MLP forwards of ``model`` to the fused kernels.

    Args:
        model: any module (a transformers causal LM, with or without LoRA layers).
        rms_norm, swiglu: which kinds to patch.
        backend: passed to the kernels ("auto": Triton on CUDA, torch elsewhere).

    Returns:
        ``{"rms_norm": n, "swiglu": n, "skipped": [class names whose math differs]}``.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    counts = {"rms_norm": 0, "swiglu": 0, "skipped": []}
    verdict = {}  # class -> agrees (checked once per class)
    for m in model.modules():
        if getattr(m, _MARK, False):
            continue
        if rms_norm and _is_rms_norm(m):
            kind, fused, width = "rms_norm", _rms_forward, m.weight.shape[0]
        elif swiglu and _is_swiglu_mlp(m):
            kind, fused = "swiglu", _mlp_forward
            width = getattr(m, "hidden_size", None) or getattr(m.gate_proj, "in_features", None)
            if width is None:
                continue
        else:
            continue
        m._rankwise_backend = backend
        key = (type(m), kind)
        if key not in verdict:
            verdict[key] = _agrees(m, fused, width)
            if not verdict[key]:
                counts["skipped"].append(type(m).__name__)
                log.warning("patch_decoder_kernels: %s computes something else than the fused %s; left as it is",
                            type(m).__name__, kind)
        if verdict[key]:
            m.forward = types.MethodType(fused, m)
            setattr(m, _MARK, True)
            counts[kind] += 1
    return counts


def unpatch_decoder_kernels(model: nn.Module) -> int:
    """Undo ``patch_decoder_kernels``; returns how many modules were restored."""
    n = 0
    for m in model.modules():
        if getattr(m, _MARK, False):
            del m.forward  # the instance attribute; the class's forward shows through again
            delattr(m, _MARK)
            n += 1
    return n
