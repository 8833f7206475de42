"""rankwise.kernels: Triton kernels with their launchers, autograd Functions and
plain-torch references, one op per file."""
from .lora_linear import lora_linear, lora_linear_reference, dropout_mask

__all__ = ["lora_linear", "lora_linear_reference", "dropout_mask"]
