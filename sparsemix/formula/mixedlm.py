"""statsmodels-style formulas: the fixed part, `re_formula` and `vc_formula`, evaluated into arrays.

patsy does the fixed part and any general random-effects expression. Indicators of a single factor
(`0 + C(g)`, `C(g) - 1`) are recognised and built directly as sparse matrices from the factor's codes:
patsy would materialise them dense (n x levels), which is what makes statsmodels slow on crossed designs.
"""

from __future__ import annotations

import ast
import difflib
import functools
import io
import re
import tokenize
import weakref

import numpy as np
import pandas as pd
import patsy
import scipy.sparse as sp

from ..checks import FACTOR_FUNCTIONS
from ..core.terms import VarianceComponent, indicator_matrix
from ..errors import FormulaError
from .safety import SAFE_FUNCTIONS, check_formula, code_names, numpy_functions_only, safe_environment, term_codes

__all__ = [
    "fixed_design",
    "fixed_arrays",
    "patsy_data",
    "numeric_design",
    "random_design",
    "vc_from_formula",
    "formula_columns",
    "factor_codes",
    "sorted_codes",
    "indicator_names",
    "indicator_variable",
    "FrameColumns",
    "expression_values",
]

_NAME = r"([A-Za-z_]\w*)"
# An explicit factor of one column (C(g), factor(g): FACTOR_FUNCTIONS) without an intercept: its indicators
_FACTOR_OF_NAME = rf"({'|'.join(FACTOR_FUNCTIONS)})\(\s*{_NAME}\s*\)"
_INDICATOR_FORMS = [
    re.compile(rf"^\s*0\s*\+\s*{_FACTOR_OF_NAME}\s*$"),
    re.compile(rf"^\s*{_FACTOR_OF_NAME}\s*-\s*1\s*$"),
    re.compile(rf"^\s*-\s*1\s*\+\s*{_FACTOR_OF_NAME}\s*$"),
]


def sorted_codes(values) -> tuple[np.ndarray, np.ndarray]:
    """(codes, levels): levels sorted, codes[i] the position of values[i] among them (np.unique's result).

    pandas' hash-based factorize, sorting only the distinct values: 0.2 ms where np.unique's full sort took
    1.8 ms on 40,000 rows. A pandas Series goes in as it is: text read by pandas 3 (Arrow-backed `str`) is
    factorized by Arrow, 2 ms a column on InstEval where its object array took 11, and kept for the next call on
    the same Arrow array (_KEPT_CODES). Values must have no missing entries (callers drop or reject them first).
    """
    arrow = _arrow_text(values)
    if arrow is None:
        return _sorted_codes(values)
    kept = _KEPT_CODES.get(id(arrow))
    if kept is not None and kept[0]() is arrow:
        return kept[1].copy(), kept[2].copy()
    codes, levels = _sorted_codes(values)
    if len(_KEPT_CODES) < _KEPT_CODES_MAX:
        key = id(arrow)
        try:
            released = weakref.ref(arrow, lambda _, key=key: _KEPT_CODES.pop(key, None))
        except TypeError:  # (an array Python cannot follow to its end: not kept)
            return codes, levels
        _KEPT_CODES[key] = (released, codes.copy(), levels.copy())
    return codes, levels


# sorted_codes' results by the Arrow array they were read from, while it lives. Arrow's arrays are immutable (pandas
# writes a column by replacing its array, and a copied frame shares it), so the array fixes the codes, as an R
# data frame's factor holds its codes: a model refitted to the same frame, or another model of it, reads each text
# column's codes once (docs/performance-scale.md, twenty-fourth session).
_KEPT_CODES: dict = {}
_KEPT_CODES_MAX = 256


def _arrow_text(values):
    """The Arrow array that holds `values` where they are pandas' Arrow-backed text (pandas 3's `str`), else None."""
    if not (isinstance(values, pd.Series) and values.dtype == "str"):
        return None
    if getattr(values.dtype, "storage", None) != "pyarrow":
        return None
    return values.array.__arrow_array__()


def _sorted_codes(values) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(values, pd.Series) and values.dtype == "str" and len(values) <= PYTHON_FACTORIZE_MAX_ROWS:
        labels = _text_labels(values)  # a few hundred labels: a set and a dict of Python str beat pandas' fixed costs
        levels = sorted(set(labels))
        position = {label: i for i, label in enumerate(levels)}.__getitem__
        return np.fromiter(map(position, labels), dtype=np.int64, count=len(labels)), np.array(levels, dtype=object)
    if isinstance(values, pd.Series) and values.dtype == "str" and getattr(values.dtype, "storage", None) == "pyarrow":
        found = _arrow_sorted_codes(values)
        if found is not None:
            return found
    if isinstance(values, pd.Series) and (len(values) >= ARROW_FACTORIZE_MIN_ROWS or values.dtype != "str"):
        codes, levels = pd.factorize(values, sort=True)
    else:  # numpy's arrays, and short text columns: Arrow's factorize has a fixed cost (sleepstudy: 266 us, 33 here)
        plain = values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values)
        codes, levels = pd.factorize(plain, sort=True)
    return codes.astype(np.int64, copy=False), np.asarray(levels)


