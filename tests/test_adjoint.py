import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import parassm
import pytest

from .helpers import finite_difference_jvp, random_contraction, tree_allclose


SOLVERS = [
    parassm.DEER(),
    parassm.QuasiDEER(),
    parassm.BlockQuasiDEER(2),
    parassm.Picard(),
    parassm.Jacobi(),
    parassm.Sequential(),
]
LINEAR_SOLVERS = [parassm.DenseScan(), parassm.SequentialScan(), parassm.QuasiScan()]
IDS = lambda s: type(s).__name__  # noqa: E731


class Custom(eqx.Module):
    """A custom cell with a dict state and a closed-over scalar."""

    W: jax.Array
    U: jax.Array
    leak: jax.Array

    def __call__(self, x, state):
        h = jnp.tanh(self.W @ state["h"] + self.U @ x)
        return {"h": h, "m": self.leak * state["m"] + (1 - self.leak) * h}


def _cells(key, dtype=jnp.float64):
    """Cells and initial states, drawn in float64 and rounded to `dtype`."""
    k1, k2, k3, k4 = jr.split(key, 4)
    custom = Custom(
        random_contraction(k3, 4, 0.8, jnp.float64),
        jr.normal(k4, (4, 3), jnp.float64),
        jnp.array(0.7),
    )
    cells = {
        "gru": (eqx.nn.GRUCell(3, 4, key=k1), jnp.full(4, 0.1)),
        "lstm": (eqx.nn.LSTMCell(3, 2, key=k2), (jnp.full(2, 0.1), jnp.full(2, -0.2))),
        "custom": (custom, {"h": jnp.full(4, 0.1), "m": jnp.zeros(4)}),
    }
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, cells
    )


def _trajectory(cell, s0, xs, solver, adjoint=parassm.ImplicitAdjoint()):
    if solver is None:
        return lax.scan(lambda s, x: (cell(x, s),) * 2, s0, xs)[1]
    sol = parassm.evaluate(lambda s, x: cell(x, s), s0, xs=xs, solver=solver, adjoint=adjoint)
    return sol.value


def _loss(cell, s0, xs, solver, adjoint=parassm.ImplicitAdjoint()):
    traj = _trajectory(cell, s0, xs, solver, adjoint)
    weights = jnp.cos(jnp.arange(xs.shape[0], dtype=xs.dtype))
    return sum(
        jnp.sum(weights[:, None] * jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(traj)
    )


FLOAT32_DEFAULT = ("DEER", "QuasiDEER")


def _grad_cases():
    for name in ("gru", "lstm", "custom"):
        for solver in SOLVERS:
            yield pytest.param(name, solver, jnp.float64, id=f"{name}-{IDS(solver)}-float64")
            # float32, where the default tolerances are tuned: the main solvers by default.
            slow = () if IDS(solver) in FLOAT32_DEFAULT and name != "custom" else pytest.mark.slow
            yield pytest.param(
                name, solver, jnp.float32, id=f"{name}-{IDS(solver)}-float32", marks=slow
            )


@pytest.mark.parametrize("name, solver, dtype", list(_grad_cases()))
def test_grad_matches_lax_scan(name, solver, dtype):
    cell, s0 = _cells(jr.key(0), dtype)[name]
    xs = jr.normal(jr.key(1), (20, 3), jnp.float64).astype(dtype)

    # Parameters, initial state and inputs at once.
    @eqx.filter_jit
    @eqx.filter_grad
    def grad(args, solver):
        return _loss(*args, solver)

    got = grad((cell, s0, xs), solver)
    # The truth: the same (rounded) problem in float64, by `lax.scan`.
    up = lambda tree: jax.tree_util.tree_map(  # noqa: E731
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, tree
    )
    expected = grad(up((cell, s0, xs)), None)
    assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(got))
    if dtype == jnp.float64:
        assert tree_allclose(got, expected, rtol=1e-6, atol=1e-9)
    else:
        scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(expected))
        assert tree_allclose(up(got), expected, rtol=1e-3, atol=1e-4 * scale)


