"""The split path of the LoRA layer (``path="split"``): the base product by torch
(cuBLAS on CUDA), then one Triton kernel adding the low-rank term in place, for
the forward Y and the backward dX. Same contract as the fused path
(tests/test_lora_linear.py): forward and every gradient against a float64
reference of its own (``helpers.lora_linear_ref64``), awkward shapes, fp32 and
fp16, dropout with the kernels' mask, under TRITON_INTERPRET=1 on a CPU.

Tolerances, max|out - ref64| / max|ref64| per tensor:
- fp32: 2e-5;
- fp16: at most 2x the error of the same math done by torch in fp16 (floor
  1e-3), never above 5e-3. The split path rounds the base product to fp16
  before the tail is added (the fused path rounds once), as torch's own fp16
  layer does.
"""
import pytest
import torch

from helpers import check, lora_linear_ref64, nf4_dequantize_ref64, rel_err
from rankwise.kernels import dropout_mask, lora_linear, lora_linear_torch
from rankwise.kernels.lowrank import lowrank_dx_add_, lowrank_fwd_add_
from rankwise.quant import quantize_nf4

TOL = {torch.float32: 2e-5, torch.float16: 5e-3}

# (lead dims of x, in_features, out_features, r): rows and columns not multiples of the
# interpreter's 32-blocks, rank 1, a rank over one block, 3-D x, a single row.
SHAPES = [
    ((37,), 45, 29, 1),
    ((70,), 100, 90, 5),
    ((2, 17), 33, 47, 16),
    ((19,), 40, 24, 40),
    ((1,), 64, 64, 3),
]


