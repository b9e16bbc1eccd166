"""Newton steps with the average information (sparsemix/fit/scoring.py), checked against dense marginal formulas
(V = sigma^2 W + sum_j phi_j Z_j Z_j' built as an n x n matrix) and against BOBYQA's optimum."""

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import load_reference

import sparsemix
from sparsemix.core import factor as factor_module
from sparsemix.core.cross_products import CrossProducts, assemble_Z
from sparsemix.core.factor import DenseFactor, SchurFactor
from sparsemix.core.pages import reused_buffers
from sparsemix.core.relcov import RelativeCovariance
from sparsemix.core.system import PenalizedSystem
from sparsemix.core.terms import CovarianceTemplate, RandomTerm
from sparsemix.datasets import generate_insteval_like
from sparsemix.fit.pilot import components_start
from sparsemix.fit.scoring import SCORING_MIN_THETA, fit_by_scoring, score_and_information, scoring_point
from sparsemix.fit.stages import build_fit, build_system, optimize_system
from sparsemix.lme4.design import build_design

SIZES = (40, 12, 5)  # levels of the three crossed scalar terms, most first (the Schur form's order)


def _problem(seed=3, n=300, sds=(0.8, 1.2, 0.6), p=2):
    rng = np.random.default_rng(seed)
    codes = [rng.integers(0, k, n) for k in SIZES]
    x = rng.normal(size=n)
    X = np.column_stack([np.ones(n), x])[:, :p]
    y = 1.0 + 0.5 * x + sum(sd * rng.normal(size=k)[c] for sd, k, c in zip(sds, SIZES, codes)) + rng.normal(size=n)
    terms = [
        RandomTerm.from_codes(name, c, np.ones(n), k, CovarianceTemplate.scalar(), range(k), ("1",))
        for name, c, k in zip("abc", codes, SIZES)
    ]
    return X, y, terms


def _schur_system(X, y, terms, weights=None, update="auto"):
    rc = RelativeCovariance([(t.n_levels, t.template) for t in terms])
    system = PenalizedSystem(CrossProducts.compute(X, y, assemble_Z(terms), weights=weights), rc, factorization="schur")
    if update != "auto":
        system._factor = SchurFactor(system._A, system.cross.ZtZ, rc, update=update)
    return system


def _dense(X, y, terms, theta, reml, weights=None):
    """Score and average information in psi = sigma^2 (1, theta^2) (sigma^2 profiled), and tr(Z_j'V^{-1}Z_j)
    at sigma^2 = 1, from n x n matrices."""
    n = y.shape[0]
    Zs = [t.Z.toarray() for t in terms]
    W = np.diag(1.0 / weights) if weights is not None else np.eye(n)
    V1 = W + sum(th**2 * Z @ Z.T for th, Z in zip(theta, Zs))
    V1i = np.linalg.inv(V1)
    traces = np.array([np.trace(Z.T @ V1i @ Z) for Z in Zs])
    XtViX = X.T @ V1i @ X
    P1 = V1i - V1i @ X @ np.linalg.solve(XtViX, X.T @ V1i)
    nu = n - X.shape[1] if reml else n
    sigma2 = y @ P1 @ y / nu
    P, Vi = P1 / sigma2, V1i / sigma2
    Py = P @ y
    derivs = [W] + [Z @ Z.T for Z in Zs]
    trace_of = P if reml else Vi
    score = np.array([-0.5 * (np.trace(trace_of @ Va) - Py @ Va @ Py) for Va in derivs])
    middle = P if reml else Vi
    info = np.array([[0.5 * (Va @ Py) @ middle @ (Vb @ Py) for Vb in derivs] for Va in derivs])
    return traces, score, info


@pytest.mark.parametrize("update", ["pairs", "kernel", "dense"])
@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_score_and_information_equal_the_dense_formulas(update, reml, weighted):
    X, y, terms = _problem()
    weights = np.random.default_rng(5).uniform(0.5, 2.0, y.shape[0]) if weighted else None
    system = _schur_system(X, y, terms, weights, update)
    theta = np.array([0.7, 1.1, 0.4])
    traces, score, info = _dense(X, y, terms, theta, reml, weights)
    with system.threads():
        np.testing.assert_allclose(system.variance_traces(theta), traces, rtol=1e-9)
        point = scoring_point(system, theta, reml)
    np.testing.assert_allclose(point.score, score, rtol=1e-8, atol=1e-10 * np.abs(score).max())
    np.testing.assert_allclose(point.information, info, rtol=1e-8)
    assert point.deviance == pytest.approx(system.deviance(theta, reml), rel=1e-14)


def _dense_eliminated_system(X, y, terms, weights=None):
    """The system held dense with its first term eliminated level by level (what a larger design of scalar terms
    takes: DENSE_WHOLE_MAX_ORDER)."""
    rc = RelativeCovariance([(t.n_levels, t.template) for t in terms])
    system = PenalizedSystem(CrossProducts.compute(X, y, assemble_Z(terms), weights=weights), rc, factorization="dense")
    system._factor = DenseFactor(system.cross, rc, eliminate_first=True)
    return system


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_a_system_held_dense_scores_as_the_dense_formulas(reml, weighted):
    X, y, terms = _problem()
    weights = np.random.default_rng(5).uniform(0.5, 2.0, y.shape[0]) if weighted else None
    system = _dense_eliminated_system(X, y, terms, weights)
    assert system.factorization_mode == "dense" and system._factor.q1 == SIZES[0]
    assert system.supports_scoring and not system.single_precision_traces
    theta = np.array([0.7, 1.1, 0.4])
    traces, score, info = _dense(X, y, terms, theta, reml, weights)
    with system.threads():
        np.testing.assert_allclose(system.variance_traces(theta), traces, rtol=1e-9)
        point = scoring_point(system, theta, reml, single=True)  # (no single precision here: the inverse is small)
    assert not point.single
    np.testing.assert_allclose(point.score, score, rtol=1e-8, atol=1e-10 * np.abs(score).max())
    np.testing.assert_allclose(point.information, info, rtol=1e-8)
    assert system.variance_traces(np.array([0.7, 0.0, 0.4])) is None  # divides by theta_j


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("p", [0, 1, 2])
@pytest.mark.parametrize("seed", [3, 11])
def test_the_compiled_point_of_a_dense_system_equals_the_numpy_algebra(reml, p, seed):
    """kernels.dense_scalar_scoring against scoring.score_and_information (the factor's traces and the system's
    average information), on crossed designs of three terms with and without fixed effects."""
    X, y, terms = _problem(seed=seed, p=p)
    system = _dense_eliminated_system(X, y, terms)
    theta = np.array([0.7, 1.1, 0.4]) * (1.0 + 0.3 * (seed == 11))
    with system.threads():
        ev = system.evaluate(theta)
        compiled = system.compiled_scoring(theta, reml)
        score, information = score_and_information(system, theta, reml, ev)
    assert compiled is not None
    np.testing.assert_allclose(compiled[0], score, rtol=1e-10, atol=1e-12 * np.abs(score).max())
    np.testing.assert_allclose(compiled[1], information, rtol=1e-10)
    assert np.abs(score).max() > 1e-3  # (a point away from the optimum: a score to compare)


