"""Random-effect terms: a grouping, the columns each level carries, and their covariance template.

A term with `n_levels` levels and `k` columns per level owns `n_levels * k` consecutive columns of Z,
level-major (level 0's k columns, then level 1's, ...). Its relative covariance factor is the same
lower-triangular k x k template T for every level, so Var(b_level) = sigma^2 T T'. Which entries of T are
free is the template's business: all of the lower triangle (unstructured), or the diagonal only
(independent columns; a variance component is the k = 1 case).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.sparse as sp

__all__ = [
    "CovarianceTemplate",
    "RandomTerm",
    "VarianceComponent",
    "indicator_matrix",
    "hstack_csc",
    "csc_from_arrays",
    "level_entries",
    "level_layout_csc",
    "row_levels",
    "same_grouping_runs",
    "equal_key_runs",
]


@dataclass(frozen=True)
class CovarianceTemplate:
    """Which entries of the k x k lower-triangular factor T are parameters, in theta order.

    Positions follow lme4's order: the lower triangle column by column, so for k = 2 the parameters are
    T[0,0], T[1,0], T[1,1].
    """

    k: int
    positions: tuple[tuple[int, int], ...]

    @classmethod
    def unstructured(cls, k: int) -> "CovarianceTemplate":
        return cls(k, tuple((i, j) for j in range(k) for i in range(j, k)))

    @classmethod
    def diagonal(cls, k: int) -> "CovarianceTemplate":
        return cls(k, tuple((i, i) for i in range(k)))

    @classmethod
    def scalar(cls) -> "CovarianceTemplate":
        return cls.diagonal(1)

    @property
    def n_theta(self) -> int:
        return len(self.positions)

    @property
    def is_diagonal(self) -> bool:
        return all(i == j for i, j in self.positions)

    def on_diagonal(self) -> np.ndarray:
        """True for the theta entries that sit on T's diagonal (those are bounded below by 0)."""
        return np.array([i == j for i, j in self.positions], dtype=bool)

    def start(self) -> np.ndarray:
        """lme4's starting point: T = identity."""
        return self.on_diagonal().astype(float)

    def factor(self, theta: np.ndarray) -> np.ndarray:
        """The k x k lower-triangular T for this term's slice of theta."""
        if self.k == 1:  # (a scalar term's, at every evaluation)
            return np.array(theta, dtype=float).reshape(1, 1)
        T = np.zeros((self.k, self.k))
        rows, cols = self._index
        T[rows, cols] = theta
        return T

    def factors(self, thetas: np.ndarray) -> np.ndarray:
        """`factor` of every row of `thetas` (R x n_theta, this term's slice): a stack R x k x k."""
        T = np.zeros((thetas.shape[0], self.k, self.k))
        rows, cols = self._index
        T[:, rows, cols] = thetas
        return T

    def theta_of(self, T: np.ndarray) -> np.ndarray:
        """Inverse of `factor`: read the parameters off a lower-triangular T."""
        rows, cols = self._index
        return np.asarray(T, dtype=float)[rows, cols]

    @cached_property  # once per template: factor() runs at every deviance evaluation
    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.array([i for i, _ in self.positions], dtype=np.intp)
        cols = np.array([j for _, j in self.positions], dtype=np.intp)
        return rows, cols


