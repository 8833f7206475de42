"""Kernels in the loop: a tiny Llama trained through ``rankwise.train.train`` with
``train.backend: triton`` matches the same run with ``train.backend: torch``.

Two runs per case, identical but for the backend (same seed, data order, LoRA
init, fp32 throughout: the interpreter's bf16 ``tl.dot`` is not exact):

(a) LoRA with ``lora.dropout: 0.1`` on a dense fp32 base;
(b) LoRA on an NF4-quantized base (``quantization: nf4``, double quant).

Both also run the fused cross-entropy head (``train.fused_loss``, on by default)
through its Triton kernels. Without CUDA the kernels run under the Triton
interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before rankwise
is imported); on CUDA they are compiled.

Dropout: the two backends draw *different* keep-masks for one seed (Triton
regenerates its mask with Philox from (seed, element index); the torch path
draws it from a ``torch.Generator``). Both backends take the seed from torch's
global RNG in the same order, so the torch run here is given the Triton mask
for that seed (``dropout_mask``, which the torch path accepts as ``keep_mask``):
the two runs then compute the same function and are compared deterministically,
not statistically.

Tolerance: every step is logged and the per-step training losses must agree
within ``RTOL`` relative. With the same masks the two backends differ only in
float32 summation order (tiled fp32 accumulation in the kernels vs torch's
matmul), about 1e-7 relative per op; measured over 24 AdamW steps at lr 1e-2
the largest loss difference is 2.3e-7 (dropout case) and 2.2e-7 (NF4). On the
CPU ``RTOL = 1e-5`` leaves a 40x margin for other BLAS builds and thread counts,
while a wrong gradient (a missing scaling, a dropped 1/(1-p) rescale, a
transposed tile) moves the loss by more than 1e-3 within two steps. On CUDA
both backends run fp32 with TF32 matmuls (``allow_tf32``, Triton's default dot
precision), whose 10-bit mantissa rounds differently in each: ``RTOL`` is
``2e-2`` there. The final LoRA tensors are compared with ``ATOL`` (values of
order 1e-1). A spy counts Triton kernel launches, so a run that silently fell
back to torch fails, and the torch run must launch none (but the mask kernel).

Runtime on 2 shared CPU cores under the interpreter: about 70 s for the file
(1-layer Llama, hidden 32, two LoRA targets, ~10-token rows, batch 2).
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_data import CITIES, build_tiny_llama, write_jsonl

import rankwise.train as rt

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 24
ON_CUDA = torch.cuda.is_available()
RTOL = 2e-2 if ON_CUDA else 1e-5
ATOL = 2e-2 if ON_CUDA else 1e-5


def short_rows(n):
    """Short rows (about 10 tokens): the interpreter's time grows with the tokens per step."""
    return [{"prompt": f"p{i}?", "completion": f" {CITIES[(i * 5) % len(CITIES)]}"} for i in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("conv")
    return {"model": build_tiny_llama(d / "model", hidden=32, layers=1),
            "train": write_jsonl(d / "train.jsonl", short_rows(16))}


def make_cfg(world, out, backend, lora=None, **top):
    return {"model": world["model"], "method": "lora", **top,
            "lora": {"r": 4, "alpha": 8, "targets": ["v_proj", "o_proj"], **(lora or {})},
            "data": {"train": world["train"], "max_length": 16},
            "train": {"max_steps": STEPS, "batch_size": 2, "lr": 1e-2, "log_every": 1, "save_every": 0,
                      "warmup": 0, "backend": backend, "precision": "fp32"},
            "eval": {"every": 0}, "log": {"progress": False}, "output_dir": str(out)}


class KernelSpy:
    """Counts Triton kernel launches by kernel name (interpreted or compiled)."""

    def __init__(self, monkeypatch):
        import triton

        if os.environ.get("TRITON_INTERPRET") == "1":
            from triton.runtime.interpreter import InterpretedFunction as cls
        else:
            cls = triton.runtime.jit.JITFunction
        self.counts = {}
        real_run = cls.run

        def run(fn, *args, **kwargs):
            name = getattr(getattr(fn, "fn", None), "__name__", None) or getattr(fn, "__name__", "?")
            self.counts[name] = self.counts.get(name, 0) + 1
            return real_run(fn, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)

    def total(self, exclude=()):
        return sum(n for k, n in self.counts.items() if k not in exclude)


def same_dropout_mask(monkeypatch):
    """Give the torch path the Triton kernels' keep-mask for each seed (see the module docstring)."""
    import importlib

    # the modules, not the functions of the same name that rankwise.kernels exports
    dense, nf4_lora, lowrank, lora_torch = (importlib.import_module(f"rankwise.kernels.{m}")
                                            for m in ("lora_linear", "nf4_lora", "lowrank", "lora_torch"))
    real = lora_torch.lora_linear_torch

    def with_triton_mask(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, seed=None, keep_mask=None):
        if dropout_p > 0.0 and keep_mask is None:
            keep_mask = lowrank.dropout_mask(x.shape, dropout_p, seed, device=x.device)
        return real(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, keep_mask)

    for mod in (dense, nf4_lora, lora_torch):
        if hasattr(mod, "lora_linear_torch"):
            monkeypatch.setattr(mod, "lora_linear_torch", with_triton_mask)


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def compare(tmp_path, world, monkeypatch, **top):
    same_dropout_mask(monkeypatch)
    spy = KernelSpy(monkeypatch)
    rt.train(make_cfg(world, tmp_path / "torch", "torch", **top))
    torch_launches = spy.total(exclude={"_dropout_mask_kernel"})  # the shared masks are drawn by Triton
    torch_ran = dict(spy.counts)
    spy.counts.clear()
    rt.train(make_cfg(world, tmp_path / "triton", "triton", **top))
    ran = dict(spy.counts)

    assert torch_launches == 0, "train.backend torch must not launch Triton kernels"
    assert any("lora" in k for k in ran), f"the LoRA kernels did not run: {ran}"
    assert any(k.startswith("_ce") or "cross_entropy" in k for k in ran), f"the fused loss kernels did not run: {ran}"
    assert spy.total() >= 5 * STEPS, f"too few Triton launches for {STEPS} steps: {ran}"

    a, b = losses(tmp_path / "torch"), losses(tmp_path / "triton")
    assert len(a) == len(b) == STEPS
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    assert max(rel) <= RTOL, f"loss curves differ: max_rel {max(rel):.3g} at step {rel.index(max(rel)) + 1}; " \
                             f"torch {a}, triton {b}"
    assert b[-1] < 0.8 * b[0], f"the triton run did not learn: {b[0]:.4f} -> {b[-1]:.4f}"
    ta = load_file(tmp_path / "torch" / "adapter" / "adapter_model.safetensors")
    tb = load_file(tmp_path / "triton" / "adapter" / "adapter_model.safetensors")
    for k in ta:
        err = (ta[k] - tb[k]).abs().max().item()
        assert err <= ATOL, f"{k}: final LoRA tensors differ by {err:.3g}"
    print(f"max relative loss difference over {STEPS} steps: {max(rel):.3g}")
    return torch_ran, ran


def test_lora_with_dropout_triton_matches_torch(world, tmp_path, monkeypatch):
    torch_ran, ran = compare(tmp_path, world, monkeypatch, lora={"dropout": 0.1})
    assert torch_ran.get("_dropout_mask_kernel", 0) > 0  # the torch run used the Triton masks


def test_lora_on_nf4_base_triton_matches_torch(world, tmp_path, monkeypatch):
    _, ran = compare(tmp_path, world, monkeypatch, quantization="nf4", double_quant=True)
    assert any("nf4" in k for k in ran), f"the NF4 LoRA kernels did not run: {sorted(ran)}"
