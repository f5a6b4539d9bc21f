"""The paper's public names in DC.py and SVCCA.py keep their signatures and shapes."""

from __future__ import annotations

import dcor
import numpy as np
import pytest
import torch

from DC import Distance_Correlation, distance_correlation_from_distmat, distance_matrix
from SVCCA import CCA, PWCCA, SVCCA


def _restated_paper_dc(x: torch.Tensor, y: torch.Tensor, normalise: bool) -> float:
    """The paper's formulas written out: distances with +1e-12 inside the root, double centring, 1e-9 in the root."""
    def centred(z):
        z = z.double()
        if normalise:
            z = z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)
        a = torch.sqrt(((z[None] - z[:, None]) ** 2).sum(-1) + 1e-12)
        return a - a.mean(0, keepdim=True) - a.mean(1, keepdim=True) + a.mean()
    a, b = centred(x), centred(y)
    n2 = a.numel()
    return float(((a * b).sum() / n2) / torch.sqrt((a * a).sum() / n2 * ((b * b).sum() / n2) + 1e-9))


def test_dc_functions() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 5, generator=g) * 3 + 1, torch.randn(10, 3, generator=g)
    # Distance_Correlation: no normalisation (commented out in the paper's file)
    assert float(Distance_Correlation(x, y)) == pytest.approx(_restated_paper_dc(x, y, False), abs=1e-9)
    assert float(Distance_Correlation(x, y)) == pytest.approx(
        dcor.distance_correlation_sqr(x.double().numpy(), y.double().numpy()), abs=1e-5)
    # distance_matrix: normalised and double-centred by default
    a, b = distance_matrix(x), distance_matrix(y)
    assert a.shape == (10, 10) and float(a.sum(0).abs().max()) < 1e-9  # double-centred
    assert float(distance_correlation_from_distmat(a, b)) == pytest.approx(_restated_paper_dc(x, y, True), abs=1e-9)
    raw = distance_matrix(x, normlaize=False)
    torch.testing.assert_close(raw, distance_matrix(x, normalize=False))
    assert float(distance_correlation_from_distmat(raw, distance_matrix(y, normlaize=False))) == pytest.approx(
        _restated_paper_dc(x, y, False), abs=1e-9)


def test_svcca_functions_take_neurons_by_samples() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 200))
    b = np.vstack([a[:3] * 2 + 0.01 * rng.standard_normal((3, 200)), rng.standard_normal((2, 200))])
    rho = CCA(a, b)
    assert rho.shape == (5,) and rho[0] == pytest.approx(1.0, abs=1e-3) and np.all(np.diff(rho) <= 1e-12)
    assert SVCCA(a, b, thre=0.99).shape[0] <= 5
    assert SVCCA(a, b, thre=None, sv_num=2).shape == (2,)
    assert 0.0 < PWCCA(a, b) <= 1.0
    from test_measures import google_pwcca

    assert PWCCA(a, b) == pytest.approx(google_pwcca(a, b, epsilon=1e-10), abs=1e-9)
    with pytest.raises(ValueError, match="neurons, samples"):
        SVCCA(a[0], b)
