"""Paper-compatible SVCCA / PWCCA / CCA functions (the names and signatures of the paper's SVCCA.py).

Inputs are numpy arrays ``[neurons, samples]`` as in google/svcca's cca_core.
Thin wrappers over :mod:`comflp.measures` (which takes [samples, neurons]).
"""

from __future__ import annotations

import numpy as np
import torch

from comflp import measures as _m

__all__ = ["SVCCA", "PWCCA", "CCA"]


def _samples_first(acts: np.ndarray) -> torch.Tensor:
    acts = np.asarray(acts, dtype=np.float64)
    if acts.ndim != 2:
        raise ValueError(f"activations must be [neurons, samples], got shape {acts.shape}")
    return torch.from_numpy(acts.T.copy())


def SVCCA(acts1: np.ndarray, acts2: np.ndarray, thre: float | None = 0.99, sv_num: int = 50) -> np.ndarray:
    """SVCCA canonical correlations of acts1 [D1, N] and acts2 [D2, N], descending.

    Keep the top singular directions whose singular values first sum past ``thre``
    of the total; with ``thre=None`` keep a fixed ``sv_num`` directions instead.
    The paper's entry is the mean of the returned values.
    """
    x, y = _samples_first(acts1), _samples_first(acts2)
    if thre is None:
        cx, cy, cxy = _m.covariance(x), _m.covariance(y), _m.covariance(x, y)
        u1 = torch.linalg.eigh(cx)[1].flip(1)[:, :sv_num]
        u2 = torch.linalg.eigh(cy)[1].flip(1)[:, :sv_num]
        rho = _m.canonical_correlations(u1.T @ cx @ u1, u1.T @ cxy @ u2, u2.T @ cy @ u2)
    else:
        rho = _m.svcca(x, y, thre=thre)
    return rho.numpy()


def PWCCA(acts1: np.ndarray, acts2: np.ndarray) -> float:
    """google/svcca's ``pwcca.compute_pwcca(acts1, acts2, epsilon=1e-10)[0]`` for acts [neurons, samples].

    Weighted by the side with fewer (non-constant) neurons, acts1 on a tie;
    see :func:`comflp.measures.pwcca_from_moments` for the maths and the one
    place where it corrects google's code (its smaller-acts2 branch reads acts1).
    """
    return _m.pwcca(_samples_first(acts1), _samples_first(acts2))


def CCA(acts1: np.ndarray, acts2: np.ndarray) -> np.ndarray:
    """All canonical correlations of acts1 [D1, N] and acts2 [D2, N], descending."""
    x, y = _samples_first(acts1), _samples_first(acts2)
    return _m.canonical_correlations(_m.covariance(x), _m.covariance(x, y), _m.covariance(y)).numpy()
