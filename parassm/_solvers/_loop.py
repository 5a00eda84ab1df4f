"""The Newton loop every parallel solver shares, as `init / step / terminate` over a
state grouped by meaning, run by one generic loop (`run`).

A parallel solver is three pieces (as in optimistix), plus its rules:

- a *linearisation*: the maps `A_t` (dense Jacobians, their diagonals, blocks, the
  identity, zero), from [`parassm.AbstractParallelSolver.linearise`][];
- a *descent* (`_descent.py`): the correction `delta` from `A_t` and the residual, for a
  given step size: the Newton-type correction `delta_t = A_t delta_{t-1} - r_t` (one
  associative scan, scaled by the step size), or a Levenberg-Marquardt correction by
  the parallel Kalman smoother (damping `1 / step size`);
- a *search* (`_search.py`): which step size to try next and whether to accept a trial
  (undamped, backtracking, trust region);
- *rules* (`_rules.py`, the solver's `rules` field): the restarts of a tail that blew
  up, stalled or crawls at rest, what the Jacobi retry keeps, when maps are reused,
  and the verified iterate kept while a tighter residual is sought; each a Module
  with documented constants, each switchable off.

One `NewtonIteration.step` at the accepted iterate `S = (s_1..s_T)`, whose values
`f(s_{t-1}, x_t)` are known, with a trial pending:

1. evaluate the pending trial (`f`, values only, or values and maps in one pass where
   maps are cheap), measure its residual (`measure`) and let the search accept it or
   not (`NewtonIteration.decide`);
2. unless the loop stops, make the next trial (`NewtonIteration.propose`): linearise at
   `S` (where `S` is new; a retry at the same `S` reuses the maps carried, or forms
   dense ones again rather than carry `T D^2` numbers; the Jacobi retry needs none),
   take the descent's correction for the search's step size, and apply the
   safeguards (`_safeguards.py`).

The guess is the first pending trial: the first step evaluates it and accepts it
(`LoopState.evaluated` is then true). The loop stops (`terminate`) as soon as the
accepted iterate meets the tolerance and so does the estimate of its error (the Newton
correction at it over the whole trajectory: see `NewtonIteration.propose`), so the
iterate returned is always the one whose residual was measured.

A step costs at most one evaluation of the values, one formation of the maps and one
descent, whatever it decides, and under `jax.vmap` too: which of them runs is decided
on scalars, and each runs once, behind one `parassm._batching.cond` (under `vmap`, for
the whole batch and only when one of its elements needs it). Where the maps are dear
(dense Jacobians by `D` JVPs per step: `AbstractParallelSolver.maps_apart`) they are
formed in a pass of their own, only at an accepted iterate that is not converged, so
that the pass that confirms convergence and a rejected trial cost one evaluation of `f`
and no Jacobian; otherwise the values and the maps of every trial come from one pass.
Where a solver takes its Jacobians unformed (`solver.tangent_maps`: DEER, and ELK whose
search never damps, on a CPU from 17 components) the maps are the previous states alone
(`_descent.Tangents`) and the descent makes its correction by one JVP per step.

Safeguards that keep the causality bound "at most T accepted iterations" in floating
point whatever the step is (not rules: they cannot be switched off):

- Steps before the first unconverged one, `p`, are frozen (`A_t = 0`, `delta_t = 0`),
  and step `p` becomes exactly `f(s_{p-1}, x_p)`: every accepted iteration converges at
  least one more step. Zeroing `A_t` also cuts products of Jacobians across the
  converged prefix, which otherwise overflow on chaotic systems.
- Non-finite entries of `A_t` are treated as zero (only the preconditioner changes; the
  residual test is untouched), and non-finite entries of a trial take the iterate's.
- A search that keeps rejecting trials is made to accept one after `max_trials` (every
  trial converges step `p`, so the bound holds).
- If `f` itself returns NaN/Inf from the converged (finite) prefix, the trajectory is
  genuinely non-finite: the loop stops with `RESULTS.nonfinite`, and the value is NaN
  from that step on.

`run` drives a `NewtonIteration` with `lax.while_loop` or a reverse-differentiable
(checkpointed) loop; `parassm.SlidingWindow` runs it on one window of the trajectory at
a time, `parassm.MultipleShooting` on the chunk ends, the diagnostics' trial with a
`History` observer, `parassm.UnrolledAdjoint` with a checkpointed loop.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Float, Int, PyTree

from .. import _batching as batching
from ._descent import exact_correction, Tangents
from ._measure import first_true, measure, merit, merit_cap, Problem
from ._rules import ReuseState
from ._safeguards import safeguarded


class Iterate(eqx.Module):
    """An iterate and what `measure` says of it: the trajectory `S`, its values
    `f(s_{t-1}, x_t)`, every step's scaled residual `err` and tolerance `tol`, bounds on
    the sizes of its steps (for the safeguards) and its converged `front`."""

    S: Float[Array, "T D"]
    fs: Float[Array, "T D"]
    err: Float[Array, " T"]
    tol: Float[Array, " T"]
    sizes: Float[Array, " T"]
    front: Int[Array, ""]

    @property
    def converged(self) -> Bool[Array, ""]:
        """Every step's residual meets its tolerance."""
        return self.front >= self.S.shape[0]

    @property
    def nonfinite(self) -> Bool[Array, ""]:
        """`f` is non-finite at the converged front: the trajectory itself is."""
        at_front = (jnp.arange(self.fs.shape[0]) == self.front)[:, None]
        return jnp.any(at_front & ~jnp.isfinite(self.fs))


