"""The segmented multi-arm LoRA op (``multi_lora_linear``) against a float64
per-arm reference written here, forward and every gradient, both backends.

The reference (``multi_lora_ref``) loops over the arms with explicit keep-masks
and plain matmuls, independently of the op's torch path. On a CPU machine the
Triton kernels run under TRITON_INTERPRET=1 (conftest.py); shapes are small.

Tolerances, as max|out - ref64| / max|ref64| per tensor (``helpers.check``):
- fp32: 2e-6 (fp32 accumulation over at most a few hundred terms; both backends
  reach <= 3e-7 on these shapes);
- fp16: at most 2x the error of the same per-arm math done by torch in fp16
  (``multi_lora_ref`` on fp16 tensors), with a floor of half a unit in the last
  place (2^-12) for a torch error that happens to be tiny. Measured: within
  1.6x torch's own error.
- bf16: the torch backend as fp16 (2x torch's bf16 error, floor 2^-9); the
  Triton backend under the interpreter 3e-2, as ``test_lora_linear``'s bf16
  path: the interpreter truncates fp32 -> bf16 when the kernels store S and dS,
  which biases dA (~4x torch's error here); a GPU rounds to nearest.
"""
import sys

import pytest
import torch

from helpers import check, lora_linear_ref64, nf4_dequantize_ref64, rel_err
from rankwise.kernels import dropout_mask, lora_linear
from rankwise.kernels.lora_linear import LoRALinearFunction
from rankwise.kernels.multi_lora import MultiLoRALinearFunction, MultiNF4LoRALinearFunction, multi_lora_linear
from rankwise.kernels.nf4 import nf4_kernel_args
from rankwise.kernels.nf4_lora import NF4LoRALinearFunction
from rankwise.kernels.utils import INTERPRET
from rankwise.quant import quantize_nf4

TOL32 = 2e-6
FLOOR = {torch.float16: 2.0**-12, torch.bfloat16: 2.0**-9}
BACKENDS = ["torch", "triton"]

# (rows per arm, ranks per arm, in K, out N): empty arms, one-row arms, blocks
# that are not multiples of the interpreter's 32-row tiles, ranks 1 and 128.
CASES = [
    ((0, 1, 17), (1, 128, 4), 24, 40),
    ((5, 33, 2, 0), (3, 1, 16, 2), 40, 24),
    ((9,), (7,), 30, 26),
]
SCALINGS = (1.7, 0.5, 2.0, 0.25)


def multi_lora_ref(x, W, A, B, ranks, scalings, rows, bias=None, ps=None, masks=None):
    """``y[rows_k] = x_k @ W.T + b + s_k * ((x_k * m_k / (1 - p_k)) @ A_k.T) @ B_k.T``
    arm by arm, in the inputs' dtype (float64 for the oracle); differentiable."""
    outs, m0, o = [], 0, 0
    for k, (M_k, r, s) in enumerate(zip(rows, ranks, scalings)):
        x_k = x[m0:m0 + M_k]
        xd = x_k
        if ps is not None and ps[k] > 0:
            xd = torch.where(masks[k], x_k / (1.0 - ps[k]), torch.zeros_like(x_k))
        y_k = x_k @ W.t() + s * ((xd @ A[o:o + r].t()) @ B[:, o:o + r].t())
        outs.append(y_k if bias is None else y_k + bias)
        m0 += M_k
        o += r
    return torch.cat(outs)


def triton_masks(rows, K, ps, seeds):
    """The Triton backend's per-arm masks: ``dropout_mask`` of each arm's rows alone."""
    return [dropout_mask((M_k, K), p, s) if p > 0 else None for M_k, p, s in zip(rows, ps, seeds)]


def torch_masks(rows, K, ps, seeds):
    """The torch backend's per-arm masks: ``torch.rand`` from a generator seeded per arm."""
    return [torch.rand((M_k, K), generator=torch.Generator().manual_seed(s)) >= p if p > 0 else None
            for M_k, p, s in zip(rows, ps, seeds)]


