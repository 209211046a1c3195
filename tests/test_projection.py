"""Random projections: Johnson-Lindenstrauss distortion, determinism, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from vestigia.projection import RandomProjection

# The normalised error of a projected inner product,
#   z = (<Ru, Rv> - <u, v>) / sqrt((||u||^2 ||v||^2 + <u, v>^2) / k),
# has unit variance for Gaussian R (and slightly less for Rademacher, by 2 sum u_j^2 v_j^2 / k,
# negligible for dense vectors). Its root mean square over 780 pairs estimates 1 within about
# 5% (one standard error) if the distortion shrinks like 1/sqrt(k); JL_BAND allows 4 of them.
JL_BAND = (0.8, 1.2)


def _vectors(n: int = 40, width: int = 2000) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, width)).astype("float32")


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_product_distortion_shrinks_like_inverse_sqrt_k(kind: str) -> None:
    x = _vectors()
    exact = x.astype(np.float64) @ x.T.astype(np.float64)
    norms = np.diag(exact)
    upper = np.triu_indices(len(x), 1)
    rms = {}
    for k in (64, 256, 1024):
        z = RandomProjection(x.shape[1], k, kind=kind, seed=3, block_size=300)(x).numpy().astype(np.float64)
        scale = np.sqrt((np.outer(norms, norms) + exact**2) / k)
        rms[k] = float(np.sqrt(np.mean(((z @ z.T - exact) / scale)[upper] ** 2)))
        assert JL_BAND[0] < rms[k] < JL_BAND[1], (k, rms[k])
    # The unscaled error itself falls by about 2 from one k to the next (4 times as many dimensions).
    raw = {k: rms[k] / np.sqrt(k) for k in rms}
    np.testing.assert_allclose([raw[64] / raw[256], raw[256] / raw[1024]], [2.0, 2.0], rtol=0.3)


def test_projection_is_a_linear_map_by_the_generated_blocks() -> None:
    x = _vectors(7, 1000)
    projection = RandomProjection(1000, 50, kind="gaussian", seed=1, block_size=128)
    matrix = projection.matrix().numpy()
    assert matrix.shape == (1000, 50)
    np.testing.assert_allclose(projection(x).numpy(), x @ matrix, rtol=1e-4, atol=1e-4)
    # Rademacher entries are +-1/sqrt(k), about half of each sign.
    signs = RandomProjection(1000, 50, seed=1).matrix().numpy() * np.sqrt(50)
    np.testing.assert_allclose(np.abs(signs), 1.0)
    assert 0.45 < float((signs > 0).mean()) < 0.55


def test_projection_is_deterministic_across_batchings_and_instances() -> None:
    x = _vectors(23, 900)
    whole = RandomProjection(900, 40, seed=7, block_size=200)(x).numpy()
    again = RandomProjection(900, 40, seed=7, block_size=200)
    pieces = np.concatenate([again(x[:1]).numpy(), again(x[1:16]).numpy(), again(x[16:]).numpy()])
    np.testing.assert_array_equal(pieces, whole)
    other_seed = RandomProjection(900, 40, seed=8, block_size=200)(x).numpy()
    assert np.abs(other_seed - whole).max() > 0.1


def test_projection_dimension_above_parameter_count_is_refused() -> None:
    with pytest.raises(ValueError, match=r"projection_dim.*at most.*\(10\).*projection_dim=11"):
        RandomProjection(10, 11)
    with pytest.raises(ValueError, match="kind"):
        RandomProjection(10, 5, kind="sparse")
    with pytest.raises(ValueError, match=r"shape \(batch, 10\)"):
        RandomProjection(10, 5)(np.zeros((2, 9), "float32"))
