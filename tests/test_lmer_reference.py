"""`sparsemix.lmer` against lme4 1.1-31 and lmerTest on every fixture fit (tests/reference/*.json).

Tolerances (relative): log-likelihood at least lme4's minus 1e-6; beta 1e-4; SE(beta) 1e-3; variance
components 1e-3; conditional modes and SDs 1e-3; Satterthwaite df 1e-2; profile intervals 1e-2.
"""

import re
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import load_reference

import sparsemix as sm
from sparsemix.datasets import seed_datasets

DATASETS = [
    "sleepstudy",
    "penicillin",
    "pastes",
    "dyestuff",
    "dyestuff2",
    "cake",
    "oats",
    "seed_nested",
    "seed_crossed",
]


_doc = load_reference


def _data(name, doc):
    if name.startswith("seed_"):
        nested, crossed = seed_datasets()
        return nested if name == "seed_nested" else crossed
    return pd.DataFrame(doc["data"])


CASES = [(name, fit["name"]) for name in DATASETS for fit in _doc(name)["fits"]]
_FITS = {}


def _fit(name, fit_name):
    if (name, fit_name) not in _FITS:
        doc = _doc(name)
        record = next(f for f in doc["fits"] if f["name"] == fit_name)
        kwargs = {"weights": "w", "offset": "off"} if fit_name == "reml_weights_offset" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sm.SingularFitWarning)
            model = sm.lmer(record["formula"], _data(name, doc), reml=record["reml"], **kwargs)
        _FITS[name, fit_name] = (model, record, doc)
    return _FITS[name, fit_name]


@pytest.mark.parametrize("name, fit_name", CASES)
def test_likelihood_and_fixed_effects(name, fit_name):
    m, r, _ = _fit(name, fit_name)
    assert m.llf >= r["logLik"] - 1e-6 * abs(r["logLik"])
    assert m.nobs == r["nobs"]
    assert m.ngroups == r["ngroups"]
    beta = np.array(list(r["beta"].values()))
    np.testing.assert_allclose(m.fe_params.to_numpy(), beta, rtol=1e-4, atol=1e-6 * np.abs(beta).max())
    np.testing.assert_allclose(m.bse_fe.to_numpy(), list(r["se_beta"].values()), rtol=1e-3)
    assert m.is_singular == r["isSingular"]
    if "AIC" in r:
        assert m.aic == pytest.approx(r["AIC"], rel=1e-6)
        assert m.bic == pytest.approx(r["BIC"], rel=1e-6)


@pytest.mark.parametrize("name, fit_name", CASES)
def test_variance_components(name, fit_name):
    m, r, _ = _fit(name, fit_name)
    ours = m.variance_components()
    ref = pd.DataFrame(r["varcorr"])
    assert list(ours.grp) == list(ref.grp)
    assert list(ours.var1.fillna("")) == list(ref.var1.fillna(""))
    # Variances to 1e-3 relative; a covariance to 1e-3 of sqrt(var_i var_j), i.e. 1e-3 on the correlation scale:
    # near-zero correlations are flat directions of the likelihood (sleepstudy with weights: correlation -0.037,
    # our log-likelihood 2e-7 higher than lme4's, covariances 1.4e-3 apart relative to themselves).
    variance = {(g, v): c for g, v, w, c in zip(ref.grp, ref.var1, ref.var2, ref.vcov) if pd.isna(w)}
    tol = [
        1e-3 * abs(c) + 1e-9 * ref.vcov.max() if pd.isna(w) else 1e-3 * np.sqrt(variance[g, v] * variance[g, w])
        for g, v, w, c in zip(ref.grp, ref.var1, ref.var2, ref.vcov)
    ]
    assert np.all(np.abs(ours.vcov.to_numpy() - ref.vcov.to_numpy()) <= np.array(tol))


RANEF_CASES = [c for c in CASES if "ranef" in next(f for f in _doc(c[0])["fits"] if f["name"] == c[1])]


@pytest.mark.parametrize("name, fit_name", RANEF_CASES)
def test_conditional_modes(name, fit_name):
    m, r, _ = _fit(name, fit_name)
    ours = m.ranef(condvar=True)
    for factor, ref in r["ranef"].items():
        frame = ours[factor].loc[ref["levels"]]
        values, condsd = np.array(ref["values"]), np.array(ref["condsd"])
        np.testing.assert_allclose(frame.to_numpy(), values, rtol=1e-3, atol=1e-3 * np.abs(values).max())
        np.testing.assert_allclose(frame.attrs["condsd"].to_numpy(), condsd, rtol=1e-3)


LMERTEST_CASES = [c for c in CASES if "lmerTest" in next(f for f in _doc(c[0])["fits"] if f["name"] == c[1])]


@pytest.mark.parametrize("name, fit_name", LMERTEST_CASES)
def test_satterthwaite_table(name, fit_name):
    m, r, _ = _fit(name, fit_name)
    ours = m.fixed_effects()
    ref = pd.DataFrame(r["lmerTest"])
    np.testing.assert_allclose(ours["df"], ref["df"], rtol=1e-2)
    np.testing.assert_allclose(ours["t"], ref["t"], rtol=1e-3)
    # p-values: relative 1e-2 where they are not vanishingly small.
    big = ref["p"].to_numpy() > 1e-10
    np.testing.assert_allclose(ours["p"].to_numpy()[big], ref["p"].to_numpy()[big], rtol=2e-2)


