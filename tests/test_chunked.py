"""`parassm.linear.ChunkedScan` and the `scan_impl` choice on the linear layer."""

import functools as ft

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import parassm
import parassm.linear as linear
import pytest

from .helpers import linear_loop as _loop, random_transitions as _transitions, sequential


@ft.partial(jax.jit, static_argnames=("reverse", "chunk_size"))
def _chunked(transition, b, init, reverse, chunk_size):
    impl = linear.ChunkedScan(chunk_size=chunk_size)
    return linear.solve(transition, b, init, reverse=reverse, scan_impl=impl)


# T = 1; one-step chunks; T not a multiple of the chunk; a chunk longer than T.
@pytest.mark.parametrize(
    "T, chunk_size, reverse",
    [(1, 4, True), (37, 7, False), (37, 7, True), (100, 32, True)]
    + [
        pytest.param(T, chunk_size, reverse, marks=pytest.mark.slow)
        for T, chunk_size in ((37, 1), (100, 32), (100, 128), (257, 16))
        for reverse in (False, True)
    ],
)
def test_chunked_matches_loop(T, chunk_size, reverse, getkey):
    D = 4
    b = jr.normal(getkey(), (T, D), jnp.float64)
    init = jr.normal(getkey(), (D,), jnp.float64)
    for transition in _transitions(getkey(), T, D, jnp.float64):
        out = _chunked(transition, b, init, reverse, chunk_size)
        expected = _loop(transition.as_matrix(D), b, init, reverse)
        np.testing.assert_allclose(
            out, expected, rtol=1e-10, atol=1e-10, err_msg=repr(type(transition))
        )
    diagonal = _transitions(getkey(), T, D, jnp.float64)[1]
    out = _chunked(diagonal, b, None, reverse, chunk_size)
    np.testing.assert_allclose(out, _loop(diagonal.as_matrix(D), b, None, reverse), rtol=1e-10)


