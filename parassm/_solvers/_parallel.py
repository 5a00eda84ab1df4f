"""The Newton loop every parallel solver shares.

A parallel solver is three pieces (as in optimistix):

- a *linearisation*: the maps `A_t` (dense Jacobians, their diagonals, blocks, the
  identity, zero), from [`parassm.AbstractParallelSolver.linearise`][];
- a *descent* (`_descent.py`): the correction `delta` from `A_t` and the residual, for a
  given step size: the Newton-type correction `delta_t = A_t delta_{t-1} - r_t` (one
  associative scan, scaled by the step size), or a Levenberg-Marquardt correction by
  the parallel Kalman smoother (damping `1 / step size`);
- a *search* (`_search.py`): which step size to try next and whether to accept a trial
  (undamped, backtracking, trust region).

One iteration of the loop at the accepted iterate `S = (s_1..s_T)`, whose values
`f(s_{t-1}, x_t)` are known:

1. linearise at `S` (when `S` is new; after a rejected trial the next one is made at the
   same `S`: the Jacobi step needs no maps, a solver with cheap maps reuses those of
   `S`, which the loop carries, and DEER and ELK form theirs again rather than carry
   `T D^2` numbers from iteration to iteration);
2. make the correction for the current step size and the trial `S + delta`;
3. evaluate `f` at the trial (values only), measure its residual (`measure`) and let
   the search accept it or not.

The loop stops as soon as the accepted iterate meets the tolerance and so does the
estimate of its error (the Newton correction at it over the whole trajectory: see
`newton_loop`), so the iterate returned is always the one whose residual was measured.
Every conditional on traced values that guards a pass over the trajectory is
`parassm._batching.cond`: under `jax.vmap` a batch runs it only when one of its elements
needs it. Where the maps are dear (dense
Jacobians by `D` JVPs per step: `AbstractParallelSolver.maps_apart`) they are formed in
a pass of their own, only at an accepted iterate that is not converged, so that the
pass that confirms convergence and a trial the search rejects cost one evaluation of
`f` and no Jacobian; otherwise the values and the maps of every trial come from one
pass, and only the confirming pass's maps go unused.

Solvers whose maps are cheap to keep but dear to form (diagonals and blocks by `D` JVPs
per step: `AbstractParallelSolver.reuse_threshold > 0`) reuse them: at an accepted iterate
reached by a fast step (its merit below the threshold times the previous one's, no
trial rejected on the way) the last maps are kept, and the iteration costs one
evaluation of `f` and one scan (a chord step). A slow step, a rejection or the first
iterate forms new ones. Their maps are then formed apart from the values, as above.

Safeguards, which keep the causality bound "at most T accepted iterations" in floating
point whatever the step is:

- Steps before the first unconverged one, `p`, are frozen (`A_t = 0`, `delta_t = 0`), and
  step `p` becomes exactly `f(s_{p-1}, x_p)`: every accepted iteration converges at least
  one more step. Zeroing `A_t` also cuts products of Jacobians across the converged
  prefix, which otherwise overflow on chaotic systems.
- Non-finite entries of `A_t` are treated as zero (only the preconditioner changes; the
  residual test is untouched).
- A blown-up tail restarts (`safeguarded`): from the first step where the accepted
  iterate's residual reaches the merit's cap, or where the trial is non-finite
  (overflow in the scan) or larger than `1 / sqrt(eps)` times the sane steps, the trial
  repeats its last sane step, or the converged prefix in phase where it is periodic.
  A stalled loop (the front advanced one step, the merit barely moved) restarts a
  tail that is off a periodic prefix's extension the same way. The step at `p` is `f`
  there, so progress continues.
- A search that keeps rejecting trials is made to accept one after `max_trials` (every
  trial converges step `p`, so the bound holds).
- If `f` itself returns NaN/Inf from the converged (finite) prefix, the trajectory is
  genuinely non-finite: the loop stops with `RESULTS.nonfinite`, and the value is NaN
  from that step on.

The loop (`newton_loop`) runs on a `Problem`: a flat recurrence, its inputs and the state
before its first step. `parassm.SlidingWindow` runs it on one window of the trajectory at
a time; the diagnostics' trial records its progress with a `History` observer;
`parassm.UnrolledAdjoint` runs it with a checkpointed loop.
"""

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox import AbstractVar
from jaxtyping import Array, Bool, Float, Int, PyTree

from .. import _batching as batching, _linear as linear
from .._linear._scan_impl import associative_scan
from .._linear._shift import shift
from .._problem import Flat, flatten, unravel_trajectory
from .._solution import RESULTS
from . import _jacobian as jacobian
from ._base import AbstractSolver, check_tolerances, default_tolerance
from ._descent import AbstractDescent, LevenbergMarquardtDescent, NewtonDescent
from ._search import AbstractSearch, Backtracking, FixedDamping, TrustRegion, Undamped


