"""Fused GeGLU: ``gelu_tanh(gate) * up``, the activation of the Gemma MLP
(``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, ``act_fn = gelu_pytorch_tanh``).

The op shares its kernels, torch path and custom-op plumbing with SwiGLU: both are
``act(gate) * up`` with the activation a compile-time constant; the math, forward and
backward, is in ``kernels/swiglu.py``. This module keeps the public GeGLU names.
"""
from .swiglu import GeGLUFunction, geglu, geglu_reference

__all__ = ["GeGLUFunction", "geglu", "geglu_reference"]
