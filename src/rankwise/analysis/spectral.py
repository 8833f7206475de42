"""Spectral analysis of weight updates.

Every function takes plain 2-D tensors and works on one matrix at a time, in
fp32 on the tensor's own device, so a caller that streams the updates of a
model never holds more than one ΔW (and its SVD) in memory.

For an update ``ΔW`` (LoRA: ``scaling * B @ A``; full SFT: ``W_tuned - W_base``)
with singular values ``σ_1 >= σ_2 >= ... >= 0``:

- effective rank (Roy & Vetterli): ``exp(H(p))`` with ``p_i = σ_i / Σ_j σ_j``
  and ``H`` the Shannon entropy in nats; equals ``k`` for ``k`` equal
  singular values and is at most ``rank(ΔW)``;
- stable rank: ``‖ΔW‖_F² / ‖ΔW‖_2² = Σ σ_i² / σ_1²``, at most ``rank(ΔW)``;
- energy in the top-k directions: ``Σ_{i<=k} σ_i² / Σ σ_i²``;
- Frobenius norm: ``sqrt(Σ σ_i²)``.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

__all__ = [
    "singular_values",
    "effective_rank",
    "stable_rank",
    "energy_top_k",
    "frobenius_norm",
    "spectrum_summary",
    "intruder_dimensions",
    "top_singular_similarity",
    "subspace_similarity",
]


def _as_matrix(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if x.is_complex():
        raise TypeError(f"{name} must be real, got dtype {x.dtype}")
    # fp64 stays fp64 (exact references in tests); everything else runs in fp32.
    return x.detach() if x.dtype == torch.float64 else x.detach().float()


def _svd(x: torch.Tensor):
    """Thin SVD ``x = U diag(S) Vh``; falls back to the CPU if the device solver fails."""
    try:
        return torch.linalg.svd(x, full_matrices=False)
    except RuntimeError:  # pragma: no cover - rare convergence failures of GPU solvers
        U, S, Vh = torch.linalg.svd(x.cpu(), full_matrices=False)
        return U.to(x.device), S.to(x.device), Vh.to(x.device)


def _check_k(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    return k


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D update, in descending order.

    Args:
        delta: ``(m, n)`` tensor, any real dtype (computed in fp32, or fp64 if given fp64).

    Returns:
        ``(min(m, n),)`` tensor on ``delta``'s device.
    """
    x = _as_matrix(delta, "delta")
    try:
        return torch.linalg.svdvals(x)
    except RuntimeError:  # pragma: no cover
        return torch.linalg.svdvals(x.cpu()).to(x.device)


def _sv(delta_or_sv, name="delta") -> torch.Tensor:
    """Accept either a matrix or an already computed 1-D vector of singular values."""
    if isinstance(delta_or_sv, torch.Tensor) and delta_or_sv.dim() == 1:
        s = delta_or_sv.detach()
        s = s if s.dtype == torch.float64 else s.float()
        if (s < 0).any():
            raise ValueError(f"{name}: singular values must be non-negative")
        return torch.sort(s, descending=True).values
    return singular_values(delta_or_sv)


def effective_rank(delta: torch.Tensor) -> float:
    """Effective rank ``exp(-Σ p_i log p_i)`` with ``p_i = σ_i / Σ σ_j``.

    Args:
        delta: ``(m, n)`` update, or a 1-D tensor of its singular values.

    Returns:
        A float in ``[1, rank(delta)]``; ``0.0`` for an all-zero update.
    """
    s = _sv(delta)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    h = -torch.special.xlogy(p, p).sum()
    return float(torch.exp(h))


def stable_rank(delta: torch.Tensor) -> float:
    """Stable rank ``‖Δ‖_F² / ‖Δ‖_2²`` (at most the rank); ``0.0`` for a zero update.

    Args:
        delta: ``(m, n)`` update, or a 1-D tensor of its singular values.
    """
    s = _sv(delta)
    top = s[0]
    if top <= 0:
        return 0.0
    return float((s.square().sum() / top.square()))


