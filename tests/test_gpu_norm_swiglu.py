"""RMSNorm and SwiGLU kernels on a CUDA device (skipped elsewhere): bf16 and fp16
at 7B (Llama-2-7B) layer shapes and awkward ones, against a float64 reference.

Tolerance (as tests/test_gpu_kernels.py): the kernel's error (max abs diff over max
abs of the fp64 result) may be at most 2x the error of the same math done by torch
in that dtype (HF's LlamaRMSNorm math / ``F.silu(g) * u``, gradients by autograd),
plus a floor of 2^-8 (bf16) / 2^-11 (fp16) relative, for the output and each gradient.
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FLOOR = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def compare(names, got, want, torch_low, dtype):
    for name, a, w, t in zip(names, got, want, torch_low):
        assert a.dtype == t.dtype, f"{name}: dtype {a.dtype}, torch gives {t.dtype}"
        tol = 2 * rel(t, w) + FLOOR[dtype]
        err = rel(a, w)
        assert err <= tol, f"{name}: kernel error {err:.3g} > {tol:.3g} (torch {dtype} error {rel(t, w):.3g})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,H", [(8192, 4096), (333, 5120), (64, 20000), (1000, 1)])
def test_rms_norm_on_gpu(dtype, M, H):
    """7B: 8192 tokens x 4096; a row longer than the 8192-wide block (two-pass path)."""
    from helpers import rms_norm_ref

    from rankwise.kernels.rms_norm import rms_norm

    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(M, H, device="cuda", generator=g) * 2 + 0.3).to(dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(H, device="cuda", generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(M, H, device="cuda", generator=g).to(dtype)
    eps = 1e-5 if H > 1 else 0.5  # hidden size 1: see tests/test_norm_swiglu.py
    y = rms_norm(x, w, eps, backend="triton")
    got = (y,) + torch.autograd.grad(y, (x, w), dy)

    def ref(grad_dtype):
        xs, ws = x.detach().to(grad_dtype).requires_grad_(), w.detach().to(grad_dtype).requires_grad_()
        out = rms_norm_ref(xs, ws, eps)
        return (out,) + torch.autograd.grad(out, (xs, ws), dy.to(grad_dtype))

    compare(("y", "dx", "dweight"), got, ref(torch.float64), ref(dtype), dtype)
    # dweight: fp32 partial sums per program, reduced by torch: the same bits every time
    y2 = rms_norm(x, w, eps, backend="triton")
    assert torch.equal(torch.autograd.grad(y2, (w,), dy)[0], got[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_matches_llama_module_on_gpu(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from rankwise.kernels.rms_norm import rms_norm

    module = LlamaRMSNorm(4096, 1e-5).cuda()
    with torch.no_grad():
        module.weight.copy_(1 + 0.2 * torch.randn(4096, device="cuda"))
    module = module.to(dtype)
    x = torch.randn(4, 2048, 4096, device="cuda").to(dtype)
    want, got = module(x), rms_norm(x, module.weight, 1e-5, backend="triton")
    assert got.dtype == want.dtype
    diff = (got.float() - want.float()).abs()
    assert bool((diff <= torch.finfo(dtype).eps * want.float().abs()).all()), "more than one ulp from HF"
    assert (diff == 0).float().mean() >= 0.99


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,fused", [(8192, 11008, False), (2048, 11008, True), (333, 1000, False)])
def test_swiglu_on_gpu(dtype, M, N, fused):
    """7B MLP: 8192 tokens x 11008; ``fused``: gate and up as the halves of one
    gate_up projection output (row stride 2N, no copy)."""
    from helpers import swiglu_ref

    from rankwise.kernels.swiglu import swiglu

    g = torch.Generator(device="cuda").manual_seed(0)
    if fused:
        gu = (torch.randn(M, 2 * N, device="cuda", generator=g) * 2).to(dtype).requires_grad_()
        gate, up = gu[:, :N], gu[:, N:]
    else:
        gate = (torch.randn(M, N, device="cuda", generator=g) * 2).to(dtype).requires_grad_()
        up = torch.randn(M, N, device="cuda", generator=g).to(dtype).requires_grad_()
    dy = torch.randn(M, N, device="cuda", generator=g).to(dtype)
    y = swiglu(gate, up, backend="triton")
    got = (y,) + torch.autograd.grad(y, (gate, up), dy)

    def ref(grad_dtype):
        gs, us = gate.detach().to(grad_dtype).requires_grad_(), up.detach().to(grad_dtype).requires_grad_()
        out = swiglu_ref(gs, us)
        return (out,) + torch.autograd.grad(out, (gs, us), dy.to(grad_dtype))

    compare(("y", "dgate", "dup"), got, ref(torch.float64), ref(dtype), dtype)
