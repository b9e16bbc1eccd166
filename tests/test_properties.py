"""Properties every fit must have, over data that hypothesis draws: invariance under row order and level labels,
the exact effect of an affine change of the response, determinism, and thread safety."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsemix

FORMULA = "y ~ x + (1 + x | g) + (1 | h)"
# derandomize: the same examples in every run (CI must not depend on which data hypothesis happens to draw)
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _data(seed: int, n: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_g, n_h = 8 + seed % 7, 5 + seed % 4
    g, h, x = rng.integers(0, n_g, n), rng.integers(0, n_h, n), rng.normal(size=n)
    y = (
        1.0
        + 0.5 * x
        + rng.normal(size=n_g)[g]
        + 0.6 * x * rng.normal(size=n_g)[g]
        + 0.8 * rng.normal(size=n_h)[h]
        + rng.normal(size=n)
    )
    return pd.DataFrame({"y": y, "x": x, "g": g, "h": h})


def _fit(data, formula=FORMULA, **kw):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular fits are fine here: the properties hold for them too
        return sparsemix.lmer(formula, data, **kw)


def _assert_same_fit(a, b, rtol=1e-8):
    # Sums added in another order send BOBYQA on another path; its end point is free by ~1e-5 along flat
    # directions, and the final Newton step (optimize.newton_polish) is what makes the estimates agree to 1e-8.
    assert b.llf == pytest.approx(a.llf, rel=rtol)
    np.testing.assert_allclose(b.theta, a.theta, rtol=rtol, atol=1e-10)
    np.testing.assert_allclose(b.fe_params.to_numpy(), a.fe_params.to_numpy(), rtol=rtol, atol=1e-10)
    np.testing.assert_allclose(b.bse_fe.to_numpy(), a.bse_fe.to_numpy(), rtol=rtol)
    vc_a, vc_b = a.variance_components(), b.variance_components()
    np.testing.assert_allclose(vc_b["vcov"].to_numpy(), vc_a["vcov"].to_numpy(), rtol=rtol, atol=1e-10)


@SETTINGS
@given(seed=st.integers(0, 10_000), n=st.integers(80, 250))
def test_row_order_and_level_labels_do_not_change_the_fit(seed, n):
    data = _data(seed, n)
    base = _fit(data)
    rng = np.random.default_rng(seed + 1)
    shuffled = data.iloc[rng.permutation(n)].reset_index(drop=True)
    names = {v: f"level-{w}" for v, w in zip(range(20), rng.permutation(20))}  # new labels, new level order
    shuffled["g"] = shuffled["g"].map(names)
    shuffled["h"] = 100 - shuffled["h"]
    _assert_same_fit(base, _fit(shuffled))


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    scale=st.one_of(st.floats(1e-3, 1e3), st.floats(-1e3, -1e-3)),
    shift=st.floats(-1e3, 1e3),
)
def test_affine_response_changes_the_fit_exactly_as_it_should(seed, scale, shift):
    data = _data(seed, 150)
    base = _fit(data, reml=False)
    moved = _fit(data.assign(y=scale * data.y + shift), reml=False)
    np.testing.assert_allclose(moved.theta, base.theta, rtol=1e-8, atol=1e-10)
    expected_beta = scale * base.fe_params.to_numpy() + np.array([shift, 0.0])
    np.testing.assert_allclose(moved.fe_params.to_numpy(), expected_beta, rtol=1e-8, atol=1e-10 * (1 + abs(shift)))
    assert moved.sigma == pytest.approx(abs(scale) * base.sigma, rel=1e-8)
    vc_base, vc_moved = base.variance_components(), moved.variance_components()
    variances = vc_base["var2"].isna().to_numpy()
    np.testing.assert_allclose(
        vc_moved["vcov"].to_numpy()[variances],
        scale**2 * vc_base["vcov"].to_numpy()[variances],
        rtol=1e-8,
        atol=1e-10 * scale**2,
    )
    assert moved.llf == pytest.approx(base.llf - base.nobs * np.log(abs(scale)), rel=1e-9, abs=1e-7)


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_the_same_input_gives_bit_identical_output(seed):
    data = _data(seed, 120)
    a, b = _fit(data), _fit(data.copy())
    assert a.llf == b.llf
    assert np.array_equal(a.theta, b.theta)
    assert np.array_equal(a.fe_params.to_numpy(), b.fe_params.to_numpy())
    assert np.array_equal(a.bse_fe.to_numpy(), b.bse_fe.to_numpy())
    assert a.n_evaluations == b.n_evaluations


def test_models_fitted_in_parallel_threads_equal_fits_one_by_one():
    jobs = [
        (_data(s, 200), f, reml)
        for s in (1, 2, 3)
        for f, reml in ((FORMULA, True), ("y ~ x + (1 | g) + (1 | h)", False), ("y ~ 1 + (x || g)", True))
    ]
    one_by_one = [_fit(d, f, reml=r) for d, f, r in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda job: _fit(job[0], job[1], reml=job[2]), jobs))
    for a, b in zip(one_by_one, parallel):
        assert a.llf == b.llf
        assert np.array_equal(a.theta, b.theta)
        assert np.array_equal(a.fe_params.to_numpy(), b.fe_params.to_numpy())