@pytest.mark.parametrize("linear_solver", LINEAR_SOLVERS, ids=IDS)
def test_adjoint_linear_solvers(linear_solver):
    cell, s0 = _cells(jr.key(2))["gru"]
    xs = jr.normal(jr.key(3), (50, 3), jnp.float64)
    adjoint = parassm.ImplicitAdjoint(linear_solver)
    grad = jax.grad(_loss, argnums=(0, 1, 2))
    expected = grad(cell, s0, xs, None)
    got = grad(cell, s0, xs, parassm.QuasiDEER(), adjoint)
    assert tree_allclose(got, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("linear_solver", LINEAR_SOLVERS, ids=IDS)
def test_forward_mode_matches_finite_differences(linear_solver):
    cell, s0 = _cells(jr.key(4))["custom"]
    xs = jr.normal(jr.key(5), (25, 3), jnp.float64)
    t_xs = jr.normal(jr.key(6), xs.shape, jnp.float64)
    t_s0 = jax.tree_util.tree_map(lambda x: jnp.ones_like(x), s0)
    adjoint = parassm.ImplicitAdjoint(linear_solver)

    def traj(s0, xs):
        return _trajectory(cell, s0, xs, parassm.DEER(), adjoint)

    _, tangent = jax.jvp(traj, (s0, xs), (t_s0, t_xs))
    expected = finite_difference_jvp(traj, (s0, xs), (t_s0, t_xs))
    assert tree_allclose(tangent, expected, rtol=1e-6, atol=1e-7)


def test_jacfwd_through_closed_over_parameter():
    cell, s0 = _cells(jr.key(4))["custom"]
    xs = jr.normal(jr.key(5), (25, 3), jnp.float64)

    def of_leak(leak):
        return _trajectory(eqx.tree_at(lambda c: c.leak, cell, leak), s0, xs, parassm.DEER())["m"]

    fd = (of_leak(cell.leak + 1e-6) - of_leak(cell.leak - 1e-6)) / 2e-6
    np.testing.assert_allclose(jax.jacfwd(of_leak)(cell.leak), fd, rtol=1e-6, atol=1e-8)


def test_closure_over_arrays():
    W = jnp.array([[0.5, 0.1], [-0.2, 0.4]])
    xs = jnp.outer(jnp.linspace(0.0, 1.0, 40), jnp.ones(2))

    def loss(W, solver):
        f = lambda s, x: jnp.tanh(W @ s + x)  # noqa: E731
        if solver is None:
            traj = lax.scan(lambda s, x: (f(s, x),) * 2, jnp.zeros(2), xs)[1]
        else:
            traj = parassm.evaluate(f, jnp.zeros(2), xs=xs, solver=solver).value
        return jnp.sum(traj**3)

    expected = jax.grad(loss)(W, None)
    np.testing.assert_allclose(jax.grad(loss)(W, parassm.DEER()), expected, rtol=1e-8)
    np.testing.assert_allclose(
        jax.jit(jax.grad(loss), static_argnums=1)(W, parassm.QuasiDEER()), expected, rtol=1e-8
    )


def test_throw_false_vmap_grad():
    xs = jnp.linspace(-1.0, 1.0, 60)

    def loss(a):
        sol = parassm.evaluate(
            lambda s, x: jnp.tanh(a * s + x),
            jnp.array(0.0),
            xs=xs,
            solver=parassm.DEER(),
            throw=False,
        )
        ok = sol.result == parassm.RESULTS.successful
        return jnp.sum(sol.value**2), ok

    def loss_ref(a):
        traj = lax.scan(lambda s, x: (jnp.tanh(a * s + x),) * 2, jnp.array(0.0), xs)[1]
        return jnp.sum(traj**2)

    a = jnp.array([0.3, 0.9, 1.5])
    grads, ok = jax.vmap(jax.grad(loss, has_aux=True))(a)
    assert ok.tolist() == [True, True, True]
    np.testing.assert_allclose(grads, jax.vmap(jax.grad(loss_ref))(a), rtol=1e-7)


def _residual_bytes(contraction, max_steps=None):
    D, T = 6, 64
    W = random_contraction(jr.key(7), D, contraction, jnp.float64)
    xs = jr.normal(jr.key(8), (T, D), jnp.float64)

    def loss(W):
        sol = parassm.evaluate(
            lambda s, x: jnp.tanh(W @ s + x),
            jnp.zeros(D),
            xs=xs,
            solver=parassm.QuasiDEER(),
            max_steps=max_steps,
        )
        return jnp.sum(sol.value**2), sol.stats["num_steps"]

    out, vjp_fn, steps = jax.vjp(loss, W, has_aux=True)
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(vjp_fn) if hasattr(x, "nbytes"))
    return nbytes, int(steps), T, D


def test_backward_memory_independent_of_newton_steps():
    few = _residual_bytes(0.2)
    many = _residual_bytes(0.99)
    assert many[1] > 2 * few[1]  # really more Newton iterations...
    assert many[0] == few[0]  # ...but exactly the same saved residuals
    _, _, T, D = few
    # Residuals are O(T D^2) (dense Jacobians at the solution), not O(steps T D).
    assert few[0] <= 16 * T * D * (D + 8) * 8


