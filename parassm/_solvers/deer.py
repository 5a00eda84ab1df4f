import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
from equinox import AbstractVar
from jaxtyping import Array, Float

from .. import _linear as linear
from . import _jacobian as jacobian
from ._descent import corrects_sequentially, SEQUENTIAL_FROM
from ._parallel import AbstractNewtonSolver, Problem
from ._rules import JACOBIAN_RULES, Rules
from ._search import AbstractSearch, Backtracking


class AbstractJacobian(eqx.Module):
    r"""How [`parassm.DEER`][] and [`parassm.ELK`][] obtain the Jacobians
    $J_t = \partial f / \partial s (s_{t-1}, x_t)$ (and the values $f(s_{t-1}, x_t)$)."""

    @abc.abstractmethod
    def __call__(
        self, problem: Problem, s_prev: Float[Array, "T D"], iteration: Array
    ) -> tuple[Float[Array, "T D"], Float[Array, "T D D"]]:
        """`(f(s_{t-1}, x_t), J_t)` for every step, at the previous states `s_prev`, on
        the flattened state."""


class ExactJacobian(AbstractJacobian):
    """The Jacobians by forward-mode differentiation: `D` JVPs per step, vectorised
    over the columns and over time, with the values from the same pass. Works for any
    `f`."""

    def __call__(self, problem, s_prev, iteration):
        return jacobian.value_and_dense(problem.fn, s_prev, problem.xs)


def unformed(how: AbstractJacobian, size: int) -> bool:
    """Whether Jacobians that `how` forms are taken unformed on a machine whose linear
    scans run one step after the other: by JVPs (`ExactJacobian`), from
    `SEQUENTIAL_FROM` components (a closed form keeps its maps)."""
    return isinstance(how, ExactJacobian) and size >= SEQUENTIAL_FROM


def tangent_estimate(how: AbstractJacobian, size: int) -> bool:
    """Whether a solver whose maps are the Jacobians `how` forms makes the estimate of
    the error without them, by one JVP per step (`_descent.corrects_sequentially`):
    where they come from `D` JVPs per step and the scans are sequential anyway. The
    estimate then costs one scan of JVPs instead of a pass of dense Jacobians and a
    dense scan (GRU, `T = 1e4`, float32, this 2-core CPU: `D = 32` 13 against
    93 + 11 ms, `D = 64` 26 against 420 + 41 ms). A closed form keeps its maps."""
    return unformed(how, size) and corrects_sequentially(size)


class FunctionJacobian(AbstractJacobian):
    r"""A closed-form Jacobian you supply: `fn(state, x)` returns the `(D, D)` matrix
    $\partial f / \partial s$ at `(state, x)` on the flattened state (the leaves of the
    state, raveled and concatenated in PyTree order).

    For cells with structure this avoids the `D` JVPs per step: the Jacobian of a GRU
    or LSTM cell is a diagonal plus row-scaled copies of its recurrent weights,
    `O(D^2)` per step where the JVPs cost `O(D^3)`. [`parassm.nn.ParallelRNN`][] uses
    the closed forms of `equinox.nn.GRUCell` and `equinox.nn.LSTMCell` automatically,
    except for DEER on a CPU from 17 components, which forms no Jacobian there at all
    (one JVP per step) and is faster so.

    **Arguments:**

    - `fn`: the Jacobian function, called like the step function `f(state, x)`.
    """

    fn: Callable

    def __call__(self, problem, s_prev, iteration):
        fs = jacobian.over_time(problem.fn, problem.xs)(s_prev)

        def jac(s, x):
            out = self.fn(problem.unravel(s), x)
            D = s.shape[0]
            shape = getattr(out, "shape", None)
            if shape != (D, D):
                got = f"shape {shape}" if shape is not None else f"a {type(out).__name__}"
                raise ValueError(
                    f"`FunctionJacobian.fn` ({jacobian.describe(self.fn)}) returned {got} "
                    f"for one step; expected ({D}, {D}): the Jacobian df/ds on the "
                    f"flattened state ({D} numbers, the leaves of the state raveled and "
                    "concatenated in PyTree order), for one step (no time axis)."
                )
            return out

        return fs, jacobian.over_time(jac, problem.xs)(s_prev).astype(s_prev.dtype)


