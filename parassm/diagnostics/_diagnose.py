"""`parassm.diagnose`: predictability, conditioning, predicted steps and a recommended
solver, from a cheap proxy of the problem."""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from .._jit import filter_jit
from .._problem import check_same_structure, check_state, Flat, flatten, step_output, time_length
from .._solvers._base import AbstractSolver
from .._solvers._parallel import AbstractParallelSolver
from .._solvers.deer import DEER
from .._solvers.elk import ELK
from .._solvers.jacobi import Jacobi
from .._solvers.picard import Picard
from .._solvers.quasi_deer import QuasiDEER
from .._solvers.sequential import Sequential
from .._solvers.shooting import coarse_problem, MultipleShooting
from ._conditioning import Conditioning, conditioning_flat
from ._hardware import Hardware, step_flops
from ._lyapunov import qr_log_stretch, slice_inputs, trajectory_before
from ._predict import (
    calibrated,
    calibration,
    extrapolate,
    factor,
    iteration_time,
    shooting_time,
    trial_solver,
)
from ._trial import converged_prefix_history, steps_to_reach


REGIMES = ("predictable", "marginal", "unpredictable")
# The solvers `diagnose(solvers=...)` knows by name, and predicts by default.
BY_NAME = {"DEER": DEER, "QuasiDEER": QuasiDEER, "ELK": ELK, "Picard": Picard, "Jacobi": Jacobi}
# Parallel evaluation must be predicted this much cheaper than sequential to be chosen.
MARGIN = 1.5
# |LLE| below this (per step) counts as zero: an isometry or a finite-time estimate.
LLE_TOL = 1e-3
# An LLE > 0 is unpredictable once the conditioning may degrade by e^5 over T steps.
UNPREDICTABLE_GROWTH = 5.0


# A chunk of multiple shooting should shrink perturbations by about e^-4: `4 / |LLE|` steps.
SHOOTING_CONTRACTION = 4.0


# The trial of multiple shooting runs on the first this many chunks of the sequence.
SHOOTING_TRIAL_CHUNKS = 16


def shooting_chunk(regime: str, lle: float, length: int) -> int | None:
    """The chunk length for [`parassm.MultipleShooting`][] on a system that contracts
    (LLE < 0) but on which the Newton-type trial crawls (regime `"marginal"`): `4 / |LLE|`
    steps, so that a chunk shrinks perturbations by about $e^{-4}$, and at least
    $\\sqrt{T}$. None otherwise, or where one chunk would be the whole sequence."""
    if regime != "marginal" or not lle < -LLE_TOL:
        return None
    memory = math.ceil(SHOOTING_CONTRACTION / -lle)
    chunk = max(MultipleShooting().chunk(length), memory)
    return chunk if chunk < length else None


def fast_limit(length: int) -> float:
    """Steps that still count as "few": `O(log T)`."""
    return max(8.0, 2.0 * math.log2(max(length, 2)))


def as_solvers(solvers: Sequence) -> tuple[tuple[str, ...], tuple[AbstractParallelSolver, ...]]:
    """Names (for reports) and instances of the solvers to predict: names among
    `BY_NAME` or parallel solver instances."""
    names, out = [], []
    for solver in solvers:
        if isinstance(solver, str):
            if solver not in BY_NAME:
                raise ValueError(
                    f"Unknown solver {solver!r} to predict; choose from {', '.join(BY_NAME)}."
                )
            solver = BY_NAME[solver]()
        if not isinstance(solver, AbstractParallelSolver):
            raise TypeError(
                "Solvers to predict are names or parallel solver instances (e.g. "
                f"`parassm.DEER()`), got {solver!r}."
            )
        name = type(solver).__name__
        while name in names:
            name += "'"
        names.append(name)
        out.append(solver)
    if not out:
        raise ValueError("Give at least one parallel solver to predict.")
    return tuple(names), tuple(out)


# The trial's prefix covers this many decay (or growth) lengths `1 / |LLE|` of the
# system, so that what a linearisation error does along the sequence shows in the trial
# (a flow with an LLE about zero carries a bad guess across its whole length; a 128-step
# prefix of it converges in a few steps while the full problem crawls) ...
DECAY_LENGTHS = 8.0
# ... up to this many steps (the trial is `max_trial_steps` parallel iterations on it).
MAX_PROXY_LENGTH = 1024


