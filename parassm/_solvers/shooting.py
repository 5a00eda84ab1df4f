import math

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._problem import Flat, flatten, unravel_trajectory
from ._base import AbstractSolver
from ._parallel import (
    AbstractParallelSolver,
    finish_measured,
    flat_initial_guess,
    newton_loop,
    Problem,
)
from .deer import DEER, FunctionJacobian
from .quasi_deer import FunctionDiagonal
from .sequential import Sequential


class _ChunkScan(eqx.Module):
    """`L` steps of the flat recurrence from `s`, sequentially: the steps past the end of
    the sequence (padding of the last chunk) leave the state as it is."""

    fn: object = eqx.field(static=True)
    length: int = eqx.field(static=True)

    def trajectory(self, s, chunk):
        xs, valid = chunk

        def step(s, inputs):
            x, ok = inputs
            s = jnp.where(ok, self.fn(s, x), s)
            return s, s

        return lax.scan(step, s, (xs, valid), length=self.length)

    def __call__(self, s, chunk):
        # The chunk map `Phi_k`: the state after the chunk from the state before it.
        return self.trajectory(s, chunk)[0]


def coarse_problem(flat: Flat, xs: PyTree | None, length: int, chunk: int) -> Problem:
    """The coarse recurrence of multiple shooting with chunks of `chunk` steps: its
    step is a `_ChunkScan` over one chunk of the inputs (the last chunk padded with
    identity steps), its states the `K = ceil(length / chunk)` chunk ends."""
    K = -(-length // chunk)
    pad = K * chunk - length
    valid = (jnp.arange(K * chunk) < length).reshape(K, chunk)

    def chunked(x):
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[-1:], (pad,) + x.shape[1:])])
        return x.reshape((K, chunk) + x.shape[1:])

    xs_c = (jtu.tree_map(chunked, xs), valid)
    return Problem(_ChunkScan(flat.fn, chunk), flat.unravel, xs_c, flat.s0, K)


