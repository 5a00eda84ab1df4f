"""The parallel solvers' base classes and how a solve ends.

A parallel solver ([`parassm.AbstractParallelSolver`][]) chooses the maps `A_t` of the
linear recurrence each Newton step solves (`linearise`), how a correction is made from
them (`descent`) and taken (`search`), and the rules of its loop (`rules`). The loop
itself is `_loop.py`; what it measures, `_measure.py`; its safeguards,
`_safeguards.py`; its rules, `_rules.py`.
"""

import abc
from collections.abc import Callable
from typing import ClassVar

import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox import AbstractVar
from jaxtyping import Array, Float, PyTree

from .. import _linear as linear
from .._problem import Flat, flatten, unravel_trajectory
from .._solution import RESULTS
from ._base import AbstractSolver, check_tolerances, default_tolerance
from ._descent import AbstractDescent, LevenbergMarquardtDescent, NewtonDescent
from ._loop import (
    AbstractObserver as AbstractObserver,
    Accuracy as Accuracy,
    Counts as Counts,
    History as History,
    Iterate as Iterate,
    LoopState as LoopState,
    newton_loop as newton_loop,
    SearchProgress as SearchProgress,
    Trial as Trial,
)
from ._measure import (
    measure as measure,
    Problem as Problem,
)
from ._rules import Rules
from ._safeguards import safeguarded as safeguarded
from ._search import AbstractSearch, Backtracking, FixedDamping, TrustRegion, Undamped


# Kept maps pay where forming them is a large pass: they save its cost at every kept
# step, and cost a pass of values of their own at every step that forms new ones
# (maps kept are formed apart from the values) plus the loop's bookkeeping. Measured
# on a 2-core CPU (GRU, exact diagonal, `bench/peers.py`): 0.71-0.84x the time of
# forming them at every iterate for `T = 1e4` and `D >= 32`, but 1.04-1.28x for
# `T = 1e3`, and level at `D = 8`, `T = 1e4`; and in one dimension (the logistic map)
# up to 2 more steps. By default they are kept only where `T` times the evaluations
# of `f` a linearisation costs reaches this.
REUSE_MIN_WORK = 2**17


def default_reuse_threshold(relinearise: float | None, evaluations: float, length: int) -> float:
    """The threshold of a solver's `relinearise` argument: as given, or by default 0.25
    where the maps of `length` steps cost at least `REUSE_MIN_WORK` evaluations of `f`
    (`evaluations` per step), else 0."""
    if relinearise is not None:
        return relinearise
    return 0.25 if length * evaluations >= REUSE_MIN_WORK else 0.0


