"""Structured sequences of linear maps `A_1, ..., A_T`.

A transition describes the linear part of the recurrence `s_t = A_t s_{t-1} + b_t`.
Every structure knows how to compose two of its elements (the combine used by the
associative scan), how to apply itself, how to transpose itself and how to zero some
of its time steps. Solvers choose a structure; `parassm.linear.solve` does the rest.
"""

import abc
from typing import Self

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


class AbstractTransition(eqx.Module):
    """A sequence of `T` linear maps on `R^D`, one per time step.

    Subclasses store the maps in a structured form (dense, diagonal, block-diagonal,
    scalar multiple of the identity, zero). Memory and work per associative-scan level
    follow the structure: `O(T D^2)` memory and `O(T D^3)` work for dense maps,
    `O(T D k)` / `O(T D k^2)` for blocks of size `k`, `O(T D)` for diagonal ones.
    """

    @property
    @abc.abstractmethod
    def length(self) -> int:
        """The number of time steps `T`."""

    @abc.abstractmethod
    def elements(self) -> Array:
        """The per-time-step maps as an array with a leading time axis, in the form the
        associative-scan combine works on."""

    @abc.abstractmethod
    def from_elements(self, elements: Array) -> Self:
        """Inverse of `elements`."""

    @staticmethod
    @abc.abstractmethod
    def compose(a2: Array, a1: Array) -> Array:
        """Batched composition `A2 A1` of elements (apply `A1` first)."""

    @staticmethod
    @abc.abstractmethod
    def apply(a: Array, x: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """Batched `A_t x_t` for elements `a`."""

    @abc.abstractmethod
    def transpose(self) -> Self:
        """The sequence of transposed maps `A_1^T, ..., A_T^T`."""

    @abc.abstractmethod
    def as_matrix(self, size: int) -> Float[Array, "T D D"]:
        """The maps as dense `(T, D, D)` matrices (for testing and diagnostics)."""

    def mv(self, x: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """`A_t x_t` for every `t`."""
        return self.apply(self.elements(), x)

    def mask(self, keep: Bool[Array, " T"]) -> Self:
        """Replace `A_t` by zero wherever `keep[t]` is False."""
        a = self.elements()
        keep = keep.reshape(keep.shape + (1,) * (a.ndim - 1))
        return self.from_elements(jnp.where(keep, a, jnp.zeros((), a.dtype)))


class Dense(AbstractTransition):
    """Dense maps: `matrices[t]` is `A_t`, shape `(T, D, D)`.

    The associative scan stores `O(T D^2)` numbers and does `O(T D^3)` work.
    """

    matrices: Float[Array, "T D D"]

    @property
    def length(self) -> int:
        return self.matrices.shape[0]

    def elements(self) -> Array:
        return self.matrices

    def from_elements(self, elements: Array) -> "Dense":
        return Dense(elements)

    @staticmethod
    def compose(a2: Array, a1: Array) -> Array:
        return a2 @ a1

    @staticmethod
    def apply(a: Array, x: Array) -> Array:
        return jnp.einsum("...ij,...j->...i", a, x)

    def transpose(self) -> "Dense":
        return Dense(jnp.swapaxes(self.matrices, -1, -2))

    def as_matrix(self, size: int) -> Array:
        return self.matrices


class Diagonal(AbstractTransition):
    """Diagonal maps: `diagonals[t]` is the diagonal of `A_t`, shape `(T, D)`.

    The associative scan stores and touches `O(T D)` numbers per level.
    """

    diagonals: Float[Array, "T D"]

    @property
    def length(self) -> int:
        return self.diagonals.shape[0]

    def elements(self) -> Array:
        return self.diagonals

    def from_elements(self, elements: Array) -> "Diagonal":
        return Diagonal(elements)

    @staticmethod
    def compose(a2: Array, a1: Array) -> Array:
        return a2 * a1

    @staticmethod
    def apply(a: Array, x: Array) -> Array:
        return a * x

    def transpose(self) -> "Diagonal":
        return self

    def as_matrix(self, size: int) -> Array:
        return jnp.einsum("ti,ij->tij", self.diagonals, jnp.eye(size, dtype=self.diagonals.dtype))


class BlockDiagonal(AbstractTransition):
    """Block-diagonal maps: `blocks[t, i]` is the `i`-th `k x k` diagonal block of
    `A_t`, shape `(T, D // k, k, k)`. The state is split into contiguous blocks of `k`
    components.

    The associative scan stores `O(T D k)` numbers and does `O(T D k^2)` work.
    """

    blocks: Float[Array, "T nb k k"]

    @property
    def length(self) -> int:
        return self.blocks.shape[0]

    def elements(self) -> Array:
        return self.blocks

    def from_elements(self, elements: Array) -> "BlockDiagonal":
        return BlockDiagonal(elements)

    @staticmethod
    def compose(a2: Array, a1: Array) -> Array:
        return a2 @ a1

    @staticmethod
    def apply(a: Array, x: Array) -> Array:
        *batch, nb, k, _ = a.shape
        xb = x.reshape(*batch, nb, k)
        return jnp.einsum("...bij,...bj->...bi", a, xb).reshape(x.shape)

    def transpose(self) -> "BlockDiagonal":
        return BlockDiagonal(jnp.swapaxes(self.blocks, -1, -2))

    def as_matrix(self, size: int) -> Array:
        T, nb, k, _ = self.blocks.shape
        eye = jnp.eye(nb, dtype=self.blocks.dtype)
        full = jnp.einsum("tbij,bc->tbicj", self.blocks, eye)
        return full.reshape(T, nb * k, nb * k)


class Scalar(AbstractTransition):
    """Scalar multiples of the identity: `A_t = scales[t] I`, shape `(T,)`.

    `Scalar(jnp.ones(T))` is the Picard transition; the scan costs `O(T D)`.
    """

    scales: Float[Array, " T"]

    @property
    def length(self) -> int:
        return self.scales.shape[0]

    def elements(self) -> Array:
        return self.scales

    def from_elements(self, elements: Array) -> "Scalar":
        return Scalar(elements)

    @staticmethod
    def compose(a2: Array, a1: Array) -> Array:
        return a2 * a1

    @staticmethod
    def apply(a: Array, x: Array) -> Array:
        return a[..., None] * x

    def transpose(self) -> "Scalar":
        return self

    def as_matrix(self, size: int) -> Array:
        return self.scales[:, None, None] * jnp.eye(size, dtype=self.scales.dtype)[None]


class Zero(AbstractTransition):
    """All maps zero: `s_t = b_t`. No scan is needed (the Jacobi transition)."""

    num_steps: int = eqx.field(static=True)

    @property
    def length(self) -> int:
        return self.num_steps

    def elements(self) -> Array:
        return jnp.zeros((self.num_steps,))

    def from_elements(self, elements: Array) -> "Zero":
        return self

    @staticmethod
    def compose(a2: Array, a1: Array) -> Array:
        return a2 * a1

    @staticmethod
    def apply(a: Array, x: Array) -> Array:
        return jnp.zeros_like(x)

    def transpose(self) -> "Zero":
        return self

    def mask(self, keep: Bool[Array, " T"]) -> "Zero":
        return self

    def as_matrix(self, size: int) -> Array:
        return jnp.zeros((self.num_steps, size, size))
