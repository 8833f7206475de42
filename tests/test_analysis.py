"""Known-answer tests of the analysis metrics (spectral, attention, CKA, token KL, restoration).

References are written here in float64 from the definitions; planted cases have
exact answers (rank-k updates, planted intruder directions, orthogonal adapters).
"""
import functools
import math

import pytest
import torch

from rankwise.analysis import (
    attention_entropy,
    bucket_accuracy,
    effective_rank,
    energy_top_k,
    first_token_kl,
    frobenius_norm,
    intruder_dimensions,
    js_distance,
    linear_cka,
    restoration_curve,
    singular_values,
    spectrum_summary,
    stable_rank,
    subspace_similarity,
    top_singular_similarity,
)
from rankwise.analysis.spectral import subspace_similarity_grid
from rankwise.masking import restore

pytestmark = pytest.mark.usefixtures("one_thread")


def _orthonormal(n, k, gen, dtype=torch.float64):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=dtype))
    return q


def _planted(m, n, s, gen):
    """m x n matrix with singular values s (descending) and random singular vectors."""
    k = len(s)
    U, V = _orthonormal(m, k, gen), _orthonormal(n, k, gen)
    return U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T


def _assert_close(actual, expected, tol, what):
    err = abs(actual - expected)
    assert err <= tol, f"{what}: got {actual}, expected {expected} (|err| = {err:.3g} > {tol})"


