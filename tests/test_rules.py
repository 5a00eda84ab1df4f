"""The Newton loop's rules (`parassm.Rules`): each switchable off, each doing what it is
documented to do on the system it was made for, and none needed for correctness."""

import dataclasses

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import parassm
import pytest
from parassm._solvers._loop import NewtonIteration
from parassm._solvers._measure import Problem

from .helpers import pendulum, sequential, tree_max_abs_diff


def without(solver, *names):
    """`solver` with the rules `names` switched off."""
    rules = dataclasses.replace(solver.rules, **{name: None for name in names})
    return dataclasses.replace(solver, rules=rules)


def steps(sol) -> int:
    return int(sol.stats["num_steps"])


def test_defaults_and_names():
    # Every rule is on by default but the restart at rest, which only the solvers whose
    # maps are the Jacobians take.
    everything = ("blown_up", "in_phase", "stall", "at_rest", "keep_front", "reuse", "verified")
    for solver in (parassm.DEER(), parassm.ELK()):
        assert solver.rules.names() == everything
    for solver in (parassm.QuasiDEER(), parassm.QuasiELK(), parassm.BlockQuasiDEER(2)):
        assert solver.rules.names() == tuple(n for n in everything if n != "at_rest")
    assert without(parassm.DEER(), "stall", "reuse").rules.names() == (
        "blown_up",
        "in_phase",
        "at_rest",
        "keep_front",
        "verified",
    )
    # The restart window spans the longest period a rule looks for.
    assert parassm.Rules().window == 64
    assert parassm.Rules(in_phase=parassm.RestartInPhase(max_period=8), stall=None).window == 8
    assert parassm.Rules(blown_up=None, stall=None).window == 1
    with pytest.raises(ValueError, match="max_period"):
        parassm.RestartInPhase(max_period=0)
    with pytest.raises(ValueError, match="slack"):
        parassm.KeepVerified(slack=0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_every_rule_off_still_converges_to_the_truth(dtype):
    # The rules buy speed, not correctness: with all of them off a contracting system
    # converges to the same trajectory (the causality bound and the safeguards hold).
    system = parassm.systems.Logistic(r=2.8, x0=0.1, dtype=dtype)
    T = 500
    ref = sequential(system.f, system.s0, None, T)
    bare = parassm.Rules(
        blown_up=None,
        in_phase=None,
        stall=None,
        at_rest=None,
        keep_front=None,
        reuse=None,
        verified=None,
    )
    assert bare.names() == ()
    for solver in (parassm.DEER(), parassm.QuasiDEER(), parassm.ELK()):
        sol = parassm.evaluate(
            system.f, system.s0, T, solver=dataclasses.replace(solver, rules=bare), throw=False
        )
        assert sol.result == parassm.RESULTS.successful
        tol = 1e-10 if dtype == jnp.float64 else 1e-4
        assert tree_max_abs_diff(sol.value, ref) < tol


def test_stall_restart():
    # The logistic map on its period-2 orbit (r = 3.4) from 0.05: the constant guess's
    # tail carries no phase, and without the stall restart the front gains about one
    # step per iteration (`bench/convergence.py --ablate`, T = 64: 4.6x the steps).
    system = parassm.systems.Logistic(r=3.4, x0=0.05, dtype=jnp.float32)
    T = 64
    on = parassm.evaluate(system.f, system.s0, T, solver=parassm.DEER(), throw=False)
    off = parassm.evaluate(
        system.f, system.s0, T, solver=without(parassm.DEER(), "stall"), throw=False
    )
    assert on.result == off.result == parassm.RESULTS.successful
    assert 2 * steps(on) < steps(off)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_restart_at_rest(dtype):
    # The damped pendulum from 2 rad (tests/test_evaluate.py: under 30 steps with the
    # rule): without it the iterates beyond the front spin over the top and each step
    # converges some 35 more steps (256 in all at T = 1e4).
    s0, T = jnp.array([2.0, 0.0], dtype), 10_000
    off = parassm.evaluate(
        pendulum, s0, T, solver=without(parassm.DEER(), "at_rest"), max_steps=60, throw=False
    )
    assert off.result == parassm.RESULTS.max_steps_reached
    on = parassm.evaluate(pendulum, s0, T, solver=parassm.DEER(), max_steps=60, throw=False)
    assert on.result == parassm.RESULTS.successful and steps(on) <= 30


def test_keep_front():
    # The two-well sampler from a random guess, float64, T = 1e4: the Jacobi retry
    # that keeps the rejected trial where it cut the residual a hundredfold converges
    # in fewer steps than the plain Jacobi step (15 against 47 when the rule was made).
    system = parassm.systems.TwoWellLangevin(dtype=jnp.float64)
    T = 10_000
    xs = system.inputs(T)
    ref = sequential(system.f, system.s0, xs, T)
    guess = jr.uniform(jr.key(0), ref.shape, ref.dtype) * (ref.max() - ref.min()) + ref.min()

    def run(solver):
        return parassm.evaluate(system.f, system.s0, xs=xs, solver=solver, init=guess, throw=False)

    on, off = run(parassm.DEER()), run(without(parassm.DEER(), "keep_front"))
    assert on.result == off.result == parassm.RESULTS.successful
    assert steps(on) < steps(off)


def test_reuse_maps():
    # Kept diagonals: fewer formations of the maps for the same trajectory; off, one
    # formation per evaluated iterate that is not converged.
    system = parassm.systems.GRU(hidden_size=8, input_size=2, dtype=jnp.float64)
    xs = system.inputs(500, key=jr.key(3))
    solver = parassm.QuasiDEER(relinearise=0.25)
    on = parassm.evaluate(system.f, system.s0, xs=xs, solver=solver, throw=False)
    off = parassm.evaluate(system.f, system.s0, xs=xs, solver=without(solver, "reuse"), throw=False)
    assert on.result == off.result == parassm.RESULTS.successful
    assert int(on.stats["num_linearisations"]) < int(off.stats["num_linearisations"])
    # Off: one formation per evaluated iterate, and one of the exact Jacobians per
    # estimate of the error (two: the first asked for a tighter residual).
    assert float(off.stats["tolerance_factor"]) < 1
    assert int(off.stats["num_linearisations"]) == steps(off) + 1 + 2
    assert tree_max_abs_diff(on.value, off.value) < 1e-9


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_in_phase_restart(dtype):
    # The logistic map at r = 3.2 from the default guess, T = 1e4: a blown-up tail
    # restarted constant carries no phase and blows up again (DEER took over 300
    # steps before the rule); restarted in phase, under 50.
    system = parassm.systems.Logistic(r=3.2, x0=0.1, dtype=dtype)
    T = 10_000

    def run(solver):
        return parassm.evaluate(system.f, system.s0, T, solver=solver, max_steps=100, throw=False)

    on, off = run(parassm.DEER()), run(without(parassm.DEER(), "in_phase"))
    assert on.result == parassm.RESULTS.successful and steps(on) <= 50
    assert steps(off) > steps(on)


def test_keep_verified():
    # Quasi-DEER on the damped pendulum, T = 1e3, float64, its diagonals a Hutchinson
    # estimate (whose error estimate, and the trial after a tightening, use its own
    # maps: they cost fewer than `D` JVPs): the residual meets its tolerance but the
    # estimate of the error does not (the diagonal's error adds up along the weakly
    # damped oscillation); the tighter residual sends the front back and the diagonal
    # step over the tail blows it up again. With the rule the loop gives up at once and
    # returns the iterate it verified, `inaccurate`; without it, it starts over (270
    # steps to success, against 176).
    dtype = jnp.float64
    s0, T = jnp.array([2.0, 0.0], dtype), 1000
    ref = sequential(pendulum, s0, None, T)
    quasi = parassm.QuasiDEER(parassm.HutchinsonDiagonal())

    def run(solver, max_steps=400):
        return parassm.evaluate(pendulum, s0, T, solver=solver, max_steps=max_steps, throw=False)

    on, off = run(quasi), run(without(quasi, "verified"))
    assert on.result == parassm.RESULTS.inaccurate
    assert off.result == parassm.RESULTS.successful
    assert float(on.stats["error_estimate"]) > 1
    # The residual of the iterate returned meets the tolerance it was verified at.
    assert float(on.stats["residual"]) <= 1
    assert int(on.stats["converged_prefix"]) == T
    assert steps(on) + 50 < steps(off)
    # The iterate returned is as good as the estimate says: a few tens of tolerances
    # (the pendulum swings over about 2).
    rtol = quasi.tolerances(dtype)[0]
    assert tree_max_abs_diff(on.value, ref) < 40 * rtol * 2
    # `slack = inf` never gives up early, but a loop that ends at `max_steps` without
    # meeting the tighter tolerance still returns the verified iterate.
    patient = eqx.tree_at(
        lambda s: s.rules, quasi, parassm.Rules(verified=parassm.KeepVerified(jnp.inf))
    )
    capped = run(patient, max_steps=steps(on) + 5)
    assert capped.result == parassm.RESULTS.inaccurate
    assert tree_max_abs_diff(capped.value, on.value) == 0
    bare = run(without(quasi, "verified"), max_steps=steps(on) + 5)
    assert bare.result == parassm.RESULTS.max_steps_reached
    # With the exact diagonals the estimate takes the exact Jacobians, and the trial
    # after the tightening is a Newton step: the rule has nothing to do, and the
    # trajectory is right, in both dtypes (it was `inaccurate` with the diagonal's
    # estimate).
    for dtype in (jnp.float32, jnp.float64):
        s0 = jnp.array([2.0, 0.0], dtype)
        exact = parassm.evaluate(pendulum, s0, T, solver=parassm.QuasiDEER(), throw=False)
        assert exact.result == parassm.RESULTS.successful
        rtol = parassm.QuasiDEER().tolerances(dtype)[0]
        error = tree_max_abs_diff(exact.value, sequential(pendulum, s0, None, T))
        assert error < rtol * 2


@pytest.mark.parametrize(
    "solver, keeps",
    [
        (parassm.QuasiDEER(parassm.HutchinsonDiagonal()), True),
        (parassm.BlockQuasiDEER(1), True),
        (parassm.QuasiDEER(), False),
        (parassm.QuasiELK(), False),
        (parassm.Jacobi(), False),
        (parassm.DEER(), False),
        (parassm.ELK(), False),
    ],
    ids=["Hutchinson", "blocks", "QuasiDEER", "QuasiELK", "Jacobi", "DEER", "ELK"],
)
def test_keep_verified_acts_where_the_estimate_is_not_exact(solver, keeps):
    # Where the estimate takes the exact Jacobians, the trial after a tightening is a
    # Newton step and the rule changed no row of the convergence zoo (an ablation),
    # while carrying the verified iterate costs a batch: the loop leaves it out there.
    # (Blocks of 1 on a state of 2 are smaller than the state: their own maps.)
    problem = Problem(lambda s, x: jnp.tanh(s + x), lambda s: s, jnp.zeros((5, 2)), jnp.zeros(2), 5)
    assert NewtonIteration(solver, problem, 10).keeps_verified is keeps
    off = without(solver, "verified")
    assert NewtonIteration(off, problem, 10).keeps_verified is False
    assert NewtonIteration(solver, problem, 10, verify=False).keeps_verified is False


def test_a_value_that_switches_a_rule_off_is_the_same_as_none():
    # `bench/convergence.py --ablate` switches rules off by a value (so that the
    # variants of a solver share one compiled program): the same steps as `None` in
    # the rule's place, the trajectory to rounding. On rows of its ablation where each
    # rule matters (logistic 2-cycles, float32, from the default guess and the
    # benchmark's random one).
    cases = {
        "in_phase": (parassm.RestartInPhase(rtol=-1.0), 3.2, 0.6, 1000),
        "keep_front": (parassm.KeepFront(cut=-1.0), 3.2, 0.6, 1000),
        "stall": (parassm.RestartOnStall(merit_ratio=float("inf")), 3.4, 0.05, 64),
    }
    for name, (rule, r, x0, T) in cases.items():
        system = parassm.systems.Logistic(r=r, x0=x0, dtype=jnp.float32)
        ref = sequential(system.f, system.s0, None, T)
        key = jr.split(jr.key(0), 1)[0]
        guess = jr.uniform(key, ref.shape, ref.dtype) * (ref.max() - ref.min()) + ref.min()
        matters = False
        for init in (None, guess):

            def run(rules):
                solver = parassm.DEER(rules=rules)
                return parassm.evaluate(
                    system.f, system.s0, T, solver=solver, init=init, throw=False
                )

            default = parassm.DEER().rules
            on = run(default)
            by_value = run(dataclasses.replace(default, **{name: rule}))
            off = run(dataclasses.replace(default, **{name: None}))
            assert steps(by_value) == steps(off), name
            # (To rounding: the two are different programs.)
            assert tree_max_abs_diff(by_value.value, off.value) <= 1e-6, name
            matters |= steps(on) != steps(off)
        # (A case where the rule changes something, so that the test can fail.)
        assert matters, name
