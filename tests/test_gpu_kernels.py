"""Kernel checks that need a CUDA device (skipped elsewhere): bf16 and fp16 on the
real tensor-core path, at 7B-class layer shapes and awkward ones, against a
float64 reference.

Tolerance: the kernel's error (max abs diff over max abs of the fp64 result) may
be at most 2x the error of the same math done by torch in that dtype, plus a
floor of 2^-8 (bf16) / 2^-11 (fp16) relative, for each of y, dx, dA, dB.
"""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FLOOR = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SHAPES = [(8192, 4096, 4096, 16), (2048, 4096, 11008, 64), (1000, 11008, 4096, 8), (333, 1000, 777, 1),
          (4096, 4096, 4096, 256)]


def rel(a, ref):
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,K,N,r", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_lora_linear_low_precision_on_gpu(dtype, M, K, N, r, dropout_p):
    from helpers import lora_linear_ref64

    from rankwise.kernels import dropout_mask, lora_linear, lora_linear_torch

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype).requires_grad_()
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(dtype)
    A = (torch.randn(r, K, device="cuda", generator=g) / K**0.5).to(dtype).requires_grad_()
    B = (torch.randn(N, r, device="cuda", generator=g) / r**0.5).to(dtype).requires_grad_()
    dy = torch.randn(M, N, device="cuda", generator=g).to(dtype)
    y = lora_linear(x, W, A, B, 2.0, dropout_p=dropout_p, seed=5, backend="triton")
    got = (y,) + torch.autograd.grad(y, (x, A, B), dy)
    keep = dropout_mask((M, K), dropout_p, 5, device="cuda") if dropout_p else None

    def ref(ts, grad_dtype):  # the float64 oracle, or the torch path in the low precision
        xs = [t.detach().to(grad_dtype).requires_grad_(t.requires_grad) for t in ts]
        fn = lora_linear_ref64 if grad_dtype == torch.float64 else lora_linear_torch
        out = fn(xs[0], xs[1], xs[2], xs[3], 2.0, None, dropout_p, keep_mask=keep)
        return (out,) + torch.autograd.grad(out, (xs[0], xs[2], xs[3]), dy.to(grad_dtype))

    want = ref((x, W, A, B), torch.float64)
    torch_low = ref((x, W, A, B), dtype)
    for name, a, w, t in zip(("y", "dx", "dA", "dB"), got, want, torch_low):
        tol = 2 * rel(t, w) + FLOOR[dtype]
        err = rel(a, w)
        assert err <= tol, f"{name}: kernel error {err:.3g} > {tol:.3g} (torch {dtype} error {rel(t, w):.3g})"


def test_nf4_lora_on_gpu():
    quant = pytest.importorskip("rankwise.quant")
    from rankwise.kernels import lora_linear

    torch.manual_seed(0)
    W = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) / 64
    q = quant.quantize_nf4(W)
    Wd = quant.dequantize_nf4(q)
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16) / 64).requires_grad_()
    B = (torch.randn(4096, 16, device="cuda", dtype=torch.bfloat16) / 4).requires_grad_()
    y = lora_linear(x, q, A, B, 2.0, backend="triton")
    y_ref = lora_linear(x, Wd, A, B, 2.0, backend="triton")
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, (x, A, B), dy)
    g_ref = torch.autograd.grad(y_ref, (x, A, B), dy)
    for name, a, b in zip(("y", "dx", "dA", "dB"), (y,) + g, (y_ref,) + g_ref):
        err = rel(a, b.double())
        assert err < 1e-2, f"{name}: NF4 fused vs dequantize-then-dense relative error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,H,V", [(4096, 2048, 128256), (333, 4096, 32000), (1000, 1024, 50257)])
