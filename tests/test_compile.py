"""The fused ops under torch.compile: the torch.library registrations
(``rankwise::lora_linear``, ``rankwise::nf4_lora_linear`` and their backward
ops) pass ``torch.library.opcheck``, and compiled functions and modules give
eager's outputs and gradients.

On a CPU machine the Triton kernels run under TRITON_INTERPRET=1 (conftest.py);
the compile backend is ``aot_eager`` (AOTAutograd's forward and backward graphs,
run by eager torch), which exercises everything the op registrations provide
(fake functions, autograd formula, functionalization) without compiling C++.
One small case also goes through ``inductor``.

Compiled and eager run the same kernels on the same inputs, so results agree
to fp32 rounding at most (bitwise under the interpreter, which runs programs
in order; on a GPU dB is summed with atomics, hence the tolerances).
"""
import shutil

import pytest
import torch

from helpers import op_names, recording_backend

import rankwise
from rankwise.kernels import lora_linear
from rankwise.kernels.nf4 import nf4_kernel_args
from rankwise.quant import NF4Linear, quantize_nf4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles afresh (no cache hits or recompile limits across tests)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_inputs(lead, K, N, r, bias=True, weight_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE).requires_grad_(grad)

    x = t(*lead, K)
    W = t(N, K, scale=K**-0.5, grad=weight_grad)
    A = t(r, K, scale=K**-0.5)
    B = t(N, r, scale=r**-0.5)
    b = t(N) if bias else None
    return x, W, A, B, b


def outputs_and_grads(fn, inputs):
    """``fn(*inputs)`` and the gradients of a non-linear loss (so dY is not
    constant) for every input that requires grad."""
    y = fn(*inputs)
    want = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [y.detach()] + list(torch.autograd.grad((y * y).sum() + y.sum(), want))


def assert_same(got, ref, names):
    assert len(got) == len(ref) == len(names)
    for name, a, b in zip(names, got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------
# opcheck: schema, autograd registration, fake functions vs the real kernels,
# and AOTAutograd with dynamic shapes (forward and backward vs eager).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bias,dropout_p,grad", [
    (True, 0.0, "all"),        # every input that can have a gradient has one (W too)
    (False, 0.3, "lora"),      # no bias, dropout: x, A, B
    (True, 0.3, "A"),          # only A: dS and dA but not dX
])
def test_opcheck_lora_linear(bias, dropout_p, grad):
    x, W, A, B, b = make_inputs((37,), 45, 29, 3, bias=bias, weight_grad=(grad == "all"))
    if grad == "A":
        x, B = x.detach(), B.detach()
    torch.library.opcheck(torch.ops.rankwise.lora_linear.default, (x, W, A, B, b, 0.7, dropout_p, 5))


def test_opcheck_backward_ops():
    g = torch.Generator().manual_seed(1)
    dY, S, dS = (torch.randn(37, n, generator=g).to(DEVICE) for n in (29, 3, 3))
    x, W, A, B = (t.detach() for t in make_inputs((37,), 45, 29, 3, bias=False)[:4])
    torch.library.opcheck(torch.ops.rankwise.lora_ds_db.default, (dY, S, B, 0.7))
    torch.library.opcheck(torch.ops.rankwise.lora_dx.default, (dY, W, dS, A, 0.3, 5))
    torch.library.opcheck(torch.ops.rankwise.lora_da.default, (dS, x, 0.3, 5, torch.float32))


@pytest.mark.parametrize("double_quant", [False, True])
def test_opcheck_nf4_ops(double_quant):
    x, W, A, B, b = make_inputs((37,), 45, 29, 3)
    q = quantize_nf4(W.detach(), double_quant=double_quant)
    tensors, c = nf4_kernel_args(q)
    nf4 = (*tensors, c["BLOCKSIZE"], c["DOUBLE"], c["NESTED_BLOCKSIZE"], q.dtype)
    torch.library.opcheck(torch.ops.rankwise.nf4_lora_linear.default, (x, A, B, b, *nf4, 0.7, 0.3, 5))
    dY = torch.randn(37, 29, device=DEVICE)
    dS = torch.randn(37, 3, device=DEVICE)
    torch.library.opcheck(torch.ops.rankwise.nf4_lora_dx.default, (dY, *nf4, dS, A.detach(), 0.3, 5))


