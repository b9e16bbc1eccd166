"""The deviance minimiser: BOBYQA's end point and the Newton polish that pins theta down."""

import numpy as np
import pandas as pd
import pytest

from sparsemix.fit.optimize import minimize_deviance, newton_polish


def _smooth(center, curvature):
    """A smooth, non-quadratic bowl with its minimum at `center` (known exactly)."""
    center = np.asarray(center, float)

    def f(x):
        d = np.asarray(x, float) - center
        return float(1e3 + d @ curvature @ d + 0.3 * np.sum(d**3) + np.sum(d**4))

    return f


CURVATURE = np.array([[4.0, 1.0, 0.5], [1.0, 2.0, 0.3], [0.5, 0.3, 0.2]])  # eigenvalues 4.7, 1.5, 0.1


def test_polish_moves_bobyqas_end_points_to_one_point_at_the_minimum():
    f = _smooth([0.8, -0.3, 1.7], CURVATURE)
    lower = np.array([0.0, -np.inf, 0.0])
    starts = [np.ones(3), np.array([2.0, 1.0, 0.5]), np.full(3, 0.1)]
    plain = [minimize_deviance(f, s, lower) for s in starts]
    polished = [minimize_deviance(f, s, lower, polish=True) for s in starts]
    # BOBYQA stops on a deviance change of 1e-10, leaving theta 1e-6..1e-5 off along the flat direction, at a
    # point that depends on the path; the polish lands on one point, within the differences' bias (h^2 f'''/f'').
    plain_spread = np.ptp([o.theta for o in plain], axis=0).max()
    polished_spread = np.ptp([o.theta for o in polished], axis=0).max()
    assert plain_spread > 1e-6 and polished_spread < 1e-8
    for o, p in zip(plain, polished):
        np.testing.assert_allclose(p.theta, [0.8, -0.3, 1.7], rtol=0, atol=1e-7)
        assert p.deviance <= o.deviance


def test_entries_at_a_bound_stay_there():
    # The deviance rises away from x0 = 0 (a zero variance at the optimum): only x1, x2 are polished.
    bowl = _smooth([0.4, 1.0], CURVATURE[1:, 1:])

    def f(x):
        return bowl(x[1:]) + 5.0 * x[0]

    start = np.array([0.0, 0.4 + 3e-6, 1.0 - 2e-5])
    x, fx = newton_polish(f, start, f(start), np.zeros(3), np.full(3, np.inf))
    assert x[0] == 0.0
    np.testing.assert_allclose(x[1:], [0.4, 1.0], rtol=0, atol=1e-7)
    assert fx < f(start)


@pytest.mark.parametrize(
    "f, why",
    [
        (lambda x: float(-np.sum(np.asarray(x) ** 2)), "a maximum: the Hessian is not positive definite"),
        (lambda x: float(np.sum(np.abs(np.asarray(x) - 0.5))), "not smooth: the Newton step is far too long"),
    ],
)
def test_polish_leaves_points_it_cannot_improve(f, why):
    x0 = np.array([0.5 + 1e-3, 0.7])
    x, fx = newton_polish(f, x0, f(x0), np.full(2, -np.inf), np.full(2, np.inf))
    assert np.array_equal(x, x0), why
    assert fx == f(x0)


@pytest.mark.parametrize("optimum, expected", [(0.0, 0.0), (5e-4, 5e-4)])
def test_entries_left_just_above_a_bound_go_onto_it_only_if_that_is_no_worse(optimum, expected):
    # A zero variance: the deviance is flat near it, so BOBYQA stops a path-dependent 1e-6..1e-4
    # above it. A small but real optimum (5e-4) must not be pulled to 0.
    bowl = _smooth([0.4, 1.0], CURVATURE[1:, 1:])

    def f(x):
        return bowl(x[1:]) + 50.0 * (x[0] - optimum) ** 2

    start = np.array([optimum + 7e-6, 0.4, 1.0])
    x, fx = newton_polish(f, start, f(start), np.zeros(3), np.full(3, np.inf))
    assert x[0] == pytest.approx(expected, abs=1e-5) and (x[0] == 0.0) == (expected == 0.0)
    assert fx <= f(start) + 1e-12 * abs(f(start))


