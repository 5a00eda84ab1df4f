from collections.abc import Callable

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import parassm
import pytest
from hypothesis import given

from .helpers import pendulum, random_contraction, scaled_residual, sequential, tree_max_abs_diff


PARALLEL = [
    parassm.DEER(),
    parassm.QuasiDEER(),
    parassm.QuasiDEER(parassm.HutchinsonDiagonal(num_samples=2)),
    parassm.BlockQuasiDEER(block_size=1),
    parassm.Picard(),
    parassm.Jacobi(),
]
SOLVERS = PARALLEL + [parassm.Sequential()]
IDS = lambda s: type(s).__name__ + ("-H" if "Hutchinson" in repr(s) else "")  # noqa: E731


class TanhCell(eqx.Module):
    """`s -> tanh(W s + U x)`: a contraction when `|W| < 1`."""

    W: jax.Array
    U: jax.Array

    def __call__(self, s, x):
        return jnp.tanh(self.W @ s + self.U @ x)


def _problem(seed, T, D, contraction, dtype):
    kw, ku, kx, ks = jr.split(jr.key(seed), 4)
    cell = TanhCell(random_contraction(kw, D, contraction, dtype), jr.normal(ku, (D, 2), dtype))
    xs = jr.normal(kx, (T, 2), dtype)
    s0 = jr.normal(ks, (D,), dtype)
    return cell, s0, xs


