"""Profile-likelihood intervals, as lme4's profile() / confint(method="profile").

As lme4, the profile is of the ML deviance (a REML fit is refitted by ML first). Variance parameters are
profiled on the (sd, cor, sigma) scale with the fixed effects profiled out; each fixed effect is profiled by
holding it at a value (an offset) and re-optimising everything else. The signed root
zeta(x) = sign(x - x_hat) sqrt(dev(x) - dev_min) is followed outward from the estimate until |zeta| reaches
the normal quantile of the level; the interval ends are where it does (or a bound, e.g. sd = 0).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import special

from ..core.system import PenalizedSystem
from ..errors import SparsemixWarning
from ..fit.many import minimize_one
from ..fit.optimize import minimize_deviance, warm_step
from ..fit.stages import optimize_system
from .sdcor import sdcor_bounds, sdcor_of, theta_of_sdcor

__all__ = ["ProfileResult", "profile_fit", "glmm_profile_intervals"]

MAX_STEPS = 40


@dataclass(frozen=True)
class ProfileResult:
    """Traces (value, zeta) per parameter, and the intervals at `level`: both in the parameters' order, the
    intervals under lme4's names (which repeat where two terms of one factor share a column, as lme4's do), the
    traces keyed by them with R's make.unique suffix on a repeat (sd_x|g.1)."""

    estimates: pd.Series
    traces: dict
    intervals: pd.DataFrame
    level: float

    def confint(self) -> pd.DataFrame:
        return self.intervals.copy()


def profile_fit(ml_fit, names, fe_names, level=0.95, which=None) -> ProfileResult:
    """Profile an ML `LmmFit`. `names` name the (sd, cor, sigma) entries; `fe_names` the fixed effects."""
    system = ml_fit.system
    relcov = system.relcov
    z = special.ndtri(0.5 + level / 2)
    dev_min = ml_fit.deviance
    v_hat = sdcor_of(relcov, ml_fit.theta, np.sqrt(ml_fit.sigma2))
    lower, upper = sdcor_bounds(relcov)
    lower[-1] = 1e-6 * v_hat[-1]  # sigma > 0: the deviance is infinite at sigma = 0
    step_scale = np.where(v_hat != 0, 0.2 * np.abs(v_hat), 0.05)
    all_names = list(names) + list(fe_names)
    wanted = all_names if which is None else list(which)
    # by position: lme4's names repeat where two terms of one factor share a column ((0 + x | g) + (1 + x | g))
    rows, traces = {}, {}
    keys = _unique_keys(all_names)

    def full_deviance(v):
        mapped = theta_of_sdcor(relcov, v)
        return np.inf if mapped is None else system.deviance_at_sigma2(mapped[0], mapped[1], reml=False)

    for k, name in enumerate(names):
        if name not in wanted:
            continue
        free = np.ones(v_hat.size, bool)
        free[k] = False

        def dev_at(x, start, k=k, free=free):
            s = start.copy()
            s[k] = x
            opt = minimize_deviance(full_deviance, s, lower, free=free, upper=upper, initial_step=step_scale)
            return opt.deviance, opt.theta

        step = 0.25 * abs(v_hat[k]) if names[k].startswith(("sd", "sigma")) and v_hat[k] > 0 else 0.1
        rows[k], traces[keys[k]] = _follow(dev_at, v_hat, k, v_hat[k], step, lower[k], upper[k], dev_min, z, name)

    se = np.sqrt(np.diag(ml_fit.cov_beta))
    for j, name in enumerate(fe_names):
        if name not in wanted:
            continue
        latest = {"system": _system_without(system, j)}  # each b's system takes over the last's factor
        beta_hat = ml_fit.beta[j]

        def dev_at(b, start, j=j, latest=latest):
            latest["system"] = latest["system"].with_response(_offset_cross(system, j, b))
            opt = optimize_system(
                latest["system"], reml=False, start_theta=start[:-1], initial_step=warm_step(start[:-1]), polish=False
            )
            return opt.deviance, np.append(opt.theta, 0.0)

        start = np.append(ml_fit.theta, 0.0)
        position = len(names) + j
        rows[position], traces[keys[position]] = _follow(
            dev_at, start, None, beta_hat, se[j], -np.inf, np.inf, dev_min, z, name
        )

    est = pd.Series(np.concatenate([v_hat, ml_fit.beta]), index=all_names)
    return ProfileResult(est, traces, _intervals(rows, all_names), level)