def test_lbfgs_stops_where_its_line_search_reaches_rounding():
    """Where the gradient says the deviance falls and no step lowers it (as at an optimum where the gradient's
    rounding exceeds gtol), L-BFGS-B's line search halved its step down to 3e-15 (27 evaluations; Oxboys: ten
    at rounding level); it stops at its first point within LBFGS_MIN_MOVE of the last, settled, since the
    gradient is below the rounding slope."""
    from sparsemix.fit.optimize import LBFGS_MIN_MOVE, _lbfgs

    x0, points = np.array([0.3, -0.2]), []

    def fg(x):
        points.append(np.array(x))
        return 648.0 + 1e-3 * float(np.abs(x - x0).sum()), np.array([3e-5, 0.0])

    converged, message, value, slope = _lbfgs(fg, x0.copy(), np.full(2, -np.inf), np.full(2, np.inf), 100, True)
    assert converged and "rounding" in message
    assert value == 648.0 and slope == pytest.approx(3e-5)
    steps = [np.max(np.abs(b - a)) for a, b in zip(points, points[1:])]
    assert min(steps) > LBFGS_MIN_MOVE * np.abs(x0).min()  # none at rounding distance from the one before
    assert len(points) <= 8


def test_the_polish_reuses_the_best_points_gradient_and_a_probe_does_not_lend_it_one():
    """The gradient polish starts where L-BFGS-B's best point was evaluated: no second evaluation there. A boundary
    probe's value-only evaluation that becomes the best point has no gradient to reuse: the next L-BFGS-B run from
    it evaluates it (a stale gradient of zeros, the boundary point's, ended that run at once)."""
    calls = []

    def fg(x):
        calls.append(np.array(x))
        return float((x - 0.4) @ (x - 0.4)), 2 * (x - 0.4)

    result = minimize_deviance(lambda x: fg(x)[0], np.array([1.0, 1.0]), np.zeros(2), polish=True, deviance_gradient=fg)
    np.testing.assert_allclose(result.theta, [0.4, 0.4], atol=1e-9)
    repeats = sum(np.array_equal(a, b) for i, a in enumerate(calls) for b in calls[:i])
    assert repeats == 0


def _one_parameter(f, df):
    """(deviance, gradient) of a function of one parameter, counting its evaluations."""
    calls = []

    def fg(x):
        calls.append(float(x[0]))
        return f(x[0]), np.array([df(x[0])])

    return fg, calls


@pytest.mark.parametrize(
    "f, start, expected",
    [
        # a skewed interior minimum at 0.85 (a random intercept's deviance has this shape)
        (lambda t: (t - 0.85) ** 2 + 0.5 * (t - 0.85) ** 3 + (t - 0.85) ** 4, 1.0, 0.85),
        # even in t, lowest at the bound 0 (a zero variance), concave at the start: first half-way steps
        (lambda t: 3.0 * np.log(1 + t * t) - 1.0 * np.log(1 + 0.1 * t * t), 4.0, 0.0),
        # even in t, a maximum at 0 and the minimum inside, reached from below the start's bracket
        (lambda t: (t * t - 2.0) ** 2, 0.1, np.sqrt(2.0)),
        # far from the start, falling all the way: the bracket opened outward
        (lambda t: (np.log(t * t + 1e-300) - np.log(30.0**2)) ** 2, 1.0, 30.0),
    ],
)
def test_scalar_newton_settles_on_the_minimum_of_one_parameter(f, start, expected):
    from sparsemix.fit.optimize import scalar_newton

    h = 1e-6  # the derivative by central differences (0 at the bound, where these functions are even)
    df = lambda t: (f(t + h) - f(t - h)) / (2 * h) if t > 0 else 0.0  # noqa: E731
    fg, calls = _one_parameter(f, df)
    how, x, fx = scalar_newton(fg, np.array([start]), np.array([0.0]), np.array([np.inf]), 200)
    assert how == "settled"
    assert x[0] == pytest.approx(expected, abs=1e-6)
    assert fx == pytest.approx(f(expected), abs=1e-9)
    assert len(calls) <= 40


