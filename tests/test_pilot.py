"""Starting values from a pilot fit on a level subsample (sparsemix/fit/pilot.py): same optimum, fewer evaluations."""

import warnings

import numpy as np
import pandas as pd
import pytest

import sparsemix
from sparsemix.datasets import generate_crossed_slopes, generate_insteval_like, seed_datasets
from sparsemix.fit.optimize import warm_step
from sparsemix.fit.pilot import pilot_start
from sparsemix.fit.stages import build_system
from sparsemix.lme4.design import build_design

CASES = {
    "insteval-like": (
        lambda: generate_insteval_like(1_500, 600, 10, 15),
        "y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)",
    ),
    "crossed slopes": (lambda: generate_crossed_slopes(30_000, 1_500, 600), "y ~ 1 + x + (1 + x | a) + (1 | b)"),
}


def _design(case):
    make, formula = CASES[case]
    return build_design(formula, make()), formula


def _pilot(design, system, reml=True):
    return pilot_start(system, design.X, design.y - design.offset, list(design.terms), design.weights, reml)


@pytest.mark.parametrize("case", sorted(CASES))
def test_pilot_start_is_near_the_optimum_and_deterministic(case):
    design, _ = _design(case)
    system = build_system(design.X, design.y, list(design.terms), factorization="schur")
    theta, step = _pilot(design, system)
    again, _ = _pilot(design, system)
    assert np.array_equal(theta, again)  # fixed seed: the same fit twice, bit for bit
    optimum = sparsemix.fit.stages.optimize_system(system).theta
    big = np.abs(optimum) > 0.1  # (small entries: an absolute bound below)
    np.testing.assert_allclose(theta[big], optimum[big], rtol=0.25)
    np.testing.assert_allclose(theta[~big], optimum[~big], atol=0.05)
    np.testing.assert_array_equal(step, warm_step(theta))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("reml", [True, False])
def test_fit_from_the_pilot_equals_the_fit_from_lme4s_start_with_fewer_evaluations(case, reml):
    design, formula = _design(case)
    data = CASES[case][0]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        piloted = sparsemix.lmer(formula, data, reml=reml)
        cold = sparsemix.lmer(formula, data, reml=reml, start=design.system().relcov.start())
    assert piloted.llf == pytest.approx(cold.llf, rel=1e-12)
    # (the Newton steps end where what they would still gain of the deviance is under its resolution, 1e-14 of it:
    # where the deviance is flat in an entry of theta, that leaves it up to ~1e-5 off, which two starts can leave on
    # opposite sides)
    np.testing.assert_allclose(piloted.theta, cold.theta, rtol=2e-5)
    np.testing.assert_allclose(piloted.fe_params, cold.fe_params, rtol=1e-6)
    if case == "crossed slopes":
        # L-BFGS-B with the exact gradient takes no pilot (pilot.pilot_wanted): the same fit from lme4's start
        assert piloted.fit_result.optimization.method == "gradient"
        assert piloted.n_evaluations == cold.n_evaluations
    else:
        assert piloted.n_evaluations < cold.n_evaluations


def test_no_pilot_where_it_cannot_pay():
    nested, crossed = seed_datasets()
    # The seed's crossed design: 100 levels after the first term, milliseconds per evaluation.
    design = build_design("y ~ 1 + (1|group1) + (1|group2)", crossed)
    assert _pilot(design, design.system()) is None
    # The nested design: the 4,000 group1:group2 levels come first, then only group1's 200.
    design = build_design("y ~ 1 + (1|group1) + (1|group1:group2)", nested)
    assert _pilot(design, design.system()) is None
    # statsmodels' order for the same model: group1 first, then its 4,000 nested levels, which fill nothing.
    system = build_system(design.X, design.y, list(design.terms)[::-1])
    assert system.relcov.blocks[0][0] == 200 and not system.densely_linked
    assert _pilot(design, system) is None


def test_the_pilot_does_not_depend_on_the_factorization():
    # The factorization is chosen by timing (a loaded machine may pick another): the pilot must not care.
    design, _ = _design("insteval-like")
    starts = [
        _pilot(design, build_system(design.X, design.y, list(design.terms), factorization=mode))[0]
        for mode in ("schur", "simplicial")
    ]
    np.testing.assert_allclose(starts[0], starts[1], rtol=1e-3)


def test_a_growth_curves_moment_start_is_near_lme4s_optimum_and_saves_evaluations():
    """One term with slopes starts from its levels' own least-squares fits (pilot.moment_start): within 10% of
    lme4's theta on sleepstudy, and the fit from it takes far fewer evaluations than from lme4's theta = 1, to the
    same optimum."""
    from conftest import reference_data, reference_fit

    from sparsemix.fit.pilot import moment_start

    data = reference_data("sleepstudy")
    _, ref = reference_fit("sleepstudy", "reml_corr")
    design = build_design(ref["formula"], data)
    start = moment_start(design.X, design.response, list(design.terms))
    np.testing.assert_allclose(start, ref["theta"], rtol=0.1, atol=0.02)
    fit = sparsemix.lmer(ref["formula"], data)
    from_one = sparsemix.lmer(ref["formula"], data, start=[1.0, 0.0, 1.0])
    assert fit.n_evaluations <= 8 and from_one.n_evaluations >= 2 * fit.n_evaluations
    assert fit.llf == pytest.approx(ref["logLik"], abs=1e-7)
    np.testing.assert_allclose(fit.fit_result.theta, from_one.fit_result.theta, rtol=1e-7, atol=1e-9)
    # prior weights w: Var(e) = sigma^2 / w, so a weight of 2 on every row leaves Var(b) and halves sigma^2
    halved = moment_start(design.X, design.response, list(design.terms), weights=np.full(len(data), 2.0))
    np.testing.assert_allclose(halved, start / np.sqrt(2.0), rtol=1e-9)


