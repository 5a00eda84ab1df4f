import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._problem import flatten, unravel_trajectory
from ._base import AbstractSolver
from ._parallel import (
    AbstractParallelSolver,
    Counts,
    finish_measured,
    flat_initial_guess,
    newton_loop,
    Problem,
    SearchProgress,
)


class SlidingWindow(AbstractSolver):
    """Run a parallel solver on a sliding window of `window` steps at a time.

    Each iteration makes one (accepted) step of `solver` on the `window` steps that
    start at the first unconverged step (the state just before them is converged, so
    it serves as their initial state), then moves the window to the new first
    unconverged step. Every iteration converges at least one more step, so the
    evaluation takes at most `T` iterations (never deeper than sequential evaluation),
    and Jacobians, scans and smoothers only ever hold `window` steps: `O(window D^2)`
    memory for [`parassm.DEER`][] / [`parassm.ELK`][] instead of `O(T D^2)`. The
    solver's search (e.g. ELK's damping) carries on from one window to the next.

    On unpredictable (chaotic) systems, iterating far ahead of the converged prefix is
    wasted work; a window of a few times the number of steps the solver converges per
    iteration bounds that waste.

    **Arguments:**

    - `solver`: any parallel solver ([`parassm.DEER`][], [`parassm.QuasiDEER`][],
        [`parassm.ELK`][], [`parassm.Picard`][], ...).
    - `window`: the window length `W >= 1`. A window of at least `T` steps is `solver`
        itself.

    `Solution.stats` are measured on the whole trajectory at the end (one more
    vectorised evaluation of `f`).
    """

    solver: AbstractParallelSolver
    window: int = eqx.field(static=True)

    def __check_init__(self):
        if not isinstance(self.solver, AbstractParallelSolver):
            raise TypeError(
                "`SlidingWindow` needs a parallel solver (e.g. `parassm.DEER()`), got "
                f"{type(self.solver).__name__}."
            )
        if self.window < 1:
            raise ValueError(f"`window` must be at least 1, got {self.window}.")

    def solve(self, f, s0, xs, length, init, max_steps):
        if self.window >= length:
            return self.solver.solve(f, s0, xs, length, init, max_steps)
        solver = self.solver
        flat = flatten(f, s0)
        solver.check(flat)
        T, W = length, self.window
        max_steps = T if max_steps is None else max_steps
        S0 = flat_initial_guess(flat, init, T)
        times = jnp.arange(T)

        def window_problem(S, w0):
            s_before = jnp.where(w0 > 0, S[jnp.maximum(w0 - 1, 0)], flat.s0)
            xs_w = jtu.tree_map(lambda x: lax.dynamic_slice_in_dim(x, w0, W), xs)
            return Problem(flat.fn, flat.unravel, xs_w, s_before, W)

        def cond(carry):
            _, front, num_steps, _, _, _, nonfinite = carry
            return (front < T) & ~nonfinite & (num_steps < max_steps)

        def body(carry):
            S, front, num_steps, num_trials, num_maps, search, _ = carry
            w0 = jnp.minimum(front, T - W)
            # The size of the converged trajectory before the window, for the
            # convergence test (as if the whole trajectory were measured).
            before = (times < w0)[:, None]
            scale = jnp.max(jnp.where(before, jnp.abs(S), jnp.zeros((), S.dtype)))
            state, _ = newton_loop(
                solver,
                window_problem(S, w0),
                lax.dynamic_slice_in_dim(S, w0, W),
                1,
                search_state=search,
                scale=scale,
                # A window is part of the trajectory: its error is not the whole's.
                verify=False,
            )
            S = lax.dynamic_update_slice_in_dim(S, state.S, w0, axis=0)
            return (
                S,
                w0 + state.front,
                num_steps + state.counts.steps,
                num_trials + state.counts.trials,
                num_maps + state.counts.linearisations,
                (state.search.step_size, state.search.state),
                state.nonfinite,
            )

        zero = jnp.array(0)
        search = solver.search.init(S0.dtype)
        search = (jnp.asarray(search[0], S0.dtype), search[1])
        carry = (S0, zero, zero, zero, zero, search, jnp.array(False))
        S, _, num_steps, num_trials, num_maps, search, _ = lax.while_loop(cond, body, carry)
        # The whole trajectory measured once more: the result and the statistics.
        S, result, stats = finish_measured(
            solver,
            Problem(flat.fn, flat.unravel, xs, flat.s0, T),
            S,
            max_steps,
            counts=Counts(num_steps, num_trials, num_maps),
            search=SearchProgress(search[0], search[1], zero, jnp.asarray(jnp.inf, S.dtype)),
        )
        return unravel_trajectory(flat, S), result, stats
