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


# ----------------------------------------------------------------------------
# Tuned tiles of the big LoRA GEMMs (forward Y and dX, dense and NF4).
#
# A handful of (BM, BN, BK, num_warps, num_stages) per architecture and dtype
# family, after the configs of Triton's matmul tutorial (128x64 / 64x128 tiles
# with 4 warps and 4 stages, 128x128x32 with 8 warps) and what
# benchmarks/compile_check.py shows fits each architecture's shared memory
# without register spills: at most 64 fp32 accumulators per thread, since the
# dX kernel holds a second (BM, BK) accumulator with dropout (the tutorial's
# 128x256 and 256x128 tiles, and 128x128 with 4 warps, spilled 600-4600 bytes
# of stack in the dX kernel on sm_90; 64x128 tiles take 8 warps: with 4 they
# spilled 8-48 bytes in the dX kernels on sm_80, sm_89 and sm_90; NF4 fp32 tiles
# with 4 warps, or 128x64 with 8, spilled 370-7000 bytes: fp32 NF4 keeps 32x64x32). The heuristic config (``gemm_config`` /
# ``nf4_gemm_config``) always comes first and is what runs untuned; the rest are
# timed by ``tuning.py`` on CUDA on first use per shape. GROUP_M is 8 throughout.
# ----------------------------------------------------------------------------

#: (BM, BN, BK, num_warps, num_stages) per architecture family, kind and dtype family
TILES = {
    90: {
        ("dense", "16bit"): [(128, 64, 64, 4, 4), (64, 128, 64, 8, 4), (128, 128, 32, 8, 4)],
        ("dense", "fp32"): [(64, 128, 32, 8, 3), (64, 64, 32, 4, 4)],
        ("nf4", "16bit"): [(128, 64, 64, 4, 2), (128, 128, 32, 8, 3)],
        ("nf4", "fp32"): [(32, 64, 32, 8, 2)],
    },
    89: {
        ("dense", "16bit"): [(128, 64, 64, 4, 3), (64, 128, 32, 8, 4), (128, 128, 32, 8, 4)],
        ("dense", "fp32"): [(64, 64, 32, 4, 3)],
        ("nf4", "16bit"): [(64, 128, 32, 8, 2), (128, 64, 32, 4, 2)],
        ("nf4", "fp32"): [(32, 64, 32, 8, 2)],
    },
    80: {
        ("dense", "16bit"): [(128, 64, 64, 4, 4), (64, 128, 64, 8, 4), (128, 128, 32, 8, 4)],
        ("dense", "fp32"): [(64, 64, 32, 4, 4), (64, 128, 32, 8, 3)],
        ("nf4", "16bit"): [(64, 128, 32, 8, 2), (128, 64, 32, 4, 2)],
        ("nf4", "fp32"): [(32, 64, 32, 8, 2)],
    },
}

#: bytes of shared memory per byte of one stage's operand tiles, NF4 GEMMs (its packed bytes,
#: scales, codebook and the dequantized W tile on top of x's; 128x128x64 bf16 with double
#: quantization needs ~256 KiB at three stages: benchmarks/compile_check.py)
NF4_SHARED_FACTOR = 2.7


def dtype_family(dtype: torch.dtype) -> str:
    """``"fp32"`` or ``"16bit"``: the two tile families of the GEMMs."""
    return "fp32" if dtype == torch.float32 else "16bit"


def device_arch(device: torch.device) -> int:
    """The architecture family whose tiles ``device`` takes: 90 (Hopper and newer, and
    the CPU, whose interpreter never uses them), 80 (A100) or 89 (the other parts
    below Hopper: RTX 3090/4090, A10, L4, with 99 KiB of shared memory per block).
    (benchmarks/compile_check.py replaces it to compile for a chosen architecture.)"""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9 and major != 12:
        return 90
    return 80 if (major, minor) == (8, 0) else 89


def config_name(cfg: dict) -> str:
    """``"BMxBNxBK-wW-sS"``: how a tile config is named in the tuning cache."""
    return f"{cfg['BM']}x{cfg['BN']}x{cfg['BK']}-w{cfg['num_warps']}-s{cfg['num_stages']}"


def shared_estimate(cfg: dict, dtype: torch.dtype, BR: int, nf4: bool = False) -> int:
    """Bytes of shared memory a GEMM config needs, estimated: its pipelined operand
    tiles (num_stages copies of the (BM, BK) and (BK, BN) tiles), or the low-rank
    tail's S and B tiles if larger; times ``NF4_SHARED_FACTOR`` for the NF4 GEMMs."""
    size = torch.finfo(dtype).bits // 8
    stage = (cfg["BM"] + cfg["BN"]) * cfg["BK"] * size
    total = max(cfg["num_stages"] * stage, (cfg["BM"] + cfg["BN"]) * BR * size)
    return int(total * NF4_SHARED_FACTOR) if nf4 else total


def gemm_configs(default: dict, dtype: torch.dtype, device: torch.device, BR: int, nf4: bool = False) -> list:
    """The tile configs a GEMM may be tuned over on ``device``: ``default`` (today's
    heuristic, what runs untuned) first, then ``TILES`` of the device's architecture
    for the kind and dtype family whose estimated shared memory fits the device's
    (``shared_estimate``), without duplicates. Under the interpreter only ``default``."""
    configs = [default]
    if INTERPRET:
        return configs
    limit = max_shared_memory(device)
    for bm, bn, bk, warps, stages in TILES[device_arch(device)][("nf4" if nf4 else "dense", dtype_family(dtype))]:
        cfg = dict(BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
        if shared_estimate(cfg, dtype, BR, nf4) <= limit and config_name(cfg) not in map(config_name, configs):
            configs.append(cfg)
    return configs


def fused_variants(configs: list) -> dict:
    """``{"fused:<config name>": config}`` of the configs after the first (the default,
    cached as plain ``"fused"``): the other fused choices ``tuning.py`` may time and cache."""
    return {f"fused:{config_name(c)}": c for c in configs[1:]}


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
