"""The convergence test is relative to the scale of the trajectory (docs/theory.md,
"Convergence criterion"): the same relative accuracy for trajectories of size 1e-8, 1
and 1e8, and `successful` exactly when the trajectory meets the documented test, checked
independently (`helpers.scaled_residual`)."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import parassm
import pytest
from hypothesis import given

from .helpers import random_contraction, scaled_residual


T, D = 30, 3


class Scaled(eqx.Module):
    """`s -> c tanh(W s / c + U x)`: the trajectory from `c s0` is exactly `c` times
    the trajectory of the unscaled system from `s0` (up to rounding)."""

    W: jax.Array
    U: jax.Array
    c: jax.Array

    def __call__(self, s, x):
        return self.c * jnp.tanh(self.W @ (s / self.c) + self.U @ x)


@jax.jit
def _draw(seed, contraction):
    kw, ku, kx, ks = jr.split(jr.key(seed), 4)
    W = random_contraction(kw, D, contraction, jnp.float64)
    U = jr.normal(ku, (D, 2), jnp.float64)
    xs = jr.normal(kx, (T, 2), jnp.float64)
    s0 = jr.normal(ks, (D,), jnp.float64)
    # The truth, in float64 and unscaled: the relative accuracy is measured against it.
    unit = Scaled(W, U, jnp.array(1.0))
    truth = lax.scan(lambda s, x: (unit(s, x),) * 2, s0, xs)[1]
    return W, U, xs, s0, truth


def _system(seed, contraction, scale, dtype):
    W, U, xs, s0, truth = _draw(seed, contraction)
    c = jnp.asarray(scale, dtype)
    f = Scaled(W.astype(dtype), U.astype(dtype), c)
    return f, c * s0.astype(dtype), xs.astype(dtype), np.asarray(truth)


@jax.jit
def _values(f, s0, value, xs):
    """`f(s_{t-1}, x_t)` at the returned trajectory, outside the solver."""
    return jax.vmap(f)(jnp.concatenate([s0[None], value[:-1]]), xs)


SOLVERS = {
    "DEER": parassm.DEER(),
    "QuasiDEER": parassm.QuasiDEER(),
    "Jacobi": parassm.Jacobi(),
    "ELK": parassm.ELK(),
    "Picard": parassm.Picard(),
}
IDS = lambda s: type(s).__name__  # noqa: E731


def _cases():
    for name, solver in SOLVERS.items():
        for dtype in (jnp.float64, jnp.float32):
            for max_steps in (None, 2):
                # The default tier: three solvers; truncated solves in float32 only.
                slow = name in ("ELK", "Picard") or (max_steps and dtype == jnp.float64)
                yield pytest.param(
                    solver,
                    dtype,
                    max_steps,
                    id=f"{name}-{jnp.dtype(dtype).name}-{'truncated' if max_steps else 'converge'}",
                    marks=pytest.mark.slow if slow else (),
                )


@pytest.mark.parametrize("solver, dtype, max_steps", list(_cases()))
@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e8])
@given(contraction=st.floats(0.1, 0.9), seed=st.integers(0, 2**16))
def test_scale_invariance(solver, dtype, max_steps, scale, contraction, seed):
    f, s0, xs, truth = _system(seed, contraction, scale, dtype)
    sol = parassm.evaluate(f, s0, xs=xs, solver=solver, max_steps=max_steps, throw=False)
    value = sol.value
    assert value.dtype == dtype
    fs = _values(f, s0, value, xs)
    rtol, atol = solver.tolerances(dtype)
    assert atol == 0
    err = np.max(scaled_residual(value, fs, rtol, atol))
    # `successful` exactly when the documented test holds (a little slack for the
    # rounding of `f` evaluated outside the solver).
    successful = bool(sol.result == parassm.RESULTS.successful)
    if successful:
        assert err <= 1.05, (scale, err)
        # The same relative accuracy at every scale: the error relative to the size of
        # the trajectory is set by the tolerance and the conditioning (contraction
        # <= 0.9 in the 2-norm: at most about 20 in the max-norm), not by the scale.
        rel = np.max(np.abs(np.asarray(value, np.float64) / scale - truth)) / np.max(np.abs(truth))
        assert rel <= 20 * rtol + 50 * float(jnp.finfo(dtype).eps), (scale, rel)
    else:
        assert err > 0.95, (scale, err)
        assert max_steps is not None  # a converging solve never fails here
    assert (float(sol.stats["residual"]) <= 1) == successful


@pytest.mark.parametrize("solver", [parassm.DEER(), parassm.QuasiDEER(), parassm.Jacobi()], ids=IDS)
def test_tiny_trajectory_is_not_accepted_by_an_absolute_tolerance(solver):
    # Reported: float32, `atol = eps ** 0.7` accepted the initial guess (zeros), since
    # the whole trajectory (2e-6) was below the absolute tolerance: `successful` with
    # `num_steps` 0 and `value[-1] == 0`.
    xs = jnp.ones(50, jnp.float32)
    sol = parassm.evaluate(
        lambda s, x: 0.5 * s + 1e-6 * x, jnp.array(0.0, jnp.float32), xs=xs, solver=solver
    )
    assert sol.result == parassm.RESULTS.successful
    np.testing.assert_allclose(sol.value[-1], 2e-6, rtol=1e-4)
    assert int(sol.stats["num_steps"]) >= 1
