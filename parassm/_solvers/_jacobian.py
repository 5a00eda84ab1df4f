"""Values and Jacobians of the step function at every time step, formed the cheap way.

Every routine takes the per-step flat function `fn(s, x)` and evaluates it at all
`(s_{t-1}, x_t)` at once (`jax.vmap` over time). Columns of `J_t = df/ds(s_{t-1}, x_t)`
come from forward-mode JVPs against unit vectors, vectorised over the columns inside the
vectorisation over time. The primal value is computed once per step alongside (it does
not depend on the tangent), so one pass gives both `f(s_{t-1}, x_t)` and `J_t`.

This is several times faster than applying the linear map of `jax.linearize` on the
time-batched function to `D` stacked basis trajectories: that form stores every
intermediate of the linearisation over `(T, ...)` and then runs the linear map over
`(D, T, ...)`, where the per-step form keeps each step's work local.
"""

from collections.abc import Callable

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PyTree


def describe(fn: Callable) -> str:
    """A user function's name, for error messages."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return repr(fn) if name is None else f"`{name}`"


def check_supplied(fn: Callable, out: PyTree, state: PyTree, owner: str, what: str) -> None:
    """Check that a user-supplied per-step function returned a PyTree shaped like the
    state (`what` it should be), naming the function and the offending leaf."""
    expected = [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(state)]
    if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(state):
        raise ValueError(
            f"`{owner}.fn` ({describe(fn)}) returned a PyTree of structure "
            f"{jax.tree_util.tree_structure(out)}; expected {what} shaped like the state "
            f"(structure {jax.tree_util.tree_structure(state)}, shapes {expected}), for "
            "one step (no time axis)."
        )
    paths = jax.tree_util.tree_flatten_with_path(out)[0]
    for (path, leaf), shape in zip(paths, expected):
        if jnp.shape(leaf) != shape:
            raise ValueError(
                f"`{owner}.fn` ({describe(fn)}) returned shape {jnp.shape(leaf)} for the "
                f"state leaf `state{jax.tree_util.keystr(path)}`; expected {shape}: {what}, "
                "shaped like that leaf of the state, for one step (no time axis)."
            )


def _in_axes(xs: PyTree | None):
    return (0, None if xs is None else 0)


def over_time(fn: Callable, xs: PyTree | None) -> Callable[[Array], Array]:
    """`S_prev -> (fn(s_{t-1}, x_t))_t`, vectorised over time."""
    return lambda s_prev: jax.vmap(fn, in_axes=_in_axes(xs))(s_prev, xs)


def tangent_scan(
    fn: Callable,
    s_prev: Float[Array, "T D"],
    xs: PyTree | None,
    c: Float[Array, "T D"],
    free: Bool[Array, " T"] | None = None,
) -> Float[Array, "T D"]:
    """The tangent recurrence `d_t = J_t d_{t-1} + c_t` (`d_0 = c_0`), `J_t` the
    Jacobian of `fn` at `(s_prev_t, x_t)`, one step after the other: one JVP per step
    (`lax.scan`), no Jacobian formed, `O(T D)` memory, depth `T`.

    With `free`, `J_t` counts as zero where `free_t` is false, and a product `J_t
    d_{t-1}` that is not finite counts as zero (as non-finite maps do in a descent)."""

    def step(d, inputs):
        s, x, ct, free_t = inputs
        _, pushed = jax.jvp(lambda s: fn(s, x), (s,), (d,))
        if free is not None:
            pushed = jnp.where(free_t & jnp.isfinite(pushed), pushed, jnp.zeros((), d.dtype))
        d = pushed + ct
        return d, d

    inputs = (s_prev, xs, c, free)
    return lax.scan(step, jnp.zeros_like(c[0]), inputs)[1]


def _columns(fn: Callable, s: Array, x, basis: Float[Array, "k D"]) -> tuple[Array, Array]:
    """`(fn(s, x), J basis^T)` for one step: the value and `J v` for each row `v`."""

    def push(v):
        return jax.jvp(lambda s: fn(s, x), (s,), (v,))

    return jax.vmap(push, out_axes=(None, 1))(basis)


def _column_blocks(size: int, batch_size: int | None) -> list[tuple[int, int]]:
    step = size if batch_size is None else max(1, min(batch_size, size))
    return [(j, min(j + step, size)) for j in range(0, size, step)]


def value_and_dense(
    fn: Callable, s_prev: Float[Array, "T D"], xs: PyTree | None
) -> tuple[Float[Array, "T D"], Float[Array, "T D D"]]:
    """`(f(s_{t-1}, x_t), J_t)` for every `t`: `D` JVPs per step, in one pass."""
    eye = jnp.eye(s_prev.shape[1], dtype=s_prev.dtype)

    def per_step(s, x):
        def push(v):
            return jax.jvp(lambda s: fn(s, x), (s,), (v,))

        # The JVPs stacked as rows (`J^T`) is the layout the vectorised tangents come
        # in; the transpose is then fused into the consumer.
        value, rows = jax.vmap(push, out_axes=(None, 0))(eye)
        return value, rows.T

    return jax.vmap(per_step, in_axes=_in_axes(xs))(s_prev, xs)


def dense(fn: Callable, s_prev: Float[Array, "T D"], xs: PyTree | None) -> Float[Array, "T D D"]:
    """All `J_t` as dense matrices."""
    return value_and_dense(fn, s_prev, xs)[1]


def value_and_diagonal(
    fn: Callable, s_prev: Float[Array, "T D"], xs: PyTree | None, batch_size: int | None
) -> tuple[Float[Array, "T D"], Float[Array, "T D"]]:
    """`(f(s_{t-1}, x_t), diag J_t)` for every `t`: `D` JVPs per step. With
    `batch_size`, only that many columns are in flight at once (`O(T D batch_size)`
    memory instead of `O(T D^2)`)."""
    T, D = s_prev.shape
    eye = jnp.eye(D, dtype=s_prev.dtype)

    def one(s, x, lo, hi):
        value, cols = _columns(fn, s, x, eye[lo:hi])
        return value, jnp.diagonal(cols[lo:hi])

    blocks = _column_blocks(D, batch_size)
    if len(blocks) == 1:
        return jax.vmap(lambda s, x: one(s, x, 0, D), in_axes=_in_axes(xs))(s_prev, xs)
    # Equal blocks through `lax.map` (one compiled body), a shorter last one after.
    size = blocks[0][1]
    full = D // size

    def block(i):
        cols = lax.dynamic_slice_in_dim(eye, i * size, size)

        def per_step(s, x):
            value, c = _columns(fn, s, x, cols)
            return value, jnp.diagonal(lax.dynamic_slice_in_dim(c, i * size, size))

        return jax.vmap(per_step, in_axes=_in_axes(xs))(s_prev, xs)

    values, diags = lax.map(block, jnp.arange(full))
    diag = jnp.moveaxis(diags, 0, 1).reshape(T, full * size)
    if full * size < D:
        lo = full * size
        _, rest = jax.vmap(lambda s, x: one(s, x, lo, D), in_axes=_in_axes(xs))(s_prev, xs)
        diag = jnp.concatenate([diag, rest], axis=1)
    return values[0], diag


def diagonal(
    fn: Callable, s_prev: Float[Array, "T D"], xs: PyTree | None, batch_size: int | None
) -> Float[Array, "T D"]:
    """The diagonals of all `J_t` (see `value_and_diagonal`)."""
    return value_and_diagonal(fn, s_prev, xs, batch_size)[1]


def value_and_block_diagonal(
    fn: Callable,
    s_prev: Float[Array, "T D"],
    xs: PyTree | None,
    block_size: int,
    batch_size: int | None,
) -> tuple[Float[Array, "T D"], Float[Array, "T nb k k"]]:
    """`(f(s_{t-1}, x_t), blocks)`: the `k x k` diagonal blocks of every `J_t`, `D` JVPs
    per step. With `batch_size`, that many columns (rounded down to whole blocks, at
    least one block) are in flight at once."""
    T, D = s_prev.shape
    k = block_size
    nb = D // k
    eye = jnp.eye(D, dtype=s_prev.dtype)
    per = nb if batch_size is None else max(1, min(nb, batch_size // k))

    def blocks_from(first: Array | int, count: int) -> tuple[Array, Array]:
        # The columns of `count` consecutive blocks starting at block `first`.
        cols = lax.dynamic_slice_in_dim(eye, first * k, count * k)

        def per_step(s, x):
            def push(v):
                return jax.jvp(lambda s: fn(s, x), (s,), (v,))

            # The JVPs as rows, `r[j, i] = J[i, j]` (the layout the vectorised tangents
            # come in), then the diagonal blocks by `jnp.diagonal` over the block
            # indices, `[b, i, j] = J[bk + i, bk + j]`. (A repeated-index `einsum` of
            # the columns took twice the time on one sequence and 7x under `jax.vmap`
            # over 8: GRU, H = 32, T = 2000, k = 4, CPU.)
            value, r = jax.vmap(push, out_axes=(None, 0))(cols)
            r = lax.dynamic_slice_in_dim(r, first * k, count * k, axis=1)
            d = jnp.diagonal(r.reshape(count, k, count, k), axis1=0, axis2=2)
            return value, jnp.transpose(d, (2, 1, 0))

        return jax.vmap(per_step, in_axes=_in_axes(xs))(s_prev, xs)  # [t, b, i, j]

    if per >= nb:
        return blocks_from(0, nb)
    full = nb // per
    values, out = lax.map(lambda g: blocks_from(g * per, per), jnp.arange(full))
    out = jnp.moveaxis(out, 0, 1).reshape(T, full * per, k, k)
    if full * per < nb:
        out = jnp.concatenate([out, blocks_from(full * per, nb - full * per)[1]], axis=1)
    return values[0], out
