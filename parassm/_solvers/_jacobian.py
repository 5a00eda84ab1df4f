"""Jacobian pieces from a linearised step function, shared by the solvers.

`lin` is the JVP of the time-batched step `S_prev -> (f(s_{t-1}, x_t))_t`: it maps a
tangent of shape `(T, D)` to one of shape `(T, D)`, acting on each time step
independently. A column `j` of every `J_t` at once costs one application of `lin`.
"""

from collections.abc import Callable

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float


Linear = Callable[[Float[Array, "T D"]], Float[Array, "T D"]]


def _unit(j, length: int, size: int, dtype) -> Array:
    return jnp.broadcast_to(jax.nn.one_hot(j, size, dtype=dtype), (length, size))


def _map(fn, size: int, batch_size: int | None) -> Array:
    """`fn` over the columns `0..size-1`: all at once, or `batch_size` at a time."""
    columns = jnp.arange(size)
    if batch_size is None or batch_size >= size:
        return jax.vmap(fn)(columns)
    return lax.map(fn, columns, batch_size=batch_size)


def dense(lin: Linear, length: int, size: int, dtype) -> Float[Array, "T D D"]:
    """All `J_t` as dense matrices: `D` JVPs, `O(T D^2)` memory."""
    basis = jnp.broadcast_to(jnp.eye(size, dtype=dtype)[:, None, :], (size, length, size))
    columns = jax.vmap(lin)(basis)  # [j, t, i] = J_t[i, j]
    return jnp.transpose(columns, (1, 2, 0))


def diagonal(
    lin: Linear, length: int, size: int, dtype, batch_size: int | None
) -> Float[Array, "T D"]:
    """The exact diagonals of all `J_t`: `D` JVPs, but only `O(T D)` memory beyond
    `batch_size` columns in flight at once."""

    def entry(j):
        return lin(_unit(j, length, size, dtype))[:, j]

    out = _map(entry, size, batch_size)  # [j, t]
    return out.T


def block_diagonal(
    lin: Linear, length: int, size: int, block_size: int, dtype, batch_size: int | None
) -> Float[Array, "T nb k k"]:
    """The `k x k` diagonal blocks of all `J_t`: `D` JVPs; `O(T D k)` memory when the
    columns are taken `batch_size` at a time, `O(T D^2)` transiently otherwise."""
    k = block_size
    nb = size // k
    if batch_size is None or batch_size >= size:
        # All columns at once: cut the blocks out of the dense Jacobians.
        full = dense(lin, length, size, dtype).reshape(length, nb, k, nb, k)
        return jnp.einsum("tbibj->tbij", full)

    def column(j):
        col = lin(_unit(j, length, size, dtype))  # [t, i]
        start = (j // k) * k
        return lax.dynamic_slice_in_dim(col, start, k, axis=1)  # [t, i_in_block]

    out = _map(column, size, batch_size)  # [j, t, i]
    out = out.reshape(nb, k, length, k)  # [b, c, t, i]
    return jnp.transpose(out, (2, 0, 3, 1))  # [t, b, i, c]