@pytest.mark.parametrize(
    "dataset, fit_name",
    [
        ("sleepstudy", "ml_corr"),
        ("sleepstudy", "reml_uncorr"),
        ("sleepstudy", "ml_uncorr"),
        ("Loblolly", "loblolly_ml"),
        ("Orthodont", "orthodont_ml"),
        ("BodyWeight", "bodyweight_ml"),
        ("Orthodont", "orthodont_reml"),
        ("BodyWeight", "bodyweight_reml"),
    ],
)
def test_the_moment_start_is_the_optimum_on_balanced_growth_curves(dataset, fit_name):
    """The levels' spread about their mean is taken over m for ML, and for REML over m less the fixed effects'
    share of the levels' coefficients (Orthodont's and BodyWeight's age * Sex, Time * Diet: 2 of each level's 2,
    m - 2; sleepstudy's m - 1), with lme4's || the diagonal covariance's optimum (_diagonal_optimum): on these
    balanced designs (every level measured at the same times) that is the
    criterion's optimum, the optimum of a fit from lme4's start to 1e-6 (lme4's own theta to 1e-2: it stops
    short), and the exact Hessian's Newton step from it is shorter than HESSIAN_NEWTON_LAST_STEP (one evaluation,
    where REML's moments over m - 1 took 4)."""
    from conftest import load_reference, reference_data, reference_fit

    from sparsemix.fit.pilot import moment_start

    if dataset == "sleepstudy":
        data, ref = reference_data("sleepstudy"), reference_fit("sleepstudy", fit_name)[1]
    else:
        entry = load_reference("random_slopes")[dataset]
        data, ref = pd.DataFrame(entry["data"]), next(f for f in entry["fits"] if f["name"] == fit_name)
    design = build_design(ref["formula"], data)
    start = moment_start(design.X, design.response, list(design.terms), reml=ref["reml"])
    lme4_start = np.concatenate([np.where(t.template.on_diagonal(), 1.0, 0.0) for t in design.terms])
    from_one = sparsemix.lmer(ref["formula"], data, reml=ref["reml"], start=lme4_start)
    optimum = from_one.fit_result.theta
    np.testing.assert_allclose(start, optimum, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(start, ref["theta"], rtol=1e-2, atol=1e-5)
    fit = sparsemix.lmer(ref["formula"], data, reml=ref["reml"])
    assert fit.n_evaluations == 1 < from_one.n_evaluations
    np.testing.assert_allclose(fit.fit_result.theta, optimum, rtol=1e-7, atol=1e-9)
    assert fit.llf >= ref["logLik"] - 1e-9


def test_the_fixed_share_counts_grouping_level_covariates():
    """REML's divisor m - share: 1 where the fixed part is the term's own columns (or adds a column inside the
    levels' span on identical designs, Loblolly's age^2), 2 where a grouping-level covariate interacts with all of
    them (Orthodont's age * Sex), 1.5 where it shifts the intercept only (age + Sex)."""
    from conftest import load_reference

    from sparsemix.fit import pilot

    seen = []
    original = pilot._fixed_share

    def spy(*args):
        seen.append(original(*args))
        return seen[-1]

    orthodont = pd.DataFrame(load_reference("random_slopes")["Orthodont"]["data"])
    loblolly = pd.DataFrame(load_reference("random_slopes")["Loblolly"]["data"])
    cases = [
        ("distance ~ age + (age | Subject)", orthodont, 1.0),
        ("distance ~ age * Sex + (age | Subject)", orthodont, 2.0),
        ("distance ~ age + Sex + (age | Subject)", orthodont, 1.5),
        ("height ~ age + I(age^2) + (age | Seed)", loblolly, 1.0),
    ]
    pilot._fixed_share = spy
    try:
        for formula, data, share in cases:
            design = build_design(formula, data)
            assert pilot.moment_start(design.X, design.response, list(design.terms)) is not None
            assert seen[-1] == share, formula
    finally:
        pilot._fixed_share = original


def test_the_ml_moment_start_keeps_the_reml_divisor_where_a_variance_would_vanish():
    """nlme's Dialyzer (ML): over m, a variance of the moments is <= 0; the start is then the moments over m - 1
    (floored near singular for the exact Hessian), not lme4's theta = 1 (which took 15 evaluations against 9)."""
    from conftest import load_reference

    from sparsemix.fit.pilot import moment_start

    entry = load_reference("random_slopes")["Dialyzer"]
    data, ref = pd.DataFrame(entry["data"]), entry["fits"][0]
    design = build_design(ref["formula"], data)
    args = (design.X, design.response, list(design.terms))
    ml = moment_start(*args, floor_near_singular=True, reml=False)
    assert ml is not None and np.all(np.isfinite(ml))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparsemix.SingularFitWarning)
        fit = sparsemix.lmer(ref["formula"], data, reml=False)
    assert fit.n_evaluations <= 9
    assert fit.llf >= ref["logLik"] - 1e-8


def test_the_moment_start_is_left_out_where_it_does_not_apply():
    """lme4's start instead: several terms, a scalar term, too few levels, a near-singular covariance (a slope
    with no variance: the optimum at the boundary)."""
    from conftest import reference_data

    from sparsemix.fit.pilot import moment_start

    data = reference_data("sleepstudy")

    def start(formula, frame=data):
        d = build_design(formula, frame)
        return moment_start(d.X, d.response, list(d.terms))

    assert start("Reaction ~ Days + (1 | Subject)") is None
    assert start("Reaction ~ Days + (Days | Subject) + (1 | Days)") is None  # two groupings
    # lme4's || of three columns (the diagonal model's optimum is taken for two): the correlated start's variances
    quadratic = "Reaction ~ Days + I(Days**2) + (Days + I(Days**2) {} Subject)"
    correlated = build_design(quadratic.format("|"), data).terms[0].template
    T = correlated.factor(start(quadratic.format("|")))
    split = start(quadratic.format("||"))
    np.testing.assert_allclose(split, np.sqrt(np.diag(T @ T.T)), rtol=1e-9)
    few = data[data.Subject.isin(data.Subject.unique()[:4])]
    assert start("Reaction ~ Days + (Days | Subject)", few) is None
    rng = np.random.default_rng(1)
    flat = data.assign(Reaction=100 + 10 * data.Days + rng.normal(size=len(data)))  # no random slope at all
    assert start("Reaction ~ Days + (Days | Subject)", flat) is None


