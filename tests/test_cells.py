"""Closed-form cell Jacobians (parassm.nn) against forward-mode differentiation, and
the solvers that take them (FunctionJacobian, FunctionDiagonal) against lax.scan."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import parassm
import pytest
from jax.flatten_util import ravel_pytree
from parassm.nn._cells import cell_derivatives

from .helpers import sequential


def _cell(kind, use_bias, dtype, D=5, n_in=3):
    make = eqx.nn.GRUCell if kind == "gru" else eqx.nn.LSTMCell
    cell = make(n_in, D, use_bias=use_bias, dtype=dtype, key=jr.key(0))
    h = jr.normal(jr.key(1), (D,), dtype)
    state = h if kind == "gru" else (h, jr.normal(jr.key(2), (D,), dtype))
    return cell, state, jr.normal(jr.key(3), (n_in,), dtype)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_closed_forms_match_forward_mode(kind, use_bias, dtype):
    cell, state, x = _cell(kind, use_bias, dtype)
    diagonal, jacobian = cell_derivatives(cell)
    flat, unravel = ravel_pytree(state)
    expected = jax.jacfwd(lambda v: ravel_pytree(cell(x, unravel(v)))[0])(flat)
    tol = 1e-6 if dtype == jnp.float32 else 1e-14
    J = jacobian(state, x)
    assert J.dtype == dtype and J.shape == expected.shape
    np.testing.assert_allclose(J, expected, atol=tol)
    np.testing.assert_allclose(ravel_pytree(diagonal(state, x))[0], jnp.diag(expected), atol=tol)


def test_unknown_cell_has_no_closed_form():
    assert cell_derivatives(lambda x, h: jnp.tanh(h + x)) is None


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_solvers_with_closed_forms_match_scan(kind, dtype):
    cell, state, _ = _cell(kind, True, dtype, D=4)
    xs = jr.normal(jr.key(4), (80, 3), dtype)
    zero = jax.tree_util.tree_map(jnp.zeros_like, state)
    diagonal, jacobian = cell_derivatives(cell)

    def f(s, x):
        return cell(x, s)

    expected = sequential(f, zero, xs)
    tol = 1e-4 if dtype == jnp.float32 else 1e-9
    for solver in (
        parassm.DEER(parassm.FunctionJacobian(jacobian)),
        parassm.QuasiDEER(parassm.FunctionDiagonal(diagonal)),
        parassm.ELK(jacobian=parassm.FunctionJacobian(jacobian)),
    ):
        sol = parassm.evaluate(f, zero, xs=xs, solver=solver)
        for a, b in zip(jax.tree_util.tree_leaves(sol.value), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize(
    "solver, field, expected",
    [
        (parassm.DEER(), "jacobian", parassm.FunctionJacobian),
        (parassm.QuasiDEER(), "diagonal", parassm.FunctionDiagonal),
        (parassm.QuasiELK(), "diagonal", parassm.FunctionDiagonal),
    ],
    ids=["DEER", "QuasiDEER", "QuasiELK"],
)
def test_parallel_rnn_uses_closed_forms_and_differentiates_right(kind, solver, field, expected):
    # ParallelRNN swaps the exact (forward-mode) derivatives of a known cell for its
    # closed forms; the swapped solver holds the cell's arrays, which the implicit
    # adjoint must not differentiate (they only precondition): gradients w.r.t. the
    # cell's weights match lax.scan's.
    from parassm.nn._rnn import with_closed_forms

    cell, state, _ = _cell(kind, True, jnp.float64)
    assert isinstance(getattr(with_closed_forms(solver, cell), field), expected)
    custom = parassm.QuasiDEER(parassm.HutchinsonDiagonal())
    assert with_closed_forms(custom, cell) is custom
    xs = jr.normal(jr.key(4), (40, 3), jnp.float64)

    def loss(cell, use):
        if use == "scan":
            ys = sequential(lambda s, x: cell(x, s), state, xs)
        else:
            ys = parassm.nn.ParallelRNN(cell, solver=solver)(xs, state)
        return sum(jnp.sum(jnp.sin(y)) for y in jax.tree.leaves(ys))

    grads = eqx.filter_grad(loss)(cell, "parassm")
    expected_grads = eqx.filter_grad(loss)(cell, "scan")
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.default_scan
def test_parallel_rnn_leaves_deer_without_jacobians_where_it_forms_none():
    # On the CPU's default scan from 17 components DEER forms no Jacobian (one JVP per
    # step), cheaper than the closed form's dense maps: ParallelRNN keeps it so, and so
    # for ELK whose search never damps (the default); a damped ELK, whose smoother needs
    # them formed, and narrower states get the closed form.
    from parassm.nn._rnn import with_closed_forms

    cell = eqx.nn.GRUCell(3, 20, key=jr.key(0))
    assert isinstance(with_closed_forms(parassm.DEER(), cell, 20).jacobian, parassm.ExactJacobian)
    assert isinstance(with_closed_forms(parassm.ELK(), cell, 20).jacobian, parassm.ExactJacobian)
    damped = parassm.ELK(search=parassm.TrustRegion(initial_damping=1e-3))
    elk = with_closed_forms(damped, cell, 20)
    assert isinstance(elk.jacobian, parassm.FunctionJacobian)
    narrow = eqx.nn.GRUCell(3, 8, key=jr.key(0))
    assert isinstance(
        with_closed_forms(parassm.DEER(), narrow, 8).jacobian, parassm.FunctionJacobian
    )
    with parassm.linear.scan_impl("xla"):
        deer = with_closed_forms(parassm.DEER(), cell, 20)
        assert isinstance(deer.jacobian, parassm.FunctionJacobian)
    xs = jr.normal(jr.key(1), (300, 3))
    hs = parassm.nn.ParallelRNN(cell, solver=parassm.DEER())(xs)
    expected = sequential(lambda s, x: cell(x, s), jnp.zeros(20), xs)
    np.testing.assert_allclose(hs, expected, atol=1e-4, rtol=1e-4)
