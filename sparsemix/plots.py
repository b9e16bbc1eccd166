"""Pictures of a fitted lmer model: a caterpillar plot of the random effects and the profile zeta plot.

matplotlib is an optional extra (`pip install 'sparsemix[plot]'`); without it these raise MissingExtraError.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from .errors import require_extra

__all__ = ["caterpillar", "profile_plot"]


def _pyplot():
    return require_extra("matplotlib.pyplot", "plot", "plotting")


def caterpillar(results, level: float = 0.95, groups=None):
    """Conditional modes with intervals (mode +/- z * conditional sd), one panel per grouping factor and
    column, levels sorted by their mode. Returns the matplotlib Figure."""
    plt = _pyplot()
    z = special.ndtri(0.5 + level / 2)
    panels = []
    for grp, frame in results.ranef(condvar=True).items():
        if groups is not None and grp not in groups:
            continue
        for col in frame.columns:
            panels.append((grp, col, frame[col], frame.attrs["condsd"][col]))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.2 * len(panels), 0.5 + 0.18 * max(len(p[2]) for p in panels)), squeeze=False
    )
    for ax, (grp, col, mode, sd) in zip(axes[0], panels):
        order = np.argsort(mode.to_numpy())
        y = np.arange(len(order))
        ax.errorbar(mode.to_numpy()[order], y, xerr=z * sd.to_numpy()[order], fmt="o", ms=3, lw=1, color="C0")
        ax.axvline(0, color="0.5", lw=0.8, ls="--")
        ax.set_yticks(y)
        ax.set_yticklabels([str(mode.index[i]) for i in order], fontsize=7)
        ax.set_title(f"{grp}: {col}", fontsize=9)
    fig.tight_layout()
    return fig


def profile_plot(profile, params=None):
    """zeta against each parameter's value (lme4's xyplot of a profile): straight lines mean a quadratic
    log-likelihood, where Wald intervals would be accurate. Returns the matplotlib Figure."""
    plt = _pyplot()
    # the traces and the intervals' rows in the same order (a repeated name's trace key has R's .1 suffix)
    panels = [
        (name, trace, row)
        for (name, trace), row in zip(profile.traces.items(), profile.intervals.itertuples(index=False))
        if params is None or name in params
    ]
    z = special.ndtri(0.5 + profile.level / 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), squeeze=False, sharey=True)
    for ax, (name, trace, (lo, hi)) in zip(axes[0], panels):
        ax.plot(trace["value"], trace["zeta"], "-o", ms=2.5, lw=1)
        for level in (-z, z):
            ax.axhline(level, color="0.6", lw=0.8, ls=":")
        ax.axvline(lo, color="C3", lw=0.8)
        ax.axvline(hi, color="C3", lw=0.8)
        ax.set_xlabel(name, fontsize=8)
    axes[0][0].set_ylabel("zeta")
    fig.tight_layout()
    return fig
