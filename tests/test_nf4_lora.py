"""The fused NF4 LoRA op: Triton backend (interpreter on CPU) against a float64
reference on the dequantized weight and against the dense op on the same
dequantized weight, forward and every gradient.

The float64 reference is ``helpers.lora_linear_ref64`` on ``helpers.nf4_dequantize_ref64``
(the format's values computed in the test), not the op's torch backend."""
import pytest
import torch
from helpers import lora_linear_ref64, nf4_dequantize_ref64

import rankwise.quant as quant
from rankwise.kernels import dropout_mask, lora_linear, lora_linear_torch
from rankwise.kernels import nf4 as nf4_kernels
from rankwise.kernels.nf4_lora import nf4_lora_linear, nf4_lora_linear_reference
from rankwise.quant import NF4Linear, dequantize_nf4, quantize_nf4

# (lead shape of x, in K, out N, rank r): odd sizes, K not a multiple of the
# 64-value quantization block (blocks straddle rows), odd N*K, rank 1, rank > 16
SHAPES = [((37,), 70, 45, 3), ((5,), 33, 45, 1), ((2, 7), 96, 40, 20)]
# compute dtype -> (rtol, atol) against the float64 reference, for fp32; fp16
# is judged relative to torch's own fp16 error (see _check)
TOL32 = dict(rtol=2e-5, atol=2e-5)


def _inputs(lead, K, N, r, dtype, double_quant, seed, bias=True, wdtype=torch.float32, blocksize=64):
    g = torch.Generator().manual_seed(seed)
    q = quantize_nf4((torch.randn(N, K, generator=g) / K**0.5).to(wdtype), double_quant=double_quant,
                     blocksize=blocksize)
    x = torch.randn(*lead, K, generator=g).to(dtype)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(dtype)
    B = (torch.randn(N, r, generator=g) / r**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    dy = torch.randn(*lead, N, generator=g).to(dtype)
    return q, x, A, B, b, dy


def _run(fn, x, A, B, b, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    bl = b.detach().clone().requires_grad_() if b is not None else None
    y = fn(*leaves, bl)
    y.backward(dy.to(y.dtype))
    grads = [t.grad for t in leaves] + ([bl.grad] if bl is not None else [])
    return [y.detach()] + grads


def _report(name, got, ref):
    err = (got.double() - ref.double()).abs()
    i = int(err.argmax())
    return f"{name}: max err {err.max().item():.3e} at flat {i} (got {got.reshape(-1)[i].item():.6g}, " \
           f"ref {ref.reshape(-1)[i].item():.6g})"


def _check(outs, refs, lowp_refs=None, dtype=torch.float32):
    names = ["y", "dx", "dA", "dB", "dbias"]
    for name, got, ref, *low in zip(names, outs, refs, *([lowp_refs] if lowp_refs else [])):
        assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}"
        if dtype == torch.float32:
            assert torch.allclose(got.double(), ref, **TOL32), _report(name, got, ref)
        else:
            # at most 2x the error torch makes doing the same math in this dtype, plus a floor
            ours = (got.double() - ref).abs().max().item()
            theirs = (low[0].double() - ref).abs().max().item()
            floor = 1e-3 * ref.abs().max().item()
            assert ours <= 2 * theirs + floor, f"{_report(name, got, ref)}; torch {dtype} err {theirs:.3e}"


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype,double_quant", [(torch.float32, False), (torch.float32, True),
                                                (torch.float16, True)])