def test_a_dense_system_above_the_compiled_limit_is_scored_by_numpy(monkeypatch):
    """Above COMPILED_SCORING_MAX_WORK (levels x rest columns^2) the point comes from the numpy algebra: the same
    fit either way."""
    X, y, terms = _problem()
    fits = []
    for limit in (None, 0):
        if limit is not None:
            monkeypatch.setattr(factor_module, "COMPILED_SCORING_MAX_WORK", limit)
        system = _dense_eliminated_system(X, y, terms)
        with system.threads():
            theta = np.array([0.7, 1.1, 0.4])
            system.evaluate(theta)
            assert (system.compiled_scoring(theta, True) is None) == (limit == 0)
            fits.append(fit_by_scoring(system, theta, True)[0])
    assert fits[0].n_evaluations == fits[1].n_evaluations
    np.testing.assert_allclose(fits[0].theta, fits[1].theta, rtol=1e-9)
    assert fits[0].deviance == pytest.approx(fits[1].deviance, rel=1e-13)


def test_crossed_components_held_dense_are_scored():
    """mlmRev's ScotsSec (pupils of 148 primary schools in 19 secondary schools, unbalanced): the primary schools
    eliminated, the rest held dense. L-BFGS-B with the exact gradient took 16 evaluations; the scoring steps 5, to
    the same optimum (lme4's: test_boundary)."""
    entry = load_reference("random_slopes")["ScotsSec"]
    data = pd.DataFrame(entry["data"])
    for ref in entry["fits"]:
        m = sparsemix.lmer(ref["formula"], data, reml=ref["reml"])
        assert m.fit_result.system.factorization_mode == "dense"
        assert m.fit_result.optimization.method == "scoring"
        assert m.n_evaluations <= 5
        assert m.llf >= ref["logLik"] - 1e-9 * abs(ref["logLik"])
        np.testing.assert_allclose(m.theta, ref["theta"], rtol=1e-4)


@pytest.mark.parametrize("reml", [True, False])
def test_linear_contraction_ends_the_steps_a_point_early(monkeypatch, reml):
    """Where the AI's steps contract linearly and what is left after a step is below the deviance's resolution, that
    step is the last (checked by its deviance alone): ScotsSec 6 -> 5 evaluations, the same optimum to 1e-13."""
    import sparsemix.fit.scoring as scoring

    entry = load_reference("random_slopes")["ScotsSec"]
    design = build_design(entry["fits"][0]["formula"], pd.DataFrame(entry["data"]))
    system = design.system()
    with system.threads():
        start = components_start(system, reml)  # the fit's own: (0.31, 0.01), the secondary schools' estimated <= 0
        early, _, count = fit_by_scoring(system, start, reml)
        monkeypatch.setattr(scoring, "SCORING_DEVIANCE_RESOLUTION", 0.0)
        full, _, count_full = fit_by_scoring(system, start, reml)
    assert early is not None and full is not None
    assert count == count_full - 1
    assert early.deviance <= full.deviance + 1e-13 * abs(full.deviance)
    np.testing.assert_allclose(early.theta, full.theta, rtol=1e-5)


def test_linear_contraction_needs_two_full_steps_and_a_small_ratio():
    """The rule's conditions: the first step from the start is no measure of the contraction (two lengths needed), a
    ratio above SCORING_MAX_CONTRACTION is no linear convergence, and the extrapolated rest must be below the
    resolution."""
    from sparsemix.fit.scoring import SCORING_DEVIANCE_RESOLUTION, ScoringPoint, _leaves_nothing

    # a one-parameter model of -2 loglik: the step's predicted decrease is psi * score * step
    point = ScoringPoint(np.array([1.0]), 1000.0, np.array([1.0]), np.array([1e-9]), np.eye(1))
    step = np.array([1e-3])  # decrease 1e-12; rho 0.1 leaves ~1e-14, under 1e-14 * 1000
    assert _leaves_nothing(point, step, 1e-3, [1.0, 1e-2])
    assert not _leaves_nothing(point, step, 1e-3, [1e-2])  # one length: the first step's
    assert not _leaves_nothing(point, step, 1e-3, [1.0, 1.5e-3])  # rho 0.67
    big = np.array([1.0])  # decrease 1e-9: ~1e-11 left, above the resolution
    assert not _leaves_nothing(point, big, 1e-3, [1.0, 1e-2])
    assert SCORING_DEVIANCE_RESOLUTION * 1000.0 > 1e-12 * 0.01 / 0.99


def test_a_variance_heading_for_zero_ends_the_steps_at_once():
    """A small theta_j that a full step would take below SCORING_MIN_THETA: the steps stop there (they used to creep
    down a factor at a time, 6-7 points), and the optimizers with bounds reach the boundary optimum."""
    X, y, terms = _problem(sds=(0.8, 1.2, 0.0), seed=0)  # c's variance is estimated at 0 (a boundary fit)
    system = _dense_eliminated_system(X, y, terms)
    start = np.array([0.8, 1.2, 0.05])
    with system.threads():
        gave_up, best, used = fit_by_scoring(system, start, True)
    assert gave_up is None and used <= 2
    assert system.deviance(best, True) <= system.deviance(start, True)
    opt = optimize_system(system, start_theta=start)
    reference = optimize_system(system, method="bobyqa")
    assert opt.deviance <= reference.deviance + 1e-12 * abs(reference.deviance)
    assert opt.theta[2] < SCORING_MIN_THETA and reference.theta[2] < 1e-4


@pytest.mark.parametrize("update", ["pairs", "kernel", "dense"])
def test_traces_with_the_inverse_in_blocks(monkeypatch, update):
    """Above the order where one threaded LAPACK call is safe, S^{-1} is computed in 2 x 2 blocks (a
    MovieLens-sized fit): the same traces, in double and in single precision."""
    import sparsemix.core.factor as factor

    X, y, terms = _problem()
    system = _schur_system(X, y, terms, update=update)
    theta = np.array([0.7, 1.1, 0.4])
    traces, _, _ = _dense(X, y, terms, theta, True)
    monkeypatch.setattr(factor, "DENSE_THREADS_MAX_ORDER", 8)  # S is 17 x 17
    with system.threads():
        np.testing.assert_allclose(system.variance_traces(theta), traces, rtol=1e-9)
        np.testing.assert_allclose(system.variance_traces(theta, single=True), traces, rtol=1e-5)


@pytest.mark.parametrize("update", ["pairs", "kernel", "dense"])
def test_single_precision_traces_are_close_but_not_exact(update):
    X, y, terms = _problem()
    system = _schur_system(X, y, terms, update=update)
    theta = np.array([0.7, 1.1, 0.4])
    traces, _, _ = _dense(X, y, terms, theta, True)
    with system.threads():
        single = system.variance_traces(theta, single=True)
    np.testing.assert_allclose(single, traces, rtol=1e-5)
    assert np.max(np.abs(single / traces - 1)) > 1e-12  # really computed in float32


def test_single_precision_far_points_leave_the_result_unchanged(monkeypatch):
    """The start and the points after long steps are scored in single precision; scoring them all in double
    (every single-precision point scored again) reaches the same theta, in as many deviance evaluations."""
    data = generate_insteval_like(3_000, 1_000, 12, 20, seed=4)
    formula = "y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)"
    design = build_design(formula, data)
    system = design.system()
    start = system.relcov.start()
    with system.threads():
        mixed, _, count = fit_by_scoring(system, start, True)
        monkeypatch.setattr("sparsemix.fit.scoring.SINGLE_MIN_STEP", np.inf)
        monkeypatch.setattr("sparsemix.fit.scoring.SINGLE_POINTS_MIN_ORDER", 10**9)
        double, _, count_double = fit_by_scoring(system, start, True)
    assert mixed is not None and double is not None
    # (each stops where its next step would lower the deviance by less than SCORING_STOP_DECREASE)
    np.testing.assert_allclose(mixed.theta, double.theta, rtol=1e-6)
    assert abs(mixed.deviance - double.deviance) < 1e-8
    assert count == count_double


