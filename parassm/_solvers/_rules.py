"""The Newton loop's rules: what it does beyond the plain (quasi-)Newton step and its
search, each a Module with its constants as fields, each switchable off.

A parallel solver carries them in its `rules` field ([`parassm.Rules`][]); `None` in
place of a rule switches it off:

    import dataclasses
    solver = parassm.DEER()
    no_stall = dataclasses.replace(solver, rules=dataclasses.replace(solver.rules, stall=None))

Every constant states the measurement that set it. What each rule is worth on the
convergence zoo (steps with every rule, and with each one off) is measured by
`python -m bench.convergence --ablate` and tabled in docs/solvers.md.

None of the rules touches the causality bound: every accepted iteration still converges
at least one more step (the loop's safeguards freeze the converged prefix and set the
first unconverged step to `f` there, whatever a rule does after it).
"""

import dataclasses

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


class RestartBlownUp(eqx.Module):
    """A blown-up tail restarts from its last sane step, repeated (the constant guess
    the default guess is), or from the converged prefix in phase
    ([`parassm.RestartInPhase`][]).

    A step of a trial is blown up where the accepted iterate's scaled residual reaches
    the merit's cap, or where the trial is not finite or larger than `1 / sqrt(eps)`
    times every sane step of the iterate (a correction there would lose the
    trajectory's leading digits at the next iteration).

    Why: a correction `s_t + Delta_t` at a huge `s_t` cancels catastrophically (in
    float64 the first Newton step from a poor guess can reach 1e66 and stay finite), so
    every later trial there would be garbage and the front would advance one step per
    iteration. Off, a blown-up step is kept as it is (non-finite entries take the
    iterate's values: a NaN is never carried into the next linearisation).
    """


class RestartInPhase(eqx.Module):
    """A blown-up tail restarts from the converged prefix in phase where the prefix is
    periodic: if its last `2w` steps repeat with period `w` (from 2 up to
    `max_period`, the shortest that does) to `rtol` of their size, the tail repeats its
    last `w` steps. Takes effect only with [`parassm.RestartBlownUp`][].

    Why: on a periodic orbit (the period-doubling cascade of the logistic map: 2, 4,
    8, ...) a constant carries no phase; linearised at one, Newton's step expands and
    blows up again, and the front gained about one step per iteration (logistic map,
    r = 3.2 and 3.4, T = 1e4, float32: DEER over 300 steps from every guess). Repeating
    the prefix whatever it looks like hurts elsewhere: a decaying oscillation (Duffing,
    T = 1e3, float32: DEER 79 -> 222 steps) is better restarted constant, hence the
    test for a period.

    **Arguments:**

    - `max_period`: the longest period looked for (default 64: the logistic cascade's
        periods up to 32 with room; the search is a pass over `3 max_period` rows).
    - `rtol`: how closely the prefix must repeat, relative to its size (default 1e-2:
        on a slowly attracting orbit, the logistic map at r = 3.4 with multiplier 0.76
        per period, the phase is plain long before the prefix repeats to 1e-3; T = 1e4,
        float32: DEER 17-40 steps with 1e-3, 11-27 with 1e-2).
    """

    max_period: int = eqx.field(default=64, static=True)
    rtol: float = 1e-2

    def __check_init__(self):
        if self.max_period < 1:
            raise ValueError(f"`max_period` must be at least 1, got {self.max_period}.")


