"""One training step of K LoRA arms stacked (``rankwise.together``) against the K solo steps, on a model shape.

    python -m benchmarks.bench_sweep_step [--out DIR] [--smoke] [--shape 1b|tiny] [--micro 1x512,4x2048]
                                          [--ranks 1,8,32,128] [--steps 10]

``bench_sweep`` times whole sweeps (model loads, data, saving) on a small model;
this script isolates the part the one-pass sweep changes, on the model shape the
issue names (a 1B-class Llama: Llama-3.2-1B's hidden 2048, 16 layers, 32 heads,
8 KV heads, MLP 8192, vocabulary 128256; random weights, no hub): per micro-batch
``B x T`` and rank set, the time of one optimizer step of

- **together**: one model with ``inject_multi_lora`` (K arms), the batch stacked
  ``(K*B, T)``, each arm's loss its own mean over its rows (fused head + loss,
  ``linear_cross_entropy``), one backward, ``clip_arms``, K fused AdamW steps;
- **sequential**: for each rank, one model with ``inject_lora`` (that rank), the
  ``(B, T)`` batch, the same loss, backward, ``clip_grad_norm_``, its AdamW step;
  the sum over the K ranks.

Both sides: bf16 base weights, fp32 adapters, bf16 autocast, LoRA on
q/k/v/o/gate/up/down, the same kernels (``backend='auto'``). Each figure is the
median of ``--steps`` timed steps after 3 warm-up steps (CUDA events where there
is a GPU), with the peak allocated memory. A side that runs out of memory is
recorded as such with the limit (the 4x2048 stack of 8 arms holds 64k tokens of
activations). The ratio reported is sequential / together (above 1: the stacked
step is faster; the issue's target is 1.5x at 1x512 on a GPU).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.common import environment, write_json

SHAPES = {
    # Llama-3.2-1B
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(shape: str, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    return model


def loss_per_arm(model, ids, n_arms: int):
    """Each arm's mean next-token loss over its own ``ids.shape[0] // n_arms`` rows, through the fused head."""
    from rankwise.kernels import linear_cross_entropy

    out = model.model(input_ids=ids, use_cache=False)
    hidden = out.last_hidden_state[:, :-1]
    targets = ids[:, 1:]
    rows = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, targets.reshape(-1),
                                reduction="none")
    return rows.view(n_arms, -1).float().mean(1)


class Timer:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn, steps: int, warmup: int = 3) -> list:
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(steps):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out.append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
        return out


def _adamw(params, cuda):
    return torch.optim.AdamW(params, lr=1e-4, fused=cuda)


def together_step_fn(model, ranks, ids, cuda, autocast):
    from rankwise.arm_layers import arm_parameters, inject_multi_lora
    from rankwise.fit import clip_arms, step_arms

    inject_multi_lora(model, TARGETS, ranks, [2.0 * r for r in ranks], seed=0)
    arm_params = [[p for _, p in arm_parameters(model, k)] for k in range(len(ranks))]
    opts = [_adamw(ps, cuda) for ps in arm_params]
    stacked = ids.repeat(len(ranks), 1)

    def step():
        with autocast():
            losses = loss_per_arm(model, stacked, len(ranks))
        losses.sum().backward()
        clip_arms(arm_params, [1.0] * len(ranks))
        step_arms(opts)
        for o in opts:
            o.zero_grad(set_to_none=True)
    return step


def solo_step_fn(model, r, ids, cuda, autocast):
    from rankwise.lora import inject_lora

    inject_lora(model, TARGETS, r, 2.0 * r)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _adamw(params, cuda)

    def step():
        with autocast():
            loss = loss_per_arm(model, ids, 1)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(make, cuda, steps):
    """(step times, peak MB) of the step ``make()`` builds, or ``{"error": ...}`` on out-of-memory."""
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        fn = make()
        times = Timer(cuda)(fn, steps)
    except torch.cuda.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e).splitlines()[0][:160]}"}
    finally:
        fn = None
    peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
    return {"step_s": statistics.median(times), "samples": times, "peak_mem_mb": peak}


