r"""ELK and quasi-ELK: Levenberg-Marquardt steps on the residual system, solved exactly
as a linear-Gaussian smoothing problem by the parallel Kalman smoother.

At the iterate $S$ with residuals $r_t = s_t - f(s_{t-1}, x_t)$ and transitions
$A_t \approx J_t$, the step $\Delta$ minimises

$$\sum_t |r_t + \Delta_t - A_t \Delta_{t-1}|^2 + \lambda \sum_t |\Delta_t|^2,$$

which is the posterior mean of the model $\Delta_t = A_t \Delta_{t-1} - r_t + w_t$,
$w_t \sim N(0, I)$, observed as $0 = \Delta_t + v_t$, $v_t \sim N(0, I / \lambda)$.

The shared loop freezes the converged prefix and sets the first unconverged step `p`
exactly: $\Delta_t = 0$ for $t < p$ and $\Delta_p = -r_p$ are fixed, so the smoother
observes them exactly (zero observation noise, $A_t = 0$ up to `p`) and the known
$\Delta_p$ enters the next step's offset.
"""

import abc

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .. import _linear as linear
from .._linear._kalman import smoothed_means
from . import _jacobian as jacobian
from ._base import check_tolerances
from ._parallel import AbstractParallelSolver, finite_transition, Iterate, shift
from .quasi_deer import AbstractDiagonal, ExactDiagonal


def _kalman_transition(transition: linear.AbstractTransition, size: int):
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
    p: Int[Array, ""] | int,
    damping: Float[Array, ""] | float,
) -> Float[Array, "T D"]:
    r"""The Levenberg-Marquardt correction with $\Delta_t = 0$ for $t < p$ and
    $\Delta_p = -r_p$ fixed (`p = -1` fixes nothing), by the parallel Kalman smoother.

    Minimises $\sum_{t > p} |r_t + \Delta_t - A_t \Delta_{t-1}|^2 + \lambda |\Delta_t|^2$
    over $\Delta_t$, $t > p$, with $\lambda$ = `damping` > 0.
    """
    T, D = r.shape
    times = jnp.arange(T)
    free = times > p
    A = finite_transition(transition).mask(free)
    fixed = jnp.where((times == p)[:, None], -r, jnp.zeros((), r.dtype))
    zero = jnp.zeros((), r.dtype)
    b = jnp.where(free[:, None], A.mv(shift(fixed)) - r, zero)
    noise = jnp.where(free, 1 / jnp.asarray(damping, r.dtype), zero)
    if isinstance(A, linear.Dense):
        # One `Q` for all steps, not broadcast over time: the smoother then needs no
        # shift of it (which, with time split over devices, XLA would gather whole).
        eye = jnp.eye(D, dtype=r.dtype)
        Q, R = eye, noise[:, None, None] * eye[None]
    else:
        Q, R = jnp.ones(D, r.dtype), jnp.broadcast_to(noise[:, None], (T, D))
    delta = smoothed_means(A, b, Q, jnp.zeros_like(r), R)
    return jnp.where(free[:, None], delta, fixed)


class AbstractDamping(eqx.Module):
    r"""How [`parassm.ELK`][] and [`parassm.QuasiELK`][] choose the damping $\lambda$."""

    max_trials: eqx.AbstractVar[int]

    @abc.abstractmethod
    def initial(self, dtype) -> Float[Array, ""]:
        """$\\lambda$ at the first iteration."""

    @abc.abstractmethod
    def accept(self, ratio: Float[Array, ""], extends: Bool[Array, ""]) -> Array:
        """Whether a trial step is taken. `ratio` is its gain ratio (actual / predicted
        decrease of the merit); `extends` says whether it converges more steps than a
        sequential step would (its converged front is beyond `p + 1`)."""

    @abc.abstractmethod
    def update(
        self, damping: Float[Array, ""], ratio: Float[Array, ""], extends: Bool[Array, ""]
    ) -> Array:
        """$\\lambda$ after a trial step (`ratio`, `extends` as for `accept`)."""


class FixedDamping(AbstractDamping):
    r"""A constant $\lambda$; every step is taken (one smoother solve per iteration).

    Small $\lambda$ gives DEER / quasi-DEER steps; large $\lambda$ gives short steps
    along the negative merit gradient, $\Delta \approx -\nabla L / \lambda$.

    **Arguments:**

    - `value`: $\lambda > 0$.
    """

    value: float
    max_trials: int = eqx.field(default=1, static=True, init=False)

    def __check_init__(self):
        if not self.value > 0:
            raise ValueError(f"`value` must be positive, got {self.value}.")

    def initial(self, dtype):
        return jnp.asarray(self.value, dtype)

    def accept(self, ratio, extends):
        return jnp.array(True)

    def update(self, damping, ratio, extends):
        return damping