def test_scalar_newton_goes_downhill_where_the_interval_is_open_and_the_deviance_concave():
    """No bound on the side the deviance falls to, concave at the start: the steps double outward, toward the fall."""
    from sparsemix.fit.optimize import scalar_newton

    f = lambda t: np.log1p((t + 10.0) ** 2)  # noqa: E731 (concave where |t + 10| > 1)
    fg, calls = _one_parameter(f, lambda t: 2 * (t + 10.0) / (1 + (t + 10.0) ** 2))
    how, x, _ = scalar_newton(fg, np.array([0.0]), np.array([-np.inf]), np.array([np.inf]), 200)
    assert how == "settled" and x[0] == pytest.approx(-10.0, abs=1e-8) and len(calls) <= 40


def test_scalar_newton_with_the_exact_derivative_reaches_1e_10_and_gives_up_without_evaluations():
    from sparsemix.fit.optimize import scalar_newton

    f = lambda t: (t - 0.85) ** 2 + 0.5 * (t - 0.85) ** 3 + (t - 0.85) ** 4  # noqa: E731
    df = lambda t: 2 * (t - 0.85) + 1.5 * (t - 0.85) ** 2 + 4 * (t - 0.85) ** 3  # noqa: E731
    fg, calls = _one_parameter(f, df)
    how, x, _ = scalar_newton(fg, np.array([1.0]), np.array([0.0]), np.array([np.inf]), 100)
    assert how == "settled" and abs(x[0] - 0.85) < 1e-10 and len(calls) <= 9
    # out of evaluations: it says so, and returns its best point
    fg, calls = _one_parameter(f, df)
    how, x, fx = scalar_newton(fg, np.array([3.0]), np.array([0.0]), np.array([np.inf]), 3)
    assert how == "" and len(calls) == 3 and fx <= f(3.0)
    # a deviance that is not finite at the start: nothing to do
    fg, calls = _one_parameter(lambda t: np.inf, lambda t: 0.0)
    assert scalar_newton(fg, np.array([1.0]), np.array([0.0]), np.array([np.inf]), 100)[0] == ""


def test_one_variance_fits_by_newton_steps_to_lme4s_optimum():
    """A random intercept alone: held dense whole (lme4's Dyestuff, and Dyestuff2 whose variance is zero), the exact
    Hessian's Newton steps (1 evaluation for REML from the ANOVA start, 4 for ML; the scalar steps took 2-7); where
    its levels are eliminated, the same steps with the numpy Hessian (scalar_term_hessian: 1 evaluation from the
    ANOVA start on this balanced design, where the scalar steps took 2); lme4's or BOBYQA's optimum either way."""
    import json
    from pathlib import Path

    import pandas as pd

    import sparsemix

    for name in ("dyestuff", "dyestuff2"):
        fx = json.loads((Path(__file__).parent / "reference" / f"{name}.json").read_text())
        data = pd.DataFrame(fx["data"])
        for ref in fx["fits"]:
            m = sparsemix.lmer(ref["formula"], data, reml=ref["reml"])
            opt = m.fit_result.optimization
            assert opt.message == "Newton steps with the exact Hessian"
            assert opt.n_evaluations <= (1 if ref["reml"] else 4)
            np.testing.assert_allclose(m.fit_result.theta, ref["theta"], rtol=1e-5, atol=1e-7)
            assert m.llf == pytest.approx(ref["logLik"], abs=1e-7)
    rng = np.random.default_rng(8)
    g = np.repeat(np.arange(400), 3)
    data = pd.DataFrame({"y": rng.normal(size=400)[g] * 0.7 + rng.normal(size=g.size), "g": g.astype(str)})
    m = sparsemix.lmer("y ~ 1 + (1 | g)", data)
    assert m.fit_result.system._factor.q1 == 400 and m.fit_result.system._factor.q2 == 0  # (eliminated by levels)
    assert m.fit_result.optimization.message == "Newton steps with the exact Hessian"
    assert m.fit_result.optimization.n_evaluations <= 2
    b = sparsemix.lmer("y ~ 1 + (1 | g)", data, optimizer="bobyqa")
    assert m.deviance <= b.deviance + 1e-9
    np.testing.assert_allclose(m.theta, b.theta, rtol=1e-4)


