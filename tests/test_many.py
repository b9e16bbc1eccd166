"""Many responses, one design: the batched deviance (core/batched.py), the batched Newton steps (fit/many.py) and
lmer_many's results, each against the one-response pipeline."""

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import load_reference, reference_data

import sparsemix as sm
from sparsemix.core.batched import ManyResponses, _cholesky
from sparsemix.core.coordinates import system_columns
from sparsemix.fit.many import minimize_many
from sparsemix.fit.pilot import components_start, components_starts, moment_start, moment_starts

SLEEP = reference_data("sleepstudy")
PENICILLIN = reference_data("penicillin")
PASTES = reference_data("pastes")
DYESTUFF2 = reference_data("dyestuff2")
_RNG = np.random.default_rng(17)
_SLEEP_EXTRA = SLEEP.assign(
    w=_RNG.uniform(0.5, 2.0, len(SLEEP)),
    off=_RNG.normal(0.0, 20.0, len(SLEEP)),
    Days2=SLEEP.Days**2 / 9,
)

# every layout: the first term's template 1 x 1, 2 x 2, 3 x 3, diagonal; scalar and non-scalar terms after it
MODELS = {
    "slopes": ("Reaction ~ Days + (Days | Subject)", SLEEP, {}),
    "slopes ML": ("Reaction ~ Days + (Days | Subject)", SLEEP, {"reml": False}),
    "uncorrelated": ("Reaction ~ Days + (Days || Subject)", SLEEP, {}),
    "quadratic": ("Reaction ~ Days + Days2 + (Days + Days2 | Subject)", _SLEEP_EXTRA, {}),
    "crossed": ("diameter ~ 1 + (1 | plate) + (1 | sample)", PENICILLIN, {}),
    "nested": ("strength ~ 1 + (1 | batch/cask)", PASTES, {}),
    "weights and offset": ("Reaction ~ Days + (Days | Subject)", _SLEEP_EXTRA, {"weights": "w", "offset": "off"}),
}


def _responses(model, nsim, seed):
    """Responses simulated from the model (theta scaled so that some land near a boundary, some far inside)."""
    return model.simulate(nsim, seed=seed).to_numpy()


def _many(model, Y):
    d, system = model.design, model.fit_result.system
    columns = system_columns(list(d.terms), system.relcov.column_transforms)
    Zty, Xty, yty, beta_ols = system.cross.response_sums(d.X, columns, Y - d.offset[:, None], d.weights)
    return ManyResponses(system.cross, system.relcov, Zty, Xty, yty), (Zty, Xty, yty, beta_ols)


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_deviance_equals_the_one_response_deviance(name):
    formula, data, kwargs = MODELS[name]
    model = sm.lmer(formula, data, **kwargs)
    system, relcov = model.fit_result.system, model.fit_result.system.relcov
    Y = _responses(model, 12, seed=1)
    many, (Zty, Xty, yty, beta_ols) = _many(model, Y)
    rng = np.random.default_rng(2)
    start = relcov.working_theta(model.fit_result.theta)
    working = start * (1 + 0.5 * rng.standard_normal((12, start.size))) + 0.1 * rng.standard_normal((12, start.size))
    working = np.where(relcov.on_diagonal, np.abs(working), working)
    reml = model.reml
    batched = many.deviance(working, reml)
    d = model.design
    columns = system_columns(list(d.terms), relcov.column_transforms)
    for j in range(12):
        cross = system.cross.with_response(d.X, columns, Y[:, j] - d.offset, d.weights)
        np.testing.assert_allclose(cross.Zty, Zty[:, j], rtol=1e-12, atol=1e-9 * np.abs(Zty).max())
        np.testing.assert_allclose(cross.beta_ols, beta_ols[:, j], rtol=1e-12)
        assert cross.yty == pytest.approx(yty[j], rel=1e-12)
        one = system.with_response(cross).working_deviance(working[j], reml)
        assert batched[j] == pytest.approx(one, rel=1e-12)
    # a subset of responses, each at its own theta, in another order
    which = np.array([5, 0, 5])
    np.testing.assert_allclose(
        many.deviance(working[[1, 2, 3]], reml, which),
        [
            system.with_response(
                system.cross.with_response(d.X, columns, Y[:, j] - d.offset, d.weights)
            ).working_deviance(working[i], reml)
            for i, j in zip([1, 2, 3], which)
        ],
        rtol=1e-12,
    )