def test_large_blocks_are_scored_in_single_precision_to_the_end(monkeypatch):
    """From SINGLE_ALWAYS_MIN_ORDER on no point is scored in double (its inverse costs 2.5x a single one there): the
    same theta as with the double-precision last points, to the precision the last step leaves."""
    import sparsemix.fit.scoring as scoring

    data = generate_insteval_like(3_000, 1_000, 12, 20, seed=4)
    system = build_design("y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)", data).system()
    start = system.relcov.start()
    precisions = []
    original = scoring.scoring_point
    monkeypatch.setattr(
        scoring, "scoring_point", lambda *a, **k: precisions.append(k.get("single", False)) or original(*a, **k)
    )
    with system.threads():
        monkeypatch.setattr(scoring, "SINGLE_POINTS_MIN_ORDER", 10**9)  # (below both orders: the last in double)
        mixed, _, count = fit_by_scoring(system, start, True)
        assert not all(precisions)
        precisions.clear()
        monkeypatch.setattr(scoring, "SINGLE_ALWAYS_MIN_ORDER", 1)
        single, _, count_single = fit_by_scoring(system, start, True)
    assert mixed is not None and single is not None
    assert precisions and all(precisions)
    # (single-precision traces to the end leave theta where the last step, or the stop short of one worth under
    # SCORING_STOP_DECREASE, put it: ~1e-7 off, and their rounding follows the BLAS's threads)
    np.testing.assert_allclose(single.theta, mixed.theta, rtol=1e-6)
    assert abs(single.deviance - mixed.deviance) < 1e-8
    assert count_single <= count + 1


def test_a_single_precision_start_at_the_optimum_is_scored_again_in_double():
    X, y, terms = _problem()
    system = build_system(X, y, terms, factorization="schur")
    with system.threads():
        first, _, _ = fit_by_scoring(system, system.relcov.start(), True)
        # (the first fit's last step, under 1e-5, leaves up to a few percent of itself: a tolerance above that)
        again, _, count = fit_by_scoring(system, first.theta, True, tolerance=1e-6)
    assert count == 1  # no step: the double score says it is converged
    np.testing.assert_array_equal(again.theta, first.theta)


def test_traces_computed_with_the_update_equal_the_dense_formulas():
    """After the first traces, each refactorization of the pair route forms their product in the update's pass."""
    X, y, terms = _problem()
    system = _schur_system(X, y, terms, update="pairs")
    with system.threads():
        system.variance_traces(np.array([0.3, 0.5, 0.2]))
        theta = np.array([0.7, 1.1, 0.4])
        system.evaluate(theta)
        assert system._factor._score_products is not None
        got = system.variance_traces(theta)
    np.testing.assert_allclose(got, _dense(X, y, terms, theta, True)[0], rtol=1e-9)


def test_score_without_fixed_effects():
    X, y, terms = _problem(p=0)
    system = _schur_system(X, y, terms)
    theta = np.array([0.5, 0.9, 0.3])
    _, score, info = _dense(X, y, terms, theta, True)
    with system.threads():
        point = scoring_point(system, theta, True)
    np.testing.assert_allclose(point.score, score, rtol=1e-8, atol=1e-10 * np.abs(score).max())
    np.testing.assert_allclose(point.information, info, rtol=1e-8)


def test_no_traces_where_the_formulas_do_not_apply():
    X, y, terms = _problem()
    system = _schur_system(X, y, terms)
    assert system.variance_traces(np.array([0.5, 0.0, 0.3])) is None  # divides by theta_j
    assert build_system(X, y, terms, factorization="simplicial").variance_traces(np.ones(3)) is None
    assert not build_system(X, y, terms, factorization="simplicial").supports_scoring


@pytest.mark.parametrize("reml", [True, False])
def test_scoring_reaches_bobyqas_optimum_from_lme4s_start(reml):
    data = generate_insteval_like(1_500, 600, 10, 15)
    formula = "y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scored = sparsemix.lmer(formula, data, reml=reml, start=[1.0, 1.0, 1.0])
        bobyqa = sparsemix.lmer(formula, data, reml=reml, optimizer="bobyqa")
    assert scored.fit_result.optimization.method == "scoring"
    assert bobyqa.fit_result.optimization.method == "bobyqa"
    assert scored.n_evaluations < bobyqa.n_evaluations / 3
    assert scored.deviance <= bobyqa.deviance + 1e-12 * abs(bobyqa.deviance)
    np.testing.assert_allclose(scored.theta, bobyqa.theta, rtol=1e-5)  # the polish's own accuracy
    np.testing.assert_allclose(scored.fe_params, bobyqa.fe_params, rtol=1e-7)  # (as theta's to ~1e-6 of each other)


def test_scoring_stops_at_the_stationary_point():
    """A central-difference gradient of the profiled deviance vanishes at the result (to its rounding)."""
    X, y, terms = _problem()
    system = build_system(X, y, terms, factorization="schur")  # (so small a system would pick simplicial)
    assert system.supports_scoring
    opt = optimize_system(system)
    assert opt.method == "scoring"
    theta = opt.theta
    for i in range(3):
        step = np.zeros(3)
        step[i] = 1e-5 * theta[i]
        slope = (system.deviance(theta + step, True) - system.deviance(theta - step, True)) / (2 * step[i])
        assert abs(slope) < 1e-4
    other = optimize_system(system, start_theta=theta * np.array([1.5, 0.6, 2.0]))
    # (each fit's last step, under 1e-5 of theta, is checked by its deviance and leaves up to a few percent of itself)
    np.testing.assert_allclose(other.theta, theta, rtol=1e-7)
    assert other.deviance == pytest.approx(opt.deviance, rel=1e-13)


def test_a_zero_variance_hands_the_fit_to_bobyqa():
    X, y, terms = _problem(sds=(0.8, 1.2, 0.0), seed=0)  # c's variance is estimated at 0 (a boundary fit)
    system = build_system(X, y, terms, factorization="schur")
    with system.threads():
        gave_up, best, used = fit_by_scoring(system, np.ones(3), True)
    assert gave_up is None and used >= 1
    assert system.deviance(best, True) <= system.deviance(np.ones(3), True)
    seen = []
    opt = optimize_system(system, progress=lambda evaluation, deviance, seconds: seen.append(evaluation))
    reference = optimize_system(system, method="bobyqa")
    assert opt.method == "bobyqa" and opt.n_evaluations > used
    # BOBYQA's evaluations are numbered on from the steps', in the progress and the log alike
    assert seen == sorted(seen) and len(set(seen)) == len(seen) and seen[-1] <= opt.n_evaluations
    assert [entry[0] for entry in opt.log] == sorted(entry[0] for entry in opt.log) and opt.log[0][0] > used
    assert opt.deviance == pytest.approx(reference.deviance, rel=1e-12)
    assert opt.theta[2] < 1e-4 and reference.theta[2] < 1e-4


def test_the_scored_fit_does_not_depend_on_row_order_or_level_labels():
    data = generate_insteval_like(1_500, 600, 10, 15)
    formula = "y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)"
    shuffled = data.sample(frac=1.0, random_state=7).reset_index(drop=True)
    shuffled["s"] = "student " + shuffled["s"].astype(str)  # other labels, another level order
    fits = [sparsemix.lmer(formula, frame) for frame in (data, shuffled)]
    assert [f.fit_result.optimization.method for f in fits] == ["scoring", "scoring"]
    np.testing.assert_allclose(fits[1].theta, fits[0].theta, rtol=1e-8)
    np.testing.assert_allclose(fits[1].fe_params, fits[0].fe_params, rtol=1e-8)
    np.testing.assert_allclose(fits[1].bse_fe, fits[0].bse_fe, rtol=1e-8)
    assert fits[1].llf == pytest.approx(fits[0].llf, rel=1e-12)


