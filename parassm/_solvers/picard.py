import jax.numpy as jnp

from .. import _linear as linear
from ._base import check_tolerances
from ._parallel import AbstractParallelSolver


class Picard(AbstractParallelSolver):
    r"""Picard iteration: $A_t = I$, so each iteration is a cumulative sum.

    $s^{new}_t = s^{new}_{t-1} + f(s_{t-1}, x_t) - s_{t-1}$. Zeroth order (no
    derivatives of `f`); `O(T D)` per iteration. Good when `f` is close to the
    identity (small-step discretisations of slow flows); otherwise it needs up to `T`
    iterations.

    **Arguments:**

    - `rtol`, `atol`: as for [`parassm.DEER`][].
    """

    rtol: float | None = None
    atol: float | None = None

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol)

    def linearise(self, step, s_prev):
        return step(s_prev), None

    def transition(self, flat, xs, s_prev, lin, iteration):
        return linear.Scalar(jnp.ones(s_prev.shape[0], s_prev.dtype))
