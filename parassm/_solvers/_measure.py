"""What the Newton loop measures: the recurrence it iterates on (`Problem`), the
convergence test of every step (`measure`) and the merit the searches compare."""

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree

from .._linear._scan_impl import associative_scan
from .._linear._shift import shift
from . import _jacobian as jacobian


class Problem(eqx.Module):
    """The recurrence the loop iterates on: `fn(s, x)` on flat states, its inputs, and
    the state before the first step (`s0`, or the converged state before a window)."""

    fn: Callable = eqx.field(static=True)
    unravel: Callable = eqx.field(static=True)
    xs: PyTree | None
    s0: Float[Array, " D"]
    length: int = eqx.field(static=True)

    def previous(self, S: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """`(s_0, s_1, ..., s_{T-1})`: the state before every step."""
        return shift(S, self.s0)

    def evaluate(self, S: Float[Array, "T D"]) -> Float[Array, "T D"]:
        """`f(s_{t-1}, x_t)` for every step."""
        return jacobian.over_time(self.fn, self.xs)(self.previous(S))


def first_true(mask: Bool[Array, " T"]) -> Int[Array, ""]:
    """The first index where `mask` holds (`T` if none). A masked `min`, not `argmax`:
    with time split over devices it is one scalar all-reduce."""
    T = mask.shape[0]
    return jnp.min(jnp.where(mask, jnp.arange(T), T))


def measure(
    S: Float[Array, "T D"],
    fs: Float[Array, "T D"],
    rtol: float,
    atol: float,
    scale: Float[Array, ""] | float = 0.0,
) -> tuple[Float[Array, " T"], Int[Array, ""], Float[Array, " T"], Float[Array, " T"]]:
    """The loop's convergence test: `(err, p, tol, sizes)`, the scaled residual of every
    step, the first step with `err > 1` (`T` if none), every step's tolerance, and a
    bound on the size of every step, `|f_t|_inf + |r_t|_inf >= max(|s_t|_inf,
    |f_t|_inf)` (for the safeguards; from the same reductions).

    Step `t` is converged when

        |s_t - f(s_{t-1}, x_t)|_inf <= atol + rtol * nu_t,

    where `nu_t`, the size of the trajectory up to step `t`, is the largest
    `|f(s_{t'-1}, x_t')|_inf` over the steps `t' <= t` that meet the test relative to
    their own size (`|r_t'| <= atol + rtol |f_t'|`), and at least `scale` (the size of
    the trajectory before a window).

    The test is invariant to the scale of the state: multiply the trajectory by `c` and
    every quantity is multiplied by `c` (`atol` defaults to zero). Measuring a step
    against the size of the trajectory so far rather than its own size alone lets steps
    that decay towards zero converge to the accuracy of the trajectory around them
    (relative accuracy at 1e-30 of the trajectory's size cannot be had in floating
    point). Only steps that are themselves accurate count towards `nu_t`, and only
    earlier ones: a wild iterate after the converged front cannot loosen the test of the
    front.

    NaN or Inf anywhere in a step makes it unconverged (`err = inf`).
    """
    r_norm = jnp.max(jnp.abs(S - fs), axis=1)
    f_norm = jnp.max(jnp.abs(fs), axis=1)
    zero = jnp.zeros((), f_norm.dtype)
    # NaN compares False: a non-finite step never passes, nor counts towards `nu`.
    accurate = r_norm <= atol + rtol * f_norm
    nu = associative_scan(jnp.maximum, jnp.where(accurate, f_norm, zero))
    tol = atol + rtol * jnp.maximum(jnp.maximum(f_norm, nu), scale)
    err = jnp.where(r_norm == 0, zero, r_norm / tol)
    err = jnp.where(jnp.isnan(err), jnp.inf, err)
    return err, first_true(~(err <= 1)), tol, f_norm + r_norm


# Scaled residuals above `MERIT_CAP / rtol` count as that much in the merit: a blown-up
# or non-finite trial has a finite merit, comparable with another blown-up one. Relative
# to `1 / rtol`, because a scaled residual is a residual over `rtol` times the size of
# the trajectory: a poor guess has scaled residuals of order `1 / rtol` (about 1e11 in
# float64), and a cap below that would make every such iterate look alike.
MERIT_CAP = 1e10


def merit_cap(dtype, rtol: float) -> float:
    """`MERIT_CAP / rtol`, and no more than the dtype can square (float16: 128)."""
    info = jnp.finfo(dtype)
    return min(MERIT_CAP / max(rtol, float(info.eps)), float(info.max) ** 0.5 / 2)


def merit(err: Float[Array, " T"], rtol: float) -> Float[Array, ""]:
    """`1/2 mean_t min(err_t, cap)^2` with `cap = merit_cap(...)`: the merit on the
    scaled residuals of `measure`, invariant to the scale of the state, and finite
    whatever the iterate (a mean rather than a sum, so that float32 cannot overflow
    for any T; the searches only compare merits and their ratios)."""
    capped = jnp.minimum(err, jnp.asarray(merit_cap(err.dtype, rtol), err.dtype))
    return 0.5 * jnp.mean(capped * capped)
