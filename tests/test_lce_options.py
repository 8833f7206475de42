"""linear_cross_entropy's loss options (label smoothing, z-loss, softcap, class weights,
token accuracy) against a float64 reference written here with torch ops on the full
logits, forward and every gradient, both backends (Triton under TRITON_INTERPRET=1).

Tolerances, as max|out - ref64| / max|ref64| per tensor (``helpers.check``):
- fp32: 1e-5, as the plain loss's tests (fp32 softmax over a few thousand logits);
- fp16: at most 2x the error of the same math done by torch in fp16 (logits and the
  softcap in fp16, ``cross_entropy`` on the upcast logits, as Hugging Face's Gemma 2),
  plus 1e-4 (reached: at most 1.6x torch's error; dz is stored in fp16 before its GEMMs).
``test_tolerances_catch_each_options_gradient`` shows that each option's part of the
gradient is far above those tolerances, so a kernel that dropped it would fail.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import check, rel_err
from rankwise.kernels import linear_cross_entropy
from rankwise.kernels.linear_cross_entropy import LinearCrossEntropyOutput

BACKENDS = ["triton", "torch"]


def lce_options_ref(h, W, t, b=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                    lse_square_scale=0.0, softcap=None, ce_weight=None, mutant=None):
    """(loss, z_loss, token_accuracy) from the full logits, differentiable through the loss.

    Logits and softcap in the inputs' dtype, the loss on them upcast to at least fp32.
    ``mutant`` drops one option's gradient (forward unchanged), or uses the unweighted mean:
    the tests show that the tolerances catch each."""
    logits = F.linear(h, W, b)
    V = logits.shape[-1]
    logits = logits.reshape(-1, V)
    t = t.reshape(-1)
    if softcap is not None:
        capped = softcap * torch.tanh(logits / softcap)
        c = logits + (capped - logits).detach() if mutant == "softcap" else capped
    else:
        c = logits
    c = c.to(torch.promote_types(c.dtype, torch.float32))
    w = None if ce_weight is None else ce_weight.to(c.dtype)
    valid = t != ignore_index
    ce = F.cross_entropy(c, t, weight=w, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    if mutant == "smoothing":  # the smoothing term's gradient dropped
        plain = F.cross_entropy(c, t, weight=w, ignore_index=ignore_index, reduction="none")
        ce = (1 - label_smoothing) * plain + (ce - (1 - label_smoothing) * plain).detach()
    lse = torch.logsumexp(c, dim=-1)
    zl = torch.where(valid, lse_square_scale * lse * lse, 0.0)
    if mutant == "z_loss":
        zl = zl.detach()
    acc = ((logits.argmax(-1) == t) & valid).to(torch.float64)
    n = valid.sum()
    if reduction == "none":
        shape = t.shape if h.dim() == 2 else h.shape[:-1]
        return (ce + zl).reshape(shape), zl.reshape(shape), acc.reshape(shape)
    if reduction == "sum":
        return ce.sum() + zl.sum(), zl.sum(), acc.sum() / n
    denom = n if (w is None or mutant == "weight") else (w[torch.where(valid, t, 0)] * valid).sum()
    return ce.sum() / denom + zl.sum() / n, zl.sum() / n, acc.sum() / n


def make_inputs(lead, H, V, dtype, bias=True, ignore_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*lead, H, generator=g) * 2).to(dtype).requires_grad_()
    W = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, lead, generator=g)
    t[torch.rand(lead, generator=g) < ignore_frac] = -100
    cw = torch.rand(V, generator=g) * 2 + 0.1  # far from 1, so a dropped weight shows
    return h, W, b, t, cw


def grads(loss, inputs, g_out):
    want = [x for x in inputs if x is not None and x.requires_grad]
    return torch.autograd.grad(loss, want, g_out)


def grad_out_for(loss, seed=1):
    return torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed)) if loss.dim() else torch.tensor(1.7)


def options(name, V):
    """The options of each case; ``ce_weight`` is filled in from the inputs ("cw")."""
    return {
        "smoothing": dict(label_smoothing=0.2),
        "z_loss": dict(lse_square_scale=0.05, return_z_loss=True),
        "softcap": dict(softcap=2.5),
        "weight": dict(ce_weight="cw"),
        "smoothing+weight": dict(label_smoothing=0.3, ce_weight="cw"),
        "accuracy": dict(return_token_accuracy=True),
        "all": dict(softcap=3.0, label_smoothing=0.1, ce_weight="cw", lse_square_scale=0.02,
                    return_z_loss=True, return_token_accuracy=True),
    }[name]


def run_case(h, W, b, t, cw, opts, reduction, backend, chunk=None):
    """Ours and the float64 reference's (loss, z_loss, accuracy) plus the float64 leaves."""
    kw = {k: (cw if v == "cw" else v) for k, v in opts.items()}
    out = linear_cross_entropy(h, W, t, b, reduction=reduction, chunk_size=chunk, backend=backend, **kw)
    h64, W64 = (x.detach().double().requires_grad_() for x in (h, W))
    b64 = None if b is None else b.detach().double().requires_grad_()
    ref_kw = {k: v for k, v in kw.items() if not k.startswith("return_")}
    if "ce_weight" in ref_kw:
        ref_kw["ce_weight"] = ref_kw["ce_weight"].double()
    ref = lce_options_ref(h64, W64, t, b64, reduction=reduction, **ref_kw)
    return out, ref, (h64, W64, b64), kw


