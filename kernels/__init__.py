"""rankwise.kernels: Triton kernels with their launchers, autograd Functions and
torch paths, one op per file.

- ``lora_linear``: the fused LoRA linear layer (dense or NF4 base weight; the one
  dense / NF4 dispatch is in ``lora_linear.lora_linear``, the NF4 layer is
  ``nf4_lora.nf4_lora_linear``, the low-rank kernels both share are ``lowrank``).
  Its two big GEMMs run fused or split (torch's GEMM, then an in-place low-rank
  tail kernel): ``path="fused" | "split" | "auto"``, "auto" being the faster one
  per shape on CUDA, measured once and cached on disk by ``tuning``.
- ``nf4_dequantize``: standalone NF4 dequantization (bitsandbytes format); ``nf4``
  also holds ``NF4Weight`` and ``dequantize_nf4`` (re-exported by ``rankwise.quant``).
- ``linear_cross_entropy``: output head + cross entropy without the full logits.
- ``rms_norm`` / ``swiglu``: Llama's RMSNorm and SwiGLU activation, fused forward and backward;
  ``geglu``: Gemma's gelu-tanh gated activation, the same shape of op.
- ``masked_adamw_step`` / ``apply_mask``: bit-packed masked AdamW and mask application.

``lora_linear`` (and ``nf4_lora_linear``), ``nf4_dequantize``,
``linear_cross_entropy``, ``rms_norm``, ``swiglu`` and ``geglu`` take ``backend="auto" |
"triton" | "torch"``: ``"triton"`` runs the kernels (on a CPU only under
``TRITON_INTERPRET=1``), ``"torch"`` plain torch ops, ``"auto"`` Triton on CUDA
and torch otherwise. The ``*_reference`` names (and ``lora_linear_torch``) are those torch paths under their
historical names; the tests compare both backends with references of their own
(``tests/helpers.py``). The masked-AdamW steps are Triton-only (``rankwise.masking``
owns their CPU path).

Imports within the package form a tree: ``utils`` <- ``lowrank`` (the low-rank
kernels and the LoRA op family's autograd), ``nf4`` <- ``lora_torch`` (the call
and the torch path of every LoRA op, one arm or several) <- ``nf4_lora`` <-
``lora_linear``, and ``multi_lora``; no op file imports another's private names,
and nothing here imports the ``rankwise`` package.
"""
from .geglu import geglu, geglu_reference
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .lora_linear import dropout_mask, lora_linear
from .lora_torch import lora_linear_torch
from .masked_adamw import apply_mask, masked_adamw_step
from .multi_lora import multi_lora_linear
from .nf4 import nf4_dequantize, nf4_dequantize_reference
from .nf4_lora import nf4_lora_linear, nf4_lora_linear_reference
from .rms_norm import rms_norm, rms_norm_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "lora_linear", "lora_linear_torch", "dropout_mask",
    "nf4_lora_linear", "nf4_lora_linear_reference", "nf4_dequantize", "nf4_dequantize_reference",
    "linear_cross_entropy", "linear_cross_entropy_reference",
    "rms_norm", "rms_norm_reference", "swiglu", "swiglu_reference", "geglu", "geglu_reference",
    "masked_adamw_step", "apply_mask",
    "multi_lora_linear",
]