def test_a_stack_with_one_matrix_not_positive_definite_factors_the_others():
    good = np.array([[4.0, 2.0], [2.0, 3.0]])
    stack = np.array([good, [[1.0, 2.0], [2.0, 1.0]], 2 * good])
    L, ok = _cholesky(stack)
    assert ok.tolist() == [True, False, True]
    np.testing.assert_allclose(L[0] @ L[0].T, good)
    np.testing.assert_allclose(L[2] @ L[2].T, 2 * good)


@pytest.mark.parametrize("name", ["slopes", "slopes ML", "quadratic", "weights and offset"])
def test_batched_exact_derivatives_equal_the_one_response_derivatives(name):
    formula, data, kwargs = MODELS[name]
    model = sm.lmer(formula, data, **kwargs)
    system, relcov, reml = model.fit_result.system, model.fit_result.system.relcov, model.reml
    Y = _responses(model, 6, seed=21)
    many, (Zty, Xty, yty, _) = _many(model, Y)
    assert many.has_hessians
    rng = np.random.default_rng(22)
    start = relcov.working_theta(model.fit_result.theta)
    working = start * (1 + 0.4 * rng.standard_normal((6, start.size))) + 0.05 * rng.standard_normal((6, start.size))
    which = np.array([3, 0, 5, 5, 1, 2])  # responses in another order, one twice
    values, gradients, hessians = many.hessians(working, reml, which)
    d = model.design
    columns = system_columns(list(d.terms), relcov.column_transforms)
    for i, j in enumerate(which):
        one = system.with_response(system.cross.with_response(d.X, columns, Y[:, j] - d.offset, d.weights))
        value, gradient, hessian = one.working_deviance_hessian(working[i], reml)
        assert values[i] == pytest.approx(value, rel=1e-11)
        np.testing.assert_allclose(gradients[i], gradient, rtol=1e-7, atol=1e-7 * np.abs(gradient).max())
        np.testing.assert_allclose(hessians[i], hessian, rtol=1e-7, atol=1e-7 * np.abs(hessian).max())
        assert values[i] == pytest.approx(many.deviance(working[i : i + 1], reml, which[i : i + 1])[0], rel=1e-11)


def test_batched_exact_derivatives_only_where_the_design_is_one_term_with_fixed_effects():
    for name in ("uncorrelated", "crossed", "nested"):  # split or several terms: differences
        formula, data, kwargs = MODELS[name]
        model = sm.lmer(formula, data, **kwargs)
        assert not _many(model, _responses(model, 2, seed=1))[0].has_hessians
    model = sm.lmer("Reaction ~ 0 + (Days | Subject)", SLEEP)  # no fixed effects: the kernel needs X'V^{-1}X
    assert not _many(model, _responses(model, 2, seed=1))[0].has_hessians


@pytest.mark.parametrize("name", ["slopes", "slopes ML", "quadratic", "weights and offset"])
def test_moment_starts_are_each_responses_moment_start(name):
    formula, data, kwargs = MODELS[name]
    model = sm.lmer(formula, data, **kwargs)
    relcov, reml, d = model.fit_result.system.relcov, model.reml, model.design
    Y = _responses(model, 8, seed=23)
    many, _ = _many(model, Y)
    factors, ok = moment_starts(many.G11, many.first_fixed_cross, many.Zty, many.yty, many.n, reml)
    template = relcov.blocks[0][1]
    rows, cols = np.array(template.positions).T
    for j in range(8):
        one = moment_start(d.X, Y[:, j] - d.offset, list(d.terms), d.weights, reml=reml)
        if one is None:  # (a near-singular estimate moment_start leaves to lme4's start)
            continue
        assert ok[j]
        np.testing.assert_allclose(factors[j, rows, cols], relcov.working_theta(one), rtol=1e-9, atol=1e-12)
    assert ok.sum() >= 6


