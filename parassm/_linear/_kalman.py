"""A parallel Kalman filter and Rauch-Tung-Striebel smoother, by associative scans.

The model is linear-Gaussian with the identity as observation matrix:

    x_t = A_t x_{t-1} + b_t + w_t,   w_t ~ N(0, Q_t),   t = 1..T
    y_t = x_t + v_t,                 v_t ~ N(0, R_t)
    x_0 ~ N(m_0, P_0)

This is exactly what a Levenberg-Marquardt step on the residual system needs (see
`parassm.ELK`): the smoothed means minimise
`sum_t |x_t - A_t x_{t-1} - b_t|^2_{Q_t^{-1}} + |y_t - x_t|^2_{R_t^{-1}}`.

The filter uses the five-tuple elements and combine of Särkkä & García-Fernández
(2021); the smoother means are the backward linear recurrence
`x^s_t = E_t x^s_{t+1} + g_t`, solved with `parassm.linear.solve(..., reverse=True)`, and
the smoothed covariances a second reverse scan.

Dense combines need one `D x D` inverse each. They use `_inverse` below, a Gauss-Jordan
elimination written in plain `jax.numpy`, rather than `jnp.linalg.solve`: batched LAPACK
solves inside an associative-scan combine have deadlocked jaxlib at random on small CPU
machines. The diagonal variant is elementwise and needs no inverses at all.

Under `parassm.linear.LoopScan` (the CPU default) the dense scans are folded in chunks
of about `sqrt(T)` steps (`_scan_impl.fold_in_chunks`) rather than by the tree, whose
every level traces the combine (and its elimination loop) again: measured on a 2-core
CPU, the compile time of `ELK()` on a GRU fell from 7.7 / 10.9 / 20.8 s to 4.0 / 4.4 /
6.3 s (`D` = 4 / 8 / 32, `T` = 50 / 1e3 / 1e4); the smoother's run time is within
0.7-1.3x of the tree's (faster at `D = 4`, `T = 50` and `D = 8`, `T = 1e4`; 1.15-1.3x
slower at `D = 8`, `T = 1e3` and `D = 32`, `T = 1e3`, `1e4`).
"""

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._scan_impl import associative_scan
from ._solve import solve
from ._transitions import AbstractTransition, Dense, Diagonal


def _inverse_one(M: Float[Array, "D D"]) -> Float[Array, "D D"]:
    """Inverse of one matrix by Gauss-Jordan elimination with partial pivoting."""
    D = M.shape[0]
    if D == 1:
        return 1 / M
    rows = jnp.arange(D)
    aug = jnp.concatenate([M, jnp.eye(D, dtype=M.dtype)], axis=1)

    def body(k, aug):
        column = aug[:, k]
        pivot = jnp.argmax(jnp.where(rows >= k, jnp.abs(column), -1))
        row_k, row_p = aug[k], aug[pivot]
        aug = aug.at[pivot].set(row_k).at[k].set(row_p)
        pivot_row = aug[k] / aug[k, k]
        aug = aug - aug[:, k][:, None] * pivot_row[None, :]
        return aug.at[k].set(pivot_row)

    return lax.fori_loop(0, D, body, aug)[:, D:]


def _inverse(M: Float[Array, "... D D"]) -> Float[Array, "... D D"]:
    return jnp.vectorize(_inverse_one, signature="(n,n)->(n,n)")(M)


def _eye_like(M: Array) -> Array:
    return jnp.broadcast_to(jnp.eye(M.shape[-1], dtype=M.dtype), M.shape)


def _sym(M: Array) -> Array:
    return 0.5 * (M + jnp.swapaxes(M, -1, -2))


def _mT(M: Array) -> Array:
    return jnp.swapaxes(M, -1, -2)


def _mv(M: Array, x: Array) -> Array:
    return jnp.einsum("...ij,...j->...i", M, x)


def _dense_combine(first, second):
    A1, b1, C1, eta1, J1 = first
    A2, b2, C2, eta2, J2 = second
    M = _inverse(_eye_like(C1) + C1 @ J2)
    # (I + J2 C1)^{-1} = M^T because C1 and J2 are symmetric.
    A2M = A2 @ M
    A1tMt = _mT(A1) @ _mT(M)
    A = A2M @ A1
    b = _mv(A2M, b1 + _mv(C1, eta2)) + b2
    C = _sym(A2M @ C1 @ _mT(A2) + C2)
    eta = _mv(A1tMt, eta2 - _mv(J2, b1)) + eta1
    J = _sym(A1tMt @ J2 @ A1 + J1)
    return A, b, C, eta, J


def _diagonal_combine(first, second):
    A1, b1, C1, eta1, J1 = first
    A2, b2, C2, eta2, J2 = second
    M = 1 / (1 + C1 * J2)
    A = A2 * M * A1
    b = A2 * M * (b1 + C1 * eta2) + b2
    C = A2 * M * C1 * A2 + C2
    eta = A1 * M * (eta2 - J2 * b1) + eta1
    J = A1 * M * J2 * A1 + J1
    return A, b, C, eta, J


