"""The Pallas kernels (interpret mode on CPU) against their `lax.scan` references, and
`parassm.linear.PallasScan` inside `solve` and the solvers."""

import functools as ft

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import parassm
import parassm.linear as linear
import parassm_kernels as kernels
import pytest

from .helpers import linear_loop as _loop, sequential


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-12, atol=1e-12)


@ft.partial(jax.jit, static_argnames=("reverse", "chunk_size", "block_d"))
def _diagonal(a, b, init, reverse, chunk_size, block_d):
    return kernels.diagonal_scan(
        a, b, init, reverse=reverse, chunk_size=chunk_size, block_d=block_d, interpret=True
    )


@ft.partial(jax.jit, static_argnames=("reverse", "chunk_size"))
def _block(a, b, init, reverse, chunk_size):
    return kernels.block_scan(a, b, init, reverse=reverse, chunk_size=chunk_size, interpret=True)


def _diagonal_problem(key, shape, dtype):
    ka, kb, ki = jr.split(key, 3)
    # |a| slightly above 1 in places: errors would grow rather than be damped away.
    a = jr.uniform(ka, shape, dtype, -1.05, 1.05)
    b = jr.normal(kb, shape, dtype)
    init = jr.normal(ki, shape[:-2] + shape[-1:], dtype)
    return a, b, init


slow = pytest.mark.slow


# Odd T, T not a multiple of the chunk (32), T = 1, both directions, both precisions;
# the full grid is in the slow tier.
DIAGONAL_CASES = [
    (jnp.float32, 37, False),
    (jnp.float32, 257, True),
    (jnp.float64, 100, True),
    (jnp.float64, 257, False),
    (jnp.float64, 1, True),
] + [
    pytest.param(dtype, T, reverse, marks=slow)
    for dtype in (jnp.float32, jnp.float64)
    for T in (1, 37, 100, 257, 1000)
    for reverse in (False, True)
]


@pytest.mark.parametrize("dtype, T, reverse", DIAGONAL_CASES)
def test_diagonal_matches_reference(dtype, T, reverse, getkey):
    # D = 5 with 4 components per program: two component blocks, one of them padded;
    # chunks of 32: T = 100 and 257 end in a partial chunk.
    a, b, init = _diagonal_problem(getkey(), (T, 5), dtype)
    s0 = None if T == 37 else init
    out = _diagonal(a, b, s0, reverse, 32, 4)
    expected = kernels.diagonal_scan_reference(a, b, s0, reverse=reverse)
    assert out.shape == b.shape and out.dtype == dtype
    np.testing.assert_allclose(out, expected, **_tol(dtype))


@pytest.mark.parametrize("reverse", [False, True])
def test_diagonal_batched(reverse, getkey):
    a, b, init = _diagonal_problem(getkey(), (3, 45, 6), jnp.float64)
    out = _diagonal(a, b, init, reverse, 16, 8)
    expected = kernels.diagonal_scan_reference(a, b, init, reverse=reverse)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    # The batch axis is independent problems.
    np.testing.assert_allclose(out[1], _diagonal(a[1], b[1], init[1], reverse, 16, 8))


def _block_problem(key, batch, T, nb, k, dtype):
    ka, kb, ki = jr.split(key, 3)
    # Spectral norms about 0.8: float32 rounding is not amplified over T steps.
    a = 0.4 * jr.normal(ka, batch + (T, nb, k, k), dtype) / jnp.sqrt(jnp.asarray(k, dtype))
    b = jr.normal(kb, batch + (T, nb * k), dtype)
    init = jr.normal(ki, batch + (nb * k,), dtype)
    return a, b, init


BLOCK_CASES = [
    (jnp.float64, 37, False, 3, 2),
    (jnp.float32, 100, True, 2, 3),
    (jnp.float64, 100, True, 1, 6),
    (jnp.float32, 37, False, 1, 6),
] + [
    pytest.param(dtype, T, reverse, nb, k, marks=slow)
    for dtype in (jnp.float32, jnp.float64)
    for T in (37, 100, 257)
    for reverse in (False, True)
    for nb, k in ((3, 2), (2, 3), (1, 6), (2, 16))
]


# (nb, k): blocks of 2 and 3 (padded to 4), and a dense 6 x 6 map (nb = 1).
@pytest.mark.parametrize("dtype, T, reverse, nb, k", BLOCK_CASES)
def test_block_matches_reference(dtype, T, reverse, nb, k, getkey):
    a, b, init = _block_problem(getkey(), (), T, nb, k, dtype)
    s0 = None if T == 37 else init
    out = _block(a, b, s0, reverse, 32)
    expected = kernels.block_scan_reference(a, b, s0, reverse=reverse)
    assert out.shape == b.shape and out.dtype == dtype
    np.testing.assert_allclose(out, expected, **_tol(dtype))


