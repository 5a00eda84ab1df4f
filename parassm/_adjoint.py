"""Derivatives of a trajectory with respect to `s0`, `xs` and anything `f` closes over.

At a solution `S*` of `s_t = f(s_{t-1}, x_t; theta)` the implicit function theorem turns
tangents into the LINEAR recurrence

    ds_t = J_t ds_{t-1} + c_t,     c_t = df/dtheta dtheta + df/dx dx_t  (+ J_1 ds_0 at t=1)

i.e. `M ds = c` with `M` the block lower-bidiagonal residual Jacobian. Its transpose,
used by reverse mode, is the reverse-time recurrence `g_t = gbar_t + J_{t+1}^T g_{t+1}`.
We wrap the solve in `lax.custom_linear_solve`, so JAX gets both the forward solve (for
`jvp`) and the transposed solve (for `grad`) from us, and never differentiates through
the Newton iterations: memory does not grow with their number.

The JVP rule is itself differentiable, so derivatives of every order are exact: it
re-enters the `custom_jvp` for the trajectory (which then carries the outer tangents),
and forms `c` and `M` from inputs that carry theirs; `lax.custom_linear_solve`
differentiates its solution through `M` (`dx = M^{-1} (dc - dM x)`), never through the
solves. A rule that linearised at a trajectory without tangent would drop every
second-order term through the trajectory, silently.
"""

import abc
import functools as ft
from collections.abc import Callable

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PyTree

from . import _linear as linear
from ._linear._shift import shift
from ._problem import Flat, flatten, ravelling, unravel_trajectory
from ._solvers import _jacobian as jacobian
from ._solvers._base import AbstractSolver, check_tolerances, default_tolerance
from ._solvers._descent import corrects_sequentially
from ._solvers._parallel import AbstractParallelSolver, measure, Problem, solve_flat
from ._solvers.quasi_deer import AbstractDiagonal, ExactDiagonal


class _Linearisation:
    """The Jacobians `J_t = df/ds(s*_{t-1}, x_t)` at the solution, as operators."""

    def __init__(self, flat: Flat, xs, s_prev: Float[Array, "T D"], jvp: Callable, vjp: Callable):
        self.flat = flat
        self.xs = xs
        self.s_prev = s_prev
        self.jvp = jvp  # (T, D) -> (T, D): J_t u_t
        self.vjp = vjp  # (T, D) -> (T, D): J_t^T w_t

    @property
    def shape(self) -> tuple[int, int]:
        return self.s_prev.shape


def _matvec(lin: _Linearisation, v):
    """`(M v)_t = v_t - J_t v_{t-1}`."""
    return v - lin.jvp(shift(v))


def _rmatvec(lin: _Linearisation, w):
    """`(M^T w)_t = w_t - J_{t+1}^T w_{t+1}`."""
    return w - shift(lin.vjp(w), reverse=True)


class AbstractLinearSolver(eqx.Module):
    """How [`parassm.ImplicitAdjoint`][] solves the linear recurrence of the tangents
    (forward mode) and its transpose (reverse mode)."""

    @abc.abstractmethod
    def prepare(self, lin: _Linearisation) -> PyTree:
        """Anything to compute once per linearisation (e.g. dense Jacobians)."""

    @abc.abstractmethod
    def solve(self, lin: _Linearisation, state: PyTree, c: Float[Array, "T D"]) -> Array:
        """Solve `ds_t = J_t ds_{t-1} + c_t`."""

    @abc.abstractmethod
    def solve_transpose(self, lin: _Linearisation, state: PyTree, g: Float[Array, "T D"]) -> Array:
        """Solve `w_t = J_{t+1}^T w_{t+1} + g_t` (backwards in time)."""