def test_moment_starts_need_every_level_usable():
    model = sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP)
    many, _ = _many(model, _responses(model, 3, seed=24))
    G11 = many.G11.copy()
    G11[4] = [[1.0, 2.0], [2.0, 4.0]]  # one subject seen on a single day: its own fit has no slope
    assert moment_starts(G11, many.first_fixed_cross, many.Zty, many.yty, many.n) is None
    assert moment_starts(many.G11, many.first_fixed_cross, many.Zty, many.yty, many.n) is not None
    assert moment_starts(many.G11[:4], many.first_fixed_cross[:4], many.Zty[:8], many.yty, 40) is None  # 4 levels


def test_diagonal_moment_starts_are_the_correlated_estimates_variances():
    model = sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP)
    many, _ = _many(model, _responses(model, 8, seed=25))
    arguments = (many.G11, many.first_fixed_cross, many.Zty, many.yty, many.n)
    correlated, ok = moment_starts(*arguments)
    diagonal, ok_diagonal = moment_starts(*arguments, diagonal=True)
    assert ok_diagonal[ok].all()
    relative = np.matmul(correlated, correlated.transpose(0, 2, 1))
    np.testing.assert_allclose(diagonal[ok], np.sqrt(relative[ok] * np.eye(2)), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "formula, data, reml",
    [
        ("diameter ~ 1 + (1 | plate) + (1 | sample)", PENICILLIN, True),
        ("diameter ~ 1 + (1 | plate) + (1 | sample)", PENICILLIN, False),  # ML's strata, response by response
        ("strength ~ 1 + (1 | batch/cask)", PASTES, True),
        ("Yield ~ 1 + (1 | Batch)", DYESTUFF2, True),  # one variance (singular): 0 where estimated <= 0
    ],
)
def test_components_starts_are_each_responses_components_start(formula, data, reml):
    model = sm.lmer(formula, data, reml=reml)
    system, d = model.fit_result.system, model.design
    Y = _responses(model, 12, seed=26)
    _, (Zty, Xty, yty, _) = _many(model, Y)
    working, ok = components_starts(system, Zty, yty, reml)
    columns = system_columns(list(d.terms), system.relcov.column_transforms)
    at_zero = 0
    for j in range(12):
        one = system.with_response(system.cross.with_response(d.X, columns, Y[:, j], d.weights))
        expected = components_start(one, reml)
        assert ok[j] == (expected is not None)
        np.testing.assert_allclose(working[j], system.relcov.working_theta(expected), rtol=1e-10, atol=1e-14)
        at_zero += np.all(working[j] == 0)
    assert components_starts(sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP).fit_result.system, Zty, yty) is None
    if "Batch" in formula:
        assert at_zero >= 1


@pytest.mark.parametrize(
    "name, exact", [("slopes", False), ("crossed", False), ("quadratic", False), ("slopes", True), ("quadratic", True)]
)
def test_batched_newton_steps_land_where_each_fit_does(name, exact):
    formula, data, kwargs = MODELS[name]
    model = sm.lmer(formula, data, **kwargs)
    relcov = model.fit_result.system.relcov
    Y = _responses(model, 40, seed=3)
    many, _ = _many(model, Y)
    assert many.has_hessians or not exact
    start = relcov.working_theta(model.fit_result.theta)
    hessians = (lambda points, rows: many.hessians(points, model.reml, rows)) if exact else None
    found = minimize_many(many, start, relcov.lower_bounds, model.reml, relcov.boundary_probes, exact=hessians)
    assert found.settled.sum() >= 30
    response = formula.split("~")[0].strip()
    for j in np.flatnonzero(found.settled)[:8]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sm.SparsemixWarning)
            one = sm.lmer(formula, data.assign(**{response: Y[:, j]}), **kwargs)
        np.testing.assert_allclose(found.working[j], relcov.working_theta(one.fit_result.theta), atol=1e-6)
        assert found.deviance[j] <= one.deviance + 1e-9 * abs(one.deviance)
    # settled or not, never a worse point than the start
    assert np.all(found.deviance <= many.deviance(np.tile(start, (many.R, 1)), model.reml))


