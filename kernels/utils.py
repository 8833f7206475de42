"""Small helpers shared by the kernel files: interpreter detection, block-size
choice, dtype checks. Nothing here launches a kernel."""
from __future__ import annotations

import os

import torch
import triton

# Triton picks the interpreter when the kernels are decorated, i.e. when the
# kernel modules are imported, so the flag is read once here.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: the ``backend`` argument of every op: "auto" is Triton on CUDA and torch otherwise
BACKENDS = ("auto", "triton", "torch")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def rank_block(r: int, cap: int = 64) -> int:
    """Block size for the rank dimension: a power of two >= 16 (tl.dot's minimum), at most ``cap``."""
    return max(16, min(cap, next_pow2(r)))


def upcast_for_dot(dtype: torch.dtype) -> bool:
    """Whether tiles are cast to fp32 before ``tl.dot``.

    The interpreter computes bf16 arithmetic on raw bit patterns, so there bf16
    tiles are upcast; on a GPU bf16 tiles go to the tensor cores as they are.
    """
    return INTERPRET and dtype == torch.bfloat16


def rounds_bf16_itself(dtype: torch.dtype) -> bool:
    """Whether a kernel storing ``dtype`` rounds with ``round_bf16`` first: bf16 under the
    interpreter, whose fp32 -> bf16 cast truncates (on a GPU the cast rounds to nearest)."""
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for fp32 ``tl.dot``: follow torch's TF32 setting for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def check_triton_tensor(t: torch.Tensor, name: str) -> None:
    """Raise a clear error when ``t`` cannot go through the Triton kernels."""
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"{name}: the Triton backend takes float16, bfloat16 or float32 tensors, got {t.dtype}; "
            "use backend='torch' for other dtypes"
        )
    require_gpu_or_interpreter(t.device, name, "or use backend='torch'")


def require_gpu_or_interpreter(device: torch.device, name: str, alternative: str) -> None:
    """Raise when a Triton kernel would be launched on CPU tensors outside the interpreter.
    (benchmarks/compile_check.py replaces it to compile the GPU kernels on a machine without one.)"""
    if device.type == "cpu" and not INTERPRET:
        raise RuntimeError(f"{name} is on the CPU: the Triton kernels run there only under the interpreter. "
                           f"Set TRITON_INTERPRET=1 before importing rankwise, {alternative}")


def fused_apply(function: type, op):
    """``op`` (a torch.library custom op) while torch.compile / export traces, else
    ``function.apply`` (its autograd.Function twin, cheaper to dispatch in eager mode)."""
    return op if torch.compiler.is_compiling() else function.apply


_CUDA_PROPERTIES: dict = {}


def cuda_properties(device: torch.device):
    """``torch.cuda.get_device_properties`` of ``device``, looked up once per device."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CUDA_PROPERTIES:
        _CUDA_PROPERTIES[idx] = torch.cuda.get_device_properties(idx)
    return _CUDA_PROPERTIES[idx]


def max_shared_memory(device: torch.device) -> int:
    """Shared memory one block may opt into on ``device``, in bytes (H100/H200: 232448;
    A100: 166912; RTX 3090/4090, A10, L4: 101376). CPU tensors (the interpreter): H100's.
    (benchmarks/compile_check.py replaces it to compile for a chosen architecture.)"""
    if device.type != "cuda":
        return 232448
    return int(getattr(cuda_properties(device), "shared_memory_per_block_optin", 0) or 101376)


def fit_shared_memory(cfg: dict, device: torch.device, BR: int, dtype: torch.dtype) -> dict:
    """``cfg`` for a device with less shared memory per block than Hopper (A100, RTX
    3090/4090, L4): rank blocks over 64 and fp32 tiles take two pipeline stages, and
    fp32 GEMMs BM=64, where three stages overflow 99 KiB (sm_89: 100-144 KiB at r=128
    or fp32; benchmarks/compile_check.py)."""
    if INTERPRET or max_shared_memory(device) >= 200 * 1024 or (BR <= 64 and dtype != torch.float32):
        return cfg
    cfg = dict(cfg, num_stages=min(cfg["num_stages"], 2))
    if dtype == torch.float32 and "GROUP_M" in cfg:
        cfg["BM"] = 64
    return cfg


def gemm_config(dtype: torch.dtype) -> dict:
    """Tile sizes and launch parameters of the large GEMM kernels."""
    if INTERPRET:  # fewer, larger programs are faster under the interpreter
        return dict(BM=32, BN=32, BK=32, GROUP_M=4, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BM=128, BN=64, BK=32, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3)


def skinny_config(dtype: torch.dtype) -> dict:
    """Tile sizes of the skinny (rank-sized) kernels."""
    if INTERPRET:
        return dict(BM=32, BN=32, BK=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BM=64, BN=64, BK=32, num_warps=4, num_stages=3)
    return dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=3)


import triton.language as tl  # noqa: E402


@triton.jit
def swizzle_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Map the 1-D program id to a (row-block, column-block) pair, GROUP_M row
    blocks at a time, so neighbouring programs share operand tiles in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m.to(tl.int64), pid_n.to(tl.int64)


@triton.jit
def dropout_keep(seed, rows, cols, K, p):
    """Keep-mask of inverted dropout for the elements (rows, cols) of a (M, K)
    input: Philox ``tl.rand`` of the flat element index, the same in every kernel
    that touches x, so the backward pass regenerates the forward mask."""
    offs = rows[:, None] * K + cols[None, :]
    return tl.rand(seed, offs) >= p


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32.

    The interpreter's fp32 -> bf16 cast truncates, so under it the kernels round
    with this first (the cast after it is then exact); on a GPU the cast itself
    rounds to nearest and this is not used. (NaN payloads may become inf here.)"""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)
