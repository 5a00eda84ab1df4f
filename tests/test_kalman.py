"""The parallel Kalman filter / RTS smoother against a sequential one and against a direct
dense solve of the same least-squares problem."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import parassm
import pytest
from parassm._linear._kalman import _inverse, smoothed_means


# Jitted once per shape: eager associative scans dispatch op by op and are slow.
kalman_filter = eqx.filter_jit(parassm.linear.kalman_filter)
kalman_smoother = eqx.filter_jit(parassm.linear.kalman_smoother)


def _spd(key, T, D, scale):
    L = np.asarray(jr.normal(key, (T, D, D)))
    return scale * (L @ np.swapaxes(L, -1, -2) / D + 0.3 * np.eye(D))


def _problem(seed, T, D, diagonal):
    kf, ku, kq, ky, kr, km, kp = jr.split(jr.key(seed), 7)
    if diagonal:
        F = np.asarray(jr.uniform(kf, (T, D), minval=-1.3, maxval=1.3))
        Q = np.asarray(jr.uniform(kq, (T, D), minval=0.1, maxval=2.0))
        R = np.asarray(jr.uniform(kr, (T, D), minval=0.1, maxval=2.0))
        P0 = np.asarray(jr.uniform(kp, (D,), minval=0.0, maxval=1.0))
        dense = (F[..., None] * np.eye(D), Q[..., None] * np.eye(D), R[..., None] * np.eye(D))
        dense = dense + (P0 * np.eye(D),)
    else:
        F = 1.2 * np.asarray(jr.normal(kf, (T, D, D))) / np.sqrt(D)
        Q = _spd(kq, T, D, 1.0)
        R = _spd(kr, T, D, 0.5)
        P0 = _spd(kp, 1, D, 0.5)[0]
        dense = (F, Q, R, P0)
    u = np.asarray(jr.normal(ku, (T, D)))
    y = np.asarray(jr.normal(ky, (T, D)))
    m0 = np.asarray(jr.normal(km, (D,)))
    return (F, u, Q, y, R, m0, P0), dense


def _sequential(F, u, Q, y, R, m0, P0):
    """Textbook Kalman filter and RTS smoother, one step at a time (dense, numpy)."""
    T, D = u.shape
    m, P = m0, P0
    mf, Pf = [], []
    for t in range(T):
        mp = F[t] @ m + u[t]
        Pp = F[t] @ P @ F[t].T + Q[t]
        K = Pp @ np.linalg.inv(Pp + R[t])
        m = mp + K @ (y[t] - mp)
        P = (np.eye(D) - K) @ Pp
        mf.append(m)
        Pf.append(P)
    ms, Ps = [mf[-1]], [Pf[-1]]
    for t in range(T - 2, -1, -1):
        Pp = F[t + 1] @ Pf[t] @ F[t + 1].T + Q[t + 1]
        G = Pf[t] @ F[t + 1].T @ np.linalg.inv(Pp)
        ms.insert(0, mf[t] + G @ (ms[0] - F[t + 1] @ mf[t] - u[t + 1]))
        Ps.insert(0, Pf[t] + G @ (Ps[0] - Pp) @ G.T)
    return np.stack(mf), np.stack(Pf), np.stack(ms), np.stack(Ps)


def _direct(F, u, Q, y, R, m0):
    """Minimise sum |x_t - F_t x_{t-1} - u_t|^2_{Q^-1} + |y_t - x_t|^2_{R^-1} with x_0 = m0
    by a dense solve of the normal equations; the inverse Hessian is the posterior
    covariance."""
    T, D = u.shape
    B = np.zeros((T * D, T * D))
    c = u.copy()
    c[0] = c[0] + F[0] @ m0
    Qinv = np.zeros((T * D, T * D))
    Rinv = np.zeros((T * D, T * D))
    for t in range(T):
        s = slice(t * D, (t + 1) * D)
        B[s, s] = np.eye(D)
        if t > 0:
            B[s, (t - 1) * D : t * D] = -F[t]
        Qinv[s, s] = np.linalg.inv(Q[t])
        Rinv[s, s] = np.linalg.inv(R[t])
    H = B.T @ Qinv @ B + Rinv
    x = np.linalg.solve(H, B.T @ Qinv @ c.reshape(-1) + Rinv @ y.reshape(-1))
    cov = np.linalg.inv(H)
    blocks = np.stack([cov[t * D : (t + 1) * D, t * D : (t + 1) * D] for t in range(T)])
    return x.reshape(T, D), blocks


def _as_arrays(args):
    return tuple(jnp.asarray(a) for a in args)


# "loop": the CPU default, which folds the dense combines in chunks (13 steps: chunks of
# 4, the last one padded).
@pytest.mark.parametrize("impl", ["xla", "loop"])
@pytest.mark.parametrize("diagonal", [False, True], ids=["dense", "diagonal"])
@pytest.mark.parametrize("T,D", [(1, 2), (13, 3)])
def test_against_sequential_and_direct(diagonal, T, D, impl):
    args, dense = _problem(T * 10 + D, T, D, diagonal)
    F, u, Q, y, R, m0, P0 = _as_arrays(args)
    transition = parassm.linear.Diagonal(F) if diagonal else parassm.linear.Dense(F)
    with parassm.linear.scan_impl(impl):
        mf, Pf = kalman_filter(transition, u, Q, y, R, m0, P0)
        ms, Ps = kalman_smoother(transition, u, Q, y, R, m0, P0)
    Fd, Qd, Rd, P0d = dense
    ref_mf, ref_Pf, ref_ms, ref_Ps = _sequential(Fd, args[1], Qd, args[3], Rd, args[5], P0d)
    if diagonal:
        assert Pf.shape == (T, D) and Ps.shape == (T, D)
        Pf, Ps = jnp.einsum("ti,ij->tij", Pf, jnp.eye(D)), jnp.einsum("ti,ij->tij", Ps, jnp.eye(D))
    np.testing.assert_allclose(mf, ref_mf, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(Pf, ref_Pf, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ms, ref_ms, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(Ps, ref_Ps, rtol=1e-9, atol=1e-9)
    # The filter's last step is the smoother's.
    np.testing.assert_allclose(ms[-1], mf[-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("diagonal", [False, True], ids=["dense", "diagonal"])
def test_known_initial_state_is_a_least_squares_solve(diagonal):
    T, D = 11, 3
    args, dense = _problem(7, T, D, diagonal)
    F, u, Q, y, R, m0, _ = _as_arrays(args)
    transition = parassm.linear.Diagonal(F) if diagonal else parassm.linear.Dense(F)
    ms, Ps = kalman_smoother(transition, u, Q, y, R, m0)
    x, cov = _direct(dense[0], args[1], dense[1], args[3], dense[2], args[5])
    np.testing.assert_allclose(ms, x, rtol=1e-9, atol=1e-9)
    if diagonal:
        cov = np.diagonal(cov, axis1=1, axis2=2)
    np.testing.assert_allclose(Ps, cov, rtol=1e-9, atol=1e-9)
    # The means-only path (x_0 = 0) agrees with the full smoother.
    zero_b = u.at[0].set(u[0] + (F[0] @ m0 if not diagonal else F[0] * m0))
    np.testing.assert_allclose(
        eqx.filter_jit(smoothed_means)(transition, zero_b, Q, y, R), x, rtol=1e-9, atol=1e-9
    )


@pytest.mark.slow
def test_float32():
    T, D = 20, 2
    args, _ = _problem(3, T, D, False)
    F, u, Q, y, R, m0, P0 = (jnp.asarray(a, jnp.float32) for a in args)
    ms, Ps = kalman_smoother(parassm.linear.Dense(F), u, Q, y, R, m0, P0)
    assert ms.dtype == jnp.float32 and Ps.dtype == jnp.float32
    ref = _sequential(*args)[2]
    np.testing.assert_allclose(ms, ref, rtol=1e-3, atol=1e-3)


def test_validation():
    args, _ = _problem(3, 20, 2, False)
    F, u, Q, y, R, m0, P0 = _as_arrays(args)
    with pytest.raises(TypeError, match="Dense"):
        parassm.linear.kalman_smoother(parassm.linear.Scalar(F[:, 0, 0]), u, Q[0], y, R[0])
    with pytest.raises(ValueError, match="`Q` must have shape"):
        parassm.linear.kalman_filter(parassm.linear.Dense(F), u, Q[:, 0], y, R)


def test_gauss_jordan_inverse_needs_pivoting():
    # A zero leading entry defeats elimination without pivoting.
    M = jnp.array(
        [[[0.0, 2.0, 1.0], [1.0, 0.0, 0.0], [3.0, 1.0, 5.0]], [[2.0, 0, 0], [0, 3, 0], [0, 0, 4]]]
    )
    np.testing.assert_allclose(
        eqx.filter_jit(_inverse)(M) @ M, np.broadcast_to(np.eye(3), (2, 3, 3)), atol=1e-12
    )


@pytest.mark.parametrize("diagonal", [False, True], ids=["dense", "diagonal"])
def test_one_covariance_for_all_steps(diagonal):
    # `Q` and `R` given once mean the same at every step.
    args, _ = _problem(3, 12, 3, diagonal)
    F, u, Q, y, R, m0, P0 = _as_arrays(args)
    transition = parassm.linear.Diagonal(F) if diagonal else parassm.linear.Dense(F)
    T = u.shape[0]
    once = kalman_smoother(transition, u, Q[0], y, R[0], m0, P0)
    every = kalman_smoother(
        transition,
        u,
        jnp.broadcast_to(Q[0], (T,) + Q.shape[1:]),
        y,
        jnp.broadcast_to(R[0], (T,) + R.shape[1:]),
        m0,
        P0,
    )
    for a, b in zip(once, every):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
