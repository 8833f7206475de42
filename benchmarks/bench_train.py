"""End-to-end LoRA training: rankwise vs transformers + PEFT (+ bitsandbytes), vs Liger-Kernel, vs Unsloth.

    python -m benchmarks.bench_train [--out DIR] [--smoke] [--steps N] [--arms a,b,...] [--shapes 1x512,4x2048]

A Llama-architecture model is built from a config with random weights (no hub:
on a GPU the shape of Llama-3.2-1B, 1.2B parameters with an untied head; a tiny
one on the CPU), saved, and loaded through ``from_pretrained`` by each arm.
Shapes (batch x sequence): 1x512 and 4x2048 on a GPU, 4x256 on the CPU, 2x32 with ``--smoke``.

Arms (each in its own process, so its peak memory is its own):

- ``rankwise-layers``: ``inject_lora`` on every linear layer of the decoder (the fused
  LoRA kernels), NF4 through ``rankwise.quant.quantize_model_nf4``; the loss from the
  model's logits, as the baseline computes it. Isolates the layers.
- ``rankwise``: the same plus the fused loss (``rankwise.loss.FusedLossLM``: output
  head + cross entropy in chunks, never the full logits), as ``rankwise train`` runs it:
  the target positions given, the attention mask built on the device from the positions
  (``loss.packed_attention_mask``), so the step reads nothing back to the host.
- ``rankwise+graph``: ``rankwise`` with its step captured as one CUDA graph by
  ``rankwise.graphs.StepGraph`` (what ``train.cuda_graphs`` runs: fused capturable AdamW with
  a device learning rate, two eager warm-up steps, then one capture replayed); its measured
  steps start after the capture. CUDA only (skipped with the reason elsewhere).
- ``rankwise+gc``: the same plus gradient checkpointing and the fused RMSNorm / SwiGLU
  kernels (``train.fused_kernels``): everything rankwise has, on.
- ``baseline``: ``peft.get_peft_model`` with every decoder linear layer as target, NF4
  through transformers' ``BitsAndBytesConfig`` (bitsandbytes' Linear4bit); HF's loss.
- ``baseline+gc``: the same with gradient checkpointing.
- ``liger`` / ``liger+gc``: the baseline with Liger-Kernel patched in as its docs show for
  Llama, before the model is built: ``apply_liger_kernel_to_llama(rope=True, rms_norm=True,
  swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True)``.
- ``unsloth`` / ``unsloth+gc``: ``unsloth.FastLanguageModel.from_pretrained`` (4-bit through its
  ``load_in_4bit``) and ``FastLanguageModel.get_peft_model``; ``+gc`` is its own
  ``use_gradient_checkpointing="unsloth"``, the plain arm passes ``False``.

The peers (liger, unsloth) need CUDA and their package; where one cannot run (no CUDA,
not installed, its import fails, e.g. on an unsupported GPU) its row is
``{"skipped": "<reason>"}`` and the summary says so; an arm that starts and then fails is
``{"error": ...}``. Every arm has the same LoRA config: targets (all seven projections),
r = 16, alpha = 32, dropout 0, the model's dtype; the same LoRA initialisation (A drawn from
the module's name, B = 0), the same batches, batch size, sequence length and optimizer,
and runs the same minimal loop. What differs unavoidably: Liger replaces RoPE, RMSNorm,
the SwiGLU activation (the LoRA-wrapped projections stay PEFT's) and computes the loss
with its fused linear + cross entropy (never the full logits); Unsloth loads through its
own loader, which patches attention, MLP, norms, RoPE, the LoRA forward/backward and the
loss with its own kernels, quantizes 4-bit with its bitsandbytes defaults (NF4 with double
quantization; the baseline's ``BitsAndBytesConfig`` has none), checkpoints activations its
own way (offloaded to the CPU) where the others use HF's non-reentrant checkpointing, and
loads a tokenizer with the model (a word-level placeholder is saved next to the weights;
the batches are token ids). The adapters' storage dtype is each library's choice (per row:
``lora_dtype``).

Reported per arm: tokens/s and peak memory over the steps after the
first (a warm-up: compilation, autotuning, lazily loaded libraries), the peak
counted from before the model was loaded, so it holds the model, optimizer
states, and what the worst moment of a step adds (CUDA: ``max_memory_allocated``;
CPU: the process's resident-set high-water mark, reset after the warm-up, which
also counts library pages, so CPU figures are coarse); the loss curve; and on CUDA
the fraction of wall time the GPU is busy: a ``torch.profiler`` window (CUDA activity
only) over a few more steps after the measured ones, busy = the union of the CUDA kernel
intervals / the window's wall time (``null`` with the reason off CUDA; the profiler's own
cost makes it a slight underestimate). Per mode and shape: the ratios against the baseline
and the peers with the same gradient-checkpointing setting, the largest loss difference,
and rankwise with its memory features against the plain baseline (the issue-8 target).
Modes: bf16 and nf4 on a GPU; fp32 and nf4 (fp32 compute) on the CPU. The JSON is
rewritten after every mode and shape (``complete: false`` until the end), so a run cut
off by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib
from types import SimpleNamespace

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import environment, print_summary, sync, write_json

# transformers, tokenizers, peft, bitsandbytes and rankwise are imported inside the functions that use
# them, not here: an arm's child process imports them in the order ``preimport`` sets, and Unsloth must
# be imported before transformers and peft (it patches them on import). The peers (liger-kernel,
# unsloth) are optional dependencies, imported only in their own arms.

# Llama-3.2-1B's shape (its head is tied to the embeddings; here it is not).
GPU_MODEL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
# vocab / hidden = 32 as in 7B-class models, so the logits weigh what they weigh there
CPU_MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=8192)
SMOKE_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, vocab_size=256)
GPU_SHAPES, CPU_SHAPES, SMOKE_SHAPES = [(1, 512), (4, 2048)], [(4, 256)], [(2, 32)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARMS = {
    "rankwise-layers": dict(side="rankwise", fused_loss=False, grad_ckpt=False, kernels=False),
    "rankwise": dict(side="rankwise", fused_loss=True, grad_ckpt=False, kernels=False),
    "rankwise+graph": dict(side="rankwise", fused_loss=True, grad_ckpt=False, kernels=False, graph=True),
    "rankwise+gc": dict(side="rankwise", fused_loss=True, grad_ckpt=True, kernels=True),
    "baseline": dict(side="baseline", fused_loss=False, grad_ckpt=False, kernels=False),
    "baseline+gc": dict(side="baseline", fused_loss=False, grad_ckpt=True, kernels=False),
    "liger": dict(side="liger", fused_loss=False, grad_ckpt=False, kernels=False),
    "liger+gc": dict(side="liger", fused_loss=False, grad_ckpt=True, kernels=False),
    "unsloth": dict(side="unsloth", fused_loss=False, grad_ckpt=False, kernels=False),
    "unsloth+gc": dict(side="unsloth", fused_loss=False, grad_ckpt=True, kernels=False),
}
SMOKE_ARMS = ["rankwise+gc", "baseline", "liger", "unsloth"]
# the libraries users would pick instead; only their own arms import them
PEERS = {
    "liger": dict(module="liger_kernel", imports="liger_kernel.transformers", dist="liger-kernel",
                  needs="Liger-Kernel's kernels are Triton GPU kernels"),
    "unsloth": dict(module="unsloth", imports="unsloth", dist="unsloth",
                    needs="Unsloth's fast path is its CUDA kernels"),
}
SIDE_NAMES = {"baseline": "transformers+PEFT", "liger": "transformers+PEFT+Liger-Kernel", "unsloth": "Unsloth"}
COMMON_LIBS = ("transformers", "rankwise.loss", "rankwise.quant", "peft", "bitsandbytes")
PROFILE_STEPS = 3  # steps in the torch.profiler window of the GPU-busy fraction (after the measured ones)
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


def save_tokenizer(path, vocab_size: int):
    """A word-level placeholder tokenizer next to the weights: Unsloth's loader loads one with the
    model (the batches are token ids; nothing is tokenized). Ids 0-3: unk, bos, eos, pad."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), vocab_size)})
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>",
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.save_pretrained(path)


