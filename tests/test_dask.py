"""Fits from data partitioned on a Dask cluster (a distributed.LocalCluster with worker processes)."""

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

import sparsemix

dd = pytest.importorskip("dask.dataframe")
distributed = pytest.importorskip("distributed")
from dask import delayed  # noqa: E402

FORMULA = "y ~ x + C(f) + (1 + x | g) + (1 | h)"


def _frame(n: int, seed: int = 0, n_g: int = 40, n_h: int = 25) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g, h, x = rng.integers(0, n_g, n), rng.integers(0, n_h, n), rng.normal(size=n)
    f = np.array(["a", "b", "c"])[rng.integers(0, 3, n)]
    y = (
        1
        + 0.5 * x
        + (f == "b")
        + rng.normal(size=n_g)[g]
        + 0.4 * x * rng.normal(size=n_g)[g]
        + 0.7 * rng.normal(size=n_h)[h]
        + rng.normal(size=n)
    )
    return pd.DataFrame({"y": y, "x": x, "g": g, "h": h, "f": f, "w": rng.uniform(0.5, 2.0, n)})


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=3, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    """The data as a Parquet data set of 5 files, one missing value included."""
    data = _frame(4000)
    data.loc[17, "x"] = np.nan
    root = tmp_path_factory.mktemp("pq")
    for i, part in enumerate(np.array_split(np.arange(len(data)), 5)):
        data.iloc[part].to_parquet(root / f"part-{i}.parquet")
    return root, data


def _assert_equal_fits(a, b, rtol=1e-8):
    assert b.llf == pytest.approx(a.llf, rel=rtol)
    np.testing.assert_allclose(b.fe_params.to_numpy(), a.fe_params.to_numpy(), rtol=rtol, atol=1e-10)
    np.testing.assert_allclose(b.variance_components()["vcov"], a.variance_components()["vcov"], rtol=rtol, atol=1e-10)
    assert list(b.fe_params.index) == list(a.fe_params.index)
    assert b.ngroups == a.ngroups and b.nobs == a.nobs


@pytest.mark.slow
def test_fit_from_parquet_files_equals_the_in_memory_fit(client, parquet_dir):
    root, data = parquet_dir
    ddf = dd.read_parquet(str(root / "*.parquet"))
    assert ddf.npartitions == 5
    for kw in ({}, {"weights": "w"}, {"reml": False}):
        a = sparsemix.lmer(FORMULA, data, **kw)
        b = sparsemix.lmer(FORMULA, ddf, **kw)
        _assert_equal_fits(a, b)
        assert b.design.n_dropped == a.design.n_dropped == 1
    # Conditional modes come from the cross-products: the same on the client.
    np.testing.assert_allclose(
        b.ranef()["g"].to_numpy(dtype=float), a.ranef()["g"].to_numpy(dtype=float), rtol=1e-8, atol=1e-10
    )


