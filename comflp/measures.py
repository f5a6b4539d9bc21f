"""Correlation measures between hidden states, pairwise and for all layer pairs at once.

Conventions. Inside comflp a set of activations is a tensor ``[samples, features]``
(N x D, torch's convention); the paper-compatible wrappers in ``DC.py`` and
``SVCCA.py`` take the paper's ``[neurons, samples]`` and transpose. A *stack* is
``[layers, samples, features]``: hidden states 0..L of the same samples. Every
all-pairs function returns an ``[L+1, L+1]`` float64 matrix that is symmetric
with unit diagonal (a similarity: higher = more alike), so the search can use
any of them.

Measures:

- **DC** (distance correlation, Szekely et al.), the paper's: rows are
  L2-normalised, ``a_ij = sqrt(||x_i - x_j||^2 + 1e-12)``, double-centred
  ``A = a - row mean - column mean + grand mean``; the biased estimator is
  ``dCor^2 = <A,B> / sqrt(<A,A><B,B> + 1e-9)`` with ``<A,B> = sum(A*B)/N^2``.
  The unbiased one U-centres instead (zero diagonal, ``1/(N-2)`` row/column
  terms, ``1/((N-1)(N-2))`` grand term) and divides by ``N(N-3)``; it needs N > 3.
- **SVCCA** (Raghu et al.): centre; keep the top singular directions whose
  singular values (not their squares) first sum to more than ``thre`` of the
  total; the entry is the mean canonical correlation between the two reduced sets.
- **PWCCA** (Morcos et al.), exactly google/svcca's ``pwcca.compute_pwcca(acts1,
  acts2, epsilon=1e-10)[0]``, which the paper's SVCCA.py wraps: canonical
  correlations of the full sets, weighted by how much of the smaller side's
  (uncentred) activations each of its canonical directions accounts for (see
  :func:`pwcca_from_moments`).
- **Linear CKA** (Kornblith et al.): ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``
  (biased HSIC); the unbiased variant uses the unbiased HSIC estimator of Song
  et al. on Gram matrices.
- **cosine**: mean over samples of ``cos(x_n, y_n)``; ShortGPT's block influence
  is ``1 - cosine``.
- **angular**: ``1 - mean_n arccos(cos(x_n, y_n)) / pi``, one minus the angular
  distance of Gromov et al., so that it is a similarity like the others.

A constant or all-zero layer never yields NaN: denominators carry an epsilon
and degenerate covariances are pseudo-inverted.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import scipy.linalg
import torch

DC_DIST_EPS = 1e-12  # inside the square root of the distance, as the paper
DC_DENOM_EPS = 1e-9  # inside the square root of the denominator, as the paper
_EIG_RTOL = 1e-10  # eigenvalues below this fraction of the largest count as zero


# ----------------------------------------------------------------------------------------------
# distance correlation


def distance_matrix(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances with the paper's epsilon.

    x: [..., N, D] -> [..., N, N], ``sqrt(||x_i - x_j||^2 + 1e-12)``.
    """
    sq = (x.unsqueeze(-2) - x.unsqueeze(-3)).pow(2).sum(-1)
    return torch.sqrt(sq + DC_DIST_EPS)


def double_centre(a: torch.Tensor) -> torch.Tensor:
    """Biased double centring: ``a - mean over rows - mean over columns + grand mean``. a: [..., N, N]."""
    return a - a.mean(-2, keepdim=True) - a.mean(-1, keepdim=True) + a.mean((-2, -1), keepdim=True)


def u_centre(a: torch.Tensor) -> torch.Tensor:
    """U-centring (Szekely & Rizzo 2014), zero diagonal. a: [..., N, N], N > 3."""
    n = a.shape[-1]
    if n <= 3:
        raise ValueError(f"the unbiased estimator needs more than 3 samples, got {n}")
    row = a.sum(-1, keepdim=True) / (n - 2)
    col = a.sum(-2, keepdim=True) / (n - 2)
    grand = a.sum((-2, -1), keepdim=True) / ((n - 1) * (n - 2))
    out = a - row - col + grand
    return out * (1 - torch.eye(n, dtype=a.dtype, device=a.device))