def _assert_same_fit(a, b):
    assert a.llf == pytest.approx(b.llf, rel=1e-10)
    np.testing.assert_allclose(a.fe_params, b.fe_params, rtol=1e-7, atol=1e-7 * np.abs(b.fe_params).max())
    np.testing.assert_allclose(a.theta, b.theta, rtol=1e-6, atol=1e-6)
    assert a.scale == pytest.approx(b.scale, rel=1e-6)


@pytest.mark.parametrize("name", ["slopes ML", "uncorrelated", "nested", "weights and offset"])
def test_lmer_many_equals_lmer_per_response_batched_or_not(name):
    formula, data, kwargs = MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sm.SparsemixWarning)
        model = sm.lmer(formula, data, **kwargs)
        sims = model.simulate(30, seed=5)
        response = formula.split("~")[0].strip()
        fits = sm.lmer_many(formula.replace(response, "y", 1), data, sims, **kwargs)
        assert len(fits) == 30 and fits.batched[0] is np.False_ and fits.batched.sum() >= 10
        estimates = fits.estimates  # before any result is built: the batched steps' own numbers
        for i in range(0, 30, 3):
            one = sm.lmer(formula.replace(response, "y", 1), data.assign(y=sims.iloc[:, i].to_numpy()), **kwargs)
            _assert_same_fit(fits[i], one)
            row = estimates.iloc[i]
            expected = np.r_[one.sdcor.to_numpy(), one.fe_params.to_numpy(), one.llf]
            np.testing.assert_allclose(row.iloc[:-1].to_numpy(float), expected, rtol=1e-6, atol=1e-6)
            assert row["converged"]
    assert list(estimates.index) == list(sims.columns)
    assert list(estimates.columns) == model.sdcor_names + list(model.design.fe_names) + ["llf", "converged"]


def test_lmer_many_is_a_sequence_of_results():
    sims = sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP).simulate(4, seed=8).to_numpy()
    fits = sm.lmer_many("y ~ Days + (Days | Subject)", SLEEP, sims)
    assert [f.llf for f in fits] == [fits[i].llf for i in range(4)]
    assert fits[-1] is fits[3] and [f.llf for f in fits[1:3]] == [fits[1].llf, fits[2].llf]
    with pytest.raises(IndexError):
        fits[4]
    np.testing.assert_array_equal(fits[2].design.y, sims[:, 2])
    assert list(fits.estimates.index) == [0, 1, 2, 3]
    # a batched fit's results are a whole LmerResults: its summary, ranef, refits
    assert fits.batched[2]
    assert "Random effects" in str(fits[2].summary())
    _assert_same_fit(fits[2].refit_ml(), sm.lmer("y ~ Days + (Days | Subject)", SLEEP.assign(y=sims[:, 2]), reml=False))


def test_lmer_many_where_the_system_is_not_held_dense_refits_each_response():
    sims = sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP).simulate(3, seed=9)
    fits = sm.lmer_many("y ~ Days + (Days | Subject)", SLEEP, sims, optimizer="bobyqa")
    assert not fits.batched.any()
    one = sm.lmer("y ~ Days + (Days | Subject)", SLEEP.assign(y=sims.iloc[:, 2].to_numpy()), optimizer="bobyqa")
    assert fits[2].llf == pytest.approx(one.llf, rel=1e-10)