def test_rows_based_results_are_dask_collections_computed_on_the_cluster(client, parquet_dir):
    root, data = parquet_dir
    ddf = dd.read_parquet(str(root / "*.parquet"))
    a, b = sparsemix.lmer(FORMULA, data), sparsemix.lmer(FORMULA, ddf)
    fitted = b.fitted
    assert hasattr(fitted, "compute")
    complete = data.dropna()
    np.testing.assert_allclose(fitted.compute().to_numpy(), a.fitted.to_numpy(), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(b.resid.compute().to_numpy(), a.resid.to_numpy(), rtol=1e-6, atol=1e-7)
    new = complete.iloc[:50].assign(g=np.r_[np.full(25, 999), complete.g.iloc[25:50]])  # 25 rows of a new level
    pred = b.predict(dd.from_pandas(new, npartitions=2)).compute()
    with pytest.warns(sparsemix.NewLevelWarning, match="25 of 50 row"):
        in_memory = a.predict(new)
    np.testing.assert_allclose(pred.to_numpy(), in_memory.to_numpy(), rtol=1e-6, atol=1e-8)
    with pytest.warns(sparsemix.NewLevelWarning, match="25 of 50 row"):  # pandas newdata: counted at once
        np.testing.assert_allclose(b.predict(new).to_numpy(), in_memory.to_numpy(), rtol=1e-6, atol=1e-8)
    with pytest.raises(sparsemix.InputError, match="25 of 50 row.*not in the fitted data"):
        b.predict(new, allow_new_levels=False)
    assert "Scaled residuals" in str(b.summary())


def test_what_reaches_the_client_does_not_grow_with_the_rows(client):
    small, large = _frame(2000, seed=3), _frame(40_000, seed=3)
    fits = [sparsemix.lmer(FORMULA, dd.from_pandas(d, npartitions=8)) for d in (small, large)]
    sent = [f.design.transferred_bytes for f in fits]
    # Same levels and columns: the same sizes (Z'Z's pattern may gain a few level pairs with more rows).
    assert sent[1] <= 1.2 * sent[0]
    assert sent[1] < large.memory_usage(deep=True).sum() / 10
    assert fits[1].design.data is not None and not isinstance(fits[1].design.data, pd.DataFrame)


@pytest.mark.slow
@pytest.mark.parametrize("start", ["moments", "pilot"])
def test_large_crossed_design_starts_where_the_in_memory_fit_starts_and_equals_it(client, start, monkeypatch):
    # 600 levels of b after the first term: the in-memory fit starts from the variance components' moments (their
    # sums only: pilot.components_over_pilot), and so does this one; where that block is too large for them (here:
    # made so), both start from a pilot, this one from one more pass over the rows of the kept levels of b (weights
    # too: the pilot's sums carry them). Random slopes' L-BFGS-B with the gradient takes no pilot.
    from sparsemix.datasets import generate_crossed_slopes
    from sparsemix.fit import pilot, pipeline

    if start == "pilot":
        monkeypatch.setattr(pilot, "COMPONENTS_OVER_PILOT_MAX_ORDER", 0)
    passes = []
    monkeypatch.setattr(
        pipeline, "pilot_start", lambda *a, original=pipeline.pilot_start: passes.append(1) or original(*a)
    )
    data = generate_crossed_slopes(30_000, 1_500, 600).assign(w=lambda d: 1.0 + (d.index % 3) * 0.5)
    formula = "y ~ 1 + x + (1 | a) + (1 | b)"
    ddf = dd.from_pandas(data, npartitions=6)
    for kw in ({}, {"weights": "w"}):
        a = sparsemix.lmer(formula, data, **kw)
        b = sparsemix.lmer(formula, ddf, **kw)
        cold = sparsemix.lmer(formula, ddf, start=b.fit_result.system.relcov.start(), **kw)
        _assert_equal_fits(a, b)
        assert b.n_evaluations < cold.n_evaluations
        assert b.llf == pytest.approx(cold.llf, rel=1e-12)
    assert len(passes) == (2 if start == "pilot" else 0)  # (the in-memory fits' pilots; the Dask door sums its own)


@pytest.mark.slow
def test_a_worker_lost_mid_fit_does_not_change_the_answer(client, parquet_dir):
    _, data = parquet_dir
    expected = sparsemix.lmer(FORMULA, data)
    pieces = np.array_split(np.arange(len(data)), 24)

    def slow_piece(rows):
        time.sleep(0.25)  # keeps the passes running long enough to lose a worker in one
        return data.iloc[rows]

    ddf = dd.from_delayed([delayed(slow_piece)(rows) for rows in pieces], meta=data.iloc[:0])
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(sparsemix.lmer, FORMULA, ddf)
        time.sleep(1.0)
        victim = list(client.scheduler_info()["workers"])[0]
        try:
            client.run(lambda: __import__("os")._exit(1), workers=[victim])  # the worker process dies
        except (distributed.comm.core.CommClosedError, OSError):
            pass  # as it should: it is gone
        got = future.result(timeout=300)
    _assert_equal_fits(expected, got)


def test_bootstrap_runs_on_the_cluster_and_is_reproducible(client, parquet_dir):
    root, data = parquet_dir
    ddf = dd.read_parquet(str(root / "*.parquet"))
    fit = sparsemix.lmer("y ~ x + (1 | g) + (1 | h)", ddf)
    draws = fit.bootstrap(nsim=12, seed=5)
    again = fit.bootstrap(nsim=12, seed=5)
    pd.testing.assert_frame_equal(draws, again)
    assert list(draws.columns) == fit.sdcor_names + list(fit.fe_params.index)
    # Replicates simulated at the estimates scatter around them.
    estimates = np.r_[fit.sdcor.to_numpy(), fit.fe_params.to_numpy()]
    spread = draws.std().to_numpy()
    assert np.all(np.abs(draws.mean().to_numpy() - estimates) < 3 * spread / np.sqrt(12) + 1e-9)
    ci = fit.confint(method="boot", nsim=12, seed=5)
    assert np.all(ci["lower"] <= ci["upper"])


def test_cli_fits_parquet_files_through_the_scheduler(client, parquet_dir, capsys):
    from sparsemix.cli import main

    root, data = parquet_dir
    code = main(
        ["fit", str(root / "*.parquet"), "--formula", FORMULA, "--dask", client.scheduler.address, "--format", "json"]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert record["llf"] == pytest.approx(sparsemix.lmer(FORMULA, data).llf, rel=1e-8)
    assert record["n_dropped"] == 1


def test_without_dask_the_message_names_the_extra(monkeypatch):
    from sparsemix.dask.fit import fit_partitioned
    from sparsemix.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "dask", None)
    with pytest.raises(MissingExtraError, match=r"sparsemix\[dask\]"):
        fit_partitioned(FORMULA, object())


def test_stateful_transforms_and_eval_env_are_refused(client):
    ddf = dd.from_pandas(_frame(500), npartitions=2)
    with pytest.raises(sparsemix.FormulaError, match="center"):
        sparsemix.lmer("y ~ center(x) + (1 | g)", ddf)
    for name, call in (("ns", "ns(x, 3)"), ("bs", "bs(x, df = 4)"), ("relevel", 'relevel(f, "b")')):
        with pytest.raises(sparsemix.FormulaError, match=rf"^{name}\(\) learns from a whole column"):
            sparsemix.lmer(f"y ~ {call} + (1 | g)", ddf)
    with pytest.raises(sparsemix.InputError, match="eval_env"):
        sparsemix.lmer("y ~ x + (1 | g)", ddf, eval_env={"f": abs})


@pytest.mark.parametrize("shift, scale", [(2000.0, 1.0), (0.0, 1e9)])
def test_a_slopes_origin_and_units_do_not_change_the_partitioned_fit(client, shift, scale):
    """The partitioned fit optimizes on the same centred, scaled columns as the in-memory one (coordinates.py,
    from the columns' moments summed in the second pass): the same optimum at x + 2000 or x * 1e9."""
    data = _frame(600, seed=4).dropna()
    moved = data.assign(x=(data.x + shift) * scale)
    ddf = dd.from_pandas(moved, npartitions=3)
    base = sparsemix.lmer(FORMULA, data)
    a, b = sparsemix.lmer(FORMULA, moved), sparsemix.lmer(FORMULA, ddf)
    assert b.fit_result.converged and not b.is_singular
    assert b.llf == pytest.approx(a.llf, rel=1e-9)
    # REML's log|X'V^-1 X| moves by -log(scale) with the fixed-effect column x
    assert b.llf == pytest.approx(base.llf - np.log(scale), rel=1e-9)
    np.testing.assert_allclose(b.fitted.compute().to_numpy(), base.fitted.to_numpy(), rtol=1e-6, atol=1e-6)


def test_uncorrelated_slopes_take_the_merged_term_as_in_memory(client):
    """lme4's (x || g) on the cluster: the scalar terms of one grouping are one diagonal term for the optimizer,
    as in the in-memory fit (the same evaluations, the same optimum)."""
    data = _frame(3000, seed=3)
    formula = "y ~ x + (x || g) + (1 | h)"
    a = sparsemix.lmer(formula, data)
    b = sparsemix.lmer(formula, dd.from_pandas(data, npartitions=4))
    assert b.fit_result.system.diagonal_runs == a.fit_result.system.diagonal_runs == ((0, 2),)
    assert b.n_evaluations == a.n_evaluations
    _assert_equal_fits(a, b)


def test_a_factors_indicator_term_is_fitted_and_named_as_in_memory(client):
    """`(0 + factor(f) | g)` on the cluster: the indicator path, patsy's names (factor(f)[a]), the in-memory fit."""
    data = _frame(2000, seed=5)
    formula = "y ~ x + (0 + factor(f) | g) + (1 | h)"
    a = sparsemix.lmer(formula, data)
    b = sparsemix.lmer(formula, dd.from_pandas(data, npartitions=3))
    _assert_equal_fits(a, b, rtol=1e-6)
    assert (
        list(b.ranef()["g"].columns) == list(a.ranef()["g"].columns) == ["factor(f)[a]", "factor(f)[b]", "factor(f)[c]"]
    )
    assert [info.indicator for info in b.design.term_info] == [info.indicator for info in a.design.term_info]