class DenseScan(AbstractLinearSolver):
    """Materialise the Jacobians and solve both recurrences by associative scans over
    dense `D x D` matrices: depth `O(log T)`, `O(T D^3)` work, `O(T D^2)` memory.

    Exact and the most parallel; right for small states (`D` up to a few dozen).
    """

    def prepare(self, lin):
        return jacobian.dense(lin.flat.fn, lin.s_prev, lin.xs)

    def solve(self, lin, state, c):
        return linear.solve(linear.Dense(state), c)

    def solve_transpose(self, lin, state, g):
        Jt = jnp.swapaxes(state, -1, -2)
        shifted = jnp.concatenate([Jt[1:], jnp.zeros_like(Jt[:1])])
        return linear.solve(linear.Dense(shifted), g, reverse=True)


class SequentialScan(AbstractLinearSolver):
    """Solve both recurrences one step at a time with `lax.scan`, using one JVP (or VJP)
    of `f` per step: depth `O(T)`, no Jacobian is ever formed, `O(T D)` memory.

    Exact; right for large states on hardware where sequential steps are cheap (CPUs),
    or when memory is the constraint.
    """

    def prepare(self, lin):
        return None

    def _step_fn(self, lin):
        fn = lin.flat.fn
        return fn, (lin.s_prev, lin.xs)

    def solve(self, lin, state, c):
        fn, (s_prev, xs) = self._step_fn(lin)
        return jacobian.tangent_scan(fn, s_prev, xs, c)

    def solve_transpose(self, lin, state, g):
        fn, (s_prev, xs) = self._step_fn(lin)
        # w_t = g_t + J_{t+1}^T w_{t+1}: the Jacobian of step t+1 acts on w_{t+1}.
        s_next = shift(s_prev, reverse=True)
        xs_next = None if xs is None else jtu.tree_map(ft.partial(shift, reverse=True), xs)
        valid = jnp.arange(g.shape[0]) < g.shape[0] - 1

        def body(w_next, inputs):
            sp, x, gt, ok = inputs
            _, vjp = jax.vjp(lambda s: fn(s, x), sp)
            (back,) = vjp(w_next)
            w = gt + jnp.where(ok, back, jnp.zeros_like(back))
            return w, w

        zero = jnp.zeros_like(g[0])
        return lax.scan(body, zero, (s_next, xs_next, g, valid), reverse=True)[1]


# A residual this many times larger than the first one means the iteration is diverging
# (e.g. a diagonal preconditioner that expands while the full Jacobians contract).
_DIVERGENCE = 1e3


