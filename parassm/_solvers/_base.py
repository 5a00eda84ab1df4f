import abc
import contextlib
import math
from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._solution import RESULTS


class AbstractSolver(eqx.Module):
    """Base class of every solver: something that evaluates `s_t = f(s_{t-1}, x_t)`
    for `t = 1..T`."""

    @abc.abstractmethod
    def solve(
        self,
        f: Callable,
        s0: PyTree[Array],
        xs: PyTree | None,
        length: int,
        init: PyTree[Array] | None,
        max_steps: int | None,
    ) -> tuple[PyTree[Array], RESULTS, dict[str, Array]]:
        """Evaluate the trajectory. Inputs are already validated by
        [`parassm.evaluate`][]; returns `(value, result, stats)`."""

    def prepare(self, f: Callable, s0: PyTree, xs: PyTree | None, length: int) -> None:
        """Host-side work before [`parassm.evaluate`][] traces the problem, with the
        caller's values (concrete, or tracers under an outer transformation): e.g.
        [`parassm.Auto`][] diagnoses a concrete problem here. Nothing by default."""

    def select(
        self, f: Callable, s0: PyTree[Array], xs: PyTree | None, length: int
    ) -> tuple["AbstractSolver", dict[str, Array]]:
        """At trace time, the solver that actually runs (a Python object: one compiled
        program, one decision for a whole `vmap` batch) and statistics to add to its
        own. `(self, {})` by default."""
        return self, {}

    def runs_sequentially(self, s0: PyTree[Array], length: int) -> bool:
        """True if this solver is known, at trace time, to evaluate by `jax.lax.scan`
        alone, so that its value can be differentiated as it stands. False by default."""
        return False

    def linear_context(self) -> contextlib.AbstractContextManager:
        """A context in which every linear-recurrence solve for this solver is traced,
        its own and those of the implicit adjoint (e.g. a sharded scan). None by
        default."""
        return contextlib.nullcontext()


def default_tolerance(dtype) -> float:
    """`eps ** 0.7` of the dtype: about 1.4e-5 in float32, 1.1e-11 in float64.

    Comfortably above the rounding floor of a converged Newton iterate (a few `eps`
    relative to the state), so convergence is decided by the solver and not by noise.
    """
    return float(jnp.finfo(dtype).eps) ** 0.7


def check_tolerances(rtol: float | None, atol: float | None, *, zero: bool = False) -> None:
    """Refuse tolerances that are not finite positive numbers (non-negative if `zero`):
    NaN compares false and `inf` accepts any residual, so either would report a wrong
    trajectory as successful."""
    bound = "non-negative" if zero else "positive"
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is None:
            continue
        try:
            ok = math.isfinite(value) and (value >= 0 if zero else value > 0)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(
                f"`{name}` must be a finite {bound} number (or None for the default), got "
                f"{value!r}. A tolerance of inf would accept any trajectory; for a loose "
                f"test give a large finite `{name}`, e.g. `{name}=1e-2`."
            )
