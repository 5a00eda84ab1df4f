from typing import Any, TypeAlias

from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree


Y: TypeAlias = PyTree[Array]
"""A state: any PyTree of floating-point arrays."""

Xs: TypeAlias = PyTree[Any]
"""Inputs: a PyTree whose leaves share a leading time axis, or `None`."""

FlatStates: TypeAlias = Float[Array, "T D"]
Mask: TypeAlias = Bool[Array, " T"]
Scalar: TypeAlias = Float[ArrayLike, ""]
IntScalar: TypeAlias = Int[ArrayLike, ""]