class TrustRegion(AbstractDamping):
    r"""Adaptive $\lambda$ by a trust-region rule on the gain ratio
    $\rho = (L(S) - L(S + \Delta)) / (L(S) - m(\Delta))$, with $L$ the merit
    $\frac12 \sum_t |r_t|^2$ and $m$ its Gauss-Newton model, and on the converged
    front.

    A trial step is taken if the merit decreased ($\rho >$ `accept_ratio`) **or** it
    extends the converged front: at the trial iterate the first step whose scaled
    residual exceeds one (the loop's test, with the solver's `rtol` / `atol`) lies
    beyond `p + 1`, i.e. the trial converges more steps than the sequential fallback
    would. The merit sums over the whole, mostly unconverged, trajectory; on
    unpredictable systems a step that is accurate near the converged front can raise it
    far from the front, and rejecting such steps would throw away the progress that
    bounds the iteration count.

    Then $\lambda$ is multiplied by `shrink` if $\rho >$ `good_ratio`, kept if
    `bad_ratio` $\le \rho \le$ `good_ratio`, and multiplied by `grow` if
    $\rho <$ `bad_ratio` -- except that a step taken only because it extended the front
    keeps $\lambda$ (the model was good near the front and bad far from it: no evidence
    for a smaller or a larger step). A rejected step is retried at once with the larger
    $\lambda$ (same linearisation, one more smoother solve and evaluation of `f`), up
    to `max_trials` trials per iteration; if all are rejected the iteration only sets
    the first unconverged step (a sequential step, so the converged prefix still
    grows). $\lambda$ stays in `[min_damping, max_damping]`.

    Taking a step that raised the merit did not unbound the iterates in our
    measurements: it happens only while the front moves, and it never lowers the
    damping. On the zoo at $T = 1000$ in float32 after 100 iterations (Lorenz-63, the
    logistic map, `tanh(3 s + u)`, the mean-field RNN at $g = 2$) the largest ELK
    iterate was 54 (Lorenz-63's own scale) where DEER's reached $3 \cdot 10^{38}$.
    Whatever the step, the loop never returns non-finite iterates.

    **Arguments:**

    - `initial_damping`: $\lambda$ at the first iteration (default `1e-6`: DEER-like
        steps until the merit says otherwise).
    - `shrink`, `grow`: factors (defaults 0.1 and 2).
    - `bad_ratio`, `good_ratio`, `accept_ratio`: thresholds (defaults all 0: shrink on
        any decrease of the merit, grow and retry on an increase that does not extend
        the front).
    - `min_damping`, `max_damping`: bounds (1e-12, 1e12).
    - `max_trials`: trial steps per iteration (default 8).
    """

    initial_damping: float = 1e-6
    shrink: float = 0.1
    grow: float = 2.0
    bad_ratio: float = 0.0
    good_ratio: float = 0.0
    accept_ratio: float = 0.0
    min_damping: float = 1e-12
    max_damping: float = 1e12
    max_trials: int = eqx.field(default=8, static=True)

    def __check_init__(self):
        if not 0 < self.min_damping <= self.initial_damping <= self.max_damping:
            raise ValueError(
                "Need 0 < `min_damping` <= `initial_damping` <= `max_damping`, got "
                f"{self.min_damping}, {self.initial_damping}, {self.max_damping}."
            )
        if not 0 < self.shrink < 1 < self.grow:
            raise ValueError(
                f"Need 0 < `shrink` < 1 < `grow`, got shrink={self.shrink}, grow={self.grow}."
            )
        if not 0 <= self.accept_ratio <= self.bad_ratio <= self.good_ratio < 1:
            raise ValueError(
                "Need 0 <= `accept_ratio` <= `bad_ratio` <= `good_ratio` < 1, got "
                f"{self.accept_ratio}, {self.bad_ratio}, {self.good_ratio}."
            )
        if self.max_trials < 1:
            raise ValueError(f"`max_trials` must be at least 1, got {self.max_trials}.")

    def initial(self, dtype):
        return jnp.asarray(self.initial_damping, dtype)

    def accept(self, ratio, extends):
        return (ratio > self.accept_ratio) | extends

    def update(self, damping, ratio, extends):
        # A step that raised the merit but extended the converged front was good near
        # the front and bad far from it: no evidence for a larger or a smaller radius.
        bad = jnp.where(extends, 1.0, self.grow)
        factor = jnp.where(
            ratio > self.good_ratio,
            self.shrink,
            jnp.where(ratio < self.bad_ratio, bad, 1.0),
        ).astype(damping.dtype)
        return jnp.clip(damping * factor, self.min_damping, self.max_damping)


