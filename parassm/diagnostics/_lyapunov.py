"""Lyapunov exponents of the map being evaluated: a sequential QR estimator and a
parallel one (an associative scan over log-scaled products of compound matrices).

Both estimators measure the growth of the same `k`-volumes: the `i`-volume spanned by
the images of `e_1, ..., e_i` under the Jacobian products `J_t ... J_1`. The sequential
estimator re-orthonormalises that frame at every step (QR); the parallel estimator
computes the volumes directly as `|C_i(J_t) ... C_i(J_1) e_{1..i}|`, where `C_i` is the
`i`-th compound matrix (the matrix of `i x i` minors; `C_i(AB) = C_i(A) C_i(B)` by
Cauchy-Binet), with every partial product stored as `(matrix / scale, log scale)` so
nothing overflows or underflows. In exact arithmetic the two give the same numbers.
"""

import itertools
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PyTree

from .._jit import filter_jit
from .._problem import check_state, Flat, flatten, time_length
from .._solvers import _jacobian as jacobian


_MAX_COMPOUND = 256


def trajectory_before(flat: Flat, xs: PyTree | None, length: int) -> Float[Array, "T D"]:
    """The states $s_0, \\ldots, s_{T-1}$ at which the steps $1..T$ are linearised."""

    def step(s, x):
        return flat.fn(s, x), s

    _, prev = lax.scan(step, flat.s0, xs, length=length)
    return prev


def slice_inputs(xs: PyTree | None, start: int, stop: int) -> PyTree | None:
    return None if xs is None else jtu.tree_map(lambda x: x[start:stop], xs)


def dense_jacobians(flat: Flat, xs: PyTree | None, s_prev: Float[Array, "T D"]) -> Array:
    """$J_t = \\partial f / \\partial s (s_{t-1}, x_t)$ for all `t` at once, `(T, D, D)`."""
    return jacobian.dense(flat.fn, s_prev, xs)


def qr_log_stretch(
    flat: Flat, xs: PyTree | None, s_prev: Float[Array, "T D"], k: int
) -> Float[Array, "T k"]:
    """Sequential estimator: `log |R_ii|` of the QR factorisation at every step, for a
    frame started at `e_1, ..., e_k`. Costs `k` JVPs of `f` per step."""
    D = flat.size
    Q0 = jnp.eye(D, k, dtype=s_prev.dtype)

    def step(Q, inputs):
        s, x = inputs
        _, lin = jax.linearize(lambda s: flat.fn(s, x), s)
        JQ = jax.vmap(lin, in_axes=1, out_axes=1)(Q)
        Q, R = jnp.linalg.qr(JQ)
        return Q, jnp.log(jnp.abs(jnp.diagonal(R)))

    _, logs = lax.scan(step, Q0, (s_prev, xs))
    return logs


def compound(J: Float[Array, "... D D"], order: int) -> Float[Array, "... n n"]:
    """The `order`-th compound matrix (all `order x order` minors, rows and columns
    indexed by the lexicographically ordered `order`-subsets of `0..D-1`)."""
    D = J.shape[-1]
    if order == 1:
        return J
    combos = jnp.array(list(itertools.combinations(range(D), order)))
    rows = combos[:, None, :, None]
    cols = combos[None, :, None, :]
    return jnp.linalg.det(J[..., rows, cols])


def log_scaled_prefix_products(
    M: Float[Array, "T n n"],
) -> tuple[Float[Array, "T n n"], Float[Array, " T"]]:
    """Prefix products `M_t ... M_1` for every `t` by one associative scan, each kept
    as `(P / scale, log scale)` with `scale = max |P|`, so nothing overflows."""

    def normalise(P, c):
        scale = jnp.max(jnp.abs(P), axis=(-2, -1))
        safe = jnp.where(scale > 0, scale, jnp.ones((), scale.dtype))
        return P / safe[..., None, None], c + jnp.log(scale)

    def combine(first, second):
        P1, c1 = first
        P2, c2 = second
        return normalise(P2 @ P1, c1 + c2)

    M, c = normalise(M, jnp.zeros(M.shape[0], M.dtype))
    return lax.associative_scan(combine, (M, c))


def parallel_log_volumes(Js: Float[Array, "T D D"], k: int) -> Float[Array, "T k"]:
    """`log` of the `i`-volume spanned by `J_t ... J_1 e_1, ..., J_t ... J_1 e_i`, for
    every `t` and `i = 1..k`, by log-scaled associative scans."""
    out = []
    for i in range(1, k + 1):
        P, c = log_scaled_prefix_products(compound(Js, i))
        out.append(c + jnp.log(jnp.linalg.norm(P[:, :, 0], axis=-1)))
    return jnp.stack(out, axis=1)