@pytest.mark.parametrize("lead,K,N,r", SHAPES)
def test_triton_nf4_matches_float64_reference(lead, K, N, r, dtype, double_quant, dropout_p):
    q, x, A, B, b, dy = _inputs(lead, K, N, r, dtype, double_quant, seed=K + N + r)
    seed = 1234
    outs = _run(lambda x_, A_, B_, b_: lora_linear(x_, q, A_, B_, 1.7, b_, dropout_p, seed, backend="triton"),
                x, A, B, b, dy)
    keep = dropout_mask(x.shape, dropout_p, seed) if dropout_p > 0 else None
    # the op computes with exactly these values (W's dtype, then cast to the compute dtype)
    W = nf4_dequantize_ref64(q).float().to(q.dtype)
    assert torch.equal(dequantize_nf4(q), W)
    refs = _run(lambda x_, A_, B_, b_: lora_linear_ref64(x_, W.double(), A_, B_, 1.7, b_, dropout_p,
                                                         keep_mask=keep),
                x.double(), A.double(), B.double(), b.double(), dy.double())
    # torch's own error in a low precision: the torch path with the kernel's mask
    low = _run(lambda x_, A_, B_, b_: lora_linear_torch(x_, W.to(dtype), A_, B_, 1.7, b_, dropout_p,
                                                            keep_mask=keep),
               x, A, B, b, dy) if dtype != torch.float32 else None
    _check(outs, refs, low, dtype)
    # and the dense Triton op on the dequantized weight: same kernels, same mask
    dense = _run(lambda x_, A_, B_, b_: lora_linear(x_, W.to(dtype), A_, B_, 1.7, b_, dropout_p, seed,
                                                    backend="triton"), x, A, B, b, dy)
    for name, got, ref in zip(["y", "dx", "dA", "dB", "dbias"], outs, dense):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-3,
                                   msg=lambda m, name=name: f"{name} vs dense op: {m}")


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
def test_half_precision_weight_rounds_once_to_its_dtype(wdtype):
    """A weight quantized from bf16 / fp16 computes with its values rounded (to nearest)
    to that dtype, as dequantize_nf4 returns them: forward and every gradient vs float64."""
    q, x, A, B, b, dy = _inputs((9,), 70, 33, 4, torch.float32, True, seed=3, wdtype=wdtype)
    assert q.dtype == wdtype
    outs = _run(lambda x_, A_, B_, b_: lora_linear(x_, q, A_, B_, 1.3, b_, backend="triton"), x, A, B, b, dy)
    W64 = nf4_dequantize_ref64(q).float().to(wdtype).double()
    refs = _run(lambda x_, A_, B_, b_: lora_linear_ref64(x_, W64, A_, B_, 1.3, b_),
                x.double(), A.double(), B.double(), b.double(), dy.double())
    _check(outs, refs)


@pytest.mark.parametrize("K,double_quant", [(70, True), (33, False)])
def test_blocksize_32(K, double_quant):
    """Quantization blocks of 32 values (smaller than the kernels' K tiles, straddling
    rows; odd K takes the per-value path): forward and every gradient vs float64."""
    q, x, A, B, b, dy = _inputs((11,), K, 45, 3, torch.float32, double_quant, seed=K, blocksize=32)
    assert q.blocksize == 32
    outs = _run(lambda x_, A_, B_, b_: lora_linear(x_, q, A_, B_, 1.5, b_, backend="triton"), x, A, B, b, dy)
    W64 = nf4_dequantize_ref64(q).float().to(q.dtype).double()
    refs = _run(lambda x_, A_, B_, b_: lora_linear_ref64(x_, W64, A_, B_, 1.5, b_),
                x.double(), A.double(), B.double(), b.double(), dy.double())
    _check(outs, refs)


def test_triton_path_never_dequantizes_whole_weight(monkeypatch):
    q, x, A, B, b, dy = _inputs((9,), 70, 33, 4, torch.float32, True, seed=0)

    def boom(*a, **k):
        raise AssertionError("a full-precision copy of W was made")

    W64 = nf4_dequantize_ref64(q).float().to(q.dtype).double()
    expected = lora_linear_ref64(x.double(), W64, A.double(), B.double(), 0.5, b.double())
    monkeypatch.setattr(quant, "dequantize_nf4", boom)
    monkeypatch.setattr(nf4_kernels, "dequantize_nf4", boom)
    monkeypatch.setattr(nf4_kernels, "nf4_dequantize", boom)
    monkeypatch.setattr(nf4_kernels, "_nf4_dequantize_torch", boom)
    monkeypatch.setattr(nf4_kernels, "_nf4_dequantize_triton", boom)
    monkeypatch.setattr(quant.NF4Weight, "dequantize", boom)
    x.requires_grad_()
    y = lora_linear(x, q, A, B, 0.5, b, backend="triton")
    y.backward(dy)
    assert torch.allclose(y.detach().double(), expected, **TOL32), _report("y", y.detach(), expected)
    assert x.grad is not None


def test_no_bias_and_frozen_inputs():
    q, x, A, B, _, dy = _inputs((6,), 64, 20, 2, torch.float32, False, seed=5, bias=False)
    Ar = A.clone().requires_grad_()
    y = lora_linear(x, q, Ar, B, 2.0, None, backend="triton")  # x and B need no grad
    y.backward(dy)
    W = nf4_dequantize_ref64(q).float().to(q.dtype).double()
    A64 = A.double().requires_grad_()
    ref = lora_linear_ref64(x.double(), W, A64, B.double(), 2.0)
    ref.backward(dy.double())
    assert torch.allclose(y.double(), ref.detach(), **TOL32), _report("y", y, ref)
    assert torch.allclose(Ar.grad.double(), A64.grad, **TOL32), _report("dA", Ar.grad, A64.grad)