def test_unrolled_adjoint():
    cell, s0 = _cells(jr.key(9))["gru"]
    xs = jr.normal(jr.key(10), (30, 3), jnp.float64)
    unrolled = parassm.UnrolledAdjoint()
    grad = eqx.filter_grad(_loss)
    # Converged: the derivative of the iterates is the derivative of the trajectory.
    assert tree_allclose(
        grad(cell, s0, xs, parassm.DEER(), unrolled), grad(cell, s0, xs, None), rtol=1e-6, atol=1e-9
    )

    # Truncated after two iterations: the unrolled gradient is the derivative of what was
    # returned (finite differences agree); the implicit one is not.
    def truncated(shift, adjoint):
        c = eqx.tree_at(lambda c: c.bias, cell, cell.bias + shift)
        sol = parassm.evaluate(
            lambda s, x: c(x, s),
            s0,
            xs=xs,
            solver=parassm.QuasiDEER(),
            adjoint=adjoint,
            max_steps=2,
            throw=False,
        )
        return jnp.sum(sol.value**2)

    zero = jnp.zeros_like(cell.bias)
    e = zero.at[3].set(1e-6)
    fd = (truncated(e, unrolled) - truncated(-e, unrolled)) / 2e-6
    g_unrolled = jax.grad(truncated)(zero, unrolled)[3]
    g_implicit = jax.grad(truncated)(zero, parassm.ImplicitAdjoint())[3]
    np.testing.assert_allclose(g_unrolled, fd, rtol=1e-6)
    assert abs(g_implicit - fd) > 1e-3 * abs(fd)
    with pytest.raises(TypeError, match="ImplicitAdjoint"):
        parassm.evaluate(
            lambda s, x: s,
            jnp.ones(2),
            3,
            solver=parassm.SlidingWindow(parassm.DEER(), 2),
            adjoint=unrolled,
        )


def _expanding_diagonal(T, blocks, dtype):
    """A stable linear-plus-small recurrence whose Jacobian has eigenvalues about 0.5 and
    0 but diagonal about (1.5, -1): a diagonal scan grows like 1.5^T. `blocks` copies
    of the 2 x 2 system make the state `2 * blocks` long."""
    A = jnp.kron(jnp.eye(blocks, dtype=dtype), jnp.array([[1.5, 1.5], [-1.0, -1.0]], dtype))
    xs = jnp.sin(jnp.arange(T * 2 * blocks, dtype=dtype)).reshape(T, 2 * blocks)

    def traj(a, linear_solver):
        def f(s, x):
            return A @ s + a * x + jnp.asarray(0.01, dtype) * jnp.sin(s) ** 2

        s0 = jnp.zeros(2 * blocks, dtype)
        if linear_solver is None:
            return lax.scan(lambda s, x: (f(s, x),) * 2, s0, xs)[1]
        adjoint = parassm.ImplicitAdjoint(linear_solver)
        return parassm.evaluate(f, s0, xs=xs, solver=parassm.DEER(), adjoint=adjoint).value

    return traj


@pytest.mark.parametrize(
    "dtype, T",
    [pytest.param(jnp.float64, 60, marks=pytest.mark.slow), (jnp.float32, 240)],
    ids=["float64", "float32-overflow"],
)
def test_quasi_scan_expanding_diagonal_is_right(dtype, T):
    # Reported: QuasiScan returned NaN here (its stopping test `max|r| > bound` is False
    # for NaN; the diagonal scan overflows float32 at T = 240). Now the iteration is
    # stopped and the exact fallback gives the gradient.
    traj = _expanding_diagonal(T, 1, dtype)
    a = jnp.asarray(1.0, dtype)

    def grads(ls):
        loss = lambda a: jnp.sum(traj(a, ls) ** 2)  # noqa: E731
        return jax.grad(loss)(a), jax.jvp(loss, (a,), (jnp.ones_like(a),))[1]

    expected = jax.jit(lambda: grads(None))()
    tol = 1e-9 if dtype == jnp.float64 else 1e-4
    got = jax.jit(lambda: grads(parassm.QuasiScan()))()
    np.testing.assert_allclose(got, expected, rtol=tol)
    with pytest.raises(eqx.EquinoxRuntimeError, match="did not converge.*SequentialScan"):
        eqx.filter_jit(lambda: grads(parassm.QuasiScan(fallback=None)))()