def strip(model):
    """Undo ``inject_lora`` / ``inject_multi_lora``: put every base linear back (the base weights are shared)."""
    from rankwise.arm_layers import multi_lora_layers
    from rankwise.lora import lora_layers

    for name, m in list(lora_layers(model)) + list(multi_lora_layers(model)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base)
    for attr in ("rankwise_lora",):
        if hasattr(model, attr):
            delattr(model, attr)
    model.requires_grad_(False)


def run(shape: str, micros, rank_sets, steps: int) -> tuple:
    """``(runs, summary)``: for each micro-batch ``(B, T)`` and rank set, the stacked step and the solo
    steps of ``shape`` (rows as in the JSON), and the summary figures."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    model = build_base(shape, device, dtype)
    vocab = model.config.vocab_size
    runs = []
    for B, T in micros:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (B, T), generator=g).to(device)
        for ranks in rank_sets:
            row = {"micro": f"{B}x{T}", "ranks": ranks, "K": len(ranks)}
            tog = measure(lambda: together_step_fn(model, ranks, ids, cuda, autocast), cuda, steps)
            strip(model)
            solos = {}
            for r in ranks:
                solos[r] = measure(lambda: solo_step_fn(model, r, ids, cuda, autocast), cuda, steps)
                strip(model)
            row["together"], row["solo"] = tog, solos
            if "error" not in tog and all("error" not in s for s in solos.values()):
                seq = sum(s["step_s"] for s in solos.values())
                row["sequential_step_s"] = seq
                row["speedup"] = seq / tog["step_s"]
                if cuda:
                    row["peak_mem_ratio_vs_largest_solo"] = tog["peak_mem_mb"] / max(
                        s["peak_mem_mb"] for s in solos.values())
            runs.append(row)
            msg = (f"{B}x{T} K={len(ranks)}: together {tog.get('step_s', float('nan')) * 1e3:.1f} ms, sequential "
                   f"{row.get('sequential_step_s', float('nan')) * 1e3:.1f} ms, speedup {row.get('speedup', float('nan')):.2f}x"
                   + (f" ({tog['error']})" if "error" in tog else ""))
            print(msg, flush=True)
    del model
    summary = []
    for r in runs:
        label = f"{r['micro']}, {r['K']} ranks {r['ranks']}"
        if "speedup" in r:
            summary.append(dict(figure=f"stacked step of {label}: sequential steps' time over the stacked step's",
                                value=r["speedup"], unit="x", baseline="K solo steps, one after the other"))
            summary.append(dict(figure=f"stacked step of {label}", value=r["together"]["step_s"] * 1e3, unit="ms",
                                baseline="-"))
        # a side that ran out of memory has no figure; its error is in ``runs``
    return runs, summary


def defaults(cuda: bool, smoke: bool) -> dict:
    """The shape, micro-batches, rank sets and steps of a run on this machine."""
    big = cuda and not smoke
    return dict(shape="1b" if big else "tiny", micros=[(1, 512), (4, 2048)] if big else [(1, 32)],
                rank_sets=[[1, 8, 32, 128], [1, 2, 4, 8, 16, 32, 64, 128]] if not smoke else [[1, 4]],
                steps=10 if not smoke else 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--micro", default=None, help="comma-separated BxT micro-batches (default 1x512,4x2048)")
    ap.add_argument("--ranks", default=None, help="';'-separated rank sets (default 1,8,32,128;1,2,4,8,16,32,64,128)")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    d = defaults(cuda, args.smoke)
    shape = args.shape or d["shape"]
    micros = [tuple(int(v) for v in m.split("x")) for m in args.micro.split(",")] if args.micro else d["micros"]
    rank_sets = [[int(r) for r in s.split(",")] for s in args.ranks.split(";")] if args.ranks else d["rank_sets"]
    steps = args.steps or d["steps"]
    if not cuda:
        torch.set_num_threads(1)
    runs, summary = run(shape, micros, rank_sets, steps)
    payload = dict(benchmark="bench_sweep_step", env=environment(), shape=shape, model=SHAPES[shape], steps=steps,
                   targets=TARGETS, dtype="bfloat16" if cuda else "float32", runs=runs, summary=summary)
    path = write_json(payload, "bench_sweep_step", args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
