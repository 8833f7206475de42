"""rankwise.masking and rankwise._C: every op against a plain-torch (or numpy) reference.

References live here: bit packing via numpy.packbits (little bit order), the
selection via a stable torch.sort of the concatenated scores (ties: earlier
tensor, then lower index), restoration via a flat tensor as the reference method
builds it, AdamW via torch.optim.AdamW.
"""
import math

import numpy as np
import pytest
import torch

import rankwise  # noqa: F401  (loads torch before rankwise._C)
from rankwise import _C
from rankwise import masking as M
from rankwise.kernels import masked_adamw as K
from rankwise.masking import bits, keys, selection
from rankwise.masking.keys import Score, Select

SIZES = [0, 1, 7, 8, 9, 63, 1000, 65536 + 13, 300007]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_equal(actual, expected, what=""):
    if not torch.equal(actual, expected):
        diff = (actual != expected).reshape(-1).nonzero().reshape(-1)
        raise AssertionError(f"{what}: {diff.numel()} mismatches, first at flat indices {diff[:10].tolist()}")


# --------------------------------------------------------------------------- bit masks


@pytest.mark.parametrize("n", SIZES)
def test_pack_unpack_matches_numpy_little_bit_order(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.37
    packed = M.pack_mask(mask)
    ref = torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))
    _assert_equal(packed, ref, "pack_mask")
    _assert_equal(M.unpack_mask(packed, n), mask, "unpack_mask")
    assert M.mask_count(packed, n) == int(mask.sum())
    # The torch path (used for CUDA tensors) packs the same bytes.
    _assert_equal(bits.pack_mask_torch(mask), ref, "torch pack")
    _assert_equal(bits.unpack_mask_torch(ref, n), mask, "torch unpack")


def test_pack_mask_bit_order_documented_example():
    mask = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    assert M.pack_mask(mask).tolist() == [0b00000001, 0b00000010]
    assert M.unpack_mask(M.pack_mask(mask.view(2, 5)), (2, 5)).shape == (2, 5)


def test_kernel_unpack_reference_agrees_with_extension():
    mask = torch.rand(1001, generator=torch.Generator().manual_seed(1)) < 0.5
    _assert_equal(K.unpack_reference(M.pack_mask(mask), 1001), mask)


@pytest.mark.parametrize("n", [1, 9, 1000, 65536 + 13])
@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_mask_(n, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(dtype)
    mask = torch.rand(n, generator=g) < 0.5
    ref = torch.where(mask, x, torch.zeros_like(x))
    y = x.clone()
    M.apply_mask_(y, M.pack_mask(mask))
    _assert_equal(y, ref, "apply_mask_ packed")
    z = x.clone()
    M.apply_mask_(z, mask)  # bool masks are accepted too
    _assert_equal(z, ref, "apply_mask_ bool")


def test_apply_mask_non_contiguous():
    x = torch.randn(6, 10)
    view = x.t()
    mask = torch.rand(10, 6) < 0.5
    ref = torch.where(mask, view, torch.zeros_like(view))
    M.apply_mask_(view, mask)
    _assert_equal(view, ref)


@pytest.mark.parametrize("n", [1, 13, 2051])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_apply_mask_matches_reference(n, dtype):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g).to(dtype)
    packed = M.pack_mask(torch.rand(n, generator=g) < 0.5)
    y = x.clone()
    K.apply_mask(y, packed)
    _assert_equal(y, K.apply_mask_reference(x, packed), "triton apply_mask")


# --------------------------------------------------------------------------- scores and keys


@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_are_fp32_math(dtype):
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(4099, generator=g) * 3).to(dtype)
    base[:5] = 0.0
    tuned = (base.float() + torch.randn(4099, generator=g) * 0.01).to(dtype)
    b, t = base.float(), tuned.float()
    _assert_equal(M.compute_score(base, tuned, "abs"), (t - b).abs(), "abs score")
    _assert_equal(M.compute_score(base, tuned, "relative"), (t - b).abs() / (b.abs() + 1e-8), "relative score")
    exact = (t.double() - b.double()).abs() / (b.double().abs() + 1e-8)
    torch.testing.assert_close(M.compute_score(base, tuned, "relative").double(), exact, rtol=1e-6, atol=0)