def _even_quadratic_family():
    """(fgh, minimum, value there) of a deviance even in each entry, like variance components' in theta: in tau =
    theta^2 a convex quadratic whose minimum over tau >= 0 has tau_2 = 0 (a zero variance)."""
    A = np.array([[2.0, 0.6], [0.6, 1.0]])
    b = np.array([-2.0, 0.5])  # unconstrained tau minimum has tau_2 < 0: the constrained one sits at tau_2 = 0

    def f(theta):
        tau = theta**2
        return 0.5 * tau @ A @ tau + b @ tau

    def fgh(theta):
        tau = theta**2
        g_tau = A @ tau + b
        H = 4.0 * np.outer(theta, theta) * A + 2.0 * np.diag(g_tau)
        return f(theta), 2.0 * theta * g_tau, H

    tau1 = -b[0] / A[0, 0]
    return fgh, np.array([np.sqrt(tau1), 0.0]), f(np.array([np.sqrt(tau1), 0.0]))


@pytest.mark.parametrize("start", [[1.0, 1.0], [3.0, 0.2], [0.05, 2.0]])
def test_even_newton_takes_a_variance_to_zero_without_a_bound(start):
    from sparsemix.fit.optimize import even_newton

    fgh, minimum, value = _even_quadratic_family()
    calls = []
    counted = lambda x: calls.append(x.copy()) or fgh(x)  # noqa: E731
    how, x, fx = even_newton(counted, np.array(start), 100)
    assert how == "settled"
    assert np.max(np.abs(x - minimum)) < 1e-8 and fx == pytest.approx(value, abs=1e-12)
    assert all(np.all(c >= 0) for c in calls)  # the deviance is asked only at theta >= 0 (folded)
    assert len(calls) <= 25


def test_even_newton_leaves_a_saddle_at_zero_and_gives_up_where_it_cannot_evaluate():
    """Started at a zero variance the deviance falls from (gradient 0 there, negative curvature): it follows the
    negative direction to the interior minimum; a deviance that is not finite, or no Hessian, ends it."""
    from sparsemix.fit.optimize import even_newton

    def fgh(theta):  # (theta_1^2 - 1)^2 + theta_2^2: a saddle at theta_1 = 0
        t1, t2 = theta
        return (
            (t1 * t1 - 1) ** 2 + t2 * t2,
            np.array([4 * t1 * (t1 * t1 - 1), 2 * t2]),
            np.array([[12 * t1 * t1 - 4, 0.0], [0.0, 2.0]]),
        )

    how, x, fx = even_newton(fgh, np.array([0.0, 0.5]), 100)
    assert how == "settled" and x == pytest.approx([1.0, 0.0], abs=1e-9) and fx == pytest.approx(0.0, abs=1e-12)
    assert even_newton(lambda t: (np.inf, np.zeros(2), None), np.array([1.0, 1.0]), 100)[0] == ""
    assert even_newton(lambda t: (1.0, np.ones(2), None), np.array([1.0, 1.0]), 100)[0] == ""


@pytest.mark.parametrize("rounding", [5e-9, 2e-9])
def test_even_newton_takes_a_step_the_deviances_rounding_cannot_judge_on_the_gradients_word(rounding):
    """Near a flat minimum (curvatures 0.026 to 30, a near-singular 3 x 3 growth curve's) the full Newton step from a
    gradient of 1.4e-5 gains 3.8e-9 on a deviance of 1,324, which its rounding (here: every point but the start
    reads `rounding` high) cannot see: every halving was refused and the steps gave up (L-BFGS-B then took 80
    evaluations). Within 1e-12 of the start's deviance and with the gradient gone, the step is taken and the steps
    settle; a step that ends above that is still refused."""
    from sparsemix.fit.optimize import even_newton

    A = np.diag([0.0257, 1.0, 30.0])
    start = np.linalg.solve(A, np.array([1.4e-5, 1e-6, 1e-6])) + 5.0

    def fgh(theta):
        d = theta - 5.0
        raised = 0.0 if np.array_equal(theta, start) else rounding
        return 1324.0 + 0.5 * d @ A @ d + raised, A @ d, A

    how, x, fx = even_newton(fgh, start.copy(), 50)
    if rounding <= 1e-12 * 1324.0 + 0.5 * (A @ (start - 5.0)) @ (start - 5.0):
        assert how == "settled" and np.max(np.abs(x - 5.0)) < 1e-9
    else:
        assert how == ""


