"""Satterthwaite df on singular fits against lmerTest 3.1-3 (tests/reference/early.json and exam.json, written
by tests/reference/lmertest_singular_fixtures.R; R is not needed here).

Early: `cog ~ age * trt + (age | id)`, the correlation at -1. Exam: `(standLRT + sex | school)`, a 3 x 3
covariance with the sexM variance at zero. Before the information was taken in (theta, sigma), both gave
df = inf (normal p-values: 0.0367 for Early's age:trtY where lmerTest has 0.0381).

Tolerances (relative): df 1e-2, t 1e-3, p 2e-2, beta 1e-4, SE(beta) 1e-3.
"""

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import load_reference

import sparsemix as sm

# R's fixed-effect names -> patsy's.
FIXED_NAMES = {"trtY": "trt[T.Y]", "age:trtY": "age:trt[T.Y]", "sexM": "sex[T.M]", "typeSngl": "type[T.Sngl]"}


def _record(name):
    doc = load_reference(name)
    return pd.DataFrame(doc["data"]), doc["fits"][0]


def _lower_factor(S):
    """Lower-triangular L with L L' = S for a positive semi-definite S (a zero pivot gives a zero column)."""
    k = S.shape[0]
    L = np.zeros((k, k))
    for j in range(k):
        d = S[j, j] - L[j, :j] @ L[j, :j]
        L[j, j] = np.sqrt(max(d, 0.0))
        if L[j, j] > 0:
            L[j + 1 :, j] = (S[j + 1 :, j] - L[j + 1 :, :j] @ L[j, :j]) / L[j, j]
    return L


def _exam_start(record):
    """lme4's theta for columns ((Intercept), standLRT, sexM) in our column order ((Intercept), sex, standLRT)."""
    pos = [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (2, 2)]  # lme4's order: lower triangle by column
    L = np.zeros((3, 3))
    for v, (i, j) in zip(record["theta"], pos):
        L[i, j] = v
    perm = [0, 2, 1]
    M = _lower_factor((L @ L.T)[np.ix_(perm, perm)])
    return np.array([M[i, j] for i, j in pos])


_FITS = {}


def _fit(name):
    if name not in _FITS:
        data, r = _record(name)
        # Exam is started at lme4's optimum: this file tests the df there, not the optimizer (which, at the
        # time of writing, stopped 0.085 log-likelihood units below it from its own start).
        kwargs = {"start": _exam_start(r)} if name == "exam" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sm.SingularFitWarning)
            m = sm.lmer(r["formula"], data, reml=r["reml"], **kwargs)
        if name == "exam":
            assert m.theta_names == [
                "school.(Intercept)",
                "school.sex[T.M].(Intercept)",
                "school.standLRT.(Intercept)",
                "school.sex[T.M]",
                "school.standLRT.sex[T.M]",
                "school.standLRT",
            ]
        _FITS[name] = (m, r)
    return _FITS[name]


@pytest.mark.parametrize("name", ["early", "exam"])
def test_at_lme4s_singular_optimum(name):
    m, r = _fit(name)
    assert r["isSingular"] and m.is_singular
    assert m.llf >= r["logLik"] - 1e-6 * abs(r["logLik"])


@pytest.mark.parametrize("name", ["early", "exam"])
def test_satterthwaite_table_on_a_singular_fit(name):
    m, r = _fit(name)
    ref = pd.DataFrame(r["lmerTest"])
    ref.index = [FIXED_NAMES.get(n, n) for n in ref.name]
    ours = m.fixed_effects().loc[ref.index]
    np.testing.assert_allclose(ours["estimate"], ref["estimate"], rtol=1e-4)
    np.testing.assert_allclose(ours["std_error"], ref["std_error"], rtol=1e-3)
    np.testing.assert_allclose(ours["df"], ref["df"], rtol=1e-2)
    np.testing.assert_allclose(ours["t"], ref["t"], rtol=1e-3)
    np.testing.assert_allclose(ours["p"], ref["p"], rtol=2e-2)


def test_early_variance_parameter_covariance_is_lmerTests_off_the_boundary():
    # lmerTest's vcov_varpar is 2 H^+ over (theta, sigma). theta[2] (the slope's diagonal) is at zero with
    # nothing below it, so it drops out; the rest is the same covariance.
    m, r = _fit("early")
    info = m.fit_result.variance_information
    assert list(info.theta_index) == [0, 1]
    ref = np.array(r["lmerTest_vcov_varpar"])[np.ix_([0, 1, 3], [0, 1, 3])]
    np.testing.assert_allclose(info.cov, ref, rtol=1e-2, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("name", ["early", "exam"])
def test_variance_parameters_on_a_singular_fit(name):
    # The residual variance's standard error stays finite (Var(sigma^2) = 4 sigma^2 Var(sigma), lmerTest's
    # last entry); the singular term's Psi entries have none (NaN, as documented).
    m, r = _fit(name)
    cov = m.fit_result.cov_variance_parameters
    var_sigma = np.array(r["lmerTest_vcov_varpar"])[-1, -1]
    assert cov[-1, -1] == pytest.approx(4 * r["sigma"] ** 2 * var_sigma, rel=1e-2)
    assert np.all(np.isnan(cov[:-1, :]))
    assert np.all(np.isnan(cov[:, :-1]))