class AbstractELK(AbstractParallelSolver):
    """Levenberg-Marquardt on the residual system; subclasses choose `A_t`."""

    damping: eqx.AbstractVar[AbstractDamping]

    def init_state(self, dtype):
        return self.damping.initial(dtype), jnp.array(0)

    def state_stats(self, state):
        damping, trials = state
        return dict(damping=damping, num_trials=trials)

    def step(self, it: Iterate, state):
        damping, trials = state
        D = it.S.shape[1]
        A = finite_transition(self.transition(it.flat, it.xs, it.s_prev, it.lin, it.iteration))
        A = _kalman_transition(A, D)
        model_A = A.mask(it.times > it.p)
        merit0 = it.merit()

        def trial(lam):
            delta = lm_correction(A, it.r, it.p, lam)
            S_new = it.apply(delta)
            # The Gauss-Newton model of the merit at the correction actually applied.
            applied = S_new - it.S
            model_r = it.r + applied - model_A.mv(shift(applied))
            predicted = merit0 - 0.5 * jnp.sum(model_r * model_r)
            merit, front = it.measure(S_new)
            actual = merit0 - merit
            ratio = jnp.where(predicted > 0, actual / predicted, jnp.sign(actual))
            ratio = jnp.where(jnp.isnan(ratio), -jnp.inf, ratio)
            # The fallback (every trial rejected) converges step `p`: `p + 1` steps.
            return S_new, ratio, front > it.p + 1

        if self.damping.max_trials == 1:
            S_new, ratio, extends = trial(damping)
            return S_new, (self.damping.update(damping, ratio, extends), trials + 1)

        def cond(carry):
            k, _, accepted, _ = carry
            return ~accepted & (k < self.damping.max_trials)

        def body(carry):
            k, lam, _, S_best = carry
            S_new, ratio, extends = trial(lam)
            accepted = self.damping.accept(ratio, extends)
            S_best = jnp.where(accepted, S_new, S_best)
            return k + 1, self.damping.update(lam, ratio, extends), accepted, S_best

        # If every trial is rejected: only the exact step at `p` (a sequential step).
        fallback = it.apply(jnp.zeros_like(it.S))
        carry = (jnp.array(0), damping, jnp.array(False), fallback)
        k, damping, _, S_new = lax.while_loop(cond, body, carry)
        return S_new, (damping, trials + k)


class ELK(AbstractELK):
    r"""ELK: Levenberg-Marquardt steps with the full Jacobian, each solved exactly by a
    parallel Kalman smoother.

    Each iteration minimises $|r + J_r \Delta|^2 + \lambda |\Delta|^2$ over the
    correction $\Delta$ ($J_r$: the block-bidiagonal residual Jacobian). As
    $\lambda \to 0$ this is [`parassm.DEER`][]; as $\lambda \to \infty$, a short step
    down the gradient of the merit. The damping keeps the iterates bounded on
    unpredictable or strongly nonlinear systems where DEER's full steps overshoot or
    overflow; on easy systems the adaptive damping shrinks quickly and ELK behaves like
    DEER.

    Cost per iteration: as [`parassm.DEER`][] (`D` JVPs, `O(T D^3)` work, `O(T D^2)`
    memory), with a Kalman smoother (two associative scans, one `D x D` inverse per
    combine) instead of one scan, per trial step.

    **Arguments:**

    - `damping`: [`parassm.TrustRegion`][] (default; adaptive $\lambda$) or
        [`parassm.FixedDamping`][] (a constant $\lambda$).
    - `rtol`, `atol`: as for [`parassm.DEER`][].

    `Solution.stats` gains `damping` (the final $\lambda$) and `num_trials` (smoother
    solves in all).

    ??? cite "References"

        ```bibtex
        @inproceedings{gonzalez2024towards,
            title={Towards Scalable and Stable Parallelization of Nonlinear RNNs},
            author={Gonzalez, Xavier and Warrington, Andrew and Smith, Jimmy T.H. and
                    Linderman, Scott W.},
            booktitle={Advances in Neural Information Processing Systems},
            year={2024}
        }
        @article{sarkka2021temporal,
            title={Temporal Parallelization of Bayesian Smoothers},
            author={S{\"a}rkk{\"a}, Simo and Garc{\'\i}a-Fern{\'a}ndez, {\'A}ngel F.},
            journal={IEEE Transactions on Automatic Control},
            year={2021}
        }
        ```
    """

    damping: AbstractDamping = TrustRegion()
    rtol: float | None = None
    atol: float | None = None

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol)

    def transition(self, flat, xs, s_prev, lin, iteration):
        T, D = s_prev.shape
        return linear.Dense(jacobian.dense(lin, T, D, s_prev.dtype))


class QuasiELK(AbstractELK):
    r"""Quasi-ELK: Levenberg-Marquardt steps with the diagonal of the Jacobian, solved
    by an elementwise parallel Kalman smoother (`O(T D)` memory and work).

    The scalable damped method: [`parassm.QuasiDEER`][] as $\lambda \to 0$.

    **Arguments:**

    - `damping`: as for [`parassm.ELK`][].
    - `diagonal`: as for [`parassm.QuasiDEER`][].
    - `rtol`, `atol`: as for [`parassm.DEER`][].

    See [`parassm.ELK`][] for references.
    """

    damping: AbstractDamping = TrustRegion()
    diagonal: AbstractDiagonal = ExactDiagonal()
    rtol: float | None = None
    atol: float | None = None

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol)

    def linearise(self, step, s_prev):
        if self.diagonal.needs_jvp:
            return jax.linearize(step, s_prev)
        return step(s_prev), None

    def transition(self, flat, xs, s_prev, lin, iteration):
        return linear.Diagonal(self.diagonal(flat, xs, s_prev, lin, iteration))