class Problem(eqx.Module):
    """The recurrence the loop iterates on: `fn(s, x)` on flat states, its inputs, and
    the state before the first step (`s0`, or the converged state before a window)."""

    fn: Callable = eqx.field(static=True)
    unravel: Callable = eqx.field(static=True)
    xs: PyTree | None
    s0: Float[Array, " D"]
    length: int = eqx.field(static=True)

    def previous(self, S: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """`(s_0, s_1, ..., s_{T-1})`: the state before every step."""
        return shift(S, self.s0)

    def evaluate(self, S: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """`f(s_{t-1}, x_t)` for every step."""
        return jacobian.over_time(self.fn, self.xs)(self.previous(S))


def first_true(mask: Bool[Array, " T"]) -> Int[Array, ""]:
    """The first index where `mask` holds (`T` if none). A masked `min`, not `argmax`:
    with time split over devices it is one scalar all-reduce."""
    T = mask.shape[0]
    return jnp.min(jnp.where(mask, jnp.arange(T), T))


def measure(
    S: Float[Array, "T D"],
    fs: Float[Array, "T D"],
    rtol: float,
    atol: float,
    scale: Float[Array, ""] | float = 0.0,
) -> tuple[Float[Array, " T"], Int[Array, ""], Float[Array, " T"], Float[Array, " T"]]:
    """The loop's convergence test: `(err, p, tol, sizes)`, the scaled residual of every
    step, the first step with `err > 1` (`T` if none), every step's tolerance, and a
    bound on the size of every step, `|f_t|_inf + |r_t|_inf >= max(|s_t|_inf,
    |f_t|_inf)` (for the safeguards; from the same reductions).

    Step `t` is converged when

        |s_t - f(s_{t-1}, x_t)|_inf <= atol + rtol * nu_t,

    where `nu_t`, the size of the trajectory up to step `t`, is the largest
    `|f(s_{t'-1}, x_t')|_inf` over the steps `t' <= t` that meet the test relative to
    their own size (`|r_t'| <= atol + rtol |f_t'|`), and at least `scale` (the size of
    the trajectory before a window).

    The test is invariant to the scale of the state: multiply the trajectory by `c` and
    every quantity is multiplied by `c` (`atol` defaults to zero). Measuring a step
    against the size of the trajectory so far rather than its own size alone lets steps
    that decay towards zero converge to the accuracy of the trajectory around them
    (relative accuracy at 1e-30 of the trajectory's size cannot be had in floating
    point). Only steps that are themselves accurate count towards `nu_t`, and only
    earlier ones: a wild iterate after the converged front cannot loosen the test of the
    front.

    NaN or Inf anywhere in a step makes it unconverged (`err = inf`).
    """
    r_norm = jnp.max(jnp.abs(S - fs), axis=1)
    f_norm = jnp.max(jnp.abs(fs), axis=1)
    zero = jnp.zeros((), f_norm.dtype)
    # NaN compares False: a non-finite step never passes, nor counts towards `nu`.
    accurate = r_norm <= atol + rtol * f_norm
    nu = associative_scan(jnp.maximum, jnp.where(accurate, f_norm, zero))
    tol = atol + rtol * jnp.maximum(jnp.maximum(f_norm, nu), scale)
    err = jnp.where(r_norm == 0, zero, r_norm / tol)
    err = jnp.where(jnp.isnan(err), jnp.inf, err)
    return err, first_true(~(err <= 1)), tol, f_norm + r_norm


# Scaled residuals above `MERIT_CAP / rtol` count as that much in the merit: a blown-up
# or non-finite trial has a finite merit, comparable with another blown-up one. Relative
# to `1 / rtol`, because a scaled residual is a residual over `rtol` times the size of
# the trajectory: a poor guess has scaled residuals of order `1 / rtol` (about 1e11 in
# float64), and a cap below that would make every such iterate look alike.
MERIT_CAP = 1e10


def merit_cap(dtype, rtol: float) -> float:
    """`MERIT_CAP / rtol`, and no more than the dtype can square (float16: 128)."""
    info = jnp.finfo(dtype)
    return min(MERIT_CAP / max(rtol, float(info.eps)), float(info.max) ** 0.5 / 2)


def merit(err: Float[Array, " T"], rtol: float) -> Float[Array, ""]:
    """`1/2 mean_t min(err_t, cap)^2` with `cap = merit_cap(...)`: the merit on the
    scaled residuals of `measure`, invariant to the scale of the state, and finite
    whatever the iterate (a mean rather than a sum, so that float32 cannot overflow
    for any T; the searches only compare merits and their ratios)."""
    capped = jnp.minimum(err, jnp.asarray(merit_cap(err.dtype, rtol), err.dtype))
    return 0.5 * jnp.mean(capped * capped)


# A blown-up (or stalled) tail restarts from the converged prefix repeated with a period
# of at most this many steps, where the prefix repeats with that period to this fraction
# of its size (see `safeguarded`). 1e-2 rather than tighter: on a slowly attracting
# orbit (logistic r = 3.4, multiplier 0.76 per period) the phase is plain long before
# the prefix repeats to 1e-3 (T = 1e4, float32: DEER 17-40 steps with 1e-3, 11-27).
RESTART_PERIOD = 64
PERIODIC_RTOL = 1e-2
# A stalled loop restarts a tail that is off the periodic prefix's extension by this
# fraction of the prefix's size; a stall is an accepted step that advanced the front
# by at most one step and kept at least this fraction of the merit (`newton_loop`).
STALL_MISMATCH = 0.1
STALL_MERIT_RATIO = 0.5
# ... and where the converged prefix repeats over at least this many steps: over two
# steps, a smooth flow integrated with a small step looks constant (the pendulum, RK4,
# dt = 0.05: 0.75% of its size per step), and restarting it constant at every stall
# cost quasi-DEER 974 iterations where it took 257 (T = 1e3, float64).
STALL_REPEATS = 16
# A search's last retry, the Jacobi step, keeps the rejected trial on the steps right
# after the converged front where that trial cut the scaled residual to this fraction
# or less. Why: the trial there does not depend on the tail (causality), and where it
# cut the residual a hundredfold Newton is in its fast phase; it was rejected for the
# merit over the unconverged tail. Throwing it away for the Jacobi step made the front
# advance one step per iteration (two-well sampler, T = 1e4, float64, random guess:
# 47 iterations, 36 of them one step each; kept: 15). A weaker test (any decrease)
# kept poorer steps on a damped flow (Duffing, T = 1e4, float32: 19 -> 47; with this
# one, 25).
JACOBI_KEEP = 1e-2
# A crawling loop (an accepted step that took less than half the merit off) restarts the
# tail after the converged front where the prefix is at rest (its last `RESTART_PERIOD`
# steps within `CRAWL_REST` of the size of the trajectory from step `p`), from step `p`
# repeated, if that cuts the merit over the tail to `CRAWL_RATIO` or less (tenfold
# smaller scaled residuals, in the mean square). Why: beyond the front, the iterates of
# a weakly damped flow wind through other equilibria (the damped pendulum spins over the
# top), and each step converged some 35 more steps (T = 1e4: 256 iterations in float32)
# while the front itself had come to rest; restarted at rest, the tail converged in a
# few (15 in all). Both tests matter. Half the merit restarted tails only a little worse
# than a constant, and threw Newton's progress away (mean-field RNN, g = 2, D = 8,
# float64, LLE -0.004, T = 1e3: 175 -> 470). Without the rest test, a constant near the
# unstable fixed point of the logistic map at r = 3.83 cut the merit 1e5-fold and sent
# the loop back (float32, T = 2000: 100 -> 186).
CRAWL_RATIO = 1e-2
CRAWL_REST = 1e-2


def safeguarded(
    S: Float[Array, "T D"],
    fs: Float[Array, "T D"],
    sizes: Float[Array, " T"],
    trial: Float[Array, "T D"],
    p: Array,
    blown: Array,
    stalled: Bool[Array, ""] | bool = False,
    crawled: Bool[Array, ""] | bool = False,
    lowers: Callable[[Float[Array, "T D"]], Bool[Array, ""]] | None = None,
    cond: Callable = lax.cond,
) -> Float[Array, "T D"]:
    """`trial` with the loop's safeguards: the converged prefix stays frozen, step `p`
    becomes exactly `f(s_{p-1}, x_p)`, and the tail from the first blown-up step on is
    restarted. A step is blown up if the residual of `S` there is (`blown`, the first
    step whose scaled residual reaches the merit's cap; `T` if none), or if the trial
    there is not finite or larger than `1 / sqrt(eps)` times every step of `S` and
    `f(S)` before `blown` (`sizes`: from `measure`, at most twice that). Entries still
    not finite afterwards (only at `p`, where `f` itself is not) keep their previous
    values.

    Why: a correction `s_t + Delta_t` at a huge `s_t` cancels catastrophically (in
    float64 the first Newton step from a poor guess can reach 1e66 and stay finite),
    so every later trial there would be garbage and the front would advance one step
    per iteration; and a trial that grows by `1 / sqrt(eps)` over the trajectory it
    corrects (a linearisation that expands, e.g. at an unstable point) would be such
    a step at the next iteration.

    The restarted tail is the last sane step, repeated (the constant guess the default
    guess is), unless the converged prefix is periodic: if its last `2w` steps repeat
    with period `w` (from 2 up to `RESTART_PERIOD`, the shortest that does, to
    `PERIODIC_RTOL` of their size), the tail repeats its last `w` steps, in phase.
    Why: on a periodic orbit (the period-doubling cascade of the logistic map: 2, 4,
    8, ...) a constant carries no phase; linearised at one, Newton's step expands and
    blows up again, and the front gained about one step per iteration (logistic map,
    r = 3.2 and 3.4, T = 1e4, float32: DEER over 300 steps from every guess). Repeating
    the prefix whatever it looks like would hurt elsewhere: a decaying oscillation
    (Duffing, T = 1e3, float32: DEER 79 -> 222 steps) is better restarted constant.

    A `stalled` loop (the last accepted step advanced the front by at most one step
    and left the merit nearly where it was; see `newton_loop`) restarts a tail that
    did not blow up, too, where the converged prefix repeats with some period `w`
    (one included: a fixed point) over its last `max(2w, STALL_REPEATS)` steps (at
    most an eighth of the sequence) and the trial's next `RESTART_PERIOD` steps are off
    its extension by more than `STALL_MISMATCH` of the prefix's size: the tail from
    `p + 1` on then repeats the prefix, in phase. Why: from a guess whose phase is
    wrong everywhere (a random guess on a periodic orbit) nothing blows up, yet the
    linearisation at a wrong phase carries nothing beyond the front, which then
    gains one step per iteration (logistic map, r = 3.2, T = 1e4: 300 steps and not
    converged); and multiple shooting's chunk ends from such a guess do the same, one
    chunk per iteration. A trial that follows the extension, and a loop that makes
    progress, are left alone.

    A `crawled` loop (an accepted step that took less than half the merit off; a stall
    is one) where nothing blew up, the stall restart did not apply and the converged
    prefix is at rest (`CRAWL_REST`) restarts the tail after `p` from step `p` repeated,
    if `lowers` says that this cuts the merit over the tail enough (`CRAWL_RATIO`; one
    more evaluation of `f`, on such steps only). Why: beyond the front, the iterates of
    a weakly damped flow can wind through other equilibria (the damped pendulum spins
    over the top), and each step then converges only the few dozen steps the
    linearisation at the front carries (T = 1e4: DEER about 250 iterations); its front
    has come to rest, and from there the tail converges at once.

    Only unconverged steps change, so the front still advances at least one step.
    """
    T = S.shape[0]
    times = jnp.arange(T)[:, None]
    # Exactly `f(s_{p-1})` at the first unconverged step: the correction form would
    # cancel catastrophically if the old guess there were huge.
    trial = jnp.where(times < p, S, jnp.where(times == p, fs, trial))
    # A trial step far larger than the sane part of the iterate is blown up too (its
    # correction would lose the trajectory's leading digits at the next iteration).
    # From the sizes of the steps (a pass over `T` numbers, not `T D`). A non-finite
    # trial step counts as huge, whatever the bound.
    size = jnp.max(jnp.where(times[:, 0] < blown, sizes, 0))
    bound = size / jnp.sqrt(jnp.finfo(S.dtype).eps)
    row = jnp.max(jnp.abs(trial), axis=1)
    huge = first_true(~((row <= bound) & jnp.isfinite(row)))
    blown = jnp.minimum(blown, huge)

    def rest():
        # The state at step `p` (exactly `f(s_{p-1})`), and whether the prefix is at
        # rest: its last `RESTART_PERIOD` steps within `CRAWL_REST` of the size of the
        # converged prefix from it. Masked reductions: passes over `T D` numbers.
        at_p = jnp.sum(jnp.where(times == p, fs, 0), axis=0)
        recent = (times >= p - RESTART_PERIOD) & (times < p)
        moved = jnp.max(jnp.where(recent, jnp.abs(S - at_p[None, :]), 0))
        prefix_size = jnp.max(jnp.where(times[:, 0] < p, sizes, 0))
        return at_p, (p >= RESTART_PERIOD) & (moved <= CRAWL_REST * prefix_size)

    no = jnp.array(False)
    at_p, at_rest = jnp.zeros(S.shape[1], S.dtype), no
    restarts = lowers is not None and crawled is not False
    if restarts:
        at_p, at_rest = cond(crawled & (blown >= T), rest, lambda: (at_p, no))

    def restart(trial):
        last = jnp.maximum(blown - 1, p)
        # The rows by masked reductions, not indexing (with time split over devices,
        # one all-reduce rather than a gather): the last sane step, and the rows of
        # the trial from `2n` steps before `p` to `n` after it, `window[j] =
        # s_{p - 2n + j}` (zero outside the sequence; before `p` the converged prefix).
        last_sane = jnp.sum(jnp.where(times == last, trial, 0), axis=0)
        n = RESTART_PERIOD
        # A scatter-add of the rows into their places (`O(T D)`; the rows outside the
        # window are dropped): a masked reduction over time, whose batched form is as
        # cheap (a one-hot product over `T x 3n` cost a batch of eight GRUs 3.4x its
        # single runs).
        offset = times[:, 0] - (p - 2 * n)
        place = jnp.where((offset >= 0) & (offset < 3 * n), offset, 3 * n)
        finite = jnp.where(jnp.isfinite(trial), trial, 0)
        window = jnp.zeros((3 * n, S.shape[1]), S.dtype).at[place].add(finite, mode="drop")
        prefix, ahead = window[: 2 * n], window[2 * n :]
        scale = jnp.max(jnp.abs(prefix)) + jnp.finfo(S.dtype).tiny

        def deviations(w):
            # How far the last `2w`, and the last `max(2w, repeats)`, converged steps
            # are off the prefix's last `w` steps repeated backwards.
            i = jnp.arange(2 * n)
            rows = jnp.max(jnp.abs(prefix - prefix[2 * n - w + jnp.mod(i - 2 * n, w)]), axis=1)

            def over_last(m):
                return jnp.max(jnp.where(i >= 2 * n - m, rows, 0))

            return over_last(2 * w), over_last(jnp.maximum(2 * w, repeats))

        # The shortest period with which the converged prefix repeats: over its last two
        # periods after a blow-up, over at least `STALL_REPEATS` steps after a stall
        # (two steps of a smooth flow integrated with a small step look alike). The
        # tail repeats the last period, in phase (one gather from the window).
        # (Over at most an eighth of the sequence: a step of multiple shooting's coarse
        # problem is a whole chunk, and it has about sqrt(T) of them.)
        repeats = min(STALL_REPEATS, max(T // 8, 1))
        periods = jnp.arange(1, n + 1)
        two, many = jax.vmap(deviations)(periods)
        tol = PERIODIC_RTOL * scale
        fits = (p >= 2 * periods) & (2 * periods <= T)
        found_blown = fits & (two <= tol)
        found_stall = fits & (p >= repeats) & (many <= tol)
        found = jnp.where(blown < T, found_blown, found_stall)
        any_found = jnp.any(found)
        w = jnp.where(any_found, periods[jnp.argmax(found)], 1)
        extension = prefix[2 * n - w + (times[:, 0] - p) % w]
        # Stalled, nothing blown up: follow the period (one included) if the trial's
        # next steps are off it.
        k = jnp.arange(n)
        inside = (p + k < T)[:, None]
        off = jnp.abs(ahead - prefix[2 * n - w + k % w]) > STALL_MISMATCH * scale
        follow = stalled & (blown >= T) & any_found & jnp.any(inside & off)
        # Crawling at rest, not followed: the tail after `p` repeats step `p` if that
        # lowers the merit over it enough.
        lower = no
        if restarts:
            lower = cond(
                at_rest & ~follow,
                lambda: lowers(jnp.where(times > p, at_p, trial)),
                lambda: no,
            )
        # The tail after `last` (blown up) or after `p` (followed) repeats the period,
        # or after a blow-up without a period of two or more, the last sane step;
        # otherwise nothing changes.
        tail = jnp.where(any_found & ((w > 1) | follow), extension, last_sane)
        tail = jnp.where(lower, at_p, tail)
        start = jnp.where(follow | lower, p, jnp.where(blown < T, last, T))
        restarted = jnp.where(times > start, tail, trial)
        # Every step up to `last` is finite but `p` (`f` there): entrywise.
        return jnp.where(jnp.isfinite(restarted), restarted, S)

    # Nothing blown up, nothing crawling (the common case): every step is finite and
    # nothing changes, so the passes of the restart are skipped.
    return cond((blown < T) | stalled | at_rest, restart, lambda trial: trial, trial)


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


class LoopState(eqx.Module):
    """The carry of the Newton loop: the accepted iterate (`S`, its values `fs`, scaled
    residuals `err` and converged `front`), the search, the maps at hand, and the next
    trial."""

    S: Float[Array, "T D"]
    fs: Float[Array, "T D"]
    err: Float[Array, " T"]
    tol: Float[Array, " T"]
    # Bounds on the sizes of the steps (from `measure`), for the next trial's safeguards.
    sizes: Float[Array, " T"]
    front: Int[Array, ""]
    num_steps: Int[Array, ""]
    num_trials: Int[Array, ""]
    rejections: Int[Array, ""]
    step_size: Float[Array, ""]
    search_state: PyTree
    # The merit the descent's linear model predicts for the pending trial (for a
    # search that compares the two, e.g. a trust region).
    predicted: Float[Array, ""]
    # The maps at hand: for a solver that forms them with the values, those at `S`
    # (a retry uses them); otherwise the last ones formed (kept by a solver that
    # reuses them).
    maps: PyTree
    # For a solver that reuses its maps (`reuse_threshold > 0`): when to keep them.
    reuse: "Reuse | None"
    num_linearisations: Int[Array, ""]
    # The residual tolerances' factor (one, or less after the estimate of the forward
    # error asked for a tighter residual), and that estimate over its tolerance (`inf`
    # until the residual first met its tolerance everywhere; see `newton_loop`).
    factor: Float[Array, ""]
    estimate: Float[Array, ""]
    trial: Float[Array, "T D"]
    done: Bool[Array, ""]

    @property
    def nonfinite(self) -> Bool[Array, ""]:
        """`f` is non-finite at the converged front: the trajectory itself is."""
        at_front = (jnp.arange(self.fs.shape[0]) == self.front)[:, None]
        return jnp.any(at_front & ~jnp.isfinite(self.fs))

    @property
    def converged(self) -> Bool[Array, ""]:
        """Every step's residual meets its tolerance."""
        return self.front >= self.S.shape[0]

    @property
    def accurate(self) -> Bool[Array, ""]:
        """The estimated error of the trajectory meets the tolerance (or, `NaN`, was
        not estimated)."""
        return ~(self.estimate > 1)


class Reuse(eqx.Module):
    """When a solver that reuses its maps keeps them: how many accepted steps in a row
    were made with them kept, the merit ratio (new over old) of the last accepted step
    and of the last step made with freshly formed maps."""

    kept_steps: Int[Array, ""]
    last_ratio: Float[Array, ""]
    fresh_ratio: Float[Array, ""]

    # A step made with kept maps this many times slower (in merit ratio) than the
    # last one made with fresh maps: stale maps cost progress, form new ones.
    slowdown: ClassVar[float] = 4.0
    # A step made with fresh maps this many times faster than the step before it:
    # convergence is superlinear (maps close to the Jacobian), keep forming them.
    speedup: ClassVar[float] = 4.0
    # Form fresh maps after this many kept steps in a row, to see whether they would
    # now converge faster (e.g. Newton's quadratic phase, which kept maps cannot show).
    max_kept: ClassVar[int] = 3

    def next(
        self,
        ratio: Float[Array, ""],
        threshold: Float[Array, ""] | float,
        may_keep: Bool[Array, ""],
    ) -> tuple["Reuse", Bool[Array, ""]]:
        """After an accepted step with merit ratio `ratio`: the next state and whether
        to keep the maps (a decision on scalars; the caller forms fresh maps otherwise)."""
        was_kept = self.kept_steps > 0
        fresh_ratio = jnp.where(was_kept, self.fresh_ratio, ratio)
        stale = was_kept & (ratio > self.slowdown * self.fresh_ratio)
        accelerating = ~was_kept & (self.speedup * ratio < self.last_ratio)
        keep = (
            may_keep
            & (ratio <= threshold)
            & ~stale
            & ~accelerating
            & (self.kept_steps < self.max_kept)
        )
        kept_steps = jnp.where(keep, self.kept_steps + 1, 0)
        return Reuse(kept_steps, ratio, fresh_ratio), keep


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
        k = state.num_steps
        log_max = jnp.log(jnp.max(state.err))
        return prefix.at[k].set(state.front, mode="drop"), log_res.at[k].set(log_max, mode="drop")


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
    # Whether a crawling loop may restart its tail at rest (see `safeguarded`): for
    # solvers whose maps are the Jacobians (DEER, ELK), from which a Newton step
    # converges a tail at rest at once. A diagonal's steps converge linearly from any
    # guess, and throwing away their tail cost them (quasi-DEER on the pendulum,
    # T = 1e3, float64: 160 -> 618 iterations).
    restarts_at_rest: ClassVar[bool] = False

    def reuse_threshold(self, size: int, length: int) -> float:
        """When the loop keeps the maps rather than forming new ones, at state size
        `size` and `length` steps (see `Reuse`): after a step whose merit ratio is at
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


def newton_loop(
    solver: AbstractParallelSolver,
    problem: Problem,
    S0: Float[Array, "T D"],
    max_steps: int,
    *,
    search_state: tuple[Array, PyTree] | None = None,
    scale: Float[Array, ""] | float = 0.0,
    loop: Callable = lax.while_loop,
    observer: AbstractObserver | None = None,
    verify: bool = True,
) -> tuple[LoopState, PyTree]:
    """Run the Newton loop from the guess `S0` for at most `max_steps` accepted
    iterations. Returns the final `LoopState` and the observer's record (or `None`).

    Each body evaluates the pending trial (the guess, at first), lets the search accept
    it or not, and, unless the accepted iterate is converged (or the loop is out of
    steps), makes the next trial. A body costs at most one evaluation of the values,
    one formation of the maps and one descent, whatever it decides, and under
    `jax.vmap` too: which of them runs is decided on scalars, and each runs once,
    behind one `parassm._batching.cond` (under `vmap`, for the whole batch and only when
    an element needs it).

    Once every residual meets its tolerance (`verify`, the default), the body's descent
    is the estimate of the trajectory's error instead: the Newton correction at `S`
    with nothing frozen. Above the tolerance, the residual's tolerance is tightened by
    what the estimate asks for, down to sixteen roundings of the trajectory's size, and
    the loop goes on from that Newton trial; `finish` reports `inaccurate` where it
    could not. A sliding window's loop passes `verify=False` (a window's error is not
    the trajectory's). The maps are formed with the values of every trial in one pass
    (`AbstractParallelSolver.linearise`), or, for a solver whose `maps_apart` or that
    reuses its maps, in a pass of their own at an accepted iterate that is not
    converged.

    `search_state`, a `(step_size, state)` pair, continues the search of an earlier
    loop, and `scale` floors the size of the trajectory in the convergence test
    (`measure`), both for a sliding window's later positions. `loop` is
    `lax.while_loop` or a reverse-differentiable (checkpointed) loop, which runs at
    most `max_steps * max_trials + 1` bodies.
    """
    descent, search = solver.descent, solver.search
    rtol, atol = solver.tolerances(S0.dtype)
    dtype = S0.dtype
    T = S0.shape[0]
    times = jnp.arange(T)

    threshold = solver.reuse_threshold(S0.shape[1], T)
    # Static: whether maps may be reused (a traced threshold counts as reuse).
    reuse = not (isinstance(threshold, int | float) and threshold <= 0)
    # Reused maps are formed apart from the values: a trial then costs only `f`.
    apart = solver.maps_apart or reuse
    may_reject = search.may_reject
    # Dear work behind a conditional that a batch pays for only when one of its
    # elements needs it; a differentiated (checkpointed) loop keeps `lax.cond`.
    if loop is lax.while_loop:
        cond = batching.cond
    else:

        def cond(pred, true_fun, false_fun, *operands, merge=True):
            return lax.cond(pred, true_fun, false_fun, *operands)

    def evaluate(S, iteration, factor):
        # `(values, maps or None, err, front, tol, sizes)` at `S`.
        if apart:
            fs, transition = problem.evaluate(S), None
        else:
            fs, transition = solver.linearise(problem, problem.previous(S), iteration)
        err, front, tol, sizes = measure(S, fs, factor * rtol, factor * atol, scale)
        return fs, transition, err, front, tol, sizes

    def maps(S, iteration):
        # The values `linearise` also returns are known already: unused, and where they
        # are a separate computation (closed-form Jacobians, Jacobi, Picard) not run.
        return solver.linearise(problem, problem.previous(S), iteration)[1]

    if search_state is None:
        search_state = search.init(dtype)
    step_size0, search_state = search_state

    def zeros(shapes):
        return jtu.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)

    # The maps are carried from body to body where they are cheap to keep (formed with
    # the values: diagonals, blocks) or kept on purpose (reused); dense maps formed
    # apart are not (under `jax.vmap` a carried `T D^2` array costs selects of it at
    # every iteration).
    carry_maps = reuse or not apart
    descent_shapes = jax.eval_shape(lambda S: descent.prepare(maps(S, 0), S, jnp.array(0)), S0)
    # The smallest factor of the residual tolerances: a residual of sixteen roundings
    # of the trajectory's size is as small as the dtype measures one.
    min_factor = min(1.0, 16 * float(jnp.finfo(dtype).eps) / max(rtol, 1e-300))
    inf = jnp.asarray(jnp.inf, dtype)
    state0 = LoopState(
        S=S0,
        fs=S0,
        err=jnp.full(T, inf),
        tol=jnp.ones(T, dtype),
        sizes=jnp.zeros(T, dtype),
        front=jnp.array(0),
        num_steps=jnp.array(-1),
        num_trials=jnp.array(-1),
        rejections=jnp.array(0),
        step_size=jnp.asarray(step_size0, dtype),
        search_state=search_state,
        predicted=inf,
        maps=zeros(eqx.filter_eval_shape(maps, S0, 0)) if carry_maps else None,
        reuse=Reuse(jnp.array(0), inf, inf) if reuse else None,
        num_linearisations=jnp.array(0),
        factor=jnp.ones((), dtype),
        estimate=inf,
        trial=S0,
        done=jnp.array(False),
    )

    def select(pred, new, old):
        if pred is True:
            return new
        return jtu.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)

    def running(carry):
        return ~carry[0].done

    def body(carry):
        state, record = carry
        iteration = state.num_trials + 1
        trial = state.trial
        trial_fs, A, trial_err, trial_front, trial_tol, trial_sizes = evaluate(
            trial, iteration, state.factor
        )
        first = state.num_steps < 0
        # The merits of the accepted iterate and of the trial, for the search and the
        # reuse of maps (unused ones are dropped by the compiler).
        old_merit, trial_merit = merit(state.err, rtol), merit(trial_err, rtol)
        if may_reject:
            info = Trial(
                merit=old_merit,
                trial_merit=trial_merit,
                worst=jnp.max(state.err),
                trial_worst=jnp.max(trial_err),
                front=state.front,
                trial_front=trial_front,
                rejections=state.rejections,
                predicted_merit=lambda: state.predicted,
            )
            accept, step_size, search_state = search.update(
                state.search_state, state.step_size, info
            )
            # Every trial converges step `p`: accepting one always makes progress.
            accept = first | accept | (state.rejections + 1 >= search.max_trials)
            step_size = jnp.where(first, state.step_size, step_size)
            search_state = select(first, state.search_state, search_state)
        else:
            accept, step_size, search_state = True, state.step_size, state.search_state

        S = select(accept, trial, state.S)
        fs = select(accept, trial_fs, state.fs)
        front = select(accept, trial_front, state.front)
        tol = select(accept, trial_tol, state.tol)
        err = select(accept, trial_err, state.err)
        sizes = select(accept, trial_sizes, state.sizes)
        num_steps = state.num_steps + (1 if accept is True else accept.astype(int))
        nonfinite = jnp.any((times == front)[:, None] & ~jnp.isfinite(fs))
        stopped = (front >= T) | nonfinite | (num_steps >= max_steps)
        # The residual meets its tolerance everywhere: this body's descent is the
        # estimate of the trajectory's error (see below), not a trial.
        estimating = (front >= T) & ~nonfinite if verify else jnp.array(False)
        # A retry with the Jacobi step (step size zero) needs no maps and no descent.
        jacobi = jnp.array(False) if accept is True else ~accept & (step_size == 0)

        # Whether a solver that reuses its maps keeps them (a decision on scalars).
        reused, keep = state.reuse, jnp.array(False)
        if reuse:
            ratio = trial_merit / old_merit
            may_keep = ~first & (state.rejections == 0)
            next_reuse, keep = state.reuse.next(ratio, threshold, may_keep)
            keep = accept & keep
            reused = select(accept & ~stopped, next_reuse, state.reuse)
        # Where no maps are formed (a stopped loop, a Jacobi retry) nothing else is
        # either: the maps are formed, or taken, and used in one branch (dense maps
        # handed from one conditional to the next were copied: DEER on a GRU, H = 32,
        # T = 1e4, 2.6x the time).
        descends = (~stopped & ~jacobi) | estimating
        # For the estimate, the Newton correction with nothing frozen.
        frozen_front = jnp.where(estimating, 0, front)
        if not apart:
            # From the pass of the values; a retry keeps those of `S`.
            at_hand = select(accept, A, state.maps)
            formed = 1
        elif reuse:
            at_hand = state.maps
            formed = (descends & ~keep & ~estimating).astype(int)
        else:
            at_hand = None
            formed = descends.astype(int)

        def linearisation():
            if not apart:
                return at_hand
            if not reuse:
                return maps(S, iteration)
            # The estimate uses the last maps formed, as a kept step does. (The dear
            # branch first: `cond` runs its false branch for the whole batch.)
            return cond(~keep & ~estimating, lambda: maps(S, iteration), lambda: at_hand)

        def descend():
            transition = linearisation()
            descent_state = descent.prepare(transition, S - fs, frozen_front)
            step = descent.step(descent_state, step_size, S, fs)
            return step, descent_state, transition if carry_maps else None

        def idle():
            return fs, zeros(descent_shapes), at_hand

        step, descent_state, transition = cond(descends, descend, idle, merge=False)

        # The estimate of the error of `S`: the linearised error recurrence driven by
        # the residual, `e_t = A_t e_{t-1} + f_t - s_t`, i.e. the Newton correction at
        # `S` over the whole trajectory (one scan), against the tolerance of the
        # trajectory (the residual's, before any tightening). Where the dynamics damp
        # errors it is about the residual; along a neutral direction (the phase of a
        # limit cycle) the residuals add up, and a trajectory whose every residual
        # meets its tolerance can be far from the truth.
        estimate = state.estimate
        factor = state.factor
        if verify:
            delta = descent.correction(descent_state)
            # Scaled as the residual is in `measure` (an exact zero passes, also where
            # the trajectory is zero so far).
            size = jnp.max(jnp.abs(delta), axis=1)
            ratio = jnp.max(jnp.where(size == 0, 0, size / tol)) * factor
            ratio = jnp.where(jnp.isnan(ratio), jnp.inf, ratio)
            estimate = jnp.where(estimating, ratio, state.estimate)
            # Too large: tighten the residual's tolerance by what the estimate asks
            # (the error scales with the residual) and go on from the Newton trial at
            # `S` (the estimate is its correction); unless even the tightest tolerance
            # the dtype measures would not do (a chaotic system, whose error grows
            # like its Jacobians' products, at once).
            wanted = factor * jnp.minimum(0.5, 0.5 / estimate)
            possible = (wanted >= min_factor / 4) & (factor > 1.01 * min_factor)
            tighten = estimating & (estimate > 1) & possible
            factor = jnp.where(tighten, jnp.maximum(wanted, min_factor), factor).astype(dtype)
            # The residual measured against the tighter tolerance (the trajectory's size
            # `nu` as it was: the next trial is measured afresh).
            shrink = (factor / state.factor).astype(dtype)
            err = jnp.where(tighten, err / shrink, err)
            tol = jnp.where(tighten, tol * shrink, tol)
            front = jnp.where(tighten, first_true(~(err <= 1)), front)
            step = select(tighten, S + delta, step)
            stopped = stopped & ~tighten
        else:
            tighten = jnp.array(False)
        done = stopped

        # A crawl: an accepted step that took less than half the merit off; a stall: a
        # crawl that converged at most one more step (see `safeguarded`). The first
        # step whose residual is blown up (counted at the merit's cap).
        blown = first_true(~(err < merit_cap(dtype, rtol)))
        crawled = accept & ~first & ~tighten & (trial_merit >= STALL_MERIT_RATIO * old_merit)
        stalled = crawled & (front <= state.front + 1)

        def lowers(candidate):
            # Whether `candidate` (the trial with its tail after `front` restarted) has
            # at most `CRAWL_RATIO` of the merit of `S` over that tail (scaled by the
            # same tolerances; NaN counts as blown up, as in `measure`).
            after = times > front
            new = jnp.max(jnp.abs(candidate - problem.evaluate(candidate)), axis=1) / tol
            new = jnp.where(jnp.isnan(new), jnp.inf, new)

            def over_tail(e):
                return merit(jnp.where(after, e, 0), rtol)

            return over_tail(new) <= CRAWL_RATIO * over_tail(err)

        if may_reject:
            # The Jacobi step, but the rejected trial itself on the steps right after
            # the front where it took `1 - JACOBI_KEEP` of the residual off (see
            # `JACOBI_KEEP`).
            kept = trial_err <= JACOBI_KEEP * state.err
            cut = first_true((times >= front) & ~kept)
            step = select(jacobi, jnp.where((times < cut)[:, None], trial, fs), step)
        # The safeguards, once (a crawl or a stall is an accepted step: a retry has
        # neither). A solver that does not restart at rest: statically none of it.
        crawl = crawled if solver.restarts_at_rest else False
        # A tightened iterate's trial is the estimate's whole Newton trial: its prefix
        # is not accurate enough, and its tail's correction assumes the prefix's.
        guarded = jnp.where(tighten, 0, front)
        next_ = safeguarded(S, fs, sizes, step, guarded, blown, stalled, crawl, lowers, cond)
        next_ = jnp.where(done, S, next_)
        predicted = inf
        if search.uses_model:
            # The merit the descent's linear model predicts for the trial.
            model = descent.model_residual(descent_state, S - fs, next_ - S)
            model_merit = merit(jnp.max(jnp.abs(model), axis=1) / tol, rtol)
            predicted = jnp.where(descends & ~estimating, model_merit, inf)

        state = LoopState(
            S=S,
            fs=fs,
            err=err,
            tol=tol,
            sizes=sizes,
            front=front,
            num_steps=num_steps,
            num_trials=state.num_trials + 1,
            rejections=jnp.where(accept, 0, state.rejections + 1),
            step_size=step_size,
            search_state=search_state,
            predicted=predicted,
            maps=transition,
            reuse=reused,
            num_linearisations=state.num_linearisations + formed,
            factor=factor,
            estimate=estimate,
            trial=next_,
            done=done,
        )
        if observer is not None:
            record = observer.update(record, state)
        return state, record

    record0 = None if observer is None else observer.init(max_steps, dtype)
    return loop(running, body, (state0, record0))


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
    nonfinite = state.nonfinite
    result = RESULTS.where(
        state.converged,
        RESULTS.where(state.accurate, RESULTS.successful, RESULTS.inaccurate),
        RESULTS.where(nonfinite, RESULTS.nonfinite, RESULTS.max_steps_reached),
    )
    T = state.S.shape[0]
    # A genuinely non-finite trajectory is reported as such, never hidden.
    after = (jnp.arange(T) >= state.front)[:, None]
    S = jnp.where(nonfinite & after, jnp.nan, state.S)
    stats = dict(
        num_steps=state.num_steps,
        max_steps=jnp.array(max_steps),
        residual=jnp.max(state.err),
        max_abs_residual=jnp.max(jnp.abs(state.S - state.fs)),
        converged_prefix=state.front,
        error_estimate=state.estimate,
        tolerance_factor=state.factor,
        num_linearisations=state.num_linearisations,
        **solver.search.stats(state.search_state, state.step_size, state.num_trials),
    )
    return S, result, stats


def finish_measured(
    solver: AbstractParallelSolver,
    problem: Problem,
    S: Float[Array, "T D"],
    max_steps: int,
    *,
    num_steps: Int[Array, ""],
    num_trials: Int[Array, ""],
    num_linearisations: Int[Array, ""],
    step_size: Float[Array, ""],
    search_state: PyTree,
    fs: Float[Array, "T D"] | None = None,
    estimate: Float[Array, ""] | None = None,
) -> tuple[Float[Array, "T D"], RESULTS, dict[str, Array]]:
    """`finish` for a trajectory `S` of the whole `problem` put together outside one
    Newton loop (a sliding window, multiple shooting): measured once more, so that its
    result and statistics are those of the whole trajectory. `fs`, the values
    `f(s_{t-1}, x_t)` at `S`, where the caller has them; else one vectorised
    evaluation of `f`. The counts and the search's state are the caller's."""
    if fs is None:
        fs = problem.evaluate(S)
    err, front, tol, sizes = measure(S, fs, *solver.tolerances(S.dtype))
    zero = jnp.array(0)
    final = LoopState(
        S=S,
        fs=fs,
        err=err,
        tol=tol,
        sizes=sizes,
        front=front,
        num_steps=num_steps,
        num_trials=num_trials,
        rejections=zero,
        step_size=step_size,
        search_state=search_state,
        predicted=jnp.asarray(jnp.inf, S.dtype),
        maps=None,
        reuse=None,
        num_linearisations=num_linearisations,
        factor=jnp.ones((), S.dtype),
        # Without the caller's estimate, the residual's test alone (`NaN`: not made).
        estimate=jnp.asarray(jnp.nan if estimate is None else estimate, S.dtype),
        trial=S,
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
