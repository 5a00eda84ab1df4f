"""Multiple shooting: a parallel solver on the chunk ends, the chunks sequential."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.random as jr
import parassm
import pytest
from hypothesis import given

from .helpers import pendulum, random_contraction, sequential, tree_max_abs_diff


class TanhCell(eqx.Module):
    W: jax.Array
    U: jax.Array

    def __call__(self, s, x):
        return jnp.tanh(self.W @ s + self.U @ x)


def _problem(T=40, D=3, contraction=0.8, dtype=jnp.float64, seed=3):
    kw, ku, kx, ks = jr.split(jr.key(seed), 4)
    cell = TanhCell(random_contraction(kw, D, contraction, dtype), jr.normal(ku, (D, 2), dtype))
    return cell, jr.normal(ks, (D,), dtype), jr.normal(kx, (T, 2), dtype)


INNER = [parassm.DEER(), parassm.QuasiDEER(), parassm.ELK(), parassm.Jacobi()]


@pytest.mark.parametrize("inner", INNER, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("chunk_length", [None, 8])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_matches_lax_scan(inner, chunk_length, dtype):
    # T = 40: the default chunk (7 steps) leaves a padded last chunk; chunks of 8 divide T.
    cell, s0, xs = _problem(dtype=dtype)
    solver = parassm.MultipleShooting(inner, chunk_length=chunk_length)
    sol = parassm.evaluate(cell, s0, xs=xs, solver=solver)
    assert sol.result == parassm.RESULTS.successful
    assert sol.value.dtype == dtype
    assert float(sol.stats["residual"]) <= 1
    assert int(sol.stats["converged_prefix"]) == 40
    L = solver.chunk(40)
    assert int(sol.stats["chunk_length"]) == L
    # At most one iteration per chunk (each makes at least one more chunk exact).
    assert int(sol.stats["num_steps"]) <= -(-40 // L)
    tol = 1e-10 if dtype == jnp.float64 else 1e-5
    assert tree_max_abs_diff(sol.value, sequential(cell, s0, xs)) < tol


def test_pytree_state_and_no_inputs():
    def f(s, x):
        a, b = s
        return (0.5 * jnp.tanh(a + b), 0.9 * b - 0.1 * a)

    s0 = (jnp.ones(2), jnp.full(2, 0.5))
    solver = parassm.MultipleShooting(chunk_length=5)
    sol = parassm.evaluate(f, s0, 23, solver=solver)
    assert sol.result == parassm.RESULTS.successful
    assert tree_max_abs_diff(sol.value, sequential(f, s0, length=23)) < 1e-12


def test_one_chunk_is_lax_scan():
    cell, s0, xs = _problem()
    solver = parassm.MultipleShooting(chunk_length=40)
    assert solver.runs_sequentially(s0, 40)
    sol = parassm.evaluate(cell, s0, xs=xs, solver=solver)
    assert tree_max_abs_diff(sol.value, sequential(cell, s0, xs)) == 0
    # One step: a single chunk too.
    sol = parassm.evaluate(cell, s0, xs=xs[:1], solver=parassm.MultipleShooting())
    assert tree_max_abs_diff(sol.value, sequential(cell, s0, xs[:1])) == 0


def test_default_chunk_length():
    solver = parassm.MultipleShooting()
    assert [solver.chunk(T) for T in (1, 2, 100, 101, 10_000)] == [1, 2, 10, 11, 100]


def test_weakly_damped_pendulum_from_a_poor_guess():
    # Within a chunk of 100 steps every iterate is an exact trajectory, and the chunk
    # map (5 time units) contracts. (DEER's iterates once wound through other
    # equilibria here, 53 iterations at T = 2000; since a crawling loop restarts its
    # tail at rest, it takes under 30 too.)
    T, s0 = 2000, jnp.array([2.0, 0.0])
    ref = sequential(pendulum, s0, length=T)
    deer = parassm.evaluate(pendulum, s0, T, solver=parassm.DEER())
    shooting = parassm.evaluate(pendulum, s0, T, solver=parassm.MultipleShooting(chunk_length=100))
    assert shooting.result == parassm.RESULTS.successful
    assert int(shooting.stats["num_steps"]) <= 8
    assert int(deer.stats["num_steps"]) <= 30
    assert tree_max_abs_diff(shooting.value, ref) < 1e-10
    assert tree_max_abs_diff(deer.value, ref) < 1e-8  # the tolerance, carried ~80 steps


def test_chaotic_is_honest_and_bounded():
    # Logistic map at r = 3.9: no shortcut, but at most one iteration per chunk, and
    # successful only where the residual test holds.
    system = parassm.systems.Logistic(r=3.9, dtype=jnp.float64)
    T, L = 120, 10
    solver = parassm.MultipleShooting(chunk_length=L)
    sol = parassm.evaluate(system.f, system.s0, T, solver=solver, throw=False)
    assert sol.result == parassm.RESULTS.successful
    assert int(sol.stats["num_steps"]) <= T // L
    assert float(sol.stats["residual"]) <= 1


def test_failure_is_reported():
    cell, s0, xs = _problem(T=40, contraction=0.95)
    solver = parassm.MultipleShooting(parassm.Jacobi(), chunk_length=4)
    sol = parassm.evaluate(cell, s0, xs=xs, solver=solver, max_steps=1, throw=False)
    assert sol.result == parassm.RESULTS.max_steps_reached
    assert float(sol.stats["residual"]) > 1
    assert int(sol.stats["converged_prefix"]) < 40
    with pytest.raises(Exception, match="max_steps|maximum"):
        parassm.evaluate(cell, s0, xs=xs, solver=solver, max_steps=1)


def test_nonfinite_is_reported():
    def f(s, x):
        return jnp.where(x > 0.5, jnp.nan, 0.5 * s + x)

    xs = jnp.linspace(0.0, 1.0, 30)
    sol = parassm.evaluate(
        f, jnp.array(0.0), xs=xs, solver=parassm.MultipleShooting(chunk_length=4), throw=False
    )
    assert sol.result == parassm.RESULTS.nonfinite
    assert bool(jnp.all(jnp.isnan(sol.value[xs > 0.5])))


def test_gradients_match_lax_scan():
    cell, s0, xs = _problem(T=30)
    solver = parassm.MultipleShooting(chunk_length=6)

    def loss(cell, s0, xs, solve):
        return jnp.sum(jnp.sin(solve(cell, s0, xs)))

    def parallel(cell, s0, xs):
        return parassm.evaluate(cell, s0, xs=xs, solver=solver).value

    grads = jax.grad(loss, argnums=(0, 1, 2))(cell, s0, xs, parallel)
    expected = jax.grad(loss, argnums=(0, 1, 2))(cell, s0, xs, sequential)
    assert tree_max_abs_diff(grads, expected) < 1e-9
    # Second order (the implicit adjoint differentiates again).
    hess = jax.hessian(lambda s0: loss(cell, s0, xs, parallel))(s0)
    hess_ref = jax.hessian(lambda s0: loss(cell, s0, xs, sequential))(s0)
    assert tree_max_abs_diff(hess, hess_ref) < 1e-8


def test_vmap_and_jit():
    cell, s0, xs = _problem(T=24)
    s0s = jnp.stack([s0, -s0, 2 * s0])
    solver = parassm.MultipleShooting(chunk_length=5)

    @jax.jit
    def run(s0):
        return parassm.evaluate(cell, s0, xs=xs, solver=solver, throw=False).value

    out = jax.vmap(run)(s0s)
    ref = jax.vmap(lambda s0: sequential(cell, s0, xs))(s0s)
    assert tree_max_abs_diff(out, ref) < 1e-10


@given(
    T=st.integers(2, 60),
    D=st.integers(1, 4),
    L=st.integers(1, 20),
    contraction=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
)
def test_property_matches_lax_scan(T, D, L, contraction, seed):
    cell, s0, xs = _problem(T=T, D=D, contraction=contraction, seed=seed)
    solver = parassm.MultipleShooting(chunk_length=L)
    sol = parassm.evaluate(cell, s0, xs=xs, solver=solver)
    assert sol.result == parassm.RESULTS.successful
    assert int(sol.stats["num_steps"]) <= max(1, -(-T // L))
    assert tree_max_abs_diff(sol.value, sequential(cell, s0, xs)) < 1e-10


def test_validation():
    with pytest.raises(ValueError, match="chunk_length"):
        parassm.MultipleShooting(chunk_length=0)
    with pytest.raises(TypeError, match="parallel solver"):
        parassm.MultipleShooting(parassm.Sequential())
    with pytest.raises(TypeError, match="closed-form"):
        parassm.MultipleShooting(parassm.DEER(parassm.FunctionJacobian(lambda s, x: s)))
    with pytest.raises(TypeError, match="closed-form"):
        parassm.MultipleShooting(parassm.QuasiDEER(parassm.FunctionDiagonal(lambda s, x: s)))


def test_in_a_model_with_gradients():
    # `parassm.nn` leaves the solver as it is (no closed-form Jacobian of one step is
    # substituted into a solver on chunks), and training gradients match `lax.scan`'s.
    cell = eqx.nn.LSTMCell(3, 4, key=jr.key(0))
    xs = jr.normal(jr.key(1), (50, 3))
    rnn = parassm.nn.ParallelRNN(cell, solver=parassm.MultipleShooting(chunk_length=8))
    assert rnn.solver == parassm.MultipleShooting(chunk_length=8)

    def scan_rnn(cell, xs):
        zeros = jnp.zeros(4)
        return sequential(lambda s, x: cell(x, s), (zeros, zeros), xs)

    def loss(cell, run):
        h, c = run(cell)
        return jnp.sum(h**2) + jnp.sum(jnp.cos(c))

    def parallel(cell):
        return eqx.tree_at(lambda r: r.cell, rnn, cell)(xs)

    grads = eqx.filter_grad(loss)(cell, parallel)
    expected = eqx.filter_grad(loss)(cell, lambda cell: scan_rnn(cell, xs))
    assert tree_max_abs_diff(grads, expected) < 1e-9


def test_unrolled_adjoint_is_refused():
    cell, s0, xs = _problem(T=20)
    with pytest.raises(TypeError, match="ImplicitAdjoint"):
        parassm.evaluate(
            cell,
            s0,
            xs=xs,
            solver=parassm.MultipleShooting(chunk_length=4),
            adjoint=parassm.UnrolledAdjoint(),
        )


def test_diagnosis_suggests_a_chunk_where_newton_crawls():
    # The mean-field RNN at g = 2 (D = 8, these weights) contracts, barely (LLE about
    # -0.007 per step), and DEER's trial crawls: the diagnosis calls it marginal and
    # suggests chunks of about 4 / |LLE| steps. With them multiple shooting converges,
    # but at one chunk per iteration (four chunks at T = 2000): no faster than
    # `lax.scan`, and the diagnosis recommends Sequential.
    T = 2000
    system = parassm.systems.MeanFieldRNN(size=8, g=2.0, dtype=jnp.float64)
    f, s0, xs = system.f, system.s0, system.inputs(T)
    d = parassm.diagnose(f, s0, xs=xs)
    assert d.regime == "marginal" and d.lle < 0
    chunk = d.shooting_chunk
    assert chunk is not None and abs(chunk - 4 / -d.lle) <= 1
    assert d.to_dict()["recommendation"]["multiple_shooting_chunk"] == chunk
    assert isinstance(d.recommended, parassm.Sequential)
    sol = parassm.evaluate(f, s0, xs=xs, solver=parassm.MultipleShooting(chunk_length=chunk))
    assert int(sol.stats["num_steps"]) <= -(-T // chunk)
    assert tree_max_abs_diff(sol.value, sequential(f, s0, xs)) < 1e-10
    # A predictable cell: nothing to suggest.
    cell, s0, xs = _problem(T=200, contraction=0.5)
    assert parassm.diagnose(cell, s0, xs=xs).shooting_chunk is None


def test_warm_start():
    # The chunk ends come from the guess: the solution itself needs no iteration.
    cell, s0, xs = _problem(T=30)
    ref = sequential(cell, s0, xs)
    solver = parassm.MultipleShooting(chunk_length=4)
    sol = parassm.evaluate(cell, s0, xs=xs, solver=solver, init=ref)
    assert int(sol.stats["num_steps"]) == 0
    assert tree_max_abs_diff(sol.value, ref) < 1e-12
    cold = parassm.evaluate(cell, s0, xs=xs, solver=solver)
    assert int(cold.stats["num_steps"]) > 0