def _check(transition, b, Q, y, R, m0, P0):
    if not isinstance(transition, Dense | Diagonal):
        raise TypeError(
            "The Kalman filter and smoother take a `parassm.linear.Dense` or "
            f"`parassm.linear.Diagonal` transition, got {type(transition).__name__}. "
            "Convert other structures with `Dense(transition.as_matrix(D))`."
        )
    dense = isinstance(transition, Dense)
    T = transition.length
    if b.ndim != 2 or b.shape[0] != T:
        raise ValueError(f"`b` must have shape (T, D) = ({T}, D), got {b.shape}.")
    D = b.shape[1]
    if y.shape != b.shape:
        raise ValueError(f"`y` must have the shape of `b`, {b.shape}; got {y.shape}.")
    cov = (D, D) if dense else (D,)
    kind = "dense" if dense else "diagonal"

    def per_step(name, x):
        x = jnp.asarray(x)
        if x.shape == cov:
            return jnp.broadcast_to(x, (T,) + cov)
        if x.shape != (T,) + cov:
            raise ValueError(
                f"`{name}` must have shape {(T,) + cov} or {cov} for a {kind} transition, "
                f"got {x.shape}."
            )
        return x

    constant_Q = jnp.shape(Q) == cov
    Q = per_step("Q", Q)
    # `Q_{t+1}` at step `t`, for the smoother (no shift needed for a constant `Q`).
    Q_next = Q if constant_Q else _next(Q)
    R = per_step("R", R)
    m0 = jnp.zeros((D,), b.dtype) if m0 is None else jnp.asarray(m0)
    if m0.shape != (D,):
        raise ValueError(f"`m0` must have shape ({D},), got {m0.shape}.")
    P0 = jnp.zeros(cov, b.dtype) if P0 is None else jnp.asarray(P0)
    if P0.shape != cov:
        raise ValueError(f"`P0` must have shape {cov} for a {kind} transition, got {P0.shape}.")
    return dense, Q, Q_next, R, m0, P0


def _filter(dense, F, u, Q, y, R, m0, P0):
    if dense:
        Sinv = _inverse(Q + R)
        K = Q @ Sinv
        # I - K = R S^{-1}, without the cancellation when R is small.
        A = R @ Sinv @ F
        b = u + _mv(K, y - u)
        C = _sym(R @ Sinv @ Q)
        FtSinv = _mT(F) @ Sinv
        eta = _mv(FtSinv, y - u)
        J = _sym(FtSinv @ F)
        # The first step absorbs the prior.
        m1 = _mv(F[0], m0) + u[0]
        P1 = _sym(F[0] @ P0 @ F[0].T + Q[0])
        S1inv = _inverse(P1 + R[0])
        b = b.at[0].set(m1 + _mv(P1 @ S1inv, y[0] - m1))
        C = C.at[0].set(_sym(R[0] @ S1inv @ P1))
        combine = _dense_combine
    else:
        Sinv = 1 / (Q + R)
        K = Q * Sinv
        A = R * Sinv * F
        b = u + K * (y - u)
        C = R * Sinv * Q
        eta = F * Sinv * (y - u)
        J = F * Sinv * F
        m1 = F[0] * m0 + u[0]
        P1 = F[0] * P0 * F[0] + Q[0]
        S1 = P1 + R[0]
        b = b.at[0].set(m1 + P1 / S1 * (y[0] - m1))
        C = C.at[0].set(R[0] / S1 * P1)
        combine = _diagonal_combine
    zero = jnp.zeros((), u.dtype)
    A = A.at[0].set(zero)
    eta = eta.at[0].set(zero)
    J = J.at[0].set(zero)
    _, means, covs, _, _ = associative_scan(combine, (A, b, C, eta, J), costly=dense)
    return means, covs


def _next(x: Array) -> Array:
    """`x_{t+1}` at every step `t` (`x_1` at the last step, where it is masked out). A roll
    rather than slices and concatenations, which XLA gathers whole when time is split
    over devices."""
    return jnp.roll(x, -1, axis=0)


def _dense_covariance_combine(later, earlier):
    E1, L1 = later
    E2, L2 = earlier
    return E2 @ E1, _sym(E2 @ L1 @ _mT(E2) + L2)


def _diagonal_covariance_combine(later, earlier):
    E1, L1 = later
    E2, L2 = earlier
    return E2 * E1, E2 * L1 * E2 + L2


