"""Paper-compatible distance-correlation functions (the names and signatures of the paper's DC.py).

Inputs are ``[samples, features]`` torch tensors as in the paper's code (its
``F.normalize`` works on rows). Thin wrappers over :mod:`comflp.measures`.
"""

from __future__ import annotations

import torch

from comflp import measures as _m

__all__ = ["Distance_Correlation", "distance_matrix", "distance_correlation_from_distmat"]


def distance_matrix(X: torch.Tensor) -> torch.Tensor:
    """X: [N, D] -> [N, N] Euclidean distances, ``sqrt(||x_i - x_j||^2 + 1e-12)``."""
    return _m.distance_matrix(X)


def distance_correlation_from_distmat(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Squared distance correlation from two [N, N] distance matrices (biased, double-centred)."""
    a, b = _m.double_centre(A.to(torch.float64)), _m.double_centre(B.to(torch.float64))
    n2 = A.shape[0] * A.shape[1]
    ab, aa, bb = (a * b).sum() / n2, (a * a).sum() / n2, (b * b).sum() / n2
    return ab / torch.sqrt(aa * bb + _m.DC_DENOM_EPS)


def Distance_Correlation(latent: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """Squared distance correlation of [N, D1] and [N, D2] after L2-normalising rows (the paper's DC)."""
    return torch.tensor(_m.distance_correlation(latent, control))