@pytest.mark.parametrize("reverse", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_chunked_float32(reverse, getkey):
    # Contractions, so that float32 rounding is not amplified; compared with the float64
    # loop, at float32 accuracy.
    T, D = 257, 6
    k1, k2, k3 = jr.split(getkey(), 3)
    b = jr.normal(getkey(), (T, D), jnp.float32)
    transitions = [
        linear.Dense(0.9 * jr.orthogonal(k1, D, (T,), jnp.float32)),
        linear.Diagonal(jr.uniform(k2, (T, D), jnp.float32, -0.95, 0.95)),
        linear.BlockDiagonal(0.9 * jr.orthogonal(k3, 2, (T, D // 2), jnp.float32)),
    ]
    for transition in transitions:
        out = _chunked(transition, b, None, reverse, 16)
        assert out.dtype == jnp.float32
        expected = _loop(transition.as_matrix(D), b, None, reverse)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_chunked_derivatives_and_vmap(getkey):
    T, D = 30, 4
    a = jr.uniform(getkey(), (2, T, D), jnp.float64, -1.0, 1.0)
    b = jr.normal(getkey(), (2, T, D), jnp.float64)

    def loss(a, b, impl):
        solve = lambda a_, b_: linear.solve(linear.Diagonal(a_), b_, scan_impl=impl)  # noqa: E731
        return jnp.sum(jnp.cos(jax.vmap(solve)(a, b)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    got = grad(a, b, linear.ChunkedScan(8))
    want = grad(a, b, linear.AssociativeScan())
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.default_scan
def test_default_scan_impl_is_the_loop_on_cpu():
    want = linear.LoopScan() if jax.default_backend() == "cpu" else linear.AssociativeScan()
    assert linear.default_scan_impl() == want
    with linear.scan_impl("loop") as impl:
        assert impl == linear.LoopScan()


def test_scan_impl_names_and_validation():
    # (This module's tests run inside the suite's associative-scan context.)
    assert linear.default_scan_impl() == linear.AssociativeScan()
    with linear.scan_impl("chunked") as impl:
        assert impl == linear.ChunkedScan()
        assert linear.default_scan_impl() == linear.ChunkedScan()
        with linear.scan_impl(linear.PallasScan(chunk_size=64)):
            assert linear.default_scan_impl() == linear.PallasScan(chunk_size=64)
        assert linear.default_scan_impl() == linear.ChunkedScan()
    assert linear.default_scan_impl() == linear.AssociativeScan()
    with pytest.raises(ValueError, match="scan_impl"):
        linear.scan_impl("fast").__enter__()
    with pytest.raises(ValueError, match="chunk_size"):
        linear.ChunkedScan(chunk_size=0)
    with pytest.raises(ValueError, match="power of two"):
        linear.PallasScan(chunk_size=100)


def test_scan_impl_context_retraces_jitted_functions():
    # The context is part of the tracing-cache key: a function jitted outside the block
    # must not silently reuse its associative-scan trace inside it.
    traced_with = []

    @jax.jit
    def solve(a, b):
        traced_with.append(linear.default_scan_impl())
        return linear.solve(linear.Diagonal(a), b)

    a = jnp.full((10, 2), 0.5)
    b = jnp.ones((10, 2))
    out_xla = solve(a, b)
    with linear.scan_impl("chunked"):
        out_chunked = solve(a, b)
    solve(a, b)
    assert traced_with == [linear.AssociativeScan(), linear.ChunkedScan()]
    np.testing.assert_allclose(out_chunked, out_xla, rtol=1e-12)


@pytest.mark.parametrize(
    "solver",
    [parassm.QuasiDEER(), pytest.param(parassm.DEER(), marks=pytest.mark.slow), parassm.Picard()],
    ids=lambda s: type(s).__name__,
)
def test_solvers_pick_up_chunked(solver, getkey):
    D, T = 3, 60
    W = 0.5 * jr.normal(getkey(), (D, D), jnp.float64) / jnp.sqrt(jnp.asarray(D, jnp.float64))
    xs = jr.normal(getkey(), (T, D), jnp.float64)
    s0 = jnp.ones((D,), jnp.float64)
    f = lambda s, x: jnp.tanh(W @ s + x)  # noqa: E731
    with linear.scan_impl(linear.ChunkedScan(chunk_size=8)):
        sol = parassm.evaluate(f, s0, xs=xs, solver=solver)
    assert sol.result == parassm.RESULTS.successful
    np.testing.assert_allclose(sol.value, sequential(f, s0, xs), rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------ LoopScan


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_loop_scan_matches_loop(reverse, dtype, getkey):
    T, D = 37, 4
    b = jr.normal(getkey(), (T, D), dtype)
    init = jr.normal(getkey(), (D,), dtype)
    tol = 1e-10 if dtype == jnp.float64 else 1e-4
    for transition in _transitions(getkey(), T, D, dtype):
        out = linear.solve(transition, b, init, reverse=reverse, scan_impl=linear.LoopScan())
        assert out.dtype == dtype
        expected = _loop(transition.as_matrix(D), b, init, reverse)
        np.testing.assert_allclose(
            out, expected, rtol=tol, atol=tol, err_msg=repr(type(transition))
        )


def test_loop_scan_derivatives_and_vmap(getkey):
    T, D = 30, 4
    a = jr.uniform(getkey(), (2, T, D, D), jnp.float64, -0.5, 0.5)
    b = jr.normal(getkey(), (2, T, D), jnp.float64)

    def loss(a, b, impl):
        solve = lambda a_, b_: linear.solve(linear.Dense(a_), b_, scan_impl=impl)  # noqa: E731
        return jnp.sum(jnp.cos(jax.vmap(solve)(a, b)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    got = grad(a, b, linear.LoopScan())
    want = grad(a, b, linear.AssociativeScan())
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.default_scan
@pytest.mark.parametrize(
    "solver",
    [parassm.DEER(), parassm.QuasiDEER()]
    + [pytest.param(s, marks=pytest.mark.slow) for s in (parassm.ELK(), parassm.QuasiELK())],
    ids=lambda s: type(s).__name__,
)
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_solvers_with_the_cpu_default_scan(solver, dtype, getkey):
    # The backend's default linear scan (the loop on CPU) gives the trajectory of
    # `lax.scan`, and the same Newton steps as the associative scan, values and
    # gradients alike.
    D, T = 3, 100
    W = 0.8 * jr.normal(getkey(), (D, D), dtype) / jnp.sqrt(jnp.asarray(D, dtype))
    xs = jr.normal(getkey(), (T, D), dtype)
    s0 = jnp.ones((D,), dtype)

    def run(W):
        return parassm.evaluate(lambda s, x: jnp.tanh(W @ s + x), s0, xs=xs, solver=solver)

    sol = run(W)
    assert sol.result == parassm.RESULTS.successful
    tol = 1e-8 if dtype == jnp.float64 else 1e-4
    want = sequential(lambda s, x: jnp.tanh(W @ s + x), s0, xs)
    np.testing.assert_allclose(sol.value, want, rtol=tol, atol=tol)
    with linear.scan_impl("xla"):
        other = run(W)
    assert int(sol.stats["num_steps"]) == int(other.stats["num_steps"])
    grad = jax.grad(lambda W: jnp.sum(run(W).value ** 2))(W)
    with linear.scan_impl("xla"):
        grad_xla = jax.grad(lambda W: jnp.sum(run(W).value ** 2))(W)
    np.testing.assert_allclose(grad, grad_xla, rtol=10 * tol, atol=10 * tol)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1, 2, 3, 10, 17, 50])
def test_fold_in_chunks_is_the_associative_scan(T, reverse, getkey):
    # The CPU default's scan of costly combines (chunks of about sqrt(T) steps, the last
    # padded) against `lax.associative_scan`, with a combine that is associative but
    # not commutative (affine maps), and a 3-tuple of leaves of different ranks.
    from parassm._linear._scan_impl import fold_in_chunks

    def combine(first, second):
        A1, b1, n1 = first
        A2, b2, n2 = second
        return A2 @ A1, jnp.einsum("...ij,...j->...i", A2, b1) + b2, n1 + n2

    elems = (
        0.6 * jr.normal(getkey(), (T, 3, 3)),
        jr.normal(getkey(), (T, 3)),
        jnp.arange(T, dtype=jnp.float64),
    )
    want = jax.lax.associative_scan(combine, elems, reverse=reverse)
    got = jax.jit(ft.partial(fold_in_chunks, combine, reverse=reverse))(elems)
    got_loop = jax.jit(
        lambda e: linear.LoopScan().associative_scan(combine, e, reverse=reverse, costly=True)
    )(elems)
    for w, g, h in zip(want, got, got_loop):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(h, w, rtol=1e-10, atol=1e-10)
