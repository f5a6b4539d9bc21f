"""Measures against independent references: dcor, closed forms, and a QR-based CCA written here."""

from __future__ import annotations

import time

import dcor
import numpy as np
import pytest
import torch

from comflp.measures import (angular_matrix, cka_unbiased_matrix, cosine_matrix, covariance, dc_matrix,
                             distance_correlation, layer_side, layer_slices, linear_cka, map_on_threads,
                             matrix_from_cov, pair_value, pair_values, pwcca, svcca)


def _stack(layers: int = 4, n: int = 24, d: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    out = [base]
    for _ in range(layers - 1):
        out.append(torch.tanh(out[-1] @ torch.randn(d, d, generator=g, dtype=torch.float64) * 0.7)
                   + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64))
    return torch.stack(out)


def _unit_rows(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x, dim=-1).numpy()


@pytest.mark.parametrize("unbiased", [False, True])
def test_dc_equals_dcor(unbiased: bool) -> None:
    stack = _stack()
    m = dc_matrix(stack, unbiased=unbiased)
    ref_fn = dcor.u_distance_correlation_sqr if unbiased else dcor.distance_correlation_sqr
    for i in range(4):
        for j in range(4):
            if i != j:
                ref = ref_fn(_unit_rows(stack[i]), _unit_rows(stack[j]))
                assert m[i, j] == pytest.approx(ref, abs=2e-6)
                assert distance_correlation(stack[i], stack[j], unbiased=unbiased) == pytest.approx(ref, abs=2e-6)


def test_biased_dc_is_inflated_on_batches_of_four() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 4, 8, generator=g, dtype=torch.float64)
    assert dc_matrix(torch.stack([x, y]))[0, 1] > 0.5  # independent data, yet high
    big = torch.randn(2, 400, 8, generator=g, dtype=torch.float64)
    assert abs(float(dc_matrix(big, unbiased=True)[0, 1])) < 0.05


def test_cka_equals_closed_form() -> None:
    x, y = _stack(2, n=30, d=5, seed=2)
    xc, yc = x - x.mean(0), y - y.mean(0)
    # Gram-matrix form (Kornblith et al. eq. 2 via centred kernels)
    hsic = lambda k, l: torch.trace(k @ l)  # noqa: E731
    kx, ky = xc @ xc.T, yc @ yc.T
    ref = hsic(kx, ky) / torch.sqrt(hsic(kx, kx) * hsic(ky, ky))
    assert linear_cka(x, y) == pytest.approx(float(ref), rel=1e-10)


def test_unbiased_cka_equals_song_estimator_written_out() -> None:
    stack = _stack(2, n=12, d=4, seed=3)
    n = 12

    def hsic_u(k, l):
        k = k.clone().fill_diagonal_(0)
        l = l.clone().fill_diagonal_(0)
        one = torch.ones(n, dtype=torch.float64)
        return (torch.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))

    kx, ky = stack[0] @ stack[0].T, stack[1] @ stack[1].T
    ref = hsic_u(kx, ky) / torch.sqrt(hsic_u(kx, kx) * hsic_u(ky, ky))
    assert cka_unbiased_matrix(stack)[0, 1] == pytest.approx(float(ref), rel=1e-10)