# Bounded shapes (T, D): at most three compilations per solver and dtype. They include a
# single step and a scalar state.
shapes = st.sampled_from([(1, 3), (7, 1), (40, 3)])


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@given(shape=shapes, contraction=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_parity_with_lax_scan(solver, dtype, shape, contraction, seed):
    T, D = shape
    cell, s0, xs = _problem(seed, T, D, contraction, dtype)
    sol = parassm.evaluate(cell, s0, xs=xs, solver=solver)
    expected = sequential(cell, s0, xs)
    assert sol.value.dtype == dtype
    assert sol.result == parassm.RESULTS.successful
    assert float(sol.stats["residual"]) <= 1
    assert int(sol.stats["num_steps"]) <= T
    # The error is bounded by the condition number times the tolerance.
    tol = 1e-8 if dtype == jnp.float64 else 2e-4
    assert tree_max_abs_diff(sol.value, expected) < tol


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_pytree_state_lstm(solver, getkey):
    cell = eqx.nn.LSTMCell(3, 4, key=getkey())
    xs = jr.normal(getkey(), (50, 3))
    s0 = (jnp.zeros(4), jnp.zeros(4))

    def f(state, x):
        return cell(x, state)

    sol = parassm.evaluate(f, s0, xs=xs, solver=solver)
    expected = sequential(f, s0, xs)
    assert isinstance(sol.value, tuple) and sol.value[0].shape == (50, 4)
    assert tree_max_abs_diff(sol.value, expected) < 1e-8


@pytest.mark.parametrize("solver", PARALLEL, ids=IDS)
def test_dict_state_and_autonomous(solver):
    def f(state, x):
        assert x is None
        return {"a": 0.5 * state["a"] + 0.1 * jnp.sum(jnp.sin(state["b"])), "b": 0.9 * state["b"]}

    s0 = {"a": jnp.ones((2, 2)), "b": jnp.arange(3.0)}
    sol = parassm.evaluate(f, s0, 30, solver=solver)
    assert tree_max_abs_diff(sol.value, sequential(f, s0, length=30)) < 1e-9


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_drop_in(solver, reverse, getkey):
    cell, s0, xs = _problem(0, 25, 3, 0.8, jnp.float64)

    def f(carry, x):
        new = cell(carry, x)
        return new, (jnp.sum(new), 2.0 * new)

    carry, ys = parassm.scan(f, s0, xs, reverse=reverse, solver=solver)
    carry_ref, ys_ref = lax.scan(f, s0, xs, reverse=reverse)
    assert tree_max_abs_diff((carry, ys), (carry_ref, ys_ref)) < 1e-9


def test_sequential_is_lax_scan_bit_for_bit():
    system = parassm.systems.GRU(hidden_size=8, dtype=jnp.float32)
    xs = system.inputs(200)

    def f(c, x):
        c = system.f(c, x)
        return c, c

    for reverse in (False, True):
        ours = parassm.scan(f, system.s0, xs, reverse=reverse, solver=parassm.Sequential())
        ref = lax.scan(f, system.s0, xs, reverse=reverse)
        for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
            assert jnp.array_equal(a, b)
    sol = parassm.evaluate(system.f, system.s0, xs=xs, solver=parassm.Sequential())
    assert jnp.array_equal(sol.value, lax.scan(f, system.s0, xs)[1])


@pytest.mark.parametrize("k", [1, 3, 10])
def test_causality_first_k_states_exact(k):
    # A strongly nonlinear, expansive map: DEER needs many iterations, but after k of
    # them the first k states are the sequential ones.
    system = parassm.systems.Logistic(r=3.9, x0=0.3)
    T = 60
    sol = parassm.evaluate(system.f, system.s0, T, solver=parassm.DEER(), max_steps=k, throw=False)
    expected = sequential(system.f, system.s0, length=T)
    np.testing.assert_allclose(sol.value[:k], expected[:k], rtol=1e-9)
    assert int(sol.stats["converged_prefix"]) >= k


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_linear_dynamics_one_deer_iteration(dtype, getkey):
    D, T = 4, 500
    A = jr.normal(getkey(), (T, D, D), dtype)  # expansive, any spectrum
    B = jr.normal(getkey(), (T, D), dtype)

    def f(s, x):
        a, b = x
        return a @ s + b

    s0 = jnp.ones(D, dtype)
    rtol = 1e-3 if dtype == jnp.float32 else None
    sol = parassm.evaluate(f, s0, xs=(A[:20] / 3, B[:20]), solver=parassm.DEER(rtol=rtol))
    assert int(sol.stats["num_steps"]) == 1
    # A contraction, long sequence.
    A = 0.3 * A / jnp.sqrt(D)
    sol = parassm.evaluate(f, s0, xs=(A, B), solver=parassm.DEER())
    assert int(sol.stats["num_steps"]) == 1


def test_s5_word_problem_deer_one_step_quasi_many():
    system = parassm.systems.S5WordProblem()
    xs = system.inputs(100)
    deer = parassm.evaluate(system.f, system.s0, xs=xs, solver=parassm.DEER())
    assert int(deer.stats["num_steps"]) == 1
    expected = sequential(system.f, system.s0, xs)
    np.testing.assert_allclose(deer.value, expected, atol=1e-9)
    jacobi = parassm.evaluate(system.f, system.s0, xs=xs, solver=parassm.Jacobi())
    assert int(jacobi.stats["num_steps"]) > 50


@pytest.mark.parametrize(
    "dtype, solver",
    [
        (jnp.float32, parassm.DEER()),
        (jnp.float64, parassm.QuasiDEER()),
        pytest.param(jnp.float64, parassm.DEER(), marks=pytest.mark.slow),
        pytest.param(jnp.float32, parassm.QuasiDEER(), marks=pytest.mark.slow),
    ],
    ids=["float32-DEER", "float64-QuasiDEER", "float64-DEER", "float32-QuasiDEER"],
)
def test_chaotic_logistic_overflow_recovery(dtype, solver):
    # LLE = ln 2: products of Jacobians overflow after ~128 (float32) or ~1024
    # (float64) steps. The solver must still return an honest trajectory: every
    # residual meets the tolerance (a pseudo-trajectory), but its error, which grows
    # like 2^t, cannot: `inaccurate`, at once (no tightening is tried).
    system = parassm.systems.Logistic(r=4.0, dtype=dtype)
    T = 2_500  # past both overflow points; the solve is O(T^2) work
    sol = parassm.evaluate(system.f, system.s0, T, solver=solver, throw=False)
    assert bool(jnp.all(jnp.isfinite(sol.value)))
    assert sol.result == parassm.RESULTS.inaccurate
    assert float(sol.stats["error_estimate"]) > 1
    assert float(sol.stats["tolerance_factor"]) == 1
    assert int(sol.stats["num_steps"]) <= T
    # Check the residual independently of the solver's own bookkeeping.
    prev = jnp.concatenate([system.s0[None], sol.value[:-1]])
    fs = jax.vmap(system.f, in_axes=(0, None))(prev, None)
    rtol, atol = parassm.DEER().tolerances(dtype)
    assert np.all(scaled_residual(sol.value, fs, rtol, atol) <= 1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("solver_type", [parassm.DEER, parassm.QuasiDEER])
def test_blown_up_tail_is_restarted(dtype, solver_type):
    # Logistic r = 2.8 (a stable fixed point) from s0 = 0.1: linearised at the constant
    # guess the Jacobians are 2.24, so the first undamped Newton correction grows like
    # 2.24^t: it stays finite in float64 (1e175 at t = 500) and overflows in float32.
    # Corrections at such steps cancel catastrophically; restarting the blown-up tail
    # from its last sane step converges in a dozen steps (keeping it: one step per
    # iteration, T - 1 of them, in both dtypes).
    system = parassm.systems.Logistic(r=2.8, x0=0.1, dtype=dtype)
    T = 500
    solver = solver_type(search=parassm.Undamped())
    sol = parassm.evaluate(system.f, system.s0, T, solver=solver, throw=False)
    assert sol.result == parassm.RESULTS.successful
    assert int(sol.stats["num_steps"]) <= 20
    ref = sequential(system.f, system.s0, None, T)
    tol = 1e-10 if dtype == jnp.float64 else 1e-5
    assert tree_max_abs_diff(sol.value, ref) < tol


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize(
    "r, x0",
    # The stalled row in the default suite; the others (blow-up restarts) are slow.
    [
        pytest.param(3.2, 0.1, marks=pytest.mark.slow),
        (3.2, 0.3),
        pytest.param(3.4, 0.1, marks=pytest.mark.slow),
    ],
)
def test_periodic_orbit_restarts_in_phase(r, x0, dtype):
    # The logistic map on its stable orbit of period 2 (r = 3.2 and 3.4). From the
    # default guess a constant tail carries no phase: linearised at one, Newton's step
    # expands and blows up again, and the blown-up tail restarts from the converged
    # prefix repeated in phase with the orbit (DEER took over 300 steps at T = 1e4 in
    # float32 before). From a random guess nothing need blow up (r = 3.2 from 0.3): the
    # front gained one step per iteration (300 steps, not converged) until a stalled
    # loop restarted the tail in phase too.
    system = parassm.systems.Logistic(r=r, x0=x0, dtype=dtype)
    T = 10_000
    ref = sequential(system.f, system.s0, None, T)
    tol = 1e-10 if dtype == jnp.float64 else 1e-4
    # The benchmark's random guess: uniform over the range of the trajectory.
    uniform = jr.uniform(jr.split(jr.key(0), 1)[0], (T,), dtype)
    guesses = {"default": None, "random": uniform * (ref.max() - ref.min()) + ref.min()}
    for name, init in guesses.items():
        for solver in (parassm.DEER(), parassm.ELK()):
            sol = parassm.evaluate(
                system.f, system.s0, T, solver=solver, init=init, max_steps=100, throw=False
            )
            assert sol.result == parassm.RESULTS.successful, (name, solver)
            assert int(sol.stats["num_steps"]) <= 50, (name, solver, sol.stats["num_steps"])
            assert tree_max_abs_diff(sol.value, ref) < tol, (name, solver)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_period_three_and_shooting_from_a_random_guess(dtype):
    # The period-3 window of the logistic map (r = 3.83, LLE about -0.2): a period
    # that is not a power of two. Multiple shooting's chunk ends crawled one chunk per
    # iteration (55 of 55 chunks at T = 3000 with chunks of 55 steps); the stalled
    # coarse loop now restarts them in phase. And multiple shooting from a random guess
    # on the period-2 orbit: one chunk per iteration before (97-100 iterations at
    # T = 1e4), a few now.
    T = 3000
    tol = 1e-10 if dtype == jnp.float64 else 1e-4
    for r, init_kind, most in ((3.83, None, 12), (3.2, "random", 10)):
        system = parassm.systems.Logistic(r=r, x0=0.3, dtype=dtype)
        ref = sequential(system.f, system.s0, None, T)
        init = None
        if init_kind == "random":
            uniform = jr.uniform(jr.key(1), (T,), dtype)
            init = uniform * (ref.max() - ref.min()) + ref.min()
        solver = parassm.MultipleShooting(chunk_length=55)
        sol = parassm.evaluate(system.f, system.s0, T, solver=solver, init=init, throw=False)
        assert sol.result == parassm.RESULTS.successful, r
        assert int(sol.stats["num_steps"]) <= most, (r, sol.stats["num_steps"])
        assert tree_max_abs_diff(sol.value, ref) < tol, r


def test_the_restarted_tail_repeats_the_converged_prefix():
    from parassm._solvers._parallel import safeguarded

    # Converged up to p = 6 on a period-2 sequence; blown up from step 8 on.
    T, p = 20, 6
    orbit = jnp.tile(jnp.array([[0.5], [0.8]]), (T // 2, 1))
    S = orbit.at[p:].set(jnp.inf)
    fs = orbit
    sizes = jnp.ones(T)
    trial = orbit.at[8:].set(1e30)
    out = safeguarded(S, fs, sizes, trial, jnp.array(p), jnp.array(8))
    # Steps before the blow-up are kept (p is f there), then the converged prefix's
    # shortest period repeats, in phase: the orbit.
    np.testing.assert_array_equal(out, orbit)
    # With fewer than two periods converged, the last sane step is repeated ...
    out = safeguarded(S, fs, sizes, trial, jnp.array(3), jnp.array(8))
    np.testing.assert_array_equal(out[8:], jnp.broadcast_to(trial[7], (T - 8, 1)))
    # ... and so it is after a prefix that does not repeat (a decaying oscillation is
    # better restarted from a constant than from a period it does not have).
    ramp = jnp.linspace(0.0, 1.0, T)[:, None]
    out = safeguarded(ramp.at[p:].set(jnp.inf), ramp, sizes, trial, jnp.array(p), jnp.array(8))
    np.testing.assert_array_equal(out[8:], jnp.broadcast_to(trial[7], (T - 8, 1)))
    # A period of three is found too.
    orbit3 = jnp.tile(jnp.array([[0.2], [0.5], [0.9]]), (T, 1))[:T]
    trial3 = orbit3.at[8:].set(1e30)
    out = safeguarded(orbit3.at[p:].set(jnp.inf), orbit3, sizes, trial3, jnp.array(p), jnp.array(8))
    np.testing.assert_array_equal(out, orbit3)


def test_a_stalled_loop_restarts_a_tail_that_is_off_the_periodic_prefix():
    from parassm._solvers._parallel import safeguarded

    T, p = 20, 6
    orbit = jnp.tile(jnp.array([[0.5], [0.8]]), (T // 2, 1))
    S, fs, sizes = orbit.at[p:].set(0.6), orbit, jnp.ones(T)
    off = orbit.at[p + 1 :].set(0.65)  # finite and sane: nothing blows up
    never = jnp.array(T)
    # Not stalled: the trial is kept (step p is f there).
    out = safeguarded(S, fs, sizes, off, jnp.array(p), never)
    np.testing.assert_array_equal(out, off.at[p].set(orbit[p]))
    # Stalled: the tail follows the prefix's period, in phase.
    out = safeguarded(S, fs, sizes, off, jnp.array(p), never, jnp.array(True))
    np.testing.assert_array_equal(out, orbit)
    # Stalled but on the extension already (within 10% of the size), or after a prefix
    # that does not repeat: kept.
    near = orbit.at[p + 1 :].add(0.01)
    out = safeguarded(S, fs, sizes, near, jnp.array(p), never, jnp.array(True))
    np.testing.assert_array_equal(out, near.at[p].set(orbit[p]))
    ramp = jnp.linspace(0.0, 1.0, T)[:, None]
    out = safeguarded(ramp.at[p:].set(0.6), ramp, sizes, off, jnp.array(p), never, True)
    np.testing.assert_array_equal(out, ramp.at[p + 1 :].set(off[p + 1 :]))


def test_a_crawling_loop_restarts_a_tail_at_rest_where_that_lowers_the_merit():
    from parassm._solvers._parallel import safeguarded

    # Swings of size 1, then (from step 100) a small oscillation that does not repeat
    # with any period of up to 64 steps to 1%: at rest, measured by the size of the
    # trajectory, but not periodic.
    T, p = 300, 250
    t = jnp.arange(T, dtype=float)
    prefix = jnp.where(t < 100, jnp.cos(0.7 * t), 1e-4 * jnp.cos(0.7 * t))[:, None]
    S, fs, sizes = prefix.at[p:].set(5.0), prefix, jnp.ones(T)
    garbage = prefix.at[p + 1 :].set(jnp.linspace(1.0, 3.0, T - p - 1)[:, None])
    never = jnp.array(T)
    kept = garbage.at[p].set(prefix[p])
    # The candidate: the trial with step `p` repeated after `p`.
    restarted = prefix.at[p + 1 :].set(prefix[p])

    def is_candidate(candidate, ratio):  # "it lowers the merit" for exactly that candidate
        return jnp.all(candidate == restarted)

    def run(sizes, crawled, lowers, rules=parassm.DEER().rules):
        return safeguarded(
            S, fs, sizes, garbage, jnp.array(p), never, False, crawled, lowers, rules=rules
        )

    # Not crawling: kept.
    np.testing.assert_array_equal(run(sizes, False, is_candidate), kept)
    # Crawling: restarted where the candidate lowers the merit over the tail, ...
    np.testing.assert_array_equal(run(sizes, True, is_candidate), restarted)
    # ... kept where it does not, ...
    np.testing.assert_array_equal(run(sizes, True, lambda c, r: jnp.array(False)), kept)
    # ... and kept where the rule is off.
    off = parassm.Rules(at_rest=None)
    np.testing.assert_array_equal(run(sizes, True, is_candidate, off), kept)
    # ... and where the prefix is not at rest (the same steps, in a trajectory whose
    # size is theirs).
    np.testing.assert_array_equal(run(1e-4 * sizes, True, is_candidate), kept)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("solver", [parassm.DEER(), parassm.ELK()], ids=IDS)
def test_damped_pendulum_does_not_crawl(solver, dtype):
    # Released at 2 rad, the pendulum swings down to rest. Linearised at the constant
    # guess (past 90 degrees: unstable), the Newton iterates beyond the front spin over
    # the top, and each step converged about 35 more steps (T = 1e4: 256 steps in
    # float32, 257 in float64). Where a crawling loop's tail restarted from the front
    # (here: nearly at rest) has the lower merit, it is taken.
    s0, T = jnp.array([2.0, 0.0], dtype), 10_000
    sol = parassm.evaluate(pendulum, s0, T, solver=solver, max_steps=100, throw=False)
    assert sol.result == parassm.RESULTS.successful
    assert int(sol.stats["num_steps"]) <= 30
    ref = sequential(pendulum, s0, length=T)
    tol = 1e-8 if dtype == jnp.float64 else 1e-3
    assert tree_max_abs_diff(sol.value, ref) < tol


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_expanding_linearisation_restarts_the_tail(dtype):
    # The two-well sampler started at the saddle between the wells: linearised at the
    # constant guess the maps expand (about 1.03 per step), so the Newton correction
    # grows geometrically along the sequence. Trial steps beyond `1 / sqrt(eps)` times
    # the iterate restart from the last sane step (without: 51 steps in float32).
    system = parassm.systems.TwoWellLangevin(dtype=dtype)
    xs = system.inputs(4000)
    sol = parassm.evaluate(system.f, system.s0, xs=xs, solver=parassm.DEER(), throw=False)
    # Locally unstable between the wells: rounding is amplified along the trajectory,
    # so that in float32 the trajectory's error is not within rtol = 1.4e-5 of its
    # size (the error estimate says about 16 times that) however small the residual.
    if dtype == jnp.float64:
        assert sol.result == parassm.RESULTS.successful
    else:
        assert sol.result == parassm.RESULTS.inaccurate
        assert float(sol.stats["residual"]) <= 1
    assert int(sol.stats["num_steps"]) <= 20
    ref = sequential(system.f, system.s0, xs)
    tol = 1e-7 if dtype == jnp.float64 else 2e-2
    assert tree_max_abs_diff(sol.value, ref) < tol


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_growing_linear_recurrence_still_converges(dtype):
    # The other side of that restart: a trajectory that genuinely grows by more than
    # `1 / sqrt(eps)` (here 1.05^t, to 1e21) is cut there at each iteration, so DEER
    # takes a few steps instead of one; the result is still exact.
    xs = jr.normal(jr.key(0), (1000,), dtype)

    def f(s, x):
        return 1.05 * s + x

    sol = parassm.evaluate(f, jnp.asarray(1.0, dtype), xs=xs, solver=parassm.DEER(), throw=False)
    assert sol.result == parassm.RESULTS.successful
    assert 1 < int(sol.stats["num_steps"]) <= 8
    ref = sequential(f, jnp.asarray(1.0, dtype), xs)
    np.testing.assert_allclose(sol.value, ref, rtol=1e-9 if dtype == jnp.float64 else 1e-4)


def test_nonfinite_trajectory_is_reported():
    def f(s, x):
        return s * s + 1.0  # overflows to inf after ~10 steps from 2

    sol = parassm.evaluate(f, jnp.array(2.0), 30, solver=parassm.DEER(), throw=False)
    assert sol.result == parassm.RESULTS.nonfinite
    p = int(sol.stats["converged_prefix"])
    assert 5 < p < 30
    assert bool(jnp.all(jnp.isfinite(sol.value[:p])))
    assert bool(jnp.all(jnp.isnan(sol.value[p:])))
    with pytest.raises(eqx.EquinoxRuntimeError, match="not finite"):
        parassm.evaluate(f, jnp.array(2.0), 30, solver=parassm.DEER())
    seq = parassm.evaluate(f, jnp.array(2.0), 30, solver=parassm.Sequential(), throw=False)
    assert seq.result == parassm.RESULTS.nonfinite


def test_nan_input_is_reported():
    xs = jnp.ones(10).at[4].set(jnp.nan)
    sol = parassm.evaluate(lambda s, x: 0.5 * s + x, jnp.array(0.0), xs=xs, throw=False)
    assert sol.result == parassm.RESULTS.nonfinite
    assert bool(jnp.isnan(sol.value[4]))


def test_max_steps_reached_throw_and_vmap():
    system = parassm.systems.Logistic(r=3.9)
    solver = parassm.Jacobi()
    with pytest.raises(eqx.EquinoxRuntimeError, match="max_steps"):
        parassm.evaluate(system.f, system.s0, 200, solver=solver, max_steps=5)
    sol = parassm.evaluate(system.f, system.s0, 200, solver=solver, max_steps=5, throw=False)
    assert sol.result == parassm.RESULTS.max_steps_reached
    assert int(sol.stats["num_steps"]) == 5
    assert float(sol.stats["residual"]) > 1

    # Under vmap, one result per element: a contracting and a chaotic logistic map.
    def run(r):
        return parassm.evaluate(
            lambda s, x: r * s * (1 - s),
            jnp.array(0.3),
            200,
            solver=solver,
            max_steps=40,
            throw=False,
        )

    sols = jax.vmap(run)(jnp.array([0.5, 3.9]))
    assert (sols.result == parassm.RESULTS.successful).tolist() == [True, False]
    assert (sols.result == parassm.RESULTS.max_steps_reached).tolist() == [False, True]
    np.testing.assert_allclose(
        sols.value[0],
        sequential(lambda s, x: 0.5 * s * (1 - s), jnp.array(0.3), length=200),
        atol=1e-10,
    )
    with pytest.raises(eqx.EquinoxRuntimeError):
        jax.vmap(
            lambda r: (
                parassm.evaluate(
                    lambda s, x: r * s * (1 - s), jnp.array(0.3), 200, solver=solver, max_steps=40
                ).value
            )
        )(jnp.array([0.5, 3.9]))


def test_under_jit_and_T_equals_one():
    @jax.jit
    def run(s0, xs):
        return parassm.evaluate(lambda s, x: jnp.sin(s) + x, s0, xs=xs, solver=parassm.DEER())

    xs = jnp.linspace(0, 1, 9)
    sol = run(jnp.array(0.1), xs)
    np.testing.assert_allclose(sol.value, sequential(lambda s, x: jnp.sin(s) + x, 0.1, xs))
    for solver in SOLVERS:
        one = parassm.evaluate(
            lambda s, x: jnp.sin(s) + x, jnp.array(0.1), xs=xs[:1], solver=solver
        )
        np.testing.assert_allclose(one.value, jnp.sin(0.1) + xs[:1])


def test_warm_start():
    cell, s0, xs = _problem(1, 100, 3, 0.9, jnp.float64)
    exact = sequential(cell, s0, xs)
    sol = parassm.evaluate(cell, s0, xs=xs, solver=parassm.QuasiDEER(), init=exact)
    assert int(sol.stats["num_steps"]) == 0
    # A non-finite guess is replaced (documented), not propagated.
    bad = exact.at[10:20].set(jnp.nan)
    sol = parassm.evaluate(cell, s0, xs=xs, solver=parassm.DEER(), init=bad)
    assert tree_max_abs_diff(sol.value, exact) < 1e-9


def test_function_diagonal_and_hutchinson():
    system = parassm.systems.TanhRNN(a=0.8)
    xs = system.inputs(300)

    def diag(s, x):
        return system.a * (1 - jnp.tanh(system.a * s + x) ** 2)

    expected = sequential(system.f, system.s0, xs)
    for diagonal in (
        parassm.FunctionDiagonal(diag),
        parassm.HutchinsonDiagonal(),
        parassm.ExactDiagonal(batch_size=1),
    ):
        sol = parassm.evaluate(system.f, system.s0, xs=xs, solver=parassm.QuasiDEER(diagonal))
        np.testing.assert_allclose(sol.value, expected, atol=1e-9)
        # D = 1: every diagonal is the full Jacobian, so this is Newton: few steps.
        assert int(sol.stats["num_steps"]) <= 8


def _estimates(sol) -> int:
    """The formations of the exact Jacobians for the error estimate of a quasi solver:
    one, and one more after the estimate asked for a tighter residual (once here)."""
    return 1 + int(float(sol.stats["tolerance_factor"]) < 1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("solver_type", [parassm.QuasiDEER, parassm.QuasiELK])
def test_quasi_keeps_its_diagonals_while_steps_are_fast(dtype, solver_type):
    # A GRU's Jacobian is far from diagonal: the diagonal is a rough preconditioner
    # wherever it is formed, so the default keeps it for most of the linear-rate steps
    # (measured: 3 of 9 in float32, 5 of 20 in float64) and takes no more steps than
    # forming it at every iterate.
    cell = eqx.nn.GRUCell(4, 16, key=jr.key(0), dtype=dtype)
    xs = jr.normal(jr.key(1), (500, 4), dtype)
    s0 = jnp.zeros(16, dtype)

    def f(s, x):
        return cell(x, s)

    expected = sequential(f, s0, xs)
    rtol, _ = parassm.QuasiDEER().tolerances(dtype)
    reused = parassm.evaluate(f, s0, xs=xs, solver=solver_type(relinearise=0.25))
    fresh = parassm.evaluate(f, s0, xs=xs, solver=solver_type(relinearise=0))
    steps, fresh_steps = int(reused.stats["num_steps"]), int(fresh.stats["num_steps"])
    assert fresh_steps >= 4
    assert steps <= fresh_steps + 1
    assert 1 <= int(reused.stats["num_linearisations"]) <= steps // 2
    # Without reuse the maps come with the values of every evaluation (and the exact
    # Jacobians with each estimate of the error: one, and one more after a tightening).
    assert int(fresh.stats["num_linearisations"]) == fresh_steps + 1 + _estimates(fresh)
    for sol in (reused, fresh):
        assert sol.result == parassm.RESULTS.successful
        assert float(sol.stats["residual"]) <= 1
        np.testing.assert_allclose(sol.value, expected, atol=20 * rtol)


def test_diagonals_are_kept_by_default_only_on_large_problems():
    cell = eqx.nn.GRUCell(2, 16, key=jr.key(0))
    s0 = jnp.zeros(16)

    def f(s, x):
        return cell(x, s)

    # T * D = 2 ** 17: large enough to keep them; half of it: formed every iterate.
    for T, kept in ((8192, True), (4096, False)):
        xs = jr.normal(jr.key(1), (T, 2))
        sol = parassm.evaluate(f, s0, xs=xs, solver=parassm.QuasiDEER())
        steps, formed = int(sol.stats["num_steps"]), int(sol.stats["num_linearisations"])
        formed = formed - _estimates(sol)
        assert (formed <= steps // 2) if kept else (formed == steps + 1)

    # D = 1: the diagonal is the Jacobian and costs one JVP; kept maps would turn
    # Newton into a chord method for no saving. Asked for, they are kept.
    system = parassm.systems.TanhRNN(a=0.8)
    xs = system.inputs(300)
    default = parassm.evaluate(system.f, system.s0, xs=xs, solver=parassm.QuasiDEER())
    steps = int(default.stats["num_steps"])
    assert int(default.stats["num_linearisations"]) == steps + 1
    asked = parassm.QuasiDEER(relinearise=0.25)
    kept = parassm.evaluate(system.f, system.s0, xs=xs, solver=asked)
    assert int(kept.stats["num_linearisations"]) <= int(kept.stats["num_steps"])
    np.testing.assert_allclose(kept.value, default.value, atol=1e-9)


def test_relinearise_must_be_nonnegative():
    with pytest.raises(ValueError, match="relinearise"):
        parassm.QuasiDEER(relinearise=-0.5)
    with pytest.raises(ValueError, match="relinearise"):
        parassm.QuasiELK(relinearise=float("nan"))


def test_block_quasi_deer_exact_on_block_diagonal_system(getkey):
    # Two independent 2-D blocks: BlockQuasiDEER(2) is Newton here.
    A = 0.9 * jr.normal(getkey(), (2, 2, 2)) / 2

    def f(s, x):
        blocks = s.reshape(2, 2)
        return jnp.tanh(jnp.einsum("bij,bj->bi", A, blocks)).reshape(4) + x

    xs = jr.normal(getkey(), (200, 4))
    s0 = jnp.zeros(4)
    block = parassm.evaluate(f, s0, xs=xs, solver=parassm.BlockQuasiDEER(2))
    deer = parassm.evaluate(f, s0, xs=xs, solver=parassm.DEER())
    assert int(block.stats["num_steps"]) == int(deer.stats["num_steps"])
    np.testing.assert_allclose(block.value, deer.value, atol=1e-10)
    with pytest.raises(ValueError, match="multiple of the block size"):
        parassm.evaluate(f, s0, xs=xs, solver=parassm.BlockQuasiDEER(3))


class TestTraceTimeErrors:
    def test_T_zero(self):
        with pytest.raises(ValueError, match="at least 1"):
            parassm.evaluate(lambda s, x: s, jnp.array(1.0), 0)

    def test_no_length(self):
        with pytest.raises(ValueError, match="pass `T`"):
            parassm.evaluate(lambda s, x: s, jnp.array(1.0))

    def test_T_disagrees_with_xs(self):
        with pytest.raises(ValueError, match="T=5"):
            parassm.evaluate(lambda s, x: s + x, jnp.array(1.0), 5, xs=jnp.ones(4))

    def test_xs_lengths_differ(self):
        xs = {"u": jnp.ones(4), "v": jnp.ones((5, 2))}
        with pytest.raises(ValueError, match=r"xs\['u'\]: 4, xs\['v'\]: 5"):
            parassm.evaluate(lambda s, x: s, jnp.array(1.0), xs=xs)

    def test_non_float_state(self):
        with pytest.raises(TypeError, match=r"s0\[1\] has dtype int"):
            parassm.evaluate(
                lambda s, x: s, (jnp.array(1.0), jnp.array(1)), 3, solver=parassm.DEER()
            )
        # Sequential accepts any carry, and so does Auto (the default), by running it.
        sol = parassm.evaluate(lambda s, x: (s[0], s[1] + 1), (jnp.array(1.0), jnp.array(1)), 3)
        assert sol.value[1].tolist() == [2, 3, 4]
        sol = parassm.evaluate(lambda s, x: s + 1, jnp.array(1), 3, solver=parassm.Sequential())
        assert sol.value.tolist() == [2, 3, 4]

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"state\['h'\] with shape \(3,\).*shape \(2,\)"):
            parassm.evaluate(lambda s, x: {"h": jnp.ones(3)}, {"h": jnp.ones(2)}, 4)

    def test_structure_mismatch(self):
        with pytest.raises(ValueError, match="structure"):
            parassm.evaluate(lambda s, x: (s, s), jnp.ones(2), 4)

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="dtype float64"):
            parassm.evaluate(lambda s, x: s.astype(jnp.float64), jnp.ones(2, jnp.float32), 4)

    def test_bad_init(self):
        with pytest.raises(ValueError, match=r"init.*shape \(3, 2\)"):
            parassm.evaluate(lambda s, x: s, jnp.ones(2), 4, init=jnp.ones((3, 2)))

    def test_bad_solver_and_tolerance(self):
        with pytest.raises(TypeError, match="parassm solver"):
            parassm.evaluate(lambda s, x: s, jnp.ones(2), 4, solver="deer")
        with pytest.raises(ValueError, match="rtol"):
            parassm.DEER(rtol=-1.0)


class _RecordingAdjoint(parassm.AbstractAdjoint):
    """The implicit adjoint, recording that `scan` handed the problem to it."""

    record: Callable = eqx.field(static=True)

    def apply(self, solver, f, s0, xs, length, init, max_steps):
        self.record(length)
        return parassm.ImplicitAdjoint().apply(solver, f, s0, xs, length, init, max_steps)


def test_scan_adjoint_pytrees_and_one_compilation():
    W = jnp.array([[0.5, -0.3], [0.2, 0.4]])
    traces = []

    def f(carry, x):
        traces.append(None)  # counts the traces of `f`
        h = jnp.tanh(W @ carry["h"] + x["u"] * x["v"])
        return {"h": h, "n": carry["n"] + 1.0}, (jnp.sum(h), {"twice": 2.0 * h})

    init = {"h": jnp.array([0.1, -0.2]), "n": jnp.array(0.0)}
    xs = {"u": jnp.sin(jnp.arange(40.0)).reshape(20, 2), "v": jnp.linspace(0.0, 1.0, 20)[:, None]}
    xs["v"] = jnp.broadcast_to(xs["v"], (20, 2))
    calls = []
    adjoint = _RecordingAdjoint(lambda length: calls.append(length))
    for reverse in (False, True):
        expected = lax.scan(f, init, xs, reverse=reverse)
        got = parassm.scan(f, init, xs, reverse=reverse, solver=parassm.DEER(), adjoint=adjoint)
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
        assert tree_max_abs_diff(got, expected) < 1e-9
    assert calls == [20]  # traced once: both directions share the evaluation
    # Repeated eager calls with the same `f` (new values, same shapes) reuse the
    # compiled program: `f` is not traced again.
    before = len(traces)
    for shift in (0.0, 1.0, 2.0):
        moved = {"h": init["h"] + shift, "n": init["n"]}
        parassm.scan(f, moved, xs, solver=parassm.DEER(), adjoint=adjoint)
    assert len(traces) == before
    with pytest.raises(TypeError, match="adjoint"):
        parassm.scan(f, init, xs, solver=parassm.DEER(), adjoint="implicit")
    # The gradient goes through the adjoint handed over.
    grad = jax.grad(
        lambda h: parassm.scan(f, {"h": h, "n": init["n"]}, xs, adjoint=adjoint)[1][0].sum()
    )
    ref = jax.grad(lambda h: lax.scan(f, {"h": h, "n": init["n"]}, xs)[1][0].sum())
    np.testing.assert_allclose(grad(init["h"]), ref(init["h"]), rtol=1e-9)


@pytest.mark.parametrize("unroll", [1, 3, True])
def test_scan_unroll_and_length_only(unroll):
    def f(c, x):
        assert x is None
        return 0.9 * jnp.sin(c) + 0.1, None

    for solver in (parassm.Sequential(), parassm.DEER()):
        got = parassm.scan(f, jnp.array(0.3), length=9, unroll=unroll, solver=solver)
        expected = lax.scan(f, jnp.array(0.3), length=9, unroll=unroll)
        assert got[1] is None
        if isinstance(solver, parassm.Sequential):
            assert jnp.array_equal(got[0], expected[0])
        else:
            np.testing.assert_allclose(got[0], expected[0], rtol=1e-12)
