"""Route a Hugging Face decoder's norms and gated MLPs through rankwise's fused kernels.

``patch_decoder_kernels(model)`` rebinds ``forward`` on the matching module
instances (never on their classes, so nothing leaks into other models):

- RMSNorm modules (a ``weight`` and ``variance_epsilon``; Llama, Mistral, Qwen2/3, Phi-3, ...)
  -> ``rankwise.kernels.rms_norm``;
- MLPs with ``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``
  -> ``down_proj(swiglu(gate_proj(x), up_proj(x)))`` (the projections stay whatever
  they are: nn.Linear, LoRALinear, NF4Linear, PEFT LoRA layers).

With ``all_kinds=True`` (``rankwise.patch_model`` sets it) also:

- Gemma's RMSNorm (``eps``, ``(1 + weight)``, all in fp32 and one rounding to x's dtype
  at the end) -> ``rms_norm(x.float(), 1 + weight.float())`` cast to x's dtype (exactly
  Gemma's math; in bf16 / fp16 it costs an fp32 copy of x, which the kernel keeps for
  backward in place of x);
- MLPs whose ``act_fn`` is gelu-tanh (Gemma 1/2/3) -> ``down_proj(geglu(gate, up))``;
- MLPs with one fused ``gate_up_proj`` and a SiLU ``activation_fn`` (Phi-3, GLM-4)
  -> ``down_proj(swiglu(gate, up))`` on the two halves of its output (no copy);
- MLPs with ``w1``, ``w3``, ``w2`` and a SiLU ``act_fn`` (the older Mixtral expert layout)
  -> ``w2(swiglu(w1(x), w3(x)))`` (counted as ``swiglu``);
- MoE expert banks stored as 3D parameters (transformers 5: Mixtral, Qwen3-MoE, Granite-MoE
  ``*Experts``: ``gate_up_proj`` ``(E, 2I, H)``, ``down_proj`` ``(E, H, I)``, a SiLU ``act_fn``,
  called as ``experts(hidden, top_k_index, top_k_weights)``) -> each routed expert's
  ``linear(swiglu(gate, up), down_proj[e])``, weighted and summed as the eager loop does.

``module_report(model)`` names, per module class that looks like a norm, an MLP or an
expert bank (its class name ends in ``RMSNorm``, ``MLP`` or ``Experts``), how many there are
and whether a fused kernel now runs it, or why not.

Each kind is checked once per class, on a random input, against the module's own
forward; a module whose math differs is left alone and reported (a norm tries the
Llama form, then, with ``all_kinds``, the Gemma form: the one that agrees is kept).
``unpatch_decoder_kernels`` restores the forwards the modules had before.
"""
from __future__ import annotations

import contextlib
import logging
import types

import torch
from torch import nn

from rankwise.kernels import geglu, rms_norm, swiglu
from rankwise.quant import bnb_linear4bit_class

log = logging.getLogger("rankwise")

_MARK = "_rankwise_fused_forward"
_PREV = "_rankwise_prev_forward"  # an instance-level forward the module had before (an accelerate hook, ...)


def _rms_forward(self, hidden_states):
    eps = getattr(self, "variance_epsilon", None)
    eps = self.eps if eps is None else eps
    return rms_norm(hidden_states, self.weight, eps, backend=self._rankwise_backend)


def _offset_rms_forward(self, x):
    # Gemma: x normalised in fp32, times (1 + weight) in fp32, one rounding to x's dtype
    y = rms_norm(x.float(), 1.0 + self.weight.float(), self.eps, backend=self._rankwise_backend)
    return y.to(x.dtype)


def _mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), backend=self._rankwise_backend))


def _geglu_mlp_forward(self, x):
    return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x), backend=self._rankwise_backend))


def _gate_up_mlp_forward(self, x):
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # Phi-3's order: gate first
    return self.down_proj(swiglu(gate, up, backend=self._rankwise_backend))


def _w13_mlp_forward(self, x):
    return self.w2(swiglu(self.w1(x), self.w3(x), backend=self._rankwise_backend))


def _experts_loop(self, hidden_states, top_k_index, top_k_weights):
    """The eager expert loop of transformers 5's ``*Experts`` with the gated product fused."""
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit[:, 0].tolist():
        if e == self.num_experts:
            continue
        pos, tok = torch.where(mask[e])
        gate, up = nn.functional.linear(hidden_states[tok], self.gate_up_proj[e]).chunk(2, dim=-1)
        y = nn.functional.linear(swiglu(gate, up, backend=self._rankwise_backend), self.down_proj[e])
        out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
    return out


