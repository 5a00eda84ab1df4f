"""Searches: which step size the next trial uses, and whether a trial is accepted.

The Newton loop (`_parallel.py`) makes one trial per iteration of its body: the
correction of the solver's descent for the current step size, evaluated once. A search
that never rejects (`Undamped`, `FixedDamping`) keeps one step size; the others
(`Backtracking`, `TrustRegion`) see every trial's merit and converged front, accept it
or not, and choose the next step size. A rejected trial is retried from the same
iterate with the same linearisation; after `max_trials` trials in a row the loop
accepts one anyway (every trial converges one more step, so progress is guaranteed).

For [`parassm.DEER`][]-type solvers the step size scales the Newton correction; for
[`parassm.ELK`][]-type solvers it is the inverse of the Levenberg-Marquardt damping.
"""

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PyTree


class AbstractSearch(eqx.Module):
    """How the step size of each trial is chosen, and which trials are accepted."""

    may_reject: ClassVar[bool]
    max_trials: eqx.AbstractVar[int]

    @abc.abstractmethod
    def init(self, dtype) -> tuple[Float[Array, ""], PyTree[Array]]:
        """`(step_size, state)` at the first iteration."""

    def update(
        self, state: PyTree[Array], step_size: Float[Array, ""], trial
    ) -> tuple[Bool[Array, ""], Float[Array, ""], PyTree[Array]]:
        """`(accept, next_step_size, state)` after a trial (only called when
        `may_reject`). `trial` has `merit`, `trial_merit`, `front`, `trial_front` and
        `predicted_merit()` (the descent's linear model at the trial)."""
        raise NotImplementedError

    def stats(
        self, state: PyTree[Array], step_size: Float[Array, ""], num_trials: Array
    ) -> dict[str, Array]:
        """Entries for `Solution.stats`."""
        return {}


class Undamped(AbstractSearch):
    """The full step, every time (plain DEER / quasi-DEER). Fastest near the solution;
    can overshoot or overflow on strongly nonlinear or unpredictable systems."""

    may_reject: ClassVar[bool] = False
    max_trials: int = eqx.field(default=1, static=True, init=False)

    def init(self, dtype):
        return jnp.ones((), dtype), None


class Backtracking(AbstractSearch):
    r"""Backtracking line search on the merit $L(S) = \frac12 \sum_t |s_t - f(s_{t-1},
    x_t)|^2$ (Armijo).

    Tries step sizes $\alpha = 1, \beta, \beta^2, \ldots$ along the correction and takes
    the first with $L(S + \alpha\,\delta) \le (1 - c\,\alpha) L(S)$, or one that
    converges more steps than the accepted iterate plus one (the converged front moved
    beyond what a sequential step gives). After `max_backtracks` rejections the
    shortest trial is taken. Each trial costs one vectorised evaluation of `f` over the
    sequence; the linearisation and the scan are shared.

    **Arguments:**

    - `shrink`: $\beta \in (0, 1)$, the step shrink factor (default 0.5).
    - `decrease`: $c \in (0, 1)$, the sufficient-decrease constant (default 1e-4).
    - `max_backtracks`: how many times to shrink at most (default 8).
    """

    shrink: float = 0.5
    decrease: float = 1e-4
    max_backtracks: int = eqx.field(default=8, static=True)
    may_reject: ClassVar[bool] = True

    def __check_init__(self):
        if not 0 < self.shrink < 1:
            raise ValueError(f"`shrink` must be in (0, 1), got {self.shrink}.")
        if not 0 < self.decrease < 1:
            raise ValueError(f"`decrease` must be in (0, 1), got {self.decrease}.")
        if self.max_backtracks < 0:
            raise ValueError(f"`max_backtracks` must be >= 0, got {self.max_backtracks}.")

    @property
    def max_trials(self) -> int:
        return self.max_backtracks + 1

    def init(self, dtype):
        return jnp.ones((), dtype), None

    def update(self, state, step_size, trial):
        sufficient = trial.trial_merit <= (1 - self.decrease * step_size) * trial.merit
        accept = sufficient | (trial.trial_front > trial.front + 1)
        one = jnp.ones((), step_size.dtype)
        return accept, jnp.where(accept, one, step_size * self.shrink), state