class MultipleShooting(AbstractSolver):
    r"""Multiple shooting: a parallel solver on the states between chunks of the sequence.

    The sequence is cut into $K = \lceil T / L \rceil$ chunks of `chunk_length` $L$
    steps. Within a chunk the recurrence is evaluated sequentially (`jax.lax.scan`,
    all chunks at once, vectorised); across chunks, `solver` solves the *coarse*
    recurrence $c_k = \Phi_k(c_{k-1})$, $c_0 = s_0$, whose step $\Phi_k$ is the whole
    chunk $k$ ($L$ steps of `f`) and whose states $c_k = s_{kL}$ are the states at
    the chunk ends. With [`parassm.DEER`][] that is Newton's method on the $K$ chunk
    ends, the Jacobian of $\Phi_k$ by $D$ JVPs through the chunk (forward mode).

    Why: the Newton iterates of DEER on the whole sequence are pieced together from
    the guess, and on systems that contract only weakly or only on average (a damped
    pendulum, periodic orbits, a bistable flow) from a poor guess those pieces meet
    at walls that move a few steps per iteration. Within a chunk the iterate is always
    an exact trajectory, so walls only stand at chunk ends, and the chunk map, $L$
    steps of a predictable system, contracts by about $e^{\lambda L}$ ($\lambda$ the
    largest Lyapunov exponent) and is nearly affine where it matters. Measured
    (`bench/convergence.py`, $T = 10^4$, float64): the damped pendulum from the
    default guess in 5 iterations where DEER takes 257 (6.2 ms against 570 ms on a
    2-core CPU). On a strongly contracting cell, `MultipleShooting(Jacobi())` needs
    one or two iterations and no derivatives (`bench/peers.py`, a GRU, $H = 64$,
    $T = 10^4$, float32: 27 ms, 1.9x `lax.scan`; quasi-DEER 110 ms).

    What it costs: every iteration runs $L$ sequential steps (depth $L$, where DEER's
    depth is $\log T$) and, with DEER, $D$ JVPs through them; the parallelism is $K$
    chunks (times `vmap` batches), not $T$ steps. At most $K$ iterations (every one
    makes at least one more chunk exact), so even where nothing converges early
    (chaotic systems) the work is bounded: $K$ iterations of a pass over the chunks
    (two with DEER: the values, then the JVPs). Right for hard predictable problems
    where DEER crawls; on easy ones DEER is cheaper.

    **Arguments:**

    - `solver`: the parallel solver for the coarse recurrence (default
        [`parassm.DEER`][]; [`parassm.Jacobi`][] gives the classic iteration without
        derivatives, $c_k \leftarrow \Phi_k(c_{k-1})$, which needs a strongly
        contracting chunk map). Its tolerance is tested on the chunk ends. Closed-form
        Jacobians (`FunctionJacobian`, `FunctionDiagonal`) are of `f`, not of a chunk,
        and are refused.
    - `chunk_length`: $L$; `None` (default) takes $\lceil \sqrt{T}\,\rceil$. A chunk of
        at least `T` steps is `jax.lax.scan` itself (one chunk, nothing to solve).

    `Solution.stats["num_steps"]` counts the coarse iterations (each `L` sequential
    steps deep); `converged_prefix`, `residual` and `result` are measured on the whole
    trajectory at the end, which one more pass over the chunks rebuilds from the chunk
    ends.
    """

    solver: AbstractParallelSolver = DEER()
    chunk_length: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        if not isinstance(self.solver, AbstractParallelSolver):
            raise TypeError(
                "`MultipleShooting` needs a parallel solver for the chunk ends (e.g. "
                f"`parassm.DEER()`), got {type(self.solver).__name__}."
            )
        closed = (FunctionJacobian, FunctionDiagonal)
        given = getattr(self.solver, "jacobian", None), getattr(self.solver, "diagonal", None)
        if any(isinstance(g, closed) for g in given):
            raise TypeError(
                "`MultipleShooting` differentiates whole chunks of the recurrence; a "
                "closed-form Jacobian or diagonal of one step does not apply. Use the "
                "solver's default (`ExactJacobian()` / `ExactDiagonal()`)."
            )
        if self.chunk_length is not None and self.chunk_length < 1:
            raise ValueError(f"`chunk_length` must be at least 1, got {self.chunk_length}.")

    def chunk(self, length: int) -> int:
        """The chunk length used for `length` steps."""
        if self.chunk_length is not None:
            return self.chunk_length
        return math.isqrt(length - 1) + 1 if length > 1 else 1

    def runs_sequentially(self, s0, length):
        return self.chunk(length) >= length

    def solve(self, f, s0, xs, length, init, max_steps):
        if self.runs_sequentially(s0, length):
            return Sequential().solve(f, s0, xs, length, init, max_steps)
        solver = self.solver
        flat = flatten(f, s0)
        solver.check(flat)
        T, L = length, self.chunk(length)
        coarse = coarse_problem(flat, xs, T, L)
        K = coarse.length
        S0 = flat_initial_guess(flat, init, T)
        # The chunk ends of the guess: `c_k = s_{min(kL, T)}`.
        ends = jnp.minimum(jnp.arange(1, K + 1) * L, T) - 1
        max_coarse = K if max_steps is None else max_steps
        state, _ = newton_loop(solver, coarse, S0[ends], max_coarse)
        C = state.S

        # The whole trajectory from the chunk ends: every chunk from the end of the one
        # before, its last state the chunk end itself. Every row of the chunk scans is
        # `f` of the row before it in `S`, so they are the values at `S` too: the
        # residual of the whole trajectory is the coarse residual at the chunk ends and
        # zero inside, with no evaluation of `f` beyond the scans.
        starts = jnp.concatenate([flat.s0[None], C[:-1]])
        _, inner = eqx.filter_vmap(coarse.fn.trajectory)(starts, coarse.xs)
        last = (jnp.arange(L) == L - 1)[None, :, None]
        S = jnp.where(last, C[:, None, :], inner).reshape(K * L, -1)
        # The padded steps of the last chunk repeat its last state: its end is `s_T`.
        S = S[:T].at[T - 1].set(C[-1])
        fs = inner.reshape(K * L, -1)[:T]

        S, result, stats = finish_measured(
            solver,
            Problem(flat.fn, flat.unravel, xs, flat.s0, T),
            S,
            max_coarse,
            counts=state.counts,
            search=state.search,
            fs=fs,
            # The chunks are exact given their starts: the error of the whole is that of
            # the chunk ends.
            estimate=state.accuracy.estimate,
        )
        stats["chunk_length"] = jnp.array(L)
        return unravel_trajectory(flat, S), result, stats