def _fused_apply_gate(self, gate_up_out):
    """transformers' ``_default_apply_gate`` (``act_fn(gate) * up`` on the halves) as the fused SwiGLU."""
    gate, up = gate_up_out.chunk(2, dim=-1)
    return swiglu(gate, up, backend=self._rankwise_backend)


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """An expert bank's forward with the fused SwiGLU: under transformers' batched / grouped
    experts implementations (``config._experts_implementation``, grouped_mm by default) their
    own forward, whose gate (``_apply_gate``) ``patch_decoder_kernels`` set to the fused one;
    under ``eager`` (or a class without that dispatch) the eager loop, fused."""
    impl = getattr(getattr(self, "config", None), "_experts_implementation", None)
    if impl in (None, "eager") or "_apply_gate" not in self.__dict__:
        return _experts_loop(self, hidden_states, top_k_index, top_k_weights)
    prev = self.__dict__.get(_PREV)
    forward = prev if prev is not None else types.MethodType(type(self).forward, self)
    return forward(hidden_states, top_k_index, top_k_weights)


def _set_fused_gate(m: nn.Module) -> None:
    if getattr(type(m), "_apply_gate", None) is not None:  # transformers' experts dispatch (default gate: checked)
        m._apply_gate = types.MethodType(_fused_apply_gate, m)


@contextlib.contextmanager
def _fused_gate(m: nn.Module):
    _set_fused_gate(m)
    try:
        yield
    finally:
        m.__dict__.pop("_apply_gate", None)


def _expert_inputs(m: nn.Module, x: torch.Tensor):
    """(hidden (N, H), top_k_index (N, 2), top_k_weights (N, 2)) from a check input x, every expert routed to."""
    h = x.reshape(-1, x.shape[-1])
    n, e = h.shape[0], m.num_experts
    index = torch.stack([torch.arange(n) % e, (torch.arange(n) + 1) % e], 1).to(h.device)
    weights = torch.rand(n, 2, generator=torch.Generator().manual_seed(1)).to(h.device, h.dtype)
    return h, index, weights


def _experts_check(fused):
    def check(m, x):
        with _fused_gate(m):
            return fused(m, *_expert_inputs(m, x))
    return check


def _experts_reference(m, x):
    return m.forward(*_expert_inputs(m, x))


def _is_rms_norm(m: nn.Module, eps_names=("variance_epsilon",)) -> bool:
    return (type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 1 and any(isinstance(getattr(m, n, None), float) for n in eps_names))


def _is_silu(act) -> bool:
    return act is not None and (isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU"))


def _is_gelu_tanh(act) -> bool:
    return act is not None and ((isinstance(act, nn.GELU) and act.approximate == "tanh")
                                or type(act).__name__ in ("GELUTanh", "PytorchGELUTanh", "NewGELUActivation"))


def _has_modules(m: nn.Module, names) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Module) for n in names)


def _is_swiglu_mlp(m: nn.Module) -> bool:
    return _has_modules(m, ("gate_proj", "up_proj", "down_proj")) and _is_silu(getattr(m, "act_fn", None))


def _is_geglu_mlp(m: nn.Module) -> bool:
    return _has_modules(m, ("gate_proj", "up_proj", "down_proj")) and _is_gelu_tanh(getattr(m, "act_fn", None))


def _is_gate_up_mlp(m: nn.Module) -> bool:
    return (_has_modules(m, ("gate_up_proj", "down_proj")) and not hasattr(m, "gate_proj")
            and _is_silu(getattr(m, "activation_fn", None)))


def _is_w13_mlp(m: nn.Module) -> bool:
    return _has_modules(m, ("w1", "w2", "w3")) and _is_silu(getattr(m, "act_fn", None))


def _experts_layout_problem(m: nn.Module):
    """Why ``m`` (an ``*Experts`` module) is not an expert bank the fused SwiGLU covers, or None."""
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3):
        return "its expert weights are not 3D gate_up_proj (E, 2I, H) / down_proj (E, H, I) tensors"
    if not (isinstance(getattr(m, "num_experts", None), int) and gu.shape[0] == down.shape[0] == m.num_experts
            and gu.shape[1] == 2 * down.shape[2] and gu.shape[2] == down.shape[1]):
        return "its gate_up_proj / down_proj shapes are not (E, 2I, H) / (E, H, I)"
    if not _is_silu(getattr(m, "act_fn", None)):
        return f"its act_fn is {type(getattr(m, 'act_fn', None)).__name__}, not SiLU"
    if getattr(m, "has_bias", False) or getattr(m, "gate_up_proj_bias", None) is not None:
        return "its experts have biases"
    if getattr(m, "is_transposed", False) or not getattr(m, "is_concatenated", True):
        return "its gate_up_proj is transposed or interleaves gate and up"
    if not getattr(m, "has_gate", True) or getattr(m, "has_post_expert_norm", False):
        return "its experts have no gate, or a norm after each expert"
    gate = getattr(type(m), "_apply_gate", None)
    if gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate":
        return f"its class defines its own gate ({type(m).__name__}._apply_gate)"
    return None


