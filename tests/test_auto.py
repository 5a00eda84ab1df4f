"""Auto: decisions on the host, one solver per batch, gradients with every adjoint, the
measured hardware model and its on-disk cache, and the import layering."""

import ast
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import parassm
import parassm._auto as auto_module
import pytest
from parassm.diagnostics import _hardware
from parassm.diagnostics._hardware import Hardware, read_entry, write_entry

from .helpers import CPU, GPU_LIKE, pendulum, sequential, tree_max_abs_diff


S = parassm.systems
ROOT = pathlib.Path(parassm.__file__).parent
CALLS = []


class CountingDEER(parassm.DEER):
    def solve(self, f, s0, xs, length, init, max_steps):
        CALLS.append("DEER")
        return super().solve(f, s0, xs, length, init, max_steps)


class CountingQuasiDEER(parassm.QuasiDEER):
    def solve(self, f, s0, xs, length, init, max_steps):
        CALLS.append("QuasiDEER")
        return super().solve(f, s0, xs, length, init, max_steps)


def _gru(dtype, T=256, hidden=4):
    system = S.GRU(hidden_size=hidden, dtype=dtype)
    return system.f, system.s0, system.inputs(T)


@pytest.fixture(autouse=True)
def _fresh_cache():
    auto_module.clear_cache()
    CALLS.clear()
    yield
    auto_module.clear_cache()


# -- the decision ------------------------------------------------------------------------------


def test_vmap_runs_one_candidate():
    f, s0, xs = _gru(jnp.float64)
    auto = parassm.Auto(candidates=(CountingDEER(), CountingQuasiDEER()), hardware=GPU_LIKE)
    chosen = auto.decide(f, s0, xs=xs)
    assert isinstance(chosen, CountingDEER | CountingQuasiDEER)
    CALLS.clear()
    batch = jnp.stack([xs, 0.5 * xs, -xs])
    sol = jax.jit(jax.vmap(lambda x: parassm.evaluate(f, s0, xs=x, solver=auto)))(batch)
    # One solver traced for the whole batch (no `lax.switch` over every candidate).
    assert CALLS == [type(chosen).__name__.removeprefix("Counting")]
    expected = jax.vmap(lambda x: sequential(f, s0, x))(batch)
    np.testing.assert_allclose(sol.value, expected, atol=1e-8)
    assert np.all(np.asarray(sol.stats["solver"]) == auto.configured().index(chosen) + 1)


def test_narrow_machine_runs_sequential_and_no_candidate():
    f, s0, xs = _gru(jnp.float32)
    auto = parassm.Auto(candidates=(CountingDEER(), CountingQuasiDEER()), hardware=CPU)
    batch = jnp.stack([xs, -xs])
    sol = jax.vmap(lambda x: parassm.evaluate(f, s0, xs=x, solver=auto))(batch)
    assert CALLS == []
    assert not auto_module._DECISIONS  # nothing was diagnosed
    np.testing.assert_array_equal(sol.value, jax.vmap(lambda x: sequential(f, s0, x))(batch))


def test_under_jit_without_a_diagnosis_falls_back_to_sequential():
    f, s0, xs = _gru(jnp.float64)
    auto = parassm.Auto(candidates=(CountingDEER(),), hardware=GPU_LIKE)
    sol = jax.jit(lambda x: parassm.evaluate(f, s0, xs=x, solver=auto))(xs)
    assert int(sol.stats["solver"]) == 0 and CALLS == []
    # An eager call diagnoses the signature; the same jitted problem then runs DEER.
    assert int(parassm.evaluate(f, s0, xs=xs, solver=auto).stats["solver"]) == 1
    sol = jax.jit(lambda x: parassm.evaluate(f, s0, xs=x, solver=auto))(1.1 * xs)
    assert int(sol.stats["solver"]) == 1