def make_inputs(lead, K, N, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(dtype).requires_grad_()
    B = (torch.randn(N, r, generator=g) / r**0.5).to(dtype).requires_grad_()
    b = torch.randn(N, generator=g).to(dtype).requires_grad_() if bias else None
    return x, W, A, B, b


def compare(lead, K, N, r, dtype, *, bias=True, dropout_p=0.0, scaling=1.7, x_transform=None, path="split",
            nf4=None):
    """``nf4``: None (dense W), else ``(double_quant, W's dtype)``: W quantized to NF4,
    the reference on its float64 dequantization rounded to W's dtype."""
    x, W, A, B, b = make_inputs(lead, K, N, r, dtype, bias)
    base = W
    if nf4 is not None:
        base = quantize_nf4(W.float().to(nf4[1]), double_quant=nf4[0])
        W = nf4_dequantize_ref64(base).float().to(nf4[1]).to(dtype)
    x_in = x if x_transform is None else x_transform(x)
    seed = 99
    y = lora_linear(x_in, base, A, B, scaling, bias=b, dropout_p=dropout_p, seed=seed, backend="triton", path=path)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    wanted = [t for t in (x, A, B, b) if t is not None]
    got = torch.autograd.grad(y, wanted, dy)

    keep = dropout_mask(x_in.shape, dropout_p, seed) if dropout_p > 0 else None
    ref = [t.detach().double().requires_grad_() for t in wanted]
    x64 = ref[0] if x_transform is None else x_transform(ref[0])
    y64 = lora_linear_ref64(x64, W.double(), ref[1], ref[2], scaling, ref[3] if bias else None, dropout_p,
                            keep_mask=keep)
    want = torch.autograd.grad(y64, ref, dy.double())

    tol = TOL[dtype]
    if dtype == torch.float16:  # relative to torch's own fp16 error, capped
        yl = lora_linear_torch(x_in.detach(), W, A.detach(), B.detach(), scaling,
                                   b.detach() if bias else None, dropout_p, keep_mask=keep)
        tol = min(TOL[dtype], max(2 * rel_err(yl, y64), 1e-3))
    check("y", y, y64, tol)
    for name, g_, w_ in zip(("dx", "dA", "dB", "dbias"), got, want):
        check(name, g_, w_, TOL[dtype])


@pytest.mark.parametrize("lead,K,N,r", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_forward_and_grads_match_float64(lead, K, N, r, dtype):
    compare(lead, K, N, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,K,N,r", [((41,), 70, 50, 6), ((3, 11), 33, 20, 1)])
def test_split_with_dropout_matches_float64_with_the_kernel_mask(lead, K, N, r, dtype):
    compare(lead, K, N, r, dtype, dropout_p=0.3)


@pytest.mark.parametrize("dtype,double_quant,wdtype,dropout_p", [
    (torch.float32, False, torch.float32, 0.0),
    (torch.float32, True, torch.bfloat16, 0.3),
    (torch.float16, True, torch.float16, 0.3),
])
@pytest.mark.parametrize("lead,K,N,r", [((37,), 64, 29, 1), ((2, 17), 70, 47, 16)])
def test_split_nf4_base_matches_float64(lead, K, N, r, dtype, double_quant, wdtype, dropout_p):
    """NF4 base: W dequantized whole (bitsandbytes' values in W's dtype), torch's GEMM, the tail."""
    compare(lead, K, N, r, dtype, dropout_p=dropout_p, nf4=(double_quant, wdtype))


def test_split_without_bias_and_non_contiguous_x():
    compare((23,), 50, 35, 4, torch.float32, bias=False)
    compare((26,), 35, 22, 4, torch.float32, x_transform=lambda x: torch.cat([x, x], dim=1)[:, ::2])
    compare((6, 9), 20, 18, 2, torch.float32, x_transform=lambda x: x.transpose(0, 1), dropout_p=0.2)


def test_split_and_fused_agree_and_auto_is_fused_on_cpu():
    x, W, A, B, b = make_inputs((2, 21), 38, 27, 7, torch.float32)
    out = {}
    for path in ("fused", "split", "auto"):
        y = lora_linear(x, W, A, B, 0.9, b, dropout_p=0.25, seed=3, backend="triton", path=path)
        out[path] = (y,) + torch.autograd.grad(y, (x, A, B), torch.ones_like(y))
    for f, s in zip(out["fused"], out["split"]):
        torch.testing.assert_close(s, f, rtol=2e-5, atol=2e-5)
    for f, a in zip(out["fused"], out["auto"]):
        assert torch.equal(f, a)


def test_tail_kernels_in_place_against_float64():
    """The two in-place tails alone, on a strided output and strided operands."""
    g = torch.Generator().manual_seed(5)
    M, N, K, r = 45, 39, 50, 3
    Y0 = torch.randn(M, 2 * N, generator=g)[:, ::2]
    S = torch.randn(r, M, generator=g).t()
    B = torch.randn(N, r, generator=g)
    Y = Y0.clone()
    out = lowrank_fwd_add_(Y, S, B, 0.6)
    assert out is Y
    check("Y += s S B^T", Y, Y0.double() + 0.6 * S.double() @ B.double().t(), 2e-6)

    dX0 = torch.randn(M, K, generator=g)
    dS = torch.randn(M, r, generator=g)
    A = torch.randn(K, r, generator=g).t()
    keep = dropout_mask((M, K), 0.4, 11)
    dX = dX0.clone()
    lowrank_dx_add_(dX, dS, A, 0.4, 11)
    check("dX += (dS A) m / (1-p)", dX, dX0.double() + (dS.double() @ A.double()) * keep / 0.6, 2e-6)
    dX = dX0.clone()
    lowrank_dx_add_(dX, dS, A)
    check("dX += dS A", dX, dX0.double() + dS.double() @ A.double(), 2e-6)
    empty = torch.empty(0, N)
    assert lowrank_fwd_add_(empty, torch.empty(0, r), B, 1.0) is empty


def test_empty_batch_and_bad_path():
    x, W, A, B, b = make_inputs((0,), 16, 8, 2, torch.float32)
    y = lora_linear(x, W, A, B, 1.0, b, backend="triton", path="split")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert A.grad is not None and torch.count_nonzero(A.grad) == 0
    with pytest.raises(ValueError, match="path"):
        lora_linear(x, W, A, B, 1.0, b, backend="triton", path="cublas")


def test_opcheck_split_path():
    x, W, A, B, b = (t.detach() for t in make_inputs((9,), 20, 12, 3, torch.float32))
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    torch.library.opcheck(torch.ops.rankwise.lora_linear.default, (x, W, A, B, b, 0.7, 0.2, 5, "split"))


def test_opcheck_nf4_split_path():
    from rankwise.kernels.nf4 import nf4_kernel_args

    x, W, A, B, b = (t.detach() for t in make_inputs((9,), 64, 12, 3, torch.float32))
    for t in (x, A, B):
        t.requires_grad_()
    q = quantize_nf4(W, double_quant=True)
    tensors, c = nf4_kernel_args(q)
    torch.library.opcheck(torch.ops.rankwise.nf4_lora_linear.default,
                          (x, A, B, b, *tensors, c["BLOCKSIZE"], c["DOUBLE"], c["NESTED_BLOCKSIZE"], q.dtype,
                           0.7, 0.2, 5, "split"))
