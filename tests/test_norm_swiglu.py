"""Fused RMSNorm and SwiGLU against float64 references, forward and every gradient,
against Hugging Face's ``LlamaRMSNorm`` and ``F.silu(g) * u``, under torch.compile,
through ``torch.library.opcheck``, and their argument errors.

The Triton kernels run under TRITON_INTERPRET=1 on a CPU machine (conftest.py).

Tolerances, as max|out - ref64| / max|ref64| per tensor (``helpers.rel_err``):
- fp32: 1e-5 (fp32 math throughout). The hidden-size-1 RMSNorm case uses eps = 0.5:
  with one value per row, dx = w dy eps / (x^2 + eps)^1.5 comes out of a cancellation
  (1 - n^2, n^2 = x^2 / (x^2 + eps) ~ 1) that loses most digits at eps = 1e-6 in any
  fp32 implementation, HF's included.
- fp16 / bf16: at most 2x the error of the torch reference computed in that dtype
  (HF's ``LlamaRMSNorm`` math / ``F.silu(g) * u``, gradients by autograd), plus a
  floor of 2^-11 (fp16) / 2^-8 (bf16).
Parity with HF / torch in the same dtype is checked separately: equal bits with the
torch backend, at most one unit in the last place with the Triton kernels.
"""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import check, op_names, recording_backend, rel_err, rms_norm_ref, swiglu_ref
from rankwise.kernels.rms_norm import rms_norm, rms_norm_reference
from rankwise.kernels.swiglu import swiglu, swiglu_reference

rms_norm_module = importlib.import_module("rankwise.kernels.rms_norm")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
BACKENDS = ["triton", "torch"]

