"""Trace-time validation, and the flat view of a recurrence the parallel solvers use."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


def _leaf_name(root: str, path) -> str:
    return root + jtu.keystr(path)


def is_concrete(tree: PyTree) -> bool:
    """Whether no leaf of `tree` is traced (its values can be read on the host)."""
    return not any(isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves(tree))


def static_length(T: Any, name: str = "T") -> int | None:
    """`T` (`None` or an integer) as a Python int: a NumPy or JAX integer, or a concrete
    0-d integer array, is accepted; a traced or non-integer `T` is refused with what to
    do instead. A bool is left for the caller to refuse."""
    if T is None or isinstance(T, int):
        return T
    if isinstance(T, jax.core.Tracer):
        raise TypeError(
            f"`{name}` is traced (a {type(T).__name__} of {T.aval}): the number of steps "
            "sets the shape of the trajectory, so it must be known when the program is "
            "compiled. Inside `jax.jit`, mark it static (e.g. `jax.jit(fn, "
            f"static_argnums=...)` or `static_argnames=...`), or omit `{name}` and pass "
            "inputs `xs` with a leading time axis."
        )
    if hasattr(T, "dtype") and jnp.shape(T) == () and jnp.issubdtype(T.dtype, jnp.integer):
        return int(T)
    what = type(T).__name__
    if hasattr(T, "dtype"):
        what += f" of dtype {T.dtype} and shape {jnp.shape(T)}"
    raise TypeError(
        f"`{name}` must be an integer (a Python int, a NumPy integer or a 0-d integer "
        f"array), got {what}."
    )


def time_length(xs: PyTree | None, T: int | None) -> int:
    """The number of steps, from `T` and/or the leading axis of `xs`, checked."""
    if T is not None and not isinstance(T, int | jnp.integer):
        raise TypeError(f"`T` must be a Python int, got {type(T).__name__}.")
    lengths = {}
    if xs is not None:
        for path, leaf in jtu.tree_flatten_with_path(xs)[0]:
            shape = jnp.shape(leaf)
            if len(shape) == 0:
                raise ValueError(
                    f"{_leaf_name('xs', path)} is a scalar; every leaf of `xs` needs a "
                    "leading time axis (shape (T, ...))."
                )
            lengths[_leaf_name("xs", path)] = shape[0]
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise ValueError(
            f"The leaves of `xs` have different lengths along the time axis ({listed}); "
            "they must all have the same leading dimension T."
        )
    if lengths:
        length = next(iter(lengths.values()))
        if T is not None and int(T) != length:
            raise ValueError(
                f"`T={T}` but `xs` has {length} time steps; pass matching values or omit `T`."
            )
    elif T is None:
        raise ValueError(
            "The number of steps is unknown: pass `T` (or `length`), or inputs `xs` "
            "with a leading time axis."
        )
    else:
        length = int(T)
    if length < 1:
        raise ValueError(
            f"The number of steps must be at least 1, got {length}: there is nothing to evaluate."
        )
    return length


def check_state(s0: PyTree, *, floating: bool) -> PyTree[Array]:
    """Convert the leaves of `s0` to arrays and check their dtypes."""
    s0 = jtu.tree_map(jnp.asarray, s0)
    leaves = jtu.tree_flatten_with_path(s0)[0]
    if not leaves:
        raise ValueError("`s0` has no array leaves; the state must hold at least one.")
    if floating:
        for path, leaf in leaves:
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise TypeError(
                    f"{_leaf_name('s0', path)} has dtype {leaf.dtype}: parallel solvers "
                    "need floating-point states (they take derivatives). Cast it, e.g. "
                    "`.astype(jnp.float32)`, or use `solver=parassm.Sequential()`."
                )
        dtypes = {leaf.dtype for _, leaf in leaves}
        if len(dtypes) > 1:
            listed = ", ".join(f"{_leaf_name('s0', p)}: {l.dtype}" for p, l in leaves)
            raise TypeError(
                f"The leaves of `s0` have different dtypes ({listed}); cast them to one "
                "floating-point dtype."
            )
    return s0


def step_output(f: Callable, s0: PyTree, xs: PyTree | None) -> Any:
    """The output structure of `f(s0, xs[0])`, as `jax.ShapeDtypeStruct`s."""
    x0 = None if xs is None else jtu.tree_map(lambda x: x[0], xs)
    return eqx.filter_eval_shape(f, s0, x0)


def check_same_structure(out: PyTree, s0: PyTree, what: str) -> None:
    out_def = jtu.tree_structure(out)
    s0_def = jtu.tree_structure(s0)
    if out_def != s0_def:
        raise ValueError(
            f"{what} returned a state with PyTree structure {out_def}, but `s0` has "
            f"structure {s0_def}; the new state must have the same structure as the old."
        )
    for (path, o), s in zip(jtu.tree_flatten_with_path(out)[0], jtu.tree_leaves(s0)):
        name = _leaf_name("state", path)
        if isinstance(o, bool | int | float | complex):
            # A Python scalar is weakly typed: it takes the dtype of the state.
            if s.shape != ():
                raise ValueError(
                    f"{what} returned {name} as the Python scalar {o!r}, but the same leaf "
                    f"of `s0` has shape {s.shape}; the new state must have the same shape."
                )
            continue
        if not hasattr(o, "shape"):
            raise TypeError(
                f"{what} returned {name} of type {type(o).__name__}; the new state must "
                "be arrays with the structure of `s0`."
            )
        if o.shape != s.shape:
            raise ValueError(
                f"{what} returned {name} with shape {o.shape}, but the same leaf of "
                f"`s0` has shape {s.shape}; the new state must have the same shape."
            )
        if o.dtype != s.dtype:
            raise TypeError(
                f"{what} returned {name} with dtype {o.dtype}, but the same leaf of `s0` "
                f"has dtype {s.dtype}; cast inside the step function or pass `s0` with "
                "the dtype it returns."
            )


class Flat(eqx.Module):
    """A recurrence on flat vectors: `fn(s, x)` with `s` of shape `(D,)`."""

    fn: Callable = eqx.field(static=True)
    unravel: Callable = eqx.field(static=True)
    s0: Array

    @property
    def size(self) -> int:
        return self.s0.shape[0]


def ravelling(s0: PyTree[Array]) -> tuple[Callable, Callable]:
    """`(ravel, unravel)`: a state PyTree shaped like `s0` to one flat vector and back.
    Both are exact (reshapes and concatenation only)."""
    leaves, treedef = jtu.tree_flatten(s0)
    shapes = [leaf.shape for leaf in leaves]
    sizes = [leaf.size for leaf in leaves]

    def ravel(tree):
        return jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(tree)])

    def unravel(flat):
        pieces, start = [], 0
        for shape, size in zip(shapes, sizes):
            pieces.append(flat[start : start + size].reshape(shape))
            start += size
        return jtu.tree_unflatten(treedef, pieces)

    return ravel, unravel


def flatten(f: Callable, s0: PyTree[Array]) -> Flat:
    """View `f` as a map on one flat vector (the state's leaves, concatenated)."""
    ravel, unravel = ravelling(s0)

    def fn(s, x):
        return ravel(f(unravel(s), x))

    return Flat(fn, unravel, ravel(s0))


def unravel_trajectory(flat: Flat, states: Array) -> PyTree[Array]:
    return jax.vmap(flat.unravel)(states)