class QuasiScan(AbstractLinearSolver):
    r"""Solve both recurrences iteratively: a diagonal associative scan as the
    preconditioner, exact Jacobian-vector products for the residual, and an exact
    fallback where the iteration does not converge.

    Each iteration costs one JVP (or VJP) and one `O(T D)` diagonal scan, and updates
    the tangent $u$ of the recurrence $u_t = J_t u_{t-1} + c_t$ by the preconditioned
    residual. It stops when every step meets the forward solve's test, applied to this
    linear recurrence:

    $$|r_t|_\infty \le \mathrm{atol} + \mathrm{rtol}\, \nu_t, \qquad
    r_t = J_t u_{t-1} + c_t - u_t,$$

    with $\nu_t$ the running size of the tangent trajectory (the largest
    $|J_{t'} u_{t'-1} + c_{t'}|_\infty$ over accurate steps $t' \le t$, counted
    backwards in time for the transposed recurrence of reverse mode). What this
    bounds: the returned tangent is the exact tangent for a forcing $c + r$ perturbed
    by at most `rtol` relative to the tangent's own size, step by step (backward error),
    so its error is at most about `rtol * max|u|` times the amplification of the
    linear recurrence, $\max_t \sum_k |J_t \cdots J_{t-k+1}|$ (at most
    $1 / (1 - \rho)$ if every $|J_t| \le \rho < 1$): the same factor by which the
    trajectory itself amplifies perturbations. The Jacobian's diagonal is only the
    preconditioner; using it alone would give wrong gradients.

    The iteration converges in few steps when the Jacobians are dominated by their
    diagonals. It can fail on a stable system whose diagonals expand (e.g.
    $J = [[1.5, 1.5], [-1, -1]]$, eigenvalues $0.5$ and $0$: the diagonal scan grows
    like $1.5^T$). It is stopped when it has not converged after `max_steps`
    iterations, when its residual grows a thousandfold or when it is not finite (NaN
    included), and then the tangent is computed by `fallback`, an exact solve
    ([`parassm.SequentialScan`][] by default). Under `jax.vmap` the fallback runs only
    if some batch element needs it. With `fallback=None` an error is raised instead.

    **Arguments:**

    - `diagonal`: how to get the preconditioner's diagonal (as for
        [`parassm.QuasiDEER`][]); default [`parassm.ExactDiagonal`][].
    - `rtol`, `atol`: the tolerance. `rtol=None` is `eps ** 0.7` of the dtype,
        `atol=None` is zero (the test is then invariant to the scale of the tangents).
    - `max_steps`: the most iterations (default: `T`, after which the iteration is
        exact in exact arithmetic).
    - `fallback`: the exact solver used where the iteration does not converge, or
        `None` to raise an error there.
    """

    diagonal: AbstractDiagonal = ExactDiagonal()
    rtol: float | None = None
    atol: float | None = None
    max_steps: int | None = eqx.field(default=None, static=True)
    fallback: AbstractLinearSolver | None = SequentialScan()

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol, zero=True)
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"`max_steps` must be non-negative (or None), got {self.max_steps}.")
        if isinstance(self.fallback, QuasiScan):
            raise TypeError("`fallback` must be an exact solver such as `SequentialScan()`.")

    def prepare(self, lin):
        problem = Problem(lin.flat.fn, lin.flat.unravel, lin.xs, lin.flat.s0, lin.shape[0])
        return self.diagonal(problem, lin.s_prev, jnp.array(0))[1]

    def _iterate(self, apply_m, precondition, b, *, reverse, exact):
        T = b.shape[0]
        rtol = default_tolerance(b.dtype) if self.rtol is None else self.rtol
        atol = 0.0 if self.atol is None else self.atol
        max_steps = T if self.max_steps is None else self.max_steps

        def converged(x, r):
            x, g = (x, x + r) if not reverse else (jnp.flip(x, 0), jnp.flip(x + r, 0))
            return measure(x, g, rtol, atol)[1] >= T

        def size(r):
            return jnp.max(jnp.abs(r))

        def cond(carry):
            _, r, k, ok, r0 = carry
            # Written so that NaN stops the loop: comparisons with NaN are False.
            growing = ~(size(r) <= _DIVERGENCE * r0)
            return ~ok & ~growing & (k < max_steps)

        def body(carry):
            x, r, k, _, r0 = carry
            x = x + precondition(r)
            r = b - apply_m(x)
            return x, r, k + 1, converged(x, r), r0

        x0 = precondition(b)
        r0 = b - apply_m(x0)
        init = (x0, r0, jnp.array(0), converged(x0, r0), size(r0))
        x, _, _, ok, _ = lax.while_loop(cond, body, init)
        if self.fallback is None:
            return eqx.error_if(
                x,
                ~ok,
                "QuasiScan: the linear system of the implicit derivative did not converge "
                "(too many iterations, a growing residual, or NaN/Inf). Use "
                "`QuasiScan(fallback=SequentialScan())`, `DenseScan()` or "
                "`SequentialScan()` as the `linear_solver` of `ImplicitAdjoint`, or raise "
                "`max_steps`.",
            )
        return lax.cond(
            eqxi.unvmap_any(~ok), lambda: jnp.where(ok, x, exact(self.fallback)), lambda: x
        )

    def solve(self, lin, state, c):
        diag = linear.Diagonal(state)

        def exact(fallback):
            return fallback.solve(lin, fallback.prepare(lin), c)

        return self._iterate(
            lambda v: _matvec(lin, v),
            lambda r: linear.solve(diag, r),
            c,
            reverse=False,
            exact=exact,
        )

    def solve_transpose(self, lin, state, g):
        diag = linear.Diagonal(shift(state, reverse=True))

        def exact(fallback):
            return fallback.solve_transpose(lin, fallback.prepare(lin), g)

        return self._iterate(
            lambda w: _rmatvec(lin, w),
            lambda r: linear.solve(diag, r, reverse=True),
            g,
            reverse=True,
            exact=exact,
        )