@pytest.mark.parametrize("reml", [True, False])
def test_scored_fit_with_weights_and_offset_equals_bobyqas(reml):
    data = generate_insteval_like(1_200, 500, 8, 21)
    rng = np.random.default_rng(4)
    data = data.assign(w=rng.uniform(0.5, 2.0, len(data)), off=rng.normal(0, 0.3, len(data)))
    formula = "y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scored = sparsemix.lmer(formula, data, reml=reml, weights="w", offset="off")
        bobyqa = sparsemix.lmer(formula, data, reml=reml, weights="w", offset="off", optimizer="bobyqa")
    assert scored.fit_result.optimization.method == "scoring"
    assert scored.deviance <= bobyqa.deviance + 1e-12 * abs(bobyqa.deviance)
    np.testing.assert_allclose(scored.theta, bobyqa.theta, rtol=1e-5)
    np.testing.assert_allclose(scored.fe_params, bobyqa.fe_params, rtol=1e-7)
    np.testing.assert_allclose(scored.bse_fe, bobyqa.bse_fe, rtol=1e-5)


def test_the_ml_refit_of_a_scored_fit_is_scored_too():
    data = generate_insteval_like(1_200, 500, 8, 21)
    formula = "y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)"
    refit = sparsemix.lmer(formula, data).refit_ml()
    direct = sparsemix.lmer(formula, data, reml=False)
    assert refit.fit_result.optimization.method == "scoring"
    assert refit.llf == pytest.approx(direct.llf, rel=1e-12)
    # (two starts: each ends within ~1e-7 of the optimum, its last step below SCORING_LAST_STEP)
    np.testing.assert_allclose(refit.theta, direct.theta, rtol=2e-7)


def test_unpolished_refits_take_the_steps_to_a_looser_tolerance():
    """Bootstrap refits (polish=False): Newton steps to 1e-6, where BOBYQA alone stops ~1e-5 off."""
    X, y, terms = _problem()
    system = build_system(X, y, terms, factorization="schur")
    precise = optimize_system(system)
    refit = optimize_system(system, start_theta=precise.theta * 1.05, polish=False)
    bobyqa = optimize_system(system, start_theta=precise.theta * 1.05, polish=False, method="bobyqa")
    assert refit.method == "scoring" and bobyqa.method == "bobyqa"
    assert refit.n_evaluations < bobyqa.n_evaluations
    np.testing.assert_allclose(refit.theta, precise.theta, rtol=1e-5)
    assert refit.deviance <= bobyqa.deviance + 1e-10 * abs(bobyqa.deviance)


def test_never_worse_than_bobyqa_on_random_crossed_designs():
    """Eight random crossed designs (some variances zero, some weighted, REML and ML): the default optimizer's
    criterion is never above BOBYQA's (measured on 40 such designs: 35 scored, 5 handed to BOBYQA, none worse)."""
    import pandas as pd

    rng = np.random.default_rng(123)
    for trial in range(8):
        n, na, nb, nc = (
            int(rng.integers(2_000, 6_000)),
            int(rng.integers(150, 800)),
            int(rng.integers(100, 300)),
            int(rng.integers(3, 40)),
        )
        a, b, c = rng.integers(0, na, n), rng.integers(0, nb, n), rng.integers(0, nc, n)
        sd = rng.uniform(0, 1.5, 3) * (rng.uniform(size=3) > 0.2)
        x = rng.normal(size=n)
        y = (
            1
            + 0.3 * x
            + sd[0] * rng.normal(size=na)[a]
            + sd[1] * rng.normal(size=nb)[b]
            + sd[2] * rng.normal(size=nc)[c]
            + rng.normal(size=n)
        )
        data = pd.DataFrame({"y": y, "x": x, "a": a, "b": b, "c": c})
        weights = rng.uniform(0.3, 3, n) if trial % 3 == 0 else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auto = sparsemix.lmer("y ~ x + (1|a) + (1|b) + (1|c)", data, reml=bool(trial % 2), weights=weights)
            bobyqa = sparsemix.lmer(
                "y ~ x + (1|a) + (1|b) + (1|c)", data, reml=bool(trial % 2), weights=weights, optimizer="bobyqa"
            )
        assert auto.deviance <= bobyqa.deviance + 1e-9 * abs(bobyqa.deviance), trial


# -- the average information for every covariance template, and Newton steps with it --------------------------------


def _slopes_problem(seed=8, n=240, n_g=15, n_h=6):
    rng = np.random.default_rng(seed)
    g, h, x = rng.integers(0, n_g, n), rng.integers(0, n_h, n), rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=n_g)[g] + 0.5 * x * rng.normal(size=n_g)[g] + rng.normal(size=n_h)[h]
    y = y + rng.normal(size=n)
    X = np.column_stack([np.ones(n), x])
    terms = [
        RandomTerm.from_codes(
            "g", g, np.column_stack([np.ones(n), x]), n_g, CovarianceTemplate.unstructured(2), range(n_g), ("1", "x")
        ),
        RandomTerm.from_codes("h", h, np.ones(n), n_h, CovarianceTemplate.scalar(), range(n_h), ("1",)),
    ]
    return X, y, terms


@pytest.mark.parametrize("factorization", ["schur", "dense", "simplicial"])
@pytest.mark.parametrize("reml", [True, False])
def test_average_information_of_a_correlated_term_equals_the_dense_formula(factorization, reml):
    """sigma^4 AI_ab = sigma^4 y'P V_a P V_b P y / 2 in psi = (sigma^2, the covariance entries (0,0), (1,0), (1,1)
    of (1 + x | g), that of (1 | h)), V_a the derivative of V = sigma^2 I + sum Z_t Sigma_t Z_t'."""
    X, y, terms = _slopes_problem()
    rc = RelativeCovariance([(t.n_levels, t.template) for t in terms])
    system = PenalizedSystem(CrossProducts.compute(X, y, assemble_Z(terms)), rc, factorization=factorization)
    theta = np.array([0.9, 0.3, 0.5, 0.7])
    with system.threads():
        ev = system.evaluate(theta)
        beta, u = system.modes(ev)
        ours = system.average_information(ev, beta, u, reml)
    n = y.shape[0]
    Zg, Zh = (t.Z.toarray() for t in terms)
    T = rc.factors(theta)
    Sigma_g, Sigma_h = T[0] @ T[0].T, T[1] @ T[1].T
    V1 = np.eye(n) + Zg @ np.kron(np.eye(terms[0].n_levels), Sigma_g) @ Zg.T + Sigma_h[0, 0] * Zh @ Zh.T
    V1i = np.linalg.inv(V1)
    P1 = V1i - V1i @ X @ np.linalg.solve(X.T @ V1i @ X, X.T @ V1i)
    sigma2 = y @ P1 @ y / (n - 2 if reml else n)
    Py = P1 @ y / sigma2  # V^{-1}(y - X beta)
    P = (P1 if reml else V1i) / sigma2  # ML: V^{-1} between the derivatives
    derivatives = [np.eye(n)]
    for a, b in [(0, 0), (1, 0), (1, 1)]:
        E = np.zeros((2, 2))
        E[a, b] = E[b, a] = 1.0
        derivatives.append(Zg @ np.kron(np.eye(terms[0].n_levels), E) @ Zg.T)
    derivatives.append(Zh @ Zh.T)
    dense = np.array([[0.5 * (Va @ Py) @ P @ (Vb @ Py) for Vb in derivatives] for Va in derivatives])
    np.testing.assert_allclose(ours, sigma2**2 * dense, rtol=1e-8)


