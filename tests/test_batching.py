"""A batch costs what its sequences cost: under `jax.vmap` the Newton loop evaluates `f`
(values, maps, a restart's candidate) as often as for one sequence, and
`parassm._batching.cond` skips a branch no element of the batch takes."""

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import parassm
import pytest
from parassm._batching import cond


def _counting(calls):
    W = jr.normal(jr.key(0), (4, 4), jnp.float64) * 0.3

    def f(s, x):
        # Called once per pass over the sequence (a vectorised call is one call).
        jax.debug.callback(lambda: calls.append(1))
        return jnp.tanh(W @ s + x)

    return f


SOLVERS = [
    parassm.DEER(),
    parassm.QuasiDEER(),
    parassm.QuasiDEER(relinearise=0.25),
    parassm.BlockQuasiDEER(2),
    parassm.ELK(),
    parassm.QuasiELK(),
    parassm.Jacobi(),
    parassm.Picard(),
    parassm.MultipleShooting(),
]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_a_batch_evaluates_f_as_often_as_one_sequence(solver):
    calls = []
    f = _counting(calls)
    xs = jr.normal(jr.key(1), (300, 4), jnp.float64)

    def run(xs):
        return parassm.evaluate(f, jnp.zeros(4), xs=xs, solver=solver, throw=False)

    single = jax.jit(run)(xs)
    jax.effects_barrier()
    passes, calls[:] = len(calls), []
    # Four copies of one sequence: every element takes the same path, so a program that
    # runs no branch for the batch that one sequence skips makes the same passes.
    batch = jax.jit(jax.vmap(run))(jnp.stack([xs] * 4))
    jax.effects_barrier()
    assert len(calls) == passes
    assert batch.stats["num_steps"].tolist() == [int(single.stats["num_steps"])] * 4
    assert (
        batch.stats["num_linearisations"].tolist() == [int(single.stats["num_linearisations"])] * 4
    )
    # (Batched products round differently.)
    np.testing.assert_allclose(batch.value[0], single.value, rtol=1e-12, atol=1e-14)


def test_elements_keep_their_own_results_and_steps():
    f = _counting([])
    xs = jr.normal(jr.key(1), (3, 200, 4), jnp.float64)
    xs = xs.at[1, 50].set(jnp.nan)  # one element is not finite from step 51 on

    def run(xs):
        return parassm.evaluate(f, jnp.zeros(4), xs=xs, solver=parassm.DEER(), throw=False)

    batch = jax.vmap(run)(xs)
    for i, x in enumerate(xs):
        single = run(x)
        element = jax.tree.map(lambda leaf: leaf[i], batch)
        assert int(element.stats["num_steps"]) == int(single.stats["num_steps"])
        assert bool(element.result == single.result)
    nonfinite = batch.result == parassm.RESULTS.nonfinite
    assert nonfinite.tolist() == [False, True, False]


def test_cond_matches_lax_cond_per_element():
    def true_fun(x, y):
        return {"a": x * 2 + y, "b": jnp.stack([x, y])}

    def false_fun(x, y):
        return {"a": x - y, "b": jnp.stack([y, x])}

    def ours(p, x, y):
        return cond(p, lambda: true_fun(x, y), lambda: false_fun(x, y))

    def theirs(p, x, y):
        return lax.cond(p, true_fun, false_fun, x, y)

    p = jnp.array([True, False, True, False])
    x = jnp.arange(4.0)
    y = jnp.float64(3.0)
    for args, axes in [((p, x, y), (0, 0, None)), ((True, x, y), (None, 0, None))]:
        expected = jax.vmap(theirs, in_axes=axes)(*args)
        got = jax.jit(jax.vmap(ours, in_axes=axes))(*args)
        jax.tree.map(np.testing.assert_array_equal, got, expected)
    # Unbatched, and nested vmaps.
    assert float(ours(False, 1.0, 2.0)["a"]) == -1.0
    pp = jnp.array([[False, True], [False, False]])
    xx = jnp.ones((2, 2))
    got = jax.vmap(jax.vmap(ours, in_axes=(0, 0, None)), in_axes=(0, 0, None))(pp, xx, y)
    expected = jax.vmap(jax.vmap(theirs, in_axes=(0, 0, None)), in_axes=(0, 0, None))(pp, xx, y)
    jax.tree.map(np.testing.assert_array_equal, got, expected)


def test_cond_skips_a_branch_no_element_takes():
    calls = []

    def dear(x):
        jax.debug.callback(lambda: calls.append(1))
        return x + 1

    @jax.jit
    @jax.vmap
    def run(p, x):
        return cond(p, lambda: dear(x), lambda: x)

    np.testing.assert_array_equal(run(jnp.array([False, False]), jnp.ones(2)), jnp.ones(2))
    jax.effects_barrier()
    assert calls == []
    np.testing.assert_array_equal(run(jnp.array([False, True]), jnp.ones(2)), [1.0, 2.0])
    jax.effects_barrier()
    assert calls == [1]  # once for the batch


def test_cond_without_merge_gives_the_true_branch_where_it_ran():
    @jax.vmap
    def run(p, x):
        return cond(p, lambda: x + 1, lambda: jnp.zeros_like(x), merge=False)

    # Where the branch ran, every element gets its result (the caller ignores those
    # whose predicate is false); where no element takes it, the false branch.
    np.testing.assert_array_equal(run(jnp.array([True, False]), jnp.ones(2)), [2.0, 2.0])
    np.testing.assert_array_equal(run(jnp.array([False, False]), jnp.ones(2)), [0.0, 0.0])
