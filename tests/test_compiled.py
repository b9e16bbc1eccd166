"""The compiled kernels of small fits as core/compiled.py hands them out: a fit whose kernel is not compiled yet takes
the numpy path to the same optimum while a separate process compiles it (fit/warmup.py), which numba's cache then
gives every later request; the warm-up compiles every such kernel; a compile already running elsewhere is waited for."""

import fcntl
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pandas as pd
import pytest
from conftest import load_reference, reference_data

import sparsemix
from sparsemix.core import compiled, kernels
from sparsemix.fit import warmup


def _models():
    """A growth curve (sleepstudy's correlated slopes; mlmRev's Early, a singular optimum) and ScotsSec's crossed
    intercepts held dense and scored: between them every kernel in compiled.KERNELS."""
    slopes = load_reference("random_slopes")
    early, scots = slopes["Early"], slopes["ScotsSec"]
    return [
        (reference_data("sleepstudy"), "Reaction ~ Days + (Days | Subject)", True),
        (pd.DataFrame(early["data"]), early["fits"][0]["formula"], True),
        (pd.DataFrame(early["data"]), early["fits"][1]["formula"], False),
        (pd.DataFrame(scots["data"]), scots["fits"][0]["formula"], True),
        (pd.DataFrame(scots["data"]), scots["fits"][1]["formula"], False),
    ]


@pytest.fixture
def background(monkeypatch):
    """compiled's default mode with no kernel ready and none in numba's cache; compile requests recorded, not run."""
    requests = []
    monkeypatch.delenv("SPARSEMIX_JIT", raising=False)
    monkeypatch.setattr(compiled, "_ready", {})
    monkeypatch.setattr(compiled, "_checked", {})
    monkeypatch.setattr(compiled, "_compiled", lambda dispatcher: False)
    monkeypatch.setattr(compiled, "_compiling", lambda: requests.append(1) or True)
    return requests


@pytest.mark.filterwarnings("ignore:boundary \\(singular\\) fit")  # Early's optimum: lme4's warning too
def test_fits_take_the_numpy_paths_to_the_same_optimum_while_kernels_compile(background, monkeypatch):
    compiled_fits = []
    with monkeypatch.context() as m:
        m.setenv("SPARSEMIX_JIT", "now")
        for data, formula, reml in _models():
            compiled_fits.append(sparsemix.lmer(formula, data, reml=reml))
    compiled._ready.clear()
    for (data, formula, reml), ref in zip(_models(), compiled_fits):
        fit = sparsemix.lmer(formula, data, reml=reml)
        assert fit.llf == pytest.approx(ref.llf, abs=1e-7)
        np.testing.assert_allclose(fit.fe_params, ref.fe_params, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fit.theta, ref.theta, rtol=1e-4, atol=1e-5)
    assert compiled._ready == {}  # no kernel handed out
    assert background  # and their compilation asked for


def test_a_kernel_is_asked_of_numbas_cache_at_most_every_recheck_interval(background, monkeypatch):
    looked = []
    monkeypatch.setattr(compiled, "_compiled", lambda dispatcher: looked.append(1) or False)
    assert compiled.kernel("single_term_hessian") is None
    assert compiled.kernel("single_term_hessian") is None  # within RECHECK_SECONDS: not looked at again
    assert len(looked) == 1
    monkeypatch.setattr(compiled, "_checked", {})
    monkeypatch.setattr(compiled, "_compiled", lambda dispatcher: True)  # the warm-up has written it
    assert compiled.kernel("single_term_hessian") is kernels.single_term_hessian
    assert compiled._ready == {"single_term_hessian": kernels.single_term_hessian}


def test_a_kernel_is_compiled_in_the_caller_where_no_process_can_compile_it(monkeypatch):
    """No interpreter to start (an embedded Python): the kernel is compiled on its call, as numba alone would."""
    monkeypatch.delenv("SPARSEMIX_JIT", raising=False)
    monkeypatch.setattr(compiled, "_ready", {})
    monkeypatch.setattr(compiled, "_checked", {})
    monkeypatch.setattr(compiled, "_compiler", [None, 0.0, 0])
    monkeypatch.setattr(compiled, "_compiled", lambda dispatcher: False)
    monkeypatch.setattr(sys, "executable", os.path.join(tempfile.gettempdir(), "no-such-python"))
    assert compiled.kernel("dense_scalar_scoring") is kernels.dense_scalar_scoring


@pytest.fixture
def asked(monkeypatch):
    """The names of the kernels asked for (compiled.kernel recorded, then called)."""
    names = set()
    kernel = compiled.kernel
    monkeypatch.setattr(compiled, "kernel", lambda name: names.add(name) or kernel(name))
    return names


def test_the_warmup_compiles_every_kernel_of_small_fits(asked):
    warmup.compile_kernels()
    assert asked == set(compiled.KERNELS)


def test_a_second_warmup_leaves_the_compile_to_the_first():
    path = os.path.join(tempfile.gettempdir(), f"sparsemix-compile-{os.getuid()}.lock")
    with open(path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run([sys.executable, "-m", "sparsemix.fit.warmup"], capture_output=True, timeout=120)
    assert done.returncode == compiled.EXIT_BUSY, done.stderr.decode()


@pytest.mark.slow
def test_kernels_compiled_in_the_background_are_read_from_numbas_cache(tmp_path):
    """A new numba cache (a fresh install): the first growth-curve fit takes the numpy path and starts the warm-up;
    once it has finished, the kernels come from the cache it wrote, in this process and in a new one."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import numpy as np
        import sparsemix
        from sparsemix.core import compiled
        from conftest import reference_data
        import os
        os.environ.pop("SPARSEMIX_JIT")  # (conftest's "now")
        data = reference_data("sleepstudy")
        first = sparsemix.lmer("Reaction ~ Days + (Days | Subject)", data)
        process = compiled._compiler[0]
        if sys.argv[1] == "first":
            assert compiled._ready == {{}}, compiled._ready
            assert process is not None
            assert process.wait(timeout=900) == 0
            time.sleep(compiled.RECHECK_SECONDS)
            again = sparsemix.lmer("Reaction ~ Days + (Days | Subject)", data)
        else:
            assert process is None
            again = first
        assert {{"single_term_deviance_parts", "single_term_hessian"}} <= set(compiled._ready), compiled._ready
        assert abs(again.llf - first.llf) < 1e-7
        print(again.llf)
        """
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    for stage in ("first", "later"):
        done = subprocess.run(
            [sys.executable, "-c", script, stage], env=env, capture_output=True, text=True, timeout=1200
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert float(done.stdout.split()[-1]) == pytest.approx(-871.8141, abs=1e-4)


def test_the_command_compiles_them(asked):
    from sparsemix.cli import main

    assert main(["compile"]) == 0
    assert asked == set(compiled.KERNELS)
