from .. import _linear as linear
from . import _jacobian as jacobian
from ._parallel import AbstractNewtonSolver
from ._rules import Rules
from ._search import AbstractSearch, Undamped


class Jacobi(AbstractNewtonSolver):
    r"""Jacobi (fixed-point) iteration: $A_t = 0$, so $s^{new}_t = f(s_{t-1}, x_t)$.

    Zeroth order and fully parallel: no scan at all, `O(T D)` per iteration. Converges
    in about `T` iterations unless `f` forgets its state quickly.

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
        return fs, linear.Zero(s_prev.shape[0])