# (lead dims, hidden size, eps): rows of 1, 37 (in one block, masked), 100, and 1500
# (longer than the interpreter's 1024-wide block: the two-pass path); rank-2, 3 and
# 4 inputs; row counts that do not divide among the backward kernel's 4 programs.
NORM_SHAPES = [
    ((6,), 1, 0.5),
    ((7,), 37, 1e-6),
    ((2, 9), 100, 1e-5),
    ((2, 3, 4), 37, 1e-6),
    ((5,), 1500, 1e-6),
]
# SwiGLU inputs: the interpreter's tiles are 1024 wide and about 4096 elements.
GLU_SHAPES = [(5, 1), (7, 37), (2, 9, 100), (2, 3, 4, 37), (3, 1500), (70, 100)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def tol_for(dtype, torch_err):
    return 1e-5 if dtype == torch.float32 else 2 * torch_err + FLOOR[dtype]


def grads_of(y, inputs, dy):
    return torch.autograd.grad(y, [t for t in inputs if t.requires_grad], dy)


def leaf64(t):
    return t.detach().double().requires_grad_(t.requires_grad)


def norm_inputs(lead, H, dtype, seed=0, weight_grad=True):
    g = gen(seed)
    x = (torch.randn(*lead, H, generator=g) * 3 + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(H, generator=g)).to(dtype).requires_grad_(weight_grad)
    dy = torch.randn(*lead, H, generator=g).to(dtype)
    return x, w, dy


def glu_inputs(shape, dtype, seed=0):
    g = gen(seed)
    gate = (torch.randn(*shape, generator=g) * 3).to(dtype).requires_grad_()
    up = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(*shape, generator=g).to(dtype)
    return gate, up, dy


def check_against_float64(names, fn, ref_fn, inputs, dy, dtype):
    """``fn(*inputs)`` and its gradients vs ``ref_fn`` in float64, within ``tol_for``
    of the error of ``ref_fn`` run in ``dtype``."""
    out = fn(*inputs)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    got = (out,) + grads_of(out, inputs, dy)
    in64 = [leaf64(t) for t in inputs]
    ref = ref_fn(*in64)
    want = (ref.detach(),) + grads_of(ref, in64, dy.double())
    low = ref_fn(*inputs)
    base = (low.detach(),) + grads_of(low, inputs, dy)
    for name, o, w, b in zip(names, got, want, base):
        assert o.dtype == dtype, name
        check(f"{name} ({dtype})", o, w, tol_for(dtype, rel_err(b, w)))


# ----------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("lead,H,eps", NORM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_matches_float64(lead, H, eps, dtype, backend):
    x, w, dy = norm_inputs(lead, H, dtype)
    check_against_float64(("y", "dx", "dweight"), lambda x, w: rms_norm(x, w, eps, backend=backend),
                          lambda x, w: rms_norm_ref(x, w, eps), (x, w), dy, dtype)


def test_rms_norm_non_contiguous():
    """A transposed 2-D x (copied to unit column stride), a row-sliced x (a row
    stride alone: no copy), a permuted 3-D x, and a strided weight."""
    g = gen(5)
    big = torch.randn(40, 130, generator=g)
    w_big = torch.randn(2 * 100, generator=g)
    cases = [
        (torch.randn(37, 23, generator=g).t(), torch.randn(37, generator=g)),   # (23, 37), column-major
        (big[3:30, 10:110], w_big[::2]),                                          # row stride 130, weight stride 2
        (torch.randn(5, 3, 37, generator=g).transpose(0, 1), torch.randn(37, generator=g)),  # (3, 5, 37)
    ]
    for x0, w0 in cases:
        assert not x0.is_contiguous()
        for backend in BACKENDS:
            x, w = x0.detach().requires_grad_(), w0.detach().requires_grad_()
            y = rms_norm(x, w, 1e-6, backend=backend)
            dy = torch.randn(y.shape, generator=g)
            got = (y,) + torch.autograd.grad(y, (x, w), dy)
            x64, w64 = leaf64(x), leaf64(w)
            ref = rms_norm_ref(x64, w64, 1e-6)
            want = (ref.detach(),) + torch.autograd.grad(ref, (x64, w64), dy.double())
            for name, o, r in zip(("y", "dx", "dweight"), got, want):
                check(f"{backend} {name} {tuple(x.shape)}", o, r, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_frozen_or_trainable_weight(backend, monkeypatch):
    """A frozen weight gets no gradient and none is computed (need_weight=False
    reaches the backward); a trainable one does; dx is the same either way."""
    seen = []
    real = rms_norm_module._rms_bwd

    def spy(dy, x, weight, rstd, backend_, need_weight):
        seen.append(need_weight)
        return real(dy, x, weight, rstd, backend_, need_weight)

    monkeypatch.setattr(rms_norm_module, "_rms_bwd", spy)
    x, w, dy = norm_inputs((3, 11), 37, torch.float32, weight_grad=False)
    y = rms_norm(x, w, backend=backend)
    (dx_frozen,) = torch.autograd.grad(y, (x,), dy)
    assert seen == [False]
    w.requires_grad_()
    y = rms_norm(x, w, backend=backend)
    y.backward(dy)
    assert seen == [False, True]
    assert torch.equal(x.grad, dx_frozen) and w.grad is not None and w.grad.shape == w.shape
    x64, w64 = leaf64(x), leaf64(w)
    dw_ref = torch.autograd.grad(rms_norm_ref(x64, w64), (w64,), dy.double())[0]
    check("dweight", w.grad, dw_ref, 1e-5)
    # weight trainable, x not: only dweight
    xd = x.detach()
    (dw_only,) = torch.autograd.grad(rms_norm(xd, w, backend=backend), (w,), dy)
    assert torch.equal(dw_only, w.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_rms_norm_matches_llama_rms_norm(backend, x_dtype, w_dtype):
    """Same output dtype as transformers' LlamaRMSNorm (promote(x, weight): fp32 for the
    mixed case) and the same values: equal bits with the torch backend; with the
    kernels (whose sum of squares adds in another order) at most one unit in the last
    place (fp32: a few), for half inputs almost everywhere none."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    H, eps = 100, 1e-5
    module = LlamaRMSNorm(H, eps)
    with torch.no_grad():
        module.weight.copy_(1 + 0.5 * torch.randn(H, generator=gen(1)))
    module = module.to(w_dtype)
    x = (torch.randn(3, 17, H, generator=gen(2)) * 2).to(x_dtype).requires_grad_()
    want = module(x)
    got = rms_norm(x, module.weight, eps, backend=backend)
    assert got.dtype == want.dtype and got.shape == want.shape
    if backend == "torch":
        assert torch.equal(got, want)
    else:
        # fp32: rstd's rounding differs by a few ulps, so y's may too
        ulps = 4 if want.dtype == torch.float32 else 1
        bound = ulps * torch.finfo(want.dtype).eps * want.detach().abs().float()
        diff = (got.detach().float() - want.detach().float()).abs()
        assert bool((diff <= bound).all()), f"max diff {diff.max():.3g} exceeds {ulps} ulp"
        assert (diff == 0).float().mean() >= (0.5 if want.dtype == torch.float32 else 0.99)
    dy = torch.randn(want.shape, generator=gen(3)).to(want.dtype)
    got_g = torch.autograd.grad(got, (x, module.weight), dy)
    want_g = torch.autograd.grad(want, (x, module.weight), dy)
    for name, o, r in zip(("dx", "dweight"), got_g, want_g):
        assert o.dtype == r.dtype, name
        if x_dtype == torch.float32:
            check(name, o, r.double(), 1e-5)


def test_rms_norm_saves_x_and_rstd_only():
    """Saved for backward: x itself (no copy), the weight and rstd (one fp32 per row);
    no normalised x."""
    x, w, dy = norm_inputs((4, 6), 37, torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = rms_norm(x, w, backend="triton")
    assert len(saved) == 3, [tuple(t.shape) for t in saved]
    xs, ws, rstd = saved
    assert xs.data_ptr() == x.data_ptr() and xs.numel() == x.numel()
    assert ws.data_ptr() == w.data_ptr()
    assert rstd.shape == (24,) and rstd.dtype == torch.float32
    y.backward(dy)


def test_rms_norm_empty_and_auto():
    w = torch.ones(5, requires_grad=True)
    x = torch.zeros(0, 5, requires_grad=True)
    for backend in ("triton", "torch", "auto"):
        y = rms_norm(x, w, backend=backend)
        assert y.shape == (0, 5)
        dx, dw = torch.autograd.grad(y.sum(), (x, w))
        assert dx.shape == (0, 5) and dw.shape == (5,) and dw.abs().sum() == 0
    x, w, _ = norm_inputs((3, 4), 16, torch.float32)
    assert torch.equal(rms_norm(x, w), rms_norm(x, w, backend="torch")), "auto is the torch path on the CPU"


# ----------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", GLU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_matches_float64(shape, dtype, backend):
    gate, up, dy = glu_inputs(shape, dtype)
    check_against_float64(("y", "dgate", "dup"), lambda g, u: swiglu(g, u, backend=backend),
                          swiglu_ref, (gate, up), dy, dtype)


def test_swiglu_non_contiguous():
    """gate / up as the two halves of a fused gate_up output (row stride 2N: no copy),
    transposed 2-D inputs, and permuted 3-D inputs with a stride-0 incoming gradient."""
    g = gen(7)
    gu = torch.randn(9, 2 * 37, generator=g) * 2
    cases = [
        (gu[:, :37], gu[:, 37:]),
        (torch.randn(37, 11, generator=g).t(), torch.randn(37, 11, generator=g).t()),
        (torch.randn(5, 3, 40, generator=g).transpose(0, 1), torch.randn(3, 40, 5, generator=g).permute(0, 2, 1)),
    ]
    for g0, u0 in cases:
        assert not g0.is_contiguous() and not u0.is_contiguous()
        for backend in BACKENDS:
            gate, up = g0.detach().requires_grad_(), u0.detach().requires_grad_()
            y = swiglu(gate, up, backend=backend)
            assert y.is_contiguous()
            for dy in (torch.randn(y.shape, generator=g), torch.ones(()).expand(y.shape)):
                got = (y,) + torch.autograd.grad(y, (gate, up), dy, retain_graph=True)
                g64, u64 = leaf64(gate), leaf64(up)
                ref = swiglu_ref(g64, u64)
                want = (ref.detach(),) + torch.autograd.grad(ref, (g64, u64), dy.double())
                for name, o, r in zip(("y", "dgate", "dup"), got, want):
                    check(f"{backend} {name} {tuple(gate.shape)}", o, r, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_torch_silu(dtype):
    """``F.silu(g) * u`` in the same dtype: equal up to one rounding (the kernel rounds
    once, torch after the silu and after the product), gradients likewise."""
    gate, up, dy = glu_inputs((4, 9, 50), dtype, seed=3)
    want = F.silu(gate) * up
    got = swiglu(gate, up, backend="triton")
    step = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=step, atol=step * want.detach().abs().max().item())
    got_g = torch.autograd.grad(got, (gate, up), dy)
    want_g = torch.autograd.grad(want, (gate, up), dy)
    for o, r in zip(got_g, want_g):
        torch.testing.assert_close(o, r, rtol=2 * step, atol=2 * step * r.abs().max().item())


def test_swiglu_saves_gate_and_up_only():
    gate, up, dy = glu_inputs((6, 33), torch.float16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = swiglu(gate, up, backend="triton")
    assert [t.data_ptr() for t in saved] == [gate.data_ptr(), up.data_ptr()]
    y.backward(dy)
    assert gate.grad is not None and up.grad is not None


def test_swiglu_one_input_trainable_and_empty():
    gate, up, dy = glu_inputs((5, 20), torch.float32)
    up = up.detach()
    y = swiglu(gate, up, backend="triton")
    y.backward(dy)
    g64 = leaf64(gate)
    check("dgate", gate.grad, torch.autograd.grad(swiglu_ref(g64, up.double()), (g64,), dy.double())[0], 1e-5)
    assert up.grad is None
    for shape in ((0, 7), (3, 0), (2, 0, 4)):
        e = torch.zeros(shape, requires_grad=True)
        y = swiglu(e, e.detach(), backend="triton")
        assert y.shape == shape
        assert torch.autograd.grad(y.sum(), (e,))[0].shape == shape


# ----------------------------------------------------------------------------
# torch.library registrations, torch.compile
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_rms_norm_ops(dtype):
    x, w, dy = norm_inputs((13,), 37, dtype)
    torch.library.opcheck(torch.ops.rankwise.rms_norm.default, (x, w, 1e-6, "triton"))
    y, rstd = torch.ops.rankwise.rms_norm(x.detach(), w.detach(), 1e-6, "triton")
    for need_weight in (True, False):
        torch.library.opcheck(torch.ops.rankwise.rms_norm_bwd.default,
                              (dy, x.detach(), w.detach(), rstd, "triton", need_weight))


def test_opcheck_swiglu_ops():
    gate, up, dy = glu_inputs((9, 37), torch.float32)
    torch.library.opcheck(torch.ops.rankwise.swiglu.default, (gate, up, "triton"))
    torch.library.opcheck(torch.ops.rankwise.swiglu_bwd.default, (dy, gate.detach(), up.detach(), "triton"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_matches_eager(backend):
    """A Llama-style block (norm, gate/up projections, SwiGLU) compiled with
    ``aot_eager`` and ``fullgraph=True`` gives eager's outputs and gradients; the
    forward graph calls the two custom ops and the backward graph their backward ops."""
    g = gen(11)
    x = torch.randn(2, 7, 24, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(24, generator=g)).requires_grad_()
    Wg = (torch.randn(40, 24, generator=g) / 5).requires_grad_()
    Wu = (torch.randn(40, 24, generator=g) / 5).requires_grad_()

    def fn(x, w, Wg, Wu):
        h = rms_norm(x, w, 1e-6, backend=backend)
        y = swiglu(h @ Wg.t(), h @ Wu.t(), backend=backend)
        return y * y + y

    inputs = (x, w, Wg, Wu)
    want_y = fn(*inputs)
    want = (want_y,) + torch.autograd.grad(want_y.sum(), inputs)
    recording, graphs = recording_backend()
    for compile_backend in ("aot_eager", recording):
        torch._dynamo.reset()
        got_y = torch.compile(fn, backend=compile_backend, fullgraph=True)(*inputs)
        got = (got_y,) + torch.autograd.grad(got_y.sum(), inputs)
        for name, o, r in zip(("y", "dx", "dweight", "dWg", "dWu"), got, want):
            torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    torch._dynamo.reset()
    assert {"rankwise.rms_norm.default", "rankwise.swiglu.default"} <= op_names(graphs["forward"][0])
    assert {"rankwise.rms_norm_bwd.default", "rankwise.swiglu_bwd.default"} <= op_names(graphs["backward"][0])


# ----------------------------------------------------------------------------
# Argument errors
# ----------------------------------------------------------------------------


def test_rms_norm_errors_name_the_argument():
    x, w, _ = norm_inputs((5,), 8, torch.float32)
    cases = [
        (dict(x=x[:, :7]), "weight"),  # x's last dimension 7 vs weight (8,)
        (dict(weight=w[:7]), "weight"),
        (dict(weight=w[None]), "weight"),
        (dict(weight=w.to(torch.int32)), "weight"),
        (dict(weight=[1.0] * 8), "weight"),
        (dict(x=x.to(torch.int64)), "x"),
        (dict(x=x.detach().numpy()), "x"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1e-6), "eps"),
        (dict(eps=math.inf), "eps"),
        (dict(eps="1e-6"), "eps"),
        (dict(backend="cuda"), "backend"),
        (dict(x=x.double(), weight=w.double(), backend="triton"), "x"),  # Triton takes fp16/bf16/fp32
    ]
    for over, name in cases:
        kw = dict(x=x, weight=w, eps=1e-6)
        kw.update(over)
        with pytest.raises((ValueError, TypeError), match=f"^{name}:"):
            rms_norm(**kw)


def test_swiglu_errors_name_the_argument():
    gate, up, _ = glu_inputs((5, 8), torch.float32)
    cases = [
        (dict(up=up[:, :7]), "up"),
        (dict(up=up[None]), "up"),
        (dict(up=up.half()), "up"),
        (dict(up=up.to(torch.int32)), "up"),
        (dict(gate=gate.to(torch.int64), up=up.to(torch.int64)), "gate"),
        (dict(gate=gate.sum()), "gate"),
        (dict(gate=1.0), "gate"),
        (dict(backend="Triton"), "backend"),
        (dict(gate=gate.double(), up=up.double(), backend="triton"), "gate"),
    ]
    for over, name in cases:
        kw = dict(gate=gate, up=up)
        kw.update(over)
        with pytest.raises((ValueError, TypeError), match=f"^{name}:"):
            swiglu(**kw)


def test_public_reference_names_are_the_torch_path():
    """``rms_norm_reference`` / ``swiglu_reference`` stay importable as the torch backend
    (the tests' own references are in helpers.py)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 24, generator=g).half(), torch.randn(24, generator=g).half()
    assert torch.equal(rms_norm_reference(x, w, 1e-6), rms_norm(x, w, 1e-6, backend="torch"))
    gate, up = torch.randn(3, 7, generator=g).bfloat16(), torch.randn(3, 7, generator=g).bfloat16()
    assert torch.equal(swiglu_reference(gate, up), swiglu(gate, up, backend="torch"))