def test_the_information_is_close_to_the_deviances_hessian_at_the_optimum():
    """working_information approximates the profiled deviance's Hessian (central differences of the exact gradient)
    at the optimum, where the average information is closest to it."""
    X, y, terms = _slopes_problem()
    system = build_system(X, y, terms)
    opt = optimize_system(system, reml=True)
    working = system.relcov.working_theta(opt.theta)
    with system.threads():
        H = system.working_information(working, True)
        h = 1e-5
        gradient = lambda x: system.working_deviance_gradient(x, True)[1]  # noqa: E731
        columns = [(gradient(working + h * e) - gradient(working - h * e)) / (2 * h) for e in np.eye(working.size)]
    exact = np.array(columns)
    exact = (exact + exact.T) / 2
    assert np.all(np.linalg.eigvalsh(H) > 0)
    np.testing.assert_allclose(H, exact, rtol=0.15, atol=0.05 * np.abs(exact).max())


def test_newton_steps_with_the_information_reach_lbfgs_optimum_in_fewer_evaluations(monkeypatch):
    """Random slopes on a crossed design in the Schur form: the same optimum as L-BFGS-B with the exact gradient
    and its polish, to 1e-8, in a fraction of the evaluations."""
    X, y, terms = _slopes_problem(seed=11, n=600, n_g=40, n_h=12)
    system = _schur_system(X, y, terms, update="pairs")  # (the pair map's update: what the gradient reads)
    assert system.supports_information
    newton = optimize_system(system, reml=True)
    assert newton.message.startswith("Newton steps with the average information")
    factorizations = system.n_evaluations
    assert newton.n_evaluations == factorizations  # a gradient after its point's value reuses that factorization
    solution = build_fit(system, newton, reml=True).solution
    assert system.n_evaluations == factorizations  # and so does the solve at the end point
    assert solution.deviance == newton.deviance
    import sparsemix.fit.optimize as optimize

    monkeypatch.setattr(optimize, "information_newton", lambda *args: ("", args[2], np.inf))
    lbfgs = optimize_system(_schur_system(X, y, terms, update="pairs"), reml=True)
    assert "L-BFGS-B" in lbfgs.message
    np.testing.assert_allclose(newton.theta, lbfgs.theta, rtol=1e-8, atol=1e-9)
    assert newton.deviance == pytest.approx(lbfgs.deviance, rel=1e-13)
    assert newton.n_evaluations * 2 < lbfgs.n_evaluations


def test_small_systems_held_dense_take_the_exact_hessian_not_the_average_information():
    """The average information costs more than L-BFGS-B's extra evaluations of a small model held dense; there the
    exact Hessian is at hand instead (Newton steps with it, optimize.even_newton)."""
    X, y, terms = _slopes_problem()
    system = build_system(X, y, terms, factorization="dense")
    assert system.supports_gradient and system.supports_hessian and not system.supports_information
    assert optimize_system(system, reml=True).message.startswith("Newton steps with the exact Hessian")


@pytest.mark.parametrize("single", [False, True])
def test_the_inverse_in_blocks_leaves_no_stale_values_in_its_upper_triangle(single, monkeypatch):
    """The blocked inverse never writes the block above the diagonal (C order): a buffer that held NaN there made
    the dense route's trace NaN (found on a clean CI clone). Its lower triangle is the inverse's, the rest finite."""
    import sparsemix.core.factor as factor
    from sparsemix.core.pages import Workspace

    monkeypatch.setattr(factor, "DENSE_THREADS_MAX_ORDER", 8)
    rng = np.random.default_rng(2)
    M = rng.normal(size=(17, 17))
    S = M @ M.T + 17 * np.eye(17)
    L = np.linalg.cholesky(S)
    work = Workspace()
    work.array("inverse", (17, 17), np.float32 if single else np.float64, "F").fill(np.nan)
    inverse = factor.dense_inverse_lower(L, single=single, workspace=work)
    assert inverse is not None and np.all(np.isfinite(inverse))
    expected = np.linalg.inv(S)
    np.testing.assert_allclose(np.tril(inverse), np.tril(expected), rtol=1e-4 if single else 1e-10, atol=1e-7)


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("scale", [1e-99, 1e99])
@pytest.mark.parametrize("compiled", [True, False])
def test_a_response_near_the_limits_of_double_precision_reaches_the_same_optimum(monkeypatch, reml, scale, compiled):
    """ScotsSec's response times 1e+-99 (sigma^2 ~ 1e+-198: the average information in psi's units, ~ n / sigma^4,
    overflows): no OverflowError, no step from an infinite information (the compiled point once stopped at the
    start, 1.65 below ML's optimum); the fit reaches the same theta by the other derivatives' steps."""
    if not compiled:
        monkeypatch.setattr(factor_module, "COMPILED_SCORING_MAX_WORK", 0)
    entry = load_reference("random_slopes")["ScotsSec"]
    data = pd.DataFrame(entry["data"])
    formula = entry["fits"][0]["formula"]
    base = sparsemix.lmer(formula, data, reml=reml)
    moved = sparsemix.lmer(formula, data.assign(attain=scale * data.attain), reml=reml)
    np.testing.assert_allclose(moved.theta, base.theta, rtol=1e-5)
    dof = base.nobs - (len(base.fe_params) if reml else 0)
    assert moved.llf == pytest.approx(base.llf - dof * np.log(scale), abs=1e-6)


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("scale, shift", [(1e-3, 5.0), (1e3, -40.0), (-7.0, 0.0)])
def test_scored_fits_follow_an_affine_response_exactly(reml, scale, shift):
    """The steps' rules read ratios (step lengths, the deviance's resolution relative to it), so an affine change of
    the response, which moves the deviance by a constant, takes the same points to the same theta: ScotsSec."""
    entry = load_reference("random_slopes")["ScotsSec"]
    data = pd.DataFrame(entry["data"])
    formula = entry["fits"][0]["formula"]
    base = sparsemix.lmer(formula, data, reml=reml)
    moved = sparsemix.lmer(formula, data.assign(attain=scale * data.attain + shift), reml=reml)
    assert moved.fit_result.optimization.method == "scoring"
    assert moved.n_evaluations == base.n_evaluations
    np.testing.assert_allclose(moved.theta, base.theta, rtol=1e-8)
    np.testing.assert_allclose(moved.sigma, abs(scale) * base.sigma, rtol=1e-8)
    dof = base.nobs - (len(base.fe_params) if reml else 0)
    assert moved.llf == pytest.approx(base.llf - dof * np.log(abs(scale)), abs=1e-7)


def _ratings_system(n=40_000, users=2_000, items=400, seed=5):
    """A ratings design (users eliminated first, items after) whose Schur update is the compiled kernel's, as at
    MovieLens size, where the start's traces may be estimated."""
    data = sparsemix.datasets.generate_ratings(n, users, items, min_user=5, min_item=20, seed=seed)
    system = build_design("y ~ 1 + (1 | user) + (1 | item)", data).system()
    system._factor = SchurFactor(system._A, system.cross.ZtZ, system.relcov, update="kernel")
    return system


def test_estimated_traces_agree_with_the_exact_ones_within_their_errors():
    """Hutchinson's estimates (random signs) of the score's traces: within a few standard errors of the inverse's,
    with errors that are not zero (estimated, not computed), the same in every call (fixed signs)."""
    system = _ratings_system()
    theta = np.array([0.5, 0.6])
    with system.threads(), reused_buffers():  # (a fit's buffers, where an inverse is kept)
        system.evaluate(theta)
        exact = system.variance_traces(theta)
        estimate, errors = system.estimated_traces(theta, 16)
        again, _ = system.estimated_traces(theta, 16)
    assert np.all(errors > 0)
    assert np.all(np.abs(estimate - exact) <= 5 * errors)
    assert np.max(np.abs(estimate / exact - 1)) < 1e-3
    np.testing.assert_array_equal(again, estimate)


