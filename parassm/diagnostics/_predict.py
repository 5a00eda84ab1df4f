"""Step prediction and the cost model behind the recommendation.

The predicted number of Newton steps for a solver comes from a short trial of that
solver on a prefix of the problem (`_trial.py`): the trial gives the steps needed for
every prefix length up to the proxy length `T_p`, and the growth between `T_p / 2` and
`T_p` is extrapolated to `T`:

- logarithmically (`k(T) = k(T_p) + c (k(T_p) - k(T_p / 2)) log2(T / T_p)`) when the
  upper half of the proxy cost few extra steps: the predictable regime, where the
  conditioning and hence the steps do not grow with `T` (Gonzalez et al. 2025);
- linearly at the observed rate of convergence (states per step) when it cost a large
  fraction of the steps (`>= crawl_fraction`): Newton crawls forward a few states per
  step, as on chaotic or strongly nonlinear maps.

When the trial did not converge within its budget, the prediction is the smaller of the
linear crawl at the rate of the second half of the trial, and the steps for the largest
residual to reach the tolerance at its geometric rate of decrease in that half (a
zeroth-order solver on a contraction: every state converges at about the same time).

The constants (`proxy_length`, `max_trial_steps`, `crawl_fraction` and the per-solver
factors `c`) are calibrated on the systems zoo by `bench/calibrate_steps.py`, which
writes `calibration.json` next to this file.
"""

import functools as ft
import json
import math
import os
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._trial import steps_to_reach


CALIBRATION_FILE = pathlib.Path(__file__).with_name("calibration.json")
SOLVER_NAMES = ("DEER", "QuasiDEER", "ELK", "Picard", "Jacobi")
# ELK is not run in the trial: its prediction is DEER's (its damping only slows
# convergence where DEER is already fast and stabilises it where DEER is not).
TRIAL_OF = {"DEER": "DEER", "QuasiDEER": "QuasiDEER", "ELK": "DEER", "Picard": "Picard"}
TRIAL_OF["Jacobi"] = "Jacobi"


@ft.cache
def calibration() -> dict:
    """The stored calibration (see `bench/calibrate_steps.py`)."""
    with open(CALIBRATION_FILE) as f:
        return json.load(f)


def extrapolate(
    history: Int[Array, " K1"],
    log_residual: Float[Array, " K1"],
    proxy_length: int,
    length: int,
    crawl_fraction: float,
    factor: float,
) -> Int[Array, ""]:
    """Predicted steps for a problem of `length` from a trial `history` on
    `proxy_length` steps (see the module docstring); between 1 and `length`."""
    dtype = jnp.result_type(float)
    log_residual = log_residual.astype(dtype)
    K = history.shape[0] - 1
    Tp = proxy_length
    final = history[-1]
    converged = final >= Tp
    k_full = steps_to_reach(history, Tp).astype(dtype)
    k_half = steps_to_reach(history, max(Tp // 2, 1)).astype(dtype)
    delta = jnp.maximum(k_full - k_half, 0.0)
    extra = jnp.asarray(max(length - Tp, 0), dtype)
    doublings = jnp.asarray(math.log2(length / Tp), dtype)
    rate_half = (Tp - max(Tp // 2, 1)) / jnp.maximum(delta, 1.0)
    crawl = (delta >= 2) & (delta >= crawl_fraction * k_full)
    grown = jnp.where(crawl, extra / rate_half, delta * doublings)
    pred_converged = k_full + factor * grown
    mid = history[K // 2].astype(dtype)
    rate = jnp.maximum((final.astype(dtype) - mid) / max(K - K // 2, 1), 1.0)
    crawl_pred = K + factor * (length - final.astype(dtype)) / rate
    log_rate = (log_residual[-1] - log_residual[K // 2]) / max(K - K // 2, 1)
    contracting = jnp.isfinite(log_rate) & (log_rate < 0)
    safe_rate = jnp.where(contracting, log_rate, -1.0)
    residual_pred = K + factor * jnp.maximum(log_residual[-1], 0.0) / -safe_rate
    residual_pred = jnp.where(contracting, residual_pred, jnp.inf)
    pred_unconverged = jnp.minimum(crawl_pred, residual_pred)
    pred = jnp.where(converged, pred_converged, pred_unconverged)
    return jnp.clip(jnp.ceil(pred), 1, length).astype(jnp.result_type(int))


class Hardware(eqx.Module):
    """A two-number model of the machine, for the cost model of the recommendation.

    **Arguments:**

    - `width`: how many step evaluations one vectorised call does in the time of one
        sequential step (1 on a CPU with few cores; thousands on a GPU).
    - `level_latency`: the fixed cost of one vectorised call (one level of an
        associative scan), in sequential steps.
    - `name`: a label for reports.

    `Hardware.detect()` picks rough figures for the default backend; they decide
    whether parallel evaluation can pay at all, not which parallel solver wins.
    """

    width: float = eqx.field(static=True)
    level_latency: float = eqx.field(static=True)
    name: str = eqx.field(default="custom", static=True)

    @classmethod
    def detect(cls) -> "Hardware":
        backend = jax.default_backend()
        if backend == "cpu":
            # A vectorised step over T elements costs about as much as T sequential
            # steps until there are many cores to spread it over.
            cores = os.cpu_count() or 1
            return cls(width=max(1.0, cores / 8), level_latency=1.0, name=f"cpu ({cores} cores)")
        return cls(width=2.0e4, level_latency=2.0, name=backend)


def work_per_iteration(name: str, size: int) -> float:
    """Work of one iteration of solver `name`, in evaluations of `f` per time step."""
    if name in ("Jacobi", "Picard"):
        return 1.0
    if name == "QuasiDEER":
        return 1.0 + size  # `D` JVPs for the exact diagonal
    if name == "DEER":
        return 1.0 + 3.0 * size  # `D` JVPs and a dense scan (D^3 vs D^2 per step)
    if name == "ELK":
        return 2.0 + 6.0 * size
    raise ValueError(f"Unknown solver name {name!r}.")


def iteration_cost(name: str, size: int, length: int, hardware: Hardware) -> float:
    """Time of one iteration, in sequential steps."""
    levels = 2 * math.ceil(math.log2(max(length, 2))) + 1
    return (
        work_per_iteration(name, size) * length / hardware.width + hardware.level_latency * levels
    )
