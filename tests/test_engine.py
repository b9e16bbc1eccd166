"""The sparse engine against a dense numpy computation of the same quantities on small problems.

The dense reference uses the marginal model y ~ N(X beta, sigma^2 (I + Z Lambda Lambda' Z')), written out
independently of the penalized least-squares formulation the engine uses.
"""

import os
import time

import numpy as np
import pytest
import scipy.sparse as sp

import sparsemix.core.system
from sparsemix.core.cross_products import CrossProducts, assemble_Z
from sparsemix.core.factor import PairOperator, SchurFactor, unique_inverse
from sparsemix.core.kernels import LevelBands
from sparsemix.core.relcov import RelativeCovariance
from sparsemix.core.system import PenalizedSystem
from sparsemix.core.terms import CovarianceTemplate, RandomTerm, VarianceComponent
from sparsemix.fit.pipeline import fit_lmm


def _problem(seed=1, n=240):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 11, n)
    b = rng.integers(0, 6, n)
    x = rng.normal(size=n)
    X = np.column_stack([np.ones(n), x, rng.normal(size=n)])
    y = (
        1.0
        + 0.5 * x
        + rng.normal(size=11)[a] * 0.8
        + rng.normal(size=6)[b]
        + x * rng.normal(size=11)[a] * 0.3
        + rng.normal(size=n)
    )
    terms = [
        RandomTerm.from_codes(
            "a", a, np.column_stack([np.ones(n), x]), 11, CovarianceTemplate.unstructured(2), range(11), ("1", "x")
        ),
        RandomTerm.from_codes("b", b, np.ones(n), 6, CovarianceTemplate.scalar(), range(6), ("1",)),
        RandomTerm.from_codes(
            "c", b, np.column_stack([x, x**2]), 6, CovarianceTemplate.diagonal(2), range(6), ("x", "x2")
        ),
    ]
    return X, y, terms


FACTORIZATIONS = ["simplicial", "supernodal", "schur"]


def _system(X, y, terms, weights=None, factorization=None):
    Z = assemble_Z(terms)
    rc = RelativeCovariance([(t.n_levels, t.template) for t in terms])
    system = PenalizedSystem(CrossProducts.compute(X, y, Z, weights=weights), rc, factorization=factorization)
    return system, Z.toarray(), rc


def _dense(X, y, Zd, rc, theta, reml, weights=None):
    """Deviance, beta, sigma^2, conditional modes b and Var(b|y)/sigma^2 from dense marginal formulas."""
    n, p = X.shape
    Lam = sp.block_diag([sp.kron(sp.eye(nl), T) for (nl, _), T in zip(rc.blocks, rc.factors(theta))]).toarray()
    G = Lam @ Lam.T  # Var(b) / sigma^2
    W = np.eye(n) if weights is None else np.diag(1.0 / weights)
    V = W + Zd @ G @ Zd.T  # Var(y) / sigma^2
    Vi = np.linalg.inv(V)
    XtViX = X.T @ Vi @ X
    beta = np.linalg.solve(XtViX, X.T @ Vi @ y)
    r = y - X @ beta
    r2 = r @ Vi @ r
    nu = n - p if reml else n
    dev = np.linalg.slogdet(V)[1] + nu * (1 + np.log(2 * np.pi * r2 / nu))
    if reml:
        dev += np.linalg.slogdet(XtViX)[1]
    b = G @ Zd.T @ Vi @ r
    condcov = G - G @ Zd.T @ Vi @ Zd @ G
    return dev, beta, r2 / nu, b, condcov


THETAS = [
    None,  # lme4's start: identity templates
    np.array([0.5, -0.3, 0.8, 1.2, 0.4, 0.7]),
    np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),  # every variance on the boundary
    np.array([2.0, 1.5, 0.0, 0.3, 0.0, 2.5]),  # singular slope, zero diagonal entry
]


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("reml", [False, True])
@pytest.mark.parametrize("k", range(len(THETAS)))
def test_deviance_matches_dense_marginal_likelihood(reml, k, factorization):
    X, y, terms = _problem()
    system, Zd, rc = _system(X, y, terms, factorization=factorization)
    theta = rc.start() if THETAS[k] is None else THETAS[k]
    expected = _dense(X, y, Zd, rc, theta, reml)[0]
    assert system.deviance(theta, reml) == pytest.approx(expected, rel=1e-11)


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
@pytest.mark.parametrize("reml", [False, True])
def test_solution_matches_dense_gls_and_blup(reml, factorization):
    X, y, terms = _problem(seed=2)
    system, Zd, rc = _system(X, y, terms, factorization=factorization)
    theta = THETAS[1]
    dev, beta, sigma2, b, condcov = _dense(X, y, Zd, rc, theta, reml)
    sol = system.solve(theta, reml)
    np.testing.assert_allclose(sol.beta, beta, rtol=1e-9)
    np.testing.assert_allclose(sol.b, b, rtol=1e-8, atol=1e-11)
    assert sol.sigma2 == pytest.approx(sigma2, rel=1e-10)
    cols = np.array([0, 1, 5, 22, 23, 30, 33])
    np.testing.assert_allclose(
        system.conditional_covariance(theta, cols), condcov[np.ix_(cols, cols)], rtol=1e-8, atol=1e-12
    )


@pytest.mark.parametrize("factorization", FACTORIZATIONS)
def test_prior_weights_match_dense_weighted_likelihood(factorization):
    X, y, terms = _problem(seed=3)
    w = np.random.default_rng(3).uniform(0.5, 2.0, y.shape[0])
    system, Zd, rc = _system(X, y, terms, weights=w, factorization=factorization)
    theta = THETAS[1]
    # Var(y) = sigma^2 (W^{-1} + Z G Z'): the density of y, not of sqrt(w) y, so the dense value needs no
    # correction; the engine must account for the Jacobian itself.
    expected = _dense(X, y, Zd, rc, theta, reml=False, weights=w)[0]
    assert system.deviance(theta, False) == pytest.approx(expected, rel=1e-11)


def test_deviance_sigma2_form_is_minimised_at_profiled_sigma2():
    X, y, terms = _problem(seed=4)
    system, _, rc = _system(X, y, terms)
    theta = THETAS[1]
    for reml in (False, True):
        s2 = system.solve(theta, reml).sigma2
        at = system.deviance_at_sigma2(theta, s2, reml)
        assert at == pytest.approx(system.deviance(theta, reml), rel=1e-12)
        assert system.deviance_at_sigma2(theta, s2 * 1.01, reml) > at
        assert system.deviance_at_sigma2(theta, s2 * 0.99, reml) > at


def test_large_offset_in_y_does_not_change_the_fit():
    # y around 1e9: the OLS shift in the cross-products keeps the penalized RSS accurate.
    X, y, terms = _problem(seed=5)
    base = fit_lmm(X, y, terms)
    shifted = fit_lmm(X, y + 1e9, terms)
    # y + 1e9 is stored with a ulp of 1.2e-7, so the shifted data differ from y at that level: 1e-8 is what
    # the data allow. Without the OLS shift in the cross-products this fit returned llf = +84196 instead of -374.
    assert shifted.llf == pytest.approx(base.llf, rel=1e-8)
    np.testing.assert_allclose(shifted.theta, base.theta, rtol=1e-4, atol=1e-6)
    assert shifted.beta[0] - 1e9 == pytest.approx(base.beta[0], abs=1e-5)
    np.testing.assert_allclose(shifted.beta[1:], base.beta[1:], rtol=1e-6)


def test_variance_component_from_group_blocks_places_rows_and_columns():
    rows_of_group = [np.array([0, 3]), np.array([1, 2, 4])]
    blocks = [(np.array([[1.0, 0.0], [0.0, 2.0]]), ["p", "q"]), (np.array([[3.0], [0.0], [4.0]]), ["r"])]
    vc = VarianceComponent.from_group_blocks("v", blocks, rows_of_group)
    expected = np.zeros((5, 3))
    expected[0, 0], expected[3, 1], expected[1, 2], expected[4, 2] = 1.0, 2.0, 3.0, 4.0
    np.testing.assert_array_equal(vc.Z.toarray(), expected)
    np.testing.assert_array_equal(vc.column_group, [0, 0, 1])
    assert vc.column_names == ("p", "q", "r")


