r"""ELK and quasi-ELK: Levenberg-Marquardt steps on the residual system, solved exactly
as a linear-Gaussian smoothing problem by the parallel Kalman smoother.

At the iterate $S$ with residuals $r_t = s_t - f(s_{t-1}, x_t)$ and transitions
$A_t \approx J_t$, the step $\Delta$ minimises

$$\sum_t |r_t + \Delta_t - A_t \Delta_{t-1}|^2 + \lambda \sum_t |\Delta_t|^2,$$

which is the posterior mean of the model $\Delta_t = A_t \Delta_{t-1} - r_t + w_t$,
$w_t \sim N(0, I)$, observed as $0 = \Delta_t + v_t$, $v_t \sim N(0, I / \lambda)$
(`_descent.LevenbergMarquardtDescent`). The damping $\lambda$ is chosen by the solver's
search ([`parassm.TrustRegion`][] by default).
"""

from ._parallel import AbstractLevenbergMarquardtSolver
from ._rules import JACOBIAN_RULES, Rules
from ._search import AbstractSearch, TrustRegion
from .deer import AbstractJacobian, ExactJacobian, JacobianMaps
from .quasi_deer import AbstractDiagonal, DiagonalMaps, ExactDiagonal


class ELK(JacobianMaps, AbstractLevenbergMarquardtSolver):
    r"""ELK: Levenberg-Marquardt steps with the full Jacobian, each solved exactly by a
    parallel Kalman smoother.

    Each iteration minimises $|r + J_r \Delta|^2 + \lambda |\Delta|^2$ over the
    correction $\Delta$ ($J_r$: the block-bidiagonal residual Jacobian). As
    $\lambda \to 0$ this is [`parassm.DEER`][]; as $\lambda \to \infty$, a short step
    down the gradient of the merit. With the default search
    ([`parassm.TrustRegion`][]) ELK starts at the floor of $\lambda$ (the Newton step)
    and falls back to the Jacobi step when the Newton step fails its test, as DEER does:
    on every system of the convergence benchmark that was at least as fast as a damped
    retry. Damping is used when asked for: `TrustRegion(initial_damping=...)`,
    `TrustRegion(max_trials=3)` (a damped retry before the Jacobi step), or
    [`parassm.FixedDamping`][].

    Cost per iteration: as [`parassm.DEER`][] (`D` JVPs per step, `O(T D^3)` work,
    `O(T D^2)` memory) plus one evaluation of `f`, and for each damped trial a Kalman
    smoother (two associative scans, one `D x D` inverse per combine) instead of the
    scan. A search that cannot damp (the default) leaves the smoother out of the
    program (on a CPU, ELK then runs in DEER's time and compiles 3x faster), and
    where DEER forms no Jacobians (on a CPU from 17 components: one JVP per step in
    the scan), neither does ELK then.

    **Arguments:**

    - `search`: how the damping $\lambda$ is chosen: [`parassm.TrustRegion`][]
        (default; adaptive), [`parassm.FixedDamping`][] (a constant) or
        [`parassm.Backtracking`][] (halving `1 / lambda` until the merit decreases).
    - `rules`: the loop's rules ([`parassm.Rules`][]; default: every restart,
        at rest included, and `KeepFront`). `None` in place of a rule switches it off.
    - `jacobian`: as for [`parassm.DEER`][].
    - `rtol`, `atol`: as for [`parassm.DEER`][].

    `Solution.stats` gains `damping` (the final $\lambda$) and `num_trials` (smoother
    solves in all).

    ??? cite "References"

        ```bibtex
        @inproceedings{gonzalez2024towards,
            title={Towards Scalable and Stable Parallelization of Nonlinear RNNs},
            author={Gonzalez, Xavier and Warrington, Andrew and Smith, Jimmy T.H. and
                    Linderman, Scott W.},
            booktitle={Advances in Neural Information Processing Systems},
            year={2024}
        }
        @article{sarkka2021temporal,
            title={Temporal Parallelization of Bayesian Smoothers},
            author={S{\"a}rkk{\"a}, Simo and Garc{\'\i}a-Fern{\'a}ndez, {\'A}ngel F.},
            journal={IEEE Transactions on Automatic Control},
            year={2021}
        }
        ```
    """

    search: AbstractSearch = TrustRegion()
    rules: Rules = JACOBIAN_RULES
    jacobian: AbstractJacobian = ExactJacobian()
    rtol: float | None = None
    atol: float | None = None


class QuasiELK(DiagonalMaps, AbstractLevenbergMarquardtSolver):
    r"""Quasi-ELK: Levenberg-Marquardt steps with the diagonal of the Jacobian, solved
    by an elementwise parallel Kalman smoother (`O(T D)` memory and work).

    The scalable damped method: [`parassm.QuasiDEER`][] as $\lambda \to 0$. With the
    default search it damps only when asked to, as [`parassm.ELK`][].

    **Arguments:**

    - `search`: as for [`parassm.ELK`][].
    - `rules`: the loop's rules ([`parassm.Rules`][]; default: every rule but the
        restart at rest). `None` in place of a rule switches it off.
    - `diagonal`, `relinearise`: as for [`parassm.QuasiDEER`][].
    - `rtol`, `atol`: as for [`parassm.DEER`][].

    See [`parassm.ELK`][] for references.
    """

    search: AbstractSearch = TrustRegion()
    rules: Rules = Rules()
    diagonal: AbstractDiagonal = ExactDiagonal()
    rtol: float | None = None
    atol: float | None = None
    relinearise: float | None = None