class AbstractAdjoint(eqx.Module):
    """How derivatives of [`parassm.evaluate`][] are computed."""

    @abc.abstractmethod
    def apply(
        self,
        solver: AbstractSolver,
        f: Callable,
        s0: PyTree[Array],
        xs: PyTree | None,
        length: int,
        init: PyTree[Array] | None,
        max_steps: int | None,
    ) -> tuple[PyTree[Array], object, dict]:
        """Run `solver` and attach derivatives to its value."""


def _stop(tree):
    return jtu.tree_map(lambda x: lax.stop_gradient(x) if eqx.is_inexact_array(x) else x, tree)


def _materialise(primal, tangent):
    """The tangents of the floating-point arrays of `primal` (zeros where JAX passed a
    symbolic zero, `None`) and `None` elsewhere."""
    dynamic = eqx.filter(primal, eqx.is_inexact_array)
    if tangent is None:
        tangent = jtu.tree_map(lambda _: None, dynamic)

    def fill(p, t):
        if p is None:
            return None
        return jnp.zeros_like(p) if t is None else t

    return dynamic, jtu.tree_map(fill, dynamic, tangent, is_leaf=lambda x: x is None)


@eqx.filter_custom_jvp
def _implicit(value, f, s0, xs, *, linear_solver, ravel, unravel):
    return value


@_implicit.def_jvp
def _implicit_jvp(primals, tangents, *, linear_solver, ravel, unravel):
    value, f, s0, xs = primals
    _, t_f, t_s0, t_xs = tangents
    # The rule must itself be differentiable for second and higher derivatives. The
    # primal `value` carries no tangent (it comes out of a stopped solve), so under an
    # outer derivative it is re-entered through `_implicit`, whose own rule gives it the
    # outer tangent; every quantity below is then built from inputs that carry theirs
    # (as optimistix's `implicit_jvp` does). `lax.custom_linear_solve` differentiates
    # its solution through `matvec` (`dx = M^{-1} (db - dM x)`), never through the
    # solves, so only `matvec` and the forcing need to see the live inputs.
    value = _implicit(value, f, s0, xs, linear_solver=linear_solver, ravel=ravel, unravel=unravel)
    f_dyn, t_f = _materialise(f, t_f)
    s0_dyn, t_s0 = _materialise(s0, t_s0)
    xs_dyn, t_xs = _materialise(xs, t_xs)
    f_static = eqx.filter(f, eqx.is_inexact_array, inverse=True)
    xs_static = eqx.filter(xs, eqx.is_inexact_array, inverse=True)
    in_axes = (0, None if xs is None else 0)

    def step(f_dyn, s, x):
        return ravel(eqx.combine(f_dyn, f_static)(unravel(s), x))

    def batched(f_dyn, s_prev, xs_dyn):
        x_all = eqx.combine(xs_dyn, xs_static)
        return jax.vmap(ft.partial(step, f_dyn), in_axes=in_axes)(s_prev, x_all)

    s_prev = jnp.concatenate([s0[None], value[:-1]])
    # The forcing: everything but the dependence on the trajectory itself.
    ts_prev = jnp.zeros_like(s_prev).at[0].set(t_s0)
    _, c = jax.jvp(batched, (f_dyn, s_prev, xs_dyn), (t_f, ts_prev, t_xs))

    def matvec(v):
        """`(M v)_t = v_t - J_t v_{t-1}`, live in `f`, the trajectory and `xs`."""
        jv = jax.jvp(lambda sp: batched(f_dyn, sp, xs_dyn), (s_prev,), (shift(v),))[1]
        return v - jv

    # The solves see constants only: their tangents would be discarded anyway.
    f_stop, s_stop, xs_stop = _stop((f_dyn, s_prev, xs_dyn))
    xs_all = eqx.combine(xs_stop, xs_static)
    _, jvp_s = jax.linearize(lambda sp: batched(f_stop, sp, xs_stop), s_stop)
    vjp_s = jax.linear_transpose(jvp_s, s_stop)
    flat = Flat(ft.partial(step, f_stop), unravel, lax.stop_gradient(s0))
    lin = _Linearisation(flat, xs_all, s_stop, jvp_s, lambda w: vjp_s(w)[0])
    state = linear_solver.prepare(lin)
    t_value = lax.custom_linear_solve(
        matvec,
        c,
        solve=lambda _, b: linear_solver.solve(lin, state, b),
        transpose_solve=lambda _, b: linear_solver.solve_transpose(lin, state, b),
    )
    return value, t_value


