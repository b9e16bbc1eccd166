"""Newton steps with the average information matrix (AI-REML) for variance-components models.

For a model whose random-effects terms are all scalar (one variance per term) the (RE)ML log-likelihood in the
variance parameters psi = (sigma^2, phi_1, ..., phi_m), V = sigma^2 I + sum_j phi_j Z_j Z_j', has the score

    s_a = -(tr(P V_a) - y'P V_a P y) / 2          (P = V^{-1} - V^{-1}X (X'V^{-1}X)^{-1} X'V^{-1}; ML: V^{-1})

and Gilmour, Thompson & Cullis (1995) replace its Hessian by the average information

    AI_ab = y'P V_a P V_b P y / 2,

which needs m + 1 solves with the factor already at hand. The traces tr(Z_j' V^{-1} Z_j) need the inverse
of the dense Schur complement (engine.variance_traces). Everything here is in terms of the cross-products:
P y = e / sigma^2 with e = y - X beta - Z b the residual, and w'P w' for w = e or Z_j Z_j' e is the
penalized residual sum of squares of a fit to w, from Z'w, X'w and w'w.

From a start within ~10% (the pilot's) the steps reach the optimum in 5-8 evaluations where BOBYQA took
56 (InstEval). A step is kept only if it lowers the profiled deviance; anything unexpected (a variance
heading to zero, a step that does not help, an indefinite AI) hands the fit back to BOBYQA (`None`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.linalg import lapack

from ..core.system import rx_transpose_solve
from .optimize import OptimizationResult, secant_update

__all__ = ["ScoringPoint", "scoring_point", "fit_by_scoring"]

SCORING_MAX_ITERATIONS = 30
# Stop where the next Newton step would move every theta_j by less than this, relative ...
SCORING_THETA_TOLERANCE = 1e-9
# (bootstrap refits, which skip BOBYQA's polish too: BOBYQA alone leaves theta ~1e-5 off)
SCORING_REFIT_TOLERANCE = 1e-6
# ... or after a step shorter than this, taken with its deviance only (no score, whose inverse costs two
# factorizations: 27 s of a MovieLens-sized fit's 4 points), which leaves a few percent of itself at most (the
# steps converge superlinearly): theta within ~2e-7 of the optimum, the criterion within rounding
# (docs/performance-scale.md, tenth and fifteenth sessions).
SCORING_LAST_STEP = 3e-5
# ... or where the steps contract linearly (the AI's steps do, by the ratio rho of the last two) and what would be
# left after this step, about rho^2 / (1 - rho^2) of its predicted decrease of the deviance, is below the deviance's
# own resolution: this many times |deviance| (~50 units in the last place, the rounding of a log-determinant's sum).
SCORING_DEVIANCE_RESOLUTION = 1e-14
# A point whose next step (shorter than SCORING_LAST_STEP) would lower the deviance by less than this, or than its
# resolution where that is larger, is the optimum: lme4's own stop (nloptwrap's BOBYQA, ftol_abs) is a change of
# the deviance below 1e-8 between its iterations.
SCORING_STOP_DECREASE = 1e-8
# ... where an evaluation costs something: from this order of the block after the first term (InstEval's 1,156: a
# Cholesky of 10-12 ms). Smaller systems take that step, checked by its deviance: on the seed's 100 x 100 crossed
# design the rule left the log-likelihood 1.3e-9 below lme4's (+1.5e-11 with the step), to save 1 ms.
NEGLIGIBLE_STEP_MIN_ORDER = 1000
# (a ratio above this is no linear convergence to extrapolate)
SCORING_MAX_CONTRACTION = 0.5
# A theta_j (a relative standard deviation) below this is heading for the boundary, where BOBYQA (bounded) and
# the polish take over.
SCORING_MIN_THETA = 1e-3
# A theta_j below this that a full step would take under SCORING_MIN_THETA ends the steps at once (_to_boundary): on
# crossed and nested designs whose variance is zero they crept down 6-7 points before giving up
# (docs/performance-scale.md, sixteenth session).
SCORING_SMALL_THETA = 0.1
SCORING_MAX_HALVINGS = 5
# At most this change of log psi per step (a factor e^2 = 7.4): from lme4's start theta = 1 the first full AI step
# took a theta of 0.13 to 6e-11 (the deviance did fall, but the start was far outside the quadratic region).
SCORING_MAX_LOG_STEP = 2.0
# A variance that the step grows by more than that grows by psi's own Newton step, at most a factor e^4 = 55 (_bounded).
SCORING_MAX_LINEAR_GROWTH = 4.0
# The secant correction follows full steps that moved theta by less than this, relative.
SECANT_MAX_STEP = 0.1
# Far from the optimum the score's traces are computed in single precision (a potri at half the cost): at the
# start and after a step at least this long, relative. On InstEval and six InstEval-like designs the same number of
# points as in double, theta equal to 5e-11.
SINGLE_AFTER_STEP = 1e-3
# A single-precision point whose step is shorter than this is scored again in double before the step is taken
# (single precision leaves the traces ~1e-7 relative off; the last steps, which fix theta to 1e-9, need double).
SINGLE_MIN_STEP = 1e-5
# From this order of the block after the first term every point is scored in single precision, the last ones too:
# there a double inverse costs 2.5x a single one (order 8,000: 4.3 s against 1.6-1.7 s; MovieLens-sized, 16,000:
# 27-30 s against 15-16 s), and the last step, checked by its deviance, left theta within 5e-12 of the double
# scoring's (a simulated ratings design of order 8,000). Below it the double point costs little (InstEval, 1,156).
SINGLE_ALWAYS_MIN_ORDER = 4000
# From this order (below SINGLE_ALWAYS_MIN_ORDER) every point is scored in single precision too, the last ones
# included, but without the corrected estimates: a double inverse there costs as much as an evaluation (InstEval
# with lectage, 1,128 lecturers: 28 ms of 0.26 s), and the single points' steps ended the same as the double's
# (docs/performance-scale.md, twenty-ninth session).
SINGLE_POINTS_MIN_ORDER = 1000
# There the traces are estimated instead (SchurFactor.estimated_traces, this many random sign vectors) where the
# estimate's error moves the step by at most ESTIMATE_MAX_SHARE of its length (at TRACE_ERROR_SIGMAS standard
# errors; the AI's steps leave 1-15% of themselves anyway); otherwise the point is scored again with the inverse.
# At the start, from the signs alone (a few seconds where the inverse and the pair-by-pair trace took ~25 s at order
# 16,000), for a step of at least ESTIMATE_MIN_STEP: near the optimum they would not do (from 2e-4 of it their steps
# landed 1.5-5e-6 off, the inverse's within 2e-8: a simulated ratings design of order 8,000). At the points after
# it, as the last inverse's traces plus the estimated change since (no inverse of their own), which near that
# inverse's point is as good as the inverse's: where the point before computed one and the step from it was shorter
# than CORRECTED_MAX_STEP (further off, or from an inverse further back, the estimate is too rough to keep).
TRACE_PROBES = 16
CORRECTED_MAX_STEP = 0.03
TRACE_ERROR_SIGMAS = 4.0
ESTIMATE_MAX_SHARE = 0.01
ESTIMATE_MIN_STEP = 1e-3
# A step of at least ESTIMATE_FAR_STEP (relative) is far from the optimum, where the AI's quadratic model itself leaves
# ~12% of it (InstEval's start: a step of 14.7% to 1.8% off): there the estimate may move it by ESTIMATE_FAR_MAX_SHARE.
# From START_ESTIMATE_MIN_ORDER columns after the first term (below SINGLE_ALWAYS_MIN_ORDER) the start's traces are
# estimated too: an inverse and the pair map's trace product (12-14 ms at InstEval's 1,156) for 16 signs' two
# triangular solves and two products with A21 (3-4 ms). On InstEval and six simulated designs like it (1,100-1,500
# lecturers, 8-40 ratings a student) the estimate held at every start, each fit in as many evaluations as with the
# inverse, 2-12% faster, its deviance within 1.3e-9 (theta within 2e-6 on InstEval, where the last step, taken by the
# deviance's resolution, lands elsewhere; 1e-7 on the others); at 1% it held on 2 of the 7 (docs/performance-scale.md).
ESTIMATE_FAR_STEP = 0.05
ESTIMATE_FAR_MAX_SHARE = 0.05
START_ESTIMATE_MIN_ORDER = 1000
# There, at a start whose traces are estimated and at a point after a step of at least ESTIMATE_FAR_STEP, far from the
# optimum, S is factored in single precision too (PenalizedSystem.evaluate's `single`: InstEval's 1,156 columns 6
# ms against 11.5 for LAPACK's potrf); a fit that ends at such a point takes its deviance from a double factorization
# there. Their deviance is 2e-5 to 1.5e-4 off on InstEval (up to 6e-10 of it), where the steps from them lower it by
# 0.003 to 14: a step from such a point is kept where it raises the deviance by less than SINGLE_FACTOR_SLACK of it,
# so that no step that lowers it is refused for the point's rounding (one that raises it that little, the next step
# corrects: the fit still ends where the exact score says no step is worth taking).
SINGLE_FACTOR_SLACK = 1e-8


@dataclass(frozen=True)
class ScoringPoint:
    """The profiled deviance, the score and the average information at theta (psi = sigma^2 (1, theta^2))."""

    theta: np.ndarray
    deviance: float
    psi: np.ndarray
    score: np.ndarray  # d loglik / d psi
    information: np.ndarray  # the average information, (m + 1) x (m + 1)
    single: bool = False  # the score's traces in single precision
    trace_errors: np.ndarray | None = None  # the traces' standard errors where they were estimated ...
    corrected: bool = False  # ... as the last inverse's plus the change since
    single_factor: bool = False  # the factor, and so the deviance, in single precision (~1e-5 off)


def scoring_point(
    system, theta: np.ndarray, reml: bool, ev=None, single: bool = False, estimated: str | None = None
) -> ScoringPoint | None:
    """The point at theta; `ev`: system.evaluate(theta), if that is already done (the factor is at theta);
    `single`: the traces from a single-precision inverse, for a point far from the optimum; `estimated`: the traces
    estimated (system.estimated_traces) where that is offered, their errors kept in the point: "random" from the
    random signs alone, "corrected" as the last inverse's traces plus the change."""
    theta = np.asarray(theta, dtype=float)
    single = single and system.single_precision_traces
    ev = system.evaluate(theta) if ev is None else ev
    if not ev.feasible or np.any(theta < SCORING_MIN_THETA):
        return None
    corrected = estimated == "corrected"
    estimate = system.estimated_traces(theta, TRACE_PROBES, corrected) if estimated else None
    traces, errors = (None, None) if estimate is None else estimate
    found = system.compiled_scoring(theta, reml) if traces is None else None
    if found is None:
        found = score_and_information(system, theta, reml, ev, single, traces)
    # psi's units overflow for a response near 1e+-100 (the information ~ n / sigma^4): the fit goes on without the
    # steps (BOBYQA or the gradient's), from the start
    if found is None or not (np.all(np.isfinite(found[0])) and np.all(np.isfinite(found[1]))):
        return None
    sigma2 = ev.r2 / system.dof(reml)
    psi = sigma2 * np.concatenate([[1.0], theta**2])
    deviance = system.profiled_deviance(ev, reml)
    return ScoringPoint(
        theta, deviance, psi, found[0], found[1], single, errors, corrected and errors is not None, ev.single
    )


