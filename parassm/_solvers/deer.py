from .. import _linear as linear
from . import _jacobian as jacobian
from ._base import check_tolerances
from ._parallel import AbstractParallelSolver
from .globalization import AbstractGlobalization, Undamped


class DEER(AbstractParallelSolver):
    r"""Newton's method on the residual system, with the full Jacobian (DEER).

    Each iteration solves $s^{new}_t = J_t s^{new}_{t-1} + b_t$ with the dense Jacobian
    $J_t = \partial f / \partial s (s_{t-1}, x_t)$. Converges quadratically near the
    solution and in exactly one iteration on linear dynamics.

    Cost per iteration: `D` JVPs of `f` for the Jacobians, and an associative scan over
    `D x D` matrices: `O(T D^3)` work and `O(T D^2)` memory. Use
    [`parassm.QuasiDEER`][] for large `D`.

    **Arguments:**

    - `rtol`, `atol`: the tolerance on the residual: a step is converged when
        $|s_{t,i} - f_i(s_{t-1}, x_t)| \le \mathrm{atol} + \mathrm{rtol} |f_i|$ for
        every component `i`. `None` means `eps ** 0.7` of the state's dtype (about
        `1.4e-5` in float32, `1.1e-11` in float64).
    - `globalization`: how far to move along each Newton correction:
        [`parassm.Undamped`][] (default, the full step) or [`parassm.Backtracking`][]
        (a merit line search, for strongly nonlinear systems). See also
        [`parassm.ELK`][].

    ??? cite "References"

        ```bibtex
        @inproceedings{lim2024parallelizing,
            title={Parallelizing non-linear sequential models over the sequence length},
            author={Lim, Yi Heng and Zhu, Qi and Selfridge, Joshua and Kasim, Muhammad Firmansyah},
            booktitle={International Conference on Learning Representations},
            year={2024}
        }
        ```
    """

    rtol: float | None = None
    atol: float | None = None
    globalization: AbstractGlobalization = Undamped()

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol)

    def step(self, it, state):
        A = self.transition(it.flat, it.xs, it.s_prev, it.lin, it.iteration)
        return self.globalization(it, it.newton_correction(A)), state

    def transition(self, flat, xs, s_prev, lin, iteration):
        T, D = s_prev.shape
        return linear.Dense(jacobian.dense(lin, T, D, s_prev.dtype))
