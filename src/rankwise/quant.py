"""4-bit NormalFloat (NF4) base weights in bitsandbytes' exact format.

Format (identical, byte for byte, to ``bitsandbytes.functional.quantize_4bit(W,
blocksize, quant_type="nf4", compress_statistics=double_quant)`` as bitsandbytes
0.50 computes it on the CPU):

- W is flattened (row-major) and cut into blocks of ``blocksize`` values; the
  last block may be short. ``absmax[b] = max |W[block b]|`` (fp32).
- Each value is scaled, ``x = W * (1 / absmax)`` for full blocks (``W / absmax``
  in the short last block, as bitsandbytes does), clamped to [-1, 1], and mapped
  to the index of the nearest of the 16 NF4 code values: the number of code
  midpoints ``(c[i] + c[i+1]) / 2`` that are strictly below x (a tie goes to the
  lower code).
- Two 4-bit indices per byte, the first element in the high nibble; an odd
  numel is padded with one zero index. ``packed`` has shape (ceil(numel/2), 1).
- Double quantization (``compress_statistics``): ``offset = mean(absmax)``, and
  ``absmax - offset`` is quantized blockwise (blocks of 256) to 8 bits with the
  signed dynamic map: ``nested_absmax`` holds the fp32 per-256 scales, ``absmax``
  the uint8 codes. The 8-bit quantizer follows bitsandbytes' CPU kernel: the
  scaled value v in [-1, 1] goes to the uint16 bin ``trunc(((v + 1) * 0.5) *
  65535 + 0.5)`` of a 65536-entry table whose bin i holds the number of code
  midpoints below ``-1 + 2 i / 65535`` (all in fp32).

Dequantization: ``W = code[index] * absmax[block]`` in fp32, rounded once to the
original dtype; with double quantization ``absmax = map8[absmax_u8] *
nested_absmax[b // 256] + offset`` first (fp32).

bitsandbytes is used only as a reference in the tests and in the conversion
helpers (imported lazily there); quantizing and dequantizing here are plain
torch ops that run on any device.

``NF4Weight`` (the container), ``NF4_CODE`` and ``dequantize_nf4`` live with the
NF4 kernels in ``rankwise.kernels.nf4`` (the kernels need them, and must not
import this module); they are re-exported here under the same names.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Dict, Optional

import torch
from torch import nn

from rankwise.kernels.nf4 import (
    MIN_BLOCKSIZE,
    NESTED_BLOCKSIZE,
    NF4_CODE,
    WEIGHT_DTYPES,
    NF4Weight,
    dequantize_nf4,
    is_pow2,
    nf4_dequantize,
    nf4_quantize_packed,
)

__all__ = [
    "NF4_CODE",
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4",
    "to_bnb",
    "to_bnb_params",
    "from_bnb",
    "from_bnb_model",
    "nf4_state_dict",
    "nf4_from_state_dict",
    "NF4Linear",
    "quantize_model_nf4",
    "model_bytes",
]

_BNB_WEIGHT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_LUT_SIZE = 65536
_cache: Dict[tuple, torch.Tensor] = {}


def _nf4_code(device) -> torch.Tensor:
    key = ("nf4", str(device))
    if key not in _cache:
        _cache[key] = NF4_CODE.to(device)
    return _cache[key]


def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic quantization map (256 sorted fp32 values in
    [-0.993, 1]) that bitsandbytes uses for the nested absmax: for exponent e =
    0..6, 2**e fraction values linearly spaced between 0.1 and 1 (bin means),
    times 10**(e - 6), both signs; plus 0 and 1."""
    key = ("dynamic", "cpu")
    if key in _cache:
        return _cache[key].clone()
    values = []
    max_exp, non_sign = 7, 7
    for i in range(max_exp):
        n_frac = int(2 ** (i + non_sign - max_exp) + 1)
        edges = torch.linspace(0.1, 1, n_frac, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(max_exp - 1) + i)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    code = torch.tensor(values, dtype=torch.float32)
    _cache[key] = code
    return code.clone()


def _dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    """65536-entry table: bin i -> number of midpoints of ``code`` below
    ``-1 + 2 i / 65535`` (fp32), as bitsandbytes' CPU 8-bit quantizer builds it."""
    key = ("lut", tuple(code.cpu().tolist()))
    if key not in _cache:
        c = code.detach().float().cpu()
        mids = 0.5 * (c[:-1] + c[1:])
        i = torch.arange(_LUT_SIZE, dtype=torch.float32)
        val = -1.0 + (2.0 * i) / float(_LUT_SIZE - 1)
        _cache[key] = torch.searchsorted(mids, val, side="left").to(torch.uint8)
    return _cache[key]


