"""NF4 format: byte equality with bitsandbytes' quantizer (the reference for quantization),
dequantization against the test's own float64 decoding of the same bytes
(``helpers.decode_nf4_bnb``: bitsandbytes' dequantize and matmul kernels are never the
reference; its CPU kernels give wrong values on some CPUs, e.g. with AVX512-BF16), the
decoder itself against the format's definition, conversions, state dicts, errors, the
Triton dequantize kernel, NF4Linear and quantize_model_nf4."""
import math

import pytest
import torch
from helpers import decode_nf4_bnb

from rankwise.quant import (
    NF4_CODE,
    NF4Linear,
    NF4Weight,
    dequantize_nf4,
    dynamic_map,
    from_bnb,
    model_bytes,
    nf4_from_state_dict,
    nf4_state_dict,
    quantize_model_nf4,
    quantize_nf4,
    to_bnb,
    to_bnb_params,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# awkward shapes: numel not a multiple of 64 or even of 2, 1-D, 3-D, many blocks
SHAPES = [(37, 51), (129,), (3, 5, 70), (1, 65), (96, 128)]


@pytest.fixture(scope="module")
def bnbF():
    F = pytest.importorskip("bitsandbytes.functional")
    # bitsandbytes' odd-shape dequantization goes through torch.compile; eager is
    # numerically the same and keeps these tests fast.
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield F
    torch._dynamo.config.disable = old


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g) * (0.02 + 3 * torch.rand(1, generator=g))
    W = W.reshape(-1)
    W[:: 7] *= 5  # a few outliers per block
    if W.numel() > 130:
        W[64:128] = 0.0  # an all-zero block
    return W.reshape(shape).to(dtype)


def assert_bytes_equal(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    diff = (a != b).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} of {a.numel()} entries differ, first at {diff[0].tolist()}"


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bitsandbytes(bnbF, shape, dtype, double_quant):
    W = _weight(shape, dtype, seed=SHAPES.index(shape) * 10 + DTYPES.index(dtype))
    packed, st = bnbF.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = quantize_nf4(W, blocksize=64, double_quant=double_quant)
    assert_bytes_equal(q.packed, packed, "packed")
    assert_bytes_equal(q.absmax, st.absmax, "absmax")
    assert_bytes_equal(q.quant_map, st.code, "quant_map")
    assert q.shape == W.shape and q.dtype == dtype and q.blocksize == 64
    if double_quant:
        assert_bytes_equal(q.nested_absmax, st.state2.absmax, "nested_absmax")
        assert_bytes_equal(q.nested_quant_map, st.state2.code, "nested_quant_map")
        assert torch.equal(q.offset, st.offset), (q.offset, st.offset)
    # dequantization: the format's values of bitsandbytes' bytes, bit for bit
    assert_bytes_equal(dequantize_nf4(q), decode_nf4_bnb(packed, st).float().to(dtype), "dequantized")


