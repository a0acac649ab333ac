"""tokvis.analysis.features: CKA, CCA family, PWCCA, Procrustes against independent formulations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group
from sklearn.cross_decomposition import CCA

from tokvis.analysis import features as F
from tokvis.errors import TraceMismatchError

SEED = 11

SCALARS = {
    "cka": F.linear_cka,
    "mean_cca": F.mean_cca,
    "mean_squared_cca": F.mean_squared_cca,
    "pwcca": F.pwcca,
    "procrustes": F.procrustes_distance,
}
SYMMETRIC = ["cka", "mean_cca", "mean_squared_cca", "procrustes"]
BEST = {"cka": 1.0, "mean_cca": 1.0, "mean_squared_cca": 1.0, "pwcca": 1.0, "procrustes": 0.0}


@pytest.fixture(scope="module")
def xy():
    """Well-conditioned features of 300 images sharing a 3-D latent, with different widths."""
    rng = np.random.default_rng(SEED)
    z = rng.normal(size=(300, 3))
    x = z @ rng.normal(size=(3, 6)) + 0.5 * rng.normal(size=(300, 6)) + 4.0
    y = z[:, :2] @ rng.normal(size=(2, 4)) + 0.8 * rng.normal(size=(300, 4)) - 2.0
    return x, y


def _centre(a):
    return a - a.mean(axis=0)


def hsic_cka(x, y):
    """CKA written directly with centring matrices H = I - 11^T / n and linear kernels."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


def test_cka_against_hsic_formula(xy):
    x, y = xy
    assert F.linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-10)
    # the Gram-matrix branch (few images, wide features)
    rng = np.random.default_rng(SEED)
    xw, yw = rng.normal(size=(12, 80)), rng.normal(size=(12, 50))
    assert F.linear_cka(xw, yw) == pytest.approx(hsic_cka(xw, yw), rel=1e-10)


def test_cca_against_eigenvalue_formulation(xy):
    x, y = xy
    xc, yc = _centre(x), _centre(y)
    sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    eig = np.linalg.eigvals(np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)).real
    ref = np.sqrt(np.clip(np.sort(eig)[::-1][: y.shape[1]], 0, 1))
    np.testing.assert_allclose(F.cca_coefficients(x, y), ref, rtol=1e-8)


def test_cca_against_sklearn(xy):
    x, y = xy
    k = 3
    model = CCA(n_components=k, scale=False, max_iter=20_000, tol=1e-14).fit(x, y)
    xs, ys = model.transform(x, y)
    ref = [abs(np.corrcoef(xs[:, i], ys[:, i])[0, 1]) for i in range(k)]
    np.testing.assert_allclose(F.cca_coefficients(x, y)[:k], ref, rtol=1e-6)


def test_cca_summaries(xy):
    x, y = xy
    rho = F.cca_coefficients(x, y)
    assert rho.shape == (4,) and np.all(np.diff(rho) <= 0)
    assert F.mean_cca(x, y) == pytest.approx(rho.mean())
    assert F.mean_squared_cca(x, y) == pytest.approx(np.mean(rho**2))
    assert F.cca_coefficients(x, y, n_components=2).shape == (2,)


def test_pwcca_weights_follow_x(xy):
    x, y = xy
    rho = F.cca_coefficients(x, y)
    value = F.pwcca(x, y)
    assert rho.min() <= value <= rho.max()
    # reference: weights = summed |projection| of X's centred neurons on X's canonical variates,
    # variates obtained independently from the generalised eigenproblem
    xc, yc = _centre(x), _centre(y)
    sxx, syy, sxy = xc.T @ xc, yc.T @ yc, xc.T @ yc
    eigval, eigvec = np.linalg.eig(np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T))
    order = np.argsort(eigval.real)[::-1][: y.shape[1]]
    variates = xc @ eigvec.real[:, order]
    variates /= np.linalg.norm(variates, axis=0)
    alpha = np.abs(variates.T @ xc).sum(axis=1)
    ref = (alpha * np.sqrt(np.clip(eigval.real[order], 0, 1))).sum() / alpha.sum()
    assert value == pytest.approx(ref, rel=1e-7)


