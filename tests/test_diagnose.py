"""diagnose(): regimes, predicted vs measured steps, the recommendation, and Auto."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import parassm
import pytest
import scipy.sparse as sparse
import scipy.sparse.linalg as sparse_linalg

from .helpers import CPU, GPU_LIKE, pendulum, sequential


S = parassm.systems
SOLVERS = ("DEER", "QuasiDEER", "ELK", "Jacobi")
T = 1024


def _diagnose(system, hardware=None):
    xs = system.inputs(T)
    d = parassm.diagnose(
        system.f, system.s0, T, xs=xs, solvers=SOLVERS, hardware=hardware, proxy_length=64
    )
    return d, xs


def _jacobians(system, xs, T):
    """`J_t = df/ds(s_{t-1}, x_t)`, t = 1..T, along the sequential trajectory (NumPy)."""
    prev = np.concatenate(
        [np.asarray(system.s0)[None], np.asarray(sequential(system.f, system.s0, xs[:T]))[:-1]]
    )
    return np.asarray(jax.vmap(jax.jacfwd(system.f))(jnp.asarray(prev), xs[:T]))


def _sigma_min(system, xs):
    """The smallest singular value of the residual Jacobian (identity blocks on the
    diagonal, -J_t below), as 1 / |M^{-1}|_2 by ARPACK on a sparse LU."""
    Js = _jacobians(system, xs, T)
    D = Js.shape[-1]
    M = sparse.lil_matrix((T * D, T * D))
    M.setdiag(1.0)
    for t in range(1, T):
        M[t * D : (t + 1) * D, (t - 1) * D : t * D] = -Js[t]
    lu = sparse_linalg.splu(M.tocsc())
    inverse = sparse_linalg.LinearOperator(
        M.shape, matvec=lu.solve, rmatvec=lambda v: lu.solve(v, trans="T")
    )
    return 1 / sparse_linalg.svds(inverse, k=1, return_singular_vectors=False)[0]


def _overshoot(system, xs, proxy, window, lle):
    Js = _jacobians(system, xs, proxy)[1:]  # the couplings J_2 .. J_proxy
    best = 1.0
    for t in range(len(Js)):
        P = np.eye(Js.shape[-1])
        for j in range(1, min(window, len(Js) - t) + 1):
            P = Js[t + j - 1] @ P
            best = max(best, np.linalg.norm(P, 2) * np.exp(-lle * j))
    return best


def _measured(system, xs, solver):
    sol = parassm.evaluate(system.f, system.s0, T, xs=xs, solver=solver, throw=False)
    return int(sol.stats["num_steps"])


@pytest.fixture(scope="module")
def gru():
    system = S.GRU(hidden_size=4)
    d, xs = _diagnose(system, GPU_LIKE)
    return system, d, xs


def test_predictable_gru(gru):
    system, d, xs = gru
    assert d.regime == "predictable"
    assert d.lle < 0
    # The bounds, extrapolated from the 64-step proxy, bracket -ln mu of the whole
    # T-step residual Jacobian, computed independently (sparse LU and ARPACK).
    lo, hi = d.neg_log_mu_bounds
    true = -2 * np.log(_sigma_min(system, xs))
    assert lo <= true <= hi, (lo, true, hi)
    assert hi < 20  # predictable: bounded independently of T
    # The overshoot: the largest norm of a product of up to `window` (16) consecutive
    # Jacobians of the proxy, relative to exp(LLE * lag), computed here in NumPy.
    np.testing.assert_allclose(d.overshoot, _overshoot(system, xs, 64, 16, d.lle), rtol=1e-6)
    for name, solver in (("DEER", parassm.DEER()), ("QuasiDEER", parassm.QuasiDEER())):
        measured = _measured(system, xs, solver)
        predicted = d.predicted_steps[name]
        assert predicted <= 30
        assert measured / 2 - 2 <= predicted <= 2 * measured + 2, (name, predicted, measured)
    # On a GPU-like machine a few Newton steps pay off.
    assert type(d.recommended).__name__ in ("DEER", "QuasiDEER")
    assert json.loads(json.dumps(d.to_dict(), allow_nan=False))["regime"] == "predictable"


def test_chaotic_logistic_unpredictable():
    system = S.Logistic(r=4.0)
    d, xs = _diagnose(system, GPU_LIKE)
    assert d.regime == "unpredictable"
    assert abs(d.lle - np.log(2)) < 0.05
    assert d.predicted_steps["DEER"] >= T // 2
    assert isinstance(d.recommended, parassm.Sequential)
    assert _measured(system, xs, parassm.DEER()) >= T // 2


def test_bistable_tanh_is_now_fast_and_predicted_so():
    # The tanh RNN at a = 10 saturates at -1 and stays there (LLE < 0). DEER once
    # crawled here (over T / 4 iterations from the default guess), and this test
    # asserted that the diagnosis caught it. Since a stalled loop restarts its tail
    # from a constant converged prefix, DEER converges in under 30; the diagnosis must
    # now say so, not promise a crawl. (That the trial catches a crawl is tested in
    # `test_a_crawl_is_recommended_multiple_shooting_from_its_own_trial`.)
    system = S.TanhRNN(a=10.0)
    d, xs = _diagnose(system, GPU_LIKE)
    assert d.lle < 0
    measured = _measured(system, xs, parassm.DEER())
    assert measured <= 30
    assert d.regime == "predictable"
    assert measured / 2 - 2 <= d.predicted_steps["DEER"] <= 2 * measured + 2


@pytest.mark.slow
def test_tent_map_is_now_fast_and_predicted_so():
    # The contracting tent map (mu = 0.7, LLE = log 0.7) once made DEER crawl from the
    # default guess, and this test asserted that the diagnosis caught it. Since the
    # loop falls back to the Jacobi step and restarts blown-up tails, DEER converges
    # in a few steps; the diagnosis must now say so, not promise a crawl.
    system = S.Tent(mu=0.7, x0=0.8)
    d, xs = _diagnose(system, GPU_LIKE)
    assert abs(d.lle - np.log(0.7)) < 0.05
    measured = _measured(system, xs, parassm.DEER())
    assert measured <= 10
    assert d.regime == "predictable"
    assert d.predicted_steps["DEER"] <= 2 * measured + 2
    assert d.shooting_chunk is None


@pytest.mark.slow
def test_cpu_recommends_sequential(gru):
    system, _, xs = gru
    d = parassm.diagnose(
        system.f, system.s0, T, xs=xs, solvers=SOLVERS, hardware=CPU, proxy_length=64
    )
    assert isinstance(d.recommended, parassm.Sequential)
    # On a narrow machine one vectorised iteration over T steps costs at least T
    # sequential steps, so no parallel candidate can be cheaper, whatever its steps.
    parallel = {k: v for k, v in d.costs.items() if k != "Sequential"}
    assert parallel and min(parallel.values()) >= T


def test_diagnose_bad_input():
    with pytest.raises(ValueError, match="Unknown solver"):
        parassm.diagnose(lambda s, x: s, jnp.ones(2), 10, solvers=("Newton",))
    with pytest.raises(ValueError, match="shape"):
        parassm.diagnose(lambda s, x: jnp.ones(3), jnp.ones(2), 10)


def test_auto_static_sequential_on_a_narrow_machine():
    # With a hardware model where no parallel iteration can pay (a CPU with few cores),
    # Auto decides at trace time: Sequential, bit for bit `lax.scan`, nothing diagnosed.
    # (The detected model depends on the machine; an explicit one makes the test assert
    # the same thing everywhere.)
    system = S.GRU(hidden_size=4)
    xs = system.inputs(200)
    auto = parassm.Auto(hardware=CPU)
    assert isinstance(auto.decide(system.f, system.s0, xs=xs), parassm.Sequential)
    sol = parassm.evaluate(system.f, system.s0, xs=xs, solver=auto)
    assert int(sol.stats["solver"]) == 0
    assert jnp.array_equal(sol.value, sequential(system.f, system.s0, xs))


def test_auto_decides_on_the_host_under_jit():
    auto = parassm.Auto(hardware=GPU_LIKE, proxy_length=64)
    gru = S.GRU(hidden_size=4)
    logistic = S.Logistic(r=4.0)
    xs = gru.inputs(T)

    @jax.jit
    def run_gru(xs):
        return parassm.evaluate(gru.f, gru.s0, xs=xs, solver=auto)

    # A concrete call diagnoses the problem's signature; jit then reuses the decision.
    assert isinstance(auto.decide(gru.f, gru.s0, xs=xs), parassm.DEER | parassm.QuasiDEER)
    sol = run_gru(xs)
    assert int(sol.stats["solver"]) > 0  # a parallel solver
    np.testing.assert_allclose(sol.value, sequential(gru.f, gru.s0, xs), atol=1e-8)
    sol = parassm.evaluate(logistic.f, logistic.s0, T, solver=auto)
    assert int(sol.stats["solver"]) == 0
    np.testing.assert_array_equal(sol.value, sequential(logistic.f, logistic.s0, length=T))


def test_auto_validation():
    with pytest.raises(TypeError, match="instance"):
        parassm.Auto(candidates=("DEER",))
    with pytest.raises(ValueError, match="rtol"):
        parassm.Auto(rtol=-1.0)


def test_trial_length_follows_the_lle():
    settings = parassm.diagnostics._diagnose.default_settings((parassm.DEER(),))
    assert settings.trial_length(-0.5, 10_000) == 128  # decays within the prefix
    assert settings.trial_length(-0.02, 10_000) == 512  # 8 / 0.02 = 400 -> 512
    assert settings.trial_length(0.004, 10_000) == 1024  # capped
    assert settings.trial_length(0.0, 10_000) == 1024
    assert settings.trial_length(float("nan"), 300) == 300  # never beyond T
    assert settings.trial_length(float("-inf"), 10_000) == 128  # superstable
    assert settings.trial_length(-0.02, 100) == 100
    # A proxy length the user gives is used as is.
    fixed = parassm.diagnostics._diagnose.default_settings((parassm.DEER(),), proxy_length=64)
    assert fixed.trial_length(0.0, 10_000) == 64


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_weakly_damped_flow_is_predicted_from_a_longer_prefix(dtype):
    # A 128-step prefix of a flow whose errors decay over ~80 steps converges in a few
    # Newton steps while the whole problem needs many more: the trial runs on a prefix
    # of several decay lengths instead, and the prediction holds to within 2x.
    s0 = jnp.array([2.0, 0.0], dtype)
    d = parassm.diagnose(pendulum, s0, T, solvers=("DEER",), hardware=CPU)
    assert -0.02 < d.lle < -0.005
    assert d.proxy_length == 1024
    sol = parassm.evaluate(pendulum, s0, T, solver=parassm.DEER())
    measured = int(sol.stats["num_steps"])
    assert 0.5 <= d.predicted_steps["DEER"] / measured <= 2.0, (d.predicted_steps, measured)
    # It is not promised fast.
    assert isinstance(d.recommended, parassm.Sequential)


def test_a_crawl_is_recommended_multiple_shooting_from_its_own_trial():
    # The logistic map at r = 3.83 (a 3-cycle, LLE about -0.2 on it) from 0.3, T = 1e4:
    # a long transient before the cycle, through which DEER's front crawls (58 steps),
    # and its trial on a prefix crawls too, so the regime is marginal; multiple
    # shooting is trialled on its first 16 chunks, predicted to converge in a few
    # iterations, and recommended on a wide machine. The prediction holds. (This was
    # the damped pendulum, until a crawling loop restarted its tail: DEER takes 18
    # there now, and the diagnosis predicts 16 and recommends DEER.)
    system, T = S.Logistic(r=3.83, x0=0.3), 10_000
    logistic, s0 = system.f, system.s0
    d = parassm.diagnose(logistic, s0, T, solvers=("DEER",), hardware=GPU_LIKE)
    assert d.lle < 0
    assert d.regime == "marginal" and d.predicted_steps["DEER"] > 50
    chunk = d.shooting_chunk
    assert isinstance(d.recommended, parassm.MultipleShooting)
    assert d.recommended == parassm.MultipleShooting(parassm.DEER(), chunk_length=chunk)
    assert d.costs["MultipleShooting"] * 1.5 < d.costs["Sequential"]
    assert d.to_dict()["recommendation"]["multiple_shooting_steps"] == d.shooting_steps
    sol = parassm.evaluate(logistic, s0, T, solver=d.recommended)
    measured = int(sol.stats["num_steps"])
    assert sol.result == parassm.RESULTS.successful
    assert measured <= 2 * d.shooting_steps + 2 and d.shooting_steps <= 2 * measured + 2
    np.testing.assert_allclose(sol.value, sequential(logistic, s0, length=T), atol=1e-6)
    # Asked not to: no trial, no cost, Sequential.
    d = parassm.diagnose(logistic, s0, T, solvers=("DEER",), hardware=GPU_LIKE, shooting=None)
    assert d.shooting_steps is None and "MultipleShooting" not in d.costs
    assert isinstance(d.recommended, parassm.Sequential)
    assert d.shooting_chunk == chunk  # the suggestion stays
    with pytest.raises(TypeError, match="chunk ends"):
        parassm.diagnose(logistic, s0, T, shooting="DEER")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_a_bistable_map_is_recommended_multiple_shooting(dtype):
    # tanh(3 s + u), T = 1e4: contracting (LLE about -3.4) but bistable, and the wrong
    # well persists for hundreds of steps, so DEER's front crawls (about 950 steps in
    # float32). Multiple shooting's trial crawled over a few chunks and then converged
    # them all; extrapolated at that crawl rate, float64 was predicted 69 iterations
    # and recommended Sequential, where multiple shooting takes 6. Now both dtypes are
    # recommended multiple shooting, which converges in a few iterations and matches
    # the sequential pass.
    system, T = S.TanhRNN(a=3.0, dtype=dtype), 10_000
    xs = system.inputs(T)
    d = parassm.diagnose(system.f, system.s0, T, xs=xs, solvers=("DEER",), hardware=GPU_LIKE)
    assert d.lle < -1 and d.regime == "marginal"
    assert isinstance(d.recommended, parassm.MultipleShooting)
    assert d.shooting_steps <= 30
    sol = parassm.evaluate(system.f, system.s0, T, xs=xs, solver=d.recommended)
    assert sol.result == parassm.RESULTS.successful
    assert sol.stats["num_steps"] <= 15
    atol = 1e-4 if dtype == jnp.float32 else 1e-10
    np.testing.assert_allclose(sol.value, sequential(system.f, system.s0, xs), atol=atol)


def test_damped_pendulum_is_predicted_fast_on_a_wide_machine():
    # The pendulum at T = 1e4 (memory about 80 steps): DEER once crawled here (about 250
    # steps; the diagnosis said marginal and recommended multiple shooting). Since a
    # crawling loop restarts its tail, DEER converges in under 30, the trial on a
    # 1024-step prefix predicts as much, and a wide machine is recommended DEER.
    T, s0 = 10_000, jnp.array([2.0, 0.0])
    d = parassm.diagnose(pendulum, s0, T, solvers=("DEER",), hardware=GPU_LIKE)
    assert d.regime == "predictable" and d.predicted_steps["DEER"] <= 30
    assert d.recommended == parassm.DEER()
    sol = parassm.evaluate(pendulum, s0, T, solver=parassm.DEER())
    assert sol.result == parassm.RESULTS.successful
    measured = int(sol.stats["num_steps"])
    assert 0.5 <= d.predicted_steps["DEER"] / measured <= 2.0


def test_a_loop_scan_machine_costs_the_solve_as_sequential_steps():
    # Where the linear solve is a loop over time (the CPU default), one iteration costs
    # at least T sequential matrix-vector steps; with the associative scan, on a wide
    # machine, far less.
    from parassm.diagnostics._predict import iteration_time

    loop = dataclasses.replace(GPU_LIKE, loop_scan=True)
    D, flops, length = 16, 1e4, 10_000
    t_loop = iteration_time(parassm.DEER(), D, flops, length, loop)
    assert t_loop >= loop.sequential_time(length, 2 * D**2)
    assert iteration_time(parassm.DEER(), D, flops, length, GPU_LIKE) < t_loop / 10
    assert not GPU_LIKE.loop_scan


def test_work_of_elk_follows_its_search():
    # The default trust region never damps, so (quasi-)ELK costs (quasi-)DEER's
    # iteration plus the values evaluated apart; one that may damp costs a smoother.
    from parassm.diagnostics._predict import work

    D = 8
    deer, qdeer = work(parassm.DEER(), D), work(parassm.QuasiDEER(), D)
    elk, qelk = work(parassm.ELK(), D), work(parassm.QuasiELK(), D)
    assert (elk.scan_flops, elk.loop_flops) == (deer.scan_flops, deer.loop_flops)
    assert elk.evaluations == deer.evaluations + 1
    assert (qelk.scan_flops, qelk.loop_flops) == (qdeer.scan_flops, qdeer.loop_flops)
    assert qelk.evaluations == qdeer.evaluations + 1
    damped = parassm.TrustRegion(max_trials=3)
    for solver, undamped in ((parassm.ELK, elk), (parassm.QuasiELK, qelk)):
        cost = work(solver(search=damped), D)
        assert cost.scan_flops > undamped.scan_flops
        assert cost.evaluations > undamped.evaluations


def test_a_loop_scan_machine_costs_unformed_jacobians_as_a_scan_of_jvps():
    # From 17 components DEER (and ELK undamped) form no Jacobians where the linear
    # solve is a loop over time: one iteration is a pass of the values and a loop of one
    # JVP per step, not `D` JVPs per step and a dense loop. A closed form, a damped
    # search or a narrower state keep the dense cost.
    from parassm.diagnostics._predict import (
        iteration_time,
        JVP_EVALUATIONS,
        PASSES_PER_ITERATION,
        work,
    )

    loop = dataclasses.replace(GPU_LIKE, loop_scan=True)
    flops, length = 1e4, 10_000
    closed = parassm.FunctionJacobian(lambda s, x: jnp.eye(s.shape[0]))
    damped = parassm.TrustRegion(max_trials=3)
    values = PASSES_PER_ITERATION * loop.call_latency + length * flops / loop.vector_flops
    want = values + loop.sequential_time(length, JVP_EVALUATIONS * flops)
    for D in (32, 64):
        for solver in (parassm.DEER(), parassm.ELK()):
            assert work(solver, D).tangents
            assert iteration_time(solver, D, flops, length, loop) == pytest.approx(want)
        for solver in (parassm.DEER(jacobian=closed), parassm.ELK(search=damped)):
            assert not work(solver, D).tangents
            assert iteration_time(solver, D, flops, length, loop) >= loop.sequential_time(
                length, 2 * D**2
            )
    assert not work(parassm.DEER(), 16).tangents
    # With the associative scan they are formed: `D` JVPs per step cost more than a
    # closed form's one evaluation.
    wide = iteration_time(parassm.DEER(), 64, flops, length, GPU_LIKE)
    assert wide > iteration_time(parassm.DEER(jacobian=closed), 64, flops, length, GPU_LIKE)
