import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, PyTree


def float_dtype(dtype) -> jnp.dtype:
    """`dtype`, or JAX's default floating dtype (float32, or float64 under x64)."""
    return jnp.dtype(jnp.result_type(float) if dtype is None else dtype)


class AbstractSystem(eqx.Module):
    """A reference recurrence `s_t = f(s_{t-1}, x_t)`.

    **Attributes:**

    - `s0`: the initial state.
    - `dt`: the time step for one-step maps of flows (`None` for maps), so that
        Lyapunov exponents can be reported per unit time.
    - `name`: a short identifier, as used by the `parassm` command.
    """

    s0: eqx.AbstractVar[PyTree[Array]]
    dt: eqx.AbstractVar[float | None]
    name: ClassVar[str]

    @abc.abstractmethod
    def f(self, s: PyTree[Array], x) -> PyTree[Array]:
        """One step of the recurrence."""

    def inputs(self, T: int, key: PRNGKeyArray | None = None) -> PyTree[Array] | None:
        """Inputs `xs` for `T` steps (leading time axis), or `None` if autonomous."""
        return None