def test_lmer_many_refits_each_response_of_several_terms_with_many_parameters():
    """Crossed subjects' and items' 2 x 2 terms (6 parameters, no batched exact Hessians): each response a refit,
    whose exact Hessians cost less than the batched steps' differences; `(x || g)` alone is batched (merged)."""
    doc = load_reference("random_slopes")["subjects_items"]
    data, formula = pd.DataFrame(doc["data"]), doc["fits"][0]["formula"]
    sims = sm.lmer(formula, data).simulate(3, seed=10).to_numpy()
    renamed = "y ~" + formula.split("~", 1)[1]
    fits = sm.lmer_many(renamed, data, sims)
    assert not fits.batched.any()
    assert fits[2].llf == pytest.approx(sm.lmer(renamed, data.assign(y=sims[:, 2])).llf, rel=1e-10)
    early = load_reference("random_slopes")["Early"]
    data, formula = pd.DataFrame(early["data"]), "cog ~ age * trt + (age || id)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sm.SparsemixWarning)
        sims = sm.lmer(formula, data).simulate(6, seed=11).to_numpy()
        fits = sm.lmer_many("y ~" + formula.split("~", 1)[1], data, sims)
        assert fits.batched[1:].all()
        for i in (1, 4):
            _assert_same_fit(fits[i], sm.lmer("y ~" + formula.split("~", 1)[1], data.assign(y=sims[:, i])))


def test_lmer_many_batches_an_uncorrelated_term_whose_split_terms_are_not_held_dense():
    """`(x || g)` of 150 groups: its split terms are factored by CHOLMOD, its merged term (what the fit optimizes)
    is held dense, and the batched steps take it (nlme's MathAchieve `(SES || School)` was refitted response by
    response while batched_applies judged the split system)."""
    from sparsemix.fit.many import batched_applies, batched_system

    rng = np.random.default_rng(30)
    g = np.repeat(np.arange(150), 20)
    x = rng.normal(size=g.size)
    y = 1 + 0.5 * x + rng.normal(size=150)[g] + 0.4 * rng.normal(size=150)[g] * x + rng.normal(size=g.size)
    data = pd.DataFrame({"g": g.astype(str), "x": x})
    model = sm.lmer("y ~ x + (x || g)", data.assign(y=y))
    system = model.fit_result.system
    assert system.factorization_mode != "dense" and batched_system(system).factorization_mode == "dense"
    assert batched_applies(system)
    sims = model.simulate(5, seed=31).to_numpy()
    fits = sm.lmer_many("y ~ x + (x || g)", data, sims)
    assert fits.batched[1:].all()
    for i in (1, 3):
        _assert_same_fit(fits[i], sm.lmer("y ~ x + (x || g)", data.assign(y=sims[:, i])))


def test_lmer_many_with_a_lone_term_of_many_levels_refits_each_response():
    """A lone term of 1,200 levels is held dense (its Newton steps) but too large for the batched passes (their
    arrays grow with the levels times the responses): each response is a refit, as lmer fits it."""
    rng = np.random.default_rng(4)
    n, n_levels = 6_000, 1_200
    g = rng.integers(0, n_levels, n)
    data = pd.DataFrame({"g": g.astype(str), "x": rng.normal(size=n)})
    Y = 1.0 + rng.normal(size=n_levels)[g][:, None] + rng.normal(size=(n, 3))
    fits = sm.lmer_many("y ~ x + (1 | g)", data, Y)
    assert not fits.batched.any()
    one = sm.lmer("y ~ x + (1 | g)", data.assign(y=Y[:, 1]))
    assert one.fit_result.system.factorization_mode == "dense"
    assert fits[1].llf == pytest.approx(one.llf, rel=1e-10)