def check_all(out, ref, ours_in, ref_in, kw, tol, g=None):
    """Loss, the extras asked for, and every gradient of the loss."""
    want_extra = kw.get("return_z_loss", False) or kw.get("return_token_accuracy", False)
    if want_extra:
        assert isinstance(out, LinearCrossEntropyOutput)
        loss = out.loss
        if kw.get("return_z_loss"):
            assert not out.z_loss.requires_grad
            check("z_loss", out.z_loss, ref[1].detach(), tol)
        else:
            assert out.z_loss is None
        if kw.get("return_token_accuracy"):
            assert not out.token_accuracy.requires_grad
            assert torch.equal(out.token_accuracy.double(), ref[2]), (out.token_accuracy, ref[2])
        else:
            assert out.token_accuracy is None
    else:
        assert isinstance(out, torch.Tensor)
        loss = out
    assert loss.dtype == torch.float32
    check("loss", loss, ref[0].detach(), tol)
    g = grad_out_for(loss) if g is None else g
    ours = grads(loss, ours_in, g)
    theirs = grads(ref[0], ref_in, g.double())
    for name, o, r in zip(("hidden", "weight", "bias"), ours, theirs):
        assert o.dtype == ours_in[0].dtype, name
        check(f"d{name}", o, r, tol)


# Each case on its own awkward shape: (lead dims, hidden, vocab, chunk). Vocab sizes are not
# powers of two; 1500, 1100 and 1030 span two of the interpreter's 1024-wide vocab blocks;
# chunk sizes that do not divide N; 3-D and 4-D hidden states.
CASES = [
    ("smoothing", (37,), 16, 100, None),
    ("z_loss", (2, 17), 24, 1500, None),
    ("softcap", (3, 5, 4), 12, 77, 7),
    ("weight", (29,), 20, 33, 4),
    ("smoothing+weight", (2, 13), 16, 1100, 8),
    ("accuracy", (41,), 16, 61, None),
    ("all", (2, 2, 5), 20, 1030, 7),
]


