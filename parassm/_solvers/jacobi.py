from .. import _linear as linear
from ._base import check_tolerances
from ._parallel import AbstractParallelSolver


class Jacobi(AbstractParallelSolver):
    r"""Jacobi (fixed-point) iteration: $A_t = 0$, so $s^{new}_t = f(s_{t-1}, x_t)$.

    Zeroth order and fully parallel: no scan at all, `O(T D)` per iteration. Converges
    in about `T` iterations unless `f` forgets its state quickly.

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
        return linear.Zero(s_prev.shape[0])
