import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Float, PyTree

from .. import _linear as linear
from .._problem import Flat
from . import _jacobian as jacobian
from ._base import check_tolerances
from ._parallel import AbstractParallelSolver
from .globalization import AbstractGlobalization, Undamped


class AbstractDiagonal(eqx.Module):
    """How [`parassm.QuasiDEER`][] obtains the diagonals of the Jacobians
    $\\partial f / \\partial s (s_{t-1}, x_t)$."""

    needs_jvp: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def __call__(
        self,
        flat: Flat,
        xs: PyTree | None,
        s_prev: Float[Array, "T D"],
        lin: Callable | None,
        iteration: Array,
    ) -> Float[Array, "T D"]:
        """The `(T, D)` diagonals at `s_prev`."""


class ExactDiagonal(AbstractDiagonal):
    """The exact diagonal, one JVP per state component (`D` JVPs per iteration), with
    `O(T D)` memory.

    **Arguments:**

    - `batch_size`: how many JVPs run at once (vectorised); `None` runs all `D` at
        once, which is fastest when `T x D x D` numbers fit in memory.
    """

    needs_jvp = True
    batch_size: int | None = eqx.field(default=None, static=True)

    def __call__(self, flat, xs, s_prev, lin, iteration):
        T, D = s_prev.shape
        return jacobian.diagonal(lin, T, D, s_prev.dtype, self.batch_size)


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

    needs_jvp = True
    num_samples: int = eqx.field(default=1, static=True)
    seed: int = eqx.field(default=0, static=True)

    def __check_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"`num_samples` must be at least 1, got {self.num_samples}.")

    def __call__(self, flat, xs, s_prev, lin, iteration):
        key = jr.fold_in(jr.key(self.seed), iteration)
        probes = jr.rademacher(key, (self.num_samples,) + s_prev.shape, dtype=s_prev.dtype)
        return jnp.mean(probes * jax.vmap(lin)(probes), axis=0)


class FunctionDiagonal(AbstractDiagonal):
    """A user-supplied diagonal: `fn(state, x)` returns the diagonal of
    $\\partial f / \\partial s$ at `(state, x)`, as a PyTree shaped like the state.

    For cells whose Jacobian diagonal has a closed form this is the cheapest choice:
    no JVPs at all.

    **Arguments:**

    - `fn`: the diagonal function, called like the step function `f(state, x)`.
    """

    needs_jvp = False
    fn: Callable

    def __call__(self, flat, xs, s_prev, lin, iteration):
        def diag(s, x):
            out = self.fn(flat.unravel(s), x)
            return jnp.concatenate([jnp.ravel(leaf) for leaf in jtu.tree_leaves(out)])

        in_axes = (0, None if xs is None else 0)
        return jax.vmap(diag, in_axes=in_axes)(s_prev, xs).astype(s_prev.dtype)


class QuasiDEER(AbstractParallelSolver):
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
    - `rtol`, `atol`, `globalization`: as for [`parassm.DEER`][].

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
    globalization: AbstractGlobalization = Undamped()

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol)

    def step(self, it, state):
        A = self.transition(it.flat, it.xs, it.s_prev, it.lin, it.iteration)
        return self.globalization(it, it.newton_correction(A)), state

    def linearise(self, step, s_prev):
        if self.diagonal.needs_jvp:
            return jax.linearize(step, s_prev)
        return step(s_prev), None

    def transition(self, flat, xs, s_prev, lin, iteration):
        return linear.Diagonal(self.diagonal(flat, xs, s_prev, lin, iteration))
