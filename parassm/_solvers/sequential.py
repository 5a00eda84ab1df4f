import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._solution import RESULTS
from ._base import AbstractSolver


class Sequential(AbstractSolver):
    """Evaluate the recurrence one step after another with `jax.lax.scan`.

    The reference every parallel solver is tested against, and the right choice when
    parallel evaluation cannot pay off: chaotic systems (largest Lyapunov exponent > 0),
    short sequences, or hardware where a vectorised step costs about as much as a
    sequential one (a CPU with few cores). `parassm.scan(..., solver=Sequential())` is
    `jax.lax.scan` exactly.

    **Arguments:**

    - `unroll`: passed to `jax.lax.scan`.
    """

    unroll: int = 1

    def runs_sequentially(self, s0, length):
        return True

    def solve(self, f, s0, xs, length, init, max_steps):
        def step(s, x):
            s = f(s, x)
            return s, s

        _, value = lax.scan(step, s0, xs, length=length, unroll=self.unroll)
        finite = jnp.array(True)
        for leaf in jtu.tree_leaves(value):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                finite = finite & jnp.all(jnp.isfinite(leaf))
        result = RESULTS.where(finite, RESULTS.successful, RESULTS.nonfinite)
        zero = jnp.array(0)
        stats = dict(
            num_steps=zero,
            max_steps=zero,
            residual=jnp.array(0.0),
            max_abs_residual=jnp.array(0.0),
            converged_prefix=jnp.array(length),
        )
        return value, result, stats
