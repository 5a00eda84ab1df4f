"""Values and Jacobians of the step function at every time step, formed the cheap way.

Every routine takes the per-step flat function `fn(s, x)` and evaluates it at all
`(s_{t-1}, x_t)` at once (`jax.vmap` over time; on a CPU in chunks of steps where one
pass would leave the cache: `over_steps`). Columns of `J_t = df/ds(s_{t-1}, x_t)`
come from forward-mode JVPs against unit vectors, vectorised over the columns inside the
vectorisation over time. The primal value is computed once per step alongside (it does
not depend on the tangent), so one pass gives both `f(s_{t-1}, x_t)` and `J_t`.

This is several times faster than applying the linear map of `jax.linearize` on the
time-batched function to `D` stacked basis trajectories: that form stores every
intermediate of the linearisation over `(T, ...)` and then runs the linear map over
`(D, T, ...)`, where the per-step form keeps each step's work local.
"""

import functools as ft
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.extend.core as jex_core
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.custom_batching import custom_vmap
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


def over_time(fn: Callable, xs: PyTree | None) -> Callable[[Array], Array]:
    """`S_prev -> (fn(s_{t-1}, x_t))_t`, vectorised over time."""
    return lambda s_prev: over_steps(fn, s_prev, xs)


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

    return over_steps(per_step, s_prev, xs, size_of=fn)


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
        return over_steps(lambda s, x: one(s, x, 0, D), s_prev, xs, size_of=fn)
    # Equal blocks through `lax.map` (one compiled body), a shorter last one after.
    size = blocks[0][1]
    full = D // size

    def block(i):
        cols = lax.dynamic_slice_in_dim(eye, i * size, size)

        def per_step(s, x):
            value, c = _columns(fn, s, x, cols)
            return value, jnp.diagonal(lax.dynamic_slice_in_dim(c, i * size, size))

        return over_steps(per_step, s_prev, xs, size_of=fn)

    values, diags = lax.map(block, jnp.arange(full))
    diag = jnp.moveaxis(diags, 0, 1).reshape(T, full * size)
    if full * size < D:
        lo = full * size
        _, rest = over_steps(lambda s, x: one(s, x, lo, D), s_prev, xs, size_of=fn)
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

        return over_steps(per_step, s_prev, xs, size_of=fn)  # [t, b, i, j]

    if per >= nb:
        return blocks_from(0, nb)
    full = nb // per
    values, out = lax.map(lambda g: blocks_from(g * per, per), jnp.arange(full))
    out = jnp.moveaxis(out, 0, 1).reshape(T, full * per, k, k)
    if full * per < nb:
        out = jnp.concatenate([out, blocks_from(full * per, nb - full * per)[1]], axis=1)
    return values[0], out


# --- Passes over many steps, in chunks that stay in cache -------------------------

# On a CPU, a pass over the steps of a sequence (or of a batch of them under
# `jax.vmap`) whose working set would leave the cache runs in chunks of steps that
# stay in it, one after the other. The working set is estimated as the steps' count
# times the bytes of the values one step of the step function computes (`_step_bytes`;
# `eqx.nn.GRUCell` with 4 inputs, float32: 0.8 / 1.7 / 3.3 / 6.7 kB at H = 8 / 16 /
# 32 / 64). A pass over more than `CHUNK_ABOVE` bytes (the L3 cache of the machine
# that set these) of steps of at least `CHUNK_STEP_BYTES` each runs in chunks of about
# `CHUNK_BYTES` (its L2), at least `MIN_CHUNK` steps. Set on a 2-core AMD EPYC (1 MB L2
# per core, 32 MB L3), that GRU, wall clock: one vectorised evaluation over 64000 steps
# (a batch of 32 sequences of 2000) took 42 ms at H = 64 and 21 ms at H = 32, in chunks
# of 250 steps 21 and 8.6 ms (its diagonal by JVPs: 83 -> 33 and 30 -> 14 ms). At
# H = 8 chunks only lose the second core's share of a pass (64000 steps: 4.4 -> 8.1
# ms; DEER's whole solve of a batch of 32, 64 -> 100 ms CPU time), hence the floor per
# step. The whole solves: `bench/batch.py --one-pass` (docs/benchmarks.md). Never on
# an accelerator, where the batch is the parallel work. `None` never chunks.
CHUNK_ABOVE: int | None = 32 * 2**20
CHUNK_STEP_BYTES = 2048
CHUNK_BYTES = 2**20
MIN_CHUNK = 64


def _jaxpr_bytes(jaxpr, varying) -> int:
    """The bytes of the values of `jaxpr` that depend on the inputs flagged `varying`
    (what a vectorisation over steps computes per step; work on the weights alone is
    shared)."""
    live = {v for v, vary in zip(jaxpr.invars, varying) if vary}
    total = 0
    for eqn in jaxpr.eqns:
        inputs = [isinstance(v, jex_core.Var) and v in live for v in eqn.invars]
        if not any(inputs):
            continue
        live.update(eqn.outvars)
        total += sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in eqn.outvars)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                same = len(inner.invars) == len(inputs)
                total += _jaxpr_bytes(inner, inputs if same else [True] * len(inner.invars))
    return total


