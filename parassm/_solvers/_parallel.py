"""The Newton loop every parallel solver shares.

Each iteration at the current guess `S = (s_1..s_T)`:

1. evaluates `f(s_{t-1}, x_t)` for all `t` at once (and linearises it),
2. measures the scaled residual `|s_t - f(s_{t-1}, x_t)| / (atol + rtol |f|)` and stops
   if it is at most one everywhere (so the returned trajectory is always the one whose
   residual was measured),
3. otherwise asks the solver for the next iterate (`AbstractParallelSolver.step`). By
   default that is the Newton-type correction `delta_t = A_t delta_{t-1} - r_t` with the
   solver's `A_t`, solved by one associative scan; solvers may instead damp it, search
   along it, or solve a different linear problem (ELK's Levenberg-Marquardt step), and
   may carry their own state from one iteration to the next (e.g. a trust-region
   radius).

Safeguards, which keep the causality bound "at most T iterations" in floating point
whatever the step is:

- Steps before the first unconverged one, `p`, are frozen (`A_t = 0`, `delta_t = 0`).
  Then `s_p` becomes `f(s_{p-1}, x_p)` (set exactly): every iteration converges at least one
  more step, whatever `A_t` is, so `T` iterations always suffice. Zeroing `A_t` also
  cuts products of Jacobians across the converged prefix, which otherwise overflow on
  chaotic systems.
- Non-finite Jacobian entries are treated as zero (only the preconditioner changes;
  the residual test is untouched).
- If the new iterate is non-finite from some step on (overflow in the scan), those
  steps keep their previous, finite values. The step at `p` is always finite, so
  progress continues.
- If `f` itself returns NaN/Inf from the converged (finite) prefix, the trajectory is
  genuinely non-finite: the loop stops with `RESULTS.nonfinite`, and the value is NaN
  from that step on.

Window mode (`window=W < T`, used by `parassm.SlidingWindow`): each iteration works on
the `W` steps starting at the first unconverged step (clamped to `T - W`), with the
converged state just before the window as its initial state. Steps that leave the
window were converged when they left and never change again. Memory for Jacobians and
scans is `O(W)`; the bound "at most T iterations" still holds.
"""

import abc
from collections.abc import Callable

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox import AbstractVar
from jaxtyping import Array, Bool, Float, Int, PyTree

from .. import _linear as linear
from .._problem import Flat, flatten, unravel_trajectory
from .._solution import RESULTS
from ._base import AbstractSolver, default_tolerance


def batched(flat: Flat, xs: PyTree | None) -> Callable[[Array], Array]:
    """`S_prev -> (f(s_{t-1}, x_t))_t`, vectorised over time."""
    in_axes = (0, None if xs is None else 0)
    return lambda s_prev: jax.vmap(flat.fn, in_axes=in_axes)(s_prev, xs)


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


def finite_transition(transition: linear.AbstractTransition) -> linear.AbstractTransition:
    """`transition` with its non-finite entries replaced by zero."""
    a = transition.elements()
    return transition.from_elements(jnp.where(jnp.isfinite(a), a, jnp.zeros((), a.dtype)))


def shift(x: Float[Array, "T D"], first: Float[Array, " D"] | None = None) -> Array:
    """`(first, x_1, ..., x_{T-1})`: the previous step of every step (zero first by default)."""
    first = jnp.zeros_like(x[0]) if first is None else first
    # `roll` rather than `concatenate`: with time split over devices XLA's partitioner
    # turns a roll into a one-step halo exchange, but gathers a concatenation whole.
    is_first = (jnp.arange(x.shape[0]) == 0)[:, None]
    return jnp.where(is_first, first, jnp.roll(x, 1, axis=0))


def scaled_error(r: Float[Array, "T D"], fs: Float[Array, "T D"], rtol, atol) -> Array:
    """The loop's convergence measure per step: `max_i |r_ti| / (atol + rtol |f_ti|)`,
    `inf` where it is NaN. Step `t` is converged when it is at most one."""
    scaled = jnp.abs(r) / (atol + rtol * jnp.abs(fs))
    return jnp.max(jnp.where(jnp.isnan(scaled), jnp.inf, scaled), axis=1)