def _arrow_sorted_codes(values: pd.Series) -> tuple[np.ndarray, np.ndarray] | None:
    """sorted_codes of text pandas keeps in Arrow, by Arrow's own dictionary encoding, its (few) distinct values
    sorted and the codes renumbered: quicker than pandas' factorize(sort=True) of the same column (docs/performance-
    scale.md, sixteenth session). Arrow sorts text by its UTF-8 bytes, which is Python's order of str. None where a
    value is missing."""
    import pyarrow  # (loaded: pandas holds this column in it)
    import pyarrow.compute as compute

    encoded = compute.dictionary_encode(pyarrow.array(values.array))
    if isinstance(encoded, pyarrow.ChunkedArray):
        encoded = encoded.combine_chunks()
    if encoded.null_count:
        return None
    if len(encoded.dictionary) <= PYTHON_SORT_MAX_LEVELS:
        labels = encoded.dictionary.to_pylist()
        order = np.array(sorted(range(len(labels)), key=labels.__getitem__), dtype=np.int64)
        levels = np.empty(len(labels), dtype=object)
        levels[:] = [labels[i] for i in order]
    else:
        order = compute.array_sort_indices(encoded.dictionary).to_numpy()
        levels = np.array(encoded.dictionary.take(pyarrow.array(order)).to_pylist(), dtype=object)
    rank = np.empty(order.shape[0], dtype=np.int64)
    rank[order] = np.arange(order.shape[0])
    return rank[encoded.indices.to_numpy(zero_copy_only=False)], levels


def _text_labels(values: pd.Series) -> list:
    """A text column's values as Python str: by Arrow's own conversion where pandas keeps them in Arrow (pandas 3's
    `str` with pyarrow installed; Series.tolist goes through pandas' element access, at several times the cost)."""
    if getattr(values.dtype, "storage", None) == "pyarrow":
        import pyarrow  # (loaded: pandas holds this column in it)

        return pyarrow.array(values.array).to_pylist()
    return values.tolist()


# From this many rows, text that pandas does not hold in Arrow (and other columns of a Series) is factorized by
# pandas' factorize; below, as Python objects (the crossover measured at ~1,000 rows for Arrow's text before
# _arrow_sorted_codes: docs/performance-scale.md, eleventh session).
ARROW_FACTORIZE_MIN_ROWS = 1000
# Up to this many distinct values _arrow_sorted_codes sorts them as Python str (35 us against Arrow's 54 at 150, 640
# against 500 at 3,000; docs/performance-scale.md, twentieth session)
PYTHON_SORT_MAX_LEVELS = 1000
# Up to this many rows text is factorized in Python, above by Arrow's dictionary encoding (_arrow_sorted_codes; the
# crossover: docs/performance-scale.md, sixteenth session)
PYTHON_FACTORIZE_MAX_ROWS = 400


def indicator_variable(formula: str) -> str | None:
    """The factor's column if `formula` is a plain indicator of one factor (`0 + C(g)`, `factor(g) - 1`), else None."""
    m = _indicator_match(formula)
    return m.group(2) if m else None


def indicator_names(formula: str, levels) -> list[str]:
    """The indicator columns' names as patsy names the same columns (`C(g)[A]`, `factor(g)[A]`), for `formula` that
    indicator_variable reads: the one rule for a factor's columns, whichever path builds them."""
    m = _indicator_match(formula)
    return [f"{m.group(1)}({m.group(2)})[{level_name(v)}]" for v in levels]


def _indicator_match(formula: str):
    for form in _INDICATOR_FORMS:
        m = form.match(formula)
        if m:
            return m
    return None


def formula_columns(formulas, columns) -> list:
    """Columns of the data that the formulas mention (as statsmodels' missing='drop' decides it)."""
    names: set = set()
    for f in formulas:
        if f is not None:
            names.update(_formula_names(f))
    return [c for c in columns if c in names]


