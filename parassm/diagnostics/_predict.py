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

When the trial did not converge within its budget, the prediction is the linear crawl
at the rate of the second half of the trial or, on a contracting system (LLE < 0) only,
the steps for the largest residual to reach the tolerance at its geometric rate of
decrease in that half if that is fewer (a zeroth-order solver on a contraction: every
state converges at about the same time; where the LLE is positive or about zero, errors
are carried along the sequence and a falling residual on the prefix says nothing about
the rest).

The constants (`proxy_length`, `max_trial_steps`, `crawl_fraction` and the per-solver
factors `c`) are calibrated on the systems zoo by `bench/calibrate_steps.py`, which
writes `calibration.json` next to this file.
"""

import functools as ft
import json
import math
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._solvers._parallel import AbstractParallelSolver
from .._solvers.block import BlockQuasiDEER
from .._solvers.deer import DEER, FunctionJacobian, unformed
from .._solvers.elk import ELK, QuasiELK
from .._solvers.jacobi import Jacobi
from .._solvers.picard import Picard
from .._solvers.quasi_deer import QuasiDEER
from ._hardware import Hardware
from ._trial import steps_to_reach


CALIBRATION_FILE = pathlib.Path(__file__).with_name("calibration.json")


@ft.cache
def calibration() -> dict:
    """The stored calibration (see `bench/calibrate_steps.py`)."""
    with open(CALIBRATION_FILE) as f:
        return json.load(f)


def calibrated(dtype) -> dict:
    """`{"crawl_fraction": ..., "factors": {solver class name: factor}}` for `dtype`
    (float64's for a dtype that was not calibrated, e.g. bfloat16)."""
    by_dtype = calibration()["by_dtype"]
    return by_dtype.get(jnp.dtype(dtype).name, by_dtype["float64"])


def factor(solver: AbstractParallelSolver, dtype) -> float:
    """The calibrated extrapolation factor of `solver`'s class (1 if not calibrated)."""
    return calibrated(dtype)["factors"].get(type(solver).__name__, 1.0)


def extrapolate(
    history: Int[Array, " K1"],
    log_residual: Float[Array, " K1"],
    proxy_length: int,
    length: int,
    crawl_fraction: float,
    factor: float,
    contracting: bool | Array = True,
) -> Int[Array, ""]:
    """Predicted steps for a problem of `length` from a trial `history` on
    `proxy_length` steps (see the module docstring); between 1 and `length`.
    `contracting`: whether the LLE is negative (allows the residual-rate prediction)."""
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
    falling = jnp.isfinite(log_rate) & (log_rate < 0)
    safe_rate = jnp.where(falling, log_rate, -1.0)
    residual_pred = K + factor * jnp.maximum(log_residual[-1], 0.0) / -safe_rate
    residual_pred = jnp.where(falling & contracting, residual_pred, jnp.inf)
    pred_unconverged = jnp.minimum(crawl_pred, residual_pred)
    pred = jnp.where(converged, pred_converged, pred_unconverged)
    return jnp.clip(jnp.ceil(pred), 1, length).astype(jnp.result_type(int))


class Work(NamedTuple):
    """What one iteration of a solver costs, per step: `evaluations` of `f`, the flops
    of its linear solve by the associative scan (`scan_flops`) and by the loop over time
    (`loop_flops`); and the solver whose trial predicts its steps. `tangents`: where the
    linear solve is a loop over time, the solver forms no maps and makes its
    correction by one JVP per step in the loop (`_descent.Tangents`) instead."""

    trial: AbstractParallelSolver
    evaluations: float
    scan_flops: float
    loop_flops: float
    tangents: bool = False


# What one JVP of `f` costs in a loop over time, in sequential evaluations of `f`:
# a `lax.scan` of JVPs against one of `f` (GRU, H = 32, T = 2000, float32, vmapped over
# 8 sequences, 2-core CPU: 39 against 17 ms).
JVP_EVALUATIONS = 2.4


def work(solver: AbstractParallelSolver, size: int) -> Work:
    """The cost of one iteration of `solver` at state size `size` (see `Work`): the
    entry of `WORK` for its class. An unknown parallel solver is costed like DEER, and
    trialled as itself."""
    cost = WORK.get(type(solver))
    if cost is None:
        return Work(solver, 1.0 + size, *_dense(size))
    return cost(solver, size)


def _dense(size: int) -> tuple[float, float]:
    """Flops of a product of `size x size` matrices, and of a matrix-vector product."""
    return 4.0 * size**3, 2.0 * size**2


# (Quasi-)ELK with a search that never damps (the default) runs (quasi-)DEER's iteration
# plus one evaluation of `f` (the values apart from the maps); one that may damp is
# costed with a Kalman smoother's flops and twice the evaluations.
def _elk(solver: ELK, size: int) -> Work:
    trial = DEER(jacobian=solver.jacobian, rtol=solver.rtol, atol=solver.atol)
    if not solver.search.may_damp:
        return _one_more_evaluation(work(trial, size))
    return Work(trial, 2.0 * (1 + size), 12.0 * size**3, _dense(size)[1])


def _quasi_elk(solver: QuasiELK, size: int) -> Work:
    trial = QuasiDEER(diagonal=solver.diagonal, rtol=solver.rtol, atol=solver.atol)
    if not solver.search.may_damp:
        return _one_more_evaluation(work(trial, size))
    evaluations = 2.0 * _diagonal_evaluations(solver.diagonal, size)
    return Work(trial, evaluations, 24.0 * size, 2.0 * size)


def _deer(solver: DEER, size: int) -> Work:
    evaluations = 2.0 if isinstance(solver.jacobian, FunctionJacobian) else 1.0 + size
    tangents = unformed(solver.jacobian, size)
    return Work(solver, evaluations, *_dense(size), tangents=tangents)


def _quasi_deer(solver: QuasiDEER, size: int) -> Work:
    return Work(solver, _diagonal_evaluations(solver.diagonal, size), 8.0 * size, 2.0 * size)


def _block_quasi_deer(solver: BlockQuasiDEER, size: int) -> Work:
    k = solver.block_size
    return Work(solver, 1.0 + size, 4.0 * size * k**2, 2.0 * size * k)


def _picard(solver: Picard, size: int) -> Work:
    return Work(solver, 1.0, 4.0 * size, 2.0 * size)


def _jacobi(solver: Jacobi, size: int) -> Work:
    return Work(solver, 1.0, 2.0 * size, 2.0 * size)


# The cost model, one entry per solver class (every solver class is final).
WORK: dict[type, Callable[[Any, int], Work]] = {
    DEER: _deer,
    QuasiDEER: _quasi_deer,
    BlockQuasiDEER: _block_quasi_deer,
    Picard: _picard,
    Jacobi: _jacobi,
    ELK: _elk,
    QuasiELK: _quasi_elk,
}


def _one_more_evaluation(w: Work) -> Work:
    return w._replace(evaluations=w.evaluations + 1.0)


def _diagonal_evaluations(diagonal, size: int) -> float:
    return 1.0 + diagonal.evaluations(size)


def trial_solver(solver: AbstractParallelSolver) -> AbstractParallelSolver:
    """The solver whose trial predicts `solver`'s steps: itself, except for ELK and
    quasi-ELK, predicted from DEER's and quasi-DEER's (their damping only slows
    convergence where the undamped step is already fast)."""
    return work(solver, 1).trial


# Vectorised passes of one iteration besides its scan: the values and maps, the
# residual and its norms, the search's bookkeeping.
PASSES_PER_ITERATION = 8


def iteration_time(
    solver: AbstractParallelSolver, size: int, flops: float, length: int, hardware: Hardware
) -> float:
    """Seconds for one iteration of `solver` on `length` steps of a step function of
    `flops` floating-point operations and state size `size`, with the linear scan the
    hardware runs (`Hardware.loop_scan`: on CPU a loop over time)."""
    w = work(solver, size)
    if hardware.loop_scan:
        vectorised = PASSES_PER_ITERATION * hardware.call_latency
        if w.tangents:
            # The values alone, then the scan of JVPs.
            vectorised += length * flops / hardware.vector_flops
            return vectorised + hardware.sequential_time(length, JVP_EVALUATIONS * flops)
        vectorised += length * w.evaluations * flops / hardware.vector_flops
        return vectorised + hardware.sequential_time(length, w.loop_flops)
    levels = 2 * math.ceil(math.log2(max(length, 2))) + PASSES_PER_ITERATION
    per_step = w.evaluations * flops + w.scan_flops
    return levels * hardware.call_latency + length * per_step / hardware.vector_flops


def shooting_time(
    solver: AbstractParallelSolver,
    steps: int,
    chunk: int,
    size: int,
    flops: float,
    length: int,
    hardware: Hardware,
) -> float:
    """Seconds for [`parassm.MultipleShooting`][] with `solver` on the chunk ends,
    chunks of `chunk` steps, converging in `steps` coarse iterations.

    Each evaluation of the chunk maps is `chunk` sequential steps, every one a
    vectorised pass over the `K = ceil(length / chunk)` chunks: one evaluation of `f`
    per chunk and step for the values, `w.evaluations` for the maps (their pass
    evaluates the values again); the coarse linear solve is `solver`'s own iteration
    on `K` steps. `steps + 1` passes of the values (the last confirms convergence),
    `steps` of the maps and of the coarse solve, and one more pass over the chunks to
    rebuild the trajectory. Measured on a 2-core CPU (the pendulum, `T = 1e4`,
    `L = 370`): a pass of values 0.29 ms, of values and maps 0.87 ms, where this model
    says 0.16 and 0.48 ms; there the static rule of `Auto` chooses Sequential anyway.
    Not measured on an accelerator."""
    K = -(-length // chunk)
    w = work(solver, size)

    def chunk_pass(evaluations: float) -> float:
        per_step = evaluations * flops
        width = max(per_step / hardware.sequential_flops, K * per_step / hardware.vector_flops)
        return chunk * (hardware.step_latency + width)

    values = chunk_pass(1.0)
    # Maps formed with the values (Jacobi, one evaluation) cost nothing more; formed
    # apart (DEER's JVPs), a pass of their own that evaluates the values again.
    linearise = chunk_pass(w.evaluations) if w.evaluations > 1 else 0.0
    coarse = iteration_time(solver, size, 0.0, K, hardware)
    return (steps + 1) * values + steps * (linearise + coarse) + values
