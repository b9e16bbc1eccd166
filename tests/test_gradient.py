"""The exact gradient of the profiled deviance (core/gradient.py) and the optimizer path that uses it (issue 16):
against central differences of the deviance, for every covariance structure and both layouts of the dense factor
(one dense block; the first term eliminated level by level, with and without terms after it), REML and ML,
weighted and on transformed (centred, scaled) columns; and fits by it against BOBYQA's on the same systems."""

import json

import numpy as np
import pandas as pd
import pytest
from conftest import REFERENCE, reference_data

import sparsemix as sm
from sparsemix.core.coordinates import lower_factor
from sparsemix.core.gradient import ProfiledGradient
from sparsemix.core.system import PenalizedSystem
from sparsemix.fit.pipeline import fit_system
from sparsemix.fit.stages import build_system, optimize_system
from sparsemix.lme4.design import build_design


def _exam() -> pd.DataFrame:
    return pd.DataFrame(json.loads((REFERENCE / "random_slopes.json").read_text())["Exam"]["data"])


def _synthetic(seed: int = 5, n: int = 2000) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    d = pd.DataFrame(
        {
            "g": rng.integers(0, 80, n),
            "h": rng.integers(0, 12, n),
            "k": rng.integers(0, 5, n),
            "x": rng.normal(size=n) + 3,
            "z": rng.normal(size=n),
            "w": rng.uniform(0.5, 2.0, n),
        }
    )
    d["y"] = d.x + rng.normal(size=n) + rng.normal(size=80)[d.g] * (1 + d.x) + rng.normal(size=12)[d.h] * d.z
    return d


CASES = [
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)", None),
    ("sleepstudy", "Reaction ~ Days + (Days || Subject)", None),
    ("sleepstudy", "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", "w"),
    ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", None),
    ("pastes", "strength ~ 1 + (1 | batch/cask)", None),
    ("exam", "normexam ~ standLRT + sex + (standLRT + sex | school)", None),
    ("synthetic", "y ~ x + (x | g) + (z | h)", "w"),
    ("synthetic", "y ~ x + z + (x + z | g) + (1 | h) + (0 + x | k)", None),
    ("synthetic", "y ~ x + (x || g) + (1 | h:k)", None),
]


def _data(name: str) -> pd.DataFrame:
    return {"exam": _exam, "synthetic": _synthetic}.get(name, lambda: reference_data(name))()


def _dense_system(name, formula, weights) -> PenalizedSystem:
    system = build_design(formula, _data(name), weights=weights).system()
    return PenalizedSystem(system.cross, system.relcov, factorization="dense")


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("name, formula, weights", CASES)
def test_the_gradient_equals_differences_of_the_deviance(name, formula, weights, reml):
    system = _dense_system(name, formula, weights)
    rng = np.random.default_rng(len(formula))
    for _ in range(2):
        _check_against_differences(system, reml, rng)


def _check_against_differences(system, reml, rng):
    """At a random theta near lme4's start: the deviance as working_deviance gives it, and the gradient equal to
    central differences of it to 1e-6 (relative to the largest entry)."""
    start = system.relcov.working_theta(system.relcov.start())
    theta = start + 0.3 * rng.standard_normal(start.size)
    theta = np.where(system.relcov.lower_bounds == 0, np.abs(theta), theta)
    deviance, gradient = system.working_deviance_gradient(theta, reml)
    assert deviance == pytest.approx(system.working_deviance(theta, reml), rel=1e-12)
    h = 1e-6
    differences = np.array(
        [
            (system.working_deviance(theta + h * e, reml) - system.working_deviance(theta - h * e, reml)) / (2 * h)
            for e in np.eye(theta.size)
        ]
    )
    assert np.max(np.abs(gradient - differences)) <= 1e-6 * max(1.0, np.max(np.abs(differences)))