@dataclass(frozen=True)
class RandomTerm:
    """One block of Z: `n_levels * k` columns, level-major, with a shared covariance template.

    `Z` is n x (n_levels * k) and sparse. `level_labels` name the levels (for random_effects output) and
    `column_names` the k columns within a level (for cov_re / VarCorr output).
    """

    name: str
    Z: sp.csc_matrix
    n_levels: int
    template: CovarianceTemplate
    level_labels: tuple = field(repr=False)
    column_names: tuple[str, ...]

    def __post_init__(self):
        if self.Z.shape[1] != self.n_levels * self.template.k:
            raise ValueError(
                f"term {self.name!r}: Z has {self.Z.shape[1]} columns, expected n_levels * k = "
                f"{self.n_levels} * {self.template.k}"
            )
        if len(self.level_labels) != self.n_levels:
            raise ValueError(f"term {self.name!r}: {len(self.level_labels)} level labels for {self.n_levels} levels")
        if len(self.column_names) != self.template.k:
            raise ValueError(f"term {self.name!r}: {len(self.column_names)} column names for k = {self.template.k}")

    @property
    def k(self) -> int:
        return self.template.k

    @cached_property  # (read by same_grouping_runs and moment_start: computed once a term)
    def row_level(self) -> np.ndarray | None:
        """Each row's level (-1 where it has no entry, as a slope's zeros), or None where a row has entries in two
        levels (not from_codes' layout)."""
        _, rows, level, _ = level_entries(self.Z, self.k)
        return row_levels(rows, level, self.Z.shape[0])

    @classmethod
    def from_codes(cls, name, codes, values, n_levels, template, level_labels, column_names) -> "RandomTerm":
        """Build the term's Z from integer level codes (length n) and per-row values (n x k, dense or sparse).

        Row i of Z holds row i of `values` in the k columns of level `codes[i]`; nothing n x q dense is formed.
        """
        codes = np.asarray(codes, dtype=np.int64)
        n = codes.shape[0]
        k = template.k
        if sp.issparse(values):
            V = sp.csr_matrix(values)
            rows_of_entries = np.repeat(np.arange(n), np.diff(V.indptr))
            indices = codes[rows_of_entries] * k + V.indices
            Z = sp.csr_matrix((V.data.astype(float), indices, V.indptr), shape=(n, n_levels * k))
            Z.eliminate_zeros()
            Z = Z.tocsc()
        else:
            V = np.array(values, dtype=float).reshape(n, k)  # a copy: the caller's array may be read-only
            Z = level_layout_csc(codes, V, int(n_levels))
        return cls(name, Z, int(n_levels), template, tuple(level_labels), tuple(column_names))


def csc_from_arrays(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape) -> sp.csc_matrix:
    """The CSC matrix of arrays that this package's builders made valid (indices in range and sorted within each
    column, indptr from counts), without the checks of scipy's constructor (~20 us a matrix: a tenth of a small
    fit). Index arrays typed as scipy types them (int32 where every index fits). scipy's own constructor where its
    matrices hold other attributes than it did when this was written (_UNCHECKED_CSC)."""
    shape = (int(shape[0]), int(shape[1]))
    index_dtype = np.int32 if max(shape[0], shape[1], int(indptr[-1])) < 2**31 - 1 else np.int64
    indices = np.ascontiguousarray(indices, dtype=index_dtype)
    indptr = np.ascontiguousarray(indptr, dtype=index_dtype)
    data = np.ascontiguousarray(data)
    if not _UNCHECKED_CSC:
        return sp.csc_matrix((data, indices, indptr), shape=shape)
    out = sp.csc_matrix.__new__(sp.csc_matrix)
    out.__dict__.update(_shape=shape, maxprint=_MAXPRINT, data=data, indices=indices, indptr=indptr)
    return out


_checked = sp.csc_matrix((np.ones(1), np.zeros(1, np.int32), np.array([0, 1], np.int32)), shape=(1, 1))
_MAXPRINT = getattr(_checked, "maxprint", 50)
_UNCHECKED_CSC = set(vars(_checked)) == {"_shape", "maxprint", "data", "indices", "indptr"}
del _checked


# level_layout_csc sorts the entries itself up to this many (one argsort and one constructor: 26 us against 55 for a
# 144-row random intercept); above, scipy's CSR-to-CSC conversion (a counting sort: 18 ms against 96 at 1,000,000).
DIRECT_CSC_MAX_ENTRIES = 1_500
# A scalar term's rows are sorted by level up to this many rows where the levels fit 16 bits (numpy's stable argsort
# of uint16 is a radix sort: 68 us against scipy's conversion's 210 for a 3,435-row random intercept, 3.1 ms against
# 4.2 at 100,000 rows, level at 1,000,000; docs/performance-scale.md, twentieth session).
SCALAR_DIRECT_MAX_ROWS = 200_000
RADIX_SORT_MAX_KEYS = 2**16