def _smooth(dense, F, u, Q_next, m, P, covariances: bool):
    """Smoothed means (and covariances) from the filtered ones."""
    T = m.shape[0]
    last = jnp.arange(T) == T - 1
    F_next = _next(F)
    if dense:
        last = last[:, None, None]
        pred = _sym(F_next @ P @ _mT(F_next) + Q_next)
        # The last step has no successor: its gain is zero (and its `pred` is not used).
        pred = jnp.where(last, _eye_like(pred), pred)
        E = jnp.where(last, 0, P @ _mT(F_next) @ _inverse(pred))
        g = m - _mv(E, _mv(F_next, m) + _next(u))
        transition = Dense(E)
    else:
        last = last[:, None]
        pred = jnp.where(last, 1, F_next * P * F_next + Q_next)
        E = jnp.where(last, 0, P * F_next / pred)
        g = m - E * (F_next * m + _next(u))
        transition = Diagonal(E)
    # With `E_T = 0`: `g_T = m_T` and `L_T = P_T`.
    means = solve(transition, g, reverse=True)
    if not covariances:
        return means, None
    if dense:
        L = _sym(P - E @ F_next @ P)
        combine = _dense_covariance_combine
    else:
        L = P - E * F_next * P
        combine = _diagonal_covariance_combine
    _, covs = associative_scan(combine, (E, L), reverse=True, costly=dense)
    return means, covs


def kalman_filter(
    transition: AbstractTransition,
    b: Float[Array, "T D"],
    Q: Array,
    y: Float[Array, "T D"],
    R: Array,
    m0: Float[Array, " D"] | None = None,
    P0: Array | None = None,
) -> tuple[Float[Array, "T D"], Array]:
    r"""The Kalman filter, in parallel over time (depth $O(\log T)$).

    For the model $x_t = A_t x_{t-1} + b_t + w_t$, $w_t \sim N(0, Q_t)$, observed
    as $y_t = x_t + v_t$, $v_t \sim N(0, R_t)$, with $x_0 \sim N(m_0, P_0)$, returns
    the filtered means and covariances of $x_t$ given $y_1, \ldots, y_t$.

    **Arguments:**

    - `transition`: the maps $A_t$: a [`parassm.linear.Dense`][] transition (then
        `Q`, `R`, `P0` are matrices) or a [`parassm.linear.Diagonal`][] one (then
        they are the diagonals of diagonal covariances).
    - `b`: the offsets $b_t$, shape `(T, D)`.
    - `Q`: process-noise covariances, `(T, D, D)` / `(T, D)`, or one for all steps.
    - `y`: observations, shape `(T, D)`.
    - `R`: observation-noise covariances, shaped like `Q`. Must be positive definite.
    - `m0`, `P0`: the prior of $x_0$; default zero (a known initial state).

    **Returns:**

    `(means, covariances)`: `(T, D)` and `(T, D, D)` (dense) or `(T, D)` (diagonal).

    !!! warning

        Dense combines invert one `D x D` matrix each, with a Gauss-Jordan elimination
        in plain JAX (no LAPACK in the scan; see the module notes): meant for moderate
        `D`.

    ??? cite "References"

        ```bibtex
        @article{sarkka2021temporal,
            title={Temporal Parallelization of Bayesian Smoothers},
            author={S{\"a}rkk{\"a}, Simo and Garc{\'\i}a-Fern{\'a}ndez, {\'A}ngel F.},
            journal={IEEE Transactions on Automatic Control},
            volume={66},
            number={1},
            pages={299--306},
            year={2021}
        }
        ```
    """
    dense, Q, Q_next, R, m0, P0 = _check(transition, b, Q, y, R, m0, P0)
    return _filter(dense, transition.elements(), b, Q, y, R, m0, P0)


def kalman_smoother(
    transition: AbstractTransition,
    b: Float[Array, "T D"],
    Q: Array,
    y: Float[Array, "T D"],
    R: Array,
    m0: Float[Array, " D"] | None = None,
    P0: Array | None = None,
) -> tuple[Float[Array, "T D"], Array]:
    r"""The Rauch-Tung-Striebel smoother, in parallel over time (depth $O(\log T)$).

    Same model and arguments as [`parassm.linear.kalman_filter`][]; returns the means
    and covariances of $x_t$ given all observations $y_1, \ldots, y_T$. The means are
    the minimiser of the least-squares problem

    $$\sum_t |x_t - A_t x_{t-1} - b_t|^2_{Q_t^{-1}} + |y_t - x_t|^2_{R_t^{-1}}
    \ (+ |x_0 - m_0|^2_{P_0^{-1}})$$

    which is how [`parassm.ELK`][] solves its Levenberg-Marquardt steps.

    **Returns:**

    `(means, covariances)`, shaped as for [`parassm.linear.kalman_filter`][].
    """
    dense, Q, Q_next, R, m0, P0 = _check(transition, b, Q, y, R, m0, P0)
    F = transition.elements()
    m, P = _filter(dense, F, b, Q, y, R, m0, P0)
    return _smooth(dense, F, b, Q_next, m, P, covariances=True)


def smoothed_means(
    transition: Dense | Diagonal,
    b: Float[Array, "T D"],
    Q: Array,
    y: Float[Array, "T D"],
    R: Array,
) -> Float[Array, "T D"]:
    """The smoother's means only, with a known initial state `x_0 = 0` (what ELK needs):
    skips the smoothed-covariance scan."""
    dense, Q, Q_next, R, m0, P0 = _check(transition, b, Q, y, R, None, None)
    F = transition.elements()
    m, P = _filter(dense, F, b, Q, y, R, m0, P0)
    return _smooth(dense, F, b, Q_next, m, P, covariances=False)[0]
