r"""Descents: the correction $\Delta$ at the accepted iterate, for a given step size.

Both descents fix the converged prefix ($\Delta_t = 0$ for $t < p$) and the exact
sequential step at the first unconverged step ($\Delta_p = -r_p$), and use the maps
$A_t$ for $t > p$ only (zero elsewhere, and where not finite).

- `NewtonDescent`: the (quasi-)Newton correction $\Delta^N_t = A_t \Delta^N_{t-1} - r_t$,
  one linear scan per linearisation (`linear.solve`). A step size $\tau \in [0, 1]$
  moves from it towards the Jacobi correction $\Delta^J = -r$ (the trial
  $f(s_{t-1}, x_t)$, the fixed-point step): $\tau \Delta^N + (1 - \tau) \Delta^J$.
- `LevenbergMarquardtDescent`: the minimiser of
  $\sum_{t > p} |r_t + \Delta_t - A_t \Delta_{t-1}|^2 + \lambda |\Delta_t|^2$ with
  $\lambda = 1 / \text{step size}$, the posterior mean of a linear-Gaussian model, by the
  parallel Kalman smoother.

For both, step size zero is the Jacobi correction: the searches' last resort. On a
contracting system it is always a safe step (it converges whatever the iterate, at the
rate of the contraction), where a Newton-type correction linearised far from the
solution can blow up.
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PyTree

from .. import _linear as linear
from .._linear._kalman import smoothed_means
from .._linear._shift import shift
from . import _jacobian as jacobian
from ._measure import Problem


def _times(x: Array) -> Array:
    return jnp.arange(x.shape[0])


def frozen(
    transition: linear.AbstractTransition, front: Int[Array, ""]
) -> linear.AbstractTransition:
    """`A_t` for `t > front`, zero before and where not finite (one fused select)."""
    a = transition.elements()
    free = _times(a) > front
    free = free.reshape(free.shape + (1,) * (a.ndim - 1))
    return transition.from_elements(jnp.where(free & jnp.isfinite(a), a, jnp.zeros((), a.dtype)))


class AbstractDescent(eqx.Module):
    """How the correction is made from the maps $A_t$, the residual and a step size."""

    @abc.abstractmethod
    def prepare(
        self,
        transition: linear.AbstractTransition,
        r: Float[Array, "T D"],
        front: Int[Array, ""],
    ) -> PyTree[Array]:
        """Everything the corrections at this iterate share (computed once per
        linearisation, reused by every trial step size)."""

    @abc.abstractmethod
    def step(
        self,
        state: PyTree[Array],
        step_size: Float[Array, ""],
        S: Float[Array, "T D"],
        fs: Float[Array, "T D"],
    ) -> Float[Array, "T D"]:
        """The trial iterate for `step_size`, from the accepted iterate `S` and its
        values `fs` (the loop then applies its safeguards). Step size zero is the
        Jacobi trial `fs` itself: computed as such, not as `S + (fs - S)`, which would
        cancel catastrophically where `S` has blown up."""

    @abc.abstractmethod
    def correction(self, state: PyTree[Array]) -> Float[Array, "T D"]:
        """The undamped (Newton-type) correction of `prepare`'s state."""

    def model_residual(
        self, state: PyTree[Array], r: Float[Array, "T D"], delta: Float[Array, "T D"]
    ) -> Float[Array, "T D"]:
        """The linear model's residual $r + \\Delta - A \\Delta_{\\text{prev}}$ at the
        correction `delta` (for trust-region searches)."""
        raise TypeError(f"{type(self).__name__} has no model for a trust-region search.")

    @property
    def products_only(self) -> bool:
        """Whether the maps are used only in products with vectors (a correction by a
        causal scan, a model's residual): they may then be `Tangents`, not formed."""
        return False


def jacobi_correction(r: Float[Array, "T D"], front: Int[Array, ""]) -> Float[Array, "T D"]:
    """`-r_t` from the first unconverged step on, zero before."""
    return jnp.where((_times(r) >= front)[:, None], -r, jnp.zeros((), r.dtype))