@pytest.mark.parametrize("case,lead,H,V,chunk", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_options_match_float64(case, lead, H, V, chunk, reduction, backend):
    h, W, b, t, cw = make_inputs(lead, H, V, torch.float32)
    out, ref, ref_in, kw = run_case(h, W, b, t, cw, options(case, V), reduction, backend, chunk)
    check_all(out, ref, (h, W, b), ref_in, kw, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_no_bias(backend):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 24, 19, 3, generator=g)[..., 1].transpose(1, 2).requires_grad_()  # (2, 19, 24), strided
    W = torch.randn(24, 90, generator=g).t().requires_grad_()  # (90, 24), column-major
    cw = (torch.rand(180, generator=g) + 0.5)[::2]  # strided class weights
    t = torch.randint(0, 90, (2, 19), generator=g)
    t[0, ::3] = -100
    assert not h.is_contiguous() and not W.is_contiguous() and not cw.is_contiguous()
    opts = dict(options("all", 90), ce_weight=cw)
    out, ref, ref_in, kw = run_case(h, W, None, t, cw, opts, "mean", backend)
    check_all(out, ref, (h, W, None), ref_in, kw, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_within_twice_torch_error(reduction, backend):
    dtype = torch.float16
    h, W, b, t, cw = make_inputs((3, 23), 32, 300, dtype)
    kw = dict(softcap=4.0, label_smoothing=0.1, ce_weight=cw, lse_square_scale=0.02)
    loss = linear_cross_entropy(h, W, t, b, reduction=reduction, backend=backend, **kw)
    torch_loss = lce_options_ref(h, W, t, b, reduction=reduction, **kw)[0]  # the same math in fp16
    h64, W64, b64 = (x.detach().double().requires_grad_() for x in (h, W, b))
    ref = lce_options_ref(h64, W64, t, b64, reduction=reduction, **dict(kw, ce_weight=cw.double()))[0]
    check("loss", loss, ref.detach(), 2 * rel_err(torch_loss.detach(), ref.detach()) + 1e-4)
    g = grad_out_for(loss)
    ours = grads(loss, (h, W, b), g)
    base = grads(torch_loss, (h, W, b), g)
    theirs = grads(ref, (h64, W64, b64), g.double())
    for name, o, bt, r in zip(("hidden", "weight", "bias"), ours, base, theirs):
        assert o.dtype == dtype, name
        check(f"d{name}", o, r, 2 * rel_err(bt, r) + 1e-4)


@pytest.mark.parametrize("mutant,opts", [
    ("softcap", dict(softcap=2.5)),
    ("smoothing", dict(label_smoothing=0.2)),
    ("z_loss", dict(lse_square_scale=0.05)),
    ("weight", dict(ce_weight="cw")),
])
def test_tolerances_catch_each_options_gradient(mutant, opts):
    """A kernel that left out an option's part of the gradient (or, for the weights, divided
    the mean by the token count) would be off by far more than the tests' 1e-5: the float64
    reference with that part dropped fails ``check`` against the true reference."""
    h, W, b, t, cw = make_inputs((2, 17), 16, 150, torch.float64)
    kw = {k: (cw.double() if v == "cw" else v) for k, v in opts.items()}
    true = lce_options_ref(h, W, t, b, **kw)[0]
    bad = lce_options_ref(h, W, t, b, mutant=mutant, **kw)[0]
    errs = [rel_err(x, y) for x, y in zip(grads(bad, (h, W, b), torch.tensor(1.0, dtype=torch.float64)),
                                          grads(true, (h, W, b), torch.tensor(1.0, dtype=torch.float64)))]
    if mutant == "weight":
        errs.append(rel_err(bad.detach(), true.detach()))
    assert max(errs) > 1e-3, (mutant, errs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_convention_and_all_ignored(backend):
    h, W, b, t, cw = make_inputs((9,), 8, 20, torch.float32)
    assert isinstance(linear_cross_entropy(h, W, t, b, backend=backend, label_smoothing=0.1), torch.Tensor)
    out = linear_cross_entropy(h, W, t, b, backend=backend, lse_square_scale=0.1, return_z_loss=True)
    loss, z_loss, acc = out  # a named tuple in a fixed order
    assert acc is None and out.z_loss is z_loss and out.loss is loss
    plain = linear_cross_entropy(h, W, t, b, backend=backend)
    torch.testing.assert_close(loss, plain + z_loss, rtol=1e-6, atol=0)  # the loss includes the z-loss
    none = linear_cross_entropy(h, W, t, b, reduction="none", backend=backend, return_token_accuracy=True,
                                return_z_loss=True)
    assert none.loss.shape == none.z_loss.shape == none.token_accuracy.shape == t.shape
    assert torch.all(none.z_loss == 0), "lse_square_scale 0: the z-loss is 0"
    assert torch.all(none.token_accuracy[t == -100] == 0)
    t[:] = -100
    out = linear_cross_entropy(h, W, t, b, backend=backend, ce_weight=cw, label_smoothing=0.1,
                               lse_square_scale=0.1, softcap=2.0, return_z_loss=True, return_token_accuracy=True)
    assert torch.isnan(out.loss) and torch.isnan(out.z_loss) and torch.isnan(out.token_accuracy)
    dh, dW = torch.autograd.grad(out.loss, [h, W])
    assert dh.abs().max() == 0 and dW.abs().max() == 0, "torch gives zero gradients here"


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_accuracy_takes_the_first_of_tied_maxima(backend):
    """Integer-valued inputs make exact ties (the products are exact in any order), also across the
    interpreter's 1024-wide vocab blocks; the prediction is the first maximal index, as torch.argmax."""
    g = torch.Generator().manual_seed(5)
    h = torch.randint(0, 2, (30, 4), generator=g).float()
    W = torch.randint(0, 2, (1100, 4), generator=g).float()  # each of the 16 rows ~69 times
    logits = h.double() @ W.double().t()
    top = logits == logits.max(1, keepdim=True).values
    assert (top[:, :1024].any(1) & top[:, 1024:].any(1)).all(), "every row must tie across the two blocks"
    first = logits.argmax(1)
    last = 1099 - top.flip(1).int().argmax(1)
    t = torch.where(torch.arange(30) % 2 == 0, first, last)
    out = linear_cross_entropy(h, W, t, reduction="none", backend=backend, return_token_accuracy=True)
    assert torch.equal(out.token_accuracy, (first == t).float())


def test_options_survive_the_custom_op():
    """The op torch.compile sees: fake shapes, schema and autograd registration with every option."""
    h, W, b, t, cw = make_inputs((13,), 8, 40, torch.float32)
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.rankwise.linear_cross_entropy.default,
                              (h, W, b, t, -100, reduction, 4, "torch", True, True, True, cw, 0.1, 0.05, 3.0,
                               True, True),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_bad_options_are_refused_in_one_sentence():
    h, W, b, t, cw = make_inputs((5,), 8, 10, torch.float32)
    cases = [
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(lse_square_scale=-1e-4), ValueError, "lse_square_scale"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-30.0), ValueError, "softcap"),
        (dict(softcap=float("nan")), ValueError, "softcap"),
        (dict(ce_weight=cw[:9]), ValueError, "ce_weight"),
        (dict(ce_weight=cw[None]), ValueError, "ce_weight"),
        (dict(ce_weight=torch.ones(10, dtype=torch.long)), ValueError, "ce_weight"),
        (dict(return_z_loss=1), TypeError, "return_z_loss"),
        (dict(return_token_accuracy="yes"), TypeError, "return_token_accuracy"),
    ]
    for over, exc, name in cases:
        with pytest.raises(exc, match=name) as info:
            linear_cross_entropy(h, W, t, b, **over)
        msg = str(info.value)
        assert msg.startswith(f"{name}: ") and "\n" not in msg and msg.count(". ") == 0, msg
