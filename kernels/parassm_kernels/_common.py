"""Shared helpers for the chunked Pallas scans: shapes, padding, the chunk-summary pass."""

import jax
import jax.lax as lax
import jax.numpy as jnp
from jax.experimental import pallas as pl


# A one-sized block dimension removed inside the kernel (`None` in older jax).
SQUEEZED = getattr(pl, "squeezed", None)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def resolve_interpret(interpret: bool | None) -> bool:
    # Pallas has no compiled CPU backend: interpret there, compile on accelerators.
    if interpret is None:
        return jax.default_backend() == "cpu"
    return interpret


def compiler_params(interpret: bool):
    """Triton on GPUs: the kernels index refs row by row inside loops, Triton-style.

    (Recent jax lowers a bare `pallas_call` to Mosaic GPU by default, which wants a
    different kernel structure.)
    """
    if interpret:
        return None
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError:  # no GPU support in this jaxlib: let pallas_call say so
        return None
    params = getattr(pltriton, "CompilerParams", None) or getattr(
        pltriton, "TritonCompilerParams", None
    )
    return None if params is None else params()


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"`chunk_size` must be a positive power of two, got {chunk_size}.")


def time_index(i, length: int, reverse: bool):
    """The `i`-th time step visited inside a chunk of `length` steps."""
    return length - 1 - i if reverse else i


def carry_in(summary_a, summary_b, compose, apply, *, reverse: bool):
    """The state entering each chunk from the `(A_c, b_c)` summaries of all chunks.

    `summary_*` have the chunk axis at position 1 (after the batch axis). Chunk `c`
    receives the end state of chunk `c - 1` (`c + 1` when `reverse`); the first chunk
    visited receives zero (an `init` has already been folded into `b`).
    """

    def combine(first, second):
        a1, b1 = first
        a2, b2 = second
        return compose(a2, a1), apply(a2, b1) + b2

    _, ends = lax.associative_scan(combine, (summary_a, summary_b), reverse=reverse, axis=1)
    zero = jnp.zeros_like(ends[:, :1])
    if reverse:
        return jnp.concatenate([ends[:, 1:], zero], axis=1)
    return jnp.concatenate([zero, ends[:, :-1]], axis=1)