def newton_correction(
    transition: linear.AbstractTransition, r: Float[Array, "T D"], front: Int[Array, ""]
) -> Float[Array, "T D"]:
    """The (quasi-)Newton correction $\\Delta_t = A_t \\Delta_{t-1} - r_t$ from the first
    unconverged step on (zero before), by one linear scan (`linear.solve`)."""
    return linear.solve(frozen(transition, front), jacobi_correction(r, front))


# How many numbers the exact Jacobians of the estimate may hold at once (64 MB in
# float32): windows of `W = ESTIMATE_NUMBERS // D^2` steps.
ESTIMATE_NUMBERS = 2**24


def correction_in_windows(
    problem: Problem,
    S: Float[Array, "T D"],
    fs: Float[Array, "T D"],
    window: int | None = None,
    maps: Callable | None = None,
) -> Float[Array, "T D"]:
    """The Newton correction at `S` with the exact Jacobians, $\\delta_t = J_t
    \\delta_{t-1} - r_t$ over the whole trajectory ($r = S - f$): the linearised error
    of `S` (the estimate of the trajectory's error, and the Newton trial after it).

    Window by window, `window` steps at a time (default: as many as
    `ESTIMATE_NUMBERS` numbers of Jacobians hold), each window's recurrence starting
    from the correction at the end of the one before (the last window overlaps the
    one before it where `window` does not divide `T`): `O(window D^2)` memory, one
    pass of `D` JVPs over the sequence. `maps(problem, s_prev)` forms a window's maps
    (default: the exact Jacobians, `jacobian.dense`); `problem` is a
    `_measure.Problem`. Non-finite maps count as zero, as in every correction."""
    if maps is None:

        def maps(problem, s_prev):
            return linear.Dense(jacobian.dense(problem.fn, s_prev, problem.xs))

    T, D = S.shape
    W = max(1, min(T, ESTIMATE_NUMBERS // (D * D))) if window is None else min(window, T)
    if W == T:
        return newton_correction(maps(problem, problem.previous(S)), S - fs, jnp.array(0))
    starts = jnp.minimum(jnp.arange(0, T, W), T - W)

    def one(errors, w0):
        previous = jnp.where(w0 > 0, S[jnp.maximum(w0 - 1, 0)], problem.s0)
        xs = jtu.tree_map(lambda x: lax.dynamic_slice_in_dim(x, w0, W), problem.xs)
        part = Problem(problem.fn, problem.unravel, xs, previous, W)
        S_w = lax.dynamic_slice_in_dim(S, w0, W)
        r = S_w - lax.dynamic_slice_in_dim(fs, w0, W)
        before = jnp.where(w0 > 0, errors[jnp.maximum(w0 - 1, 0)], jnp.zeros_like(r[0]))
        transition = frozen(maps(part, part.previous(S_w)), jnp.array(-1))
        e = linear.solve(transition, -r, init=before)
        return lax.dynamic_update_slice_in_dim(errors, e, w0, axis=0), None

    errors, _ = lax.scan(one, jnp.zeros_like(S), starts)
    return errors


def sequential_correction(
    problem: Problem, S: Float[Array, "T D"], fs: Float[Array, "T D"]
) -> Float[Array, "T D"]:
    """The Newton correction at `S` with the exact Jacobians, $\\delta_t = J_t
    \\delta_{t-1} - r_t$ ($r = S - f$), one JVP per step (`jacobian.tangent_scan`):
    the same as `correction_in_windows`, cheaper on a CPU from a few dozen components
    (a scan of JVPs costs two or three sequential evaluations of `f`)."""
    return jacobian.tangent_scan(problem.fn, problem.previous(S), problem.xs, fs - S)


# Up to which state size the loop's body makes the exact correction from dense
# Jacobians on a CPU (`exact_correction`). Measured on this 2-core CPU, GRU,
# `T = 1e4`, float32 (dense in windows / one JVP per step): `D = 4` 0.7 / 8.0 ms,
# `D = 8` 2.9 / 9.6 ms, `D = 16` 5.5 / 9.7 ms, `D = 32` 62 / 22 ms.
SEQUENTIAL_FROM = 17


def exact_correction(
    problem: Problem, S: Float[Array, "T D"], fs: Float[Array, "T D"]
) -> Float[Array, "T D"]:
    """The Newton correction at `S` with the exact Jacobians, as the loop's body makes
    it: `correction_in_windows` (dense Jacobians, parallel), except where the linear
    scans run one step after the other anyway (`parassm.linear.LoopScan`, the CPU
    default) and the state has `SEQUENTIAL_FROM` components or more:
    `sequential_correction` (one JVP per step, no Jacobian formed)."""
    if corrects_sequentially(S.shape[1]):
        return sequential_correction(problem, S, fs)
    return correction_in_windows(problem, S, fs)


def corrects_sequentially(size: int) -> bool:
    """Whether `exact_correction` takes one JVP per step (`sequential_correction`) for
    a state of `size` components: on `parassm.linear.LoopScan` from `SEQUENTIAL_FROM`
    components. It is then cheaper than a pass of dense Jacobians and a dense scan
    also where a solver forms dense Jacobians itself (`DEER`, `ELK`)."""
    sequential = isinstance(linear.default_scan_impl(), linear.LoopScan)
    return sequential and size >= SEQUENTIAL_FROM


class Tangents(eqx.Module):
    r"""The exact Jacobians $J_t$ at the previous states `s_prev`, not formed: where
    the linear scans run one step after the other anyway, the Newton correction
    $\Delta_t = J_t \Delta_{t-1} - r_t$ is a scan of one JVP per step
    (`jacobian.tangent_scan`) with the same frozen prefix and the same treatment of
    non-finite products as the dense maps' (`newton_correction`). No `T D^2` numbers,
    where the dense maps cost a pass of `D` JVPs per step and a dense scan.

    [`parassm.DEER`][] (and [`parassm.ELK`][] whose search never damps) takes them
    from `SEQUENTIAL_FROM` components on `parassm.linear.LoopScan`
    (`JacobianMaps.tangent_maps`). DEER's whole solve of a GRU, float32, 2-core CPU,
    CPU seconds, the same 3 steps either way, dense maps against these: `T = 1e4`,
    `H = 32` 143 against 122 ms, `H = 64` 479 against 242 ms; a batch of 8, `H = 32`,
    `T = 2000`, 362 against 265 ms."""

    problem: Problem
    s_prev: Float[Array, "T D"]

    def newton_correction(self, r: Float[Array, "T D"], front: Int[Array, ""]) -> Array:
        """`newton_correction` with these Jacobians."""
        problem = self.problem
        free = _times(r) > front
        c = jacobi_correction(r, front)
        return jacobian.tangent_scan(problem.fn, self.s_prev, problem.xs, c, free)

    def frozen_mv(self, v: Float[Array, "T D"], front: Int[Array, ""]) -> Array:
        """`frozen(A, front).mv(v)` with these Jacobians: `J_t v_t` for `t > front`
        (zero before, and where not finite), one JVP per step, all steps at once."""
        problem = self.problem

        def push(s, x, v):
            return jax.jvp(lambda s: problem.fn(s, x), (s,), (v,))[1]

        pushed = jax.vmap(push)(self.s_prev, problem.xs, v)
        free = (_times(v) > front)[:, None]
        return jnp.where(free & jnp.isfinite(pushed), pushed, jnp.zeros((), v.dtype))


class NewtonDescent(AbstractDescent):
    r"""The (quasi-)Newton correction $\Delta^N_t = A_t \Delta^N_{t-1} - r_t$, solved by
    one linear scan; a step size $\tau < 1$ gives
    $\tau \Delta^N + (1 - \tau) \Delta^J$, towards the Jacobi correction $\Delta^J = -r$."""

    def prepare(self, transition, r, front):
        if isinstance(transition, Tangents):
            return transition.newton_correction(r, front)
        return newton_correction(transition, r, front)

    @property
    def products_only(self):
        return True

    def correction(self, state):
        return state

    def step(self, state, step_size, S, fs):
        newton = S + state
        mixed = step_size * newton + (1 - step_size) * fs
        # The end points exactly: `0 * inf` would poison the Jacobi trial where the
        # Newton one overflowed.
        return jnp.where(step_size == 1, newton, jnp.where(step_size == 0, fs, mixed))


def kalman_transition(
    transition: linear.AbstractTransition, size: int
) -> linear.Dense | linear.Diagonal:
    """`transition` as the dense or diagonal maps the Kalman smoother takes."""
    if isinstance(transition, linear.Dense | linear.Diagonal):
        return transition
    if isinstance(transition, linear.Zero):
        return linear.Diagonal(jnp.zeros((transition.length, size)))
    if isinstance(transition, linear.Scalar):
        scales = transition.scales
        return linear.Diagonal(jnp.broadcast_to(scales[:, None], (scales.shape[0], size)))
    return linear.Dense(transition.as_matrix(size))


def lm_correction(
    transition: linear.Dense | linear.Diagonal,
    r: Float[Array, "T D"],
    front: Int[Array, ""] | int,
    damping: Float[Array, ""] | float,
) -> Float[Array, "T D"]:
    r"""The Levenberg-Marquardt correction with $\Delta_t = 0$ for $t < p$ and
    $\Delta_p = -r_p$ fixed (`front = -1` fixes nothing), by the parallel Kalman smoother.

    Minimises $\sum_{t > p} |r_t + \Delta_t - A_t \Delta_{t-1}|^2 + \lambda |\Delta_t|^2$
    over $\Delta_t$, $t > p$, with $\lambda$ = `damping` > 0.

    It is the posterior mean of the model $\Delta_t = A_t \Delta_{t-1} - r_t + w_t$,
    $w_t \sim N(0, I)$, observed as $0 = \Delta_t + v_t$, $v_t \sim N(0, I / \lambda)$; the
    known $\Delta_t$ are observed exactly (zero noise).
    """
    T, D = r.shape
    times = _times(r)
    free = times > front
    transition = frozen(transition, front)
    zero = jnp.zeros((), r.dtype)
    fixed = jnp.where((times == front)[:, None], -r, zero)
    b = jnp.where(free[:, None], transition.mv(shift(fixed)) - r, zero)
    noise = jnp.where(free, 1 / jnp.asarray(damping, r.dtype), zero)
    if isinstance(transition, linear.Dense):
        # One `Q` for all steps, not broadcast over time: the smoother then needs no
        # shift of it (which, with time split over devices, XLA would gather whole).
        eye = jnp.eye(D, dtype=r.dtype)
        Q, R = eye, noise[:, None, None] * eye[None]
    else:
        Q, R = jnp.ones(D, r.dtype), jnp.broadcast_to(noise[:, None], (T, D))
    delta = smoothed_means(transition, b, Q, jnp.zeros_like(r), R)
    return jnp.where(free[:, None], delta, fixed)


class LevenbergMarquardtDescent(AbstractDescent):
    r"""The Levenberg-Marquardt correction with damping $\lambda = 1 / \text{step size}$,
    by the parallel Kalman smoother (dense maps: a dense smoother; diagonal ones: an
    elementwise one). With `damped=False` (for a search whose step sizes are only `inf`
    and zero) only the Newton and the Jacobi corrections, and no smoother in the
    program: on CPU its branch, never taken, still made an undamped ELK solve of a GRU
    ($H = 32$, $T = 10^4$, 3 iterations) take about twice as long as without it, and
    three times as long to compile."""

    damped: bool = eqx.field(default=True, static=True)

    @property
    def products_only(self):
        # Undamped, the correction is the Newton one, by the causal scan.
        return not self.damped

    def prepare(self, transition, r, front):
        # The undamped (Newton) correction, by the causal scan, outside the branches of
        # `step`: it is the usual trial, and the dense maps it reads are not copied
        # into a conditional.
        if isinstance(transition, Tangents):
            return transition, r, front, transition.newton_correction(r, front)
        A = kalman_transition(transition, r.shape[1])
        return A, r, front, newton_correction(A, r, front)

    def correction(self, state):
        return state[3]

    def step(self, state, step_size, S, fs):
        A, r, front, newton = state
        if not self.damped:
            return jnp.where(step_size == 0, fs, S + newton)
        undamped = jnp.isinf(step_size) | (step_size == 0)
        # The smoother runs only for a damped step.
        damped = lax.cond(
            undamped, lambda: S, lambda: S + lm_correction(A, r, front, 1 / step_size)
        )
        return jnp.where(step_size == 0, fs, jnp.where(jnp.isinf(step_size), S + newton, damped))

    def model_residual(self, state, r, delta):
        A, _, front, _ = state
        if isinstance(A, Tangents):
            return r + delta - A.frozen_mv(shift(delta), front)
        return r + delta - frozen(A, front).mv(shift(delta))