def score_and_information(system, theta: np.ndarray, reml: bool, ev, single: bool = False, traces=None):
    """(score, average information) in psi at theta, the factor at theta (`ev` its evaluation), by the factor's
    traces (or `traces`, where given) and the system's algebra (the compiled pass of variance components held dense
    computes the same: PenalizedSystem.compiled_scoring); None where the traces are not available."""
    traces = system.variance_traces(theta, single) if traces is None else traces
    if traces is None:
        return None
    c, rc = system.cross, system.relcov
    sizes, starts = rc.column_counts, rc.column_starts  # (scalar terms: a column a level)
    lam = np.repeat(theta, sizes)  # Lambda's diagonal
    p = c.p
    reml_terms = reml and p
    # (with K^{-1} Lambda' Z'X for REML's terms in the same solve)
    beta, u, C = system.modes(ev, ev.RZX) if reml_terms else (*system.modes(ev), None)
    b = lam * u
    Zte = c.residual_products(beta, b)  # Z'e
    ee = ev.r2 - u @ u  # e'e
    nu = system.dof(reml)
    sigma2 = ev.r2 / nu

    # tr(P_1) and tr(Z_j' P_1 Z_j) with P_1 = sigma^2 P (V at sigma^2 = 1)
    trace_P = c.n - float(np.sum(traces * theta**2))
    trace_ZPZ = traces.copy()
    if reml_terms:
        CR = rx_transpose_solve(ev.RX, C.T).T  # C R_X^{-1}, C = K^{-1} Lambda' Z'X
        trace_P -= p - float(np.sum(CR**2))
        T = c.ZtX - c.ZtZ @ (lam[:, None] * C)  # Z'V^{-1}X
        TR = rx_transpose_solve(ev.RX, T.T).T
        trace_ZPZ -= np.add.reduceat(np.sum(TR**2, axis=1), starts)
    v2 = np.add.reduceat(Zte**2, starts)  # |Z_j'e|^2
    # the average information in psi (one covariance entry per scalar term), w_a' P w_b / 2 for w_0 = P y, w_j = Z_j
    # Z_j' P y (PenalizedSystem.average_information gives it times sigma^4). Over sigma^2 twice, not sigma^4 (Python's
    # float power raises OverflowError for a response near 1e99); an overflow there is scoring_point's to refuse.
    information = system.average_information(ev, beta, u, reml, Zte, b)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        score = -0.5 * np.concatenate(
            [[trace_P / sigma2 - ee / sigma2 / sigma2], trace_ZPZ / sigma2 - v2 / sigma2 / sigma2]
        )
        return score, information / sigma2 / sigma2


