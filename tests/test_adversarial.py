"""Adversarial inputs, as a demanding user would try them.

The contract under test: a result marked successful is right (checked against
`lax.scan`), and everything else is a clear `RESULTS` code or an error that names the
argument and the remedy. Every case is small and bounded (`T <= 60`, `max_steps <= T`),
so none can hang. Behaviour is asserted, not Newton step counts (the solvers'
globalisation may change).
"""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import parassm
import pytest

from .helpers import CPU, sequential


R = parassm.RESULTS


def contract(x, a=0.5):
    return jnp.tanh(a * x)


def tanh_step(s, x):
    return jnp.tanh(0.5 * s + x)


def linear_step(s, x):
    return 0.5 * s + x


def decay_step(s, x):
    return 0.5 * s


def _tol(dtype):
    return {
        jnp.float64: 1e-9,
        jnp.float32: 1e-4,
        jnp.float16: 2e-2,
        jnp.bfloat16: 5e-2,
    }[jnp.dtype(dtype).type]


def assert_right(sol, f, s0, xs=None, length=None, tol=None):
    """Successful, and the trajectory of `lax.scan` (in float64) to `tol`."""
    assert sol.result == R.successful
    up = lambda t: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), t)  # noqa: E731

    def f64(s, x):
        dtypes = jax.tree_util.tree_map(lambda a: a.dtype, s0)
        low = jax.tree_util.tree_map(lambda a, d: a.astype(d), s, dtypes)
        return up(f(low, x))

    expected = sequential(f64, up(s0), xs, length)
    leaves = jax.tree_util.tree_leaves(sol.value)
    tol = _tol(leaves[0].dtype) if tol is None else tol
    for got, want in zip(leaves, jax.tree_util.tree_leaves(expected)):
        assert got.shape == want.shape
        scale = max(1.0, float(jnp.max(jnp.abs(want))))
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol * scale, rtol=0)


# -- Trace-time errors: each names the argument and what to do --------------------------------

s0_2 = jnp.zeros(2)


def _rnn(cell=None, **kw):
    cell = eqx.nn.LSTMCell(3, 4, key=jax.random.key(0)) if cell is None else cell
    return parassm.nn.ParallelRNN(cell, solver=parassm.DEER(), **kw)


class NoSize(eqx.Module):
    def __call__(self, x, h):
        return jnp.tanh(h + x)