class SearchProgress(eqx.Module):
    """The search's side of the loop: the step size of the pending trial, the search's
    own state, how many trials in a row were rejected, and the merit the descent's
    linear model predicts for the pending trial (for a search that compares the two,
    e.g. a trust region; `inf` otherwise)."""

    step_size: Float[Array, ""]
    state: PyTree
    rejections: Int[Array, ""]
    predicted: Float[Array, ""]


class Counts(eqx.Module):
    """Accepted steps, trials evaluated after the guess, and formations of the maps."""

    steps: Int[Array, ""]
    trials: Int[Array, ""]
    linearisations: Int[Array, ""]


class Accuracy(eqx.Module):
    """The residual tolerances' factor (one, or less after the estimate of the forward
    error asked for a tighter residual), and that estimate over its tolerance (`inf`
    until the residual first met its tolerance everywhere; `NaN`: not made)."""

    factor: Float[Array, ""]
    estimate: Float[Array, ""]

    @property
    def accurate(self) -> Bool[Array, ""]:
        """The estimated error meets the tolerance (or, `NaN`, was not estimated)."""
        return ~(self.estimate > 1)


class Verified(eqx.Module):
    """The iterate the estimate of the error verified (`KeepVerified`): the trajectory
    with the smallest estimate so far, the factor of the residual tolerances it met,
    and its estimate (`inf`: none yet). (The trajectory only: its values and residual
    are measured again where it is returned. Carrying them cost quasi-DEER 10-30% of
    its time on a GRU, H = 32, T = 1e4, CPU time, against 0-4% for the trajectory.)"""

    S: Float[Array, "T D"]
    factor: Float[Array, ""]
    estimate: Float[Array, ""]

    @property
    def exists(self) -> Bool[Array, ""]:
        return self.estimate < jnp.inf


class LoopState(eqx.Module):
    """The carry of the Newton loop.

    - `iterate`: the accepted iterate and its measurement;
    - `evaluated`: whether it has been evaluated (false only before the first step,
      while the guess is the pending trial);
    - `trial`: the pending trial;
    - `search`, `counts`, `accuracy`: see those classes;
    - `maps`: the maps at hand, where carried (cheap ones formed with the values: those
      at `S`, which a retry uses; kept ones: the last formed), else `None`;
    - `reuse`: the state of the `ReuseMaps` rule, where the solver may keep its maps;
    - `verified`: the state of the `KeepVerified` rule, where the loop keeps it
      (`NewtonIteration.final` returns it where the loop did not meet the tighter
      tolerance);
    - `done`: the loop has stopped.
    """

    iterate: Iterate
    evaluated: Bool[Array, ""]
    trial: Float[Array, "T D"]
    search: SearchProgress
    counts: Counts
    accuracy: Accuracy
    maps: PyTree
    reuse: ReuseState | None
    verified: Verified | None
    done: Bool[Array, ""]

    @property
    def S(self) -> Float[Array, "T D"]:
        return self.iterate.S

    @property
    def front(self) -> Int[Array, ""]:
        return self.iterate.front

    @property
    def nonfinite(self) -> Bool[Array, ""]:
        return self.iterate.nonfinite