# ---- the peers: can they run here? -------------------------------------------------------------


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:limit]


def peer_skip_reason(side: str, cuda: bool):
    """Why a peer's arm cannot run here (one line), or None (also for rankwise and the baseline).
    Checked in the parent without importing the peer; an import that fails is caught in the child."""
    peer = PEERS.get(side)
    if peer is None:
        return None
    why = []
    if not cuda:
        why.append(f"no CUDA device ({peer['needs']})")
    if importlib.util.find_spec(peer["module"]) is None:
        why.append(f"{peer['dist']} not installed (carry its wheels: bash benchmarks/gpu_quick.sh --fetch-peers)")
    return "; ".join(why) or None


def peer_versions() -> dict:
    out = {}
    for dist in ("liger-kernel", "unsloth", "unsloth_zoo", "xformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


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


# ---- how busy the GPU is -----------------------------------------------------------------------


def union_length(intervals) -> float:
    """Total length covered by (start, end) intervals, overlaps counted once (kernels on several
    streams overlap)."""
    total, cur_start, cur_end = 0.0, None, None
    for a, b in sorted(intervals):
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def kernel_intervals(trace_path) -> list:
    """(start, end) in microseconds of every CUDA kernel in a torch.profiler Chrome trace."""
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    return [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
            if e.get("cat") == "kernel" and "ts" in e and "dur" in e]


def gpu_busy(step, n: int, device: str) -> dict:
    """Fraction of wall time the GPU runs kernels over ``n`` calls of ``step(i)``: a torch.profiler
    window (CUDA activity only, so the CPU side is not slowed by op recording), busy = union of the
    kernel intervals / wall time of the window (host clock, synchronized at both ends)."""
    if device != "cuda":
        return dict(gpu_busy_frac=None, gpu_busy_reason="no CUDA device: the profiler's kernel timeline needs one")
    if n < 1:
        return dict(gpu_busy_frac=None, gpu_busy_reason="--profile-steps 0: not measured")
    with tempfile.TemporaryDirectory() as d:
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for i in range(n):
                step(i)
            sync()
            wall = time.perf_counter() - t0
        trace = os.path.join(d, "trace.json")
        prof.export_chrome_trace(trace)
        spans = kernel_intervals(trace)
    busy_s = union_length(spans) / 1e6
    row = dict(gpu_busy_frac=busy_s / wall if spans else None, gpu_busy_ms=busy_s * 1e3, gpu_window_ms=wall * 1e3,
               gpu_window_steps=n, gpu_kernels=len(spans))
    if not spans:
        row["gpu_busy_reason"] = "the profiler recorded no CUDA kernels"
    return row


# ---- one arm (runs in a child process) ---------------------------------------------------------


def lora_init_(pairs, r):
    """The same LoRA start for every arm: A from a generator seeded by the module name, B = 0."""
    with torch.no_grad():
        for name, A, B in pairs:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            A.copy_((torch.rand(A.shape, generator=g) * 2 - 1) / A.shape[1] ** 0.5)
            B.zero_()


def peft_pairs(model) -> list:
    """(module name as in the plain model, A, B) of a PEFT-wrapped model's LoRA layers."""
    pairs = []
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
            pairs.append((name.removeprefix("base_model.model."), m.lora_A["default"].weight,
                          m.lora_B["default"].weight))
    return pairs


def load_rankwise(spec, dtype, arm):
    from transformers import AutoModelForCausalLM

    import rankwise

    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype).to(spec["device"])
    if spec["mode"] == "nf4":
        from rankwise.quant import quantize_model_nf4

        quantize_model_nf4(model, compute_dtype=dtype)
    rankwise.inject_lora(model, TARGETS, r=spec["r"], alpha=2 * spec["r"])
    lora_init_([(n, m.lora_A, m.lora_B) for n, m in rankwise.lora_layers(model)], spec["r"])
    return model


