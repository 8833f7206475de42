"""``rankwise merge``: fold a trained LoRA adapter into its base model and save a plain model.

    rankwise merge runs/example --out runs/example/merged
    rankwise merge path/to/adapter --base meta-llama/Llama-3.2-1B --out merged --dtype bf16

The update ``scaling * B @ A`` is added to each adapted weight in fp32 and the
result is rounded once to the output dtype. The output directory holds a model
(``save_pretrained``) and the base model's tokenizer, loadable with
``AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import os

import torch

from .atomic import replace_dir
from .errors import ConfigError


def find_adapter(path: str) -> str:
    """``path`` itself if it is an adapter directory, else ``path/adapter`` (a run directory)."""
    from .adapter import CONFIG_NAME

    for cand in (path, os.path.join(path, "adapter")):
        if os.path.isfile(os.path.join(cand, CONFIG_NAME)):
            return cand
    raise ConfigError(f"no LoRA adapter in {path} (expected {CONFIG_NAME} there or in {path}/adapter)")


def merge(path: str, out_dir: str, base: str | None = None, dtype: str = "auto") -> str:
    """Merge the adapter at ``path`` (adapter or run directory) into its base model; save to ``out_dir``.

    ``base`` defaults to the adapter's ``base_model_name_or_path``. ``dtype``:
    ``auto`` keeps the base model's saved dtype, or one of ``bf16``, ``fp16``, ``fp32``.
    Returns ``out_dir``.
    """
    from transformers import AutoModelForCausalLM

    from .adapter import merge_adapter, read_adapter
    from .model import DTYPES, load_tokenizer

    adapter_dir = find_adapter(path)
    try:
        cfg, _ = read_adapter(adapter_dir)
    except (FileNotFoundError, ValueError) as e:  # a malformed adapter directory is bad input
        raise ConfigError(str(e)) from None
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter_dir}: adapter_config.json names no base model; pass --base")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except OSError as e:
        raise ConfigError(f"cannot load base model {base!r}: {e}") from None
    saved = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    target = DTYPES[dtype] if dtype != "auto" else (saved if isinstance(saved, torch.dtype) else torch.float32)
    try:
        merge_adapter(model, adapter_dir)  # in fp32
    except ValueError as e:  # the adapter does not fit this base model
        raise ConfigError(str(e)) from None
    model.to(target)
    tokenizer = load_tokenizer(base)

    def write(tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    replace_dir(out_dir, write)  # out_dir is the old directory or the new one, never half of one
    return out_dir


def add_arguments(parser) -> None:
    """Arguments of ``rankwise merge``."""
    parser.add_argument("path", help="a run directory (with adapter/) or a PEFT LoRA adapter directory")
    parser.add_argument("--out", required=True, help="output directory for the merged model")
    parser.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="dtype of the saved weights (auto: the base model's)")


def main(args) -> int:
    """Entry point of ``rankwise merge``."""
    out = merge(args.path, args.out, base=args.base, dtype=args.dtype)
    print(f"merged model written to {out}")
    return 0