class Trial(eqx.Module):
    """What a search sees of one trial: the merits and converged fronts of the accepted
    iterate and of the trial, their largest scaled residuals (`worst`), how many trials
    in a row were rejected before it, and the descent's prediction of the trial's merit."""

    merit: Float[Array, ""]
    trial_merit: Float[Array, ""]
    worst: Float[Array, ""]
    trial_worst: Float[Array, ""]
    front: Int[Array, ""]
    trial_front: Int[Array, ""]
    rejections: Int[Array, ""]
    predicted_merit: Callable[[], Float[Array, ""]] = eqx.field(static=True)


class Decision(eqx.Module):
    """What `NewtonIteration.decide` hands to `propose`: the accepted iterate, the
    evaluated trial (and its maps, where they come with the values), whether it was
    accepted, whether it was the guess, whether the next trial is the Jacobi retry, the
    merits of the old iterate and of the trial, the search's next step size and state,
    the accepted steps so far, and the index of this evaluation."""

    iterate: Iterate
    trial: Iterate
    trial_maps: PyTree
    accept: Bool[Array, ""] | bool
    first: Bool[Array, ""]
    jacobi: Bool[Array, ""]
    old_merit: Float[Array, ""]
    trial_merit: Float[Array, ""]
    step_size: Float[Array, ""]
    search_state: PyTree
    steps: Int[Array, ""]
    iteration: Int[Array, ""]


class AbstractObserver(eqx.Module):
    """Records something about every iterate of the loop (e.g. `History`)."""

    @abc.abstractmethod
    def init(self, max_steps: int, dtype) -> PyTree:
        """The empty record."""

    @abc.abstractmethod
    def update(self, record: PyTree, state: LoopState) -> PyTree:
        """The record after one more evaluation (of the guess, then of each trial)."""


class History(AbstractObserver):
    """After `k` accepted iterations, `k = 0..steps`: the converged prefix and the log of
    the largest scaled residual (`-1` and `inf` where no iteration `k` took place)."""

    steps: int = eqx.field(static=True)

    def init(self, max_steps, dtype):
        return jnp.full(self.steps + 1, -1), jnp.full(self.steps + 1, jnp.inf, dtype)

    def update(self, record, state):
        prefix, log_res = record
        k = state.counts.steps
        log_max = jnp.log(jnp.max(state.iterate.err))
        return prefix.at[k].set(state.front, mode="drop"), log_res.at[k].set(log_max, mode="drop")


def _lax_cond(pred, true_fun, false_fun, *operands, merge=True):
    return lax.cond(pred, true_fun, false_fun, *operands)


def _zeros(shapes: PyTree) -> PyTree:
    return jtu.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


def _select(pred, new, old):
    if pred is True:
        return new
    return jtu.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def min_factor(rtol: float, dtype) -> float:
    """The smallest factor of the residual tolerances: a residual of sixteen roundings
    of the trajectory's size is as small as the dtype measures one."""
    return min(1.0, 16 * float(jnp.finfo(dtype).eps) / max(rtol, 1e-300))


def error_ratio(
    delta: Float[Array, "T D"], tol: Float[Array, " T"], factor: Float[Array, ""]
) -> Float[Array, ""]:
    """The estimate of the trajectory's error, the correction `delta` of the linearised
    error recurrence `e_t = A_t e_{t-1} + f_t - s_t` over the residual's tolerances
    `tol` (times `factor`, of the residual's tolerance: against the trajectory's
    tolerance), scaled as the residual is in `measure` (an exact zero passes, also
    where the trajectory is zero so far); NaN counts as infinite."""
    size = jnp.max(jnp.abs(delta), axis=1)
    ratio = jnp.max(jnp.where(size == 0, 0, size / tol)) * factor
    return jnp.where(jnp.isnan(ratio), jnp.inf, ratio)


