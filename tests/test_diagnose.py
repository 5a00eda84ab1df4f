"""diagnose(): regimes, predicted vs measured steps, the recommendation, and Auto."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import parassm
import pytest
from parassm.diagnostics import Hardware

from .helpers import sequential


S = parassm.systems
GPU_LIKE = Hardware(width=2.0e4, level_latency=2.0, name="gpu-like")
SOLVERS = ("DEER", "QuasiDEER", "ELK", "Jacobi")
T = 1024


def _diagnose(system, hardware=None):
    xs = system.inputs(T)
    d = parassm.diagnose(
        system.f, system.s0, T, xs=xs, solvers=SOLVERS, hardware=hardware, proxy_length=64
    )
    return d, xs


def _measured(system, xs, solver):
    sol = parassm.evaluate(system.f, system.s0, T, xs=xs, solver=solver, throw=False)
    return int(sol.stats["num_steps"])


@pytest.fixture(scope="module")
def gru():
    system = S.GRU(hidden_size=4)
    d, xs = _diagnose(system, GPU_LIKE)
    return system, d, xs


def test_predictable_gru(gru):
    system, d, xs = gru
    assert d.regime == "predictable"
    assert d.lle < 0
    assert d.overshoot >= 1
    lo, hi = d.neg_log_mu_bounds
    assert 0 <= lo <= hi < 20
    for name, solver in (("DEER", parassm.DEER()), ("QuasiDEER", parassm.QuasiDEER())):
        measured = _measured(system, xs, solver)
        predicted = d.predicted_steps[name]
        assert predicted <= 30
        assert measured / 2 - 2 <= predicted <= 2 * measured + 2, (name, predicted, measured)
    # On a GPU-like machine a few Newton steps pay off.
    assert type(d.recommended).__name__ in ("DEER", "QuasiDEER")
    assert json.loads(json.dumps(d.to_dict(), allow_nan=False))["regime"] == "predictable"


def test_chaotic_logistic_unpredictable():
    system = S.Logistic(r=4.0)
    d, xs = _diagnose(system, GPU_LIKE)
    assert d.regime == "unpredictable"
    assert abs(d.lle - np.log(2)) < 0.05
    assert d.predicted_steps["DEER"] >= T // 2
    assert isinstance(d.recommended, parassm.Sequential)
    assert _measured(system, xs, parassm.DEER()) >= T // 2


@pytest.mark.parametrize(
    "system",
    [S.TanhRNN(a=10.0), pytest.param(S.Tent(mu=0.7, x0=0.8), marks=pytest.mark.slow)],
    ids=["tanh10", "tent0.7"],
)
def test_contracting_but_slow_is_not_promised_fast(system):
    # LLE < 0, yet Newton crawls: the trial must catch it.
    d, xs = _diagnose(system, GPU_LIKE)
    assert d.lle < 0
    assert d.regime != "predictable"
    measured = _measured(system, xs, parassm.DEER())
    assert measured >= T // 4
    assert d.predicted_steps["DEER"] >= T // 4
    assert isinstance(d.recommended, parassm.Sequential | parassm.Jacobi)


@pytest.mark.slow
def test_cpu_recommends_sequential(gru):
    system, _, xs = gru
    cpu = Hardware(width=1.0, level_latency=1.0, name="2-core cpu")
    d = parassm.diagnose(
        system.f, system.s0, T, xs=xs, solvers=SOLVERS, hardware=cpu, proxy_length=64
    )
    assert isinstance(d.recommended, parassm.Sequential)
    assert d.costs["Sequential"] == T


def test_diagnose_bad_input():
    with pytest.raises(ValueError, match="Unknown solver"):
        parassm.diagnose(lambda s, x: s, jnp.ones(2), 10, solvers=("Newton",))
    with pytest.raises(ValueError, match="shape"):
        parassm.diagnose(lambda s, x: jnp.ones(3), jnp.ones(2), 10)


def test_auto_default_is_sequential_on_this_cpu():
    system = S.GRU(hidden_size=4)
    xs = system.inputs(200)
    sol = parassm.evaluate(system.f, system.s0, xs=xs)
    if jax.default_backend() == "cpu" and Hardware.detect().width < 4:
        assert int(sol.stats["solver"]) == 0
        assert jnp.array_equal(sol.value, sequential(system.f, system.s0, xs))


def test_auto_switches_at_run_time_under_jit():
    auto = parassm.Auto(hardware=GPU_LIKE, proxy_length=64)
    gru = S.GRU(hidden_size=4)
    logistic = S.Logistic(r=4.0)

    @jax.jit
    def run_gru(xs):
        return parassm.evaluate(gru.f, gru.s0, xs=xs, solver=auto)

    xs = gru.inputs(T)
    sol = run_gru(xs)
    assert int(sol.stats["solver"]) > 0  # a parallel solver
    np.testing.assert_allclose(sol.value, sequential(gru.f, gru.s0, xs), atol=1e-8)
    sol = parassm.evaluate(logistic.f, logistic.s0, T, solver=auto)
    assert int(sol.stats["solver"]) == 0
    np.testing.assert_array_equal(sol.value, sequential(logistic.f, logistic.s0, length=T))


def test_auto_validation():
    with pytest.raises(ValueError, match="Unknown solver"):
        parassm.Auto(solvers=("Newton",))
    with pytest.raises(ValueError, match="rtol"):
        parassm.Auto(rtol=-1.0)
