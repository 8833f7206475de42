"""Train one run: LoRA, full SFT or masked SFT of a Hugging Face causal LM.

    rankwise train CONFIG.yaml [--set key=value ...] [--resume]
    torchrun --nproc_per_node N -m rankwise.cli train CONFIG.yaml   # DDP, same config

    from rankwise.train import train
    summary = train("examples/lora.yaml", overrides={"lora.r": 8})

The file reads top to bottom: setup, data, model, optimizer, the LR schedule
(a plain function), evaluation, checkpoints, then the loop written out in full
inside ``train``. Config keys are documented in ``rankwise.config.SCHEMA`` and
``examples/lora.yaml``.

Outputs in ``output_dir``: ``config.yaml`` (resolved), ``metrics.jsonl`` (one
JSON object per logging step: step, loss, lr, tokens_per_s, grad_norm, and on CUDA
peak_mem_mb, the peak allocated since the previous row; eval rows
carry eval_loss / eval_accuracy / eval_ood_*), ``checkpoint.pt`` (the latest, for
``--resume``; removed when the run finishes), ``adapter/`` (PEFT format, LoRA) or
``model/`` (``save_pretrained``, full and masked SFT; masked SFT adds
``mask.safetensors``), and ``summary.json`` (final metrics; its presence marks
the run as finished). With ``lora.init: pissa`` the adapter is saved as a
rank-2r update of the original base weights (see ``adapter.pissa_to_lora``).

Departures from the studies' protocol worth knowing: the loss is the mean over
completion tokens of each optimizer step (not per example); masked SFT chooses
among decoder-layer weights except norms, as the knowledge study's restoration.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time

import torch

from . import config as C
from .atomic import atomic_write

log = logging.getLogger("rankwise")

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------- LR schedule

def lr_at(step: int, total_steps: int, base_lr: float, warmup: float = 0.0, schedule: str = "cosine",
          min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup from ``base_lr / warmup_steps`` to ``base_lr`` over
    ``warmup_steps`` (``warmup`` is a fraction of ``total_steps`` when < 1, else a
    step count), then ``cosine`` / ``linear`` decay to ``min_lr_ratio * base_lr``
    at the last step, or ``constant``.
    """
    warmup_steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = base_lr * min_lr_ratio
    if schedule == "linear":
        return floor + (base_lr - floor) * (1.0 - progress)
    if schedule == "cosine":
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"train.schedule must be cosine, linear or constant, got {schedule!r}")


# ----------------------------------------------------------------------------- helpers

def mask_candidates(model) -> dict:
    """Parameters masked SFT may change: those of the decoder layers except norms (as in the knowledge study)."""
    return {n: p for n, p in model.named_parameters() if ".layers." in f".{n}" and "norm" not in n}


def _rng_state(device) -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)