def test_lmer_many_over_many_responses_at_a_boundary_matches_each_fit():
    """Responses with no subject effect at all: most optima are singular, which the one-response pipeline
    decides; the table holds every response either way."""
    rng = np.random.default_rng(11)
    Y = 250 + 10 * SLEEP.Days.to_numpy()[:, None] + 30 * rng.standard_normal((len(SLEEP), 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sm.SparsemixWarning)
        fits = sm.lmer_many("y ~ Days + (Days | Subject)", SLEEP, Y)
        for i in (1, 4, 7, 11):
            _assert_same_fit(fits[i], sm.lmer("y ~ Days + (Days | Subject)", SLEEP.assign(y=Y[:, i])))
    assert len(fits.estimates) == 12 and fits.estimates["converged"].all()
    assert pd.api.types.is_bool_dtype(fits.estimates["converged"])


def test_singular_optima_are_fitted_together_and_match_each_fit():
    rng = np.random.default_rng(11)
    Y = 250 + 10 * SLEEP.Days.to_numpy()[:, None] + 30 * rng.standard_normal((len(SLEEP), 30))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sm.SparsemixWarning)
        fits = sm.lmer_many("y ~ Days + (Days | Subject)", SLEEP, Y)
        singular = [i for i in range(1, 30) if fits.batched[i] and fits[i].is_singular]
        assert len(singular) >= 15  # zero variances held at their bound, checked as release_bounds checks them
        for i in singular[:5]:
            _assert_same_fit(fits[i], sm.lmer("y ~ Days + (Days | Subject)", SLEEP.assign(y=Y[:, i])))


def test_from_a_singular_first_fit_the_others_leave_the_boundary():
    """The first response's optimum is singular (theta = 0), where the deviance's slope into the interior is zero:
    started there, no response would leave."""
    rng = np.random.default_rng(12)
    # noise with each subject's own intercept and slope taken out: no subject effect at all, theta = 0
    e = 30 * rng.standard_normal(len(SLEEP))
    for _, rows in SLEEP.groupby("Subject").groups.items():
        basis = np.column_stack([np.ones(len(rows)), SLEEP.Days[rows]])
        e[rows] -= basis @ np.linalg.lstsq(basis, e[rows], rcond=None)[0]
    noise = 250 + 10 * SLEEP.Days.to_numpy() + e
    sims = sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP).simulate(8, seed=13).to_numpy()
    Y = np.column_stack([noise, sims])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sm.SparsemixWarning)
        fits = sm.lmer_many("y ~ Days + (Days | Subject)", SLEEP, Y)
        np.testing.assert_allclose(fits[0].theta, 0.0, atol=1e-12)
        assert fits.batched[1:].sum() >= 6  # the batched steps start a little inside, not on the zero variances
        for i in range(1, 9):
            one = sm.lmer("y ~ Days + (Days | Subject)", SLEEP.assign(y=Y[:, i]))
            assert not one.is_singular
            _assert_same_fit(fits[i], one)


def test_bootstrap_replicates_fitted_together_equal_fresh_fits():
    from sparsemix.core.cross_products import assemble_Z
    from sparsemix.inference.bootstrap import simulate_responses

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sm.SparsemixWarning)
        m = sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP)
        draws = m.bootstrap(nsim=40, seed=5, n_jobs=1)
        fit, Z = m.fit_result, assemble_Z(list(m.design.terms))
        for seed_seq, (_, row) in zip(np.random.SeedSequence(5).spawn(40), draws.iterrows()):
            rng = np.random.default_rng(seed_seq)
            y = simulate_responses(m.design.X, Z, fit.system.relcov, fit.theta, fit.beta, m.sigma, None, rng, 1)
            fresh = sm.lmer("Reaction ~ Days + (Days | Subject)", SLEEP.assign(Reaction=y[:, 0]))
            expected = pd.concat([fresh.sdcor, fresh.fe_params])
            np.testing.assert_allclose(row[expected.index], expected, rtol=2e-5, atol=2e-5)
