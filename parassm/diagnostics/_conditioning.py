r"""Transient growth (overshoot) and the conditioning of the residual system.

The residual Jacobian of $r_t = s_t - f(s_{t-1}, x_t)$ is block lower bidiagonal with
identity blocks on the diagonal and $-J_t$ below it. Its inverse is block lower
triangular with blocks $\Phi(t, s) = J_t J_{t-1} \cdots J_{s+1}$ ($t \ge s$), so

- $\sigma_{\min} \le 1 / \max_{t \ge s} \|\Phi(t, s)\|$ (a block is no larger than the
  matrix), and
- $\sigma_{\min} \ge 1 / \sum_{j=0}^{T-1} M_j$ with $M_j = \max_t \|\Phi(t + j, t)\|$
  (the row and column sums of the matrix of block norms bound its 2-norm), where
  lags longer than the window `w` are bounded by submultiplicativity,
  $M_{qw + r} \le M_w^q M_r$.

With the largest Lyapunov exponent $\lambda$ and the overshoot
$a = \max_j M_j e^{-\lambda j} \ge 1$, the second bound becomes the one of Gonzalez et
al. (2025): $\sigma_{\min} \ge \frac{1}{a} \frac{e^\lambda - 1}{e^{\lambda T} - 1}$,
bounded away from zero independently of `T` exactly when $\lambda < 0$.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PyTree

from .._jit import filter_jit
from .._problem import check_state, Flat, flatten, time_length
from ._lyapunov import dense_jacobians, trajectory_before


_EXACT_NORM_SIZE = 32


class Conditioning(eqx.Module):
    r"""Transient growth and bounds on $\sigma_{\min}$ of the residual Jacobian (all in
    natural logs, so nothing overflows).

    **Attributes:**

    - `window_log_norms`: $\ln M_j$, $j = 0..w$: the largest norm of a product of `j`
        consecutive Jacobians along the trajectory ($M_0 = 1$). Upper estimates of
        the norms when the state is large (see `conditioning`).
    - `log_overshoot`: $\ln a$, $a = \max_{j \le w} M_j e^{-\lambda j} \ge 1$.
    - `log_sigma_lower`, `log_sigma_upper`: the windowed bounds on
        $\ln \sigma_{\min}$ (rigorous for the analysed trajectory).
    - `log_sigma_lower_lle`, `log_sigma_upper_lle`: the bounds from the LLE and the
        overshoot, $-\ln a - \ln \sum_{j<T} e^{\lambda j}$ and
        $-\ln b - \lambda (T - 1)$ (with $b = \min_j M_j e^{-\lambda j}$; capped at 0).
        They extrapolate from the window to lag `T - 1`, so they are estimates unless
        the window covers every lag.
    - `lle`: the exponent $\lambda$ (per step) they use.
    - `length`: `T`, the length of the residual system they describe.
    """

    window_log_norms: Float[Array, " w"]
    log_overshoot: Float[Array, ""]
    log_sigma_lower: Float[Array, ""]
    log_sigma_upper: Float[Array, ""]
    log_sigma_lower_lle: Float[Array, ""]
    log_sigma_upper_lle: Float[Array, ""]
    lle: Float[Array, ""]
    length: int = eqx.field(static=True)

    @property
    def neg_log_mu_bounds(self) -> tuple[Array, Array]:
        r"""Bounds on $-\ln \mu$, $\mu = \sigma_{\min}^2$ (the PL constant of the merit
        function): `(lower, upper)`."""
        return -2 * self.log_sigma_upper, -2 * self.log_sigma_lower


def _log_norm_bounds(P: Float[Array, "... D D"]) -> tuple[Array, Array]:
    """`(log lower, log upper)` bounds on the spectral norms of a batch of matrices:
    exact (SVD) for small `D`; else the largest column norm and
    `min(Frobenius, sqrt(|P|_1 |P|_inf))`."""
    D = P.shape[-1]
    if D <= _EXACT_NORM_SIZE:
        s = jnp.linalg.norm(P, ord=2, axis=(-2, -1))
        return jnp.log(s), jnp.log(s)
    lo = jnp.max(jnp.linalg.norm(P, axis=-2), axis=-1)
    one = jnp.max(jnp.sum(jnp.abs(P), axis=-2), axis=-1)
    inf = jnp.max(jnp.sum(jnp.abs(P), axis=-1), axis=-1)
    fro = jnp.linalg.norm(P, axis=(-2, -1))
    return jnp.log(lo), jnp.log(jnp.minimum(fro, jnp.sqrt(one * inf)))


def window_log_norms(Js: Float[Array, "n D D"], window: int) -> tuple[Array, Array]:
    """`(lo, hi)`, each of shape `(window + 1,)`: bounds on $\\ln M_j$, the largest norm
    of a product of `j` consecutive maps among `Js` (`M_0 = 1`)."""
    n, D, _ = Js.shape
    window = min(window, n)

    def step(P, j):
        # P[s] = Js[s + j - 1] ... Js[s] (valid for s <= n - j).
        P = jnp.einsum("sij,sjk->sik", jnp.roll(Js, -(j - 1), axis=0), P)
        lo, hi = _log_norm_bounds(P)
        valid = jnp.arange(n) <= n - j
        ninf = jnp.array(-jnp.inf, lo.dtype)
        return P, (jnp.max(jnp.where(valid, lo, ninf)), jnp.max(jnp.where(valid, hi, ninf)))

    eye = jnp.broadcast_to(jnp.eye(D, dtype=Js.dtype), Js.shape)
    _, (lo, hi) = lax.scan(step, eye, jnp.arange(1, window + 1))
    zero = jnp.zeros((1,), Js.dtype)
    return jnp.concatenate([zero, lo]), jnp.concatenate([zero, hi])


def _log_geometric_sum(lam: Array, T: int) -> Array:
    r"""$\ln \sum_{j=0}^{T-1} e^{\lambda j}$, stably for any sign of $\lambda$."""
    T_ = jnp.asarray(T, lam.dtype)
    small = jnp.abs(lam) < 1e-12
    safe = jnp.where(small, jnp.ones((), lam.dtype), lam)
    pos = safe * (T_ - 1) + jnp.log(-jnp.expm1(-safe * T_)) - jnp.log(-jnp.expm1(-safe))
    neg = jnp.log(-jnp.expm1(safe * T_)) - jnp.log(-jnp.expm1(safe))
    return jnp.where(small, jnp.log(T_), jnp.where(lam > 0, pos, neg))


def _log_windowed_sum(log_M: Float[Array, " w1"], T: int) -> Array:
    r"""An upper bound on $\ln \sum_{j=0}^{T-1} M_j$ from $M_0..M_w$, using
    $M_{qw + r} \le M_w^q M_r$ beyond the window."""
    w = log_M.shape[0] - 1
    if T <= w + 1:
        return jnp.logaddexp.reduce(log_M[:T]) if T > 0 else jnp.array(-jnp.inf, log_M.dtype)
    w = max(w, 1)
    full, rest = divmod(T, w)
    log_block = jnp.logaddexp.reduce(log_M[:w])
    q = jnp.arange(full, dtype=log_M.dtype)
    total = log_block + jnp.logaddexp.reduce(q * log_M[w])
    if rest:
        tail = full * log_M[w] + jnp.logaddexp.reduce(log_M[:rest])
        total = jnp.logaddexp(total, tail)
    return total


def bounds_from_windows(
    lo: Float[Array, " w1"], hi: Float[Array, " w1"], lle: Array, T: int
) -> Conditioning:
    """Assemble the bounds for a residual system of length `T` from window norms."""
    lags = jnp.arange(lo.shape[0], dtype=lo.dtype)
    lle = jnp.asarray(lle, lo.dtype)
    log_a = jnp.maximum(jnp.max(hi - lle * lags), 0.0)
    log_b = jnp.min(lo[1:] - lle * lags[1:]) if lo.shape[0] > 1 else jnp.zeros((), lo.dtype)
    return Conditioning(
        window_log_norms=hi,
        log_overshoot=log_a,
        log_sigma_lower=-_log_windowed_sum(hi, T),
        log_sigma_upper=-jnp.max(lo),
        log_sigma_lower_lle=-log_a - _log_geometric_sum(lle, T),
        log_sigma_upper_lle=jnp.minimum(-(log_b + lle * (T - 1)), 0.0),
        lle=lle,
        length=T,
    )


def conditioning_flat(
    flat: Flat, xs: PyTree | None, length: int, window: int, lle: Array, target_length: int
) -> Conditioning:
    s_prev = trajectory_before(flat, xs, length)
    # The residual Jacobian couples steps t-1 and t for t = 2..T: J_2 .. J_T.
    Js = dense_jacobians(flat, xs, s_prev)[1:]
    if Js.shape[0] == 0:
        Js = jnp.zeros((1, flat.size, flat.size), s_prev.dtype)
    lo, hi = window_log_norms(Js, window)
    return bounds_from_windows(lo, hi, lle, target_length)


def conditioning(
    f: Callable[[PyTree[Array], Any], PyTree[Array]],
    s0: PyTree[Array],
    T: int | None = None,
    *,
    xs: PyTree | None = None,
    window: int = 16,
    lle: float | Array | None = None,
) -> Conditioning:
    r"""Overshoot and bounds on the smallest singular value of the residual Jacobian
    at the solution, hence on $-\ln \mu$ (Gonzalez et al. 2025).

    The Jacobians are taken along the true trajectory (computed sequentially). Products
    of up to `window` consecutive Jacobians are formed for every start (`O(T w D^3)`
    work); longer lags are bounded by submultiplicativity. Spectral norms are exact
    for states of size at most 32 and replaced by cheap rigorous bounds above that.

    **Arguments:**

    - `f`, `s0`, `T`, `xs`: the recurrence, as for [`parassm.evaluate`][].
    - `window`: Keyword only argument. The longest product formed explicitly.
    - `lle`: Keyword only argument. The largest Lyapunov exponent (per step) to use for
        the overshoot and the LLE bounds; by default estimated along the same
        trajectory with [`parassm.diagnostics.lyapunov_exponents`][].

    **Returns:**

    A [`parassm.diagnostics.Conditioning`][].

    ??? cite "References"

        ```bibtex
        @inproceedings{gonzalez2025predictability,
            title={Predictability Enables Parallelization of Nonlinear State Space Models},
            author={Gonzalez, Xavier and Kozachkov, Leo and Zoltowski, David M. and
                    Clarkson, Kenneth L. and Linderman, Scott W.},
            booktitle={Advances in Neural Information Processing Systems},
            year={2025}
        }
        ```
    """
    from ._lyapunov import lyapunov_exponents

    length = time_length(xs, T)
    s0 = check_state(s0, floating=True)
    if window < 1:
        raise ValueError(f"`window` must be at least 1, got {window}.")
    if lle is None:
        lle = lyapunov_exponents(f, s0, length, xs=xs)[0]
    dtype = jtu.tree_leaves(s0)[0].dtype
    return _conditioning(f, s0, xs, length, window, jnp.asarray(lle, dtype))


@filter_jit
def _conditioning(f, s0, xs, length, window, lle):
    return conditioning_flat(flatten(f, s0), xs, length, window, lle, length)
