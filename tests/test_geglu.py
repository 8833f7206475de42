"""Fused GeGLU (``gelu_tanh(gate) * up``, Gemma's MLP activation) against a float64
reference written here, forward and both gradients, both backends (the Triton kernels
under TRITON_INTERPRET=1 on a CPU machine), on awkward shapes and strides.

Tolerances, as max|out - ref64| / max|ref64| per tensor (``helpers.rel_err``):
- fp32: 1e-5 (fp32 math throughout);
- fp16: at most 2x the error of ``F.gelu(g, approximate="tanh") * u`` computed by
  torch in fp16 (gradients by autograd), plus a floor of 2^-11.
(bf16 goes through the same elementwise code; the interpreter's bf16 stores are
checked in the swiglu tests, which share the rounding helper.)
"""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import check
from rankwise.kernels import geglu, geglu_reference

BACKENDS = ["triton", "torch"]
# rows of 1, a masked tile, rank-3 / rank-4 inputs, a row longer than the 1024-wide tile
SHAPES = [(5, 1), (7, 37), (2, 9, 100), (2, 3, 4, 37), (3, 1500)]


def geglu_ref64(gate, up):
    """The tanh form, as written in the GeLU paper (no sigmoid rewrite), in float64."""
    g = gate.double()
    return 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))) * up.double()


def inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate = (torch.randn(*shape, generator=gen) * 3).to(dtype).requires_grad_()
    up = torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
    dy = torch.randn(*shape, generator=gen).to(dtype)
    return gate, up, dy


def against_float64(fn, gate, up, dy):
    y = fn(gate, up)
    got = (y,) + torch.autograd.grad(y, (gate, up), dy)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = geglu_ref64(g64, u64)
    return got, (ref.detach(),) + torch.autograd.grad(ref, (g64, u64), dy.double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_geglu_fp32_matches_float64(shape, backend):
    gate, up, dy = inputs(shape, torch.float32)
    got, want = against_float64(lambda g, u: geglu(g, u, backend=backend), gate, up, dy)
    for name, o, r in zip(("y", "dgate", "dup"), got, want):
        assert o.dtype == torch.float32
        check(f"{backend} {name} {shape}", o, r, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_geglu_fp16_within_twice_torch(backend):
    gate, up, dy = inputs((6, 45), torch.float16, seed=1)
    got, want = against_float64(lambda g, u: geglu(g, u, backend=backend), gate, up, dy)
    g2, u2 = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    torch_got, _ = against_float64(lambda g, u: F.gelu(g, approximate="tanh") * u, g2, u2, dy)
    for name, o, t, r in zip(("y", "dgate", "dup"), got, torch_got, want):
        torch_err = ((t.double() - r).abs().max() / r.abs().max()).item()
        assert o.dtype == torch.float16
        check(f"{backend} fp16 {name}", o, r, 2 * torch_err + 2.0 ** -11)


def test_geglu_strided_halves_and_empty():
    """gate / up as the two halves of a fused gate_up output (a row stride, no copy)
    and a transposed input; an empty input goes through."""
    gen = torch.Generator().manual_seed(3)
    gu = torch.randn(9, 2 * 37, generator=gen) * 2
    cases = [(gu[:, :37], gu[:, 37:]), (torch.randn(37, 11, generator=gen).t(), torch.randn(37, 11, generator=gen).t())]
    for g0, u0 in cases:
        for backend in BACKENDS:
            gate, up = g0.detach().requires_grad_(), u0.detach().requires_grad_()
            dy = torch.randn(gate.shape, generator=gen)
            got, want = against_float64(lambda g, u: geglu(g, u, backend=backend), gate, up, dy)
            assert got[0].is_contiguous()
            for name, o, r in zip(("y", "dgate", "dup"), got, want):
                check(f"{backend} strided {name}", o, r, 1e-5)
    e = torch.zeros(3, 0, requires_grad=True)
    assert geglu(e, e.detach(), backend="triton").shape == (3, 0)


def test_geglu_matches_hf_activation_and_checks_arguments():
    from transformers.activations import ACT2FN

    gate, up, _ = inputs((4, 33), torch.float32, seed=2)
    torch.testing.assert_close(geglu_reference(gate, up), ACT2FN["gelu_pytorch_tanh"](gate) * up,
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="backend"):
        geglu(gate, up, backend="cuda")
    with pytest.raises(ValueError, match="shape"):
        geglu(gate, up[:, :3])
    with pytest.raises(TypeError, match="dtype"):
        geglu(gate, up.double())


def test_geglu_custom_op_passes_opcheck_and_compiles():
    gate, up, dy = inputs((3, 20), torch.float32, seed=4)
    torch.library.opcheck(torch.ops.rankwise.geglu.default, (gate, up, "torch"))
    compiled = torch.compile(lambda g, u: geglu(g, u, backend="torch"), backend="aot_eager", fullgraph=True)
    got, want = against_float64(compiled, gate, up, dy)
    for name, o, r in zip(("y", "dgate", "dup"), got, want):
        check(f"compiled {name}", o, r, 1e-5)