def test_periodic_and_chaotic_get_sequential():
    auto = parassm.Auto(hardware=GPU_LIKE, shooting=None)
    for r in (3.2, 4.0):
        system = S.Logistic(r=r)
        assert isinstance(auto.decide(system.f, system.s0, 1024), parassm.Sequential), r
    # Chaos never gets multiple shooting either.
    system = S.Logistic(r=4.0)
    chosen = parassm.Auto(hardware=GPU_LIKE).decide(system.f, system.s0, 1024)
    assert isinstance(chosen, parassm.Sequential)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_a_crawl_gets_multiple_shooting_on_a_wide_machine(dtype):
    # The logistic map at r = 3.83 from 0.3 contracts on its 3-cycle (LLE about -0.2),
    # but DEER crawls through the long transient before it (58-100 steps at T = 1e4):
    # on a wide machine Auto shoots, with chunks of `sqrt(T)` steps (more than
    # 4 / |LLE|), and the trial's prediction of a few coarse iterations holds. (This
    # was the damped pendulum, with chunks of about 4 / |LLE| = 370 steps, until a
    # crawling loop restarted its tail: DEER takes 5-17 there now, and Auto runs it.)
    system, T = S.Logistic(r=3.83, x0=0.3, dtype=dtype), 10_000
    f, s0 = system.f, system.s0
    auto = parassm.Auto(hardware=GPU_LIKE)
    chosen = auto.decide(f, s0, T)
    assert isinstance(chosen, parassm.MultipleShooting), chosen
    assert chosen.solver == parassm.DEER()
    assert chosen.chunk_length == parassm.MultipleShooting().chunk(T)
    decision = auto.diagnosis(f, s0, None, T)
    assert decision.regime == "marginal" and decision.shooting[0] == chosen.chunk_length
    sol = parassm.evaluate(f, s0, T, solver=auto)
    assert int(sol.stats["solver"]) == len(auto.candidates) + 1
    assert sol.result == parassm.RESULTS.successful
    measured = int(sol.stats["num_steps"])
    assert measured <= 2 * decision.shooting[1] + 2, (decision.shooting, measured)
    ref = sequential(f, s0, length=T)
    tol = 1e-4 if dtype == jnp.float32 else 1e-9
    assert tree_max_abs_diff(sol.value, ref) < tol
    # Inside `jit`, the cached decision; gradients by the implicit adjoint, as for any
    # solver.
    jitted = jax.jit(lambda s: parassm.evaluate(f, s, T, solver=auto).value[-1])
    assert tree_max_abs_diff(jitted(s0), ref[-1]) < tol
    if dtype == jnp.float64:
        grad = jax.grad(lambda s: parassm.evaluate(f, s, T, solver=auto).value[-1])
        expected = jax.grad(lambda s: sequential(f, s, length=T)[-1])
        np.testing.assert_allclose(grad(s0), expected(s0), rtol=1e-6, atol=1e-10)
    # Without multiple shooting, or on a narrow machine: Sequential.
    no_shooting = parassm.Auto(hardware=GPU_LIKE, shooting=None)
    assert isinstance(no_shooting.decide(f, s0, T), parassm.Sequential)
    assert isinstance(parassm.Auto(hardware=CPU).decide(f, s0, T), parassm.Sequential)


def test_damped_pendulum_gets_deer_on_a_wide_machine():
    # The long memory that once needed multiple shooting (DEER about 250 steps at T =
    # 1e4): Auto now runs DEER, in under 30 steps.
    T, s0 = 10_000, jnp.array([2.0, 0.0])
    auto = parassm.Auto(hardware=GPU_LIKE)
    assert auto.decide(pendulum, s0, T) == parassm.DEER()
    sol = parassm.evaluate(pendulum, s0, T, solver=auto)
    assert sol.result == parassm.RESULTS.successful
    assert int(sol.stats["num_steps"]) <= 30
    assert tree_max_abs_diff(sol.value, sequential(pendulum, s0, length=T)) < 1e-9


