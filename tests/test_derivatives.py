"""Derivatives of every order, against `lax.scan` (the truth, in float64) and against
finite differences of parassm's own lower-order derivatives.

A JVP rule that linearises at a trajectory without tangent gets first derivatives right
and second derivatives wrong (by 65% on the GRU below), silently; these tests catch it.
"""

import functools as ft

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import parassm
import pytest
from jax.flatten_util import ravel_pytree


T = 12
IMPLICIT = parassm.ImplicitAdjoint()
UNROLLED = parassm.UnrolledAdjoint()


def _problem(kind, dtype):
    """A cell, `s0` and `xs`, flattened into one parameter vector `p` (parameters, initial
    state and inputs), and `unflatten(p) -> (cell, s0, xs)`. Drawn in float64 and cast,
    so that the float32 problem is the float64 one rounded."""
    k1, k2, k3 = jr.split(jr.key(0), 3)
    if kind == "gru":
        cell = eqx.nn.GRUCell(2, 3, key=k1, dtype=jnp.float64)
        s0 = 0.3 * jr.normal(k2, (3,), jnp.float64)
    else:
        cell = eqx.nn.LSTMCell(2, 2, key=k1, dtype=jnp.float64)
        s0 = (0.3 * jr.normal(k2, (2,), jnp.float64), jnp.full(2, -0.2, jnp.float64))
    xs = jr.normal(k3, (T, 2), jnp.float64)
    params, static = eqx.partition(cell, eqx.is_inexact_array)
    p, unravel = ravel_pytree((params, s0, xs))

    def unflatten(p):
        tree = jtu.tree_map(lambda x: x.astype(p.dtype), unravel(p.astype(jnp.float64)))
        params, s0, xs = tree
        return eqx.combine(params, static), s0, xs

    return p.astype(dtype), unflatten


def _loss(p, unflatten, solver, adjoint):
    cell, s0, xs = unflatten(p)

    def f(s, x):
        return cell(x, s)

    if solver is None:
        traj = lax.scan(lambda s, x: (f(s, x),) * 2, s0, xs)[1]
    else:
        traj = parassm.evaluate(f, s0, xs=xs, solver=solver, adjoint=adjoint).value
    dtype = p.dtype
    weights = jnp.cos(jnp.arange(T, dtype=dtype))[:, None]
    return sum(jnp.sum(weights * jnp.sin(leaf) ** 2) for leaf in jtu.tree_leaves(traj))


def _hessian(p, unflatten, solver, adjoint):
    loss = lambda p: _loss(p, unflatten, solver, adjoint)  # noqa: E731
    return jax.jit(jax.hessian(loss))(p)


def _check_hessian(kind, dtype, solver, adjoint):
    p, unflatten = _problem(kind, dtype)
    got = _hessian(p, unflatten, solver, adjoint)
    # The truth: the same (rounded) problem in float64, through `lax.scan`.
    expected = _hessian(p.astype(jnp.float64), unflatten, None, None)
    assert got.dtype == dtype
    assert got.shape == expected.shape
    scale = float(jnp.max(jnp.abs(expected)))
    # float32: the loss is a sum of T terms of size one; the Hessian is found to a few
    # thousand eps. (The unrolled derivative of the iterates is a little less accurate.)
    if dtype == jnp.float64:
        rtol = 1e-9
    else:
        rtol = 1e-3 if isinstance(adjoint, parassm.UnrolledAdjoint) else 1e-4
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, atol=rtol * scale, rtol=0)
    return got


SOLVERS = {
    "DEER": parassm.DEER(),
    "QuasiDEER": parassm.QuasiDEER(),
    "ELK": parassm.ELK(),
    "Sequential": parassm.Sequential(),
}
ADJOINTS = {"implicit": IMPLICIT, "unrolled": UNROLLED}
DEFAULT_TIER = {
    ("gru", "float64", "DEER", "implicit"),
    ("lstm", "float32", "QuasiDEER", "implicit"),
}


def _matrix():
    for kind in ("gru", "lstm"):
        for dtype in ("float64", "float32"):
            for solver in SOLVERS:
                for adjoint in ADJOINTS:
                    marks = (
                        () if (kind, dtype, solver, adjoint) in DEFAULT_TIER else pytest.mark.slow
                    )
                    yield pytest.param(
                        kind,
                        dtype,
                        solver,
                        adjoint,
                        id=f"{kind}-{dtype}-{solver}-{adjoint}",
                        marks=marks,
                    )


