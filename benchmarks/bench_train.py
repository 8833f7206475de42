"""End-to-end LoRA training: rankwise vs transformers + PEFT (+ bitsandbytes for 4-bit).

    python -m benchmarks.bench_train [--out DIR] [--smoke] [--steps N]

A Llama-architecture model is built from a config with random weights (no hub:
about 1B parameters on a GPU, a tiny one on the CPU), saved, and loaded twice
through ``from_pretrained``:

- rankwise: ``inject_lora`` on every linear layer of the decoder (fused kernels),
  NF4 through ``rankwise.quant.quantize_model_nf4``;
- baseline: ``peft.get_peft_model`` with ``target_modules="all-linear"``, NF4
  through transformers' ``BitsAndBytesConfig`` (bitsandbytes' Linear4bit).

Both get the same LoRA weights (copied), the same batches, batch size, sequence
length, gradient-checkpointing setting and optimizer, and run in the same
minimal loop, so the difference measured is the layers and the quantization.
Reported: tokens/s, peak memory (GPU), the loss curves of both and their largest
difference. Modes: bf16 and nf4 on a GPU; fp32 and nf4 (fp32 compute) on the CPU.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time

import torch

from benchmarks.common import environment, sync, write_json

GPU_MODEL = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000)
CPU_MODEL = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512)
SMOKE_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, vocab_size=128)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_checkpoint(path, arch: dict, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **arch)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def load_rankwise(path, mode, dtype, device, r):
    from transformers import AutoModelForCausalLM

    import rankwise

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if mode == "nf4":
        from rankwise.quant import quantize_model_nf4

        quantize_model_nf4(model, compute_dtype=dtype)
    rankwise.inject_lora(model, TARGETS, r=r, alpha=2 * r)
    return model


def load_peft(path, mode, dtype, device, r):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kw = {}
    if mode == "nf4":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=dtype)
        kw["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    if mode != "nf4":
        model = model.to(device)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0))


@torch.no_grad()
def copy_lora(src, dst):
    """Give the PEFT model the rankwise model's LoRA weights (same init for both curves)."""
    import rankwise

    theirs = dict(dst.named_parameters())
    for name, layer in rankwise.lora_layers(src):
        for which in ("lora_A", "lora_B"):
            key = f"base_model.model.{name}.{which}.default.weight"
            theirs[key].copy_(getattr(layer, which).to(theirs[key].dtype))


def train_steps(model, batches, lr, grad_ckpt, device):
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=(device == "cuda"))
    losses, times, tokens = [], [], 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i, ids in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        tokens = ids.numel()
    steady = times[1:] if len(times) > 2 else times  # step 0 includes compilation / autotuning
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    return dict(losses=losses, step_s=sum(steady) / len(steady), tokens_per_s=tokens / (sum(steady) / len(steady)),
                peak_mem_mb=peak)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on both sides")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    arch = SMOKE_MODEL if args.smoke else (GPU_MODEL if cuda else CPU_MODEL)
    batch, seq = (2, 32) if args.smoke else ((4, 1024) if cuda else (4, 128))
    steps = args.steps or (3 if args.smoke else (20 if cuda else 8))
    r, lr = 16, 1e-3
    modes = [("bf16", torch.bfloat16), ("nf4", torch.bfloat16)] if cuda else [("fp32", torch.float32),
                                                                          ("nf4", torch.float32)]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, arch["vocab_size"], (batch, seq), generator=g).to(device) for _ in range(steps)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_checkpoint(tmp, arch, modes[0][1])
        for mode, dtype in modes:
            result = dict(mode=mode, dtype=str(dtype).split(".")[-1], batch=batch, seq=seq, steps=steps, r=r,
                          grad_ckpt=args.grad_ckpt, params=n_params)
            ours = load_rankwise(tmp, mode, dtype, device, r)
            try:
                theirs = load_peft(tmp, mode, dtype, device, r)
                copy_lora(ours, theirs)
            except Exception as e:  # e.g. bitsandbytes 4-bit without its native library
                theirs, result["baseline_error"] = None, f"{type(e).__name__}: {e}"
            result["rankwise"] = train_steps(ours, batches, lr, args.grad_ckpt, device)
            del ours
            gc.collect()
            if theirs is not None:
                try:
                    result["baseline"] = train_steps(theirs, batches, lr, args.grad_ckpt, device)
                except Exception as e:
                    result["baseline_error"] = f"{type(e).__name__}: {e}"
                del theirs
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            if "baseline" in result:
                a, b = result["rankwise"], result["baseline"]
                result["speedup"] = a["tokens_per_s"] / b["tokens_per_s"]
                result["max_loss_diff"] = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
                if a["peak_mem_mb"] and b["peak_mem_mb"]:
                    result["memory_ratio"] = a["peak_mem_mb"] / b["peak_mem_mb"]
            rows.append(result)
    summary = []
    for r_ in rows:
        base = "transformers+PEFT" + ("+bitsandbytes" if r_["mode"] == "nf4" else "")
        if "speedup" in r_:
            summary.append(dict(figure=f"{r_['mode']} tokens/s, rankwise over baseline", value=r_["speedup"],
                                unit="x", baseline=base))
            summary.append(dict(figure=f"{r_['mode']} max abs loss difference over {steps} steps",
                                value=r_["max_loss_diff"], unit="nats", baseline=base))
            if "memory_ratio" in r_:
                summary.append(dict(figure=f"{r_['mode']} peak memory, rankwise over baseline",
                                    value=r_["memory_ratio"], unit="x", baseline=base))
        else:
            summary.append(dict(figure=f"{r_['mode']} rankwise tokens/s", value=r_["rankwise"]["tokens_per_s"],
                                unit="tok/s", baseline=f"none: {r_.get('baseline_error', '?')[:120]}"))
    payload = dict(benchmark="bench_train", env=environment(), model=arch, rows=rows, summary=summary,
                   note="Both sides run the same minimal loop; the layers and the quantization differ.")
    path = write_json(payload, "bench_train", args.out)
    print(f"wrote {path}")
    for s in summary:
        print(f"  {s['figure']}: {s['value']:.4g} {s['unit']} (vs {s['baseline']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
