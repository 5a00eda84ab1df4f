import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array

from ._base import AbstractSystem, float_dtype


class Lorenz63(AbstractSystem):
    r"""A one-step map of the Lorenz-63 flow, by forward Euler or classical RK4.

    The flow at `sigma=10, rho=28, beta=8/3` has Lyapunov spectrum about
    `[0.906, 0, -14.572]` per unit time (sum exactly $-(\sigma + 1 + \beta)$). A
    discretised map has its own exponents (forward Euler with `dt=0.01`: about 1.05 per
    unit time); diagnostics measure the map that is evaluated.

    **Arguments:**

    - `integrator`: `"euler"` or `"rk4"`.
    """

    sigma: Array
    rho: Array
    beta: Array
    s0: Array
    dt: float
    integrator: str
    name = "lorenz63"

    def __init__(
        self,
        dt: float = 0.01,
        integrator: str = "rk4",
        sigma: float = 10.0,
        rho: float = 28.0,
        beta: float = 8.0 / 3.0,
        s0=(1.0, 1.0, 1.0),
        dtype=None,
    ):
        if integrator not in ("euler", "rk4"):
            raise ValueError(f"`integrator` must be 'euler' or 'rk4', got {integrator!r}.")
        dtype = float_dtype(dtype)
        self.sigma = jnp.asarray(sigma, dtype)
        self.rho = jnp.asarray(rho, dtype)
        self.beta = jnp.asarray(beta, dtype)
        self.s0 = jnp.asarray(s0, dtype)
        self.dt = float(dt)
        self.integrator = integrator

    def vector_field(self, s):
        x, y, z = s[0], s[1], s[2]
        return jnp.stack([self.sigma * (y - x), x * (self.rho - z) - y, x * y - self.beta * z])

    def f(self, s, x):
        h = jnp.asarray(self.dt, s.dtype)
        v = self.vector_field
        if self.integrator == "euler":
            return s + h * v(s)
        k1 = v(s)
        k2 = v(s + 0.5 * h * k1)
        k3 = v(s + 0.5 * h * k2)
        k4 = v(s + h * k3)
        return s + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


class TwoWellLangevin(AbstractSystem):
    r"""Unadjusted Langevin dynamics on a 2-D mixture of two unit Gaussians at
    $\pm m$: $s_t = s_{t-1} - h \nabla U(s_{t-1}) + \sqrt{2h}\, \xi_t$.

    Locally unstable between the wells, yet contracting on average (negative
    Lyapunov exponent): DEER needs a number of steps growing sublinearly in T.
    Inputs are the standard normal increments $\xi_t$.
    """

    means: Array
    s0: Array
    step: Array
    dt: None = None
    name = "two_well"

    def __init__(self, step: float = 0.01, separation: float = 2.0, s0=(0.0, 0.0), dtype=None):
        dtype = float_dtype(dtype)
        self.means = jnp.asarray([[separation, 0.0], [-separation, 0.0]], dtype)
        self.s0 = jnp.asarray(s0, dtype)
        self.step = jnp.asarray(step, dtype)

    def potential(self, s):
        sq = jnp.sum((s[None, :] - self.means) ** 2, axis=1)
        return -jax.nn.logsumexp(-0.5 * sq) + jnp.log(jnp.asarray(2.0, s.dtype))

    def f(self, s, x):
        return s - self.step * jax.grad(self.potential)(s) + jnp.sqrt(2 * self.step) * x

    def inputs(self, T, key=None):
        key = jr.key(0) if key is None else key
        return jr.normal(key, (T, 2), self.s0.dtype)