def level_layout_csc(row_level: np.ndarray, values: np.ndarray, n_levels: int) -> sp.csc_matrix:
    """The n x (n_levels * k) CSC matrix whose row i holds values[i] (k of them) in the k columns of level
    row_level[i] (none where it is -1), zeros not stored: RandomTerm.from_codes' layout."""
    n, k = values.shape
    shape = (n, n_levels * k)
    direct = n * k <= DIRECT_CSC_MAX_ENTRIES
    if k == 1 and (direct or (n <= SCALAR_DIRECT_MAX_ROWS and n_levels <= RADIX_SORT_MAX_KEYS)):
        return _scalar_layout_csc(row_level, values[:, 0], n_levels)  # its rows in level order are the entries
    stored = values != 0
    if row_level.size and row_level.min() < 0:
        stored &= (row_level >= 0)[:, None]
    columns = row_level[:, None] * k + np.arange(k)
    if not direct:
        if stored.all():  # (a random intercept, a slope without zeros: no masks over n k entries)
            csr = (values.ravel(), columns.ravel(), np.arange(0, n * k + 1, k))
        else:
            indptr = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(stored.sum(axis=1), out=indptr[1:])
            csr = (values[stored], columns[stored], indptr)
        return sp.csr_matrix(csr, shape=shape).tocsc()
    column = columns[stored]
    order = _stable_order(column, shape[1])  # by column, rows ascending within one (row-major entries)
    indptr = np.zeros(shape[1] + 1, dtype=np.int64)
    np.cumsum(np.bincount(column, minlength=shape[1]), out=indptr[1:])
    rows = np.broadcast_to(np.arange(n)[:, None], (n, k))[stored]
    return csc_from_arrays(values[stored][order], rows[order], indptr, shape)


def _stable_order(keys: np.ndarray, n_keys: int) -> np.ndarray:
    """np.argsort(keys, kind="stable") of keys in [0, n_keys): as uint16 where they fit (numpy's radix sort)."""
    if n_keys <= RADIX_SORT_MAX_KEYS:
        keys = keys.astype(np.uint16)
    return np.argsort(keys, kind="stable")


