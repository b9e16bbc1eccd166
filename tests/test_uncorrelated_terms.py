"""lme4's `(x || g)`: one scalar term per column, all of one grouping. The optimizer sees them as one term with a
diagonal covariance (eliminated level by level, with the exact gradient and Hessian), the results keep lme4's
split terms. References: lme4's fits (tests/reference/random_slopes.json) and the split system's own deviance."""

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import load_reference, reference_data

import sparsemix
from sparsemix.core.terms import CovarianceTemplate, RandomTerm, same_grouping_runs
from sparsemix.fit.pipeline import optimized_system
from sparsemix.fit.stages import build_system

REFERENCE = load_reference("random_slopes")


def _lmer(formula, data, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparsemix.SingularFitWarning)
        return sparsemix.lmer(formula, data, **kwargs)


def _scalar(name, codes, values, n_levels):
    return RandomTerm.from_codes(
        name, codes, np.asarray(values, float)[:, None], n_levels, CovarianceTemplate.scalar(), range(n_levels), ("x",)
    )


def test_runs_are_consecutive_scalar_terms_whose_rows_agree_on_their_level():
    rng = np.random.default_rng(1)
    g = rng.integers(0, 6, 60)
    h = (g + 1) % 6  # as many levels as g, another grouping
    x = rng.normal(size=60)
    x[::7] = 0.0  # rows without an entry in the slope's term still belong to the run
    slope = np.column_stack([np.ones(60), rng.normal(size=60)])
    correlated = RandomTerm.from_codes(
        "g", g, slope, 6, CovarianceTemplate.unstructured(2), range(6), ("(Intercept)", "x")
    )
    one, two, other = _scalar("g", g, np.ones(60), 6), _scalar("g", g, x, 6), _scalar("h", h, np.ones(60), 6)
    assert same_grouping_runs([one, two]) == ((0, 2),)
    assert same_grouping_runs([other, one, two, _scalar("g", g, x**2, 6)]) == ((1, 4),)
    assert same_grouping_runs([one, other]) == ()  # crossed, as many levels: not one grouping
    assert same_grouping_runs([one, correlated, two]) == ()
    assert same_grouping_runs([one, two, correlated, one, two]) == ((0, 2), (3, 5))
    assert same_grouping_runs([one, _scalar("g", g[::-1], x, 6)]) == ()


@pytest.mark.parametrize("reml", [True, False])
def test_the_merged_system_has_the_split_systems_deviance_everywhere(reml):
    rng = np.random.default_rng(2)
    n, levels = 400, 40
    g = rng.integers(0, levels, n)
    school = rng.integers(0, 7, n)
    x, t = rng.normal(3.0, 2.0, n), rng.uniform(-1, 1, n)
    X = np.column_stack([np.ones(n), x])
    y = 1 + 0.5 * x + rng.normal(size=levels)[g] + 0.3 * x * rng.normal(size=levels)[g] + rng.normal(size=n)
    terms = [
        _scalar("g", g, np.ones(n), levels),
        _scalar("g", g, x, levels),
        _scalar("g", g, t, levels),
        _scalar("school", school, np.ones(n), 7),
    ]
    weights = rng.uniform(0.5, 2.0, n)
    system = build_system(X, y, terms, weights=weights)
    assert system.diagonal_runs == ((0, 3),)
    merged = system.merged_system()
    assert [template.k for _, template in merged.relcov.blocks] == [3, 1]
    for theta in [np.array([0.8, 0.1, 0.3, 0.5]), np.array([0.0, 0.4, 1.5, 0.0]), rng.uniform(0, 2, 4)]:
        assert merged.deviance(theta, reml) == pytest.approx(system.deviance(theta, reml), rel=1e-12)
        np.testing.assert_allclose(
            merged.relcov.working_theta(theta), system.relcov.working_theta(theta), rtol=1e-14, atol=0
        )


@pytest.mark.parametrize("name", ["early_uncorr_reml", "early_uncorr_ml", "egsingle_uncorr_ml"])
def test_uncorrelated_slopes_fit_with_newton_steps_to_lme4s_optimum(name):
    key = next(k for k, entry in REFERENCE.items() if k != "versions" and any(f["name"] == name for f in entry["fits"]))
    data = pd.DataFrame(REFERENCE[key]["data"])
    ref = next(f for f in REFERENCE[key]["fits"] if f["name"] == name)
    m = _lmer(ref["formula"], data, reml=ref["reml"])
    # split, the terms took BOBYQA: Early 25 (REML) and 37 (ML) evaluations, egsingle 118
    assert m.fit_result.optimization.method == "gradient" and m.n_evaluations <= 10
    assert m.llf >= ref["logLik"] - 1e-7 * abs(ref["logLik"])
    np.testing.assert_allclose(m.fit_result.theta, ref["theta"], rtol=2e-3, atol=2e-3)
    bobyqa = _lmer(ref["formula"], data, reml=ref["reml"], optimizer="bobyqa")
    assert m.llf >= bobyqa.llf - 1e-9 * abs(bobyqa.llf)
    # the results are the split terms' (lme4's): one variance per column, no correlation
    assert list(m.theta_names) == list(bobyqa.theta_names)
    ours, theirs = m.ranef_frame(), bobyqa.ranef_frame()
    assert list(ours.columns) == list(theirs.columns) and len(ours) == len(theirs)
    np.testing.assert_allclose(ours["condval"], theirs["condval"], rtol=1e-3, atol=1e-3 * theirs["condval"].abs().max())