def first_unconverged(err_t: Float[Array, " T"]) -> Array:
    """The first step with `err_t > 1` (`T` if none). A masked `min`, not `argmin`: with
    time split over devices it is one scalar all-reduce."""
    return jnp.min(jnp.where(err_t <= 1, err_t.shape[0], jnp.arange(err_t.shape[0])))


def _merit(r: Float[Array, "T D"]) -> Float[Array, ""]:
    value = 0.5 * jnp.sum(r * r)
    return jnp.where(jnp.isfinite(value), value, jnp.asarray(jnp.inf, value.dtype))


class Iterate:
    """What a solver's `step` sees at one iteration of the shared loop.

    Every array covers the steps being iterated on (all `T` of them, or the current
    window in window mode; `T` below means that length).

    **Attributes:**

    - `flat`, `xs`: the flat recurrence and its inputs (for the window).
    - `S`: the current iterate, `(T, D)`; `s_prev` the previous states, `(T, D)`.
    - `fs`: `f(s_{t-1}, x_t)`; `r`: the residual `S - fs`.
    - `lin`: the solver's linearisation (from `linearise`), or `None`.
    - `p`: the first unconverged step (an index into `S`).
    - `iteration`: the iteration counter.
    - `rtol`, `atol`: the solver's tolerances (for `measure`).
    """

    def __init__(self, flat, xs, S, s_prev, fs, r, lin, p, iteration, step_fn, rtol, atol):
        self.flat = flat
        self.xs = xs
        self.S = S
        self.s_prev = s_prev
        self.fs = fs
        self.r = r
        self.lin = lin
        self.p = p
        self.iteration = iteration
        self.rtol = rtol
        self.atol = atol
        self._step_fn = step_fn

    @property
    def times(self) -> Array:
        return jnp.arange(self.S.shape[0])

    @property
    def keep(self) -> Bool[Array, " T"]:
        """The steps not frozen: `t >= p`."""
        return self.times >= self.p

    def merit(self, S: Float[Array, "T D"] | None = None) -> Float[Array, ""]:
        """`1/2 sum_t |s_t - f(s_{t-1}, x_t)|^2` at `S` (the current iterate by default);
        `inf` if that is not finite."""
        if S is None:
            r = self.r
        else:
            r = S - self._step_fn(shift(S, self.s_prev[0]))
        return _merit(r)

    def measure(self, S: Float[Array, "T D"]) -> tuple[Float[Array, ""], Int[Array, ""]]:
        """The merit at a trial iterate `S` (as `merit`) and its converged front: the first
        step whose scaled residual `|r_t| / (atol + rtol |f|)` exceeds one, by the loop's
        test (`T` if none does). One vectorised evaluation of `f`."""
        fs = self._step_fn(shift(S, self.s_prev[0]))
        r = S - fs
        return _merit(r), first_unconverged(scaled_error(r, fs, self.rtol, self.atol))

    def newton_correction(self, transition: linear.AbstractTransition) -> Float[Array, "T D"]:
        """The correction `delta_t = A_t delta_{t-1} - r_t` on the unfrozen steps."""
        keep = self.keep
        b = jnp.where(keep[:, None], -self.r, jnp.zeros((), self.r.dtype))
        return linear.solve(finite_transition(transition).mask(keep), b)

    def apply(self, delta: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """The next iterate `S + delta`, with the loop's safeguards: the converged prefix
        stays frozen, step `p` becomes exactly `f(s_{p-1}, x_p)`, and non-finite steps
        (from the first one on) keep their previous values."""
        times = self.times[:, None]
        S_new = jnp.where(times < self.p, self.S, self.S + delta)
        # Exactly `f(s_{p-1})` at the first unconverged step: the correction form would
        # cancel catastrophically if the old guess there were huge.
        S_new = jnp.where(times == self.p, self.fs, S_new)
        bad = ~jnp.all(jnp.isfinite(S_new), axis=1)
        # The first non-finite step by a reduction, not a cumulative sum (which
        # XLA gathers whole when time is split over devices).
        first_bad = jnp.min(jnp.where(bad, self.times, S_new.shape[0]))
        return jnp.where(times >= first_bad, self.S, S_new)


class AbstractParallelSolver(AbstractSolver):
    """A solver that iterates `s^{new}_t = A_t s^{new}_{t-1} + b_t` to convergence.

    Subclasses choose `A_t` by implementing `transition`. They may also override `step`
    (how the next iterate is made from `A_t`), with `init_state` / `state_stats` for
    state carried between iterations.
    """

    rtol: AbstractVar[float | None]
    atol: AbstractVar[float | None]

    def linearise(
        self, step: Callable[[Array], Array], s_prev: Float[Array, "T D"]
    ) -> tuple[Float[Array, "T D"], Callable | None]:
        """Evaluate the batched step at `s_prev`, with its JVP if the solver needs it."""
        return jax.linearize(step, s_prev)

    @abc.abstractmethod
    def transition(
        self,
        flat: Flat,
        xs: PyTree | None,
        s_prev: Float[Array, "T D"],
        lin: Callable | None,
        iteration: Array,
    ) -> linear.AbstractTransition:
        """The maps `A_t` for this iteration, linearised at `s_prev`."""

    def step(self, it: Iterate, state: PyTree) -> tuple[Float[Array, "T D"], PyTree]:
        """The next iterate and solver state. Default: the full Newton-type step with
        `A_t = transition(...)`. Build the iterate with `it.apply` to keep the loop's
        safeguards."""
        A = self.transition(it.flat, it.xs, it.s_prev, it.lin, it.iteration)
        return it.apply(it.newton_correction(A)), state

    def init_state(self, dtype) -> PyTree[Array]:
        """Solver state carried between iterations (none by default)."""
        return None

    def state_stats(self, state: PyTree[Array]) -> dict[str, Array]:
        """Entries the solver state adds to `Solution.stats` (none by default)."""
        return {}

    def tolerances(self, dtype) -> tuple[float, float]:
        rtol = default_tolerance(dtype) if self.rtol is None else self.rtol
        atol = default_tolerance(dtype) if self.atol is None else self.atol
        return rtol, atol

    def solve(self, f, s0, xs, length, init, max_steps):
        flat = flatten(f, s0)
        states, result, stats = self.solve_flat(flat, xs, length, init, max_steps)
        return unravel_trajectory(flat, states), result, stats

    def solve_flat(
        self,
        flat: Flat,
        xs: PyTree | None,
        length: int,
        init: PyTree | None,
        max_steps: int | None,
        *,
        window: int | None = None,
        loop: Callable = lax.while_loop,
        history: int | None = None,
    ) -> tuple[Float[Array, "T D"], RESULTS, dict[str, Array]]:
        """The Newton loop on the flat recurrence. Keyword-only options:

        - `window`: iterate on `window` steps at a time (see the module docstring).
        - `loop`: the `while_loop` to run the iterations with.
        - `history`: if given, `stats` also holds `history_prefix` and
            `history_log_residual`, of length `history + 1`: the converged prefix and
            the log of the largest scaled residual measured after `k` iterations (`-1`
            and `inf` where no iteration `k` took place).
        """
        T = length
        W = T if window is None else min(window, T)
        max_steps = T if max_steps is None else max_steps
        rtol, atol = self.tolerances(flat.s0.dtype)
        wtimes = jnp.arange(W)

        def view(S, start):
            if W == T:
                return jnp.array(0), S, flat.s0, xs
            w0 = jnp.minimum(start, T - W)
            before = S[jnp.maximum(w0 - 1, 0)]
            xs_w = jtu.tree_map(lambda x: lax.dynamic_slice_in_dim(x, w0, W), xs)
            return w0, lax.dynamic_slice_in_dim(S, w0, W), jnp.where(w0 > 0, before, flat.s0), xs_w

        def body(carry):
            S, start, iteration, _, _, state, done, trace = carry
            w0, Sw, s_before, xs_w = view(S, start)
            step_fn = batched(flat, xs_w)
            s_prev = shift(Sw, s_before)
            fs, lin = self.linearise(step_fn, s_prev)
            r = Sw - fs
            err_t = scaled_error(r, fs, rtol, atol)
            # First unconverged step (W if none), in the window and overall.
            p_w = first_unconverged(err_t)
            p = w0 + p_w
            converged = p >= T
            # (A masked reduction rather than `fs[p_w]`, which XLA would gather whole when
            # time is split over devices.)
            at_p = (wtimes == p_w)[:, None]
            nonfinite = ~converged & jnp.any(at_p & ~jnp.isfinite(fs))
            stop = converged | nonfinite | (iteration >= max_steps)

            def update():
                it = Iterate(
                    flat, xs_w, Sw, s_prev, fs, r, lin, p_w, iteration, step_fn, rtol, atol
                )
                Sw_new, new_state = self.step(it, state)
                if W == T:
                    return Sw_new, new_state
                return lax.dynamic_update_slice_in_dim(S, Sw_new, w0, axis=0), new_state

            # A window with nothing to do (every step converged) only moves on.
            idle = stop | (p_w == W)
            if trace is not None:
                log_res = jnp.log(jnp.max(err_t))
                trace = (
                    trace[0].at[iteration].set(p, mode="drop"),
                    trace[1].at[iteration].set(log_res, mode="drop"),
                )
            S_next, state = lax.cond(idle, lambda: (S, state), update)
            abs_r = jnp.max(jnp.abs(r), axis=1)
            # Steps after the window have not been measured yet.
            unmeasured = ~converged & (w0 + W < T)
            inf = jnp.asarray(jnp.inf, err_t.dtype)
            stats = dict(
                residual=jnp.where(unmeasured, inf, jnp.maximum(done[0], jnp.max(err_t))),
                max_abs_residual=jnp.where(unmeasured, inf, jnp.maximum(done[1], jnp.max(abs_r))),
                converged_prefix=p,
                nonfinite=nonfinite,
                converged=converged,
                **self.state_stats(state),
            )
            # After an update step `p` is exact, so the next window may start after it.
            start = jnp.where(idle, p, p + 1)
            # Steps leaving the window are converged and never change again (step `p`
            # now has a zero residual).
            leaving = w0 + wtimes < jnp.minimum(start, T - W)
            zero = jnp.zeros((), err_t.dtype)
            exact = wtimes == p_w
            done = (
                jnp.maximum(done[0], jnp.max(jnp.where(leaving & ~exact, err_t, zero))),
                jnp.maximum(done[1], jnp.max(jnp.where(leaving & ~exact, abs_r, zero))),
            )
            return S_next, start, iteration + jnp.where(idle, 0, 1), stop, stats, state, done, trace

        S0 = flat_initial_guess(flat, init, T)
        dtype = S0.dtype
        state0 = self.init_state(dtype)
        stats0 = dict(
            residual=jnp.array(jnp.inf, dtype),
            max_abs_residual=jnp.array(jnp.inf, dtype),
            converged_prefix=jnp.array(0),
            nonfinite=jnp.array(False),
            converged=jnp.array(False),
            **self.state_stats(state0),
        )
        done0 = (jnp.array(0, dtype), jnp.array(0, dtype))
        trace0 = None
        if history is not None:
            trace0 = (jnp.full(history + 1, -1), jnp.full(history + 1, jnp.inf, dtype))
        carry = (S0, jnp.array(0), jnp.array(0), jnp.array(False), stats0, state0, done0, trace0)
        # `loop` is `lax.while_loop`, or a reverse-differentiable (checkpointed) loop for
        # `parassm.UnrolledAdjoint`; it runs at most `max_steps + 1` bodies.
        S, _, num_steps, _, stats, _, _, trace = loop(lambda c: ~c[3], body, carry)
        if trace is not None:
            stats = dict(stats, history_prefix=trace[0], history_log_residual=trace[1])

        converged = stats.pop("converged")
        nonfinite = stats.pop("nonfinite")
        result = RESULTS.where(
            converged,
            RESULTS.successful,
            RESULTS.where(nonfinite, RESULTS.nonfinite, RESULTS.max_steps_reached),
        )
        # A genuinely non-finite trajectory is reported as such, never hidden.
        times = jnp.arange(T)
        S = jnp.where(nonfinite & (times >= stats["converged_prefix"])[:, None], jnp.nan, S)
        stats = dict(num_steps=num_steps, max_steps=jnp.array(max_steps), **stats)
        return S, result, stats
