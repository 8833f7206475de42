"""The fused LoRA op against a float64 reference, forward and every gradient.

The reference is ``helpers.lora_linear_ref64`` (float64 einsums, autograd for the
gradients), not the op's torch backend (``lora_linear_torch``): that backend
is only used for what torch's own low-precision error is, and is itself checked
against the float64 reference below. On a CPU machine the Triton kernels run
under TRITON_INTERPRET=1 (conftest.py).

Tolerances, measured as max|out - ref64| / max|ref64| per tensor:
- fp32: 2e-5 (fp32 accumulation over at most a few hundred terms);
- fp16: at most 2x the error of the same math done by torch in fp16, and never
  above 5e-3 (fp16 keeps ~11 bits: 2^-11 ~ 4.9e-4 per rounding; S and dS are
  stored in fp16 as PEFT's eager layer does);
- bf16 (interpreter path, tiles upcast before tl.dot): 3e-2 (bf16 keeps ~8 bits).
"""
import pytest
import torch

from helpers import check, lora_linear_ref64, rel_err
from rankwise.kernels import dropout_mask, lora_linear, lora_linear_torch

TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}

# (lead dims of x, in_features, out_features, r): none is a multiple of the
# interpreter's 32-blocks except where a single block edge is the point.
SHAPES = [
    ((37,), 45, 29, 1),           # rank 1, everything odd
    ((70,), 100, 90, 5),          # several blocks in every dimension
    ((2, 17), 33, 47, 16),        # 3-D x
    ((3, 5, 7), 24, 40, 8),       # 4-D x
    ((19,), 40, 24, 128),         # rank larger than in/out features
    ((1,), 64, 64, 33),           # one row, rank just past a block edge
]


def make_inputs(lead, K, N, r, dtype, bias=True, weight_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(N, K, generator=g) / K**0.5).to(dtype).requires_grad_(weight_grad)
    A = (torch.randn(r, K, generator=g) / K**0.5).to(dtype).requires_grad_()
    B = (torch.randn(N, r, generator=g) / r**0.5).to(dtype).requires_grad_()
    b = (torch.randn(N, generator=g)).to(dtype).requires_grad_(weight_grad) if bias else None
    return x, W, A, B, b


def grads_of(out, inputs, dy):
    want = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, want, dy)


def run_and_compare(lead, K, N, r, dtype, *, bias=True, dropout_p=0.0, weight_grad=False, scaling=1.7,
                    x_transform=None):
    x, W, A, B, b = make_inputs(lead, K, N, r, dtype, bias, weight_grad)
    x_in = x if x_transform is None else x_transform(x)
    seed = 1234
    y = lora_linear(x_in, W, A, B, scaling, bias=b, dropout_p=dropout_p, seed=seed, backend="triton")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = grads_of(y, (x, W, A, B, b), dy)

    keep = dropout_mask(x_in.shape, dropout_p, seed) if dropout_p > 0 else None
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
              for t in (x, W, A, B, b)]
    x64 = ref_in[0] if x_transform is None else x_transform(ref_in[0])
    y64 = lora_linear_ref64(x64, ref_in[1], ref_in[2], ref_in[3], scaling, ref_in[4], dropout_p,
                            keep_mask=keep)
    want = grads_of(y64, ref_in, dy.double())

    tol = TOL[dtype]
    if dtype == torch.float16:  # tolerance relative to torch's own fp16 error, capped
        low_in = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in (x, W, A, B, b)]
        xl = low_in[0] if x_transform is None else x_transform(low_in[0])
        yl = lora_linear_torch(xl, low_in[1], low_in[2], low_in[3], scaling, low_in[4], dropout_p,
                                   keep_mask=keep)
        torch_err = rel_err(yl, y64)
        tol = min(TOL[dtype], max(2 * torch_err, 1e-3))
    check("y", y, y64, tol)
    names = [n for n, t in zip(("dx", "dW", "dA", "dB", "dbias"), (x, W, A, B, b))
             if t is not None and t.requires_grad]
    assert len(got) == len(want) == len(names)
    for n, g_, w_ in zip(names, got, want):
        check(n, g_, w_, TOL[dtype] if dtype != torch.float32 else TOL[dtype])
    return y


