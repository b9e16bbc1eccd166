"""predict's new-data path, shared by the front doors (lmer's results, MixedLM's results, the Dask path).

What it guarantees, for any `newdata`: a pandas DataFrame or an InputError saying so; every column the model
uses present, or an InputError naming the missing ones; rows with a missing value in a column the model uses
predicted as NaN (lme4's na.action = na.pass), the other rows predicted as if those were not there; a level of a
fixed-effect factor the fit did not see is an InputError naming it (lme4: "factor f has new levels"); an offset
of the wrong length, or a missing offset column, is an InputError.

Levels of a grouping factor match by value, the way lme4 matches them through their labels (as.character):
a level is its text, and a number is the same level however it is written. So 308, 308.0, numpy's int64 308
and the text "308" (or "308.0", "0308") are one level; 0.5 and "0.5" are one level; text that is not a number
matches only the same text ("a" is not "A"). The fitted labels match exactly first, and only the rows left over
are matched by value. Rows whose level is still new get the population-level prediction (no random effects of
that term) when allow_new_levels, with a NewLevelWarning saying how many rows; otherwise an InputError.
"""

from __future__ import annotations

import ast
import re
import warnings

import numpy as np
import pandas as pd
import patsy

from .. import checks
from ..errors import InputError, NewLevelWarning
from .design_rules import complete_rows
from .mixedlm import level_name
from .safety import provides_code, quoted_name

__all__ = [
    "require_frame",
    "model_columns",
    "require_model_columns",
    "model_frame",
    "complete_rows",
    "fixed_matrix",
    "offset_values",
    "row_labels",
    "LevelMatcher",
    "predict_rows",
]


def require_frame(newdata, dict_of_columns: bool = False) -> pd.DataFrame:
    """newdata as a DataFrame; `dict_of_columns`: a dict of equal-length columns is read as one (statsmodels)."""
    if isinstance(newdata, pd.DataFrame):
        return newdata
    if dict_of_columns and isinstance(newdata, dict):
        try:
            return pd.DataFrame(newdata)
        except (ValueError, TypeError) as exc:
            raise InputError(f"a dict as newdata must map column names to columns of one length: {exc}.") from None
    kind = type(newdata).__name__
    hint = " (a dict of columns: pass pandas.DataFrame(newdata))" if isinstance(newdata, dict) else ""
    raise InputError(f"newdata must be a pandas DataFrame with the model's columns; got a {kind}{hint}.")


# -- which columns the model reads ------------------------------------------------------------------------


def model_columns(design_info) -> list[str]:
    """The names a patsy design reads from the data: names in its factors' code that its environment does not
    provide (the functions), and the columns named with Q("...")."""
    names = []
    for factor, fi in design_info.factor_infos.items():
        env = fi.state.get("eval_env") if isinstance(fi.state, dict) else None
        # only functions come from the environment: a caller's variable named like a missing column must not
        # stand in for it (formulas take values from the data)
        namespace = env.namespace if env is not None else {}
        for node in ast.walk(ast.parse(factor.code.strip(), mode="eval")):
            if isinstance(node, ast.Name) and not (node.id in namespace and provides_code(node.id, namespace[node.id])):
                name = node.id
            elif quoted_name(node) is not None:
                name = quoted_name(node)
            else:
                continue
            if name not in names:
                names.append(name)
    return names


def require_model_columns(frame: pd.DataFrame, needs: list[tuple[str, list]]) -> None:
    """`needs`: (role, column names). One InputError naming every missing column and what it is for."""
    missing = {}
    for role, cols in needs:
        for c in cols:
            if c not in frame.columns and role not in missing.setdefault(c, []):
                missing[c].append(role)
    if missing:
        listed = ", ".join(f"{c!r} ({'; '.join(roles)})" for c, roles in missing.items())
        raise InputError(
            f"newdata has no column {listed}; add the column(s) the model was fitted with. "
            f"newdata's columns: {', '.join(map(str, frame.columns[:20]))}."
        )
    used = {c for _, cols in needs for c in cols}
    twice = sorted({str(c) for c in frame.columns[frame.columns.duplicated()] if c in used})
    if twice:
        raise InputError(
            f"newdata has more than one column named {', '.join(map(repr, twice))}, which the model reads; "
            "keep one of each (newdata.loc[:, ~newdata.columns.duplicated()])."
        )