def tightened(
    factor: Float[Array, ""], estimate: Float[Array, ""], min_factor: float
) -> tuple[Bool[Array, ""], Float[Array, ""]]:
    """`(tighten, tighter)`: whether an estimate of the error over one asks for a
    tighter residual, and the residual tolerances' factor if so. The error scales with the
    residual, so the factor shrinks by what the estimate asks (at least halved), but
    not below the tightest tolerance the dtype measures (`min_factor`); where even that
    would not do (a chaotic system, whose error grows like its Jacobians' products),
    no tightening."""
    wanted = factor * jnp.minimum(0.5, 0.5 / estimate)
    possible = (wanted >= min_factor / 4) & (factor > 1.01 * min_factor)
    tighten = (estimate > 1) & possible
    return tighten, jnp.maximum(wanted, min_factor).astype(factor.dtype)


class NewtonIteration(eqx.Module):
    """One iteration of the Newton loop of `solver` on `problem`, for at most
    `max_steps` accepted iterations: `init`, `step`, `terminate`.

    `scale` floors the size of the trajectory in the convergence test (`measure`: a
    sliding window's later positions). `verify` (default) estimates the error of the
    trajectory before stopping; a sliding window's loop does not (a window's error is
    not the trajectory's). `batched_cond`: dear work behind `parassm._batching.cond` (a
    batch pays for it only when one of its elements needs it); a differentiated
    (checkpointed) loop takes `lax.cond`.
    """

    solver: eqx.Module
    problem: Problem
    max_steps: int = eqx.field(static=True)
    scale: Float[Array, ""] | float = 0.0
    verify: bool = eqx.field(default=True, static=True)
    batched_cond: bool = eqx.field(default=True, static=True)

    # Static facts of the solver, decided at trace time.

    @property
    def cond(self) -> Callable:
        return batching.cond if self.batched_cond else _lax_cond

    @property
    def threshold(self):
        return self.solver.reuse_threshold(self.problem.s0.shape[0], self.problem.length)

    @property
    def reuse(self) -> bool:
        """Whether maps may be kept (a traced threshold counts as yes)."""
        threshold = self.threshold
        if self.solver.rules.reuse is None:
            return False
        return not (isinstance(threshold, int | float) and threshold <= 0)

    @property
    def apart(self) -> bool:
        """Whether the maps are formed in a pass of their own (dear ones, and kept
        ones: a trial then costs only `f`)."""
        return self.solver.maps_apart or self.reuse

    @property
    def carry_maps(self) -> bool:
        """Whether the maps are carried from step to step: where cheap to keep (formed
        with the values: diagonals, blocks) or kept on purpose; dense maps formed apart
        are not (under `jax.vmap` a carried `T D^2` array costs selects of it at every
        iteration)."""
        return self.reuse or not self.apart

    @property
    def keeps_verified(self) -> bool:
        """Whether `KeepVerified` acts: where the loop estimates the error with the
        solver's own maps and they are not the Jacobians (a Hutchinson or supplied
        diagonal, blocks smaller than the state). With the exact Jacobians the trial
        after a tightening is a Newton step, and the rule never acted on the
        convergence zoo (DEER and ELK at 935917f, quasi-DEER at e9f485a: 0 of 212 rows
        changed), while carrying the verified iterate cost a batch of 8 GRUs 5-14% of its
        quasi-DEER time (H = 32, T = 2000, CPU, two runs)."""
        solver, size = self.solver, self.problem.s0.shape[0]
        exact = solver.exact_maps or solver.error_jacobians(size)
        return self.verify and solver.rules.verified is not None and not exact

    def tolerances(self, dtype) -> tuple[float, float]:
        return self.solver.tolerances(dtype)

    def min_factor(self, dtype) -> float:
        return min_factor(self.tolerances(dtype)[0], dtype)

    # The passes over the trajectory.

    def evaluate(self, S, iteration, factor):
        """`(Iterate, maps or None)` at `S`: the values, and the maps where they come
        from the same pass."""
        problem = self.problem
        if self.apart:
            fs, transition = problem.evaluate(S), None
        else:
            fs, transition = self.solver.linearise(problem, problem.previous(S), iteration)
        rtol, atol = self.tolerances(S.dtype)
        err, front, tol, sizes = measure(S, fs, factor * rtol, factor * atol, self.scale)
        return Iterate(S, fs, err, tol, sizes, front), transition

    def maps(self, S, iteration):
        """The maps at `S`. (The values `linearise` also returns are known already:
        unused, and where they are a separate computation not run.) Where the solver
        takes the Jacobians unformed (`tangent_maps`), nothing is computed here: the
        descent makes its correction by one JVP per step."""
        if self.solver.tangent_maps(S.shape[1]):
            return Tangents(self.problem, self.problem.previous(S))
        return self.solver.linearise(self.problem, self.problem.previous(S), iteration)[1]

    # init / step / terminate.

    def init(
        self,
        S0: Float[Array, "T D"],
        search: tuple[Array, PyTree] | None = None,
        factor: Float[Array, ""] | None = None,
    ) -> LoopState:
        """The state before the first step: the guess `S0` pending. `search`, a
        `(step_size, state)` pair, continues the search of an earlier loop; `factor`
        (default one) is the residual tolerances' factor to start from."""
        dtype = S0.dtype
        if search is None:
            search = self.solver.search.init(dtype)
        step_size, search_state = search
        inf = jnp.asarray(jnp.inf, dtype)
        T = S0.shape[0]
        rules = self.solver.rules
        guess = Iterate(
            S0, S0, jnp.full(T, inf), jnp.ones(T, dtype), jnp.zeros(T, dtype), jnp.array(0)
        )
        zero = jnp.array(0)
        carried = None
        if self.carry_maps:
            # (A closure, not the bound method: `filter_eval_shape` caches on the
            # function, and a bound method of this module holds the user's `f`.)
            def maps(S, iteration):
                return self.maps(S, iteration)

            carried = _zeros(eqx.filter_eval_shape(maps, S0, 0))
        return LoopState(
            iterate=guess,
            evaluated=jnp.array(False),
            trial=S0,
            search=SearchProgress(jnp.asarray(step_size, dtype), search_state, zero, inf),
            counts=Counts(zero, zero, zero),
            accuracy=Accuracy(
                jnp.ones((), dtype) if factor is None else jnp.asarray(factor, dtype), inf
            ),
            maps=carried,
            reuse=rules.reuse.init(dtype) if self.reuse else None,
            verified=Verified(S0, jnp.ones((), dtype), inf) if self.keeps_verified else None,
            done=jnp.array(False),
        )

    def terminate(self, state: LoopState) -> Bool[Array, ""]:
        return state.done

    def final(self, state: LoopState) -> LoopState:
        """The finished loop's state with the iterate it returns: the last accepted one,
        or the verified one (measured again: one evaluation of `f`) where the loop did
        not meet the tighter tolerance the estimate asked for (gave up, `max_steps`, a
        non-finite iterate) or ended with a larger estimate (`KeepVerified`)."""
        if state.verified is None:
            return state
        v, it, accuracy = state.verified, state.iterate, state.accuracy
        met = it.converged & (accuracy.accurate | ~(accuracy.estimate > v.estimate))
        back = v.exists & ~met

        def verified():
            again, _ = self.evaluate(v.S, state.counts.trials + 1, v.factor)
            return again, Accuracy(v.factor, v.estimate)

        it, accuracy = self.cond(back, verified, lambda: (it, accuracy))
        return eqx.tree_at(lambda s: (s.iterate, s.accuracy), state, (it, accuracy))

    def step(self, state: LoopState) -> LoopState:
        """Evaluate the pending trial, decide on it, and make the next one."""
        return self.propose(state, self.decide(state))

    def decide(self, state: LoopState) -> Decision:
        """Evaluate the pending trial and let the search accept it or not (the guess is
        accepted)."""
        search = self.solver.search
        dtype = state.trial.dtype
        rtol, _ = self.tolerances(dtype)
        first = ~state.evaluated
        iteration = state.counts.trials + state.evaluated.astype(int)
        old = state.iterate
        new, A = self.evaluate(state.trial, iteration, state.accuracy.factor)
        # The merits of the accepted iterate and of the trial, for the search and the
        # reuse of maps (unused ones are dropped by the compiler).
        old_merit, trial_merit = merit(old.err, rtol), merit(new.err, rtol)
        progress = state.search
        if search.may_reject:
            info = Trial(
                merit=old_merit,
                trial_merit=trial_merit,
                worst=jnp.max(old.err),
                trial_worst=jnp.max(new.err),
                front=old.front,
                trial_front=new.front,
                rejections=progress.rejections,
                predicted_merit=lambda: progress.predicted,
            )
            accept, step_size, search_state = search.update(
                progress.state, progress.step_size, info
            )
            # Every trial converges step `p`: accepting one always makes progress.
            accept = first | accept | (progress.rejections + 1 >= search.max_trials)
            step_size = jnp.where(first, progress.step_size, step_size)
            search_state = _select(first, progress.state, search_state)
        else:
            accept, step_size, search_state = True, progress.step_size, progress.state
        iterate = _select(accept, new, old)
        steps = state.counts.steps + jnp.where(first, 0, jnp.asarray(accept, int))
        # A retry with the Jacobi step (step size zero) needs no maps and no descent.
        jacobi = jnp.array(False) if accept is True else ~accept & (step_size == 0)
        return Decision(
            iterate=iterate,
            trial=new,
            trial_maps=A,
            accept=accept,
            first=first,
            jacobi=jacobi,
            old_merit=old_merit,
            trial_merit=trial_merit,
            step_size=step_size,
            search_state=search_state,
            steps=steps,
            iteration=iteration,
        )

    def propose(self, state: LoopState, d: Decision) -> LoopState:
        """Make the next trial from the accepted iterate: the maps, the descent and the
        safeguards, once each; or, once the residual meets its tolerance everywhere,
        the estimate of the trajectory's error."""
        solver, problem = self.solver, self.problem
        descent, search, rules = solver.descent, solver.search, solver.rules
        it = d.iterate
        S, fs, err, tol, front = it.S, it.fs, it.err, it.tol, it.front
        dtype = S.dtype
        T = S.shape[0]
        times = jnp.arange(T)
        rtol, _ = self.tolerances(dtype)
        accept, first, jacobi = d.accept, d.first, d.jacobi
        step_size, iteration = d.step_size, d.iteration
        cond = self.cond
        inf = jnp.asarray(jnp.inf, dtype)

        nonfinite = it.nonfinite
        stopped = it.converged | nonfinite | (d.steps >= self.max_steps)
        # The residual meets its tolerance everywhere: this step's descent is the
        # estimate of the trajectory's error (below), not a trial.
        estimating = it.converged & ~nonfinite if self.verify else jnp.array(False)

        # Whether a solver that keeps its maps keeps them (a decision on scalars).
        reused, keep = state.reuse, jnp.array(False)
        if self.reuse:
            ratio = d.trial_merit / d.old_merit
            may_keep = ~first & (state.search.rejections == 0)
            updated = rules.reuse.update(state.reuse, ratio, self.threshold, may_keep)
            keep = accept & updated.keep
            reused = _select(accept & ~stopped, updated, state.reuse)
        # Where no maps are formed (a stopped loop, a Jacobi retry) nothing else is
        # either: the maps are formed, or taken, and used in one branch (dense maps
        # handed from one conditional to the next were copied: DEER on a GRU, H = 32,
        # T = 1e4, 2.6x the time).
        # The estimate made apart from the solver's maps (`error_jacobians`) needs no
        # descent.
        apart_estimate = self.verify and solver.error_jacobians(S.shape[1])
        descends = (~stopped & ~jacobi) | (estimating & (not apart_estimate))
        # For the estimate, the Newton correction with nothing frozen.
        frozen_front = jnp.where(estimating, 0, front)
        if not self.apart:
            # From the pass of the values; a retry keeps those of `S`.
            at_hand = _select(accept, d.trial_maps, state.maps)
            formed = 1
        elif self.reuse:
            at_hand = state.maps
            formed = (descends & ~keep & ~estimating).astype(int)
        else:
            at_hand = None
            formed = descends.astype(int)

        def linearisation():
            if not self.apart:
                return at_hand
            if not self.reuse:
                return self.maps(S, iteration)
            # The estimate uses the last maps formed, as a kept step does. (The dear
            # branch first: `cond` runs its false branch for the whole batch.)
            return cond(~keep & ~estimating, lambda: self.maps(S, iteration), lambda: at_hand)

        descent_shapes = jax.eval_shape(
            lambda S: descent.prepare(self.maps(S, 0), S, jnp.array(0)), S
        )

        def descend():
            transition = linearisation()
            descent_state = descent.prepare(transition, S - fs, frozen_front)
            step = descent.step(descent_state, step_size, S, fs)
            return step, descent_state, transition if self.carry_maps else None

        def idle():
            return fs, _zeros(descent_shapes), at_hand

        step, descent_state, transition = cond(descends, descend, idle, merge=False)

        # The estimate of the error of `S`: the linearised error recurrence driven by
        # the residual, `e_t = A_t e_{t-1} + f_t - s_t`, i.e. the Newton correction at
        # `S` over the whole trajectory (one scan), against the tolerance of the
        # trajectory (the residual's, before any tightening). Where the dynamics damp
        # errors it is about the residual; along a neutral direction (the phase of a
        # limit cycle) the residuals add up, and a trajectory whose every residual
        # meets its tolerance can be far from the truth.
        estimate, factor = state.accuracy.estimate, state.accuracy.factor
        tighten = jnp.array(False)
        verified = state.verified
        if self.keeps_verified:
            # An accepted iterate after a tightening that left the verified one's
            # neighbourhood ends the loop (`KeepVerified`).
            # (The residual against the tolerance the estimate is measured against.)
            gives_up = rules.verified.gives_up(jnp.max(err) * factor, verified.estimate)
            stopped = stopped | (verified.exists & accept & ~first & ~estimating & gives_up)
        if self.verify:
            delta = descent.correction(descent_state)
            if apart_estimate:
                # Where the solver's maps are not the Jacobians, the exact Jacobians make
                # the estimate (and the Newton trial after it).
                delta = cond(estimating, lambda: exact_correction(problem, S, fs), lambda: delta)
                formed = formed + estimating.astype(int)
            ratio = error_ratio(delta, tol, factor)
            estimate = jnp.where(estimating, ratio, estimate)
            if self.keeps_verified:
                better = estimating & (ratio < verified.estimate)
                verified = Verified(
                    cond(better, lambda: S, lambda: verified.S),
                    jnp.where(better, factor, verified.factor),
                    jnp.where(better, ratio, verified.estimate),
                )
            # Too large: tighten the residual's tolerance by what the estimate asks and
            # go on from the Newton trial at `S` (the estimate is its correction).
            tighten, tighter = tightened(factor, estimate, self.min_factor(dtype))
            tighten = estimating & tighten
            factor = jnp.where(tighten, tighter, factor)
            # The residual measured against the tighter tolerance (the trajectory's size
            # `nu` as it was: the next trial is measured afresh).
            shrink = (factor / state.accuracy.factor).astype(dtype)
            err = jnp.where(tighten, err / shrink, err)
            tol = jnp.where(tighten, tol * shrink, tol)
            front = jnp.where(tighten, first_true(~(err <= 1)), front)
            step = _select(tighten, S + delta, step)
            stopped = stopped & ~tighten
        it = Iterate(S, fs, err, tol, it.sizes, front)

        # A crawl: an accepted step that kept at least half the merit; a stall: a
        # crawl that converged at most one more step (`_rules.py`). The first step
        # whose residual is blown up (counted at the merit's cap).
        blown = first_true(~(err < merit_cap(dtype, rtol)))
        moved = accept & ~first & ~tighten

        def crawl(rule):
            return moved & (d.trial_merit >= rule.merit_ratio * d.old_merit)

        stalled = False
        if rules.stall is not None:
            stalled = crawl(rules.stall) & (front <= state.iterate.front + 1)
        crawled = False
        if rules.at_rest is not None:
            crawled = crawl(rules.at_rest)

        def lowers(candidate, ratio):
            # Whether `candidate` (the trial with its tail after `front` restarted) has
            # at most `ratio` of the merit of `S` over that tail (scaled by the same
            # tolerances; NaN counts as blown up, as in `measure`).
            after = times > front
            new = jnp.max(jnp.abs(candidate - problem.evaluate(candidate)), axis=1) / tol
            new = jnp.where(jnp.isnan(new), jnp.inf, new)

            def over_tail(e):
                return merit(jnp.where(after, e, 0), rtol)

            return over_tail(new) <= ratio * over_tail(err)

        if search.may_reject:
            # The Jacobi step; with `KeepFront`, the rejected trial itself on the steps
            # right after the front where it took most of the residual off.
            jacobi_step = fs
            if rules.keep_front is not None:
                kept = d.trial.err <= rules.keep_front.cut * state.iterate.err
                cut = first_true((times >= front) & ~kept)
                jacobi_step = jnp.where((times < cut)[:, None], state.trial, fs)
            step = _select(jacobi, jacobi_step, step)
        # The safeguards, once (a crawl or a stall is an accepted step: a retry has
        # neither). A tightened iterate's trial is the estimate's whole Newton trial:
        # its prefix is not accurate enough, and its tail's correction assumes the
        # prefix's.
        guarded = jnp.where(tighten, 0, front)
        next_ = safeguarded(
            S, fs, it.sizes, step, guarded, blown, stalled, crawled, lowers, cond, rules
        )
        next_ = jnp.where(stopped, S, next_)
        predicted = inf
        if search.uses_model:
            # The merit the descent's linear model predicts for the trial.
            model = descent.model_residual(descent_state, S - fs, next_ - S)
            model_merit = merit(jnp.max(jnp.abs(model), axis=1) / tol, rtol)
            predicted = jnp.where(descends & ~estimating, model_merit, inf)

        counts = state.counts
        return LoopState(
            iterate=it,
            evaluated=jnp.array(True),
            trial=next_,
            search=SearchProgress(
                step_size,
                d.search_state,
                jnp.where(accept, 0, state.search.rejections + 1),
                predicted,
            ),
            counts=Counts(d.steps, iteration, counts.linearisations + formed),
            accuracy=Accuracy(factor, estimate),
            maps=transition,
            reuse=reused,
            verified=verified,
            done=stopped,
        )


