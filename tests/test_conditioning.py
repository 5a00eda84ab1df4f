"""Bounds on sigma_min of the residual Jacobian, checked against a dense SVD."""

import math

import jax.numpy as jnp
import numpy as np
import parassm
import pytest
from parassm._problem import flatten
from parassm.diagnostics import conditioning
from parassm.diagnostics._lyapunov import dense_jacobians, trajectory_before


S = parassm.systems


def dense_sigma_min(f, s0, T, xs):
    flat = flatten(f, s0)
    Js = np.asarray(dense_jacobians(flat, xs, trajectory_before(flat, xs, T)))
    D = flat.size
    A = np.eye(T * D)
    for t in range(1, T):
        A[t * D : (t + 1) * D, (t - 1) * D : t * D] = -Js[t]
    return np.linalg.svd(A, compute_uv=False).min()


SYSTEMS = [
    S.Logistic(r=4.0),
    S.Henon(),
    S.GRU(hidden_size=3),
    pytest.param(S.Logistic(r=2.8), marks=pytest.mark.slow),
    pytest.param(S.TanhRNN(a=0.8), marks=pytest.mark.slow),
    pytest.param(S.Lorenz63(integrator="euler"), marks=pytest.mark.slow),
]


@pytest.mark.parametrize(
    "system", SYSTEMS, ids=["logistic4", "henon", "gru", "logistic2.8", "tanh", "lorenz"]
)
def test_bounds_bracket_dense_svd(system):
    T = 30
    xs = system.inputs(T)
    log_smin = math.log(dense_sigma_min(system.f, system.s0, T, xs))
    for window in (4, T - 1):
        c = conditioning(system.f, system.s0, T, xs=xs, window=window)
        assert float(c.log_sigma_lower) <= log_smin + 1e-9
        assert log_smin <= float(c.log_sigma_upper) + 1e-9
        assert float(c.log_overshoot) >= 0
        lo, hi = c.neg_log_mu_bounds
        assert float(lo) <= -2 * log_smin + 1e-9 <= float(hi) + 2e-9
    # With every lag inside the window, the LLE/overshoot bounds are rigorous too (the
    # overshoot makes them hold for any lambda), and the windowed bound is sharper.
    assert float(c.log_sigma_lower_lle) <= log_smin + 1e-9
    assert log_smin <= float(c.log_sigma_upper_lle) + 1e-9
    assert float(c.log_sigma_lower) >= float(c.log_sigma_lower_lle) - 1e-9
    # A longer window only sharpens the windowed lower bound.
    short = conditioning(system.f, system.s0, T, xs=xs, window=4)
    assert float(c.log_sigma_lower) >= float(short.log_sigma_lower) - 1e-9


def test_predictable_bounded_chaotic_grows_with_T():
    # lambda < 0: the lower bound on sigma_min does not degrade with T; lambda > 0: it
    # degrades like exp(-lambda T) (Gonzalez et al. 2025).
    contracting = S.Logistic(r=2.8)
    chaotic = S.Logistic(r=4.0)
    lows = {}
    for name, system in (("contracting", contracting), ("chaotic", chaotic)):
        lows[name] = [
            float(conditioning(system.f, system.s0, T, window=8).log_sigma_lower_lle)
            for T in (50, 100)
        ]
    a, b = lows["contracting"]
    assert abs(a - b) < 0.05 and a > -3
    a, b = lows["chaotic"]
    assert b < a - 50 * 0.5  # about ln 2 per extra step


def test_bounds_do_not_overflow_on_long_chaotic_sequences():
    system = S.Logistic(r=4.0)
    c = conditioning(system.f, system.s0, 3000, window=8)
    assert bool(jnp.isfinite(c.log_sigma_lower)) and float(c.log_sigma_lower) < -1000
    assert bool(jnp.isfinite(c.log_sigma_lower_lle))


def test_bad_window():
    with pytest.raises(ValueError, match="window"):
        conditioning(lambda s, x: 0.5 * s, jnp.array(1.0), 10, window=0)
