"""`parassm.diagnose`: predictability, conditioning, predicted steps and a recommended
solver, from a cheap proxy of the problem."""

import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from .._problem import check_same_structure, check_state, Flat, flatten, step_output, time_length
from .._solvers._base import AbstractSolver
from .._solvers.deer import DEER
from .._solvers.jacobi import Jacobi
from .._solvers.picard import Picard
from .._solvers.quasi_deer import QuasiDEER
from .._solvers.sequential import Sequential
from ._conditioning import Conditioning, conditioning_flat
from ._lyapunov import qr_log_stretch, slice_inputs, trajectory_before
from ._predict import (
    calibration,
    extrapolate,
    Hardware,
    iteration_cost,
    SOLVER_NAMES,
    TRIAL_OF,
)
from ._trial import converged_prefix_history, steps_to_reach


REGIMES = ("predictable", "marginal", "unpredictable")
# Solvers that can be recommended (ELK is predicted but not run).
RUNNABLE = {
    "Sequential": Sequential,
    "DEER": DEER,
    "QuasiDEER": QuasiDEER,
    "Picard": Picard,
    "Jacobi": Jacobi,
}
# Parallel evaluation must be predicted this much cheaper than sequential to be chosen.
MARGIN = 1.5
# |LLE| below this (per step) counts as zero: an isometry or a finite-time estimate.
LLE_TOL = 1e-3
# An LLE > 0 is unpredictable once the conditioning may degrade by e^5 over T steps.
UNPREDICTABLE_GROWTH = 5.0


def fast_limit(length: int) -> float:
    """Steps that still count as "few": `O(log T)`."""
    return max(8.0, 2.0 * math.log2(max(length, 2)))


