"""A short trial of a parallel solver on a prefix of the problem, recording how fast the
converged prefix grows.

Causality makes one trial informative about every shorter problem: the iterates on the
first `t` steps do not depend on later steps, so the number of iterations a problem of
length `t <= T_p` needs is the first iteration at which the converged prefix of the
length-`T_p` trial reaches `t`. The trial is the shared Newton loop of
`parassm/_solvers/_loop.py` itself, stopped after `max_iters` iterations, with its
per-iteration history.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree

from .._problem import Flat
from .._solvers._parallel import AbstractParallelSolver, History, solve_flat


def converged_prefix_history(
    solver: AbstractParallelSolver, flat: Flat, xs: PyTree | None, length: int, max_iters: int
) -> tuple[Int[Array, " K1"], Float[Array, " K1"]]:
    """`(prefix, log_residual)`: after `k` iterations, `k = 0..max_iters`, the converged
    prefix (non-decreasing; `length` once converged) and the log of the largest scaled
    residual (converged where `<= 0`)."""
    _, _, stats = solve_flat(solver, flat, xs, length, None, max_iters, observer=History(max_iters))
    history, log_res = stats["record"]
    it = stats["num_steps"]
    # Entries after the last measured iteration repeat the last value.
    after = jnp.arange(max_iters + 1) > it
    return jnp.where(after, history[it], history), jnp.where(after, log_res[it], log_res)


def steps_to_reach(history: Int[Array, " K1"], t: int | Array) -> Array:
    """Iterations a problem of length `t` needs according to `history` (-1 if the
    trial did not get that far)."""
    reached = history >= t
    return jnp.where(jnp.any(reached), jnp.argmax(reached), -1)