def load_peft(spec, dtype, arm):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kw, device, r = {}, spec["device"], spec["r"]
    if spec["mode"] == "nf4":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=dtype)
        kw["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype, **kw)
    if spec["mode"] != "nf4":
        model = model.to(device)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0))
    lora_init_(peft_pairs(model), r)
    return model


def load_liger(spec, dtype, arm):
    """The baseline with Liger-Kernel's Llama patches applied before the model is built, as Liger documents."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama  # optional dep: liger-kernel

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)
    return load_peft(spec, dtype, arm)


def load_unsloth(spec, dtype, arm):
    """Unsloth's own path: FastLanguageModel.from_pretrained (4-bit via load_in_4bit) + get_peft_model."""
    from unsloth import FastLanguageModel  # optional dep: unsloth (GPU only)

    gc = "unsloth" if arm["grad_ckpt"] else False
    kw = dict(load_in_4bit=spec["mode"] == "nf4")
    if spec["mode"] != "nf4" and "load_in_16bit" in inspect.signature(FastLanguageModel.from_pretrained).parameters:
        kw["load_in_16bit"] = True  # newer Unsloth: 16-bit LoRA must be asked for
    model, _ = FastLanguageModel.from_pretrained(model_name=spec["path"], max_seq_length=spec["seq"], dtype=dtype,
                                                 fix_tokenizer=False, use_gradient_checkpointing=gc, **kw)
    r = spec["r"]
    model = FastLanguageModel.get_peft_model(model, r=r, target_modules=TARGETS, lora_alpha=2 * r, lora_dropout=0.0,
                                             bias="none", use_gradient_checkpointing=gc, random_state=0)
    lora_init_(peft_pairs(model), r)
    return model