class RestartOnStall(eqx.Module):
    """A stalled loop restarts a tail that is off the converged prefix's periodic
    extension.

    A stall is an accepted step that advanced the converged front by at most one step
    and kept at least `merit_ratio` of the merit. Then, where nothing blew up and the
    converged prefix repeats with some period `w <= max_period` (one included: a fixed
    point) over its last `max(2w, repeats)` steps (at most an eighth of the sequence)
    to `rtol` of its size, and the trial's next `max_period` steps are off the
    prefix's extension by more than `mismatch` of its size, the tail after the front
    repeats the prefix, in phase.

    Why: from a guess whose phase is wrong everywhere (a random guess on a periodic
    orbit) nothing blows up, yet the linearisation at a wrong phase carries nothing
    beyond the front, which then gains one step per iteration (logistic map, r = 3.2,
    T = 1e4: 300 steps and not converged); multiple shooting's chunk ends from such a
    guess do the same, one chunk per iteration. A trial that follows the extension,
    and a loop that makes progress, are left alone.

    **Arguments:**

    - `merit_ratio`: a step that kept at least this fraction of the merit crawled
        (default 0.5).
    - `mismatch`: how far off the extension the trial must be, relative to the
        prefix's size (default 0.1).
    - `repeats`: the fewest steps over which the prefix must repeat (default 16: over
        two steps a smooth flow integrated with a small step looks constant, the
        pendulum, RK4, dt = 0.05, moves 0.75% of its size per step, and restarting it
        constant at every stall cost quasi-DEER 974 iterations where it took 257;
        T = 1e3, float64).
    - `max_period`, `rtol`: as for [`parassm.RestartInPhase`][].
    """

    merit_ratio: float = 0.5
    mismatch: float = 0.1
    repeats: int = eqx.field(default=16, static=True)
    max_period: int = eqx.field(default=64, static=True)
    rtol: float = 1e-2

    def __check_init__(self):
        if self.max_period < 1:
            raise ValueError(f"`max_period` must be at least 1, got {self.max_period}.")


class RestartAtRest(eqx.Module):
    """A crawling loop restarts the tail after the converged front from the front's
    state, repeated, where the prefix has come to rest and that cuts the merit over the
    tail enough.

    A crawl is an accepted step that kept at least `merit_ratio` of the merit. Where
    nothing blew up, no stall restart applied, and the prefix's last `window` steps are
    within `rest` of the size of the converged prefix from the front's state, the
    candidate tail (one more evaluation of `f`, on such steps only) replaces the
    trial's if its merit over the tail is at most `ratio` of the iterate's.

    Why: beyond the front, the iterates of a weakly damped flow wind through other
    equilibria (the damped pendulum spins over the top), and each step converged only
    the few dozen steps the linearisation at the front carries (T = 1e4: 256
    iterations in float32) while the front itself had come to rest; restarted at rest,
    the tail converged in a few (15 in all). For solvers whose maps are the Jacobians
    (DEER, ELK: on by default), from which a Newton step converges a tail at rest at
    once; a diagonal's steps converge linearly from any guess, and throwing their tail
    away cost them (quasi-DEER on the pendulum, T = 1e3, float64: 160 -> 618
    iterations: off by default).

    **Arguments:**

    - `merit_ratio`: a step that kept at least this fraction of the merit crawled
        (default 0.5, as a stall).
    - `ratio`: the largest merit over the tail, relative to the iterate's, that a
        restart must reach (default 1e-2: tenfold smaller scaled residuals; with half
        the merit, tails only a little better than the trial's were restarted and
        Newton's progress thrown away: mean-field RNN, g = 2, D = 8, float64, LLE
        -0.004, T = 1e3: 175 -> 470 steps).
    - `rest`: how still the prefix must be, relative to its size (default 1e-2: without
        a rest test a constant near the unstable fixed point of the logistic map at
        r = 3.83 cut the merit 1e5-fold and sent the loop back; float32, T = 2000:
        100 -> 186 steps).
    - `window`: the steps over which the prefix must be at rest (default 64).
    """

    merit_ratio: float = 0.5
    ratio: float = 1e-2
    rest: float = 1e-2
    window: int = eqx.field(default=64, static=True)


class KeepFront(eqx.Module):
    """The search's last retry, the Jacobi step, keeps the rejected trial on the steps
    right after the converged front where that trial cut the scaled residual to `cut`
    of the iterate's or less.

    Why: there the trial does not depend on the tail (causality), and where it cut the
    residual a hundredfold Newton is in its fast phase; it was rejected for the merit
    over the unconverged tail. Throwing it away for the Jacobi step made the front
    advance one step per iteration (two-well sampler, T = 1e4, float64, random guess:
    47 iterations, 36 of them one step each; kept: 15).

    **Arguments:**

    - `cut`: default 1e-2 (a weaker test, any decrease, kept poorer steps on a damped
        flow: Duffing, T = 1e4, float32: 19 -> 47 iterations; with this one, 25).
    """

    cut: float = 1e-2


