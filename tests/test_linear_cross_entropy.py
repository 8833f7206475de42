"""Fused linear + cross entropy against a float64 reference, forward and every gradient.

The Triton kernel runs under TRITON_INTERPRET=1 on a CPU machine (conftest.py).

Tolerances, as max|out - ref64| / max|ref64| per tensor:
- fp32: 1e-5 (fp32 softmax over at most a few thousand logits, fp32 GEMMs);
- fp16 / bf16: at most 2x the error of the same math done by torch in that dtype
  (``F.linear`` in the dtype, ``cross_entropy`` on the upcast logits, as Hugging Face
  does), plus 1e-3 for fp16 / 1e-2 for bf16 (dz is stored in the dtype before its GEMMs).
"""
import sys

import pytest
import torch

from helpers import check, linear_cross_entropy_ref, rel_err
from rankwise.kernels import linear_cross_entropy, linear_cross_entropy_reference

# (lead dims, hidden_size, vocab_size, chunk_size): vocab sizes are not powers of two, one
# spans two of the interpreter's 1024-wide vocab blocks, one is a single class.
SHAPES = [
    ((37,), 16, 100, None),
    ((2, 17), 24, 1500, None),     # 3-D hidden, V > one vocab block
    ((3, 5, 7), 12, 77, 5),        # 4-D hidden, a chunk size that does not divide N = 105
    ((1,), 8, 1, None),            # one row, one class
    ((29,), 40, 33, 1),            # one row per chunk
]


def make_inputs(lead, H, V, dtype, bias=True, weight_grad=True, ignore_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*lead, H, generator=g) * 2).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_(weight_grad)
    b = torch.randn(V, generator=g).to(dtype).requires_grad_(weight_grad) if bias else None
    t = torch.randint(0, V, lead, generator=g)
    t[torch.rand(lead, generator=g) < ignore_frac] = -100
    return h, W, b, t


def grads(loss, inputs, g_out):
    want = [x for x in inputs if x is not None and x.requires_grad]
    return torch.autograd.grad(loss, want, g_out)


def grad_out_for(loss, seed=1):
    return torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed)) if loss.dim() else torch.tensor(1.7)