LOADERS = {"rankwise": load_rankwise, "baseline": load_peft, "liger": load_liger, "unsloth": load_unsloth}


def preimport(side: str):
    """Import the libraries every arm loads, so their code pages are not counted against one side
    (a missing one fails only the arms that need it). A peer's library only in its own arm (Unsloth
    first: it patches transformers when imported). Returns a skip reason if the peer's import fails."""
    peer = PEERS.get(side)
    first = [peer["imports"]] if side == "unsloth" else []
    last = [peer["imports"]] if side == "liger" else []
    for lib in first + list(COMMON_LIBS) + last:
        try:
            importlib.import_module(lib)
        except Exception as e:  # noqa: BLE001 (whatever a library raises when it cannot load here)
            if lib in first + last:
                return f"import {lib} failed: {one_line(e)}"
    return None


def make_batches(vocab, batch, seq, steps, device):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(steps)]


def make_loss(model, arm):
    if arm["fused_loss"]:
        from rankwise.loss import FusedLossLM

        fused = FusedLossLM(model, check_targets=False)

        def loss_of(ids):  # as rankwise train runs it: the mask built from positions, nothing read back
            tgt = torch.full_like(ids, -100)
            tgt[:, :-1] = ids[:, 1:]  # the next token, as HF's labels=ids shift does
            B, T = ids.shape
            pos = torch.arange(T, device=ids.device).expand(B, T)
            index = torch.arange(B * T, device=ids.device).view(B, T)[:, :-1].reshape(-1)  # every position but the last
            return fused(ids, pos, tgt, target_index=index) / (B * (T - 1))
    else:
        def loss_of(ids):
            return model(input_ids=ids, labels=ids).loss
    return loss_of


def graph_step(loss_of, opt, batches, spec) -> tuple:
    """``(step(i), first measured step)`` of the ``rankwise+graph`` arm: the same loss and AdamW, through
    ``rankwise.graphs.StepGraph`` (the learning rate a device tensor, eager warm-up steps, then the captured
    step replayed; the first step measured is the one after the capture)."""
    from rankwise.graphs import WARMUP_STEPS, StepGraph

    n = spec["batch"] * (spec["seq"] - 1)  # the targets of a batch: loss_of is their mean
    graph = StepGraph([SimpleNamespace(optimizer=opt)], lambda b, live: (loss_of(b["input_ids"]) * n).reshape(1),
                      lambda arms: (opt.step(), [])[1], None, torch.device(spec["device"]))

    def step(i):
        sums, _ = graph.step([0], [(0, {"input_ids": batches[i % len(batches)]})], [spec["lr"]], n)
        return sums[0] / n

    return step, WARMUP_STEPS + 1