def _read_names(f) -> frozenset:
    """The names and quoted strings of one formula's text, and its dotted chains of names (R's `IQ.verb`)."""
    names = set()
    chain = ""  # the dotted chain of names ending at the last token
    try:
        for tok in tokenize.generate_tokens(io.StringIO(f).readline):
            if tok.type == tokenize.NAME:
                chain = chain + tok.string if chain.endswith(".") else tok.string
                names.add(chain)
                names.add(tok.string)
                continue
            chain = chain + "." if tok.string == "." and chain and not chain.endswith(".") else ""
            if tok.type == tokenize.STRING:  # Q("my column")
                try:
                    names.add(ast.literal_eval(tok.string))
                except (ValueError, SyntaxError):
                    raise FormulaError(
                        f"formula {f!r}: {tok.string} is not a plain string (an f-string or "
                        'bytes); name a column as Q("my column") or with backticks.'
                    ) from None
    except (tokenize.TokenError, IndentationError) as exc:
        raise FormulaError(f"cannot read formula {f!r}: {exc}") from None
    return frozenset(names)


# A function of the text alone, kept for the next fit of the same formula (an error is raised again each time).
_cached_names = functools.lru_cache(maxsize=512)(_read_names)


def _formula_names(f) -> frozenset:
    return _cached_names(f) if type(f) is str else _read_names(f)


def factor_codes(values) -> tuple[np.ndarray, list, bool]:
    """Integer codes and levels in patsy's order, and whether the levels are a Categorical's categories.

    As patsy: a Categorical keeps all its categories, used or not; other values give their sorted levels.
    """
    s = values if isinstance(values, pd.Series) else pd.Series(values)
    if isinstance(s.dtype, pd.CategoricalDtype):
        return s.cat.codes.to_numpy(np.int64), list(s.cat.categories), True
    codes, levels = sorted_codes(s)
    return codes, list(levels), False


def level_name(level) -> str:
    """How patsy prints a level inside C(x)[...]: str() of the Python value."""
    return str(level.item() if isinstance(level, np.generic) else level)


def fixed_design(formula: str, data: pd.DataFrame, eval_env):
    """(endog Series, exog DataFrame, design_info of the right-hand side), labelled as patsy's dataframes (the
    data's index, the design's column names) but built as fixed_arrays builds them (patsy's dataframes took 3.5 ms
    of a small model's 7.5)."""
    y, X = _fixed_matrices(formula, data, eval_env)
    endog = pd.Series(np.asarray(y)[:, 0], index=data.index, name=y.design_info.column_names[0])
    exog = pd.DataFrame(np.asarray(X, dtype=float), index=data.index, columns=list(X.design_info.column_names))
    return endog, exog, X.design_info


def fixed_arrays(formula: str, data: pd.DataFrame, eval_env, columns=None):
    """fixed_design's response, matrix and design for the lme4 door, as numpy arrays: (y, X, X's column names,
    design_info). patsy reads the plain numeric columns as arrays where that cannot change the design
    (`patsy_data`) and returns its matrices without wrapping them in frames (the data's row labels are not
    needed here)."""
    y, X = _fixed_matrices(formula, data, eval_env, columns)
    return np.asarray(y)[:, 0], np.asarray(X, dtype=float), list(X.design_info.column_names), X.design_info


def _fixed_matrices(formula: str, data: pd.DataFrame, eval_env, columns=None):
    """patsy's (y, X) design matrices of `formula` (numeric_design: kept designs reused), y one column."""
    y, X = _patsy(patsy.dmatrices, formula, data, eval_env, numeric_arrays=True, return_type="matrix", columns=columns)
    y = _logical_response(y)
    if y.shape[1] != 1:
        names = list(y.design_info.column_names)
        raise FormulaError(
            f"the response of {formula!r} expands to {y.shape[1]} columns ({names}); "
            "it must be one numeric column. Convert a categorical response to numbers first."
        )
    return y, X


def _logical_response(y):
    """A response that is a condition (`I(y > 0) ~ ...`, as R users write a logical response) as 0/1: patsy reads the
    booleans as a factor of two indicator columns, [False] and [True]; the [True] one is the response."""
    infos = list(y.design_info.factor_infos.values())
    if y.shape[1] != 2 or len(infos) != 1 or infos[0].type != "categorical":
        return y
    if tuple(infos[0].categories) != (False, True):
        return y
    name = infos[0].factor.name()
    return patsy.DesignMatrix(np.asarray(y)[:, 1:], patsy.DesignInfo([name]))


def random_design(re_formula: str, data: pd.DataFrame, group_name: str, eval_env):
    """exog_re (dense n x k array, or sparse for an indicator) and its column names."""
    if re_formula.strip() == "1":
        return np.ones((len(data), 1)), [group_name]
    var = indicator_variable(re_formula.lstrip("~ "))
    if var is not None:
        _require_column(var, data, "re_formula")
        codes, levels, _ = factor_codes(data[var])
        return indicator_matrix(codes, len(levels)), indicator_names(re_formula.lstrip("~ "), levels)
    rhs = re_formula if re_formula.lstrip().startswith("~") else "~" + re_formula
    M = _patsy(patsy.dmatrix, rhs, data, eval_env, numeric_arrays=True, return_type="matrix")
    return np.asarray(M, dtype=float), [c.replace("Intercept", group_name) for c in M.design_info.column_names]


