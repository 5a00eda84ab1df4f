from .. import _linear as linear
from . import _jacobian as jacobian
from ._parallel import AbstractNewtonSolver
from ._search import AbstractSearch, Undamped


class DEER(AbstractNewtonSolver):
    r"""Newton's method on the residual system, with the full Jacobian (DEER).

    Each iteration solves $s^{new}_t = J_t s^{new}_{t-1} + b_t$ with the dense Jacobian
    $J_t = \partial f / \partial s (s_{t-1}, x_t)$. Converges quadratically near the
    solution and in exactly one iteration on linear dynamics.

    Cost per iteration: `D` JVPs of `f` per step for the Jacobians (vectorised), an
    associative scan over `D x D` matrices (`O(T D^3)` work, `O(T D^2)` memory) and one
    evaluation of `f` at the new iterate. Use [`parassm.QuasiDEER`][] for large `D`.

    **Arguments:**

    - `rtol`, `atol`: the tolerance on the residual: step `t` is converged when
        $\max_i |s_{t,i} - f_i(s_{t-1}, x_t)| \le \mathrm{atol} + \mathrm{rtol}
        \max(\|f(s_{t-1}, x_t)\|_\infty, \nu)$, where $\nu$ is the largest
        $\|f\|_\infty$ over the leading steps that meet the purely relative test (see
        the [convergence criterion](../theory.md#convergence-criterion)). `None`
        means `rtol = eps ** 0.7` of the state's dtype (about `1.4e-5` in float32,
        `1.1e-11` in float64) and `atol = 0`: the test is invariant to the scale of
        the state.
    - `search`: how far to move along each Newton correction:
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
    search: AbstractSearch = Undamped()

    def linearise(self, problem, s_prev, iteration):
        fs, J = jacobian.value_and_dense(problem.fn, s_prev, problem.xs)
        return fs, linear.Dense(J)
