"""End-to-end LoRA training: rankwise vs transformers + PEFT (+ bitsandbytes for 4-bit).

    python -m benchmarks.bench_train [--out DIR] [--smoke] [--steps N] [--arms a,b,...]

A Llama-architecture model is built from a config with random weights (no hub:
on a GPU the shape of Llama-3.2-1B, 1.2B parameters with an untied head; a tiny
one on the CPU), saved, and loaded through ``from_pretrained`` by each arm.

Arms (each in its own process, so its peak memory is its own):

- ``rankwise-layers``: ``inject_lora`` on every linear layer of the decoder (the fused
  LoRA kernels), NF4 through ``rankwise.quant.quantize_model_nf4``; the loss from the
  model's logits, as the baseline computes it. Isolates the layers.
- ``rankwise``: the same plus the fused loss (``rankwise.loss.FusedLossLM``: output
  head + cross entropy in chunks, never the full logits), as ``rankwise train`` runs.
- ``rankwise+gc``: the same plus gradient checkpointing and the fused RMSNorm / SwiGLU
  kernels (``train.fused_kernels``): everything rankwise has, on.
- ``baseline``: ``peft.get_peft_model`` with every decoder linear layer as target, NF4
  through transformers' ``BitsAndBytesConfig`` (bitsandbytes' Linear4bit); HF's loss.
- ``baseline+gc``: the same with gradient checkpointing.

Every arm gets the same LoRA initialisation (A drawn from the module's name, B = 0),
the same batches, batch size, sequence length and optimizer, and runs the same
minimal loop. Reported per arm: tokens/s and peak memory over the steps after the
first (a warm-up: compilation, autotuning, lazily loaded libraries), the peak
counted from before the model was loaded, so it holds the model, optimizer
states, and what the worst moment of a step adds (CUDA: ``max_memory_allocated``;
CPU: the process's resident-set high-water mark, reset after the warm-up, which
also counts library pages, so CPU figures are coarse); and the loss curve. Per
mode: the ratios against the baseline with the same gradient-checkpointing
setting, the largest loss difference, and rankwise with its memory features
against the plain baseline (the issue-8 target). Modes: bf16 and nf4 on a GPU; fp32 and nf4 (fp32
compute) on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib

import torch

from benchmarks.common import environment, print_summary, sync, write_json

# Llama-3.2-1B's shape (its head is tied to the embeddings; here it is not).
GPU_MODEL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
# vocab / hidden = 32 as in 7B-class models, so the logits weigh what they weigh there
CPU_MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=8192)
SMOKE_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, vocab_size=256)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARMS = {
    "rankwise-layers": dict(side="rankwise", fused_loss=False, grad_ckpt=False, kernels=False),
    "rankwise": dict(side="rankwise", fused_loss=True, grad_ckpt=False, kernels=False),
    "rankwise+gc": dict(side="rankwise", fused_loss=True, grad_ckpt=True, kernels=True),
    "baseline": dict(side="baseline", fused_loss=False, grad_ckpt=False, kernels=False),
    "baseline+gc": dict(side="baseline", fused_loss=False, grad_ckpt=True, kernels=False),
}
SMOKE_ARMS = ["rankwise+gc", "baseline"]
MEMORY_FEATURES = ("fused LoRA layers (x and S saved per layer), fused linear + cross entropy, gradient checkpointing, "
                   "fused RMSNorm and SwiGLU (rms_norm saves x and one rstd per row; swiglu saves gate and up)")


def build_checkpoint(path, arch: dict, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **arch)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


# ---- memory of this process -------------------------------------------------------------------


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak(device):
    """Start a fresh peak: CUDA's allocator counter, or the kernel's RSS high-water mark."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def current_mb(device) -> float:
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else _status_kb("VmRSS") / 1024


