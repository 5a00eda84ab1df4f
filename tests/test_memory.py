"""Compiled programs are released with the problem they were compiled for (issue 33,
part 1): a process evaluating many distinct step functions must not run into the
kernel's limit on memory mappings (`vm.max_map_count`)."""

import gc
import os
import weakref

import equinox as eqx
import jax
import jax.numpy as jnp
import parassm
import parassm._auto as auto_module
import parassm._jit as jit_module
import pytest


def _maps() -> int:
    with open("/proc/self/maps") as fh:
        return sum(1 for _ in fh)


def _problem(a: float):
    def f(s, x):
        return jnp.tanh(a * s + x)

    return f


def _solve(run) -> weakref.ref:
    """Solve a new problem with `run(f)` and return a weak reference to its `f`. In a
    function of its own: equinox's `error_if` reads `f_locals` of every frame on the
    stack while tracing, and on Python 3.11 that snapshot of a caller's locals keeps
    them alive until the frame ends (one problem at a time, not a leak)."""
    f = _problem(0.5)
    run(f)
    return weakref.ref(f)


def test_program_released_with_its_function():
    xs = jnp.linspace(-1.0, 1.0, 20)
    # Earlier tests in this process may have filled the table to its bound.
    parassm.clear_programs()
    before = len(jit_module._PROGRAMS)

    def run(f):
        parassm.evaluate(f, jnp.array(0.0), xs=xs, solver=parassm.DEER())
        assert len(jit_module._PROGRAMS) == before + 1
        parassm.evaluate(f, jnp.array(0.0), xs=2 * xs, solver=parassm.DEER())  # same program
        assert len(jit_module._PROGRAMS) == before + 1

    ref = _solve(run)
    gc.collect()
    assert ref() is None, "parassm keeps the step function alive"
    assert len(jit_module._PROGRAMS) == before


def test_auto_diagnosis_does_not_keep_function_alive():
    xs = jnp.linspace(-1.0, 1.0, 64)
    auto = parassm.Auto(hardware=parassm.diagnostics.Hardware(1e-5, 1e9, 5e-6, 1e13, "wide"))

    def run(f):
        auto.decide(f, jnp.array(0.0), xs=xs)
        assert len(auto_module._DECISIONS) >= 1

    ref = _solve(run)
    gc.collect()
    assert ref() is None, "Auto's cache keeps the step function alive"


class _Cell:
    def __init__(self, a):
        self.a = a

    def step(self, s, x):
        return jnp.tanh(self.a * s + x)


def test_bound_method_reuses_program():
    xs = jnp.linspace(-1.0, 1.0, 20)
    # Earlier tests in this process may have filled the table to its bound.
    parassm.clear_programs()
    before = len(jit_module._PROGRAMS)

    def run():
        cell = _Cell(0.5)
        for _ in range(3):  # `cell.step` is a new bound method object each time
            parassm.evaluate(cell.step, jnp.array(0.0), xs=xs, solver=parassm.Picard())
        assert len(jit_module._PROGRAMS) == before + 1

    run()
    gc.collect()
    assert len(jit_module._PROGRAMS) == before


def test_program_cache_size_bounds_live_functions():
    xs = jnp.linspace(-1.0, 1.0, 10)
    parassm.set_program_cache_size(2)
    try:
        alive = [_problem(0.1 * k) for k in range(4)]
        for f in alive:
            parassm.evaluate(f, jnp.array(0.0), xs=xs, solver=parassm.Jacobi())
        assert len(jit_module._PROGRAMS) <= 2
    finally:
        parassm.set_program_cache_size(jit_module._DEFAULT_SIZE)
    with pytest.raises(ValueError, match="non-negative int"):
        parassm.set_program_cache_size(-1)


def test_runtime_error_still_reads_well():
    def f(s, x):
        return jnp.where(x > 0.5, jnp.nan, 0.5 * s + x)

    xs = jnp.linspace(0.0, 1.0, 20)
    with pytest.raises(eqx.EquinoxRuntimeError, match="not finite"):
        parassm.evaluate(f, jnp.array(0.0), xs=xs, solver=parassm.DEER())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_many_distinct_problems_bounded_maps():
    """300 distinct step functions through every solver family, Auto and the diagnosis,
    in one process, with no cache cleared: the memory mappings stay bounded (before the
    fix, about 320 per problem for DEER: a process crashed after ~200 problems)."""
    xs = jnp.linspace(-1.0, 1.0, 100)
    s0 = jnp.array(0.0)
    wide = parassm.diagnostics.Hardware(1e-5, 1e9, 5e-6, 1e13, "wide")
    runs = [
        lambda f: parassm.evaluate(f, s0, xs=xs, solver=parassm.DEER()).value,
        lambda f: parassm.evaluate(f, s0, xs=xs, solver=parassm.QuasiDEER()).value,
        lambda f: parassm.evaluate(f, s0, xs=xs, solver=parassm.ELK()).value,
        lambda f: parassm.evaluate(f, s0, xs=xs, solver=parassm.Picard()).value,
        lambda f: parassm.evaluate(f, s0, xs=xs, solver=parassm.Jacobi()).value,
        lambda f: (
            parassm.evaluate(f, s0, xs=xs, solver=parassm.MultipleShooting(chunk_length=10)).value
        ),
        lambda f: (
            parassm.evaluate(
                f, s0, xs=xs, solver=parassm.SlidingWindow(parassm.DEER(), window=25)
            ).value
        ),
        lambda f: parassm.evaluate(f, s0, xs=xs).value,
        lambda f: parassm.evaluate(f, s0, xs=xs, solver=parassm.Auto(hardware=wide)).value,
        lambda f: parassm.scan(lambda c, x: (f(c, x), c), s0, xs, solver=parassm.DEER())[1],
        lambda f: parassm.diagnose(f, s0, xs=xs).lle,
    ]
    counts = []
    for k in range(330):
        f = _problem(0.3 + 0.4 * k / 330)
        jax.block_until_ready(runs[k % len(runs)](f))
        del f
        gc.collect()
        if k + 1 in (33, 330):
            counts.append(_maps())
    growth = counts[1] - counts[0]
    # Measured: a few maps in all. A plain `eqx.filter_jit` holding `f` static grows by
    # ~6 per problem; allow 3 per problem here (900 over 297 problems).
    assert growth < 3 * 297, f"memory mappings grew by {growth} over 297 problems: {counts}"