def test_refits_take_the_merged_terms_too():
    entry = REFERENCE["Early"]
    data = pd.DataFrame(entry["data"])
    m = _lmer("cog ~ age * trt + (age || id)", data)
    ml = m.refit_ml()
    reference = next(f for f in entry["fits"] if f["name"] == "early_uncorr_ml")
    assert ml.n_evaluations <= 10
    assert ml.llf >= reference["logLik"] - 1e-7 * abs(reference["logLik"])
    again = m.refit(m.fitted + np.random.default_rng(3).normal(size=m.nobs))
    assert again.fit_result.optimization.method == "gradient" and again.n_evaluations <= 10


@pytest.mark.parametrize("fit_name", ["reml_uncorr", "ml_uncorr"])
def test_sleepstudy_takes_one_diagonal_term_and_reads_the_split_terms_off_it(fit_name):
    """36 columns held whole had the exact Hessian too; one 2 x 2 term costs less an evaluation, and the split
    system is then never factored: its solution is the merged one's, reordered."""
    doc = load_reference("sleepstudy")
    ref = next(f for f in doc["fits"] if f["name"] == fit_name)
    data = reference_data("sleepstudy")
    m = _lmer(ref["formula"], data, reml=ref["reml"])
    system = m.fit_result.system
    assert system.diagonal_runs == ((0, 2),)
    merged = optimized_system(system)
    assert [(n, t.k, t.is_diagonal) for n, t in merged.relcov.blocks] == [(18, 2, True)]
    assert m.llf >= ref["logLik"] - 1e-7 * abs(ref["logLik"])
    np.testing.assert_allclose(m.fit_result.theta, ref["theta"], rtol=1e-4)  # (lme4 stops ~1e-5 short)
    # the split system's own solution at the same theta: the same modes in its order
    own = system.solve(m.fit_result.theta, ref["reml"])
    np.testing.assert_allclose(m.fit_result.solution.b, own.b, rtol=1e-9, atol=1e-9 * np.abs(own.b).max())
    np.testing.assert_allclose(m.fit_result.solution.u, own.u, rtol=1e-9, atol=1e-9 * np.abs(own.u).max())
    assert m.fit_result.solution.deviance == pytest.approx(own.deviance, rel=1e-12)
    np.testing.assert_allclose(m.fe_params, own.beta, rtol=1e-10)


def test_bootstrap_replicates_are_fitted_together_on_the_merged_term_to_the_same_estimates(monkeypatch):
    import sparsemix.fit.many as many

    data = pd.DataFrame(REFERENCE["Early"]["data"])
    m = _lmer("cog ~ age * trt + (age || id)", data)
    built = []
    original = many.ManyResponses
    monkeypatch.setattr(
        many, "ManyResponses", lambda cross, relcov, *sums: built.append(relcov) or original(cross, relcov, *sums)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparsemix.SingularFitWarning)
        merged = m.bootstrap(nsim=6, seed=5, n_jobs=1)
        assert [[(n, t.k, t.is_diagonal) for n, t in relcov.blocks] for relcov in built] == [[(103, 2, True)]]
        monkeypatch.setattr(m.fit_result.system, "diagonal_runs", ())
        split = m.bootstrap(nsim=6, seed=5, n_jobs=1)
    assert [len(relcov.blocks) for relcov in built] == [1, 2]  # the split terms' batched steps (differences)
    # both to the batched Newton steps' precision
    np.testing.assert_allclose(merged.to_numpy(), split.to_numpy(), rtol=1e-6, atol=1e-6)


def test_permuted_cross_products_are_scipys_reindexing():
    import scipy.sparse as sp

    import sparsemix.core.cross_products as cross_products

    rng = np.random.default_rng(4)
    Z = sp.random(300, 40, density=0.1, random_state=5, format="csc")
    cross = cross_products.CrossProducts.compute(rng.normal(size=(300, 2)), rng.normal(size=300), Z)
    order = rng.permutation(40)
    permuted = cross.permuted(order)
    expected = cross.ZtZ[order][:, order].toarray()
    assert permuted.ZtZ.has_sorted_indices and permuted.ZtZ.nnz == cross.ZtZ.nnz
    np.testing.assert_array_equal(permuted.ZtZ.toarray(), expected)
    np.testing.assert_array_equal(permuted.ZtX, cross.ZtX[order])
    np.testing.assert_array_equal(permuted.Zty, cross.Zty[order])


def test_a_fit_whose_own_system_was_never_factored_pickles_and_answers():
    """The split system's factorization is chosen on first use: after the fit (read off the merged one), after
    pickling, and for a refit."""
    import pickle

    data = pd.DataFrame(REFERENCE["Early"]["data"])
    m = _lmer("cog ~ age * trt + (age || id)", data)
    assert "_factor" not in m.fit_result.system.__dict__  # (the choice a merged fit never needed)
    again = pickle.loads(pickle.dumps(m))
    fresh = _lmer("cog ~ age * trt + (age || id)", data)
    np.testing.assert_allclose(again.ranef_frame()["condsd"], fresh.ranef_frame()["condsd"], rtol=1e-10)
    own = m.fit_result.system.solve(m.fit_result.theta, True)  # the split system, factored now
    np.testing.assert_allclose(m.fit_result.solution.b, own.b, rtol=1e-9, atol=1e-9 * np.abs(own.b).max())
    y = m.fitted + np.random.default_rng(6).normal(size=m.nobs)
    assert again.refit(y).llf == pytest.approx(m.refit(y).llf, rel=1e-12)
