import jax.numpy as jnp
from jaxtyping import Array

from ._base import AbstractSystem, float_dtype


class Logistic(AbstractSystem):
    r"""The logistic map $x \mapsto r x (1 - x)$.

    Chaotic at `r = 4` with Lyapunov exponent $\ln 2$; a stable fixed point at
    `r = 2.8` (exponent $\ln 0.8$); period 2 at `r = 3.2`.
    """

    r: Array
    s0: Array
    dt: None = None
    name = "logistic"

    def __init__(self, r: float = 4.0, x0: float = 0.3, dtype=None):
        dtype = float_dtype(dtype)
        self.r = jnp.asarray(r, dtype)
        self.s0 = jnp.asarray(x0, dtype)

    def f(self, s, x):
        return self.r * s * (1 - s)


class Tent(AbstractSystem):
    r"""The tent map $x \mapsto \mu \min(x, 1 - x)$; Lyapunov exponent $\ln \mu$.

    With $\mu < 1$ it contracts to 0 (a predictable but non-smooth map).
    """

    mu: Array
    s0: Array
    dt: None = None
    name = "tent"

    def __init__(self, mu: float = 1.9, x0: float = 0.2, dtype=None):
        dtype = float_dtype(dtype)
        self.mu = jnp.asarray(mu, dtype)
        self.s0 = jnp.asarray(x0, dtype)

    def f(self, s, x):
        return self.mu * jnp.minimum(s, 1 - s)


class Henon(AbstractSystem):
    r"""The Hénon map $(x, y) \mapsto (1 - a x^2 + y, b x)$.

    At `a = 1.4, b = 0.3`: $\lambda_1 \approx 0.419$ and $\lambda_1 + \lambda_2 = \ln b$.
    """

    a: Array
    b: Array
    s0: Array
    dt: None = None
    name = "henon"

    def __init__(self, a: float = 1.4, b: float = 0.3, s0=(0.1, 0.1), dtype=None):
        dtype = float_dtype(dtype)
        self.a = jnp.asarray(a, dtype)
        self.b = jnp.asarray(b, dtype)
        self.s0 = jnp.asarray(s0, dtype)

    def f(self, s, x):
        return jnp.stack([1 - self.a * s[0] ** 2 + s[1], self.b * s[0]])