def run_arm(spec: dict) -> dict:
    """Load, train ``spec['steps']`` steps, measure, profile a few more. Runs in a fresh process."""
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    arm = ARMS[spec["arm"]]
    batches = make_batches(spec["vocab"], spec["batch"], spec["seq"], spec["steps"], device)
    skipped = preimport(arm["side"])
    if arm.get("graph") and device != "cuda":
        skipped = "a CUDA graph needs CUDA"
    if skipped:
        return dict(arm=spec["arm"], **arm, skipped=skipped)
    mem_start = current_mb(device)
    model = LOADERS[arm["side"]](spec, dtype, arm)
    if arm["grad_ckpt"] and arm["side"] != "unsloth":  # Unsloth's is set by its loader
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if arm["kernels"]:
        from rankwise.decoder_kernels import patch_decoder_kernels

        patch_decoder_kernels(model)
    model.train()
    loss_of = make_loss(model, arm)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"], fused=(device == "cuda"))

    def step(i):
        loss = loss_of(batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    first = 1  # the first measured step
    if arm.get("graph"):
        step, first = graph_step(loss_of, opt, batches, spec)
    sync()
    mem_loaded = current_mb(device)
    losses, times = [], []
    for i in range(len(batches)):
        if i == first:  # the warm-up (compilation, autotuning, lazily loaded libraries, a capture): not measured
            reset_peak(device)
            mem_steady = current_mb(device)
        sync()
        t0 = time.perf_counter()
        loss = step(i)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    steady = times[first:]
    step_s = sum(steady) / len(steady)
    peak = peak_mb(device)  # before the profiler window, which is not part of the measured steps
    try:
        busy = gpu_busy(step, spec.get("profile_steps", PROFILE_STEPS), device)
    except Exception as e:  # noqa: BLE001 (a profiler that cannot start must not cost the measured row)
        busy = dict(gpu_busy_frac=None, gpu_busy_reason=f"profiler failed: {one_line(e)}")
    lora_dtype = next((str(p.dtype).removeprefix("torch.") for p in params), None)
    return dict(arm=spec["arm"], **arm, losses=losses, step_s=step_s,
                tokens_per_s=spec["batch"] * spec["seq"] / step_s, lora_dtype=lora_dtype,
                model_mem_mb=mem_loaded - mem_start,       # the loaded model (with its adapters)
                steady_mem_mb=mem_steady - mem_start,      # + optimizer states (+ libraries loaded by step 0 on CPU)
                peak_mem_mb=peak - mem_start,              # + activations, gradients, logits at the worst moment
                step_peak_mb=peak - mem_steady,            # what a step adds on top of the steady state
                **busy)


def child_env(tmp: str) -> dict:
    """The arms' environment: no network (the device has none; the checkpoint is local), and Unsloth's
    statistics call and compile cache kept off the network and out of the working tree."""
    env = dict(os.environ)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                 ("UNSLOTH_DISABLE_STATISTICS", "1"),
                 ("UNSLOTH_COMPILE_LOCATION", os.path.join(tmp, "unsloth_compiled_cache"))):
        env.setdefault(k, v)
    return env


def spawn_arm(spec: dict, tmp: str, timeout=None) -> dict:
    """Run one arm in a child process; its row, or ``{"error": ...}`` (``{"skipped": ...}`` from the child)."""
    out = os.path.join(tmp, f"arm-{spec['mode']}-{spec['batch']}x{spec['seq']}-{spec['arm']}.json")
    cmd = [sys.executable, "-m", "benchmarks.bench_train", "--_arm", json.dumps(spec), "--_arm-out", out]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(tmp), timeout=timeout,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return dict(arm=spec["arm"], error=f"timed out after {timeout} s")
    if proc.returncode != 0 or not os.path.exists(out):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return dict(arm=spec["arm"], error=f"exit {proc.returncode}: " + " | ".join(tail)[-400:])
    with open(out) as f:
        return json.load(f)


# ---- the comparison ----------------------------------------------------------------------------