def _centred_distances(stack: torch.Tensor, unbiased: bool, normalize_rows: bool = True) -> tuple[torch.Tensor, float]:
    """stack [L, N, D] -> (centred distance matrices flattened [L, N*N], inner-product scale)."""
    x = stack.to(torch.float64)
    if normalize_rows:
        x = torch.nn.functional.normalize(x, dim=-1)
    a = distance_matrix(x)
    n = a.shape[-1]
    if unbiased:
        return u_centre(a).flatten(1), 1.0 / (n * (n - 3))
    return double_centre(a).flatten(1), 1.0 / (n * n)


def dc_matrix(stack: torch.Tensor, *, unbiased: bool = False) -> torch.Tensor:
    """All-pairs squared distance correlation of one batch.

    stack: [L, N, D] (L layers of the same N samples, e.g. mean-pooled states).
    Returns [L, L] float64: ``<A_i,A_j> / sqrt(<A_i,A_i><A_j,A_j> + 1e-9)`` with
    every layer's centred distance matrix stacked so all pairs come from one
    matrix product.
    """
    c, scale = _centred_distances(stack, unbiased)
    gram = (c @ c.T) * scale
    d = torch.diagonal(gram)
    out = gram / torch.sqrt(torch.outer(d, d) + DC_DENOM_EPS)
    if unbiased:
        out = out.clamp(min=-1.0, max=1.0)
    out.fill_diagonal_(1.0)
    return out


def distance_correlation(x: torch.Tensor, y: torch.Tensor, *, unbiased: bool = False,
                         normalize_rows: bool = True) -> float:
    """Squared distance correlation of two sets x [N, Dx], y [N, Dy].

    Rows are L2-normalised first unless ``normalize_rows=False`` (the paper's
    pairwise ``Distance_Correlation``, whose normalisation is commented out).
    """
    a, scale = _centred_distances(x[None], unbiased, normalize_rows)
    b, _ = _centred_distances(y[None], unbiased, normalize_rows)
    ab, aa, bb = (a * b).sum() * scale, (a * a).sum() * scale, (b * b).sum() * scale
    return float(ab / torch.sqrt(aa * bb + DC_DENOM_EPS))


# ----------------------------------------------------------------------------------------------
# covariance-based measures (SVCCA, PWCCA, CKA): computed from [D, D] blocks so they can be streamed