def energy_top_k(delta: torch.Tensor, k: int) -> float:
    """Share of ``‖Δ‖_F²`` held by the top-``k`` singular directions (``0.0`` for a zero update).

    Args:
        delta: ``(m, n)`` update, or a 1-D tensor of its singular values.
        k: number of leading directions, ``>= 1`` (capped at ``min(m, n)``).
    """
    k = _check_k(k)
    s2 = _sv(delta).square()
    total = s2.sum()
    if total <= 0:
        return 0.0
    return float(s2[:k].sum() / total)


def frobenius_norm(delta: torch.Tensor) -> float:
    """Frobenius norm of the update, computed in fp32 (fp64 if given fp64)."""
    return float(torch.linalg.matrix_norm(_as_matrix(delta, "delta"), ord="fro"))


def spectrum_summary(
    delta: torch.Tensor, top_k: Sequence[int] = (1, 4, 16), keep: int = 64
) -> dict:
    """All spectral scalars of one update from a single SVD.

    Args:
        delta: ``(m, n)`` update.
        top_k: the ``k`` values for :func:`energy_top_k`.
        keep: how many leading singular values to return (for spectrum plots).

    Returns:
        ``{"shape", "fro_norm", "spectral_norm", "effective_rank", "stable_rank",
        "energy_top": {k: share}, "singular_values": [... up to keep ...]}``.
    """
    x = _as_matrix(delta, "delta")
    s = _sv(x)
    out = {
        "shape": list(x.shape),
        "fro_norm": float(s.square().sum().sqrt()),
        "spectral_norm": float(s[0]),
        "effective_rank": effective_rank(s),
        "stable_rank": stable_rank(s),
        "energy_top": {str(int(k)): energy_top_k(s, int(k)) for k in top_k},
        "singular_values": [float(v) for v in s[: max(int(keep), 0)].cpu()],
    }
    return out


def _max_abs_cos(U_tuned_k: torch.Tensor, U_base: torch.Tensor) -> torch.Tensor:
    """For each column of ``U_tuned_k``: the largest |cos| with any column of ``U_base``."""
    return (U_tuned_k.transpose(0, 1) @ U_base).abs().amax(dim=1)


def intruder_dimensions(
    W_base: torch.Tensor,
    W_tuned: torch.Tensor,
    k: int = 10,
    eps: float = 0.5,
    *,
    return_similarities: bool = False,
):
    """Count intruder dimensions (Shuttleworth et al., 2024).

    A top-``k`` left singular vector of ``W_tuned`` is an intruder when its largest
    absolute cosine similarity with any left singular vector of ``W_base`` is
    below ``eps``: a direction fine-tuning introduced rather than re-weighted.

    Args:
        W_base: ``(m, n)`` pre-trained weight.
        W_tuned: ``(m, n)`` fine-tuned weight (same shape).
        k: number of leading singular vectors of ``W_tuned`` examined (capped at ``min(m, n)``).
        eps: similarity threshold in ``(0, 1]``.
        return_similarities: also return the ``(k,)`` tensor of largest similarities.

    Returns:
        The count (int), or ``(count, similarities)``.
    """
    Wb = _as_matrix(W_base, "W_base")
    Wt = _as_matrix(W_tuned, "W_tuned")
    if Wb.shape != Wt.shape:
        raise ValueError(f"W_base and W_tuned must have the same shape, got {tuple(Wb.shape)} and {tuple(Wt.shape)}")
    k = _check_k(k)
    if not (0.0 < float(eps) <= 1.0):
        raise ValueError(f"eps must be in (0, 1], got {eps}")
    Ub = _svd(Wb)[0]
    Ut = _svd(Wt.to(Wb.device, Wb.dtype))[0][:, :k]
    sims = _max_abs_cos(Ut, Ub)
    count = int((sims < eps).sum())
    return (count, sims) if return_similarities else count