def test_the_first_term_is_eliminated_where_the_system_is_large():
    """The cases above cover both layouts of the dense factor (else the structured path would go untested)."""
    layouts = {(_dense_system(*case)._factor.q1 > 0, _dense_system(*case)._factor.q2 > 0) for case in CASES}
    assert layouts == {(False, True), (True, False), (True, True)}


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("name, formula, weights", CASES[:5] + CASES[6:8])
def test_the_gradient_path_finds_bobyqas_optimum_in_fewer_evaluations(name, formula, weights, reml):
    system = _dense_system(name, formula, weights)
    assert system.supports_gradient
    by_gradient = optimize_system(system, reml=reml)
    by_bobyqa = optimize_system(system, reml=reml, method="bobyqa")
    assert by_gradient.method == "gradient" and by_bobyqa.method == "bobyqa"
    assert by_gradient.converged
    assert by_gradient.deviance <= by_bobyqa.deviance + 1e-9 * abs(by_bobyqa.deviance)
    on_diagonal = system.relcov.on_diagonal
    if np.all(by_bobyqa.theta[on_diagonal] > 1e-2):  # (a singular fit's theta is not determined along its flat rank)
        scale = np.maximum(np.abs(by_bobyqa.theta), 1.0)
        assert np.max(np.abs(by_gradient.theta - by_bobyqa.theta) / scale) < 1e-5
    assert by_gradient.n_evaluations < by_bobyqa.n_evaluations


def test_a_scalar_variance_at_zero_is_probed_into_the_interior():
    """L-BFGS-B lands on theta = 0 of a scalar term, where the deviance is even in theta and its gradient 0; the
    rank probe must step off it (lower_factor of [0, sqrt(eps)] once gave 0: no probe, a zero variance reported
    where statsmodels' and lme4's estimate is 0.1955)."""
    assert lower_factor(np.array([[0.0, 0.1]]))[0, 0] == pytest.approx(0.1)
    y = [1.727, -1.037, 2.904, 3.569, 4.629, 5.736, 6.747, 7.020, 5.624, 10.155, 10.400, 17.164, 17.276, 14.988, 14.453]
    d = pd.DataFrame({"Y": y, "X": np.arange(1, 16), "IDS": [1] * 5 + [2] * 4 + [3] * 6})
    fit = sm.lmer("Y ~ X + (1 | IDS)", d)
    assert fit.fit_result.optimization.method == "gradient"
    # statsmodels' and lme4's Group Var relative to the residual's (test_summary_col_with_lme4_standard_errors)
    assert fit.theta[0] ** 2 == pytest.approx(0.1955, abs=5e-5)


SCHUR_CASES = [
    "y ~ 1 + x + (1 + x | a) + (1 | b)",
    "y ~ 1 + x + (1 | a) + (1 | b) + (1 | c)",
    "y ~ 1 + x + (1 + x || a) + (1 | b)",
    "y ~ 1 + x + (1 + x | a) + (1 + x | b)",  # a correlated term after the first: Lambda_2 block diagonal
    "y ~ 1 + x + (1 | a) + (1 + x | b) + (1 | c)",
]


def _schur_system(formula) -> PenalizedSystem:
    from sparsemix.datasets import generate_crossed_slopes

    data = generate_crossed_slopes(n=20_000, n_a=1_500, n_b=120, seed=3)
    system = build_design(formula, data.assign(c=data.b % 7)).system()
    return PenalizedSystem(system.cross, system.relcov, factorization="schur")


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("formula", SCHUR_CASES)
def test_the_schur_forms_gradient_equals_differences_of_the_deviance(formula, reml):
    """The Schur form with the pair map (core/gradient.py, SchurGradient): a correlated first term (k = 2), a
    scalar one with two scalar terms after it, and lme4's || (a scalar term of x's values after the first)."""
    system = _schur_system(formula)
    assert system.factorization_mode == "schur" and system.supports_gradient
    _check_against_differences(system, reml, np.random.default_rng(7))