def test_linear_cross_entropy_on_gpu(dtype, N, H, V):
    """Loss and gradients (hidden, head weight) within 2x torch's own error in the dtype
    plus the floor; with a frozen head (LoRA), the memory beyond the inputs is dh plus
    one chunk of logits (and its fp32 softmax), never the full logits."""
    from helpers import linear_cross_entropy_ref

    from rankwise.kernels import linear_cross_entropy
    from rankwise.kernels.linear_cross_entropy import _chunk_rows

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, H, device="cuda", generator=g).to(dtype).requires_grad_()
    W = (torch.randn(V, H, device="cuda", generator=g) / H**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[::7] = -100

    def extra_memory(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - before

    Wf = W.detach()
    ours = extra_memory(lambda: torch.autograd.grad(linear_cross_entropy(h, Wf, t, backend="triton"), [h]))
    theirs = extra_memory(lambda: torch.autograd.grad(linear_cross_entropy_ref(h, Wf, t), [h]))
    C = _chunk_rows(N, V, H, None)
    bound = 2 * N * H * h.element_size() + C * V * (h.element_size() + 4) + 2**25
    assert ours <= bound, f"fused loss used {ours / 2**20:.0f} MiB beyond its inputs, bound {bound / 2**20:.0f} MiB " \
                          f"(the reference: {theirs / 2**20:.0f} MiB)"

    loss = linear_cross_entropy(h, W, t, backend="triton")
    got = (loss,) + torch.autograd.grad(loss, (h, W))

    def ref(grad_dtype):
        hs, Ws = h.detach().to(grad_dtype).requires_grad_(), W.detach().to(grad_dtype).requires_grad_()
        out = linear_cross_entropy_ref(hs, Ws, t)
        return (out,) + torch.autograd.grad(out, (hs, Ws))

    want, torch_low = ref(torch.float64), ref(dtype)
    for name, a, w, tl_ in zip(("loss", "dhidden", "dweight"), got, want, torch_low):
        tol = 2 * rel(tl_, w) + FLOOR[dtype]
        err = rel(a, w)
        assert err <= tol, f"{name}: kernel error {err:.3g} > {tol:.3g} (torch {dtype} error {rel(tl_, w):.3g})"


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,ranks,K,N", [((2048, 2048, 2048, 2048), (1, 8, 32, 128), 2048, 8192),
                                            ((333, 0, 1000, 77), (128, 4, 1, 16), 1000, 777)])
def test_multi_lora_low_precision_on_gpu(dtype, rows, ranks, K, N, path):
    """The segmented K-arm op (forward, dX, dA, dB of every arm) against float64 on a GPU, by
    either GEMM path; the same tolerance rule as the single-arm op, against torch's own error in
    ``dtype``."""
    from test_multi_lora import multi_lora_ref

    from rankwise.kernels.multi_lora import multi_lora_linear

    g = torch.Generator(device="cuda").manual_seed(0)
    M, RT = sum(rows), sum(ranks)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype).requires_grad_()
    W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(dtype)
    A = (torch.randn(RT, K, device="cuda", generator=g) / K**0.5).to(dtype).requires_grad_()
    B = (torch.randn(N, RT, device="cuda", generator=g) / 8).to(dtype).requires_grad_()
    dy = torch.randn(M, N, device="cuda", generator=g).to(dtype)
    sc = [2.0, 0.5, 1.0, 4.0]
    y = multi_lora_linear(x, W, A, B, list(ranks), sc, list(rows), backend="triton", path=path)
    got = (y,) + torch.autograd.grad(y, (x, A, B), dy)

    def ref(dt):
        xs = [t.detach().to(dt).requires_grad_() for t in (x, A, B)]
        out = multi_lora_ref(xs[0], W.to(dt), xs[1], xs[2], list(ranks), sc, list(rows), None, None, None)
        return (out,) + torch.autograd.grad(out, xs, dy.to(dt))

    want, low = ref(torch.float64), ref(dtype)
    for name, a, w, t in zip(("y", "dx", "dA", "dB"), got, want, low):
        tol = 2 * rel(t, w) + FLOOR[dtype]
        err = rel(a, w)
        assert err <= tol, f"{name}: kernel error {err:.3g} > {tol:.3g} (torch {dtype} error {rel(t, w):.3g})"