def make_inputs(rows, ranks, K, N, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    M, R = sum(rows), sum(ranks)
    x = torch.randn(M, K, generator=g).to(dtype)
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    A = (torch.randn(R, K, generator=g) / K**0.5).to(dtype)
    B = (torch.randn(N, R, generator=g) / 4).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    dy = torch.randn(M, N, generator=g).to(dtype)
    return x, W, A, B, b, dy


def run_op(x, W, A, B, b, dy, ranks, scalings, rows, backend, *, x_view=None, weight=None, **kw):
    """y and the gradients (x, A, B) of the op; ``x_view`` reshapes/strides x on the way in."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    xin = leaves[0] if x_view is None else x_view(leaves[0])
    y = multi_lora_linear(xin, W if weight is None else weight, leaves[1], leaves[2], ranks, scalings, rows,
                          bias=b, backend=backend, **kw)
    y.backward(dy.reshape(y.shape))
    return [y.detach().reshape(dy.shape)] + [t.grad for t in leaves]


def run_ref(x, W, A, B, b, dy, ranks, scalings, rows, ps=None, masks=None, dtype=torch.float64):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, A, B)]
    y = multi_lora_ref(leaves[0], W.to(dtype), leaves[1], leaves[2], ranks, scalings, rows,
                       None if b is None else b.to(dtype), ps, masks)
    y.backward(dy.to(dtype))
    return [y.detach()] + [t.grad for t in leaves]


def compare(got, ref64, dtype, low=None, tol=None):
    for name, g_, r_, *l_ in zip(("y", "dx", "dA", "dB"), got, ref64, *([low] if low else [])):
        assert g_.dtype == dtype, f"{name}: dtype {g_.dtype}"
        t = tol or (TOL32 if dtype == torch.float32 else max(2 * rel_err(l_[0], r_), FLOOR[dtype]))
        check(name, g_, r_, t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,ranks,K,N", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_grads_match_float64(rows, ranks, K, N, dtype, backend):
    x, W, A, B, b, dy = make_inputs(rows, ranks, K, N, dtype)
    sc = SCALINGS[:len(rows)]
    got = run_op(x, W, A, B, b, dy, ranks, sc, rows, backend)
    ref = run_ref(x, W, A, B, b, dy, ranks, sc, rows)
    low = run_ref(x, W, A, B, b, dy, ranks, sc, rows, dtype=dtype) if dtype != torch.float32 else None
    compare(got, ref, dtype, low)


@pytest.mark.parametrize("rows,ranks,K,N", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_path_matches_float64(rows, ranks, K, N, dtype):
    """``path="split"`` (torch's GEMM over all rows, then each arm's tail in place): the same
    references and tolerances as the fused kernels."""
    x, W, A, B, b, dy = make_inputs(rows, ranks, K, N, dtype)
    sc = SCALINGS[:len(rows)]
    got = run_op(x, W, A, B, b, dy, ranks, sc, rows, "triton", path="split")
    low = run_ref(x, W, A, B, b, dy, ranks, sc, rows, dtype=dtype) if dtype != torch.float32 else None
    compare(got, run_ref(x, W, A, B, b, dy, ranks, sc, rows), dtype, low)


@pytest.mark.parametrize("double_quant", [False, True])
def test_split_path_nf4_dropout_and_3d(double_quant):
    """The split path on an NF4 base (W dequantized whole), with per-arm dropout (each arm's tail
    regenerates the mask kernels 1 and 5 draw) and a 3-D non-contiguous x; and it agrees with
    the fused path to fp32 rounding."""
    rows, ranks, K, N = (6, 0, 19, 1), (2, 3, 1, 8), 70, 22
    ps, seeds = (0.3, 0.5, 0.0, 0.6), (11, 12, 13, 14)
    x, _, A, B, b, dy = make_inputs(rows, ranks, K, N, torch.float32)
    q = quantize_nf4(torch.randn(N, K, generator=torch.Generator().manual_seed(5)) / K**0.5,
                     double_quant=double_quant)
    masks = triton_masks(rows, K, ps, seeds)
    ref = run_ref(x, nf4_dequantize_ref64(q), A, B, b, dy, ranks, SCALINGS, rows, ps, masks)
    outs = {}
    for path in ("split", "fused"):
        outs[path] = run_op(x, None, A, B, b, dy, ranks, SCALINGS, rows, "triton", weight=q, dropout_p=ps,
                            seeds=seeds, path=path, x_view=lambda t: torch.stack([t, t], -1)[..., 1].reshape(2, 13, K))
        compare(outs[path], ref, torch.float32)
    for name, a, c in zip(("y", "dx", "dA", "dB"), outs["split"], outs["fused"]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5, msg=name)


def test_bad_path_raises_naming_it():
    x, W, A, B, b, _ = make_inputs((3, 5), (2, 4), 12, 10, torch.float32)
    with pytest.raises(ValueError, match="path"):
        multi_lora_linear(x, W, A, B, (2, 4), (1.0, 1.0), (3, 5), b, path="cublas")
    from rankwise.kernels.multi_lora import multi_lora_linear_arms

    with pytest.raises(ValueError, match="path"):
        multi_lora_linear_arms(x, W, list(A.split((2, 4))), list(B.split((2, 4), 1)), (1.0, 1.0), (3, 5),
                               path="x")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16(backend):
    """bf16 (under the interpreter the kernels upcast bf16 tiles before tl.dot)."""
    rows, ranks, K, N = (3, 18), (1, 6), 26, 20
    x, W, A, B, b, dy = make_inputs(rows, ranks, K, N, torch.bfloat16)
    got = run_op(x, W, A, B, b, dy, ranks, (1.5, 0.5), rows, backend)
    ref = run_ref(x, W, A, B, b, dy, ranks, (1.5, 0.5), rows)
    low = run_ref(x, W, A, B, b, dy, ranks, (1.5, 0.5), rows, dtype=torch.bfloat16)
    compare(got, ref, torch.bfloat16, low, tol=3e-2 if backend == "triton" and INTERPRET else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_3d_and_non_contiguous_x_and_no_bias(backend):
    rows, ranks, K, N = (7, 0, 11), (2, 5, 1), 26, 30
    x, W, A, B, _, dy = make_inputs(rows, ranks, K, N, torch.float32, bias=False)
    ref = run_ref(x, W, A, B, None, dy, ranks, (1.0, 2.0, 3.0), rows)
    # 3-D: (2, 9, K) holding the 18 rows in order
    got = run_op(x, W, A, B, None, dy, ranks, (1.0, 2.0, 3.0), rows, backend, x_view=lambda t: t.reshape(2, 9, K))
    compare(got, ref, torch.float32)
    # non-contiguous: every other element of an interleaved tensor, then a transposed 3-D view
    got = run_op(x, W, A, B, None, dy, ranks, (1.0, 2.0, 3.0), rows, backend,
                 x_view=lambda t: torch.stack([t, t], dim=-1)[..., 0])
    compare(got, ref, torch.float32)
    got = run_op(x, W, A, B, None, dy, ranks, (1.0, 2.0, 3.0), rows, backend,
                 x_view=lambda t: t.reshape(2, 9, K).transpose(0, 1).contiguous().transpose(0, 1))
    compare(got, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_base(backend, double_quant):
    rows, ranks, K, N = (3, 20, 0, 6), (4, 1, 2, 9), 70, 36   # K not a multiple of the 64-value block
    x, _, A, B, b, dy = make_inputs(rows, ranks, K, N, torch.float32)
    q = quantize_nf4(torch.randn(N, K, generator=torch.Generator().manual_seed(5)) / K**0.5,
                     double_quant=double_quant)
    W64 = nf4_dequantize_ref64(q)
    got = run_op(x, None, A, B, b, dy, ranks, SCALINGS, rows, backend, weight=q)
    ref = run_ref(x, W64, A, B, b, dy, ranks, SCALINGS, rows)
    compare(got, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_per_arm_matches_reference_with_the_per_arm_masks(backend):
    rows, ranks, K, N = (6, 0, 19, 1), (2, 3, 1, 8), 34, 22
    ps, seeds = (0.3, 0.5, 0.0, 0.6), (11, 12, 13, 14)
    x, W, A, B, b, dy = make_inputs(rows, ranks, K, N, torch.float32)
    got = run_op(x, W, A, B, b, dy, ranks, SCALINGS, rows, backend, dropout_p=ps, seeds=seeds)
    masks = (triton_masks if backend == "triton" else torch_masks)(rows, K, ps, seeds)
    compare(got, run_ref(x, W, A, B, b, dy, ranks, SCALINGS, rows, ps, masks), torch.float32)
    # one float for all arms, and seeds reproduce
    again = run_op(x, W, A, B, b, dy, ranks, SCALINGS, rows, backend, dropout_p=0.3, seeds=seeds)
    masks = (triton_masks if backend == "triton" else torch_masks)(rows, K, (0.3,) * 4, seeds)
    compare(again, run_ref(x, W, A, B, b, dy, ranks, SCALINGS, rows, (0.3,) * 4, masks), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_arms_together_equal_their_solo_lora_linear_runs_with_dropout(backend):
    """With the same seed and rows, each arm equals ``lora_linear`` on its rows alone
    on the same backend (same mask), forward and gradients."""
    rows, ranks, K, N = (5, 18, 3), (1, 6, 2), 28, 20
    ps, seeds = (0.25, 0.4, 0.1), (101, 202, 303)
    x, W, A, B, b, dy = make_inputs(rows, ranks, K, N, torch.float32)
    y, dx, dA, dB = run_op(x, W, A, B, b, dy, ranks, SCALINGS[:3], rows, backend, dropout_p=ps, seeds=seeds)
    m0 = o = 0
    for k, (M_k, r) in enumerate(zip(rows, ranks)):
        xs = x[m0:m0 + M_k].clone().requires_grad_()
        As = A[o:o + r].clone().requires_grad_()
        Bs = B[:, o:o + r].clone().requires_grad_()
        ys = lora_linear(xs, W, As, Bs, SCALINGS[k], b, dropout_p=ps[k], seed=seeds[k], backend=backend)
        ys.backward(dy[m0:m0 + M_k])
        for name, got, want in (("y", y[m0:m0 + M_k], ys), ("dx", dx[m0:m0 + M_k], xs.grad),
                                ("dA", dA[o:o + r], As.grad), ("dB", dB[:, o:o + r], Bs.grad)):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5, msg=f"arm {k} {name}")
        m0 += M_k
        o += r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_one_arm_equals_the_single_arm_op(backend, nf4, dropout_p):
    """K = 1: ``multi_lora_linear`` with one arm is ``lora_linear`` (dense and NF4 base, 3-D x,
    dropout from one seed): forward and every gradient (x, A, B, bias, and a dense W that
    requires grad) of both against the float64 oracle with the keep-mask each backend
    documents (Triton: ``dropout_mask``; torch: ``torch.rand`` of x's own 3-D shape from a
    generator seeded with the seed, the single-arm op's draw), and of one against the other.
    On the torch path the single-arm op is the one-arm call of the same implementation,
    so the two agree bit for bit."""
    lead, K, N, r, s, seed = (2, 9), 40, 24, 5, 1.7, 77
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(*lead, K, generator=g), torch.randn(N, K, generator=g) / K**0.5
    A, B = torch.randn(r, K, generator=g) / K**0.5, torch.randn(N, r, generator=g) / r**0.5
    b, dy = torch.randn(N, generator=g), torch.randn(*lead, N, generator=g)
    weight = quantize_nf4(W, blocksize=64) if nf4 else W
    W64 = nf4_dequantize_ref64(weight) if nf4 else W.double()

    def run(call):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, b) + (() if nf4 else (W,))]
        y = call(leaves[0], weight if nf4 else leaves[4], *leaves[1:4])
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    single = run(lambda x_, w, A_, B_, b_: lora_linear(x_, w, A_, B_, s, b_, dropout_p, seed, backend=backend))
    one = run(lambda x_, w, A_, B_, b_: multi_lora_linear(x_, w, A_, B_, [r], [s], [x.numel() // K], b_, dropout_p,
                                                          [seed], backend=backend))
    keep = None
    if dropout_p > 0:
        keep = dropout_mask(x.shape, dropout_p, seed) if backend == "triton" else \
            torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) >= dropout_p
    leaves64 = [t.double().requires_grad_() for t in (x, A, B, b, W64)]
    y64 = lora_linear_ref64(leaves64[0], leaves64[4], leaves64[1], leaves64[2], s, leaves64[3], dropout_p, keep)
    y64.backward(dy.double())
    ref = [y64.detach()] + [t.grad for t in leaves64[:4 if nf4 else 5]]
    assert len(single) == len(one) == len(ref) == (5 if nf4 else 6)
    for name, got_single, got_one, want in zip(("y", "dx", "dA", "dB", "dbias", "dW"), single, one, ref):
        check(f"single-arm {name}", got_single, want, TOL32)
        check(f"one arm {name}", got_one, want, TOL32)
        if backend == "torch":
            assert torch.equal(got_single, got_one), f"{name}: the one-arm op differs from the single-arm op"


def test_seeds_none_draws_per_arm_seeds_from_torch_generator():
    rows, ranks, K, N = (4, 6), (2, 3), 16, 12
    x, W, A, B, b, _ = make_inputs(rows, ranks, K, N, torch.float32)
    torch.manual_seed(3)
    y1 = multi_lora_linear(x, W, A, B, ranks, (1.0, 1.0), rows, b, dropout_p=0.5, backend="torch")
    torch.manual_seed(3)
    y2 = multi_lora_linear(x, W, A, B, ranks, (1.0, 1.0), rows, b, dropout_p=0.5, backend="torch")
    assert torch.equal(y1, y2)


def test_weight_and_bias_grads_and_auto_is_torch_on_cpu():
    rows, ranks, K, N = (3, 8), (2, 4), 18, 14
    x, W, A, B, b, dy = make_inputs(rows, ranks, K, N, torch.float32)
    Wg, bg = W.clone().requires_grad_(), b.clone().requires_grad_()
    for backend in BACKENDS:
        Wg.grad = bg.grad = None
        y = multi_lora_linear(x, Wg, A, B, ranks, (1.0, 0.5), rows, bg, backend=backend)
        y.backward(dy)
        W64, b64 = W.double().requires_grad_(), b.double().requires_grad_()
        multi_lora_ref(x.double(), W64, A.double(), B.double(), ranks, (1.0, 0.5), rows, b64).backward(dy.double())
        check(f"dW ({backend})", Wg.grad, W64.grad, TOL32)
        check(f"dbias ({backend})", bg.grad, b64.grad, TOL32)
    ya = multi_lora_linear(x, W, A, B, ranks, (1.0, 0.5), rows, b)
    yt = multi_lora_linear(x, W, A, B, ranks, (1.0, 0.5), rows, b, backend="torch")
    assert torch.equal(ya, yt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_empty(backend):
    x, W, A, B, b, _ = make_inputs((0, 0), (2, 1), 16, 8, torch.float32)
    A.requires_grad_()
    y = multi_lora_linear(x, W, A, B, (2, 1), (1.0, 1.0), (0, 0), b, backend=backend)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert A.grad is not None and torch.count_nonzero(A.grad) == 0


def test_bad_input_raises_naming_the_argument():
    x, W, A, B, b, _ = make_inputs((3, 5), (2, 4), 12, 10, torch.float32)
    base = dict(x=x, weight=W, lora_A=A, lora_B=B, ranks=(2, 4), scalings=(1.0, 1.0), rows=(3, 5), bias=b)
    cases = [
        (dict(rows=(3, 4)), "rows"),
        (dict(rows=(3, 5, 0)), "ranks"),
        (dict(rows=(9, -1)), "rows"),
        (dict(rows=()), "rows"),
        (dict(ranks=(2, 3)), "ranks"),
        (dict(ranks=(6, 0)), "ranks"),
        (dict(ranks=(1, 1, 4)), "ranks"),
        (dict(scalings=(1.0,)), "scalings"),
        (dict(scalings=("a", 1.0)), "scalings"),
        (dict(dropout_p=(0.1, 0.2, 0.3)), "dropout_p"),
        (dict(dropout_p=(0.1, 1.0)), "dropout_p"),
        (dict(seeds=(1,)), "seeds"),
        (dict(seeds=(1, "x"), dropout_p=0.1), "seeds"),
        (dict(lora_B=torch.randn(10, 5)), "lora_B"),
        (dict(lora_A=torch.randn(6, 11)), "lora_A"),
        (dict(x=torch.randn(8, 11)), "x"),
        (dict(backend="cuda"), "backend"),
    ]
    for override, word in cases:
        with pytest.raises(ValueError, match=word):
            multi_lora_linear(**{**base, **override})


def test_deterministic_mode_gives_the_same_grads():
    """dB from per-tile slots summed per arm in a fixed order equals the atomic dB."""
    rows, ranks, K, N = (40, 0, 7, 33), (3, 2, 17, 1), 20, 36   # arms of two tiles, an empty arm
    x, W, A, B, b, dy = make_inputs(rows, ranks, K, N, torch.float32)
    atomic = run_op(x, W, A, B, b, dy, ranks, SCALINGS, rows, "triton")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = run_op(x, W, A, B, b, dy, ranks, SCALINGS, rows, "triton")
        again = run_op(x, W, A, B, b, dy, ranks, SCALINGS, rows, "triton")
    finally:
        torch.use_deterministic_algorithms(was)
    for name, a, d, d2 in zip(("y", "dx", "dA", "dB"), atomic, det, again):
        torch.testing.assert_close(a, d, rtol=1e-6, atol=1e-6, msg=name)
        assert torch.equal(d, d2), name
    compare(det, run_ref(x, W, A, B, b, dy, ranks, SCALINGS, rows), torch.float32)


def test_tile_map_never_mixes_arms():
    """Each tile of the map lies inside one arm's rows, and the tiles cover every row once."""
    from rankwise.kernels.multi_lora_kernels import multi_plan

    rows, ranks = (0, 1, 31, 32, 33, 0, 70), (1, 128, 2, 3, 4, 5, 6)
    plan = multi_plan(rows, ranks, (1.0,) * 7, (0.0,) * 7, (0,) * 7, torch.float32, torch.device("cpu"), False)
    for tiles, BM in ((plan.gemm_tiles, plan.gemm_cfg["BM"]), (plan.skinny_tiles, plan.skinny_cfg["BM"])):
        covered = []
        starts = [sum(rows[:k]) for k in range(len(rows))]
        for arm, lrow0 in tiles.tolist():
            assert lrow0 % BM == 0 and 0 <= lrow0 < rows[arm]
            covered += range(starts[arm] + lrow0, starts[arm] + min(lrow0 + BM, rows[arm]))
        assert covered == list(range(sum(rows)))
        assert len(tiles) == sum(-(-m // BM) for m in rows)


# ----------------------------------------------------------------------------
# torch.compile: the custom ops pass opcheck, and a compiled call equals eager
# (aot_eager: AOTAutograd's graphs run by eager torch, the kernels under the
# interpreter on a CPU machine).
# ----------------------------------------------------------------------------

ARMS = ([2, 1, 5], [1.7, 0.5, 2.0], [6, 0, 11], [0.3, 0.0, 0.2], [7, 0, 9])   # ranks, scalings, rows, ps, seeds


def test_opcheck_multi_lora_ops():
    ranks, _, rows, _, _ = ARMS
    x, W, A, B, b, dy = make_inputs(rows, ranks, 30, 20, torch.float32)
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    torch.library.opcheck(torch.ops.rankwise.multi_lora_linear.default, (x, W, A, B, b, *ARMS))
    q = quantize_nf4(W, double_quant=True)
    tensors, c = nf4_kernel_args(q)
    nf4 = (*tensors, c["BLOCKSIZE"], c["DOUBLE"], c["NESTED_BLOCKSIZE"], q.dtype)
    torch.library.opcheck(torch.ops.rankwise.multi_nf4_lora_linear.default, (x, A, B, b, *nf4, *ARMS))
    S = torch.randn(sum(r * m for r, m in zip(ranks, rows)))
    torch.library.opcheck(torch.ops.rankwise.multi_lora_ds_db.default, (dy, S, B.detach(), *ARMS))
    torch.library.opcheck(torch.ops.rankwise.multi_lora_dx.default, (dy, W, S, A.detach(), *ARMS))
    torch.library.opcheck(torch.ops.rankwise.multi_nf4_lora_dx.default, (dy, *nf4, S, A.detach(), *ARMS))
    torch.library.opcheck(torch.ops.rankwise.multi_lora_da.default, (S, x.detach(), *ARMS, torch.float32))
    # with the optional path argument (the split path's torch GEMM and tails)
    torch.library.opcheck(torch.ops.rankwise.multi_lora_linear.default, (x, W, A, B, b, *ARMS, "split"))
    torch.library.opcheck(torch.ops.rankwise.multi_nf4_lora_linear.default, (x, A, B, b, *nf4, *ARMS, "split"))
    torch.library.opcheck(torch.ops.rankwise.multi_lora_dx.default, (dy, W, S, A.detach(), *ARMS, "split"))


@pytest.mark.parametrize("needs", ["all", "A"])
@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("multi", [False, True])
def test_each_forward_op_and_its_eager_twin_agree_bit_for_bit(multi, nf4, needs):
    """The LoRA op family's one setup_context and backward (``lowrank.lora_function``)
    serve each of the four forward ops twice: called as the custom op (its registered
    autograd, backward through the backward ops) and as its eager autograd.Function,
    outputs and gradients are equal bit for bit, whether every input wants a gradient
    (a dense W and the bias too) or only A (the gradient slots differ by W's kind)."""
    ranks, rows = ([2, 3], [5, 4]) if multi else ([3], [9])
    x, W, A, B, b, dy = make_inputs(rows, ranks, 16, 12, torch.float32)
    arms = (ranks, [1.7, 0.5], rows, [0.3, 0.0], [7, 0]) if multi else (1.7, 0.3, 7)
    name = ("multi_" if multi else "") + ("nf4_" if nf4 else "") + "lora_linear"
    function = {(False, False): LoRALinearFunction, (False, True): NF4LoRALinearFunction,
                (True, False): MultiLoRALinearFunction, (True, True): MultiNF4LoRALinearFunction}[multi, nf4]
    if nf4:
        q = quantize_nf4(W, double_quant=True)
        tensors, c = nf4_kernel_args(q)
        base = (*tensors, c["BLOCKSIZE"], c["DOUBLE"], c["NESTED_BLOCKSIZE"], q.dtype)
    results = []
    for call in (function.apply, getattr(torch.ops.rankwise, name)):
        leaves = [t.detach().clone().requires_grad_(needs == "all" or t is A) for t in (x, W, A, B, b)]
        lx, lW, lA, lB, lb = leaves
        inputs = (lx, lA, lB, lb, *base) if nf4 else (lx, lW, lA, lB, lb)
        y, _S = call(*inputs, *arms, "fused")
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in leaves])
    every = needs == "all"
    assert [g is not None for g in results[0][1:]] == [every, every and not nf4, True, every, every]  # x W A B b
    for got, ref in zip(results[1], results[0]):
        assert (got is None) == (ref is None)
        assert got is None or torch.equal(got, ref)


@pytest.mark.parametrize("nf4", [False, True])
def test_compiled_call_matches_eager_and_calls_the_ops(nf4):
    from helpers import op_names, recording_backend

    ranks, sc, rows, ps, seeds = ARMS
    x, W, A, B, b, dy = make_inputs(rows, ranks, 30, 20, torch.float32)
    weight = quantize_nf4(W) if nf4 else W

    def fn(x, A, B):
        return multi_lora_linear(x, weight, A, B, ranks, sc, rows, b, dropout_p=ps, seeds=seeds, backend="triton")

    torch._dynamo.reset()
    backend, graphs = recording_backend()
    try:
        got = run_op(x, W, A, B, b, dy, ranks, sc, rows, "triton", weight=weight, dropout_p=ps, seeds=seeds)
        leaves = [t.detach().clone().requires_grad_() for t in (x, A, B)]
        y = torch.compile(fn, backend=backend, fullgraph=True)(*leaves)
        y.backward(dy)
    finally:
        torch._dynamo.reset()
    for name, a, c in zip(("y", "dx", "dA", "dB"), got, [y.detach()] + [t.grad for t in leaves]):
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-6, msg=name)
    prefix = "rankwise.multi_nf4_lora" if nf4 else "rankwise.multi_lora"
    assert f"{prefix}_linear.default" in op_names(graphs["forward"][0])
    assert {"rankwise.multi_lora_ds_db.default", f"{prefix}_dx.default",
            "rankwise.multi_lora_da.default"} <= op_names(graphs["backward"][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_cast_to_x_and_autocast(backend):
    rows, ranks, K, N = (4, 5), (2, 3), 16, 12
    x, W, A, B, b, _ = make_inputs(rows, ranks, K, N, torch.float16)
    y = multi_lora_linear(x, W, A.float(), B.float(), ranks, (1.0, 2.0), rows, b, backend=backend)
    assert y.dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = multi_lora_linear(x.float(), W.float(), A.float(), B.float(), ranks, (1.0, 2.0), rows, b.float(),
                              backend=backend)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("nf4", [False, True])
def test_gpu_tile_plans_compute_the_same_under_the_interpreter(monkeypatch, nf4):
    """The tile sizes multi_plan picks for GPUs (skinny BM=32/BN=64 for rank blocks over 64, NF4 BM=64
    below Hopper) re-cut the tile tables; run them under the interpreter against the torch path."""
    import importlib

    from rankwise.quant import quantize_nf4

    ml = importlib.import_module("rankwise.kernels.multi_lora")
    mk = importlib.import_module("rankwise.kernels.multi_lora_kernels")
    monkeypatch.setattr(mk, "INTERPRET", False)
    monkeypatch.setattr(mk, "max_shared_memory", lambda device: 99 * 1024)
    plan = mk.multi_plan((24, 40), (128, 2), (2.0, 0.5), (0.0, 0.0), (0, 0), torch.float32, torch.device("cpu"), nf4)
    assert plan.skinny_cfg["BM"] == 32 and plan.skinny_br == 128
    if nf4:
        assert plan.gemm_cfg["BM"] == 64
    g = torch.Generator().manual_seed(0)
    K, N, ranks, rows = 40, 36, [128, 2], [24, 40]
    W = torch.randn(N, K, generator=g)
    W = quantize_nf4(W) if nf4 else W
    x = torch.randn(sum(rows), K, generator=g, requires_grad=True)
    A = torch.randn(sum(ranks), K, generator=g, requires_grad=True)
    B = torch.randn(N, sum(ranks), generator=g, requires_grad=True)
    outs = []
    for backend in ("triton", "torch"):
        y = ml.multi_lora_linear(x, W, A, B, ranks, [2.0, 0.5], rows, backend=backend)
        outs.append((y, *torch.autograd.grad(y.square().sum(), (x, A, B))))
    for a, b in zip(*outs):
        assert ((a - b).abs().max() / b.abs().max()).item() < 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_arm_adapters_equal_the_concatenated_op(backend):
    """multi_lora_linear_arms (each arm's A_k, B_k a tensor of its own) gives the concatenated op's output and,
    arm by arm, the slices of its gradients; with dropout, NF4 and an empty arm on the torch path too."""
    from rankwise.kernels.multi_lora import multi_lora_linear_arms

    rows, ranks, K, N = (5, 0, 19), (3, 1, 16), 24, 40
    ps, seeds = (0.0, 0.3, 0.2), (0, 4, 9)
    x, W, A, B, b, dy = make_inputs(rows, ranks, K, N, torch.float32)
    for weight in (W, quantize_nf4(W, blocksize=64) if backend == "torch" else None):
        if weight is None:
            continue
        got = run_op(x, W, A, B, b, dy, ranks, SCALINGS[:3], rows, backend, weight=weight, dropout_p=ps, seeds=seeds)
        xs = x.detach().clone().requires_grad_()
        As = [a.detach().clone().requires_grad_() for a in A.split(ranks)]
        Bs = [t.detach().clone().requires_grad_() for t in B.split(ranks, 1)]
        y = multi_lora_linear_arms(xs, weight, As, Bs, SCALINGS[:3], rows, bias=b, dropout_p=ps, seeds=seeds,
                                   backend=backend)
        y.backward(dy)
        assert torch.equal(y.detach(), got[0]) and torch.equal(xs.grad, got[1])
        assert torch.equal(torch.cat([a.grad for a in As]), got[2])
        assert torch.equal(torch.cat([t.grad for t in Bs], 1), got[3])
    with pytest.raises(ValueError, match="arm 1: lora_B: expected shape"):
        multi_lora_linear_arms(x, W, As, [Bs[0], Bs[2], Bs[1]], SCALINGS[:3], rows, backend=backend)
    with pytest.raises(ValueError, match="one A and one B per arm"):
        multi_lora_linear_arms(x, W, As, Bs[:2], SCALINGS[:3], rows, backend=backend)


@pytest.mark.parametrize("nf4", [False, True])
@pytest.mark.parametrize("choice", ["fused", "split"])
def test_auto_runs_the_measured_choice(monkeypatch, nf4, choice):
    """``path="auto"`` asks ``tuning.choose_path`` for each big GEMM under the op names
    ``multi_fwd`` / ``multi_dx`` (``multi_nf4_*`` on an NF4 base) and runs what it answers."""
    import sys

    mk = sys.modules["rankwise.kernels.multi_lora_kernels"]
    asked, ran = [], []
    monkeypatch.setattr(sys.modules["rankwise.kernels.tuning"], "choose_path",
                        lambda path, op, M, N, K, t, candidates: asked.append((op, M, N, K)) or choice)
    for fn in ("_multi_fwd_gemm", "_multi_fwd_split", "_multi_dx", "_multi_dx_split"):
        real = getattr(mk, fn)
        monkeypatch.setattr(mk, fn, lambda *a, real=real, fn=fn: ran.append(fn) or real(*a))
    rows, ranks, K, N = (5, 9), (2, 3), 70, 22
    x, W, A, B, b, dy = make_inputs(rows, ranks, K, N, torch.float32)
    weight = quantize_nf4(W) if nf4 else W
    got = run_op(x, W, A, B, b, dy, ranks, SCALINGS[:2], rows, "triton", weight=weight, path="auto")
    ref = run_ref(x, nf4_dequantize_ref64(weight) if nf4 else W, A, B, b, dy, ranks, SCALINGS[:2], rows)
    compare(got, ref, torch.float32)
    prefix = "multi_nf4" if nf4 else "multi"
    assert asked == [(f"{prefix}_fwd", 14, N, K), (f"{prefix}_dx", 14, K, N)]
    assert ran == (["_multi_fwd_gemm", "_multi_dx"] if choice == "fused" else ["_multi_fwd_split", "_multi_dx_split"])


def test_tables_a_cuda_graph_captured_are_kept_past_the_memos_evictions(monkeypatch):
    """A replayed CUDA graph reads the K-arm op's device tables at their captured addresses: while a capture is
    on, every table handed out is also kept for the process (the lru_cache may evict its own entry later)."""
    import types

    mk = sys.modules["rankwise.kernels.multi_lora_kernels"]
    cuda_table = types.SimpleNamespace(is_cuda=True)
    cpu_table = torch.zeros(2, dtype=torch.int64)
    before = len(mk._CAPTURED)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert mk._kept((cuda_table, cuda_table, 3)) == (cuda_table, cuda_table, 3) and len(mk._CAPTURED) == before
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert mk._kept(cpu_table) is cpu_table and len(mk._CAPTURED) == before  # CPU tables are never captured
    assert mk._kept((cuda_table, cuda_table, 3)) == (cuda_table, cuda_table, 3)
    assert mk._kept(cuda_table) is cuda_table
    assert mk._CAPTURED[before:] == [(cuda_table, cuda_table, 3), cuda_table]
    del mk._CAPTURED[before:]
