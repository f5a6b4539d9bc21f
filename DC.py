"""Paper-compatible distance-correlation functions (the names and signatures of the paper's DC.py).

Inputs are ``[samples, features]`` torch tensors as in the paper's code (its
``F.normalize`` works on rows). What each computes is what the paper's file
computes, which is not symmetric between the two functions:

- ``Distance_Correlation(latent, control)`` does **not** L2-normalise its
  inputs (the paper's normalisation lines are commented out);
- ``distance_matrix(X, normlaize=True)`` L2-normalises the rows by default and
  returns the **double-centred** distance matrix (the paper's keyword spelling
  ``normlaize`` is kept; ``normalize`` is accepted too);
- ``distance_correlation_from_distmat(A, B)`` takes two such matrices.

The layer-by-layer DC matrix of ``dc_analysis.py`` normalises rows (it builds
its matrices with ``distance_matrix``). Thin wrappers over :mod:`comflp.measures`.
"""

from __future__ import annotations

import torch

from comflp import measures as _m

__all__ = ["Distance_Correlation", "distance_matrix", "distance_correlation_from_distmat"]


def distance_matrix(X: torch.Tensor, normlaize: bool = True, *, normalize: bool | None = None) -> torch.Tensor:
    """X: [N, D] -> [N, N] double-centred Euclidean distances ``sqrt(||x_i - x_j||^2 + 1e-12)``.

    Rows are L2-normalised first unless ``normlaize`` (or ``normalize``) is False.
    """
    if normalize is not None:
        normlaize = normalize
    X = X.to(torch.float64)
    if normlaize:
        X = torch.nn.functional.normalize(X, dim=-1)
    return _m.double_centre(_m.distance_matrix(X))


def distance_correlation_from_distmat(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Squared distance correlation from two [N, N] double-centred distance matrices (biased).

    ``<A,B> / sqrt(<A,A><B,B> + 1e-9)`` with ``<A,B> = sum(A*B) / N^2``.
    """
    a, b = A.to(torch.float64), B.to(torch.float64)
    n2 = a.shape[0] * a.shape[1]
    ab, aa, bb = (a * b).sum() / n2, (a * a).sum() / n2, (b * b).sum() / n2
    return ab / torch.sqrt(aa * bb + _m.DC_DENOM_EPS)


def Distance_Correlation(latent: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """Squared distance correlation of [N, D1] and [N, D2], rows **not** normalised (the paper's function)."""
    return torch.tensor(_m.distance_correlation(latent, control, normalize_rows=False), dtype=torch.float64)