def test_procrustes_against_scipy(xy):
    x, y = xy
    a = _centre(x) / np.linalg.norm(_centre(x))
    b = _centre(y) / np.linalg.norm(_centre(y))
    b = np.hstack([b, np.zeros((b.shape[0], a.shape[1] - b.shape[1]))])  # pad to the same width
    r, _ = orthogonal_procrustes(b, a)
    ref = np.linalg.norm(b @ r - a) ** 2
    assert F.procrustes_distance(x, y) == pytest.approx(ref, rel=1e-10)


# --------------------------------------------------------------------------------------------
# properties, parametrised over every measure
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCALARS))
def test_identity_gives_the_best_value(xy, name):
    x, _ = xy
    assert SCALARS[name](x, x) == pytest.approx(BEST[name], abs=1e-10)


@pytest.mark.parametrize("name", SYMMETRIC)
def test_symmetry(xy, name):
    x, y = xy
    assert SCALARS[name](x, y) == pytest.approx(SCALARS[name](y, x), rel=1e-10)


def test_pwcca_is_not_symmetric(xy):
    x, y = xy
    assert F.pwcca(x, y) != pytest.approx(F.pwcca(y, x), rel=1e-3)


@pytest.mark.parametrize("name", list(SCALARS))
def test_invariance_to_rotation_scale_and_translation(xy, name):
    x, y = xy
    qx = ortho_group.rvs(x.shape[1], random_state=SEED)
    qy = ortho_group.rvs(y.shape[1], random_state=SEED + 1)
    ref = SCALARS[name](x, y)
    assert SCALARS[name](x, 0.2 * y @ qy - 1.0) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert SCALARS[name](3.5 * x + 10.0, y) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    if name != "pwcca":  # PWCCA weighs X's individual features: it depends on X's basis
        assert SCALARS[name](x @ qx, y) == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_pwcca_depends_on_the_basis_of_x(xy):
    x, y = xy
    qx = ortho_group.rvs(x.shape[1], random_state=SEED)
    assert F.pwcca(x @ qx, y) != pytest.approx(F.pwcca(x, y), rel=1e-3)


@pytest.mark.parametrize("name", list(SCALARS))
def test_bounds_and_plain_float(xy, name):
    x, y = xy
    value = SCALARS[name](x, y)
    assert type(value) is float
    assert 0.0 <= value <= (2.0 if name == "procrustes" else 1.0)


@pytest.mark.parametrize("name", list(SCALARS))
def test_constant_features_are_finite(name):
    rng = np.random.default_rng(SEED)
    const, other = np.full((10, 3), 0.1), rng.normal(size=(10, 2))
    both, one = SCALARS[name](const, np.full((10, 5), 7.0)), SCALARS[name](const, other)
    assert np.isfinite(both) and np.isfinite(one)
    assert both == BEST[name]
    assert one == (1.0 if name == "procrustes" else 0.0)
    assert F.cca_coefficients(const, other).shape == (0,)


def test_few_images_warns_and_truncation_helps():
    rng = np.random.default_rng(SEED)
    x, y = rng.normal(size=(10, 40)), rng.normal(size=(10, 30))  # independent noise
    with pytest.warns(RuntimeWarning, match="by construction"):
        rho = F.cca_coefficients(x, y)
    np.testing.assert_allclose(rho, 1.0)  # spaces span everything: trivially correlated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        truncated = F.cca_coefficients(x, y, n_components=3)
    assert truncated.shape == (3,) and truncated[0] < 1.0
    # CKA and Procrustes need no truncation
    assert 0 < F.linear_cka(x, y) < 1 and 0 < F.procrustes_distance(x, y) < 2


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: F.linear_cka(np.ones((4, 2)), np.ones((5, 2))), TraceMismatchError, r"X has 4, Y has 5"),
        (lambda: F.linear_cka(np.ones(4), np.ones(4)), ValueError, r"X must be 2-D"),
        (lambda: F.linear_cka(np.ones((1, 2)), np.ones((1, 2))), ValueError, r"at least 2 images"),
        (lambda: F.mean_cca([[np.nan, 1], [1, 2]], [[1], [2]]), ValueError, r"finite"),
        (lambda: F.mean_cca(np.eye(3), np.eye(3), n_components=0), ValueError, r"n_components"),
        (lambda: F.mean_cca(np.eye(3), np.eye(3), tol=2.0), ValueError, r"tol"),
    ],
)
def test_validation(call, error, message):
    with pytest.raises(error, match=message):
        call()