def _step_bytes(fn: Callable, steps: tuple) -> int:
    """The bytes of the values one step of `fn` computes, for the steps `steps` (each
    leaf with a leading time axis)."""
    specs = jtu.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), steps)
    jaxpr = jax.make_jaxpr(fn)(*specs).jaxpr
    return _jaxpr_bytes(jaxpr, [True] * len(jaxpr.invars))


def _chunk(step_bytes: int, rows: int) -> int | None:
    """Steps per chunk of a pass over `rows` steps of `step_bytes` each, or `None`: one
    vectorised pass."""
    if CHUNK_ABOVE is None or jax.default_backend() != "cpu":
        return None
    if step_bytes < CHUNK_STEP_BYTES or rows * step_bytes <= CHUNK_ABOVE:
        return None
    chunk = max(MIN_CHUNK, CHUNK_BYTES // max(step_bytes, 1))
    return chunk if chunk < rows else None


def _over_rows(fn: Callable, args: tuple, rows: int, chunk: int | None) -> PyTree:
    """`jax.vmap(fn)(*args)` over the leading axis (`rows` long) of every argument, in
    chunks of `chunk` rows (`lax.map` over the whole chunks, then the rest)."""

    def plain(args):
        return jax.vmap(fn)(*args)

    if chunk is None:
        return plain(args)
    full = rows // chunk
    head = jtu.tree_map(lambda a: a[: full * chunk].reshape((full, chunk) + a.shape[1:]), args)
    out = jtu.tree_map(lambda o: o.reshape((full * chunk,) + o.shape[2:]), lax.map(plain, head))
    if full * chunk < rows:
        rest = plain(jtu.tree_map(lambda a: a[full * chunk :], args))
        out = jtu.tree_map(lambda a, b: jnp.concatenate([a, b]), out, rest)
    return out


def over_steps(per_step: Callable, *args: PyTree | None, size_of: Callable | None = None) -> PyTree:
    """`jax.vmap(per_step)(*args)` over time, every argument's leaves with time as
    their leading axis (an argument may be `None`).

    On a CPU, a pass whose working set would leave the cache runs in chunks of steps
    that stay in it, one after the other (`CHUNK_ABOVE`); under `jax.vmap` the steps
    of all the batch's sequences are chunked together, as the rows of one pass. The
    working set is estimated from `size_of(s, x)` (default: `per_step` itself) on the
    first two arguments: the step function, for a pass of its JVPs (whose tangents
    against unit vectors the compiler simplifies).

    Differentiable (by the plain pass: the chunking is for evaluation)."""
    firsts = jtu.tree_map(lambda a: a[0], args)
    closed = eqx.filter_closure_convert(per_step, *firsts)
    consts, static = eqx.partition(closed, eqx.is_array)
    length = jtu.tree_leaves(args)[0].shape[0]

    def fn(consts, *step):
        return eqx.combine(consts, static)(*step)

    # Decided here, once: the batching rule below is kept with the program, and must
    # not hold the user's function.
    if size_of is None:
        step_bytes = _step_bytes(ft.partial(fn, consts), args)
    else:
        step_bytes = _step_bytes(size_of, args[:2])

    def chunk_for(rows):
        return _chunk(step_bytes, rows)

    @custom_vmap
    def chunked(consts, args):
        return _over_rows(ft.partial(fn, consts), args, length, chunk_for(length))

    @chunked.def_vmap
    def chunked_vmap(axis_size, in_batched, consts, args):
        consts_batched, args_batched = in_batched
        rows = axis_size * length
        chunk = chunk_for(rows)
        if chunk is None or any(jtu.tree_leaves(consts_batched)):
            # One vectorised pass, as `jax.vmap` makes it (also with weights per
            # element, which the rows of a chunk would each need a copy of).
            axes = jtu.tree_map(lambda b: 0 if b else None, in_batched)

            def one(consts, args):
                return jax.vmap(ft.partial(fn, consts))(*args)

            out = jax.vmap(one, in_axes=tuple(axes), axis_size=axis_size)(consts, args)
        else:

            def flat(a, batched):
                a = a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
                return a.reshape((rows,) + a.shape[2:])

            flat_args = jtu.tree_map(flat, args, args_batched)
            out = _over_rows(ft.partial(fn, consts), flat_args, rows, chunk)
            out = jtu.tree_map(lambda o: o.reshape((axis_size, length) + o.shape[1:]), out)
        return out, jtu.tree_map(lambda _: True, out)

    @jax.custom_jvp
    def differentiable(consts, args):
        return chunked(consts, args)

    @differentiable.defjvp
    def differentiable_jvp(primals, tangents):
        def plain(consts, args):
            return jax.vmap(ft.partial(fn, consts))(*args)

        return jax.jvp(plain, primals, tangents)

    return differentiable(consts, args)