class JacobianMaps(eqx.Module):
    """The maps of a solver that linearises with the Jacobians its `jacobian` forms
    ([`parassm.DEER`][], [`parassm.ELK`][]): dense, formed in a pass of their own (a
    trial then costs only `f`), and exact; for a descent that takes only their
    products (Newton's; Levenberg-Marquardt's undamped) on a CPU from 17 components,
    not formed at all (`tangent_maps`)."""

    jacobian: AbstractVar[AbstractJacobian]

    maps_apart: ClassVar[bool] = True
    exact_maps: ClassVar[bool] = True

    def error_jacobians(self, size):
        return tangent_estimate(self.jacobian, size)

    def tangent_maps(self, size):
        # The Newton correction needs only products with the Jacobians. So does ELK's
        # where its search takes only the undamped and the Jacobi steps (the default
        # `TrustRegion`): the Newton correction by the same scan, and a model of the
        # merit, where the search makes one, by one parallel pass of JVPs. A damped
        # step needs them formed, for the Kalman smoother.
        return self.descent.products_only and tangent_estimate(self.jacobian, size)

    def linearise(self, problem, s_prev, iteration):
        fs, J = self.jacobian(problem, s_prev, iteration)
        return fs, linear.Dense(J)


class DEER(JacobianMaps, AbstractNewtonSolver):
    r"""Newton's method on the residual system, with the full Jacobian (DEER).

    Each iteration solves $s^{new}_t = J_t s^{new}_{t-1} + b_t$ with the dense Jacobian
    $J_t = \partial f / \partial s (s_{t-1}, x_t)$. Converges quadratically near the
    solution and in exactly one iteration on linear dynamics.

    Cost per iteration: `D` JVPs of `f` per step for the Jacobians (vectorised), an
    associative scan over `D x D` matrices (`O(T D^3)` work, `O(T D^2)` memory) and one
    evaluation of `f` at the new iterate. Where the linear scans run one step after
    the other anyway (`parassm.linear.LoopScan`, the CPU's default) and the state has
    17 components or more, the Jacobians are not formed: the Newton correction is a
    scan of one JVP per step (`O(T D)` memory), the same correction for fewer
    operations. Use [`parassm.QuasiDEER`][] for large `D`.

    **Arguments:**

    - `rtol`, `atol`: the tolerance on the residual: step `t` is converged when
        $\max_i |s_{t,i} - f_i(s_{t-1}, x_t)| \le \mathrm{atol} + \mathrm{rtol}
        \max(\|f(s_{t-1}, x_t)\|_\infty, \nu)$, where $\nu$ is the largest
        $\|f\|_\infty$ over the leading steps that meet the purely relative test (see
        the [convergence criterion](../theory.md#convergence-criterion)). `None`
        means `rtol = eps ** 0.7` of the state's dtype (about `1.4e-5` in float32,
        `1.1e-11` in float64) and `atol = 0`: the test is invariant to the scale of
        the state.
    - `jacobian`: how to get the Jacobians: [`parassm.ExactJacobian`][] (default;
        `D` JVPs per step) or [`parassm.FunctionJacobian`][] (a closed form you
        supply).
    - `search`: which trial steps to take: [`parassm.Backtracking`][] (default: the
        Newton step when it makes progress, else back towards the Jacobi step; costs
        nothing when Newton works) or [`parassm.Undamped`][] (always the full Newton
        step, the original DEER). See also [`parassm.ELK`][].
    - `rules`: the loop's rules ([`parassm.Rules`][]; default: every restart,
        at rest included, and `KeepFront`). `None` in place of a rule switches it off.

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

    jacobian: AbstractJacobian = ExactJacobian()
    rtol: float | None = None
    atol: float | None = None
    search: AbstractSearch = Backtracking()
    rules: Rules = JACOBIAN_RULES
