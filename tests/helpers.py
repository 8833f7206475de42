"""Helpers shared by the kernel tests: relative error against a float64 reference, a
check that says where and by how much a tensor is off, and an aot_eager backend that
keeps the graphs it compiles (to see which ops a compiled function calls)."""
import contextlib
import copy
import math

import torch

import rankwise.fit as rfit


def rel_err(out, ref) -> float:
    """max|out - ref| / max|ref| (ref float64)."""
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check(name, out, ref, tol):
    """Assert ``rel_err(out, ref) <= tol``, naming the worst element when it is not."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    if not err <= tol:
        diff = (out.double() - ref).abs()
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(f"{name}: relative error {err:.3g} > {tol:.3g}; worst at {idx}: "
                             f"got {out[idx].item():.6g}, expected {ref[idx].item():.6g}")


def recording_backend():
    """``aot_eager`` that also keeps the forward and backward graphs it is handed."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")), graphs


def op_names(gm):
    """The call targets of a compiled graph, as strings (``rankwise.swiglu.default``, ...)."""
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


# ----------------------------------------------------------------------------
# float64 oracles of the LoRA layer and of NF4 dequantization. Written here, with
# other torch calls than the ops' torch backends, so that a test never compares
# a backend with itself. The NF4 decoder is the only one: bitsandbytes' weights and
# rankwise's both go through it (bitsandbytes' quantizer bytes are the oracle for
# quantization; its dequantize / matmul kernels are never a reference).
# ----------------------------------------------------------------------------