def test_keys_order_like_scores_and_torch_path_agrees():
    vals = torch.tensor([-math.inf, -3.0, -1e-30, -0.0, 0.0, 1e-40, 2.0, math.inf, math.nan])
    k = _C.compute_keys(vals, vals, Score.VALUE, Select.TOP, 0, 0)
    assert k.tolist() == sorted(k.tolist())
    assert k[3] == k[4]  # -0 == +0
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(5003, generator=g), torch.randn(5003, generator=g)
    for score in Score:
        for select in Select:
            for seed, stream in ((11, 12345), (-3, 2**32 - 1), (2**63 - 1, 0)):
                _assert_equal(_C.compute_keys(a, b, score, select, seed, stream),
                              keys.keys_torch(a, b, score, select, seed, stream), f"keys {score!r} {select!r} {seed}")


def test_enum_values_are_the_extension_codes():
    # The C++ side has the same enums (csrc/masking.h); out-of-range codes are refused by name.
    assert [int(s) for s in Score] == [0, 1, 2] and [s.label for s in Score] == ["value", "abs", "relative"]
    assert [int(s) for s in Select] == [0, 1, 2] and [s.label for s in Select] == ["top", "bottom", "random"]
    x = torch.ones(3)
    with pytest.raises(RuntimeError, match="score kind must be 0 \\(value\\), 1 \\(abs\\) or 2 \\(relative\\)"):
        _C.compute_keys(x, x, 3, 0, 0, 0)
    with pytest.raises(RuntimeError, match="selection mode must be 0 \\(top\\), 1 \\(bottom\\) or 2 \\(random\\)"):
        _C.compute_keys(x, x, 0, -1, 0, 0)
    with pytest.raises(ValueError, match=r"score must be one of \['abs', 'relative'\], got 'value'"):
        M.compute_score(x, x, "value")
    assert keys.parse_choice(Select, "bottom", "select") is Select.BOTTOM


# --------------------------------------------------------------------------- splitmix64


def test_splitmix64_known_answers():
    # Vigna's splitmix64.c: seeded with s, the first output is splitmix64(s).
    z = torch.tensor([0, 1234567], dtype=torch.int64)
    got = [v & (2**64 - 1) for v in keys.splitmix64(z).tolist()]
    assert got == [0xE220A8397B1DCDAF, 6457827717110365317]


def test_splitmix64_python_and_extension_agree_bit_for_bit():
    # One function, two implementations: rankwise.masking.keys.splitmix64 (torch, the CUDA path)
    # and mix64 in csrc/masking.cpp (bound as rankwise._C.splitmix64, the CPU key loops).
    g = torch.Generator().manual_seed(12)
    edge = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 0x9E3779B97F4A7C15 - 2**64], dtype=torch.int64)
    z = torch.cat([edge, torch.randint(-(2**63), 2**63 - 1, (100003,), generator=g, dtype=torch.int64)])
    _assert_equal(_C.splitmix64(z), keys.splitmix64(z), "splitmix64")
    # ...and so do the random keys built on it (salt from seed and stream, then the index).
    for seed, stream in ((0, 0), (7, M.name_stream("model.layers.0.mlp.up_proj.weight")), (-5, 2**40)):
        ext = _C.compute_keys(torch.zeros(5000), torch.zeros(5000), Score.ABS, Select.RANDOM, seed, stream)
        _assert_equal(ext, keys.random_keys(5000, seed, stream, "cpu"), f"random keys {seed} {stream}")


def test_random_score_is_uniform_and_seeded():
    s = M.random_score(200000, seed=3, stream=9)
    assert 0.0 <= float(s.min()) and float(s.max()) < 1.0
    assert abs(float(s.mean()) - 0.5) < 0.005
    assert torch.equal(s, M.random_score(200000, seed=3, stream=9))
    assert not torch.equal(s, M.random_score(200000, seed=4, stream=9))
    hist = torch.histc(s.float(), bins=10, min=0, max=1)
    assert float((hist / 20000 - 1).abs().max()) < 0.05


# --------------------------------------------------------------------------- selection


def _reference_topk(tensors, fraction_k, largest):
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    order = torch.sort(flat, descending=largest, stable=True).indices
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:fraction_k]] = True
    return chosen


