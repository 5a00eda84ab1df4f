"""`successful` means the trajectory meets the tolerance, not only every step's residual.

On an oscillator the phase is neutral: residuals that each meet their tolerance add up
over the sequence, and the trajectory drifts from the truth. Every parallel solver
estimates the error of its final trajectory (the linearised error recurrence driven by
the final residual, `stats["error_estimate"]`), tightens the residual's tolerance while
the estimate is too large, and reports `RESULTS.inaccurate` where the dtype cannot
bring it within the tolerance. Checked here against a float64 reference."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import parassm
import pytest


def fitzhugh_nagumo(s, x):
    # Euler steps of 0.1 of the FitzHugh-Nagumo oscillator, driven by `x`.
    v, w = s[0], s[1]
    dt = jnp.asarray(0.1, s.dtype)
    return jnp.stack(
        [v + dt * (v - v**3 / 3 - w + 0.3 + 0.1 * x), w + dt * 0.08 * (v + 0.7 - 0.8 * w)]
    )


def van_der_pol(s, x):
    # Euler steps of 0.05 of the Van der Pol oscillator (mu = 1): a limit cycle.
    v, w = s[0], s[1]
    dt = jnp.asarray(0.05, s.dtype)
    return jnp.stack([v + dt * w, w + dt * ((1 - v**2) * w - v + 0.1 * x)])


SYSTEMS = {
    "fitzhugh-nagumo": (fitzhugh_nagumo, (2.0, -1.0)),
    "van der pol": (van_der_pol, (2.0, 0.0)),
}
SOLVERS = [
    parassm.DEER(),
    parassm.QuasiDEER(),
    parassm.BlockQuasiDEER(2),
    parassm.ELK(),
    parassm.QuasiELK(),
    parassm.MultipleShooting(),
    parassm.Jacobi(),
    parassm.Picard(),
    parassm.SlidingWindow(parassm.DEER(), window=256),
    parassm.SlidingWindow(parassm.QuasiDEER(), window=256),
]


def _problem(name, dtype, T):
    f, s0 = SYSTEMS[name]
    t = jnp.arange(T, dtype=jnp.float64)
    xs = jnp.sin(0.05 * t) + 0.3 * jr.normal(jr.key(0), (T,), jnp.float64)
    s0 = jnp.array(s0, jnp.float64)
    truth = jax.lax.scan(lambda s, x: (f(s, x), f(s, x)), s0, xs)[1]
    return f, s0.astype(dtype), xs.astype(dtype), truth


def _tolerance(solver, truth, dtype):
    rtol, atol = solver.tolerances(jnp.dtype(dtype)) if hasattr(solver, "tolerances") else (0, 0)
    return atol + rtol * float(jnp.max(jnp.abs(truth)))


def _name(solver):
    inner = getattr(solver, "solver", None)
    return type(solver).__name__ + ("" if inner is None else f"({type(inner).__name__})")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(SYSTEMS))
@pytest.mark.parametrize("solver", SOLVERS, ids=_name)
def test_successful_means_the_trajectory_is_accurate(solver, name, dtype):
    T = 1500
    f, s0, xs, truth = _problem(name, dtype, T)
    sol = jax.jit(lambda xs: parassm.evaluate(f, s0, xs=xs, solver=solver, throw=False))(xs)
    error = float(jnp.max(jnp.abs(sol.value.astype(jnp.float64) - truth)))
    sequential = jax.lax.scan(lambda s, x: (f(s, x), f(s, x)), s0, xs)[1]
    floor = float(jnp.max(jnp.abs(sequential.astype(jnp.float64) - truth)))
    inner = getattr(solver, "solver", solver)
    tol = _tolerance(inner, truth, dtype)
    estimate = float(sol.stats["error_estimate"])
    if sol.result == parassm.RESULTS.successful:
        assert estimate <= 1
        # Within the tolerance, give or take the estimate's own accuracy, or as accurate
        # as the sequential recurrence in this dtype.
        assert error <= max(10 * tol, 10 * floor), (error, tol, floor)
    else:
        # Never silently wrong: a failure says so, with its estimate.
        assert sol.result == parassm.RESULTS.inaccurate, sol.result
        assert estimate > 1


def test_a_neutral_phase_is_reported_inaccurate_then_accurate_with_tighter_tolerances():
    # float64, default tolerances: every residual meets rtol ~ 1e-11, yet the trajectory
    # is off by far more than that; asked for a tolerance the dtype can deliver, it is
    # successful and accurate.
    f, s0, xs, truth = _problem("fitzhugh-nagumo", jnp.float64, 3000)
    sol = parassm.evaluate(f, s0, xs=xs, solver=parassm.DEER(), throw=False)
    assert sol.result == parassm.RESULTS.inaccurate
    assert float(sol.stats["residual"]) <= 1
    assert float(sol.stats["error_estimate"]) > 1
    # The residual's tolerance was tightened only if float64 could measure what the
    # estimate asked for.
    assert float(sol.stats["tolerance_factor"]) <= 1
    error = float(jnp.max(jnp.abs(sol.value - truth)))
    assert error > parassm.DEER().tolerances(jnp.dtype(jnp.float64))[0] * 2
    with pytest.raises(Exception, match="float64|looser tolerances"):
        parassm.evaluate(f, s0, xs=xs, solver=parassm.DEER(), throw=True)

    solver = parassm.DEER(rtol=1e-6, atol=1e-7)
    for solver in (solver, parassm.SlidingWindow(solver, window=500)):
        sol = parassm.evaluate(f, s0, xs=xs, solver=solver, throw=False)
        assert sol.result == parassm.RESULTS.successful
        assert float(sol.stats["error_estimate"]) <= 1
        assert float(jnp.max(jnp.abs(sol.value - truth))) <= 10 * (1e-7 + 1e-6 * 2.2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_contracting_systems_pass_the_estimate_at_once(dtype, getkey):
    # A contracting GRU: the estimate is about the final residual, within its tolerance
    # (at times after one tightening), per element under vmap as alone.
    system = parassm.systems.GRU(hidden_size=8, input_size=2, dtype=dtype)
    xs = jax.vmap(lambda k: system.inputs(500, key=k))(jr.split(getkey(), 3))

    def run(xs):
        return parassm.evaluate(system.f, system.s0, xs=xs, solver=parassm.DEER(), throw=False)

    sol = jax.vmap(run)(xs)
    assert (sol.result == parassm.RESULTS.successful).tolist() == [True] * 3
    assert bool(jnp.all(sol.stats["error_estimate"] <= 1))
    single = run(xs[0])
    # The element's own estimate (not the batch's largest), to the rounding of a
    # correction at the level of the final residual: a vmapped program rounds float32
    # differently (seen: 0.1159 against 0.1132 on one CPU, equal on another).
    others = sol.stats["error_estimate"][1:]
    np.testing.assert_allclose(
        single.stats["error_estimate"], sol.stats["error_estimate"][0], rtol=0.1
    )
    assert not np.allclose(others, sol.stats["error_estimate"][0], rtol=0.1)


@pytest.mark.parametrize(
    "solver",
    [
        parassm.QuasiDEER(relinearise=0),
        parassm.QuasiELK(),
        parassm.Jacobi(),
        parassm.Picard(),
    ],
    ids=_name,
)
def test_the_estimate_takes_the_exact_jacobians(solver):
    # Where its maps are not the Jacobians (exact diagonals, zero, the identity), a
    # solver estimates the trajectory's error with the exact Jacobians: at the same
    # trajectory, the same estimate as DEER's. The trajectory: Van der Pol's off by a
    # fifth of the tolerance at every step, in random directions (every solver
    # accepts it as it is). With its diagonals instead, quasi-DEER's estimate is off
    # by tens of percent here, and by 40x at the iterate where its residual first
    # meets its tolerance in float32 (`AbstractParallelSolver.error_jacobians`).
    # (Maps that cost fewer JVPs than the Jacobians, a Hutchinson diagonal or blocks
    # smaller than the state, keep their own estimate.)
    with jax.enable_x64(True):
        f, s0, xs, truth = _problem("van der pol", jnp.float64, 1500)
        rtol, _ = solver.tolerances(jnp.dtype(jnp.float64))
        size = jnp.max(jnp.abs(truth), axis=1, keepdims=True)
        S = truth + 0.2 * rtol * size * jr.uniform(jr.key(3), truth.shape, jnp.float64, -1, 1)

        def estimate(solver):
            sol = parassm.evaluate(f, s0, xs=xs, solver=solver, init=S, throw=False)
            assert int(sol.stats["num_steps"]) == 0
            assert sol.result == parassm.RESULTS.successful
            return float(sol.stats["error_estimate"])

        exact = estimate(parassm.DEER())
        assert 0.05 < exact <= 1
        # (The residuals are a fifth of a tolerance, 1e-12 of the states: values of `f`
        # computed with or without the maps differ there in the fourth digit.)
        assert estimate(solver) == pytest.approx(exact, rel=1e-3)


def test_the_exact_corrections_agree():
    # The exact correction three ways: dense Jacobians over the whole trajectory, in
    # windows that do not divide it (each window's recurrence starting where the one
    # before ended), and one JVP per step.
    from parassm._solvers._descent import correction_in_windows, sequential_correction
    from parassm._solvers._measure import Problem

    with jax.enable_x64(True):
        f, s0, xs, truth = _problem("van der pol", jnp.float64, 1500)
        S = truth + 1e-6 * jr.normal(jr.key(4), truth.shape, jnp.float64)
        problem = Problem(f, lambda s: s, xs, s0, 1500)
        fs = jax.vmap(f)(problem.previous(S), xs)
        whole = correction_in_windows(problem, S, fs)
        assert float(jnp.max(jnp.abs(whole))) > 1e-6
        for other in (
            correction_in_windows(problem, S, fs, window=128),
            sequential_correction(problem, S, fs),
        ):
            np.testing.assert_allclose(other, whole, rtol=1e-9, atol=1e-15)


@pytest.mark.default_scan
@pytest.mark.parametrize(
    "solver",
    [parassm.QuasiDEER(relinearise=0), parassm.Jacobi(), parassm.DEER(), parassm.ELK()],
    ids=_name,
)
def test_the_estimate_of_a_wide_state_takes_the_exact_jacobians(solver):
    # From 17 components on a CPU (`LoopScan`, the CPU's default scan: this test runs
    # it) the exact estimate is made one JVP per step (also by
    # DEER and ELK, whose dense maps by JVPs cost more): at the same trajectory (a GRU
    # of 20 units off by a fifth of the tolerance), the estimate of DEER with a closed
    # form, which makes it from its own dense maps.
    with jax.enable_x64(True):
        system = parassm.systems.GRU(hidden_size=20, input_size=2, dtype=jnp.float64)
        T = 400
        xs = system.inputs(T, key=jr.key(5))
        truth = jax.lax.scan(lambda s, x: (system.f(s, x),) * 2, system.s0, xs)[1]
        rtol, _ = solver.tolerances(jnp.dtype(jnp.float64))
        size = jnp.max(jnp.abs(truth), axis=1, keepdims=True)
        S = truth + 0.2 * rtol * size * jr.uniform(jr.key(6), truth.shape, jnp.float64, -1, 1)

        def estimate(solver):
            sol = parassm.evaluate(system.f, system.s0, xs=xs, solver=solver, init=S)
            assert int(sol.stats["num_steps"]) == 0
            return float(sol.stats["error_estimate"])

        closed_form = parassm.FunctionJacobian(lambda s, x: jax.jacfwd(system.f)(s, x))
        assert not parassm.DEER(jacobian=closed_form).error_jacobians(20)
        assert solver.error_jacobians(20)
        exact = estimate(parassm.DEER(jacobian=closed_form))
        assert 0.05 < exact <= 1
        assert estimate(solver) == pytest.approx(exact, rel=1e-3)


def test_tangents_make_the_newton_correction_of_the_dense_maps():
    # DEER's correction with the Jacobians unformed (one JVP per step) is the one with
    # the dense Jacobians: the same frozen prefix (zero before the front, `-r` at it),
    # and a non-finite product counts as zero as a non-finite map does.
    from parassm import _linear as linear
    from parassm._solvers import _jacobian as jacobian
    from parassm._solvers._descent import frozen, newton_correction, Tangents
    from parassm._solvers._measure import Problem

    with jax.enable_x64(True):
        system = parassm.systems.GRU(hidden_size=20, input_size=2, dtype=jnp.float64)
        T = 300
        xs = system.inputs(T, key=jr.key(5))
        S = jr.normal(jr.key(6), (T, 20), jnp.float64)

        def f(s, x):
            return system.f(s, x)

        problem = Problem(f, lambda s: s, xs, system.s0, T)
        s_prev = problem.previous(S)
        r = S - jax.vmap(f)(s_prev, xs)
        dense = linear.Dense(jacobian.dense(f, s_prev, xs))
        for front in (0, 1, 137, T - 1):
            front = jnp.array(front)
            got = Tangents(problem, s_prev).newton_correction(r, front)
            want = newton_correction(dense, r, front)
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
            assert not jnp.any(got[: int(front)])
            # The products a trust region's model of the merit takes.
            got = Tangents(problem, s_prev).frozen_mv(S, front)
            want = frozen(dense, front).mv(S)
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)

        def blows_up(s, x):
            # A map whose Jacobian is infinite from step 200 on (a derivative of
            # `sqrt` at zero) and the state zero there.
            return jnp.where(x[0] > 1e8, jnp.sqrt(s), f(s, x))

        xs_inf = xs.at[200:, 0].set(1e9)
        S_inf = S.at[199:].set(0.0)
        problem = Problem(blows_up, lambda s: s, xs_inf, system.s0, T)
        s_prev = problem.previous(S_inf)
        r = S_inf - jax.vmap(blows_up)(s_prev, xs_inf)
        dense = linear.Dense(jacobian.dense(blows_up, s_prev, xs_inf))
        assert not jnp.all(jnp.isfinite(dense.elements()))
        got = Tangents(problem, s_prev).newton_correction(r, jnp.array(3))
        want = newton_correction(dense, r, jnp.array(3))
        assert jnp.all(jnp.isfinite(got))
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        got = Tangents(problem, s_prev).frozen_mv(S, jnp.array(3))
        assert jnp.all(jnp.isfinite(got))
        np.testing.assert_allclose(got, frozen(dense, jnp.array(3)).mv(S), rtol=1e-10, atol=1e-12)


# ELK with a search that never damps takes DEER's Newton step (the default
# `TrustRegion`; with thresholds, its model of the merit is made by JVPs too).
UNDAMPED_MODEL = parassm.TrustRegion(accept_ratio=0.1, bad_ratio=0.1, good_ratio=0.5)


@pytest.mark.default_scan
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: parassm.DEER(**kw),
        lambda **kw: parassm.ELK(**kw),
        lambda **kw: parassm.ELK(search=UNDAMPED_MODEL, **kw),
    ],
    ids=["DEER", "ELK", "ELK-model"],
)
def test_jacobians_unformed_where_scans_are_sequential(dtype, make):
    # On the CPU's default scan from 17 components the Newton corrections of DEER (and
    # of ELK undamped) take the Jacobians as one JVP per step: no `T x D x D` array in
    # the program, and the same steps and answer as with the same Jacobians formed (a
    # closed form). A damped ELK, whose smoother needs them, forms them.
    with jax.enable_x64(dtype == jnp.float64):
        system = parassm.systems.GRU(hidden_size=20, input_size=2, dtype=dtype)
        T = 500
        xs = system.inputs(T, key=jr.key(7))
        truth = jax.lax.scan(lambda s, x: (system.f(s, x),) * 2, system.s0, xs)[1]
        formed = make(jacobian=parassm.FunctionJacobian(lambda s, x: jax.jacfwd(system.f)(s, x)))
        unformed = make()
        assert unformed.tangent_maps(20) and not unformed.tangent_maps(16)
        assert not formed.tangent_maps(20)
        damped = parassm.ELK(search=parassm.TrustRegion(initial_damping=1e-3))
        assert not damped.tangent_maps(20)

        def run(solver):
            return parassm.evaluate(system.f, system.s0, xs=xs, solver=solver, throw=False)

        def shapes(solver):
            # Every shape made anywhere in the program, nested jaxprs included.
            seen = set()

            def visit(jaxpr):
                for eqn in jaxpr.eqns:
                    seen.update(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
                    for param in eqn.params.values():
                        for sub in param if isinstance(param, list | tuple) else [param]:
                            if isinstance(sub, jax.extend.core.ClosedJaxpr):
                                visit(sub.jaxpr)
                            elif isinstance(sub, jax.extend.core.Jaxpr):
                                visit(sub)

            visit(jax.make_jaxpr(lambda: run(solver))().jaxpr)
            return seen

        assert (T, 20, 20) in shapes(formed)
        assert (T, 20, 20) in shapes(damped)
        assert (T, 20, 20) not in shapes(unformed)
        got, want = run(unformed), run(formed)
        assert got.result == parassm.RESULTS.successful == want.result
        assert int(got.stats["num_steps"]) == int(want.stats["num_steps"])
        scale = float(jnp.max(jnp.abs(truth)))
        rtol, _ = unformed.tolerances(jnp.dtype(dtype))
        assert float(jnp.max(jnp.abs(got.value - truth))) <= 10 * rtol * scale
        np.testing.assert_allclose(got.value, want.value, rtol=0, atol=10 * rtol * scale)


@pytest.mark.parametrize("batch_size", [None, 8, 4], ids=["all", "two-blocks", "one-block"])
def test_block_diagonals_are_the_blocks_of_the_jacobian(batch_size):
    # The `k x k` diagonal blocks `BlockQuasiDEER` forms are those of the dense
    # Jacobian, for a map that is not block diagonal, whatever the columns in flight
    # (20 components in blocks of 4: `batch_size=8` takes two blocks at a time and one
    # left over), and the values are `f`'s.
    from parassm._solvers import _jacobian as jacobian

    with jax.enable_x64(True):
        system = parassm.systems.GRU(hidden_size=20, input_size=2, dtype=jnp.float64)
        T, k = 50, 4
        xs = system.inputs(T, key=jr.key(3))
        s_prev = jr.normal(jr.key(4), (T, 20), jnp.float64)
        values, blocks = jacobian.value_and_block_diagonal(system.f, s_prev, xs, k, batch_size)
        dense = jacobian.dense(system.f, s_prev, xs)
        assert blocks.shape == (T, 20 // k, k, k)
        for b in range(20 // k):
            want = dense[:, b * k : (b + 1) * k, b * k : (b + 1) * k]
            np.testing.assert_allclose(blocks[:, b], want, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(values, jax.vmap(system.f)(s_prev, xs), rtol=1e-12)
        # The map couples the blocks: the blocks are not the whole Jacobian.
        outside = (jnp.arange(20)[:, None] // k) != (jnp.arange(20)[None, :] // k)
        assert float(jnp.max(jnp.abs(jnp.where(outside, dense, 0)))) > 1e-3
