"""The sliding-window mode: bounded memory, at most T iterations, same answer."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import parassm
import pytest

from .helpers import random_contraction, sequential, tree_max_abs_diff


class TanhCell(eqx.Module):
    W: jax.Array
    U: jax.Array

    def __call__(self, s, x):
        return jnp.tanh(self.W @ s + self.U @ x)


def _problem(T=40, D=2, contraction=0.7):
    kw, ku, kx, ks = jr.split(jr.key(3), 4)
    cell = TanhCell(random_contraction(kw, D, contraction, jnp.float64), jr.normal(ku, (D, 2)))
    return cell, jr.normal(ks, (D,)), jr.normal(kx, (T, 2))


WINDOWED = [
    parassm.SlidingWindow(parassm.DEER(), window=8),
    parassm.SlidingWindow(parassm.QuasiDEER(), window=8),
    parassm.SlidingWindow(parassm.ELK(), window=8),
    parassm.SlidingWindow(parassm.QuasiELK(), window=8),
    parassm.SlidingWindow(parassm.Picard(), window=8),
    parassm.SlidingWindow(parassm.Jacobi(), window=8),
    parassm.SlidingWindow(parassm.DEER(search=parassm.Backtracking()), window=8),
]


@pytest.mark.parametrize("solver", WINDOWED, ids=lambda s: type(s.solver).__name__)
def test_matches_lax_scan(solver):
    cell, s0, xs = _problem()
    sol = parassm.evaluate(cell, s0, xs=xs, solver=solver)
    assert sol.result == parassm.RESULTS.successful
    assert float(sol.stats["residual"]) <= 1
    assert int(sol.stats["num_steps"]) <= 40
    assert int(sol.stats["converged_prefix"]) == 40
    assert tree_max_abs_diff(sol.value, sequential(cell, s0, xs)) < 1e-9


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_the_whole_trajectory_error_is_estimated(dtype):
    # The estimate is made over the whole trajectory, window by window, each window's
    # error recurrence starting where the one before ended, with the exact Jacobians
    # whatever the solver's maps: at the same trajectory (which every window, and
    # DEER, accept as it is) the same estimate as DEER's over the whole trajectory,
    # whatever the window. The trajectory: the true one off by a fifth of the
    # tolerance at every step, in random directions.
    cell, s0, xs = _problem(T=200)
    cell, s0, xs = jax.tree.map(lambda a: a.astype(dtype), (cell, s0, xs))
    quasi = parassm.QuasiDEER(relinearise=0)
    truth = sequential(cell, s0, xs)
    rtol, _ = quasi.tolerances(jnp.dtype(dtype))
    size = jnp.max(jnp.abs(truth), axis=1, keepdims=True)
    S = truth + 0.2 * rtol * size * jr.uniform(jr.key(3), truth.shape, dtype, -1, 1)
    whole = parassm.evaluate(cell, s0, xs=xs, solver=parassm.DEER(), init=S)
    assert int(whole.stats["num_steps"]) == 0
    expected = float(whole.stats["error_estimate"])
    assert 0.01 < expected <= 1
    for window in (16, 48, 130):
        solver = parassm.SlidingWindow(quasi, window=window)
        sol = parassm.evaluate(cell, s0, xs=xs, solver=solver, init=S)
        assert sol.result == parassm.RESULTS.successful
        assert int(sol.stats["num_steps"]) == 0
        estimate = float(sol.stats["error_estimate"])
        assert estimate == pytest.approx(expected, rel=1e-3), (window, estimate, expected)


def test_window_progress_and_bound():
    # Window 1 is sequential evaluation: exactly one step per iteration.
    cell, s0, xs = _problem(T=15)
    sol = parassm.evaluate(cell, s0, xs=xs, solver=parassm.SlidingWindow(parassm.DEER(), window=1))
    assert int(sol.stats["num_steps"]) == 15
    assert tree_max_abs_diff(sol.value, sequential(cell, s0, xs)) < 1e-12
    # DEER on a contraction converges many steps per iteration: a window of W needs
    # about T / W windows of a few Newton steps each, far fewer than T.
    cell, s0, xs = _problem(T=40)
    sol = parassm.evaluate(cell, s0, xs=xs, solver=parassm.SlidingWindow(parassm.DEER(), window=8))
    full = parassm.evaluate(cell, s0, xs=xs, solver=parassm.DEER())
    assert int(full.stats["num_steps"]) <= int(sol.stats["num_steps"]) < 40


def test_chaotic_never_worse_than_sequential():
    # Logistic map at r = 4 (LLE = ln 2): the window still finishes within T iterations.
    system = parassm.systems.Logistic(r=4.0, dtype=jnp.float64)
    T = 60
    solver = parassm.SlidingWindow(parassm.DEER(), window=16)
    sol = parassm.evaluate(system.f, system.s0, T, solver=solver, throw=False)
    assert sol.result == parassm.RESULTS.successful
    assert int(sol.stats["num_steps"]) <= T
    assert bool(jnp.all(jnp.isfinite(sol.value)))
    # Sequential evaluation is only reproduced to the conditioning (chaos amplifies
    # the tolerance), but the residual is within tolerance everywhere.
    assert float(sol.stats["residual"]) <= 1


def test_failure_is_reported():
    cell, s0, xs = _problem(T=40)
    solver = parassm.SlidingWindow(parassm.Jacobi(), window=8)
    sol = parassm.evaluate(cell, s0, xs=xs, solver=solver, max_steps=3, throw=False)
    assert sol.result == parassm.RESULTS.max_steps_reached
    # The statistics are measured on the whole trajectory at the end.
    assert float(sol.stats["residual"]) > 1
    assert int(sol.stats["converged_prefix"]) < 40
    assert int(sol.stats["num_steps"]) == 3


def test_block_size_checked_in_window():
    # The window calls the solver's Newton loop directly; the block-size check must
    # still run (it used to live in `BlockQuasiDEER.solve`, which the window skips).
    cell, s0, xs = _problem(T=20, D=2)
    bad = parassm.SlidingWindow(parassm.BlockQuasiDEER(block_size=3), window=8)
    with pytest.raises(ValueError, match="multiple of the block size"):
        parassm.evaluate(cell, s0, xs=xs, solver=bad)
    good = parassm.SlidingWindow(parassm.BlockQuasiDEER(block_size=2), window=8)
    sol = parassm.evaluate(cell, s0, xs=xs, solver=good)
    assert sol.result == parassm.RESULTS.successful
    assert tree_max_abs_diff(sol.value, sequential(cell, s0, xs)) < 1e-9


def test_validation():
    with pytest.raises(ValueError, match="window"):
        parassm.SlidingWindow(parassm.DEER(), window=0)
    with pytest.raises(TypeError, match="parallel solver"):
        parassm.SlidingWindow(parassm.Sequential(), window=4)