def _in_width(m: nn.Module, proj: str):
    return getattr(m, "hidden_size", None) or getattr(getattr(m, proj), "in_features", None)


@contextlib.contextmanager
def check_mode(module: nn.Module):
    """Eval mode for a patch-time check (no dropout: both forwards must compute the same
    function), every module's own mode restored afterwards, except that bitsandbytes'
    4-bit layers stay in training mode: in eval mode without gradients, on CPUs with
    AVX512-BF16, ``bitsandbytes.nn.Linear4bit.forward`` repacks its weight in place for
    its inference kernel (``packing_format_for_cpu``: another byte layout, the scales
    rounded to bf16, lossily), after which rankwise can no longer read the NF4 bytes and
    the layer computes with bf16-rounded scales. They have no dropout, so training mode
    changes nothing else in their forward."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    linear4bit = bnb_linear4bit_class()
    if linear4bit is not None:
        for m in module.modules():
            if isinstance(m, linear4bit):
                m.training = True
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@torch.no_grad()
def agrees(module: nn.Module, fused, width: int, reference=None, dtype=None) -> bool:
    """The fused forward gives the module's own output on a random (2, 5, width) input.

    ``reference(module, x)`` is the module's own forward (default ``module.forward``);
    ``dtype`` the input's (default: the dtype of the module's first floating-point
    parameter; fp32 for a module with none, e.g. an MLP of bitsandbytes 4-bit layers)."""
    params = list(module.parameters())
    p = next((q for q in params if q.is_floating_point()), None)
    dtype = dtype or (p.dtype if p is not None else torch.float32)
    device = params[0].device if params else torch.device("cpu")
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    with check_mode(module), torch.random.fork_rng(devices=[]):
        ref = module.forward(x) if reference is None else reference(module, x)
        out = fused(module, x)
    tol = 1e-5 if dtype == torch.float32 and (p is None or p.dtype == torch.float32) else 2e-2
    return out.shape == ref.shape and out.dtype == ref.dtype and bool(
        ((out.float() - ref.float()).abs().max() <= tol * ref.float().abs().max().clamp_min(1e-6)))


def _candidates(m: nn.Module, rms_norm: bool, swiglu: bool, all_kinds: bool):
    """[(kind, fused forward)] that may stand in for ``m`` (tried in order) and its input width."""
    if rms_norm and _is_rms_norm(m, ("variance_epsilon", "eps") if all_kinds else ("variance_epsilon",)):
        kinds = [("rms_norm", _rms_forward)] + ([("rms_norm_offset", _offset_rms_forward)] if all_kinds else [])
        return kinds, m.weight.shape[0]
    if swiglu and _is_swiglu_mlp(m):
        return [("swiglu", _mlp_forward)], _in_width(m, "gate_proj")
    if swiglu and all_kinds and _is_geglu_mlp(m):
        return [("geglu", _geglu_mlp_forward)], _in_width(m, "gate_proj")
    if swiglu and all_kinds and _is_gate_up_mlp(m):
        return [("swiglu_gate_up", _gate_up_mlp_forward)], _in_width(m, "gate_up_proj")
    if swiglu and all_kinds and _is_w13_mlp(m):
        return [("swiglu", _w13_mlp_forward)], _in_width(m, "w1")
    if swiglu and all_kinds and type(m).__name__.endswith("Experts") and _experts_layout_problem(m) is None:
        return [("swiglu_experts", _experts_forward)], m.gate_up_proj.shape[2]
    return [], None


def _agrees_as(m: nn.Module, kind: str, fused, width: int) -> bool:
    if kind == "swiglu_experts":
        return agrees(m, _experts_check(fused), width, reference=_experts_reference)
    return agrees(m, fused, width)


def patch_decoder_kernels(model: nn.Module, rms_norm: bool = True, swiglu: bool = True,
                          backend: str = "auto", all_kinds: bool = False) -> dict:
    """Rebind the RMSNorm and gated-MLP forwards of ``model`` to the fused kernels.

    Args:
        model: any module (a transformers causal LM, with or without LoRA layers).
        rms_norm: patch RMSNorm modules; swiglu: patch gated MLPs.
        backend: passed to the kernels ("auto": Triton on CUDA, torch elsewhere).
        all_kinds: also Gemma's ``(1 + weight)`` norms, GeGLU (gelu-tanh) MLPs,
            Phi-3's fused ``gate_up_proj`` MLPs, ``w1``/``w3``/``w2`` MLPs and 3D MoE expert banks.

    Returns:
        ``{"rms_norm": n, "swiglu": n, "skipped": [class names whose math differs]}``,
        with ``all_kinds`` also ``"rms_norm_offset"``, ``"geglu"``, ``"swiglu_gate_up"`` and
        ``"swiglu_experts"`` counts.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    counts = {"rms_norm": 0, "swiglu": 0, "skipped": []}
    if all_kinds:
        counts.update({"rms_norm_offset": 0, "geglu": 0, "swiglu_gate_up": 0, "swiglu_experts": 0})
    verdict = {}  # class -> (kind, fused) that agrees, or None (checked once per class)
    for m in model.modules():
        if getattr(m, _MARK, False):
            continue
        kinds, width = _candidates(m, rms_norm, swiglu, all_kinds)
        if not kinds or width is None:
            continue
        m._rankwise_backend = backend
        key = (type(m), kinds[0][0])
        if key not in verdict:
            verdict[key] = next(((k, f) for k, f in kinds if _agrees_as(m, k, f, width)), None)
            if verdict[key] is None:
                counts["skipped"].append(type(m).__name__)
                log.warning("patch_decoder_kernels: %s computes something else than the fused %s; left as it is",
                            type(m).__name__, " or ".join(k for k, _ in kinds))
        if verdict[key] is None:
            del m._rankwise_backend
            continue
        kind, fused = verdict[key]
        if "forward" in m.__dict__:
            setattr(m, _PREV, m.__dict__["forward"])
        m.forward = types.MethodType(fused, m)
        if kind == "swiglu_experts":
            _set_fused_gate(m)
        setattr(m, _MARK, kind)
        counts[kind] += 1
    return counts