@pytest.mark.parametrize("fraction", [0.0, 0.013, 0.2, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_matches_sort(fraction, largest, dtype):
    g = torch.Generator().manual_seed(int(fraction * 1000) + largest)
    shapes = [(7, 3), (1,), (65536 + 5,), (33, 17, 2), (0,)]
    tensors = [(torch.randn(s, generator=g) * 10).to(dtype) for s in shapes]
    n = sum(t.numel() for t in tensors)
    k = M.select_count(n, fraction)
    masks = M.topk_mask(tensors, fraction, largest=largest)
    assert [m.shape for m in masks] == [t.shape for t in tensors]
    got = torch.cat([m.reshape(-1) for m in masks])
    assert int(got.sum()) == k
    _assert_equal(got, _reference_topk(tensors, k, largest), "topk_mask")


@pytest.mark.parametrize("largest", [True, False])
def test_topk_mask_ties_break_by_tensor_then_index(largest):
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randint(0, 4, s, generator=g).float() for s in [(1000,), (7, 9), (70001,)]]
    for fraction in (0.1, 0.3, 0.77):
        k = M.select_count(sum(t.numel() for t in tensors), fraction)
        got = torch.cat([m.reshape(-1) for m in M.topk_mask(tensors, fraction, largest=largest)])
        _assert_equal(got, _reference_topk(tensors, k, largest), f"ties at {fraction}")
    # All equal: the first k elements in list order.
    same = [torch.ones(10), torch.ones(5)]
    got = torch.cat(M.topk_mask(same, 0.6, largest=largest))
    assert got.tolist() == [True] * 9 + [False] * 6


@pytest.mark.parametrize("data", ["continuous", "ties"])
def test_topk_mask_large_uses_sampled_bracket_exactly(data):
    # n >= 2^22 takes the extension's one-pass path (sampled bracket); with heavy
    # ties the bracket overflows and the radix select takes over. Both exact.
    g = torch.Generator().manual_seed(10)
    sizes = [(1 << 21) + 3, 5, (1 << 21) + 11]
    if data == "continuous":
        tensors = [torch.randn(s, generator=g) for s in sizes]
    else:
        tensors = [torch.randint(0, 7, (s,), generator=g).float() for s in sizes]
    for fraction, largest in ((0.2, True), (0.013, False)):
        k = M.select_count(sum(sizes), fraction)
        got = torch.cat(M.topk_mask(tensors, fraction, largest=largest))
        _assert_equal(got, _reference_topk(tensors, k, largest), f"{data} {fraction}")
        select, streams = Select.TOP if largest else Select.BOTTOM, [0] * len(tensors)
        sampled = _C.select_threshold(tensors, tensors, k, Score.VALUE, select, 0, streams)
        assert tuple(sampled) == tuple(_C.select_threshold(tensors, tensors, k, Score.VALUE, select, 0, streams,
                                                           sampled=False))


def test_topk_mask_packed_and_nan():
    x = torch.tensor([1.0, math.nan, 3.0, -0.0, 0.0, 2.0])
    m = M.topk_mask([x], 0.5)[0]
    assert m.tolist() == [False, True, True, False, False, True]  # NaN is the largest
    packed = M.topk_mask([x], 0.5, packed=True)[0]
    _assert_equal(M.unpack_mask(packed, 6), m)


def test_torch_backend_selects_like_extension():
    g = torch.Generator().manual_seed(6)
    bases = [torch.randn(s, generator=g) for s in (1000, 4097, 3)]
    tuneds = [b + torch.randint(0, 3, b.shape, generator=g) * 0.01 for b in bases]
    for score in (Score.ABS, Score.RELATIVE):
        for select in Select:
            k = 1234
            ref = _C.select_threshold(bases, tuneds, k, score, select, 9, [1, 2, 3])
            triples = lambda: zip(bases, tuneds, [1, 2, 3])  # noqa: E731
            got = selection.radix_threshold(triples, k, score, select, 9, selection.TorchBackend)
            assert tuple(ref) == got
            assert selection.radix_threshold(triples, k, score, select, 9, selection.ExtensionBackend) == got
            left_c, left_t = ref[1], got[1]
            for b, t, s in zip(bases, tuneds, [1, 2, 3]):
                pc = selection.ExtensionBackend.build(b, t, score, select, 9, s, ref[0], left_c)
                pt = selection.TorchBackend.build(b, t, score, select, 9, s, got[0], left_t)
                _assert_equal(pc[0], pt[0], "masks")
                assert pc[1:3] == pt[1:3]
                assert math.isclose(pc[3], pt[3], rel_tol=1e-6) and math.isclose(pc[4], pt[4], rel_tol=1e-6)  # sums: fp32 per byte, fp64 across
                left_c -= pc[2]
                left_t -= pt[2]


def test_select_count_is_exact_on_the_decimal():
    assert M.select_count(100, 0.29) == 29  # int(100 * 0.29) == 28 in floating point
    assert M.select_count(10, 0.2) == 2
    assert M.select_count(7, 1.0) == 7 and M.select_count(7, 0.0) == 0
    assert M.select_count(10**9 + 7, 0.01) == (10**9 + 7) // 100


# --------------------------------------------------------------------------- restore (in memory)


def _state(dtype=torch.float32, seed=0, unchanged=0.0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.embed_tokens.weight": (50, 8),
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 19),
        "model.layers.0.input_layernorm.weight": (8,),
        "model.layers.1.self_attn.q_proj.weight": (8, 8),
        "model.layers.1.mlp.down_proj.weight": (8, 19),
        "model.norm.weight": (8,),
        "lm_head.weight": (50, 8),
    }
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    tuned = {}
    for n, b in base.items():
        delta = torch.randn(b.shape, generator=g) * 0.05
        delta[torch.rand(b.shape, generator=g) < unchanged] = 0.0
        tuned[n] = (b.float() + delta).to(dtype)
    return base, tuned