def lora_linear_ref64(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, keep_mask=None):
    """``x @ W.T + b + s * ((x * m / (1 - p)) @ A.T) @ B.T`` in float64 (inputs must
    be float64; differentiable, so autograd gives the reference gradients)."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        assert t is None or t.dtype == torch.float64, f"{name}: the oracle takes float64, got {t.dtype}"
    if dropout_p > 0.0:
        assert keep_mask is not None, "the oracle needs the keep-mask (tests pass the kernel's)"
        xd = torch.where(keep_mask, x / (1.0 - dropout_p), torch.zeros_like(x))
    else:
        xd = x
    s = torch.einsum("...k,rk->...r", xd, lora_A)
    y = torch.einsum("...k,nk->...n", x, weight) + scaling * torch.einsum("...r,nr->...n", s, lora_B)
    return y if bias is None else y + bias


def decode_nf4(packed, absmax, code, blocksize, shape, nested_absmax=None, nested_code=None, offset=None,
               nested_blocksize=256):
    """The values of an NF4 weight, float64, shape ``shape``, decoded from its storage by
    the format's definition with plain indexing and float64 arithmetic (no bitsandbytes or
    rankwise kernel): value i is ``code[nib_i] * scale[i // blocksize]``, the 4-bit
    indices two per byte of ``packed`` (any storage dtype, read as bytes), the first value
    in the high nibble. The per-block scale is fp32 by the format: ``absmax[b]``, or with
    double quantization (``nested_absmax`` given) ``nested_code[absmax_u8[b]] *
    nested_absmax[b // nested_blocksize] + offset``, multiplied, rounded to fp32, added,
    rounded to fp32 (float64 then one rounding is fp32's own result for either operation).
    The product of two fp32 values is exact in float64: rounded to fp32 and then to the
    weight's dtype (``.float().to(dtype)``) it is what a dequantizer must return, bit for bit."""
    n = math.prod(shape)
    b = packed.contiguous().view(torch.uint8).reshape(-1).long()
    assert b.numel() == (n + 1) // 2, f"packed: {b.numel()} bytes for {n} values"
    blocks = -(-n // blocksize)
    assert absmax.numel() == blocks, f"absmax: {absmax.numel()} values for {blocks} blocks"
    nib = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]
    if nested_absmax is None:
        scale = absmax.double()
    else:
        assert absmax.dtype == torch.uint8, f"nested absmax codes: expected uint8, got {absmax.dtype}"
        s2 = nested_absmax.double()[torch.arange(blocks, device=b.device) // nested_blocksize]
        scale = (nested_code.double()[absmax.long()] * s2).float().double()
        scale = (scale + offset.double()).float().double()
    idx = torch.arange(n, device=b.device) // blocksize
    return (code.double()[nib] * scale[idx]).reshape(tuple(shape))


def decode_nf4_bnb(packed, quant_state):
    """``decode_nf4`` of bitsandbytes' own storage: its packed bytes and ``QuantState``
    (``code``, ``absmax``, ``blocksize``, ``shape``; with ``nested``, ``state2.absmax``,
    ``state2.code``, ``state2.blocksize`` and ``offset``). bitsandbytes' kernels are never
    called: they are what the tests must not trust (wrong on some CPUs)."""
    qs = quant_state
    assert qs.quant_type == "nf4", f"quant_type {qs.quant_type!r}"
    assert not getattr(qs, "packing_format_for_cpu", False), "repacked for bitsandbytes' CPU kernel: not NF4's layout"
    if not qs.nested:
        return decode_nf4(packed, qs.absmax, qs.code, qs.blocksize, qs.shape)
    offset = qs.offset if isinstance(qs.offset, torch.Tensor) else torch.tensor(float(qs.offset))
    return decode_nf4(packed, qs.absmax, qs.code, qs.blocksize, qs.shape, qs.state2.absmax, qs.state2.code,
                      offset, qs.state2.blocksize)


def nf4_dequantize_ref64(q):
    """``decode_nf4`` of a rankwise ``NF4Weight`` (the same fields, rankwise's names)."""
    if not q.double_quant:
        return decode_nf4(q.packed, q.absmax, q.quant_map, q.blocksize, q.shape)
    return decode_nf4(q.packed, q.absmax, q.quant_map, q.blocksize, q.shape, q.nested_absmax, q.nested_quant_map,
                      q.offset, q.nested_blocksize)


class DecodedLinear4bit(torch.nn.Module):
    """A bitsandbytes NF4 ``Linear4bit`` as dense torch math on its decoded weight (no
    bitsandbytes kernel): what the layer computes by its definition. x is cast to the
    compute dtype, W is ``decode_nf4_bnb`` rounded to fp32 (the format's values) and then
    to the compute dtype (bitsandbytes dequantizes straight to it), the bias too, and the
    output is cast back to x's dtype. Compute dtype float64 gives the float64 oracle."""

    def __init__(self, layer, compute_dtype=None):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.compute_dtype = compute_dtype or layer.compute_dtype
        W = decode_nf4_bnb(layer.weight.data, layer.weight.quant_state).float()
        self.register_buffer("weight", W.double())  # fp32 values, kept exact through .double() / .float()
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().double())

    def forward(self, x):
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), self.weight.to(dtype), bias).to(x.dtype)


def is_bnb_4bit_layer(module) -> bool:
    """A bitsandbytes ``Linear4bit`` (its weight carries a 4-bit ``quant_state``; not PEFT's
    LoRA layer around one, whose ``weight`` is its base layer's), told without importing
    bitsandbytes."""
    w = getattr(module, "weight", None)
    return (isinstance(w, torch.Tensor) and getattr(w, "quant_state", None) is not None
            and hasattr(module, "compute_dtype") and not hasattr(module, "base_layer"))


def decoded_dense_copy(model, compute_dtype=None, float64=False):
    """A deep copy of ``model`` (same bytes, same LoRA weights) whose bitsandbytes 4-bit
    layers are ``DecodedLinear4bit`` in ``compute_dtype`` (default: each layer's own);
    ``float64=True``: every floating-point tensor and every product in float64, the oracle."""
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if is_bnb_4bit_layer(module):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child,
                    DecodedLinear4bit(module, torch.float64 if float64 else compute_dtype))
    return dense.double() if float64 else dense


