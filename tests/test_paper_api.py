"""The paper's public names in DC.py and SVCCA.py keep their signatures and shapes."""

from __future__ import annotations

import dcor
import numpy as np
import pytest
import torch

from DC import Distance_Correlation, distance_correlation_from_distmat, distance_matrix
from SVCCA import CCA, PWCCA, SVCCA


def test_dc_functions() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 5, generator=g), torch.randn(10, 3, generator=g)
    ref = dcor.distance_correlation_sqr(torch.nn.functional.normalize(x).double().numpy(),
                                        torch.nn.functional.normalize(y).double().numpy())
    assert float(Distance_Correlation(x, y)) == pytest.approx(ref, abs=1e-6)
    a, b = distance_matrix(x.double()), distance_matrix(y.double())
    assert a.shape == (10, 10)
    assert float(distance_correlation_from_distmat(a, b)) == pytest.approx(
        dcor.distance_correlation_sqr(x.double().numpy(), y.double().numpy()), abs=1e-6)


def test_svcca_functions_take_neurons_by_samples() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 200))
    b = np.vstack([a[:3] * 2 + 0.01 * rng.standard_normal((3, 200)), rng.standard_normal((2, 200))])
    rho = CCA(a, b)
    assert rho.shape == (5,) and rho[0] == pytest.approx(1.0, abs=1e-3) and np.all(np.diff(rho) <= 1e-12)
    assert SVCCA(a, b, thre=0.99).shape[0] <= 5
    assert SVCCA(a, b, thre=None, sv_num=2).shape == (2,)
    assert 0.0 < PWCCA(a, b) <= 1.0
    with pytest.raises(ValueError, match="neurons, samples"):
        SVCCA(a[0], b)