def test_quasi_scan_default_above_64_components_and_vmap():
    # At D = 66 QuasiScan is the default; it used to raise "did not converge" on this
    # stable system. Under vmap one element (c = 1) needs the fallback (without it, an
    # error) and the other (c = 0.1, where the diagonal iteration converges) does not.
    A = jnp.kron(jnp.eye(33), jnp.array([[1.5, 1.5], [-1.0, -1.0]]))
    xs = jnp.sin(jnp.arange(30 * 66, dtype=jnp.float64)).reshape(30, 66)

    def loss(c, adjoint):
        f = lambda s, x: c * (A @ s) + x + 0.01 * jnp.sin(s) ** 2  # noqa: E731
        if adjoint is None:
            traj = lax.scan(lambda s, x: (f(s, x),) * 2, jnp.zeros(66), xs)[1]
        else:
            traj = parassm.evaluate(
                f, jnp.zeros(66), xs=xs, solver=parassm.DEER(), adjoint=adjoint
            ).value
        return jnp.sum(traj**2)

    cs = jnp.array([0.1, 1.0])
    grad = eqx.filter_jit(jax.vmap(jax.grad(loss), in_axes=(0, None)))
    np.testing.assert_allclose(grad(cs, parassm.ImplicitAdjoint()), grad(cs, None), rtol=1e-9)
    no_fallback = parassm.ImplicitAdjoint(parassm.QuasiScan(fallback=None))
    with pytest.raises(eqx.EquinoxRuntimeError, match="did not converge"):
        grad(cs, no_fallback)


def test_quasi_scan_tolerance_bounds_the_error():
    """The documented bound: with every `|J_t|_inf <= rho < 1`, the tangent's error is at
    most about `rtol * max|u| / (1 - rho)`. The test is per step and relative, so it
    holds for tangents of any size (here 1e-6 and 1e6)."""
    D, T = 8, 80
    W = random_contraction(jr.key(11), D, 0.3, jnp.float64)
    xs = jr.normal(jr.key(12), (T, D), jnp.float64)
    s0 = jnp.zeros(D)

    def f(s, x):
        return jnp.tanh(W @ s + x)

    traj = parassm.evaluate(f, s0, xs=xs, solver=parassm.DEER()).value
    prev = jnp.concatenate([s0[None], traj[:-1]])
    J = jax.vmap(jax.jacfwd(f))(prev, xs)
    rho = float(jnp.max(jnp.sum(jnp.abs(J), axis=-1)))
    assert rho < 1

    @eqx.filter_jit
    def tangent(linear_solver, t_xs):
        adjoint = parassm.ImplicitAdjoint(linear_solver)
        run = lambda x: parassm.evaluate(f, s0, xs=x, solver=parassm.DEER(), adjoint=adjoint).value  # noqa: E731
        return jax.jvp(run, (xs,), (t_xs,))[1]

    for size in (1e-6, 1e6):
        t_xs = size * jnp.cos(xs)
        exact = tangent(parassm.SequentialScan(), t_xs)
        rtol = 1e-3
        got = tangent(parassm.QuasiScan(rtol=rtol), t_xs)
        err = float(jnp.max(jnp.abs(got - exact)))
        bound = rtol * float(jnp.max(jnp.abs(exact))) / (1 - rho)
        assert err <= bound, (size, err, bound)
        # ... and the tolerance is what stopped it (the error is not far below).
        assert err > 1e-3 * bound


@pytest.mark.default_scan
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_default_adjoint_takes_one_jvp_per_step_where_scans_are_sequential(dtype):
    # On the CPU's default scan from 17 components the implicit adjoint's default is
    # the sequential solve (one JVP / VJP per step, no Jacobian formed), as DEER's own
    # corrections; elsewhere the dense one up to 64 components. Gradients through a GRU
    # of 20 units are those of `lax.scan`, in both dtypes.
    from parassm._adjoint import default_linear_solver

    assert isinstance(default_linear_solver(20), parassm.SequentialScan)
    assert isinstance(default_linear_solver(16), parassm.DenseScan)
    with parassm.linear.scan_impl("xla"):
        assert isinstance(default_linear_solver(20), parassm.DenseScan)
        assert isinstance(default_linear_solver(65), parassm.QuasiScan)
    with jax.enable_x64(dtype == jnp.float64):
        cell = eqx.nn.GRUCell(3, 20, dtype=dtype, key=jr.key(0))
        xs = jr.normal(jr.key(1), (200, 3), dtype)
        s0 = jnp.zeros(20, dtype)

        def loss(cell, parallel):
            def f(h, x):
                return cell(x, h)

            if parallel:
                hs = parassm.evaluate(f, s0, xs=xs, solver=parassm.DEER()).value
            else:
                hs = lax.scan(lambda h, x: (f(h, x),) * 2, s0, xs)[1]
            return jnp.sum(jnp.sin(hs))

        got = eqx.filter_grad(lambda c: loss(c, True))(cell)
        want = eqx.filter_grad(lambda c: loss(c, False))(cell)
        rtol = 1e-4 if dtype == jnp.float32 else 1e-9
        assert tree_allclose(got, want, rtol=rtol, atol=rtol)