ERRORS = {
    # The number of steps.
    "T zero": (lambda: parassm.evaluate(decay_step, s0_2, 0), ValueError, "at least 1"),
    "T negative": (lambda: parassm.evaluate(decay_step, s0_2, -3), ValueError, "at least 1"),
    "T float": (lambda: parassm.evaluate(decay_step, s0_2, 3.0), TypeError, "`T` must be"),
    "T bool": (lambda: parassm.evaluate(decay_step, s0_2, True), TypeError, "`T` must be"),
    "T float array": (
        lambda: parassm.evaluate(decay_step, s0_2, jnp.array(3.0)),
        TypeError,
        "`T` must be an integer.*float",
    ),
    "no T": (lambda: parassm.evaluate(decay_step, s0_2), ValueError, "pass `T`"),
    "T disagrees": (
        lambda: parassm.evaluate(linear_step, s0_2, 5, xs=jnp.ones((4, 2))),
        ValueError,
        "T=5.*4 time steps",
    ),
    # Inputs.
    "xs scalar leaf": (
        lambda: parassm.evaluate(linear_step, jnp.array(0.0), xs=jnp.array(1.0)),
        ValueError,
        "leading time axis",
    ),
    "xs lengths": (
        lambda: parassm.evaluate(lambda s, x: s, jnp.array(0.0), xs=(jnp.ones(3), jnp.ones(4))),
        ValueError,
        "different lengths",
    ),
    # The state.
    "s0 int": (
        lambda: parassm.evaluate(lambda s, x: s, jnp.ones(2, jnp.int32), 3, solver=parassm.DEER()),
        TypeError,
        r"s0 has dtype int32.*astype",
    ),
    "s0 int leaf": (
        lambda: parassm.evaluate(
            lambda s, x: s, {"a": jnp.ones(2), "n": jnp.array(1)}, 3, solver=parassm.DEER()
        ),
        TypeError,
        r"s0\['n'\] has dtype",
    ),
    "s0 complex": (
        lambda: parassm.evaluate(
            lambda s, x: s, jnp.ones(2, jnp.complex64), 3, solver=parassm.DEER()
        ),
        TypeError,
        "complex64.*floating-point",
    ),
    "s0 mixed dtypes": (
        lambda: parassm.evaluate(
            lambda s, x: s, (jnp.ones(2), jnp.ones(2, jnp.float32)), 3, solver=parassm.DEER()
        ),
        TypeError,
        "different dtypes",
    ),
    "s0 no leaves": (lambda: parassm.evaluate(lambda s, x: s, (), 3), ValueError, "no array"),
    "s0 empty": (
        lambda: parassm.evaluate(lambda s, x: s, jnp.zeros((0,)), 3, solver=parassm.DEER()),
        ValueError,
        "empty",
    ),
    # The step function.
    "f shape": (
        lambda: parassm.evaluate(lambda s, x: jnp.ones(3), s0_2, 3),
        ValueError,
        r"shape \(3,\).*shape \(2,\)",
    ),
    "f structure": (
        lambda: parassm.evaluate(lambda s, x: (s, s), s0_2, 3),
        ValueError,
        "structure",
    ),
    "f dtype": (
        lambda: parassm.evaluate(lambda s, x: s.astype(jnp.float32), s0_2, 3),
        TypeError,
        "dtype float32.*cast",
    ),
    # Guesses and budgets.
    "init shape": (
        lambda: parassm.evaluate(decay_step, s0_2, 4, init=jnp.ones((3, 2))),
        ValueError,
        r"init.*\(4, 2\)",
    ),
    "init structure": (
        lambda: parassm.evaluate(decay_step, s0_2, 4, init=(jnp.ones((4, 2)),)),
        ValueError,
        "`init` has PyTree structure",
    ),
    "max_steps negative": (
        lambda: parassm.evaluate(decay_step, s0_2, 4, max_steps=-1),
        ValueError,
        "max_steps",
    ),
    "max_steps float": (
        lambda: parassm.evaluate(decay_step, s0_2, 4, max_steps=2.0),
        ValueError,
        "max_steps",
    ),
    "max_steps bool": (
        lambda: parassm.evaluate(decay_step, s0_2, 4, max_steps=True),
        ValueError,
        "max_steps",
    ),
    "solver string": (
        lambda: parassm.evaluate(decay_step, s0_2, 4, solver="DEER"),
        TypeError,
        "parassm solver",
    ),
    "adjoint string": (
        lambda: parassm.evaluate(decay_step, s0_2, 4, adjoint="implicit"),
        TypeError,
        "parassm adjoint",
    ),
    "unrolled + window": (
        lambda: parassm.evaluate(
            decay_step,
            s0_2,
            4,
            solver=parassm.SlidingWindow(parassm.DEER(), 2),
            adjoint=parassm.UnrolledAdjoint(),
        ),
        TypeError,
        "ImplicitAdjoint",
    ),
    "scan reverse": (
        lambda: parassm.scan(lambda c, x: (c, x), s0_2, jnp.ones((3, 2)), reverse="yes"),
        TypeError,
        "reverse",
    ),
    # Solver and adjoint settings.
    "rtol zero": (lambda: parassm.DEER(rtol=0.0), ValueError, "rtol"),
    "rtol nan": (lambda: parassm.QuasiDEER(rtol=float("nan")), ValueError, "rtol"),
    "atol negative": (lambda: parassm.ELK(atol=-1.0), ValueError, "atol"),
    "DEER trust region": (
        lambda: parassm.DEER(search=parassm.TrustRegion()),
        TypeError,
        "search",
    ),
    "Hutchinson samples": (
        lambda: parassm.HutchinsonDiagonal(num_samples=0),
        ValueError,
        "num_samples",
    ),
    "block size": (
        lambda: parassm.evaluate(decay_step, jnp.zeros(4), 3, solver=parassm.BlockQuasiDEER(3)),
        ValueError,
        "multiple of the block size",
    ),
    "window zero": (
        lambda: parassm.SlidingWindow(parassm.DEER(), 0),
        ValueError,
        "window",
    ),
    "window sequential": (
        lambda: parassm.SlidingWindow(parassm.Sequential(), 4),
        TypeError,
        "parallel solver",
    ),
    "QuasiScan rtol": (lambda: parassm.QuasiScan(rtol=-1.0), ValueError, "rtol"),
    "QuasiScan max_steps": (lambda: parassm.QuasiScan(max_steps=-1), ValueError, "max_steps"),
    "QuasiScan fallback": (
        lambda: parassm.QuasiScan(fallback=parassm.QuasiScan()),
        TypeError,
        "exact solver",
    ),
    "Auto candidate name": (lambda: parassm.Auto(candidates=("DEER",)), TypeError, "instance"),
    "Auto no candidates": (lambda: parassm.Auto(candidates=()), TypeError, "non-empty"),
    # diagnose.
    "diagnose T zero": (
        lambda: parassm.diagnose(lambda s, x: s, s0_2, 0),
        ValueError,
        "at least 1",
    ),
    "diagnose lle_steps": (
        lambda: parassm.diagnose(lambda s, x: contract(s), s0_2, 8, lle_steps=0),
        ValueError,
        "lle_steps",
    ),
    "diagnose window": (
        lambda: parassm.diagnose(lambda s, x: contract(s), s0_2, 8, window=0),
        ValueError,
        "window",
    ),
    "diagnose dt": (
        lambda: parassm.diagnose(lambda s, x: contract(s), s0_2, 8, dt=0.0),
        ValueError,
        "dt",
    ),
    "diagnose proxy": (
        lambda: parassm.diagnose(lambda s, x: contract(s), s0_2, 8, proxy_length=0),
        ValueError,
        "proxy_length",
    ),
    "diagnose int s0": (
        lambda: parassm.diagnose(lambda s, x: s, jnp.ones(2, jnp.int32), 8),
        TypeError,
        "astype",
    ),
    "diagnose solver": (
        lambda: parassm.diagnose(lambda s, x: s, s0_2, 8, solvers=("Newton",)),
        ValueError,
        "Unknown solver",
    ),
    # ParallelRNN misuse.
    "rnn cell": (lambda: parassm.nn.ParallelRNN(None), TypeError, "cell"),
    "rnn reverse": (lambda: _rnn(reverse="yes"), TypeError, "reverse"),
    "rnn batch": (lambda: _rnn()(jnp.ones((2, 5, 3))), ValueError, r"jax.vmap\(rnn\)"),
    "rnn input size": (lambda: _rnn()(jnp.ones((5, 4))), ValueError, r"shape \(T, 3\)"),
    "rnn no time axis": (lambda: _rnn()(jnp.ones(3)), ValueError, r"shape \(T, 3\)"),
    "rnn state shape": (
        lambda: _rnn()(jnp.ones((5, 3)), jnp.zeros(4)),
        ValueError,
        "`state` has shapes",
    ),
    "rnn no hidden_size": (
        lambda: _rnn(NoSize())(jnp.ones((5, 2))),
        ValueError,
        "Pass `state=`",
    ),
    "rnn solver": (
        lambda: parassm.nn.ParallelRNN(NoSize(), solver="DEER")(jnp.ones((5, 2)), jnp.zeros(2)),
        TypeError,
        "parassm solver",
    ),
    "rnn max_steps": (
        lambda: parassm.nn.ParallelRNN(NoSize(), max_steps=-2)(jnp.ones((5, 2)), jnp.zeros(2)),
        ValueError,
        "max_steps",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_clear_error(case):
    fn, error, message = ERRORS[case]
    with pytest.raises(error, match=message):
        fn()


def test_f_returning_a_python_scalar():
    # Either outcome is right: a clear error naming `f`, or (since a Python float is a
    # fine scalar state) the right trajectory.
    f = lambda s, x: 1.0  # noqa: E731
    try:
        sol = parassm.evaluate(f, jnp.array(0.0), 4, solver=parassm.DEER())
    except (TypeError, ValueError) as e:
        assert "`f`" in str(e)
    else:
        assert_right(sol, lambda s, x: jnp.ones_like(s), jnp.array(0.0), length=4)


# -- Shapes, dtypes and pytrees: successful means right ---------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, solver",
    [
        ((), jnp.float64, parassm.DEER()),
        ((1,), jnp.float32, parassm.QuasiDEER()),
        ((2, 3), jnp.float64, parassm.DEER()),
        ((3,), jnp.float16, parassm.DEER()),
        ((3,), jnp.bfloat16, parassm.QuasiDEER()),
    ],
    ids=["scalar", "one-f32", "matrix", "float16", "bfloat16"],
)
def test_shapes_and_dtypes(shape, dtype, solver):
    s0 = jnp.full(shape, 0.2, dtype)
    xs = (0.5 * jnp.sin(jnp.arange(20 * max(1, np.prod(shape))))).reshape((20,) + shape)
    xs = xs.astype(dtype)
    sol = parassm.evaluate(tanh_step, s0, xs=xs, solver=solver, throw=False)
    assert sol.value.dtype == dtype and sol.value.shape == (20,) + shape
    assert_right(sol, tanh_step, s0, xs)


def test_pytree_state_and_inputs_with_integer_leaves():
    def f(state, x):
        h = jnp.tanh(0.5 * state["h"] + x["u"] * x["k"].astype(jnp.float64))
        return {"h": h, "pair": (0.9 * state["pair"][0] + jnp.sum(h), state["pair"][1])}

    s0 = {"h": jnp.zeros(3), "pair": (jnp.array(0.1), jnp.ones((2, 2)))}
    xs = {"u": jnp.cos(jnp.arange(30.0)).reshape(10, 3), "k": jnp.arange(10) % 3}
    sol = parassm.evaluate(f, s0, xs=xs, solver=parassm.DEER())
    assert_right(sol, f, s0, xs)
    # Gradients flow to the floating-point inputs; integer ones are left alone.
    loss = lambda u: jnp.sum(  # noqa: E731
        parassm.evaluate(f, s0, xs=dict(xs, u=u), solver=parassm.DEER()).value["h"] ** 2
    )
    ref = lambda u: jnp.sum(sequential(f, s0, dict(xs, u=u))["h"] ** 2)  # noqa: E731
    np.testing.assert_allclose(jax.grad(loss)(xs["u"]), jax.grad(ref)(xs["u"]), rtol=1e-8)


# -- NaN, Inf and overflow: reported, never masked --------------------------------------------


def _nan_at(k, T=12, value=jnp.nan):
    return jnp.linspace(-1.0, 1.0, T).at[k].set(value)


@pytest.mark.parametrize(
    "case, solver",
    [
        ("nan-input", parassm.DEER()),
        ("inf-input", parassm.Jacobi()),
        ("nan-input", parassm.SlidingWindow(parassm.QuasiDEER(), 4)),
        ("nan-s0", parassm.DEER()),
        ("overflow-f32", parassm.DEER()),
        pytest.param("overflow-f32", parassm.QuasiDEER(), marks=pytest.mark.slow),
    ],
    ids=lambda x: x if isinstance(x, str) else type(x).__name__,
)
def test_nonfinite_is_reported(case, solver):
    if case == "nan-input":
        f, s0, xs, T, bad = linear_step, jnp.array(0.0), _nan_at(5), None, 5
    elif case == "inf-input":
        f, s0, xs, T, bad = linear_step, jnp.array(0.0), _nan_at(5, value=jnp.inf), None, 5
    elif case == "nan-s0":
        f, s0, xs, T, bad = (lambda s, x: 0.5 * s), jnp.array([jnp.nan, 1.0]), None, 6, 0
    else:  # 10^t overflows float32 at t = 39
        f, s0, xs, T, bad = (lambda s, x: 10 * s), jnp.ones(1, jnp.float32), None, 50, 38
    sol = parassm.evaluate(f, s0, T, xs=xs, solver=solver, throw=False)
    assert sol.result == R.nonfinite
    expected = sequential(f, s0, xs, T)
    np.testing.assert_allclose(sol.value[:bad], expected[:bad], rtol=1e-6)
    assert not bool(jnp.any(jnp.isfinite(sol.value[bad])))
    if case == "nan-input" and isinstance(solver, parassm.DEER):  # one compilation
        with pytest.raises(eqx.EquinoxRuntimeError, match="not finite"):
            parassm.evaluate(f, s0, T, xs=xs, solver=solver)


# -- Hard step functions: domains, discontinuities, identity, constants -----------------------


HARD = {
    # NaN outside its domain, and the guess starts outside it.
    "sqrt domain": (lambda s, x: 0.5 * jnp.sqrt(s) + x, jnp.array(1.0), jnp.full(30, 0.1), -5.0),
    "log domain": (lambda s, x: jnp.log(s) + 2.0 + 0 * x, jnp.array(1.0), jnp.ones(30), None),
    # Discontinuous: the Jacobian knows nothing of the jumps.
    "jump": (
        lambda s, x: jnp.where(s > 0, 0.5 * s - 1, 0.5 * s + 1) + x,
        jnp.array(0.3),
        jnp.sin(jnp.arange(40.0)),
        None,
    ),
    "round": (
        lambda s, x: jnp.round(0.9 * s + x),
        jnp.array(0.3),
        3 * jnp.sin(jnp.arange(40.0)),
        None,
    ),
    # Identity, constant and zero maps, and a random walk (eigenvalue exactly 1).
    "identity": (lambda s, x: s, jnp.array([0.3, -2.0]), jnp.ones((20, 2)), None),
    "constant": (lambda s, x: jnp.full_like(s, 7.0), jnp.zeros(2), jnp.ones((20, 2)), None),
    "zero": (lambda s, x: jnp.zeros_like(s), jnp.ones(2), jnp.ones((20, 2)), None),
    "random walk": (
        lambda s, x: s + x,
        jnp.zeros(2),
        jnp.cos(jnp.arange(40.0)).reshape(20, 2),
        None,
    ),
}


@pytest.mark.parametrize(
    "case, solver",
    [
        pytest.param(case, solver, id=f"{case}-{type(solver).__name__}")
        for case in HARD
        for solver in (parassm.DEER(), parassm.QuasiDEER())
        if case in ("jump", "round") or isinstance(solver, parassm.DEER)
    ]
    + [
        pytest.param(case, parassm.QuasiDEER(), id=f"{case}-QuasiDEER", marks=pytest.mark.slow)
        for case in HARD
        if case not in ("jump", "round")
    ],
)
def test_hard_step_functions(case, solver):
    f, s0, xs, guess = HARD[case]
    init = None if guess is None else jnp.full((xs.shape[0],) + s0.shape, guess)
    sol = parassm.evaluate(f, s0, xs=xs, solver=solver, init=init, throw=False)
    assert_right(sol, f, s0, xs)
    if case == "identity":  # the default guess is already the answer
        assert int(sol.stats["num_steps"]) == 0


@pytest.mark.parametrize("guess", [1e300, jnp.inf, jnp.nan, -1e10], ids=str)
def test_bad_guesses(guess):
    xs = jnp.ones((20, 2))
    init = jnp.full((20, 2), guess)
    sol = parassm.evaluate(tanh_step, jnp.zeros(2), xs=xs, solver=parassm.DEER(), init=init)
    assert_right(sol, tanh_step, jnp.zeros(2), xs)


# -- Spectra: eigenvalues 1 +- 1e-4, non-normal growth ----------------------------------------


def _rotation(rate):
    c, s = np.cos(0.3), np.sin(0.3)
    return rate * np.array([[c, -s], [s, c]])


@eqx.filter_jit
def _spectra(A, a, xs, s0):
    """Values by DEER, QuasiDEER and `lax.scan`, and gradients by DEER and `lax.scan`,
    of `s_t = A s_{t-1} + a tanh(x_t + 0.1 s_{t-1})` (one compilation per dtype)."""

    def run(a, solver):
        f = lambda s, x: A @ s + a * jnp.tanh(x + 0.1 * s)  # noqa: E731
        if solver is None:
            return sequential(f, s0, xs)
        return parassm.evaluate(f, s0, xs=xs, solver=solver).value

    def grad(solver):
        return jax.grad(lambda a: jnp.sum(run(a, solver) ** 2))(a)

    values = run(a, None), run(a, parassm.DEER()), run(a, parassm.QuasiDEER())
    return values, (grad(None), grad(parassm.DEER()))


@pytest.mark.parametrize(
    "A, dtype",
    [
        (_rotation(1 + 1e-4), jnp.float64),
        (_rotation(1 - 1e-4), jnp.float64),
        (np.array([[0.5, 100.0], [0.0, 0.5]]), jnp.float64),
        (np.array([[0.5, 100.0], [0.0, 0.5]]), jnp.float32),
    ],
    ids=["1+1e-4", "1-1e-4", "non-normal", "non-normal-f32"],
)
def test_spectra_values_and_gradients(A, dtype):
    xs = (0.1 * jnp.cos(jnp.arange(120.0))).reshape(60, 2).astype(dtype)
    s0 = jnp.array([0.1, 0.2], dtype)
    (expected, deer, quasi), (g_ref, g) = _spectra(
        jnp.asarray(A, dtype), jnp.asarray(1.0, dtype), xs, s0
    )
    scale = float(jnp.max(jnp.abs(expected)))
    for got in (deer, quasi):
        np.testing.assert_allclose(got, expected, atol=10 * _tol(dtype) * scale)
    np.testing.assert_allclose(g, g_ref, rtol=10 * _tol(dtype))


# -- max_steps 0 and 1 -------------------------------------------------------------------------


def test_max_steps_zero_and_one():
    system = parassm.systems.Logistic(r=3.7, x0=0.3)
    T = 30
    expected = sequential(system.f, system.s0, length=T)
    solver = parassm.DEER()
    zero = parassm.evaluate(system.f, system.s0, T, solver=solver, max_steps=0, throw=False)
    assert zero.result == R.max_steps_reached
    assert int(zero.stats["num_steps"]) == 0
    np.testing.assert_array_equal(zero.value, jnp.full(T, system.s0))  # the guess
    # The exact guess: nothing to do, successful after zero iterations.
    warm = parassm.evaluate(system.f, system.s0, T, solver=solver, max_steps=0, init=expected)
    assert warm.result == R.successful
    one = parassm.evaluate(system.f, system.s0, T, solver=solver, max_steps=1, throw=False)
    assert one.result == R.max_steps_reached
    assert int(one.stats["converged_prefix"]) >= 1  # causality
    np.testing.assert_allclose(one.value[0], expected[0], rtol=1e-12)
    with pytest.raises(eqx.EquinoxRuntimeError, match="max_steps"):
        parassm.evaluate(system.f, system.s0, T, solver=solver, max_steps=1)
    # A linear recurrence: one DEER iteration is exact.
    xs = jnp.sin(jnp.arange(float(T)))
    lin = parassm.evaluate(linear_step, jnp.array(1.0), xs=xs, solver=solver, max_steps=1)
    assert_right(lin, linear_step, jnp.array(1.0), xs)


# -- vmap with one bad element; gradients of failed solves -------------------------------------


def _batch():
    xs = jnp.stack([jnp.linspace(-1.0, 1.0, 12)] * 3)
    return xs.at[1, 5].set(jnp.nan)


def test_vmap_one_bad_element():
    xs = _batch()

    def run(xs, throw=False):
        return parassm.evaluate(
            linear_step, jnp.array(0.0), xs=xs, solver=parassm.DEER(), throw=throw
        )

    sols = jax.vmap(run)(xs)
    assert (sols.result == R.successful).tolist() == [True, False, True]
    assert (sols.result == R.nonfinite).tolist() == [False, True, False]
    for i in (0, 2):
        np.testing.assert_allclose(sols.value[i], sequential(linear_step, jnp.array(0.0), xs[i]))
    with pytest.raises(eqx.EquinoxRuntimeError, match="not finite"):
        jax.vmap(lambda x: run(x, throw=True).value)(xs)


def test_gradients_of_failed_solves():
    xs = _batch()

    def loss(a, xs, throw, adjoint=parassm.ImplicitAdjoint()):
        f = lambda s, x: jnp.tanh(a * s + x)  # noqa: E731
        sol = parassm.evaluate(
            f, jnp.array(0.0), xs=xs, solver=parassm.DEER(), throw=throw, adjoint=adjoint
        )
        ok = sol.result == R.successful
        return jnp.where(ok, jnp.sum(sol.value**2), 0.0), ok

    def ref(a, xs):
        return jnp.sum(sequential(lambda s, x: jnp.tanh(a * s + x), jnp.array(0.0), xs) ** 2)

    a = jnp.array(0.7)
    # Masked by the result code: the good elements' gradients are right.
    grads, ok = jax.vmap(jax.grad(loss, has_aux=True), in_axes=(None, 0, None))(a, xs, False)
    assert ok.tolist() == [True, False, True]
    for i in (0, 2):
        np.testing.assert_allclose(grads[i], jax.grad(ref)(a, xs[i]), rtol=1e-9)
    # Unmasked, the gradient of a non-finite trajectory is not a finite number (as with
    # `lax.scan`), and with `throw=True` the solve raises.
    g = jax.grad(
        lambda a: jnp.sum(
            parassm.evaluate(
                lambda s, x: jnp.tanh(a * s + x),
                jnp.array(0.0),
                xs=xs[1],
                solver=parassm.DEER(),
                throw=False,
            ).value
            ** 2
        )
    )(a)
    assert not bool(jnp.isfinite(g))
    with pytest.raises(eqx.EquinoxRuntimeError, match="not finite"):
        jax.grad(lambda a: loss(a, xs[1], True)[0])(a)
    # A truncated solve (max_steps_reached) under the implicit adjoint: the code says so.
    system = parassm.systems.Logistic(r=3.9)
    sol = parassm.evaluate(
        system.f, system.s0, 40, solver=parassm.Jacobi(), max_steps=2, throw=False
    )
    assert sol.result == R.max_steps_reached


# -- diagnose on tiny problems -----------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 3])
def test_diagnose_tiny(T):
    d = parassm.diagnose(
        lambda s, x: contract(s, 0.8), jnp.array(0.5), T, solvers=("DEER",), hardware=CPU
    )
    assert 1 <= d.predicted_steps["DEER"] <= T
    assert isinstance(d.recommended, parassm.Sequential)
    json.dumps(d.to_dict(), allow_nan=False)
    assert d.regime in ("predictable", "marginal", "unpredictable")


def test_diagnose_nonfinite_trajectory_says_so():
    # The trajectory (s^2 + 1 from 2) overflows after ~10 steps: nothing to diagnose.
    with pytest.raises(ValueError, match="not finite"):
        parassm.diagnose(lambda s, x: s * s + 1.0, jnp.array(2.0), 64, hardware=CPU)


# -- Every bad command line exits 2 and names the argument -------------------------------------


CLI_BAD = [
    ([], "required"),
    (["run"], "invalid choice"),
    (["demo", "--T", "1.5"], "--T: expected a positive integer"),
    (["demo", "--hidden", "0"], "--hidden: expected a positive integer"),
    (["demo", "--dtype", "float16"], "invalid choice"),
    (["demo", "--budget", "nan"], "--budget: expected a positive number"),
    (["demo", "--budget", "inf"], "--budget: expected a positive number"),
    (["demo", "--budget", "-1"], "--budget: expected a positive number"),
    (["demo", "--repeats", "x"], "--repeats: expected an integer >= 0"),
    (["demo", "extra"], "unrecognized arguments"),
    (["diagnose", "--system", "logistic", "--seed", "x"], "--seed: invalid int value"),
    (["diagnose", "--system", "logistic", "--proxy-length", "-1"], "--proxy-length"),
    (["diagnose", "--system", "logistic", "--param", "=1"], "--param expects KEY=VALUE"),
    (["diagnose", "--system", "gru", "--param", "hidden_size=True"], "positive integer"),
    (["diagnose", "--system", "henon", "--param", "s0=(1, 'a')"], "2 numbers"),
    (["diagnose", "--system", "lorenz63", "--param", "dt=-0.01"], "positive number"),
    (["diagnose", "--model", "nofile.py:make"], "file not found"),
    (["diagnose", "--model", "nocolon"], "PATH.py:FACTORY"),
    (["diagnose", "--system", "logistic", "--plot", "."], "image format"),
]


def _usage_error(capsys, argv):
    from parassm._cli import _front as front

    with pytest.raises(SystemExit) as info:
        front.main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message", CLI_BAD, ids=lambda x: " ".join(x) if isinstance(x, list) else ""
)
def test_cli_bad_input(capsys, argv, message):
    code, err = _usage_error(capsys, argv)
    assert code == 2
    assert message in err


@pytest.mark.parametrize("system, key", [("logistic", "r"), ("lorenz63", "dt")])
def test_cli_non_finite_parameters(system, key):
    # `--param r=1e999` is `ast.literal_eval`'d to inf: a usage error, not a diagnosis.
    from parassm._cli import _front as front
    from parassm.systems._registry import REGISTRY

    value = front.parse_value("1e999")
    with pytest.raises(front.UsageError, match="finite"):
        front.check_system_param(system, key, value, REGISTRY[system].params[key])