@pytest.mark.parametrize("blocksize", [128, 256, 1024])
def test_quantize_other_blocksizes_and_many_nested_blocks(bnbF, blocksize):
    # 256 x 1030 values: with blocksize 128, 2060 absmax values -> 9 nested blocks (last one short)
    W = _weight((256, 1030), torch.float32, seed=blocksize)
    packed, st = bnbF.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(W, blocksize=blocksize, double_quant=True)
    assert_bytes_equal(q.packed, packed, "packed")
    assert_bytes_equal(q.absmax, st.absmax, "absmax codes")
    assert_bytes_equal(q.nested_absmax, st.state2.absmax, "nested_absmax")
    assert_bytes_equal(dequantize_nf4(q), decode_nf4_bnb(packed, st).float(), "dequantized")


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 51), (129,), (3, 5, 70), (70, 130)])
def test_blocksize_32_matches_bitsandbytes(bnbF, shape, dtype, double_quant):
    """bitsandbytes accepts blocksize 32 (its CPU path too): the same bytes from both of
    our quantizers, the same dequantized values from both of our dequantizers."""
    from rankwise.kernels.nf4 import nf4_dequantize

    W = _weight(shape, dtype, seed=32 + DTYPES.index(dtype))
    packed, st = bnbF.quantize_4bit(W, blocksize=32, quant_type="nf4", compress_statistics=double_quant)
    ref = decode_nf4_bnb(packed, st).float().to(dtype)
    for backend in ("torch", "triton"):
        q = quantize_nf4(W, blocksize=32, double_quant=double_quant, backend=backend)
        assert q.blocksize == 32 and q.absmax.numel() == math.ceil(W.numel() / 32)
        assert_bytes_equal(q.packed, packed, f"packed ({backend})")
        assert_bytes_equal(q.absmax, st.absmax, f"absmax ({backend})")
        if double_quant:
            assert_bytes_equal(q.nested_absmax, st.state2.absmax, f"nested_absmax ({backend})")
            assert torch.equal(q.offset, st.offset), (q.offset, st.offset)
        assert_bytes_equal(nf4_dequantize(q, backend=backend), ref, f"dequantized ({backend})")
    assert_bytes_equal(dequantize_nf4(from_bnb(packed, st)), ref, "from_bnb")


def test_code_tables_match_bitsandbytes(bnbF):
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnbF.create_dynamic_map())