def _sym_eig(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    vals, vecs = torch.linalg.eigh(c)
    vals = vals.clamp(min=0)
    return vals.flip(0), vecs.flip(1)  # descending


def _inv_sqrt(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C^{-1/2} restricted to C's range, C^{1/2}) by eigendecomposition; null directions are dropped."""
    if c.numel() == 0:
        return c, c
    vals, vecs = _sym_eig(c)
    keep = vals > _EIG_RTOL * max(float(vals[0]), 1e-300)
    v, s = vecs[:, keep], vals[keep].sqrt()
    return v / s, v * s  # [D, r] each: x -> x @ (v/s) whitens, (v*s)(v*s)^T = C


def canonical_correlations(c11: torch.Tensor, c12: torch.Tensor, c22: torch.Tensor) -> torch.Tensor:
    """Canonical correlations from covariance blocks.

    c11: [D1, D1], c12: [D1, D2], c22: [D2, D2] (centred second moments of
    x and y over the same samples). Returns the singular values of
    ``C11^{-1/2} C12 C22^{-1/2}`` (pseudo-inverse square roots), descending,
    clipped to [0, 1]; empty if either side has no variance.
    """
    w1, _ = _inv_sqrt(c11)
    w2, _ = _inv_sqrt(c22)
    if w1.shape[1] == 0 or w2.shape[1] == 0:
        return torch.zeros(0, dtype=c11.dtype, device=c11.device)
    return torch.linalg.svdvals(w1.T @ c12 @ w2).clamp(0.0, 1.0)


def svcca_from_cov(c11: torch.Tensor, c12: torch.Tensor, c22: torch.Tensor, *, thre: float = 0.99) -> torch.Tensor:
    """SVCCA correlations from covariance blocks (see :func:`canonical_correlations` for shapes).

    The SVD of centred activations X [D, N] has singular values sqrt(eig(X X^T)),
    and the reduced set is U_k^T X, whose covariances are U_k^T C U_k; so the
    reduction and the CCA need only C11, C12, C22.
    """
    u1 = _svd_reduction(c11, thre)
    u2 = _svd_reduction(c22, thre)
    return canonical_correlations(u1.T @ c11 @ u1, u1.T @ c12 @ u2, u2.T @ c22 @ u2)


def _svd_reduction(c: torch.Tensor, thre: float) -> torch.Tensor:
    """Top singular directions [D, k] whose singular values first sum past ``thre`` of the total."""
    vals, vecs = _sym_eig(c)
    s = vals.sqrt()
    total = float(s.sum())
    if total <= 0:
        return vecs[:, :0]
    frac = torch.cumsum(s, 0) / total
    k = int(torch.searchsorted(frac, torch.tensor(thre, dtype=frac.dtype, device=frac.device), right=True)) + 1
    return vecs[:, : min(k, len(s))]


PWCCA_EPSILON = 1e-10  # the paper's SVCCA.py calls compute_pwcca(acts1, acts2, epsilon=1e-10)


def _google_sqrt(a: np.ndarray) -> np.ndarray:
    """google/svcca's ``positivedef_matrix_sqrt``: V diag(sqrt(w)) V^T from eigh (w clipped at 0, not NaN)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


@dataclass(frozen=True)
class _PwccaSide:
    """What google's PWCCA needs of one set of activations, computed once per layer.

    keep: [D] neurons kept (scaled variance >= epsilon); scale: max|C|;
    whiten: sqrtm(pinv(C_kk / scale + epsilon I)); cov, mean: the kept
    block of the (unscaled) centred moment and the kept neurons' means.
    """

    keep: np.ndarray
    scale: float
    whiten: np.ndarray
    cov: np.ndarray
    mean: np.ndarray


_BLAS = None


@contextlib.contextmanager
def numpy_threads_like_torch() -> Iterator[None]:
    """Within the block, numpy's BLAS uses as many threads as torch (``--threads``).

    PWCCA must run its SVD in numpy to reproduce google's definition, whose
    result depends on the SVD's sign convention (the means are added back to
    the canonical directions), so torch's SVD is not a substitute. Left alone,
    numpy's OpenBLAS starts a thread per core beside torch's; next to another
    busy process that measured 18x slower per 512-wide pair.
    """
    global _BLAS
    from threadpoolctl import ThreadpoolController

    if _BLAS is None:
        _BLAS = ThreadpoolController()
    with _BLAS.limit(limits=torch.get_num_threads(), user_api="blas"):
        yield


def _as_numpy(t) -> np.ndarray:
    return np.asarray(t.detach().cpu().double().numpy() if torch.is_tensor(t) else t, dtype=np.float64)


def _pwcca_side(c: torch.Tensor, mean: torch.Tensor, epsilon: float) -> _PwccaSide | None:
    c, mean = _as_numpy(c), _as_numpy(mean)
    scale = float(np.max(np.abs(c))) if c.size else 0.0
    if scale <= 0:
        return None
    keep = np.abs(np.diag(c / scale)) >= epsilon
    if not keep.any():
        return None
    kept = c if keep.all() else c[np.ix_(keep, keep)]  # (no copy of a layer's moment when every neuron is kept)
    whiten = _google_sqrt(np.linalg.pinv(kept / scale + epsilon * np.eye(keep.sum())))
    return _PwccaSide(keep, scale, whiten, kept, mean[keep])


def _pwcca_pair(x: _PwccaSide | None, y: _PwccaSide | None, c12: torch.Tensor, n: int) -> float:
    if x is None or y is None:
        return 0.0
    c12 = _as_numpy(c12)
    if not (x.keep.all() and y.keep.all()):  # the copy of the kept block only when a neuron is dropped
        c12 = c12[np.ix_(x.keep, y.keep)]
    u, s, vh = np.linalg.svd(x.whiten @ (c12 / np.sqrt(x.scale * y.scale)) @ y.whiten)
    s = np.abs(s)
    coef, side = (u.T, x) if len(x.mean) <= len(y.mean) else (vh, y)
    if n < len(side.mean):
        raise ValueError(f"PWCCA needs at least as many samples as neurons ({n} samples, {len(side.mean)} neurons)")
    nmm = n * np.outer(side.mean, side.mean)
    rotated = coef @ side.cov
    gram = rotated @ coef.T + nmm
    try:
        low = np.linalg.cholesky(gram)
    except np.linalg.LinAlgError:
        raise ValueError("PWCCA: the canonical directions are linearly dependent (too few distinct samples)") from None
    proj = scipy.linalg.solve_triangular(low, rotated + nmm, lower=True, check_finite=False)  # P^T X^T, [k, k]
    weights = np.abs(proj).sum(1)
    weights = weights / weights.sum()
    return float(np.sum(weights * s))


def pwcca_from_moments(c11: torch.Tensor, c12: torch.Tensor, c22: torch.Tensor, mean1: torch.Tensor,
                       mean2: torch.Tensor, n: int, *, epsilon: float = PWCCA_EPSILON) -> float:
    """google/svcca's PWCCA from the first and second moments of two sets of activations.

    c11 [D1, D1], c12 [D1, D2], c22 [D2, D2]: centred second moments (sums
    over the n samples; any common scale); mean1 [D1], mean2 [D2]: the
    neurons' means. The maths of ``pwcca.compute_pwcca(acts1, acts2, epsilon)``
    with ``acts`` [neurons, n]:

    1. Scale ``S11 = C11 / max|C11|``, ``S22 = C22 / max|C22|``,
       ``S12 = C12 / sqrt(max|C11| max|C22|)``; keep neurons with
       ``diag(S) >= epsilon``; add ``epsilon I`` to S11 and S22.
    2. ``W = sqrtm(pinv(S))`` for each side; ``U s V = svd(W11 S12 W22)``.
    3. The side with fewer kept neurons (x on a tie) gives the directions
       ``dirns = U^T (X - m) + m`` (y: ``V (Y - m) + m``), ``P`` = Q of
       ``qr(dirns^T)``, weights ``w_i = sum_j |(P^T X^T)_ij|`` with X not
       centred, normalised to sum 1; the result is ``sum_i w_i s_i``.

    Google's branch for a smaller y side reads ``acts1`` where ``acts2`` is
    meant; here the y side uses its own activations (the evident intent).

    Everything above follows from moments: ``dirns X^T = U^T C + n m m^T``
    and ``dirns dirns^T = U^T C U + n m m^T = L L^T`` (Cholesky), so
    ``P^T X^T = L^{-1} dirns X^T`` (QR's sign choices only flip rows, which
    the absolute value ignores). Needs n >= the smaller side's kept neurons,
    as google's does.
    """
    with numpy_threads_like_torch():
        return _pwcca_pair(_pwcca_side(c11, mean1, epsilon), _pwcca_side(c22, mean2, epsilon), c12, n)


def cka_from_cov(c11: torch.Tensor, c12: torch.Tensor, c22: torch.Tensor) -> float:
    """Linear CKA (biased HSIC): ``||C12||_F^2 / (||C11||_F ||C22||_F)``; 0 when a side is constant."""
    den = torch.linalg.matrix_norm(c11) * torch.linalg.matrix_norm(c22)
    if float(den) <= 0:
        return 0.0
    return float(torch.linalg.matrix_norm(c12) ** 2 / den)


def covariance(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Centred second moment ``Xc^T Yc`` of x [N, Dx], y [N, Dy] (no 1/N: the measures are scale-free)."""
    y = x if y is None else y
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    return (x - x.mean(0)).T @ (y - y.mean(0))


def svcca(x: torch.Tensor, y: torch.Tensor, *, thre: float = 0.99) -> torch.Tensor:
    """SVCCA correlations of x [N, Dx] and y [N, Dy] (samples in rows)."""
    return svcca_from_cov(covariance(x), covariance(x, y), covariance(y), thre=thre)


def pwcca(x: torch.Tensor, y: torch.Tensor, *, epsilon: float = PWCCA_EPSILON) -> float:
    """google/svcca's PWCCA of x [N, Dx] and y [N, Dy] (samples in rows); see :func:`pwcca_from_moments`."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    return pwcca_from_moments(covariance(x), covariance(x, y), covariance(y), x.mean(0), y.mean(0), x.shape[0],
                              epsilon=epsilon)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (biased HSIC) of x [N, Dx] and y [N, Dy]."""
    return cka_from_cov(covariance(x), covariance(x, y), covariance(y))


def _unbiased_hsic_gram(k: torch.Tensor) -> torch.Tensor:
    n = k.shape[-1]
    return k * (1 - torch.eye(n, dtype=k.dtype, device=k.device))


def cka_unbiased_matrix(stack: torch.Tensor) -> torch.Tensor:
    """All-pairs linear CKA with the unbiased HSIC estimator (Song et al. 2012) on one batch.

    stack: [L, N, D], N > 3. With K~ the Gram matrix with zeroed diagonal,
    ``HSIC_u(K, L) = [tr(K~L~) + 1^T K~ 1 1^T L~ 1 / ((N-1)(N-2)) - 2/(N-2) 1^T K~ L~ 1] / (N(N-3))``.
    """
    n = stack.shape[1]
    if n <= 3:
        raise ValueError(f"unbiased CKA needs more than 3 samples, got {n}")
    x = stack.to(torch.float64)
    k = _unbiased_hsic_gram(x @ x.transpose(1, 2))  # [L, N, N]
    flat = k.flatten(1)
    tr = flat @ flat.T
    sums = k.sum((1, 2))
    rows = k.sum(2)  # [L, N]
    hsic = (tr + torch.outer(sums, sums) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rows @ rows.T)) / (n * (n - 3))
    d = torch.diagonal(hsic).clamp(min=0)
    out = hsic / torch.sqrt(torch.outer(d, d)).clamp(min=1e-300)
    out[torch.outer(d, d) <= 0] = 0.0
    out.fill_diagonal_(1.0)
    return out


