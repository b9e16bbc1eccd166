"""Starting values for large crossed fits from a pilot fit on a subsample of the levels.

On a crossed design the cost of one deviance evaluation is set by the dense block of the smaller crossed factors
(order q2, Cholesky ~q2^3/3) and by the level pairs of the rows; BOBYQA from lme4's start spends 130-180 of them.
A fit on the rows of a tenth of those factors' levels estimates the same variance parameters (to ~1/sqrt(2 x
levels kept), 5-10%) at a small fraction of the cost per evaluation (InstEval-sized: q2 1,156 -> ~140), and from
a start that close, with a first step of 10%, the full fit needs far fewer evaluations (docs/performance-scale.md
has the counts).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack

from ..core import compiled
from ..core.gradient import level_pair_products
from ..core.terms import RandomTerm, level_entries
from .optimize import warm_step
from .scoring import fit_by_scoring
from .stages import build_system, optimize_system

__all__ = [
    "pilot_wanted",
    "pilot_start",
    "pilot_levels",
    "fit_pilot",
    "estimable",
    "moment_start",
    "moment_starts",
    "components_start",
    "components_starts",
    "covariance_start",
    "PILOT_MIN_DENSE_ORDER",
]

# Below this many columns after the first term (the block that fills in: dense in the Schur form) an evaluation
# costs milliseconds and a pilot cannot pay for itself.
PILOT_MIN_DENSE_ORDER = 500
# Terms after the first with at least this many levels are subsampled (fewer levels: kept whole, since their
# variance would be estimated from too few).
PILOT_MIN_LEVELS = 300
PILOT_FRACTION = 0.1
PILOT_MIN_KEPT_LEVELS = 120
# The pilot's result only has to start the full fit within ~10%: no polish, and a loose stopping rule.
PILOT_FTOL = 1e-2
PILOT_TOLERANCE = 1e-2  # the same for the Newton steps (scoring.py): theta within ~1% of the pilot's optimum
PILOT_SEED = 20261128  # fixed: the same data give the same pilot, and bit-identical fits


def pilot_wanted(method: str, free=None, system=None) -> bool:
    """A method that uses a start (not the scipy optimizers) and no entries held fixed: pipeline.fit_system's
    gate, for fits from the default start (the doors offer a pilot only then). Not where "auto" takes L-BFGS-B
    with the exact gradient (`system` supports it and not the scoring steps): from lme4's start it took about the
    evaluations the pilot saves (1,000,000-row slopes: 27 against the pilot's 1.5 s and 20; 30,000 rows: 22 either
    way), and on a Dask cluster a pilot costs a pass over the rows."""
    if system is not None and method == "auto" and system.supports_gradient and not system.supports_scoring:
        return False
    return free is None and method in ("auto", "bobyqa")


def pilot_start(system, X: np.ndarray, y: np.ndarray, terms: list[RandomTerm], weights, reml: bool):
    """(theta, first step) for the full fit from a pilot fit on a level subsample, or None where it cannot pay
    (a small block after the first term, nothing to subsample, or a pilot design that is not estimable)."""
    kept = pilot_levels(system)
    if kept is None:
        return None
    keep_rows = np.ones(X.shape[0], dtype=bool)
    for term, levels in zip(terms, kept):
        if levels is not None:
            chosen = np.zeros(term.n_levels, dtype=bool)
            chosen[levels] = True
            level = _row_levels(term, X.shape[0])
            keep_rows &= (level >= 0) & chosen[np.maximum(level, 0)]
    rows = np.flatnonzero(keep_rows)
    pilot_terms = [_restricted(t, rows) for t in terms]
    Xp = X[rows]
    if not estimable(Xp.T @ Xp, rows.shape[0]) or any(t.n_levels < 2 for t in pilot_terms):
        return None
    # The Schur form suits the pilot's smaller copy of a system that uses it (timing the candidates cost 0.9 s
    # of 2.1 s); otherwise the pilot's system picks its own.
    pilot = build_system(
        Xp,
        y[rows],
        pilot_terms,
        weights=None if weights is None else weights[rows],
        factorization="schur" if system.factorization_mode == "schur" else None,
    )
    return fit_pilot(pilot, reml)


def pilot_levels(system):
    """The levels a pilot keeps, per term in fit order (an index array, or None to keep them all), or None
    where no pilot pays: the terms after the first have fewer than PILOT_MIN_DENSE_ORDER columns (the block
    that fills in), that block does not fill in (system.densely_linked), or none of them has enough levels to
    subsample."""
    n_levels = [n for n, _ in system.relcov.blocks]
    first = n_levels[0] * system.relcov.blocks[0][1].k
    # Nested designs fill nothing and evaluate in a millisecond: the seed's nested fit took 40 ms with a pilot and
    # 32 without (35 evaluations instead of 32).
    if system.relcov.q - first < PILOT_MIN_DENSE_ORDER or not system.densely_linked:
        return None
    rng = np.random.default_rng(PILOT_SEED)
    kept = [None] * len(n_levels)
    for i, n in enumerate(n_levels[1:], start=1):
        if n >= PILOT_MIN_LEVELS:
            size = max(PILOT_MIN_KEPT_LEVELS, int(np.ceil(PILOT_FRACTION * n)))
            kept[i] = np.sort(rng.choice(n, size=size, replace=False))
    return kept if any(k is not None for k in kept) else None


def estimable(XtX: np.ndarray, n_rows: int) -> bool:
    """Whether a pilot's rows can estimate the fixed effects (enough rows, X'X of full rank)."""
    p = XtX.shape[0]
    return n_rows > 2 * p and (p == 0 or np.linalg.matrix_rank(XtX) == p)


def fit_pilot(pilot_system, reml: bool):
    """(theta, first step) from a loose fit of the pilot's system, or None if it did not converge."""
    opt = None
    if pilot_system.supports_scoring:  # 3-4 Newton steps instead of ~35 BOBYQA evaluations (InstEval)
        with pilot_system.threads():
            opt, _, _ = fit_by_scoring(pilot_system, pilot_system.relcov.start(), reml, tolerance=PILOT_TOLERANCE)
    if opt is None:
        opt = optimize_system(pilot_system, reml=reml, polish=False, ftol=PILOT_FTOL)
    if not opt.converged or not np.all(np.isfinite(opt.theta)):
        return None
    return opt.theta, warm_step(opt.theta)


def _row_levels(term: RandomTerm, n: int) -> np.ndarray:
    """Each row's level of `term` (-1 for a row with no entry in it, e.g. a slope-only term at x = 0)."""
    _, rows, level, _ = level_entries(term.Z, term.k)
    out = np.full(n, -1, dtype=np.int64)
    out[rows] = level
    return out