class KeepVerified(eqx.Module):
    """Once the estimate of the trajectory's error has asked for a tighter residual
    (the residual met its tolerance everywhere, the estimate did not), the iterate it
    verified is kept. An accepted iterate whose scaled residual then exceeds `slack`
    times that iterate's estimated error (both against the same tolerance) ends the
    loop, and a loop that ends without meeting the tighter tolerance (this,
    `max_steps`, a non-finite iterate) returns the verified iterate as
    `RESULTS.inaccurate`, with its estimate, not a worse one. (Of several verified
    iterates, the one with the smallest estimate.)

    Why `slack` times the estimate: a residual `r_t` is the error's own recurrence
    broken at step `t` (`e_t = A_t e_{t-1} + r_t`), so an iterate with a residual
    above `(1 + |A_t|)` times the verified iterate's error is, to first order, farther
    from the truth at step `t` or `t - 1` than the verified one is anywhere. A Newton
    step that corrects a large error may pass through residuals well above the
    tolerance, and is not stopped (FitzHugh-Nagumo, T = 3000, float64,
    `DEER(rtol=1e-6, atol=1e-7)`: verified with an estimate of 8e5, the next trial's
    residual 1e5 tolerances, successful 11 steps later).

    Made for the quasi solvers (diagonal maps) on weakly damped oscillators: a tighter
    residual tolerance sends the front back to the start, and the diagonal step over
    the long tail blows it up again, so the loop starts over (damped pendulum, T = 1e3,
    float64, `QuasiDEER`: verified at 161 steps with an estimate of 5, residuals 1e11
    tolerances at step 250, successful at 333; Duffing, float32: verified at 372,
    `max_steps` (1000) with the front at 942; Duffing, float64, random guess: verified
    at 477, the last iterate 1e273 off). Off, the loop iterates until it meets the
    tighter tolerance or `max_steps`, and returns its last iterate.

    It acts only where the loop estimates the error with the solver's own maps and
    they are not the Jacobians (a Hutchinson or supplied diagonal, blocks smaller than
    the state). Where the estimate takes the exact Jacobians (DEER, ELK, quasi solvers
    with exact diagonals, Jacobi, Picard) the trial after a tightening is a Newton step,
    and on the convergence zoo the rule changed no row there (DEER and ELK, 212 rows
    each; quasi-DEER, 212 rows), while carrying the verified iterate under `jax.vmap`
    cost quasi-DEER 5-14% of a batch's time (8 GRUs, H = 32, T = 2000, CPU, two runs).

    **Arguments:**

    - `slack`: default 2 (`1 + |A_t|` for a neutral direction, `|A_t| = 1`); `inf`
        never gives up early, and still returns the verified iterate at the end.
    """

    slack: float | Float[Array, ""] = 2.0

    def __check_init__(self):
        if isinstance(self.slack, int | float) and not self.slack > 0:
            raise ValueError(f"KeepVerified(slack=...) must be > 0, got {self.slack}.")

    def gives_up(self, worst, estimate) -> Bool[Array, ""]:
        """Whether an accepted iterate whose largest scaled residual is `worst` is
        farther from the truth than the verified iterate, whose estimated error is
        `estimate` (both against the same tolerance)."""
        return worst > self.slack * estimate


class ReuseState(eqx.Module):
    """How many accepted steps in a row were made with the maps kept, the merit ratio
    (new over old) of the last accepted step and of the last step made with freshly
    formed maps, and whether the next step keeps them."""

    kept_steps: Int[Array, ""]
    last_ratio: Float[Array, ""]
    fresh_ratio: Float[Array, ""]
    keep: Bool[Array, ""]