def _qr_cca(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Canonical correlations as the cosines of principal angles: SVD of Qx^T Qy (samples in rows)."""
    qx, _ = np.linalg.qr(x - x.mean(0))
    qy, _ = np.linalg.qr(y - y.mean(0))
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


def _reduce(x: np.ndarray, thre: float) -> np.ndarray:
    """The paper's SVD reduction on [samples, features]: keep top directions whose s first sum past thre."""
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    k = int(np.searchsorted(np.cumsum(s) / s.sum(), thre, side="right")) + 1
    return u[:, :k] * s[:k]


@pytest.mark.parametrize("thre", [0.5, 0.9, 0.99])
def test_svcca_equals_independent_cca(thre: float) -> None:
    x, y = _stack(2, n=60, d=8, seed=4)
    ref = _qr_cca(_reduce(x.numpy(), thre), _reduce(y.numpy(), thre))
    got = svcca(x, y, thre=thre).numpy()
    np.testing.assert_allclose(np.sort(got), np.sort(ref)[-len(got):], atol=1e-8)
    assert len(got) == min(_reduce(x.numpy(), thre).shape[1], _reduce(y.numpy(), thre).shape[1])


def google_pwcca(acts1: np.ndarray, acts2: np.ndarray, epsilon: float = 1e-10) -> float:
    """A direct re-statement of google/svcca's ``pwcca.compute_pwcca(acts1, acts2, epsilon)[0]``.

    acts: [neurons, samples]. Step by step as cca_core.get_cca_similarity and
    pwcca.compute_pwcca do it (np.cov, max-abs rescaling, remove_small, pinv +
    eigh square roots, full SVD, QR of the directions), except that the branch
    for a smaller acts2 side uses acts2 (google's reads acts1 there).
    """
    numx = acts1.shape[0]
    cov = np.cov(acts1, acts2)
    sxx, sxy, syy = cov[:numx, :numx], cov[:numx, numx:], cov[numx:, numx:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    x_idxs, y_idxs = np.abs(np.diagonal(sxx)) >= epsilon, np.abs(np.diagonal(syy)) >= epsilon
    sxx = sxx[x_idxs][:, x_idxs] + epsilon * np.eye(x_idxs.sum())
    syy = syy[y_idxs][:, y_idxs] + epsilon * np.eye(y_idxs.sum())
    sxy = sxy[x_idxs][:, y_idxs]

    def sqrtm(a):
        w, v = np.linalg.eigh(a)
        return np.dot(v, np.dot(np.diag(np.sqrt(w)), np.conj(v).T))

    u, s, v = np.linalg.svd(np.dot(sqrtm(np.linalg.pinv(sxx)), np.dot(sxy, sqrtm(np.linalg.pinv(syy)))))
    s = np.abs(s)
    means1, means2 = np.mean(acts1, axis=1, keepdims=True), np.mean(acts2, axis=1, keepdims=True)
    if np.sum(x_idxs) <= np.sum(y_idxs):
        dirns = np.dot(u.T, acts1[x_idxs] - means1[x_idxs]) + means1[x_idxs]
        acts, idxs = acts1, x_idxs
    else:
        dirns = np.dot(v, acts2[y_idxs] - means2[y_idxs]) + means2[y_idxs]
        acts, idxs = acts2, y_idxs
    P, _ = np.linalg.qr(dirns.T)
    weights = np.sum(np.abs(np.dot(P.T, acts[idxs].T)), axis=1)
    weights = weights / np.sum(weights)
    return float(np.sum(weights * s))


@pytest.mark.parametrize("dx,dy", [(5, 5), (4, 7), (7, 4)])
def test_pwcca_equals_googles_definition(dx: int, dy: int) -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(120, 3, generator=g, dtype=torch.float64)
    # correlated sets with non-zero neuron means (google's weights use uncentred activations)
    x = base @ torch.randn(3, dx, generator=g, dtype=torch.float64) + 0.3 * torch.randn(120, dx, generator=g,
                                                                                        dtype=torch.float64) + 2.0
    y = base @ torch.randn(3, dy, generator=g, dtype=torch.float64) + 0.3 * torch.randn(120, dy, generator=g,
                                                                                        dtype=torch.float64) - 1.0
    ref = google_pwcca(x.numpy().T, y.numpy().T)
    assert pwcca(x, y) == pytest.approx(ref, abs=1e-9)
    assert 0.0 < ref <= 1.0


def test_pwcca_refuses_fewer_samples_than_neurons() -> None:
    x, y = _stack(2, n=4, d=6, seed=5)
    with pytest.raises(ValueError, match="samples"):
        pwcca(x, y)


def test_cosine_and_angular() -> None:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    stack = torch.stack([x, y])
    assert cosine_matrix(stack)[0, 1] == pytest.approx((np.sqrt(0.5) - 1.0) / 2)
    assert angular_matrix(stack)[0, 1] == pytest.approx(1 - (0.25 + 1.0) / 2)


def _all_matrices(stack: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = stack.permute(1, 0, 2).reshape(stack.shape[1], -1)
    cov = covariance(flat)
    dims = [stack.shape[2]] * stack.shape[0]
    return {
        "dc": dc_matrix(stack), "dc_unbiased": dc_matrix(stack, unbiased=True),
        "cka": matrix_from_cov(cov, dims, "cka"), "svcca": matrix_from_cov(cov, dims, "svcca"),
        "pwcca": matrix_from_cov(cov, dims, "pwcca", mean=flat.mean(0), count=flat.shape[0]),
        "cka_unbiased": cka_unbiased_matrix(stack),
        "cosine": cosine_matrix(stack), "angular": angular_matrix(stack),
    }


def test_symmetric_unit_diagonal_and_pairwise_agreement() -> None:
    stack = _stack(5, n=40, d=6, seed=6)
    mats = _all_matrices(stack)
    for name, m in mats.items():
        assert torch.allclose(m, m.T), name
        assert torch.all(torch.diagonal(m) == 1.0), name
        assert torch.isfinite(m).all(), name
    assert mats["cka"][1, 3] == pytest.approx(linear_cka(stack[1], stack[3]), rel=1e-10)
    assert mats["svcca"][0, 2] == pytest.approx(float(svcca(stack[0], stack[2]).mean()), rel=1e-10)
    assert mats["pwcca"][0, 2] == pytest.approx(pwcca(stack[0], stack[2]), rel=1e-10)


def test_invariance_to_rotation_and_isotropic_scaling() -> None:
    stack = _stack(3, n=30, d=6, seed=7)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8)))
    moved = stack.clone()
    moved[1] = 3.7 * stack[1] @ q
    before, after = _all_matrices(stack), _all_matrices(moved)
    for name in ("dc", "dc_unbiased", "cka", "cka_unbiased", "svcca"):
        torch.testing.assert_close(after[name], before[name], rtol=1e-7, atol=1e-7, msg=name)
    # PWCCA weights canonical variates by L1 sums over neurons: scale-free, but the neuron basis matters.
    scaled = stack.clone()
    scaled[1] = 3.7 * stack[1]
    torch.testing.assert_close(_all_matrices(scaled)["pwcca"], before["pwcca"], rtol=1e-7, atol=1e-7)