def test_random_slopes_in_the_schur_form_are_fitted_with_the_gradient_to_bobyqas_optimum():
    system = _schur_system(SCHUR_CASES[0])
    by_gradient = optimize_system(system, reml=True)
    by_bobyqa = optimize_system(system, reml=True, method="bobyqa")
    assert by_gradient.method == "gradient" and by_gradient.converged
    assert by_gradient.deviance <= by_bobyqa.deviance + 1e-9 * abs(by_bobyqa.deviance)
    np.testing.assert_allclose(by_gradient.theta, by_bobyqa.theta, rtol=1e-5, atol=1e-7)
    assert by_gradient.n_evaluations < by_bobyqa.n_evaluations


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize(
    "name, formula, weights",
    [
        ("sleepstudy", "Reaction ~ Days + (Days | Subject)", "w"),
        ("exam", "normexam ~ standLRT + sex + (standLRT + sex | school)", None),
        ("synthetic", "y ~ 0 + (x + z | g)", None),  # no fixed effects
        ("synthetic", "y ~ x + (x + z + w | g)", None),  # 4 x 4
    ],
)
def test_the_compiled_growth_curve_evaluation_is_numpys(name, formula, weights, reml):
    """One k x k term eliminated level by level (k > 1) is evaluated in one compiled pass (core/kernels.py): its
    deviance and gradient equal the numpy path's (the factor's refactorization and single_term) to rounding, and the
    factorization it leaves (DenseFactor.install, which the solve at the optimum reuses) is numpy's."""
    system = _dense_system(name, formula, weights)
    factor = system._factor
    if factor.q2:  # sleepstudy's is small enough to be held whole: eliminate its term as a larger design would
        system = PenalizedSystem(system.cross, system.relcov, factorization="dense")
        factor = system._factor
    numpy_path = PenalizedSystem(system.cross, system.relcov, factorization="dense")  # refactored by numpy alone
    rng = np.random.default_rng(3)
    start = system.relcov.working_theta(system.relcov.start())
    for _ in range(3):
        theta = start + 0.3 * rng.standard_normal(start.size)
        theta = np.where(system.relcov.lower_bounds == 0, np.abs(theta), theta)
        deviance, gradient = system.working_deviance_gradient(theta, reml)
        factors = system.relcov.factors(theta)
        evaluations = system.n_evaluations
        installed = system.evaluate_working(theta, reported=False)
        assert system.n_evaluations == evaluations  # read off the compiled pass's factorization
        ev = numpy_path.evaluate_working(theta, reported=False)
        expected = numpy_path.profiled_deviance(ev, reml)
        numpy_gradient = ProfiledGradient(numpy_path._factor, numpy_path.cross, numpy_path.relcov)
        expected_gradient = numpy_gradient.single_term(factors, reml, system.dof(reml))
        assert factor.q2 == 0 and factor.k1 > 1
        assert deviance == pytest.approx(expected, rel=1e-12)
        assert system.profiled_deviance(installed, reml) == pytest.approx(expected, rel=1e-12)
        np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-9, atol=1e-9 * np.max(np.abs(gradient)))
        for got, want in [(installed.RZX, ev.RZX), (installed.cu, ev.cu), (installed.RX, ev.RX)]:
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max(initial=0.0))


def _egsingle():
    entry = json.loads((REFERENCE / "random_slopes.json").read_text())["egsingle"]
    return entry, pd.DataFrame(entry["data"])


def test_slopes_at_two_levels_are_fitted_by_newton_steps_in_the_schur_form_to_lme4s_optimum():
    """mlmRev's egsingle (children in schools, a slope at both levels: Lambda_2 block diagonal) in the Schur form:
    the gradient, the average information's Newton steps in a handful of points where BOBYQA in CHOLMOD took 185,
    and lme4's optimum or better."""
    entry, data = _egsingle()
    ref = entry["fits"][0]
    design = build_design(ref["formula"], data)
    system = PenalizedSystem(design.system().cross, design.system().relcov, factorization="schur")
    assert system.supports_gradient and system.supports_information
    _check_against_differences(system, True, np.random.default_rng(11))
    opt = optimize_system(system, reml=True)
    assert opt.method == "gradient" and opt.converged and opt.n_evaluations <= 15
    assert opt.deviance <= -2 * ref["logLik"] + 1e-6
    np.testing.assert_allclose(opt.theta, ref["theta"], rtol=2e-3, atol=2e-4)


def test_the_schur_forms_derivatives_weigh_against_cholmods_factorizations(monkeypatch):
    """The trial of factorizations counts CHOLMOD's time CHOLMOD_WITHOUT_GRADIENT_WEIGHT times where a term has
    slopes (the Schur form's gradient against BOBYQA) or every term is a variance component (its scoring steps), and
    as it is where neither applies (a scalar slope, whose Schur form has the gradient but no scoring)."""
    from sparsemix.core import system as engine
    from sparsemix.core.factor import SchurFactor

    def timed(factor, A, factors, time_to_beat=np.inf):
        return 3e-4 if isinstance(factor, SchurFactor) else 1e-4  # the Schur form 3x slower per factorization

    monkeypatch.setattr(engine, "_time_refactorization", timed)
    entry, data = _egsingle()
    slopes = build_design(entry["fits"][0]["formula"], data).system()
    assert slopes.factorization_mode == "schur" and slopes.supports_gradient
    components = build_design("math ~ year * size + female + (1 | childid) + (1 | schoolid)", data).system()
    assert components.factorization_mode == "schur" and components.supports_scoring
    scalar_slope = build_design("math ~ year * size + female + (0 + year | childid) + (1 | schoolid)", data).system()
    assert scalar_slope.factorization_mode == "simplicial"