# ----------------------------------------------------------------------------
# torch.compile(fullgraph=True) == eager
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("lead,bias,weight_grad", [
    ((37,), True, False),
    ((2, 19), True, False),    # 3-D x
    ((3, 13), False, True),    # no bias, base weight requiring grad (dW)
])
def test_compiled_function_matches_eager(lead, bias, weight_grad):
    inputs = make_inputs(lead, 45, 29, 3, bias=bias, weight_grad=weight_grad)

    def fn(x, W, A, B, b):
        return lora_linear(x, W, A, B, 0.7, bias=b, backend="triton")

    backend, graphs = recording_backend()
    got = outputs_and_grads(torch.compile(fn, backend=backend, fullgraph=True), inputs)
    ref = outputs_and_grads(fn, inputs)
    names = ["y"] + ["d" + n for n, t in zip(("x", "W", "A", "B", "bias"), inputs)
                     if t is not None and t.requires_grad]
    assert_same(got, ref, names)
    # The graphs call our ops: the forward op, and the backward kernels through
    # the registered autograd formula (not a decomposition of the math).
    assert "rankwise.lora_linear.default" in op_names(graphs["forward"][0])
    assert {"rankwise.lora_ds_db.default", "rankwise.lora_dx.default",
            "rankwise.lora_da.default"} <= op_names(graphs["backward"][0])


def test_compiled_function_with_non_contiguous_x():
    x, W, A, B, b = make_inputs((6, 9), 20, 18, 2)

    def fn(x, W, A, B, b):
        return lora_linear(x.transpose(0, 1), W, A, B, 1.3, bias=b, backend="triton")

    got = outputs_and_grads(torch.compile(fn, backend="aot_eager", fullgraph=True), (x, W, A, B, b))
    ref = outputs_and_grads(fn, (x, W, A, B, b))
    assert_same(got, ref, ["y", "dx", "dA", "dB", "dbias"])


def test_compiled_function_with_dynamic_shapes():
    """One graph with a symbolic row count serves two batch sizes."""
    def fn(x, W, A, B, b):
        return lora_linear(x, W, A, B, 0.7, bias=b, backend="triton")

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for lead in ((37,), (2, 11)):
        inputs = make_inputs(lead, 45, 29, 3)
        assert_same(outputs_and_grads(compiled, inputs), outputs_and_grads(fn, inputs),
                    ["y", "dx", "dA", "dB", "dbias"])


@pytest.mark.parametrize("lead", [(37,), (2, 19)])
def test_compiled_dropout_with_fixed_seed_matches_eager(lead):
    inputs = make_inputs(lead, 45, 29, 3)

    def fn(x, W, A, B, b):
        return lora_linear(x, W, A, B, 0.7, bias=b, dropout_p=0.3, seed=1234, backend="triton")

    got = outputs_and_grads(torch.compile(fn, backend="aot_eager", fullgraph=True), inputs)
    ref = outputs_and_grads(fn, inputs)
    assert_same(got, ref, ["y", "dx", "dA", "dB", "dbias"])
    # and the mask is really applied: another seed changes the output
    other = lora_linear(*inputs[:4], 0.7, bias=inputs[4], dropout_p=0.3, seed=99, backend="triton")
    assert not torch.allclose(other.detach(), ref[0])


def test_compiled_deterministic_mode_matches_eager():
    """The deterministic flag is read by the dB launcher when it runs, compiled or not."""
    inputs = make_inputs((45,), 30, 70, 5)

    def fn(x, W, A, B, b):
        return lora_linear(x, W, A, B, 0.5, bias=b, backend="triton")

    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = outputs_and_grads(torch.compile(fn, backend="aot_eager", fullgraph=True), inputs)
        ref = outputs_and_grads(fn, inputs)
    finally:
        torch.use_deterministic_algorithms(was)
    assert_same(got, ref, ["y", "dx", "dA", "dB", "dbias"])


# ----------------------------------------------------------------------------
# Through rankwise.LoRALinear
# ----------------------------------------------------------------------------


def module_outputs_and_grads(module, x):
    for p in module.parameters():
        p.grad = None
    xx = x.detach().clone().requires_grad_()
    y = module(xx)
    ((y * y).sum() + y.sum()).backward()
    return [y.detach(), xx.grad, module.lora_A.grad, module.lora_B.grad]


def make_layer(base, dropout=0.0):
    torch.manual_seed(0)
    layer = rankwise.LoRALinear(base, r=3, alpha=6, dropout=dropout, backend="triton")
    torch.nn.init.normal_(layer.lora_B)  # B starts at zero: make the LoRA branch count
    return layer


def test_compiled_lora_module_matches_eager():
    torch.manual_seed(0)
    layer = make_layer(torch.nn.Linear(45, 29).to(DEVICE))
    x = torch.randn(2, 19, 45, device=DEVICE)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert_same(module_outputs_and_grads(compiled, x), module_outputs_and_grads(layer, x),
                ["y", "dx", "dA", "dB"])
    assert layer.base.weight.grad is None and layer.base.bias.grad is None  # frozen base


