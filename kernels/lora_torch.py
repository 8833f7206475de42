"""The host side of every LoRA op: the call (``lora_call``: compute dtype, backend,
dense or NF4 base, then the torch path or the Triton op) and the torch path
(``backend="torch"``, and ``"auto"`` off CUDA), plain torch ops on a dense base
weight (an NF4 base is dequantized first): ``multi_lora_linear_torch`` for K arms,
``lora_linear_torch`` (``lora_linear``, ``nf4_lora_linear``) its one-arm call.
Math and derivation: ``multi_lora.py``.

Dropout: arm k's keep-mask is ``torch_keep_mask`` of its rows from ``seeds[k]``,
so an arm sees the mask of a single-arm call on its rows with that seed (the
Triton kernels draw another mask for one seed). One arm against the single-arm
path's former autograd form: ``benchmarks/bench_lora_k1.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .lowrank import check_tensor, compute_dtype, draw_seed, op_seed, validate_lora_args
from .nf4 import NF4Weight, dequantize_nf4, nf4_kernel_args
from .tuning import check_path
from .utils import check_triton_tensor, fused_apply

__all__ = ["lora_linear_torch", "multi_lora_linear_torch", "torch_keep_mask", "lora_call", "one_arm_call",
           "check_weight_and_path"]


def torch_keep_mask(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """``torch.rand(shape) >= dropout_p`` from a generator on ``device`` seeded with
    ``seed``: the same mask for x of shape (b, t, in) as for its (b * t, in) view."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return torch.rand(shape, generator=g, device=device) >= dropout_p


class _LoRATorchFunction(torch.autograd.Function):
    """Forward and backward written out, each arm's scaling applied to its small
    factors, never to a full ``(rows, out)`` block: forward ``y_k += s * S_k @ B_k.T``
    is one in-place ``addmm_`` on arm k's rows of the base output; backward scales
    ``dS_k = s * (dY_k @ B_k)`` and ``dB_k = s * (dY_k.T @ S_k)`` and adds
    ``dS_k @ A_k`` (masked, with dropout) into dX in place. Values differ from autograd
    on ``y + s * ((x_d @ A.T) @ B.T)`` only by where the rounding of the scaling falls.
    ``adapters``: A_1..A_n, then B_1..B_n, so each arm's gradient lands in its own
    tensor; ``arms``: (scalings, rows, dropout_ps, seeds, keep_masks), keep_masks
    None or one bool mask (or None: drawn from the seed) per arm.

    Saved: x, each arm's S_k and, with dropout, x_dk and its bool keep-mask; W and
    the adapters by reference. Differentiable once (S_k and x_dk are saved as
    constants): a second derivative raises rather than come out wrong."""

    @staticmethod
    def forward(ctx, x2, weight, bias, arms, *adapters):
        scalings, rows, dropout_ps, seeds, masks = arms
        n = len(rows)
        As, Bs = adapters[:n], adapters[n:]
        y = torch.nn.functional.linear(x2, weight, bias)
        dropped, Ss = [], []  # per arm with dropout: x_dk and its keep-mask
        for k, (x_k, y_k, A_k, B_k, s, p, seed) in enumerate(zip(x2.split(rows), y.split(rows), As, Bs, scalings,
                                                                  dropout_ps, seeds)):
            if p > 0.0:
                keep = masks[k] if masks is not None and masks[k] is not None else \
                    torch_keep_mask(x_k.shape, p, seed, x2.device)
                x_k = x_k * keep.to(x2.dtype) / (1.0 - p)
                dropped += [x_k, keep]
            S_k = torch.nn.functional.linear(x_k, A_k)
            y_k.addmm_(S_k, B_k.t(), alpha=s)
            Ss.append(S_k)
        ctx.arms = (scalings, rows, dropout_ps)
        ctx.save_for_backward(x2, weight, *adapters, *dropped, *Ss)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dY):
        scalings, rows, dropout_ps = ctx.arms
        n = len(rows)
        x2, weight, *rest = ctx.saved_tensors
        As, Bs, dropped, Ss = rest[:n], rest[n:2 * n], iter(rest[2 * n:len(rest) - n]), rest[len(rest) - n:]
        need = ctx.needs_input_grad
        dX = dY.mm(weight) if need[0] else None
        dW = dY.t().mm(x2) if need[1] else None
        dBias = dY.sum(0) if need[2] else None
        dAs, dBs = [None] * n, [None] * n
        dXs = dX.split(rows) if need[0] else None
        for k, (dY_k, x_k, s, p) in enumerate(zip(dY.split(rows), x2.split(rows), scalings, dropout_ps)):
            xd_k, keep = (next(dropped), next(dropped)) if p > 0.0 else (x_k, None)
            if need[4 + n + k]:
                dBs[k] = dY_k.t().mm(Ss[k]).mul_(s)
            if not (need[4 + k] or need[0]):
                continue
            dS = dY_k.mm(Bs[k]).mul_(s)
            if need[4 + k]:
                dAs[k] = dS.t().mm(xd_k)
            if need[0]:
                if p > 0.0:
                    dXs[k].add_(dS.mm(As[k]).mul_(keep.to(dS.dtype)).div_(1.0 - p))
                else:
                    dXs[k].addmm_(dS, As[k])
        return dX, dW, dBias, None, *dAs, *dBs