def test_a_sparse_crossed_design_is_scored_in_the_schur_form_where_cholmod_factors_faster():
    """An InstEval-like design too sparse for the Schur form untimed (3% of its eliminated block filled): CHOLMOD's
    simplicial factorization is several times faster per call, but BOBYQA took 73 of them where the scoring steps
    take a handful, to the same optimum."""
    from sparsemix.datasets import generate_insteval_like

    data = generate_insteval_like(2000, 800, 8, 2)
    design = build_design("y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)", data)
    system = design.system()
    assert system.factorization_mode == "schur" and not system.densely_linked
    fit = fit_system(system)
    assert fit.optimization.method == "scoring" and fit.optimization.n_evaluations <= 8
    simplicial = fit_system(build_system(design.X, design.response, list(design.terms), factorization="simplicial"))
    assert simplicial.optimization.method == "bobyqa" and simplicial.optimization.n_evaluations > 30
    assert fit.optimization.deviance <= simplicial.optimization.deviance + 1e-8


HESSIAN_CASES = CASES  # every layout: one k x k term, the system held whole, the first term eliminated beside others


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("name, formula, weights", HESSIAN_CASES)
def test_the_exact_hessian_equals_differences_of_the_gradient(name, formula, weights, reml):
    """Where a Hessian is offered (one k x k term, or the system held whole): see _check_hessian_against_differences."""
    system = _dense_system(name, formula, weights)
    assert system.supports_hessian
    _check_hessian_against_differences(system, reml, np.random.default_rng(len(formula) + 1))


def _check_hessian_against_differences(system, reml, rng):
    """At two random points near lme4's start: working_deviance_hessian's deviance and gradient as
    working_deviance_gradient gives them, its Hessian equal to central differences of that gradient to 1e-6 of the
    largest entry."""
    start = system.relcov.working_theta(system.relcov.start())
    for _ in range(2):
        theta = start + 0.3 * rng.standard_normal(start.size)
        theta = np.where(system.relcov.lower_bounds == 0, np.abs(theta), theta)
        deviance, gradient, hessian = system.working_deviance_hessian(theta, reml)
        expected_deviance, expected_gradient = system.working_deviance_gradient(theta, reml)
        assert deviance == pytest.approx(expected_deviance, rel=1e-12)
        assert np.max(np.abs(gradient - expected_gradient)) <= 1e-9 * max(1.0, np.max(np.abs(expected_gradient)))
        h = 1e-6
        columns = [
            (
                system.working_deviance_gradient(theta + h * e, reml)[1]
                - system.working_deviance_gradient(theta - h * e, reml)[1]
            )
            / (2 * h)
            for e in np.eye(theta.size)
        ]
        differences = np.column_stack(columns)
        assert np.max(np.abs(hessian - differences)) <= 1e-6 * max(1.0, np.max(np.abs(differences)))


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize(
    "formula, weights", [("y ~ x + (1 | g)", "w"), ("y ~ x + z + (1 | g)", None), ("y ~ 0 + (1 | g)", None)]
)
def test_a_random_intercept_alone_eliminated_by_levels_has_the_exact_hessian(formula, weights, reml):
    """One scalar term eliminated level by level (80 levels: above the order held whole) takes the numpy Hessian
    (scalar_term_hessian), equal to differences of the gradient, without fixed effects too."""
    system = _dense_system("synthetic", formula, weights)
    assert system.supports_hessian and system._factor.q1 == 80 and system._factor.q2 == 0
    _check_hessian_against_differences(system, reml, np.random.default_rng(len(formula) + reml))


def test_the_exact_hessian_is_offered_in_every_dense_layout():
    """Each of the cases above has it: one k x k term, held whole (small, or crossed with slopes up to order 400), or
    a first term eliminated beside others (the last: scalar terms above order 128)."""
    layouts = {(s._factor.q1 > 0, s._factor.q2 > 0) for s in (_dense_system(*case) for case in CASES)}
    assert layouts == {(True, False), (False, True), (True, True)}
    assert all(_dense_system(*case).supports_hessian for case in CASES)


