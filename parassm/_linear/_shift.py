import jax.numpy as jnp
from jaxtyping import Array, Float


def shift(
    x: Float[Array, "T ..."], first: Float[Array, "..."] | None = None, *, reverse: bool = False
) -> Float[Array, "T ..."]:
    """`(first, x_1, ..., x_{T-1})`, the step before every step (zero first by default);
    with `reverse`, `(x_2, ..., x_T, first)`, the step after every step.

    A `roll` and a select rather than a `concatenate`: with time split over devices XLA's
    partitioner turns a roll into a one-step halo exchange, but gathers a concatenation
    whole."""
    T = x.shape[0]
    edge = T - 1 if reverse else 0
    first = jnp.zeros_like(x[0]) if first is None else first
    is_edge = (jnp.arange(T) == edge).reshape((T,) + (1,) * (x.ndim - 1))
    return jnp.where(is_edge, first, jnp.roll(x, -1 if reverse else 1, axis=0))