def _quantize_blockwise_8bit(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    """8-bit blockwise quantization of a 1-D fp32 tensor, bitsandbytes-CPU exact.
    Returns (uint8 codes, fp32 absmax per block)."""
    A = A.reshape(-1).float()
    n = A.numel()
    blocks = -(-n // blocksize)
    pad = blocks * blocksize - n
    Ap = torch.nn.functional.pad(A, (0, pad)).view(blocks, blocksize)
    absmax = Ap.abs().amax(dim=1)
    inv = 1.0 / absmax
    v = (Ap * inv[:, None]).clamp(-1.0, 1.0)
    idx = ((v + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5
    idx = torch.nan_to_num(idx, nan=0.0).to(torch.int64).clamp_(0, _LUT_SIZE - 1)
    q = _dynamic_lut(code).to(A.device)[idx]
    q = torch.where((absmax == 0)[:, None], torch.zeros_like(q), q)
    return q.reshape(-1)[:n].contiguous(), absmax


def quantize_nf4(W: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 backend: str = "auto") -> NF4Weight:
    """Quantize ``W`` (any shape; fp32, fp16 or bf16) to NF4.

    Byte-identical to ``bitsandbytes.functional.quantize_4bit(W, blocksize=blocksize,
    quant_type="nf4", compress_statistics=double_quant)`` (bitsandbytes' CPU path).

    Args:
        W: the weight; any device (torch ops only).
        blocksize: values per absmax scale; a power of two >= 32 (bitsandbytes' default is 64).
        double_quant: also quantize the absmax scales to 8 bits (blocks of 256).
        backend: ``"triton"`` (``rankwise.kernels.nf4``'s quantize kernel; on the CPU only
            under ``TRITON_INTERPRET=1``), ``"torch"``, or ``"auto"`` (Triton for CUDA
            tensors, torch otherwise). Both give the same bytes.

    Returns:
        an ``NF4Weight`` holding the packed bytes and scales.
    """
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W: expected a torch.Tensor, got {type(W).__name__}")
    if W.dtype not in WEIGHT_DTYPES:
        raise TypeError(f"W: expected a float32, float16 or bfloat16 tensor, got {W.dtype}")
    if not is_pow2(blocksize) or blocksize < MIN_BLOCKSIZE:
        raise ValueError(f"blocksize: expected a power of two >= {MIN_BLOCKSIZE}, got {blocksize!r}")
    if W.numel() == 0:
        raise ValueError(f"W: cannot quantize an empty tensor (shape {tuple(W.shape)})")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    W = W.detach()
    device = W.device
    code = _nf4_code(device)
    if backend == "triton" or (backend == "auto" and W.is_cuda):
        packed, absmax = nf4_quantize_packed(W, blocksize, code)
        return _finish(packed, absmax, code, blocksize, W, double_quant)
    bounds = (code[:-1] + code[1:]) / 2
    A = W.reshape(-1).float()
    n = A.numel()
    rem = n % blocksize
    full = n - rem
    blocks = full // blocksize
    A_com = A[:full].reshape(blocks, blocksize)
    absmax = A_com.abs().max(dim=-1)[0]
    scaled = torch.clamp(A_com * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = A[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(A[full:] / am, -1, 1)])
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    idx = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    packed = ((idx[::2] << 4) | idx[1::2]).unsqueeze(1)
    return _finish(packed, absmax, code, blocksize, W, double_quant)


def _finish(packed, absmax, code, blocksize, W, double_quant) -> NF4Weight:
    device = W.device
    if not double_quant:
        return NF4Weight(packed, absmax, code.clone(), blocksize, W.shape, W.dtype)
    offset = absmax.mean()
    nmap = dynamic_map().to(device)
    qabs, nested = _quantize_blockwise_8bit(absmax - offset, nmap, NESTED_BLOCKSIZE)
    return NF4Weight(packed, qabs, code.clone(), blocksize, W.shape, W.dtype,
                     nested_absmax=nested, nested_quant_map=nmap, offset=offset)


# ----------------------------------------------------------------------------
# bitsandbytes conversions and state dicts
# ----------------------------------------------------------------------------


def to_bnb(q: NF4Weight):
    """``(packed, QuantState)`` as ``bitsandbytes.functional.quantize_4bit`` returns them."""
    from bitsandbytes.functional import QuantState  # heavy at import: bitsandbytes

    state2 = None
    offset = None
    if q.double_quant:
        state2 = QuantState(absmax=q.nested_absmax, code=q.nested_quant_map, blocksize=q.nested_blocksize,
                            dtype=torch.float32)
        offset = q.offset
    state = QuantState(absmax=q.absmax, shape=q.shape, dtype=q.dtype, blocksize=q.blocksize,
                       code=q.quant_map, quant_type="nf4", offset=offset, state2=state2)
    return q.packed, state


def to_bnb_params(q: NF4Weight, requires_grad: bool = False):
    """A ``bitsandbytes.nn.Params4bit`` holding the same bytes (already quantized)."""
    from bitsandbytes.nn import Params4bit  # heavy at import: bitsandbytes

    packed, state = to_bnb(q)
    return Params4bit(packed, requires_grad=requires_grad, quant_state=state, blocksize=q.blocksize,
                      compress_statistics=q.double_quant, quant_type="nf4", quant_storage=torch.uint8,
                      bnb_quantized=True)


def from_bnb(packed, quant_state=None, dtype: Optional[torch.dtype] = None) -> NF4Weight:
    """An ``NF4Weight`` over bitsandbytes' ``(packed, QuantState)`` or a ``Params4bit``.

    Zero-copy: the result holds bitsandbytes' own tensors (the packed bytes viewed as
    uint8, the absmax, the nested absmax and maps), never copies of them.

    Args:
        packed: the packed 4-bit weight (any ``quant_storage`` dtype), or a quantized
            ``bitsandbytes.nn.Params4bit`` (its ``quant_state`` is then used).
        quant_state: bitsandbytes' ``QuantState`` (nf4 only).
        dtype: the dtype the weight dequantizes to (default ``quant_state.dtype``).
            bitsandbytes' 4-bit matmul dequantizes straight to its compute dtype (one
            rounding of ``code * absmax``); pass that dtype to get its values.

    Raises:
        ValueError: no quant state, a quant type other than nf4, or a layout this
            format does not describe (bitsandbytes' CPU inference repacking, a
            blocksize that is not a power of two >= 32).
    """
    if quant_state is None:
        quant_state = getattr(packed, "quant_state", None)
        if quant_state is None:
            raise ValueError("quant_state: required unless packed is a quantized Params4bit")
    if quant_state.quant_type != "nf4":
        raise ValueError(f"quant_state: expected quant_type 'nf4', got {quant_state.quant_type!r}")
    if getattr(quant_state, "packing_format_for_cpu", False):
        raise ValueError("quant_state: the weight was repacked for bitsandbytes' CPU inference kernel "
                         "(packing_format_for_cpu); its bytes are not in the NF4 layout")
    data = packed.data if isinstance(packed, nn.Parameter) else packed
    data = data.detach()
    if data.dtype != torch.uint8:
        data = data.contiguous().view(torch.uint8)  # bitsandbytes' storage is contiguous: a view
    data = data.reshape(-1, 1)
    dtype = dtype or quant_state.dtype
    if quant_state.nested:
        s2 = quant_state.state2
        off = quant_state.offset
        off = off if isinstance(off, torch.Tensor) else torch.tensor(float(off))
        return NF4Weight(data, quant_state.absmax, quant_state.code, quant_state.blocksize, quant_state.shape,
                         dtype, nested_absmax=s2.absmax, nested_quant_map=s2.code,
                         offset=off.to(torch.float32), nested_blocksize=s2.blocksize)
    return NF4Weight(data, quant_state.absmax.float(), quant_state.code, quant_state.blocksize,
                     quant_state.shape, dtype)


def _pack_json(d: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _unpack_json(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.cpu().to(torch.uint8).numpy()).decode("utf-8"))


def nf4_state_dict(q: NF4Weight, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The state-dict entries bitsandbytes' ``Linear4bit`` writes for its weight:
    ``{prefix}weight``, ``weight.absmax``, ``weight.quant_map``, with double
    quantization ``weight.nested_absmax`` and ``weight.nested_quant_map``, and
    ``weight.quant_state.bitsandbytes__nf4`` (the non-tensor fields as JSON bytes)."""
    w = prefix + "weight"
    sd = {w: q.packed, w + ".absmax": q.absmax, w + ".quant_map": q.quant_map}
    meta = {"quant_type": "nf4", "blocksize": q.blocksize, "dtype": _DTYPE_NAMES[q.dtype],
            "shape": list(q.shape)}
    if q.double_quant:
        sd[w + ".nested_absmax"] = q.nested_absmax
        sd[w + ".nested_quant_map"] = q.nested_quant_map.clone()
        meta.update({"nested_blocksize": q.nested_blocksize, "nested_dtype": "float32",
                     "nested_offset": q.offset.item()})
    sd[w + ".quant_state.bitsandbytes__nf4"] = _pack_json(meta)
    return sd


def nf4_from_state_dict(sd: Dict[str, torch.Tensor], prefix: str = "", device=None) -> NF4Weight:
    """Read the bitsandbytes keys written by ``nf4_state_dict`` (or by bitsandbytes)."""
    w = prefix + "weight"
    key = w + ".quant_state.bitsandbytes__nf4"
    if key not in sd:
        others = [k for k in sd if k.startswith(w + ".quant_state.")]
        if others:
            raise ValueError(f"{others[0]}: only NF4 is supported (quant_type must be nf4)")
        raise KeyError(f"{key}: missing; not a bitsandbytes 4-bit state dict for prefix {prefix!r}")
    meta = _unpack_json(sd[key])
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"{key}: expected quant_type 'nf4', got {meta.get('quant_type')!r}")
    dtype = getattr(torch, meta["dtype"])

    def get(k):
        t = sd[k]
        return t if device is None else t.to(device)

    for k in (w, w + ".absmax", w + ".quant_map"):
        if k not in sd:
            raise KeyError(f"{k}: missing from the state dict")
    packed = get(w)
    if packed.dtype != torch.uint8:
        packed = packed.contiguous().view(torch.uint8)
    packed = packed.reshape(-1, 1)
    if w + ".nested_absmax" in sd:
        off = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)
        if device is not None:
            off = off.to(device)
        return NF4Weight(packed, get(w + ".absmax"), get(w + ".quant_map"), meta["blocksize"], meta["shape"], dtype,
                         nested_absmax=get(w + ".nested_absmax"), nested_quant_map=get(w + ".nested_quant_map"),
                         offset=off, nested_blocksize=meta.get("nested_blocksize", NESTED_BLOCKSIZE))
    return NF4Weight(packed, get(w + ".absmax"), get(w + ".quant_map"), meta["blocksize"], meta["shape"], dtype)


# ----------------------------------------------------------------------------
# Module and model integration
# ----------------------------------------------------------------------------


class NF4Linear(nn.Module):
    """A frozen linear layer with NF4 weights: ``y = x @ dequant(W).T + b``.

    ``weight`` is an ``NF4Weight`` (not a Parameter, never trained); ``bias``
    stays a (frozen) full-precision Parameter. ``compute_dtype`` is the dtype of
    the matmul (default: the weight's original dtype); inputs are cast to it and
    W dequantizes straight to it (``code * absmax`` in fp32, rounded once, as
    bitsandbytes' 4-bit matmul does). The output is returned in the compute
    dtype, or with ``cast_output`` in the input's dtype (bitsandbytes' ``Linear4bit``).
    The forward dequantizes then calls ``F.linear`` (LoRA layers on top go through
    the fused op instead, which never materialises W). ``state_dict`` uses
    bitsandbytes' keys, so checkpoints load in ``bitsandbytes.nn.Linear4bit`` and back.
    """

    def __init__(self, in_features: int, out_features: int, weight: NF4Weight,
                 bias: Optional[torch.Tensor] = None, compute_dtype: Optional[torch.dtype] = None,
                 cast_output: bool = False):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight: expected an NF4Weight, got {type(weight).__name__}")
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"weight: expected shape ({out_features}, {in_features}), got {tuple(weight.shape)}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = weight
        self.compute_dtype = compute_dtype
        self.cast_output = bool(cast_output)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False,
                    compute_dtype: Optional[torch.dtype] = None) -> "NF4Linear":
        """Quantize an ``nn.Linear`` (its weight dtype must be fp32/fp16/bf16)."""
        q = quantize_nf4(linear.weight.data, blocksize=blocksize, double_quant=double_quant)
        bias = linear.bias.data if linear.bias is not None else None
        if bias is not None and compute_dtype is not None:
            bias = bias.to(compute_dtype)
        return cls(linear.in_features, linear.out_features, q, bias, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or self.weight.dtype
        W = nf4_dequantize(self.weight, dtype, backend="torch")
        bias = None if self.bias is None else self.bias.to(dtype)
        y = torch.nn.functional.linear(x.to(dtype), W, bias)
        return y.to(x.dtype) if self.cast_output else y

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Move the NF4 storage with the module (device moves only; dtype casts keep the format).
        probe = fn(torch.empty(0, device=self.weight.device))
        if probe.device != self.weight.device:
            self.weight = self.weight.to(probe.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for k, v in nf4_state_dict(self.weight, prefix).items():
            destination[k] = v

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        w = prefix + "weight"
        known = {prefix + "bias", w} | {w + "." + k for k in _BNB_WEIGHT_KEYS}
        if w + ".quant_state.bitsandbytes__nf4" not in state_dict:
            missing_keys.append(w)
        else:
            try:
                q = nf4_from_state_dict(state_dict, prefix, device=self.weight.device)
                if tuple(q.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"{w}: shape {tuple(q.shape)} does not match "
                                     f"({self.out_features}, {self.in_features})")
                self.weight = q
            except (KeyError, ValueError, TypeError) as e:
                error_msgs.append(f"{w}: {e}")
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.weight.blocksize}, double_quant={self.weight.double_quant}, "
                f"compute_dtype={self.compute_dtype or self.weight.dtype}"
                + (", cast_output=True" if self.cast_output else ""))


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters, buffers and NF4 weights."""
    total = 0
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, NF4Linear):
            total += m.weight.nbytes
    return total


def quantize_model_nf4(model: nn.Module, double_quant: bool = False, compute_dtype: Optional[torch.dtype] = None,
                       include: str = r"layers\.", exclude: Optional[str] = r"lm_head|embed",
                       blocksize: int = 64) -> dict:
    """Replace every ``nn.Linear`` whose qualified name matches ``include`` (and not
    ``exclude``) by an ``NF4Linear``, in place. With the defaults that is every
    linear in the decoder layers; ``lm_head`` and the embeddings stay.

    Returns ``{"bytes_before", "bytes_after", "n_quantized", "quantized": [names]}``
    (parameters + buffers + NF4 storage). The model itself is modified in place.
    """
    inc = re.compile(include) if include else None
    exc = re.compile(exclude) if exclude else None
    before = model_bytes(model)
    targets = []
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and (inc is None or inc.search(name)) and not (exc and exc.search(name)):
            targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child)
        cd = compute_dtype or lin.weight.dtype
        setattr(parent, child, NF4Linear.from_linear(lin, blocksize=blocksize, double_quant=double_quant,
                                                     compute_dtype=cd))
        del lin
    after = model_bytes(model)
    return {"bytes_before": before, "bytes_after": after, "n_quantized": len(targets), "quantized": targets}


def bnb_linear4bit_class():
    """bitsandbytes' ``Linear4bit`` if bitsandbytes is imported, else None (no such layer exists before it is)."""
    bnb = sys.modules.get("bitsandbytes")
    return getattr(getattr(bnb, "nn", None), "Linear4bit", None)


def from_bnb_model(model: nn.Module) -> int:
    """Replace a bitsandbytes-4-bit model's NF4 ``bitsandbytes.nn.Linear4bit`` layers by
    ``NF4Linear``, in place and zero-copy, as ``from_pretrained(...,
    quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))``
    makes them (also the base layers inside PEFT's LoRA layers).

    Each ``NF4Linear`` holds the very tensors bitsandbytes held (packed bytes, absmax,
    nested absmax, maps: ``from_bnb``) and the same bias Parameter (frozen), keeps the
    layer's compute dtype and returns the input's dtype, so the model's forward is
    the bitsandbytes model's. Layers that are not NF4 (fp4), not quantized yet, or
    repacked by bitsandbytes for its CPU inference kernel are left as they are.

    Returns:
        the number of layers converted.
    """
    linear4bit = bnb_linear4bit_class()
    if linear4bit is None:
        return 0
    targets = []
    for name, mod in model.named_modules():
        if isinstance(mod, linear4bit) and name:
            try:
                q = from_bnb(mod.weight)
            except (ValueError, TypeError, AttributeError):  # fp4, not quantized, repacked, ...
                continue
            targets.append((name, mod, q))
    for name, mod, q in targets:
        compute = mod.compute_dtype if getattr(mod, "compute_type_is_set", True) else None
        new = NF4Linear(mod.in_features, mod.out_features, q, None, compute, cast_output=True)
        if mod.bias is not None:
            new.bias = mod.bias  # the same Parameter, not a copy
            new.bias.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return len(targets)