def log_volumes(
    flat: Flat,
    xs: PyTree | None,
    s_prev: Float[Array, "T D"],
    k: int,
    method: str,
) -> Float[Array, "T k"]:
    """Cumulative `log` volumes (sums of the first `i` log stretches) after each step."""
    if method == "sequential":
        return jnp.cumsum(jnp.cumsum(qr_log_stretch(flat, xs, s_prev, k), axis=0), axis=1)
    return parallel_log_volumes(dense_jacobians(flat, xs, s_prev), k)


def check_method(method: str, size: int, k: int) -> None:
    if method not in ("sequential", "parallel"):
        raise ValueError(f"`method` must be 'sequential' or 'parallel', got {method!r}.")
    if not 1 <= k <= size:
        raise ValueError(
            f"`k` must be between 1 and the state size ({size}), got {k}: a map on R^{size} "
            f"has {size} Lyapunov exponents."
        )
    if method == "parallel" and k > 1 and math.comb(size, k) > _MAX_COMPOUND:
        raise ValueError(
            f"method='parallel' with k={k} on a state of size {size} needs "
            f"{math.comb(size, k)} x {math.comb(size, k)} compound matrices; use "
            "method='sequential' (QR) for several exponents of a large state."
        )


def lyapunov_exponents(
    f: Callable[[PyTree[Array], Any], PyTree[Array]],
    s0: PyTree[Array],
    T: int | None = None,
    *,
    xs: PyTree | None = None,
    k: int = 1,
    method: Literal["sequential", "parallel"] = "sequential",
    dt: float | None = None,
    burn_in: int = 0,
) -> Float[Array, " k"]:
    r"""The first `k` Lyapunov exponents of the map $s_t = f(s_{t-1}, x_t)$ along the
    trajectory from `s0`.

    The exponents are finite-time estimates
    $\lambda_i \approx \frac{1}{n} \ln \sigma_i$-growth of the Jacobian products
    $J_T \cdots J_1$, $J_t = \partial f / \partial s\,(s_{t-1}, x_t)$, over the
    $n = T - \text{burn\_in}$ steps after the burn-in; they are those of the map that is
    evaluated (a discretised flow has its own exponents).

    **Arguments:**

    - `f`, `s0`, `T`, `xs`: the recurrence, as for [`parassm.evaluate`][].
    - `k`: Keyword only argument. How many exponents (largest first).
    - `method`: Keyword only argument. `"sequential"`: the classical QR
        (renormalisation) estimator, a `lax.scan` with `k` JVPs of `f` per step.
        `"parallel"`: the dense Jacobians at all steps at once, then one associative
        scan per `i <= k` over the `i`-th compound matrices kept in log-scaled form
        (depth `O(log T)`; `O(T D^2)` memory for `k = 1`). Both measure the same
        volumes and agree to rounding.
    - `dt`: Keyword only argument. If given, the exponents are divided by it (per unit
        time for a one-step map of a flow with time step `dt`); otherwise per step.
    - `burn_in`: Keyword only argument. Steps to advance the trajectory (e.g. onto the
        attractor) before measuring.

    **Returns:**

    The exponents, shape `(k,)`, in the dtype of the state.

    !!! example

        ```python
        logistic = parassm.systems.Logistic(r=4.0)
        parassm.diagnostics.lyapunov_exponents(logistic.f, logistic.s0, 10_000)  # ~ln 2
        ```
    """
    length = time_length(xs, T)
    s0 = check_state(s0, floating=True)
    size = sum(leaf.size for leaf in jtu.tree_leaves(s0))
    check_method(method, size, k)
    if not 0 <= burn_in < length:
        raise ValueError(f"`burn_in` must be in [0, T), got {burn_in} with T={length}.")
    if dt is not None and not dt > 0:
        raise ValueError(f"`dt` must be positive, got {dt}.")
    return _exponents(f, s0, xs, length, k, method, burn_in, dt)


@filter_jit
def _exponents(f, s0, xs, length, k, method, burn_in, dt):
    flat = flatten(f, s0)
    s_prev = trajectory_before(flat, xs, length)
    s_prev = s_prev[burn_in:]
    xs = slice_inputs(xs, burn_in, length)
    volumes = log_volumes(flat, xs, s_prev, k, method)[-1]
    previous = jnp.concatenate([jnp.zeros((1,), volumes.dtype), volumes[:-1]])
    # Once the (i-1)-volume has collapsed to zero (log -inf: a Jacobian of rank below
    # i-1 somewhere), the i-th exponent is -inf too, not -inf - (-inf) = nan.
    increments = jnp.where(previous == -jnp.inf, -jnp.inf, volumes - previous)
    scale = length - burn_in if dt is None else (length - burn_in) * dt
    return increments / jnp.asarray(scale, volumes.dtype)