class Settings(eqx.Module):
    """The knobs of the diagnosis (static)."""

    solvers: tuple[str, ...] = eqx.field(static=True)
    proxy_length: int = eqx.field(static=True)
    max_trial_steps: int = eqx.field(static=True)
    lle_steps: int = eqx.field(static=True)
    window: int = eqx.field(static=True)
    hardware: Hardware = eqx.field(static=True)

    def __check_init__(self):
        for name in self.solvers:
            if name not in SOLVER_NAMES:
                raise ValueError(
                    f"Unknown solver {name!r} to predict; choose from {', '.join(SOLVER_NAMES)}."
                )
        for name in ("proxy_length", "max_trial_steps", "lle_steps", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")


def default_settings(
    solvers: Sequence[str] = SOLVER_NAMES,
    hardware: Hardware | None = None,
    proxy_length: int | None = None,
    max_trial_steps: int | None = None,
    lle_steps: int = 512,
    window: int = 16,
) -> Settings:
    cal = calibration()
    return Settings(
        solvers=tuple(solvers),
        proxy_length=cal["proxy_length"] if proxy_length is None else proxy_length,
        max_trial_steps=cal["max_trial_steps"] if max_trial_steps is None else max_trial_steps,
        lle_steps=lle_steps,
        window=window,
        hardware=Hardware.detect() if hardware is None else hardware,
    )


def diagnose_flat(flat: Flat, xs: PyTree | None, length: int, settings: Settings) -> dict:
    """Everything the diagnosis computes, as arrays (traceable: `Auto` runs it under
    `jit`)."""
    cal = calibration()
    n_lle = min(length, settings.lle_steps)
    xs_lle = slice_inputs(xs, 0, n_lle)
    stretch = qr_log_stretch(flat, xs_lle, trajectory_before(flat, xs_lle, n_lle), 1)[:, 0]
    running = jnp.cumsum(stretch) / jnp.arange(1, n_lle + 1, dtype=stretch.dtype)
    lle = running[-1]
    Tp = min(length, settings.proxy_length)
    xs_p = slice_inputs(xs, 0, Tp)
    window = min(settings.window, max(Tp - 1, 1))
    if flat.size > 64:
        window = min(window, 8)
    cond = conditioning_flat(flat, xs_p, Tp, window, lle, length)
    K = min(settings.max_trial_steps, Tp)
    trials = {}
    for name in settings.solvers:
        trial = TRIAL_OF[name]
        if trial not in trials:
            solver = RUNNABLE[trial]()
            trials[trial] = converged_prefix_history(solver, flat, xs_p, Tp, K)
    predicted = {
        name: extrapolate(
            *trials[TRIAL_OF[name]], Tp, length, cal["crawl_fraction"], cal["factors"][name]
        )
        for name in settings.solvers
    }
    proxy_steps = {name: steps_to_reach(h[0], Tp) for name, h in trials.items()}
    regime = classify(lle, predicted, length)
    names, costs = candidate_costs(predicted, flat.size, length, settings.hardware)
    choice = choose(costs, regime)
    return dict(
        lle=lle,
        lle_history=running,
        conditioning=cond,
        trials=trials,
        proxy_steps=proxy_steps,
        predicted=predicted,
        regime=regime,
        candidates=names,
        costs=costs,
        choice=choice,
    )


def classify(lle: Array, predicted: dict[str, Array], length: int) -> Array:
    """0 predictable, 1 marginal, 2 unpredictable (see `Diagnosis`)."""
    newton = [predicted[n] for n in ("DEER", "QuasiDEER", "ELK") if n in predicted]
    newton = newton or list(predicted.values())
    best = jnp.min(jnp.stack(newton)) if newton else jnp.array(length)
    crawls = 4 * best >= length
    unpredictable = (lle > LLE_TOL) & ((lle * length > UNPREDICTABLE_GROWTH) | crawls)
    predictable = (lle < -LLE_TOL) & (best.astype(lle.dtype) <= fast_limit(length))
    return jnp.where(unpredictable, 2, jnp.where(predictable, 0, 1))


def candidate_costs(
    predicted: dict[str, Array], size: int, length: int, hardware: Hardware
) -> tuple[tuple[str, ...], Array]:
    """Predicted times, in sequential steps, of Sequential and each runnable solver."""
    names = ("Sequential",) + tuple(n for n in predicted if n in RUNNABLE)
    dtype = jnp.result_type(float)
    costs = [jnp.asarray(length, dtype)]
    for name in names[1:]:
        per_iteration = iteration_cost(name, size, length, hardware)
        costs.append(predicted[name].astype(dtype) * per_iteration)
    return names, jnp.stack(costs)


def choose(costs: Array, regime: Array) -> Array:
    """Index into the candidates: the cheapest, if parallel beats sequential by
    `MARGIN` and the system is not unpredictable; else 0 (Sequential)."""
    best = jnp.argmin(costs[1:]) + 1
    pays = costs[best] * MARGIN < costs[0]
    return jnp.where(pays & (regime != 2), best, 0)


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
        parallel evaluation cannot pay).
    - `hardware`: the [`parassm.diagnostics.Hardware`][] model used.
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
                costs={k: _float(v) for k, v in self.costs.items()},
                hardware=dict(
                    name=self.hardware.name,
                    width=self.hardware.width,
                    level_latency=self.hardware.level_latency,
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
    solvers: Sequence[str] = SOLVER_NAMES,
    hardware: Hardware | None = None,
    proxy_length: int | None = None,
    lle_steps: int = 512,
    window: int = 16,
) -> Diagnosis:
    r"""Will parallel evaluation of $s_t = f(s_{t-1}, x_t)$ converge in a few steps or
    crawl? Estimate it, before evaluating, from a cheap proxy, and recommend a solver.

    The diagnosis:

    1. estimates the largest Lyapunov exponent (LLE) by the sequential QR estimator on
        the first `lle_steps` steps (one JVP of `f` per step);
    2. on the first `proxy_length` steps, forms products of up to `window` consecutive
        Jacobians for the overshoot and the bounds on $\sigma_{\min}$ of the residual
        Jacobian (extrapolated to `T`);
    3. runs a short trial of each solver on that prefix (at most `max_trial_steps`
        iterations, from the calibration) and extrapolates the growth of the converged
        prefix to `T` (see `_predict.py`); this is what catches maps that are
        contracting (LLE < 0) but so nonlinear or non-smooth that Newton crawls;
    4. compares predicted times with a two-number model of the hardware and picks the
        cheapest solver, [`parassm.Sequential`][] unless parallel evaluation is
        predicted to be at least 1.5x cheaper (never when unpredictable).

    Cost: `O(lle_steps)` sequential steps of `f` and its JVP, plus at most
    `max_trial_steps` parallel iterations per solver on `proxy_length` steps: independent
    of `T` (see `docs/diagnostics.md` for measurements). Each call compiles.

    **Arguments:**

    - `f`, `s0`, `T`, `xs`: the recurrence, as for [`parassm.evaluate`][].
    - `dt`: Keyword only argument. Time step of a one-step map of a flow: also report
        the LLE per unit time.
    - `solvers`: Keyword only argument. Names of the solvers to predict steps for,
        among `"DEER"`, `"QuasiDEER"`, `"ELK"`, `"Picard"`, `"Jacobi"`.
    - `hardware`: Keyword only argument. A [`parassm.diagnostics.Hardware`][]; by
        default `Hardware.detect()`.
    - `proxy_length`, `lle_steps`, `window`: Keyword only arguments. The size of the
        proxy (default from the calibration, 128), of the LLE estimate and of the
        window of Jacobian products.

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
    settings = default_settings(solvers, hardware, proxy_length, lle_steps=lle_steps, window=window)
    out = _diagnose_jit(f, s0, xs, length, settings)
    size = sum(leaf.size for leaf in jtu.tree_leaves(s0))
    names = out["candidates"]
    choice = names[int(out["choice"])]
    lle = float(out["lle"])
    cond = out["conditioning"]
    Tp = min(length, settings.proxy_length)
    return Diagnosis(
        length=length,
        size=size,
        lle=lle,
        lle_per_unit_time=None if dt is None else lle / dt,
        lle_history=np.asarray(out["lle_history"]),
        overshoot=math.exp(float(cond.log_overshoot)),
        conditioning=cond,
        regime=REGIMES[int(out["regime"])],
        predicted_steps={k: int(out["predicted"][k]) for k in settings.solvers},
        proxy_steps={k: int(v) for k, v in out["proxy_steps"].items()},
        proxy_length=Tp,
        costs={n: float(c) for n, c in zip(names, out["costs"])},
        recommended=RUNNABLE[choice](),
        hardware=settings.hardware,
        dt=dt,
    )


@eqx.filter_jit
def _diagnose_jit(f, s0, xs, length, settings):
    out = diagnose_flat(flatten(f, s0), xs, length, settings)
    candidates = out.pop("candidates")
    return out, candidates


def _unpack(fn):
    def wrapped(*args):
        out, candidates = fn(*args)
        return dict(out, candidates=candidates)

    return wrapped


_diagnose_jit = _unpack(_diagnose_jit)
