"""Chunked Pallas scan for block-diagonal (and small dense) recurrences
`s_t = A_t s_{t-1} + b_t`, with `A_t` made of `nb` blocks of size `k x k`."""

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


MAX_BLOCK_SIZE = 32


# Matrix products as broadcast-and-reduce: Triton's dot needs dimensions >= 16, and the
# blocks here are as small as 2 x 2.
def _compose(a2, a1):
    return jnp.sum(a2[..., :, :, None] * a1[..., None, :, :], axis=-2)


def _apply(a, x):
    return jnp.sum(a * x[..., None, :], axis=-1)


def _summary_kernel(a_ref, b_ref, a_out, b_out, *, length, reverse):
    # Fold one chunk of time (for a group of blocks) into one affine map; the first
    # step seeds the fold, so no identity matrix is built inside the kernel.
    def body(i, carry):
        acc_a, acc_b = carry
        t = time_index(i, length, reverse)
        a_t = a_ref[t]
        return _compose(a_t, acc_a), _apply(a_t, acc_b) + b_ref[t]

    first = time_index(0, length, reverse)
    acc_a, acc_b = lax.fori_loop(1, length, body, (a_ref[first], b_ref[first]))
    a_out[...] = acc_a
    b_out[...] = acc_b


def _apply_kernel(a_ref, b_ref, h_ref, s_ref, *, length, reverse):
    def body(i, s):
        t = time_index(i, length, reverse)
        s = _apply(a_ref[t], s) + b_ref[t]
        s_ref[t] = s
        return s

    lax.fori_loop(0, length, body, h_ref[...])


def block_scan(
    a: Float[Array, "*B T nb k k"],
    b: Float[Array, "*B T D"],
    init: Float[Array, "*B D"] | None = None,
    *,
    reverse: bool = False,
    chunk_size: int = 128,
    interpret: bool | None = None,
) -> Float[Array, "*B T D"]:
    r"""Solve $s_t = A_t s_{t-1} + b_t$ for block-diagonal $A_t$ with a chunked Pallas
    kernel. A small dense recurrence is the case `nb = 1`, `k = D`.

    The algorithm is that of [`diagonal_scan`][]: per-chunk summaries $(\prod A, b)$
    by a first kernel, an associative scan over the chunk summaries, then a replay of
    every chunk from its incoming state. Each program owns a group of blocks (as many
    as fit about 256 matrix entries); blocks are padded to a power-of-two size with
    zeros, which leaves the padded components at zero.

    **Arguments:**

    - `a`: the blocks, shape `(T, nb, k, k)` or `(B, T, nb, k, k)`, `1 <= k <= 32`;
        `a[..., t, i]` is the `i`-th diagonal block of $A_t$.
    - `b`: shape `(T, D)` or `(B, T, D)` with `D = nb * k`.
    - `init`: $s_0$ (or $s_{T+1}$ when `reverse`), shape `(D,)` or `(B, D)`. Defaults
        to zero.
    - `reverse`: Keyword only argument. Solve $s_t = A_t s_{t+1} + b_t$ instead.
    - `chunk_size`: Keyword only argument. Time steps per program, a power of two.
    - `interpret`: Keyword only argument. As for [`diagonal_scan`][].

    **Returns:**

    The states $s_1, \ldots, s_T$, with the shape of `b`.
    """
    check_chunk_size(chunk_size)
    if a.ndim not in (4, 5) or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"`a` must have shape (T, nb, k, k) or (B, T, nb, k, k); got {a.shape}.")
    batched = a.ndim == 5
    if not batched:
        a, b = a[None], b[None]
        init = None if init is None else init[None]
    nbatch, T, nb, k, _ = a.shape
    D = nb * k
    if b.shape != (nbatch, T, D):
        raise ValueError(
            f"`b` must have shape {(nbatch, T, D)[1 - batched :]} to match `a` {a.shape}."
        )
    if k > MAX_BLOCK_SIZE:
        raise ValueError(
            f"Blocks of size {k} are larger than {MAX_BLOCK_SIZE}; use "
            "`jax.lax.associative_scan` (`parassm.linear.AssociativeScan()`) instead."
        )
    if init is not None:
        if init.shape != (nbatch, D):
            raise ValueError(f"`init` must have shape {(nbatch, D)[1 - batched :]}.")
        edge = T - 1 if reverse else 0
        pushed = jnp.einsum("nbij,nbj->nbi", a[:, edge], init.reshape(nbatch, nb, k))
        b = b.at[:, edge].add(pushed.reshape(nbatch, D))
    kp = next_power_of_2(k)
    group = min(next_power_of_2(nb), max(1, 256 // (kp * kp)))
    length = min(chunk_size, next_power_of_2(T))
    num_chunks = pl.cdiv(T, length)
    Tp, nbp = num_chunks * length, pl.cdiv(nb, group) * group
    b = b.reshape(nbatch, T, nb, k)
    a_p = jnp.pad(a, ((0, 0), (0, 0), (0, nbp - nb), (0, kp - k), (0, kp - k)))
    # Identity steps after the end pass any state through, in either direction.
    eye = jnp.broadcast_to(jnp.eye(kp, dtype=a.dtype), (nbatch, Tp - T, nbp, kp, kp))
    a_p = jnp.concatenate([a_p, eye], axis=1)
    b_p = jnp.pad(b, ((0, 0), (0, Tp - T), (0, nbp - nb), (0, kp - k)))
    grid = (nbatch, num_chunks, nbp // group)
    a_spec = pl.BlockSpec((SQUEEZED, length, group, kp, kp), lambda i, c, g: (i, c, g, 0, 0))
    b_spec = pl.BlockSpec((SQUEEZED, length, group, kp), lambda i, c, g: (i, c, g, 0))
    sum_a_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, group, kp, kp), lambda i, c, g: (i, c, g, 0, 0))
    sum_b_spec = pl.BlockSpec((SQUEEZED, SQUEEZED, group, kp), lambda i, c, g: (i, c, g, 0))
    interpret = resolve_interpret(interpret)
    sum_a, sum_b = pl.pallas_call(
        ft.partial(_summary_kernel, length=length, reverse=reverse),
        out_shape=(
            jax.ShapeDtypeStruct((nbatch, num_chunks, nbp, kp, kp), a.dtype),
            jax.ShapeDtypeStruct((nbatch, num_chunks, nbp, kp), b.dtype),
        ),
        grid=grid,
        in_specs=[a_spec, b_spec],
        out_specs=(sum_a_spec, sum_b_spec),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="parassm_block_summary",
    )(a_p, b_p)
    h = carry_in(sum_a, sum_b, _compose, _apply, reverse=reverse)
    out = pl.pallas_call(
        ft.partial(_apply_kernel, length=length, reverse=reverse),
        out_shape=jax.ShapeDtypeStruct(b_p.shape, b.dtype),
        grid=grid,
        in_specs=[a_spec, b_spec, sum_b_spec],
        out_specs=b_spec,
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="parassm_block_apply",
    )(a_p, b_p, h)
    out = out[:, :T, :nb, :k].reshape(nbatch, T, D)
    return out if batched else out[0]
