"""Wrong or unclear answers a new user met (issue 33, part 3): each test failed before
its fix."""

import math

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import parassm
import pytest

from .helpers import tree_allclose


DTYPES = [jnp.float32, jnp.float64]


# --------------------------------------------------------------- non-finite tolerances


@pytest.mark.parametrize(
    "cls",
    [
        parassm.DEER,
        parassm.QuasiDEER,
        parassm.ELK,
        parassm.QuasiELK,
        parassm.Picard,
        parassm.Jacobi,
        parassm.BlockQuasiDEER,
        parassm.Auto,
        parassm.QuasiScan,
    ],
)
@pytest.mark.parametrize("name", ["rtol", "atol"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_tolerance_refused(cls, name, value):
    kwargs = dict(block_size=1) if cls is parassm.BlockQuasiDEER else {}
    with pytest.raises(ValueError, match=f"`{name}` must be a finite"):
        cls(**kwargs, **{name: value})


def test_infinite_tolerance_message_says_what_to_do():
    with pytest.raises(ValueError, match=r"rtol=1e-2"):
        parassm.DEER(rtol=float("inf"))


# ------------------------------------------------- Sequential's stats on a NaN at step 700


def _nan_at(step: int, dtype):
    def f(s, x):
        return jnp.where(x == step, jnp.asarray(jnp.nan, dtype), 0.5 * s + 0.01 * x)

    return f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("solver", [parassm.Sequential(), parassm.Auto()])
def test_sequential_nonfinite_stats(dtype, solver):
    xs = jnp.arange(1, 1001).astype(dtype)
    sol = parassm.evaluate(
        _nan_at(700, dtype), jnp.zeros((2,), dtype), xs=xs, solver=solver, throw=False
    )
    assert sol.result == parassm.RESULTS.nonfinite
    # s_700 is the first non-finite state: 699 steps are right.
    assert int(sol.stats["converged_prefix"]) == 699
    assert not float(sol.stats["residual"]) <= 1.0
    assert not float(sol.stats["max_abs_residual"]) <= 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_sequential_stats_under_vmap(dtype):
    xs = jnp.arange(1, 101).astype(dtype)
    steps = jnp.array([1000, 30])  # the first element never meets its NaN

    def solve(step):
        def f(s, x):
            return jnp.where(x == step.astype(dtype), jnp.asarray(jnp.nan, dtype), 0.5 * s + x)

        return parassm.evaluate(
            f, jnp.zeros((), dtype), xs=xs, solver=parassm.Sequential(), throw=False
        )

    sol = jax.vmap(solve)(steps)
    assert (sol.result == parassm.RESULTS.successful).tolist() == [True, False]
    assert (sol.result == parassm.RESULTS.nonfinite).tolist() == [False, True]
    assert sol.stats["converged_prefix"].tolist() == [100, 29]
    assert float(sol.stats["residual"][0]) == 0.0
    assert float(sol.stats["residual"][1]) == math.inf


# ------------------------------------------------ Lyapunov exponents of a zero Jacobian


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_lyapunov_zero_jacobian(dtype, method):
    def f(s, x):
        return jnp.zeros_like(s) + jnp.tanh(x)

    xs = jnp.linspace(-1.0, 1.0, 50, dtype=dtype)
    s0 = jnp.zeros((2,), dtype)
    exponents = parassm.diagnostics.lyapunov_exponents(f, s0, xs=xs, k=2, method=method)
    assert not jnp.any(jnp.isnan(exponents)), exponents
    assert jnp.all(exponents == -jnp.inf), exponents


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_lyapunov_rank_one_jacobian(dtype, method):
    scale = jnp.array([0.5, 0.0], dtype)

    def f(s, x):
        return scale * s + x

    xs = jnp.ones((50,), dtype)
    s0 = jnp.ones((2,), dtype)
    exponents = parassm.diagnostics.lyapunov_exponents(f, s0, xs=xs, k=2, method=method)
    assert jnp.isclose(exponents[0], math.log(0.5), rtol=1e-4)
    assert exponents[1] == -jnp.inf


# ----------------------------------------- user-supplied Jacobians of the wrong shape


def _tanh_step(s, x):
    return jnp.tanh(0.5 * s + x)


def my_diagonal(s, x):
    return (0.5 * (1 - jnp.tanh(0.5 * s + x) ** 2))[:2]


def my_jacobian(s, x):
    return 0.5 * (1 - jnp.tanh(0.5 * s + x) ** 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_function_diagonal_wrong_shape(dtype):
    solver = parassm.QuasiDEER(parassm.FunctionDiagonal(my_diagonal))
    xs = jnp.zeros((20, 3), dtype)
    with pytest.raises(ValueError, match=r"FunctionDiagonal.fn.*my_diagonal.*\(2,\).*\(3,\)"):
        parassm.evaluate(_tanh_step, jnp.zeros((3,), dtype), xs=xs, solver=solver)


@pytest.mark.parametrize("dtype", DTYPES)
def test_function_jacobian_wrong_shape(dtype):
    solver = parassm.DEER(parassm.FunctionJacobian(my_jacobian))
    xs = jnp.zeros((20, 3), dtype)
    with pytest.raises(ValueError, match=r"FunctionJacobian.fn.*my_jacobian.*\(3,\).*\(3, 3\)"):
        parassm.evaluate(_tanh_step, jnp.zeros((3,), dtype), xs=xs, solver=solver)


def test_function_diagonal_right_shape_still_works():
    def diagonal(s, x):
        return 0.5 * (1 - jnp.tanh(0.5 * s + x) ** 2)

    xs = jnp.linspace(-1.0, 1.0, 30)[:, None] * jnp.ones((1, 3))
    s0 = jnp.zeros((3,))
    sol = parassm.evaluate(
        _tanh_step, s0, xs=xs, solver=parassm.QuasiDEER(parassm.FunctionDiagonal(diagonal))
    )
    expected = parassm.evaluate(_tanh_step, s0, xs=xs, solver=parassm.Sequential()).value
    assert tree_allclose(sol.value, expected, rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------- T as a NumPy/JAX integer


@pytest.mark.parametrize("T", [np.int64(40), np.int32(40), jnp.array(40), np.array(40)])
@pytest.mark.parametrize("solver", [parassm.Sequential(), parassm.DEER()])
def test_concrete_integer_length(T, solver):
    def f(s, x):
        return 0.5 * s + 1.0

    s0 = jnp.zeros(())
    sol = parassm.evaluate(f, s0, T, solver=solver)
    assert sol.value.shape == (40,)
    expected = parassm.evaluate(f, s0, 40, solver=parassm.Sequential()).value
    assert tree_allclose(sol.value, expected, rtol=1e-10, atol=1e-12)
    carry, ys = parassm.scan(lambda c, x: (f(c, x), c), s0, length=T, solver=solver)
    assert ys.shape == (40,)


def test_traced_length_says_static():
    def f(s, x):
        return 0.5 * s + 1.0

    with pytest.raises(TypeError, match="static_argnums.*`xs`"):
        jax.jit(lambda T: parassm.evaluate(f, jnp.zeros(()), T).value)(40)
    with pytest.raises(TypeError, match="`length` is traced"):
        jax.jit(lambda T: parassm.scan(lambda c, x: (f(c, x), c), jnp.zeros(()), length=T))(40)


def test_static_length_under_jit():
    def f(s, x):
        return 0.5 * s + 1.0

    run = jax.jit(lambda T: parassm.evaluate(f, jnp.zeros(()), T).value, static_argnums=0)
    assert run(40).shape == (40,)


# ------------------------------------------- parassm.scan with an integer step counter


def _counting(c, x):
    i, s = c
    return (i + 1, 0.5 * s + x), s * i.astype(s.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_integer_carry_default_solver(dtype, reverse):
    init = (jnp.array(0), jnp.zeros((), dtype))
    xs = jnp.linspace(-1.0, 1.0, 30, dtype=dtype)
    expected = lax.scan(_counting, init, xs, reverse=reverse)
    got = parassm.scan(_counting, init, xs, reverse=reverse)
    assert tree_allclose(got, expected, rtol=0, atol=0)
    assert got[0][0].dtype == expected[0][0].dtype


def test_scan_integer_carry_under_vmap():
    init = (jnp.array(0), jnp.zeros(()))
    xs = jnp.linspace(-1.0, 1.0, 30)[None] * jnp.arange(1.0, 4.0)[:, None]
    expected = jax.vmap(lambda xs: lax.scan(_counting, init, xs))(xs)
    got = jax.vmap(lambda xs: parassm.scan(_counting, init, xs))(xs)
    assert tree_allclose(got, expected, rtol=0, atol=0)


def test_evaluate_integer_state_default_solver():
    def f(c, x):
        i, s = c
        return i + 1, 0.5 * s + x

    init = (jnp.array(0), jnp.zeros(()))
    xs = jnp.linspace(-1.0, 1.0, 30)
    sol = parassm.evaluate(f, init, xs=xs)
    assert sol.result == parassm.RESULTS.successful
    assert sol.value[0].tolist() == list(range(1, 31))
    assert int(sol.stats["solver"]) == 0


def test_complex_state_default_solver_is_sequential():
    def f(s, x):
        return (0.5 + 0.5j) * s + x.astype(jnp.complex64)

    s0 = jnp.ones((2,), jnp.complex64)
    xs = jnp.linspace(-1.0, 1.0, 30, dtype=jnp.float32)
    got = parassm.evaluate(f, s0, xs=xs)
    expected = lax.scan(lambda s, x: (f(s, x), f(s, x)), s0, xs)[1]
    assert tree_allclose(got.value, expected, rtol=0, atol=0)


def test_scan_integer_carry_parallel_solver_refused():
    init = (jnp.array(0), jnp.zeros(()))
    xs = jnp.linspace(-1.0, 1.0, 30)
    with pytest.raises(TypeError, match="floating-point"):
        parassm.scan(_counting, init, xs, solver=parassm.DEER())


def test_scan_integer_carry_auto_candidates_refused_only_when_explicit():
    init = (jnp.array(0), jnp.zeros(()))
    xs = jnp.linspace(-1.0, 1.0, 30)
    # Auto with explicit candidates is still Auto: it may fall back to Sequential.
    got = parassm.scan(_counting, init, xs, solver=parassm.Auto(candidates=(parassm.DEER(),)))
    assert tree_allclose(got, lax.scan(_counting, init, xs), rtol=0, atol=0)