def test_the_pair_maps_estimated_traces_sum_the_last_small_terms_exactly(monkeypatch):
    """Where the pair map makes the update, the first term's product comes from A21 (two sparse products): within a
    few standard errors of the inverse's traces; the last terms, up to EXACT_DIAGONAL_MAX_COLUMNS columns together,
    have their diagonal sums from the inverse of L's trailing block (exact, no error); above that limit they are
    sampled like the others."""
    X, y, terms = _problem(n=2_000)
    system = _schur_system(X, y, terms, update="pairs")
    theta = np.array([0.7, 1.1, 0.4])
    with system.threads(), reused_buffers():
        system.evaluate(theta)
        exact = system.variance_traces(theta)
        estimate, errors = system.estimated_traces(theta, 64)
        monkeypatch.setattr(factor_module, "EXACT_DIAGONAL_MAX_COLUMNS", 5)  # (the last term's 5 columns only)
        last, last_errors = system.estimated_traces(theta, 64)
        monkeypatch.setattr(factor_module, "EXACT_DIAGONAL_MAX_COLUMNS", 0)
        sampled, sampled_errors = system.estimated_traces(theta, 64)
    assert errors[0] > 0 and np.all(errors[1:] == 0)  # (the terms after the first: 12 and 5 columns)
    np.testing.assert_allclose(estimate[1:], exact[1:], rtol=1e-10)
    assert abs(estimate[0] - exact[0]) <= 5 * errors[0]
    assert last_errors[1] > 0 and last_errors[2] == 0 and last[2] == pytest.approx(exact[2], rel=1e-10)
    assert np.all(sampled_errors > 0) and np.all(np.abs(sampled - exact) <= 5 * sampled_errors)
    np.testing.assert_array_equal(sampled[0], estimate[0])  # (the same signs)


def _scored_calls(monkeypatch):
    """The scored points' traces in turn: "random", "corrected" (estimated) or "inverse"."""
    import sparsemix.fit.scoring as scoring

    calls = []
    original = scoring.scoring_point

    def spy(*args, **kwargs):
        point = original(*args, **kwargs)
        estimated = point is not None and point.trace_errors is not None
        calls.append(("corrected" if point.corrected else "random") if estimated else "inverse")
        return point

    monkeypatch.setattr(scoring, "scoring_point", spy)
    return calls


@pytest.mark.parametrize("reml", [True, False])
def test_an_estimated_start_reaches_the_same_optimum(monkeypatch, reml):
    """From SINGLE_ALWAYS_MIN_ORDER on the start's traces are estimated, and those of a later point as the last
    inverse's plus the change: the same optimum as with the inverses, in as many evaluations, the estimates kept (no
    point scored twice)."""
    import sparsemix.fit.scoring as scoring

    system = _ratings_system()
    start = system.relcov.start()
    monkeypatch.setattr(scoring, "SINGLE_ALWAYS_MIN_ORDER", 1)
    calls = _scored_calls(monkeypatch)
    with system.threads(), reused_buffers():  # (a fit's buffers, where an inverse is kept)
        estimated, _, count = fit_by_scoring(system, start, reml)
        inverses = calls.count("inverse")
        monkeypatch.setattr(system, "estimated_traces", lambda theta, probes, corrected=False: None)
        calls.clear()
        exact, _, count_exact = fit_by_scoring(system, start, reml)
    assert estimated is not None and exact is not None
    assert calls.count("inverse") == len(calls) > inverses + 1  # the start's and a later point's kept
    np.testing.assert_allclose(estimated.theta, exact.theta, rtol=1e-7)
    assert estimated.deviance == pytest.approx(exact.deviance, rel=1e-13)
    assert count == count_exact


def test_an_estimate_too_rough_for_its_step_is_scored_again(monkeypatch):
    """Where the estimate's errors could move the first step by more than ESTIMATE_MAX_SHARE of it (here: any
    error at all), the start is scored again with the inverse, on its own factor (single, as without the estimate):
    the fit is the one without the estimate, in as many evaluations."""
    import sparsemix.fit.scoring as scoring

    system = _ratings_system(seed=6)
    start = system.relcov.start()
    monkeypatch.setattr(scoring, "SINGLE_ALWAYS_MIN_ORDER", 1)
    with system.threads(), reused_buffers():  # (a fit's buffers, where an inverse is kept)
        monkeypatch.setattr(scoring, "ESTIMATE_MAX_SHARE", 0.0)
        monkeypatch.setattr(scoring, "ESTIMATE_FAR_MAX_SHARE", 0.0)
        calls = _scored_calls(monkeypatch)
        rescored, _, count = fit_by_scoring(system, start, True)
        # every estimate (the start's and later ones) scored again with the inverse
        estimates = [i for i, kind in enumerate(calls) if kind != "inverse"]
        assert calls[0] == "random" and "corrected" in calls
        assert all(calls[i + 1] == "inverse" for i in estimates)
        monkeypatch.setattr(system, "estimated_traces", lambda theta, probes, corrected=False: None)
        exact, _, count_exact = fit_by_scoring(system, start, True)
    np.testing.assert_array_equal(rescored.theta, exact.theta)
    assert count == count_exact


def _insteval_like_fit(**kwargs):
    data = generate_insteval_like(1_500, 1_100, 8, 10.0, seed=7)
    return sparsemix.lmer("y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)", data, **kwargs)


@pytest.mark.parametrize("reml", [True, False])
def test_a_pair_map_fit_from_an_estimated_start_reaches_the_same_optimum(monkeypatch, reml):
    """From START_ESTIMATE_MIN_ORDER columns after the first term (here 1,039 lecturers and 16 departments x
    service) the start's traces are estimated, not inverted: the estimate is kept (the start not scored again), one
    inverse fewer, the same optimum in as many evaluations as with the start's inverse."""
    import sparsemix.fit.scoring as scoring

    calls = _scored_calls(monkeypatch)
    estimated = _insteval_like_fit(reml=reml)
    with_estimate = list(calls)
    least_order = scoring.START_ESTIMATE_MIN_ORDER
    monkeypatch.setattr(scoring, "START_ESTIMATE_MIN_ORDER", 10**9)
    calls.clear()
    exact = _insteval_like_fit(reml=reml)
    system = estimated.fit_result.system
    assert system.factorization_mode == "schur" and system._factor.update == "pairs"
    assert system.relcov.after_first >= least_order
    assert with_estimate[0] == "random" and with_estimate[1:] == ["inverse"] * (len(with_estimate) - 1)
    assert calls == ["inverse"] * len(with_estimate)
    np.testing.assert_allclose(estimated.theta, exact.theta, rtol=1e-6)
    assert abs(estimated.deviance - exact.deviance) < 1e-8  # (both stop short of a step worth less: _negligible)
    assert estimated.n_evaluations == exact.n_evaluations


