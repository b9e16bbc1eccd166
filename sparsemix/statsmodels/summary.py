"""statsmodels' "Mixed Linear Model Regression Results" table, laid out the way statsmodels lays it out.

`tables` holds the two tables as DataFrames of strings, as statsmodels' Summary does (scripts read
`summary().tables[1]`); `params` holds the parameter table's numbers.

Two tables share one width W: the info block (four columns, left-aligned) and the parameter table (a stub
column of names, centred headers, right-aligned numbers). The narrower one is widened by padding its column
separators; statsmodels counts one separator fewer than the parameter table has, so when that table is
padded it comes out `pad` characters wider than the '=' rules. We reproduce that so output compares equal.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import special

from .. import checks

__all__ = ["MixedLMSummary"]

TITLE = "Mixed Linear Model Regression Results"


class MixedLMSummary:
    def __init__(self, results, yname=None, xname_fe=None, xname_re=None, title=None, alpha=0.05):
        self.info = _info(results, yname)
        self.params = _param_table(results, xname_fe, xname_re, checks.check_alpha(alpha))
        self.title = TITLE if title is None else title

    @property
    def tables(self) -> list[pd.DataFrame]:
        """[the info block (6 rows of key, value, key, value), the parameter table], as statsmodels' Summary:
        strings, numbers to three decimals, blank where a value is not finite."""
        info = pd.DataFrame([[c for pair in row for c in pair] for row in _halves(self.info)])
        params = self.params.apply(lambda column: column.map(_fmt))
        return [info, params]

    def as_html(self) -> str:
        return "\n".join(table.to_html(header=i == 1, index=i == 1) for i, table in enumerate(self.tables))

    def as_text(self) -> str:
        info_rows = [[c for pair in row for c in pair] for row in _halves(self.info)]
        stub = [str(i) for i in self.params.index]
        header = [str(c) for c in self.params.columns]
        body = [[_fmt(v) for v in row] for row in self.params.itertuples(index=False)]

        w_info = _width(info_rows, None, 1)
        w_par = _width([header] + body, stub + [""], 1)
        W = max(w_info, w_par)

        pad, pad_index = _padding(W, w_info, 3)
        info_lines = _render_left(info_rows, 1 + pad, pad_index)
        pad, pad_index = _padding(W, w_par, len(header) - 1)
        par_lines, par_width = _render_params(header, stub, body, 1 + pad, pad_index)

        title = self.title
        if len(title) < W:
            title = " " * int(W / 2 - len(title) / 2) + title
        lines = [title, "=" * W, *info_lines, "-" * par_width, par_lines[0], "-" * par_width, *par_lines[1:], "=" * W]
        return "\n".join(lines) + "\n"

    def __str__(self):
        return self.as_text()

    def __repr__(self):
        return self.as_text()

    def _repr_html_(self):
        return "<pre>" + self.as_text() + "</pre>"


def _info(results, yname) -> list[tuple[str, str]]:
    model = results.model
    sizes = model._group_sizes
    return [
        ("Model:", "MixedLM"),
        ("No. Observations:", str(results.nobs)),
        ("No. Groups:", str(model.n_groups)),
        ("Min. group size:", f"{sizes.min():.0f}"),
        ("Max. group size:", f"{sizes.max():.0f}"),
        ("Mean group size:", f"{sizes.mean():.1f}"),
        ("Dependent Variable:", str(yname or model.endog_names)),
        ("Method:", results.method),
        ("Scale:", f"{results.scale:.4f}"),
        ("Log-Likelihood:", f"{results.llf:.4f}"),
        ("Converged:", "Yes" if results.converged else "No"),
    ]


def _param_table(results, xname_fe, xname_re, alpha) -> pd.DataFrame:
    model = results.model
    k_fe = results.k_fe
    names_fe = list(model.exog_names) if xname_fe is None else list(xname_fe)
    names_re = list(model.param_names[k_fe:]) if xname_re is None else list(xname_re)
    if len(names_fe) != k_fe:
        raise ValueError(f"xname_fe should be a list of length {k_fe}")
    if len(names_re) != len(model.param_names) - k_fe:
        raise ValueError(f"xname_re should be a list of length {len(model.param_names) - k_fe}")
    q = special.ndtri(1 - alpha / 2)
    fe = np.asarray(results.fe_params, dtype=float)
    se = np.asarray(results.bse_fe, dtype=float)
    z = fe / se
    rows = np.full((len(names_fe) + len(names_re), 6), np.nan)
    rows[:k_fe] = np.column_stack([fe, se, z, 2 * special.ndtr(-np.abs(z)), fe - q * se, fe + q * se])
    var_values = np.concatenate([results._cov_re[np.tril_indices(results.k_re)], results.vcomp])
    rows[k_fe:, 0] = var_values
    rows[k_fe:, 1] = np.asarray(results.bse_re, dtype=float)
    columns = ["Coef.", "Std.Err.", "z", "P>|z|", f"[{alpha / 2:g}", f"{1 - alpha / 2:g}]"]
    return pd.DataFrame(rows, index=names_fe + names_re, columns=columns)


def _fmt(v) -> str:
    return f"{v:.3f}" if v is not None and np.isfinite(v) else ""


def _halves(info):
    cells = list(info) + [("", "")] * (12 - len(info))
    return [(cells[i], cells[i + 6]) for i in range(6)]


def _col_widths(rows):
    return [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]


def _width(rows, stub, sep) -> int:
    widths = _col_widths(rows)
    total = sum(widths) + sep * (len(widths) - 1)
    if stub is not None:
        total += max(len(s) for s in stub) + sep
    return total


def _padding(W, w, nsep) -> tuple[int, int]:
    nsep = max(nsep, 1)
    pad = int((W - w) / nsep)
    return pad, W - (w + nsep * pad)


def _render_left(rows, sep, pad_first):
    rows = [[r[0] + " " * pad_first] + list(r[1:]) for r in rows]
    widths = _col_widths(rows)
    return [(" " * sep).join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]


def _render_params(header, stub, body, sep, pad_stub):
    stub_w = max(len(s) for s in stub + [""]) + pad_stub
    widths = _col_widths([header] + body)
    gap = " " * sep
    lines = [gap.join(["".ljust(stub_w)] + [h.center(w) for h, w in zip(header, widths)])]
    for name, row in zip(stub, body):
        lines.append(gap.join([name.ljust(stub_w)] + [c.rjust(w) for c, w in zip(row, widths)]))
    return lines, len(lines[0])
