"""Chunked Pallas scan for the diagonal recurrence `s_t = a_t * s_{t-1} + b_t`."""

import functools as ft

import jax
import jax.lax as lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from ._common import (
    carry_in,
    check_chunk_size,
    compiler_params,
    next_power_of_2,
    resolve_interpret,
    SQUEEZED,
    time_index,
)


def _summary_kernel(a_ref, b_ref, a_out, b_out, *, length, reverse):
    # One chunk of time, one block of components: fold the chunk into one affine map.
    def body(i, carry):
        acc_a, acc_b = carry
        t = time_index(i, length, reverse)
        a_t = a_ref[t]
        return a_t * acc_a, a_t * acc_b + b_ref[t]

    width = a_ref.shape[-1]
    init = (jnp.ones((width,), a_ref.dtype), jnp.zeros((width,), b_ref.dtype))
    acc_a, acc_b = lax.fori_loop(0, length, body, init)
    a_out[...] = acc_a
    b_out[...] = acc_b


def _apply_kernel(a_ref, b_ref, h_ref, s_ref, *, length, reverse):
    # The same chunk again, now from its true incoming state: one read, one write.
    def body(i, s):
        t = time_index(i, length, reverse)
        s = a_ref[t] * s + b_ref[t]
        s_ref[t] = s
        return s

    lax.fori_loop(0, length, body, h_ref[...])


def diagonal_scan(
    a: Float[Array, "*B T D"],
    b: Float[Array, "*B T D"],
    init: Float[Array, "*B D"] | None = None,
    *,
    reverse: bool = False,
    chunk_size: int = 128,
    block_d: int | None = None,
    interpret: bool | None = None,
) -> Float[Array, "*B T D"]:
    r"""Solve $s_t = a_t \odot s_{t-1} + b_t$ with a chunked Pallas kernel.

    Time is cut into chunks of `chunk_size` steps. A first kernel folds every chunk
    (and every block of `block_d` components) into one affine map sequentially, a
    short associative scan over the `T / chunk_size` summaries gives the state entering
    each chunk, and a second kernel replays each chunk from that state, writing the
    result. Memory traffic is two reads of `(a, b)` and one write, against
    about $2 \log_2 T$ passes for `jax.lax.associative_scan`.

    **Arguments:**

    - `a`, `b`: shape `(T, D)`, or `(B, T, D)` with a leading batch axis.
    - `init`: $s_0$ (or $s_{T+1}$ when `reverse`), shape `(D,)` or `(B, D)`. Defaults
        to zero.
    - `reverse`: Keyword only argument. Solve $s_t = a_t \odot s_{t+1} + b_t$ instead.
    - `chunk_size`: Keyword only argument. Time steps per program, a power of two.
    - `block_d`: Keyword only argument. Components per program, a power of two;
        defaults to `min(next_power_of_2(D), 128)`.
    - `interpret`: Keyword only argument. Run the kernel in the Pallas interpreter.
        Defaults to True on CPU (where Pallas has no compiled backend), else False.

    **Returns:**

    The states $s_1, \ldots, s_T$, with the shape of `b`.
    """
    check_chunk_size(chunk_size)
    if a.shape != b.shape or a.ndim not in (2, 3):
        raise ValueError(
            f"`a` and `b` must both have shape (T, D) or (B, T, D); got {a.shape} and {b.shape}."
        )
    batched = a.ndim == 3
    if not batched:
        a, b = a[None], b[None]
        init = None if init is None else init[None]
    nbatch, T, D = b.shape
    if init is not None:
        if init.shape != (nbatch, D):
            raise ValueError(f"`init` must have shape {(nbatch, D)[1 - batched :]}.")
        edge = T - 1 if reverse else 0
        b = b.at[:, edge].add(a[:, edge] * init)
    block_d = min(next_power_of_2(D), 128) if block_d is None else block_d
    check_chunk_size(block_d)
    length = min(chunk_size, next_power_of_2(T))
    num_chunks = pl.cdiv(T, length)
    Tp, Dp = num_chunks * length, pl.cdiv(D, block_d) * block_d
    # Identity steps (a = 1, b = 0) after the end: they pass any state through, so the
    # result is the same whichever direction the padding is visited in.
    pad = ((0, 0), (0, Tp - T), (0, Dp - D))
    a_p = jnp.pad(a, pad, constant_values=1)
    b_p = jnp.pad(b, pad)
    grid = (nbatch, num_chunks, Dp // block_d)
    chunk_spec = pl.BlockSpec((SQUEEZED, length, block_d), lambda i, c, d: (i, c, d))
    row_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, block_d), lambda i, c, d: (i, c, d))
    interpret = resolve_interpret(interpret)
    summary_shape = jax.ShapeDtypeStruct((nbatch, num_chunks, Dp), b.dtype)
    sum_a, sum_b = pl.pallas_call(
        ft.partial(_summary_kernel, length=length, reverse=reverse),
        out_shape=(summary_shape, summary_shape),
        grid=grid,
        in_specs=[chunk_spec, chunk_spec],
        out_specs=(row_spec, row_spec),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="parassm_diagonal_summary",
    )(a_p, b_p)
    h = carry_in(sum_a, sum_b, jnp.multiply, jnp.multiply, reverse=reverse)
    out = pl.pallas_call(
        ft.partial(_apply_kernel, length=length, reverse=reverse),
        out_shape=jax.ShapeDtypeStruct(b_p.shape, b.dtype),
        grid=grid,
        in_specs=[chunk_spec, chunk_spec, row_spec],
        out_specs=chunk_spec,
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="parassm_diagonal_apply",
    )(a_p, b_p, h)
    out = out[:, :T, :D]
    return out if batched else out[0]
