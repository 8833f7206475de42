# placeholder, replaced in the next commit
import torch
def lora_linear_reference(x, weight, lora_A, lora_B, scaling, bias=None):
    y = x @ weight.T + scaling * (x @ lora_A.T) @ lora_B.T
    return y if bias is None else y + bias
lora_linear = lora_linear_reference
def dropout_mask(*a, **k):
    raise NotImplementedError