def test_traces_corrected_from_a_nearby_inverse_are_far_closer_than_the_signs_alone():
    """Near the point of the last inverse, its traces plus the estimated change: within a few of their standard
    errors of the exact traces, errors a small fraction of the plain estimate's; not offered once another inverse was
    computed (its buffer reused) or outside the fit that computed it."""
    system = _ratings_system()
    near, far = np.array([0.5, 0.6]), np.array([0.5005, 0.5994])
    with system.threads(), reused_buffers():  # (a fit's buffers, where an inverse is kept)
        system.evaluate(near)
        system.variance_traces(near, single=True)  # (kept)
        system.evaluate(far)
        corrected, errors = system.estimated_traces(far, 16, corrected=True)
        _, plain_errors = system.estimated_traces(far, 16)
        exact = system.variance_traces(far)
        assert system.estimated_traces(far, 16, corrected=True)[0] is not None  # (its own inverse now)
        factor_module.dense_inverse_lower(system._factor._LS)  # another inverse: the kept one is gone
        assert system.estimated_traces(near, 16, corrected=True) is None
    assert system.estimated_traces(near, 16, corrected=True) is None  # (the fit's buffers are gone)
    assert np.all(np.abs(corrected - exact) <= 5 * errors + 1e-6 * np.abs(exact))
    assert np.all(errors < plain_errors / 20)


def test_a_factor_told_to_expect_scoring_forms_the_trace_product_with_its_first_update():
    """expect_scoring: the first refactorization's pass over the pair map forms the score's trace product too (no
    pass of its own afterwards), and the traces are those computed without it."""
    X, y, terms = _problem(n=2_000)
    theta = np.array([0.7, 1.1, 0.4])
    told, plain = _schur_system(X, y, terms, update="pairs"), _schur_system(X, y, terms, update="pairs")
    told.expect_scoring()
    with told.threads(), reused_buffers():
        told.evaluate(theta)
        assert told._factor._score_products is not None
        expected = told.variance_traces(theta)
    with plain.threads(), reused_buffers():
        plain.evaluate(theta)
        assert plain._factor._score_products is None
        traces = plain.variance_traces(theta)
    np.testing.assert_allclose(expected, traces, rtol=1e-12)