class FixedDamping(AbstractSearch):
    r"""A constant Levenberg-Marquardt damping $\lambda$ (for [`parassm.ELK`][] and
    [`parassm.QuasiELK`][]); every step is taken (one smoother solve per iteration).

    Small $\lambda$ gives DEER / quasi-DEER steps; large $\lambda$ gives short steps
    along the negative merit gradient, $\Delta \approx -\nabla L / \lambda$.

    **Arguments:**

    - `value`: $\lambda > 0$.
    """

    value: float
    may_reject: ClassVar[bool] = False
    max_trials: int = eqx.field(default=1, static=True, init=False)

    def __check_init__(self):
        if not self.value > 0:
            raise ValueError(f"`value` must be positive, got {self.value}.")

    def init(self, dtype):
        return jnp.asarray(1 / self.value, dtype), None

    def stats(self, state, step_size, num_trials):
        return dict(damping=1 / step_size, num_trials=num_trials)


class TrustRegion(AbstractSearch):
    r"""Adaptive Levenberg-Marquardt damping $\lambda$ (for [`parassm.ELK`][] and
    [`parassm.QuasiELK`][]) by a trust-region rule on the gain ratio
    $\rho = (L(S) - L(S + \Delta)) / (L(S) - m(\Delta))$, with $L$ the merit
    $\frac12 \sum_t |r_t|^2$ and $m$ its Gauss-Newton model, and on the converged
    front.

    A trial step is taken if the merit decreased ($\rho >$ `accept_ratio`) **or** it
    extends the converged front: at the trial iterate the first step whose scaled
    residual exceeds one lies beyond `p + 1`, i.e. the trial converges more steps than
    the sequential fallback would. The merit sums over the whole, mostly unconverged,
    trajectory; on unpredictable systems a step that is accurate near the converged
    front can raise it far from the front, and rejecting such steps would throw away
    the progress that bounds the iteration count.

    Then $\lambda$ is multiplied by `shrink` if $\rho >$ `good_ratio`, kept if
    `bad_ratio` $\le \rho \le$ `good_ratio`, and multiplied by `grow` if
    $\rho <$ `bad_ratio` -- except that a step taken only because it extended the front
    keeps $\lambda$ (the model was good near the front and bad far from it: no evidence
    for a smaller or a larger step). A rejected step is retried with the larger
    $\lambda$ (same linearisation, one more smoother solve and evaluation of `f`); after
    `max_trials` trials in a row the last is taken. $\lambda$ stays in
    `[min_damping, max_damping]`.

    **Arguments:**

    - `initial_damping`: $\lambda$ at the first iteration (default `1e-6`: DEER-like
        steps until the merit says otherwise).
    - `shrink`, `grow`: factors (defaults 0.1 and 2).
    - `bad_ratio`, `good_ratio`, `accept_ratio`: thresholds (defaults all 0: shrink on
        any decrease of the merit, grow and retry on an increase that does not extend
        the front).
    - `min_damping`, `max_damping`: bounds (1e-12, 1e12).
    - `max_trials`: trials in a row before one is taken anyway (default 8).
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
    may_reject: ClassVar[bool] = True

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

    def init(self, dtype):
        return jnp.asarray(1 / self.initial_damping, dtype), None

    def update(self, state, step_size, trial):
        predicted = trial.merit - trial.predicted_merit()
        actual = trial.merit - trial.trial_merit
        ratio = jnp.where(predicted > 0, actual / predicted, jnp.sign(actual))
        ratio = jnp.where(jnp.isnan(ratio), -jnp.inf, ratio)
        # The sequential fallback converges step `p`, i.e. `p + 1` steps.
        extends = trial.trial_front > trial.front + 1
        accept = (ratio > self.accept_ratio) | extends
        # A step that raised the merit but extended the converged front was good near
        # the front and bad far from it: no evidence for a larger or a smaller radius.
        bad = jnp.where(extends, 1.0, self.grow)
        factor = jnp.where(
            ratio > self.good_ratio, self.shrink, jnp.where(ratio < self.bad_ratio, bad, 1.0)
        ).astype(step_size.dtype)
        damping = jnp.clip(factor / step_size, self.min_damping, self.max_damping)
        return accept, 1 / damping, state

    def stats(self, state, step_size, num_trials):
        return dict(damping=1 / step_size, num_trials=num_trials)
