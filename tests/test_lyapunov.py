"""Lyapunov exponents against published values (see /work/shared/REFERENCE.md)."""

import math

import jax.numpy as jnp
import numpy as np
import parassm
import pytest
from parassm.diagnostics import lyapunov_exponents


S = parassm.systems


def test_logistic_r4_is_ln2():
    system = S.Logistic(r=4.0)
    (lle,) = lyapunov_exponents(system.f, system.s0, 5000)
    assert abs(float(lle) - math.log(2)) < 0.02


@pytest.mark.parametrize(
    "r, exact",
    [
        (2.8, math.log(0.8)),  # fixed point: ln |2 - r|
        (3.2, 0.5 * math.log(abs(4 + 2 * 3.2 - 3.2**2))),  # period 2
    ],
)
def test_logistic_periodic_windows_exact(r, exact):
    system = S.Logistic(r=r)
    (lle,) = lyapunov_exponents(system.f, system.s0, 3000, burn_in=1000)
    assert abs(float(lle) - exact) < 1e-9


@pytest.mark.parametrize("mu", [0.7, 1.9])
def test_tent_is_ln_mu(mu):
    system = S.Tent(mu=mu)
    (lle,) = lyapunov_exponents(system.f, system.s0, 2000)
    np.testing.assert_allclose(float(lle), math.log(mu), rtol=1e-12)


def test_henon_spectrum_and_sum():
    system = S.Henon()
    l1, l2 = lyapunov_exponents(system.f, system.s0, 10_000, k=2, burn_in=100)
    assert abs(float(l1) - 0.419) < 0.01
    # Constant Jacobian determinant -b: the sum is ln b exactly.
    np.testing.assert_allclose(float(l1 + l2), math.log(0.3), rtol=1e-10)


def test_lorenz_rk4_flow_spectrum():
    system = S.Lorenz63(integrator="rk4", dt=0.01)
    lam = lyapunov_exponents(system.f, system.s0, 30_000, k=3, dt=system.dt, burn_in=1000)
    l1, l2, l3 = (float(x) for x in lam)
    assert abs(l1 - 0.906) < 0.05
    assert abs(l2) < 0.02
    assert abs(l3 - (-14.572)) < 0.05
    # The flow's sum is -(sigma + 1 + beta); RK4 at dt = 0.01 matches it to O(dt^4).
    assert abs(l1 + l2 + l3 + (10 + 1 + 8 / 3)) < 1e-3
    assert l1 > l2 > l3


def test_lorenz_euler_map_has_its_own_exponent():
    # The map evaluated, not the flow: forward Euler at dt = 0.01 gives about 1.05 per
    # unit time (REFERENCE.md), clearly above the flow's 0.906.
    system = S.Lorenz63(integrator="euler", dt=0.01)
    (lle,) = lyapunov_exponents(system.f, system.s0, 30_000, dt=system.dt, burn_in=1000)
    assert abs(float(lle) - 1.05) < 0.05
    per_step = lyapunov_exponents(system.f, system.s0, 30_000, burn_in=1000)
    np.testing.assert_allclose(float(per_step[0]) / system.dt, float(lle), rtol=1e-12)


@pytest.mark.parametrize(
    "system, k, T",
    [
        (S.Henon(), 2, 1000),
        pytest.param(S.Lorenz63(integrator="rk4"), 3, 1000, marks=pytest.mark.slow),
    ],
    ids=["henon", "lorenz"],
)
def test_parallel_equals_sequential(system, k, T):
    seq = lyapunov_exponents(system.f, system.s0, T, k=k, method="sequential")
    par = lyapunov_exponents(system.f, system.s0, T, k=k, method="parallel")
    np.testing.assert_allclose(par, seq, rtol=1e-8, atol=1e-10)


def test_parallel_does_not_overflow():
    # ln 2 per step for 5000 steps: the raw product would be 2^5000 (overflow at 1024).
    system = S.Logistic(r=4.0)
    par = lyapunov_exponents(system.f, system.s0, 5000, method="parallel")
    seq = lyapunov_exponents(system.f, system.s0, 5000)
    assert bool(jnp.isfinite(par[0]))
    np.testing.assert_allclose(par, seq, rtol=1e-8)


@pytest.mark.slow
def test_parallel_with_inputs():
    gru = S.GRU(hidden_size=4)
    xs = gru.inputs(300)
    a = lyapunov_exponents(gru.f, gru.s0, xs=xs, method="parallel")
    b = lyapunov_exponents(gru.f, gru.s0, xs=xs)
    np.testing.assert_allclose(a, b, rtol=1e-8)
    assert float(b[0]) < 0


def test_bad_arguments():
    system = S.Henon()
    with pytest.raises(ValueError, match="method"):
        lyapunov_exponents(system.f, system.s0, 10, method="qr")
    with pytest.raises(ValueError, match="between 1 and the state size"):
        lyapunov_exponents(system.f, system.s0, 10, k=3)
    with pytest.raises(ValueError, match="burn_in"):
        lyapunov_exponents(system.f, system.s0, 10, burn_in=10)
    with pytest.raises(ValueError, match="dt"):
        lyapunov_exponents(system.f, system.s0, 10, dt=0.0)
    big = jnp.zeros(30)
    with pytest.raises(ValueError, match="method='sequential'"):
        lyapunov_exponents(lambda s, x: 0.5 * s, big, 10, k=5, method="parallel")
