"""The `parassm diagnose` command: flags, JSON schema, exit codes and error messages."""

import json
import subprocess
import sys

import pytest
from parassm._cli import main


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
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    _, err = capsys.readouterr()
    return info.value.code, err


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
    assert set(report["bounds"]) >= {"neg_log_mu_lower", "neg_log_mu_upper", "window"}
    assert report["timings"]["diagnose_s"] > 0 and report["check"] is None
    assert "parassm diagnose: logistic" in err  # progress goes to stderr


def test_table_params_seed_dtype(capsys):
    code, out, err = run(capsys, ARGS + ["--param", "r=2.8", "--seed", "3", "--dtype", "float32"])
    assert code == 0
    assert "largest Lyapunov exponent" in out and "regime" in out
    assert "recommended" in out and "DEER" in out and "float32" in out
    assert not out.lstrip().startswith("{")


def test_check_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "d.png"
    code, out, _ = run(capsys, ARGS + ["--check", "--json", "--plot", str(png)])
    assert code == 0
    report = json.loads(out)
    check = report["check"]
    assert set(check) == {"Sequential", "DEER", "QuasiDEER", "Picard", "Jacobi"}
    for name in ("DEER", "Jacobi"):
        assert check[name]["success"]
        assert check[name]["predicted_steps"] == report["predicted_steps"][name]
        assert 1 <= check[name]["measured_steps"] <= 64
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run(capsys, ARGS + ["--plot", str(tmp_path / "x.png")])
    assert code == 1 and out == ""
    assert "needs matplotlib" in err and len(err.strip().splitlines()) == 1


MODEL = """
import jax.numpy as jnp
import parassm

def tuple_factory(a=0.5):
    return (lambda s, x: jnp.tanh(a * s + x)), jnp.array(0.0), jnp.linspace(-1.0, 1.0, 64)

def system_factory():
    return parassm.systems.Logistic(r=4.0)

def wrong():
    return 3

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


def test_model_factories(capsys, model):
    code, out, _ = run(
        capsys, ["diagnose", "--model", f"{model}:tuple_factory", "--param", "a=0.5", "--json"]
    )
    assert code == 0
    report = json.loads(out)
    assert report["T"] == 64 and report["lle"]["per_step"] < 0
    assert report["regime"] == "predictable"
    code, out, _ = run(capsys, ["diagnose", "--model", f"{model}:system_factory", "--T", "64"])
    assert code == 0 and "unpredictable" in out


@pytest.mark.parametrize(
    "spec, extra, message",
    [
        ("{tmp}/missing.py:f", [], "model file not found"),
        ("{model}:nope", [], "has no callable 'nope'"),
        ("{model}:not_callable", [], "has no callable 'not_callable'"),
        ("{model}", [], "expects path.py:factory"),
        ("{model}:wrong", [], "must return (f, s0, xs) or a system object"),
        ("{model}:bad_shape", [], "shape"),
        ("{model}:tuple_factory", ["--T", "10"], "shape mismatch: --T 10"),
        ("{model}:broken", [], "RuntimeError: boom"),
    ],
)
def test_model_errors_are_one_line(capsys, model, tmp_path, spec, extra, message):
    spec = spec.format(model=model, tmp=tmp_path)
    code, out, err = run(capsys, ["diagnose", "--model", spec] + extra)
    assert code == 1 and out == ""
    assert message in err
    assert len(err.strip().splitlines()) == 1 or "..." in err.splitlines()[0]
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["diagnose"], "one of the arguments --system --model is required"),
        (["diagnose", "--system", "nosuch"], "unknown system 'nosuch'"),
        (ARGS + ["--param", "r"], "--param expects key=value"),
        (ARGS + ["--param", "q=1"], "has no parameter q"),
        (ARGS + ["--T", "0"], "--T must be at least 1"),
        (ARGS + ["--dtype", "int8"], "invalid choice"),
        (["diagnose", "--system", "gru", "--model", "m.py:f"], "not allowed with"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    code, err = usage_error(capsys, argv)
    assert code == 2
    assert message in err


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
