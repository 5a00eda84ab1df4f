"""Globalization of Newton-type steps: how far to move along the proposed correction."""

import abc

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._parallel import Iterate


class AbstractGlobalization(eqx.Module):
    """How [`parassm.DEER`][] and [`parassm.QuasiDEER`][] turn a correction `delta`
    into the next iterate."""

    @abc.abstractmethod
    def __call__(self, it: Iterate, delta: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """The next iterate; built with `it.apply` so the loop's safeguards hold."""


class Undamped(AbstractGlobalization):
    """The full step `S + delta` (plain DEER / quasi-DEER). Fastest near the solution;
    can overshoot or overflow on strongly nonlinear or unpredictable systems."""

    def __call__(self, it, delta):
        return it.apply(delta)


class Backtracking(AbstractGlobalization):
    r"""Backtracking line search on the merit $L(S) = \frac12 \sum_t |s_t - f(s_{t-1},
    x_t)|^2$.

    Tries $S + \alpha\,\delta$ for $\alpha = 1, \beta, \beta^2, \ldots$ and takes the first
    one with $L(S + \alpha\delta) \le (1 - c\,\alpha) L(S)$. If none of the
    `max_backtracks + 1` trials passes, the one with the smallest merit is taken (the
    shortest on ties, e.g. when every trial overflows; the
    converged prefix still grows by at least one step: step `p` is always set to
    $f(s_{p-1}, x_p)$). Each trial costs one vectorised evaluation of `f` over the
    sequence, no derivatives.

    **Arguments:**

    - `shrink`: $\beta \in (0, 1)$, the step shrink factor (default 0.5).
    - `decrease`: $c \in (0, 1)$, the sufficient-decrease constant (default 1e-4).
    - `max_backtracks`: how many times to shrink at most (default 8).
    """

    shrink: float = 0.5
    decrease: float = 1e-4
    max_backtracks: int = eqx.field(default=8, static=True)

    def __check_init__(self):
        if not 0 < self.shrink < 1:
            raise ValueError(f"`shrink` must be in (0, 1), got {self.shrink}.")
        if not 0 < self.decrease < 1:
            raise ValueError(f"`decrease` must be in (0, 1), got {self.decrease}.")
        if self.max_backtracks < 0:
            raise ValueError(f"`max_backtracks` must be >= 0, got {self.max_backtracks}.")

    def __call__(self, it, delta):
        dtype = delta.dtype
        merit0 = it.merit()
        one = jnp.ones((), dtype)

        def cond(carry):
            k, _, ok, _, _ = carry
            return ~ok & (k <= self.max_backtracks)

        def body(carry):
            k, alpha, _, best_alpha, best_merit = carry
            merit = it.merit(it.apply(alpha * delta))
            ok = merit <= (1 - self.decrease * alpha) * merit0
            # Ties go to the shorter step: if every trial overflows, move the least.
            better = merit <= best_merit
            best_alpha = jnp.where(ok | better, alpha, best_alpha)
            best_merit = jnp.where(ok | better, merit, best_merit)
            return k + 1, alpha * self.shrink, ok, best_alpha, best_merit

        inf = jnp.asarray(jnp.inf, dtype)
        carry = (jnp.array(0), one, jnp.array(False), one, inf)
        *_, alpha, _ = lax.while_loop(cond, body, carry)
        return it.apply(alpha * delta)