def default_linear_solver(size: int) -> AbstractLinearSolver:
    """The linear solver of `ImplicitAdjoint(linear_solver=None)` for a state of `size`
    components, in the current scan context: one JVP (VJP) per step where the scans are
    sequential anyway from 17 components (`_descent.corrects_sequentially`: on a CPU it
    is cheaper than a pass of dense Jacobians and a dense scan, and forms no `T D^2`
    numbers, which under `jax.vmap` do not stay in cache); else the dense Jacobians up
    to 64 components, and the iterative `QuasiScan` above. A training step through
    `ParallelRNN(GRUCell, solver=DEER())` (value and gradient, float32, this 2-core CPU,
    CPU seconds, fastest of 5 interleaved runs, `DenseScan` against this): `H = 64`,
    `T = 1e4`, one sequence, 759 against 612 ms; a batch of 8 at `H = 32`, `T = 2000`,
    477 against 466 ms (within noise); the same gradients (1.6e-8 from `lax.scan`'s)."""
    if corrects_sequentially(size):
        return SequentialScan()
    return DenseScan() if size <= 64 else QuasiScan()


class ImplicitAdjoint(AbstractAdjoint):
    r"""Differentiate by the implicit function theorem at the solution (the default).

    Forward mode (`jax.jvp`, `jax.jacfwd`) solves the tangent recurrence
    $\delta s_t = J_t \delta s_{t-1} + c_t$; reverse mode (`jax.grad`) solves its
    transpose $g_t = \bar g_t + J_{t+1}^\top g_{t+1}$ backwards in time. Gradients flow
    to `s0`, `xs` and every array `f` closes over (including equinox modules). Nothing
    is differentiated through the Newton iterations, so memory does not depend on how
    many there were.

    Derivatives of every order are exact (`jax.hessian`, `jax.jacfwd(jax.grad(...))`,
    `jax.grad(jax.grad(...))`, Hessian-vector products): each order solves one more
    linear recurrence of the same kind at the same trajectory.

    !!! warning

        The implicit gradient is the gradient of the exact trajectory. It is only
        meaningful if the solve succeeded: with `throw=False` check `result` first (a
        loss masked with `jnp.where(result == RESULTS.successful, loss, 0)` gets zero
        gradient from failed elements), or use [`parassm.UnrolledAdjoint`][] for the
        derivative of the iterates themselves.

    **Arguments:**

    - `linear_solver`: how to solve the (transposed) tangent recurrence:
        [`parassm.DenseScan`][] (exact, parallel, `O(T D^2)` memory),
        [`parassm.QuasiScan`][] (iterative, diagonal preconditioner, `O(T D)` memory,
        accurate to a stated tolerance, with an exact fallback) or
        [`parassm.SequentialScan`][] (exact, sequential, no Jacobians). `None`
        (default) picks `SequentialScan` where the linear scans run one step after the
        other anyway (`parassm.linear.LoopScan`, the CPU's default) and the state has 17
        components or more, as DEER's own corrections do; else `DenseScan` for states of
        at most 64 components and `QuasiScan` above.
    """

    linear_solver: AbstractLinearSolver | None = None

    def apply(self, solver, f, s0, xs, length, init, max_steps):
        if solver.runs_sequentially(s0, length):
            # `lax.scan` is differentiable as it stands, and exact.
            return solver.solve(f, s0, xs, length, init, max_steps)
        x0 = None if xs is None else jtu.tree_map(lambda x: x[0], xs)
        f = eqx.filter_closure_convert(f, s0, x0)
        # The solver too: it may hold arrays of the model (a closed-form Jacobian of
        # the cell), which only precondition the iteration.
        value, result, stats = _stop(solver).solve(
            _stop(f), _stop(s0), _stop(xs), length, _stop(init), max_steps
        )
        ravel, unravel = ravelling(s0)
        size = sum(leaf.size for leaf in jtu.tree_leaves(s0))
        linear_solver = self.linear_solver
        flat_value = jax.vmap(ravel)(value)
        # Under differentiation the tangent solves are traced right here: in the solver's
        # context, so that they run like its own solves (e.g. sharded).
        with solver.linear_context():
            if linear_solver is None:
                linear_solver = default_linear_solver(size)
            flat_value = _implicit(
                flat_value,
                f,
                ravel(s0),
                xs,
                linear_solver=linear_solver,
                ravel=ravel,
                unravel=unravel,
            )
        return jax.vmap(unravel)(flat_value), result, stats


