"""Searches: which step size the next trial uses, and whether a trial is accepted.

The Newton loop (`_loop.py`) makes one trial per iteration of its body: the
correction of the solver's descent for the current step size, evaluated once. A search
that never rejects (`Undamped`, `FixedDamping`) keeps one step size; the others
(`Backtracking`, `TrustRegion`) see every trial's merit and converged front, accept it
or not, and choose the next step size. A rejected trial is retried from the same
iterate (with its maps formed again, unless the retry is the Jacobi step). The last
of `max_trials` trials in a row is the Jacobi step (step size zero), and the loop
accepts it: it converges one more step like every trial, and on a contracting system
it is always safe. On the steps right after the converged front where the rejected
trial cut the scaled residual a hundredfold, the loop keeps that trial instead
(the `KeepFront` rule, `_rules.py`): it was rejected for the merit over the tail, and causality
makes it independent of the tail.

For [`parassm.DEER`][]-type solvers the step size moves from the Newton correction
(one) to the Jacobi correction (zero); for [`parassm.ELK`][]-type solvers it is the
inverse of the Levenberg-Marquardt damping.
"""

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PyTree

from .._problem import is_concrete


class AbstractSearch(eqx.Module):
    """How the step size of each trial is chosen, and which trials are accepted."""

    may_reject: ClassVar[bool]
    max_trials: eqx.AbstractVar[int]

    @property
    def uses_model(self) -> bool:
        """Whether `update` calls `trial.predicted_merit()` (the loop then computes it)."""
        return False

    @property
    def may_damp(self) -> bool:
        """Whether a trial may have a finite, non-zero step size. For a
        Levenberg-Marquardt descent that is a damped step, which needs the Kalman
        smoother: a search that provably takes only the undamped step (step size `inf`)
        and the Jacobi step (zero) lets the solver leave the smoother out."""
        return True

    @abc.abstractmethod
    def init(self, dtype) -> tuple[Float[Array, ""], PyTree[Array]]:
        """`(step_size, state)` at the first iteration."""

    def update(
        self, state: PyTree[Array], step_size: Float[Array, ""], trial
    ) -> tuple[Bool[Array, ""], Float[Array, ""], PyTree[Array]]:
        """`(accept, next_step_size, state)` after a trial (only called when
        `may_reject`). `trial` has `merit`, `trial_merit`, `front`, `trial_front` and
        `predicted_merit()` (the descent's linear model at the trial; computed by the
        loop only for a search whose `uses_model` is `True`, else `inf`)."""
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
    r"""Take the Newton step if it makes progress; otherwise back off towards the Jacobi
    step (the default of [`parassm.DEER`][] and [`parassm.QuasiDEER`][]).

    A trial is accepted if it decreases the merit: $L(S_{\text{trial}}) \le
    (1 - c\,\tau) L(S)$ (Armijo), with $L = \frac12 \operatorname{mean}_t e_t^2$ the mean of the
    squared scaled residuals of the convergence test (each capped at $10^{10}/$`rtol`, so
    that a blown-up trial still has a finite merit) and $\tau$ the step size; **or**
    if it extends the converged front beyond $p + 1$ (it converges more steps than a
    sequential step would, so it made progress where it counts, even if the merit over
    the unconverged tail rose).

    The first trial is the full Newton step ($\tau = 1$). A rejected trial is retried
    with $\tau = \beta, \beta^2, \ldots$, moving the correction from the Newton one
    towards the Jacobi one ($\tau \Delta^N + (1 - \tau) \Delta^J$, with
    $\Delta^J_t = f(s_{t-1}, x_t) - s_t$); the last trial is the Jacobi step
    ($\tau = 0$), which is taken, except on the steps right after the converged front
    where the rejected trial cut the scaled residual a hundredfold: those keep the
    rejected trial (from a random guess on the two-well sampler, $T = 10^4$, float64:
    15 iterations, 47 with the pure Jacobi step). Each retry costs one vectorised evaluation of `f`;
    the linearisation and the scan are shared. On easy problems every Newton step is
    accepted and this costs nothing.

    Why towards Jacobi rather than towards a shorter Newton step: Newton's correction
    linearised far from the solution (e.g. from a constant initial guess in an
    expanding region) grows geometrically along the sequence, so any multiple of it is
    useless beyond a few steps; the Jacobi step moves every step to
    $f(s_{t-1}, x_t)$, which on a contracting system approaches the solution everywhere
    at once. Measured: the logistic map at $r = 2.8$ from $s_0 = 0.1$, $T = 10^4$: 7
    iterations (undamped DEER: 9999); the two-well sampler, $T = 10^4$, float32: 46
    (4512).

    **Arguments:**

    - `shrink`: $\beta \in (0, 1)$ (default 0.5).
    - `decrease`: $c \in (0, 1)$, the sufficient-decrease constant (default 1e-4).
    - `max_backtracks`: retries after the Newton step (default 1: the Newton step, then
        the Jacobi step); the last one is always the Jacobi step.
    """

    shrink: float = 0.5
    decrease: float = 1e-4
    max_backtracks: int = eqx.field(default=1, static=True)
    may_reject: ClassVar[bool] = True

    def __check_init__(self):
        if not 0 < self.shrink < 1:
            raise ValueError(f"`shrink` must be in (0, 1), got {self.shrink}.")
        if not 0 < self.decrease < 1:
            raise ValueError(f"`decrease` must be in (0, 1), got {self.decrease}.")
        if self.max_backtracks < 1:
            raise ValueError(
                f"`max_backtracks` must be >= 1 (the last retry is the Jacobi step), got "
                f"{self.max_backtracks}."
            )

    @property
    def max_trials(self) -> int:
        return self.max_backtracks + 1

    def init(self, dtype):
        return jnp.ones((), dtype), None

    def update(self, state, step_size, trial):
        sufficient = trial.trial_merit <= (1 - self.decrease * step_size) * trial.merit
        # This trial was rejection number `k`; the last retry is the Jacobi step, and
        # the last trial is taken: the next iteration starts from the Newton step.
        k = trial.rejections + 1
        accept = sufficient | (trial.trial_front > trial.front + 1) | (k >= self.max_trials)
        retry = jnp.where(
            k >= self.max_trials - 1, 0.0, self.shrink ** k.astype(step_size.dtype)
        ).astype(step_size.dtype)
        return accept, jnp.where(accept, jnp.ones_like(step_size), retry), state


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
    r"""Adaptive Levenberg-Marquardt damping $\lambda$ (the default of [`parassm.ELK`][]
    and [`parassm.QuasiELK`][]) by a trust-region rule on the gain ratio
    $\rho = (L(S) - L(S + \Delta)) / (L(S) - m(\Delta))$, with $L$ the merit of
    [`parassm.Backtracking`][] (squared scaled residuals) and $m$ its Gauss-Newton model.

    At the floor `min_damping` the step is undamped: the Newton correction itself, by
    the causal scan. The smoother's correction is a global least-squares fit, not a
    causal one: from a poor guess it gives up accuracy near the converged front to keep
    the tail small, so a little damping can cost many iterations (the two-well sampler,
    $T = 1000$, float32: 117-740 iterations for fixed $\lambda \in [10^{-4}, 10^{-2}]$,
    8 undamped). Damping is for the iterations where the Newton step fails.

    A trial is accepted if it decreased the merit ($\rho >$ `accept_ratio`) without
    making any step worse than the worst one was (a damped trial; the undamped Newton
    step needs only the decrease, as DEER's does), **or** if it extends the converged
    front beyond $p + 1$ (it converges more steps than a sequential step would: progress
    where it counts, even if the merit over the unconverged tail rose). Then $\lambda$
    is multiplied by `shrink` if $\rho >$ `good_ratio`, kept if `bad_ratio`
    $\le \rho \le$ `good_ratio`, and multiplied by `grow` if $\rho <$ `bad_ratio` --
    except that a step taken only because it extended the front keeps $\lambda$. A
    rejected trial is retried from the same iterate: with `max_trials >= 3` first with
    the larger $\lambda$ (the maps formed again, one smoother solve and one evaluation
    of `f`); the last of `max_trials` trials in a row is the Jacobi step (as for
    [`parassm.Backtracking`][]), which is taken and resets $\lambda$ to its initial
    value, so that the next iteration starts from the Newton step again. $\lambda$
    stays in `[min_damping, max_damping]`.

    With the defaults (`max_trials=2`, $\lambda$ starting at the floor) a rejected
    Newton step is followed by the Jacobi step, as in DEER's backtracking, and
    $\lambda$ never leaves the floor: the Levenberg-Marquardt damping is used from an
    `initial_damping` above the floor, or with `max_trials >= 3`. A damped retry in
    between (`max_trials=3`, $\lambda$ at `grow` times the floor) never saved an
    iteration on the convergence zoo (`bench/convergence.py`) and made some runs crawl
    at one step per iteration, since a damped step that lowers the merit over the
    unconverged tail can lead away from the solution: the two-well sampler,
    $T = 10^4$, float64, from a random guess, over 300 iterations (now 47, as DEER).

    **Arguments:**

    - `initial_damping`: $\lambda$ at the first iteration (default `min_damping`: the
        Newton step first).
    - `shrink`, `grow`: factors (defaults 0.1 and 10).
    - `bad_ratio`, `good_ratio`, `accept_ratio`: thresholds (defaults all 0).
    - `min_damping`, `max_damping`: bounds (1e-6, 1e12); at `min_damping` the step is
        undamped.
    - `max_trials`: trials in a row, the last being the Jacobi step (default 2: the
        Newton or damped step, then the Jacobi step; 3 adds a more damped retry).
    """

    initial_damping: float | None = None
    shrink: float = 0.1
    grow: float = 10.0
    bad_ratio: float = 0.0
    good_ratio: float = 0.0
    accept_ratio: float = 0.0
    min_damping: float = 1e-6
    max_damping: float = 1e12
    max_trials: int = eqx.field(default=2, static=True)
    may_reject: ClassVar[bool] = True

    def __check_init__(self):
        if not 0 < self.min_damping <= self._initial <= self.max_damping:
            raise ValueError(
                "Need 0 < `min_damping` <= `initial_damping` <= `max_damping`, got "
                f"{self.min_damping}, {self._initial}, {self.max_damping}."
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
        if self.max_trials < 2:
            raise ValueError(
                f"`max_trials` must be at least 2 (the last trial is the Jacobi step), got "
                f"{self.max_trials}."
            )

    @property
    def uses_model(self) -> bool:
        # With the three thresholds at zero every decision of `update` depends only on
        # the sign of the actual decrease (the gain ratio has that sign whatever the
        # prediction), so the model's pass over the maps is not needed.
        thresholds = (self.accept_ratio, self.bad_ratio, self.good_ratio)
        return not (is_concrete(thresholds) and all(x == 0 for x in thresholds))

    @property
    def may_damp(self) -> bool:
        # Starting at the floor with two trials, a rejected first trial is followed by
        # the Jacobi step, which resets lambda to the floor; an accepted one with
        # `accept_ratio == bad_ratio` never grows it (a decrease means a ratio above
        # `bad_ratio`; a step taken for extending the front keeps lambda). So lambda
        # stays at the floor: every trial is the Newton step or the Jacobi step.
        values = (self._initial, self.min_damping, self.accept_ratio, self.bad_ratio)
        return not (
            is_concrete(values)
            and self._initial <= self.min_damping
            and self.max_trials == 2
            and self.accept_ratio == self.bad_ratio
        )

    def _step_size(self, damping):
        # At the floor the step is undamped: the Newton correction itself (step size
        # `inf`), by the causal scan rather than the smoother.
        return jnp.where(damping <= self.min_damping, jnp.inf, 1 / damping)

    @property
    def _initial(self) -> float:
        return self.min_damping if self.initial_damping is None else self.initial_damping

    def init(self, dtype):
        damping = jnp.asarray(self._initial, dtype)
        return self._step_size(damping), damping

    def update(self, state, step_size, trial):
        predicted = trial.merit - trial.predicted_merit()
        actual = trial.merit - trial.trial_merit
        ratio = jnp.where(predicted > 0, actual / predicted, jnp.sign(actual))
        ratio = jnp.where(jnp.isnan(ratio), -jnp.inf, ratio)
        # The sequential fallback converges step `p`, i.e. `p + 1` steps.
        extends = trial.trial_front > trial.front + 1
        # A decrease of the merit is not enough for a damped step: far from the
        # solution it can lower the sum while a few steps grow without bound (the
        # smoother is not causal: it trades the steps near the front for the tail).
        # Require that no step got worse than the worst one was. The undamped step is
        # the causal Newton step, judged by the merit alone, as DEER's is: with the
        # worst-step test, Newton steps whose tail the loop restarted in phase on a
        # periodic orbit were refused (their first restarted step is worse than any of
        # the sane iterate's) and ELK crawled where DEER took 27 steps (logistic map,
        # r = 3.4, T = 1e4, float32).
        undamped = step_size == jnp.inf
        no_worse = undamped | (trial.trial_worst <= trial.worst)
        decreased = (ratio > self.accept_ratio) & no_worse
        # The last of `max_trials` (the Jacobi step) is taken, as the loop does: the
        # next iteration must not start with another Jacobi step.
        taken = trial.rejections + 1 >= self.max_trials
        accept = decreased | extends | taken
        # A step that raised the merit but extended the converged front was good near
        # the front and bad far from it: no evidence for a larger or a smaller radius.
        bad = jnp.where(extends, 1.0, self.grow)
        factor = jnp.where(
            ratio > self.good_ratio, self.shrink, jnp.where(ratio < self.bad_ratio, bad, 1.0)
        ).astype(step_size.dtype)
        damping = jnp.clip(factor * state, self.min_damping, self.max_damping)
        # The Jacobi step is the last trial, taken when neither the Newton step nor a
        # damped one made progress: the next iteration starts afresh from the initial
        # damping, as the backtracking of DEER starts from the Newton step. (Keeping
        # lambda, which every rejection grew, left damped steps that lowered the merit
        # a little and advanced the front by one step per iteration: the logistic map
        # at r = 3.2, T = 1e3, over 300 iterations; reset, 18, as DEER.)
        damping = jnp.where(step_size > 0, damping, jnp.asarray(self._initial, damping.dtype))
        last = trial.rejections + 1 >= self.max_trials - 1
        next_step = jnp.where(~accept & last, jnp.zeros_like(damping), self._step_size(damping))
        return accept, next_step, damping

    def stats(self, state, step_size, num_trials):
        return dict(damping=state, num_trials=num_trials)