def test_even_newton_folds_a_templates_column_with_the_sign_of_its_diagonal_entry():
    """A deviance of a 2 x 2 template's theta = (T11, T21, T22) depends on T T' only: each column may change sign
    together. Started where a step crosses T11 = 0, the steps end with T11 >= 0 and T21 of the sign that goes with
    it (the same T T'), at the minimum of a convex function of T T'."""
    from sparsemix.fit.optimize import even_newton

    target = np.array([[2.0, -1.2], [-1.2, 1.5]])  # Sigma's minimum: a full-rank covariance

    def fgh(theta):
        T = np.array([[theta[0], 0.0], [theta[1], theta[2]]])
        S = T @ T.T - target
        value = float(np.sum(S * S))

        # derivatives by central differences of this smooth function (its exact ones are not the point here)
        def grad(t):
            h = 1e-6
            return np.array([(_value(t + h * e) - _value(t - h * e)) / (2 * h) for e in np.eye(3)])

        H = np.column_stack([(grad(theta + 1e-4 * e) - grad(theta - 1e-4 * e)) / 2e-4 for e in np.eye(3)])
        return value, grad(theta), (H + H.T) / 2

    def _value(t):
        T = np.array([[t[0], 0.0], [t[1], t[2]]])
        S = T @ T.T - target
        return float(np.sum(S * S))

    how, x, fx = even_newton(fgh, np.array([0.3, 0.8, 1.0]), 200, column_diagonals=np.array([0, 0, 2]))
    T = np.array([[x[0], 0.0], [x[1], x[2]]])
    assert how == "settled" and x[0] >= 0 and x[2] >= 0
    assert T @ T.T == pytest.approx(target, abs=1e-6) and fx == pytest.approx(0.0, abs=1e-10)


def test_even_newton_settles_where_its_step_would_gain_less_than_the_deviances_rounding(monkeypatch):
    """A Newton step whose predicted decrease is below HESSIAN_NEWTON_RESOLUTION of the deviance is taken unevaluated:
    a deviance that resolves no finer (here rounded to 1e-10 at 1,800) cannot show it falling, and halving it ran a
    boundary fit 35 evaluations further at one point. Without the rule the gradient's word takes the full step
    (_gradient_judges: two evaluations); without either, the same start gives up."""
    from sparsemix.fit import optimize
    from sparsemix.fit.optimize import even_newton

    def fgh(theta):  # 1800 + (theta - 1)^2, its value rounded as a deviance is
        return round(1800.0 + (theta[0] - 1.0) ** 2, 10), np.array([2 * (theta[0] - 1.0)]), np.array([[2.0]])

    calls = []
    counted = lambda x: calls.append(x.copy()) or fgh(x)  # noqa: E731
    how, x, _ = even_newton(counted, np.array([1.0 + 3e-6]), 100)
    assert how == "settled" and x == pytest.approx([1.0], abs=1e-12) and len(calls) == 1
    monkeypatch.setattr(optimize, "HESSIAN_NEWTON_RESOLUTION", 0.0)
    calls.clear()
    how, x, _ = even_newton(counted, np.array([1.0 + 3e-6]), 100)
    assert how == "settled" and x == pytest.approx([1.0], abs=1e-12) and len(calls) == 2
    monkeypatch.setattr(optimize, "HESSIAN_NEWTON_GRADIENT_DROP", -1.0)  # (no gradient passes)
    assert even_newton(fgh, np.array([1.0 + 3e-6]), 100)[0] == ""


