import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from .. import _batching as batching
from .._problem import flatten, unravel_trajectory
from ._base import AbstractSolver
from ._descent import correction_in_windows
from ._loop import error_ratio, min_factor, tightened
from ._measure import measure
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

    `Solution.stats` are measured on the whole trajectory at the end. Once its
    residual meets the tolerance, the error of the whole trajectory is estimated as
    the Newton loop does (`stats["error_estimate"]`),
    window by window, with the exact Jacobians of `window` steps at a time (one more
    pass of `D` JVPs and scans over `T`); too large, the windows slide again with a
    tighter residual tolerance, and where the dtype cannot measure a tolerance tight
    enough the result is `RESULTS.inaccurate`.
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
        dtype = S0.dtype
        times = jnp.arange(T)
        whole = Problem(flat.fn, flat.unravel, xs, flat.s0, T)
        rtol, atol = solver.tolerances(dtype)
        floor = min_factor(rtol, dtype)
        keeps = solver.rules.verified is not None
        inf = jnp.asarray(jnp.inf, dtype)

        def window_problem(S, w0):
            s_before = jnp.where(w0 > 0, S[jnp.maximum(w0 - 1, 0)], flat.s0)
            xs_w = jtu.tree_map(lambda x: lax.dynamic_slice_in_dim(x, w0, W), xs)
            return Problem(flat.fn, flat.unravel, xs_w, s_before, W)

        def windows(S, factor, counts, search):
            """Slide the window from the first unconverged step to the end, with the
            residual tolerances times `factor`."""

            def cond(carry):
                _, front, counts, _, nonfinite = carry
                return (front < T) & ~nonfinite & (counts.steps < max_steps)

            def body(carry):
                S, front, counts, search, _ = carry
                w0 = jnp.minimum(front, T - W)
                # The size of the converged trajectory before the window, for the
                # convergence test (as if the whole trajectory were measured).
                before = (times < w0)[:, None]
                scale = jnp.max(jnp.where(before, jnp.abs(S), jnp.zeros((), dtype)))
                state, _ = newton_loop(
                    solver,
                    window_problem(S, w0),
                    lax.dynamic_slice_in_dim(S, w0, W),
                    1,
                    search_state=search,
                    scale=scale,
                    # A window is part of the trajectory: its error is not the
                    # whole's (estimated below, window by window).
                    verify=False,
                    factor=factor,
                )
                S = lax.dynamic_update_slice_in_dim(S, state.S, w0, axis=0)
                return (
                    S,
                    w0 + state.front,
                    Counts(
                        counts.steps + state.counts.steps,
                        counts.trials + state.counts.trials,
                        counts.linearisations + state.counts.linearisations,
                    ),
                    (state.search.step_size, state.search.state),
                    state.nonfinite,
                )

            carry = (S, jnp.array(0), counts, search, jnp.array(False))
            S, _, counts, search, _ = lax.while_loop(cond, body, carry)
            return S, counts, search

        def rounds(carry):
            """Slide the windows, then estimate the error of the whole trajectory
            (where its residual meets the tolerance); too large, tighten the residual's
            tolerance (as the Newton loop does) and slide them again."""
            S, _, factor, _, verified, counts, search, _ = carry
            S, counts, search = windows(S, factor, counts, search)
            fs = whole.evaluate(S)
            _, front, tol, _ = measure(S, fs, factor * rtol, factor * atol)
            converged = front >= T
            estimate = batching.cond(
                converged,
                lambda: _estimate(solver, whole, S, fs, tol, factor, W),
                lambda: inf,
            )
            passes = -(-T // W)
            counts = Counts(
                counts.steps,
                counts.trials,
                counts.linearisations + jnp.where(converged, passes, 0),
            )
            better = converged & (estimate < verified[-1])
            verified = tuple(
                jnp.where(better, new, old) for new, old in zip((S, fs, factor, estimate), verified)
            )
            tighten, tighter = tightened(factor, estimate, floor)
            again = converged & tighten & (counts.steps < max_steps)
            factor = jnp.where(again, tighter, factor)
            return S, fs, factor, estimate, verified, counts, search, again

        zero = jnp.array(0)
        search = solver.search.init(dtype)
        search = (jnp.asarray(search[0], dtype), search[1])
        one = jnp.ones((), dtype)
        # (The values `fs` at `S` come out of the last round: `finish_measured` needs
        # no evaluation of its own.)
        verified = (S0, S0, one, inf)
        carry = (S0, S0, one, inf, verified, Counts(zero, zero, zero), search, jnp.array(True))
        S, fs, factor, estimate, verified, counts, search, _ = lax.while_loop(
            lambda carry: carry[-1], rounds, carry
        )
        if keeps:
            # A round that did not meet the tighter tolerance returns the trajectory
            # verified before it, as the Newton loop does (`KeepVerified`).
            back = (verified[-1] < inf) & ~(estimate <= 1)
            S, fs, factor, estimate = (
                jnp.where(back, old, new) for new, old in zip((S, fs, factor, estimate), verified)
            )
        # The whole trajectory measured once more: the result and the statistics.
        S, result, stats = finish_measured(
            solver,
            whole,
            S,
            max_steps,
            counts=counts,
            search=SearchProgress(search[0], search[1], zero, inf),
            fs=fs,
            estimate=estimate,
            factor=factor,
        )
        return unravel_trajectory(flat, S), result, stats


def _estimate(solver, whole: Problem, S, fs, tol, factor, W: int):
    """The estimate of the error of the whole trajectory `S` (the Newton loop's:
    `error_ratio` of the linearised error recurrence `e_t = J_t e_{t-1} + f_t - s_t`),
    window by window (`correction_in_windows`, `W` steps at a time).

    With the exact Jacobians whatever the solver's maps (a solver whose maps are
    the Jacobians uses its own): a diagonal sees the coupling of the components only
    through its entries, and on an oscillator the error's drift is in that coupling
    (seen: FitzHugh-Nagumo, float64, a quasi-DEER window's diagonal estimate passed a
    trajectory 80x the tolerance off). One pass of `D` JVPs over the sequence, once."""
    maps = None
    if solver.exact_maps:

        def maps(problem, s_prev):
            return solver.linearise(problem, s_prev, jnp.array(0))[1]

    errors = correction_in_windows(whole, S, fs, window=W, maps=maps)
    return error_ratio(errors, tol, factor)