@pytest.mark.parametrize("lead,H,V,chunk", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_matches_float64(lead, H, V, chunk, reduction, backend):
    h, W, b, t = make_inputs(lead, H, V, torch.float32)
    loss = linear_cross_entropy(h, W, t, b, reduction=reduction, chunk_size=chunk, backend=backend)
    h64, W64, b64 = (x.detach().double().requires_grad_() for x in (h, W, b))
    ref = linear_cross_entropy_ref(h64, W64, t, b64, reduction=reduction)
    assert loss.dtype == torch.float32
    check("loss", loss, ref.detach(), 1e-5)
    g = grad_out_for(loss)
    ours = grads(loss, (h, W, b), g)
    theirs = grads(ref, (h64, W64, b64), g.double())
    for name, o, r in zip(("hidden", "weight", "bias"), ours, theirs):
        assert o.dtype == torch.float32, name
        check(f"d{name}", o, r, 1e-5)


@pytest.mark.parametrize("bias,weight_grad", [(False, False), (True, False), (False, True)])
def test_frozen_head_and_no_bias(bias, weight_grad):
    h, W, b, t = make_inputs((2, 19), 20, 130, torch.float32, bias=bias, weight_grad=weight_grad)
    loss = linear_cross_entropy(h, W, t, b, backend="triton")
    ref = linear_cross_entropy_ref(h.detach().double().requires_grad_(), W.double(), t,
                                         None if b is None else b.double())
    check("loss", loss, ref.detach(), 1e-5)
    (dh,) = torch.autograd.grad(loss, [h], retain_graph=True)
    (dh_ref,) = torch.autograd.grad(linear_cross_entropy_ref(h, W, t, b), [h])
    check("dhidden", dh, dh_ref.double(), 1e-5)
    if weight_grad:
        loss2 = linear_cross_entropy(h, W, t, b, backend="triton")
        assert torch.autograd.grad(loss2, [W])[0].shape == W.shape


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(3)
    h_big = torch.randn(24, 50, 2, generator=g)
    h = h_big[:, 3:40, 0].t().requires_grad_(False)        # (37, 24), strided both ways
    h = h.clone().t().contiguous().t().requires_grad_()       # transposed storage
    W = torch.randn(24, 90, generator=g).t().requires_grad_()  # (90, 24), column-major
    t = torch.randint(0, 90, (37,), generator=g)
    assert not h.is_contiguous() and not W.is_contiguous()
    for backend in ("triton", "torch"):
        loss = linear_cross_entropy(h, W, t, backend=backend)
        h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
        ref = linear_cross_entropy_ref(h64, W64, t)
        check("loss", loss, ref.detach(), 1e-5)
        for name, o, r in zip(("hidden", "weight"), grads(loss, (h, W), torch.tensor(1.0)),
                              grads(ref, (h64, W64), torch.tensor(1.0, dtype=torch.float64))):
            check(f"{backend} d{name}", o, r, 1e-5)


@pytest.mark.parametrize("dtype,floor", [(torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_within_twice_torch_error(dtype, floor, reduction):
    h, W, b, t = make_inputs((3, 23), 32, 300, dtype)
    loss = linear_cross_entropy(h, W, t, b, reduction=reduction, backend="triton")
    torch_loss = linear_cross_entropy_ref(h, W, t, b, reduction=reduction)  # HF-style: logits in dtype
    h64, W64, b64 = (x.detach().double().requires_grad_() for x in (h, W, b))
    ref = linear_cross_entropy_ref(h64, W64, t, b64, reduction=reduction)
    tol = 2 * rel_err(torch_loss.detach(), ref.detach()) + floor
    check("loss", loss, ref.detach(), tol)
    g = grad_out_for(loss)
    ours = grads(loss, (h, W, b), g)
    base = grads(torch_loss, (h, W, b), g)
    theirs = grads(ref, (h64, W64, b64), g.double())
    for name, o, bt, r in zip(("hidden", "weight", "bias"), ours, base, theirs):
        assert o.dtype == dtype, name
        check(f"d{name}", o, r, 2 * rel_err(bt, r) + floor)


def test_all_ignored_and_empty_match_torch():
    h, W, b, t = make_inputs((9,), 8, 20, torch.float32)
    t[:] = -100
    for backend in ("triton", "torch"):
        loss = linear_cross_entropy(h, W, t, b, backend=backend)
        assert torch.isnan(loss), "mean over no targets is nan, as in torch"
        dh, dW = torch.autograd.grad(loss, [h, W])
        assert dh.abs().max() == 0 and dW.abs().max() == 0, "torch gives zero gradients here"
        s = linear_cross_entropy(h, W, t, b, reduction="sum", backend=backend)
        assert s.item() == 0.0
    empty = torch.zeros(0, 8, requires_grad=True)
    te = torch.zeros(0, dtype=torch.long)
    assert linear_cross_entropy(empty, W, te, reduction="sum").item() == 0.0
    assert torch.isnan(linear_cross_entropy(empty, W, te))
    assert linear_cross_entropy(empty, W, te, reduction="none").shape == (0,)


def test_custom_ignore_index_and_int32_targets():
    h, W, b, t = make_inputs((40,), 16, 50, torch.float32, ignore_frac=0.0)
    t[::3] = 7
    loss = linear_cross_entropy(h, W, t.to(torch.int32), b, ignore_index=7, backend="triton")
    ref = linear_cross_entropy_ref(h.double(), W.double(), t, b.double(), ignore_index=7)
    check("loss", loss.detach(), ref.detach(), 1e-5)


def test_saves_no_logits():
    """The mean/sum path computes its gradients in the forward pass and keeps no
    (N, V) tensor for backward; the reference keeps the logits."""
    N, H, V = 64, 16, 900
    h, W, b, t = make_inputs((N,), H, V, torch.float32, weight_grad=False)
    sizes = []

    def pack(x):
        sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = linear_cross_entropy(h, W, t, b, backend="torch")
    assert all(s < N * V for s in sizes), sizes
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        linear_cross_entropy_ref(h, W, t, b)
    assert max(sizes) >= N * V, "the check above must be able to fail"
    loss.backward()
    assert h.grad is not None


def test_autocast_runs_in_autocast_dtype():
    h, W, b, t = make_inputs((21,), 16, 40, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, W, t, b, backend="torch")
        ref = linear_cross_entropy_ref(h, W, t, b)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 2e-2 * abs(ref.item())
    dh, dW = torch.autograd.grad(loss, [h, W])
    assert dh.dtype == torch.float32 and dW.dtype == torch.float32


def test_errors_name_the_argument():
    h, W, b, t = make_inputs((5,), 8, 10, torch.float32)
    cases = [
        (dict(hidden=h[:, :7]), "hidden"),
        (dict(targets=t[:4]), "targets"),
        (dict(targets=t.float()), "targets"),
        (dict(targets=torch.full((5,), 10)), "targets"),
        (dict(targets=torch.full((5,), -2)), "targets"),
        (dict(weight=W[0]), "weight"),
        (dict(bias=b[:9]), "bias"),
        (dict(reduction="avg"), "reduction"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(backend="cuda"), "backend"),
        (dict(ignore_index=1.5), "ignore_index"),
    ]
    for over, name in cases:
        kw = dict(hidden=h, weight=W, targets=t, bias=b)
        kw.update(over)
        with pytest.raises((ValueError, TypeError), match=name):
            linear_cross_entropy(**kw)


def test_public_reference_name_is_the_torch_path():
    """``linear_cross_entropy_reference`` stays importable as the torch backend (the
    tests' own reference is helpers.linear_cross_entropy_ref)."""
    g = torch.Generator().manual_seed(0)
    h, W, t = torch.randn(6, 16, generator=g), torch.randn(11, 16, generator=g), torch.randint(0, 11, (6,), generator=g)
    assert torch.equal(linear_cross_entropy_reference(h, W, t, reduction="none"),
                       linear_cross_entropy(h, W, t, reduction="none", backend="torch"))


def test_the_measured_chunking_times_every_candidate_and_runs_the_chosen_one(monkeypatch):
    """On CUDA ``chunk_size=None`` takes the chunk ``tuning.choose_path`` measured fastest among the default and
    its multiples (capped at the batch and at 2^27 logits); the choices' names do not depend on the row count (a
    cached one holds for every batch of its bucket); every candidate computes the same loss and gradient. Here
    the choice is stood in for on the CPU; the chosen chunk is the one the op runs."""
    lce = sys.modules["rankwise.kernels.linear_cross_entropy"]  # the package's name is the function's
    assert lce.chunk_candidates(512, 128256, 2048) == {"fused": 256, "fused:x2": 512, "fused:x4": 512,
                                                        "fused:x8": 512, "fused:x16": 512}
    big = lce.chunk_candidates(8192, 128256, 2048)
    assert big["fused"] == 256 and big["fused:x2"] == 512 and big["fused:x16"] == 1046  # 2^27 logits / V
    for N, V, H in ((512, 128256, 2048), (8192, 128256, 2048), (3000, 50000, 512), (2500, 50000, 512), (7, 10, 3)):
        sizes = lce.chunk_candidates(N, V, H)
        assert list(sizes) == ["fused", "fused:x2", "fused:x4", "fused:x8", "fused:x16"]
        assert sizes["fused"] == lce._chunk_rows(N, V, H, None)
        assert all(sizes["fused"] <= c and (c <= N or c == sizes["fused"]) for c in sizes.values())
        assert all(c * V <= lce._MAX_CHUNK_VALUES or c == sizes["fused"] for c in sizes.values())
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(40, 8, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g, dtype=torch.float64)
    t = torch.randint(0, 30, (40,), generator=g)
    monkeypatch.setattr(lce, "_chunk_rows", lambda N, V, H, c: c or 4)  # small chunks, so there are candidates
    monkeypatch.setattr(lce, "_MAX_CHUNK_VALUES", 16 * 30)
    timed, ran = {}, []

    def choose(path, op, N, V, H, x, candidates):
        assert (path, op, N, V, H) == ("auto", "lce", 40, 30, 8)
        timed.update({k: fn() for k, fn in candidates().items()})
        return "fused:x4"

    real_pass = lce._fused_pass
    monkeypatch.setattr(lce, "choose_path", choose)
    monkeypatch.setattr(lce, "_fused_pass", lambda *a, **k: ran.append(a[7]) or real_pass(*a, **k))
    opt = lce._options(None, 0.0, 0.0, None)
    assert lce._measured_chunk(h, W, None, t, -100, "torch", (True, False, False), opt) == 16
    assert sorted(timed) == ["fused", "fused:x16", "fused:x2", "fused:x4", "fused:x8"]
    assert sorted(ran) == [4, 8, 16, 16, 16]  # each candidate timed once (x8 and x16 capped at 16)
    losses = [out[0].sum() for out in timed.values()]
    grads = [out[3] for out in timed.values()]
    assert all(torch.allclose(x, losses[0], rtol=1e-12) for x in losses)
    assert all(torch.allclose(x, grads[0], rtol=1e-12) for x in grads)