def test_a_near_singular_moment_start_is_lifted_for_the_exact_hessian():
    """With floor_near_singular (systems with the exact Hessian), mlmRev's Early (its optimum at a correlation of
    -1) starts from the moments with the correlation's eigenvalues below MOMENT_MIN_CORRELATION_EIGENVALUE lifted to
    MOMENT_LIFTED_EIGENVALUE, where without the floor there is no start, and the fit reaches lme4's optimum in at
    most 5 evaluations (9 from lme4's start)."""
    from conftest import load_reference

    from sparsemix.fit.pilot import MOMENT_LIFTED_EIGENVALUE, moment_start

    entry = load_reference("random_slopes")["Early"]
    data = pd.DataFrame(entry["data"])
    ref = entry["fits"][0]
    design = build_design(ref["formula"], data)
    assert moment_start(design.X, design.response, list(design.terms)) is None
    start = moment_start(design.X, design.response, list(design.terms), floor_near_singular=True)
    T = np.array([[start[0], 0.0], [start[1], start[2]]])
    covariance = T @ T.T
    correlation = covariance / np.sqrt(np.outer(np.diag(covariance), np.diag(covariance)))
    # (lifted to the floor, then back to a unit diagonal: near it)
    assert 0.5 * MOMENT_LIFTED_EIGENVALUE < np.linalg.eigvalsh(correlation)[0] < 2 * MOMENT_LIFTED_EIGENVALUE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparsemix.SingularFitWarning)
        fit = sparsemix.lmer(ref["formula"], data)
    assert fit.n_evaluations <= 5 and fit.llf >= ref["logLik"] - 1e-7


@pytest.mark.parametrize("name", ["penicillin", "pastes", "oats", "dyestuff"])
def test_variance_components_start_from_their_anova_moments(name):
    """Balanced designs: the moment start (pilot.components_start) is REML's optimum to 1e-6 (the ANOVA
    estimates), and the REML fit from it takes at most 2 evaluations (from lme4's start: 8-15), at lme4's
    log-likelihood. ML: on nested terms (pastes, oats, Dyestuff) the moments with the mean taken as known are ML's
    optimum, one evaluation; on crossed ones (Penicillin) the REML moments taken to the solution of ML's equations
    on the strata (_ml_strata) are ML's optimum too, one evaluation, where REML's moments were 9% off (5)."""
    from conftest import reference_data, reference_fit

    from sparsemix.fit.pilot import components_start

    data = reference_data(name)
    for fit_name in ("reml", "ml"):
        _, ref = reference_fit(name, fit_name)
        design = build_design(ref["formula"], data)
        fit = sparsemix.lmer(ref["formula"], data, reml=ref["reml"])
        assert fit.llf == pytest.approx(ref["logLik"], abs=1e-7)
        if fit_name == "reml":
            start = components_start(design.system())
            np.testing.assert_allclose(start, fit.fit_result.theta, rtol=1e-6)
            assert fit.n_evaluations <= 2
            from_one = sparsemix.lmer(ref["formula"], data, start=np.ones(start.size))
            assert from_one.n_evaluations >= 4 * fit.n_evaluations
        else:
            start = components_start(design.system(), reml=False)
            if name == "penicillin":
                reml_start = components_start(design.system())
                assert np.max(np.abs(reml_start / fit.fit_result.theta - 1)) > 0.05
            np.testing.assert_allclose(start, fit.fit_result.theta, rtol=1e-6)
            assert fit.n_evaluations == 1


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_ml_components_start_solves_mls_equations_on_balanced_crossed_designs(seed):
    """Balanced crossed designs (a x b cells, r rows each, the mean as the only fixed effect; optimum inside): the
    ML start is the optimum of an ML fit from lme4's start, to 1e-6, and the default fit takes one evaluation."""
    from sparsemix.fit.pilot import components_start

    rng = np.random.default_rng(seed)
    a, b, r = rng.integers(5, 25), rng.integers(4, 15), rng.integers(1, 4)
    A, B = np.repeat(np.arange(a), b * r), np.tile(np.repeat(np.arange(b), r), a)
    y = 2.0 + 1.5 * rng.normal(size=a)[A] + rng.normal(size=b)[B] + rng.normal(size=A.size)  # (no variance at 0)
    data = pd.DataFrame({"y": y, "A": A.astype(str), "B": B.astype(str)})
    formula = "y ~ 1 + (1 | A) + (1 | B)"
    start = components_start(build_design(formula, data).system(), reml=False)
    from_one = sparsemix.lmer(formula, data, reml=False, start=[1.0, 1.0])
    np.testing.assert_allclose(np.sort(start), np.sort(from_one.fit_result.theta), rtol=1e-6)
    fit = sparsemix.lmer(formula, data, reml=False)
    assert fit.n_evaluations == 1 < from_one.n_evaluations
    assert fit.llf >= from_one.llf - 1e-9


