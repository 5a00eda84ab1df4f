"""The `parassm` command: the JAX-free front end (help, usage errors, exit codes), the
budgeted solver runs, `parassm diagnose` (flags, JSON, --check, --plot, --model) and
`parassm demo`."""

import dataclasses
import inspect
import io
import json
import pathlib
import subprocess
import sys
import time
import tomllib

import jax.numpy as jnp
import numpy as np
import parassm
import pytest
from parassm._cli import _commands, _front as front, _runner
from parassm.systems._registry import REGISTRY

from .helpers import sequential
from .test_docs import assert_same_keys, documented_json


ROOT = pathlib.Path(__file__).resolve().parent.parent
ARGS = ["diagnose", "--system", "logistic", "--T", "64"]
SCHEMA_KEYS = {
    "schema",
    "inputs",
    "T",
    "state_size",
    "dt",
    "lle",
    "overshoot",
    "bounds",
    "regime",
    "predicted_steps",
    "proxy",
    "recommendation",
    "check",
    "timings",
    "jax_version",
    "backend",
    "device",
}


def run(capsys, argv):
    code = front.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        front.main(argv)
    out, err = capsys.readouterr()
    assert out == ""
    return info.value.code, err


# -- The front end: no JAX before the command line is checked -------------------------------


FRONT_END_ONLY = """
import contextlib, io, json, sys
from parassm._cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit as e:
            codes.append(e.code)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "equinox",
                                                             "jaxtyping", "numpy"))
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_help_and_usage_errors_import_no_jax(tmp_path):
    model = tmp_path / "model.py"
    model.write_text("import jax\n\ndef make(T=10, *, a=1.0):\n    return None\n")
    argvs = [
        ["--help"],
        ["diagnose", "--help"],
        ["demo", "--help"],
        ["demo", "--T", "0"],
        ["demo", "--T", "-3"],
        ["diagnose", "--system", "lorenz"],
        ["diagnose", "--system", "mean_field", "--param", "g=abc"],
        ["diagnose", "--system", "gru", "--plot", str(tmp_path / "nodir" / "x.png")],
        ["diagnose", "--model", str(model)],
        ["diagnose", "--model", f"{model}:nope"],
        ["diagnose", "--model", f"{model}:make", "--param", "b=1"],
    ]
    proc = subprocess.run(
        [sys.executable, "-c", FRONT_END_ONLY, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["codes"] == [0, 0, 0] + [2] * (len(argvs) - 3)
    assert report["heavy"] == []  # the model file was read, not imported


def test_console_script_is_the_front_end():
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["scripts"]["parassm"] == "parassm._cli:main"


def test_help_lists_every_system_and_parameter(capsys):
    with pytest.raises(SystemExit) as info:
        front.main(["diagnose", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name, entry in REGISTRY.items():
        assert f"\n  {name} " in out
        for key in entry.params:
            assert f"{key}=" in out
    assert "exit status" in out and "--budget" in out and "T, dtype and key" in out


def test_registry_describes_each_constructor():
    registry = parassm.systems.SYSTEMS
    assert list(registry) == list(REGISTRY)
    for name, cls in registry.items():
        assert cls.name == name and REGISTRY[name].summary
        params = REGISTRY[name].params
        signature = inspect.signature(cls.__init__).parameters
        expected = {k: p.default for k, p in signature.items() if k not in ("self", "dtype", "key")}
        assert list(params) == list(expected), name
        for key, param in params.items():
            default = expected[key]
            assert param.default == default and type(param.default) is type(default), (name, key)
            # The default passes the CLI's own check, and builds the system.
            assert front.check_system_param(name, key, default, param) == default
        parassm.systems.get(name, **{k: p.default for k, p in params.items()})


# -- Usage errors: exit 2, one line, the subcommand's usage, before any work ------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["diagnose"], "one of the arguments --system --model is required"),
        (["diagnose", "--system", "nosuch"], "unknown system 'nosuch'"),
        (["diagnose", "--system", "lorenz"], "did you mean lorenz63?"),
        (ARGS + ["--param", "r"], "--param expects KEY=VALUE"),
        (ARGS + ["--param", "q=1"], "has no parameter q"),
        (ARGS + ["--param", "r=1", "--param", "r=2"], "given twice"),
        (["diagnose", "--system", "mean_field", "--param", "g=abc"], "g is a number, got 'abc'"),
        (["diagnose", "--system", "gru", "--param", "hidden_size=2.5"], "is a positive integer"),
        (["diagnose", "--system", "gru", "--param", "hidden_size=0"], "is a positive integer"),
        (["diagnose", "--system", "lorenz63", "--param", "integrator=rk5"], "one of euler, rk4"),
        (["diagnose", "--system", "henon", "--param", "s0=1"], "2 numbers"),
        (ARGS[:3] + ["--T", "0"], "--T: expected a positive integer, got 0"),
        (ARGS[:3] + ["--T", "-3"], "--T: expected a positive integer, got -3"),
        (ARGS + ["--proxy-length", "0"], "--proxy-length: expected a positive integer"),
        (ARGS + ["--budget", "0"], "--budget: expected a positive number of seconds"),
        (ARGS + ["--dtype", "int8"], "invalid choice"),
        (ARGS + ["--plot", "x"], "cannot tell the image format"),
        (ARGS + ["--plot", "nodir/x.png"], "folder 'nodir' does not exist"),
        (["diagnose", "--system", "gru", "--model", "m.py:f"], "not allowed with"),
        (["demo", "--T", "0"], "--T: expected a positive integer, got 0"),
        (["demo", "--T", "-3"], "--T: expected a positive integer, got -3"),
        (["demo", "--hidden", "x"], "--hidden: expected a positive integer, got 'x'"),
        (["demo", "--repeats", "-1"], "--repeats: expected an integer >= 0"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    code, err = usage_error(capsys, argv)
    assert code == 2
    assert message in err
    assert f"usage: parassm {argv[0]}" in err  # the subcommand's usage, not the top level's
    assert err.strip().splitlines()[-1].startswith(f"parassm {argv[0]}: error: ")


def test_plot_without_matplotlib(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, err = usage_error(capsys, ARGS + ["--plot", str(tmp_path / "x.png")])
    assert code == 2 and "needs matplotlib" in err


MODEL = """
import jax.numpy as jnp
import parassm