def test_template_theta_order_is_lme4_column_major():
    tmpl = CovarianceTemplate.unstructured(3)
    assert tmpl.positions == ((0, 0), (1, 0), (2, 0), (1, 1), (2, 1), (2, 2))
    T = tmpl.factor(np.arange(1.0, 7.0))
    np.testing.assert_array_equal(T, [[1, 0, 0], [2, 4, 0], [3, 5, 6]])
    np.testing.assert_array_equal(tmpl.theta_of(T), np.arange(1.0, 7.0))


def test_schur_is_refused_when_the_first_term_links_levels():
    # A variance component whose rows touch two columns: its Z'Z block is not block diagonal.
    rng = np.random.default_rng(8)
    n = 60
    Z = np.zeros((n, 6))
    Z[np.arange(n), rng.integers(0, 6, n)] = 1.0
    Z[np.arange(n), rng.integers(0, 6, n)] += rng.normal(size=n)
    term = RandomTerm("v", sp.csc_matrix(Z), 6, CovarianceTemplate.scalar(), tuple(range(6)), ("v",))
    other = RandomTerm.from_codes(
        "g", rng.integers(0, 4, n), np.ones(n), 4, CovarianceTemplate.scalar(), range(4), ("1",)
    )
    with pytest.raises(ValueError, match="schur"):
        _system(np.ones((n, 1)), rng.normal(size=n), [term, other], factorization="schur")


# Term orders of _problem for the Schur form: first term with k = 2 or k = 1, the rest scalar only (the diagonal
# scaling path) or with k = 2 templates (the general Lambda_2 path).
SCHUR_ORDERS = [(0, 1), (1, 0), (0, 1, 2), (1, 0, 2), (1, 2, 0), (2, 1)]


@pytest.mark.parametrize("update", ["dense", "pairs", "kernel"])
@pytest.mark.parametrize("order", SCHUR_ORDERS)
def test_every_schur_update_gives_cholmods_factor(order, update):
    X, y, terms = _problem()
    system, _, rc = _system(X, y, [terms[i] for i in order], factorization="simplicial")
    B = np.random.default_rng(4).normal(size=(rc.q, 3))
    for theta in (rc.start(), np.random.default_rng(5).normal(size=rc.n_theta)):
        factors = system._write_values(rc.system_factors(theta))
        reference = system._factor
        reference.refactor(system._A, factors)
        schur = SchurFactor(system._A, system.cross.ZtZ, rc, update=update)
        assert schur.update == update
        schur.refactor(system._A, factors)
        assert schur.logdet() == pytest.approx(reference.logdet(), rel=1e-12, abs=1e-10)
        np.testing.assert_allclose(schur.solve(B), reference.solve(B), rtol=1e-9, atol=1e-12)
        # L differs from CHOLMOD's by its permutation only: compare L^{-1} P B through its Gram matrix.
        h, h_ref = schur.half_solve(B), reference.half_solve(B)
        np.testing.assert_allclose(h.T @ h, h_ref.T @ h_ref, rtol=1e-9)
        np.testing.assert_allclose(schur.half_solve_t(schur.half_solve(B)), reference.solve(B), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_subtracts_the_lower_triangle_of_w_transpose_w(threads):
    """glmer's W'W update (kernels.subtract_gram_lower): W given by rows and by columns, the lower triangle of
    out - W'W written, the upper triangle untouched, in one thread or shared among numba's."""
    from sparsemix.core.kernels import subtract_gram_lower

    W = sp.random(300, 120, density=0.08, random_state=9, format="csr")
    W.sort_indices()
    positions = sp.csr_matrix((np.arange(W.nnz, dtype=float), W.indices, W.indptr), shape=W.shape).tocsc()
    out = np.arange(120.0 * 120).reshape(120, 120)
    expected = out - (W.T @ W).toarray()
    subtract_gram_lower(
        positions.indptr, positions.indices, positions.data.astype(np.int64), W.indptr, W.indices, W.data, out, threads
    )
    np.testing.assert_allclose(np.tril(out), np.tril(expected), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.triu(out, 1), np.triu(np.arange(120.0 * 120).reshape(120, 120), 1))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 2])
def test_kernel_subtracts_g_h_g_transpose(k, threads):
    rng = np.random.default_rng(6 + k)
    n1, q2 = 40, 150
    G = sp.random(q2, n1 * k, density=0.1, random_state=7, format="csc")
    H = rng.normal(size=(n1, k, k))
    H = H @ np.transpose(H, (0, 2, 1))
    expected = -G.toarray() @ sp.block_diag(list(H)).toarray() @ G.toarray().T
    # Entries per (level, row), sorted, with G's k values: the layout SchurFactor builds.
    coo = G.tocoo()
    level, a = np.divmod(coo.col, k)
    keys, inverse = np.unique(level * q2 + coo.row, return_inverse=True)
    g = np.zeros((keys.size, k))
    g[inverse, a] = coo.data
    lvl, rows = np.divmod(keys, q2)
    v = np.matmul(H[lvl], g[:, :, None])[:, :, 0]
    for n_bands in (1, 4, 200):  # one tile; a few bands; one row each (more bands asked than rows)
        bands = LevelBands(lvl, rows, n1, q2, n_bands)
        out = np.zeros((q2, q2))
        order = bands.order
        bands.subtract(rows[order].astype(np.int32), g[order], v[order], out, threads)
        np.testing.assert_allclose(out, np.tril(expected), rtol=1e-12, atol=1e-12)
        # tr(values G H G') read off a symmetric `values` pair by pair (its upper triangle must not be read)
        values = rng.normal(size=(q2, q2))
        values = values + values.T
        trace = np.sum(values * -expected)
        values[np.triu_indices(q2, 1)] = np.nan
        got = bands.pair_sum(rows[order].astype(np.int32), g[order], v[order], values, threads)
        assert got == pytest.approx(trace, rel=1e-12)
        if k == 1:  # H_l as the levels' weights of G's own entries (g = v): the same update and trace
            weights = H[:, 0, 0]
            out = np.zeros((q2, q2))
            bands.subtract(rows[order].astype(np.int32), g[order], g[order], out, threads, weights)
            np.testing.assert_allclose(out, np.tril(expected), rtol=1e-12, atol=1e-12)
            got = bands.pair_sum(rows[order].astype(np.int32), g[order], g[order], values, threads, weights)
            assert got == pytest.approx(trace, rel=1e-12)
    # numba's on-disk cache serves a new process only if no signature holds a jitted function (whose key changes
    # in every process: a recompilation of 1.4 s each, and at times a crash saving it)
    from numba.core import types

    from sparsemix.core import kernels

    for kernel in (kernels._tiles_serial if threads == 1 else kernels._tiles_parallel,):
        assert kernel.signatures
        assert not any(isinstance(t, types.Dispatcher) for signature in kernel.signatures for t in signature)
    upper = np.triu_indices(k)
    pairs = PairOperator(np.column_stack([lvl, rows]), g, q2, n1)
    entries = pairs.stored_entries
    got = pairs.build().apply(H[:, upper[0], upper[1]])
    np.testing.assert_allclose(np.tril(got), -np.tril(expected), rtol=1e-12, atol=1e-12)
    assert entries == sum(m.nnz for m in pairs._matrices)