def unpatch_decoder_kernels(model: nn.Module) -> int:
    """Undo ``patch_decoder_kernels``; returns how many modules were restored."""
    n = 0
    for m in model.modules():
        if getattr(m, _MARK, False):
            del m.forward  # the instance attribute; the class's forward shows through again
            if _PREV in m.__dict__:
                m.forward = m.__dict__.pop(_PREV)  # or the instance forward it had before
            if getattr(m, _MARK) == "swiglu_experts":
                m.__dict__.pop("_apply_gate", None)
            delattr(m, _MARK)
            m.__dict__.pop("_rankwise_backend", None)
            n += 1
    return n


_LOOKS = (("RMSNorm", "norm"), ("MLP", "mlp"), ("Experts", "experts"))


def _left_why(m: nn.Module, part: str, skipped, asked: dict) -> str:
    if not asked[part]:
        return "not asked for (" + ("norms" if part == "norm" else "mlp") + "=False)"
    if type(m).__name__ in skipped:
        return "computes something else than the fused kernel (checked on a random input)"
    if part == "experts":
        return _experts_layout_problem(m) or "not an expert bank the fused SwiGLU covers"
    if part == "norm":
        return "not a covered RMSNorm (a 1D weight and a float variance_epsilon or eps)"
    return ("not a covered gated MLP (gate_proj/up_proj/down_proj or w1/w3/w2 with a SiLU or gelu-tanh act_fn, "
            "or gate_up_proj/down_proj with a SiLU activation_fn)")


def module_report(model: nn.Module, skipped=(), norms: bool = True, mlp: bool = True) -> dict:
    """Per module class that looks like a norm, an MLP or a MoE expert bank (class name ending in
    ``RMSNorm``, ``MLP`` or ``Experts``): ``{class: {"part": "norm" | "mlp" | "experts", "count": n,
    "patched": n running a fused kernel, "as": its kind or None, "why": why the others are left or None}}``.
    ``skipped``: the class names ``patch_decoder_kernels`` found to compute something else."""
    asked = {"norm": norms, "mlp": mlp, "experts": mlp}
    out = {}
    for m in model.modules():
        name = type(m).__name__
        part = next((p for suffix, p in _LOOKS if name.endswith(suffix)), None)
        if part is None:
            continue
        row = out.setdefault(name, {"part": part, "count": 0, "patched": 0, "as": None, "why": None})
        row["count"] += 1
        kind = getattr(m, _MARK, None)
        if kind:
            row["patched"] += 1
            row["as"] = kind
        elif row["why"] is None:
            row["why"] = _left_why(m, part, skipped, asked)
    return out