def _exact_weight(shape, blocksize, seed, one_scale=False):
    """A weight whose NF4 quantization is exact: every block holds code values times a
    power of two 2^e (the same e everywhere with ``one_scale``), its first value +-2^e so
    that the block's absmax is 2^e. Then W / absmax is a code value exactly, the quantizer
    must pick that code, and the decoded weight must be W, bit for bit."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    e = torch.zeros(blocks) if one_scale else torch.randint(-6, 4, (blocks,), generator=g).float()
    idx = torch.randint(0, 16, (n,), generator=g)
    idx[::blocksize] = torch.randint(0, 2, (blocks,), generator=g) * 15  # code 0 is -1.0, code 15 is +1.0
    W = NF4_CODE[idx] * torch.exp2(e).repeat_interleave(blocksize)[:n]
    return W.reshape(shape)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024])
@pytest.mark.parametrize("shape", [(96, 96), (37, 51), (129,), (3, 5, 70), (1, 65)])
def test_decoder_known_answer_from_bitsandbytes_bytes(bnbF, shape, blocksize):
    """The tests' decoder (helpers.decode_nf4_bnb) on bitsandbytes' own bytes and quant
    state of a weight whose NF4 values are known (``_exact_weight``): exactly that weight.
    Checks the nibble order (first value in the high nibble), the block of each value (the
    last block short, blocks straddling rows), the code table and the absmax; and, with
    double quantization (one scale everywhere: absmax - offset is 0, so exact), the nested
    state. Shapes: a 96x96 weight, numel not a multiple of the block, odd numel, 3-D."""
    for dq in (False, True):
        W = _exact_weight(shape, blocksize, seed=blocksize + len(shape), one_scale=dq)
        packed, st = bnbF.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=dq)
        assert st.nested == dq
        got = decode_nf4_bnb(packed, st)
        assert got.dtype == torch.float64 and got.shape == W.shape
        assert_bytes_equal(got, W.double(), f"decoded (double_quant={dq})")


def test_decoder_nested_known_answer():
    """Double quantization decoded by hand: a QuantState built here (bitsandbytes' container,
    none of its kernels) with two nested blocks (301 absmax codes: 256 + 45), absmax codes
    that are the dynamic map's 1.0 and 0.0, nested scales 0.5 and 0.25 and offset 0.125:
    block scales 0.625 / 0.125 in the first nested block, 0.375 / 0.125 in the second
    (exact in fp32), each value ``NF4[nibble] * scale`` with the nibbles drawn; 9639 values
    (odd, the last block short)."""
    QuantState = pytest.importorskip("bitsandbytes.functional").QuantState
    n, bs = 300 * 32 + 39, 32
    blocks = -(-n // bs)
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), generator=g, dtype=torch.uint8)
    code8 = dynamic_map()
    one, zero = int((code8 == 1.0).nonzero()), int((code8 == 0.0).nonzero())
    u8 = torch.tensor([one if b % 2 == 0 else zero for b in range(blocks)], dtype=torch.uint8)
    state2 = QuantState(absmax=torch.tensor([0.5, 0.25]), code=code8, blocksize=256, dtype=torch.float32)
    st = QuantState(absmax=u8, shape=torch.Size([n]), dtype=torch.float32, blocksize=bs, code=NF4_CODE.clone(),
                    quant_type="nf4", offset=torch.tensor(0.125), state2=state2)
    nibbles = [v for byte in packed.reshape(-1).tolist() for v in (byte >> 4, byte & 15)][:n]
    scales = [(1.0 if b % 2 == 0 else 0.0) * (0.5 if b < 256 else 0.25) + 0.125 for b in range(blocks)]
    want = torch.tensor([float(NF4_CODE[k]) * scales[i // bs] for i, k in enumerate(nibbles)], dtype=torch.float64)
    assert_bytes_equal(decode_nf4_bnb(packed, st), want, "decoded by hand")


@pytest.mark.parametrize("double_quant", [False, True])
def test_decoder_on_bitsandbytes_quantization_of_a_random_weight(bnbF, double_quant):
    """A random 300 x 1024 weight, rows of very different scales (19 / 10 nested blocks of
    absmax codes with blocksize 64 / 128), quantized by bitsandbytes: every decoded value
    within the format's rounding of W: half the widest NF4 code gap (0.1520, between -1
    and the next code) times the block's absmax, plus, with double quantization, the 8-bit
    rounding of ``absmax - offset``: half the widest gap of the dynamic map (0.0071, near
    1) times the largest ``|absmax - offset|`` of its nested block. A misread byte, block,
    code table or nested state misses it."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(300, 1024, generator=g) * torch.rand(300, 1, generator=g)
    gap8 = (dynamic_map().diff().max() / 2).item()
    assert gap8 < 0.0072
    for bs in (64, 128):
        packed, st = bnbF.quantize_4bit(W, blocksize=bs, quant_type="nf4", compress_statistics=double_quant)
        got = decode_nf4_bnb(packed, st).reshape(-1, bs)
        w = W.double().reshape(-1, bs)
        absmax = w.abs().amax(1)
        bound = 0.1520 * absmax
        if double_quant:
            dev = (absmax - absmax.mean()).abs()
            dev = torch.nn.functional.pad(dev, (0, -dev.numel() % 256)).reshape(-1, 256).amax(1)
            bound = bound + gap8 * dev.repeat_interleave(256)[:absmax.numel()] * 1.0001
        err = (got - w).abs().amax(1)
        assert (err <= bound).all(), (bs, (err / bound).max().item())


def test_nested_8bit_quantizer_ties_and_grid(bnbF):
    """The 8-bit absmax quantizer on values placed exactly on and around the
    code midpoints and on a fine grid: where a naive nearest-code search differs
    from bitsandbytes' LUT kernel."""
    from rankwise.quant import _quantize_blockwise_8bit

    code = dynamic_map()
    mids = (code[:-1] + code[1:]) / 2
    vals = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                      code, torch.linspace(-1, 1, 40001), torch.zeros(300)])
    q_ref, am_ref = torch.ops.bitsandbytes.quantize_blockwise.default(vals, code, 256)
    q, am = _quantize_blockwise_8bit(vals, code, 256)
    assert_bytes_equal(q, q_ref, "8-bit codes")
    assert_bytes_equal(am, am_ref, "8-bit absmax")