def test_torch_backend_and_auto_on_cpu():
    q, x, A, B, b, dy = _inputs((3, 4), 70, 30, 5, torch.float32, True, seed=9)
    W64 = nf4_dequantize_ref64(q).float().to(q.dtype).double()
    refs = _run(lambda x_, A_, B_, b_: lora_linear_ref64(x_, W64, A_, B_, 0.25, b_),
                x.double(), A.double(), B.double(), b.double(), dy.double())
    ys = []
    for backend in ("torch", "auto"):
        outs = _run(lambda x_, A_, B_, b_: nf4_lora_linear(x_, q, A_, B_, 0.25, b_, backend=backend), x, A, B, b, dy)
        assert outs[0].shape == (3, 4, 30)
        _check(outs, refs)  # forward and every gradient vs float64
        ys.append(outs[0])
    assert torch.equal(ys[0], ys[1])  # auto is the torch path on the CPU
    torch.testing.assert_close(ys[0], nf4_lora_linear_reference(x, q, A, B, 0.25, b), rtol=0, atol=0)


def test_lora_linear_over_nf4_linear_module():
    from rankwise.lora import LoRALinear

    torch.manual_seed(0)
    base = NF4Linear.from_linear(torch.nn.Linear(70, 40), double_quant=True)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.0, backend="triton")
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 70, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    ref = torch.nn.functional.linear(x, dequantize_nf4(base.weight), base.bias) + \
        layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-5)
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_errors():
    q, x, A, B, b, _ = _inputs((4,), 64, 20, 2, torch.float32, False, seed=1)
    with pytest.raises(ValueError, match="x: last dimension 63"):
        lora_linear(x[:, :63], q, A, B, 1.0, backend="triton")
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear(x, q, A, B[:-1], 1.0, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        lora_linear(x, q, A, B, 1.0, backend="cuda")
    q1 = quantize_nf4(torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match="weight: expected a 2-D"):
        lora_linear(x, q1, A, B, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("K", [4096, 4095])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_lora_bf16_on_gpu(K, double_quant):
    """bf16 on tensor cores, even (fast path) and odd K: NF4 op vs the dense op on
    the dequantized weight, and both vs float64 (forward and every gradient)."""
    g = torch.Generator().manual_seed(0)
    N, M, r = 1100, 777, 16
    W = (torch.randn(N, K, generator=g) / K**0.5).to("cuda", torch.bfloat16)
    q = quantize_nf4(W, double_quant=double_quant)
    x = torch.randn(M, K, generator=g).to("cuda", torch.bfloat16)
    A = (torch.randn(r, K, generator=g) / K**0.5).to("cuda", torch.bfloat16)
    B = (torch.randn(N, r, generator=g) / r**0.5).to("cuda", torch.bfloat16)
    dy = torch.randn(M, N, generator=g).to("cuda", torch.bfloat16)
    Wd = dequantize_nf4(q)
    got = _run(lambda x_, A_, B_, b_: lora_linear(x_, q, A_, B_, 2.0, b_, 0.1, 7, backend="triton"),
               x, A, B, None, dy)
    dense = _run(lambda x_, A_, B_, b_: lora_linear(x_, Wd, A_, B_, 2.0, b_, 0.1, 7, backend="triton"),
                 x, A, B, None, dy)
    for name, a, b in zip(("y", "dx", "dA", "dB"), got, dense):
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert err < 1e-2, f"{name}: NF4 fused vs dequantize-then-dense relative error {err:.3g}"
    # both vs float64 on the same values (W rounded to bf16 as the op does, the kernel's mask), and
    # at most 2x the error of torch doing the same math in bf16 (plus a 1e-3 floor)
    keep = dropout_mask(x.shape, 0.1, 7, device="cuda")
    W64 = nf4_dequantize_ref64(q).float().to(q.dtype).double()
    assert torch.equal(W64.to(q.dtype), Wd)
    ref = _run(lambda x_, A_, B_, b_: lora_linear_ref64(x_, W64, A_, B_, 2.0, b_, 0.1, keep_mask=keep),
               x.double(), A.double(), B.double(), None, dy.double())
    low = _run(lambda x_, A_, B_, b_: lora_linear_torch(x_, Wd, A_, B_, 2.0, b_, 0.1, keep_mask=keep),
               x, A, B, None, dy)
    for name, a, d, r64, t in zip(("y", "dx", "dA", "dB"), got, dense, ref, low):
        theirs = ((t.double() - r64).norm() / r64.norm()).item()
        for which, o in (("NF4", a), ("dense", d)):
            ours = ((o.double() - r64).norm() / r64.norm()).item()
            assert ours <= 2 * theirs + 1e-3, f"{name}: {which} op vs float64 {ours:.3g}, torch bf16 {theirs:.3g}"