def multi_lora_linear_torch(x2, weight, lora_A, lora_B, ranks, scalings, rows, bias=None,
                            dropout_ps=None, seeds=None, keep_masks=None):
    """The torch path on a 2-D ``x2`` and a dense ``weight``: one base matmul over all
    rows, then each arm's low-rank term on its rows (``_LoRATorchFunction``).
    ``lora_A`` / ``lora_B`` concatenated, or sequences of the arms' own tensors; the
    per-arm lists already validated; ``keep_masks``: None or one mask (or None) per arm."""
    n = len(rows)
    if isinstance(lora_A, torch.Tensor):
        lora_A, lora_B = lora_A.split(list(ranks)), lora_B.split(list(ranks), 1)
    masks = tuple(keep_masks) if keep_masks is not None else None
    arms = (tuple(scalings), tuple(rows), tuple(dropout_ps or (0.0,) * n), tuple(seeds or (0,) * n), masks)
    return _LoRATorchFunction.apply(x2, weight, bias, arms, *lora_A, *lora_B)


def lora_linear_torch(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p: float = 0.0,
                      seed: Optional[int] = None, keep_mask: Optional[torch.Tensor] = None):
    """``x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T`` on a dense ``weight``, x
    ``(..., in)``: the one-arm call of ``multi_lora_linear_torch`` on x's rows. The
    keep-mask is ``keep_mask`` when given (bool, x's shape), else ``torch_keep_mask``
    of x's shape from ``seed`` (0 when None)."""
    x2 = x.reshape(-1, x.shape[-1])
    p = float(dropout_p)
    masks = (keep_mask.reshape(x2.shape),) if keep_mask is not None and p > 0.0 else None
    y = multi_lora_linear_torch(x2, weight, (lora_A,), (lora_B,), (lora_A.shape[0],), (scaling,), (x2.shape[0],),
                                bias, (p,), (int(seed) if seed is not None else 0,), masks)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------
# The call: every public entry of the family ends here
# ----------------------------------------------------------------------------


def check_weight_and_path(weight, path: str) -> bool:
    """Check the base weight (a 2-D tensor or a 2-D ``NF4Weight``) and ``path``;
    returns whether W is NF4."""
    is_nf4 = isinstance(weight, NF4Weight)
    if is_nf4:
        if len(weight.shape) != 2:
            raise ValueError(f"weight: expected a 2-D NF4 weight (out_features, in_features), "
                             f"got shape {tuple(weight.shape)}")
    else:
        check_tensor(weight, "weight", 2)
    check_path(path)
    return is_nf4


def one_arm_call(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, backend: str, path: str, triton_op):
    """``lora_linear`` / ``nf4_lora_linear`` once W's kind is known: the checks, the
    seed (drawn when dropout is on and none is given), then ``lora_call`` with the
    arm arguments ``(scaling, dropout_p, seed)`` and ``lora_torch.lora_linear_torch``."""
    check_weight_and_path(weight, path)
    scaling = validate_lora_args(x, tuple(weight.shape), weight.device, lora_A, lora_B, bias, scaling, dropout_p,
                                 backend)
    dropout_p = float(dropout_p)
    seed = op_seed(dropout_p, draw_seed(dropout_p, seed))
    return lora_call(x, weight, lora_A, lora_B, bias, (scaling, dropout_p, seed), backend, path, triton_op,
                     lambda x2, W, A, B, b: lora_linear_torch(x2, W, A, B, scaling, b, dropout_p, seed))


def lora_call(x, weight, lora_A, lora_B, bias, arms: tuple, backend: str, path: str, triton_op, torch_path):
    """A validated call of any op of the family: cast to the compute dtype (x's, or
    autocast's: W, the adapters and the bias follow x, differentiably), then the
    torch path or the Triton op, on x flattened to 2-D.

    ``weight``: a dense W or an ``NF4Weight`` (which enters the Triton op as the six
    tensors and four constants of ``OpLayout``, and is dequantized for the torch
    path). ``lora_A`` / ``lora_B``: tensors, or lists of the arms' own tensors
    (concatenated for the Triton op). ``arms``: the op's arm arguments.
    ``triton_op``: (autograd.Function, custom op) of the forward op for W's kind;
    ``torch_path(x2, W, lora_A, lora_B, bias)`` on a dense W."""
    device_type = x.device.type
    dtype = compute_dtype(x)

    def cast(t):
        return t if t is None or t.dtype == dtype else t.to(dtype)

    is_nf4 = isinstance(weight, NF4Weight)
    x, bias, weight = cast(x), cast(bias), weight if is_nf4 else cast(weight)
    if isinstance(lora_A, torch.Tensor):
        lora_A, lora_B = cast(lora_A), cast(lora_B)
    else:
        lora_A, lora_B = [cast(a) for a in lora_A], [cast(b) for b in lora_B]
    if backend == "auto":
        backend = "triton" if x.is_cuda else "torch"
    lead, N = x.shape[:-1], weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if backend == "torch":
        W = dequantize_nf4(weight).to(dtype) if is_nf4 else weight
        with torch.autocast(device_type, enabled=False):
            return torch_path(x2, W, lora_A, lora_B, bias).reshape(*lead, N)
    if not isinstance(lora_A, torch.Tensor):
        lora_A, lora_B = torch.cat(lora_A, 0), torch.cat(lora_B, 1)
    for t, name in ((x, "x"), (weight, "weight"), (lora_A, "lora_A"), (lora_B, "lora_B")):
        if not (is_nf4 and name == "weight"):
            check_triton_tensor(t, name)
    if is_nf4:
        tensors, const = nf4_kernel_args(weight)
        base = (x2, lora_A, lora_B, bias, *tensors, const["BLOCKSIZE"], const["DOUBLE"], const["NESTED_BLOCKSIZE"],
                weight.dtype)
    else:
        base = (x2, weight, lora_A, lora_B, bias)
    with torch.autocast(device_type, enabled=False):
        y, _ = fused_apply(*triton_op)(*base, *arms, path)
    return y.reshape(*lead, N)