PAIRS = (("rankwise-layers", "baseline", "fused LoRA layers only"),
         ("rankwise", "baseline", "fused layers + fused loss"),
         ("rankwise+graph", "baseline", "fused layers + fused loss, the step as one CUDA graph"),
         ("rankwise+graph", "rankwise", "the step as one CUDA graph vs launched op by op"),
         ("rankwise+gc", "baseline+gc", "both with gradient checkpointing; fused norm/MLP"),
         ("rankwise+gc", "baseline", "rankwise memory features vs plain baseline"),
         ("rankwise", "liger", "vs PEFT with Liger's RoPE, RMSNorm, SwiGLU, fused linear + cross entropy"),
         ("rankwise+graph", "liger", "the step as one CUDA graph vs Liger + PEFT"),
         ("rankwise+gc", "liger+gc", "vs Liger, both with gradient checkpointing"),
         ("rankwise", "unsloth", "vs Unsloth, no gradient checkpointing"),
         ("rankwise+gc", "unsloth+gc", "vs Unsloth with its own gradient checkpointing"))


def measured(row) -> bool:
    return row is not None and "error" not in row and "skipped" not in row


def arm_figures(label: str, name: str, row: dict) -> list:
    """One arm's own figures, or the line that says it failed or was skipped, and why."""
    if "skipped" in row:
        return [dict(figure=f"{label} {name}: skipped", value=float("nan"), unit="-", baseline=row["skipped"][:160])]
    if "error" in row:
        return [dict(figure=f"{label} {name}: failed", value=float("nan"), unit="-", baseline=row["error"][:160])]
    figs = [dict(figure=f"{label} {name}: tokens/s", value=row["tokens_per_s"], unit="tok/s", baseline="-"),
            dict(figure=f"{label} {name}: peak memory", value=row["peak_mem_mb"], unit="MiB", baseline="-")]
    if row.get("gpu_busy_frac") is not None:
        figs.append(dict(figure=f"{label} {name}: GPU busy fraction of wall time", value=row["gpu_busy_frac"],
                         unit="fraction", baseline=f"torch.profiler, {row['gpu_window_steps']} steps"))
    return figs


def compare(rows: dict, mode: str, steps: int, label=None) -> list:
    """Summary figures of one mode and shape from its arms' rows (only what was measured)."""
    label = label or mode
    quant = "+bitsandbytes" if mode == "nf4" else ""
    figs = []
    for ours, theirs, what in PAIRS:
        if not (measured(rows.get(ours)) and measured(rows.get(theirs))):
            continue
        a, b = rows[ours], rows[theirs]
        base_name = SIDE_NAMES[ARMS[theirs]["side"]] + quant
        head = f"{label} {ours} vs {theirs} ({what})"
        figs.append(dict(figure=f"{head}: tokens/s", value=a["tokens_per_s"] / b["tokens_per_s"], unit="x",
                         baseline=base_name))
        figs.append(dict(figure=f"{head}: peak memory", value=a["peak_mem_mb"] / b["peak_mem_mb"], unit="x",
                         baseline=base_name))
        figs.append(dict(figure=f"{head}: max abs loss difference over {steps} steps",
                         value=max(abs(x - y) for x, y in zip(a["losses"], b["losses"])), unit="nats",
                         baseline=base_name))
    for name, row in rows.items():
        figs += arm_figures(label, name, row)
    return figs


# ---- the run -----------------------------------------------------------------------------------


