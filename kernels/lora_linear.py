"""Fused LoRA linear layer: Triton kernels, launchers, custom ops with their
autograd formula, reference.

Math (x: (M, K) after flattening leading dims, W: (N, K), A: (r, K), B: (N, r),
s = scaling, m = keep-mask of inverted dropout with keep probability 1 - p,
x_d = x * m / (1 - p)):

    forward
        S = x_d @ A.T                               (M, r)   kernel 1 (skinny)
        Y = x @ W.T + s * S @ B.T + b               (M, N)   kernel 2 (one GEMM,
                                                             low-rank term in the same accumulator)
    backward, with dY = dL/dY
        dS = s * dY @ B                             (M, r) \\ kernel 3, reads dY once
        dB = s * dY.T @ S                           (N, r) /
        dX = dY @ W + (dS @ A) * m / (1 - p)        (M, K)   kernel 4 (one GEMM)
        dA = dS.T @ x_d                             (r, K)   kernel 5
        dW = dY.T @ x,  db = sum_rows(dY)           torch, only if W / b require grad

    Derivation: Y depends on S linearly through s * S @ B.T, so dL/dS = s * dY @ B
    and dL/dB = s * dY.T @ S. S = x_d @ A.T gives dL/dA = dS.T @ x_d and
    dL/dx_d = dS @ A; x_d = x * m / (1 - p) multiplies that elementwise by
    m / (1 - p). x also enters the base term x @ W.T, adding dY @ W.

Saved for backward: x, S and the dropout seed (W, A, B, b are the layer's own
parameters, kept by reference). The dropout mask is never stored: kernels 1, 4
and 5 regenerate it from (seed, flat element index) with Philox. W + s*B@A and
the separate LoRA output s*S@B.T are never materialised.

torch.compile: the launchers are also registered as torch.library custom ops
(``rankwise::lora_linear`` returning (Y, S), and the backward ops
``rankwise::lora_ds_db``, ``rankwise::lora_dx``, ``rankwise::lora_da``), each
with a fake function that gives its output shapes without running a kernel.
The forward op carries the autograd formula (``register_autograd``), so a
compiled graph calls kernels 1-2 forward and kernels 3-5 backward, as eager
does (eager calls take the cheaper autograd.Function twin). Both are made by
``lowrank.lora_function``, which writes setup_context and backward once for
the four LoRA forward ops (dense / NF4, one arm / an arm table).

Accumulation is fp32 throughout; outputs are stored in the compute dtype (S and
dS too, as PEFT's eager layer keeps them).

Split path (``path="split"``, or ``"auto"``'s measured choice on CUDA,
``tuning.py``): kernel 2 becomes Y = torch.addmm(b, x, W.T) (cuBLAS) followed
by one Triton kernel adding s * S @ B.T in place, and kernel 4 becomes
dX = dY @ W (cuBLAS) followed by one adding (dS @ A) * m / (1 - p) in place
(``lowrank.lowrank_fwd_add_`` / ``lowrank_dx_add_``); kernels 1, 3 and 5 are
the same. The base product is rounded to the compute dtype before the tail is
added (the fused path rounds once), as torch's own layer does.

Layout: kernels 1, 3 and 5, the low-rank tails of kernels 2 and 4, the split
path's tails and the family's autograd live in ``lowrank.py`` (shared with the
NF4 and the multi-arm ops); the call (argument checks, compute dtype, backend)
and the torch path in ``lora_torch.py`` (shared likewise); this file holds the
dense base-weight kernels 2 and 4 and the public ``lora_linear``, the one place
where an ``NF4Weight`` base is sent to ``nf4_lora.nf4_lora_linear``.

Backends (the convention of every op in ``rankwise.kernels``): ``"triton"``
runs the kernels; ``"torch"`` runs plain torch ops (``lora_torch.lora_linear_torch``,
the one-arm case of the multi-arm op's torch path, its backward written out),
the CPU path; ``"auto"`` picks Triton on CUDA and torch otherwise. The tests compare both backends with a float64 reference of their
own (``tests/helpers.py``), never with the code under test.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .lora_torch import lora_linear_torch, one_arm_call
from .lowrank import (
    ONE_ARM,
    KernelSet,
    OpLayout,
    dropout_args,
    dropout_mask,
    lora_da,
    lora_down,
    lora_ds_db,
    lora_function,
    lowrank_dx_tail,
    lowrank_fwd_tail,
    split_dx,
    split_fwd,
    traced_kernels,
)
from .nf4 import NF4Weight
from .nf4_lora import nf4_lora_linear
from .tuning import run_path
from .utils import (
    dot_precision,
    fit_shared_memory,
    fused_variants,
    gemm_config,
    gemm_configs,
    rank_block,
    swizzle_tile,
    upcast_for_dot,
)

__all__ = ["lora_linear", "dropout_mask", "LoRALinearFunction"]

# ----------------------------------------------------------------------------
# Triton kernels (kernels 1, 3 and 5 and the low-rank tails: lowrank.py)
# ----------------------------------------------------------------------------


@triton.jit
def _lora_fwd_kernel(
    X, W, S, B, BIAS, Y,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr,
    stride_bn, stride_br, stride_ym, stride_yn,
    scaling,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Y = x @ W.T + (s * S) @ B.T + b, one accumulator   (kernel 2)."""
    pid_m, pid_n = swizzle_tile(M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(X + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(W + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                    mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PREC)
    # Low-rank term into the same accumulator.
    acc = lowrank_fwd_tail(acc, S, B, BIAS, rm, rn, M, N, R, stride_sm, stride_sr, stride_bn, stride_br,
                           scaling, HAS_BIAS, UPCAST, PREC, BR)
    tl.store(Y + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(Y.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))



@triton.jit
def _lora_bwd_dx_kernel(
    DY, W, DS, A, DX,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm, stride_dsr,
    stride_ar, stride_ak, stride_dxm, stride_dxk,
    seed, p, keep_scale,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dX = dY @ W + (dS @ A) * m / (1 - p)   (kernel 4)."""
    pid_m, pid_k = swizzle_tile(M, K, BM, BK, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        dy = tl.load(DY + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=(rm[:, None] < M) & (rn[None, :] < N), other=0.0)
        w = tl.load(W + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                    mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=PREC)
    acc = lowrank_dx_tail(acc, DS, A, rm, rk, M, K, R, stride_dsm, stride_dsr, stride_ar, stride_ak,
                          seed, p, keep_scale, HAS_DROPOUT, UPCAST, PREC, BM, BK, BR)
    tl.store(DX + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk,
             acc.to(DX.dtype.element_ty), mask=(rm[:, None] < M) & (rk[None, :] < K))


# ----------------------------------------------------------------------------
# Launchers: own the shapes, allocate outputs, pick the grid.
# All take 2-D operands (any strides) and return new tensors.
# ----------------------------------------------------------------------------


def default_tiles(dtype: torch.dtype, device: torch.device, R: int) -> dict:
    """The heuristic tiles of kernels 2 and 4 (``gemm_config`` fitted to the device's shared memory)."""
    return fit_shared_memory(gemm_config(dtype), device, rank_block(R), dtype)


def tile_configs(dtype: torch.dtype, device: torch.device, R: int) -> list:
    """The tile configs kernels 2 and 4 are tuned over: ``default_tiles`` first (``utils.gemm_configs``)."""
    return gemm_configs(default_tiles(dtype, device, R), dtype, device, rank_block(R))


def _fwd_gemm(x2, W, S, B, scaling: float, bias: Optional[torch.Tensor], cfg: Optional[dict] = None) -> torch.Tensor:
    """Y = x2 @ W.T + scaling * S @ B.T (+ bias), (M, N) in x2's dtype; ``cfg``: tiles
    (one of ``tile_configs``; None: ``default_tiles``)."""
    M, K = x2.shape
    N, R = B.shape
    Y = torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    if M == 0:
        return Y
    BR = rank_block(R)
    cfg = cfg or default_tiles(x2.dtype, x2.device, R)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(N, cfg["BN"]),)
    _lora_fwd_kernel[grid](
        x2, W, S, B, bias if bias is not None else x2, Y,
        M, N, K, R,
        x2.stride(0), x2.stride(1), W.stride(0), W.stride(1), S.stride(0), S.stride(1),
        B.stride(0), B.stride(1), Y.stride(0), Y.stride(1),
        float(scaling),
        HAS_BIAS=bias is not None, UPCAST=upcast_for_dot(x2.dtype), PREC=dot_precision(x2.dtype),
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BR=BR, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return Y



def _bwd_dX(dY, W, dS, A, dropout_p: float = 0.0, seed: Optional[int] = None,
            cfg: Optional[dict] = None) -> torch.Tensor:
    """dX = dY @ W + dropout_mask * (dS @ A) / (1 - p), (M, K) in dY's dtype; ``cfg`` as
    in ``_fwd_gemm`` (its BN tiles K, its BK the reduction over N)."""
    M, N = dY.shape
    R, K = A.shape
    dX = torch.empty((M, K), device=dY.device, dtype=dY.dtype)
    if M == 0:
        return dX
    BR = rank_block(R)
    cfg = cfg or default_tiles(dY.dtype, dY.device, R)
    has_drop, seed, p, keep_scale = dropout_args(dropout_p, seed)
    grid = (triton.cdiv(M, cfg["BM"]) * triton.cdiv(K, cfg["BN"]),)
    _lora_bwd_dx_kernel[grid](
        dY, W, dS, A, dX,
        M, N, K, R,
        dY.stride(0), dY.stride(1), W.stride(0), W.stride(1), dS.stride(0), dS.stride(1),
        A.stride(0), A.stride(1), dX.stride(0), dX.stride(1),
        seed, p, keep_scale,
        HAS_DROPOUT=has_drop, UPCAST=upcast_for_dot(dY.dtype), PREC=dot_precision(dY.dtype),
        BM=cfg["BM"], BK=cfg["BN"], BN=cfg["BK"], BR=BR, GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dX


def _fwd_path(x2, W, S, B, scaling: float, bias, path: str) -> torch.Tensor:
    """Y by the path ``path`` names (``"auto"``: ``tuning.choose_path`` on CUDA over the
    split path and the fused one in each of ``tile_configs``; fused elsewhere)."""
    return run_path(path, "lora_fwd", x2.shape[0], W.shape[0], x2.shape[1], x2,
                    lambda c: _fwd_gemm(x2, W, S, B, scaling, bias, c),
                    lambda: split_fwd(x2, W, S, B, scaling, bias),
                    lambda: fused_variants(tile_configs(x2.dtype, x2.device, B.shape[1])), rank=B.shape[1])


def _dx_path(dY, W, dS, A, dropout_p: float, seed, path: str) -> torch.Tensor:
    """dX by the path ``path`` names (as ``_fwd_path``)."""
    return run_path(path, "lora_dx", dY.shape[0], A.shape[1], dY.shape[1], dY,
                    lambda c: _bwd_dX(dY, W, dS, A, dropout_p, seed, c),
                    lambda: split_dx(dY, W, dS, A, dropout_p, seed),
                    lambda: fused_variants(tile_configs(dY.dtype, dY.device, A.shape[0])), rank=A.shape[0])


# ----------------------------------------------------------------------------
# Autograd: the forward op ``rankwise::lora_linear`` (kernels 1-2) with the
# backward op ``rankwise::lora_dx`` (kernel 4; kernels 3 and 5 are lowrank.py's),
# wired by ``lowrank.lora_function`` (custom op for torch.compile, autograd.Function
# twin for eager calls; setup_context and backward shared by the family).
# ----------------------------------------------------------------------------


def _lora_linear_fwd(x2: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     bias: Optional[torch.Tensor], scaling: float, dropout_p: float, seed: int,
                     path: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the layer on a 2-D x (kernels 1 and 2): returns ``(Y, S)``.

    S = dropout(x) @ A.T (M, r) is returned so that backward can save it (a
    custom op's intermediates are invisible to autograd otherwise); it is marked
    non-differentiable and ``lora_linear`` drops it. ``seed`` is ignored when
    ``dropout_p`` is 0. ``path`` picks kernel 2 (``"fused"``) or the split path
    (``"split"``: torch's GEMM, then the in-place low-rank tail), ``"auto"`` the
    measured choice on CUDA; the backward's dX follows the same rule.
    """
    S = lora_down(x2, lora_A, dropout_p, seed)
    return _fwd_path(x2, weight, S, lora_B, scaling, bias, path), S


def _lora_linear_fake(x2, weight, lora_A, lora_B, bias, scaling, dropout_p, seed, path="auto"):
    M = x2.shape[0]
    return x2.new_empty((M, weight.shape[0])), x2.new_empty((M, lora_A.shape[0]))


@torch.library.custom_op("rankwise::lora_dx", mutates_args=())
def _lora_dx_op(dY: torch.Tensor, weight: torch.Tensor, dS: torch.Tensor, lora_A: torch.Tensor,
                dropout_p: float, seed: int, path: str = "auto") -> torch.Tensor:
    """dX of kernel 4 (or of the split path, per ``path``), the dropout mask regenerated from ``seed``."""
    return _dx_path(dY, weight, dS, lora_A, dropout_p, seed, path)


@_lora_dx_op.register_fake
def _lora_dx_fake(dY, weight, dS, lora_A, dropout_p, seed, path="auto"):
    return dY.new_empty((dY.shape[0], lora_A.shape[1]))


LoRALinearFunction = lora_function(
    "lora_linear", _lora_linear_fwd, _lora_linear_fake, OpLayout(nf4=False, **ONE_ARM),
    KernelSet(lora_ds_db, _dx_path, lora_da), traced_kernels("lora_ds_db", "lora_dx", "lora_da"),
    "LoRALinearFunction", """The eager twin of ``rankwise::lora_linear``: same arguments, outputs and
    autograd formula, launchers called directly. Inputs validated, x 2-D.""")


# ----------------------------------------------------------------------------
# The torch path, public under its historical name
# ----------------------------------------------------------------------------

#: The plain-torch path of ``lora_linear`` (``backend="torch"``, and ``"auto"``
#: off CUDA): ``lora_torch.lora_linear_torch``, kept public under this name. It is
#: a backend, not an oracle: the tests compare both backends with a float64
#: reference of their own (``tests/helpers.py``).


# ----------------------------------------------------------------------------
# Public op: the one place where a dense and an NF4 base weight part ways
# ----------------------------------------------------------------------------


def lora_linear(x: torch.Tensor, weight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                bias: Optional[torch.Tensor] = None, dropout_p: float = 0.0, seed: Optional[int] = None,
                backend: str = "auto", path: str = "auto") -> torch.Tensor:
    """Fused LoRA linear layer.

    Returns ``x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T``.

    Args:
        x: input, shape ``(..., in_features)``; any strides.
        weight: frozen base weight, shape ``(out_features, in_features)`` (PEFT / nn.Linear
            layout), or an ``NF4Weight`` from ``rankwise.quant`` (4-bit base).
        lora_A: shape ``(r, in_features)``, r >= 1.
        lora_B: shape ``(out_features, r)``.
        scaling: the LoRA scale (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA).
        bias: optional, shape ``(out_features,)``.
        dropout_p: dropout probability on the LoRA branch's input (inverted dropout).
            The mask is regenerated from ``seed`` in the backward pass, never stored.
        seed: dropout seed; ``None`` draws one from torch's default generator, so
            ``torch.manual_seed`` makes runs reproducible. Masks are reproducible per backend.
        backend: ``"triton"`` (our kernels; on the CPU only under ``TRITON_INTERPRET=1``),
            ``"torch"`` (plain torch ops, ``lora_linear_torch``) or ``"auto"`` (Triton on
            CUDA, else torch).
        path: how the Triton backend does the two big GEMMs (forward Y and backward dX):
            ``"fused"`` (one Triton GEMM with the low-rank term in its accumulator),
            ``"split"`` (torch's GEMM, cuBLAS on CUDA, then one Triton kernel adding the
            low-rank term in place) or ``"auto"`` (on CUDA the faster of the two per
            shape, timed once and cached: ``kernels/tuning.py``; fused elsewhere).
            Ignored by the torch backend.

    Dtypes: x is fp32, fp16 or bf16 (any float for the torch backend); ``weight``,
    ``lora_A``, ``lora_B`` and ``bias`` are cast to x's dtype (differentiably), as
    PEFT does for the LoRA branch. Under ``torch.autocast`` everything is cast to
    the autocast dtype. Accumulation is fp32.

    Gradients flow to x, lora_A, lora_B, and to weight / bias only if they require grad.

    ``torch.compile(fullgraph=True)`` traces the Triton backend as opaque custom
    ops (forward and backward kernels). With dropout and ``seed=None`` the seed
    is drawn with ``.item()``, which needs ``torch._dynamo.config.capture_scalar_outputs
    = True`` to stay in the graph (otherwise one graph break per call).

    Returns:
        Tensor of shape ``(..., out_features)`` in the compute dtype.
    """
    if isinstance(weight, NF4Weight):  # the one dense / NF4 dispatch of the single-arm layer
        return nf4_lora_linear(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, backend, path=path)
    return one_arm_call(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, backend, path,
                        (LoRALinearFunction, torch.ops.rankwise.lora_linear))
