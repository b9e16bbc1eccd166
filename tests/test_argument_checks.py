"""The numbers and switches users pass (issue 14): start, maxiter, booleans, levels, counts, seeds, groups,
extreme response scales, as many random effects as observations. Each bad value is a sparsemix InputError
naming what was received and the fix, checked before any optimizer sees it; nothing corrupts the process."""

import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pandas as pd
import pytest

import sparsemix
from sparsemix import InputError, MixedLM, MixedLMParams


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(14)
    n = 240
    g, h, x = rng.integers(0, 12, n), rng.integers(0, 6, n), rng.normal(size=n)
    y = (
        1
        + 0.5 * x
        + rng.normal(size=12)[g]
        + 0.4 * x * rng.normal(size=12)[g]
        + 0.5 * rng.normal(size=6)[h]
        + rng.normal(size=n)
    )
    return pd.DataFrame({"y": y, "x": x, "g": g, "h": h, "w": rng.uniform(0.5, 2.0, n)})


@pytest.fixture(scope="module")
def fit(frame):
    return sparsemix.lmer("y ~ x + (1 | g) + (1 | h)", frame)


def _quiet(f, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(*args, **kw)


# -- start: the crash ---------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import gc, warnings
    import numpy as np, pandas as pd
    import sparsemix
    from sparsemix.fit.optimize import _bobyqa
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(0)
    n = 200
    g, x = rng.integers(0, 10, n), rng.normal(size=n)
    d = pd.DataFrame({"y": x + rng.normal(size=10)[g] + x * rng.normal(size=10)[g] + rng.normal(size=n),
                      "x": x, "g": g})
    for optimizer in ("auto", "bobyqa", "lbfgs", "nm"):
        for start in ([np.nan] * 3, [np.inf] * 3, [1.0, 0.0, np.nan], [1.0, -np.inf, 1.0]):
            try:
                sparsemix.lmer("y ~ x + (x | g)", d, start=start, optimizer=optimizer)
                print("FITTED", optimizer, start)
            except sparsemix.InputError as exc:
                print("InputError:", exc)
            gc.collect()
    m = sparsemix.MixedLM.from_formula("y ~ x", groups="g", re_formula="~x", data=d)
    for start in ([np.nan] * 5, [0.0, 1.0, 1.0, np.inf, 1.0]):
        try:
            m.fit(start_params=start)
            print("FITTED MixedLM", start)
        except sparsemix.InputError as exc:
            print("InputError:", exc)
        gc.collect()
    system = m.build_system()
    try:
        sparsemix.optimize_system(system, start_theta=[np.nan, 0.0, 1.0])
        print("FITTED optimize_system")
    except sparsemix.InputError as exc:
        print("InputError:", exc)
    # the last guard in front of nlopt: a NaN first step (which a NaN start made) never reaches it
    f = lambda v: float(np.sum((v - 0.5) ** 2))
    lo, hi = np.array([0.0, -np.inf, 0.0]), np.full(3, np.inf)
    for x0, step in ((np.ones(3), np.array([np.nan, 1.0, 1.0])), (np.array([np.inf, 1.0, 1.0]), None),
                     (np.ones(3), np.array([1e-300, 1e300, 1.0]))):
        try:
            _bobyqa(f, x0, lo, hi, 100, step)
            print("RAN nlopt", x0, step)
        except sparsemix.InputError as exc:
            print("InputError:", exc)
        gc.collect()
    print(_bobyqa(f, np.ones(3), lo, hi, 1000)[0])
    print("fit after:", sparsemix.lmer("y ~ x + (x | g)", d).converged)
    gc.collect()
    print("END")
""")


def test_non_finite_start_is_an_error_and_the_process_survives():
    """Before: start=[nan, nan, nan] reached nlopt's BOBYQA as a NaN first step, whose error path writes one
    double past x (optimize._check_bobyqa_arguments), and the process aborted ("double free or corruption",
    exit 134) at the next fit. Run in a child: a crash would take pytest down with it."""
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "END" and "fit after: True" in lines and "True" in lines
    assert not [line for line in lines if line.startswith(("FITTED", "RAN"))]
    errors = [line for line in lines if line.startswith("InputError:")]
    assert len(errors) == 4 * 4 + 2 + 1 + 3
    assert "start[0] (g.(Intercept)) is nan; every start value must be a finite number" in errors[0]
    assert "start[2] (g.x) is nan" in errors[2]
    assert "start[1] (g.x.(Intercept)) is -inf" in errors[3]
    assert "start_params[0] is nan" in errors[16] and "start_params[3] is inf" in errors[17]
    assert "start_theta[0] is nan" in errors[18]
    assert all("finite" in e for e in errors[19:])


@pytest.mark.parametrize(
    "start, message",
    [
        (
            [1.0, 1.0, 1.0],
            r"start has 3 value\(s\) but the model has 2 theta parameter\(s\) \(g.\(Intercept\), "
            r"h.\(Intercept\)\)",
        ),
        ([1.0], r"start has 1 value\(s\) but the model has 2"),
        ([-0.5, 1.0], r"start\[0\] \(g.\(Intercept\)\) is -0.5, below its lower bound 0.*absolute value"),
        ([1.0, 1e12], r"start\[1\] \(h.\(Intercept\)\) is 1e\+12.*beyond 1e\+10"),
        (["a", 1.0], r"start must be a vector of 2 number"),
        ([[1.0, 1.0]], r"start must be a vector of 2 number"),
        ([np.nan, 1.0], r"start\[0\] \(g.\(Intercept\)\) is nan"),
    ],
)
def test_start_is_checked(frame, start, message):
    with pytest.raises(InputError, match=message):
        sparsemix.lmer("y ~ x + (1 | g) + (1 | h)", frame, start=start)


def test_a_valid_start_is_used(frame, fit):
    again = sparsemix.lmer("y ~ x + (1 | g) + (1 | h)", frame, start=np.array([0.8, 0.4]))
    assert again.llf == pytest.approx(fit.llf, abs=1e-7)
    assert sparsemix.lmer("y ~ x + (1 | g)", frame, start=0.5).llf == pytest.approx(
        sparsemix.lmer("y ~ x + (1 | g)", frame).llf, abs=1e-7
    )


def test_mixedlm_start_params_are_checked(frame):
    m = MixedLM.from_formula("y ~ x", groups="g", data=frame)
    with pytest.raises(InputError, match=r"start_params\[3\] is inf"):
        m.fit(start_params=[0.0, 0.0, 1.0, np.inf])
    with pytest.raises(InputError, match=r"start_params.cov_re\[0\] is nan"):
        m.fit(start_params=MixedLMParams.from_components(np.zeros(2), np.array([[np.nan]])))
    with pytest.raises(InputError, match="start_params must be numeric"):
        m.fit(start_params=["a", "b", "c", "d"])


# -- maxiter and other numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("maxiter", [0, -1, 2.5, "100", None, True, np.nan, np.inf])
def test_maxiter_is_a_positive_whole_number(frame, maxiter):
    with pytest.raises(InputError, match=rf"maxiter must be a whole number >= 1; got {maxiter!r}"):
        sparsemix.lmer("y ~ x + (1 | g)", frame, maxiter=maxiter)
    with pytest.raises(InputError, match="maxiter must be a whole number >= 1"):
        MixedLM.from_formula("y ~ x", groups="g", data=frame).fit(maxiter=maxiter)


def test_maxiter_takes_numpy_integers_and_whole_floats(frame):
    a = _quiet(sparsemix.lmer, "y ~ x + (1 | g)", frame, maxiter=np.int64(3), optimizer="bobyqa")
    b = _quiet(sparsemix.lmer, "y ~ x + (1 | g)", frame, maxiter=3.0, optimizer="bobyqa")
    assert not a.converged and a.n_evaluations <= 3 and a.llf == b.llf
    assert sparsemix.lmer("y ~ x + (1 | g)", frame, maxiter=1e4).converged


@pytest.mark.parametrize("maxiter", [10**30, 2**31, 1e30, np.uint64(2**63)])
def test_maxiter_beyond_a_c_int_is_an_input_error(frame, maxiter):
    """Found by tests/test_fuzz.py: 10**30 reached np.isfinite as a Python object (TypeError: ufunc 'isfinite'
    not supported); a count nlopt cannot hold would reach it as an OverflowError."""
    with pytest.raises(InputError, match="maxiter must be a whole number from 1 to 2,147,483,647"):
        sparsemix.lmer("y ~ x + (1 | g)", frame, maxiter=maxiter)
    with pytest.raises(InputError, match="maxiter must be a whole number from 1 to 2,147,483,647"):
        MixedLM.from_formula("y ~ x", groups="g", data=frame).fit(maxiter=maxiter)


def test_huge_counts_elsewhere_are_input_errors(fit):
    with pytest.raises(InputError, match="nsim must be a whole number from 1 to"):
        fit.simulate(10**40)
    with pytest.raises(InputError, match="nsim must be a whole number from 1 to"):
        fit.bootstrap(nsim=10**20)


@pytest.mark.parametrize("gtol", [0, -1e-7, np.nan, "1e-7"])
def test_gtol_is_a_positive_number(frame, gtol):
    with pytest.raises(InputError, match="gtol must be a finite number > 0"):
        MixedLM.from_formula("y ~ x", groups="g", data=frame).fit(gtol=gtol)


# -- booleans -----------------------------------------------------------------------------------------------------

BAD_SWITCHES = ["no", "False", "yes", None, 0, 1, 0.0, "", [True]]


@pytest.mark.parametrize("value", BAD_SWITCHES)
def test_reml_takes_booleans_only(frame, value):
    """Before: reml="no" and reml="False" fitted REML (non-empty strings are truthy), reml=None ML."""
    with pytest.raises(InputError, match=r"reml must be True or False; got .*pass reml=True or reml=False"):
        sparsemix.lmer("y ~ x + (1 | g)", frame, reml=value)
    with pytest.raises(InputError, match="reml must be True or False"):
        MixedLM.from_formula("y ~ x", groups="g", data=frame).fit(reml=value)


@pytest.mark.parametrize("door", ["verbose", "use_sqrt", "use_sparse", "do_cg", "full_output", "condvar", "profile_fe"])
@pytest.mark.parametrize("value", ["no", None, 1])
def test_every_switch_takes_booleans_only(frame, fit, door, value):
    calls = {
        "verbose": lambda: sparsemix.lmer("y ~ x + (1 | g)", frame, verbose=value),
        "use_sqrt": lambda: MixedLM.from_formula("y ~ x", groups="g", data=frame, use_sqrt=value),
        "use_sparse": lambda: MixedLM.from_formula("y ~ x", groups="g", data=frame, use_sparse=value),
        "do_cg": lambda: MixedLM.from_formula("y ~ x", groups="g", data=frame).fit(do_cg=value),
        "full_output": lambda: MixedLM.from_formula("y ~ x", groups="g", data=frame).fit(full_output=value),
        "condvar": lambda: fit.ranef(condvar=value),
        "profile_fe": lambda: MixedLM.from_formula("y ~ x", groups="g", data=frame).loglike([1.0], profile_fe=value),
    }
    with pytest.raises(InputError, match=rf"{door} must be True or False; got {value!r}"):
        calls[door]()
    with pytest.raises(InputError, match="use_sqrt must be True or False"):
        MixedLM(frame.y, np.ones((len(frame), 1)), frame.g, use_sqrt="no")


def test_numpy_booleans_are_booleans(frame):
    ml = sparsemix.lmer("y ~ x + (1 | g)", frame, reml=np.bool_(False))
    assert ml.method == "ML" and ml.llf == sparsemix.lmer("y ~ x + (1 | g)", frame, reml=False).llf
    res = MixedLM.from_formula("y ~ x", groups="g", data=frame).fit(reml=np.False_)
    assert res.method == "ML"


# -- results' arguments -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "level, hint",
    [(1.5, ""), (0, ""), (1, ""), (-0.1, ""), (np.nan, ""), (95, r" \(for 95% pass 0.95\)"), ("0.95", ""), (True, "")],
)
@pytest.mark.parametrize("method", ["wald", "profile", "boot"])
def test_confint_level_is_between_0_and_1(fit, level, hint, method):
    """Before: confint(level=1.5) gave NaN (wald) or -inf/inf (profile) bounds."""
    with pytest.raises(
        InputError,
        match=rf"level must be a number strictly between 0 and 1, such as 0.95; got "
        rf"{level!r}{hint}\.",
    ):
        fit.confint(method=method, level=level, nsim=10)


def test_profile_level_is_checked(fit):
    with pytest.raises(InputError, match="level must be a number strictly between 0 and 1"):
        fit.profile(level=2)


@pytest.mark.parametrize("nsim", [-1, 0, 2.5, "3", None])
def test_simulate_and_bootstrap_take_a_positive_count(fit, nsim):
    """Before: simulate(-1) raised numpy's 'negative dimensions', bootstrap(0) pandas' shape error,
    simulate(2.5) silently made 2 columns."""
    with pytest.raises(InputError, match=rf"nsim must be a whole number >= 1; got {nsim!r}"):
        fit.simulate(nsim)
    with pytest.raises(InputError, match=rf"nsim must be a whole number >= 1; got {nsim!r}"):
        fit.bootstrap(nsim)


def test_seeds_and_n_jobs_are_checked(fit):
    with pytest.raises(InputError, match=r"seed must be None, a non-negative integer.*got -1"):
        fit.simulate(2, seed=-1)
    with pytest.raises(InputError, match=r"seed must be None or a non-negative integer; got 'abc'"):
        fit.bootstrap(4, seed="abc")
    with pytest.raises(InputError, match=r"n_jobs \(None for all cores\) must be a whole number >= 1; got 0"):
        fit.bootstrap(4, n_jobs=0)
    sims = fit.simulate(np.int64(2), seed=np.random.default_rng(3))
    assert sims.shape == (fit.nobs, 2)


@pytest.mark.parametrize("other", [3, "m2", None, pd.DataFrame()])
def test_anova_takes_fitted_models(fit, other):
    """Before: anova(m, 3) raised AttributeError: 'int' object has no attribute 'nobs'."""
    with pytest.raises(
        InputError,
        match=rf"anova's arguments must be models fitted by sparsemix.lmer; argument 2 "
        rf"is {type(other).__name__}",
    ):
        sparsemix.anova(fit, other)


def test_anova_refuses_a_statsmodels_style_result(frame, fit):
    res = MixedLM.from_formula("y ~ x", groups="g", data=frame).fit()
    with pytest.raises(InputError, match="argument 1 is MixedLMResults"):
        sparsemix.anova(res, fit)


@pytest.mark.parametrize(
    "groups",
    [
        None,
        1,
        "",
    ],
)
def test_groups_must_be_one_label_per_row(frame, groups):
    """Before: from_formula(..., groups=None, vc_formula=...) raised IndexError: tuple index out of range."""
    message = (
        r"groups must be one label per row.*got None.*groups=np.ones\(len\(data\)\)"
        if groups is None
        else ("groups refers to column ''" if groups == "" else r"groups must be one label per row.*got 1\.")
    )
    with pytest.raises(InputError, match=message):
        MixedLM.from_formula("y ~ x", groups=groups, vc_formula={"h": "0 + C(h)"}, data=frame)
    if groups is not None:
        return
    with pytest.raises(InputError, match="groups must be one label per row"):
        MixedLM.from_formula("y ~ x", groups=None, data=frame)
    with pytest.raises(InputError, match="groups must be one label per row"):
        MixedLM(frame.y, np.ones((len(frame), 1)), None)


# -- response and weights scales ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "transform, what",
    [
        (
            lambda y: y * 1e-200,
            r"a standard deviation of only 1.\d+e-200: its squares, which the fit sums, would "
            r"underflow",
        ),
        (lambda y: 1e-105 * (y + 50), r"a standard deviation of only \d.\d+e-105"),
        (lambda y: y * 1e200, r"values as large as \d.\d+e\+200: their squares, which the fit sums, would overflow"),
        (lambda y: y * 1e110, r"values as large as \d.\d+e\+110"),
    ],
)
def test_responses_whose_squares_over_or_underflow_are_refused(frame, transform, what):
    """Before: y * 1e-200 gave SE 0, t = inf, p = 0 and converged=True; y * 1e200 a NaN sigma."""
    d = frame.assign(y=transform(frame.y))
    with pytest.raises(InputError, match=rf"the response 'y' has {what}.*Rescale it"):
        sparsemix.lmer("y ~ x + (1 | g)", d)
    with pytest.raises(InputError, match=rf"the response 'y' has {what}"):
        MixedLM.from_formula("y ~ x", groups="g", data=d)
    with pytest.raises(InputError, match=rf"the response 'y' has {what}"):
        MixedLM(d.y, np.column_stack([np.ones(len(d)), d.x]), d.g)


@pytest.mark.parametrize("scale", [1e-90, 1e90])
def test_scales_inside_the_limits_give_the_rescaled_fit(frame, scale):
    """The fit is equivariant in y: beta, sigma, the sds and the SEs scale, theta stays, and the REML criterion
    shifts by nu log(scale) (nu = n - p)."""
    F = "y ~ x + (1 | g) + (1 | h)"
    base = sparsemix.lmer(F, frame, weights="w")
    fit = sparsemix.lmer(F, frame.assign(y=frame.y * scale), weights="w")
    np.testing.assert_allclose(fit.theta, base.theta, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fit.fe_params / scale, base.fe_params, rtol=1e-8)
    np.testing.assert_allclose(fit.bse_fe / scale, base.bse_fe, rtol=1e-6)
    np.testing.assert_allclose(fit.sdcor / scale, base.sdcor, rtol=1e-6)
    nu = base.nobs - len(base.fe_params)
    assert fit.llf == pytest.approx(base.llf - nu * np.log(scale), rel=1e-10)
    table = fit.fixed_effects(ddf="asymptotic")[["std_error", "t", "p"]]
    assert np.all(np.isfinite(table.to_numpy())) and np.all(table["std_error"] > 0)


@pytest.mark.parametrize(
    "weights, message",
    [
        (lambda w: w * 1e-16, r"range from .* \(typical size 1.\d+e-16\)"),
        (lambda w: w * 1e12, r"range from .* \(typical size 1.\d+e\+12\)"),
        (lambda w: np.where(np.arange(len(w)) == 0, 1e-120, w), r"range from 1e-120 to"),
    ],
)
def test_weights_far_from_one_are_refused(frame, weights, message):
    """Before: weights * 1e-16 or * 1e12 gave a wrong theta with converged=True; * 1e30 a raw CHOLMOD error."""
    with pytest.raises(InputError, match=rf"weights {message}.*divide them by their mean"):
        sparsemix.lmer("y ~ x + (1 | g)", frame, weights=weights(frame.w.to_numpy()))


def test_weights_inside_the_limits_change_only_sigma(frame):
    base = sparsemix.lmer("y ~ x + (1 | g) + (1 | h)", frame, weights="w")
    fit = sparsemix.lmer("y ~ x + (1 | g) + (1 | h)", frame, weights=frame.w * 1e6)
    assert fit.sigma == pytest.approx(base.sigma * 1e3, rel=1e-6)  # sigma^2 / w is the same
    np.testing.assert_allclose(fit.sdcor[:-1], base.sdcor[:-1], rtol=1e-5)
    np.testing.assert_allclose(fit.fe_params, base.fe_params, rtol=1e-6)


# -- as many random effects as observations (lme4's checks) -------------------------------------------------------


def _paired(n_groups, per_group=2, seed=1):
    rng = np.random.default_rng(seed)
    d = pd.DataFrame(
        {"g": np.repeat(np.arange(n_groups), per_group), "x": np.tile(np.arange(per_group, dtype=float), n_groups)}
    )
    return d.assign(y=rng.normal(size=len(d)), h=np.arange(len(d)) % 3)


@pytest.mark.parametrize(
    "formula, n_random, term",
    [
        ("y ~ x + (x | g)", 36, "(x | g)"),
        ("y ~ x + (1 + x | g) + (1 | h)", 36, "(1 + x | g)"),
        ("y ~ (0 + C(x) | g)", 36, "(0 + C(x) | g)"),
    ],
)
def test_as_many_random_effects_as_observations_is_refused_as_lme4_does(formula, n_random, term):
    """lme4 (check.nobs.vs.nRE = "stop"): number of observations (=36) <= number of random effects (=36) for term
    (x | g); the random-effects parameters and the residual variance (or scale parameter) are probably
    unidentifiable. Before: fitted with no warning."""
    with pytest.raises(
        InputError,
        match=rf"number of observations \(=36\) <= number of random effects "
        rf"\(={n_random}\) for term {re.escape(term)}"
        rf".*probably unidentifiable",
    ):
        sparsemix.lmer(formula, _paired(18))


def test_more_random_effects_than_observations_is_refused_too():
    with pytest.raises(InputError, match=r"number of observations \(=36\) <= number of random effects \(=72\)"):
        sparsemix.lmer("y ~ (1 + x + I(x ** 2) + I(x ** 3) | g)", _paired(18).assign(x=np.linspace(0, 1, 36)))


def test_fewer_random_effects_than_observations_fit():
    d = _paired(12, per_group=3)  # 36 observations, 24 random effects
    assert _quiet(sparsemix.lmer, "y ~ x + (x | g)", d).nobs == 36


@pytest.mark.parametrize(
    "formula, n, reml",
    [
        ("y ~ C(z) + (1 | g)", 10, True),  # a level per observation: C() of a continuous column
        ("y ~ C(z) + (1 | g)", 10, False),  # by ML the deviance was log(0) = -inf, returned as a fit
        ("y ~ 0 + C(z) + (1 | g)", 10, True),
        ("y ~ x + I(x**2) + I(x**3) + (1 | g)", 4, True),
        ("y ~ C(z) + x + (1 | g)", 12, True),  # aliased columns dropped first: still one per observation
    ],
)
def test_as_many_fixed_effects_as_observations_is_refused(formula, n, reml):
    """Found by tests/test_fuzz.py: a ZeroDivisionError in the engine (REML's n - p = 0), or (ML) a "fit" with an
    infinite log-likelihood, when the fixed effects reproduce y exactly."""
    rng = np.random.default_rng(n)
    d = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n), "z": rng.normal(size=n), "g": np.arange(n) % 2})
    with pytest.raises(
        InputError,
        match=r"the fixed effects have \d+ linearly independent column\(s\).*for "
        rf"{n} observation\(s\).*no residual variance",
    ):
        _quiet(sparsemix.lmer, formula, d, reml=reml)


def test_one_fixed_effect_fewer_than_observations_fits():
    rng = np.random.default_rng(5)
    d = pd.DataFrame({"y": rng.normal(size=12), "z": np.repeat(np.arange(6), 2) * 1.5, "g": np.arange(12) % 3})
    m = _quiet(sparsemix.lmer, "y ~ C(z) + (1 | g)", d)
    assert len(m.fe_params) == 6 and np.isfinite(m.llf)


def test_lme4s_level_check_comes_first():
    """lme4 checks the number of levels (check.nobs.vs.nlev) before the number of random effects."""
    d = _paired(18).assign(row=np.arange(36))
    with pytest.raises(InputError, match="'row' has 36 levels for 36 observations"):
        sparsemix.lmer("y ~ x + (1 | row)", d)


@pytest.mark.parametrize("alpha", [0, 1, 1.5, -0.05, np.nan, "0.05", None, True])
def test_statsmodels_alpha_is_between_0_and_1(frame, alpha):
    """Before: conf_int(alpha=1.5) returned a table of NaN bounds."""
    res = MixedLM.from_formula("y ~ x", groups="g", data=frame).fit()
    for call in (
        lambda: res.conf_int(alpha=alpha),
        lambda: res.summary(alpha=alpha),
        lambda: res.t_test(np.eye(len(res.fe_params))[:1]).conf_int(alpha=alpha),
    ):
        with pytest.raises(
            InputError,
            match=rf"alpha must be a number strictly between 0 and 1, such as 0.05 for "
            rf"95% intervals; got {re.escape(repr(alpha))}\.",
        ):
            call()
    np.testing.assert_allclose(res.conf_int(alpha=np.float64(0.1)), res.conf_int(alpha=0.1), rtol=0)


@pytest.mark.parametrize("switch", ["include_random", "allow_new_levels"])
@pytest.mark.parametrize("value", ["no", None, 0])
def test_predict_switches_take_booleans_only(frame, fit, switch, value):
    """Before: include_random="no" added the random effects (a truthy string)."""
    with pytest.raises(InputError, match=rf"{switch} must be True or False; got {re.escape(repr(value))}"):
        fit.predict(frame.iloc[:5], **{switch: value})
    with pytest.raises(InputError, match=rf"{switch} must be True or False"):
        fit.predict(**{switch: value})