def test_trailing_rescaled_is_the_factor_of_the_rescaled_system():
    """A change of the last columns' scale by a ratio f: L's new trailing block and the map of L^{-1} B's trailing rows
    equal those of a Cholesky factor of the rescaled matrix computed afresh (ratios above and below 1)."""
    from sparsemix.core.factor import trailing_rescaled

    rng = np.random.default_rng(11)
    q, count = 40, 6
    Z = (rng.random((300, q)) < 0.2) * 1.0
    scales = rng.uniform(0.3, 1.5, q)
    B = rng.normal(size=(q, 3))
    for ratio in (0.6, 1.7):
        new_scales = scales.copy()
        new_scales[-count:] *= ratio
        factors = []
        for s in (scales, new_scales):
            A = s[:, None] * (Z.T @ Z) * s[None, :] + np.eye(q)
            L = np.linalg.cholesky(A)
            factors.append((L, np.linalg.solve(L, s[:, None] * B)))
        (L, half), (L_new, half_new) = factors
        block, mapping = trailing_rescaled(L[-count:, -count:], ratio)
        np.testing.assert_allclose(block, L_new[-count:, -count:], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(L[-count:, :-count] * ratio, L_new[-count:, :-count], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(mapping @ half[-count:], half_new[-count:], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(half[:-count], half_new[:-count], rtol=1e-12)


def _refinable_design(n=6_000, seed=2):
    data = generate_insteval_like(n // 8, 300, 8, 8.0, seed=seed)
    design = build_design("y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)", data)
    return lambda factorization: build_system(
        design.X, design.response, list(design.terms), factorization=factorization
    )


@pytest.mark.parametrize("reml", [True, False])
def test_the_last_terms_refinement_equals_a_fresh_evaluation_at_its_conditional_optimum(reml):
    """refined_last_term moves the last small term's theta to its optimum with the others held, and leaves the factor
    as a fresh evaluation there would: the same deviance, R_ZX, c_u, log-determinants, modes and score traces; the
    deviance a little off that theta either way is higher."""
    make = _refinable_design()
    system, fresh = make("schur"), make("schur")
    assert isinstance(system._factor, SchurFactor) and system.relcov.column_counts[-1] <= 64
    theta = np.array([0.5, 0.6, 0.9])  # the last term's theta far from its conditional optimum
    with system.threads():
        system.expect_scoring()  # (the score's pair product formed with the update, then rescaled with the rest)
        ev = system.evaluate(theta)
        refined = system.refined_last_term(ev, reml)
        assert np.array_equal(refined.theta[:-1], theta[:-1]) and abs(refined.theta[-1] / theta[-1] - 1) > 0.05
        deviance = system.profiled_deviance(refined, reml)
        assert deviance < system.profiled_deviance(ev, reml)
        direct = fresh.evaluate(refined.theta)
        assert deviance == pytest.approx(fresh.profiled_deviance(direct, reml), rel=1e-13)
        for name in ("logdet_L2", "logdet_RX2", "r2"):
            assert getattr(refined, name) == pytest.approx(getattr(direct, name), rel=1e-11)
        np.testing.assert_allclose(refined.RZX, direct.RZX, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(refined.cu, direct.cu, rtol=1e-9, atol=1e-11)
        for mine, theirs in zip(system.modes(refined), fresh.modes(direct)):
            np.testing.assert_allclose(mine, theirs, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(
            system.variance_traces(refined.theta), fresh.variance_traces(refined.theta), rtol=1e-10
        )
        assert system.evaluation_at(refined.theta) is refined  # (the factor is there: no refactorization)
        for ratio in (1 - 1e-3, 1 + 1e-3):
            off = refined.theta * np.array([1.0, 1.0, ratio])
            assert fresh.deviance(off, reml) > deviance


def test_the_refinement_applies_only_to_a_small_last_term_of_a_schur_factor(monkeypatch):
    """Where the last term has more columns than REFINED_TERM_MAX_COLUMNS, or the factor is not the Schur form, the
    evaluation comes back as it was, the factor untouched."""
    import sparsemix.core.system as system_module

    make = _refinable_design()
    theta = np.array([0.5, 0.6, 0.9])
    for factorization in ("schur", "simplicial"):
        system = make(factorization)
        if factorization == "schur":
            monkeypatch.setattr(system_module, "REFINED_TERM_MAX_COLUMNS", system.relcov.column_counts[-1] - 1)
        with system.threads():
            ev = system.evaluate(theta)
            assert system.refined_last_term(ev, True) is ev
            assert system.evaluation_at(theta) is ev
        monkeypatch.undo()


def test_a_step_worth_less_than_the_stop_decrease_is_not_taken(monkeypatch):
    """Where the next step would lower the deviance by less than SCORING_STOP_DECREASE the fit ends at the point:
    without the rule it takes that step too (one evaluation more) and gains less than the rule allowed."""
    import sparsemix.fit.scoring as scoring

    reml, allowed = True, scoring.SCORING_STOP_DECREASE
    stopped = _insteval_like_fit(reml=reml)
    monkeypatch.setattr(scoring, "SCORING_STOP_DECREASE", 0.0)
    monkeypatch.setattr(scoring, "SCORING_DEVIANCE_RESOLUTION", 0.0)
    on = _insteval_like_fit(reml=reml)
    assert stopped.fit_result.optimization.method == on.fit_result.optimization.method == "scoring"
    assert stopped.n_evaluations < on.n_evaluations
    assert 0.0 <= stopped.deviance - on.deviance < allowed
    np.testing.assert_allclose(stopped.theta, on.theta, rtol=1e-5)


@pytest.mark.parametrize("reml", [True, False])
def test_refining_the_last_term_saves_evaluations_and_reaches_the_optimum(monkeypatch, reml):
    """The steps with dept:service refined at each point reach an optimum at least as good as without, in no more
    evaluations, and in fewer on a design where the AI's steps lag on that term of few levels (they converge on it
    only linearly)."""
    import sparsemix.core.system as system_module

    formula = "y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)"
    designs = [(1_500, 1_100, 8, 10.0, 7), (3_000, 1_000, 12, 20.0, 4), (2_000, 1_200, 20, 15.0, 1)]
    counts = []
    for students, lecturers, departments, ratings, seed in designs:
        data = generate_insteval_like(students, lecturers, departments, ratings, seed=seed)
        refined = sparsemix.lmer(formula, data, reml=reml)
        monkeypatch.setattr(system_module, "REFINED_TERM_MAX_COLUMNS", 0)
        plain = sparsemix.lmer(formula, data, reml=reml)
        monkeypatch.undo()
        assert refined.fit_result.optimization.method == plain.fit_result.optimization.method == "scoring"
        assert refined.deviance <= plain.deviance + 1e-8
        np.testing.assert_allclose(refined.theta, plain.theta, rtol=1e-4)
        counts.append((refined.n_evaluations, plain.n_evaluations))
    assert all(mine <= theirs for mine, theirs in counts)
    assert counts[2][0] < counts[2][1]


def test_a_single_precision_factor_is_the_exact_factor_of_a_matrix_close_to_s():
    """dense_cholesky_single: lower triangular, in double, L L' within ~1e-7 of S (relative to its largest entry),
    the log-determinant within ~1e-5; S assembled in single_cholesky_array, the buffer of the single-precision
    inverse, which a kept inverse no longer holds after it."""
    from sparsemix.core.factor import _INVERSES, dense_cholesky, dense_cholesky_single, single_cholesky_array

    rng = np.random.default_rng(4)
    n = 300
    B = rng.normal(size=(n, 3 * n))
    S = B @ B.T / n + np.eye(n)
    with reused_buffers():
        before = _INVERSES[0]
        target = single_cholesky_array(n)
        assert _INVERSES[0] == before + 1 and target.dtype == np.float32 and target.flags.c_contiguous
        target[...] = np.tril(S)  # (the lower triangle is what is read)
        L = dense_cholesky_single(target, np.empty((n, n)))
    exact = dense_cholesky(S.copy())
    assert L.dtype == np.float64 and np.all(np.triu(L, 1) == 0.0)
    assert np.max(np.abs(L @ L.T - S)) / np.max(np.abs(S)) < 1e-6
    assert 0.0 < np.max(np.abs(L - exact)) < 1e-4
    logdet, exact_logdet = 2 * np.sum(np.log(np.diag(L))), 2 * np.sum(np.log(np.diag(exact)))
    assert abs(logdet - exact_logdet) < 1e-3 and logdet != exact_logdet
    with pytest.raises(np.linalg.LinAlgError):
        dense_cholesky_single(-S.astype(np.float32), np.empty((n, n)))


def test_a_single_evaluation_is_close_and_never_stands_in_for_a_double_one(monkeypatch):
    """evaluate(theta, single=True) in the Schur form: the deviance close to the double evaluation's (not equal);
    afterwards every double request at theta (evaluate, evaluation_at, the traces' factor, a solution) factors again
    in double and equals a fresh system's to rounding; a system not in the Schur form ignores `single`."""
    make = _refinable_design()
    theta = np.array([0.5, 0.6, 0.9])
    system, fresh = make("schur"), make("schur")
    with system.threads():
        exact = fresh.evaluate(theta)
        single = system.evaluate(theta, single=True)
        assert single.single and not exact.single
        gap = abs(system.profiled_deviance(single, True) - fresh.profiled_deviance(exact, True))
        assert 0.0 < gap < 1e-3
        assert system.evaluation_at(theta) is not single  # factored again, in double
        assert system.profiled_deviance(system.evaluation_at(theta), True) == pytest.approx(
            fresh.profiled_deviance(exact, True), rel=1e-13
        )
        system.evaluate(theta, single=True)
        np.testing.assert_allclose(system.variance_traces(theta), fresh.variance_traces(theta), rtol=1e-6)
        system.evaluate(theta, single=True)
        columns = np.arange(5)
        np.testing.assert_allclose(
            system.conditional_covariance(theta, columns), fresh.conditional_covariance(theta, columns), rtol=1e-10
        )
        assert not system.evaluate(theta, single=True).single  # (the double factor there serves)
        other = theta * 1.1
        assert system.evaluate(other, single=True).single
        np.testing.assert_allclose(system.evaluate(other).cu, fresh.evaluate(other).cu, rtol=1e-9, atol=1e-12)
        simplicial = make("simplicial")
        assert not simplicial.evaluate(theta, single=True).single
        # above DENSE_THREADS_MAX_ORDER the factorization stays in double, and says so
        monkeypatch.setattr(factor_module, "DENSE_THREADS_MAX_ORDER", system.relcov.after_first - 1)
        large = system.evaluate(theta * 0.9, single=True)
        assert not large.single and system.evaluation_at(theta * 0.9) is large


def test_the_steps_factor_far_points_in_single_precision_and_end_on_a_double_one(monkeypatch):
    """On an InstEval-like design (1,100 lecturers after the students) the start and the point after the long first
    step are factored in single precision, the last in double: the fit's optimum, deviance and evaluations are those
    of the steps with double factors only (the deviance within 1e-8, theta within 1e-6), and its deviance is a
    double evaluation's at its theta."""
    import sparsemix.core.system as system_module

    factored = []
    original = system_module.PenalizedSystem._refactor

    def spy(self, theta, factors, single=False):
        factored.append(single)
        return original(self, theta, factors, single)

    monkeypatch.setattr(system_module.PenalizedSystem, "_refactor", spy)
    fit = _insteval_like_fit()
    assert fit.fit_result.optimization.method == "scoring"
    assert factored[:2] == [True, True] and factored[-1] is False
    monkeypatch.setattr(
        system_module.PenalizedSystem,
        "_refactor",
        lambda self, theta, factors, single=False: original(self, theta, factors),
    )
    double = _insteval_like_fit()
    assert fit.n_evaluations == double.n_evaluations
    assert abs(fit.deviance - double.deviance) < 1e-8
    np.testing.assert_allclose(fit.theta, double.theta, rtol=1e-6)
    system = fit.fit_result.system
    assert fit.deviance == pytest.approx(system.deviance(fit.fit_result.theta, True), rel=1e-14)


def test_a_step_from_a_single_point_is_not_refused_for_its_rounding(monkeypatch):
    """A single-precision point's deviance is off by its rounding (up to 6e-10 of it on InstEval): where it is
    against the step (the point's value too low), the step is still kept within SINGLE_FACTOR_SLACK, and the fit ends
    where the exact one does; with no slack it refuses the step and halves it."""
    import sparsemix.core.system as system_module
    import sparsemix.fit.scoring as scoring

    exact = _insteval_like_fit()
    original = system_module.PenalizedSystem.profiled_deviance
    # (this design's second step lowers the deviance by 6e-8 of it: a rounding of 9e-8 against it, within a slack of
    # 1e-7, where this machine's rounding stays below 6e-10)
    monkeypatch.setattr(scoring, "SINGLE_FACTOR_SLACK", 1e-7)

    def low(self, ev, reml):  # every single point's deviance 9e-8 of it too low
        value = original(self, ev, reml)
        return value - 9e-8 * abs(value) if ev.single else value

    monkeypatch.setattr(system_module.PenalizedSystem, "profiled_deviance", low)
    kept = _insteval_like_fit()
    assert kept.n_evaluations == exact.n_evaluations and kept.deviance == pytest.approx(exact.deviance, abs=1e-8)
    monkeypatch.setattr(scoring, "SINGLE_FACTOR_SLACK", 1e-12)
    refused = _insteval_like_fit()
    assert refused.n_evaluations > exact.n_evaluations