def test_the_ml_strata_leave_reml_ratios_where_their_equations_have_no_solution():
    """_ml_strata returns the REML ratios it was given, without a warning, where a term has one level, the
    residual has no degrees of freedom, or the mean's stratum would not be positive."""
    from sparsemix.fit.pilot import _ml_strata

    ratios = np.array([0.5, 0.2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ml_strata(ratios, np.array([10.0, 50.0]), np.array([1.0, 5.0]), 40.0) is ratios
        assert _ml_strata(ratios, np.array([10.0, 50.0]), np.array([5.0, 5.0]), 0.0) is ratios
        solved = _ml_strata(ratios, np.array([10.0, 50.0]), np.array([5.0, 5.0]), 40.0)
    assert np.all(np.isfinite(solved)) and np.all(solved < ratios)  # ML's variances below REML's


def test_the_ml_components_start_is_mls_closed_form_on_a_one_way_design():
    """Balanced one-way, a levels of n rows: ML's optimum is sigma_b^2 = (SSA / a - MSE) / n, sigma^2 = MSE."""
    from sparsemix.fit.pilot import components_start

    rng = np.random.default_rng(8)
    a, n = 9, 5
    data = pd.DataFrame({"g": np.repeat(np.arange(a), n)})
    data["y"] = 3.0 + rng.normal(size=a)[data.g] * 1.5 + rng.normal(size=a * n)
    means = data.groupby("g").y.mean().to_numpy()
    ssa = n * np.sum((means - data.y.mean()) ** 2)
    mse = np.sum((data.y - means[data.g]) ** 2) / (a * n - a)
    expected = np.sqrt((ssa / a - mse) / n / mse)
    system = build_design("y ~ 1 + (1 | g)", data).system()
    assert components_start(system, reml=False)[0] == pytest.approx(expected, rel=1e-12)
    assert components_start(system)[0] == pytest.approx(np.sqrt((ssa / (a - 1) - mse) / n / mse), rel=1e-12)


@pytest.mark.parametrize("dense_max_q", [0, 300])  # Z'Z sparse; dense
def test_the_components_start_equals_its_moment_equations_formed_densely(monkeypatch, dense_max_q):
    """An unbalanced crossed design with two fixed effects: components_start (M = Z'(I - H)Z never formed: Z'Z and
    a rank-p correction) solves the moment equations of its docstring, here formed from M itself."""
    import sparsemix.fit.pilot as pilot
    from sparsemix.fit.pilot import components_start

    monkeypatch.setattr(pilot, "COMPONENTS_DENSE_MAX_Q", dense_max_q)

    rng = np.random.default_rng(4)
    n = 300
    data = pd.DataFrame({"a": rng.integers(0, 15, n), "b": rng.integers(0, 9, n), "x": rng.normal(size=n)})
    data["y"] = rng.normal(size=15)[data.a] * 0.8 + rng.normal(size=9)[data.b] * 0.5 + data.x + rng.normal(size=n)
    system = build_design("y ~ x + (1 | a) + (1 | b)", data).system()
    c, rc = system.cross, system.relcov
    ZtZ = c.ZtZ.toarray()
    M = ZtZ - c.ZtX @ np.linalg.solve(c.XtX, c.ZtX.T)
    d2 = np.diagonal(ZtZ) ** 2
    J = len(rc.blocks)
    A, b = np.zeros((J + 1, J + 1)), np.zeros(J + 1)
    for j, rows in enumerate(rc.column_slices):
        b[j] = np.mean(c.Zty[rows] ** 2 / d2[rows])
        for k, cols in enumerate(rc.column_slices):
            A[j, k] = np.mean(np.sum(M[rows, cols] ** 2, axis=1) / d2[rows])
        A[j, J] = np.mean(np.diagonal(M)[rows] / d2[rows])
        A[J, j] = np.trace(M[rows, rows])
    A[J, J], b[J] = c.n - c.p, c.yty
    variances = np.linalg.solve(A, b)
    expected = rc.reported_theta(np.sqrt(variances[:J] / variances[J]))
    np.testing.assert_allclose(components_start(system), expected, rtol=1e-10)


def test_the_components_start_is_left_out_or_safe_where_it_does_not_fit():
    """None for a term with slopes. Where the moments give a variance <= 0: one variance (Dyestuff2, whose REML
    optimum is at 0) starts at 0 and ends there, exactly; of two (a balanced 12 x 6 design whose second factor has
    no effect, seed 1), the start is floored at COMPONENTS_MIN_RATIO, and the fit ends at BOBYQA's optimum, the
    variance exactly 0."""
    from conftest import reference_data

    from sparsemix.fit.pilot import COMPONENTS_MIN_RATIO, components_start
    from sparsemix.fit.stages import optimize_system

    sleep = reference_data("sleepstudy")
    assert components_start(build_design("Reaction ~ Days + (Days | Subject)", sleep).system()) is None
    data = reference_data("dyestuff2")
    assert components_start(build_design("Yield ~ 1 + (1 | Batch)", data).system())[0] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparsemix.SingularFitWarning)
        fit = sparsemix.lmer("Yield ~ 1 + (1 | Batch)", data)
        assert fit.fit_result.theta[0] == 0.0 and fit.is_singular and fit.n_evaluations <= 6
        rng = np.random.default_rng(1)
        crossed = pd.DataFrame({"a": np.repeat(np.arange(12), 6), "b": np.tile(np.arange(6), 12)})
        crossed["y"] = rng.normal(size=12)[crossed.a] + rng.normal(size=len(crossed))
        design = build_design("y ~ 1 + (1 | a) + (1 | b)", crossed)
        start = components_start(design.system())
        assert start[1] == pytest.approx(np.sqrt(COMPONENTS_MIN_RATIO))
        fit = sparsemix.lmer("y ~ 1 + (1 | a) + (1 | b)", crossed)
        by_bobyqa = optimize_system(design.system(), reml=True, method="bobyqa")
    assert fit.fit_result.theta[1] == 0.0
    assert fit.fit_result.optimization.deviance <= by_bobyqa.deviance + 1e-10 * abs(by_bobyqa.deviance)


def test_nested_terms_are_told_from_crossed_ones_in_sparse_and_dense_cross_products():
    from sparsemix.fit.pilot import _nested

    rng = np.random.default_rng(3)
    data = pd.DataFrame({"a": np.repeat(np.arange(6), 8), "b": np.tile(np.arange(8), 6), "y": rng.normal(size=48)})
    data["ab"] = data.a * 10 + data.b % 2  # 12 levels, each within one level of a
    for formula, nested in (("y ~ 1 + (1 | ab) + (1 | a)", True), ("y ~ 1 + (1 | a) + (1 | b)", False)):
        system = build_design(formula, data).system()
        for G in (system.cross.ZtZ, system.cross.ZtZ.toarray()):
            assert _nested(G, system.relcov.column_slices) is nested


def test_a_pilots_restricted_term_equals_the_row_slice_of_its_z():
    """pilot._restricted renumbers Z's entries in the kept rows and drops the levels none of them has: the same
    matrix (pattern, order and values) and labels as slicing the rows through CSR and keeping the present levels;
    terms with slopes, zeros and levels left empty included."""
    import scipy.sparse as sp

    from sparsemix.core.terms import CovarianceTemplate, RandomTerm
    from sparsemix.fit.pilot import _restricted

    rng = np.random.default_rng(17)
    for trial in range(60):
        n, n_levels, k = int(rng.integers(1, 60)), int(rng.integers(1, 12)), int(rng.integers(1, 3))
        values = rng.normal(size=(n, k))
        values[rng.random((n, k)) < 0.2] = 0.0
        labels = [f"L{i}" for i in range(n_levels)]
        term = RandomTerm.from_codes(
            "g",
            rng.integers(0, n_levels, n),
            values,
            n_levels,
            CovarianceTemplate.unstructured(k),
            labels,
            tuple(f"c{i}" for i in range(k)),
        )
        rows = np.flatnonzero(rng.random(n) < 0.5)
        got = _restricted(term, rows)
        sliced = sp.csc_matrix(term.Z.tocsr()[rows])
        present = np.flatnonzero(np.add.reduceat(np.diff(sliced.indptr), np.arange(0, sliced.shape[1], k)) > 0)
        expected = sliced[:, (present[:, None] * k + np.arange(k)).ravel()]
        assert got.n_levels == present.shape[0] and got.level_labels == tuple(labels[i] for i in present)
        np.testing.assert_array_equal(got.Z.indptr, expected.indptr)
        np.testing.assert_array_equal(got.Z.indices, expected.indices)
        np.testing.assert_array_equal(got.Z.data, expected.data)


@pytest.mark.parametrize("optimizer, pilots", [("auto", 0), ("bobyqa", 1)])
def test_the_moments_replace_the_pilot_for_the_scoring_steps_only(optimizer, pilots, monkeypatch):
    """A scored crossed design (600 columns after the first term): the default fit starts from the variance
    components' moments, no pilot; BOBYQA keeps the pilot, whose first step it uses (InstEval: 50 evaluations from
    it, 81 from the moments). Both reach the same optimum."""
    from sparsemix.fit import pipeline

    calls = []
    monkeypatch.setattr(
        pipeline, "pilot_start", lambda *a, original=pipeline.pilot_start: calls.append(1) or original(*a)
    )
    data = generate_crossed_slopes(20_000, 800, 600)
    fit = sparsemix.lmer("y ~ 1 + x + (1 | a) + (1 | b)", data, optimizer=optimizer)
    assert len(calls) == pilots
    reference = sparsemix.lmer("y ~ 1 + x + (1 | a) + (1 | b)", data)
    assert fit.llf == pytest.approx(reference.llf, rel=1e-10)


def test_the_ml_correction_is_left_out_where_fixed_factors_take_a_terms_level_means():
    """nlme's Assay layout: Block x sample x dilut, fixed sample * dilut (which take 6 dimensions of Block:sample's
    level means, not only the mean the ML correction is derived for): the ML start is the REML moments (on Assay
    itself ML's optimum: 1 evaluation, 5 from the corrected ones), and the fit reaches BOBYQA's optimum."""
    from sparsemix.fit.pilot import components_start

    rng = np.random.default_rng(12)
    rows = [(b, s, t) for b in range(6) for s in "abcdef" for t in range(5)]
    data = pd.DataFrame(rows, columns=["block", "sample", "dilut"]).astype(str)
    effects = rng.normal(size=6)[data.block.astype(int)] + 0.5 * rng.normal(size=36)[np.arange(len(data)) // 5]
    data["y"] = effects + rng.normal(size=5)[data.dilut.astype(int)] + 0.3 * rng.normal(size=len(data))
    formula = "y ~ sample * dilut + (1 | block) + (1 | block:sample) + (1 | block:dilut)"
    system = build_design(formula, data).system()
    np.testing.assert_array_equal(components_start(system, reml=False), components_start(system))
    fit = sparsemix.lmer(formula, data, reml=False)
    assert fit.llf >= sparsemix.lmer(formula, data, reml=False, optimizer="bobyqa").llf - 1e-8


@pytest.mark.parametrize("fit_name", ["early_uncorr_reml", "early_uncorr_ml"])
def test_a_diagonal_start_with_a_variance_at_zero_reaches_the_boundary_optimum(fit_name):
    """mlmRev's Early `(age || id)`: its optimum has no age variance. The diagonal model's optimum on the levels'
    coefficients holds that variance at zero (started at COMPONENTS_MIN_RATIO, where its slope does not vanish),
    and the fit reaches lme4's optimum in 3 evaluations (6 from the moments' diagonal)."""
    from conftest import load_reference

    from sparsemix.fit.pilot import COMPONENTS_MIN_RATIO, moment_start

    entry = load_reference("random_slopes")["Early"]
    data, ref = pd.DataFrame(entry["data"]), next(f for f in entry["fits"] if f["name"] == fit_name)
    design = build_design(ref["formula"], data)
    start = moment_start(design.X, design.response, list(design.terms), reml=ref["reml"], floor_near_singular=True)
    assert start[1] == pytest.approx(np.sqrt(COMPONENTS_MIN_RATIO), rel=1e-12)
    np.testing.assert_allclose(start[0], ref["theta"][0], rtol=1e-4)
    fit = sparsemix.lmer(ref["formula"], data, reml=ref["reml"])
    assert fit.n_evaluations <= 3 and fit.theta[1] < 1e-6
    assert fit.llf >= ref["logLik"] - 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_the_diagonal_optimum_is_the_minimum_of_its_criterion(seed):
    """_diagonal_optimum's Newton steps in closed form against scipy's minimiser of the same criterion (D diagonal,
    >= 0) from random spreads, sampling covariances and residual sums, with every variance inside and with one whose
    optimum is zero (held there by the active set); None where the covariance is not 2 x 2."""
    from scipy.optimize import minimize

    from sparsemix.fit.pilot import _diagonal_optimum

    rng = np.random.default_rng(seed)
    A, B = rng.normal(size=(2, 2)), rng.normal(size=(2, 2))
    W = B @ B.T + 0.1 * np.eye(2)
    s = rng.uniform(0.5, 2.0)
    S = A @ A.T + s * W + np.diag(rng.uniform(0.2, 1.0, 2))
    a, c = rng.uniform(10, 40), rng.uniform(50, 200)
    R = c * s

    def criterion(x, S):
        Sigma = np.diag(x[:2]) + x[2] * W
        return a * (np.linalg.slogdet(Sigma)[1] + np.trace(np.linalg.solve(Sigma, S))) + c * np.log(x[2]) + R / x[2]

    # S with less spread than the sampling covariance in its second entry: that variance's optimum is 0
    vanishing = 0.5 * s * W + np.diag([1.0, 0.0])
    for spread, zero in ((S, False), (vanishing, True)):
        start = np.append(np.clip(np.diag(spread - s * W), 0.05, None), s)
        found = _diagonal_optimum(spread, W, a, R, c, start[:2], start[2])
        assert found is not None
        bounds = [(0.0, None), (0.0, None), (1e-8, None)]
        reference = minimize(criterion, start, (spread,), "L-BFGS-B", bounds=bounds, options={"ftol": 1e-15})
        x = np.append(found[0], found[1])
        assert criterion(x, spread) <= reference.fun + 1e-9
        assert (x[1] == 0.0) == zero and reference.x[1] < 1e-6 if zero else x[1] > 0
        np.testing.assert_allclose(x, reference.x, rtol=1e-4, atol=1e-6)
    assert _diagonal_optimum(np.eye(3), np.eye(3), a, R, c, np.ones(3), s) is None


@pytest.mark.parametrize("k", [1, 2, 3])
def test_moment_starts_small_matrix_algebra_is_numpys(k):
    from sparsemix.fit.pilot import _extreme_eigenvalues, _inverses, _small_spd_solve

    rng = np.random.default_rng(k)
    A = rng.normal(size=(40, k, k))
    M = A @ A.transpose(0, 2, 1) + np.eye(k) * np.array([1e-12] + [1.0] * 39)[:, None, None]
    smallest, largest = _extreme_eigenvalues(M)
    eigenvalues = np.linalg.eigvalsh(M)
    np.testing.assert_allclose(smallest, eigenvalues[:, 0], rtol=0, atol=1e-12 * np.abs(eigenvalues).max())
    np.testing.assert_allclose(largest, eigenvalues[:, -1], rtol=1e-13)
    np.testing.assert_allclose(_inverses(M[1:]), np.linalg.inv(M[1:]), rtol=1e-9)
    b = rng.normal(size=k)
    for A in M[1:]:
        np.testing.assert_allclose(_small_spd_solve(A.tolist(), b.tolist()), np.linalg.solve(A, b), rtol=1e-8)
    assert _small_spd_solve((-M[1]).tolist(), b.tolist()) is None  # not positive definite


def _balanced_nested(seed):
    rng = np.random.default_rng(seed)
    s, c = np.repeat(np.arange(12), 20), np.repeat(np.arange(48), 5)
    y = 1 + rng.normal(size=12)[s] + 0.7 * rng.normal(size=48)[c] + rng.normal(size=s.size)
    return pd.DataFrame({"y": y, "s": [f"s{i:02d}" for i in s], "c": [f"c{i:02d}" for i in c]})


def _balanced_growth(seed):
    rng = np.random.default_rng(seed)
    g, t = np.repeat(np.arange(15), 6), np.tile(np.arange(6.0), 15)
    b = rng.multivariate_normal([0.0, 0.0], [[1.0, 0.2], [0.2, 0.3]], size=15)
    y = 2 + 0.5 * t + b[g, 0] + b[g, 1] * t + rng.normal(size=g.size)
    return pd.DataFrame({"y": y, "t": t, "g": [f"g{i:02d}" for i in g]})


def _crossed_slopes(seed, item_slope_sd=0.2):
    """Subjects x items with random slopes in both (a psycholinguist's maximal model), 10% of the cells missing."""
    rng = np.random.default_rng(seed)
    s, i = np.repeat(np.arange(40), 20), np.tile(np.arange(20), 40)
    x = rng.choice([-0.5, 0.5], size=s.size)
    sd = (0.8, 0.3, 0.5, item_slope_sd)
    b = [rng.normal(size=n) * v for n, v in zip((40, 40, 20, 20), sd)]
    y = 2 + 0.3 * x + b[0][s] + b[1][s] * x + b[2][i] + b[3][i] * x + rng.normal(size=s.size)
    keep = rng.random(s.size) < 0.9
    return pd.DataFrame({"y": y, "x": x, "subj": [f"s{k}" for k in s], "item": [f"i{k}" for k in i]})[keep]


def _nested_slopes(seed):
    """Schools with a random slope, classes within them with an intercept: held in the eliminated layout."""
    rng = np.random.default_rng(seed)
    s, c = np.repeat(np.arange(30), 32), np.repeat(np.arange(120), 8)
    x = rng.normal(size=s.size) + 2
    y = 1 + 0.5 * x + rng.normal(size=30)[s] + 0.3 * rng.normal(size=30)[s] * x + 0.5 * rng.normal(size=120)[c]
    y += rng.normal(size=s.size)
    return pd.DataFrame({"y": y, "x": x, "s": [f"s{k}" for k in s], "c": [f"c{k}" for k in c]})


@pytest.mark.parametrize(
    "make, formula",
    [
        (_balanced_nested, "y ~ 1 + (1|s) + (1|s:c)"),
        (_balanced_nested, "y ~ 1 + (1|s)"),
        (_balanced_growth, "y ~ t + (t|g)"),
    ],
)
def test_the_covariance_start_is_remls_optimum_on_balanced_designs(make, formula):
    """MINQUE's moments (pilot.covariance_start) on balanced data are the ANOVA estimates, which are REML's optimum
    where they are positive: to rounding, for two nested terms (through the weighted pass), one term, and a balanced
    growth curve's 2 x 2 covariance (the unweighted pass alone)."""
    from sparsemix.fit.pilot import covariance_start

    data = make(5)
    start = covariance_start(build_design(formula, data).system())
    fit = sparsemix.lmer(formula, data)
    np.testing.assert_allclose(start, fit.fit_result.theta, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "make, formula, most",
    [
        (lambda: _crossed_slopes(4), "y ~ x + (x|subj) + (x|item)", 5),
        (lambda: _crossed_slopes(5, item_slope_sd=0.0), "y ~ x + (x|subj) + (x|item)", 5),
        (lambda: _crossed_slopes(6), "y ~ x + (x|subj) + (1|item)", 5),
        (lambda: _nested_slopes(0), "y ~ x + (x|s) + (1|s:c)", 5),
    ],
)
@pytest.mark.parametrize("reml", [True, False])
def test_a_fit_from_the_covariance_start_reaches_lme4s_start_optimum_in_fewer_evaluations(
    make, formula, most, reml, monkeypatch
):
    """Terms with slopes in several groupings (where neither moment start applies) start from MINQUE's moments: the
    same optimum as from lme4's start (to 1e-8 in the log-likelihood), in at most `most` evaluations where lme4's
    start took 8-11 (crossed) and 6 (nested slopes, order 183: the first term eliminated beside the others, its start
    unweighted)."""
    from sparsemix.fit import pipeline

    data = make()
    fit = sparsemix.lmer(formula, data, reml=reml)
    monkeypatch.setattr(pipeline, "covariance_start", lambda system, **_: None)
    from_lme4s_start = sparsemix.lmer(formula, data, reml=reml)
    assert fit.llf >= from_lme4s_start.llf - 1e-8
    assert fit.n_evaluations <= most < from_lme4s_start.n_evaluations


def test_the_covariance_start_is_left_out_where_it_cannot_tell_the_variances_apart():
    """No more rows than random and fixed effects (the residual variance then confounded with the terms'), or more
    than COVARIANCE_START_MAX_Q random-effect columns: None (lme4's start)."""
    from sparsemix.fit.pilot import covariance_start

    rng = np.random.default_rng(0)
    few = pd.DataFrame({"y": rng.normal(size=6), "x": rng.normal(size=6), "g": ["a", "a", "b", "b", "c", "c"]})
    system = build_design("y ~ x + (x | g)", few, linear=False).system()  # q = 6 = n
    assert covariance_start(system) is None
    data = _crossed_slopes(4)
    system = build_design("y ~ x + (x|subj) + (x|item)", data).system()
    assert covariance_start(system) is not None and covariance_start(system, max_q=system.relcov.q - 1) is None


@pytest.mark.parametrize("sigma2", [1.0, 1e-10])
def test_moments_too_large_to_factor_give_no_start(sigma2):
    """MINQUE's moments on 12 rows of 2 groups reached variances ~1e15 whose correlation's Cholesky factor rounding
    lost (numpy's LinAlgError out of lmer on one machine); relative to a small sigma^2 they overflow: no start, not
    an error."""
    from sparsemix.core.relcov import RelativeCovariance
    from sparsemix.core.terms import CovarianceTemplate
    from sparsemix.fit.pilot import _relative_factors

    rc = RelativeCovariance([(2, CovarianceTemplate.unstructured(1)), (2, CovarianceTemplate.unstructured(3))])
    # each term's covariance entries (lower triangle, column by column), then sigma^2
    solved = np.array([1.0, 1e300, -4e299, 2e299, 1e300, -3e299, 1e300, sigma2])
    found = _relative_factors(rc, solved)
    if sigma2 == 1.0:  # (representable: a start)
        assert found is not None and np.all(np.isfinite(found))
    else:
        assert found is None


def test_the_cone_optimum_is_the_moment_criterions_minimum_over_semidefinite_covariances():
    """_cone_optimum's closed form against a numerical minimum of a [log|Sigma + s W| + tr((Sigma + s W)^-1 S)] +
    c log s + R / s over Sigma = F F' (F lower triangular: every semidefinite matrix) and s > 0; where S - s W at
    s = R / c is positive definite it is the moments' estimate itself."""
    from scipy.optimize import minimize

    from sparsemix.fit.pilot import _cone_optimum

    def criterion(Sigma, s, S, W, a, R, c):
        M = Sigma + s * W
        return a * (np.linalg.slogdet(M)[1] + np.trace(np.linalg.solve(M, S))) + c * np.log(s) + R / s

    rng = np.random.default_rng(3)
    for k in (2, 3):
        for trial in range(4):
            B = rng.normal(size=(k, k))
            W = B @ B.T / k + 0.1 * np.eye(k)
            direction = rng.normal(size=k)
            S = np.outer(direction, direction) + 0.05 * trial * W  # nearly rank one: outside the cone at s = R / c
            a, R, c = 40.0, 300.0, 200.0
            Sigma, s = _cone_optimum(S, W, a, R, c)
            assert np.linalg.eigvalsh(Sigma)[0] > -1e-12 and s > 0
            rows, cols = np.tril_indices(k)

            def objective(x):
                F = np.zeros((k, k))
                F[rows, cols] = x[:-1]
                return criterion(F @ F.T, np.exp(x[-1]), S, W, a, R, c)

            start = np.concatenate([np.linalg.cholesky(Sigma + 0.1 * np.eye(k))[rows, cols], [np.log(R / c)]])
            numeric = minimize(objective, start, method="BFGS", options={"gtol": 1e-10}).fun
            assert numeric - 1e-6 <= criterion(Sigma, s, S, W, a, R, c) <= numeric + 1e-8
    S = np.array([[2.0, 0.3], [0.3, 1.0]])
    Sigma, s = _cone_optimum(S, np.eye(2), 40.0, 30.0, 200.0)
    np.testing.assert_allclose(Sigma, S - 0.15 * np.eye(2), rtol=1e-12)
    assert s == pytest.approx(0.15, rel=1e-12)


@pytest.mark.parametrize("fit_name", ["early_reml", "early_ml"])
def test_a_singular_growth_curve_starts_at_its_boundary_optimum(monkeypatch, fit_name):
    """mlmRev's Early (103 children, each at ages 1, 1.5 and 2: balanced), whose optimum has the correlation at -1:
    the moments' estimate lies outside the semidefinite cone, and the criterion's optimum on its boundary is the
    fit's optimum (unlifted, to 1e-7); lifted, the fit takes 3 evaluations where the lifted moments took 5."""
    from conftest import load_reference

    from sparsemix.fit import pilot

    entry = load_reference("random_slopes")["Early"]
    data, ref = pd.DataFrame(entry["data"]), next(f for f in entry["fits"] if f["name"] == fit_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparsemix.SingularFitWarning)
        fit = sparsemix.lmer(ref["formula"], data, reml=ref["reml"])
    assert fit.n_evaluations <= 3
    assert fit.llf >= ref["logLik"] - 1e-9
    design = build_design(ref["formula"], data)
    monkeypatch.setattr(pilot, "MOMENT_LIFTED_EIGENVALUE", 0.0)
    start = pilot.moment_start(
        design.X, design.response, list(design.terms), floor_near_singular=True, reml=ref["reml"]
    )
    np.testing.assert_allclose(start, fit.fit_result.theta, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("reml", [True, False])
def test_a_balanced_growth_curve_whose_slope_variance_the_moments_put_below_zero_starts_at_its_optimum(
    monkeypatch, reml
):
    """Every level at the same times (so that the moment criterion is REML's or ML's) and no slope variance: the
    moments' slope variance is below zero (moment_start gave None: another start), and the criterion's optimum over
    semidefinite covariances (a correlation of +-1) is the fit's optimum (unlifted, to 1e-8); where the levels have
    their own times there is still no such start."""
    from sparsemix.fit import pilot

    rng = np.random.default_rng(9)
    levels, times = 30, 6
    g = np.repeat(np.arange(levels), times)
    t = np.tile(np.arange(times, dtype=float), levels)
    data = pd.DataFrame({"y": 1 + 0.5 * t + rng.normal(size=levels)[g] + rng.normal(size=g.size), "t": t, "g": g})
    design = build_design("y ~ t + (t | g)", data)
    args = (design.X, design.response, list(design.terms))
    seen = []
    original = pilot._cone_optimum
    monkeypatch.setattr(
        pilot, "_cone_optimum", lambda S, W, a, R, c: seen.append(S - R / c * W) or original(S, W, a, R, c)
    )
    monkeypatch.setattr(pilot, "MOMENT_LIFTED_EIGENVALUE", 0.0)
    start = pilot.moment_start(*args, floor_near_singular=True, reml=reml)
    assert seen and seen[0][1, 1] < 0  # the moments' slope variance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sparsemix.SingularFitWarning)
        fit = sparsemix.lmer("y ~ t + (t | g)", data, reml=reml)
    np.testing.assert_allclose(start, fit.fit_result.theta, rtol=1e-8, atol=1e-8)
    assert fit.n_evaluations <= 3
    own_times = data.assign(t=t + rng.uniform(-0.3, 0.3, size=t.size))
    design = build_design("y ~ t + (t | g)", own_times)
    assert pilot.moment_start(design.X, design.response, list(design.terms), floor_near_singular=True) is None


@pytest.mark.parametrize(
    "dataset, formula, weighted",
    [
        ("Orthodont", "distance ~ age * Sex + (age | Subject)", False),
        ("Dialyzer", "rate ~ pressure + I(pressure^2) + QB + (pressure + I(pressure^2) | Subject)", False),
        ("Loblolly", "height ~ age + I(age^2) + (age || Seed)", True),
        ("Orthodont", "distance ~ 0 + (age | Subject)", False),
    ],
)
def test_the_compiled_level_moments_equal_numpys(dataset, formula, weighted, monkeypatch):
    """kernels.level_moments (one pass over the rows and levels) gives moment_start's numpy path's start, with
    slopes of 2 and 3 columns, lme4's ||, weights, no fixed effects, and levels left out (too few rows: Orthodont's
    first rows dropped so that a subject keeps two)."""
    from conftest import load_reference

    from sparsemix.core import compiled
    from sparsemix.fit import pilot

    data = pd.DataFrame(load_reference("random_slopes")[dataset]["data"])
    if dataset == "Orthodont":
        data = data.iloc[2:]
    design = build_design(formula, data)
    weights = np.linspace(0.5, 2.0, len(data)) if weighted else None
    starts = []
    for available in (True, False):
        kernel = compiled.kernel
        with monkeypatch.context() as patched:
            if not available:
                patched.setattr(compiled, "kernel", lambda name: None if name == "level_moments" else kernel(name))
            for reml, floor in ((True, False), (False, True)):
                starts.append(
                    pilot.moment_start(
                        design.X, design.response, list(design.terms), weights, floor_near_singular=floor, reml=reml
                    )
                )
    assert starts[1] is not None  # (floored near singular: always a start here)
    for compiled_start, numpy_start in zip(starts[:2], starts[2:]):
        assert (compiled_start is None) == (numpy_start is None)
        if numpy_start is not None:
            np.testing.assert_allclose(compiled_start, numpy_start, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("formula", ["y ~ t + (t || g)", "y ~ t + (0 + t + I(t^2) || g)"])
def test_the_moment_start_reads_scalar_terms_in_any_sparse_format(formula):
    """A scalar term's column read off its CSC entries (the fast path) gives the start that the general reading of
    level_entries gives (its Z as CSR), with rows in no level (t = 0 under `0 + t`: left out of the moments)."""
    from dataclasses import replace

    from sparsemix.fit import pilot

    rng = np.random.default_rng(7)
    g = np.repeat(np.arange(12), 6)
    t = np.tile(np.arange(6.0), 12)
    y = 1 + 0.5 * t + rng.normal(size=12)[g] + rng.normal(0, 0.3, 12)[g] * t + rng.normal(0, 0.5, g.size)
    design = build_design(formula, pd.DataFrame({"y": y, "t": t, "g": g.astype(str)}))
    terms = list(design.terms)
    as_csr = [replace(term, Z=term.Z.tocsr()) for term in terms]
    for reml in (True, False):
        fast = pilot.moment_start(design.X, design.response, terms, reml=reml)
        general = pilot.moment_start(design.X, design.response, as_csr, reml=reml)
        assert fast is not None and general is not None
        np.testing.assert_array_equal(fast, general)
    if "0 +" in formula:  # the rows at t = 0 are in no level: the moments leave them out
        assert (terms[0].row_level < 0).sum() == 12