def model_frame(frame: pd.DataFrame, needs: list[tuple[str, list]]) -> pd.DataFrame:
    """newdata with every column the model uses (require_model_columns), read as the fit read its data
    (checks.readable_columns: nullable booleans, periods, dates with a time zone)."""
    require_model_columns(frame, needs)
    return checks.readable_columns(frame, [c for _, cols in needs for c in cols])


def predict_rows(frame: pd.DataFrame, keep: np.ndarray, compute) -> pd.Series:
    """compute(rows of `frame` with `keep`) -> values; NaN for the other rows, in newdata's order and index."""
    out = np.full(len(frame), np.nan)
    if keep.any():
        out[keep] = compute(frame.loc[keep] if not keep.all() else frame)
    return pd.Series(out, index=frame.index)


# -- fixed effects ------------------------------------------------------------------------------------------


def fixed_matrix(frame: pd.DataFrame, design_info, keep=None) -> np.ndarray:
    """The fixed-effect columns of complete rows of newdata, through the fit's patsy design (its levels,
    contrasts and transforms). `keep`: the positions of the fitted columns in the fit's order (R's, where patsy's
    differs), without the dropped ones."""
    _check_fixed_levels(frame, design_info)
    _check_numeric_columns(frame, design_info)
    try:
        # No rows dropped here: a transform's NaN (log of a negative) is that row's NaN prediction.
        (X,) = patsy.build_design_matrices([design_info], frame, NA_action=patsy.NAAction(NA_types=[]))
    except patsy.PatsyError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(
            f"cannot build the fixed-effect columns of newdata: {first}. Give newdata the columns "
            "and types the model was fitted with."
        ) from None
    X = np.asarray(X, dtype=float)
    return X if keep is None or list(keep) == list(range(X.shape[1])) else X[:, list(keep)]


def _check_numeric_columns(frame: pd.DataFrame, design_info) -> None:
    """A column the fit read as numbers (a covariate) holds numbers in newdata too: text, dates, durations or
    complex numbers there reached patsy's and numpy's errors."""
    for factor, fi in design_info.factor_infos.items():
        if fi.type != "numerical":
            continue
        for name in _names_in(factor.code):
            if name in frame.columns and isinstance(frame[name], pd.Series):
                dtype = frame[name].dtype
                # (booleans are no numbers to patsy: its own error message then failed on a frame's dtype)
                numeric = (
                    pd.api.types.is_numeric_dtype(dtype)
                    and not pd.api.types.is_complex_dtype(dtype)
                    and not pd.api.types.is_bool_dtype(dtype)
                )
                if not numeric or dtype.kind in "mM":
                    raise InputError(
                        f"newdata's column {name!r} holds {dtype} values, where the fit read numbers; give it "
                        f"numbers as in the fitted data (e.g. newdata[{name!r}] = "
                        f"pd.to_numeric(newdata[{name!r}]))."
                    )


def _names_in(code: str) -> list[str]:
    """The plain and Q("...")-quoted names an expression reads."""
    names = []
    for node in ast.walk(ast.parse(code.strip(), mode="eval")):
        name = node.id if isinstance(node, ast.Name) else quoted_name(node)
        if name is not None:
            names.append(name)
    return names


def _check_fixed_levels(frame: pd.DataFrame, design_info) -> None:
    """A level of a fixed-effect factor the fit did not see has no coefficient: an error naming it."""
    for factor, fi in design_info.factor_infos.items():
        if fi.type != "categorical":
            continue
        column = _factor_column(factor.code)
        if column is None or column not in frame.columns:
            continue  # an expression: patsy's own check (translated in fixed_matrix) applies
        values = frame[column]
        seen = set(fi.categories)
        uniques = pd.unique(values.astype(object) if isinstance(values.dtype, pd.CategoricalDtype) else values)
        new = [v for v in uniques if v not in seen]
        if new:
            rows = int(values.astype(object).isin(new).sum())  # (objects: numbers against boolean levels)
            shown = ", ".join(repr(level_name(v)) for v in new[:5]) + (", ..." if len(new) > 5 else "")
            fitted = ", ".join(repr(level_name(v)) for v in fi.categories[:10])
            more = ", ..." if len(fi.categories) > 10 else ""
            raise InputError(
                f"newdata's column {column!r} has level(s) the fit did not see: {shown} ({rows} "
                f"row(s)); a fixed-effect factor has no coefficient for a new level. Its fitted "
                f"levels: {fitted}{more}. Drop those rows or map them to a fitted level."
            )


