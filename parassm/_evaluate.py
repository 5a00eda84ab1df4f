from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._adjoint import AbstractAdjoint, ImplicitAdjoint
from ._auto import Auto
from ._jit import filter_jit
from ._problem import (
    check_same_structure,
    check_state,
    static_length,
    step_output,
    time_length,
)
from ._solution import RESULTS, Solution
from ._solvers._base import AbstractSolver
from ._solvers.sequential import Sequential


def _check_init(init: PyTree, s0: PyTree, length: int) -> PyTree:
    init = jtu.tree_map(jnp.asarray, init)
    if jtu.tree_structure(init) != jtu.tree_structure(s0):
        raise ValueError(
            f"`init` has PyTree structure {jtu.tree_structure(init)}, but it must be a "
            f"trajectory shaped like `s0` ({jtu.tree_structure(s0)}) with a leading "
            "time axis."
        )
    for (path, g), s in zip(jtu.tree_flatten_with_path(init)[0], jtu.tree_leaves(s0)):
        if g.shape != (length,) + s.shape:
            raise ValueError(
                f"`init{jtu.keystr(path)}` has shape {g.shape}; expected "
                f"{(length,) + s.shape} (T={length} copies of the state's shape)."
            )
    return init


def _floating_state(s0: PyTree) -> bool:
    """Whether a parallel solver can take this state (one floating dtype); other
    problems with it are reported by `_evaluate`."""
    try:
        check_state(s0, floating=True)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def evaluate(
    f: Callable[[PyTree[Array], Any], PyTree[Array]],
    s0: PyTree[Array],
    T: int | None = None,
    *,
    xs: PyTree | None = None,
    solver: AbstractSolver = Auto(),
    init: PyTree[Array] | None = None,
    max_steps: int | None = None,
    throw: bool = True,
    adjoint: AbstractAdjoint = ImplicitAdjoint(),
) -> Solution:
    r"""Evaluate the recurrence $s_t = f(s_{t-1}, x_t)$, $t = 1, \ldots, T$.

    Parallel solvers treat the whole trajectory as the unknown of the residual system
    $s_t - f(s_{t-1}, x_t) = 0$ and solve it by (quasi-)Newton iterations, each one a
    linear recurrence solved by a parallel associative scan.

    **Arguments:**

    - `f`: the step function `f(state, x) -> next_state`. The state is any PyTree of
        floating-point arrays; the new state must have the same structure, shapes and
        dtypes. `x` is the slice `xs[t]`, or `None` when `xs` is `None`.
    - `s0`: the initial state $s_0$ (not part of the output).
    - `T`: the number of steps: a Python or NumPy integer, or a concrete 0-d integer
        array (it sets the output's shape, so under `jax.jit` it must be static). May
        be omitted when `xs` is given; if both are given they must agree.
    - `xs`: Keyword only argument. Inputs: a PyTree whose leaves share a leading time
        axis of length `T`, or `None`.
    - `solver`: Keyword only argument. The solver, e.g. [`parassm.Auto`][] (the
        default: diagnose, then use the recommended solver; a state with integer leaves,
        which parallel solvers cannot take, is evaluated sequentially), [`parassm.QuasiDEER`][],
        [`parassm.DEER`][] or [`parassm.Sequential`][].
    - `init`: Keyword only argument. An initial guess for the whole trajectory (warm
        start), shaped like the output. Defaults to `s0` repeated. Steps of the guess
        that are not finite are replaced by `s0`.
    - `max_steps`: Keyword only argument. The most parallel iterations to take.
        Defaults to `T`, which is always enough for the DEER family (causality).
    - `throw`: Keyword only argument. If True (default), raise an error when the
        evaluation fails. If False, return the failure in `Solution.result`; this also
        works under `jax.vmap`, giving one result per batch element.
    - `adjoint`: Keyword only argument. How derivatives are computed:
        [`parassm.ImplicitAdjoint`][] (default; the implicit function theorem at the
        solution, forward and reverse mode) or [`parassm.UnrolledAdjoint`][].

    **Returns:**

    A [`parassm.Solution`][]. Its `value` is the trajectory $s_1, \ldots, s_T$ with a
    leading time axis; `result` is [`parassm.RESULTS.successful`][parassm.RESULTS] only
    if the residual meets the solver's tolerance everywhere.

    !!! example

        ```python
        import jax.numpy as jnp
        import parassm

        def f(s, x):
            return jnp.tanh(0.5 * s + x)

        xs = jnp.linspace(-1.0, 1.0, 1000)
        sol = parassm.evaluate(f, jnp.array(0.0), xs=xs, solver=parassm.DEER())
        sol.value.shape  # (1000,)
        ```
    """
    T = static_length(T, "T")
    extra = {}
    if isinstance(solver, Auto) and not _floating_state(s0):
        # As `jax.lax.scan` does, evaluate states with integer (or mixed-dtype) leaves:
        # sequentially, which is all the parallel solvers could fall back to.
        solver, extra = Sequential(), dict(solver=jnp.array(0))
    elif isinstance(solver, AbstractSolver) and not isinstance(T, bool):
        # The choice of solver is made here, on the host, with the caller's values
        # (concrete, or tracers under an outer transformation), so that the compiled
        # program below is keyed on the solver that runs (e.g. Auto's choice). Bad input
        # is reported by the checks of `_evaluate`.
        try:
            length = time_length(xs, T)
            s0_checked = check_state(s0, floating=True)
            check_same_structure(step_output(f, s0_checked, xs), s0_checked, "`f`")
        except (TypeError, ValueError):
            pass
        else:
            solver.prepare(f, s0_checked, xs, length)
            solver, extra = solver.select(f, s0_checked, xs, length)
    sol = _evaluate(
        f,
        s0,
        T,
        xs=xs,
        solver=solver,
        init=init,
        max_steps=max_steps,
        throw=throw,
        adjoint=adjoint,
    )
    if extra:
        sol = Solution(value=sol.value, result=sol.result, stats=dict(sol.stats, **extra))
    return sol