def _restricted(term: RandomTerm, rows: np.ndarray) -> RandomTerm:
    """The term on the kept `rows` (ascending), with the levels that no kept row has removed: Z's entries in kept
    rows, renumbered, keep their CSC order (scipy's row slice through CSR took 4.3 s a term at 32,000,000 rows)."""
    Z = sp.csc_matrix(term.Z)
    nnz = int(Z.indptr[-1])
    new_row = np.full(Z.shape[0], -1, dtype=np.int64)
    new_row[rows] = np.arange(rows.shape[0])
    at = new_row[Z.indices[:nnz]]
    kept = at >= 0
    counted = np.concatenate([[0], np.cumsum(kept)])
    per_column = counted[Z.indptr[1:]] - counted[Z.indptr[:-1]]
    per_level = per_column.reshape(-1, term.k).sum(axis=1)
    present = np.flatnonzero(per_level > 0)
    columns = (present[:, None] * term.k + np.arange(term.k)[None, :]).ravel()
    indptr = np.concatenate([[0], np.cumsum(per_column[columns])])
    restricted = sp.csc_matrix((Z.data[:nnz][kept], at[kept], indptr), shape=(rows.shape[0], columns.shape[0]))
    labels = [term.level_labels[i] for i in present]
    return RandomTerm(term.name, restricted, int(present.shape[0]), term.template, tuple(labels), term.column_names)


# moment_start: the levels' coefficient covariance is used only where its correlation matrix's smallest eigenvalue
# is at least this (a covariance near singular is where the optimum has a variance at or near zero, and L-BFGS-B
# reached it faster from lme4's start: Exam 43 against 85 evaluations, Dialyzer 54 against 85), or lifted to it
# for the exact Hessian's Newton steps ...
MOMENT_MIN_CORRELATION_EIGENVALUE = 0.05
# Lifted for the exact Hessian, a correlation matrix's eigenvalues below that floor are put at this one: near the
# boundary, where such optima lie, the Newton steps take a variance to zero from closer (docs/lme4.md)
MOMENT_LIFTED_EIGENVALUE = 1e-3
# ... and from at least this many levels with a least-squares fit of their own.
MOMENT_MIN_LEVELS = 5
# _fixed_share's rank: singular values below this fraction of the largest count as zero
FIXED_SHARE_RANK_TOLERANCE = 1e-9


def moment_start(
    X: np.ndarray,
    y: np.ndarray,
    terms: list[RandomTerm],
    weights=None,
    beta: np.ndarray | None = None,
    floor_near_singular: bool = False,
    reml: bool = True,
) -> np.ndarray | None:
    """theta (reported coordinates) for one random term with slopes (k > 1, a growth curve's), or lme4's || of
    one (scalar terms of one grouping factor), from the levels' own least-squares fits to the residuals of the
    fixed part: Var(b) ~ the covariance of the levels' coefficients less their average sampling covariance
    sigma^2 (V_l'V_l)^{-1}, sigma^2 pooled from their residuals (a moment estimator, as Swamy's), in place of lme4's
    theta = 1 (evaluations from each: docs/lme4.md). None where it does not apply: terms of several groupings, one
    scalar term alone, too few levels with k + 1 rows and a full-rank fit, a variance estimated <= 0, or a
    near-singular estimate of a correlated term's (MOMENT_MIN_CORRELATION_EIGENVALUE) unless `floor_near_singular`,
    which takes the criterion's optimum over positive semidefinite covariances instead (_cone_optimum: on the
    boundary where the moments' estimate is outside) with its correlation's eigenvalues lifted to
    MOMENT_LIFTED_EIGENVALUE (for Newton steps with the exact Hessian). `beta`: the fixed part's (weighted)
    least-squares coefficients, where known (CrossProducts.beta_ols). `reml` False: ML's moments (the levels'
    spread over m, not REML's m less the fixed effects' share); on balanced growth curves each is its criterion's
    optimum."""
    # one grouping: one term with slopes, or lme4's || (its columns as scalar terms of the same factor)
    if not terms or sum(t.k for t in terms) < 2 or any(t.n_levels != terms[0].n_levels for t in terms):
        return None
    n1, n = terms[0].n_levels, X.shape[0]
    row_level, columns = None, []
    for term in terms:
        levels = term.row_level
        if levels is None:
            return None
        if row_level is None:
            row_level = levels
        else:  # the same factor: where both terms reach a row, the same level (a slope's term skips its zeros)
            both = (levels >= 0) & (row_level >= 0)
            if not np.array_equal(levels[both], row_level[both]):
                return None
            row_level = np.maximum(row_level, levels)
        values = np.zeros((n, term.k))
        if term.k == 1 and sp.isspmatrix_csc(term.Z):  # (each entry's row is all a scalar term's column needs)
            values[term.Z.indices, 0] = term.Z.data
        else:
            Z, rows, _, column = level_entries(term.Z, term.k)
            values[rows, column] = Z.data
        columns.append(values)
    assert row_level is not None
    V = np.hstack(columns) if len(columns) > 1 else columns[0]
    k = V.shape[1]
    r = np.asarray(y, dtype=float)
    Xw = np.asarray(X, dtype=float)
    if weights is not None:
        root = np.sqrt(np.asarray(weights, dtype=float))
        V, r, Xw = V * root[:, None], r * root, Xw * root[:, None]
    if Xw.shape[1]:
        r = r - Xw @ (np.linalg.lstsq(Xw, r, rcond=None)[0] if beta is None else beta)
    if row_level.size and row_level.min() < 0:  # rows in no level (a slope's zeros): left out
        inside = row_level >= 0
        row_level, V, r, Xw = row_level[inside], V[inside], r[inside], Xw[inside]
    found = _level_moments(row_level, V, r, Xw, n1)
    if found is None:
        return None
    # the levels' spread about their mean over m (ML's) or m less the fixed effects' share of the levels'
    # coefficients (REML's: over m - 1 where the fixed part is the term's columns, m - 2 where a grouping-level
    # covariate doubles them, as Orthodont's Sex): on a balanced design either is its criterion's optimum. ML's
    # over m - 1 where over m a variance would vanish (nlme's Dialyzer), unless the cone's optimum below is taken.
    between, sampling, m, stacked, (residual_sum, df, spread, top) = found
    sigma2 = residual_sum / df
    divisor = m - _fixed_share(stacked, k) if reml else m
    covariance = between / divisor - sampling
    uncorrelated = all(t.template.is_diagonal for t in terms)  # lme4's || (its terms hold no correlation)

    # Where the moments' estimate is not a covariance (a variance <= 0, a correlation's eigenvalue < 0), the
    # criterion's optimum over semidefinite ones (_cone_optimum), where every level has the same design; where levels
    # are measured at their own times the criterion is not the likelihood, and that start took more evaluations than
    # the others (random growth curves: docs/performance-scale.md, twenty-second session).
    def to_cone() -> bool:  # (asked only where the moments are not a covariance)
        if uncorrelated or not floor_near_singular or m < n1:  # (every level usable)
            return False
        return spread <= 1e-9 * top

    if not reml and not np.all(np.diag(covariance) > 0) and not to_cone():
        divisor = m - 1
        covariance = between / divisor - sampling
    variances = np.diag(covariance)
    if not (sigma2 > 0 and np.all(np.isfinite(covariance))):
        return None
    # moment criterion (the likelihood's on a balanced growth curve): a [log|Sigma + s W| + tr((Sigma + s W)^-1 S)] +
    # c log s + R / s, with (S, W, a, R, c) as follows
    criterion = (between / divisor, sampling / sigma2, divisor, residual_sum, df)
    cone = None
    if not np.all(variances > 0):  # (a correlated term's variances may be positive there: datasets' CO2)
        if not to_cone():
            return None
        cone = _cone_optimum(*criterion)
        if cone is None or not np.all(np.diag(cone[0]) > 0):
            return None
        covariance, sigma2 = cone
        variances = np.diag(covariance)
    if uncorrelated:  # the diagonal model's own optimum, not the correlated estimate's diagonal
        found = _diagonal_optimum(*criterion, variances, sigma2)
        if found is not None:  # (a variance at zero starts at COMPONENTS_MIN_RATIO: at 0 its slope vanishes)
            variances, sigma2 = np.where(found[0] > 0, found[0], COMPONENTS_MIN_RATIO * found[1]), found[1]
            covariance = np.diag(variances)
    scales = np.sqrt(variances)
    correlation = covariance / np.outer(scales, scales)
    smallest = 1.0 - abs(correlation[0, 1]) if k == 2 else np.linalg.eigvalsh(correlation)[0]
    # (lme4's ||: its terms hold no correlation, so none is too near +-1 for their start, the variances' diagonal)
    if smallest < MOMENT_MIN_CORRELATION_EIGENVALUE and not uncorrelated:
        if not floor_near_singular:
            return None
        if cone is None and to_cone():
            cone = _cone_optimum(*criterion)
            if cone is not None and np.all(np.diag(cone[0]) > 0):  # the criterion's optimum on the boundary, lifted
                covariance, sigma2 = cone
                scales = np.sqrt(np.diag(covariance))
                correlation = covariance / np.outer(scales, scales)
        covariance = _lifted_correlation(*np.linalg.eigh(correlation)) * np.outer(scales, scales)
    relative = covariance / sigma2
    thetas, at = [], 0
    for term in terms:  # each term's block of the covariance, as its template holds it
        block = relative[at : at + term.k, at : at + term.k]
        at += term.k
        if term.k == 1:
            T = np.sqrt(block)
        elif term.template.is_diagonal:
            T = np.diag(np.sqrt(np.diag(block)))
        elif term.k == 2:  # (in closed form: numpy's call costs more than the arithmetic)
            root = math.sqrt(block[0, 0])
            below = block[1, 0] / root
            T = np.array([[root, 0.0], [below, math.sqrt(max(block[1, 1] - below * below, 0.0))]])
        else:
            T = np.linalg.cholesky(block)
        thetas.append(term.template.theta_of(T))
    return np.concatenate(thetas)