def top_singular_similarity(W_base: torch.Tensor, W_tuned: torch.Tensor, k: int = 10) -> torch.Tensor:
    """|cos| between matching top-``k`` left singular vectors before and after fine-tuning.

    Entry ``i`` is ``|<u_i(W_base), u_i(W_tuned)>|`` (absolute value, since the sign
    of a singular vector is arbitrary). Values near 1 mean the leading directions
    kept their place; LoRA tends to keep them, full SFT to reshuffle them.

    Args:
        W_base, W_tuned: ``(m, n)`` weights of the same shape.
        k: number of leading directions (capped at ``min(m, n)``).

    Returns:
        ``(min(k, m, n),)`` fp32 tensor.
    """
    Wb = _as_matrix(W_base, "W_base")
    Wt = _as_matrix(W_tuned, "W_tuned")
    if Wb.shape != Wt.shape:
        raise ValueError(f"W_base and W_tuned must have the same shape, got {tuple(Wb.shape)} and {tuple(Wt.shape)}")
    k = _check_k(k)
    Ub = _svd(Wb)[0][:, :k]
    Ut = _svd(Wt.to(Wb.device, Wb.dtype))[0][:, :k]
    return (Ub * Ut).sum(dim=0).abs()


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor, i: int, j: int) -> float:
    """Normalised subspace similarity of two LoRA ``A`` matrices (Hu et al., 2021, §7.2).

    ``φ(A1, A2, i, j) = ‖U1_iᵀ U2_j‖_F² / min(i, j)``, where ``U1_i`` holds the top-``i``
    right singular vectors of ``A1`` (shape ``(r1, in)``) and ``U2_j`` the top-``j`` of
    ``A2``. It is 1 when one subspace contains the other and 0 when they are orthogonal.

    Args:
        A1: ``(r1, in_features)``; A2: ``(r2, in_features)``.
        i: ``1 <= i <= min(r1, in_features)``; j: ``1 <= j <= min(r2, in_features)``.
    """
    a1 = _as_matrix(A1, "A1")
    a2 = _as_matrix(A2, "A2")
    if a1.shape[1] != a2.shape[1]:
        raise ValueError(
            f"A1 and A2 must share in_features (dim 1), got {tuple(a1.shape)} and {tuple(a2.shape)}"
        )
    i, j = _check_k(i, "i"), _check_k(j, "j")
    if i > min(a1.shape):
        raise ValueError(f"i must be <= min(A1.shape) = {min(a1.shape)}, got {i}")
    if j > min(a2.shape):
        raise ValueError(f"j must be <= min(A2.shape) = {min(a2.shape)}, got {j}")
    V1 = _svd(a1)[2][:i]  # (i, in)
    V2 = _svd(a2.to(a1.device, a1.dtype))[2][:j]
    return float((V1 @ V2.transpose(0, 1)).square().sum() / min(i, j))


def subspace_similarity_grid(
    A1: torch.Tensor, A2: torch.Tensor, iis: Iterable[int], jjs: Iterable[int]
) -> list:
    """φ(A1, A2, i, j) for every pair in ``iis × jjs`` from one SVD of each matrix."""
    a1 = _as_matrix(A1, "A1")
    a2 = _as_matrix(A2, "A2").to(a1.device, a1.dtype)
    if a1.shape[1] != a2.shape[1]:
        raise ValueError(f"A1 and A2 must share in_features, got {tuple(a1.shape)} and {tuple(a2.shape)}")
    V1 = _svd(a1)[2]
    V2 = _svd(a2)[2]
    G = (V1 @ V2.transpose(0, 1)).square()  # (min r1, min r2)
    C = G.cumsum(0).cumsum(1)
    out = []
    for i in iis:
        row = []
        for j in jjs:
            if not (1 <= i <= G.shape[0] and 1 <= j <= G.shape[1]):
                raise ValueError(f"(i, j) = ({i}, {j}) out of range for ranks {tuple(G.shape)}")
            row.append(float(C[i - 1, j - 1] / min(i, j)))
        out.append(row)
    return out
