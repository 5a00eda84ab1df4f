import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import parassm
import pytest

from .helpers import tree_allclose


def _scan_rnn(cell, xs, state):
    return lax.scan(lambda s, x: (cell(x, s),) * 2, state, xs)[1]


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_parallel_rnn_matches_scan_with_default_state(kind, getkey):
    if kind == "gru":
        cell = eqx.nn.GRUCell(3, 5, key=getkey())
        state = jnp.zeros(5)
    else:
        cell = eqx.nn.LSTMCell(3, 5, key=getkey())
        state = (jnp.zeros(5), jnp.zeros(5))
    xs = jr.normal(getkey(), (80, 3))
    rnn = parassm.nn.ParallelRNN(cell, solver=parassm.DEER())
    assert tree_allclose(rnn(xs), _scan_rnn(cell, xs, state), rtol=1e-8, atol=1e-10)
    # Batched with vmap, like eqx.nn layers.
    batch = jr.normal(getkey(), (3, 80, 3))
    out = jax.vmap(rnn)(batch)
    expected = jax.vmap(lambda x: _scan_rnn(cell, x, state))(batch)
    assert tree_allclose(out, expected, rtol=1e-8, atol=1e-10)


def test_reverse_and_explicit_state(getkey):
    cell = eqx.nn.GRUCell(2, 4, key=getkey())
    xs = jr.normal(getkey(), (40, 2))
    h0 = jr.normal(getkey(), (4,))
    rnn = parassm.nn.ParallelRNN(cell, solver=parassm.QuasiDEER(), reverse=True)
    expected = jnp.flip(_scan_rnn(cell, jnp.flip(xs, 0), h0), 0)
    assert tree_allclose(rnn(xs, h0), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
def test_filter_jit_filter_grad_and_warm_start(getkey, dtype):
    cell = eqx.nn.GRUCell(3, 6, key=getkey(), dtype=dtype)
    xs = jr.normal(getkey(), (60, 3), dtype)
    rnn = parassm.nn.ParallelRNN(cell, solver=parassm.QuasiDEER())

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(model, xs):
        return jnp.sum(model(xs) ** 2)

    @eqx.filter_grad
    def grad_ref(cell, xs):
        return jnp.sum(_scan_rnn(cell, xs, jnp.zeros(6, xs.dtype)) ** 2)

    up = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, t
    )
    got = grad(rnn, xs).cell
    assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(eqx.filter(got, eqx.is_array)))
    # Against the float64 truth of the same (rounded) problem.
    expected = grad_ref(up(cell), up(xs))
    if dtype == jnp.float64:
        assert tree_allclose(got, expected, rtol=1e-6, atol=1e-9)
    else:
        assert tree_allclose(up(got), expected, rtol=1e-3, atol=1e-3)

    cold = rnn.solve(xs)
    warm = rnn.solve(xs, init=cold.value)
    assert int(warm.stats["num_steps"]) == 0 < int(cold.stats["num_steps"])


def test_custom_cell_needs_state():
    class Cell(eqx.Module):
        def __call__(self, x, h):
            return jnp.tanh(h + x)

    rnn = parassm.nn.ParallelRNN(Cell(), solver=parassm.DEER())
    with pytest.raises(ValueError, match="Pass `state=`"):
        rnn(jnp.ones((5, 2)))
    out = rnn(jnp.ones((5, 2)), jnp.zeros(2))
    assert out.shape == (5, 2)