def test_pair_operator_built_in_chunks_equals_one_pass(monkeypatch):
    rng = np.random.default_rng(9)
    level = np.repeat(np.arange(400), rng.integers(1, 6, 400))
    rows = np.concatenate([np.sort(rng.choice(30, size=c, replace=False)) for c in np.bincount(level)])
    g = rng.normal(size=(level.size, 1))
    level_rows = np.column_stack([level, rows])
    h = rng.normal(size=(400, 1))
    whole = PairOperator(level_rows, g, 30, 400).build().apply(h)
    monkeypatch.setattr("sparsemix.core.factor.PAIR_CHUNK", 37)
    np.testing.assert_array_equal(PairOperator(level_rows, g, 30, 400).build().apply(h), whole)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_batched_small_cholesky_and_solves_match_numpy(k):
    from sparsemix.core.factor import _batched_cholesky, _batched_lower_solve

    rng = np.random.default_rng(k)
    M = rng.normal(size=(50, k, k))
    M = M @ np.transpose(M, (0, 2, 1)) + np.eye(k)
    L = _batched_cholesky(np.tril(M))  # only the lower triangle is read
    np.testing.assert_allclose(L, np.linalg.cholesky(M), rtol=1e-12, atol=1e-14)
    B = rng.normal(size=(50, k, 3))
    np.testing.assert_allclose(_batched_lower_solve(L, B), np.linalg.solve(L, B), rtol=1e-10)
    np.testing.assert_allclose(
        _batched_lower_solve(L, B, transpose=True), np.linalg.solve(np.transpose(L, (0, 2, 1)), B), rtol=1e-10
    )


