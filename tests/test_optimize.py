"""The deviance minimiser: BOBYQA's end point and the Newton polish that pins theta down."""

import numpy as np
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