def fit_by_scoring(
    system,
    start: np.ndarray,
    reml: bool,
    maxiter: int = SCORING_MAX_ITERATIONS,
    progress=None,
    tolerance: float = SCORING_THETA_TOLERANCE,
) -> tuple[OptimizationResult | None, np.ndarray, int]:
    """(result, best theta, evaluations): the result is None where the steps gave up, and the fit goes on from
    the best theta they reached (never worse than `start`).

    Steps are Newton steps in log psi (positive variances without bounds; from the pilot's start on InstEval
    the first full step in psi itself raised the deviance and had to be halved). The Newton matrix is the AI of
    the current point corrected by the last short step's secant (a BFGS update with the exact score change):
    AI alone converges linearly, each step leaving ~3% of the previous one on InstEval. A trial point costs a
    deviance evaluation; the score and AI are computed only where the step is kept. The fit stops where the
    next step would move theta by less than `tolerance` (relative) or lower the deviance by less than
    SCORING_STOP_DECREASE, without taking it, or after a step shorter than SCORING_LAST_STEP, which leaves a few
    percent of itself at most.
    """
    t0 = time.perf_counter()
    always_single = system.relcov.after_first >= SINGLE_ALWAYS_MIN_ORDER
    estimate_start = always_single or system.relcov.after_first >= START_ESTIMATE_MIN_ORDER
    large = system.relcov.after_first >= NEGLIGIBLE_STEP_MIN_ORDER
    single_points = always_single or system.relcov.after_first >= SINGLE_POINTS_MIN_ORDER
    system.expect_scoring(not estimate_start)  # (an estimate at the start needs no trace product: 0.7 ms on InstEval)
    ev = system.evaluate(start, single=estimate_start)
    point = scoring_point(system, start, reml, ev, single=True, estimated="random" if estimate_start else None)
    system.expect_scoring()
    count = 1
    if point is None:
        return None, np.asarray(start, dtype=float), count
    log = [(count, point.deviance, time.perf_counter() - t0)]
    previous = None
    history: list[float] = []  # the lengths of the last steps taken in full, in turn
    while count < maxiter:
        D = point.psi
        hessian = _secant_corrected(point, previous)
        # (LAPACK's posv as it is, which reads the upper triangle as scipy's solve(assume_a="pos") did)
        _, log_step, info = lapack.dposv(D[:, None] * hessian * D[None, :], D * point.score)
        if info != 0:
            return None, point.theta, count
        if not np.all(np.isfinite(log_step)):
            return None, point.theta, count
        length = _theta_change(log_step)
        if point.trace_errors is not None and not _estimate_holds(point, D[:, None] * hessian * D[None, :], length):
            theta = point.theta  # the estimate could move this step too far: scored again with the inverse
            # (on the point's own factor: one in single precision is kept, as the point's traces are)
            point = scoring_point(system, theta, reml, system.evaluate(theta, single=point.single_factor), single=True)
            if point is None:
                return None, theta, count
            continue
        if large and length < SCORING_LAST_STEP and _negligible(point, log_step):
            deviance, count = _double_deviance(system, point, reml, count)
            return _converged(point.theta, deviance, count, log, t0), point.theta, count
        if point.single and length < SINGLE_MIN_STEP and not single_points:  # near the optimum: it again in double
            theta = point.theta
            point = scoring_point(system, theta, reml, system.evaluation_at(theta))
            if point is None:
                return None, theta, count
            continue
        if length < tolerance:
            deviance, count = _double_deviance(system, point, reml, count)
            return _converged(point.theta, deviance, count, log, t0), point.theta, count
        if length < SCORING_LAST_STEP or _leaves_nothing(point, log_step, length, history):
            # the last step: checked by its deviance, no score needed after it
            at_point, count = _double_deviance(system, point, reml, count)
            theta = _theta_after(point, log_step)
            system.expect_scoring(False)
            deviance = system.profiled_deviance(system.evaluate(theta), reml)
            count += 1
            if deviance <= at_point + 1e-12 * abs(at_point):
                log.append((count, deviance, time.perf_counter() - t0))
                return _converged(theta, deviance, count, log, t0), theta, count
            return _converged(point.theta, at_point, count, log, t0), point.theta, count
        if _to_boundary(point, log_step):
            return None, point.theta, count
        taken_step = _bounded(log_step)
        cut, log_step = not np.array_equal(taken_step, log_step), taken_step
        accepted, full_step = None, True
        for _ in range(SCORING_MAX_HALVINGS):
            theta = _theta_after(point, log_step)
            if np.any(theta < SCORING_MIN_THETA):
                log_step, full_step = log_step / 2, False
                continue
            ev = system.evaluate(theta, single=large and _theta_change(log_step) >= ESTIMATE_FAR_STEP)
            count += 1
            slack = SINGLE_FACTOR_SLACK if point.single_factor else 1e-12
            if system.profiled_deviance(ev, reml) <= point.deviance + slack * abs(point.deviance):
                taken = _theta_change(log_step)
                # a last term of few levels to its optimum with the others held, at the cost of its own block's
                # factorizations: the AI's steps converge on it only linearly (InstEval's dept:service)
                ev = system.refined_last_term(ev, reml)
                theta = ev.theta
                single = single_points or taken >= SINGLE_AFTER_STEP
                nearby = point.trace_errors is None and taken < CORRECTED_MAX_STEP  # (point's inverse is kept)
                estimated = "corrected" if always_single and nearby else None
                accepted = scoring_point(system, theta, reml, ev, single=single, estimated=estimated)
                break
            log_step, full_step = log_step / 2, False
        if accepted is None:
            return None, point.theta, count
        # A halved or long step is no secant of the quadratic model: the next Newton matrix is the plain AI
        # (measured, evaluations on six crossed designs: secant after every full step 45, never 41, after full
        # steps below SECANT_MAX_STEP 40; InstEval 8, 8, 6).
        previous, point = (point if full_step and taken < SECANT_MAX_STEP else None), accepted
        history = history + [taken] if full_step and not cut else []
        log.append((count, point.deviance, time.perf_counter() - t0))
        if progress is not None:
            progress(count, point.deviance, time.perf_counter() - t0)
    return None, point.theta, count


