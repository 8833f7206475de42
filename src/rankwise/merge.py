"""``rankwise merge``: fold a trained LoRA adapter into its base model and save a plain model.

    rankwise merge runs/example --out runs/example-merged
    rankwise merge path/to/adapter --base meta-llama/Llama-3.2-1B --out merged --dtype bf16

The update ``scaling * B @ A`` is added to each adapted weight in fp32 and the
result is rounded once to the output dtype. The output directory holds a model
(``save_pretrained``), the base model's tokenizer and rankwise's marker
(``.rankwise-run.json``, kind ``merge``), loadable with
``AutoModelForCausalLM.from_pretrained``.

Safety: ``--out`` may not be, lie inside, or contain the run, the adapter or
the base model (refused even with ``--force``); an existing non-empty ``--out``
is replaced only when rankwise made it (a merge output), otherwise only with
``--force``. Everything is checked before the base model is loaded, and the
output is written beside ``--out`` and swapped in whole.
"""
from __future__ import annotations

import os

import torch
from safetensors import SafetensorError

from .adapter import CONFIG_NAME, WEIGHTS_NAME, lora_pairs, merge_adapter
from .atomic import replace_dir
from .errors import ConfigError, one_line
from .model import DTYPES, causal_lm_from_pretrained, load_tokenizer
from .ownership import check_output, write_marker


def find_adapter(path: str) -> str:
    """``path`` itself if it is an adapter directory, else ``path/adapter`` (a run directory)."""
    for cand in (path, os.path.join(path, "adapter")):
        if os.path.isfile(os.path.join(cand, CONFIG_NAME)):
            return cand
    raise ConfigError(f"no LoRA adapter in {path} (expected {CONFIG_NAME} there or in {path}/adapter)")


def checked_lora_pairs(adapter_dir: str) -> tuple[dict, dict]:
    """:func:`rankwise.adapter.lora_pairs` with every problem of the files as a ``ConfigError`` naming the file.

    Bad or non-object JSON, missing keys or values of the wrong type or range
    (:func:`rankwise.adapter.check_adapter_config`), unreadable safetensors, tensors
    of another rank than ``r``, a ``lora_A`` without its ``lora_B``: one line each,
    nothing else read or written.
    """
    w_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    try:
        return lora_pairs(adapter_dir)  # checks the config, reads the weights, pairs every lora_A with its lora_B
    except SafetensorError as e:
        raise ConfigError(f"{w_path}: not a readable safetensors file ({one_line(e)})") from None
    except FileNotFoundError as e:  # the config or the weights are missing
        raise ConfigError(str(e)) from None


def merge(path: str, out_dir: str, base: str | None = None, dtype: str = "auto", force: bool = False) -> str:
    """Merge the adapter at ``path`` (adapter or run directory) into its base model; save to ``out_dir``.

    ``base`` defaults to the adapter's ``base_model_name_or_path``. ``dtype``:
    ``auto`` keeps the base model's saved dtype, or one of ``bf16``, ``fp16``, ``fp32``.
    ``force`` allows replacing an existing non-empty ``out_dir`` that rankwise did not make.
    Returns ``out_dir``.
    """
    adapter_dir = find_adapter(path)
    cfg, _ = checked_lora_pairs(adapter_dir)
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{adapter_dir}: adapter_config.json names no base model; pass --base")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    inputs = [("adapter", adapter_dir), ("base model", base)]
    if os.path.realpath(path) != os.path.realpath(adapter_dir):
        inputs.insert(0, ("run", path))
    check_output(out_dir, force=force, flag="--out", kinds=["merge"], inputs=inputs)
    tokenizer = load_tokenizer(base)  # small, and its files are checked before the model is loaded
    try:  # a local base model's config.json is checked first (check_model_files)
        model = causal_lm_from_pretrained(base, what="base model", dtype=torch.float32)
    except ValueError as e:  # a hub id transformers refuses (not a valid repo id, no such model offline)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot load base model {base!r}: {one_line(e)}") from None
    saved = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    target = DTYPES[dtype] if dtype != "auto" else (saved if isinstance(saved, torch.dtype) else torch.float32)
    try:
        merge_adapter(model, adapter_dir)  # in fp32
    except ValueError as e:  # the adapter does not fit this base model
        raise ConfigError(str(e)) from None
    model.to(target)

    def write(tmp):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_marker(tmp, "merge")

    replace_dir(out_dir, write)  # out_dir is the old directory or the new one, never half of one
    return out_dir


def add_arguments(parser) -> None:
    """Arguments of ``rankwise merge``."""
    parser.add_argument("path", help="a run directory (with adapter/) or a PEFT LoRA adapter directory")
    parser.add_argument("--out", required=True, help="output directory for the merged model (outside the run, "
                        "the adapter and the base model)")
    parser.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="dtype of the saved weights (auto: the base model's)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even if it is a non-empty directory rankwise did not make")


def main(args) -> int:
    """Entry point of ``rankwise merge``."""
    out = merge(args.path, args.out, base=args.base, dtype=args.dtype, force=args.force)
    print(f"merged model written to {out}")
    return 0