@pytest.mark.parametrize("lead,K,N,r", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_and_grads_match_float64(lead, K, N, r, dtype):
    run_and_compare(lead, K, N, r, dtype)


@pytest.mark.parametrize("bias", [True, False])
def test_bias_on_off(bias):
    run_and_compare((23,), 50, 35, 4, torch.float32, bias=bias)


def test_bf16_interpreter_path():
    run_and_compare((2, 13), 40, 36, 8, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,K,N,r", [((41,), 70, 50, 6), ((3, 11), 33, 20, 1)])
def test_dropout_matches_reference_with_the_kernel_mask(lead, K, N, r, dtype):
    run_and_compare(lead, K, N, r, dtype, dropout_p=0.3)


def test_dropout_is_reproducible_from_seed_and_changes_with_it():
    x, W, A, B, b = make_inputs((30,), 40, 20, 4, torch.float32)
    y1 = lora_linear(x, W, A, B, 2.0, b, dropout_p=0.5, seed=7, backend="triton")
    y2 = lora_linear(x, W, A, B, 2.0, b, dropout_p=0.5, seed=7, backend="triton")
    y3 = lora_linear(x, W, A, B, 2.0, b, dropout_p=0.5, seed=8, backend="triton")
    assert torch.equal(y1, y2)
    assert not torch.allclose(y1, y3)
    keep = dropout_mask((30, 40), 0.5, 7)
    assert 0.35 < keep.float().mean().item() < 0.65
    # seed=None draws from torch's generator: reproducible under manual_seed
    torch.manual_seed(3)
    y4 = lora_linear(x, W, A, B, 2.0, b, dropout_p=0.5, backend="triton")
    torch.manual_seed(3)
    y5 = lora_linear(x, W, A, B, 2.0, b, dropout_p=0.5, backend="triton")
    assert torch.equal(y4, y5)


def test_weight_and_bias_grads_when_they_require_grad():
    run_and_compare((25,), 30, 21, 3, torch.float32, weight_grad=True)


def test_non_contiguous_inputs():
    # 2-D strided view (every other column of a wider tensor) and a transposed 3-D view.
    run_and_compare((26,), 35, 22, 4, torch.float32,
                    x_transform=lambda x: torch.cat([x, x], dim=1)[:, ::2])
    run_and_compare((6, 9), 20, 18, 2, torch.float32,
                    x_transform=lambda x: x.transpose(0, 1))
    x, W, A, B, b = make_inputs((24,), 30, 16, 4, torch.float32)
    y = lora_linear(x, W.t().contiguous().t(), A.t().contiguous().t(), B, 1.0, b, backend="triton")
    check("y (non-contiguous W, A)", y, lora_linear_ref64(x.double(), W.double(), A.double(),
                                                         B.double(), 1.0, b.double()), TOL[torch.float32])


def test_deterministic_mode_gives_same_grads():
    x, W, A, B, b = make_inputs((45,), 30, 70, 5, torch.float32)
    y = lora_linear(x, W, A, B, 0.5, b, backend="triton")
    dy = torch.randn_like(y)
    g_atomic = torch.autograd.grad(y, (x, A, B), dy)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        y = lora_linear(x, W, A, B, 0.5, b, backend="triton")
        g_det = torch.autograd.grad(y, (x, A, B), dy)
    finally:
        torch.use_deterministic_algorithms(was)
    for a, d in zip(g_atomic, g_det):
        torch.testing.assert_close(a, d, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("lead,K,N,r", [((37,), 45, 29, 1), ((2, 17), 33, 47, 16)])
def test_torch_backend_matches_float64(lead, K, N, r, dropout_p):
    """The torch path (backend="torch", the CPU default) against the float64 oracle,
    forward and every gradient, with the mask it draws from the seed."""
    x, W, A, B, b = make_inputs(lead, K, N, r, torch.float32, weight_grad=True)
    y = lora_linear(x, W, A, B, 1.7, b, dropout_p=dropout_p, seed=5, backend="torch")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    got = grads_of(y, (x, W, A, B, b), dy)
    keep = None
    if dropout_p > 0:  # the torch path's mask, recovered from its own generator
        g = torch.Generator().manual_seed(5)
        keep = torch.rand(x.shape, generator=g) >= dropout_p
    ref_in = [t.detach().double().requires_grad_() for t in (x, W, A, B, b)]
    y64 = lora_linear_ref64(*ref_in[:4], 1.7, ref_in[4], dropout_p, keep_mask=keep)
    want = grads_of(y64, ref_in, dy.double())
    check("y", y, y64, TOL[torch.float32])
    for n, g_, w_ in zip(("dx", "dW", "dA", "dB", "dbias"), got, want):
        check(n, g_, w_, TOL[torch.float32])


def test_backends_agree_and_auto_is_torch_on_cpu():
    x, W, A, B, b = make_inputs((2, 9), 26, 31, 7, torch.float32)
    yt = lora_linear(x, W, A, B, 1.3, b, backend="triton")
    yr = lora_linear(x, W, A, B, 1.3, b, backend="torch")
    ya = lora_linear(x, W, A, B, 1.3, b)
    torch.testing.assert_close(yt, yr, rtol=1e-5, atol=1e-5)
    assert torch.equal(ya, yr)


def test_mixed_dtypes_cast_to_x_and_autocast():
    x, W, A, B, b = make_inputs((12,), 16, 8, 2, torch.float16)
    y = lora_linear(x, W, A.float(), B.float(), 1.0, b, backend="triton")  # fp32 adapters, fp16 x
    assert y.dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x.float(), W.float(), A.float(), B.float(), 1.0, b.float(), backend="torch")
    assert y.dtype == torch.bfloat16


def test_empty_batch():
    x, W, A, B, b = make_inputs((0,), 16, 8, 2, torch.float32)
    y = lora_linear(x, W, A, B, 1.0, b, backend="triton")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert A.grad is not None and torch.count_nonzero(A.grad) == 0


def test_bad_input_raises_naming_the_argument():
    x, W, A, B, b = make_inputs((4,), 8, 6, 2, torch.float32)
    cases = [
        (dict(x=torch.randn(4, 7)), "x"),
        (dict(lora_A=torch.randn(2, 9)), "lora_A"),
        (dict(lora_A=torch.randn(0, 8), lora_B=torch.randn(6, 0)), "r"),
        (dict(lora_B=torch.randn(5, 2)), "lora_B"),
        (dict(bias=torch.randn(5)), "bias"),
        (dict(x=torch.randint(0, 3, (4, 8))), "x"),
        (dict(weight=torch.randint(0, 3, (6, 8))), "weight"),
        (dict(lora_A=torch.randn(2, 8, device="meta")), "device"),
        (dict(dropout_p=1.0), "dropout_p"),
        (dict(backend="cuda"), "backend"),
        (dict(scaling="big"), "scaling"),
    ]
    for override, word in cases:
        args = dict(x=x, weight=W, lora_A=A, lora_B=B, scaling=1.0, bias=b, dropout_p=0.0, backend="triton")
        args.update(override)
        with pytest.raises((ValueError, TypeError), match=word):
            lora_linear(**args)


def test_kernel_modules_share_only_public_names_and_have_no_cycle():
    """kernels/: no module imports another's private (underscore) names or the rankwise
    package, and the imports between its modules (module level or inside functions) form
    no cycle."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "kernels"
    mods = {p.stem: p for p in root.glob("*.py")}
    edges, bad = {m: set() for m in mods}, []
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                bad += [f"{m} imports {a.name}" for a in node.names if a.name.startswith("rankwise")]
            if not isinstance(node, ast.ImportFrom):
                continue
            mod = node.module or ""
            if node.level == 0:
                if mod.startswith("rankwise"):
                    bad.append(f"{m} imports {mod}")
                continue
            targets = [mod.split(".")[0]] if mod else [a.name for a in node.names if a.name in mods]
            edges[m] |= set(targets)
            if mod:
                bad += [f"{m} imports {mod}.{a.name}" for a in node.names if a.name.startswith("_")]
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(edges[m] & set(mods)):
            if state.get(n) == "open":
                bad.append("cycle: " + " -> ".join(path + [m, n]))
            elif n not in state:
                visit(n, path + [m])
        state[m] = "done"

    for m in sorted(mods):
        if m not in state:
            visit(m, [])
    assert not bad, bad


SKINNY = ("lora_down", "lora_ds_db", "lora_da")


@pytest.mark.parametrize("skinny", ["fused", "split"])
@pytest.mark.parametrize("dtype,dropout_p", [(torch.float32, 0.0), (torch.float16, 0.0), (torch.float32, 0.3)])
def test_skinny_products_by_the_measured_choice_match_float64(monkeypatch, skinny, dtype, dropout_p):
    """On CUDA the three skinny products (S, dS/dB, dA) are each a measured choice between the
    Triton kernel ("fused") and torch's GEMMs ("split", the scaling as the GEMM's alpha). Either
    answer gives the float64 results within the kernels' tolerances, dense and NF4; with dropout
    S and dA are never offered to torch (it would have to materialise the mask)."""
    import sys

    from rankwise.quant import quantize_nf4

    asked = []

    def choose(path, op, M, N, K, t, candidates):
        asked.append(op)
        return skinny if op in SKINNY else path if path != "auto" else "fused"

    monkeypatch.setattr(sys.modules["rankwise.kernels.tuning"], "choose_path", choose)
    for lead, K, N, r in SHAPES[:3] + SHAPES[4:5]:
        asked.clear()
        run_and_compare(lead, K, N, r, dtype, dropout_p=dropout_p)
        assert [op for op in asked if op in SKINNY] == (["lora_ds_db"] if dropout_p else list(SKINNY)[:1]
                                                         + ["lora_ds_db", "lora_da"])
    # an NF4 base shares the same products
    x, W, A, B, b = make_inputs((37,), 70, 29, 3, torch.float32)
    q = quantize_nf4(W.detach())
    y = lora_linear(x, q, A, B, 1.7, bias=b, backend="triton")
    yt = lora_linear(x, q, A, B, 1.7, bias=b, backend="torch")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    for name, a, c in zip(("y", "dx", "dA", "dB"), (y,) + grads_of(y, (x, A, B), dy),
                          (yt,) + grads_of(yt, (x, A, B), dy)):
        check(name, a, c.detach().double(), TOL[torch.float32])