def test_multiple_shooting_needs_a_trial_that_converges():
    # The period-2 logistic map: from a constant guess, chunks of an even number of
    # steps land in the right phase and converge in one iteration. Chunks of an odd
    # number alternate phase; a stalled loop restarts the chunk ends in phase with the
    # converged ones, a few iterations (without that restart they crawled, about one
    # chunk per iteration, and Auto, which follows the trial, did not shoot).
    system = S.Logistic(r=3.2, x0=0.3, dtype=jnp.float32)
    auto = parassm.Auto(hardware=GPU_LIKE)
    even = auto.decide(system.f, system.s0, 10_000)  # chunks of sqrt(T) = 100 steps
    assert isinstance(even, parassm.MultipleShooting) and even.chunk_length == 100
    sol = parassm.evaluate(system.f, system.s0, 10_000, solver=even)
    assert sol.result == parassm.RESULTS.successful and int(sol.stats["num_steps"]) <= 2
    # (A length of another power-of-two bucket, so that it is diagnosed afresh.)
    odd = auto.decide(system.f, system.s0, 3000)  # chunks of 55 steps
    assert isinstance(odd, parassm.MultipleShooting) and odd.chunk_length == 55
    chunk, predicted = auto.diagnosis(system.f, system.s0, None, 3000).shooting
    assert chunk == 55 and 1 < predicted <= 10
    sol = parassm.evaluate(system.f, system.s0, 3000, solver=odd)
    assert sol.result == parassm.RESULTS.successful
    assert int(sol.stats["num_steps"]) <= 2 * predicted + 2
    ref = sequential(system.f, system.s0, None, 3000)
    assert tree_max_abs_diff(sol.value, ref) < 1e-4

    # A trial that crawls (a quarter of the chunks or more) is not chosen, however
    # cheap each iteration is; one that converges and pays is.
    from parassm.diagnostics._diagnose import choose_shooting

    K = -(-3000 // 55)
    args = (1.0, 1, 10.0, 3000, GPU_LIKE)
    assert choose_shooting(parassm.DEER(), 55, K // 4 + 1, *args)[1] is None
    assert choose_shooting(parassm.DEER(), 55, 2, *args)[1] == odd


def test_candidates_are_instances_and_tolerances_propagate(monkeypatch):
    hutchinson = parassm.QuasiDEER(parassm.HutchinsonDiagonal(num_samples=2))
    auto = parassm.Auto(candidates=(hutchinson,), rtol=1e-4, atol=1e-6, hardware=GPU_LIKE)
    (configured,) = auto.configured()
    assert configured.rtol == 1e-4 and configured.atol == 1e-6
    assert configured.diagonal == hutchinson.diagonal
    seen = []
    real = auto_module.default_settings

    def spy(solvers, *args, **kwargs):
        seen.extend(solvers)
        return real(solvers, *args, **kwargs)

    monkeypatch.setattr(auto_module, "default_settings", spy)
    f, s0, xs = _gru(jnp.float64)
    chosen = auto.decide(f, s0, xs=xs)
    assert seen == [configured]  # the trial ran with Auto's tolerances
    assert chosen == configured
    sol = parassm.evaluate(f, s0, xs=xs, solver=auto)
    assert int(sol.stats["solver"]) == 1
    # The evaluation met Auto's (loose) tolerance, not the default one.
    assert float(sol.stats["residual"]) <= 1.0
    assert auto.configured_shooting() == parassm.DEER(rtol=1e-4, atol=1e-6)
    # Without Auto's tolerances the candidates keep their own.
    own = parassm.DEER(rtol=1e-3)
    assert parassm.Auto(candidates=(own,)).configured() == (own,)


def test_validation():
    with pytest.raises(TypeError, match="instance"):
        parassm.Auto(candidates=("DEER",))
    with pytest.raises(TypeError, match="chunk ends"):
        parassm.Auto(shooting="DEER")
    with pytest.raises(TypeError, match="instance"):
        parassm.Auto(candidates=(parassm.Sequential(),))
    with pytest.raises(TypeError, match="non-empty"):
        parassm.Auto(candidates=())
    with pytest.raises(ValueError, match="atol"):
        parassm.Auto(atol=0.0)


# -- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("hardware", [CPU, GPU_LIKE], ids=["sequential", "parallel"])
@pytest.mark.parametrize("adjoint", [parassm.ImplicitAdjoint(), parassm.UnrolledAdjoint()])
def test_gradients_match_lax_scan(dtype, hardware, adjoint):
    f, s0, xs = _gru(dtype, T=512)
    auto = parassm.Auto(candidates=(parassm.DEER(),), hardware=hardware)
    expected_solver = parassm.Sequential if hardware is CPU else parassm.DEER
    assert isinstance(auto.decide(f, s0, xs=xs), expected_solver)

    def loss(xs, solver, adjoint):
        sol = parassm.evaluate(f, s0, xs=xs, solver=solver, adjoint=adjoint)
        return jnp.sum(sol.value**2)

    got = jax.jit(jax.grad(loss), static_argnums=(1, 2))(xs, auto, adjoint)
    want = jax.grad(lambda xs: jnp.sum(sequential(f, s0, xs) ** 2))(xs)
    tol = 1e-4 if dtype == jnp.float32 else 1e-9
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


# -- the hardware model and its cache ----------------------------------------------------------


def test_cache_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("PARASSM_CACHE_DIR", str(tmp_path / "here"))
    assert parassm.diagnostics.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("PARASSM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert parassm.diagnostics.cache_dir() == tmp_path / "xdg" / "parassm"


def test_detect_round_trip(monkeypatch, tmp_path):
    monkeypatch.setenv("PARASSM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_hardware, "_MEMORY", {})
    measured = []

    def fake_measure(dtype, name):
        measured.append(dtype)
        return CPU

    monkeypatch.setattr(_hardware, "measure", fake_measure)
    # `detect` adds what the platform's linear solve is (a loop on CPU).
    detected = dataclasses.replace(CPU, loop_scan=jax.devices()[0].platform == "cpu")
    assert Hardware.detect(jnp.float32) == detected
    (path,) = tmp_path.glob("hardware-*float32*.json")
    assert read_entry(path) == CPU
    # A new process (an empty memory cache) reads the file instead of measuring.
    monkeypatch.setattr(_hardware, "_MEMORY", {})
    assert Hardware.detect(jnp.float32) == detected and len(measured) == 1
    # An unreadable entry is measured again.
    path.write_text("{not json")
    monkeypatch.setattr(_hardware, "_MEMORY", {})
    assert Hardware.detect(jnp.float32) == detected and len(measured) == 2
    assert read_entry(path) == CPU
    # float64 is its own entry.
    Hardware.detect(jnp.float64)
    assert len(list(tmp_path.glob("hardware-*float64*.json"))) == 1


def test_measure_is_plausible_and_works_under_jit():
    hw = _hardware.measure(jnp.float32)
    for value in (hw.step_latency, hw.call_latency):
        assert 0 < value < 1e-2
    for value in (hw.sequential_flops, hw.vector_flops):
        assert 1e6 <= value < 1e16
    seen = []

    @jax.jit
    def traced(x):
        seen.append(_hardware.measure(jnp.float32))
        return x + 1

    traced(jnp.ones(2))
    assert isinstance(seen[0], Hardware)


def test_concurrent_writers_never_leave_a_partial_file(tmp_path):
    path = tmp_path / "hardware-test.json"
    script = (
        "import sys\n"
        "from parassm.diagnostics._hardware import Hardware, write_entry\n"
        "import pathlib\n"
        "hw = Hardware(step_latency=1e-7, sequential_flops=1e9, call_latency=1e-6, "
        "vector_flops=float(sys.argv[2]), name='p' * 2000)\n"
        "for _ in range(200):\n"
        "    write_entry(pathlib.Path(sys.argv[1]), hw)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent), JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), str(v)], env=env)
        for v in (1e9, 2e9)
    ]
    errors = []

    def thread_writer():
        try:
            for _ in range(200):
                write_entry(path, CPU)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=thread_writer) for _ in range(2)]
    for t in threads:
        t.start()
    reads = 0
    while any(p.poll() is None for p in procs) or any(t.is_alive() for t in threads):
        if path.exists():
            entry = read_entry(path)
            assert entry is not None  # never a partial file
            reads += 1
    for t in threads:
        t.join()
    assert [p.wait() for p in procs] == [0, 0] and not errors
    assert reads > 0
    assert json.loads(path.read_text())["hardware"]["vector_flops"] in (1e9, 2e9, 4e10)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


def test_nothing_measured_at_import(tmp_path):
    env = dict(os.environ, PARASSM_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT.parent))
    code = "import parassm; parassm.Auto(); import parassm.diagnostics._hardware as h; "
    code += "assert not h._MEMORY"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert list(tmp_path.iterdir()) == []


# -- layering ----------------------------------------------------------------------------------


def _imports(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            out.add("." * node.level + (node.module or ""))
            out.update("." * node.level + (node.module or "") + "." + a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize(
    "package, forbidden",
    [("_solvers", ("diagnostics", "_auto", "_evaluate")), ("diagnostics", ("_auto", "_evaluate"))],
)
def test_imports_run_one_way(package, forbidden):
    for path in (ROOT / package).glob("*.py"):
        for name in _imports(path):
            parts = name.lstrip(".").split(".")
            assert not any(p in forbidden for p in parts), f"{path.name} imports {name}"


def test_scan_diagnoses_a_concrete_problem_once():
    f, s0, xs = _gru(jnp.float64)

    def step(carry, x):
        new = f(carry, x)
        return new, 2 * new

    auto = parassm.Auto(candidates=(CountingDEER(),), hardware=GPU_LIKE)
    final, ys = parassm.scan(step, s0, xs, solver=auto)
    assert len(auto_module._DECISIONS) == 1 and CALLS == ["DEER"]
    np.testing.assert_allclose(ys, 2 * sequential(f, s0, xs), atol=1e-8)
    parassm.scan(step, s0, 0.5 * xs, solver=auto)  # same signature: no new diagnosis
    assert len(auto_module._DECISIONS) == 1