@filter_jit
def _evaluate(f, s0, T, *, xs, solver, init, max_steps, throw, adjoint) -> Solution:
    if not isinstance(solver, AbstractSolver):
        raise TypeError(
            f"`solver` must be a parassm solver (e.g. `parassm.QuasiDEER()`), got "
            f"{type(solver).__name__}."
        )
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            f"`adjoint` must be a parassm adjoint (e.g. `parassm.ImplicitAdjoint()`), got "
            f"{type(adjoint).__name__}."
        )
    if max_steps is not None and (
        not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 0
    ):
        raise ValueError(f"`max_steps` must be a non-negative int or None, got {max_steps!r}.")
    if isinstance(T, bool):
        raise TypeError(f"`T` must be a Python int, got {T!r}.")
    length = time_length(xs, T)
    s0 = check_state(s0, floating=not isinstance(solver, Sequential))
    if sum(leaf.size for leaf in jtu.tree_leaves(s0)) == 0:
        raise ValueError(
            "Every leaf of `s0` is empty (size 0): there is no state to evolve. Give the "
            "state at least one number."
        )
    check_same_structure(step_output(f, s0, xs), s0, "`f`")
    if init is not None:
        init = _check_init(init, s0, length)
    solver, extra = solver.select(f, s0, xs, length)
    value, result, stats = adjoint.apply(solver, f, s0, xs, length, init, max_steps)
    stats = dict(stats, **extra)
    if throw:
        value, stats = result.error_if((value, stats), result != RESULTS.successful)
    return Solution(value=value, result=result, stats=stats)


class _CarryStep(eqx.Module):
    """`(carry, x) -> carry` of a `lax.scan`-style `f(carry, x) -> (carry, y)`. A Module,
    not a closure: equal for equal `f`, so `evaluate`'s compilation cache hits."""

    f: Callable

    def __call__(self, carry, x):
        return self.f(carry, x)[0]


def scan(
    f: Callable[[PyTree[Array], Any], tuple[PyTree[Array], Any]],
    init: PyTree[Array],
    xs: PyTree | None = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    *,
    solver: AbstractSolver = Auto(),
    max_steps: int | None = None,
    throw: bool = True,
    adjoint: AbstractAdjoint = ImplicitAdjoint(),
) -> tuple[PyTree[Array], Any]:
    """A drop-in replacement for `jax.lax.scan` that evaluates the carry recurrence in
    parallel.

    `f(carry, x) -> (carry, y)` as for `jax.lax.scan`; returns `(final_carry, ys)`. The
    carries are found by [`parassm.evaluate`][] with `solver` and `adjoint`; the outputs
    `ys` then come from one more vectorised call of `f`. With
    `solver=parassm.Sequential()` this is `jax.lax.scan` itself, bit for bit.

    The parallel path is compiled once per `f` (compared by identity, as `jax.jit`
    does), shapes and settings: repeated eager calls with the same `f` reuse it.

    **Arguments:**

    - `f`, `init`, `xs`, `length`, `reverse`, `unroll`: as for `jax.lax.scan`
        (`unroll` only affects [`parassm.Sequential`][]).
    - `solver`, `max_steps`, `throw`, `adjoint`: Keyword only arguments, as for
        [`parassm.evaluate`][].

    **Returns:**

    `(final_carry, ys)`, like `jax.lax.scan`.
    """
    length = static_length(length, "length")
    if isinstance(solver, Sequential) or (isinstance(solver, Auto) and not _floating_state(init)):
        # Auto, the default, takes what `jax.lax.scan` takes: a carry with integer
        # leaves (a step counter, say) is evaluated sequentially.
        return lax.scan(f, init, xs, length=length, reverse=reverse, unroll=unroll)
    if not isinstance(reverse, bool):
        raise TypeError(f"`reverse` must be a bool, got {type(reverse).__name__}.")
    # Python scalars in the carry would be static arguments of the compiled function.
    init = jtu.tree_map(jnp.asarray, init)
    if isinstance(solver, AbstractSolver):
        # As in `evaluate`: host-side work with the caller's values (e.g. Auto's
        # diagnosis of a concrete problem) before `_scan` traces them.
        try:
            T = time_length(xs, length)
            carry = check_state(init, floating=True)
        except (TypeError, ValueError):
            pass
        else:
            solver.prepare(_CarryStep(f), carry, xs, T)
    return _scan(f, init, xs, length, reverse, solver, max_steps, throw, adjoint)


@filter_jit
def _scan(f, init, xs, length, reverse, solver, max_steps, throw, adjoint):
    T = time_length(xs, length)
    if reverse and xs is not None:
        xs = jtu.tree_map(lambda x: jnp.flip(x, axis=0), xs)
    sol = evaluate(
        _CarryStep(f),
        init,
        T,
        xs=xs,
        solver=solver,
        max_steps=max_steps,
        throw=throw,
        adjoint=adjoint,
    )
    carries = sol.value
    init = jtu.tree_map(jnp.asarray, init)
    prev = jtu.tree_map(lambda s0, s: jnp.concatenate([s0[None], s[:-1]]), init, carries)
    in_axes = (0, None if xs is None else 0)
    ys = jax.vmap(lambda c, x: f(c, x)[1], in_axes=in_axes)(prev, xs)
    if reverse:
        ys = jtu.tree_map(lambda y: jnp.flip(y, axis=0), ys)
    final = jtu.tree_map(lambda s: s[-1], carries)
    return final, ys
