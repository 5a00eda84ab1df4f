from typing import Any

import equinox as eqx
from jaxtyping import Array, PyTree


class RESULTS(eqx.Enumeration):
    """The outcome of [`parassm.evaluate`][] / [`parassm.scan`][].

    Compare with `==`, e.g. `solution.result == parassm.RESULTS.successful`; this works
    under `jit` and `vmap`.
    """

    successful = (
        "The evaluation converged: every step's residual met the tolerance, and so did "
        "the estimated error of the trajectory."
    )
    max_steps_reached = (
        "The parallel solver did not converge within `max_steps` iterations: the "
        "residual `s_t - f(s_{t-1}, x_t)` is still above the tolerance. The system may "
        "be unpredictable (largest Lyapunov exponent > 0) or strongly nonlinear, so "
        "parallel evaluation does not pay off: use `parassm.Sequential()` or "
        "`parassm.Auto()`, a solver with a better Jacobian (`parassm.DEER()`), or raise "
        "`max_steps` (T is always enough for the DEER family)."
    )
    inaccurate = (
        "Every step's residual meets the tolerance, but the estimated error of the "
        "trajectory does not (`stats['error_estimate']` > 1), and a tighter residual "
        "could not be reached (not measurable in this dtype, or the solver diverged "
        "from the trajectory it had): the dynamics do not damp errors (e.g. the "
        "neutral phase of an oscillator or limit cycle), so residuals add up along the "
        "sequence. Use float64 (`jax.config.update('jax_enable_x64', True)`), looser "
        "tolerances (`rtol`, `atol`), a solver with the exact Jacobians "
        "(`parassm.DEER()`), or `parassm.Sequential()`."
    )
    nonfinite = (
        "The trajectory is not finite: `f` returned NaN or Inf from a converged, finite "
        "state, so sequential evaluation produces NaN/Inf too. Check `f`, `s0` and `xs` "
        "(`jax.config.update('jax_debug_nans', True)` finds the operation)."
    )


class Solution(eqx.Module):
    """The result of evaluating a recurrence.

    **Attributes:**

    - `value`: the trajectory $s_1, \\ldots, s_T$: a PyTree with the structure of `s0`,
        each leaf with a leading time axis of length `T`.
    - `result`: a [`parassm.RESULTS`][] code. `result == RESULTS.successful` exactly
        when the residual meets the solver's tolerance (`stats["residual"] <= 1`) and
        so does the estimated error of the trajectory (`stats["error_estimate"] <= 1`).
    - `stats`: a dictionary of scalars: `num_steps` (parallel iterations taken),
        `max_steps`, `residual` (the largest scaled residual
        $\\max_{t,i} |r_{t,i}| / (\\mathrm{atol} + \\mathrm{rtol} |f_i(s_{t-1}, x_t)|)$,
        at most 1 on success), `max_abs_residual` ($\\max_{t,i} |r_{t,i}|$) and
        `converged_prefix` (the number of leading time steps that meet the tolerance).
        Parallel solvers add `error_estimate`: the estimated error of the trajectory
        over its tolerance, $\\max_t \\|e_t\\|_\\infty / (\\mathrm{atol} + \\mathrm{rtol}
        \\nu_t)$, with $e$ the linearised error recurrence $e_t = A_t e_{t-1} + f(s_{t-1},
        x_t) - s_t$ driven by the final residual through the solver's maps (`inf` if the
        residual never met its tolerance; `NaN` where it is not made, e.g. by
        `SlidingWindow`), and `tolerance_factor`, the factor by which the residual's
        tolerance was tightened to bring that estimate within its tolerance (one if it
        was not).
    """

    value: PyTree[Array]
    result: RESULTS
    stats: dict[str, Any]