def cosine_sums(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair sums over samples of cos and of arccos/pi. stack: [L, N, D] -> ([L, L], [L, L])."""
    u = torch.nn.functional.normalize(stack.to(torch.float64), dim=-1)
    cos = torch.einsum("ind,jnd->ijn", u, u).clamp(-1.0, 1.0)
    return cos.sum(-1), (torch.arccos(cos) / math.pi).sum(-1)


def cosine_matrix(stack: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of matched samples for all layer pairs. stack: [L, N, D] -> [L, L]."""
    s, _ = cosine_sums(stack)
    out = s / stack.shape[1]
    out.fill_diagonal_(1.0)
    return out


def angular_matrix(stack: torch.Tensor) -> torch.Tensor:
    """One minus the mean angular distance of matched samples. stack: [L, N, D] -> [L, L]."""
    _, a = cosine_sums(stack)
    out = 1.0 - a / stack.shape[1]
    out.fill_diagonal_(1.0)
    return out


def layer_side(c: torch.Tensor, measure: str, *, thre: float = 0.99, mean: torch.Tensor | None = None):
    """What a covariance measure needs of one layer, from its centred second moment c [D, D].

    cka: ``||C||_F``; svcca: the whitening of the reduced set, ``W = U_k (U_k^T C U_k)^{-1/2}``
    [D, k]; pwcca: google's per-side quantities (:class:`_PwccaSide`, needs the layer's ``mean`` [D]).
    Computed once per layer, so a pair of layers costs one small SVD (:func:`pair_value`).
    """
    if measure == "cka":
        return torch.linalg.matrix_norm(c)
    if measure == "svcca":
        u = _svd_reduction(c, thre)
        w, _ = _inv_sqrt(u.T @ c @ u)
        return u @ w
    if measure == "pwcca":
        if mean is None:
            raise ValueError("pwcca needs the features' mean")
        return _pwcca_side(c, mean, PWCCA_EPSILON)
    raise ValueError(f"not a covariance measure: {measure}")


def pair_value(measure: str, side_i, side_j, c12: torch.Tensor, *, count: int | None = None) -> float:
    """The measure of layers i and j from their :func:`layer_side` and centred cross moment c12 [D_i, D_j].

    cka: ``||C12||_F^2 / (||C11||_F ||C22||_F)``; svcca: mean singular value of ``W_i^T C12 W_j``;
    pwcca: google's weighted mean (:func:`pwcca_from_moments`; needs the sample ``count``).
    """
    if measure == "cka":
        den = side_i * side_j
        return float(torch.linalg.matrix_norm(c12) ** 2 / den) if float(den) > 0 else 0.0
    if measure == "svcca":
        if side_i.shape[1] == 0 or side_j.shape[1] == 0:
            return 0.0
        return float(torch.linalg.svdvals(side_i.T @ c12 @ side_j).clamp(0.0, 1.0).mean())
    if measure == "pwcca":
        if count is None:
            raise ValueError("pwcca needs the sample count")
        return _pwcca_pair(side_i, side_j, c12, count)
    raise ValueError(f"not a covariance measure: {measure}")


def pair_values(measures: Sequence[str], sides: Mapping[str, Sequence], pairs: Sequence[tuple[int, int]],
                cross: Callable[[int, int], torch.Tensor], *, count: int | None = None,
                progress: Callable[[int], object] | None = None) -> list[dict[str, float]]:
    """Every covariance measure of many layer pairs at once: ``[{measure: pair_value(...)}]`` in ``pairs``' order.

    measures: names among svcca, pwcca, cka; sides[measure][i]: layer i's :func:`layer_side`; pairs: (i, j);
    cross(i, j): their centred cross moment C_ij [D_i, D_j], built when the pair is computed (so that only
    as many are held as pairs run at once). The values are exactly :func:`pair_value`'s, pair by pair.

    What is shared across pairs (each layer's reduction, whitening and norm) is computed once, in its side.
    What remains per pair is a few [k, k] products and one small decomposition (SVCCA's singular values,
    PWCCA's SVD, which must be numpy's LAPACK for google's sign convention), whose LAPACK calls barely
    use a second thread at these sizes (a 512-wide SVD: 67 ms on two threads, 81 ms on one); so the
    independent pairs run by :func:`map_on_threads`. ``progress(1)`` is called as each pair completes.
    """
    def one(pair: tuple[int, int]) -> dict[str, float]:
        i, j = pair
        c12 = cross(i, j)
        return {m: pair_value(m, sides[m][i], sides[m][j], c12, count=count) for m in measures}

    return map_on_threads(one, pairs, progress=progress)


T = TypeVar("T")
R = TypeVar("R")


def map_on_threads(fn: Callable[[T], R], items: Sequence[T], *,
                   progress: Callable[[int], object] | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on as many worker threads as torch has, each call single-threaded.

    For independent calls into LAPACK (torch's or numpy's, which release the GIL) on matrices too small
    for a second BLAS thread to pay; numpy's BLAS is held to one thread per worker too. ``progress(1)``
    after each call, in order. An exception in ``fn`` is raised here, once the calls running finish; the
    calls not started are dropped.
    """
    workers = torch.get_num_threads()
    out: list[R] = []
    if workers == 1 or len(items) < 2:
        with numpy_threads_like_torch():
            for x in items:
                out.append(fn(x))
                if progress:
                    progress(1)
        return out
    torch.set_num_threads(1)
    try:
        # Executor.map cancels the calls not yet started when one raises (or on Ctrl-C)
        with numpy_threads_like_torch(), ThreadPoolExecutor(workers) as pool:
            for value in pool.map(fn, items):
                out.append(value)
                if progress:
                    progress(1)
        return out
    finally:
        torch.set_num_threads(workers)


def layer_slices(dims: list[int]) -> list[slice]:
    """The feature columns of each layer when the layers' features sit side by side.

    >>> layer_slices([2, 3])
    [slice(0, 2, None), slice(2, 5, None)]
    """
    offsets = [0]
    for d in dims:
        offsets.append(offsets[-1] + d)
    return [slice(offsets[i], offsets[i + 1]) for i in range(len(dims))]


def matrix_from_cov(cov: torch.Tensor, dims: list[int], measure: str, *, thre: float = 0.99,
                    mean: torch.Tensor | None = None, count: int | None = None) -> torch.Tensor:
    """All-pairs SVCCA / PWCCA / CKA matrix from the covariance of the concatenated layers.

    cov: [sum(dims), sum(dims)], the centred second moment of all layers'
    features side by side; dims: the feature width of each layer. PWCCA also
    needs the features' ``mean`` [sum(dims)] and the sample ``count``; entry
    (i, j), i < j, is ``pwcca(layer i, layer j)`` (layer i weights on a tie
    of kept neurons), mirrored. See :func:`layer_side` and :func:`pair_value`.
    """
    if measure == "pwcca" and (mean is None or count is None):
        raise ValueError("pwcca needs the features' mean and the sample count")
    blk = layer_slices(dims)
    n = len(dims)
    out = torch.eye(n, dtype=torch.float64)
    sides = map_on_threads(lambda b: layer_side(cov[b, b], measure, thre=thre, mean=None if mean is None else mean[b]),
                           blk)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    values = pair_values([measure], {measure: sides}, pairs, lambda i, j: cov[blk[i], blk[j]], count=count)
    for (i, j), v in zip(pairs, values):
        out[i, j] = out[j, i] = v[measure]
    return out