PROFILE_CASES = [c for c in CASES if next(f for f in _doc(c[0])["fits"] if f["name"] == c[1]).get("confint_profile")]


@pytest.mark.parametrize("name, fit_name", PROFILE_CASES)
def test_profile_intervals(name, fit_name):
    m, r, _ = _fit(name, fit_name)
    ours = m.confint("profile")
    names = {row["name"]: row["param"] for row in r["profile_param_names"]}
    for row in r["confint_profile"]:
        param = names[row["name"]]
        if param not in ours.index:  # fixed effects are named by position (patsy's vs R's names)
            param = ours.index[len(m.sdcor_names) + list(r["beta"]).index(param)]
        got = ours.loc[param]
        for side in ("lower", "upper"):
            want = row[side]
            scale = max(abs(row["lower"]), abs(row["upper"]))
            assert got[side] == pytest.approx(want, rel=1e-2, abs=1e-2 * scale), (param, side)


ANOVA = [(name, k) for name in DATASETS for k, _ in enumerate(_doc(name).get("anova", []))]


@pytest.mark.parametrize("name, k", ANOVA)
def test_anova_against_lme4(name, k):
    doc = _doc(name)
    comparison = doc["anova"][k]
    data = _data(name, doc)
    models = [sm.lmer(spec["formula"], data, reml=spec["reml"]) for spec in comparison["models"]]
    table = sm.anova(*models, names=[spec["name"] for spec in comparison["models"]])
    assert table.attrs["refit"] == comparison["refit"]
    for row in comparison["rows"]:
        ours = table.loc[row["model"]]
        assert ours["npar"] == row["npar"]
        assert ours["logLik"] >= row["logLik"] - 1e-6 * abs(row["logLik"])
        assert ours["AIC"] == pytest.approx(row["AIC"], rel=1e-6)
        if row["Chisq"] is not None:
            assert ours["Chisq"] == pytest.approx(row["Chisq"], rel=1e-3)
            assert ours["Df"] == row["Df"]
            assert ours["Pr(>Chisq)"] == pytest.approx(row["p"], rel=1e-3)


SUMMARY_CASES = [c for c in CASES if "summary_text" in next(f for f in _doc(c[0])["fits"] if f["name"] == c[1])]


@pytest.mark.parametrize("name, fit_name", SUMMARY_CASES)
def test_summary_shares_lme4s_lines(name, fit_name):
    m, r, _ = _fit(name, fit_name)
    ours = str(m.summary()).splitlines()
    ref = r["summary_text"]
    # The criterion line, the number of observations and groups, and the scaled-residual quantiles.
    for line in ref:
        if line.startswith(("REML criterion at convergence", "Number of obs")):
            assert line.rstrip() in [x.rstrip() for x in ours]
    q_ref = ref[ref.index("Scaled residuals: ") + 2].split()
    q_ours = ours[ours.index("Scaled residuals: ") + 2].split()
    np.testing.assert_allclose([float(x) for x in q_ours], [float(x) for x in q_ref], atol=2e-4)
    assert re.search(r"^Random effects:$", "\n".join(ours), flags=re.M)


def test_a_non_monotonic_profile_gives_nan_for_that_bound_with_a_warning():
    """Before: scipy's brentq raised 'f(a) and f(b) must have different signs' out of confint(method='profile')
    where the profile of a singular fit is not monotone (found by the fuzz test); lme4 warns and gives NA. Which
    small random data sets give such a profile depends on the optimizer's last digits (the seeds picked by hand
    changed twice), so seeds are tried until two did; every one tried must keep the rules."""
    found = 0
    for seed in [3, 5, *range(60)]:  # (3 and 5 did when this was written)
        rng = np.random.default_rng(seed)
        n = 12
        data = pd.DataFrame(
            {"y": rng.normal(size=n), "x": rng.normal(size=n), "z": rng.normal(size=n), "g": rng.integers(0, 2, n)}
        )
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always", sm.SparsemixWarning)
            warnings.simplefilter("ignore", sm.SingularFitWarning)
            fit = sm.lmer("y ~ (0 + x | g) + (1 + x + z | g)", data)
            ci = fit.confint(method="profile")
        named = [str(w.message).split("'")[1] for w in record if "non-monotonic" in str(w.message)]
        assert set(named) == set(ci.index[ci.isna().any(axis=1)])
        # by position: lme4's names repeat here (sd_x|g for both terms), and each row is its own parameter's;
        # the profile is of the ML refit (as lme4's), whose estimates the intervals hold (seed 7's REML fit has
        # correlations of -1 where its ML fit has +1)
        ml = fit.refit_ml()
        estimates = pd.concat([ml.sdcor, ml.fe_params])
        assert list(ci.index) == list(estimates.index)
        estimates = estimates.to_numpy()
        lower, upper = ci.lower.to_numpy(), ci.upper.to_numpy()
        assert np.all((lower <= estimates + 1e-8) | np.isnan(lower))
        assert np.all((upper >= estimates - 1e-8) | np.isnan(upper))
        found += bool(named)
        if found == 2:
            break
    assert found == 2