class ReuseMaps(eqx.Module):
    """When a solver that may keep its maps (a diagonal, blocks: `relinearise > 0`)
    keeps them: after an accepted step whose merit ratio is at most the solver's
    `relinearise`, unless kept maps have gone stale or fresh ones converge
    superlinearly. A kept step is a chord step: one evaluation of `f` and one scan.

    **Arguments:**

    - `slowdown`: a step made with kept maps this many times slower (in merit ratio)
        than the last one made with fresh maps: stale maps cost progress, form new ones
        (default 4).
    - `speedup`: a step made with fresh maps this many times faster than the step
        before it: convergence is superlinear (maps close to the Jacobian), keep
        forming them (default 4).
    - `max_kept`: form fresh maps after this many kept steps in a row, to see whether
        they would now converge faster, e.g. Newton's quadratic phase, which kept maps
        cannot show (default 3).

    Measured on a GRU with the exact diagonal (`bench/peers.py`, 2-core CPU): 0.71-0.84x
    the time of forming them at every iterate for `T = 1e4` and `D >= 32`, with the
    same number of steps.
    """

    slowdown: float = 4.0
    speedup: float = 4.0
    max_kept: int = 3

    def init(self, dtype) -> ReuseState:
        inf = jnp.asarray(jnp.inf, dtype)
        return ReuseState(jnp.array(0), inf, inf, jnp.array(False))

    def update(
        self,
        state: ReuseState,
        ratio: Float[Array, ""],
        threshold: Float[Array, ""] | float,
        may_keep: Bool[Array, ""],
    ) -> ReuseState:
        """After an accepted step with merit ratio `ratio`: the next state (a decision
        on scalars; the loop forms fresh maps unless `keep`)."""
        was_kept = state.kept_steps > 0
        fresh_ratio = jnp.where(was_kept, state.fresh_ratio, ratio)
        stale = was_kept & (ratio > self.slowdown * state.fresh_ratio)
        accelerating = ~was_kept & (self.speedup * ratio < state.last_ratio)
        keep = (
            may_keep
            & (ratio <= threshold)
            & ~stale
            & ~accelerating
            & (state.kept_steps < self.max_kept)
        )
        kept_steps = jnp.where(keep, state.kept_steps + 1, 0)
        return ReuseState(kept_steps, ratio, fresh_ratio, keep)


class Rules(eqx.Module):
    """The rules of a parallel solver's Newton loop beyond the plain step and its
    search; `None` switches one off. Each solver's default is documented with it:
    every rule on, but `at_rest` only for [`parassm.DEER`][] and [`parassm.ELK`][].

    **Arguments:**

    - `blown_up`: [`parassm.RestartBlownUp`][].
    - `in_phase`: [`parassm.RestartInPhase`][].
    - `stall`: [`parassm.RestartOnStall`][].
    - `at_rest`: [`parassm.RestartAtRest`][].
    - `keep_front`: [`parassm.KeepFront`][] (for a search that may reject).
    - `reuse`: [`parassm.ReuseMaps`][] (for a solver with `relinearise > 0`).
    - `verified`: [`parassm.KeepVerified`][] (where the loop estimates the error).
    """

    blown_up: RestartBlownUp | None = RestartBlownUp()
    in_phase: RestartInPhase | None = RestartInPhase()
    stall: RestartOnStall | None = RestartOnStall()
    at_rest: RestartAtRest | None = None
    keep_front: KeepFront | None = KeepFront()
    reuse: ReuseMaps | None = ReuseMaps()
    verified: KeepVerified | None = KeepVerified()

    @property
    def window(self) -> int:
        """The rows of the restart window on either side of the front (static)."""
        periods = [1]
        if self.blown_up is not None and self.in_phase is not None:
            periods.append(self.in_phase.max_period)
        if self.stall is not None:
            periods.append(self.stall.max_period)
        return max(periods)

    def names(self) -> tuple[str, ...]:
        """The names of the rules switched on."""
        names = (field.name for field in dataclasses.fields(self))
        return tuple(name for name in names if getattr(self, name) is not None)


# The defaults of the solvers whose maps are the Jacobians (DEER, ELK): a tail at rest
# is restarted too.
JACOBIAN_RULES = Rules(at_rest=RestartAtRest())