def _nested_slopes(n_child: int, n_school: int) -> pd.DataFrame:
    """Children measured four times in schools, with slopes in both (egsingle's shape), and a weight."""
    rng = np.random.default_rng(5)
    child = np.repeat(np.arange(n_child), 4)
    school = child % n_school
    x = np.tile(np.arange(4) - 1.5, n_child) + rng.normal(0, 0.1, child.size)
    z = rng.normal(size=child.size)
    u = rng.normal(size=(n_child, 2)) * [1.0, 0.3]
    v = rng.normal(size=(n_school, 2)) * [1.0, 0.2]
    y = 1 + 0.5 * x + u[child, 0] + u[child, 1] * x + v[school, 0] + v[school, 1] * x + rng.normal(size=child.size)
    return pd.DataFrame(
        {
            "y": y,
            "x": x,
            "z": z,
            "w": rng.uniform(0.5, 2.0, child.size),
            "child": [f"c{c}" for c in child],
            "school": [f"s{s}" for s in school],
        }
    )


ELIMINATED_CASES = [
    ("y ~ x + (x | child) + (x | school)", None),
    ("y ~ x + (x | child) + (1 | school)", "w"),
    ("y ~ x + z + (x + z | child) + (x || school)", None),
    ("y ~ 0 + x + (x | child) + (x | school)", None),
]


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize("formula, weights", ELIMINATED_CASES)
def test_a_first_term_with_slopes_eliminated_beside_others_has_the_exact_hessian(formula, weights, reml):
    """Children with slopes (260 x 2 or 3 columns, above the order held whole) eliminated level by level beside the
    schools' terms (ProfiledGradient.eliminated_hessian: the first term's block as block diagonal less a low-rank
    part), weighted, without an intercept: the Hessian equals differences of the gradient."""
    system = build_design(formula, _nested_slopes(260, 7), weights=weights).system()
    system = PenalizedSystem(system.cross, system.relcov, factorization="dense")
    assert system._factor.q1 >= 520 and system._factor.k1 >= 2 and 0 < system._factor.q2 <= 21
    assert system.supports_hessian
    _check_hessian_against_differences(system, reml, np.random.default_rng(len(formula) + reml))


@pytest.mark.parametrize("reml", [True, False])
def test_nested_slopes_eliminated_are_fitted_by_newton_steps_to_bobyqas_optimum(reml):
    """The default fit of children with slopes in schools (order 537: the first term eliminated beside the schools')
    takes Newton steps with eliminated_hessian: at most 6 evaluations (L-BFGS-B took 14-17 here and 43-45 on
    egsingle's children in 8 schools), ending where BOBYQA ends or lower."""
    fit = sm.lmer("y ~ x + (x | child) + (x | school)", _nested_slopes(260, 7), reml=reml)
    system, opt = fit.fit_result.system, fit.fit_result.optimization
    assert system.factorization_mode == "dense" and system._factor.q1 == 520 and system._factor.q2 == 14
    assert opt.message.startswith("Newton steps with the exact Hessian") and opt.n_evaluations <= 6
    by_bobyqa = optimize_system(system, reml=reml, method="bobyqa")
    assert opt.deviance <= by_bobyqa.deviance + 1e-10 * abs(by_bobyqa.deviance)
    scale = np.maximum(np.abs(by_bobyqa.theta), 1.0)
    assert np.max(np.abs(fit.theta - by_bobyqa.theta) / scale) < 1e-4


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize(
    "name, formula",
    [
        ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
        ("pastes", "strength ~ 1 + (1 | batch/cask)"),
        ("oats", "yield ~ Variety * nitro + (1 | Block) + (1 | Block:Variety)"),
        ("sleepstudy", "Reaction ~ Days + (Days || Subject)"),
        ("sleepstudy", "Reaction ~ Days + (Days | Subject)"),
        ("exam", "normexam ~ standLRT + (standLRT | school)"),
        ("exam", "normexam ~ standLRT + (1 | school)"),
        ("synthetic", "y ~ x + (1 | g)"),
    ],
)
def test_models_with_the_exact_hessian_are_fitted_by_newton_steps(name, formula, reml):
    """Newton steps with the exact Hessian end where BOBYQA ends (to 1e-5 in theta, no worse in deviance), with
    at most 10 evaluations (L-BFGS-B and its polish took 12-17) and no boundary probes after them."""
    system = _dense_system(name, formula, None)
    assert system.supports_hessian
    by_newton = optimize_system(system, reml=reml)
    by_bobyqa = optimize_system(system, reml=reml, method="bobyqa")
    assert by_newton.message.startswith("Newton steps with the exact Hessian")
    assert by_newton.converged and by_newton.n_evaluations <= 10
    assert by_newton.deviance <= by_bobyqa.deviance + 1e-10 * abs(by_bobyqa.deviance)
    scale = np.maximum(np.abs(by_bobyqa.theta), 1.0)
    assert np.max(np.abs(by_newton.theta - by_bobyqa.theta) / scale) < 1e-5


