import equinox as eqx

from .._problem import flatten, unravel_trajectory
from ._base import AbstractSolver
from ._parallel import AbstractParallelSolver


class SlidingWindow(AbstractSolver):
    """Run a parallel solver on a sliding window of `window` steps at a time.

    Each iteration makes one step of `solver` on the `window` steps that start at the
    first unconverged step (the state just before them is converged, so it serves as
    their initial state), then moves the window to the new first unconverged step.
    Every iteration converges at least one more step, so the evaluation takes at most
    `T` iterations (never deeper than sequential evaluation), and Jacobians, scans and
    smoothers only ever hold `window` steps: `O(window D^2)` memory for
    [`parassm.DEER`][] / [`parassm.ELK`][] instead of `O(T D^2)`.

    On unpredictable (chaotic) systems, iterating far ahead of the converged prefix is
    wasted work; a window of a few times the number of steps the solver converges per
    iteration bounds that waste.

    **Arguments:**

    - `solver`: any parallel solver ([`parassm.DEER`][], [`parassm.QuasiDEER`][],
        [`parassm.ELK`][], [`parassm.Picard`][], ...).
    - `window`: the window length `W >= 1` (clipped to `T`).

    `Solution.stats["residual"]` covers every step measured so far: on failure the steps
    after the last window were never measured and it reads `inf`.
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
        flat = flatten(f, s0)
        states, result, stats = self.solver.solve_flat(
            flat, xs, length, init, max_steps, window=self.window
        )
        return unravel_trajectory(flat, states), result, stats
