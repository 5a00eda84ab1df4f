from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._adjoint import AbstractAdjoint, ImplicitAdjoint
from .._evaluate import evaluate
from .._solution import Solution
from .._solvers._base import AbstractSolver
from .._solvers.deer import ExactJacobian, FunctionJacobian
from .._solvers.quasi_deer import ExactDiagonal, FunctionDiagonal
from ._cells import cell_derivatives


def with_closed_forms(
    solver: AbstractSolver | None, cell, size: int | None = None
) -> AbstractSolver | None:
    """`solver` with the cell's closed-form Jacobian or diagonal in place of the exact
    (forward-mode) one, for the cells whose closed forms `parassm.nn` knows (equinox's
    GRU and LSTM cells); `solver` unchanged otherwise. The same numbers, cheaper.

    Except where the solver, given a state of `size` components, forms no Jacobian at
    all (`tangent_maps`: DEER, and ELK undamped, on a CPU from 17 components, one JVP
    per step), which is cheaper than the closed form's dense maps:
    `ParallelRNN(GRUCell, solver=DEER())`, float32, this 2-core CPU, CPU seconds,
    closed form against none, a training step (value and gradient) of a batch of 8 at
    `H = 32`, `T = 2000`: 506 against 344 ms; one sequence at `H = 64`, `T = 1e4`: 609
    against 380 ms."""
    derivatives = None if solver is None else cell_derivatives(cell)
    if derivatives is None:
        return solver
    diagonal, jacobian = derivatives
    if type(getattr(solver, "jacobian", None)) is ExactJacobian:
        if size is not None and solver.tangent_maps(size):
            return solver
        return eqx.tree_at(lambda s: s.jacobian, solver, FunctionJacobian(jacobian))
    if type(getattr(solver, "diagonal", None)) is ExactDiagonal:
        return eqx.tree_at(lambda s: s.diagonal, solver, FunctionDiagonal(diagonal))
    return solver


class _CellStep(eqx.Module):
    """Adapts an equinox-style cell, `cell(input, hidden)`, to parassm's state-first
    step `f(state, x)`."""

    cell: Callable

    def __call__(self, state, x):
        return self.cell(x, state)


def _default_state(cell) -> PyTree[Array]:
    leaves = [x for x in jtu.tree_leaves(cell) if eqx.is_inexact_array(x)]
    dtype = leaves[0].dtype if leaves else jnp.result_type(float)
    if isinstance(cell, eqx.nn.LSTMCell):
        zeros = jnp.zeros((cell.hidden_size,), dtype)
        return (zeros, zeros)
    hidden_size = getattr(cell, "hidden_size", None)
    if isinstance(hidden_size, int):
        return jnp.zeros((hidden_size,), dtype)
    raise ValueError(
        f"Cannot infer the initial state of a {type(cell).__name__}: it has no integer "
        "`hidden_size` attribute. Pass `state=` explicitly (a PyTree shaped like the "
        "cell's hidden state)."
    )


_KNOWN_CELLS = (eqx.nn.GRUCell, eqx.nn.LSTMCell)


def _check_inputs(cell, xs) -> None:
    """For equinox's cells, inputs must be one sequence of shape `(T, input_size)`.
    (Other cells may take inputs of any structure.)"""
    if not isinstance(cell, _KNOWN_CELLS) or not eqx.is_array(xs):
        return
    input_size = cell.input_size
    shape = xs.shape
    if len(shape) == 2 and shape[1] == input_size:
        return
    if len(shape) == 3 and shape[2] == input_size:
        raise ValueError(
            f"`xs` has shape {shape}: a batch of sequences? ParallelRNN acts on one "
            f"sequence of shape (T, {input_size}), like `eqx.nn` layers; use "
            "`jax.vmap(rnn)(xs)` for a batch."
        )
    raise ValueError(
        f"`xs` has shape {shape}, but the {type(cell).__name__} takes inputs of size "
        f"{input_size}: pass one sequence of shape (T, {input_size}) (time first)."
    )


def _check_state(cell, state) -> None:
    """For equinox's cells, `state` must be shaped like the cell's hidden state."""
    if not isinstance(cell, _KNOWN_CELLS):
        return
    expected = _default_state(cell)
    shapes = jtu.tree_map(lambda x: tuple(jnp.shape(x)), state)
    want = jtu.tree_map(lambda x: x.shape, expected)
    if jtu.tree_structure(state) != jtu.tree_structure(expected) or jtu.tree_leaves(
        shapes, is_leaf=lambda x: isinstance(x, tuple)
    ) != jtu.tree_leaves(want, is_leaf=lambda x: isinstance(x, tuple)):
        raise ValueError(
            f"`state` has shapes {shapes}, but a {type(cell).__name__} with hidden size "
            f"{cell.hidden_size} has a state of shapes {want}; pass a state of those "
            "shapes, or omit `state` for zeros."
        )