def test_block_batched_and_largest_block(getkey):
    a, b, init = _block_problem(getkey(), (2,), 37, 2, 4, jnp.float64)
    out = _block(a, b, init, True, 16)
    np.testing.assert_allclose(out, kernels.block_scan_reference(a, b, init, reverse=True))
    a, b, init = _block_problem(getkey(), (), 19, 1, kernels.MAX_BLOCK_SIZE, jnp.float64)
    out = _block(a, b, init, False, 8)
    expected = kernels.block_scan_reference(a, b, init)
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_kernel_validation():
    a = jnp.ones((8, 2))
    with pytest.raises(ValueError, match="power of two"):
        kernels.diagonal_scan(a, a, chunk_size=12)
    with pytest.raises(ValueError, match="shape"):
        kernels.diagonal_scan(a, a[:, :1])
    big = jnp.ones((4, 1, 33, 33))
    with pytest.raises(ValueError, match="larger than"):
        kernels.block_scan(big, jnp.ones((4, 33)))


def _transitions(key, T, D):
    k1, k2, k3, k4 = jr.split(key, 4)
    return [
        linear.Dense(0.5 * jr.normal(k1, (T, D, D), jnp.float64)),
        linear.Diagonal(jr.uniform(k2, (T, D), jnp.float64, -1.2, 1.2)),
        linear.BlockDiagonal(0.5 * jr.normal(k3, (T, D // 2, 2, 2), jnp.float64)),
        linear.Scalar(jr.uniform(k4, (T,), jnp.float64, -1.0, 1.0)),
        linear.Zero(T),
    ]


@ft.partial(jax.jit, static_argnames=("reverse",))
def _pallas_solve(transition, b, init, reverse):
    return linear.solve(transition, b, init, reverse=reverse, scan_impl=linear.PallasScan(16))


@pytest.mark.parametrize("reverse", [False, True])
def test_pallas_solve_matches_loop(reverse, getkey):
    T, D = 37, 4
    b = jr.normal(getkey(), (T, D), jnp.float64)
    init = jr.normal(getkey(), (D,), jnp.float64)
    for transition in _transitions(getkey(), T, D):
        out = _pallas_solve(transition, b, init, reverse)
        expected = _loop(transition.as_matrix(D), b, init, reverse)
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-10)


def test_pallas_large_dense_falls_back(getkey):
    T, D = 9, kernels.MAX_BLOCK_SIZE + 1
    transition = linear.Dense(0.2 * jr.normal(getkey(), (T, D, D), jnp.float64))
    b = jr.normal(getkey(), (T, D), jnp.float64)
    out = _pallas_solve(transition, b, None, False)
    np.testing.assert_allclose(out, _loop(transition.matrices, b, None, False), rtol=1e-10)


@pytest.mark.parametrize(
    "reverse, which",
    [(False, 1), (True, 2), pytest.param(False, 0, marks=slow), pytest.param(True, 0, marks=slow)],
    ids=["diagonal", "block-reverse", "dense", "dense-reverse"],
)
def test_pallas_solve_derivatives(reverse, which, getkey):
    # Reverse mode goes through the transposed (opposite-direction) kernel; compare with
    # differentiating the associative scan.
    T, D = 21, 4
    b = jr.normal(getkey(), (T, D), jnp.float64)
    init = jr.normal(getkey(), (D,), jnp.float64)
    transition = _transitions(getkey(), T, D)[which]
    a = transition.elements()

    def loss(a, b, init, impl):
        out = linear.solve(transition.from_elements(a), b, init, reverse=reverse, scan_impl=impl)
        return jnp.sum(jnp.sin(out))

    @ft.partial(jax.jit, static_argnums=3)
    def derivatives(a, b, init, impl):
        tangents = (jnp.ones_like(a), jnp.ones_like(b), jnp.ones_like(init))
        jvp = jax.jvp(lambda *p: loss(*p, impl), (a, b, init), tangents)[1]
        return jax.grad(loss, argnums=(0, 1, 2))(a, b, init, impl), jvp

    (grads, jvp) = derivatives(a, b, init, linear.PallasScan(8))
    (grads_ref, jvp_ref) = derivatives(a, b, init, linear.AssociativeScan())
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(jvp, jvp_ref, rtol=1e-10)


def test_pallas_solve_vmap(getkey):
    a = jr.uniform(getkey(), (3, 20, 4), jnp.float64, -1.0, 1.0)
    b = jr.normal(getkey(), (3, 20, 4), jnp.float64)
    solve = lambda impl: jax.vmap(
        lambda a_, b_: linear.solve(linear.Diagonal(a_), b_, scan_impl=impl)
    )  # noqa: E731
    np.testing.assert_allclose(solve("pallas")(a, b), solve("xla")(a, b), rtol=1e-12)


def test_solvers_pick_up_pallas(getkey):
    # No solver code mentions the scan implementation: the context chooses it.
    D, T = 4, 50
    W = 0.6 * jr.normal(getkey(), (D, D), jnp.float64) / jnp.sqrt(jnp.asarray(D, jnp.float64))
    xs = jr.normal(getkey(), (T, D), jnp.float64)
    s0 = jnp.zeros((D,), jnp.float64)
    f = lambda s, x: jnp.tanh(W @ s + x)  # noqa: E731
    expected = sequential(f, s0, xs)
    for solver in (parassm.QuasiDEER(), parassm.Picard()):
        with linear.scan_impl(linear.PallasScan(chunk_size=16)):
            sol = parassm.evaluate(f, s0, xs=xs, solver=solver)
        assert sol.result == parassm.RESULTS.successful
        np.testing.assert_allclose(sol.value, expected, rtol=1e-8, atol=1e-8)
