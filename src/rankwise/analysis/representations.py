"""Representation drift: linear CKA between base and tuned hidden states.

Linear centred kernel alignment (Kornblith et al., 2019) of two representations
``X (n, d1)`` and ``Y (n, d2)`` of the same ``n`` inputs, columns centred:

    CKA(X, Y) = ‖Yᵀ X‖_F² / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F)

It lies in ``[0, 1]``, is 1 for ``Y = X``, and is invariant to orthogonal
transforms and isotropic scaling of either side. When ``n < d`` the same value is
computed from the ``n × n`` Gram matrices, which is cheaper. Collecting the
hidden states of base and tuned model is :mod:`rankwise.analysis.probe`'s job
(``compare_representations``).
"""
from __future__ import annotations

import torch

__all__ = ["linear_cka"]


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same inputs.

    Args:
        X: ``(n, d1)``; Y: ``(n, d2)``; rows are examples (tokens), ``n >= 2``.

    Returns:
        A float in ``[0, 1]`` (computed in fp64); ``0.0`` if either side is constant.
    """
    for name, t in (("X", X), ("Y", Y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (n, d) tensor, got {getattr(t, 'shape', type(t))}")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must have the same number of rows, got {X.shape[0]} and {Y.shape[0]}")
    if X.shape[0] < 2:
        raise ValueError(f"need at least 2 rows, got {X.shape[0]}")
    x = X.detach().double()
    y = Y.detach().double().to(x.device)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    n = x.shape[0]
    if n < max(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T  # ‖YᵀX‖_F² = <Kx, Ky>, ‖XᵀX‖_F = ‖Kx‖_F
        num = (kx * ky).sum()
        den = torch.linalg.matrix_norm(kx) * torch.linalg.matrix_norm(ky)
    else:
        num = (y.T @ x).square().sum()
        den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if den <= 0:
        return 0.0
    return float((num / den).clamp(0.0, 1.0))
