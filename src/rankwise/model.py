"""Loading Hugging Face causal LMs and tokenizers with rankwise's dtype / attention / NF4 choices."""
from __future__ import annotations

import logging
import os

import torch
from safetensors import SafetensorError, safe_open
from tokenizers import Tokenizer

from .errors import ConfigError, one_line, read_json_object, short
from .quant import quantize_model_nf4

log = logging.getLogger("rankwise")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` (the local rank's GPU under torchrun) if available, else ``cpu``.

    ``cuda`` / ``cuda:N`` on a machine without that GPU is a ``ConfigError`` (one line), not a failure later.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {short(device)}")
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
            import flash_attn  # noqa: F401  (optional: flash-attn, the gpu extra)

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


MODEL_CONFIG = "config.json"
# JSON files of a tokenizer that must each hold an object (tokenizer.json is checked by tokenizers)
TOKENIZER_JSON = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def check_config_json(cfg_path) -> dict:
    """The object in a model's ``config.json``, with its ``dtype`` / ``torch_dtype`` (read by both
    AutoModel and AutoTokenizer) naming a torch dtype; else a ``ConfigError`` naming the file."""
    raw = read_json_object(cfg_path)
    for key in ("dtype", "torch_dtype"):
        value = raw.get(key)
        if value is not None and not (isinstance(value, str) and (value == "auto" or
                                                                  isinstance(getattr(torch, value, None), torch.dtype))):
            raise ConfigError(f"{cfg_path}: {key} must name a torch dtype (e.g. \"bfloat16\"), got {short(value)}")
    return raw


def check_model_files(path) -> None:
    """Check a local model directory's ``config.json`` before transformers reads it (hub ids are left to it).

    It must exist, be a JSON object, name a ``model_type`` this transformers knows and
    loads with ``AutoModelForCausalLM``, and load as that type's config. Each problem is
    a ``ConfigError`` naming the file and what to do.
    """
    import transformers  # heavy at import: transformers loads with the first model, not with the CLI
    from transformers import CONFIG_MAPPING, AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = os.fspath(path)
    if not os.path.isdir(path):
        return
    cfg_path = os.path.join(path, MODEL_CONFIG)
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"{path} is not a model directory: it has no {MODEL_CONFIG} "
                          "(save the model with save_pretrained, or give a hub id)")
    model_type = check_config_json(cfg_path).get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"{cfg_path}: model_type must name the architecture (e.g. \"llama\"), "
                          f"got {short(model_type)}; the file is not a transformers model config")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{cfg_path}: model_type {short(model_type)} is unknown to transformers "
                          f"{transformers.__version__}; correct it, or upgrade transformers (pip install -U transformers)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{cfg_path}: model_type {model_type!r} is not a causal language model "
                          "(AutoModelForCausalLM does not load it); give a decoder model such as llama or qwen2")
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) + _strict_errors() as e:  # a value of the file the config class refuses
        raise ConfigError(f"{cfg_path}: {one_line(e, 200)}") from None


def _strict_errors() -> tuple:
    """The error huggingface_hub raises for a config value of the wrong type (absent before its 1.0)."""
    try:
        from huggingface_hub.errors import StrictDataclassError  # heavy at import (httpx); on an error only
    except ImportError:
        return ()
    return (StrictDataclassError,)


def check_tokenizer_files(path) -> None:
    """Check a local tokenizer directory before transformers reads it (hub ids are left to it).

    ``tokenizer.json`` (when there) must parse as a tokenizers file, and each of
    ``TOKENIZER_JSON`` there must hold a JSON object: valid JSON of another shape
    would fail inside transformers with a ``KeyError`` or ``AttributeError``. A
    ``config.json`` there (AutoTokenizer reads it too) passes :func:`check_config_json`.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return
    for name in TOKENIZER_JSON:
        if os.path.isfile(os.path.join(path, name)):
            read_json_object(os.path.join(path, name))
    if os.path.isfile(os.path.join(path, MODEL_CONFIG)):
        check_config_json(os.path.join(path, MODEL_CONFIG))
    tok_json = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tok_json):
        try:
            Tokenizer.from_file(tok_json)
        except Exception as e:  # tokenizers raises a bare Exception for any file it cannot parse; nothing else runs
            raise ConfigError(f"{tok_json} is not a tokenizer file the tokenizers library reads "
                              f"({one_line(e, 200)}); restore it from the model's source") from None


def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained(path)`` with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer  # heavy at import: transformers

    check_tokenizer_files(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # missing or unreadable files, a corrupt or unusable tokenizer
        raise ConfigError(f"cannot load tokenizer {path!r}: {one_line(e)}") from None
    except _strict_errors() as e:  # AutoTokenizer reads config.json too
        raise ConfigError(f"cannot load tokenizer {path!r}: {MODEL_CONFIG}: {one_line(e, 200)}") from None
    except (TypeError, AttributeError, KeyError) as e:
        if not os.path.isdir(os.fspath(path)):
            raise
        # only the directory's files reach this call: a value of the wrong type in them (a pad_token of 5)
        raise ConfigError(f"cannot load tokenizer {path!r}: a value in its tokenizer files has the wrong type "
                          f"({type(e).__name__}: {one_line(e, 200)})") from None
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def causal_lm_from_pretrained(path, what: str = "model", **kwargs):
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` after :func:`check_model_files`; files that
    cannot be read (missing, truncated, weights of other shapes than config.json gives) are a ``ConfigError``
    beginning ``cannot load {what} 'path'``."""
    from transformers import AutoModelForCausalLM  # heavy at import: transformers

    check_model_files(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, SafetensorError) as e:  # missing, unreadable, truncated or corrupt files
        raise ConfigError(f"cannot load {what} {path!r}: {one_line(e)}") from None
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):  # transformers' own refusal of a shape mismatch, nothing else
            raise
        raise ConfigError(f"cannot load {what} {path!r}: its weights do not have the shapes its {MODEL_CONFIG} "
                          "gives (the weights or the config are another model's)") from None


def load_model(path: str, *, dtype: str = "auto", attention: str = "auto", device="cpu",
               quantization: str = "none", double_quant: bool = False):
    """Load ``AutoModelForCausalLM`` from ``path`` onto ``device``.

    ``dtype`` is the dtype of the loaded weights (``auto``: bf16/fp16 on GPU,
    fp32 on CPU). ``quantization='nf4'`` hands the loaded model to
    ``rankwise.quant.quantize_model_nf4`` (its frozen linear weights become NF4)
    and logs the memory before and after.
    """
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    attn = resolve_attention(attention, device, torch_dtype)
    model = causal_lm_from_pretrained(path, dtype=torch_dtype, attn_implementation=attn)
    model.to(device)
    if quantization == "nf4":
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


def _index_files(path: str, index: str) -> dict:
    """``{tensor name: file}`` from a ``model.safetensors.index.json``, every entry checked."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConfigError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file, "
                          f"got {short(weight_map)}; the index is damaged (save the model again)")
    files = {}
    for name, rel in weight_map.items():
        if not isinstance(rel, str) or not rel:
            raise ConfigError(f"{index}: the shard of tensor {short(name)} must be a file name, got {short(rel)}")
        norm = os.path.normpath(rel)
        if os.path.isabs(rel) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
            raise ConfigError(f"{index}: the shard {short(rel)} of tensor {short(name)} lies outside {path}; "
                              "an index names files of its own directory only")
        full = os.path.join(path, norm)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{index} lists {rel}, which is missing")
        files[name] = full
    return files