def vc_from_formula(
    name: str, formula: str, data: pd.DataFrame, group_codes: np.ndarray, n_groups: int, rows_of_group, eval_env
) -> VarianceComponent:
    """One variance component, realised separately within each group (statsmodels' semantics)."""
    var = indicator_variable(formula)
    if var is not None:
        _require_column(var, data, f"vc_formula[{name!r}]")
        codes, levels, categorical = factor_codes(data[var])
        n_levels = max(len(levels), 1)
        pair = group_codes * n_levels + codes
        if categorical:
            # patsy gives every group a column for every category (all zero where the group lacks it).
            present, column = np.arange(n_groups * n_levels), pair
        else:
            column, present = sorted_codes(pair)
        n = len(codes)
        Z = sp.csc_matrix((np.ones(n), (np.arange(n), column.ravel())), shape=(n, present.size))
        column_group, level_of_column = np.divmod(present, n_levels)
        level_names = np.array(indicator_names(formula, levels or [""]), dtype=object)
        names = tuple(level_names[level_of_column])  # one name per level, then indexed: 4,000 columns
        return VarianceComponent(name, Z, column_group, names)
    rhs = formula if formula.lstrip().startswith("~") else "~" + formula
    blocks = []
    for rows in rows_of_group:
        M = _patsy(patsy.dmatrix, rhs, data.iloc[rows], eval_env)
        blocks.append((M.to_numpy(dtype=float), list(M.columns)))
    return VarianceComponent.from_group_blocks(name, blocks, rows_of_group)


def _require_column(name, data, role):
    if name not in data.columns:
        raise FormulaError(_unknown_name_message(name, data, role))