def moment_starts(
    G11, ZtX, Zty, yty, n: int, reml: bool = True, diagonal: bool = False
) -> tuple[np.ndarray, np.ndarray] | None:
    """moment_start's estimate for many responses of one design at once, from their sums alone: one k x k term
    (k > 1) whose levels' blocks G11 (n1, k, k) are all usable, every row in a level. With Z_l'r (Zty: n1 k x R,
    level-major) and r'r (yty: R) of each response's least-squares residuals r, the levels' coefficients are
    G_l^{-1} Z_l'r and their residual sum of squares r'r less sum_l r'Z_l G_l^{-1} Z_l'r, on n - n1 k degrees of
    freedom. (factors: R x k x k, the lower Cholesky factors of covariance / sigma^2, ok: R, where that is a
    covariance, positive definite), or None where not every level is usable (the responses then start elsewhere).
    `diagonal` (lme4's `(x || g)`): the factors diag(sqrt(variances)), ok where each is positive (the correlated
    estimate's diagonal, from which moment_start goes on to the diagonal model's own optimum).
    On a balanced growth curve each is its response's optimum (docs/performance-scale.md, thirty-second session)."""
    n1, k = G11.shape[0], G11.shape[1]
    df = n - n1 * k
    if k < 2 or df <= 0 or n1 < max(MOMENT_MIN_LEVELS, k + 1):
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        smallest, largest = _extreme_eigenvalues(G11)
        if not np.all(smallest > 1e-10 * np.maximum(largest, 1e-300)):
            return None
        inverse = _inverses(G11)
        cross = Zty.reshape(n1, k, -1)
        coefficients = np.matmul(inverse, cross)  # (n1, k, R)
        sigma2 = (yty - np.einsum("lar,lar->r", coefficients, cross)) / df
        centred = coefficients - coefficients.mean(axis=0)
        between = np.einsum("lar,lbr->rab", centred, centred)
        divisor = n1 - _fixed_share(np.matmul(inverse, ZtX).reshape(n1 * k, -1), k) if reml else n1
        relative = between / (divisor * sigma2[:, None, None]) - inverse.mean(axis=0)
        if diagonal:
            variances = np.diagonal(relative, axis1=1, axis2=2)
            ok = np.all(variances > 0, axis=1)
            factors = np.sqrt(np.maximum(variances, 0.0))[:, :, None] * np.eye(k)
        else:
            factors, ok = _lower_factors(relative)
    return factors, ok & (sigma2 > 0)


