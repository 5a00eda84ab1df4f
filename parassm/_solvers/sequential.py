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
        # Steps with a non-finite number in any inexact leaf: the trajectory is right
        # only before the first of them, and its residual there is not small.
        bad = jnp.zeros((length,), bool)
        for leaf in jtu.tree_leaves(value):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                bad = bad | ~jnp.all(jnp.isfinite(leaf), axis=tuple(range(1, leaf.ndim)))
        finite = ~jnp.any(bad)
        result = RESULTS.where(finite, RESULTS.successful, RESULTS.nonfinite)
        zero = jnp.array(0)
        residual = jnp.where(finite, jnp.array(0.0), jnp.array(jnp.inf))
        stats = dict(
            num_steps=zero,
            max_steps=zero,
            residual=residual,
            max_abs_residual=residual,
            converged_prefix=jnp.where(finite, length, jnp.argmax(bad)),
        )
        return value, result, stats