def _unknown_name_message(name, data, role) -> str:
    close = difflib.get_close_matches(name, [str(c) for c in data.columns], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    if not close and hasattr(np, name):
        hint = f" For numpy's {name}, write np.{name}(...) (with numpy imported as np where you call the fit)."
    return f"{role} uses {name!r}, which is not a column of the data.{hint}"


def is_text(col) -> bool:
    """Whether a column holds text (object dtype or pandas 3's `str`, every value a string): what a formula reads
    as a factor with its sorted values as levels."""
    return (col.dtype == object or isinstance(col.dtype, pd.StringDtype)) and pd.api.types.infer_dtype(
        col, skipna=False
    ) == "string"


def strings_as_categories(frame: pd.DataFrame, formula: str) -> pd.DataFrame:
    """Text columns of a formula as pandas Categoricals with their sorted levels, which is what patsy makes of
    them: patsy then reads the codes instead of sniffing every value in Python (InstEval's `service`: 0.4 s of a
    2.2 s fit; Exam's `sex` in its random term: 11 of 33 ms)."""
    text = [c for c in formula_columns([formula], frame.columns) if is_text(frame[c])]
    return frame.assign(**{c: pd.Categorical(frame[c]) for c in text}) if text else frame


def _labels(index: pd.Index) -> tuple:
    """An Index's labels as Python objects: text that pandas keeps in Arrow (pandas 3's column labels read from a dict
    of columns) converted by Arrow in one call, where pandas' iteration converts one label at a time."""
    if getattr(index.dtype, "storage", None) == "pyarrow":
        import pyarrow  # (loaded: pandas holds these labels in it)

        labels = pyarrow.array(index.array)
        if not labels.null_count:  # (a missing label: pandas' NaN, not Arrow's None)
            return tuple(labels.to_pylist())
    return tuple(index)


class FrameColumns:
    """The data as patsy looks names up in it: a column of a plain numpy number dtype as its numpy array (the
    same values patsy takes from the Series, without pandas' dispatch on every operation and NA check: ~0.7 ms
    a factor, half of a small model's design), a text column as the Categorical strings_as_categories makes of
    it (from its codes, each column factorized once), any other column as its Series."""

    def __init__(self, frame: pd.DataFrame):
        self._frame = frame
        # the column labels once (iterating pandas 3's Arrow-backed Index costs ~2 us a label, every time)
        self.names = _labels(frame.columns)
        self._names = frozenset(c for c in self.names if isinstance(c, str))
        self._series: dict = {}  # pandas' column lookup costs more than a small model's arithmetic: each read once
        self._text: dict = {}  # text column -> (codes, sorted levels); other columns -> None
        self._factors: dict = {}  # column -> factor_codes
        self._position: dict | None = None  # text label -> its column's position, where every label is unique

    def column(self, name):
        """The data's column `name` (a Series, or a frame where the label names several columns)."""
        col = self._series.get(name)
        if col is None:
            col = self._series[name] = self._read(name)
        return col

    def _read(self, name):
        """frame[name]: where `name` labels one column, that column as pandas' lookup makes it, less two of its steps
        that nothing here needs (finding the label again in the columns, slow in pandas 3's Arrow-backed Index; and
        copying the frame's attrs to it, __finalize__). Any other case, or pandas internals other than 2.1-3.x's,
        takes the public path (docs/performance-scale.md, twenty-fourth session)."""
        if self._position is None:
            self._position = {c: i for i, c in enumerate(self.names)} if len(set(self.names)) == len(self.names) else {}
        at = self._position.get(name) if type(name) is str else None
        if at is not None:
            try:
                values = self._frame._mgr.iget(at)
                col = self._frame._constructor_sliced_from_mgr(values, axes=values.axes)
                object.__setattr__(col, "_name", name)
                return col
            except (AttributeError, TypeError):  # (pandas' internals moved: its public lookup)
                pass
        return self._frame[name]

    def __getitem__(self, key):
        if key not in self._names:
            raise KeyError(key)  # not a column: patsy goes on to eval_env
        numbers = self._numbers(key)
        if numbers is not None:
            return numbers
        text = self.text_levels(key)
        if text is not None:
            return pd.Categorical.from_codes(text[0], dtype=pd.CategoricalDtype(text[1]))
        return self.column(key)

    def _numbers(self, name) -> np.ndarray | None:
        col = self.column(name)
        if isinstance(col, pd.Series) and isinstance(col.dtype, np.dtype) and col.dtype.kind in "fiu":
            return col.to_numpy()
        return None

    @property
    def n_rows(self) -> int:
        return len(self._frame)

    def plain(self, name) -> np.ndarray | None:
        """Column `name` as float numbers where it is one column of a numpy number dtype, else None."""
        if name not in self._names:
            return None
        numbers = self._numbers(name)
        return None if numbers is None else numbers.astype(float, copy=False)

    def text_levels(self, name) -> tuple[np.ndarray, tuple] | None:
        """(codes, sorted levels) of text column `name` (missing values coded -1); None for other columns."""
        if name not in self._names:
            return None
        if name not in self._text:
            col = self.column(name)
            found = None
            if isinstance(col, pd.Series) and is_text(col):
                codes, levels, _ = self.factor_codes(name)  # text has no missing values (is_text)
                found = (codes, tuple(levels))
            self._text[name] = found
        return self._text[name]

    def factor_codes(self, name) -> tuple[np.ndarray, list, bool]:
        """factor_codes of column `name`, computed once (the fixed part, a random term and its grouping may all read
        one factor)."""
        found = self._factors.get(name)
        if found is None:
            found = self._factors[name] = factor_codes(self.column(name))
        return found

    def level_codes(self, name) -> np.ndarray | None:
        """Column `name`'s codes among the levels its dtype or text gives (a Categorical's categories; False and
        True; text's sorted values), -1 where missing; None where it is not one column of such a kind."""
        if name not in self._names:
            return None
        col = self.column(name)
        if not isinstance(col, pd.Series):
            return None
        if isinstance(col.dtype, pd.CategoricalDtype):
            return col.cat.codes.to_numpy(np.intp)
        if col.dtype == bool:
            return col.to_numpy(np.intp)
        text = self.text_levels(name)
        return None if text is None else text[0]


def patsy_data(frame: pd.DataFrame, desc: patsy.ModelDesc, eval_env, columns: "FrameColumns | None" = None):
    """What patsy evaluates `desc` on: `frame`, or its numeric columns as numpy arrays (FrameColumns) when the
    terms call only the numpy functions, I, Q and patsy's/poly's stateful transforms (which read their argument
    through np.asarray, so a Series and its array give the same values), and have a factor to give the number of
    rows. Not with C() or contrasts (their levels would be numpy scalars, not Python's) or a caller's function
    (which may use the Series' methods)."""
    codes = term_codes(desc)
    if not codes:
        return frame
    names = {name for code in codes for name in code_names(code)}
    for name in names:
        if name in frame.columns:
            continue
        if not numpy_functions_only(name, eval_env):
            return frame
    return columns if columns is not None else FrameColumns(frame)


# patsy's designs of formulas whose every factor is fixed by the data's column names and dtypes, by _design_key:
# plain numeric expressions of columns (no stateful transform: nothing read from the values), and bare columns
# whose dtype carries its levels (pandas Categoricals: the key holds their categories in order; booleans, always
# False and True in patsy). Names resolve to the data's columns or to SAFE_FUNCTIONS, so the design is the same
# for every data set with those columns, dtypes and levels. Reused, patsy only evaluates the factors (its
# design_matrix_builders: 0.5 ms a formula; 1.6 ms with two factors, cake's).
_KEPT_DESIGNS: dict = {}
_KEPT_DESIGNS_MAX = 256
_STATEFUL = frozenset({"center", "standardize", "scale", "poly"})


def _design_key(fn, formula, desc, data, source, eval_env):
    """The key of a kept design for this formula on these data, or None where none may be kept: the formula's text,
    the data's column names (which names are columns, which are Python keywords), the dtypes of the columns it
    uses with a Categorical's levels, and the namespace's compile flags. Not where a name is stateful, or a column is
    named like a stateful transform of the namespace (patsy's design would apply it). A column that shadows any other
    name of the namespace (nlme's RatPupWeight has `Treatment`, a patsy contrast) is read from the data, as patsy
    reads data first; the design keeps the shadowed value, never read."""
    if not isinstance(source, FrameColumns) or type(formula) is not str:
        return None
    names = {name for code in term_codes(desc) for name in code_names(code)}
    if names & _STATEFUL:
        return None
    namespace = eval_env.namespace
    used = [c for c in source.names if c in names]
    if any(hasattr(namespace.get(c), "__patsy_stateful_transform__") for c in used):
        return None
    try:
        dtypes = tuple(_dtype_key(source.column(c).dtype, source.text_levels(c)) for c in used)
        # a column read as a factor (C(x), factor(x)): its levels are the values it has, not its dtype's
        factors = tuple(tuple(source.factor_codes(c)[1]) for c in _factor_columns(desc, source))
        key = (fn, formula, source.names, tuple(used), dtypes, factors, eval_env.flags)
        hash(key)
    except TypeError:  # unhashable labels or dtypes: no reuse
        return None
    return key


def _dtype_key(dtype, text):
    # pandas compares unordered Categoricals' dtypes by their set of categories; patsy's columns follow their order
    if isinstance(dtype, pd.CategoricalDtype):
        return (dtype, tuple(dtype.categories), dtype.ordered)
    return dtype if text is None else (dtype, text[1])


def _keepable(infos, source: "FrameColumns") -> bool:
    """Whether the designs may be kept under _design_key: every factor numerical, or categorical on a bare column
    whose dtype gives its levels."""
    for info in infos:
        for factor, fi in info.factor_infos.items():
            if fi.type == "numerical":
                continue
            code = getattr(factor, "code", None)
            if source.level_codes(_named(code)) is None and _factor_of_column(code, source) is None:
                return False
    return True


# C(x) and factor(x) of one column (SAFE_FUNCTIONS'): a factor whose levels are the column's values
_FACTOR_CALL = re.compile(_FACTOR_OF_NAME)


def _factor_of_column(code, source: "FrameColumns") -> str | None:
    """The column that `code` reads as a factor (C(x), factor(x)), or None."""
    m = _FACTOR_CALL.fullmatch(code) if type(code) is str else None
    return m.group(2) if m is not None and m.group(2) in source.names else None


def _factor_columns(desc, source: "FrameColumns") -> list[str]:
    return sorted({name for name in (_factor_of_column(code, source) for code in term_codes(desc)) if name})


@functools.lru_cache(maxsize=1024)
def _named(code) -> str | None:
    """The name a factor's code reads bare: `x`, or `Q("my x")` (patsy's quoting, which the formulas' `Q` always is:
    formula/safety.py; R's backticks and Python's keywords become it), or None for any other code."""
    if type(code) is not str:
        return None
    if code.isidentifier():
        return code
    if not (code.startswith("Q(") and code.endswith(")")):
        return None
    try:
        call = ast.parse(code, mode="eval").body
    except SyntaxError:
        return None
    if isinstance(call, ast.Call) and len(call.args) == 1 and not call.keywords:
        (arg,) = call.args
        if isinstance(arg, ast.Constant) and type(arg.value) is str:
            return arg.value
    return None


def _factors_reader(desc, eval_env, columns: "FrameColumns | None") -> "FrameColumns | None":
    """`columns` where the only names of `desc` that send it to the frame (patsy_data) are the formula functions
    C and factor, each of one bare column, as SAFE_FUNCTIONS holds them: its design may be kept (_design_key, with
    those columns' levels) and rebuilt from the columns (_plain_columns). None otherwise."""
    if columns is None:
        return None
    calls = set()
    for code in term_codes(desc):
        name = _factor_of_column(code, columns)
        if name is not None:
            calls.add(code.split("(", 1)[0])
            continue
        for name in code_names(code):
            if name not in columns.names and not numpy_functions_only(name, eval_env):
                return None
    if not calls or any(eval_env.namespace.get(c) is not SAFE_FUNCTIONS[c] for c in calls):
        return None
    return columns


def _plain_columns(infos, source: "FrameColumns") -> list | None:
    """The matrices of kept designs whose every factor is a column named bare (`y ~ Days + recipe * temperature`)
    or a numerical expression (`I(Days**2)`: _numerical_expression), built as patsy builds them (each term's
    subterms in turn; a subterm's columns the products of its factors' columns, numeric ones as they are,
    categorical ones as rows of their contrast matrix, the first factor's columns varying fastest) without its
    per-factor machinery; None where a factor is anything else, or a column has a missing value (patsy's
    NA_action="raise" reports it)."""
    columns: dict = {}

    def factor_column(factor, info):
        code = getattr(factor, "code", None)
        if code not in columns:
            if type(code) is not str:
                return None
            name = _factor_of_column(code, source)
            if name is not None:  # C(x), factor(x): x's codes among the kept design's levels (the key's)
                col, levels, _ = source.factor_codes(name)
                if (col < 0).any() or tuple(levels) != tuple(info.factor_infos[factor].categories):
                    return None
            elif _named(code) is None:
                col = _numerical_expression(factor, info.factor_infos[factor], source)
                if col is None:
                    return None
            else:
                name = _named(code)
                col = source.plain(name)
                if col is None:
                    col = source.level_codes(name)
                    if col is None or (col < 0).any():
                        return None
                elif np.isnan(col).any():
                    return None
            columns[code] = col
        return columns[code]

    out = []
    for info in infos:
        matrix = np.empty((source.n_rows, len(info.column_names)))
        start = 0
        for term, subterms in info.term_codings.items():
            for subterm in subterms:
                parts = []
                for factor in subterm.factors:
                    col = factor_column(factor, info)
                    if col is None:
                        return None
                    if factor in subterm.contrast_matrices:
                        parts.append(subterm.contrast_matrices[factor].matrix[col])  # (n, columns of the factor)
                    else:
                        parts.append(col[:, None])
                block = parts[0] if parts else np.ones((source.n_rows, 1))
                for part in parts[1:]:  # the first factor's columns vary fastest: R's order, and patsy's
                    block = (part[:, :, None] * block[:, None, :]).reshape(source.n_rows, -1)
                matrix[:, start : start + subterm.num_columns] = block
                start += subterm.num_columns
        out.append(_design_matrix(matrix, info))
    return out


def _design_matrix(matrix: np.ndarray, info) -> "patsy.DesignMatrix":
    """patsy's DesignMatrix of `matrix` (made to `info` here) without its checks, as a view."""
    design = matrix.view(patsy.DesignMatrix)
    design.design_info = info
    return design


def _numerical_expression(factor, info, source: "FrameColumns") -> np.ndarray | None:
    """A numerical factor's values (`I(age**2)`, `np.log(x)`) as patsy's build evaluates them (the factor's own
    eval with its kept state: 0.3 ms a design less), as one float column; None for anything else (a categorical or
    stateful factor, several columns, a missing value, an error), which patsy's build then reports."""
    if info.type != "numerical" or info.num_columns != 1 or info.state.get("transforms"):
        return None
    try:
        values = np.asarray(factor.eval(info.state, source), dtype=float)
    except Exception:  # noqa: BLE001 (patsy's build evaluates it again and words the error)
        return None
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.shape != (source.n_rows,) or np.isnan(values).any():
        return None
    return values


def expression_values(expr: str, desc, data: pd.DataFrame, eval_env) -> np.ndarray | None:
    """One numeric expression of the data's columns (glmer's `cbind(incidence, size - incidence)`), a number per
    row, NaN where one is missing: evaluated as patsy evaluates I(expr), on the numeric columns' arrays (2.3 ms of
    patsy's design machinery a call less); `desc`: check_formula's reading of "0 + I(expr)". None where patsy must
    (a stateful transform, a caller's function, a column of another dtype, an error to word)."""
    source = patsy_data(data, desc, eval_env)
    if not isinstance(source, FrameColumns) or set(code_names(expr)) & _STATEFUL:
        return None
    try:
        values = eval_env.eval(expr, inner_namespace=source)
    except Exception:  # noqa: BLE001 (patsy evaluates it again and words the error)
        return None
    if not (isinstance(values, np.ndarray) and values.dtype.kind in "biuf" and values.shape == (len(data),)):
        return None  # (text reads as a Categorical: patsy's indicators, which the caller refuses)
    return values.astype(float)


# patsy's designs of formulas whose terms are an intercept and bare columns of numbers, by their terms' names
# (_bare_columns)
_BARE_DESIGNS: dict = {}


def _bare_columns(fn, desc, source: "FrameColumns") -> list | None:
    """The matrices of a formula whose terms are an intercept and bare columns of numbers ("y ~ x + z", "~ 0 + Days"),
    read straight from the columns (patsy's machinery, even with a kept design: 20-35 us a formula of a small fit);
    their designs, which name the columns and rebuild them for new data, are patsy's of the same formula on a
    one-row frame of those columns (the same for any numbers), kept per formula. None for any other formula, or a
    column that is not numbers or has a missing value (patsy's NA_action="raise" reports it)."""
    sides = (desc.lhs_termlist, desc.rhs_termlist) if fn is patsy.dmatrices else (desc.rhs_termlist,)
    key: list = [fn]
    numbers = {}
    for terms in sides:
        names = []
        for term in terms:
            if len(term.factors) > 1:
                return None
            code = getattr(term.factors[0], "code", None) if term.factors else ""
            if code and code not in numbers:
                name = _named(code)
                column = source.plain(name) if name is not None else None
                if column is None or np.isnan(column).any():
                    return None
                numbers[code] = column
            names.append(code)
        key.append(tuple(names))
    infos = _BARE_DESIGNS.get(tuple(key))
    if infos is None:
        sample = pd.DataFrame({_named(code): [1.0] for code in numbers})
        built = fn(desc, sample, return_type="matrix", NA_action="raise", eval_env=safe_environment())
        infos = tuple(m.design_info for m in built) if fn is patsy.dmatrices else (built.design_info,)
        if len(_BARE_DESIGNS) < _KEPT_DESIGNS_MAX:
            _BARE_DESIGNS[tuple(key)] = infos
    out = []
    for info in infos:
        matrix = np.empty((source.n_rows, len(info.column_names)))
        for term, at in info.term_slices.items():
            matrix[:, at] = numbers[term.factors[0].code][:, None] if term.factors else 1.0
        out.append(_design_matrix(matrix, info))
    return out


def numeric_design(fn, formula: str, desc, data: pd.DataFrame, eval_env, return_type="matrix", columns=None):
    """patsy's `fn` (dmatrix or dmatrices) of `desc` (check_formula's reading of `formula`) on `data` as
    patsy_data gives it, reusing the design of an earlier call where _design_key allows. Raises patsy's errors.
    `columns`: a FrameColumns of `data` that other parts of the design read too."""
    source = patsy_data(data, desc, eval_env, columns)
    on_frame = not isinstance(source, FrameColumns)  # a caller's function, C(x) or factor(x) reads the frame
    if not on_frame and return_type == "matrix":
        built = _bare_columns(fn, desc, source)
        if built is not None:
            return tuple(built) if fn is patsy.dmatrices else built[0]
    # (C(x) / factor(x) of bare columns only: a kept design is still rebuilt from the columns)
    reader = _factors_reader(desc, eval_env, columns) if on_frame else source
    key = _design_key(fn, formula, desc, data, reader, eval_env)
    infos = _KEPT_DESIGNS.get(key) if key is not None else None
    built = _plain_columns(infos, reader) if infos is not None and return_type == "matrix" else None
    if built is None and on_frame:  # text as FrameColumns gives it
        source = strings_as_categories(data, formula)
    if built is None and infos is not None:
        built = patsy.build_design_matrices(list(infos), source, NA_action="raise", return_type=return_type)
    if built is not None:
        return tuple(built) if fn is patsy.dmatrices else built[0]
    result = fn(desc, source, return_type=return_type, NA_action="raise", eval_env=eval_env)
    if key is not None:
        infos = tuple(m.design_info for m in result) if fn is patsy.dmatrices else (result.design_info,)
        if _keepable(infos, reader) and len(_KEPT_DESIGNS) < _KEPT_DESIGNS_MAX:
            _KEPT_DESIGNS[key] = infos
    return result


def _patsy(fn, formula, data, eval_env, numeric_arrays=False, return_type="dataframe", columns=None):
    names = data.columns if columns is None else columns.names
    desc = check_formula(formula, names, eval_env)  # nothing in a formula runs before this check
    try:
        if numeric_arrays:
            return numeric_design(fn, formula, desc, data, eval_env, return_type, columns)
        return fn(desc, data, return_type=return_type, NA_action="raise", eval_env=eval_env)
    except patsy.PatsyError as exc:
        text = str(exc)
        m = re.search(r"NameError: name '([^']+)' is not defined", text)
        if m:
            raise FormulaError(_unknown_name_message(m.group(1), data, f"formula {formula!r}")) from None
        if "missing values" in text:
            used = [c for c in formula_columns([formula], data.columns)]
            if used and data[used].isna().any().any():
                raise FormulaError(
                    f"formula {formula!r}: a column it uses has missing values. Pass "
                    "missing='drop' to drop incomplete rows, or fill them first."
                ) from None
            raise FormulaError(
                f"formula {formula!r}: a term gives missing values (NaN) where the data have none: "
                "a function outside its domain, such as log or sqrt of values <= 0 or < 0. Transform "
                "the column first (log(x + c), or drop those rows)."
            ) from None
        raise FormulaError(f"cannot evaluate formula {formula!r}: {text}") from None