def test_which_systems_are_held_whole_for_the_exact_hessian():
    """Variance components of 80 + 12 levels (order 95, above DENSE_MAX_ORDER): held whole and fitted by Newton
    steps with the exact Hessian to BOBYQA's optimum; of 80 + 60 levels (order 143): the first term eliminated (its
    Hessian eliminated_hessian's); crossed terms with slopes of order 175: the first term eliminated too (crossed
    designs were held whole up to order 400 before the eliminated layout had its Hessian: 1.1-2.8x slower there), by
    Newton steps to BOBYQA's optimum."""
    from sparsemix.core import system as system_module

    d = _synthetic()
    order = 80 + 12 + 2 + 1
    assert system_module.DENSE_MAX_ORDER < order <= system_module.DENSE_WHOLE_MAX_ORDER
    system = build_design("y ~ x + (1 | g) + (1 | h)", d).system()
    assert system.factorization_mode == "dense" and system._factor.q1 == 0 and system.supports_hessian
    fit = sm.lmer("y ~ x + (1 | g) + (1 | h)", d)
    assert fit.fit_result.optimization.message.startswith("Newton steps with the exact Hessian")
    by_bobyqa = optimize_system(system, reml=True, method="bobyqa")
    assert fit.fit_result.optimization.deviance <= by_bobyqa.deviance + 1e-10 * abs(by_bobyqa.deviance)
    larger = build_design("y ~ x + (1 | g) + (1 | h:k)", d).system()  # (its Hessian: eliminated_hessian)
    assert larger.factorization_mode == "dense" and larger._factor.q1 == 80 and larger.supports_hessian
    crossed = build_design("y ~ x + (x | g) + (1 | h)", d).system()
    assert system_module.DENSE_WHOLE_MAX_ORDER < 160 + 12 + 3 and crossed.densely_linked
    assert crossed.factorization_mode == "dense" and crossed._factor.q1 == 160 and crossed.supports_hessian
    fit = sm.lmer("y ~ x + (x | g) + (1 | h)", d)
    assert fit.fit_result.optimization.message.startswith("Newton steps with the exact Hessian")
    by_bobyqa = optimize_system(crossed, reml=True, method="bobyqa")
    assert fit.fit_result.optimization.deviance <= by_bobyqa.deviance + 1e-10 * abs(by_bobyqa.deviance)


@pytest.mark.parametrize("reml", [True, False])
@pytest.mark.parametrize(
    "formula",
    ["y ~ x + z + (x | g) + (z | h)", "y ~ x + z + (x + z | g) + (1 | h)"],
)
def test_several_terms_with_slopes_held_whole_take_the_exact_hessian(formula, reml):
    """Terms with templates held whole (8 x 6 levels): the Hessian equals differences of the gradient, and Newton
    steps with it reach BOBYQA's optimum (singular here: a zero in each fit's theta) in under 30 evaluations
    (L-BFGS-B took 52-78)."""
    rng = np.random.default_rng(3)
    n = 400
    d = pd.DataFrame({"g": rng.integers(0, 8, n), "h": rng.integers(0, 6, n), "x": rng.normal(size=n)})
    d["z"] = rng.normal(size=n)
    d["y"] = d.x + rng.normal(size=n) + rng.normal(size=8)[d.g] * (1 + d.x) + rng.normal(size=6)[d.h] * (1 + d.z)
    system = build_design(formula, d).system()
    assert system.factorization_mode == "dense" and system._factor.q1 == 0 and system.supports_hessian
    _check_hessian_against_differences(system, reml, rng)
    by_newton = optimize_system(system, reml=reml)
    by_bobyqa = optimize_system(system, reml=reml, method="bobyqa")
    assert by_newton.message.startswith("Newton steps with the exact Hessian") and by_newton.n_evaluations < 30
    assert by_newton.deviance <= by_bobyqa.deviance + 1e-10 * abs(by_bobyqa.deviance)