def causal_lm_loss64(logits, labels, ignore_index=-100):
    """transformers' ``ForCausalLMLoss`` (position t predicts ``labels[t + 1]``, ``ignore_index``
    left out, the mean over the targets) in float64: that function upcasts the logits with
    ``.float()``, which would round a float64 oracle's logits to fp32."""
    assert logits.dtype == torch.float64, f"logits: the oracle takes float64, got {logits.dtype}"
    targets = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=ignore_index)


# ----------------------------------------------------------------------------
# References of rms_norm, swiglu and linear_cross_entropy: the math as Hugging Face /
# torch write it, differentiated by autograd. Called on float64 inputs they are the
# oracle; called in a low precision they give the error torch itself makes there.
# ----------------------------------------------------------------------------


def rms_norm_ref(x, weight, eps=1e-6):
    """``LlamaRMSNorm.forward`` (normalise in fp32, cast back, times the weight), except
    that fp64 inputs stay fp64."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def swiglu_ref(gate, up):
    """``F.silu(gate) * up``, as the Llama MLP computes it (in the inputs' dtype)."""
    return torch.nn.functional.silu(gate) * up


def linear_cross_entropy_ref(hidden, weight, targets, bias=None, ignore_index=-100, reduction="mean"):
    """``F.cross_entropy((hidden @ weight.T + bias).float(), targets)`` with the full logits."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             ignore_index=ignore_index, reduction=reduction
                                             ).reshape(targets.shape if reduction == "none" else ())


class FakeTimer:
    """A stand-in for the tuner's timer: ``timer(fn)`` runs ``fn`` (which returns the name of its
    choice: a path, or a path and a tile config) and returns that choice's cost from ``costs``;
    ``calls`` lists what ran, in order."""

    def __init__(self, costs):
        self.costs, self.calls = costs, []

    def __call__(self, fn):
        name = fn()
        self.calls.append(name)
        return self.costs[name]


def forbid(monkeypatch, name: str, message: str) -> None:
    """Make ``rankwise.model.<name>`` (``load_model``, ``load_tokenizer``) fail the test wherever rankwise looks it
    up: in ``rankwise.model`` and in every rankwise module that imported it (the run modules are imported first,
    as the CLI would import them)."""
    import importlib
    import sys

    import pytest

    for module in ("rankwise.train", "rankwise.trainable", "rankwise.together", "rankwise.sweep", "rankwise.merge",
                   "rankwise.restore"):
        importlib.import_module(module)
    real = getattr(sys.modules["rankwise.model"], name)
    hits = [m for n, m in list(sys.modules.items()) if n.startswith("rankwise") and getattr(m, name, None) is real]
    assert len(hits) > 1, f"rankwise.model.{name} is looked up nowhere else: the guard would check nothing"
    for module in hits:
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail(message))


def build_perturbed(families: dict, family: str, small: dict, seed: int = 0, **overrides):
    """A tiny transformers model of ``families[family]`` (``(config class, model class, extra config, ...)``) on
    ``small`` config values, every weight moved by 0.2 N(0, 1) so that every part shows in the loss (zero-
    initialised offsets included); skipped when this transformers has no such model."""
    import pytest
    import torch
    import transformers

    cfg_name, model_name, extra = families[family][:3]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    cfg = getattr(transformers, cfg_name)(**{**small, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


class Crash(Exception):
    """A run cut off (a power cut), raised by ``crash_at``."""


@contextlib.contextmanager
def crash_at(step: int):
    """Within it, a training loop stops with ``Crash`` when it reaches optimizer step ``step`` (when it asks for
    that step's learning rate, before anything of the step runs)."""
    real = rfit.lr_at

    def lr_at(s, *a, **k):
        if s == step:
            raise Crash("power cut")
        return real(s, *a, **k)

    rfit.lr_at = lr_at
    try:
        yield
    finally:
        rfit.lr_at = real
