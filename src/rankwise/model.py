"""Loading Hugging Face causal LMs and tokenizers with rankwise's dtype / attention / NF4 choices."""
from __future__ import annotations

import json
import logging

import torch
from safetensors import SafetensorError

from .errors import ConfigError

log = logging.getLogger("rankwise")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` (the local rank's GPU under torchrun) if available, else ``cpu``.

    ``cuda`` / ``cuda:N`` on a machine without that GPU is a ``ConfigError`` (one line), not a failure later.
    """
    if device == "auto":
        if torch.cuda.is_available():
            import os

            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device {device}: no CUDA device is available on this machine; "
                              f"use train.device=cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on the CPU."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    return DTYPES[dtype]


def resolve_attention(attention: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """``auto`` -> ``flash_attention_2`` when flash_attn imports (on a GPU, with fp16/bf16 weights), else ``sdpa``."""
    if attention != "auto":
        return attention
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except Exception:
            pass
    return "sdpa"


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``model``."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _cuda_bytes(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained(path)`` with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, json.JSONDecodeError) as e:  # missing or unreadable files, a corrupt tokenizer.json
        raise ConfigError(f"cannot load tokenizer {path!r}: {_one_line(e)}") from None
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, *, dtype: str = "auto", attention: str = "auto", device="cpu",
               quantization: str = "none", double_quant: bool = False):
    """Load ``AutoModelForCausalLM`` from ``path`` onto ``device``.

    ``dtype`` is the dtype of the loaded weights (``auto``: bf16/fp16 on GPU,
    fp32 on CPU). ``quantization='nf4'`` hands the loaded model to
    ``rankwise.quant.quantize_model_nf4`` (its frozen linear weights become NF4)
    and logs the memory before and after.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    attn = resolve_attention(attention, device, torch_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn)
    except (OSError, SafetensorError) as e:  # missing, unreadable, truncated or corrupt files
        raise ConfigError(f"cannot load model {path!r}: {_one_line(e)}") from None
    model.to(device)
    if quantization == "nf4":
        from .quant import quantize_model_nf4

        before = module_bytes(model), _cuda_bytes(device)
        info = quantize_model_nf4(model, double_quant=double_quant)  # in place; returns byte counts
        after = module_bytes(model), _cuda_bytes(device)
        if isinstance(info, dict) and "bytes_after" in info:  # counts the NF4 storage too
            before, after = (info["bytes_before"], before[1]), (info["bytes_after"], after[1])
        log.info("nf4 quantization%s: weights %.2f MiB -> %.2f MiB%s", " (double quant)" if double_quant else "",
                 before[0] / 2**20, after[0] / 2**20,
                 f"; cuda allocated {before[1] / 2**20:.1f} MiB -> {after[1] / 2**20:.1f} MiB" if before[1] else "")
    elif quantization != "none":
        raise ConfigError(f"quantization must be 'none' or 'nf4', got {quantization!r}")
    return model


SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# safetensors header dtype codes -> torch dtypes
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def safetensors_files(path) -> dict:
    """``{tensor name: file}`` of a ``save_pretrained`` directory's safetensors weights.

    Follows ``model.safetensors.index.json`` for a sharded checkpoint, else reads
    the names of ``model.safetensors``. Raises ``FileNotFoundError`` when the
    directory holds neither (only safetensors checkpoints are read).
    """
    import json
    import os

    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    index = os.path.join(path, SAFETENSORS_INDEX)
    single = os.path.join(path, SAFETENSORS_SINGLE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = {}
        for name, rel in weight_map.items():
            full = os.path.join(path, rel)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{index} lists {rel}, which is missing")
            files[name] = full
        return files
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} in {path} "
                            "(only safetensors checkpoints are read; save with safe_serialization=True)")


class SafetensorsCheckpoint:
    """Read-only, lazy ``{name: tensor}`` view of a ``save_pretrained`` directory.

    Tensors are read one at a time through memory-mapped ``safe_open`` handles, so
    a caller that walks a large model holds one tensor at a time.

    Args:
        path: the directory (sharded or not, see :func:`safetensors_files`).
    """

    def __init__(self, path):
        from safetensors import safe_open

        self.path = str(path)
        self.files = safetensors_files(self.path)
        self._handles = {f: safe_open(f, framework="pt", device="cpu") for f in sorted(set(self.files.values()))}

    def keys(self) -> list:
        return list(self.files)

    def __contains__(self, name) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple:
        """The shape of tensor ``name``, read from the header only."""
        return tuple(self._handles[self.files[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The torch dtype of tensor ``name``, read from the header only."""
        code = self._handles[self.files[name]].get_slice(name).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has a dtype rankwise does not read ({code})")
        return SAFETENSORS_DTYPES[code]

    def meta(self) -> dict:
        """``{name: (shape, dtype)}`` of every tensor, from the headers (nothing is loaded)."""
        return {n: (self.shape(n), self.dtype(n)) for n in self.files}

    def nbytes(self, name: str) -> int:
        """Bytes tensor ``name`` takes, from the header."""
        n = 1
        for s in self.shape(name):
            n *= s
        return n * torch.empty((), dtype=self.dtype(name)).element_size()

    def get(self, name: str, device=None) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype, on the CPU or moved to ``device``."""
        if name not in self.files:
            raise KeyError(f"tensor {name!r} not found in {self.path!r}")
        t = self._handles[self.files[name]].get_tensor(name)
        return t if device is None else t.to(device)