def _double_deviance(system, point: ScoringPoint, reml: bool, count: int) -> tuple[float, int]:
    """(the point's deviance from a double-precision factor, the evaluations so far): evaluated again where its own
    factor was single."""
    if not point.single_factor:
        return point.deviance, count
    return system.profiled_deviance(system.evaluate(point.theta), reml), count + 1


def _estimate_holds(point: ScoringPoint, newton: np.ndarray, length: float) -> bool:
    """Whether the traces' estimation errors (point.trace_errors, TRACE_ERROR_SIGMAS of them) move theta after the
    step of `length` (Newton matrix `newton` in log psi) by at most ESTIMATE_MAX_SHARE of it. The score is linear in
    the traces (score_and_information): d score_0 / d trace_j = theta_j^2 / (2 sigma^2), d score_j / d trace_j =
    -1 / (2 sigma^2); the step in log psi is newton^{-1} D score and theta_j moves by (step_j - step_0) / 2."""
    if length < ESTIMATE_MIN_STEP and not point.corrected:
        return False
    psi = point.psi
    m = psi.shape[0] - 1
    by_trace = np.zeros((m + 1, m))
    by_trace[0] = psi[1:] / psi[0] / (2.0 * psi[0])
    by_trace[1:] = -np.eye(m) / (2.0 * psi[0])
    try:
        steps = np.linalg.solve(newton, psi[:, None] * by_trace)  # d log-psi step / d trace
    except np.linalg.LinAlgError:
        return False
    moves = np.abs((steps[1:] - steps[0]) / 2.0) @ point.trace_errors
    share = ESTIMATE_FAR_MAX_SHARE if length >= ESTIMATE_FAR_STEP else ESTIMATE_MAX_SHARE
    return bool(np.all(np.isfinite(moves)) and TRACE_ERROR_SIGMAS * np.max(moves) <= share * length)