class UnrolledAdjoint(AbstractAdjoint):
    """Differentiate through the solver's iterations (with checkpointing).

    This is the derivative of the iterate the solver actually returned, converged or
    not, which is what you want when the solve is deliberately truncated
    (`max_steps` small, `throw=False`) and the implicit gradient of the exact trajectory
    would be wrong. When the solve converges, it agrees with
    [`parassm.ImplicitAdjoint`][] but costs more.

    Reverse mode goes through a checkpointed loop of `max_steps + 1` iterations
    (`equinox.internal.while_loop(kind="checkpointed")`): memory grows with the number of
    checkpoints, and backpropagation recomputes iterations between them. Works with the
    parallel solvers ([`parassm.AbstractParallelSolver`][] subclasses such as
    [`parassm.DEER`][]) and [`parassm.Sequential`][].

    !!! warning

        Reverse mode only, and forward over reverse: `jax.grad`, `jax.vjp`,
        `jax.hessian`, `jax.jacfwd(jax.grad(...))` and Hessian-vector products by
        `jax.jvp(jax.grad(...))` are exact. Forward mode alone (`jax.jvp`,
        `jax.jacfwd`) raises JAX's `TypeError` "can't apply forward-mode autodiff
        (jvp) to a custom_vjp function", and reverse over reverse
        (`jax.grad(jax.grad(...))`) raises its `ValueError` "Reverse-mode
        differentiation does not work for lax.while_loop": the checkpointed loop
        supports neither. Use [`parassm.ImplicitAdjoint`][] for those (with a solve
        that converges, the derivatives are the same).

    **Arguments:**

    - `checkpoints`: the number of checkpoints (`None`: equinox's default, about
        `log(max_steps)` memory).
    """

    checkpoints: int | None = eqx.field(default=None, static=True)

    def apply(self, solver, f, s0, xs, length, init, max_steps):
        if solver.runs_sequentially(s0, length):
            return solver.solve(f, s0, xs, length, init, max_steps)
        if not isinstance(solver, AbstractParallelSolver):
            raise TypeError(
                "`UnrolledAdjoint` differentiates through the iterations of a parallel "
                f"solver such as `parassm.DEER()`; {type(solver).__name__} is not one. "
                "Use `parassm.ImplicitAdjoint()` instead."
            )
        steps = length if max_steps is None else max_steps
        loop = ft.partial(
            eqx.internal.while_loop,
            max_steps=steps * solver.search.max_trials + 1,
            kind="checkpointed",
            checkpoints=self.checkpoints,
        )
        flat = flatten(f, s0)
        with solver.linear_context():
            states, result, stats = solve_flat(solver, flat, xs, length, init, max_steps, loop=loop)
        return unravel_trajectory(flat, states), result, stats