class AbstractParallelSolver(AbstractSolver):
    """A solver that iterates `s^{new}_t = A_t s^{new}_{t-1} + b_t` to convergence.

    Subclasses choose `A_t` by implementing `linearise`, and how a correction is made
    and taken by their `descent` and `search`.
    """

    rtol: AbstractVar[float | None]
    atol: AbstractVar[float | None]
    search: AbstractVar[AbstractSearch]
    rules: AbstractVar[Rules]

    @property
    @abc.abstractmethod
    def descent(self) -> AbstractDescent:
        """How the correction is computed from `A_t` and a step size."""

    @abc.abstractmethod
    def linearise(
        self, problem: Problem, s_prev: Float[Array, "T D"], iteration: Array
    ) -> tuple[Float[Array, "T D"], linear.AbstractTransition]:
        """`(f(s_{t-1}, x_t), A_t)` for every step, at the previous states `s_prev`: the
        values and the maps, in one pass where possible. `iteration` counts the
        evaluations (e.g. for fresh random probes)."""

    # Whether the loop forms the maps in a pass of their own, only at an accepted
    # iterate that is not converged (`True`), or with the values of every trial in one
    # pass (`False`). Apart costs one more evaluation of `f` per iteration and saves the
    # maps of the pass that confirms convergence and of rejected trials: worth it when
    # the maps cost many evaluations of `f` and few iterations are expected (dense
    # Jacobians by JVPs: measured on a GRU with `H = 32`, `T = 1e4`, one pass of values
    # costs 0.9 ms, of values and dense Jacobians 31 ms, of values and exact diagonals
    # 4.9 ms).
    maps_apart: ClassVar[bool] = False

    # Whether the maps are the exact Jacobians (DEER, ELK).
    exact_maps: ClassVar[bool] = False

    def error_jacobians(self, size: int) -> bool:
        """Whether the estimate of the trajectory's error takes the exact Jacobians
        apart from the solver's maps (`_descent.exact_correction`: one pass of `D`
        JVPs and a dense linear solve, window by window, or on a CPU from
        `SEQUENTIAL_FROM` components one JVP per step), each time the residual meets
        its tolerance, in place of the descent at that iterate: the default where the
        solver's maps are not the Jacobians. (Solvers that form dense Jacobians by
        JVPs take it where it is the one JVP per step: cheaper than their own pass
        of Jacobians and a dense scan.)

        Why: diagonals (or blocks, or Jacobi's zeros and Picard's identity) see the
        coupling of the components only through their own entries, and on an
        oscillator the error's drift is in that coupling. Measured at the iterate
        where quasi-DEER's residual first meets its tolerance (`T = 1000` or `1500`,
        against a float64 `lax.scan`; errors in tolerances, true / diagonal estimate /
        exact estimate): Van der Pol float32 638 / 15 / 640, FitzHugh-Nagumo float64
        1050 / 8640 / 1050, Henon (a = 0.2) float32 3.4 / 1.3 / 3.4, a damped
        pendulum float32 4.3 / 4.7 / 4.3, Duffing float32 58 / 14 / 58. (Refining the
        diagonal estimate by fixed-point sweeps with one JVP each diverged on the
        oscillators.) A solver whose maps cost fewer than `D` JVPs per step at state
        size `size` (a Hutchinson or a supplied diagonal) estimates with its own
        maps."""
        return not self.exact_maps

    def tangent_maps(self, size: int) -> bool:
        """Whether the loop's Newton corrections take the exact Jacobians unformed, as
        one JVP per step (`_descent.Tangents`), at state size `size`: no by default;
        [`parassm.DEER`][] where its estimate does (`tangent_estimate`)."""
        return False

    def reuse_threshold(self, size: int, length: int) -> float:
        """When the loop keeps the maps rather than forming new ones, at state size
        `size` and `length` steps (see `ReuseMaps`): after a step whose merit ratio is at
        most this. Zero (the default) forms them at every iterate; solvers whose maps
        cost JVPs take a `relinearise` argument."""
        return 0.0

    def tolerances(self, dtype) -> tuple[float, float]:
        """`(rtol, atol)`: the defaults are `eps ** 0.7` of the dtype and zero."""
        rtol = default_tolerance(dtype) if self.rtol is None else self.rtol
        atol = 0.0 if self.atol is None else self.atol
        return rtol, atol

    def check(self, flat: Flat) -> None:
        """Trace-time checks of the problem (e.g. block sizes); nothing by default."""

    def solve(self, f, s0, xs, length, init, max_steps):
        flat = flatten(f, s0)
        states, result, stats = solve_flat(self, flat, xs, length, init, max_steps)
        return unravel_trajectory(flat, states), result, stats


def flat_initial_guess(flat: Flat, init: PyTree | None, length: int) -> Array:
    """The initial trajectory guess as a `(T, D)` array. By default `s0` repeated;
    non-finite steps of a user guess are replaced by `s0`."""
    if init is None:
        return jnp.broadcast_to(flat.s0, (length, flat.size))
    leaves = jtu.tree_leaves(init)
    guess = jnp.concatenate([x.reshape(length, -1) for x in leaves], axis=1)
    guess = guess.astype(flat.s0.dtype)
    finite = jnp.isfinite(guess).all(axis=1, keepdims=True)
    return jnp.where(finite, guess, flat.s0)


def solve_flat(
    solver: AbstractParallelSolver,
    flat: Flat,
    xs: PyTree | None,
    length: int,
    init: PyTree | None,
    max_steps: int | None,
    *,
    loop: Callable = lax.while_loop,
    observer: AbstractObserver | None = None,
) -> tuple[Float[Array, "T D"], RESULTS, dict[str, Array]]:
    """Solve the flat recurrence with the Newton loop; `(states, result, stats)`.
    `stats` gains `record`, the observer's record, when an observer is given."""
    solver.check(flat)
    max_steps = length if max_steps is None else max_steps
    problem = Problem(flat.fn, flat.unravel, xs, flat.s0, length)
    S0 = flat_initial_guess(flat, init, length)
    state, record = newton_loop(solver, problem, S0, max_steps, loop=loop, observer=observer)
    S, result, stats = finish(solver, state, max_steps)
    if observer is not None:
        stats["record"] = record
    return S, result, stats