def _safe_open(file):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:  # truncated, or not a safetensors file
        raise ConfigError(f"{file}: not a readable safetensors file ({one_line(e, 200)})") from None


def safetensors_files(path) -> dict:
    """``{tensor name: file}`` of a ``save_pretrained`` directory's safetensors weights.

    Follows ``model.safetensors.index.json`` for a sharded checkpoint (a damaged index,
    or one naming a file outside the directory, is a ``ConfigError``), else reads the
    names of ``model.safetensors``. Raises ``FileNotFoundError`` when the directory, a
    shard, or both weight files are missing (only safetensors checkpoints are read).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    index = os.path.join(path, SAFETENSORS_INDEX)
    single = os.path.join(path, SAFETENSORS_SINGLE)
    if os.path.isfile(index):
        return _index_files(path, index)
    if os.path.isfile(single):
        with _safe_open(single) as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} in {path} "
                            "(only safetensors checkpoints are read; save with safe_serialization=True)")


class SafetensorsCheckpoint:
    """Read-only, lazy ``{name: tensor}`` view of a ``save_pretrained`` directory.

    Tensors are read one at a time through memory-mapped ``safe_open`` handles, so
    a caller that walks a large model holds one tensor at a time. A file that is not
    readable safetensors, or an index naming a tensor its shard lacks, is a
    ``ConfigError`` when the view is made.

    Args:
        path: the directory (sharded or not, see :func:`safetensors_files`).
    """

    def __init__(self, path):
        self.path = str(path)
        self.files = safetensors_files(self.path)
        self._handles = {f: _safe_open(f) for f in sorted(set(self.files.values()))}
        held = {f: set(h.keys()) for f, h in self._handles.items()}
        for name, f in self.files.items():
            if name not in held[f]:
                raise ConfigError(f"{os.path.join(self.path, SAFETENSORS_INDEX)} puts tensor {short(name)} in "
                                  f"{os.path.basename(f)}, which does not hold it; the index is damaged")

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
            raise ConfigError(f"{self.path}: tensor {name} has a dtype rankwise does not read ({code})")
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