def _scalar_layout_csc(row_level: np.ndarray, values: np.ndarray, n_levels: int) -> sp.csc_matrix:
    """level_layout_csc of one column per level: the kept rows sorted by level (stable) are the CSC's entries."""
    keep = values != 0
    if row_level.size and row_level.min() < 0:
        keep &= row_level >= 0
    if keep.all():
        order = _stable_order(row_level, n_levels)
        counts = np.bincount(row_level, minlength=n_levels)
    else:
        kept = np.flatnonzero(keep)
        order = kept[_stable_order(row_level[kept], n_levels)]
        counts = np.bincount(row_level[kept], minlength=n_levels)
    indptr = np.zeros(n_levels + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return csc_from_arrays(values[order], order, indptr, (row_level.shape[0], n_levels))


def hstack_csc(blocks: list[sp.csc_matrix]) -> sp.csc_matrix:
    """[B_1 | B_2 | ...] of CSC matrices with the same rows, their arrays concatenated (scipy's hstack converts and
    checks each block: half of building a small model's system columns)."""
    blocks = [b if b.format == "csc" else sp.csc_matrix(b) for b in blocks]
    if len(blocks) == 1:
        return blocks[0]
    nnz = [int(b.indptr[-1]) for b in blocks]
    offsets = np.cumsum([0] + nnz[:-1])
    indptr = np.concatenate([np.zeros(1, dtype=np.int64)] + [b.indptr[1:] + o for b, o in zip(blocks, offsets)])
    data = np.concatenate([b.data[:m] for b, m in zip(blocks, nnz)])
    indices = np.concatenate([b.indices[:m] for b, m in zip(blocks, nnz)])
    shape = (blocks[0].shape[0], sum(b.shape[1] for b in blocks))
    return csc_from_arrays(data, indices, indptr, shape)


def level_entries(Z: sp.spmatrix, k: int) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """A term's Z (n x levels * k) as CSC, and for each stored entry its row, its level and its column among the
    level's k."""
    Z = Z if sp.isspmatrix_csc(Z) else sp.csc_matrix(Z)  # (scipy's constructor on a CSC matrix: a checked copy)
    of_entry = np.repeat(np.arange(Z.shape[1], dtype=np.int64), np.diff(Z.indptr))
    level, column = (of_entry, np.zeros_like(of_entry)) if k == 1 else np.divmod(of_entry, k)
    return Z, Z.indices.astype(np.int64), level, column


def row_levels(rows: np.ndarray, level: np.ndarray, n: int) -> np.ndarray | None:
    """Each of n rows' level (-1 where it has no entry) from level_entries' rows and levels, or None where a row
    has entries in two levels (not RandomTerm.from_codes' layout)."""
    out = np.full(n, -1, dtype=np.int64)
    out[rows] = level
    # (levels >= 0) each entry has a row of its own where the scatter filled as many rows as there are entries: a
    # sequential count, where reading the rows back is a second random pass (0.4 s at 32,000,000 rows)
    if np.count_nonzero(out >= 0) == rows.shape[0]:
        return out
    return out if np.array_equal(out[rows], level) else None


def same_grouping_runs(terms: list[RandomTerm]) -> tuple[tuple[int, int], ...]:
    """Runs [start, stop) of two or more consecutive scalar terms of one grouping: as many levels, and every row
    in the same level of each term where it has entries in several (lme4's `(x || g)` writes a diagonal covariance
    as one scalar term per column of g). Such a run is one term with a diagonal template (RelativeCovariance.
    merged)."""
    runs: list[tuple[int, int]] = []
    start, levels = 0, None  # the current run's first term, and its rows' levels so far (-1: none yet)
    for j, term in enumerate(terms + [None]):
        joined = False
        if term is not None and term.k == 1 and j > start and terms[start].n_levels == term.n_levels:
            if levels is None:
                levels = terms[start].row_level
            own = term.row_level if levels is not None else None
            if own is not None and levels is not None:
                both = (own >= 0) & (levels >= 0)
                if np.array_equal(own[both], levels[both]):
                    levels = np.where(levels >= 0, levels, own)
                    joined = True
        if joined:
            continue
        if j - start >= 2:
            runs.append((start, j))
        start, levels = j, None
        if term is not None and term.k != 1:
            start = j + 1
    return tuple(runs)


def equal_key_runs(keys: list) -> tuple[tuple[int, int], ...]:
    """Runs [start, stop) of two or more consecutive equal keys that are not None (a door that knows its terms'
    groupings but not their rows: the Dask door's same_grouping_runs)."""
    runs, start = [], 0
    for j in range(1, len(keys) + 1):
        if j < len(keys) and keys[j] is not None and keys[j] == keys[start]:
            continue
        if j - start >= 2:
            runs.append((start, j))
        start = j
    return tuple(runs)


def indicator_matrix(codes: np.ndarray, n_levels: int) -> sp.csr_matrix:
    """The n x n_levels 0/1 matrix of a factor, built sparse from its integer codes."""
    codes = np.asarray(codes, dtype=np.int64)
    n = codes.shape[0]
    return sp.csr_matrix((np.ones(n), codes, np.arange(n + 1)), shape=(n, n_levels))


@dataclass(frozen=True)
class VarianceComponent:
    """statsmodels' variance component: independent effects, one per column, sharing one variance.

    Its columns are realised separately within each group (`column_group[c]` is the group code of column c),
    so as a term it has one level per column and k = 1.
    """

    name: str
    Z: sp.csc_matrix  # n x m
    column_group: np.ndarray  # m group codes
    column_names: tuple[str, ...]  # m names, unique within a group

    def to_term(self, group_labels) -> RandomTerm:
        labels = tuple((group_labels[g], c) for g, c in zip(self.column_group, self.column_names))
        return RandomTerm(self.name, self.Z, self.Z.shape[1], CovarianceTemplate.scalar(), labels, (self.name,))

    @classmethod
    def from_group_blocks(cls, name, blocks, rows_of_group) -> "VarianceComponent":
        """Stack per-group matrices (block g covers the rows `rows_of_group[g]`) into one sparse n x m matrix.

        `blocks` is a list over groups of (matrix n_g x m_g, column names m_g).
        """
        n = sum(len(r) for r in rows_of_group)
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        groups: list[np.ndarray] = []
        names: list[str] = []
        offset = 0
        for g, ((mat, colnames), row_idx) in enumerate(zip(blocks, rows_of_group)):
            M = sp.coo_matrix(mat) if sp.issparse(mat) else sp.coo_matrix(np.asarray(mat, dtype=float))
            if M.shape[0] != len(row_idx):
                raise ValueError(
                    f"variance component {name!r}: the matrix of group {g} has {M.shape[0]} rows "
                    f"but the group has {len(row_idx)} observations"
                )
            rows.append(np.asarray(row_idx)[M.row])
            cols.append(M.col + offset)
            vals.append(M.data)
            groups.append(np.full(M.shape[1], g, dtype=np.int64))
            names.extend(str(c) for c in colnames)
            offset += M.shape[1]
        cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)
        Z = sp.csc_matrix((cat(vals, float), (cat(rows, np.int64), cat(cols, np.int64))), shape=(n, offset))
        return cls(name, Z, cat(groups, np.int64), tuple(names))