def _unique_keys(names: list[str]) -> list[str]:
    """The names, a repeated one suffixed as R's make.unique does (sd_x|g, sd_x|g.1): the traces' keys."""
    seen: dict = {}
    out = []
    for name in names:
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(name if n == 0 else f"{name}.{n}")
    return out


def _intervals(rows: dict, names: list[str]) -> pd.DataFrame:
    """The profiled parameters' (lower, upper), by position, in order, under lme4's names (repeats kept)."""
    order = sorted(rows)
    return pd.DataFrame([rows[i] for i in order], index=[names[i] for i in order], columns=["lower", "upper"])


def glmm_profile_intervals(fit, names, level: float = 0.95) -> pd.DataFrame:
    """Profile-likelihood intervals of a glmer fit (a GlmmFit), as lme4's confint(method = "profile"): every
    parameter on the (sd, cor) scale of the random effects (the scale is 1) and the fixed effects, each held at a
    value while the others are re-optimised (Newton steps, fit/many.py), followed by _follow as the linear
    model's profile is. `names` name the sd/cor entries, then the fixed effects."""
    system, m = fit.system, fit.theta.shape[0]
    relcov = system.relcov
    z = special.ndtri(0.5 + level / 2)
    lower, upper = (bound[:-1] for bound in sdcor_bounds(relcov))  # without sigma's
    p = fit.beta.shape[0]
    x_hat = np.concatenate([sdcor_of(relcov, fit.theta, 1.0)[:-1], fit.beta])
    lo, hi = np.concatenate([lower, np.full(p, -np.inf)]), np.concatenate([upper, np.full(p, np.inf)])
    # the inner fits hold the sd's at or above 0; a correlation past +-1 is no covariance: an infinite objective
    inner_lower = np.where(lo == 0.0, 0.0, -np.inf)

    def objective(x):
        mapped = theta_of_sdcor(relcov, np.append(x[:m], 1.0))
        return np.inf if mapped is None else system.objective(mapped[0], x[m:], fit.nAGQ)

    se = _glmm_standard_errors(fit, relcov)
    rows: dict = {}
    for index, name in enumerate(names):
        others = np.flatnonzero(np.arange(x_hat.size) != index)

        def dev_at(v, start, index=index, others=others):
            def rest_objective(rest):
                x = start.copy()
                x[index], x[others] = v, rest
                return objective(x)

            found = minimize_one(rest_objective, start[others], inner_lower[others])
            x = start.copy()
            x[index], x[others] = v, found.working[0]
            return float(found.deviance[0]), x

        step = se[index] if np.isfinite(se[index]) and se[index] > 0 else 0.1
        rows[index], _ = _follow(dev_at, x_hat, None, x_hat[index], step, lo[index], hi[index], fit.objective, z, name)
    return _intervals(rows, list(names))


def _glmm_standard_errors(fit, relcov) -> np.ndarray:
    """Standard errors of (sd/cor, beta) by the delta method from the fit's covariance of (theta, beta): a scale
    for the profile's first steps."""
    m = fit.theta.shape[0]
    cov = fit.params_covariance()
    v = lambda theta: sdcor_of(relcov, theta, 1.0)[:-1]  # noqa: E731
    h = 1e-6 * np.maximum(np.abs(fit.theta), 1e-3)
    J = np.column_stack([(v(fit.theta + h[j] * np.eye(m)[j]) - v(fit.theta)) / h[j] for j in range(m)])
    cov_v = J @ cov[:m, :m] @ J.T
    return np.sqrt(np.abs(np.concatenate([np.diag(cov_v), np.diag(cov)[m:]])))


