"""A conditional that a batch pays for only when one of its elements takes it."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.custom_batching import custom_vmap
from jaxtyping import Array, Bool, PyTree


def cond(
    pred: Bool[Array, ""], true_fun: Callable, false_fun: Callable, *operands, merge: bool = True
) -> PyTree:
    """`lax.cond(pred, true_fun, false_fun, *operands)`, except under `jax.vmap` with a
    batched `pred`.

    There `lax.cond` becomes a select that runs both branches for every element, every
    time. Here `true_fun` runs, vectorised over the whole batch, only when `pred` holds
    for at least one element (one scalar `any` decides, by a `lax.cond` whose predicate
    is no longer batched), and each element then takes its own branch's result.
    `false_fun` runs for the whole batch: make it the cheap branch (e.g. passing a
    value through). Nothing is serialised: the batch stays one vectorised program.

    Why: the Newton loop's dear work (forming the maps, a restart's candidate, the
    descent) is needed by some iterations only; under `jax.vmap` a `lax.cond` would
    run it at every iteration for the whole batch, where one sequence alone skips it.

    With `merge=False` the elements whose `pred` is false do not use the result: they
    get the true branch's where it ran (no select over the outputs).

    Not for code that is differentiated (the custom batching rule has no derivative):
    the loop uses it only where it is not (`lax.while_loop`).
    """
    pred = jnp.asarray(pred)
    branches = (
        eqx.filter_closure_convert(true_fun, *operands),
        eqx.filter_closure_convert(false_fun, *operands),
        operands,
    )
    # Only arrays cross the batching rule; the rest (the traced programs) is static.
    dynamic, static = eqx.partition(branches, eqx.is_array)

    def combine(dynamic):
        true_c, false_c, operands = eqx.combine(dynamic, static)
        return (lambda: true_c(*operands)), (lambda: false_c(*operands))

    @custom_vmap
    def _cond(pred, dynamic):
        return lax.cond(pred, *combine(dynamic))

    @_cond.def_vmap
    def _cond_vmap(axis_size, in_batched, pred, dynamic):
        pred_batched, dynamic_batched = in_batched
        in_axes = jtu.tree_map(lambda b: 0 if b else None, dynamic_batched)

        def run(which):
            def one(dynamic):
                return combine(dynamic)[which]()

            return jax.vmap(one, in_axes=(in_axes,), axis_size=axis_size)(dynamic)

        if not pred_batched:
            out = lax.cond(pred, lambda: run(0), lambda: run(1))
        else:

            def some():
                if not merge:
                    return run(0)
                yes, no = run(0), run(1)
                return jtu.tree_map(
                    lambda a, b: jnp.where(pred.reshape(pred.shape + (1,) * (a.ndim - 1)), a, b),
                    yes,
                    no,
                )

            # Under a further `vmap` this predicate is batched again: `cond` (not
            # `lax.cond`) keeps skipping there too.
            out = cond(jnp.any(pred), some, lambda: run(1), merge=merge)
        return out, jtu.tree_map(lambda _: True, out)

    return _cond(pred, dynamic)