def reference_restore(base, tuned, fraction, select="top", score="relative", seed=0):
    """The reference method: one flat tensor of scores over names matching 'layers'
    and not 'norm', a stable sort, the first floor(n * k%) elements reset."""
    names = sorted(n for n in tuned if "layers" in n and "norm" not in n)
    if select == "random":
        flat = torch.cat([M.random_score(tuned[n].numel(), seed, M.name_stream(n)) for n in names])
    else:
        flat = torch.cat([M.compute_score(base[n], tuned[n], score).reshape(-1).double() for n in names])
    k = M.select_count(flat.numel(), fraction)
    order = torch.sort(flat, descending=select != "bottom", stable=True).indices[:k]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order] = True
    out, off = dict(tuned), 0
    scores = torch.cat([M.compute_score(base[n], tuned[n], score).reshape(-1).double() for n in names])
    for n in names:
        c = chosen[off:off + tuned[n].numel()].view(tuned[n].shape)
        out[n] = torch.where(c, base[n], tuned[n])
        off += tuned[n].numel()
    return out, float(scores[chosen].sum() / scores.sum()), k


@pytest.mark.parametrize("select", ["top", "bottom", "random"])
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.2, 0.6, 1.0])
def test_restore_matches_reference(select, fraction):
    base, tuned = _state(unchanged=0.3)  # 30% unchanged elements: many ties at score 0
    out, stats = M.restore(base, tuned, fraction, select=select, seed=7)
    ref, share, k = reference_restore(base, tuned, fraction, select=select, seed=7)
    for n in tuned:
        _assert_equal(out[n], ref[n], n)
    assert stats["k"] == k and stats["restored"] == k
    assert sum(v["restored"] for v in stats["tensors"].values()) == k
    assert math.isclose(stats["score_share"], share, rel_tol=1e-6, abs_tol=1e-12)
    assert set(stats["tensors"]) == {n for n in tuned if "layers" in n and "norm" not in n}
    assert out["model.norm.weight"] is tuned["model.norm.weight"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_dtypes_and_dict_order(dtype):
    base, tuned = _state(dtype, seed=2)
    out, _ = M.restore(base, tuned, 0.2)
    ref, _, _ = reference_restore(base, tuned, 0.2)
    for n in tuned:
        assert out[n].dtype == dtype
        _assert_equal(out[n], ref[n], n)
    # Reversed dict order, same result (ties follow sorted names).
    rev_b = dict(reversed(list(base.items())))
    rev_t = dict(reversed(list(tuned.items())))
    out2, _ = M.restore(rev_b, rev_t, 0.2, select="random", seed=1)
    out3, _ = M.restore(base, tuned, 0.2, select="random", seed=1)
    for n in tuned:
        _assert_equal(out2[n], out3[n], n)


def test_restore_per_tensor_abs_and_rescale():
    base, tuned = _state(seed=3)
    out, stats = M.restore(base, tuned, 0.25, score="abs", scope="per_tensor", include=r"proj", exclude=None)
    for n in tuned:
        if "proj" not in n:
            assert out[n] is tuned[n]
            continue
        k = M.select_count(tuned[n].numel(), 0.25)
        score = (tuned[n] - base[n]).abs().reshape(-1)
        chosen = torch.zeros(score.numel(), dtype=torch.bool)
        chosen[torch.sort(score, descending=True, stable=True).indices[:k]] = True
        _assert_equal(out[n], torch.where(chosen.view(base[n].shape), base[n], tuned[n]), n)
        assert stats["tensors"][n]["restored"] == k
    # DARE: drop a random 30%, scale what is kept by 1 / 0.7.
    out, _ = M.restore(base, tuned, 0.3, select="random", rescale=True, seed=5)
    plain, _ = M.restore(base, tuned, 0.3, select="random", seed=5)
    n = "model.layers.1.mlp.down_proj.weight"
    kept = plain[n] != base[n]
    expected = base[n] + (tuned[n] - base[n]) / 0.7
    torch.testing.assert_close(out[n][kept], expected[kept], rtol=1e-6, atol=1e-6)
    _assert_equal(out[n][~kept], base[n][~kept])


def test_random_selection_is_uniform():
    base = {"layers.w": torch.zeros(20000)}
    tuned = {"layers.w": torch.ones(20000)}
    counts = torch.zeros(20000)
    for seed in range(20):
        out, stats = M.restore(base, tuned, 0.25, select="random", seed=seed)
        assert stats["restored"] == 5000
        counts += (out["layers.w"] == 0).float()
    # Each element is chosen with probability 1/4; 20 draws -> mean 5 per element, no positional bias.
    halves = counts.view(2, -1).mean(dim=1)
    assert float((halves - 5).abs().max()) < 0.15


def test_restore_bad_input():
    base, tuned = _state()
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        M.restore(base, tuned, 1.5)
    with pytest.raises(ValueError, match="fraction"):
        M.restore(base, tuned, -0.1)
    with pytest.raises(TypeError, match="fraction"):
        M.restore(base, tuned, "0.2")
    t2 = dict(tuned)
    del t2["model.layers.0.mlp.down_proj.weight"]
    t2["model.layers.9.extra"] = torch.zeros(3)
    t2["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(8, 9)
    with pytest.raises(ValueError) as e:
        M.restore(base, t2, 0.2)
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj.weight" in msg and "model.layers.9.extra" in msg
    assert "model.layers.1.self_attn.q_proj.weight" in msg and "(8, 9)" in msg
    ib, it = dict(base), dict(tuned)
    ib["model.layers.0.step"] = torch.zeros(3, dtype=torch.int64)
    it["model.layers.0.step"] = torch.ones(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="model.layers.0.step"):
        M.restore(ib, it, 0.2)
    with pytest.raises(ValueError, match="select"):
        M.restore(base, tuned, 0.2, select="middle")
    with pytest.raises(ValueError, match="no parameter matches"):
        M.restore(base, tuned, 0.2, include="nothing_like_this")
    with pytest.raises(TypeError, match="floating-point"):
        M.topk_mask([torch.arange(5)], 0.5)
    with pytest.raises(ValueError, match="bytes"):
        M.apply_mask_(torch.zeros(17), torch.zeros(2, dtype=torch.uint8))


# --------------------------------------------------------------------------- masked AdamW


def _adamw_setup(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(13, 7), (1,), (1029,)]
    params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    masks = [torch.rand(s, generator=g) < 0.4 for s in shapes]
    grads = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(5)]
    return params, masks, grads


def _run(opt_cls, params, grads, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_cls(ps, **kw)
    for step_grads in grads:
        for p, gr in zip(ps, step_grads):
            p.grad = gr.clone()
        opt.step()
    return ps, opt


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_masked_adamw_matches_torch_adamw_on_mask(weight_decay):
    params, masks, grads = _adamw_setup()
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    ours, _ = _run(lambda ps, **kw: M.MaskedAdamW(ps, masks, **kw), params, grads, **hp)
    ref, _ = _run(torch.optim.AdamW, params, grads, **hp)
    for p0, p, r, m in zip(params, ours, ref, masks):
        # fp32, 5 steps: the same math in a different fused order; 1e-6 absolute on O(1) weights.
        torch.testing.assert_close(p.data[m], r.data[m], rtol=0, atol=1e-6)
        _assert_equal(p.data[~m], p0[~m], "outside the mask")
        assert not torch.equal(p.data[m], p0[m]) or not m.any()


def test_masked_adamw_bf16_params_fp32_moments():
    params, masks, grads = _adamw_setup(torch.bfloat16, seed=1)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = M.MaskedAdamW(ps, {i: M.pack_mask(m) for i, m in enumerate(masks)}, lr=1e-2, weight_decay=0.05)
    ref = [p.clone() for p in params]
    m1 = [torch.zeros(p.shape) for p in params]
    m2 = [torch.zeros(p.shape) for p in params]
    for step, gs in enumerate(grads, start=1):
        for i, (p, gr) in enumerate(zip(ps, gs)):
            p.grad = gr.clone()
            ref[i], m1[i], m2[i] = K.masked_adamw_step_reference(
                ref[i], gr, m1[i], m2[i], M.pack_mask(masks[i]), lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.05, step=step)
        opt.step()
    for p, r, p0, m in zip(ps, ref, params, masks):
        # bf16 storage: the fp32 update is rounded once per step; allow one bf16 ulp (2^-7 relative).
        torch.testing.assert_close(p.data.float(), r.float(), rtol=2**-7, atol=1e-3)
        _assert_equal(p.data[~m], p0[~m], "outside the mask")
        assert opt.state[p]["exp_avg"].dtype == torch.float32


def test_masked_adamw_state_dict_resume_is_exact():
    params, masks, grads = _adamw_setup(torch.bfloat16, seed=2)
    full, _ = _run(lambda ps, **kw: M.MaskedAdamW(ps, masks, **kw), params, grads, lr=1e-2)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = M.MaskedAdamW(ps, masks, lr=1e-2)
    for gs in grads[:3]:
        for p, gr in zip(ps, gs):
            p.grad = gr.clone()
        opt.step()
    sd = opt.state_dict()
    ps2 = [torch.nn.Parameter(p.data.clone()) for p in ps]
    opt2 = M.MaskedAdamW(ps2, [torch.ones(p.shape, dtype=torch.bool) for p in ps2], lr=1e-2)
    opt2.load_state_dict(sd)  # masks come back with the state
    for gs in grads[3:]:
        for p, gr in zip(ps2, gs):
            p.grad = gr.clone()
        opt2.step()
    for a, b in zip(full, ps2):
        _assert_equal(a.data, b.data, "resumed")
    assert opt2.state[ps2[0]]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_masked_adamw_matches_reference(dtype):
    g = torch.Generator().manual_seed(8)
    n = 2053
    p = torch.randn(n, generator=g).to(dtype)
    gr = torch.randn(n, generator=g).to(dtype)
    m1, m2 = torch.randn(n, generator=g) * 0.1, torch.rand(n, generator=g) * 0.01
    packed = M.pack_mask(torch.rand(n, generator=g) < 0.5)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=4)
    rp, r1, r2 = K.masked_adamw_step_reference(p, gr, m1, m2, packed, **hp)
    P, A, B = p.clone(), m1.clone(), m2.clone()
    K.masked_adamw_step(P, gr, A, B, packed, **hp)
    # fp32 math vs float64: a few fp32 ulps; fp16 params: one fp16 rounding of the result.
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(P.float(), rp.float(), rtol=0, atol=atol)
    torch.testing.assert_close(A, r1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(B, r2, rtol=1e-6, atol=1e-9)
    # The C++ step computes the same fp32 math.
    P2, A2, B2 = p.clone(), m1.clone(), m2.clone()
    _C.masked_adamw_step_(P2, gr, A2, B2, packed, 1e-2, 0.9, 0.999, 1e-8, 0.1, 4)
    torch.testing.assert_close(P2.float(), P.float(), rtol=0, atol=atol)


def test_masked_adamw_bad_masks():
    p = torch.nn.Parameter(torch.zeros(10))
    with pytest.raises(ValueError, match="no mask"):
        M.MaskedAdamW([p], {})
    with pytest.raises(ValueError, match="expected 10"):
        M.MaskedAdamW([p], [torch.ones(9, dtype=torch.bool)])
    with pytest.raises(ValueError, match="bytes"):
        M.MaskedAdamW([p], [torch.zeros(1, dtype=torch.uint8)])


# --------------------------------------------------------------------------- sparse codec


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", [0.0, 0.001, 0.3, 1.0])
def test_sparse_codec_roundtrip(dtype, density):
    g = torch.Generator().manual_seed(9)
    n = 200003  # gaps > 127 and > 16383 need 2- and 3-byte varints at low density
    base = torch.randn(n, generator=g).to(dtype)
    tuned = (base.float() + torch.randn(n, generator=g)).to(dtype)
    mask = torch.rand(n, generator=g) < density
    mask[-1] = density > 0
    upd = M.sparse_encode(tuned, mask)
    _assert_equal(M.sparse_decode(upd, base), torch.where(mask, tuned, base), "decode")
    sizes = upd.sizes()
    idx = mask.nonzero().reshape(-1)
    gaps = torch.diff(idx, prepend=torch.tensor([-1])) - 1
    ref_bytes = int(sum((gaps >= 1 << (7 * j)).sum() for j in range(1, 9))) + gaps.numel()  # LEB128 lengths
    assert sizes["count"] == int(mask.sum()) and sizes["index_bytes"] == ref_bytes
    assert sizes["dense_bytes"] == n * base.element_size()
    assert sizes["total_bytes"] == ref_bytes + int(mask.sum()) * base.element_size()


def test_sparse_decode_rejects_corrupt_input():
    upd = M.sparse_encode(torch.ones(300), torch.ones(300, dtype=torch.bool))
    upd.index_bytes = upd.index_bytes[:-1]
    with pytest.raises(RuntimeError, match="index_bytes ended"):
        M.sparse_decode(upd, torch.zeros(300))
    with pytest.raises(ValueError, match="encoded from"):
        M.sparse_decode(upd, torch.zeros(301))


# --------------------------------------------------------------------------- CUDA (same semantics as CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("select", ["top", "bottom", "random"])
def test_cuda_restore_and_masks_match_cpu(select):
    base, tuned = _state(unchanged=0.3, seed=11)
    cpu, cpu_stats = M.restore(base, tuned, 0.2, select=select, seed=2)
    gpu, gpu_stats = M.restore({n: t.cuda() for n, t in base.items()}, {n: t.cuda() for n, t in tuned.items()}, 0.2,
                               select=select, seed=2)
    for n in tuned:
        _assert_equal(gpu[n].cpu(), cpu[n], n)
    assert gpu_stats["restored"] == cpu_stats["restored"]
    x = torch.randn(4099)
    mask = torch.rand(4099) < 0.3
    _assert_equal(M.pack_mask(mask.cuda()).cpu(), M.pack_mask(mask))
    y = x.cuda()
    M.apply_mask_(y, mask.cuda())
    _assert_equal(y.cpu(), torch.where(mask, x, torch.zeros_like(x)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_masked_adamw_matches_cpu():
    params, masks, grads = _adamw_setup(seed=12)
    cpu, _ = _run(lambda ps, **kw: M.MaskedAdamW(ps, masks, **kw), params, grads, lr=1e-2, weight_decay=0.1)
    gpu, _ = _run(lambda ps, **kw: M.MaskedAdamW(ps, [m.cuda() for m in masks], **kw),
                  [p.cuda() for p in params], [[g.cuda() for g in gs] for gs in grads], lr=1e-2, weight_decay=0.1)
    for c, g, p0, m in zip(cpu, gpu, params, masks):
        torch.testing.assert_close(g.data.cpu(), c.data, rtol=0, atol=1e-6)  # fp32, same math, different hardware
        _assert_equal(g.data.cpu()[~m], p0[~m], "outside the mask")
