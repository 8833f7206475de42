"""Helpers shared by the kernel tests: relative error against a float64 reference, a
check that says where and by how much a tensor is off, and an aot_eager backend that
keeps the graphs it compiles (to see which ops a compiled function calls)."""
import torch


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
# a backend with itself.
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


def nf4_dequantize_ref64(q):
    """The values of an NF4 weight as the float64 product ``code[nib] * scale`` (exact:
    two fp32 factors), shape ``q.shape``. The per-block scale is fp32 by the format:
    ``map8[absmax_u8] * nested[b // nested_blocksize] + offset`` (multiply, round,
    add, round) with double quantization, else ``absmax``. The format rounds the
    product to fp32 and then to the output dtype: ``.float().to(dtype)`` of the
    result is what a dequantizer must return, bit for bit."""
    n = q.numel
    b = q.packed.reshape(-1).long()
    nib = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]
    code = q.quant_map.double()[nib]
    blk = torch.arange(n, device=b.device) // q.blocksize
    if q.double_quant:
        u8 = q.absmax.long()
        nested = q.nested_absmax.float()[torch.arange(u8.numel(), device=b.device) // q.nested_blocksize]
        scale = (q.nested_quant_map.float()[u8] * nested) + q.offset.float()
    else:
        scale = q.absmax.float()
    return (code * scale.double()[blk]).reshape(q.shape)


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
