r"""Closed-form Jacobians of the standard recurrent cells.

The Jacobian of a gated cell with respect to its state is a diagonal plus row-scaled
copies of the recurrent weights. Formed directly it costs `O(D^2)` per step (the
diagonal alone `O(D)` beyond the step itself), where `D` forward-mode JVPs cost `O(D^3)`.
The functions are state-first, like parassm's step functions: `fn(state, x)`.

GRU (`equinox.nn.GRUCell`), with $U_r, U_z, U_n$ the blocks of `weight_hh`:

$$h' = (1 - z) \odot n + z \odot h,\quad
\frac{\partial h'}{\partial h} = \mathrm{diag}(z) + \mathrm{diag}(\alpha) U_n
+ \mathrm{diag}(\beta) U_r + \mathrm{diag}(\gamma) U_z$$

with $\alpha = (1 - z)(1 - n^2) r$, $\beta = (1 - z)(1 - n^2)\,c\,r(1 - r)$,
$\gamma = (h - n) z (1 - z)$ and $c = U_n h + b_n$.

LSTM (`equinox.nn.LSTMCell`), state $(h, c)$, gates $i, f, g, o$ with recurrent blocks
$U_i, U_f, U_g, U_o$: $c' = f c + i g$, $h' = o \tanh c'$, so

$$\frac{\partial c'}{\partial h} = \mathrm{diag}(c f(1-f)) U_f + \mathrm{diag}(g i(1-i)) U_i
+ \mathrm{diag}(i (1 - g^2)) U_g,\quad \frac{\partial c'}{\partial c} = \mathrm{diag}(f),$$
$$\frac{\partial h'}{\partial h} = \mathrm{diag}(\tanh(c')\,o(1-o)) U_o
+ \mathrm{diag}(o (1 - \tanh^2 c')) \frac{\partial c'}{\partial h},\quad
\frac{\partial h'}{\partial c} = \mathrm{diag}(o (1 - \tanh^2 c') f).$$
"""

from collections.abc import Callable

import equinox as eqx
import jax.nn as jnn
import jax.numpy as jnp
from jaxtyping import Array


def _diag_blocks(W: Array, parts: int) -> list[Array]:
    """The diagonals of the `parts` square blocks stacked in `W` (`(parts D, D)`)."""
    D = W.shape[1]
    return [jnp.diagonal(W[k * D : (k + 1) * D]) for k in range(parts)]


def _gru_terms(cell: eqx.nn.GRUCell, h: Array, x: Array):
    if cell.use_bias:
        bias, bias_n = cell.bias, cell.bias_n
    else:
        bias = bias_n = jnp.zeros((), h.dtype)
    ir, iz, in_ = jnp.split(cell.weight_ih @ x + bias, 3)
    hr, hz, hn = jnp.split(cell.weight_hh @ h, 3)
    r = jnn.sigmoid(ir + hr)
    z = jnn.sigmoid(iz + hz)
    c = hn + bias_n
    n = jnp.tanh(in_ + r * c)
    dn = (1 - z) * (1 - n * n)
    # d h' / d h = diag(z) + diag(alpha) U_n + diag(beta) U_r + diag(gamma) U_z
    alpha = dn * r
    beta = dn * c * r * (1 - r)
    gamma = (h - n) * z * (1 - z)
    return z, alpha, beta, gamma


def _gru_diagonal(cell, h, x):
    z, alpha, beta, gamma = _gru_terms(cell, h, x)
    ur, uz, un = _diag_blocks(cell.weight_hh, 3)
    return z + alpha * un + beta * ur + gamma * uz


def _gru_jacobian(cell, h, x):
    z, alpha, beta, gamma = _gru_terms(cell, h, x)
    D = h.shape[0]
    Ur, Uz, Un = (cell.weight_hh[k * D : (k + 1) * D] for k in range(3))
    return jnp.diag(z) + alpha[:, None] * Un + beta[:, None] * Ur + gamma[:, None] * Uz


def _lstm_terms(cell: eqx.nn.LSTMCell, state, x):
    h, c = state
    lin = cell.weight_ih @ x + cell.weight_hh @ h
    if cell.use_bias:
        lin = lin + cell.bias
    i, f, g, o = jnp.split(lin, 4)
    i, f, g, o = jnn.sigmoid(i), jnn.sigmoid(f), jnp.tanh(g), jnn.sigmoid(o)
    c_new = f * c + i * g
    t = jnp.tanh(c_new)
    dt = o * (1 - t * t)
    # d c' / d h = diag(ci) U_i + diag(cf) U_f + diag(cg) U_g; d h' / d h adds diag(ho) U_o.
    ci, cf, cg = g * i * (1 - i), c * f * (1 - f), i * (1 - g * g)
    ho = t * o * (1 - o)
    return f, dt, ci, cf, cg, ho


def _lstm_diagonal(cell, state, x):
    f, dt, ci, cf, cg, ho = _lstm_terms(cell, state, x)
    ui, uf, ug, uo = _diag_blocks(cell.weight_hh, 4)
    dc_dh = ci * ui + cf * uf + cg * ug
    return ho * uo + dt * dc_dh, f


def _lstm_jacobian(cell, state, x):
    f, dt, ci, cf, cg, ho = _lstm_terms(cell, state, x)
    D = f.shape[0]
    Ui, Uf, Ug, Uo = (cell.weight_hh[k * D : (k + 1) * D] for k in range(4))
    dc_dh = ci[:, None] * Ui + cf[:, None] * Uf + cg[:, None] * Ug
    dh_dh = ho[:, None] * Uo + dt[:, None] * dc_dh
    top = jnp.concatenate([dh_dh, jnp.diag(dt * f)], axis=1)
    bottom = jnp.concatenate([dc_dh, jnp.diag(f)], axis=1)
    return jnp.concatenate([top, bottom], axis=0)


class _Bound(eqx.Module):
    """`fn(cell, state, x)` with the cell bound: a Module, so the cell's arrays are part
    of the solver's PyTree (traced under `jit`, like the cell itself)."""

    fn: Callable = eqx.field(static=True)
    cell: eqx.Module

    def __call__(self, state, x):
        return self.fn(self.cell, state, x)


def cell_derivatives(cell) -> tuple[Callable, Callable] | None:
    """`(diagonal, jacobian)` closed forms for a known cell, state-first (`fn(state, x)`),
    or `None`. The diagonal is a PyTree shaped like the state; the Jacobian is the
    `(D, D)` matrix on the flattened state."""
    if isinstance(cell, eqx.nn.GRUCell):
        return _Bound(_gru_diagonal, cell), _Bound(_gru_jacobian, cell)
    if isinstance(cell, eqx.nn.LSTMCell):
        return _Bound(_lstm_diagonal, cell), _Bound(_lstm_jacobian, cell)
    return None