class Settings(eqx.Module):
    """The knobs of the diagnosis (static). The trial's prefix is `proxy_length` steps,
    longer (up to `max_proxy_length`) for systems with an LLE near zero: see
    `trial_length`."""

    solvers: tuple[AbstractParallelSolver, ...] = eqx.field(static=True)
    proxy_length: int = eqx.field(static=True)
    max_proxy_length: int = eqx.field(static=True)
    max_trial_steps: int = eqx.field(static=True)
    lle_steps: int = eqx.field(static=True)
    window: int = eqx.field(static=True)
    conditioning: bool = eqx.field(static=True)

    def __check_init__(self):
        for name in ("proxy_length", "max_trial_steps", "lle_steps", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.max_proxy_length < self.proxy_length:
            raise ValueError("`max_proxy_length` must be at least `proxy_length`.")

    def trial_length(self, lle: float, length: int) -> int:
        """The prefix the trials run on: `proxy_length` steps, or `DECAY_LENGTHS / |lle|`
        rounded up to a power of two when that is longer (at most `max_proxy_length`;
        the longest for an LLE of zero or NaN), and never more than `length`."""
        if math.isnan(lle) or lle == 0:
            need = math.inf  # an isometry, or unknown: errors never decay
        else:
            need = DECAY_LENGTHS / abs(lle)  # zero for a superstable map (LLE = -inf)
        prefix = self.proxy_length
        if need > prefix:
            prefix = min(
                2 ** math.ceil(math.log2(min(need, self.max_proxy_length))), self.max_proxy_length
            )
        return min(length, prefix)


def default_settings(
    solvers: Sequence[AbstractParallelSolver],
    proxy_length: int | None = None,
    max_trial_steps: int | None = None,
    lle_steps: int = 512,
    window: int = 16,
    conditioning: bool = True,
) -> Settings:
    """The calibrated settings; a `proxy_length` given by the user is used as is (no
    longer prefix for systems with an LLE near zero)."""
    cal = calibration()
    base = cal["proxy_length"] if proxy_length is None else proxy_length
    return Settings(
        solvers=tuple(solvers),
        proxy_length=base,
        max_proxy_length=max(base, MAX_PROXY_LENGTH) if proxy_length is None else base,
        max_trial_steps=cal["max_trial_steps"] if max_trial_steps is None else max_trial_steps,
        lle_steps=lle_steps,
        window=window,
        conditioning=conditioning,
    )


def lyapunov_flat(flat: Flat, xs: PyTree | None, length: int, lle_steps: int) -> dict:
    """The first stage of the diagnosis (traceable): the LLE on the first `lle_steps`
    steps, its running estimate, and whether the trajectory there is finite."""
    n_lle = min(length, lle_steps)
    xs_lle = slice_inputs(xs, 0, n_lle)
    before = trajectory_before(flat, xs_lle, n_lle)
    stretch = qr_log_stretch(flat, xs_lle, before, 1)[:, 0]
    running = jnp.cumsum(stretch) / jnp.arange(1, n_lle + 1, dtype=stretch.dtype)
    finite = jnp.all(jnp.isfinite(before)) & jnp.all(
        jnp.isfinite(flat.fn(before[-1], _last(xs_lle)))
    )
    return dict(finite=finite, lle=running[-1], lle_history=running)


def diagnose_flat(
    flat: Flat, xs: PyTree | None, length: int, settings: Settings, lle: Array
) -> dict:
    """The second stage of the diagnosis (traceable): conditioning, trials and predicted
    steps on a prefix of `settings.proxy_length` steps (the trial length the host chose
    from the LLE of the first stage). `predicted` is a tuple, one entry per solver of
    `settings`."""
    dtype = flat.s0.dtype
    cal = calibrated(dtype)
    Tp = min(length, settings.proxy_length)
    xs_p = slice_inputs(xs, 0, Tp)
    cond = None
    if settings.conditioning:
        window = min(settings.window, max(Tp - 1, 1))
        if flat.size > 64:
            window = min(window, 8)
        cond = conditioning_flat(flat, xs_p, Tp, window, lle, length)
    K = min(settings.max_trial_steps, Tp)
    trials = {}
    for solver in settings.solvers:
        trial = trial_solver(solver)
        if trial not in trials:
            trials[trial] = converged_prefix_history(trial, flat, xs_p, Tp, K)
    contracting = lle < -LLE_TOL
    predicted = tuple(
        extrapolate(
            *trials[trial_solver(s)],
            Tp,
            length,
            cal["crawl_fraction"],
            factor(s, dtype),
            contracting,
        )
        for s in settings.solvers
    )
    proxy_steps = tuple(steps_to_reach(trials[trial_solver(s)][0], Tp) for s in settings.solvers)
    regime = classify(lle, predicted, length)
    return dict(
        conditioning=cond,
        trials=tuple(trials.values()),
        proxy_steps=proxy_steps,
        predicted=predicted,
        regime=regime,
    )


@filter_jit
def _lyapunov_jit(f, s0, xs, length, lle_steps):
    # Not given the settings: one program whatever the solvers to predict.
    return lyapunov_flat(flatten(f, s0), xs, length, lle_steps)


@filter_jit
def _trials_jit(f, s0, xs, length, settings, lle):
    return diagnose_flat(flatten(f, s0), xs, length, settings, lle)


def shooting_flat(
    flat: Flat,
    xs: PyTree | None,
    length: int,
    chunk: int,
    solver: AbstractParallelSolver,
    max_trial_steps: int,
) -> dict:
    """The trial of [`parassm.MultipleShooting`][] with `solver` on the chunk ends and
    chunks of `chunk` steps (traceable): the coarse recurrence of the first
    `SHOOTING_TRIAL_CHUNKS` chunks, from the default guess, extrapolated to all
    `K = ceil(length / chunk)` chunks as for any other trial (`extrapolate`).
    `predicted`: coarse iterations for the whole problem; `proxy_steps`: those the
    trial took (-1 if it did not converge); `proxy_chunks`: its number of chunks."""
    dtype = flat.s0.dtype
    coarse = coarse_problem(flat, xs, length, chunk)
    n = min(coarse.length, SHOOTING_TRIAL_CHUNKS)
    prefix = Flat(coarse.fn, flat.unravel, flat.s0)
    xs_n = jtu.tree_map(lambda x: x[:n], coarse.xs)
    trial = trial_solver(solver)
    history, log_residual = converged_prefix_history(
        trial, prefix, xs_n, n, min(max_trial_steps, n)
    )
    # A converged trial extrapolates logarithmically, never at its crawl rate: a chunk
    # shrinks small errors about e^-4 (`shooting_chunk`), so a front that crawled
    # over a few chunks met a memory longer than a chunk in that stretch (the wrong well
    # of a bistable map), which the other chunks resolve at the same time, not a crawl
    # over the whole sequence. tanh(3 s + u), T = 1e4, float64, chunks of 100: the
    # trial's front crawled from 6 to 10 chunks, one per iteration, then converged all
    # 16; at the crawl rate that predicted 69 iterations, and the whole problem took 6.
    predicted = extrapolate(
        history, log_residual, n, coarse.length, math.inf, factor(solver, dtype)
    )
    return dict(predicted=predicted, proxy_steps=steps_to_reach(history, n), proxy_chunks=n)


@filter_jit
def _shooting_jit(f, s0, xs, length, chunk, solver, max_trial_steps):
    return shooting_flat(flatten(f, s0), xs, length, chunk, solver, max_trial_steps)


def diagnosis_arrays(
    f, s0, xs, length: int, settings: Settings, shooting: AbstractParallelSolver | None = None
) -> dict:
    """The stages of the diagnosis on a concrete problem (host side): the LLE, then
    the trials on a prefix whose length depends on it (`Settings.trial_length`), then,
    given the solver `shooting` runs on the chunk ends and where the regime calls for
    multiple shooting (`shooting_chunk`), its trial (`shooting_flat`, under the key
    `"shooting"` with `chunk`). Returns the arrays of the stages and `proxy_length`;
    only the first stage's when the trajectory is not finite (`finite` false)."""
    first = _lyapunov_jit(f, s0, xs, length, settings.lle_steps)
    if not bool(first["finite"]):
        return dict(first, proxy_length=min(length, settings.proxy_length))
    Tp = settings.trial_length(float(first["lle"]), length)
    settings = dataclasses.replace(settings, proxy_length=Tp, max_proxy_length=Tp)
    second = _trials_jit(f, s0, xs, length, settings, first["lle"])
    out = dict(first, **second, proxy_length=Tp, shooting=None)
    chunk = shooting_chunk(REGIMES[int(second["regime"])], float(first["lle"]), length)
    if shooting is not None and chunk is not None:
        trial = _shooting_jit(f, s0, xs, length, chunk, shooting, settings.max_trial_steps)
        out["shooting"] = dict(trial, chunk=chunk)
    return out


def _last(xs: PyTree | None) -> PyTree | None:
    return None if xs is None else jtu.tree_map(lambda x: x[-1], xs)


def classify(lle: Array, predicted: Sequence[Array], length: int) -> Array:
    """0 predictable, 1 marginal, 2 unpredictable (see `Diagnosis`), from the LLE and
    the fewest predicted steps."""
    best = jnp.min(jnp.stack(predicted))
    crawls = 4 * best >= length
    unpredictable = (lle > LLE_TOL) & ((lle * length > UNPREDICTABLE_GROWTH) | crawls)
    predictable = (lle < -LLE_TOL) & (best.astype(lle.dtype) <= fast_limit(length))
    return jnp.where(unpredictable, 2, jnp.where(predictable, 0, 1))


def costs(
    solvers: Sequence[AbstractParallelSolver],
    steps: Sequence[int],
    size: int,
    flops: float,
    length: int,
    hardware: Hardware,
) -> tuple[float, list[float]]:
    """Predicted seconds of Sequential and of each solver at its predicted steps (one
    more evaluation than steps: the last confirms convergence)."""
    sequential = hardware.sequential_time(length, flops)
    parallel = [
        (k + 1) * iteration_time(s, size, flops, length, hardware) for s, k in zip(solvers, steps)
    ]
    return sequential, parallel


def choose(
    sequential: float, parallel: Sequence[float], steps: Sequence[int], regime: str, length: int
) -> int | None:
    """Index of the parallel solver to use, or None for Sequential: the cheapest, if it
    beats sequential by `MARGIN`, the system is predictable and the solver is not
    predicted to crawl (`>= T / 4` steps). Marginal systems get Sequential: periodic
    orbits (a constant guess carries no phase, and Newton gains about one state per
    step) and flows with an LLE about zero, whose steps the prefix trial underestimates
    (the held-out zoo in `docs/diagnostics.md`)."""
    if regime != "predictable":
        return None
    best = min(range(len(parallel)), key=parallel.__getitem__)
    if 4 * steps[best] >= length or parallel[best] * MARGIN >= sequential:
        return None
    return best


def choose_shooting(
    solver: AbstractParallelSolver,
    chunk: int,
    steps: int,
    sequential: float,
    size: int,
    flops: float,
    length: int,
    hardware: Hardware,
) -> tuple[float, MultipleShooting | None]:
    """`(seconds, choice)` for [`parassm.MultipleShooting`][] with `solver` on the chunk
    ends, chunks of `chunk` steps and `steps` predicted iterations: its predicted time
    and, where it is the choice (in the marginal regime, where `choose` found none), the
    solver; None unless it is at least `MARGIN` cheaper than sequential and not crawling
    (fewer than a quarter of its chunks as iterations)."""
    seconds = shooting_time(solver, steps, chunk, size, flops, length, hardware)
    pays = 4 * steps < -(-length // chunk) and seconds * MARGIN < sequential
    return seconds, MultipleShooting(solver, chunk_length=chunk) if pays else None


def _float(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


class Diagnosis(eqx.Module):
    r"""The result of [`parassm.diagnose`][].

    **Attributes:**

    - `length`, `size`: `T` and the flattened state size `D`.
    - `lle`: the largest Lyapunov exponent, per step, estimated on the first
        `lle_steps` steps. `lle_per_unit_time`: `lle / dt` when `dt` was given.
    - `lle_history`: the running estimate after each of those steps (its convergence).
    - `overshoot`: $a = \max_j M_j e^{-\lambda j} \ge 1$, the transient growth of
        Jacobian products beyond what the LLE predicts.
    - `conditioning`: the [`parassm.diagnostics.Conditioning`][] of the proxy,
        extrapolated to length `T`; `sigma_min_bounds` and `neg_log_mu_bounds` are its
        windowed bounds on $\sigma_{\min}$ and $-\ln \mu$ as floats.
    - `regime`: `"predictable"` (LLE < 0 and the trial converges in few steps),
        `"unpredictable"` (LLE > 0 and either $\lambda T > 5$, so the conditioning
        degrades like $e^{\lambda T}$, or the Newton-type solvers are predicted to need
        at least `T / 4` steps) or `"marginal"` (anything else, including contracting
        but strongly nonlinear or non-smooth maps whose trial crawls).
    - `predicted_steps`: solver name -> predicted Newton steps for length `T`
        (between 1 and `T`).
    - `proxy_steps`: solver name -> steps measured on the proxy prefix.
    - `proxy_length`: the length of that prefix.
    - `costs`: candidate name -> predicted time in units of one sequential step.
    - `recommended`: the solver to use (an instance; [`parassm.Sequential`][] when
        parallel evaluation cannot pay). On a system that contracts but on which
        Newton's method crawls (`shooting_chunk`), [`parassm.MultipleShooting`][] with
        that chunk where it is predicted to pay.
    - `shooting_steps`: where `shooting_chunk` is set, the coarse iterations predicted
        for multiple shooting with it (from its own trial on the first 16 chunks),
        else None; its predicted time is `costs["MultipleShooting"]`.
    - `hardware`: the [`parassm.diagnostics.Hardware`][] model used.
    - `flops`: the floating-point operations of one step of `f` (the cost model's
        unit of work).
    """

    length: int
    size: int
    lle: float
    lle_per_unit_time: float | None
    lle_history: np.ndarray
    overshoot: float
    conditioning: Conditioning
    regime: str
    predicted_steps: dict[str, int]
    proxy_steps: dict[str, int]
    proxy_length: int
    costs: dict[str, float]
    recommended: AbstractSolver
    hardware: Hardware
    dt: float | None = None
    flops: float = 1.0
    shooting_steps: int | None = None

    @property
    def sigma_min_bounds(self) -> tuple[float, float]:
        c = self.conditioning
        return math.exp(float(c.log_sigma_lower)), math.exp(float(c.log_sigma_upper))

    @property
    def neg_log_mu_bounds(self) -> tuple[float, float]:
        lo, hi = self.conditioning.neg_log_mu_bounds
        return float(lo), float(hi)

    @property
    def recommended_name(self) -> str:
        return type(self.recommended).__name__

    @property
    def shooting_chunk(self) -> int | None:
        """For a system that contracts (LLE < 0) but on which the Newton-type trial
        crawls (regime `"marginal"`: a long memory, e.g. a weakly damped flow): a
        chunk length for [`parassm.MultipleShooting`][], `4 / |LLE|` steps (a chunk
        then shrinks perturbations by about $e^{-4}$) and at least $\\sqrt{T}$.
        `None` otherwise, or where one chunk would be the whole sequence."""
        return shooting_chunk(self.regime, self.lle, self.length)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (non-finite numbers become `None`); the schema
        is documented in `docs/diagnostics.md`."""
        c = self.conditioning
        return dict(
            T=self.length,
            state_size=self.size,
            dt=self.dt,
            lle=dict(
                per_step=_float(self.lle),
                per_unit_time=None
                if self.lle_per_unit_time is None
                else _float(self.lle_per_unit_time),
                steps=len(self.lle_history),
            ),
            overshoot=_float(self.overshoot),
            bounds=dict(
                window=len(c.window_log_norms) - 1,
                log_sigma_min_lower=_float(c.log_sigma_lower),
                log_sigma_min_upper=_float(c.log_sigma_upper),
                log_sigma_min_lower_lle=_float(c.log_sigma_lower_lle),
                log_sigma_min_upper_lle=_float(c.log_sigma_upper_lle),
                neg_log_mu_lower=_float(-2 * c.log_sigma_upper),
                neg_log_mu_upper=_float(-2 * c.log_sigma_lower),
            ),
            regime=self.regime,
            predicted_steps=dict(self.predicted_steps),
            proxy=dict(length=self.proxy_length, steps=dict(self.proxy_steps)),
            recommendation=dict(
                solver=self.recommended_name,
                multiple_shooting_chunk=self.shooting_chunk,
                multiple_shooting_steps=self.shooting_steps,
                costs={k: _float(v) for k, v in self.costs.items()},
                hardware=dict(
                    name=self.hardware.name,
                    width=self.hardware.width(self.flops),
                    level_latency=self.hardware.call_latency
                    / self.hardware.sequential_time(1, self.flops),
                    step_latency_s=self.hardware.step_latency,
                    sequential_flops=self.hardware.sequential_flops,
                    call_latency_s=self.hardware.call_latency,
                    vector_flops=self.hardware.vector_flops,
                    loop_scan=self.hardware.loop_scan,
                    step_flops=self.flops,
                ),
            ),
        )


def diagnose(
    f: Callable[[PyTree[Array], Any], PyTree[Array]],
    s0: PyTree[Array],
    T: int | None = None,
    *,
    xs: PyTree | None = None,
    dt: float | None = None,
    solvers: Sequence[str | AbstractSolver] = tuple(BY_NAME),
    hardware: Hardware | None = None,
    proxy_length: int | None = None,
    lle_steps: int = 512,
    window: int = 16,
    shooting: AbstractParallelSolver | None = DEER(),
) -> Diagnosis:
    r"""Will parallel evaluation of $s_t = f(s_{t-1}, x_t)$ converge in a few steps or
    crawl? Estimate it, before evaluating, from a cheap proxy, and recommend a solver.

    The diagnosis:

    1. estimates the largest Lyapunov exponent (LLE) by the sequential QR estimator on
        the first `lle_steps` steps (one JVP of `f` per step);
    2. on a prefix of `proxy_length` steps (128 by default; longer, up to 1024, when
        the LLE is near zero: 8 decay lengths $1/|\lambda|$, so that a flow that
        carries a linearisation error along its whole length shows it in the trial),
        forms products of up to `window` consecutive Jacobians for the overshoot and
        the bounds on $\sigma_{\min}$ of the residual Jacobian (extrapolated to `T`);
    3. runs a short trial of each solver on that prefix (at most `max_trial_steps`
        iterations, from the calibration) and extrapolates the growth of the converged
        prefix to `T` (see `_predict.py`); this is what catches maps that are
        contracting (LLE < 0) but so nonlinear or non-smooth that Newton crawls;
    4. compares predicted times with a model of the hardware measured on this machine
        ([`parassm.diagnostics.Hardware.detect`][]) and picks the cheapest solver,
        [`parassm.Sequential`][] unless parallel evaluation is predicted to be at least
        1.5x cheaper and the system is predictable (never when unpredictable or
        marginal: periodic orbits, LLE about zero);
    5. where the system contracts but the trials crawl (regime marginal, LLE < 0: a
        long memory), runs a trial of [`parassm.MultipleShooting`][] with chunks of
        `shooting_chunk` steps on its first 16 chunks, and recommends it where it is
        predicted to pay.

    Cost: `O(lle_steps)` sequential steps of `f` and its JVP, plus at most
    `max_trial_steps` parallel iterations per solver on the prefix: independent of `T`
    (see `docs/diagnostics.md` for measurements). Each call compiles (two programs: the
    LLE, then the trials on a prefix whose length depends on it).

    **Arguments:**

    - `f`, `s0`, `T`, `xs`: the recurrence, as for [`parassm.evaluate`][].
    - `dt`: Keyword only argument. Time step of a one-step map of a flow: also report
        the LLE per unit time.
    - `solvers`: Keyword only argument. The solvers to predict steps for: names among
        `"DEER"`, `"QuasiDEER"`, `"ELK"`, `"Picard"`, `"Jacobi"` (default
        instances), or parallel solver instances (e.g.
        `parassm.QuasiDEER(parassm.HutchinsonDiagonal())`), trialled with their own
        tolerances. ELK and quasi-ELK are predicted from DEER's and quasi-DEER's
        trials.
    - `hardware`: Keyword only argument. A [`parassm.diagnostics.Hardware`][]; by
        default `Hardware.detect()` (measured once on this machine, then cached).
    - `proxy_length`, `lle_steps`, `window`: Keyword only arguments. The size of the
        proxy (default: 128, from the calibration, or longer for an LLE near zero; a
        value given here is used as is), of the LLE estimate and of the window of
        Jacobian products.
    - `shooting`: Keyword only argument. The parallel solver multiple shooting would
        run on the chunk ends (default [`parassm.DEER`][]); None never trials or
        recommends multiple shooting.

    **Returns:**

    A [`parassm.Diagnosis`][].

    !!! example

        ```python
        gru = parassm.systems.GRU()
        d = parassm.diagnose(gru.f, gru.s0, xs=gru.inputs(10_000))
        d.regime, d.predicted_steps["DEER"], d.recommended
        ```
    """
    length = time_length(xs, T)
    s0 = check_state(s0, floating=True)
    check_same_structure(step_output(f, s0, xs), s0, "`f`")
    if dt is not None and not dt > 0:
        raise ValueError(f"`dt` must be positive, got {dt}.")
    names, instances = as_solvers(solvers)
    if shooting is not None and not isinstance(shooting, AbstractParallelSolver):
        raise TypeError(
            "`shooting` is the parallel solver multiple shooting runs on the chunk ends "
            f"(e.g. `parassm.DEER()`) or None; got {shooting!r}."
        )
    settings = default_settings(instances, proxy_length, lle_steps=lle_steps, window=window)
    out = diagnosis_arrays(f, s0, xs, length, settings, shooting)
    if not bool(out["finite"]):
        raise ValueError(
            f"The trajectory of `f` from `s0` is not finite within its first "
            f"{min(length, settings.lle_steps)} steps (it overflows or `f` returns NaN/Inf), "
            "so there is nothing to diagnose: check `f`, `s0` and the inputs (e.g. run "
            "`jax.lax.scan` and look for the first non-finite step)."
        )
    size = sum(leaf.size for leaf in jtu.tree_leaves(s0))
    dtype = jtu.tree_leaves(s0)[0].dtype
    if hardware is None:
        hardware = Hardware.detect(dtype)
    flops = problem_flops(f, s0, xs)
    regime = REGIMES[int(out["regime"])]
    steps = [int(k) for k in out["predicted"]]
    sequential, parallel = costs(instances, steps, size, flops, length, hardware)
    choice = choose(sequential, parallel, steps, regime, length)
    recommended = Sequential() if choice is None else instances[choice]
    per_step = sequential / length
    cost_table = dict(
        Sequential=float(length), **{n: c / per_step for n, c in zip(names, parallel)}
    )
    shooting_steps = None
    if out["shooting"] is not None:
        chunk = out["shooting"]["chunk"]
        shooting_steps = int(out["shooting"]["predicted"])
        cost, shooter = choose_shooting(
            shooting, chunk, shooting_steps, sequential, size, flops, length, hardware
        )
        cost_table["MultipleShooting"] = cost / per_step
        if choice is None and shooter is not None:
            recommended = shooter
    lle = float(out["lle"])
    cond = out["conditioning"]
    return Diagnosis(
        length=length,
        size=size,
        lle=lle,
        lle_per_unit_time=None if dt is None else lle / dt,
        lle_history=np.asarray(out["lle_history"]),
        overshoot=math.exp(float(cond.log_overshoot)),
        conditioning=cond,
        regime=regime,
        predicted_steps=dict(zip(names, steps)),
        proxy_steps={n: int(k) for n, k in zip(names, out["proxy_steps"])},
        proxy_length=out["proxy_length"],
        costs=cost_table,
        recommended=recommended,
        hardware=hardware,
        dt=dt,
        flops=flops,
        shooting_steps=shooting_steps,
    )


def problem_flops(f: Callable, s0: PyTree, xs: PyTree | None) -> float:
    """Floating-point operations of one step `f(s, x)` (see `Hardware`)."""
    x0 = None if xs is None else jtu.tree_map(lambda x: x[0], xs)
    return step_flops(lambda s, x: f(s, x), s0, x0)