def test_dequantize_known_answer():
    # one block of 64: the 16 code values times 2.0, four times
    W = (NF4_CODE.repeat(4) * 2.0).reshape(8, 8)
    q = quantize_nf4(W)
    assert q.absmax.tolist() == [2.0]
    assert q.packed[0, 0].item() == 0x01 and q.packed[7, 0].item() == 0xEF
    assert torch.equal(dequantize_nf4(q), W)


def test_bitsandbytes_state_dict_round_trip(bnbF):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    fp = torch.nn.Linear(70, 33)
    for dq in (False, True):
        lin = bnb.nn.Linear4bit(70, 33, bias=True, compress_statistics=dq, quant_type="nf4")
        lin.load_state_dict(fp.state_dict())
        lin = lin.to("cpu")  # bitsandbytes quantizes here
        sd = lin.state_dict()
        # bnb -> rankwise
        m = NF4Linear(70, 33, quantize_nf4(torch.zeros(33, 70)), torch.zeros(33))
        m.load_state_dict(sd)
        assert m.weight.double_quant == dq
        # rankwise -> state dict: same keys, same bytes (JSON metadata included)
        sd2 = m.state_dict()
        assert list(sd2) == list(sd) or set(sd2) == set(sd), (sorted(sd2), sorted(sd))
        for k in sd:
            assert_bytes_equal(sd2[k], sd[k], k)
        # rankwise -> bnb again
        stats = {k[len("weight."):]: v for k, v in sd2.items() if k.startswith("weight.")}
        p = bnb.nn.Params4bit.from_prequantized(sd2["weight"], stats, device="cpu")
        assert_bytes_equal(decode_nf4_bnb(p.data, p.quant_state).float(), dequantize_nf4(m.weight), "dequant")
        # our own quantizer gives the very same checkpoint
        sd3 = nf4_state_dict(quantize_nf4(fp.weight.data, double_quant=dq))
        for k in sd3:
            assert_bytes_equal(sd3[k], sd[k], k)
        # the layer's output: the float64 product with the decoded weight, to fp32 rounding (K = 70)
        x = torch.randn(5, 70)
        ref = torch.nn.functional.linear(x.double(), decode_nf4_bnb(lin.weight.data, lin.weight.quant_state).float()
                                         .double(), lin.bias.double())
        with torch.no_grad():
            torch.testing.assert_close(m(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_to_bnb_from_bnb(bnbF):
    W = _weight((40, 72), torch.float16, seed=3)
    for dq in (False, True):
        q = quantize_nf4(W, double_quant=dq)
        packed, st = to_bnb(q)
        assert_bytes_equal(decode_nf4_bnb(packed, st).float().to(q.dtype), dequantize_nf4(q), "to_bnb")
        params = to_bnb_params(q)
        assert_bytes_equal(decode_nf4_bnb(params.data, params.quant_state).float().to(q.dtype), dequantize_nf4(q),
                           "params")
        back = from_bnb(params)
        assert_bytes_equal(back.packed, q.packed, "packed")
        assert_bytes_equal(dequantize_nf4(back), dequantize_nf4(q), "from_bnb")
        pk, st2 = bnbF.quantize_4bit(W, quant_type="nf4", compress_statistics=dq)
        assert_bytes_equal(dequantize_nf4(from_bnb(pk, st2)), dequantize_nf4(q), "from quantize_4bit")


def test_nf4weight_basics():
    W = torch.randn(33, 70)
    q = quantize_nf4(W, double_quant=True)
    assert isinstance(q, NF4Weight) and not isinstance(q, torch.nn.Parameter)
    assert q.shape == (33, 70) and q.dtype == torch.float32 and q.device.type == "cpu"
    n = 33 * 70
    blocks = math.ceil(n / 64)
    assert q.nbytes == math.ceil(n / 2) + blocks + 4 * 1 + 4 * 16 + 4 * 256 + 4
    q2 = q.to("cpu")
    assert torch.equal(q2.packed, q.packed) and q2 is not q
    assert quantize_nf4(W).nbytes == math.ceil(n / 2) + 4 * blocks + 4 * 16
    with pytest.raises(TypeError, match="dtype"):
        q.to(torch.float16)


def test_errors():
    W = torch.randn(8, 64)
    for bs in (16, 100, 0, 48):
        with pytest.raises(ValueError, match="blocksize.*power of two >= 32"):
            quantize_nf4(W, blocksize=bs)
    with pytest.raises(TypeError, match="W: expected a float32"):
        quantize_nf4(torch.ones(8, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="W: expected a torch.Tensor"):
        quantize_nf4([[1.0]])
    q = quantize_nf4(W)
    with pytest.raises(ValueError, match="packed: a weight of shape \\(8, 64\\).*needs 256 bytes"):
        NF4Weight(q.packed[:-1], q.absmax, q.quant_map, 64, (8, 64), torch.float32)
    with pytest.raises(TypeError, match="packed: expected a uint8"):
        NF4Weight(q.packed.float(), q.absmax, q.quant_map, 64, (8, 64), torch.float32)
    with pytest.raises(ValueError, match="absmax: expected 8 values"):
        NF4Weight(q.packed, q.absmax[:-1], q.quant_map, 64, (8, 64), torch.float32)
    sd = nf4_state_dict(q, "layer.")
    sd["layer.weight"] = sd["layer.weight"][:-3]
    with pytest.raises(ValueError, match="packed"):
        nf4_from_state_dict(sd, "layer.")
    with pytest.raises(KeyError, match="bitsandbytes__nf4"):
        nf4_from_state_dict({"weight": q.packed}, "")


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 51), (129,), (70, 130)])
def test_triton_dequantize_kernel(shape, dtype, double_quant):
    """Both backends of nf4_dequantize against the float64 product of the test's own
    decoding (helpers.nf4_dequantize_ref64): exactly its one rounding, in W's dtype and
    in every other output dtype."""
    from helpers import nf4_dequantize_ref64

    from rankwise.kernels.nf4 import nf4_dequantize, nf4_dequantize_reference

    q = quantize_nf4(_weight(shape, dtype, seed=11), double_quant=double_quant)
    exact = nf4_dequantize_ref64(q)
    for out_dtype in (None, torch.float32, torch.float16, torch.bfloat16):
        want = exact.float().to(out_dtype or q.dtype)
        for backend in ("triton", "torch"):
            assert_bytes_equal(nf4_dequantize(q, out_dtype, backend=backend), want, f"{backend} {out_dtype}")
    assert_bytes_equal(dequantize_nf4(q), exact.float().to(q.dtype), "dequantize_nf4")
    assert_bytes_equal(nf4_dequantize_reference(q), exact.float().to(q.dtype), "nf4_dequantize_reference")
    assert_bytes_equal(nf4_dequantize(q), exact.float().to(q.dtype), "auto (torch on the CPU)")


