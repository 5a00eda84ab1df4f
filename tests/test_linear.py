import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import parassm.linear as linear
import pytest

from .helpers import linear_loop as _loop, random_transitions as _transitions


# One compiled program per call: run eagerly, the associative scan dispatches (and
# compiles) every level's operations one at a time, which is most of these tests' time.
_solve = eqx.filter_jit(linear.solve)


@pytest.mark.parametrize("T", [1, 2, 7, 64, 129])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_init", [False, True])
def test_solve_matches_loop(T, reverse, with_init, getkey):
    D = 4
    b = jr.normal(getkey(), (T, D), jnp.float64)
    init = jr.normal(getkey(), (D,), jnp.float64) if with_init else None
    for transition in _transitions(getkey(), T, D, jnp.float64):
        out = _solve(transition, b, init, reverse=reverse)
        expected = _loop(transition.as_matrix(D), b, init, reverse)
        np.testing.assert_allclose(
            out, expected, rtol=1e-10, atol=1e-10, err_msg=repr(type(transition))
        )


def test_float32(getkey):
    T, D = 100, 6
    b = jr.normal(getkey(), (T, D), jnp.float32)
    for transition in _transitions(getkey(), T, D, jnp.float32):
        out = _solve(transition, b)
        assert out.dtype == jnp.float32
        expected = _loop(transition.as_matrix(D), b, None, False)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_transpose_and_mask(getkey):
    T, D = 5, 4
    for transition in _transitions(getkey(), T, D, jnp.float64):
        dense = transition.as_matrix(D)
        np.testing.assert_allclose(transition.transpose().as_matrix(D), jnp.swapaxes(dense, 1, 2))
        keep = jnp.array([True, False, True, False, True])
        masked = transition.mask(keep).as_matrix(D)
        np.testing.assert_allclose(masked, jnp.where(keep[:, None, None], dense, 0.0))
        x = jr.normal(getkey(), (T, D), jnp.float64)
        np.testing.assert_allclose(transition.mv(x), jnp.einsum("tij,tj->ti", dense, x), atol=1e-12)


def test_length_mismatch():
    with pytest.raises(ValueError, match="time steps"):
        linear.solve(linear.Diagonal(jnp.ones((3, 2))), jnp.ones((4, 2)))