def test_compiled_lora_module_over_nf4_base_matches_eager():
    torch.manual_seed(0)
    base = NF4Linear.from_linear(torch.nn.Linear(45, 29), double_quant=True).to(DEVICE)
    layer = make_layer(base)
    x = torch.randn(2, 19, 45, device=DEVICE)
    backend, graphs = recording_backend()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    assert_same(module_outputs_and_grads(compiled, x), module_outputs_and_grads(layer, x),
                ["y", "dx", "dA", "dB"])
    assert "rankwise.nf4_lora_linear.default" in op_names(graphs["forward"][0])
    assert "rankwise.nf4_lora_dx.default" in op_names(graphs["backward"][0])


@pytest.mark.parametrize("nf4", [False, True])
def test_compiled_training_dropout_with_drawn_seed_matches_eager(nf4):
    """A module in training mode with dropout draws its seed from torch's
    generator (``.item()`` of a random int). With ``capture_scalar_outputs`` the
    draw stays in the graph and the seed reaches the op as a symbolic int, so
    the whole layer is one graph; the same ``torch.manual_seed`` gives the same
    mask compiled and eager."""
    torch.manual_seed(0)
    base = torch.nn.Linear(45, 29)
    base = (NF4Linear.from_linear(base) if nf4 else base).to(DEVICE)
    layer = make_layer(base, dropout=0.25).train()
    x = torch.randn(2, 19, 45, device=DEVICE)
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        torch.manual_seed(5)
        got = module_outputs_and_grads(compiled, x)
    torch.manual_seed(5)
    ref = module_outputs_and_grads(layer, x)
    assert_same(got, ref, ["y", "dx", "dA", "dB"])


# ----------------------------------------------------------------------------
# inductor (compiles C++ on the CPU: one small case)
# ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(DEVICE == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor on the CPU needs a C++ compiler")
def test_inductor_matches_eager():
    inputs = make_inputs((2, 19), 45, 29, 3)

    def fn(x, W, A, B, b):  # a pointwise op after the layer for inductor to fuse/generate
        return torch.relu(lora_linear(x, W, A, B, 0.7, bias=b, dropout_p=0.2, seed=11, backend="triton"))

    got = outputs_and_grads(torch.compile(fn, backend="inductor", fullgraph=True), inputs)
    ref = outputs_and_grads(fn, inputs)
    # inductor generates its own reductions (e.g. dbias), summed in another order
    for name, a, b in zip(["y", "dx", "dA", "dB", "dbias"], got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------
# linear_cross_entropy: the same two checks.
# ----------------------------------------------------------------------------


def lce_inputs(N=37, H=12, V=77, head_grad=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(DEVICE).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H**0.5).to(DEVICE).requires_grad_(head_grad)
    b = torch.randn(V, generator=g).to(DEVICE).requires_grad_(head_grad) if bias else None
    t = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    t[::4] = -100
    return h, W, b, t


@pytest.mark.parametrize("reduction,head_grad", [("mean", True), ("sum", False), ("none", True)])
def test_opcheck_linear_cross_entropy(reduction, head_grad):
    h, W, b, t = lce_inputs(head_grad=head_grad)
    # chunk 8: several chunks, the last one short
    torch.library.opcheck(torch.ops.rankwise.linear_cross_entropy.default,
                          (h, W, b, t, -100, reduction, 8, "triton", True, head_grad, head_grad))
    g = torch.rand(37, device=DEVICE)
    torch.library.opcheck(torch.ops.rankwise.linear_cross_entropy_bwd.default,
                          (h.detach(), W.detach(), b.detach(), t, g, -100, 8, "triton", True, head_grad, head_grad))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiled_linear_cross_entropy_matches_eager(reduction, backend):
    from rankwise.kernels import linear_cross_entropy

    h, W, b, t = lce_inputs()
    hs = h.detach().reshape(1, 37, 12).requires_grad_()  # 3-D hidden states, as a model gives them
    ts = t.reshape(1, 37)

    def fn(h, W, b):
        loss = linear_cross_entropy(h, W, ts, b, reduction=reduction, chunk_size=8, backend=backend)
        return loss if reduction != "none" else loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)

    backend_c, graphs = recording_backend()
    compiled = torch.compile(fn, backend=backend_c, fullgraph=True)
    want = outputs_and_grads(fn, (hs, W, b))
    got = outputs_and_grads(compiled, (hs, W, b))
    assert_same(got, want, ["loss", "dhidden", "dweight", "dbias"])
    if backend == "triton":
        assert "rankwise.linear_cross_entropy.default" in op_names(graphs["forward"][0])
