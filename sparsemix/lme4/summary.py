"""lme4's summary layout for `LmerResults`, with lmerTest's df and p-value columns."""

from __future__ import annotations

import numpy as np


class _Summary:
    """A results object's summary: its text on str() and repr()."""

    def __init__(self, results):
        self.results = results

    def as_text(self) -> str:
        raise NotImplementedError

    def __str__(self):
        return self.as_text()

    __repr__ = __str__


class LmerSummary(_Summary):
    def as_text(self) -> str:
        r = self.results
        d = r.design
        lines = [
            f"Linear mixed model fit by {'REML' if r.reml else 'maximum likelihood'}"
            + (" (t-tests use Satterthwaite's method)" if r.design.fe_names else ""),
            f"Formula: {d.formula}",
            "",
        ]
        if r.reml:
            lines.append(f"REML criterion at convergence: {_r_round1(r.deviance)}")
        else:
            lines += _statistics_lines(r)
        lines += _residual_lines(r._scaled_residual_quantiles())
        lines += _random_section(r, _random_table(r, r.fit_result.covariances(), (r.scale, r.sigma)))
        if d.fe_names:
            lines += ["", "Fixed effects:"]
            fe = r.fixed_effects()
            name_w = max(len(n) for n in fe.index)
            lines.append(
                " " * name_w + f" {'Estimate':>10} {'Std. Error':>10} {'df':>8} {'t value':>8} {'Pr(>|t|)':>9}"
            )
            for name, row in fe.iterrows():
                lines.append(
                    f"{name:<{name_w}} {row.estimate:10.3f} {row.std_error:10.3f} {row.df:8.2f} "
                    f"{row.t:8.3f} {_p(row.p):>9}"
                )
        if d.dropped_columns:
            lines.append(
                f"fixed-effect model matrix is rank deficient so dropping {len(d.dropped_columns)} "
                f"column(s): {', '.join(d.dropped_columns)}"
            )
        return "\n".join(lines + _closing_lines(r)) + "\n"


def _statistics_lines(r) -> list[str]:
    return [
        f"{'AIC':>9} {'BIC':>9} {'logLik':>9} {'deviance':>9} {'df.resid':>9}",
        f"{r.aic:9.1f} {r.bic:9.1f} {r.llf:9.1f} {-2 * r.llf:9.1f} {r.nobs - r.npar:9d}",
    ]


def _residual_lines(quantiles) -> list[str]:
    return [
        "",
        "Scaled residuals: ",
        "    ".join(f"{h:>7}" for h in ("Min", "1Q", "Median", "3Q", "Max")),
        "    ".join(f"{v:7.4f}" for v in quantiles),
        "",
    ]


def _random_section(r, table: list[str]) -> list[str]:
    """ "Random effects:", its table, the numbers of observations and levels, and the rows dropped."""
    d = r.design
    groups = "; ".join(f"{g}, {n}" for g, n in r.ngroups.items())
    lines = ["Random effects:", *table, f"Number of obs: {r.nobs}, groups:  {groups}"]
    if d.n_dropped:
        lines.append(f"({d.n_dropped} observation(s) deleted due to missingness)")
    return lines


def _closing_lines(r) -> list[str]:
    return (["boundary (singular) fit: see help('isSingular')"] if r.is_singular else []) + (
        ["the optimizer did not converge"] if not r.converged else []
    )


def _random_table(r, covariances, residual) -> list[str]:
    """lme4's random-effects table from each term's covariance; `residual`: (variance, sd) for the Residual row,
    or None (a GLMM's scale is 1)."""
    rows = []
    for info, psi in zip(r.design.term_info, covariances):
        sd = np.sqrt(np.diag(psi))
        for i, col in enumerate(info.columns):
            corr = [psi[i, j] / (sd[i] * sd[j]) if sd[i] > 0 and sd[j] > 0 else np.nan for j in range(i)]
            rows.append((info.grp if i == 0 else "", col, psi[i, i], sd[i], corr))
    if residual is not None:
        rows.append(("Residual", "", residual[0], residual[1], []))
    gw = max(len("Groups"), *(len(x[0]) for x in rows))
    nw = max(len("Name"), *(len(x[1]) for x in rows))
    corr = "Corr" if any(x[4] for x in rows) else ""
    out = [f" {'Groups':<{gw}} {'Name':<{nw}} {'Variance':>10} {'Std.Dev.':>9} {corr}".rstrip()]
    for g, n, v, s, c in rows:
        corr = " ".join(f"{x:5.2f}" for x in c)
        out.append(f" {g:<{gw}} {n:<{nw}} {v:10.4g} {s:9.4g} {corr}".rstrip())
    return out


def _r_round1(x: float) -> str:
    """R's format(round(x, 1)): one decimal, without a trailing '.0'."""
    text = f"{round(x, 1):.1f}"
    return text[:-2] if text.endswith(".0") else text


def _p(p) -> str:
    return "<2e-16" if p < 2e-16 else f"{p:.3g}"


class GlmerSummary(_Summary):
    """lme4's summary layout for a glmer fit (GlmerResults)."""

    def as_text(self) -> str:
        r = self.results
        d = r.design
        approximation = (
            "Laplace Approximation" if r.nAGQ == 1 else f"Adaptive Gauss-Hermite Quadrature, nAGQ = {r.nAGQ}"
        )
        lines = [
            f"Generalized linear mixed model fit by maximum likelihood ({approximation}) ['glmerMod']",
            f" Family: {r.family.name}  ( {r.family.link.name} )",
            f"Formula: {d.formula}",
            "",
            *_statistics_lines(r),
            *_residual_lines(np.quantile(r.resid("pearson").to_numpy(), [0, 0.25, 0.5, 0.75, 1])),
        ]
        lines += _random_section(r, _random_table(r, r.covariances(), None))
        if d.fe_names:
            lines += ["", "Fixed effects:"]
            fe = r.fixed_effects()
            name_w = max(len(n) for n in fe.index)
            lines.append(" " * name_w + f" {'Estimate':>10} {'Std. Error':>10} {'z value':>8} {'Pr(>|z|)':>9}")
            for name, row in fe.iterrows():
                lines.append(f"{name:<{name_w}} {row.estimate:10.4f} {row.std_error:10.4f} {row.z:8.3f} {_p(row.p):>9}")
        return "\n".join(lines + _closing_lines(r)) + "\n"