def _factor_column(code: str):
    """The column of a factor written `f`, `C(f, ...)` or `Q("f")` (None for other expressions)."""
    try:
        node = ast.parse(code.strip(), mode="eval").body
    except SyntaxError:
        return None
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
        if quoted_name(node) is not None:
            return quoted_name(node)
        if node.func.id != "C":
            return None
        node = node.args[0]
    return node.id if isinstance(node, ast.Name) else None


# -- offset ------------------------------------------------------------------------------------------------


def offset_values(frame: pd.DataFrame, offset) -> np.ndarray | None:
    """predict's offset: a column of newdata, or one value per row of newdata (NaN rows predict NaN)."""
    if offset is None:
        return None
    from ..checks import as_numeric_vector

    if isinstance(offset, str):
        if offset not in frame.columns:
            raise InputError(
                f"offset={offset!r} is not a column of newdata; add the column or pass the offset "
                f"values (one per row). newdata's columns: {', '.join(map(str, frame.columns[:20]))}."
            )
        values = as_numeric_vector(frame[offset].to_numpy(), f"offset column {offset!r}")
    else:
        values = as_numeric_vector(offset, "offset")
    if values.shape[0] != len(frame):
        raise InputError(
            f"offset has {values.shape[0]} value(s) but newdata has {len(frame)} row(s); pass one "
            "offset per row of newdata (or the name of its offset column)."
        )
    return values


# -- levels of grouping factors -------------------------------------------------------------------------


def row_labels(frame: pd.DataFrame, group) -> tuple[np.ndarray, np.ndarray]:
    """(codes, labels): each row's level of `group` (columns joined with ':' as R's a:b) as the fit writes
    levels (formula.mixedlm.level_name), by distinct value. No sorting, so a column mixing 308 and "308" works."""
    codes, labels = None, None
    for name in group:
        c, uniques = pd.factorize(frame[name], sort=False)
        text = np.array([level_name(u) for u in uniques], dtype=object)
        if codes is None:
            codes, labels = c.astype(np.int64), text
        else:  # pairwise: the combined key stays below rows x rows
            combined, first = pd.factorize(codes * len(text) + c, sort=False)
            labels = np.array([f"{labels[k // len(text)]}:{text[k % len(text)]}" for k in first], dtype=object)
            codes = combined.astype(np.int64)
    return codes, labels


_INTEGER = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_MAYBE_NONCANONICAL = r"[.eE+]|(?:^|:)-?0\d|(?:^|:)-0(?::|$)"


def value_key(label: str) -> str:
    """The level a label stands for: each ':'-separated part that is a number written as its value ("308.0",
    "0308" and "308" give "308"; "0.50" gives "0.5"), other text as it is."""
    return ":".join(_part_key(p) for p in str(label).split(":"))


def _part_key(part: str) -> str:
    if _INTEGER.fullmatch(part):
        return str(int(part))
    if _NUMBER.fullmatch(part):
        v = float(part)
        return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)
    return part


class LevelMatcher:
    """The fitted levels of one grouping factor, matched against new labels (exactly, then by value)."""

    def __init__(self, levels, group_name: str):
        self.group_name = group_name
        self._index = pd.Index(list(levels), dtype=object)
        self._by_value = None  # value key -> position; built on the first label that needs it

    def __getstate__(self):
        return {"group_name": self.group_name, "_index": self._index, "_by_value": None}

    def _value_index(self) -> dict:
        if self._by_value is None:
            labels = pd.Series(self._index, dtype=object)
            maybe = np.flatnonzero(labels.str.contains(_MAYBE_NONCANONICAL, regex=True).to_numpy(bool))
            by_value = {}
            for i in maybe:
                key = value_key(labels.iat[i])
                if key != labels.iat[i]:
                    by_value.setdefault(key, []).append(int(i))
            self._by_value = by_value
        return self._by_value

    def positions(self, labels: np.ndarray) -> np.ndarray:
        """Position of each label among the fitted levels, -1 where it is a level the fit did not see."""
        pos = self._index.get_indexer(pd.Index(labels, dtype=object)).astype(np.int64)
        missing = np.flatnonzero(pos < 0)
        if missing.size:
            by_value = self._value_index()
            for j in missing:
                key = value_key(labels[j])
                found = list(by_value.get(key, []))
                exact = self._index.get_indexer([key])[0]
                if exact >= 0:
                    found.append(int(exact))
                if len(found) > 1:
                    names = ", ".join(repr(self._index[i]) for i in found)
                    raise InputError(
                        f"newdata's level {labels[j]!r} of {self.group_name!r} matches the fitted "
                        f"levels {names} by value; write it exactly as one of them."
                    )
                if found:
                    pos[j] = found[0]
        return pos