CALLS = []

def tuple_factory(a=0.5):
    return (lambda s, x: jnp.tanh(a * s + x)), jnp.array(0.0), jnp.linspace(-1.0, 1.0, 64)

def settings_factory(T, *, dtype, key, a=0.5):
    CALLS.append((T, dtype))
    xs = 0.1 * parassm.systems.TanhRNN().inputs(T, key).astype(dtype)
    return (lambda s, x: jnp.tanh(a * s + x)), jnp.zeros((), dtype), xs

def system_factory():
    return parassm.systems.Logistic(r=4.0)

def cycle_of_three():
    return parassm.systems.Logistic(r=3.83, x0=0.3)

def needs_b(b):
    return None

def wrong():
    return 3

def wrong_length(T=10):
    return (lambda s, x: s), jnp.array(0.0), jnp.zeros(T + 1)

def bad_shape():
    return (lambda s, x: jnp.ones(3)), jnp.zeros(2), jnp.zeros((64, 2))

def broken():
    raise RuntimeError("boom")

not_callable = 5
"""


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    return str(path)


@pytest.mark.parametrize(
    "spec, extra, message",
    [
        ("{tmp}/missing.py:f", [], "file not found"),
        ("{model}", [], "expects PATH.py:FACTORY"),
        ("{model}:", [], "expects PATH.py:FACTORY"),
        ("{model}:nope", [], "has no function 'nope'"),
        ("{model}:not_callable", [], "is not a function"),
        ("{model}:tuple_factory", ["--param", "q=1"], "has no parameter 'q'"),
        ("{model}:tuple_factory", ["--param", "T=1"], "use --T"),
        ("{model}:needs_b", [], "needs a value for 'b'"),
        ("{tmp}/syntax.py:f", [], "is not valid Python"),
    ],
)
def test_model_usage_errors(capsys, model, tmp_path, spec, extra, message):
    (tmp_path / "syntax.py").write_text("def f(:\n")
    code, err = usage_error(
        capsys, ["diagnose", "--model", spec.format(model=model, tmp=tmp_path)] + extra
    )
    assert code == 2 and message in err
    assert "usage: parassm diagnose" in err


# -- Failures of the computation: exit 1, one line -----------------------------------------


@pytest.mark.parametrize(
    "spec, extra, message",
    [
        ("{model}:wrong", [], "must return (f, s0, xs) or a system object"),
        ("{model}:bad_shape", [], "the model does not fit"),
        ("{model}:tuple_factory", ["--T", "100"], "shape mismatch: --T 100"),
        ("{model}:wrong_length", ["--T", "10"], "was given T=10 but its xs has 11 steps"),
        ("{model}:broken", [], "RuntimeError: boom"),
    ],
)
def test_model_failures_are_one_line(capsys, model, spec, extra, message):
    code, out, err = run(capsys, ["diagnose", "--model", spec.format(model=model)] + extra)
    assert code == 1 and out == ""
    assert message in err
    assert err.strip().splitlines()[-1].startswith("parassm diagnose: error: ")
    assert "Traceback" not in err and "usage:" not in err


def test_failure_inside_the_work_is_one_line(capsys, monkeypatch):
    def fail(args, start):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setitem(_commands.COMMANDS, "diagnose", fail)
    code, out, err = run(capsys, ARGS)
    assert code == 1 and out == ""
    assert err.strip() == "parassm diagnose: error: RuntimeError: first line"


def test_interrupt_exits_130(capsys, monkeypatch):
    def interrupted(args, start):
        raise KeyboardInterrupt

    monkeypatch.setitem(_commands.COMMANDS, "demo", interrupted)
    code, _, err = run(capsys, ["demo"])
    assert code == 130 and "interrupted" in err


# -- Budgeted runs --------------------------------------------------------------------------


def _contraction():
    def f(s, x):
        return jnp.tanh(0.5 * s + x)

    return f, jnp.zeros(3), jnp.linspace(-1.0, 1.0, 120 * 3).reshape(120, 3)


def test_chunked_run_takes_the_steps_of_one_call():
    f, s0, xs = _contraction()
    direct = parassm.evaluate(f, s0, xs=xs, solver=parassm.Jacobi())
    steps = int(direct.stats["num_steps"])
    assert steps > 8  # the run below needs several chunks
    progress = _runner.Progress("test", stream=io.StringIO())
    compiled = _runner.compile_solver(
        "Jacobi", parassm.Jacobi(), f, s0, xs, 120, progress=progress, chunk=3
    )
    outcome = _runner.run_compiled(
        compiled, deadline=time.perf_counter() + 600, repeats=2, progress=progress
    )
    assert outcome.status == "ok" and outcome.steps == steps
    assert outcome.timed_runs == 2
    np.testing.assert_allclose(outcome.value, direct.value, rtol=0, atol=1e-12)


def test_budget_stops_cleanly_and_resumes():
    f, s0, xs = _contraction()
    steps = int(parassm.evaluate(f, s0, xs=xs, solver=parassm.Jacobi()).stats["num_steps"])
    progress = _runner.Progress("test", stream=io.StringIO())
    compiled = _runner.compile_solver(
        "Jacobi", parassm.Jacobi(), f, s0, xs, 120, progress=progress, chunk=3
    )
    # A deadline already passed: one chunk runs, then the run stops with what it has.
    stopped = _runner.run_compiled(
        compiled, deadline=time.perf_counter(), repeats=3, progress=progress
    )
    assert stopped.status == "stopped" and stopped.steps == 3
    assert stopped.converged < 120 and stopped.timed_runs == 0
    assert f"with {stopped.converged}/120 states converged" in stopped.note()
    assert "x the tolerance" in stopped.note()
    assert "more steps" not in stopped.note()  # too few steps to extrapolate a crawl
    assert "predicted 9 steps in all" in stopped.note(predicted=9)
    reference = sequential(f, s0, xs)
    k = stopped.converged
    np.testing.assert_allclose(stopped.value[:k], reference[:k], rtol=0, atol=1e-10)
    resumed = _runner.run_compiled(
        compiled,
        deadline=time.perf_counter() + 600,
        repeats=0,
        progress=progress,
        resume=stopped,
    )
    assert resumed.status == "ok" and resumed.steps == steps
    np.testing.assert_allclose(resumed.value, reference, rtol=0, atol=1e-10)


def test_a_solver_that_raises_is_a_failed_row_not_a_crash():
    f, s0, xs = _contraction()
    stream = io.StringIO()
    compiled, failed = _runner.compile_each(
        {"Jacobi": parassm.Jacobi(), "bad": "not a solver"},
        f,
        s0,
        xs,
        120,
        progress=lambda name: _runner.Progress("test", stream=stream),
    )
    assert [c.name for c in compiled] == ["Jacobi"]
    assert failed["bad"].status == "failed" and "TypeError" in failed["bad"].result

    def out_of_memory(xs, init):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory\nmore")

    broken = dataclasses.replace(compiled[0], program=out_of_memory)
    outcome = _runner.run_compiled(
        broken,
        deadline=time.perf_counter() + 60,
        repeats=0,
        progress=_runner.Progress("test", stream=stream),
    )
    assert outcome.status == "failed" and outcome.run_s is None
    assert outcome.result == "RuntimeError: RESOURCE_EXHAUSTED: out of memory"
    assert "Jacobi: failed: RuntimeError" in stream.getvalue()


def _outcome(name, status, run_s, steps=3):
    return _runner.Outcome(name, status, "", steps, 0, 100, 1.0, run_s, run_s, 1)


def test_stopped_note_extrapolates_a_crawl():
    crawl = dataclasses.replace(_outcome("Picard", "stopped", 2.0, steps=200), converged=50)
    assert "if it keeps converging 0.25 states per step, about 200 more steps" in crawl.note()


def test_demo_verdict_names_the_fastest():
    outcomes = [
        _outcome("Sequential", "ok", 0.001),
        _outcome("DEER", "ok", 0.5),
        _outcome("Jacobi", "ok", 0.2),
        _outcome("Picard", "stopped", 0.01),
    ]
    verdict = _commands._verdict(outcomes, ref_run=0.001, length=100)
    assert (
        verdict.startswith("use parassm.Sequential() (lax.scan)") and "Jacobi, took 200x" in verdict
    )
    verdict = _commands._verdict(outcomes, ref_run=1.0, length=100)
    assert verdict.startswith("use parassm.Jacobi()") and "5x faster" in verdict
    verdict = _commands._verdict(outcomes[:1] + outcomes[3:], ref_run=1.0, length=100)
    assert "no parallel solver finished" in verdict


# -- parassm diagnose -----------------------------------------------------------------------


def test_json_schema(capsys):
    code, out, err = run(capsys, ARGS + ["--param", "r=4.0", "--json"])
    assert code == 0
    report = json.loads(out)  # stdout is exactly one JSON object
    assert set(report) == SCHEMA_KEYS
    assert report["schema"] == "parassm.diagnose/1"
    assert report["inputs"]["params"] == {"r": 4.0} and report["inputs"]["T"] == 64
    assert report["inputs"]["dtype"] == "float64" and report["inputs"]["seed"] == 0
    assert abs(report["lle"]["per_step"] - 0.693) < 0.05
    assert report["regime"] == "unpredictable"
    assert set(report["predicted_steps"]) == {"DEER", "QuasiDEER", "ELK", "Picard", "Jacobi"}
    assert all(1 <= v <= 64 for v in report["predicted_steps"].values())
    assert report["recommendation"]["solver"] == "Sequential"
    assert set(report["recommendation"]) == {
        "solver",
        "costs",
        "hardware",
        "multiple_shooting_chunk",
        "multiple_shooting_steps",
    }
    assert report["recommendation"]["multiple_shooting_chunk"] is None  # chaotic
    assert set(report["bounds"]) >= {"neg_log_mu_lower", "neg_log_mu_upper", "window"}
    assert report["timings"]["diagnose_s"] > 0 and report["check"] is None
    assert "parassm diagnose: logistic" in err  # progress goes to stderr
    bounds = json.dumps(report["bounds"])
    assert "-0.0," not in bounds and "-0.0}" not in bounds


def test_table_explains_its_numbers(capsys):
    code, out, err = run(capsys, ARGS + ["--param", "r=2.8", "--seed", "3", "--dtype", "float32"])
    assert code == 0
    assert "largest Lyapunov exponent" in out and "perturbations shrink by a factor" in out
    assert "regime" in out and "predictable" in out
    assert "recommended" in out and "DEER" in out and "float32" in out
    assert "extrapolated from a trial on the first" in out
    assert "overshoot" not in out and "log mu" not in out  # unexplained figures: --verbose
    code, out, _ = run(capsys, ARGS + ["--param", "r=2.8", "--verbose"])
    assert "overshoot" in out and "sigma_min bounds" in out and "trial steps" in out


def test_check_measures_what_evaluate_measures(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "d.png"
    code, out, err = run(
        capsys, ARGS + ["--param", "r=2.8", "--check", "--json", "--plot", str(png)]
    )
    assert code == 0
    report = json.loads(out)
    check = report["check"]
    assert set(check) == {"Sequential", "DEER", "QuasiDEER", "Picard", "Jacobi"}  # not ELK
    logistic = parassm.systems.Logistic(r=2.8)
    for name, solver in [("DEER", parassm.DEER()), ("Jacobi", parassm.Jacobi())]:
        sol = parassm.evaluate(logistic.f, logistic.s0, 64, solver=solver)
        assert check[name]["status"] == "ok" and check[name]["success"]
        assert check[name]["measured_steps"] == int(sol.stats["num_steps"])
        assert check[name]["max_err"] < 1e-9
    # The diagnosis of this contracting map predicts DEER's steps to within a factor 2.
    measured, predicted = check["DEER"]["measured_steps"], report["predicted_steps"]["DEER"]
    assert measured / 2 <= predicted <= 2 * measured
    assert "--check: predicted steps" in err and "estimated run time" in err
    documented = documented_json("docs/diagnostics.md")["check"]
    assert_same_keys(documented, check, "check")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_check_within_a_tiny_budget_stops_with_what_it_has(capsys):
    code, out, err = run(
        capsys,
        ARGS + ["--check", "--budget", "1e-3"],
    )
    assert code == 0
    assert "stopped" in out and "states converged" in out


def test_model_factories_receive_the_settings(capsys, model):
    code, out, err = run(
        capsys,
        ["diagnose", "--model", f"{model}:settings_factory", "--T", "50", "--dtype", "float32"]
        + ["--param", "a=0.5", "--json"],
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["T"] == 50 and report["inputs"]["dtype"] == "float32"
    assert report["regime"] == "predictable"
    module = sys.modules["_parassm_model_model"]
    assert module.CALLS == [(50, jnp.float32)]
    # A factory without a T parameter: --T takes the first T steps of its inputs.
    code, out, err = run(capsys, ["diagnose", "--model", f"{model}:tuple_factory", "--T", "10"])
    assert code == 0 and "T=10," in out and "using the first 10 of the 64 steps" in err
    code, out, _ = run(capsys, ["diagnose", "--model", f"{model}:system_factory", "--T", "64"])
    assert code == 0 and "unpredictable" in out


def test_the_documented_model_file_runs(capsys):
    path = ROOT / "docs" / "examples" / "model_file.py"
    code, out, err = run(
        capsys,
        ["diagnose", "--model", f"{path}:make", "--T", "300", "--param", "gain=0.9", "--json"],
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["T"] == 300 and report["state_size"] == 8
    assert report["lle"]["per_step"] < 0


def test_module_entry_point_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "parassm", "diagnose", "--system", "tent", "--T", "32", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert abs(report["lle"]["per_step"] - 0.6418538861723947) < 1e-9  # ln 1.9
    assert "parassm diagnose" in proc.stderr


# -- parassm demo ---------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_json(capsys):
    code, out, err = run(capsys, ["demo", "--T", "64", "--repeats", "1", "--json"])
    assert code == 0
    report = json.loads(out)
    assert [r["solver"] for r in report["rows"]] == list(_commands.DEMO_SOLVERS)
    for row in report["rows"]:
        assert row["status"] in ("ok", "stopped")
        if row["status"] == "ok":
            assert row["max_err"] < 1e-3 and row["ratio"] > 0
    assert report["verdict"].startswith("use parassm.")
    names = list(_commands.DEMO_SOLVERS)
    n = len(names)
    assert f"parassm demo [{n}/{n}]: {names[-1]}: compiling" in err


@pytest.mark.slow
def test_demo_table_marks_stopped_solvers(capsys):
    code, out, err = run(capsys, ["demo", "--T", "2000", "--budget", "1"])
    assert code == 0
    assert "stopped" in out and "Verdict: use" in out.strip().splitlines()[-1]


def test_a_crawl_gets_a_chunk_and_its_trial(capsys, model):
    # Contracting but crawling (the 3-cycle of the logistic map at r = 3.83, through its
    # long transient; was the damped pendulum, on which DEER no longer crawls): the
    # report gives a chunk for multiple shooting and the coarse iterations its own
    # trial predicts; the table says so.
    args = ["diagnose", "--model", f"{model}:cycle_of_three", "--T", "2000"]
    code, out, err = run(capsys, args + ["--json"])
    assert code == 0, err
    rec = json.loads(out)["recommendation"]
    assert rec["multiple_shooting_chunk"] == parassm.MultipleShooting().chunk(2000)
    assert 1 <= rec["multiple_shooting_steps"] <= 8
    assert "MultipleShooting" in rec["costs"]
    code, out, err = run(capsys, args)
    assert code == 0, err
    chunk = rec["multiple_shooting_chunk"]
    assert f"parassm.MultipleShooting(chunk_length={chunk})" in out
    assert f"its trial predicts {rec['multiple_shooting_steps']} iterations" in out