def _nibbles(q):
    b = q.packed.reshape(-1)
    return torch.stack([b >> 4, b & 0xF], 1).reshape(-1)[: q.numel].long()


def test_nf4_linear_forward_and_device_moves():
    torch.manual_seed(1)
    lin = torch.nn.Linear(70, 45)
    m = NF4Linear.from_linear(lin, double_quant=True)
    x = torch.randn(3, 4, 70)
    ref = torch.nn.functional.linear(x, dequantize_nf4(m.weight), lin.bias)
    torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
    assert not any(p.requires_grad for p in m.parameters())
    m.to("cpu")
    assert m.weight.device.type == "cpu"
    m16 = NF4Linear.from_linear(lin, compute_dtype=torch.float16)
    assert m16(x).dtype == torch.float16
    assert "blocksize=64" in repr(m)


def _tiny_llama(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    return AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)


def test_quantize_model_nf4(tmp_path):
    model = _tiny_llama(tmp_path)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    info = quantize_model_nf4(model, double_quant=True)
    # 2 layers x (q, k, v, o, gate, up, down)
    assert info["n_quantized"] == 14
    assert all(n.startswith("model.layers.") for n in info["quantized"])
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, NF4Linear)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert isinstance(model.model.layers[1].mlp.down_proj, NF4Linear)
    assert info["bytes_after"] < info["bytes_before"] and info["bytes_after"] == model_bytes(model)
    lin_bytes = 2 * 4 * (4 * 64 * 64 // 2 + 3 * 64 * 128)  # fp32 linear weights (k/v are 64 -> 32)
    saved = info["bytes_before"] - info["bytes_after"]
    assert saved > 0.8 * lin_bytes, (saved, lin_bytes)
    with torch.no_grad():
        out = model(ids).logits
    # 4-bit weights: close, not equal (relative error of a few percent)
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.2, rel
    # the quantized model's state dict reloads into another quantized copy
    other = _tiny_llama(tmp_path)
    quantize_model_nf4(other, double_quant=True)
    torch.manual_seed(5)
    for m in other.modules():
        if isinstance(m, NF4Linear):
            m.weight = quantize_nf4(torch.randn(m.out_features, m.in_features), double_quant=True)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, out, rtol=0, atol=0)


