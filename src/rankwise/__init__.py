"""rankwise: fused-kernel LoRA / SFT adapter training and analysis.

Public API (everything else lives in submodules):

- ``rankwise.kernels.lora_linear``: the fused LoRA linear op;
  ``rankwise.kernels.linear_cross_entropy``: output head + loss without the logits.
- ``LoRALinear``, ``inject_lora``, ``patch_peft_model``: modules and integration;
  ``FusedLossLM``: a causal LM's training loss through the fused head + loss;
  ``patch_decoder_kernels``: RMSNorm and SwiGLU MLPs through the fused kernels;
  ``patch_model`` / ``unpatch_model``: one call for a Hugging Face or PEFT causal LM
  (LoRA layers, norms, MLPs and the fused head + loss; its call signature unchanged).
- ``MaskedAdamW``, ``restore``: sparse fine-tuning and parameter restoration
  (more in ``rankwise.masking``); ``rankwise.quant`` for NF4, ``rankwise.train``,
  ``rankwise.sweep``, ``rankwise.analysis``, ``rankwise.world`` for the rest.
"""
__version__ = "0.1.0"

import torch  # noqa: E402,F401  (loads libtorch before rankwise._C is imported)

from .lora import LoRALinear, inject_lora, lora_layers, patch_peft_model, unpatch_peft_model  # noqa: E402
from .loss import FusedLossLM  # noqa: E402
from .masking import MaskedAdamW, restore  # noqa: E402
from .decoder_kernels import patch_decoder_kernels, unpatch_decoder_kernels  # noqa: E402
from .patch_model import patch_model, unpatch_model  # noqa: E402

__all__ = ["__version__", "LoRALinear", "inject_lora", "lora_layers", "patch_peft_model", "unpatch_peft_model",
           "FusedLossLM", "patch_decoder_kernels", "unpatch_decoder_kernels", "patch_model", "unpatch_model", "MaskedAdamW", "restore"]