def parse_shapes(text: str) -> list:
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected BATCHxSEQ[,BATCHxSEQ...], e.g. 1x512,4x2048; got {text!r}")
    return shapes


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory of bench_train.json (default benchmarks/results/_scratch)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, 2x32 tokens, 3 steps (seconds on a CPU)")
    ap.add_argument("--steps", type=int, default=None, help="steps per arm, the first a warm-up (default 20 / 8 / 3)")
    ap.add_argument("--arms", default=None, help=f"comma-separated subset of {', '.join(ARMS)}")
    ap.add_argument("--shapes", type=parse_shapes, default=None,
                    help="BATCHxSEQ,... (default 1x512,4x2048 on a GPU, 4x256 on the CPU, 2x32 with --smoke)")
    ap.add_argument("--profile-steps", type=int, default=PROFILE_STEPS,
                    help="steps in each arm's profiler window for the GPU-busy fraction (CUDA only)")
    ap.add_argument("--arm-timeout", type=float, default=900, help="seconds before one arm is given up (0: none)")
    ap.add_argument("--_arm", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_arm-out", dest="arm_out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        ap.error("--steps: at least 2 (the first step is a warm-up and is not measured)")
    args.arms = args.arms.split(",") if args.arms else None
    unknown = [a for a in args.arms or [] if a not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown {unknown}; expected names from {list(ARMS)}")
    return args


def run_group(arms, skips, base_spec, tmp, timeout) -> dict:
    """Every arm of one mode and shape: the skipped ones recorded with their reason, the others spawned."""
    rows = {}
    for arm in arms:
        if skips[arm]:
            rows[arm] = dict(arm=arm, **ARMS[arm], skipped=skips[arm])
        else:
            rows[arm] = spawn_arm(dict(base_spec, arm=arm), tmp, timeout)
        row = rows[arm]
        msg = (f"skipped: {row['skipped']}" if "skipped" in row else row.get("error")
               or f"{row['tokens_per_s']:.0f} tok/s, {row['peak_mem_mb']:.0f} MiB"
               + (f", GPU busy {row['gpu_busy_frac']:.0%}" if row.get("gpu_busy_frac") is not None else ""))
        print(f"  {base_spec['mode']} {base_spec['batch']}x{base_spec['seq']} {arm}: {msg}", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._arm:  # child process: one arm
        row = run_arm(json.loads(args._arm))
        with open(args.arm_out + ".tmp", "w") as f:
            json.dump(row, f)
        os.replace(args.arm_out + ".tmp", args.arm_out)
        return 0

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    arch = SMOKE_MODEL if args.smoke else (GPU_MODEL if cuda else CPU_MODEL)
    shapes = args.shapes or (SMOKE_SHAPES if args.smoke else (GPU_SHAPES if cuda else CPU_SHAPES))
    steps = args.steps or (3 if args.smoke else (20 if cuda else 8))
    arms = args.arms or (SMOKE_ARMS if args.smoke else list(ARMS))
    skips = {a: peer_skip_reason(ARMS[a]["side"], cuda) for a in arms}
    r, lr = 16, 1e-3
    modes = [("bf16", "bfloat16"), ("nf4", "bfloat16")] if cuda else [("fp32", "float32"), ("nf4", "float32")]
    results, summary = [], []
    payload = dict(benchmark="bench_train", env=environment(), peers=peer_versions(), model=arch, complete=False,
                   rows=results, summary=summary, memory_features=MEMORY_FEATURES,
                   peak_memory=("CUDA max_memory_allocated" if cuda else
                                "process RSS high-water mark minus RSS before the model was loaded"),
                   gpu_busy=("union of CUDA kernel intervals / wall time of a torch.profiler window of "
                             f"{args.profile_steps} steps after the measured ones" if cuda else
                             "null: no CUDA device"),
                   note="Every arm runs the same minimal loop in its own process with the same LoRA config; "
                        "the layers, the loss, the quantization and the checkpointing differ (see the docstring).")
    with tempfile.TemporaryDirectory() as tmp:
        payload["params"] = build_checkpoint(tmp, arch, getattr(torch, modes[0][1]))
        if any(ARMS[a]["side"] == "unsloth" and not skips[a] for a in arms):
            save_tokenizer(tmp, arch["vocab_size"])
        for batch, seq in shapes:
            for mode, dtype in modes:
                spec = dict(mode=mode, dtype=dtype, device=device, path=tmp, batch=batch, seq=seq, steps=steps,
                            r=r, lr=lr, vocab=arch["vocab_size"], profile_steps=args.profile_steps)
                rows = run_group(arms, skips, spec, tmp, args.arm_timeout or None)
                results.append(dict(mode=mode, dtype=dtype, batch=batch, seq=seq, steps=steps, r=r,
                                    params=payload["params"], arms=rows))
                summary += compare(rows, mode, steps, label=f"{mode} {batch}x{seq}")
                write_json(payload, "bench_train", args.out)  # what is measured so far survives a cut-off
    payload["complete"] = True
    path = write_json(payload, "bench_train", args.out)
    print_summary(summary, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