class ParallelRNN(eqx.Module):
    """Evaluate any recurrent cell over a sequence in parallel, inside a model.

    Wraps an equinox-style cell `cell(input, hidden) -> hidden` (`eqx.nn.GRUCell`,
    `eqx.nn.LSTMCell` with its `(h, c)` state, or any Module of your own) and returns all
    hidden states, evaluated with a parassm solver. Gradients with respect to the cell's
    parameters, the inputs and the initial state come from the implicit function
    theorem (one more scan), not from backpropagation through the Newton iterations.

    Like `eqx.nn` layers this acts on a single sequence; `jax.vmap` it over a batch.

    **Arguments:**

    - `cell`: the recurrent cell.
    - `solver`: Keyword only argument. The solver ([`parassm.evaluate`][]'s default if
        `None`).
    - `adjoint`: Keyword only argument. How gradients are computed (default
        [`parassm.ImplicitAdjoint`][]).
    - `max_steps`: Keyword only argument. Passed to [`parassm.evaluate`][].
    - `reverse`: Keyword only argument. If True, run the cell from the last input to
        the first (the outputs stay aligned with the inputs).
    - `throw`: Keyword only argument. Raise if the evaluation fails (default True).

    !!! example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import parassm

        cell = eqx.nn.GRUCell(input_size=3, hidden_size=8, key=jax.random.key(0))
        rnn = parassm.nn.ParallelRNN(cell, solver=parassm.DEER())
        xs = jnp.ones((1000, 3))
        hs = rnn(xs)                      # (1000, 8)
        batch = jax.vmap(rnn)(jnp.ones((4, 1000, 3)))
        ```
    """

    cell: Callable
    solver: AbstractSolver | None
    adjoint: AbstractAdjoint
    max_steps: int | None = eqx.field(static=True)
    reverse: bool = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        cell: Callable,
        *,
        solver: AbstractSolver | None = None,
        adjoint: AbstractAdjoint = ImplicitAdjoint(),
        max_steps: int | None = None,
        reverse: bool = False,
        throw: bool = True,
    ):
        if not callable(cell):
            raise TypeError(
                f"`cell` must be callable as `cell(input, hidden)`, got {type(cell).__name__}."
            )
        if not isinstance(reverse, bool):
            raise TypeError(f"`reverse` must be a bool, got {reverse!r}.")
        self.cell = cell
        self.solver = solver
        self.adjoint = adjoint
        self.max_steps = max_steps
        self.reverse = reverse
        self.throw = throw

    def solve(
        self,
        xs: PyTree[Array],
        state: PyTree[Array] | None = None,
        *,
        init: PyTree[Array] | None = None,
    ) -> Solution:
        """Like `__call__`, but returns the whole [`parassm.Solution`][] (result code
        and statistics as well as the hidden states)."""
        _check_inputs(self.cell, xs)
        if state is None:
            state = _default_state(self.cell)
        else:
            _check_state(self.cell, state)
        if self.reverse:
            xs = jtu.tree_map(lambda x: jnp.flip(x, axis=0), xs)
            if init is not None:
                init = jtu.tree_map(lambda x: jnp.flip(x, axis=0), init)
        kwargs: dict[str, Any] = {}
        if self.solver is not None:
            size = sum(jnp.size(leaf) for leaf in jtu.tree_leaves(state))
            kwargs["solver"] = with_closed_forms(self.solver, self.cell, size)
        sol = evaluate(
            _CellStep(self.cell),
            state,
            xs=xs,
            init=init,
            max_steps=self.max_steps,
            throw=self.throw,
            adjoint=self.adjoint,
            **kwargs,
        )
        if self.reverse:
            sol = eqx.tree_at(
                lambda s: s.value, sol, jtu.tree_map(lambda x: jnp.flip(x, axis=0), sol.value)
            )
        return sol

    def __call__(
        self,
        xs: PyTree[Array],
        state: PyTree[Array] | None = None,
        *,
        init: PyTree[Array] | None = None,
        key: Any = None,
    ) -> PyTree[Array]:
        """**Arguments:**

        - `xs`: the inputs, with a leading time axis (e.g. shape `(T, input_size)`).
        - `state`: the initial hidden state; zeros by default (for cells with a
            `hidden_size`).
        - `init`: Keyword only argument. A guess for all hidden states (warm start),
            e.g. the output of the previous training step on the same sequence, which
            often cuts the Newton iterations to one or two.
        - `key`: Keyword only argument. Ignored; for compatibility with `eqx.nn`.

        **Returns:**

        The hidden states after each input, with a leading time axis.
        """
        return self.solve(xs, state, init=init).value