@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 51), (129,), (70, 130)])
def test_triton_quantize_kernel_matches_bitsandbytes(bnbF, shape, dtype, blocksize):
    W = _weight(shape, dtype, seed=21)
    packed, st = bnbF.quantize_4bit(W, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(W, blocksize=blocksize, double_quant=True, backend="triton")
    assert_bytes_equal(q.packed, packed, "packed (triton)")
    assert_bytes_equal(q.absmax, st.absmax, "absmax codes (triton)")
    assert_bytes_equal(q.nested_absmax, st.state2.absmax, "nested_absmax (triton)")
    with pytest.raises(ValueError, match="backend"):
        quantize_nf4(W, backend="cuda")


def test_nf4_linear_load_state_dict_errors():
    m = NF4Linear.from_linear(torch.nn.Linear(64, 8))
    sd = m.state_dict()
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        m.load_state_dict({"bias": sd["bias"]})
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        m.load_state_dict({**sd, "extra": torch.zeros(1)})
    wrong = nf4_state_dict(quantize_nf4(torch.randn(8, 32)))
    with pytest.raises(RuntimeError, match="shape \\(8, 32\\) does not match \\(8, 64\\)"):
        m.load_state_dict({**wrong, "bias": sd["bias"]})
    m.load_state_dict({"bias": sd["bias"]}, strict=False)  # not strict: missing weight is reported, not raised


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_quantize_and_dequantize_match_cpu(double_quant):
    from rankwise.kernels.nf4 import nf4_dequantize

    W = _weight((1000, 4100), torch.bfloat16, seed=7)
    cpu = quantize_nf4(W, double_quant=double_quant, backend="torch")
    gpu = quantize_nf4(W.cuda(), double_quant=double_quant)  # Triton quantize kernel
    assert_bytes_equal(gpu.packed.cpu(), cpu.packed, "packed")
    if double_quant:  # the offset is a mean: its last bit may depend on the reduction order
        torch.testing.assert_close(gpu.absmax_fp32().cpu(), cpu.absmax_fp32(), rtol=1e-6, atol=1e-7)
    else:
        assert_bytes_equal(gpu.absmax.cpu(), cpu.absmax, "absmax")
    assert_bytes_equal(nf4_dequantize(gpu, backend="triton").cpu(), dequantize_nf4(gpu).cpu(),
                       "triton vs torch dequantize")
    assert_bytes_equal(nf4_dequantize(cpu.to("cuda"), backend="triton").cpu(), dequantize_nf4(cpu),
                       "cuda vs cpu dequantize")
