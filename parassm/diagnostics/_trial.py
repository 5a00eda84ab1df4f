"""A short trial of a parallel solver on a prefix of the problem, recording how fast the
converged prefix grows.

Causality makes one trial informative about every shorter problem: the iterates on the
first `t` steps do not depend on later steps, so the number of iterations a problem of
length `t <= T_p` needs is the first iteration at which the converged prefix of the
length-`T_p` trial reaches `t`. The loop mirrors the shared Newton loop of
`parassm/_solvers/_parallel.py` (same residual test, frozen converged prefix, exact
update at the first unconverged step), but stops after `max_iters` iterations and
keeps the history.
"""

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree

from .. import _linear as linear
from .._problem import Flat
from .._solvers._parallel import AbstractParallelSolver, batched


def converged_prefix_history(
    solver: AbstractParallelSolver, flat: Flat, xs: PyTree | None, length: int, max_iters: int
) -> tuple[Int[Array, " K1"], Float[Array, " K1"]]:
    """`(prefix, log_residual)`: after `k` iterations, `k = 0..max_iters`, the converged
    prefix (non-decreasing; `length` once converged) and the log of the largest scaled
    residual (converged where `<= 0`)."""
    T = length
    rtol, atol = solver.tolerances(flat.s0.dtype)
    step_fn = batched(flat, xs)
    times = jnp.arange(T)

    def body(carry):
        S, it, _, (history, log_res) = carry
        s_prev = jnp.concatenate([flat.s0[None], S[:-1]])
        fs, lin = solver.linearise(step_fn, s_prev)
        r = S - fs
        scaled = jnp.abs(r) / (atol + rtol * jnp.abs(fs))
        converged_t = jnp.max(jnp.where(jnp.isnan(scaled), jnp.inf, scaled), axis=1) <= 1
        converged = jnp.all(converged_t)
        p = jnp.where(converged, T, jnp.argmin(converged_t))
        history = history.at[it].set(p)
        log_res = log_res.at[it].set(
            jnp.log(jnp.max(jnp.where(jnp.isnan(scaled), jnp.inf, scaled)))
        )
        nonfinite = ~converged & ~jnp.all(jnp.isfinite(fs[jnp.minimum(p, T - 1)]))
        stop = converged | nonfinite | (it >= max_iters)

        def update():
            A = solver.transition(flat, xs, s_prev, lin, it)
            a = A.elements()
            A = A.from_elements(jnp.where(jnp.isfinite(a), a, jnp.zeros((), a.dtype)))
            keep = times >= p
            b = jnp.where(keep[:, None], -r, jnp.zeros((), r.dtype))
            S_new = S + linear.solve(A.mask(keep), b)
            S_new = jnp.where((times == p)[:, None], fs, S_new)
            bad_from = jnp.cumsum(~jnp.all(jnp.isfinite(S_new), axis=1)) > 0
            return jnp.where(bad_from[:, None], S, S_new)

        S = lax.cond(stop, lambda: S, update)
        return S, it + jnp.where(stop, 0, 1), stop, (history, log_res)

    S0 = jnp.broadcast_to(flat.s0, (T, flat.size))
    history0 = jnp.full((max_iters + 1,), -1)
    log_res0 = jnp.full((max_iters + 1,), jnp.inf, S0.dtype)
    carry = (S0, jnp.array(0), jnp.array(False), (history0, log_res0))
    _, it, _, (history, log_res) = lax.while_loop(lambda c: ~c[2], body, carry)
    # Entries after the last measured iteration repeat the last value.
    after = jnp.arange(max_iters + 1) > it
    return jnp.where(after, history[it], history), jnp.where(after, log_res[it], log_res)


def steps_to_reach(history: Int[Array, " K1"], t: int | Array) -> Array:
    """Iterations a problem of length `t` needs according to `history` (-1 if the
    trial did not get that far)."""
    reached = history >= t
    return jnp.where(jnp.any(reached), jnp.argmax(reached), -1)