def run(
    iteration: NewtonIteration,
    state: LoopState,
    *,
    loop: Callable = lax.while_loop,
    observer: AbstractObserver | None = None,
) -> tuple[LoopState, PyTree]:
    """Step `iteration` from `state` until it terminates; `(state, record)`, the
    observer's record (or `None`) after every step. `loop` is `lax.while_loop` or a
    reverse-differentiable (checkpointed) loop, which runs at most
    `max_steps * max_trials + 1` bodies."""

    def running(carry):
        return ~iteration.terminate(carry[0])

    def body(carry):
        state, record = carry
        state = iteration.step(state)
        if observer is not None:
            record = observer.update(record, state)
        return state, record

    record = None if observer is None else observer.init(iteration.max_steps, state.trial.dtype)
    return loop(running, body, (state, record))


def newton_loop(
    solver,
    problem: Problem,
    S0: Float[Array, "T D"],
    max_steps: int,
    *,
    search_state: tuple[Array, PyTree] | None = None,
    scale: Float[Array, ""] | float = 0.0,
    loop: Callable = lax.while_loop,
    observer: AbstractObserver | None = None,
    verify: bool = True,
    factor: Float[Array, ""] | None = None,
) -> tuple[LoopState, PyTree]:
    """The Newton loop of `solver` on `problem` from the guess `S0`, for at most
    `max_steps` accepted iterations: `run` of a `NewtonIteration`, then its `final`.
    Returns the final `LoopState` and the observer's record (or `None`)."""
    iteration = NewtonIteration(
        solver,
        problem,
        max_steps,
        scale=scale,
        verify=verify,
        batched_cond=loop is lax.while_loop,
    )
    state = iteration.init(S0, search_state, factor)
    state, record = run(iteration, state, loop=loop, observer=observer)
    return iteration.final(state), record
