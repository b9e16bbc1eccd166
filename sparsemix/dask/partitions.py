"""What runs on the Dask workers, partition by partition: the complete rows, X and Z built alike in every
partition (from a prototype with the global levels), and the sums the client combines in a tree."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import patsy
import scipy.sparse as sp

from ..core.coordinates import column_moments, transform_columns
from ..core.cross_products import assemble_Z
from ..core.terms import CovarianceTemplate, RandomTerm, indicator_matrix
from ..formula.design_rules import complete_rows, group_codes
from ..formula.mixedlm import indicator_variable, sorted_codes
from ..formula.newdata import LevelMatcher, report_new_levels
from ..formula.safety import readable_formula, safe_environment

__all__ = [
    "PartitionTerm",
    "PartitionSpec",
    "tree",
    "add_sums",
    "nbytes",
    "on_prototype",
    "partition_rows",
    "levels_of_partition",
    "merge_levels",
    "fixed_sums",
    "cross_sums",
    "design_matrix",
    "partition_Z",
    "fitted_partition",
    "scaled_residual_partition",
    "predict_partition",
    "simulated_sums",
]


@dataclass(frozen=True)
class PartitionTerm:
    """A random term as the workers build it: its columns' expression, grouping variables and the fit's levels."""

    expr: str  # the columns, as patsy reads them ("1", "x", "0 + f")
    group: tuple[str, ...]  # grouping variables (several for an interaction g:h)
    n_levels: int
    k: int  # columns per level
    labels: tuple  # the fit's level labels, in code order

    @property
    def intercept_only(self) -> bool:
        return self.k == 1 and self.expr.strip() == "1"

    def restricted(self, levels) -> "PartitionTerm":
        """The term on a subset of its levels (a pilot's)."""
        return PartitionTerm(self.expr, self.group, len(levels), self.k, tuple(self.labels[i] for i in levels))


@dataclass(frozen=True)
class PartitionSpec:
    """What every partition needs to build its rows of X and Z alike; small and picklable (no patsy objects)."""

    fixed: str  # patsy "response ~ rhs"
    used: tuple[str, ...]
    categories: dict = field(default_factory=dict)  # column -> global levels, for categorical columns
    random: tuple[PartitionTerm, ...] = ()  # in the fit's order
    weights: str | None = None
    offset: str | None = None
    keep_columns: tuple[int, ...] | None = None  # fixed-effect columns kept after the aliasing check
    listed_levels_only: bool = False  # a pilot's subsample: rows of levels not in `random` left out
    column_transforms: tuple = ()  # per term, None or T: the system's columns Z (I kron T)


def tree(data, per_partition, combine, *args):
    """per_partition(partition, *args) on every partition, combined pairwise in a tree: one Delayed."""
    from dask import delayed

    level = [delayed(per_partition)(part, *args) for part in data.to_delayed()]
    while len(level) > 1:
        level = [
            delayed(combine)(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
            for i in range(0, len(level), 2)
        ]
    return level[0]


def nbytes(obj) -> int:
    """Bytes of the arrays in a pass result (dicts of numpy arrays, scipy sparse matrices and numbers)."""
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if sp.issparse(obj):
        obj = obj.tocsc()
        return obj.data.nbytes + obj.indices.nbytes + obj.indptr.nbytes
    return int(getattr(obj, "nbytes", 8))


def add_sums(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def prototype(frame: pd.DataFrame, categories: dict) -> pd.DataFrame:
    """No rows, the partition's dtypes, and the global levels of the categorical columns: patsy learns the
    same columns from it in every partition."""
    proto = frame.iloc[:0].copy()
    for c, levels in categories.items():
        proto[c] = pd.Categorical([], categories=levels)
    return proto


def on_prototype(fn, formula, frame, categories, **kwargs):
    """patsy's `fn` (dmatrix, dmatrices) on the prototype of `frame`, the formula read as the fit read it."""
    proto = prototype(frame, categories)
    return fn(readable_formula(formula, proto.columns), proto, eval_env=safe_environment(), **kwargs)


def complete_partition(part: pd.DataFrame, spec: PartitionSpec):
    """The partition's complete rows (design_rules.complete_rows, as in memory) and how many were dropped."""
    frame = part[list(spec.used)]
    keep = complete_rows(
        frame, spec.used, [frame[c].to_numpy(dtype=float) for c in (spec.weights, spec.offset) if c is not None]
    )
    return frame.loc[keep], int((~keep).sum())


def levels_of_partition(part, spec, categorical, groups):
    frame, dropped = complete_partition(part, spec)
    return {
        "n": len(frame),
        "dropped": dropped,
        "columns": {c: sorted_codes(frame[c].to_numpy())[1] for c in categorical},
        "groups": {g: frame[list(g)].drop_duplicates().to_numpy() for g in groups},
    }


def merge_levels(a, b):
    return {
        "n": a["n"] + b["n"],
        "dropped": a["dropped"] + b["dropped"],
        "columns": {c: sorted_codes(np.concatenate([a["columns"][c], b["columns"][c]]))[1] for c in a["columns"]},
        "groups": {
            g: pd.DataFrame(np.concatenate([a["groups"][g], b["groups"][g]])).drop_duplicates().to_numpy()
            for g in a["groups"]
        },
    }


def partition_rows(part, spec):
    """This partition's complete rows as arrays: y, X (all columns), weights, offset, and the frame."""
    frame, _ = complete_partition(part, spec)
    frame = as_categories(frame, spec)
    if spec.listed_levels_only:
        listed = np.ones(len(frame), dtype=bool)
        for term in spec.random:
            listed &= level_codes(frame, term.group, term.labels)[0] >= 0
        frame = frame.loc[listed]
    y_info, X_info = (m.design_info for m in on_prototype(patsy.dmatrices, spec.fixed, frame, spec.categories))
    y, X = patsy.build_design_matrices([y_info, X_info], frame, NA_action="raise")
    w = None if spec.weights is None else frame[spec.weights].to_numpy(dtype=float)
    off = np.zeros(len(frame)) if spec.offset is None else frame[spec.offset].to_numpy(dtype=float)
    return np.asarray(y, dtype=float)[:, 0] - off, np.asarray(X, dtype=float), w, frame


def fixed_sums(part, spec):
    y, X, w, frame = partition_rows(part, spec)
    sw = np.ones(len(y)) if w is None else np.sqrt(w)
    Xw, yw = X * sw[:, None], y * sw
    # a random intercept alone is its own working column: no moments, no Z for it in this pass
    shaped = [t for t, term in enumerate(spec.random) if not term.intercept_only]
    only_shaped = PartitionSpec(**{**spec.__dict__, "random": tuple(spec.random[t] for t in shaped)})
    blocks = partition_terms(frame, only_shaped)
    moments = {f"moments{t}": column_moments(block.Z, block.k) for t, block in zip(shaped, blocks)}
    return {
        "XtX": Xw.T @ Xw,
        "Xty": Xw.T @ yw,
        "sum_log_weights": 0.0 if w is None else float(np.sum(np.log(w))),
        **moments,
    }


def as_categories(frame, spec):
    for c, levels in spec.categories.items():
        if c in frame.columns:
            frame = frame.assign(**{c: pd.Categorical(frame[c], categories=levels)})
    return frame


def design_matrix(part, spec) -> np.ndarray:
    """The fixed-effects columns of new data (no response needed), all columns before the aliasing check."""
    frame = as_categories(part, spec)
    proto = prototype(frame, spec.categories)
    rhs = patsy.ModelDesc([], readable_formula(spec.fixed, proto.columns).rhs_termlist)
    info = patsy.dmatrix(rhs, proto, eval_env=safe_environment()).design_info
    (X,) = patsy.build_design_matrices([info], frame, NA_action="raise")
    return np.asarray(X, dtype=float)


def partition_Z(frame, spec, allow_new_levels=False, working=False) -> sp.csc_matrix:
    """Z for these rows in the fit's column layout; rows of levels the fit did not see get zero (population)
    effects when allowed. `working`: the system's centred, scaled columns (spec.column_transforms), for its
    cross-products; otherwise the data's, for predictions from random effects in the data's columns."""
    blocks = partition_terms(frame, spec, allow_new_levels)
    if working and spec.column_transforms:
        return sp.hstack(
            [transform_columns(b.Z, b.n_levels, T) for b, T in zip(blocks, spec.column_transforms)], format="csc"
        )
    return assemble_Z(blocks)


def partition_terms(frame, spec, allow_new_levels=False) -> list[RandomTerm]:
    """Each random term's block of Z for these rows (see partition_Z)."""
    frame = as_categories(frame, spec)
    blocks = []
    for term in spec.random:
        codes, new_labels = level_codes(frame, term.group, term.labels)
        report_new_levels(int((codes < 0).sum()), len(codes), ":".join(term.group), new_labels, allow_new_levels)
        var = indicator_variable(term.expr)
        if var is not None:
            values = indicator_matrix(np.asarray(frame[var].cat.codes, dtype=np.int64), term.k).toarray()
        else:
            info = on_prototype(patsy.dmatrix, "~ " + term.expr, frame, spec.categories).design_info
            (values,) = patsy.build_design_matrices([info], frame, NA_action="raise")
            values = np.array(values, dtype=float)
        values[codes < 0] = 0.0
        template = CovarianceTemplate.unstructured(term.k)
        blocks.append(
            RandomTerm.from_codes(
                "t",
                np.maximum(codes, 0),
                values,
                term.n_levels,
                template,
                range(term.n_levels),
                tuple(map(str, range(term.k))),
            )
        )
    return blocks


def level_codes(frame, group, labels) -> tuple[np.ndarray, np.ndarray]:
    """Each row's position among `labels` (the fit's levels of `group`), -1 for a level not among them, and the
    levels not among them; levels match by value as in-memory predictions do (newdata.LevelMatcher: 308, 308.0
    and "308" are one level)."""
    local_codes, local_labels = group_codes(frame, group)
    local_labels = np.asarray(local_labels, dtype=object)
    positions = LevelMatcher(labels, ":".join(group)).positions(local_labels)
    return positions[local_codes], local_labels[positions < 0]


def cross_sums(part, spec, beta_ols):
    y, X, w, frame = partition_rows(part, spec)
    X = X[:, list(spec.keep_columns)]
    r = y - X @ beta_ols
    Z = partition_Z(frame, spec, working=True)
    if w is not None:
        sw = np.sqrt(w)
        X, r, Z = X * sw[:, None], r * sw, sp.csc_matrix(sp.diags(sw) @ Z)
    Zt = sp.csr_matrix(Z.T)
    # X'X, the row count and sum(log w) again: a pilot's rows are not pass 2's.
    return {
        "ZtZ": sp.csc_matrix(Zt @ Z),
        "ZtX": np.asarray(Zt @ X),
        "Ztr": np.asarray(Zt @ r).ravel(),
        "Xtr": X.T @ r,
        "rtr": float(r @ r),
        "XtX": X.T @ X,
        "n": len(r),
        "sum_log_weights": 0.0 if w is None else float(np.sum(np.log(w))),
    }


def fitted_partition(part, spec, beta, b, residual):
    y, X, _, frame = partition_rows(part, spec)
    X = X[:, list(spec.keep_columns)]
    Z = partition_Z(frame, spec)
    fit = X @ beta + Z @ b
    off = np.zeros(len(frame)) if spec.offset is None else frame[spec.offset].to_numpy(dtype=float)
    return pd.Series(y - fit if residual else fit + off, index=frame.index)


def scaled_residual_partition(part, spec, beta, b, sigma):
    y, X, w, frame = partition_rows(part, spec)
    r = (y - X[:, list(spec.keep_columns)] @ beta - partition_Z(frame, spec) @ b) / sigma
    return pd.Series(r if w is None else r * np.sqrt(w), index=frame.index)


def predict_partition(part, spec, beta, b, allow_new_levels, offset):
    X = design_matrix(part, spec)[:, list(spec.keep_columns)]
    pred = X @ beta
    if b is not None:
        pred = pred + partition_Z(part, spec, allow_new_levels=allow_new_levels) @ b
    if offset is not None:
        pred = pred + part[offset].to_numpy(dtype=float)
    return pd.Series(pred, index=part.index)


def simulated_sums(part, spec, beta, B, sigma, entropy, spawn_keys):
    _, X, w, frame = partition_rows(part, spec)
    X = X[:, list(spec.keep_columns)]
    Z = partition_Z(frame, spec)
    first = int(frame.index[0]) if len(frame) and np.issubdtype(frame.index.dtype, np.integer) else 0
    Y = np.empty((len(frame), B.shape[1]))
    mean = X @ beta
    for j, (e, key) in enumerate(zip(entropy, spawn_keys)):
        # Noise seeded by (replicate, position of the partition's first row): the same draws wherever it runs.
        rng = np.random.default_rng(np.random.SeedSequence(e, spawn_key=tuple(key) + (first,)))
        noise = rng.standard_normal(len(frame))
        Y[:, j] = mean + sigma * (Z @ B[:, j] + (noise if w is None else noise / np.sqrt(w)))
    Z = partition_Z(frame, spec, working=True)  # the refit's cross-products are the system's
    if w is not None:
        sw = np.sqrt(w)
        X, Y, Z = X * sw[:, None], Y * sw[:, None], sp.csc_matrix(sp.diags(sw) @ Z)
    return {"ZtY": np.asarray(Z.T @ Y), "XtY": X.T @ Y, "yty": np.sum(Y * Y, axis=0)}