def test_blocked_dense_cholesky_above_the_threaded_order(monkeypatch):
    import sparsemix.core.factor as factor

    rng = np.random.default_rng(12)
    B = rng.normal(size=(301, 40))
    S = B @ B.T + np.eye(301)
    monkeypatch.setattr(factor, "DENSE_THREADS_MAX_ORDER", 70)  # so that 301 takes 2 levels of blocks
    L = factor.dense_cholesky(np.tril(S))
    np.testing.assert_allclose(L, np.linalg.cholesky(S), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("max_order", [400, 150])  # one potri; 2 x 2 blocks
def test_dense_inverse_from_the_factor(monkeypatch, max_order, single):
    import sparsemix.core.factor as factor

    rng = np.random.default_rng(13)
    B = rng.normal(size=(301, 40))
    S = B @ B.T + np.eye(301)
    monkeypatch.setattr(factor, "DENSE_THREADS_MAX_ORDER", max_order)
    inverse = factor.dense_inverse_lower(np.linalg.cholesky(S), single)
    assert inverse.dtype == (np.float32 if single else np.float64)
    expected = np.tril(np.linalg.inv(S))
    tolerance = (1e-5 if single else 1e-13) * np.abs(expected).max()
    np.testing.assert_allclose(np.tril(inverse), expected, rtol=0, atol=tolerance)


def test_blocked_dense_routines_reuse_the_fits_buffers(monkeypatch):
    """Inside a fit the blocked Cholesky and inverse work in the fit's Workspace: a second evaluation allocates
    nothing new, the inverse is one of its buffers, the results do not depend on what the buffers held, and the
    buffers go when the fit ends."""
    import sparsemix.core.factor as factor
    from sparsemix.core import pages

    monkeypatch.setattr(factor, "DENSE_THREADS_MAX_ORDER", 70)  # 301 -> blocks of 150 and 151, then potrf
    rng = np.random.default_rng(14)
    with pages.reused_buffers():
        work = pages.fit_workspace()
        assert pages.fit_workspace() is work
        held = []
        for single in (True, False, False):  # single precision first, as the scoring steps go
            B = rng.normal(size=(301, 40))
            S = B @ B.T + np.eye(301)
            L = factor.dense_cholesky(np.tril(S))
            np.testing.assert_allclose(L, np.linalg.cholesky(S), rtol=1e-10, atol=1e-12)
            inverse = factor.dense_inverse_lower(L, single)
            expected = np.tril(np.linalg.inv(S))
            tolerance = (1e-5 if single else 1e-13) * np.abs(expected).max()
            np.testing.assert_allclose(np.tril(inverse), expected, rtol=0, atol=tolerance)
            assert np.shares_memory(inverse, work._buffers["inverse"])
            held.append({name: buffer for name, buffer in work._buffers.items()})
        # the double-precision evaluations grew the buffers once and then reused every one of them
        assert held[1].keys() == held[2].keys() == {"11", "21", "22", "inverse"}
        assert all(held[1][name] is held[2][name] for name in held[1])
        # bounded: the three blocks of the lower triangle and the inverse, in doubles (and the blocks' own blocks)
        assert sum(work._buffers[name].nbytes for name in ("11", "21", "22")) == (150**2 + 151 * 150 + 151**2) * 8
        assert work._buffers["inverse"].nbytes == 301**2 * 8
    assert pages.fit_workspace() is not work


def _crossed_terms(n_a, n_b, n, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, n_a, n), rng.integers(0, n_b, n)
    return [
        RandomTerm.from_codes(name, codes, np.ones(n), k, CovarianceTemplate.scalar(), range(k), ("1",))
        for name, codes, k in (("a", a, n_a), ("b", b, n_b))
    ]


def test_densely_linked_designs_take_the_schur_form_untimed(monkeypatch):
    """Each level of a links ~10 of b's 150 levels: 300 levels x 55 pairs cover b's 11,325 twice over."""

    def no_trials(*args, **kwargs):
        raise AssertionError("a factorization was timed")

    monkeypatch.setattr("sparsemix.core.system._time_refactorization", no_trials)
    n = 3_000
    rng = np.random.default_rng(1)
    system, _, _ = _system(np.ones((n, 1)), rng.normal(size=n), _crossed_terms(300, 150, n))
    assert system.factorization_mode == "schur"


def test_sparsely_linked_designs_are_timed(monkeypatch):
    """A nested design (each level of a in one level of b) fills nothing: the candidates race. (The times are the
    quiet machine's, fixed: measured under a loaded test run, simplicial's 0.05 ms once took long enough for the Schur
    form to be tried and win.)"""
    timed = []
    quiet = {"simplicial": 5e-5, "supernodal": 3e-4, "schur": 1e-3}
    monkeypatch.setattr(
        "sparsemix.core.system._time_refactorization",
        lambda factor, *args: timed.append(factor.mode) or quiet[factor.mode],
    )
    n_a, n_b, n = 2_000, 200, 6_000
    a = np.arange(n) % n_a
    b = a % n_b
    terms = [
        RandomTerm.from_codes(name, codes, np.ones(n), k, CovarianceTemplate.scalar(), range(k), ("1",))
        for name, codes, k in (("a", a, n_a), ("b", b, n_b))
    ]
    system, _, _ = _system(np.ones((n, 1)), np.random.default_rng(2).normal(size=n), terms)
    assert "simplicial" in timed
    assert system.factorization_mode != "schur"


def test_a_trial_already_twice_as_slow_is_timed_once_and_a_descheduled_call_decides_nothing():
    """_time_refactorization: a first call that took twice the time to beat (in CPU, not only on the clock) ends
    the trial; a slow first call of CPU gets one more call; a first call that only waited (descheduled by another
    process: wall time without CPU time) is followed by TRIAL_REPEATS calls, and the least counts."""
    calls = []

    class Busy:
        def __init__(self, seconds):
            self.seconds = seconds

        def refactor(self, A, factors):
            calls.append(1)
            end = time.thread_time() + self.seconds
            while time.thread_time() < end:
                pass

    assert sparsemix.core.system._time_refactorization(Busy(0.02), None, None, time_to_beat=0.005) >= 0.02
    assert len(calls) == 1
    sparsemix.core.system._time_refactorization(Busy(0.02), None, None, time_to_beat=1.0)
    assert len(calls) == 3

    class WaitsOnce:
        def refactor(self, A, factors):
            calls.append(1)
            if len(calls) == 1:
                time.sleep(0.05)

    calls.clear()
    assert sparsemix.core.system._time_refactorization(WaitsOnce(), None, None, time_to_beat=0.001) < 0.01
    assert len(calls) == 1 + sparsemix.core.system.TRIAL_REPEATS


def test_complement_density_tells_crossed_from_nested():
    from sparsemix.core.system import _complement_density

    rng = np.random.default_rng(3)
    n = 4_000
    crossed, _, _ = _system(np.ones((n, 1)), rng.normal(size=n), _crossed_terms(400, 200, n))
    inner = np.arange(n) % 1_000
    nested_terms = [
        RandomTerm.from_codes(name, codes, np.ones(n), k, CovarianceTemplate.scalar(), range(k), ("1",))
        for name, codes, k in (("inner", inner, 1_000), ("outer", inner % 200, 200))
    ]
    nested, _, _ = _system(np.ones((n, 1)), rng.normal(size=n), nested_terms)
    # crossed: each of 400 levels links ~10 of 200 columns, so a column meets ~20 x 9 others: about 60% filled
    assert 0.4 < _complement_density(crossed.cross.ZtZ, 400) < 0.8
    assert _complement_density(nested.cross.ZtZ, 1_000) == pytest.approx(1 / 200)  # the diagonal only
    # the crossed design takes the Schur form untimed; the nested one goes to the timed trials (where simplicial
    # usually wins: which one does is a measurement, not asserted here)
    assert crossed.factorization_mode == "schur" and crossed._schur_alone() is not None
    assert nested._schur_alone() is None


def test_complement_density_stops_at_an_eighth_of_its_rows_only_where_that_settles_it():
    """`clear` sees the estimate from every eighth sampled row first: where it accepts, that is the answer (near the
    full sample's), otherwise the full sample decides, as without it."""
    from sparsemix.core.system import _clearly_linked, _complement_density

    rng = np.random.default_rng(4)
    n = 20_000
    ZtZ = CrossProducts.compute(np.ones((n, 1)), rng.normal(size=n), assemble_Z(_crossed_terms(2_000, 600, n))).ZtZ
    full = _complement_density(ZtZ, 2_000)
    seen = []

    def clear(density, q2):
        seen.append((density, q2))
        return True

    early = _complement_density(ZtZ, 2_000, clear=clear)
    assert len(seen) == 1 and seen[0] == (early, 600) and early != full
    assert early == pytest.approx(full, rel=0.15)
    assert _complement_density(ZtZ, 2_000, clear=lambda density, q2: False) == full
    # (a block this densely linked is clearly linked: _schur_alone's tests twice over)
    assert _clearly_linked(early, 600) and not _clearly_linked(0.15, 600) and _clearly_linked(0.15, 900)


def test_modes_with_another_right_hand_side_solve_both_at_once():
    X, y, terms = np.ones((300, 1)), np.random.default_rng(5).normal(size=300), _crossed_terms(40, 12, 300)
    system, _, _ = _system(X, y, terms)
    ev = system.evaluate(np.array([0.7, 0.4]))
    beta, u = system.modes(ev)
    beta2, u2, C = system.modes(ev, ev.RZX)
    np.testing.assert_array_equal(beta2, beta)
    np.testing.assert_allclose(u2, u, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(C, system.half_solve_t(ev.RZX), rtol=1e-12, atol=1e-14)


def test_a_sparse_crossed_block_with_many_links_takes_the_schur_form_untimed(monkeypatch):
    """Eliminating the first term of an InstEval-like design links its 1,414 later columns 6% full, below
    SCHUR_ALONE_MIN_DENSITY, but each to ~90 others (SCHUR_ALONE_MIN_DEGREE): CHOLMOD's own elimination would fill
    the block in without BLAS, so the Schur form is taken without the trial (whose simplicial factorizations took
    seconds at 13,000 levels)."""
    from sparsemix.core import system as engine
    from sparsemix.datasets import generate_insteval_like
    from sparsemix.lme4.design import build_design

    def no_trial(*args, **kwargs):
        raise AssertionError("a trial factorization ran")

    monkeypatch.setattr(engine, "_time_refactorization", no_trial)
    data = generate_insteval_like(4000, 1500, 8, 5)
    system = build_design("y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)", data).system()
    share = system._linked_density()
    assert share < engine.SCHUR_ALONE_MIN_DENSITY and share * system.relcov.after_first >= engine.SCHUR_ALONE_MIN_DEGREE
    assert system.factorization_mode == "schur" and not system.densely_linked


def test_blas_libraries_are_found_on_import_including_cholmods():
    """The package finds the BLAS libraries once, on import (a first fit no longer pays the search), and sees
    every BLAS in the process then, CHOLMOD's among them, so single-threaded stages limit them all."""
    import subprocess
    import sys

    code = (
        "import sparsemix, sparsemix.core.threads as t; from threadpoolctl import threadpool_info; "
        "print(t._controller is not None, sorted(c.filepath for c in t._controller.lib_controllers) == "
        "sorted(i['filepath'] for i in threadpool_info() if i['user_api'] == 'blas'), "
        "len(t._controller.lib_controllers))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["True", "True"]
    assert int(out[2]) >= 2  # numpy's or scipy's bundled one, and the system one CHOLMOD links


def test_threads_go_only_to_cores_nobody_else_is_running_on(monkeypatch):
    """With as many CPU-bound processes as cores beside it, a fit's threaded stages take one thread (a thread
    waiting for a held core stalls the others, issue 14), but for dense work above DENSE_THREADS_MAX_ORDER; on an
    idle machine they take the caller's threads."""
    import subprocess
    import sys
    import time

    import sparsemix.core.threads as threads

    cores = threads.os.sched_getaffinity(0)
    monkeypatch.setattr(threads, "_outer_threads", [len(cores) + 3])
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in cores]
    try:
        time.sleep(0.5)
        assert threads.free_cores() == 1
        assert threads.kernel_threads(threads.KERNEL_THREADS_MIN_ORDER) == 1
        assert isinstance(threads.dense_threads(threads.DENSE_THREADS_MIN_ORDER), type(threads.nullcontext()))
        # but the blocks of a dense factorization above the threaded order, and the update before it, take all of
        # them (there two threads beat one however busy the machine)
        order = threads.DENSE_THREADS_MAX_ORDER
        assert not isinstance(threads.dense_threads(order // 2, blocked=True), type(threads.nullcontext()))
        assert threads.kernel_threads(order + 1) == len(cores) + 3
    finally:
        for p in loops:
            p.kill()
            p.wait()
    monkeypatch.setattr(threads, "free_cores", lambda: len(cores))  # an idle machine
    assert threads.kernel_threads(threads.KERNEL_THREADS_MIN_ORDER) == len(cores)


def test_free_cores_reads_the_running_tasks(monkeypatch, tmp_path):
    import builtins

    import sparsemix.core.threads as threads

    n = len(threads.os.sched_getaffinity(0))
    assert threads.own_running_threads() >= 1  # this thread, reading it
    real_open = builtins.open
    monkeypatch.setattr(threads, "own_running_threads", lambda: 1)
    for running, expected in [(1, n), (n, 1), (n + 5, 1), (2, max(1, n - 1))]:
        fake = tmp_path / f"loadavg{running}"
        fake.write_text(f"0.50 0.40 0.30 {running}/300 12345\n")
        monkeypatch.setattr(
            builtins,
            "open",
            lambda path, *a, fake=fake, **k: real_open(fake if path == "/proc/loadavg" else path, *a, **k),
        )
        assert threads.free_cores() == expected
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
    assert threads.free_cores() == n
    # this process's own spinning threads are no other task: 3 running, 2 of them ours, one other
    fake = tmp_path / "loadavg_own"
    fake.write_text("0.50 0.40 0.30 3/300 12345\n")
    monkeypatch.setattr(
        builtins, "open", lambda path, *a, **k: real_open(fake if path == "/proc/loadavg" else path, *a, **k)
    )
    monkeypatch.setattr(threads, "own_running_threads", lambda: 2)
    assert threads.free_cores() == max(1, n - 1)


def test_a_fit_runs_on_one_blas_thread_and_its_threaded_stages_take_back_the_callers(monkeypatch):
    """numpy's products between the engine's stages ran with the caller's BLAS threads, whose spinning threads
    made the seed's crossed fit 2.6x slower beside two busy processes (issue 14); a fit is now one
    single-threaded scope, in which the threaded stages take back the caller's threads, as many as are free."""
    from threadpoolctl import threadpool_limits

    import sparsemix.core.threads as threads

    def threads_now():
        return max(lib.num_threads for lib in threads.blas_libraries().lib_controllers)

    with threadpool_limits(limits=2, user_api="blas"):  # the caller's setting
        with threads.fit_threads():
            assert threads_now() == 1
            with threads.blas_threads(True):  # a stage's own single-threaded scope, nested
                assert threads_now() == 1 and threads._outer_threads[0] == 2
            monkeypatch.setattr(threads, "free_cores", lambda: 2)
            with threads.blas_threads(False):  # a threaded stage on an idle machine: the caller's 2
                assert threads_now() == 2
            assert threads.kernel_threads(threads.KERNEL_THREADS_MIN_ORDER) == 2
            monkeypatch.setattr(threads, "free_cores", lambda: 1)
            with threads.blas_threads(False):  # ... and on a busy one: 1
                assert threads_now() == 1
        assert threads_now() == 2 and threads._depth[0] == 0 and threads._outer_threads[0] == 1


def test_a_fit_in_a_worker_thread_runs_on_one_blas_thread_until_the_last_fit_ends():
    """threadpoolctl 3.8 sets BLAS's (process-wide) threads only from the first Python thread that sets them: a fit
    in a worker thread ran its LAPACK calls on the caller's threads (its last digits then differed from the same fit
    in the main thread). And the caller's setting comes back when the last fit open in any thread ends, not the
    first: a fit still running in another thread went on with two."""
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    import sparsemix.core.threads as threads

    libs = threads.blas_libraries().lib_controllers

    def threads_now():
        return max(lib.num_threads for lib in libs)

    assert threads_now() > 1 or os.cpu_count() == 1
    before = threads_now()
    with threads.fit_threads():  # (the main thread takes threadpoolctl's control first)
        assert threads_now() == 1
    opened, closed = Barrier(2), Barrier(2)

    def fit(first: bool):
        with threads.fit_threads():
            inside = threads_now()
            opened.wait()
            if first:  # ends first: the other's scope is still open
                after_first = None
            else:
                closed.wait()  # the first has ended
                after_first = threads_now()
        if first:
            closed.wait()
        return inside, after_first

    with ThreadPoolExecutor(max_workers=2) as pool:
        first, second = pool.submit(fit, True), pool.submit(fit, False)
        (inside_1, _), (inside_2, after_first) = first.result(), second.result()
    assert inside_1 == inside_2 == 1 and after_first == 1
    assert threads_now() == before and threads._depth[0] == 0


def _small_problems():
    """Small models for the dense path: one unstructured term; the engine's three terms (a diagonal and a scalar
    term after the first); two scalar terms; p = 0."""
    rng = np.random.default_rng(11)
    n = 90
    g = rng.integers(0, 9, n)
    h = rng.integers(0, 4, n)
    x = rng.normal(size=n)
    X = np.column_stack([np.ones(n), x])
    y = 1.0 + x + rng.normal(size=9)[g] + x * rng.normal(size=9)[g] * 0.5 + rng.normal(size=4)[h] + rng.normal(size=n)
    slope = RandomTerm.from_codes(
        "g", g, np.column_stack([np.ones(n), x]), 9, CovarianceTemplate.unstructured(2), range(9), ("1", "x")
    )
    scalar_g = RandomTerm.from_codes("g", g, np.ones(n), 9, CovarianceTemplate.scalar(), range(9), ("1",))
    scalar_h = RandomTerm.from_codes("h", h, np.ones(n), 4, CovarianceTemplate.scalar(), range(4), ("1",))
    X3, y3, terms3 = _problem(seed=4)
    return [
        (X, y, [slope], [np.array([0.7, -0.2, 0.4]), np.array([1.0, 0.5, 0.0]), np.array([0.0, 0.0, 0.0])]),
        (X3, y3, terms3, [t for t in THETAS if t is not None]),
        (X, y, [scalar_g, scalar_h], [np.array([0.6, 1.3]), np.array([0.0, 2.0]), np.array([0.0, 0.0])]),
        (np.zeros((n, 0)), y, [slope, scalar_h], [np.array([0.7, -0.2, 0.4, 1.1])]),
    ]


@pytest.mark.parametrize("case", range(4))
def test_dense_path_equals_cholmod(case):
    X, y, terms, thetas = _small_problems()[case]
    dense, _, _ = _system(X, y, terms, factorization="dense")
    sparse, _, _ = _system(X, y, terms, factorization="simplicial")
    assert dense.factorization_mode == "dense" and sparse.factorization_mode == "simplicial"
    for theta in thetas:
        for reml in (False, True):
            a, b = dense.solve(theta, reml), sparse.solve(theta, reml)
            assert a.deviance == pytest.approx(b.deviance, rel=1e-10, abs=1e-10)
            assert a.evaluation.logdet_L2 == pytest.approx(b.evaluation.logdet_L2, rel=1e-10, abs=1e-10)
            assert a.evaluation.logdet_RX2 == pytest.approx(b.evaluation.logdet_RX2, rel=1e-10, abs=1e-10)
            np.testing.assert_allclose(a.beta, b.beta, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(a.b, b.b, rtol=1e-10, atol=1e-10)
            assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-10)
            # R_ZX and c_u depend on CHOLMOD's permutation; their products do not
            ea, eb = a.evaluation, b.evaluation
            np.testing.assert_allclose(ea.RZX.T @ ea.RZX, eb.RZX.T @ eb.RZX, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(ea.RZX.T @ ea.cu, eb.RZX.T @ eb.cu, rtol=1e-10, atol=1e-10)
            assert ea.cu @ ea.cu == pytest.approx(eb.cu @ eb.cu, rel=1e-10)
            np.testing.assert_allclose(ea.RX, eb.RX, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(ea.cbeta, eb.cbeta, rtol=1e-10, atol=1e-10)
        columns = np.arange(0, dense.relcov.q, 3)
        np.testing.assert_allclose(
            dense.conditional_covariance(theta, columns), sparse.conditional_covariance(theta, columns), atol=1e-10
        )


def test_dense_path_survives_pickling_and_new_responses():
    import pickle

    X, y, terms, thetas = _small_problems()[1]
    system, _, _ = _system(X, y, terms, factorization="dense")
    theta = thetas[0]
    before = system.deviance(theta, True)
    again = pickle.loads(pickle.dumps(system))
    assert again.deviance(theta, True) == before
    y2 = y[::-1].copy()
    other = system.with_response(CrossProducts.compute(X, y2, assemble_Z(terms)))
    reference, _, _ = _system(X, y2, terms, factorization="simplicial")
    assert other.deviance(theta, True) == pytest.approx(reference.deviance(theta, True), rel=1e-10)
    assert system.deviance(theta, True) == before


def test_dense_path_infeasible_points_give_inf():
    # the random terms span X: at a huge theta X'V^{-1}X is lost to cancellation, at 1e200 A + I to overflow
    for case, theta in ((0, np.array([1.0, 0.0, 1.0])), (2, np.array([1.0, 1.0]))):
        X, y, terms, _ = _small_problems()[case]
        dense, _, _ = _system(X, y, terms, factorization="dense")
        sparse, _, _ = _system(X, y, terms, factorization="simplicial")
        for scale in (1e9, 1e200):
            for reml in (False, True):
                assert dense.deviance(scale * theta, reml) == sparse.deviance(scale * theta, reml) == np.inf
            assert not dense.evaluate(scale * theta).feasible
        assert np.isfinite(dense.deviance(theta, True))  # and back at a finite point


def test_a_one_thread_scope_inside_another_sets_nothing_unless_threads_were_given_back(monkeypatch):
    """Nested one-thread scopes set nothing where BLAS already runs one thread; inside a stage that gave threads
    back (dense_threads), a one-thread scope sets one thread again, and every exit restores what was there."""
    import sparsemix.core.threads as threads

    blas = threads.blas_libraries()
    libs = blas.lib_controllers
    now = lambda: max(lib.num_threads for lib in libs)
    calls = []
    for cls in {type(lib) for lib in libs}:  # (threadpoolctl 3.8's set_num_threads goes through _real_set_num_threads)
        name = "_real_set_num_threads" if hasattr(cls, "_real_set_num_threads") else "set_num_threads"
        setter = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda self, n, setter=setter: calls.append(n) or setter(self, n))
    monkeypatch.setattr(threads, "free_cores", lambda: 2)
    with blas.limit(limits=2):
        calls.clear()
        with threads.fit_threads():
            assert now() == 1
            with threads.blas_threads(True):
                assert now() == 1
            assert calls == [1] * len(libs)  # the nested scope set nothing
            with threads.dense_threads(threads.DENSE_THREADS_MIN_ORDER):
                assert now() == 2
                with threads.blas_threads(True):
                    assert now() == 1
                assert now() == 2
            assert calls == [1] * len(libs) + [2] * len(libs) + [1] * len(libs) + [2] * len(libs) + [1] * len(libs)
            assert now() == 1
        assert now() == 2


@pytest.mark.parametrize(
    "setting, stalls",
    [
        ("always defer defer+madvise [madvise] never", True),
        ("always defer [defer+madvise] madvise never", True),
        ("[always] defer defer+madvise madvise never", False),
        ("always [defer] defer+madvise madvise never", False),
        ("always defer defer+madvise madvise [never]", False),
        ("", False),
    ],
)
def test_which_kernel_settings_stall_on_numpys_huge_page_hint(setting, stalls):
    from sparsemix.core.pages import compaction_on_fault

    assert compaction_on_fault(setting) is stalls


def test_glibc_keeps_freed_memory_unless_the_user_tuned_its_allocator(monkeypatch):
    """keep_freed_memory sets glibc's mmap and trim thresholds (32 and 64 MB) through mallopt, once; not where a
    MALLOC_ variable says the user set them, nor off glibc."""
    import ctypes
    from types import SimpleNamespace

    from sparsemix.core import pages

    calls = []

    def mallopt(parameter, value):
        calls.append((parameter, value))
        return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: SimpleNamespace(mallopt=mallopt))
    monkeypatch.setattr(pages.os, "confstr", lambda name: "glibc 2.36")
    for name in pages._MALLOC_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert pages.keep_freed_memory.__wrapped__() is True
    assert calls == [(-3, 32 * 2**20), (-1, 64 * 2**20)]
    calls.clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert pages.keep_freed_memory.__wrapped__() is False and calls == []
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setattr(pages.os, "confstr", lambda name: None)  # (musl, macOS)
    assert pages.keep_freed_memory.__wrapped__() is False and calls == []


def test_numpys_huge_page_hint_is_off_for_a_fit_and_restored(monkeypatch):
    """Where the kernel stalls on it, the hint is off while a fit runs (nested and concurrent fits included) and as
    it was afterwards; where the user set NUMPY_MADVISE_HUGEPAGE, it is never touched."""
    from sparsemix.core import pages
    from sparsemix.core.threads import fit_threads

    state = [True]

    def setter(enabled):
        previous, state[0] = state[0], bool(enabled)
        return previous

    seen = []
    monkeypatch.setattr(pages, "_hint_setter", lambda: setter)
    with fit_threads():
        seen.append(state[0])
        with fit_threads():
            seen.append(state[0])
        seen.append(state[0])
    assert seen == [False, False, False] and state[0] is True
    monkeypatch.undo()
    monkeypatch.setattr(pages, "compaction_on_fault", lambda setting=None: True)
    try:
        pages._hint_setter.cache_clear()
        assert pages._hint_setter() is not None  # numpy's switch, found
        monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
        pages._hint_setter.cache_clear()
        assert pages._hint_setter() is None
    finally:
        pages._hint_setter.cache_clear()


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("zeros", [False, True])
def test_transform_columns_is_z_times_the_levels_transform(zeros, k):
    """Z (I kron T) for a term's working columns: the direct path (every row k entries of one level, as
    RandomTerm.from_codes lays them out), the general one (a stored zero dropped leaves a row short) and a scalar
    term's scaled copy all equal scipy's product, with no zero stored."""
    from sparsemix.core.coordinates import column_transform, transform_columns

    rng = np.random.default_rng(3)
    n, levels = 400, 25
    codes = rng.integers(0, levels, n)
    values = np.column_stack([np.ones(n), rng.normal(size=n), rng.integers(0, 3, n).astype(float)])[:, 3 - k :]
    if zeros:
        values[:40, -1] = 0.0
    if k == 3:
        values[40, 1] = values[:, 1].mean()  # lands on 0 once centred
    term = RandomTerm.from_codes(
        "g", codes, values, levels, CovarianceTemplate.unstructured(k), tuple(range(levels)), ("a", "b", "c")[:k]
    )
    T = column_transform(term)
    assert T is not None
    got = transform_columns(term.Z, levels, T)
    expected = sp.csc_matrix(term.Z @ sp.kron(sp.eye(levels), sp.csr_matrix(T)))
    expected.eliminate_zeros()
    assert abs(got - expected).max() < 1e-12
    assert got.nnz == expected.nnz and np.all(got.data != 0)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("gaps", [False, True])
@pytest.mark.parametrize("direct_max, scalar_max", [(0, 0), (0, 10**9), (10**9, 0)])
def test_level_layout_csc_sorts_its_entries_as_scipy_does(direct_max, scalar_max, gaps, k, monkeypatch):
    """level_layout_csc's own sort (small terms; a scalar term's radix sort) and scipy's conversion (large ones) give
    the same CSC arrays: rows ascending within each column, no zero stored, nothing for a row without a level (-1)."""
    from sparsemix.core import terms

    monkeypatch.setattr(terms, "DIRECT_CSC_MAX_ENTRIES", direct_max)
    monkeypatch.setattr(terms, "SCALAR_DIRECT_MAX_ROWS", scalar_max)
    rng = np.random.default_rng(5)
    n, levels = 300, 17
    row_level = rng.integers(-1 if gaps else 0, levels, n)
    values = rng.normal(size=(n, k))
    if gaps:
        values[rng.random((n, k)) < 0.2] = 0.0
    got = terms.level_layout_csc(row_level, values, levels)
    dense = np.zeros((n, levels * k))
    for i in np.flatnonzero(row_level >= 0):
        dense[i, row_level[i] * k : (row_level[i] + 1) * k] = values[i]
    expected = sp.csc_matrix(dense)
    np.testing.assert_array_equal(got.indptr, expected.indptr)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_array_equal(got.data, expected.data)


@pytest.mark.parametrize("runs", [1, 7, 200])
def test_unique_inverse_is_numpys_unique(runs):
    """Keys made of sorted runs (a sparse matrix's columns), with repeats within and across runs, and unsorted keys."""
    rng = np.random.default_rng(runs)
    keys = np.concatenate([np.sort(rng.integers(0, 500, 40)) for _ in range(runs)])
    for k in (keys, rng.permutation(keys)):
        expected = np.unique(k, return_inverse=True)
        got = unique_inverse(k)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0][got[1]], k)


@pytest.mark.parametrize("transposed", [True, False])
def test_gram_of_one_entry_a_row_terms_equals_the_sparse_product(monkeypatch, transposed):
    """Large designs sum Z'Z pair by pair where every term has at most one entry a row (cross_products.
    _one_per_row_gram): the same pattern (sorted, no zero stored) and values as scipy's product, its crossed blocks
    summed after a transpose or (above TRANSPOSE_SUM_MAX_ENTRIES) row by row; a block with two entries in a row (a
    term with slopes) goes back to the product (None)."""
    import sparsemix.core.cross_products as cross_module
    from sparsemix.core.cross_products import _one_per_row_gram

    if not transposed:
        monkeypatch.setattr(cross_module, "TRANSPOSE_SUM_MAX_ENTRIES", 0)

    rng = np.random.default_rng(21)
    n = 20_000
    rows = np.arange(n)
    a, b, c = rng.integers(0, 300, n), rng.integers(0, 50, n), rng.integers(0, 8, n)
    values_c = np.where(rng.random(n) < 0.3, 0.0, rng.normal(size=n))  # rows outside the term: no entry
    blocks = [
        sp.csc_matrix((rng.normal(size=n), (rows, a)), shape=(n, 300)),
        sp.csc_matrix((np.ones(n), (rows, b)), shape=(n, 50)),
        sp.csc_matrix((values_c[values_c != 0], (rows[values_c != 0], c[values_c != 0])), shape=(n, 8)),
    ]
    Z = sp.hstack(blocks, format="csc")
    expected = sp.csc_matrix(sp.csr_matrix(Z.T) @ Z)
    expected.sort_indices()
    before = Z.copy()
    got = _one_per_row_gram(Z, [300, 50, 8])
    assert got.has_sorted_indices
    for part in ("data", "indices", "indptr"):  # Z's own arrays are read, not sorted in place
        np.testing.assert_array_equal(getattr(Z, part), getattr(before, part))
    np.testing.assert_array_equal(got.indptr, expected.indptr)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_allclose(got.data, expected.data, rtol=1e-12, atol=1e-12)
    with_slope = sp.hstack([Z, sp.csc_matrix(np.ones((n, 1)))], format="csc")
    assert _one_per_row_gram(with_slope, [300, 50, 4, 5]) is None  # c's last 4 columns and the slope share rows


def test_a_pattern_keeps_the_factorization_measured_for_it(monkeypatch):
    """The timed choice is remembered by pattern: a second system of the same design takes the same mode whatever
    the clock says then (two fits of one design went down different optimizers on a busy machine)."""
    import sparsemix.core.system as system_module
    from sparsemix.fit.stages import build_system

    rng = np.random.default_rng(5)
    # 80 columns after the first term (below the untimed Schur form's order) and 50 fixed effects: not held dense
    terms = _crossed_terms(600, 80, 3000, seed=5)
    X, y = np.column_stack([np.ones(3000), rng.normal(size=(3000, 49))]), rng.normal(size=3000)
    monkeypatch.setattr(system_module, "_CHOSEN_MODES", {})
    modes = []
    for simplicial_time in (1.0, 1e-9):  # first simplicial loses every race, then it would win every one
        monkeypatch.setattr(
            system_module,
            "_time_refactorization",
            lambda factor, A, factors, limit=None, t=simplicial_time: t if factor.mode == "simplicial" else 1e-3,
        )
        modes.append(build_system(X, y, terms).factorization_mode)
    assert modes[0] != "simplicial" and modes[1] == modes[0]
    monkeypatch.setattr(system_module, "_CHOSEN_MODES", {})  # a new process would measure again
    assert build_system(X, y, terms).factorization_mode == "simplicial"


def test_hstack_csc_equals_scipys_hstack():
    """terms.hstack_csc (Z's blocks side by side, their arrays concatenated) gives scipy's hstack: CSR blocks,
    empty blocks and a single block included."""
    from sparsemix.core.terms import hstack_csc

    rng = np.random.default_rng(5)
    for trial in range(30):
        n = int(rng.integers(1, 40))
        blocks = [
            sp.random(
                n, int(rng.integers(0, 12)), density=float(rng.random()), format="csc", random_state=trial * 7 + j
            )
            for j in range(int(rng.integers(1, 4)))
        ]
        blocks[0] = sp.csr_matrix(blocks[0]) if trial % 3 == 0 else blocks[0]
        got, expected = hstack_csc(blocks), sp.hstack(blocks, format="csc")
        assert got.format == "csc" and got.shape == expected.shape
        np.testing.assert_array_equal(got.indptr, expected.indptr)
        np.testing.assert_array_equal(got.indices, expected.indices)
        np.testing.assert_array_equal(got.data, expected.data)


def test_least_squares_by_normal_equations_or_qr_matches_lstsq():
    """CrossProducts' least-squares shift solves as numpy's lstsq does, for one response or several: by X'X's
    Cholesky factor where X is well conditioned (columns of very different scales included), by LAPACK's QR (Q
    applied by its reflectors) where two columns nearly coincide, and by lstsq itself where X is rank deficient."""
    from sparsemix.core.cross_products import _least_squares

    rng = np.random.default_rng(8)
    for n, p, r in [(144, 1, 1), (102, 3, 2), (4_059, 5, 1), (30, 7, 3), (4_000, 81, 2)]:
        X = rng.normal(size=(n, p)) * 10.0 ** rng.uniform(-3, 3, size=p)
        Y = rng.normal(size=(n, r))
        expected = np.linalg.lstsq(X, Y, rcond=None)[0]
        solve = _least_squares(X, X.T @ X)
        assert solve.__name__ == "normal_equations"
        np.testing.assert_allclose(solve(Y), expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    X = rng.normal(size=(200, 3))
    X[:, 2] = X[:, 0] + 1e-6 * rng.normal(size=200)  # condition number ~1e6: the normal equations would lose digits
    Y = rng.normal(size=(200, 2))
    solve = _least_squares(X, X.T @ X)
    assert solve.__name__ == "solve"
    np.testing.assert_allclose(solve(Y), np.linalg.lstsq(X, Y, rcond=None)[0], rtol=1e-8)
    X = rng.normal(size=(50, 2))
    X = np.column_stack([X, X[:, 0] + X[:, 1]])  # rank 2 of 3
    Y = rng.normal(size=(50, 1))
    expected = np.linalg.lstsq(X, Y, rcond=None)[0]
    np.testing.assert_allclose(_least_squares(X, X.T @ X)(Y), expected, rtol=1e-10, atol=1e-12)


def test_level_rows_of_a_scalar_first_term_read_csc_order():
    """SchurFactor's (level, row) pairs of G = (Z'Z)_21: for a scalar first term read straight off G's CSC order;
    the same pairs and values as the sorted, deduplicated general path (unsorted, duplicated input included)."""
    from sparsemix.core.factor import _level_rows

    rng = np.random.default_rng(13)
    for trial in range(20):
        m, q1, nnz = int(rng.integers(1, 30)), int(rng.integers(1, 30)), int(rng.integers(0, 120))
        rows, cols = rng.integers(0, m, nnz), rng.integers(0, q1, nnz)
        G = sp.csc_matrix((rng.normal(size=nnz), (rows, cols)), shape=(m, q1))
        if trial % 2:  # scipy's COO -> CSC sums duplicates; unsorted indices and duplicates by hand
            G = sp.csc_matrix((np.repeat(G.data, 2) / 2, np.repeat(G.indices, 2), G.indptr * 2), shape=G.shape)
            G.has_sorted_indices = False
        keys, inverse = unique_inverse(G.tocoo().col.astype(np.int64) * m + G.tocoo().row)
        expected_values = np.zeros(keys.shape[0])
        np.add.at(expected_values, inverse, G.tocoo().data)
        level_rows, values = _level_rows(G, 1)
        np.testing.assert_array_equal(level_rows, np.column_stack(np.divmod(keys, m)))
        np.testing.assert_allclose(values[:, 0], expected_values, rtol=1e-14, atol=1e-15)


def test_row_levels_one_entry_a_row_and_several():
    """terms.row_levels: each row's level where every row has at most one entry (the counted fast path), or one
    level for several entries (a term with slopes: k entries a row); None where a row has two levels."""
    from sparsemix.core.terms import row_levels

    rows, level = np.array([3, 0, 2]), np.array([1, 0, 4])
    np.testing.assert_array_equal(row_levels(rows, level, 5), [0, -1, 4, 1, -1])
    np.testing.assert_array_equal(row_levels(np.array([0, 0, 2, 2]), np.array([1, 1, 0, 0]), 3), [1, -1, 0])
    assert row_levels(np.array([0, 0, 1]), np.array([1, 2, 0]), 2) is None


def test_a_lone_term_of_many_levels_is_held_dense_with_the_same_deviance(monkeypatch):
    """One term with slopes and 1,500 levels (3,000 columns, above DENSE_MAX_Q) is held dense, eliminated level by
    level (its exact Hessian: a handful of Newton steps where BOBYQA took ~60 evaluations); its deviance equals
    CHOLMOD's at several theta, and its blocks are those of the whole augmented matrix (formed below
    DENSE_AUGMENTED_MAX_ENTRIES, from Z'Z's sparse blocks above)."""
    import sparsemix.core.factor as factor

    rng = np.random.default_rng(31)
    n, n_levels = 12_000, 1_500
    g, x = rng.integers(0, n_levels, n), rng.normal(size=n)
    y = 1.0 + x + rng.normal(size=n_levels)[g] + 0.5 * rng.normal(size=n_levels)[g] * x + rng.normal(size=n)
    term = RandomTerm.from_codes(
        "g",
        g,
        np.column_stack([np.ones(n), x]),
        n_levels,
        CovarianceTemplate.unstructured(2),
        range(n_levels),
        ("1", "x"),
    )
    X = np.column_stack([np.ones(n), x])
    dense, _, rc = _system(X, y, [term])
    cholmod, _, _ = _system(X, y, [term], factorization="simplicial")
    assert dense.factorization_mode == "dense" and dense.supports_hessian
    for theta in ([1.0, 0.0, 1.0], [0.7, 0.2, 0.4], [2.0, -0.5, 0.1]):
        for reml in (True, False):
            assert dense.deviance(np.array(theta), reml) == pytest.approx(
                cholmod.deviance(np.array(theta), reml), rel=1e-11
            )
    split = dense._factor
    monkeypatch.setattr(factor, "DENSE_AUGMENTED_MAX_ENTRIES", 10**12)
    whole = factor.DenseFactor(dense.cross, rc)
    for name in ("G11", "G1R", "GRR"):
        np.testing.assert_array_equal(getattr(split, name), getattr(whole, name))
    monkeypatch.undo()
    from sparsemix.fit.stages import optimize_system

    newton, bobyqa = optimize_system(dense), optimize_system(cholmod)
    assert newton.n_evaluations <= 10 < bobyqa.n_evaluations
    assert newton.deviance <= bobyqa.deviance + 1e-8


@pytest.mark.parametrize("unchecked", [True, False])
def test_csc_from_arrays_is_scipys_matrix_of_those_arrays(unchecked, monkeypatch):
    """The matrix made without scipy's checks has scipy's attributes, index dtype and behaviour (products, slices,
    conversions); where scipy's matrices change their attributes, scipy's constructor makes it."""
    from sparsemix.core import terms

    monkeypatch.setattr(terms, "_UNCHECKED_CSC", unchecked)
    rng = np.random.default_rng(11)
    expected = sp.random(40, 15, density=0.3, format="csc", random_state=rng)
    expected.sort_indices()
    got = terms.csc_from_arrays(expected.data, expected.indices.astype(np.int64), expected.indptr, expected.shape)
    reference = sp.csc_matrix((expected.data, expected.indices, expected.indptr), shape=expected.shape)
    assert type(got) is type(reference) and set(vars(got)) == set(vars(reference))
    assert got.indices.dtype == reference.indices.dtype == np.int32 and got.indptr.dtype == np.int32
    assert got.shape == (40, 15) and got.has_sorted_indices
    np.testing.assert_array_equal((got.T @ got).toarray(), (reference.T @ reference).toarray())
    np.testing.assert_array_equal(got[:, 3:9].toarray(), reference[:, 3:9].toarray())
    np.testing.assert_array_equal(got.tocsr().toarray(), expected.toarray())


@pytest.mark.parametrize("n, q, density", [(50, 10, 0.2), (1000, 300, 0.01), (10, 40, 0.3), (0, 5, 0.1)])
def test_the_gram_by_scipys_loops_is_scipys_product(n, q, density, monkeypatch):
    """Z'Z by scipy's compiled loops called directly (cross_products._sparse_gram) has the arrays of scipy's own
    product, sorted, as before (its wrapper's conversions and checks took 330-390 us of small fits); and where those
    private loops are missing, scipy's product itself."""
    from sparsemix.core import cross_products

    rng = np.random.default_rng(n + q)
    Z = sp.random(n, q, density=density, format="csc", random_state=rng)
    Z.data = rng.normal(size=Z.nnz)
    expected = sp.csc_matrix(sp.csr_matrix(Z.T) @ Z)
    expected.sort_indices()
    for tools in (cross_products._SPARSE_TOOLS, None):
        monkeypatch.setattr(cross_products, "_SPARSE_TOOLS", tools)
        got = cross_products._sparse_gram(Z)
        assert got.format == "csc" and got.has_sorted_indices
        np.testing.assert_array_equal(got.indptr, expected.indptr)
        np.testing.assert_array_equal(got.indices, expected.indices)
        np.testing.assert_array_equal(got.data, expected.data)


@pytest.mark.parametrize("formula", ["y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)", "y ~ 1 + (1|d) + (1|dept)"])
def test_scalar_terms_take_z_transpose_zs_lower_triangle_as_the_general_structure_builds_it(monkeypatch, formula):
    """Where every term is scalar, A's pattern is Z'Z's lower triangle read off directly (system._scalar_structure):
    the same pattern and the same values at every theta as the general block-pair path; with slopes, or a level
    whose diagonal entry is missing from Z'Z, the general path."""
    import sparsemix.core.system as system_module
    from sparsemix.datasets import generate_insteval_like
    from sparsemix.lme4.design import build_design

    data = generate_insteval_like(300, 80, 6, 6.0, seed=2)
    design = build_design(formula, data)
    direct = design.system()
    monkeypatch.setattr(system_module, "_scalar_structure", lambda ZtZ, relcov: None)
    general = design.system()
    A, B = direct._A, general._A
    np.testing.assert_array_equal(A.indptr, B.indptr)
    np.testing.assert_array_equal(A.indices, B.indices)
    for theta in (np.full(len(design.terms), 0.7), np.linspace(0.3, 1.9, len(design.terms))):
        factors = direct.relcov.system_factors(theta)
        direct._write_values(factors)
        general._write_values(factors)
        np.testing.assert_array_equal(A.data, B.data)
        assert direct.deviance(theta, True) == pytest.approx(general.deviance(theta, True), rel=1e-12)
    monkeypatch.undo()
    slopes = build_design("y ~ 1 + (1 + service | d)", data).system()
    assert system_module._scalar_structure(slopes.cross.ZtZ, slopes.relcov) is None
    ZtZ = direct.cross.ZtZ.tolil()
    ZtZ[0, 0] = 0.0
    assert system_module._scalar_structure(sp.csc_matrix(ZtZ.tocsc()), direct.relcov) is None
    assert system_module._scalar_structure(direct.cross.ZtZ, direct.relcov) is not None
    monkeypatch.setattr(system_module, "SCALAR_STRUCTURE_MAX_ENTRIES", direct.cross.ZtZ.nnz - 1)
    assert system_module._scalar_structure(direct.cross.ZtZ, direct.relcov) is None
