"""The Newton loop every parallel solver shares.

Each iteration at the current guess `S = (s_1..s_T)`:

1. evaluates `f(s_{t-1}, x_t)` for all `t` at once (and linearises it),
2. measures the scaled residual `|s_t - f(s_{t-1}, x_t)| / (atol + rtol |f|)` and stops
   if it is at most one everywhere (so the returned trajectory is always the one whose
   residual was measured),
3. otherwise solves the linear recurrence of the correction
   `delta_t = A_t delta_{t-1} - r_t` with the solver's `A_t`, by one associative scan.

Safeguards, which keep the causality bound "at most T iterations" in floating point:

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
"""

import abc
from collections.abc import Callable

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox import AbstractVar
from jaxtyping import Array, Float, PyTree

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


class AbstractParallelSolver(AbstractSolver):
    """A solver that iterates `s^{new}_t = A_t s^{new}_{t-1} + b_t` to convergence.

    Subclasses choose `A_t` by implementing `transition`.
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
    ) -> tuple[Float[Array, "T D"], RESULTS, dict[str, Array]]:
        T = length
        max_steps = T if max_steps is None else max_steps
        rtol, atol = self.tolerances(flat.s0.dtype)
        step_fn = batched(flat, xs)
        times = jnp.arange(T)

        def body(carry):
            S, iteration, _, _ = carry
            s_prev = jnp.concatenate([flat.s0[None], S[:-1]])
            fs, lin = self.linearise(step_fn, s_prev)
            r = S - fs
            scaled = jnp.abs(r) / (atol + rtol * jnp.abs(fs))
            err_t = jnp.max(jnp.where(jnp.isnan(scaled), jnp.inf, scaled), axis=1)
            converged_t = err_t <= 1
            converged = jnp.all(converged_t)
            # First unconverged step (T if none).
            p = jnp.where(converged, T, jnp.argmin(converged_t))
            nonfinite = ~converged & ~jnp.all(jnp.isfinite(fs[jnp.minimum(p, T - 1)]))
            stop = converged | nonfinite | (iteration >= max_steps)

            def update():
                A = self.transition(flat, xs, s_prev, lin, iteration)
                a = A.elements()
                A = A.from_elements(jnp.where(jnp.isfinite(a), a, jnp.zeros((), a.dtype)))
                keep = times >= p
                b = jnp.where(keep[:, None], -r, jnp.zeros((), r.dtype))
                S_new = S + linear.solve(A.mask(keep), b)
                # Exactly `f(s_{p-1})` at the first unconverged step: the correction form
                # would cancel catastrophically if the old guess there were huge.
                S_new = jnp.where((times == p)[:, None], fs, S_new)
                bad = ~jnp.all(jnp.isfinite(S_new), axis=1)
                bad_from = jnp.cumsum(bad) > 0
                return jnp.where(bad_from[:, None], S, S_new)

            S_next = lax.cond(stop, lambda: S, update)
            stats = dict(
                residual=jnp.max(err_t),
                max_abs_residual=jnp.max(jnp.abs(r)),
                converged_prefix=p,
                nonfinite=nonfinite,
                converged=converged,
            )
            return S_next, iteration + jnp.where(stop, 0, 1), stop, stats

        S0 = flat_initial_guess(flat, init, T)
        dtype = S0.dtype
        stats0 = dict(
            residual=jnp.array(jnp.inf, dtype),
            max_abs_residual=jnp.array(jnp.inf, dtype),
            converged_prefix=jnp.array(0),
            nonfinite=jnp.array(False),
            converged=jnp.array(False),
        )
        carry = (S0, jnp.array(0), jnp.array(False), stats0)
        S, num_steps, _, stats = lax.while_loop(lambda c: ~c[2], body, carry)

        converged = stats.pop("converged")
        nonfinite = stats.pop("nonfinite")
        result = RESULTS.where(
            converged,
            RESULTS.successful,
            RESULTS.where(nonfinite, RESULTS.nonfinite, RESULTS.max_steps_reached),
        )
        # A genuinely non-finite trajectory is reported as such, never hidden.
        S = jnp.where(nonfinite & (times >= stats["converged_prefix"])[:, None], jnp.nan, S)
        stats = dict(num_steps=num_steps, max_steps=jnp.array(max_steps), **stats)
        return S, result, stats