def test_constant_or_zero_layer_is_finite() -> None:
    stack = _stack(4, n=20, d=5, seed=9)
    stack[1] = 0.0
    stack[2] = 2.5
    for name, m in _all_matrices(stack).items():
        assert torch.isfinite(m).all(), name


@pytest.fixture
def two_threads():
    """Torch (and so the pair workers) on two threads for the test, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("measure", ["svcca", "pwcca", "cka"])
def test_pairs_on_worker_threads_equal_the_per_pair_reference(measure: str, two_threads) -> None:
    """pair_values (two worker threads) == pair_value pair by pair, in order, and == the pairwise measure."""
    stack = _stack(6, n=80, d=10, seed=12)
    stack[3, :, 4] = 0.0  # a dead neuron: PWCCA drops it, SVCCA's reduction and CKA ignore it
    flat = stack.permute(1, 0, 2).reshape(80, -1)
    mean = flat.mean(0)
    cov = covariance(flat)
    blk = layer_slices([10] * 6)
    sides = [layer_side(cov[b, b], measure, mean=mean[b]) for b in blk]
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    done = []
    got = pair_values([measure], {measure: sides}, pairs, lambda i, j: cov[blk[i], blk[j]], count=80,
                      progress=done.append)
    assert torch.get_num_threads() == 2 and len(done) == len(pairs)
    with torch.inference_mode():
        torch.set_num_threads(1)
        reference = [pair_value(measure, sides[i], sides[j], cov[blk[i], blk[j]], count=80) for i, j in pairs]
        torch.set_num_threads(2)
    pairwise = {"svcca": lambda x, y: float(svcca(x, y).mean()), "pwcca": pwcca, "cka": linear_cka}[measure]
    for (i, j), values, ref in zip(pairs, got, reference):
        assert values[measure] == pytest.approx(ref, abs=1e-8), (i, j)
        assert values[measure] == pytest.approx(pairwise(stack[i], stack[j]), abs=1e-8), (i, j)


def test_an_error_in_a_pair_worker_is_raised_and_threads_are_restored(two_threads) -> None:
    stack = _stack(3, n=5, d=8, seed=13)  # PWCCA needs at least as many samples as neurons
    flat = stack.permute(1, 0, 2).reshape(5, -1)
    cov, mean, blk = covariance(flat), flat.mean(0), layer_slices([8] * 3)
    sides = [layer_side(cov[b, b], "pwcca", mean=mean[b]) for b in blk]
    with pytest.raises(ValueError, match="at least as many samples as neurons"):
        pair_values(["pwcca"], {"pwcca": sides}, [(0, 1), (0, 2), (1, 2)], lambda i, j: cov[blk[i], blk[j]],
                    count=5)
    assert torch.get_num_threads() == 2


def test_map_on_threads_keeps_order_and_stops_at_an_error(two_threads) -> None:
    assert map_on_threads(lambda x: x * x, list(range(50))) == [x * x for x in range(50)]
    started = []

    def fails_at_three(x: int) -> int:
        started.append(x)
        if x == 3:
            raise ValueError("three")
        time.sleep(0.01)
        return x

    with pytest.raises(ValueError, match="three"):
        map_on_threads(fails_at_three, list(range(200)))
    assert len(started) < 50 and torch.get_num_threads() == 2  # the rest were dropped, not run