def _follow(dev_at, start, k, x_hat, step, lo, hi, dev_min, z, name):
    """Walk out from x_hat in both directions until |zeta| >= z; root-find the crossing.

    `step` is a scale guess; a first small trial step measures the local slope of zeta, so that the walk takes
    about six steps to reach |zeta| = z (enough points for a smooth profile plot).
    """
    trace = [(x_hat, 0.0)]

    from scipy import optimize  # (imported on first use: ~0.13 s of the package's import)

    def zeta_at(x, warm, record=True):
        dev, opt = dev_at(x, warm)
        zeta = np.sign(x - x_hat) * np.sqrt(max(dev - dev_min, 0.0))
        if record:
            trace.append((x, zeta))
        return zeta, opt

    ends = []
    for direction in (-1.0, 1.0):
        end = lo if direction < 0 else hi
        trial = x_hat + direction * 0.05 * max(step, 1e-8)
        if not lo <= trial <= hi:
            ends.append(end)
            continue
        z_trial, _ = zeta_at(trial, start)
        slope = abs(z_trial) / abs(trial - x_hat)
        s = (z / 6) / slope if slope > 0 else step
        x, cur_start = x_hat, start.copy()
        for _ in range(MAX_STEPS):
            x_new = x + direction * s
            at_bound = (direction < 0 and x_new <= lo) or (direction > 0 and x_new >= hi)
            if at_bound:
                x_new = lo if direction < 0 else hi
            zeta, opt = zeta_at(x_new, cur_start)
            if abs(zeta) >= z:
                try:
                    end = optimize.brentq(
                        lambda t: zeta_at(t, opt, record=False)[0] - direction * z,
                        x,
                        x_new,
                        xtol=1e-6 * max(abs(x_hat), 1e-3),
                        rtol=1e-8,
                    )
                    trace.append((end, direction * z))
                except ValueError:  # no sign change: refitted from `opt`, zeta at x is past z too
                    # lme4: "non-monotonic profile", and NA for that bound
                    warnings.warn(
                        f"non-monotonic profile for {name!r}: the {'lower' if direction < 0 else 'upper'} bound "
                        "is not defined (NaN), as in lme4. The fit may be singular or the model overparameterized.",
                        SparsemixWarning,
                        stacklevel=4,
                    )
                    end = np.nan
                break
            if at_bound:
                end = x_new
                break
            x, cur_start, s = x_new, opt, s * 1.25
        ends.append(end)
    frame = pd.DataFrame(sorted(trace), columns=["value", "zeta"]).drop_duplicates("value")
    return ends, frame


def _system_without(system: PenalizedSystem, j: int) -> PenalizedSystem:
    return PenalizedSystem(_offset_cross(system, j, system.cross.beta_ols[j]), system.relcov)


def _offset_cross(system: PenalizedSystem, j: int, b: float):
    """Cross-products of the model with beta_j held at b: column j leaves X, x_j b moves into an offset."""
    c = system.cross
    keep = np.array([i for i in range(c.p) if i != j], dtype=np.int64)
    d = c.beta_ols[j] - b  # y' = r + x_j (beta_ols_j - b), r the stored OLS residual
    return replace(
        c,
        ZtX=c.ZtX[:, keep],
        Zty=c.Zty + c.ZtX[:, j] * d,
        XtX=c.XtX[np.ix_(keep, keep)],
        Xty=c.Xty[keep] + c.XtX[keep, j] * d,
        yty=c.yty + 2 * d * c.Xty[j] + d * d * c.XtX[j, j],
        p=c.p - 1,
        beta_ols=c.beta_ols[keep],
    )