def finish(
    solver: AbstractParallelSolver, state: LoopState, max_steps: int
) -> tuple[Float[Array, "T D"], RESULTS, dict[str, Array]]:
    """The result code, the trajectory (NaN from a genuinely non-finite step on) and the
    statistics of a finished loop."""
    it, accuracy = state.iterate, state.accuracy
    nonfinite = it.nonfinite
    result = RESULTS.where(
        it.converged,
        RESULTS.where(accuracy.accurate, RESULTS.successful, RESULTS.inaccurate),
        RESULTS.where(nonfinite, RESULTS.nonfinite, RESULTS.max_steps_reached),
    )
    T = it.S.shape[0]
    # A genuinely non-finite trajectory is reported as such, never hidden.
    after = (jnp.arange(T) >= it.front)[:, None]
    S = jnp.where(nonfinite & after, jnp.nan, it.S)
    stats = dict(
        num_steps=state.counts.steps,
        max_steps=jnp.array(max_steps),
        residual=jnp.max(it.err),
        max_abs_residual=jnp.max(jnp.abs(it.S - it.fs)),
        converged_prefix=it.front,
        error_estimate=accuracy.estimate,
        tolerance_factor=accuracy.factor,
        num_linearisations=state.counts.linearisations,
        **solver.search.stats(state.search.state, state.search.step_size, state.counts.trials),
    )
    return S, result, stats


def finish_measured(
    solver: AbstractParallelSolver,
    problem: Problem,
    S: Float[Array, "T D"],
    max_steps: int,
    *,
    counts: Counts,
    search: SearchProgress,
    fs: Float[Array, "T D"] | None = None,
    estimate: Float[Array, ""] | None = None,
    factor: Float[Array, ""] | None = None,
) -> tuple[Float[Array, "T D"], RESULTS, dict[str, Array]]:
    """`finish` for a trajectory `S` of the whole `problem` put together outside one
    Newton loop (a sliding window, multiple shooting): measured once more, so that its
    result and statistics are those of the whole trajectory. `fs`, the values
    `f(s_{t-1}, x_t)` at `S`, where the caller has them; else one vectorised
    evaluation of `f`. The counts and the search are the caller's; `estimate`, the
    caller's estimate of the error (else `NaN`: not made) and `factor`, the residual
    tolerances' factor it was made at (default one)."""
    if fs is None:
        fs = problem.evaluate(S)
    factor = jnp.ones((), S.dtype) if factor is None else jnp.asarray(factor, S.dtype)
    rtol, atol = solver.tolerances(S.dtype)
    err, front, tol, sizes = measure(S, fs, factor * rtol, factor * atol)
    final = LoopState(
        iterate=Iterate(S, fs, err, tol, sizes, front),
        evaluated=jnp.array(True),
        trial=S,
        search=search,
        counts=counts,
        # Without the caller's estimate, the residual's test alone (`NaN`: not made).
        accuracy=Accuracy(factor, jnp.asarray(jnp.nan if estimate is None else estimate, S.dtype)),
        maps=None,
        reuse=None,
        verified=None,
        done=jnp.array(True),
    )
    return finish(solver, final, max_steps)


def _check_relinearise(solver) -> None:
    value = getattr(solver, "relinearise", None)
    if isinstance(value, int | float) and not value >= 0:
        raise ValueError(
            f"{type(solver).__name__}(relinearise=...) must be >= 0 (0 forms new maps at "
            f"every iterate); got {value}."
        )


def _check_search(solver, allowed: tuple[type, ...]) -> None:
    if not isinstance(solver.search, allowed):
        names = ", ".join(f"`parassm.{c.__name__}()`" for c in allowed)
        raise TypeError(
            f"{type(solver).__name__} takes `search=` one of {names}; got "
            f"{type(solver.search).__name__}."
        )


class AbstractNewtonSolver(AbstractParallelSolver):
    """A parallel solver whose correction is the (quasi-)Newton one, one associative
    scan per linearisation ([`parassm.DEER`][], [`parassm.QuasiDEER`][],
    [`parassm.BlockQuasiDEER`][], [`parassm.Picard`][], [`parassm.Jacobi`][]). Takes an
    `Undamped` or `Backtracking` search."""

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol)
        _check_relinearise(self)
        _check_search(self, (Undamped, Backtracking))

    @property
    def descent(self) -> AbstractDescent:
        return NewtonDescent()


class AbstractLevenbergMarquardtSolver(AbstractParallelSolver):
    """A parallel solver whose correction is a Levenberg-Marquardt step by the parallel
    Kalman smoother ([`parassm.ELK`][], [`parassm.QuasiELK`][]). Takes a
    `TrustRegion`, `FixedDamping` or `Backtracking` search."""

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol)
        _check_relinearise(self)
        _check_search(self, (TrustRegion, FixedDamping, Backtracking))

    @property
    def descent(self) -> AbstractDescent:
        return LevenbergMarquardtDescent(damped=self.search.may_damp)
