import jax.numpy as jnp

from .. import _linear as linear
from . import _jacobian as jacobian
from ._parallel import AbstractNewtonSolver
from ._rules import Rules
from ._search import AbstractSearch, Undamped


class Picard(AbstractNewtonSolver):
    r"""Picard iteration: $A_t = I$, so each iteration is a cumulative sum.

    $s^{new}_t = s^{new}_{t-1} + f(s_{t-1}, x_t) - s_{t-1}$. Zeroth order (no
    derivatives of `f`); `O(T D)` per iteration. Good when `f` is close to the
    identity (small-step discretisations of slow flows); otherwise it needs up to `T`
    iterations.

    Once the residual meets its tolerance, the estimate of the trajectory's error uses
    the exact Jacobians (`D` JVPs per step, or on a CPU from 17 components one JVP per
    step in a sequential scan): the iteration's own maps say nothing of how errors
    propagate.

    **Arguments:**

    - `rtol`, `atol`, `search`: as for [`parassm.DEER`][].
    - `rules`: the loop's rules ([`parassm.Rules`][]; default: every rule but the
        restart at rest). `None` in place of a rule switches it off.
    """

    rtol: float | None = None
    atol: float | None = None
    search: AbstractSearch = Undamped()
    rules: Rules = Rules()

    def linearise(self, problem, s_prev, iteration):
        fs = jacobian.over_time(problem.fn, problem.xs)(s_prev)
        return fs, linear.Scalar(jnp.ones(s_prev.shape[0], s_prev.dtype))