def _lower_factors(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The lower Cholesky factor of each symmetric matrix of the stack M (R, k, k), column by column over the stack,
    and which were positive definite (the others' factors are not to be used)."""
    k = M.shape[1]
    L = np.zeros(M.shape)
    ok = np.ones(M.shape[0], dtype=bool)
    for j in range(k):
        d = M[:, j, j] - np.einsum("ra,ra->r", L[:, j, :j], L[:, j, :j])
        ok &= d > 0
        L[:, j, j] = root = np.sqrt(np.where(d > 0, d, 1.0))
        for i in range(j + 1, k):
            L[:, i, j] = (M[:, i, j] - np.einsum("ra,ra->r", L[:, i, :j], L[:, j, :j])) / root
    return L, ok


def _cone_optimum(S, W, a, R, c) -> tuple[np.ndarray, float] | None:
    """(Sigma, s) minimising a [log|Sigma + s W| + tr((Sigma + s W)^-1 S)] + c log s + R / s over positive semidefinite
    Sigma and s > 0 (moment_start's criterion, the REML or ML one on a balanced growth curve): with W = L L' and
    L^-1 S L^-T = U diag(lambda) U', Sigma = L U diag(max(lambda - s, 0)) U' L' (Sigma + s W's eigenvalues in those
    coordinates floored at s), and s = (a sum of the floored lambdas + R) / (a (their number) + c), the floored set
    and s found together. None where W is not positive definite."""
    try:
        root = np.linalg.cholesky(W)
    except np.linalg.LinAlgError:
        return None
    inverse_root = np.linalg.inv(root)
    eigenvalues, vectors = np.linalg.eigh(inverse_root @ S @ inverse_root.T)
    s = float(R / c)
    for _ in range(eigenvalues.size + 1):
        floored = eigenvalues <= s
        s_next = float((a * eigenvalues[floored].sum() + R) / (a * floored.sum() + c))
        if np.array_equal(eigenvalues <= s_next, floored):
            s = s_next
            break
        s = s_next
    spread = root @ vectors
    return (spread * np.maximum(eigenvalues - s, 0.0)) @ spread.T, s


def _lifted_correlation(eigenvalues: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The correlation matrix of eigendecomposition (eigenvalues, vectors) with its eigenvalues below
    MOMENT_LIFTED_EIGENVALUE lifted to it, taken back to a unit diagonal (moment_start's and covariance_start's)."""
    floored = (vectors * np.maximum(eigenvalues, MOMENT_LIFTED_EIGENVALUE)) @ vectors.T
    unit = np.sqrt(np.diag(floored))
    return floored / np.outer(unit, unit)


def _diagonal_optimum(S, W, a, R, c, d, s) -> tuple[np.ndarray, float] | None:
    """(d, s) minimising a [log|D + s W| + tr((D + s W)^-1 S)] + c log s + R / s over diagonal D = diag(d) >= 0 and
    s > 0, by Newton steps from (d, s): the levels' coefficients' 2 x 2 spread S (over a), their average
    (V_l'V_l)^-1 W, and the levels' residual sum of squares R on c degrees of freedom. On a balanced growth curve
    this is the criterion (ML over m, REML over m less the fixed share) with the covariance held diagonal: lme4's
    ||. A variance the steps take to zero stays there while its slope points outward (an active set: mlmRev's
    Early `(age || id)`, whose optimum has no age variance). None where the steps do not settle, or k is not 2. In
    Python's floats, in closed form: numpy's calls on 2 x 2 matrices cost far more than the arithmetic."""
    if len(d) != 2:
        return None
    (s11, s12), (_, s22) = S.tolist()
    (w11, w12), (_, w22) = W.tolist()
    R, c = float(R), float(c)

    def parts(d1, d2, s):
        a11, a12, a22 = d1 + s * w11, s * w12, d2 + s * w22  # Sigma = D + s W
        det = a11 * a22 - a12 * a12
        if not (a11 > 0 and det > 0):
            return None
        p11, p12, p22 = a22 / det, -a12 / det, a11 / det  # P = Sigma^-1
        # Q = P S P; PW = P W, QW = Q W (not symmetric)
        t11, t12, t21, t22 = p11 * s11 + p12 * s12, p11 * s12 + p12 * s22, p12 * s11 + p22 * s12, p12 * s12 + p22 * s22
        q11, q12, q22 = t11 * p11 + t12 * p12, t11 * p12 + t12 * p22, t21 * p12 + t22 * p22
        u11, u12, u21, u22 = p11 * w11 + p12 * w12, p11 * w12 + p12 * w22, p12 * w11 + p22 * w12, p12 * w12 + p22 * w22
        v11, v12, v21, v22 = q11 * w11 + q12 * w12, q11 * w12 + q12 * w22, q12 * w11 + q22 * w12, q12 * w12 + q22 * w22
        value = a * (math.log(det) + t11 + t22) + c * math.log(s) + R / s
        g = (a * (p11 - q11), a * (p22 - q22), a * (u11 + u22 - v11 - v22) + c / s - R / (s * s))
        # second derivatives: a [2 tr(Q E_i P E_j) - tr(P E_i P E_j)] with E = e1 e1', e2 e2', W
        h12 = a * (2 * q12 * p12 - p12 * p12)
        h13 = a * (2 * (v11 * p11 + v12 * p12) - (u11 * p11 + u12 * p12))  # (QWP)_11, (PWP)_11
        h23 = a * (2 * (v21 * p12 + v22 * p22) - (u21 * p12 + u22 * p22))
        twice = v11 * u11 + v12 * u21 + v21 * u12 + v22 * u22  # tr(QW PW)
        square = u11 * u11 + 2 * u12 * u21 + u22 * u22  # tr(PW PW)
        h33 = a * (2 * twice - square) - c / (s * s) + 2 * R / s**3
        H = ((a * (2 * q11 * p11 - p11 * p11), h12, h13), (h12, a * (2 * q22 * p22 - p22 * p22), h23), (h13, h23, h33))
        return value, g, H

    x = [float(d[0]), float(d[1]), float(s)]
    current = parts(*x)
    active = [False, False, False]  # variances held at zero
    for _ in range(DIAGONAL_OPTIMUM_MAX_STEPS):
        if current is None:
            return None
        value, g, H = current
        for i in (0, 1):  # a zero variance whose slope points inward is released
            if active[i] and g[i] < 0:
                active[i] = False
        # the Newton step in the free entries; where H is not positive definite (far from the minimum) with its
        # diagonal raised until it is, a step between Newton's and the gradient's (Levenberg's)
        if any(active):
            free = [i for i in range(3) if not active[i]]
            sub, rhs = [[H[i][j] for j in free] for i in free], [-g[i] for i in free]
        else:  # (the usual case: H and g as they are)
            free, sub, rhs = [0, 1, 2], H, [-g[0], -g[1], -g[2]]
        solved = _small_spd_solve(sub, rhs)
        for power in range(-6, 4):
            if solved is not None:
                break
            scale = max(abs(sub[i][i]) for i in range(len(free)))
            shift = scale * 10.0**power
            solved = _small_spd_solve(
                [[v + shift * (i == j) for j, v in enumerate(row)] for i, row in enumerate(sub)], rhs
            )
        if solved is None:
            return None
        step = [0.0, 0.0, 0.0]
        for i, v in zip(free, solved):
            step[i] = v
        if all(abs(dx) <= DIAGONAL_OPTIMUM_TOLERANCE * xi for dx, xi in zip(step, x)):
            return np.array(x[:2]), x[2]
        # the longest step that keeps the variances >= 0: a variance it reaches zero at is held there
        t, hits = 1.0, None
        for i in (0, 1):
            if step[i] < 0 and x[i] + step[i] <= 0:
                reach = x[i] / -step[i]
                if reach < t:
                    t, hits = reach, i
        while True:  # halved until no worse (and s > 0)
            trial = [xi + t * dx for xi, dx in zip(x, step)]
            if hits is not None:
                trial[hits] = 0.0
            found = parts(*trial) if trial[2] > 0 else None
            if found is not None and found[0] <= value + 1e-13 * abs(value):  # (rounding, at the end)
                break
            t, hits = t / 2, None
            if t < 1e-3:
                return None
        if hits is not None:
            active[hits] = True
        x, current = trial, found
    return None


def _small_spd_solve(A: list, b: list) -> list | None:
    """A^-1 b for a symmetric positive definite A of order 1 to 3 (lists), by its Cholesky factor written out (a
    loop over the entries cost ten times as much, several times a start); None where A is not positive definite."""
    n = len(b)
    if not A[0][0] > 0:
        return None
    l11 = math.sqrt(A[0][0])
    z1 = b[0] / l11
    if n == 1:
        return [z1 / l11]
    l21 = A[1][0] / l11
    pivot = A[1][1] - l21 * l21
    if not pivot > 0:
        return None
    l22 = math.sqrt(pivot)
    z2 = (b[1] - l21 * z1) / l22
    if n == 2:
        x2 = z2 / l22
        return [(z1 - l21 * x2) / l11, x2]
    l31 = A[2][0] / l11
    l32 = (A[2][1] - l31 * l21) / l22
    pivot = A[2][2] - l31 * l31 - l32 * l32
    if not pivot > 0:
        return None
    l33 = math.sqrt(pivot)
    x3 = (b[2] - l31 * z1 - l32 * z2) / l33 / l33
    x2 = (z2 - l32 * x3) / l22
    return [(z1 - l21 * x2 - l31 * x3) / l11, x2, x3]


def _level_moments(codes: np.ndarray, V: np.ndarray, r: np.ndarray, X: np.ndarray, n1: int):
    """Each level's least-squares fit of the residuals r on its own columns V (levels `codes`, rows with a level),
    over the levels with more than k rows and a well-conditioned V_l'V_l: (between: their coefficients' centred
    cross-products, sampling: sigma^2 times the mean of their (V_l'V_l)^-1, m: their number, stacked: their
    (V_l'V_l)^-1 V_l'X_l, (residual sum of squares, its degrees of freedom, max |(V_l'V_l)^-1 - the first's|, max
    |the first's|)), by the compiled pass (kernels.level_moments) or numpy's while it is compiled; None where fewer
    than max(MOMENT_MIN_LEVELS, k + 1) levels are usable."""
    k, p = V.shape[1], X.shape[1]
    kernel = compiled.kernel("level_moments")
    if kernel is not None:
        between, sampling, stacked, sums = np.empty((k, k)), np.empty((k, k)), np.empty((n1 * k, p)), np.empty(4)
        m = kernel(codes.astype(np.int64, copy=False), V, r, X, n1, between, sampling, stacked, sums)
        if m < max(MOMENT_MIN_LEVELS, k + 1):
            return None
        return between, sampling, m, stacked[: m * k], tuple(float(v) for v in sums)
    counts = np.bincount(codes, minlength=n1)
    gram = np.empty((n1, k, k))
    for a in range(k):
        for b in range(a + 1):
            gram[:, a, b] = gram[:, b, a] = np.bincount(codes, V[:, a] * V[:, b], minlength=n1)
    cross = np.stack([np.bincount(codes, V[:, a] * r, minlength=n1) for a in range(k)], axis=1)
    squares = np.bincount(codes, r * r, minlength=n1)
    with np.errstate(divide="ignore", invalid="ignore"):
        smallest, largest = _extreme_eigenvalues(gram)
        usable = (counts > k) & (smallest > 1e-10 * np.maximum(largest, 1e-300))
    m = int(usable.sum())
    if m < max(MOMENT_MIN_LEVELS, k + 1):
        return None
    inverse = _inverses(gram[usable])
    coefficients = np.matmul(inverse, cross[usable][:, :, None])[:, :, 0]
    residual = squares[usable] - np.sum(coefficients * cross[usable], axis=1)
    sigma2 = float(residual.sum() / (counts[usable] - k).sum())
    centred = coefficients - coefficients.mean(axis=0)
    crossX = np.empty((n1, k, p))
    for a in range(k):
        for j in range(p):
            crossX[:, a, j] = np.bincount(codes, V[:, a] * X[:, j], minlength=n1)
    stacked = np.matmul(inverse, crossX[usable]).reshape(m * k, p)
    totals = (
        float(residual.sum()),
        float((counts[usable] - k).sum()),
        float(np.abs(inverse - inverse[0]).max()),
        float(np.abs(inverse[0]).max()),
    )
    return centred.T @ centred, sigma2 * inverse.mean(axis=0), m, stacked, totals


def _fixed_share(stacked: np.ndarray, k: int) -> float:
    """The fixed effects' share of each level coefficient's degrees of freedom: the rank of the fixed columns'
    projections on the levels' own columns (stacked over the usable levels: (V_l'V_l)^-1 V_l'X_l), over k; at
    least 1 (the mean the moments take out)."""
    if stacked.shape[1] == 0:
        return 1.0
    singular = np.linalg.svd(stacked, compute_uv=False)
    rank = int(np.count_nonzero(singular > FIXED_SHARE_RANK_TOLERANCE * singular[0])) if singular[0] > 0 else 0
    return max(rank / k, 1.0)


def _extreme_eigenvalues(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The smallest and largest eigenvalue of each symmetric k x k matrix of the stack M (2 x 2 in closed form, where
    numpy's batched call costs more than the arithmetic)."""
    if M.shape[1] == 2:
        mean, half = (M[:, 0, 0] + M[:, 1, 1]) / 2, (M[:, 0, 0] - M[:, 1, 1]) / 2
        radius = np.sqrt(half * half + M[:, 0, 1] * M[:, 1, 0])
        return mean - radius, mean + radius
    eigenvalues = np.linalg.eigvalsh(M)
    return eigenvalues[:, 0], eigenvalues[:, -1]


def _inverses(M: np.ndarray) -> np.ndarray:
    """The inverse of each k x k matrix of the stack M (2 x 2 in closed form, as _extreme_eigenvalues)."""
    if M.shape[1] != 2:
        return np.linalg.inv(M)
    out = np.empty_like(M)
    out[:, 0, 0], out[:, 1, 1] = M[:, 1, 1], M[:, 0, 0]
    out[:, 0, 1], out[:, 1, 0] = -M[:, 0, 1], -M[:, 1, 0]
    return out / (M[:, 0, 0] * M[:, 1, 1] - M[:, 0, 1] * M[:, 1, 0])[:, None, None]


# _diagonal_optimum's Newton steps at most, and where they stop (each entry's step, relative)
DIAGONAL_OPTIMUM_MAX_STEPS = 20
DIAGONAL_OPTIMUM_TOLERANCE = 1e-10
# components_start: a relative variance estimated below this is started here instead (at exactly 0 the deviance's
# gradient in that entry vanishes, a saddle the Newton steps must leave by a probe)
COMPONENTS_MIN_RATIO = 1e-4
COMPONENTS_MAX_Q = 1000
# _ml_strata's Steffensen steps at most (they stop where a plain round moves lambda_0 by at most 1e-13 of it)
ML_STRATA_MAX_ROUNDS = 50
# The ML start's correction (components_start) where X takes one dimension (the mean), within this, of every term's
# level means: nlme's Assay, whose fixed sample * dilut takes 6 of Block:sample's, had its ML optimum in the REML
# moments (1 evaluation) and took 5 from the corrected ones; without fixed effects ML's criterion is REML's.
ML_CORRECTION_ABSORBED_SPREAD = 0.5
COMPONENTS_DENSE_MAX_Q = 300
# Above COMPONENTS_MAX_Q the moments stand in for the pilot where the design is scored (variance components in the
# Schur form) and its block after the first term, whose inverse each scored point takes, has at most this order:
# InstEval (1,156) 8 ms of moments against the pilot's 30, the same 6 points; skewed crossed designs with 800 and
# 2,000 such columns 5 points where the pilot led to 6. With 5,000 (35,000 levels, 1,000,000 rows) the moments led
# to 5 points where the pilot's start took 4, each worth more than the pilot: there the pilot stays.
COMPONENTS_OVER_PILOT_MAX_ORDER = 2500
COMPONENTS_OVER_PILOT_MAX_Q = 50_000


def components_over_pilot(system) -> bool:
    """Whether components_start's moments replace the pilot (see COMPONENTS_OVER_PILOT_MAX_ORDER): in every door
    (pipeline.fit_system), so that a Dask fit starts where the in-memory one does."""
    rc = system.relcov
    if not rc.blocks or not system.supports_scoring or rc.q > COMPONENTS_OVER_PILOT_MAX_Q:
        return False
    return rc.after_first <= COMPONENTS_OVER_PILOT_MAX_ORDER


def components_start(system, reml: bool = True, max_q: int = COMPONENTS_MAX_Q) -> np.ndarray | None:
    """theta (reported coordinates) for variance components (every term scalar) from moments of the
    residuals' level means, as the ANOVA estimators do. r = (I - H) y is the least-squares residual (H: X's hat
    matrix), so E[r r'] = (I - H) (sum_k sigma_k^2 Z_k Z_k' + sigma^2 I) (I - H); with M = Z'(I - H)Z (from the
    cross-products), d = diag(Z'Z) and m_l = (Z'r)_l / d_l for the levels l of term j:

        mean_l E[m_l^2] = sum_k sigma_k^2 mean_l sum_l' M_ll'^2 / d_l^2 (l' in term k) + sigma^2 mean_l M_ll / d_l^2
        E[r'r]          = sum_k sigma_k^2 tr(M_kk) + sigma^2 (n - p)

    one linear equation per term and one for the total, solved for the variances (a relative variance below
    COMPONENTS_MIN_RATIO starts there; a single variance estimated <= 0 starts at 0, which the optimizer's boundary
    check leaves where the deviance falls into the interior). On balanced designs this is the ANOVA estimate, close
    to REML's optimum. For ML (`reml` False) on nested terms the expectations are taken as if the fixed effects were
    known, M = Z'Z and n for n - p, as ML's own equations do: on a balanced one-way design this is ML's optimum
    ((SSA / a - MSE) / n for the level variance). Crossed terms keep the first form (without the projection a
    term's means would carry the other's variance), and for ML the expected mean squares lambda_k = sigma^2 +
    m_k sigma_k^2 (m_k rows a level) and sigma^2 are taken to the solution of ML's equations on a balanced crossed
    design, where the mean's stratum ties them together (_ml_strata; on such a design ML's optimum). None where it
    does not apply (a term with slopes, more than `max_q` columns, a level with no weight, a residual variance
    <= 0)."""
    cross = system.cross
    found = components_starts(system, cross.Zty[:, None], np.array([cross.yty]), reml, max_q)
    if found is None or not found[1][0]:
        return None
    return system.relcov.reported_theta(found[0][0])


def components_starts(system, Zty, yty, reml: bool = True, max_q: int = COMPONENTS_MAX_Q):
    """components_start for many responses of the system's design at once (the columns of Zty: q x R, yty: R, their
    least-squares-shifted sums): its equations' matrix is the design's, their right-hand sides each response's.
    (working: R x n_theta, the optimizer's coordinates; ok: R, False where sigma^2 is not positive), or None where
    components_start does not apply to the design."""
    rc, cross = system.relcov, system.cross
    if not rc.blocks or any(template.k != 1 for _, template in rc.blocks) or rc.q > max_q:
        return None
    # M = G - C K C' (G = Z'Z, sparse; C = Z'X; K = (X'X)^{-1}) is never formed: per row l and term k,
    # sum_{l' in k} M_ll'^2 = sum G_ll'^2 - 2 (CK)_l . (G C)_l^(k) + (CK)_l S_k (CK)_l', S_k = C_k'C_k
    # (dense up to COMPONENTS_DENSE_MAX_Q columns: scipy's sparse operations cost ~20 us a call, 210 us a start)
    J = len(rc.blocks)
    # one term: G is diagonal (a row reaches one level), its products d-weighted rows
    # (Z'Z stores both triangles: its CSC transposed is itself as a CSR, without a conversion)
    G = None if J == 1 else cross.ZtZ.toarray() if rc.q <= COMPONENTS_DENSE_MAX_Q else sp.csc_matrix(cross.ZtZ).T
    d = cross.ZtZ.diagonal() if G is None else G.diagonal()
    if not np.all(d > 0):
        return None
    E = rc.membership  # the per-term means below are E' (...) / sizes
    sizes = E.sum(axis=0)
    if G is None:
        squares = (d * d)[:, None]
    else:
        squares = np.asarray((G * G if isinstance(G, np.ndarray) else G.power(2)) @ E)
    diagonal = d.copy()
    known_mean = not reml and (G is None or _nested(G, rc.column_slices))
    if cross.p and not known_mean:
        # (LAPACK's posv as it is: numpy's solve costs a small fit more in its wrapper than in the solve)
        _, CKt, info = lapack.dposv(cross.XtX, cross.ZtX.T)
        if info != 0:
            return None
        CK = CKt.T  # C K
        diagonal -= np.einsum("ip,ip->i", CK, cross.ZtX)
        for k, cols in enumerate(rc.column_slices):
            C_k = cross.ZtX[cols]
            if G is None:
                GC = d[:, None] * C_k
            else:  # G[:, cols] C_k as G times C_k in its rows (a sparse matrix's column slice costs more)
                padded = np.zeros_like(cross.ZtX)
                padded[cols] = C_k
                GC = np.asarray(G @ padded)
            squares[:, k] -= 2.0 * np.einsum("ip,ip->i", CK, GC)
            squares[:, k] += np.einsum("ip,ip->i", CK @ (C_k.T @ C_k), CK)
    d2 = d**2
    A = np.zeros((J + 1, J + 1))
    b = np.zeros((J + 1, yty.shape[0]))
    b[:J] = E.T @ (Zty**2 / d2[:, None]) / sizes[:, None]
    A[:J, :J] = E.T @ (squares / d2[:, None]) / sizes[:, None]
    A[:J, J] = (diagonal / d2) @ E / sizes
    A[J, :J] = diagonal @ E
    A[J, J] = cross.n - (0 if known_mean else cross.p)
    b[J] = yty
    _, _, variances, info = lapack.dgesv(A, b)
    if info != 0:
        return None
    sigma2 = variances[J]
    ok = np.isfinite(variances.sum(axis=0)) & (sigma2 > 0)
    ratios = (variances[:J] / np.where(ok, sigma2, 1.0)).T  # (R, J)
    # ML's correction for crossed terms where X's columns take 1 dimension of each term's level means (the mean and
    # covariates that vary within levels: what it is derived for), not more (X holds factors the levels nest)
    if not reml and not known_mean and J > 1 and _one_mean(((d - diagonal) / d) @ E):
        # ML on crossed terms: each term's share of the mean's stratum (above)
        per_level = cross.n / sizes  # rows per level: lambda_k = sigma^2 (1 + per_level_k ratio_k)
        error_df = cross.n - cross.p - float(np.sum(sizes - 1))
        for r in np.flatnonzero(ok):
            ratios[r] = _ml_strata(np.maximum(ratios[r], 0.0), per_level, sizes, error_df)
    working = np.sqrt(np.maximum(ratios, COMPONENTS_MIN_RATIO))
    if J == 1:  # one variance, estimated <= 0: at the bound, which the boundary check confirms
        working[:, 0] = np.where(ratios[:, 0] > 0, working[:, 0], 0.0)
    return working, ok


# covariance_start: on systems of at most this many random-effect columns (its equations hold q x q matrices; the
# weighted pass costs about one evaluation of a system held dense)
COVARIANCE_START_MAX_Q = 1000
# ... and its weighted pass (dense, ~2 q^3 flops) up to this many: at 960 columns (children with slopes in 30
# schools, the first term eliminated) it took 0.19 s, more than the 8 evaluations it saved; unweighted above
COVARIANCE_WEIGHTED_MAX_Q = 400


def covariance_start(system, max_q: int = COVARIANCE_START_MAX_Q, weighted: bool = True) -> np.ndarray | None:
    """theta (reported coordinates) for any terms, slopes and several groupings among them, from the moment
    equations of MINQUE on the cross-products: with P the REML projection under V = I + Z Lambda Lambda' Z' (the
    system's working columns), M = Z'PZ and w = Z'Py, the sum over a term's levels of w_(l,a) w_(l,b) has the
    expectation

        sum_s,cd Sigma_s[c, d] sum_(l in t, m in s) M_(la),(mc) M_(md),(lb) + sigma^2 sum_l D_(la),(lb)

    (Sigma_s: term s's covariance; D = Z'P^2 Z = M - M Lambda Lambda' M, as P V P = P), and the residual sum of
    squares r'r = y'(I - H)y has sum_s tr(Sigma_s M0_ss) + sigma^2 (n - p): one linear equation per covariance entry
    and one for sigma^2. First unweighted (Lambda = 0: M0 = Z'(I - H)Z), then, for several terms, once weighted at
    that estimate: one Fisher-scoring step in the covariances (where the weighted equations fail, the unweighted
    estimate). Each Sigma_s / sigma^2 becomes a factor as components_start's variances (at least
    COMPONENTS_MIN_RATIO) and moment_start's correlations (eigenvalues at least MOMENT_LIFTED_EIGENVALUE). Where
    neither moment_start nor components_start applies, in place of lme4's start (docs/lme4.md has the evaluations).
    `weighted` False: the unweighted estimate only. None where the equations are singular, sigma^2 <= 0, or q >
    max_q."""
    rc, cross = system.relcov, system.cross
    # (with no more rows than random and fixed effects the residual variance is not told apart from the terms':
    # three rows in two groups with slopes stopped at a finite point of a deviance that falls without bound)
    if not rc.blocks or rc.q > max_q or cross.n <= rc.q + cross.p:
        return None
    G = cross.ZtZ.toarray()
    working = None
    residual_row = None  # the r'r equation's coefficients (from the unweighted M0)
    # One term (one grouping) needs no weighting: its unweighted estimate already starts the Newton steps within a
    # few (Exam's 3 x 3: 24 -> 6 evaluations), and the dense weighted pass would cost more than its levels' compiled
    # evaluations (3 ms at Exam's 195 columns). Several terms share rows, and unweighted sums mix their variances
    # (Pixel's nested day slopes: 22 evaluations from the unweighted estimate, 5 weighted, 7 from lme4's start),
    # up to COVARIANCE_WEIGHTED_MAX_Q columns.
    for _ in range(2 if weighted and len(rc.blocks) > 1 and rc.q <= COVARIANCE_WEIGHTED_MAX_Q else 1):
        found = _moment_equations(G, cross, rc, working)
        if found is None:
            break
        A, b, traces = found
        residual_row = traces if residual_row is None else residual_row
        A[-1, :-1], A[-1, -1], b[-1] = residual_row, cross.n - cross.p, cross.yty
        _, _, solved, info = lapack.dgesv(A, b)
        step = _relative_factors(rc, solved) if info == 0 else None
        if step is None:
            break
        working = step
    return None if working is None else rc.reported_theta(working)


def _moment_equations(G, cross, rc, working):
    """covariance_start's equations weighted at `working` (None: unweighted): (A, b, traces) with the last row left
    for the caller, `traces` the sums sum_m M_(md),(mc) per covariance entry (the r'r row, from the unweighted M).
    None where X'V^{-1}X or Lambda'Z'Z Lambda + I is not positive definite."""
    C, z, p = cross.ZtX, cross.Zty, cross.p
    if working is None:
        VZ, VX, XVX, Vz, XVz = G, C, cross.XtX, z, cross.Xty  # Z'V^{-1}Z, Z'V^{-1}X, ... with V = I
    else:
        # V^{-1} = I - Z Lambda A^{-1} Lambda' Z', A = Lambda'Z'Z Lambda + I (Woodbury)
        factors, q = rc.factors(working), G.shape[0]
        GCz = np.hstack([G, C, z[:, None]])  # [Z'Z, Z'X, Z'y]
        LG = rc.apply_transpose(factors, GCz)  # Lambda' [Z'Z, Z'X, Z'y]
        A = rc.apply_transpose(factors, np.ascontiguousarray(LG[:, :q].T))
        A.flat[:: A.shape[0] + 1] += 1.0
        root, info = lapack.dpotrf(A, lower=1)
        if info != 0:
            return None
        half = lapack.dtrtrs(root, LG, lower=1)[0]
        VZX = GCz - half[:, :q].T @ half
        VZ, VX, Vz = VZX[:, :q], VZX[:, q:-1], VZX[:, -1]
        hC, hz = half[:, q:-1], half[:, -1]
        XVX, XVz = cross.XtX - hC.T @ hC, cross.Xty - hC.T @ hz
    if p:
        root, info = lapack.dpotrf(XVX, lower=1)
        if info != 0:
            return None
        KX = lapack.dtrtrs(root, np.hstack([VX.T, XVz[:, None]]), lower=1)[0]
        M, w = VZ - KX[:, :-1].T @ KX[:, :-1], Vz - KX[:, :-1].T @ KX[:, -1]
    else:
        M, w = VZ, Vz
    # D = Z'P^2 Z = M - M Lambda Lambda' M, needed on the terms' level blocks only
    MLL = None if working is None else rc.apply(factors, rc.apply_transpose(factors, M))  # (symmetric M: its transpose)
    terms = [
        (n, template, cols, *np.array(template.positions, dtype=np.intp).reshape(-1, 2).T)
        for (n, template), cols in zip(rc.blocks, rc.column_slices)
    ]
    offsets = np.cumsum([0] + [rows.shape[0] for *_, rows, _ in terms])
    A = np.zeros((offsets[-1] + 1, offsets[-1] + 1))
    b = np.zeros(offsets[-1] + 1)
    traces = np.zeros(offsets[-1])
    for t, (nt, tt, slt, at, bt) in enumerate(terms):
        kt, rows = tt.k, slice(offsets[t], offsets[t + 1])
        Wt = w[slt].reshape(nt, kt)
        b[rows] = (Wt.T @ Wt)[at, bt]
        Mt = M[slt].reshape(nt, kt, -1)
        own = np.einsum("lalb->ab", Mt[:, :, slt].reshape(nt, kt, nt, kt))
        level_D = own if MLL is None else own - np.einsum("jla,lbj->ab", MLL[:, slt].reshape(-1, nt, kt), Mt)
        A[rows, -1] = level_D[at, bt]
        traces[rows] = np.where(at == bt, 1.0, 2.0) * own[bt, at]
        for s, (ns, ts, sls, cs, ds) in enumerate(terms):
            ks = ts.k
            H = level_pair_products(Mt[:, :, sls], nt, kt, ns, ks)  # [a, c, b, d]
            block = H[at[:, None], cs, bt[:, None], ds]
            if ks > 1:  # Sigma_s[c, d] for c != d stands for [d, c] too
                block += (cs != ds) * H[at[:, None], ds, bt[:, None], cs]
            A[rows, offsets[s] : offsets[s + 1]] = block
    return A, b, traces


def _relative_factors(rc, solved: np.ndarray) -> np.ndarray | None:
    """Working theta from covariance_start's solution (each term's covariance entries, then sigma^2): variances at
    least COMPONENTS_MIN_RATIO of sigma^2, correlations' eigenvalues at least MOMENT_LIFTED_EIGENVALUE; None where
    sigma^2 <= 0, a value (or its ratio to sigma^2) is not finite, or a covariance so far out that its factor is lost
    to rounding."""
    sigma2 = solved[-1]
    if not (np.all(np.isfinite(solved)) and sigma2 > 0):
        return None
    with np.errstate(over="ignore"):
        ratios = solved[:-1] / sigma2
    if not np.all(np.isfinite(ratios)):
        return None
    out, start = [], 0
    for _, template in rc.blocks:
        n = len(template.positions)
        part = ratios[start : start + n]
        start += n
        if template.is_diagonal:  # (scalar terms among them)
            out.append(np.sqrt(np.maximum(part, COMPONENTS_MIN_RATIO)))
            continue
        S = template.factor(part)  # (the covariance's lower triangle)
        scale = np.sqrt(np.maximum(np.diag(S), COMPONENTS_MIN_RATIO))
        correlation = (S + S.T) / np.outer(scale, scale)
        np.fill_diagonal(correlation, 1.0)
        try:  # (variances ~1e15, MINQUE's on 12 rows of 2 groups: the factor lost to rounding; beyond, overflow)
            eigenvalues, vectors = np.linalg.eigh(correlation)
            if eigenvalues[0] < MOMENT_LIFTED_EIGENVALUE:
                correlation = _lifted_correlation(eigenvalues, vectors)
            out.append(template.theta_of(np.linalg.cholesky(correlation * np.outer(scale, scale))))
        except np.linalg.LinAlgError:
            return None
    return np.concatenate(out)


def _one_mean(absorbed: np.ndarray) -> bool:
    """Whether X takes one dimension (the mean), within ML_CORRECTION_ABSORBED_SPREAD, of every term's level means
    (`absorbed`: per term, the mean over its levels of the share of a level's weight that X's projection takes)."""
    return bool(np.all(np.abs(absorbed - 1.0) < ML_CORRECTION_ABSORBED_SPREAD))


def _ml_strata(ratios, per_level, sizes, error_df):
    """ML's ratios on a balanced crossed design from REML's (there the strata's mean squares: SS_k / (a_k - 1) =
    lambda_k, in units of REML's sigma^2). ML's equations, with the mean's stratum lambda_0 = lambda_E + sum
    (lambda_k - lambda_E) shared by all: (a_k - 1) / lambda_k - SS_k / lambda_k^2 + 1 / lambda_0 = 0 for each term
    and error_df / lambda_E - SS_E / lambda_E^2 + (1 - J) / lambda_0 = 0, each solved for its lambda with lambda_0
    held: lambda_0 is then the fixed point of the lambdas' own sum, found by Steffensen's steps (Aitken's
    extrapolation of two plain rounds: plain rounds gain a constant factor each, 14 of them on Penicillin; these
    gain digits quadratically). In Python's floats (a term or three, where numpy's calls cost 30 us a round).
    REML's ratios where a root is missing."""
    if error_df <= 0 or np.any(sizes <= 1):
        return ratios
    df = [float(a) - 1.0 for a in sizes]
    ss = [f * (1.0 + float(m) * float(r)) for f, m, r in zip(df, per_level, ratios)]
    ss_e, J = float(error_df), len(ss)

    def strata(lam0):
        """Each term's lambda and lambda_E with lambda_0 held, and the lambda_0 they give; None where a root is
        missing."""
        if not lam0 > 0:
            return None
        lam = [2.0 * s_k / (f + math.sqrt(f * f + 4.0 * s_k / lam0)) for f, s_k in zip(df, ss)]
        # error_df lam - ss_e - (J - 1) lam^2 / lam0 = 0, the root near ss_e / error_df
        disc = error_df * error_df - 4.0 * (J - 1) / lam0 * ss_e
        if not disc > 0:
            return None
        lam_e = 2.0 * ss_e / (error_df + math.sqrt(disc))
        return lam, lam_e, lam_e + sum(x - lam_e for x in lam)

    lam0 = 1.0 + sum(s_k / f - 1.0 for f, s_k in zip(df, ss))  # (REML's strata: lambda_E = 1)
    for _ in range(ML_STRATA_MAX_ROUNDS):
        once = strata(lam0)
        twice = None if once is None else strata(once[2])
        if twice is None:
            return ratios
        step, curvature = once[2] - lam0, twice[2] - 2.0 * once[2] + lam0
        if abs(step) <= 1e-13 * lam0 or curvature == 0.0:
            lam0 = twice[2]
            break
        lam0 -= step * step / curvature
    found = strata(lam0)
    if found is None:
        return ratios
    lam, lam_e, _ = found
    out = np.array([(x / lam_e - 1.0) / float(m) for x, m in zip(lam, per_level)])
    return out if np.all(np.isfinite(out)) else ratios


def _nested(G, column_slices) -> bool:
    """Whether of every two scalar terms one is nested in the other (each of its levels meets one level of the
    other): Z'Z's block between them has one entry in each row, or in each column."""
    for t, rows in enumerate(column_slices):
        for columns in column_slices[t + 1 :]:
            linked = G[rows, columns] != 0  # (sparse or dense)
            if linked.sum(axis=1).max() > 1 and linked.sum(axis=0).max() > 1:
                return False
    return True