@pytest.mark.parametrize("kind, dtype, solver, adjoint", list(_matrix()))
def test_hessian_matches_lax_scan(kind, dtype, solver, adjoint):
    """The Hessian of a scalar loss with respect to the parameters, `s0` and `xs` at once
    (`jax.hessian`, forward over reverse)."""
    _check_hessian(kind, jnp.dtype(dtype), SOLVERS[solver], ADJOINTS[adjoint])


def test_hessian_agrees_with_finite_differences_of_own_gradient():
    """Independent of `lax.scan`: the Hessian is the derivative of parassm's gradient."""
    p, unflatten = _problem("gru", jnp.float64)
    solver = parassm.DEER()
    grad = jax.jit(jax.grad(lambda p: _loss(p, unflatten, solver, IMPLICIT)))
    hvp = jax.jit(
        lambda p, v: jax.jvp(jax.grad(lambda p: _loss(p, unflatten, solver, IMPLICIT)), (p,), (v,))[
            1
        ]
    )
    v = jr.normal(jr.key(1), p.shape, jnp.float64)
    eps = 1e-5
    fd = (grad(p + eps * v) - grad(p - eps * v)) / (2 * eps)
    np.testing.assert_allclose(hvp(p, v), fd, rtol=1e-6, atol=1e-7 * float(jnp.max(jnp.abs(fd))))


def _scalar_problem(a, linear_solver, dtype, solver=parassm.DEER()):
    """`sum_t sin(s_t)^2` of `s_t = tanh(a W s_{t-1} + x_t)`, as a function of one
    scalar `a`, through parassm (`linear_solver`) or `lax.scan` (`None`)."""
    W = jnp.array([[0.5, -0.4, 0.2], [0.3, 0.6, -0.5], [-0.2, 0.1, 0.4]], dtype)
    xs = jnp.sin(jnp.arange(45, dtype=dtype)).reshape(15, 3)
    s0 = jnp.array([0.1, -0.2, 0.3], dtype)

    def f(s, x):
        return jnp.tanh(a * (W @ s) + x)

    if linear_solver is None:
        traj = lax.scan(lambda s, x: (f(s, x),) * 2, s0, xs)[1]
    else:
        adjoint = parassm.ImplicitAdjoint(linear_solver)
        traj = parassm.evaluate(f, s0, xs=xs, solver=solver, adjoint=adjoint).value
    return jnp.sum(jnp.sin(traj) ** 2)


@ft.cache
def _scalar_derivatives(linear_solver):
    """Second derivatives in all four mode combinations, and the third."""
    a = jnp.array(1.3)
    loss = lambda a: _scalar_problem(a, linear_solver, jnp.float64)  # noqa: E731
    g = jax.grad(loss)
    every = (
        lambda: g(a),
        lambda: jax.grad(g)(a),
        lambda: jax.jacfwd(g)(a),
        lambda: jax.jacrev(jax.jacfwd(loss))(a),
        lambda: jax.jacfwd(jax.jacfwd(loss))(a),
        lambda: jax.jacfwd(jax.jacfwd(g))(a),
    )
    return jax.jit(lambda: tuple(d() for d in every))()


@pytest.mark.parametrize(
    "linear_solver",
    [
        # DenseScan (the default for small states) is also covered by the Hessians above.
        pytest.param(parassm.DenseScan(), marks=pytest.mark.slow),
        parassm.QuasiScan(),
        pytest.param(parassm.SequentialScan(), marks=pytest.mark.slow),
    ],
    ids=lambda s: type(s).__name__,
)
def test_every_order_every_linear_solver(linear_solver):
    got = _scalar_derivatives(linear_solver)
    expected = _scalar_derivatives(None)
    for x, y in zip(got, expected):
        np.testing.assert_allclose(x, y, rtol=1e-8)
    assert abs(float(expected[1])) > 1e-2  # a second derivative that matters


def test_unrolled_adjoint_unsupported_orders_raise():
    """Forward mode alone and reverse over reverse cannot go through a checkpointed
    loop: an error, never a number (documented on `UnrolledAdjoint`)."""
    W = jnp.array([[0.5, -0.4], [0.3, 0.6]])

    def traj(a):
        f = lambda s, x: jnp.tanh(a * (W @ s) + x)  # noqa: E731
        xs = jnp.ones((4, 2))
        return parassm.evaluate(
            f, jnp.zeros(2), xs=xs, solver=parassm.Jacobi(), adjoint=UNROLLED
        ).value

    loss = lambda a: jnp.sum(traj(a) ** 2)  # noqa: E731
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(traj, (1.0,), (1.0,))
    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
        jax.grad(jax.grad(loss))(1.0)