def _save_pretrained_atomic(model, tokenizer, path) -> None:
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def _write_json(path, obj) -> None:
    C.atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _read_metrics(path, upto_step):
    """metrics.jsonl rows with step <= upto_step (what a resumed run keeps)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("step", 0) <= upto_step]


# ----------------------------------------------------------------------------- the run

def train(config, overrides=None, resume: bool = False) -> dict:
    """Run one training job; returns the summary dict (also written to ``output_dir/summary.json``).

    Args:
        config: a config dict or a YAML path (keys: ``rankwise.config.SCHEMA``).
        overrides: ``{"lora.r": 8}`` or ``["lora.r=8"]`` applied on top of ``config``.
        resume: continue from ``output_dir/checkpoint.pt`` (a finished run is returned as is).

    The summary holds at least ``output_dir``, ``status``, ``steps``, ``train_loss``
    (mean over the last logging window), ``trainable_params``, and the final eval
    metrics (``eval_loss``, ``eval_accuracy``, ``eval_ood_loss``, ``eval_ood_accuracy``
    when the data exists).
    """
    from .data import collate, eval_batches, load_rows, plan_epoch, qa_items, tokenize_rows
    from .evaluate import batch_loss_sum, eval_loss, generate_answers, is_correct
    from .model import load_model, load_tokenizer, resolve_device

    cfg = C.resolve(config, overrides)
    tcfg, dcfg, ecfg = cfg["train"], cfg["data"], cfg["eval"]
    method = cfg["method"]
    out_dir = cfg["output_dir"]
    t_start = time.time()

    # ---- setup: processes, device, seeds, output directory ---------------------------------
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    ddp = world > 1
    own_group = False  # whether this call started the process group (and so ends it)
    device = resolve_device(tcfg["device"])
    if ddp:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            own_group = True
    master = rank == 0
    if master:
        done = os.path.join(out_dir, SUMMARY)
        if os.path.exists(done) and resume:
            with open(done) as f:
                log.info("%s already finished; nothing to resume", out_dir)
                return json.load(f)
        has_state = os.path.exists(os.path.join(out_dir, CHECKPOINT)) or os.path.exists(done)
        if has_state and not resume:
            raise ValueError(f"output_dir {out_dir} already holds a run; pass --resume (resume=True) to continue it "
                             f"or choose another output_dir")
        os.makedirs(out_dir, exist_ok=True)
        C.dump_yaml(cfg, os.path.join(out_dir, "config.yaml"))
    seed = tcfg["seed"]
    random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        precision = tcfg["precision"]
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        if tcfg["precision"] not in ("auto", "fp32") and master:
            log.info("train.precision %s applies on GPUs only; the CPU trains in fp32", tcfg["precision"])
        precision, amp_dtype = "fp32", None  # the CPU trains in fp32
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    # ---- data -------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg["tokenizer"] or cfg["model"])
    fields = dcfg["fields"]
    tok_kw = dict(format=dcfg["format"], fields=fields, max_length=dcfg["max_length"], add_eos=dcfg["add_eos"],
                  progress=master and cfg["log"]["progress"])
    train_rows = load_rows(dcfg["train"], "data.train")
    if not train_rows:
        raise ValueError(f"data.train: {dcfg['train']} holds no rows")
    examples, dropped = tokenize_rows(train_rows, tokenizer, name="data.train", **tok_kw)
    if dropped:
        log.warning("data.train: %d examples lost every completion token to data.max_length and were dropped", dropped)
    lengths = [len(e) for e in examples]
    evals = {}  # prefix -> (loss batches, qa items or None)
    for key, prefix in (("eval", "eval"), ("eval_ood", "eval_ood")):
        if not dcfg[key]:
            continue
        rows = load_rows(dcfg[key], f"data.{key}")[: ecfg["max_examples"]]
        if not rows:
            raise ValueError(f"data.{key}: {dcfg[key]} holds no rows")
        qa = qa_items(rows, tokenizer, format=dcfg["format"], fields=fields, name=f"data.{key}") \
            if ecfg["generate"] else None
        batches = None  # QA-only eval sets (prompt + answers, no completion) get no eval loss
        if dcfg["format"] == "chat" or any(fields["completion"] in r for r in rows) or qa is None:
            ex, _ = tokenize_rows(rows, tokenizer, name=f"data.{key}", **tok_kw)
            batches = eval_batches(ex, ecfg["batch_size"], dcfg["max_length"])
        evals[prefix] = (batches, qa)

    epoch_plans = []  # micro-batches (lists of example indices) of each epoch, drawn on demand

    def epoch_plan(e):
        while len(epoch_plans) <= e:
            epoch_plans.append(plan_epoch(lengths, tcfg["batch_size"], packing=dcfg["packing"],
                                          max_length=dcfg["max_length"], seed=seed, epoch=len(epoch_plans)))
        return epoch_plans[e]

    def micro_batch(g):
        """Global micro-batch number ``g`` -> (epoch, batch dict); the order depends only on the seed."""
        e = 0
        while g >= len(epoch_plan(e)):
            g -= len(epoch_plan(e))
            e += 1
        return e, collate(examples, epoch_plan(e)[g])

    ga = tcfg["grad_accum"]
    micro_per_step = ga * world
    if tcfg["epochs"] is not None:
        total_steps = max(1, math.ceil(tcfg["epochs"] * len(epoch_plan(0)) / micro_per_step))
    else:
        total_steps = tcfg["max_steps"]

    # ---- model ------------------------------------------------------------------------------
    model_dtype = cfg["dtype"]
    if method != "lora" and model_dtype == "auto":
        model_dtype = "fp32"  # trained weights keep fp32 master copies; compute runs under autocast
    model = load_model(cfg["model"], dtype=model_dtype, attention=cfg["attention"], device=device,
                       quantization=cfg["quantization"], double_quant=cfg["double_quant"])
    if tcfg["gradient_checkpointing"]:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    masks, n_masked = None, None
    pissa_init = None
    if method == "lora":
        from .lora import inject_lora

        lc = cfg["lora"]
        torch.manual_seed(seed)  # the same A init for every run with this seed
        inject_lora(model, lc["targets"], lc["r"], lc["alpha"], dropout=lc["dropout"], use_rslora=lc["rslora"],
                    init=lc["init"])
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # LoRA matrices train in fp32 whatever the base dtype
        if lc["init"].startswith("pissa"):  # the base now holds W - s B0 A0; keep A0, B0 for the saved adapter
            from .adapter import adapter_state_dict

            pissa_init = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:  # masked: only the decoder-layer weights are candidates; the rest stays frozen
        cands = mask_candidates(model)
        if not cands:
            raise ValueError("method masked: the model has no parameters under '.layers.' to mask")
        for n, p in model.named_parameters():
            p.requires_grad_(n in cands)
    if tcfg["fused_kernels"]:
        from .patch import patch_decoder_kernels

        counts = patch_decoder_kernels(model)
        if master:
            log.info("fused kernels: %d RMSNorm, %d SwiGLU MLP modules%s", counts["rms_norm"], counts["swiglu"],
                     f" (left as they are: {', '.join(sorted(set(counts['skipped'])))})" if counts["skipped"] else "")
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named_trainable]
    n_trainable = sum(p.numel() for p in params)
    if master:
        log.info("method %s: %s trainable parameters of %s", method, f"{n_trainable:,}",
                 f"{sum(p.numel() for p in model.parameters()):,}")
    raw_model = model
    if tcfg["fused_loss"]:  # output head + loss without the (tokens, vocab) logits
        from .loss import FusedLossLM, check_fused_loss, fused_head_fp32, fused_loss_problem

        problem = fused_loss_problem(model)
        if problem is None:
            fused = FusedLossLM(model)
            problem = check_fused_loss(model, fused, micro_batch(0)[1], autocast,
                                       rtol=1e-4 if amp_dtype is None and fused_head_fp32(model) else 2e-2)
            if problem is None:
                model = fused
        if problem is not None and master:
            log.warning("train.fused_loss: using the model's own logits instead: %s", problem)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def micro_step_loss(batch):
        with autocast():
            return batch_loss_sum(model, batch)

    # ---- masked SFT: choose the weights that may change -------------------------------------
    mcfg = cfg["mask"]
    ckpt = None
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    if resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if method == "masked":
        from .masking import MaskedAdamW, pack_mask, topk_mask

        if ckpt is not None:
            masks = [ckpt["mask"][n].to(device) for n, _ in named_trainable]
        elif mcfg["score"] == "update":
            src = os.path.join(mcfg["from"], "model")
            if not os.path.isdir(src):
                raise FileNotFoundError(f"mask.from: no model/ directory in {mcfg['from']} (a finished full-SFT run)")
            run = dict(load_model(src, dtype="fp32", attention="sdpa", device="cpu").named_parameters())
            missing = [n for n, _ in named_trainable if n not in run]
            if missing:
                raise ValueError(f"mask.from: {src} lacks parameters of this model, e.g. {missing[0]!r}")
            scores = [(run[n].float() - p.detach().float().cpu()).abs() for n, p in named_trainable]
            masks = [m.to(device) for m in topk_mask(scores, mcfg["fraction"])]
            del run, scores
        else:  # grad: |grad| summed over the first warmup_steps steps' batches, no update
            scores = [torch.zeros_like(p, dtype=torch.float32) for p in params]
            for s in range(max(1, mcfg["warmup_steps"])):
                idx = [s * micro_per_step + k * world + rank for k in range(ga)]
                batches = [micro_batch(g)[1] for g in idx]
                n_tgt = sum(b["n_targets"] for b in batches)
                for b in batches:
                    (micro_step_loss(b) / n_tgt).backward()
                for sc, p in zip(scores, params):
                    if p.grad is not None:
                        sc += p.grad.float().abs()
                    p.grad = None
            masks = [m.to(device) for m in topk_mask(scores, mcfg["fraction"])]
            del scores
        n_masked = sum(int(m.sum()) for m in masks)
        if master:
            log.info("mask (%s): %s of %s candidate weights may change", mcfg["score"], f"{n_masked:,}", f"{n_trainable:,}")

    # ---- optimizer --------------------------------------------------------------------------
    betas, eps, wd, lr0 = tuple(tcfg["betas"]), tcfg["eps"], tcfg["weight_decay"], tcfg["lr"]
    if method == "masked":
        if tcfg["optimizer"] != "adamw":
            raise ValueError(f"train.optimizer {tcfg['optimizer']!r} is not available for method masked (adamw only)")
        optimizer = MaskedAdamW(params, masks, lr=lr0, betas=betas, eps=eps, weight_decay=wd)
    else:
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if tcfg["optimizer"] == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ValueError("train.optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)") from None
            optimizer = bnb.optim.AdamW8bit(groups, lr=lr0, betas=betas, eps=eps)
        else:
            optimizer = torch.optim.AdamW(groups, lr=lr0, betas=betas, eps=eps, fused=device.type == "cuda")

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate() -> dict:
        res = {}
        for prefix, (batches, qa) in evals.items():
            if batches is not None:
                with autocast():
                    res[f"{prefix}_loss"] = eval_loss(raw_model, batches)
            if qa is not None:
                prompts, golds, add_special = qa
                with autocast():
                    outs = generate_answers(raw_model, tokenizer, prompts, max_new_tokens=ecfg["max_new_tokens"],
                                            batch_size=ecfg["batch_size"], add_special_tokens=add_special)
                res[f"{prefix}_accuracy"] = sum(is_correct(o[0], g) for o, g in zip(outs, golds)) / len(golds)
        return res

    # ---- resume -----------------------------------------------------------------------------
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    start_step = 0
    window = torch.zeros(3, dtype=torch.float64)  # loss sum, target tokens, tokens since the last log row
    if ckpt is not None:
        state = ckpt["trainable"]
        with torch.no_grad():
            for n, p in named_trainable:
                p.copy_(state[n])
        optimizer.load_state_dict(ckpt["optimizer"])
        if masks is not None:  # torch's load_state_dict casts every state tensor, the packed masks too
            for p, m in zip(params, masks):
                optimizer.state[p]["mask"] = pack_mask(m)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"], device)
        start_step = ckpt["step"]
        pissa_init = ckpt.get("pissa_init", pissa_init)
        window = ckpt["log_window"].clone()
        changed = sorted(k for k, v in C.flatten(cfg).items() if C.flatten(ckpt["config"]).get(k) != v)
        if changed and master:
            log.warning("--resume: config keys changed since the checkpoint: %s", ", ".join(changed))
        if ckpt.get("total_steps") != total_steps:
            raise ValueError(f"--resume: the checkpoint was made for {ckpt.get('total_steps')} steps, "
                             f"the config now gives {total_steps}")
        if master:
            log.info("resumed from %s at step %d", ckpt_path, start_step)
    elif resume and master:
        log.info("--resume: no checkpoint in %s, starting from step 0", out_dir)
    del ckpt
    if master:  # keep the log rows up to the resume point
        kept = _read_metrics(metrics_path, start_step)
        C.atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def save_checkpoint(step):
        if not master:
            return
        state = {
            "step": step,
            "total_steps": total_steps,
            "config": cfg,
            "trainable": {n: p.detach().to("cpu", copy=True) for n, p in named_trainable},
            "mask": {n: m.cpu() for (n, _), m in zip(named_trainable, masks)} if masks is not None else None,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "scheduler": {"kind": tcfg["schedule"], "step": step},  # the LR is a function of the step
            "rng": _rng_state(device),
            "data": {"next_micro_batch": step * micro_per_step, "seed": seed},
            "log_window": window.clone(),  # loss / token sums since the last metrics row
            "pissa_init": pissa_init,
        }
        atomic_write(ckpt_path, lambda tmp: torch.save(state, tmp))

    # ---- the loop ---------------------------------------------------------------------------
    metrics_file = open(metrics_path, "a") if master else None
    tb = None
    if master and cfg["log"]["tensorboard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("log.tensorboard needs the tensorboard package (pip install tensorboard)") from None
        tb = SummaryWriter(os.path.join(out_dir, "tb"))

    def write_row(row):
        if not master:
            return
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        if tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    tb.add_scalar(k, v, row["step"])

    bar = None
    if master and cfg["log"]["progress"]:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc=f"train {method}", dynamic_ncols=True)
    model.train()
    t_window = time.time()
    last = {}
    try:
        for step in range(start_step, total_steps):
            lr = lr_at(step, total_steps, lr0, tcfg["warmup"], tcfg["schedule"], tcfg["min_lr_ratio"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = [step * micro_per_step + k * world + rank for k in range(ga)]  # this rank's share of the step
            batches = [micro_batch(g) for g in idx]
            n_tgt = sum(b["n_targets"] for _, b in batches)
            norm = n_tgt  # the loss is the mean over every target token of the step, on all ranks together
            if ddp:  # DDP averages gradients over ranks, so divide by the mean token count per rank
                count = torch.tensor([float(n_tgt)], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(count)
                norm = count.item() / world
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for k, (epoch, b) in enumerate(batches):
                sync = contextlib.nullcontext() if (not ddp or k == ga - 1) else model.no_sync()
                with sync:
                    ls = micro_step_loss(b)
                    loss = ls / norm
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_sum += ls.detach().double()
            loss_sum = float(loss_sum)  # one device sync per step
            if not math.isfinite(loss_sum):
                raise NonFiniteLossError(f"training loss is {loss_sum / n_tgt} at step {step + 1}")
            if scaler is not None:
                scaler.unscale_(optimizer)
            if masks is not None:  # only masked weights move; their gradient alone counts for clipping
                for p, m in zip(params, masks):
                    if p.grad is not None:
                        p.grad.masked_fill_(~m, 0.0)
            max_norm = tcfg["max_grad_norm"]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window += torch.tensor([loss_sum, n_tgt, sum(b["n_tokens"] for _, b in batches)], dtype=torch.float64)
            done_steps = step + 1

            if done_steps % tcfg["log_every"] == 0 or done_steps == total_steps:
                if ddp:  # sums over ranks (on the device: nccl reduces GPU tensors only)
                    reduced = window.to(device)
                    torch.distributed.all_reduce(reduced)
                    window = reduced.cpu()
                dt = max(time.time() - t_window, 1e-9)
                last = {"step": done_steps, "loss": window[0].item() / max(window[1].item(), 1), "lr": lr,
                        "tokens_per_s": window[2].item() / dt, "grad_norm": float(grad_norm), "epoch": batches[-1][0],
                        "elapsed_s": round(time.time() - t_start, 3)}
                if device.type == "cuda":  # this rank's peak since the last row: model, optimizer, activations
                    last["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                    torch.cuda.reset_peak_memory_stats(device)
                write_row(last)
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
                window.zero_()
                t_window = time.time()
            if bar is not None:
                bar.update(1)
            if evals and ecfg["every"] and done_steps % ecfg["every"] == 0 and done_steps != total_steps:
                if master:
                    write_row({"step": done_steps, **evaluate()})
                if ddp:
                    torch.distributed.barrier()
                t_window = time.time()
            if tcfg["save_every"] and done_steps % tcfg["save_every"] == 0 and done_steps != total_steps:
                save_checkpoint(done_steps)
    finally:
        if bar is not None:
            bar.close()

    # ---- outputs ----------------------------------------------------------------------------
    summary = {"status": "finished", "output_dir": os.path.abspath(out_dir), "method": method,
               "rank": cfg["lora"]["r"] if method == "lora" else None,
               "steps": total_steps, "train_loss": last.get("loss"),
               "trainable_params": n_masked if n_masked is not None else n_trainable}
    if master:
        final_eval = evaluate() if evals else {}
        if final_eval:
            write_row({"step": total_steps, **final_eval})
        summary.update(final_eval)
        if method == "lora":
            from .adapter import adapter_state_dict, pissa_to_lora, save_adapter

            lc = cfg["lora"]
            targets = getattr(raw_model, "rankwise_lora", {}).get("target_modules", lc["targets"])
            tensors, r_out, alpha_out = adapter_state_dict(raw_model), lc["r"], lc["alpha"]
            if pissa_init is not None:  # saved relative to the original base weights
                tensors, r_out, alpha_out = pissa_to_lora(tensors, pissa_init, r_out, alpha_out, lc["rslora"])
            save_adapter(raw_model, os.path.join(out_dir, "adapter"), base_model=cfg["model"], r=r_out,
                         alpha=alpha_out, dropout=lc["dropout"], targets=targets, use_rslora=lc["rslora"],
                         tensors=tensors)
            scale = alpha_out / (math.sqrt(r_out) if lc["rslora"] else r_out)
            a_keys = [k for k in tensors if k.endswith("lora_A.weight")]
            summary["delta_norm"] = math.sqrt(sum(  # ||update||_F over all adapted weights, original base
                float((scale * tensors[k.replace("lora_A", "lora_B")].double() @ tensors[k].double()).norm()) ** 2
                for k in a_keys))
        else:
            _save_pretrained_atomic(raw_model, tokenizer, os.path.join(out_dir, "model"))
            if masks is not None:
                from safetensors.torch import save_file

                mask_path = os.path.join(out_dir, "mask.safetensors")
                tensors = {n: m.to(torch.uint8).cpu().contiguous() for (n, _), m in zip(named_trainable, masks)}
                atomic_write(mask_path, lambda p: save_file(tensors, p))
        summary["runtime_s"] = round(time.time() - t_start, 3)
        _write_json(os.path.join(out_dir, SUMMARY), summary)
        if os.path.exists(ckpt_path):
            os.unlink(ckpt_path)
        metrics_file.close()
        if tb is not None:
            tb.close()
    if ddp:
        torch.distributed.barrier()
        if own_group:
            torch.distributed.destroy_process_group()
    return summary


# ----------------------------------------------------------------------------- CLI verb

def add_arguments(parser) -> None:
    """Arguments of ``rankwise train``."""
    parser.add_argument("config", help="YAML config file (see examples/lora.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, dotted (e.g. --set lora.r=8 --set train.lr=1e-4); repeatable")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint.pt")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def main(args) -> int:
    """Entry point of ``rankwise train``."""
    if args.print_config:
        import yaml

        print(yaml.safe_dump(C.resolve(args.config, args.overrides), sort_keys=False), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary = train(args.config, args.overrides, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