def _bounded(log_step: np.ndarray) -> np.ndarray:
    """The Newton step in log psi as taken: cut to SCORING_MAX_LOG_STEP (all entries in proportion), except where it
    would grow a variance by more than that, which takes the Newton step in psi itself instead (log(1 + l), up to
    SCORING_MAX_LINEAR_GROWTH): from a variance started near zero the log-psi model asks for far too much, where
    psi's own step lands near the optimum, and cut in proportion such a step also held the other entries back
    (mlmRev's ScotsSec: docs/performance-scale.md, sixteenth session)."""
    grows = log_step > SCORING_MAX_LOG_STEP
    rest = np.where(grows, 0.0, log_step)
    longest = np.max(np.abs(rest))
    if longest > SCORING_MAX_LOG_STEP:  # far from the optimum the quadratic model is not to be trusted
        rest = rest * (SCORING_MAX_LOG_STEP / longest)
    if not grows.any():
        return rest
    return np.where(grows, np.minimum(np.log1p(np.where(grows, log_step, 0.0)), SCORING_MAX_LINEAR_GROWTH), rest)


def _leaves_nothing(point: ScoringPoint, log_step: np.ndarray, length: float, history: list) -> bool:
    """Whether the full step `log_step` (of `length`) is the last that changes the deviance: at least two steps
    before it were taken in full (`history`: their lengths; the first from the start is no measure of the
    contraction, which settles after it), the last shrank to this one by rho <= SCORING_MAX_CONTRACTION, and the
    steps after it, each rho times the one before, would lower the deviance by less than its resolution in all."""
    if len(history) < 2:
        return False
    rho = length / history[-1]
    if rho > SCORING_MAX_CONTRACTION:
        return False
    decrease = _predicted_decrease(point, log_step)
    return decrease * rho**2 / (1.0 - rho**2) < SCORING_DEVIANCE_RESOLUTION * abs(point.deviance)