def test_even_newton_tries_a_bold_step_for_a_variance_leaving_a_saddle(monkeypatch):
    """A variance started near zero whose optimum is not (the deviance even in it, curving down there): steps of
    |slope / curvature| only double it, so where that happens at two points in a row the entry is tried where a
    Newton step in its variance t^2 takes it (here the deviance is quadratic in t^2: the optimum itself), and taken
    where the deviance falls. Here (optimum 0.12, start 1e-4) that saves the doublings: 3 evaluations (7 with the
    trial at HESSIAN_NEWTON_DESCENT), where without the trials it took 15."""
    from sparsemix.fit import optimize
    from sparsemix.fit.optimize import even_newton

    c, d = 1.0, 1.0 / (2 * 0.12**2)  # D = -c t^2 + d t^4 + (s - 1)^2: minimum at t = 0.12, s = 1

    def fgh(theta):
        t, s = theta
        return (
            -c * t * t + d * t**4 + (s - 1) ** 2,
            np.array([-2 * c * t + 4 * d * t**3, 2 * (s - 1)]),
            np.array([[-2 * c + 12 * d * t * t, 0.0], [0.0, 2.0]]),
        )

    def fit():
        calls = []
        how, x, _ = even_newton(lambda y: calls.append(1) or fgh(y), np.array([1e-4, 0.5]), 100)
        assert how == "settled" and x == pytest.approx([0.12, 1.0], abs=1e-8)
        return len(calls)

    bold = fit()
    monkeypatch.setattr(optimize, "HESSIAN_NEWTON_DESCENT_TRIALS", 0)
    assert bold <= 3 and fit() >= bold + 10


def test_a_variances_newton_step_goes_where_its_quadratic_model_in_the_variance_is_least():
    """_variance_newton: for D(t) = (t^2 - v)^2 + D0 (quadratic in the variance t^2) the step lands on sqrt(v) from
    any t of either sign; where the deviance does not fall as the variance grows, or curves down in it, the trial goes
    to HESSIAN_NEWTON_DESCENT."""
    from sparsemix.fit.optimize import HESSIAN_NEWTON_DESCENT, _variance_newton

    v = 0.05**2
    t = np.array([1e-4, -3e-3, 0.02])
    gradient, curvature = 4 * t * (t * t - v), 4 * (t * t - v) + 8 * t * t
    np.testing.assert_allclose(_variance_newton(t, gradient, curvature), 0.05, rtol=1e-10)
    rising = _variance_newton(np.array([0.2]), np.array([4 * 0.2 * (0.04 - v)]), np.array([1.0]))
    curving_down = _variance_newton(np.array([1e-3]), np.array([-1e-3]), np.array([-1.0]))  # D'' < 0 in t^2
    assert rising[0] == curving_down[0] == HESSIAN_NEWTON_DESCENT


def test_crossed_slopes_from_a_near_zero_start_take_the_variance_step():
    """Crossed subjects x items with slopes (a random design of the twentieth session's batch): from MINQUE's start
    one standard deviation near zero, whose optimum is not; the trial at HESSIAN_NEWTON_DESCENT rose above the
    deviance there and the steps doubled the entry instead (14-18 evaluations); the Newton step in its variance takes
    it within reach: 5, to BOBYQA's optimum."""
    import sparsemix as sm
    from sparsemix.fit.stages import optimize_system

    rng = np.random.default_rng(10)
    ns, ni = int(rng.integers(20, 200)), int(rng.integers(3, 60))
    s, i = np.meshgrid(np.arange(ns), np.arange(ni), indexing="ij")
    s, i = s.ravel(), i.ravel()
    keep = rng.random(s.size) < rng.uniform(0.5, 1.0)
    s, i = s[keep], i[keep]
    x = rng.normal(size=s.size)
    sd = lambda: float(rng.choice([0.0, 0.02, 0.1, 0.5, 1.0]))  # noqa: E731
    y = 1 + 0.3 * x + rng.normal(size=ns)[s] * sd() + rng.normal(size=ns)[s] * sd() * x
    y = y + rng.normal(size=ni)[i] * sd() + rng.normal(size=ni)[i] * sd() * x + rng.normal(size=s.size)
    data = pd.DataFrame({"y": y, "x": x, "subj": s.astype(str), "item": i.astype(str)})
    for reml in (True, False):
        fit = sm.lmer("y ~ x + (x | subj) + (x | item)", data, reml=reml)
        assert fit.fit_result.optimization.message.startswith("Newton steps with the exact Hessian")
        assert fit.n_evaluations <= 7
        by_bobyqa = optimize_system(fit.fit_result.system, reml=reml, method="bobyqa")
        assert fit.fit_result.optimization.deviance <= by_bobyqa.deviance + 1e-10 * abs(by_bobyqa.deviance)
