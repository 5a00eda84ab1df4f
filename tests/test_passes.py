"""The passes over all steps (`_jacobian.over_steps`): one vectorised pass, or on a CPU
chunks of steps run one after the other where the pass would leave the cache. Chunked
or not, and under `jax.vmap` or not, they compute the same values and derivatives."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import parassm
import pytest
from parassm._solvers import _jacobian as jacobian


@pytest.fixture
def chunked(monkeypatch):
    """Every pass chunked, into chunks of `MIN_CHUNK` steps (and a shorter last one);
    no compiled program kept from before or after."""
    monkeypatch.setattr(jacobian, "CHUNK_ABOVE", 0)
    monkeypatch.setattr(jacobian, "CHUNK_STEP_BYTES", 0)
    monkeypatch.setattr(jacobian, "CHUNK_BYTES", 1)
    monkeypatch.setattr(jacobian, "MIN_CHUNK", 16)
    parassm.clear_programs()
    yield
    parassm.clear_programs()


def _cell(key, D=3, dtype=jnp.float64):
    k1, k2 = jr.split(key)
    W = jr.normal(k1, (D, D), dtype) * 0.5
    U = jr.normal(k2, (D, 2), dtype)

    def f(s, x):
        return jnp.tanh(W @ s + U @ x["u"]) * x["gain"]

    return f, W


def _inputs(key, T, dtype=jnp.float64):
    return {"u": jr.normal(key, (T, 2), dtype), "gain": jnp.full((T,), 0.9, dtype)}


def _plain(fn, *args):
    return jax.vmap(fn, in_axes=tuple(None if a is None else 0 for a in args))(*args)


def test_the_chunks_are_what_they_should_be(chunked):
    assert jacobian._chunk(8, 100) == 16
    assert jacobian._chunk(8, 10) is None  # one chunk would be the whole pass


@pytest.mark.parametrize("T", [16, 50, 67])
def test_a_chunked_pass_is_the_vectorised_pass(chunked, getkey, T):
    f, _ = _cell(getkey())
    S = jr.normal(getkey(), (T, 3))
    xs = _inputs(getkey(), T)
    expected = _plain(f, S, xs)
    np.testing.assert_allclose(jacobian.over_steps(f, S, xs), expected, rtol=1e-14)
    np.testing.assert_allclose(jax.jit(jacobian.over_steps, static_argnums=0)(f, S, xs), expected)
    # Without inputs, and with outputs that are a PyTree.
    g = lambda s, x: (jnp.sin(s), {"c": jnp.cos(s).sum()})  # noqa: E731
    out = jacobian.over_steps(g, S, None)
    want = _plain(g, S, None)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-14)


def test_a_chunked_pass_under_vmap_chunks_the_batch_as_rows(chunked, getkey):
    T, B = 50, 3
    f, W = _cell(getkey())
    S = jr.normal(getkey(), (B, T, 3))
    xs = jax.vmap(lambda k: _inputs(k, T))(jr.split(getkey(), B))
    expected = jax.vmap(lambda S, xs: _plain(f, S, xs))(S, xs)

    def ours(S, xs):
        return jacobian.over_steps(f, S, xs)

    np.testing.assert_allclose(jax.jit(jax.vmap(ours))(S, xs), expected, rtol=1e-14)
    # Only the states batched, or only the inputs.
    np.testing.assert_allclose(
        jax.vmap(ours, in_axes=(0, None))(S, jax.tree.map(lambda a: a[0], xs)),
        jax.vmap(lambda S: _plain(f, S, jax.tree.map(lambda a: a[0], xs)))(S),
        rtol=1e-14,
    )
    np.testing.assert_allclose(
        jax.vmap(ours, in_axes=(None, 0))(S[0], xs),
        jax.vmap(lambda xs: _plain(f, S[0], xs))(xs),
        rtol=1e-14,
    )

    # Weights per element (closed over, batched): one vectorised pass.
    def with_weights(W, S, xs):
        return jacobian.over_steps(lambda s, x: jnp.tanh(W @ s) + x["u"][0], S, xs)

    Ws = jnp.stack([W, 2 * W, -W])
    np.testing.assert_allclose(
        jax.vmap(with_weights)(Ws, S, xs),
        jax.vmap(lambda W, S, xs: _plain(lambda s, x: jnp.tanh(W @ s) + x["u"][0], S, xs))(
            Ws, S, xs
        ),
        rtol=1e-14,
    )
    # Nested batches.
    SS = jnp.stack([S, 2 * S])
    np.testing.assert_allclose(
        jax.vmap(jax.vmap(ours, in_axes=(0, None)), in_axes=(0, None))(
            SS, jax.tree.map(lambda a: a[0], xs)
        ),
        jax.vmap(jax.vmap(lambda S: _plain(f, S, jax.tree.map(lambda a: a[0], xs))))(SS),
        rtol=1e-14,
    )


def test_a_chunked_pass_differentiates_as_the_vectorised_pass(chunked, getkey):
    T = 40
    f, W = _cell(getkey())
    S = jr.normal(getkey(), (T, 3))
    xs = _inputs(getkey(), T)

    def loss(W, S, pass_):
        g = lambda s, x: jnp.tanh(W @ s + x["u"].sum()) * x["gain"]  # noqa: E731
        return jnp.sum(pass_(g, S, xs) ** 3)

    ours = jax.grad(loss, argnums=(0, 1))(W, S, jacobian.over_steps)
    theirs = jax.grad(loss, argnums=(0, 1))(W, S, _plain)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # Forward over reverse, and under `vmap`.
    hvp = jax.jvp(lambda S: jax.grad(loss, argnums=1)(W, S, jacobian.over_steps), (S,), (S,))
    want = jax.jvp(lambda S: jax.grad(loss, argnums=1)(W, S, _plain), (S,), (S,))
    np.testing.assert_allclose(hvp[1], want[1], rtol=1e-12)
    batched = jax.vmap(jax.grad(loss, argnums=1), in_axes=(None, 0, None))
    np.testing.assert_allclose(
        batched(W, jnp.stack([S, -S]), jacobian.over_steps),
        batched(W, jnp.stack([S, -S]), _plain),
        rtol=1e-12,
    )


def test_the_working_set_counts_the_steps_not_the_weights():
    W = jnp.ones((64, 64), jnp.float32)

    def f(s, x):
        V = jnp.tanh(W @ W)  # the weights alone: shared by all steps
        return V @ s + x

    s, x = jnp.ones((2, 64), jnp.float32), jnp.ones((2, 64), jnp.float32)
    step = jacobian._step_bytes(f, (s, x))
    assert 64 * 4 <= step <= 4 * 64 * 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(
    "solver",
    [
        parassm.DEER(),
        parassm.QuasiDEER(),
        parassm.QuasiDEER(parassm.HutchinsonDiagonal()),
        parassm.BlockQuasiDEER(2),
        parassm.Picard(),
    ],
    ids=lambda s: type(s).__name__,
)
def test_evaluate_with_chunked_passes_is_evaluate(getkey, monkeypatch, solver, dtype):
    T, B, D = 120, 3, 4
    W = jr.normal(getkey(), (D, D), dtype) * 0.4
    xs = jr.normal(getkey(), (B, T, D), dtype)

    def f(s, x):
        return jnp.tanh(W @ s + x)

    def run(xs):
        return parassm.evaluate(f, jnp.zeros(D, dtype), xs=xs, solver=solver, throw=False)

    parassm.clear_programs()
    plain_one, plain_batch = jax.jit(run)(xs[0]), jax.jit(jax.vmap(run))(xs)
    with monkeypatch.context() as m:
        m.setattr(jacobian, "CHUNK_ABOVE", 0)
        m.setattr(jacobian, "CHUNK_STEP_BYTES", 0)
        m.setattr(jacobian, "CHUNK_BYTES", 1)
        m.setattr(jacobian, "MIN_CHUNK", 32)
        parassm.clear_programs()
        one, batch = jax.jit(run)(xs[0]), jax.jit(jax.vmap(run))(xs)
    parassm.clear_programs()
    rtol = 1e-5 if dtype == jnp.float32 else 1e-12
    for ours, theirs in ((one, plain_one), (batch, plain_batch)):
        assert bool(jnp.all(ours.result == theirs.result))
        np.testing.assert_array_equal(ours.stats["num_steps"], theirs.stats["num_steps"])
        np.testing.assert_allclose(ours.value, theirs.value, rtol=rtol, atol=rtol)
