import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array

from ._base import AbstractSystem, float_dtype


class MeanFieldRNN(AbstractSystem):
    r"""The mean-field RNN $s_t = W \tanh(s_{t-1}) + u_t$ with
    $W_{ij} \sim N(0, g^2 / D)$ and $W_{ii} = 0$.

    Its largest Lyapunov exponent rises with the gain `g` and crosses zero near
    `g = 1.2` (D = 100). `diag(J) = 0`, so quasi-DEER reduces to Jacobi on it.
    Inputs are $u_t \sim N(0, \text{input\_scale}^2)$.
    """

    W: Array
    s0: Array
    input_scale: float
    dt: None = None
    name = "mean_field"

    def __init__(
        self,
        size: int = 100,
        g: float = 1.5,
        input_scale: float = 0.1,
        key=None,
        dtype=None,
    ):
        dtype = float_dtype(dtype)
        key = jr.key(0) if key is None else key
        wkey, skey = jr.split(key)
        W = jr.normal(wkey, (size, size), dtype) * (g / jnp.sqrt(size))
        self.W = W * (1 - jnp.eye(size, dtype=dtype))
        self.s0 = jr.normal(skey, (size,), dtype)
        self.input_scale = float(input_scale)

    def f(self, s, x):
        return self.W @ jnp.tanh(s) + x

    def inputs(self, T, key=None):
        key = jr.key(1) if key is None else key
        return self.input_scale * jr.normal(key, (T,) + self.s0.shape, self.s0.dtype)


class TanhRNN(AbstractSystem):
    r"""The scalar RNN $s_t = \tanh(a s_{t-1} + u_t)$, $u_t \sim N(0, 1)$.

    With a large gain `a` it is strongly nonlinear (nearly a sign function): its
    Lyapunov exponent is negative but Newton's method needs many steps.
    """

    a: Array
    s0: Array
    dt: None = None
    name = "tanh_rnn"

    def __init__(self, a: float = 3.0, s0: float = 0.0, dtype=None):
        dtype = float_dtype(dtype)
        self.a = jnp.asarray(a, dtype)
        self.s0 = jnp.asarray(s0, dtype)

    def f(self, s, x):
        return jnp.tanh(self.a * s + x)

    def inputs(self, T, key=None):
        key = jr.key(1) if key is None else key
        return jr.normal(key, (T,), self.s0.dtype)


class GRU(AbstractSystem):
    """A randomly initialised `equinox.nn.GRUCell` driven by Gaussian inputs:
    `s_t = cell(x_t, s_{t-1})`."""

    cell: eqx.nn.GRUCell
    s0: Array
    dt: None = None
    name = "gru"

    def __init__(self, hidden_size: int = 16, input_size: int = 4, key=None, dtype=None):
        dtype = float_dtype(dtype)
        key = jr.key(0) if key is None else key
        self.cell = eqx.nn.GRUCell(input_size, hidden_size, key=key, dtype=dtype)
        self.s0 = jnp.zeros((hidden_size,), dtype)

    def f(self, s, x):
        return self.cell(x, s)

    def inputs(self, T, key=None):
        key = jr.key(1) if key is None else key
        return jr.normal(key, (T, self.cell.input_size), self.s0.dtype)


class S5WordProblem(AbstractSystem):
    """Composition of random 5x5 permutation matrices: $s_t = P_t s_{t-1}$.

    Linear with Lyapunov exponent 0: DEER converges in one iteration, while Picard,
    Jacobi and quasi-DEER need about T. Inputs are the permutation matrices.
    """

    s0: Array
    dt: None = None
    name = "s5"

    def __init__(self, dtype=None):
        dtype = float_dtype(dtype)
        self.s0 = jnp.arange(1.0, 6.0, dtype=dtype)

    def f(self, s, x):
        return x @ s

    def inputs(self, T, key=None):
        key = jr.key(1) if key is None else key
        perms = jr.permutation(key, jnp.tile(jnp.arange(5), (T, 1)), axis=1, independent=True)
        return jnp.eye(5, dtype=self.s0.dtype)[perms]
