import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from equinox import AbstractVar
from jaxtyping import Array, Float

from .. import _linear as linear
from . import _jacobian as jacobian
from ._parallel import AbstractNewtonSolver, default_reuse_threshold, Problem
from ._rules import Rules
from ._search import AbstractSearch, Backtracking


class AbstractDiagonal(eqx.Module):
    """How [`parassm.QuasiDEER`][] obtains the diagonals of the Jacobians
    $\\partial f / \\partial s (s_{t-1}, x_t)$."""

    @abc.abstractmethod
    def __call__(
        self, problem: Problem, s_prev: Float[Array, "T D"], iteration: Array
    ) -> tuple[Float[Array, "T D"], Float[Array, "T D"]]:
        """`(f(s_{t-1}, x_t), diag J_t)` for every step at the previous states `s_prev`;
        `iteration` counts the evaluations (e.g. to draw fresh random probes)."""

    def evaluations(self, size: int) -> float:
        """The cost of the diagonals beyond the values, in evaluations of `f` (one JVP
        counts as one), at state size `size`: `size` unless a subclass knows better."""
        return float(size)


class ExactDiagonal(AbstractDiagonal):
    """The exact diagonal, one JVP per state component (`D` JVPs per iteration), with
    `O(T D)` memory.

    **Arguments:**

    - `batch_size`: how many JVPs run at once (vectorised); `None` runs all `D` at
        once, which is fastest when `T x D x D` numbers fit in memory.
    """

    batch_size: int | None = eqx.field(default=None, static=True)

    def __call__(self, problem, s_prev, iteration):
        return jacobian.value_and_diagonal(problem.fn, s_prev, problem.xs, self.batch_size)


class HutchinsonDiagonal(AbstractDiagonal):
    r"""A stochastic estimate of the diagonal: $\mathrm{diag}(J) \approx
    \frac{1}{m} \sum_k v_k \odot J v_k$ with Rademacher vectors $v_k$ (unbiased).

    Costs `num_samples` JVPs per iteration, whatever `D` is. The estimate is noisy when
    the off-diagonal part of the Jacobian is large compared to the diagonal; the
    residual test is exact regardless, so noise only costs iterations.

    **Arguments:**

    - `num_samples`: number of probe vectors per iteration.
    - `seed`: the seed of the probes (a fresh probe is drawn every iteration).
    """

    num_samples: int = eqx.field(default=1, static=True)
    seed: int = eqx.field(default=0, static=True)

    def __check_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"`num_samples` must be at least 1, got {self.num_samples}.")

    def evaluations(self, size):
        return float(self.num_samples)

    def __call__(self, problem, s_prev, iteration):
        key = jr.fold_in(jr.key(self.seed), iteration)
        probes = jr.rademacher(key, (self.num_samples,) + s_prev.shape, dtype=s_prev.dtype)
        step = jacobian.over_time(problem.fn, problem.xs)

        def product(v):
            return jax.jvp(step, (s_prev,), (v,))

        fs, products = jax.vmap(product, out_axes=(None, 0))(probes)
        return fs, jnp.mean(probes * products, axis=0)


class FunctionDiagonal(AbstractDiagonal):
    """A user-supplied diagonal: `fn(state, x)` returns the diagonal of
    $\\partial f / \\partial s$ at `(state, x)`, as a PyTree shaped like the state.

    For cells whose Jacobian diagonal has a closed form this is the cheapest choice:
    no JVPs at all.

    **Arguments:**

    - `fn`: the diagonal function, called like the step function `f(state, x)`.
    """

    fn: Callable

    def evaluations(self, size):
        return 1.0

    def __call__(self, problem, s_prev, iteration):
        def diag(s, x):
            state = problem.unravel(s)
            out = self.fn(state, x)
            jacobian.check_supplied(
                self.fn, out, state, "FunctionDiagonal", "the diagonal of df/ds"
            )
            return jnp.concatenate([jnp.ravel(leaf) for leaf in jtu.tree_leaves(out)])

        fs = jacobian.over_time(problem.fn, problem.xs)(s_prev)
        return fs, jacobian.over_time(diag, problem.xs)(s_prev).astype(s_prev.dtype)