# ----------------------------------------------------------------------------- spectral
SHAPES = [(37, 53), (64, 29), (48, 48)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 7])
def test_planted_rank_k_equal_spectrum(shape, k):
    # k equal singular values: effective rank = stable rank = k exactly (fp32 SVD: 1e-3).
    gen = torch.Generator().manual_seed(100 * k + shape[0])
    delta = _planted(*shape, [2.5] * k, gen).float()
    _assert_close(effective_rank(delta), k, 1e-3 * k, "effective rank")
    _assert_close(stable_rank(delta), k, 1e-3 * k, "stable rank")
    _assert_close(energy_top_k(delta, k), 1.0, 1e-5, "energy in top k")
    assert energy_top_k(delta, 1) == pytest.approx(1.0 / k, abs=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
def test_planted_rank_k_decaying_spectrum_against_float64(shape):
    gen = torch.Generator().manual_seed(shape[1])
    s = [9.0, 4.0, 2.0, 1.0, 0.5]
    delta64 = _planted(*shape, s, gen)
    delta = delta64.float()
    k = len(s)
    er, sr = effective_rank(delta), stable_rank(delta)
    assert 1.0 < er <= k + 1e-3 and sr <= k + 1e-4, (er, sr)
    # float64 references straight from the definitions
    sv = torch.tensor(s, dtype=torch.float64)
    p = sv / sv.sum()
    _assert_close(er, math.exp(-(p * p.log()).sum().item()), 1e-4, "effective rank vs float64")
    _assert_close(sr, (sv.square().sum() / sv[0] ** 2).item(), 1e-4, "stable rank vs float64")
    _assert_close(energy_top_k(delta, 2), ((81 + 16) / sv.square().sum()).item(), 1e-5, "energy top 2")
    _assert_close(frobenius_norm(delta), sv.square().sum().sqrt().item(), 1e-4, "Frobenius norm")
    got = singular_values(delta)
    assert got.shape == (min(shape),)
    torch.testing.assert_close(got[:k].double(), sv, atol=1e-4, rtol=1e-5)
    assert got[k:].abs().max() < 1e-4  # the planted rank is k
    summ = spectrum_summary(delta, top_k=(1, 2), keep=3)
    assert summ["singular_values"] == pytest.approx(s[:3], abs=1e-4)
    assert summ["effective_rank"] == pytest.approx(er) and summ["stable_rank"] == pytest.approx(sr)
    assert summ["energy_top"]["2"] == pytest.approx(energy_top_k(delta, 2))


def test_full_rank_random_update_has_high_effective_rank():
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(64, 64, generator=gen)
    assert effective_rank(delta) > 40 and stable_rank(delta) > 8


def test_zero_update_and_bad_inputs():
    z = torch.zeros(5, 7)
    assert effective_rank(z) == 0.0 and stable_rank(z) == 0.0 and energy_top_k(z, 2) == 0.0
    assert frobenius_norm(z) == 0.0
    with pytest.raises(ValueError, match="delta must be a 2-D"):
        effective_rank(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="delta must be a torch.Tensor"):
        singular_values([[1.0, 2.0]])
    with pytest.raises(ValueError, match="k must be >= 1"):
        energy_top_k(torch.eye(3), 0)
    with pytest.raises(ValueError, match="same shape"):
        intruder_dimensions(torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match="eps must be in"):
        intruder_dimensions(torch.eye(3), torch.eye(3), eps=0.0)


def _intruder_case(seed, sigma_new=200.0):
    """Square base with known SVD; the planted direction lives in the span of the
    bottom 16 base directions, spread evenly (|cos| = 1/4 with each of them)."""
    gen = torch.Generator().manual_seed(seed)
    n = 32
    U, V = _orthonormal(n, n, gen), _orthonormal(n, n, gen)
    s = torch.linspace(20.0, 1.0, n, dtype=torch.float64)
    W_base = U @ torch.diag(s) @ V.T
    a = torch.zeros(n, dtype=torch.float64)
    a[16:] = 0.25  # unit vector in base coordinates
    b = torch.zeros(n, dtype=torch.float64)
    b[16:] = torch.randn(16, generator=gen, dtype=torch.float64)
    b /= b.norm()
    u_new, v_new = U @ a, V @ b
    return W_base, W_base + sigma_new * torch.outer(u_new, v_new), u_new


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_planted_direction_is_exactly_one_intruder(seed):
    W_base, W_tuned, u_new = _intruder_case(seed)
    count, sims = intruder_dimensions(W_base.float(), W_tuned.float(), k=10, eps=0.5, return_similarities=True)
    assert count == 1, sims
    assert sims.shape == (10,)
    # the intruder is the new leading direction; its best match is ~1/4, the others match exactly
    assert sims[0] < 0.3 and (sims[1:] > 0.99).all(), sims
    # the base against itself, or a small perturbation of it: no intruders
    assert intruder_dimensions(W_base.float(), W_base.float()) == 0
    noise = 1e-3 * torch.randn(W_base.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert intruder_dimensions(W_base, W_base + noise) == 0


def test_top_singular_similarity():
    W_base, W_tuned, _ = _intruder_case(5)
    same = top_singular_similarity(W_base, W_base.clone(), k=6)
    torch.testing.assert_close(same, torch.ones(6, dtype=torch.float64), atol=1e-10, rtol=0)
    sims = top_singular_similarity(W_base, W_tuned, k=6)
    # position 0 is the planted direction (|cos| 1/4 with base u_0 ... ≈ 0), later ones shifted by one
    assert sims[0] < 0.3, sims
    # reference from a float64 SVD
    Ub = torch.linalg.svd(W_base)[0][:, :6]
    Ut = torch.linalg.svd(W_tuned)[0][:, :6]
    torch.testing.assert_close(sims, (Ub * Ut).sum(0).abs(), atol=1e-8, rtol=0)


@pytest.mark.parametrize("r1,r2,d", [(4, 8, 37), (8, 8, 64), (3, 16, 50)])
def test_subspace_similarity_known_answers(r1, r2, d):
    gen = torch.Generator().manual_seed(r1 * r2 + d)
    A = torch.randn(r1, d, generator=gen)
    # identical adapters: 1 for every i, j
    for i in range(1, r1 + 1):
        assert subspace_similarity(A, A, i, i) == pytest.approx(1.0, abs=1e-5)
    # an invertible mix of A's rows spans the same subspace: φ(r1, r1) = 1
    M = torch.randn(r1, r1, generator=gen) + 3 * torch.eye(r1)
    assert subspace_similarity(A, M @ A, r1, r1) == pytest.approx(1.0, abs=1e-4)
    # rows of B orthogonal to rows of A: 0
    Q = _orthonormal(d, r1 + r2, gen, torch.float32).T
    A1, A2 = Q[:r1] * 3.0, Q[r1:] * 0.5
    for i in (1, r1):
        for j in (1, r2):
            assert subspace_similarity(A1, A2, i, j) == pytest.approx(0.0, abs=1e-6)
    # random pair against a float64 reference from the definition
    B = torch.randn(r2, d, generator=gen)
    V1 = torch.linalg.svd(A.double(), full_matrices=False)[2]
    V2 = torch.linalg.svd(B.double(), full_matrices=False)[2]
    for i, j in [(1, 1), (r1, r2), (max(1, r1 // 2), r2)]:
        ref = (V1[:i] @ V2[:j].T).square().sum().item() / min(i, j)
        assert subspace_similarity(A, B, i, j) == pytest.approx(ref, abs=1e-5)
    grid = subspace_similarity_grid(A, B, [1, r1], [1, r2])
    assert grid[1][1] == pytest.approx(subspace_similarity(A, B, r1, r2), abs=1e-6)
    with pytest.raises(ValueError, match="i must be <="):
        subspace_similarity(A, B, r1 + 1, 1)
    with pytest.raises(ValueError, match="share in_features"):
        subspace_similarity(A, torch.randn(2, d + 1), 1, 1)


# ----------------------------------------------------------------------------- CKA
def _cka_hsic_reference(X, Y):
    """CKA via the centring matrix H: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    X, Y = X.double(), Y.double()
    n = X.shape[0]
    H = torch.eye(n, dtype=torch.float64) - 1.0 / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return ((K * L).sum() / torch.sqrt((K * K).sum() * (L * L).sum())).item()


@pytest.mark.parametrize("n,d1,d2", [(50, 13, 29), (9, 40, 17), (120, 8, 8)])
def test_linear_cka_known_answers(n, d1, d2):
    gen = torch.Generator().manual_seed(n + d1)
    X = torch.randn(n, d1, generator=gen)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-10)
    Q = _orthonormal(d1, d1, gen, torch.float32)
    assert linear_cka(X, X @ Q) == pytest.approx(1.0, abs=1e-6)  # orthogonal invariance
    assert linear_cka(X, 7.5 * X + 3.0) == pytest.approx(1.0, abs=1e-6)  # scaling and shift
    Y = torch.randn(n, d2, generator=gen)
    assert linear_cka(X, Y) == pytest.approx(_cka_hsic_reference(X, Y), abs=1e-9)
    Z = X[:, : min(d1, d2)] + 0.3 * torch.randn(n, min(d1, d2), generator=gen)
    assert linear_cka(X, Z) == pytest.approx(_cka_hsic_reference(X, Z), abs=1e-9)
    assert linear_cka(X, Z) > linear_cka(X, Y)
    with pytest.raises(ValueError, match="same number of rows"):
        linear_cka(X, Y[:-1])


# ----------------------------------------------------------------------------- attention
def test_attention_entropy_and_js_known_answers():
    B, H, T = 2, 3, 5
    uniform = torch.tril(torch.ones(T, T))
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(B, H, T, T)
    ent = attention_entropy(uniform)
    ref = sum(math.log(t + 1) for t in range(T)) / T  # row t is uniform over t+1 keys
    torch.testing.assert_close(ent, torch.full((H,), ref), atol=1e-6, rtol=0)
    onehot = torch.eye(T).expand(B, H, T, T)
    torch.testing.assert_close(attention_entropy(onehot), torch.zeros(H), atol=0, rtol=0)
    # masking: only the last query (uniform over T keys) counts
    mask = torch.zeros(B, T)
    mask[:, -1] = 1
    torch.testing.assert_close(attention_entropy(uniform, mask), torch.full((H,), math.log(T)), atol=1e-6, rtol=0)
    # JS distance: 0 for equal rows, 1 for disjoint supports, float64 reference otherwise
    p = torch.softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(1)), -1)
    q = torch.softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(2)), -1)
    torch.testing.assert_close(js_distance(p, p), torch.zeros(4), atol=1e-6, rtol=0)
    a, b = torch.tensor([[0.5, 0.5, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.3, 0.7]])
    torch.testing.assert_close(js_distance(a, b), torch.ones(1), atol=1e-6, rtol=0)
    p64, q64 = p.double(), q.double()
    m = (p64 + q64) / 2
    jsd = 0.5 * (p64 * (p64 / m).log2()).sum(-1) + 0.5 * (q64 * (q64 / m).log2()).sum(-1)
    torch.testing.assert_close(js_distance(p, q).double(), jsd.sqrt(), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- token KL
def test_first_token_kl_reference_and_self():
    gen = torch.Generator().manual_seed(7)
    t = torch.randn(6, 50, generator=gen)
    b = torch.randn(6, 50, generator=gen)
    assert torch.equal(first_token_kl(t, t), torch.zeros(6))
    got = first_token_kl(t, b, k=10).double()
    t64, b64 = t.double(), b.double()
    ids = t64.topk(10, -1).indices
    pt = torch.softmax(t64.gather(-1, ids), -1)
    pb = torch.softmax(b64.gather(-1, ids), -1)
    ref = (pt * (pt / pb).log()).sum(-1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got > 0).all()
    # only the tuned top-k ids matter: changing the base elsewhere changes nothing
    b2 = b.clone()
    mask = torch.ones_like(b2, dtype=torch.bool).scatter_(-1, t.topk(10, -1).indices, False)
    b2[mask] += 5.0
    torch.testing.assert_close(first_token_kl(t, b2), first_token_kl(t, b), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="same shape"):
        first_token_kl(t, b[:, :-1])


# ----------------------------------------------------------------------------- restoration
class _Tiny(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.layers = torch.nn.Linear(4, 4, bias=False)
        self.norm = torch.nn.LayerNorm(4)
        with torch.no_grad():
            self.layers.weight.copy_(w)


def test_restoration_curve_with_stubs():
    base = _Tiny(torch.zeros(4, 4))
    tuned = _Tiny(torch.ones(4, 4))
    calls = []

    def restore_stub(base_sd, tuned_sd, fraction, score, select, scope, include, exclude, seed):
        assert (score, scope, include, exclude, seed) == ("relative", "global", "layers", "norm", 0)
        n = round(fraction * 16)
        w = tuned_sd["layers.weight"].clone().flatten()
        w[:n] = base_sd["layers.weight"].flatten()[:n]
        calls.append((select, fraction))
        return {"layers.weight": w.view(4, 4)}, {"restored": n, "score_share": fraction, "per_tensor": {}}

    def acc_stub(model, tokenizer, rows):
        # "accuracy" = share of weights still at the tuned value; buckets shift it by their id
        frac_tuned = model.layers.weight.mean().item()
        return {"accuracy": frac_tuned * rows[0]["scale"]}

    sets = {"in": [{"bucket": "D0", "scale": 1.0}, {"bucket": "D4", "scale": 0.5}],
            "out": [{"scale": 1.0}]}
    res = restoration_curve(base, tuned, None, sets, fractions=[0.25, 0.5], accuracy_fn=acc_stub,
                            restore_fn=restore_stub, progress=False)
    assert calls == [(s, f) for s in ("top", "bottom", "random") for f in (0.25, 0.5)]
    assert res["baseline"]["tuned"]["in"]["by_bucket"] == {"D0": 1.0, "D4": 0.5}
    assert res["baseline"]["base"]["out"] == {"by_bucket": {"all": 0.0}, "n": {"all": 1}, "mean": 0.0}
    top = res["curves"]["top"]["in"]
    assert [p["fraction"] for p in top] == [0.25, 0.5]
    assert top[0]["by_bucket"] == {"D0": 0.75, "D4": 0.375} and top[0]["mean"] == pytest.approx(0.5625)
    assert top[1]["stats"] == {"restored": 8, "score_share": 0.5}  # scalars only
    # the tuned model is put back afterwards
    assert torch.equal(tuned.layers.weight, torch.ones(4, 4))
    assert bucket_accuracy(tuned, None, [{"bucket": "x", "scale": 2.0}], acc_stub)["mean"] == 2.0
    with pytest.raises(ValueError, match="selections must be among"):
        restoration_curve(base, tuned, None, sets, selections=["best"], accuracy_fn=acc_stub, restore_fn=restore_stub)
    with pytest.raises(ValueError, match="fractions must lie in"):
        restoration_curve(base, tuned, None, sets, fractions=[0.0], accuracy_fn=acc_stub, restore_fn=restore_stub)


def test_restoration_curve_with_masking_restore():
    gen = torch.Generator().manual_seed(0)
    base = _Tiny(torch.randn(4, 4, generator=gen))
    tuned = _Tiny(base.layers.weight.detach() + torch.randn(4, 4, generator=gen))
    seen = []

    def acc(model, tokenizer, rows):
        same = (model.layers.weight == base.layers.weight).float().mean().item()
        seen.append(same)
        return same

    res = restoration_curve(base, tuned, None, {"in": [{"bucket": "D0"}]}, fractions=[0.25, 0.5],
                            selections=["top"], accuracy_fn=acc, restore_fn=restore, progress=False)
    # restoring 25% / 50% of the 16 updated elements of the only ranked tensor
    assert [p["mean"] for p in res["curves"]["top"]["in"]] == pytest.approx([0.25, 0.5])


# ----------------------------------------------------------------------------- layering
STUDY = ("rankwise.analysis", "rankwise.world", "rankwise.demo")


@functools.lru_cache(maxsize=None)
def _study_imports():
    """``{module: [(imported module, [names])]}`` for every study module, from its source (imports
    inside functions included, relative imports resolved)."""
    import ast
    import pathlib

    import rankwise

    src = pathlib.Path(rankwise.__file__).parent
    files = sorted(src.glob("analysis/*.py")) + sorted(src.glob("world/*.py")) + sorted(src.glob("demo/*.py"))
    out = {}
    for f in files:
        parts = ["rankwise"] + list(f.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mod = ".".join(parts)
        package = parts if f.name == "__init__.py" else parts[:-1]
        edges = []
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                edges += [(a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [a.name for a in node.names]
                edges.append((target, names))
        out[mod] = edges
    return out


def test_study_imports_have_no_cycle():
    modules = _study_imports()
    graph = {}
    for m, edges in modules.items():
        targets = set()
        for t, names in edges:
            subs = {f"{t}.{n}" for n in names} & set(modules)  # "from . import spectral" imports a module
            targets |= subs
            if t in modules and (not names or len(subs) < len(names)):
                targets.add(t)
        graph[m] = targets - {m}
    state: dict = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for t in sorted(graph[m]):
            visit(t, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
    # the metric modules are leaves: pure functions on tensors, no other analysis module
    for leaf in ("attention", "representations", "tokens", "spectral"):
        targets = {t for t, _ in modules[f"rankwise.analysis.{leaf}"]}
        assert not {t for t in targets if t.startswith("rankwise.")}, (leaf, targets)


def test_study_uses_only_the_public_library_api():
    """world/, demo and analysis/ import no private name of the library (nor a private library module)."""
    bad = []
    for mod, edges in _study_imports().items():
        for target, names in edges:
            if not target.startswith("rankwise") or target.startswith(STUDY):
                continue
            private = [n for n in names if n.startswith("_")] + [p for p in target.split(".") if p.startswith("_")]
            if private:
                bad.append(f"{mod}: from {target} import {', '.join(private)}")
    assert not bad, bad