def report_new_levels(n_new: int, n_rows: int, group_name: str, examples, allow_new_levels: bool) -> None:
    """New levels: the population-level prediction with a warning that says how many rows, or an error."""
    if n_new == 0:
        return
    shown = ", ".join(map(repr, list(examples)[:3])) + (", ..." if len(examples) > 3 else "")
    if not allow_new_levels:
        raise InputError(
            f"newdata has {n_new} of {n_rows} row(s) with levels of {group_name!r} not in the fitted "
            f"data ({shown}); pass allow_new_levels=True to predict them at the population level."
        )
    warnings.warn(
        f"{n_new} of {n_rows} row(s) of newdata have levels of {group_name!r} not in the fitted data "
        f"({shown}): they are predicted without the random effects of {group_name!r} (the population level). "
        "If those levels were fitted, check that the column holds the same values (a level matches by "
        "value: 308, 308.0 and '308' are one level); allow_new_levels=False makes this an error.",
        NewLevelWarning,
        stacklevel=6,
    )  # the caller of predict


# -- lmer's random effects ------------------------------------------------------------------------------


def lmer_columns(design, include_random: bool) -> list[tuple[str, list]]:
    """(role, columns) of everything an lmer design reads from newdata (the response excluded)."""
    needs = [("fixed effects", model_columns(design.fixed_info))]
    if include_random:
        for info in design.term_info:
            cols = list(info.spec.group) + ([info.indicator] if info.indicator is not None else [])
            if info.design_info is not None:
                cols += model_columns(info.design_info)
            needs.append((f"random-effects term {info.spec.source}", cols))
    return needs


def lmer_random_matrix(design, frame: pd.DataFrame, allow_new_levels: bool, matchers: dict):
    """Z for complete rows of newdata in the fit's column layout; rows of a new level get zero (population)
    effects for that term. `matchers`: a cache of LevelMatcher per term, kept by the results."""
    import scipy.sparse as sp

    from ..core.terms import RandomTerm

    blocks = []
    for t, (term, info) in enumerate(zip(design.terms, design.term_info)):
        if t not in matchers:
            matchers[t] = LevelMatcher(info.levels, info.grp)
        codes, labels = row_labels(frame, info.spec.group)
        level_pos = matchers[t].positions(labels)
        mapped = level_pos[codes]
        new = mapped < 0
        report_new_levels(int(new.sum()), len(frame), info.grp, labels[np.unique(codes[new])], allow_new_levels)
        if info.design_info is None:  # a sparse indicator term: (0 + f | g)
            prefix = len(info.indicator)
            if ("indicator", t) not in matchers:
                matchers[("indicator", t)] = LevelMatcher([c[prefix:] for c in info.columns], info.indicator)
            c, lv = row_labels(frame, [info.indicator])
            cols = matchers[("indicator", t)].positions(lv)[c]
            values = np.zeros((len(frame), term.k))
            ok = cols >= 0
            values[np.flatnonzero(ok), cols[ok]] = 1.0
        else:
            values = np.array(fixed_matrix(frame, info.design_info))
        values[new] = 0.0
        blocks.append(
            RandomTerm.from_codes(
                term.name,
                np.where(new, 0, mapped),
                values,
                term.n_levels,
                term.template,
                term.level_labels,
                term.column_names,
            ).Z
        )
    return sp.hstack(blocks, format="csc")