class DiagonalMaps(eqx.Module):
    """The maps of a solver that linearises with the diagonals its `diagonal` gives
    ([`parassm.QuasiDEER`][], [`parassm.QuasiELK`][]): formed with the values in one
    pass, kept after fast steps as `relinearise` says."""

    diagonal: AbstractVar[AbstractDiagonal]
    relinearise: AbstractVar[float | None]

    def reuse_threshold(self, size, length):
        evaluations = self.diagonal.evaluations(size)
        return default_reuse_threshold(self.relinearise, evaluations, length)

    def error_jacobians(self, size):
        # Where the diagonals cost `D` JVPs per step anyway (`ExactDiagonal`), and are
        # not the Jacobians themselves (`D = 1`).
        return size > 1 and self.diagonal.evaluations(size) >= size

    def linearise(self, problem, s_prev, iteration):
        fs, diagonal = self.diagonal(problem, s_prev, iteration)
        return fs, linear.Diagonal(diagonal)


class QuasiDEER(DiagonalMaps, AbstractNewtonSolver):
    r"""Quasi-Newton with the diagonal of the Jacobian (quasi-DEER).

    Each iteration solves $s^{new}_t = \mathrm{diag}(J_t) s^{new}_{t-1} + b_t$ by a
    diagonal associative scan: `O(T D)` memory and work besides obtaining the diagonal.
    Converges linearly where DEER converges quadratically, but scales to large `D`.
    When the Jacobian's diagonal is zero (e.g. the mean-field RNN with
    `W_ii = 0`), it reduces to [`parassm.Jacobi`][].

    **Arguments:**

    - `diagonal`: how to get the diagonal: [`parassm.ExactDiagonal`][] (default; `D`
        JVPs), [`parassm.HutchinsonDiagonal`][] (a stochastic estimate, `num_samples`
        JVPs) or [`parassm.FunctionDiagonal`][] (a closed form you supply).
    - `relinearise`: when to form new diagonals. At an iterate reached by a fast step
        (the merit, the mean squared scaled residual, fell below `relinearise` times
        its previous value, and no trial was rejected) the diagonals of the last
        linearisation are kept: the iteration is a chord step, one evaluation of `f`
        and one scan, no JVPs. New ones are formed after a slow step or a rejection,
        after a kept step much slower than the last fresh one, after a fresh step much
        faster than the one before it (superlinear convergence: the diagonal is close
        to the whole Jacobian), and after 3 kept steps in a row. `0` forms them at
        every iterate (quasi-DEER as published). `None` (default): 0.25 where the
        diagonals of the whole sequence cost at least `2**17` evaluations of `f`
        (`T` times `D` for `ExactDiagonal`), else 0: keeping them pays on large
        problems and costs a little time on small ones (measured on a GRU, float32,
        2 CPU cores: `H = 32`, `T = 1e4`, 3 diagonals for the same 9 steps, 0.8x the
        time; `T = 1e3`, up to 1.3x). The diagonal is an approximation of the Jacobian
        anyway, and one formed a few iterates back is about as good.
        `Solution.stats["num_linearisations"]` counts them.
    - `rtol`, `atol`, `search`: as for [`parassm.DEER`][].
    - `rules`: the loop's rules ([`parassm.Rules`][]; default: every rule but the
        restart at rest). `None` in place of a rule switches it off.

    ??? cite "References"

        ```bibtex
        @inproceedings{gonzalez2024towards,
            title={Towards Scalable and Stable Parallelization of Nonlinear RNNs},
            author={Gonzalez, Xavier and Warrington, Andrew and Smith, Jimmy T.H. and
                    Linderman, Scott W.},
            booktitle={Advances in Neural Information Processing Systems},
            year={2024}
        }
        ```
    """

    diagonal: AbstractDiagonal = ExactDiagonal()
    rtol: float | None = None
    atol: float | None = None
    search: AbstractSearch = Backtracking()
    rules: Rules = Rules()
    relinearise: float | None = None
