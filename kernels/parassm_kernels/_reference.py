"""Pure-JAX references the kernels are tested against: one `lax.scan` step at a time."""

import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float


def diagonal_scan_reference(
    a: Float[Array, "*B T D"],
    b: Float[Array, "*B T D"],
    init: Float[Array, "*B D"] | None = None,
    *,
    reverse: bool = False,
) -> Float[Array, "*B T D"]:
    """`s_t = a_t * s_{t-1} + b_t` (or `s_{t+1}` when `reverse`) by `lax.scan`; same
    arguments and shapes as `diagonal_scan`."""
    if a.ndim == 3:
        inits = jnp.zeros_like(b[:, 0]) if init is None else init
        return jax.vmap(lambda a_, b_, i_: diagonal_scan_reference(a_, b_, i_, reverse=reverse))(
            a, b, inits
        )

    def step(s, ab):
        s = ab[0] * s + ab[1]
        return s, s

    s0 = jnp.zeros_like(b[0]) if init is None else init
    return lax.scan(step, s0, (a, b), reverse=reverse)[1]


def block_scan_reference(
    a: Float[Array, "*B T nb k k"],
    b: Float[Array, "*B T D"],
    init: Float[Array, "*B D"] | None = None,
    *,
    reverse: bool = False,
) -> Float[Array, "*B T D"]:
    """`s_t = A_t s_{t-1} + b_t` for block-diagonal `A_t` by `lax.scan`; same arguments
    and shapes as `block_scan`."""
    if a.ndim == 5:
        inits = jnp.zeros_like(b[:, 0]) if init is None else init
        return jax.vmap(lambda a_, b_, i_: block_scan_reference(a_, b_, i_, reverse=reverse))(
            a, b, inits
        )
    nb, k = a.shape[1], a.shape[2]

    def step(s, ab):
        blocks, offset = ab
        s = jnp.einsum("bij,bj->bi", blocks, s.reshape(nb, k)).reshape(-1) + offset
        return s, s

    s0 = jnp.zeros_like(b[0]) if init is None else init
    return lax.scan(step, s0, (a, b), reverse=reverse)[1]