def _predicted_decrease(point: ScoringPoint, log_step: np.ndarray) -> float:
    """The Newton model's decrease of the deviance (-2 loglik) for the step `log_step` in log psi."""
    return float((point.psi * point.score) @ log_step)


def _negligible(point: ScoringPoint, log_step: np.ndarray) -> bool:
    """Whether the full step would lower the deviance (by the Newton model) by less than SCORING_STOP_DECREASE, or
    than its resolution where that is larger: the point is the optimum as far as the criterion can tell."""
    decrease = _predicted_decrease(point, log_step)
    return decrease < max(SCORING_STOP_DECREASE, SCORING_DEVIANCE_RESOLUTION * abs(point.deviance))


def _to_boundary(point: ScoringPoint, log_step: np.ndarray) -> bool:
    """Whether the full step would take a small theta_j (below SCORING_SMALL_THETA) under SCORING_MIN_THETA: a
    variance heading for zero, which steps in log psi only approach (each cut short, then halved, creeping
    down a factor at a time), where the optimizers with bounds take over at once."""
    theta = _theta_after(point, log_step)
    return bool(np.any((theta < SCORING_MIN_THETA) & (point.theta < SCORING_SMALL_THETA)))


def _theta_after(point: ScoringPoint, log_step: np.ndarray) -> np.ndarray:
    """theta after the step `log_step` in log psi from `point` (theta_j = sqrt(psi_j / sigma^2))."""
    psi = point.psi * np.exp(log_step)
    return np.sqrt(psi[1:] / psi[0])


def _theta_change(log_step: np.ndarray) -> float:
    """The largest relative change of a theta_j in a step of log psi: theta_j = sqrt(psi_j / psi_0) changes by
    about (step_j - step_0) / 2."""
    return float(np.max(np.abs(log_step[1:] - log_step[0]))) / 2


def _converged(theta, deviance, count, log, t0) -> OptimizationResult:
    return OptimizationResult(
        np.asarray(theta, dtype=float),
        float(deviance),
        count,
        True,
        "Newton step below tolerance",
        "scoring",
        time.perf_counter() - t0,
        tuple(log),
    )


def _secant_corrected(point: ScoringPoint, previous: ScoringPoint | None) -> np.ndarray:
    """AI at `point`, updated (BFGS) so that it maps the last step to the change of the score."""
    if previous is None:
        return point.information
    # (the change of the gradient of -loglik)
    return secant_update(point.information, point.psi - previous.psi, previous.score - point.score)