def peak_mb(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _status_kb("VmHWM") / 1024


# ---- one arm (runs in a child process) ---------------------------------------------------------


def lora_init_(pairs, r):
    """The same LoRA start for every arm: A from a generator seeded by the module name, B = 0."""
    with torch.no_grad():
        for name, A, B in pairs:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            A.copy_((torch.rand(A.shape, generator=g) * 2 - 1) / A.shape[1] ** 0.5)
            B.zero_()


def load_rankwise(path, mode, dtype, device, r):
    from transformers import AutoModelForCausalLM

    import rankwise

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if mode == "nf4":
        from rankwise.quant import quantize_model_nf4

        quantize_model_nf4(model, compute_dtype=dtype)
    rankwise.inject_lora(model, TARGETS, r=r, alpha=2 * r)
    lora_init_([(n, m.lora_A, m.lora_B) for n, m in rankwise.lora_layers(model)], r)
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
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0))
    pairs = []
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            pairs.append((name.removeprefix("base_model.model."), m.lora_A["default"].weight,
                          m.lora_B["default"].weight))
    lora_init_(pairs, r)
    return model


def make_batches(vocab, batch, seq, steps, device):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(steps)]


def run_arm(spec: dict) -> dict:
    """Load, train ``spec['steps']`` steps, measure. Runs in a fresh process."""
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    arm = ARMS[spec["arm"]]
    batches = make_batches(spec["vocab"], spec["batch"], spec["seq"], spec["steps"], device)
    # every arm imports both sides' libraries first, so their code pages are not counted against one side
    # (a missing one fails only the arms that need it)
    import importlib

    for lib in ("transformers", "rankwise.loss", "rankwise.quant", "peft", "bitsandbytes"):
        try:
            importlib.import_module(lib)
        except Exception:
            pass
    mem_start = current_mb(device)
    load = load_rankwise if arm["side"] == "rankwise" else load_peft
    model = load(spec["path"], spec["mode"], dtype, device, spec["r"])
    if arm["grad_ckpt"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if arm["kernels"]:
        from rankwise.patch import patch_decoder_kernels

        patch_decoder_kernels(model)
    model.train()
    if arm["fused_loss"]:
        from rankwise.loss import FusedLossLM

        fused = FusedLossLM(model)

        def loss_of(ids):
            tgt = torch.full_like(ids, -100)
            tgt[:, :-1] = ids[:, 1:]  # the next token, as HF's labels=ids shift does
            return fused(ids, None, tgt) / (ids.shape[0] * (ids.shape[1] - 1))
    else:
        def loss_of(ids):
            return model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], fused=(device == "cuda"))
    sync()
    mem_loaded = current_mb(device)
    losses, times = [], []
    for i, ids in enumerate(batches):
        if i == 1:  # step 0 is the warm-up (compilation, autotuning, lazily loaded libraries): not measured
            reset_peak(device)
            mem_steady = current_mb(device)
        sync()
        t0 = time.perf_counter()
        loss = loss_of(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    steady = times[1:]
    step_s = sum(steady) / len(steady)
    peak = peak_mb(device)
    return dict(arm=spec["arm"], **arm, losses=losses, step_s=step_s,
                tokens_per_s=spec["batch"] * spec["seq"] / step_s,
                model_mem_mb=mem_loaded - mem_start,       # the loaded model (with its adapters)
                steady_mem_mb=mem_steady - mem_start,      # + optimizer states (+ libraries loaded by step 0 on CPU)
                peak_mem_mb=peak - mem_start,              # + activations, gradients, logits at the worst moment
                step_peak_mb=peak - mem_steady)            # what a step adds on top of the steady state


def spawn_arm(spec: dict, tmp: str) -> dict:
    """Run one arm in a child process; its row, or ``{"error": ...}``."""
    out = os.path.join(tmp, f"arm-{spec['mode']}-{spec['arm']}.json")
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--_arm", json.dumps(spec), "--_arm-out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    if proc.returncode != 0 or not os.path.exists(out):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(arm=spec["arm"], error=f"exit {proc.returncode}: " + " | ".join(tail)[-400:])
    with open(out) as f:
        return json.load(f)


# ---- the comparison ----------------------------------------------------------------------------


def compare(rows: dict, mode: str, steps: int) -> list:
    """Summary figures of one mode from its arms' rows (only what was measured)."""
    base_name = "transformers+PEFT" + ("+bitsandbytes" if mode == "nf4" else "")
    figs = []

    def ok(a):
        return a in rows and "error" not in rows[a]

    for ours, theirs, what in (("rankwise-layers", "baseline", "fused LoRA layers only"),
                               ("rankwise", "baseline", "fused layers + fused loss"),
                               ("rankwise+gc", "baseline+gc", "both with gradient checkpointing; fused norm/MLP"),
                               ("rankwise+gc", "baseline", "rankwise memory features vs plain baseline")):
        if not (ok(ours) and ok(theirs)):
            continue
        a, b = rows[ours], rows[theirs]
        label = f"{mode} {ours} vs {theirs} ({what})"
        figs.append(dict(figure=f"{label}: tokens/s", value=a["tokens_per_s"] / b["tokens_per_s"], unit="x",
                         baseline=base_name))
        figs.append(dict(figure=f"{label}: peak memory", value=a["peak_mem_mb"] / b["peak_mem_mb"], unit="x",
                         baseline=base_name))
        figs.append(dict(figure=f"{label}: max abs loss difference over {steps} steps",
                         value=max(abs(x - y) for x, y in zip(a["losses"], b["losses"])), unit="nats",
                         baseline=base_name))
    for name, row in rows.items():
        if "error" in row:
            figs.append(dict(figure=f"{mode} {name}: failed", value=float("nan"), unit="-",
                             baseline=row["error"][:160]))
        else:
            figs.append(dict(figure=f"{mode} {name}: tokens/s", value=row["tokens_per_s"], unit="tok/s",
                             baseline="-"))
            figs.append(dict(figure=f"{mode} {name}: peak memory", value=row["peak_mem_mb"], unit="MiB",
                             baseline="-"))
    return figs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--arms", default=None, help=f"comma-separated subset of {', '.join(ARMS)}")
    ap.add_argument("--_arm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_arm-out", dest="arm_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._arm:  # child process: one arm
        row = run_arm(json.loads(args._arm))
        with open(args.arm_out + ".tmp", "w") as f:
            json.dump(row, f)
        os.replace(args.arm_out + ".tmp", args.arm_out)
        return 0

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    arch = SMOKE_MODEL if args.smoke else (GPU_MODEL if cuda else CPU_MODEL)
    batch, seq = (2, 32) if args.smoke else ((4, 1024) if cuda else (4, 256))
    steps = args.steps or (3 if args.smoke else (20 if cuda else 8))
    if steps < 2:
        ap.error("--steps: at least 2 (the first step is a warm-up and is not measured)")
    arms = args.arms.split(",") if args.arms else (SMOKE_ARMS if args.smoke else list(ARMS))
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown {unknown}; expected names from {list(ARMS)}")
    r, lr = 16, 1e-3
    modes = [("bf16", "bfloat16"), ("nf4", "bfloat16")] if cuda else [("fp32", "float32"), ("nf4", "float32")]
    results, summary = [], []
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_checkpoint(tmp, arch, getattr(torch, modes[0][1]))
        for mode, dtype in modes:
            rows = {}
            for arm in arms:
                spec = dict(arm=arm, mode=mode, dtype=dtype, device=device, path=tmp, batch=batch, seq=seq,
                            steps=steps, r=r, lr=lr, vocab=arch["vocab_size"])
                rows[arm] = spawn_arm(spec, tmp)
                msg = rows[arm].get("error") or f"{rows[arm]['tokens_per_s']:.0f} tok/s, " \
                                                  f"{rows[arm]['peak_mem_mb']:.0f} MiB"
                print(f"  {mode} {arm}: {msg}", flush=True)
            results.append(dict(mode=mode, dtype=dtype, batch=batch, seq=seq, steps=steps, r=r, params=n_params,
                                arms=rows))
            summary += compare(rows, mode, steps)
    payload = dict(benchmark="bench_train", env=environment(), model=arch, rows=results, summary=summary,
                   memory_features=MEMORY_FEATURES,
                   peak_memory=("CUDA max_memory_allocated" if cuda else
                                "process RSS high-water mark minus RSS before the model was loaded"),
                   note="Every arm runs the same minimal loop in its own process; the layers, the loss and "
                        "the quantization differ.")
    path = write_json(payload, "bench_train", args.out)
    print_summary(summary, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
