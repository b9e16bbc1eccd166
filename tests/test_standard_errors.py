"""Standard errors of variance parameters are right on the variance scale.

Simulate replicated data sets from a known nested model, fit each, and compare the spread of the estimates
with the standard errors the fits report. statsmodels' convention (sqrt(scale) x SE of the parameter divided
by scale) is computed from the same fits to show that it is off by about sqrt(scale) here.
"""

import numpy as np
import pytest

import sparsemix as sm
from sparsemix.datasets import generate_nested

N_REPLICATES = 150


@pytest.fixture(scope="module")
def replicated_fits():
    rng = np.random.RandomState(20261122)
    estimates, ses, statsmodels_ses, scale_est, scale_se = [], [], [], [], []
    for _ in range(N_REPLICATES):
        df = generate_nested(n_group1=100, n_group2=5, n_rep=4, rng=rng)  # true: 4, 9 and scale 16
        res = sm.MixedLM.from_formula(
            "y ~ 1", re_formula="1", vc_formula={"group2": "0 + C(group2)"}, groups="group1", data=df
        ).fit()
        estimates.append([res.cov_re.iloc[0, 0], res.vcomp[0]])
        ses.append(np.asarray(res.bse_re))
        statsmodels_ses.append(np.sqrt(res.scale) * np.asarray(res.bse)[1:])
        scale_est.append(res.scale)
        scale_se.append(res.scale_se)
    return (np.array(estimates), np.array(ses), np.array(statsmodels_ses), np.array(scale_est), np.array(scale_se))


def test_reported_se_matches_spread_of_estimates(replicated_fits):
    estimates, ses, _, _, _ = replicated_fits
    spread = estimates.std(axis=0, ddof=1)
    reported = ses.mean(axis=0)
    np.testing.assert_allclose(reported, spread, rtol=0.15)


def test_scale_se_matches_spread_of_scale(replicated_fits):
    _, _, _, scale_est, scale_se = replicated_fits
    assert scale_se.mean() == pytest.approx(scale_est.std(ddof=1), rel=0.15)


def test_estimates_are_centred_on_the_truth(replicated_fits):
    estimates, ses, _, scale_est, _ = replicated_fits
    # REML is close to unbiased; 4 standard errors of the mean is a loose but failing-capable bound.
    truth = np.array([4.0, 9.0])
    sem = estimates.std(axis=0, ddof=1) / np.sqrt(N_REPLICATES)
    assert np.all(np.abs(estimates.mean(axis=0) - truth) < 4 * sem)
    assert abs(scale_est.mean() - 16.0) < 4 * scale_est.std(ddof=1) / np.sqrt(N_REPLICATES)


def test_statsmodels_convention_understates_by_about_sqrt_scale(replicated_fits):
    estimates, _, statsmodels_ses, _, _ = replicated_fits
    ratio = estimates.std(axis=0, ddof=1) / statsmodels_ses.mean(axis=0)
    # scale is 16 here: statsmodels' numbers are about 4 times too small.
    assert np.all((ratio > 3.0) & (ratio < 5.0))


def test_balanced_nested_design_matches_anova_closed_form():
    """For balanced data, REML equals the ANOVA estimator and the inverse information equals the exact
    variance of the mean-square estimators, evaluated at the mean squares: an independent, closed-form check."""
    I, J, K = 30, 4, 3
    df = generate_nested(n_group1=I, n_group2=J, n_rep=K, rng=np.random.RandomState(7))
    y = df.y.to_numpy().reshape(I, J, K)
    m_ij, m_i = y.mean(axis=2), y.mean(axis=(1, 2))
    msa = J * K * np.sum((m_i - y.mean()) ** 2) / (I - 1)
    msb = K * np.sum((m_ij - m_i[:, None]) ** 2) / (I * (J - 1))
    mse = np.sum((y - m_ij[:, :, None]) ** 2) / (I * J * (K - 1))
    va, vb = (msa - msb) / (J * K), (msb - mse) / K
    assert va > 0 and vb > 0  # interior: REML coincides with ANOVA
    var_va = (2 * msa**2 / (I - 1) + 2 * msb**2 / (I * (J - 1))) / (J * K) ** 2
    var_vb = (2 * msb**2 / (I * (J - 1)) + 2 * mse**2 / (I * J * (K - 1))) / K**2
    var_e = 2 * mse**2 / (I * J * (K - 1))

    res = sm.MixedLM.from_formula(
        "y ~ 1", re_formula="1", vc_formula={"group2": "0 + C(group2)"}, groups="group1", data=df
    ).fit()
    np.testing.assert_allclose([res.cov_re.iloc[0, 0], res.vcomp[0], res.scale], [va, vb, mse], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(res.bse_re), np.sqrt([var_va, var_vb]), rtol=1e-4)
    assert res.scale_se == pytest.approx(np.sqrt(var_e), rel=1e-4)
