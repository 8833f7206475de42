"""rankwise.kernels: Triton kernels with their launchers, autograd Functions and
plain-torch references, one op per file.

- ``lora_linear``: the fused LoRA linear layer (dense or NF4 base weight).
- ``nf4_dequantize``: standalone NF4 dequantization (bitsandbytes format).
- ``linear_cross_entropy``: output head + cross entropy without the full logits.
- ``rms_norm`` / ``swiglu``: Llama's RMSNorm and SwiGLU activation, fused forward and backward.
- ``masked_adamw_step`` / ``apply_mask``: bit-packed masked AdamW and mask application.
"""
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from .lora_linear import dropout_mask, lora_linear, lora_linear_reference
from .masked_adamw import apply_mask, masked_adamw_step
from .nf4 import nf4_dequantize, nf4_dequantize_reference
from .nf4_lora import nf4_lora_linear, nf4_lora_linear_reference
from .rms_norm import rms_norm, rms_norm_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "lora_linear", "lora_linear_reference", "dropout_mask",
    "nf4_lora_linear", "nf4_lora_linear_reference", "nf4_dequantize", "nf4_dequantize_reference",
    "linear_cross_entropy", "linear_cross_entropy_reference",
    "rms_norm", "rms_norm_reference", "swiglu", "swiglu_reference",
    "masked_adamw_step", "apply_mask",
]
