import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from parassm.diagnostics import Hardware as _Hardware


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8) -> bool:
    """True if two PyTrees have the same structure and all leaves are close."""
    if jtu.tree_structure(x) != jtu.tree_structure(y):
        return False
    return all(
        np.shape(a) == np.shape(b) and np.allclose(a, b, rtol=rtol, atol=atol)
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))
    )


def tree_max_abs_diff(x, y) -> float:
    return max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))
    )


def sequential(f, s0, xs=None, length=None):
    """The reference trajectory, by `jax.lax.scan`."""

    def step(s, x):
        s = f(s, x)
        return s, s

    return lax.scan(step, s0, xs, length=length)[1]


def finite_difference_jvp(fn, primals, tangents, eps=1e-6):
    """Central-difference JVP of `fn` at `primals` along `tangents` (float64)."""
    plus = jtu.tree_map(lambda p, t: p + eps * t, primals, tangents)
    minus = jtu.tree_map(lambda p, t: p - eps * t, primals, tangents)
    return jtu.tree_map(lambda a, b: (a - b) / (2 * eps), fn(*plus), fn(*minus))


def random_contraction(key, size, contraction, dtype):
    """A random matrix with spectral norm `contraction`."""
    W = jax.random.normal(key, (size, size), dtype)
    return contraction * W / jnp.linalg.norm(W, ord=2)


def linear_loop(matrices, b, init, reverse):
    """Reference for `parassm.linear.solve`: the recurrence one step at a time, with
    dense matrices, in NumPy."""
    matrices, b = np.asarray(matrices), np.asarray(b)  # one transfer, not one per step
    T, D = b.shape
    s = np.zeros(D) if init is None else np.asarray(init)
    out = np.zeros((T, D))
    for t in range(T - 1, -1, -1) if reverse else range(T):
        s = matrices[t] @ s + b[t]
        out[t] = s
    return out


def random_transitions(key, T, D, dtype):
    """One transition of every structure (`D` even), with random maps."""
    import parassm.linear as linear

    k1, k2, k3, k4 = jax.random.split(key, 4)
    return [
        linear.Dense(0.5 * jax.random.normal(k1, (T, D, D), dtype)),
        linear.Diagonal(jax.random.uniform(k2, (T, D), dtype, -1.2, 1.2)),
        linear.BlockDiagonal(0.5 * jax.random.normal(k3, (T, D // 2, 2, 2), dtype)),
        linear.Scalar(jax.random.uniform(k4, (T,), dtype, -1.0, 1.0)),
        linear.Scalar(jnp.ones((T,), dtype)),
        linear.Zero(T),
    ]


def scaled_residual(S, fs, rtol, atol):
    """The documented convergence test, written independently of the library (numpy):
    step `t` is converged when `|r_t|_inf <= atol + rtol * nu_t`, `nu_t` the largest
    `|f_t'|_inf`, `t' <= t`, over steps with `|r_t'|_inf <= atol + rtol |f_t'|_inf`.
    Returns `|r_t|_inf / (atol + rtol * nu_t)` per step (the test passes where <= 1)."""
    S = np.asarray(S, np.float64).reshape(len(S), -1)
    fs = np.asarray(fs, np.float64).reshape(len(fs), -1)
    r = np.max(np.abs(S - fs), axis=1)
    f = np.max(np.abs(fs), axis=1)
    accurate = r <= atol + rtol * f
    nu = np.maximum.accumulate(np.where(accurate, f, 0.0))
    tol = atol + rtol * np.maximum(f, nu)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r == 0, 0.0, r / tol)


# Fixed hardware models for tests that must not depend on this machine.
GPU_LIKE = _Hardware(
    step_latency=5e-6, sequential_flops=1e9, call_latency=5e-6, vector_flops=1e13, name="gpu-like"
)
CPU = _Hardware(
    step_latency=5e-8,
    sequential_flops=2e10,
    call_latency=5e-6,
    vector_flops=4e10,
    name="2-core cpu",
)


def pendulum(s, x):
    """One RK4 step (dt = 0.05) of the damped pendulum theta'' = -sin theta - theta' / 2:
    predictable (LLE about -0.011 per step) but weakly contracting, and from a guess
    constant in time DEER's iterates wind through the other equilibria."""
    h = 0.05

    def field(s):
        return jnp.stack([s[1], -jnp.sin(s[0]) - 0.5 * s[1]])

    k1 = field(s)
    k2 = field(s + 0.5 * h * k1)
    k3 = field(s + 0.5 * h * k2)
    k4 = field(s + h * k3)
    return s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
