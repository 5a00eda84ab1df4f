"""How `parassm.linear.solve` runs its scan: `AssociativeScan`, `ChunkedScan`, `PallasScan`.

Every implementation solves the same recurrence `s_t = A_t s_{t-1} + b_t` (an `init` has
already been folded into `b`), so solvers never need to know which one runs. The one used
when `solve` is not told is set by the context manager `scan_impl`; its value is part of
jax's tracing-cache key, so a jitted function traced under one implementation is traced
again under another.
"""

import abc
import contextlib
import math
import threading
from collections.abc import Callable, Iterator

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, PyTree

from ._transitions import (
    AbstractTransition,
    BlockDiagonal,
    Dense,
    Diagonal,
    Scalar,
)


class AbstractScanImpl(eqx.Module):
    """An algorithm for the scan inside [`parassm.linear.solve`][]."""

    @abc.abstractmethod
    def scan(
        self,
        transition: AbstractTransition,
        b: Float[Array, "T D"],
        *,
        reverse: bool,
    ) -> Float[Array, "T D"]:
        """Solve `s_t = A_t s_{t-1} + b_t` (`s_{t+1}` when `reverse`) from a zero state."""

    def associative_scan(
        self, fn: Callable, elems: PyTree[Array], *, reverse: bool = False, costly: bool = False
    ):
        """Any other associative scan over time (e.g. the Kalman filter's), laid out as
        this implementation lays out time. Same contract as `jax.lax.associative_scan`;
        by default, that function. `costly` says that one combine costs far more than
        a pass over one element (matrix products, inverses): an implementation that
        runs one step after the other may then fold it in sequential chunks
        (`fold_in_chunks`) rather than by the tree."""
        return lax.associative_scan(fn, elems, reverse=reverse)


def _combine(transition: AbstractTransition):
    compose, apply = transition.compose, transition.apply

    def combine(first, second):
        a1, b1 = first
        a2, b2 = second
        return compose(a2, a1), apply(a2, b1) + b2

    return combine


class AssociativeScan(AbstractScanImpl):
    """`jax.lax.associative_scan` over all `T` steps: depth $O(\\log T)$, about
    $2 \\log_2 T$ passes over memory. The default except on the CPU backend."""

    def scan(self, transition, b, *, reverse):
        pair = (transition.elements(), b)
        return lax.associative_scan(_combine(transition), pair, reverse=reverse)[1]


class LoopScan(AbstractScanImpl):
    """One step after the other (`jax.lax.scan` over time): depth `T`, and for dense maps
    `O(T D^2)` work (matrix-vector products) against the `O(T D^3)` of the matrix
    products an associative scan forms. On a CPU with few cores, where depth costs
    little and every flop counts, it is the fastest linear solve for dense (and
    block-diagonal) maps from a few states up; on accelerators the associative scan's
    depth `O(log T)` wins. The Newton iteration around it is unchanged: one Jacobian
    pass and one linear solve per step."""

    def scan(self, transition, b, *, reverse):
        apply = transition.apply
        elements = transition.elements()
        init = jnp.zeros_like(b[0])
        if sum(x.size for x in jtu.tree_leaves(elements)) <= b.size:
            # Maps no larger than the states (diagonals, scalars): scanned over time.

            def step(s, inputs):
                a_t, b_t = inputs
                s = apply(a_t, s) + b_t
                return s, s

            return lax.scan(step, init, (elements, b), reverse=reverse)[1]

        # Matrices (dense, blocks): each step reads its map by index from the array
        # in place. Scanned over as inputs, they would be moved time-major under
        # `jax.vmap` (the batch's axis first): a copy of all `B T D^2` numbers, which
        # cost a batch of eight GRUs (H = 32, T = 2000) 65 ms of CPU against 8 ms for
        # the scan itself.
        def indexed(s, t):
            a_t = jtu.tree_map(lambda x: lax.dynamic_index_in_dim(x, t, keepdims=False), elements)
            s = apply(a_t, s) + lax.dynamic_index_in_dim(b, t, keepdims=False)
            return s, s

        times = jnp.arange(b.shape[0])
        return lax.scan(indexed, init, times, reverse=reverse)[1]

    def associative_scan(self, fn, elems, *, reverse=False, costly=False):
        """A `costly` combine runs in chunks (`fold_in_chunks`): `fn` traced three times
        instead of at every level of a tree (most of the compile time of a dense Kalman
        filter) and about `2 sqrt(T)` sequential steps of vectorised combines. Cheap
        (elementwise) combines keep the tree, whose `O(log T)` passes beat loop steps."""
        if not costly:
            return lax.associative_scan(fn, elems, reverse=reverse)
        return fold_in_chunks(fn, elems, reverse=reverse)


def fold_in_chunks(fn: Callable, elems: PyTree[Array], *, reverse: bool = False):
    """The result of `jax.lax.associative_scan(fn, elems, reverse=reverse)` for any
    associative `fn`, computed by chunks of about `sqrt(T)` steps: a sequential fold
    within every chunk (vectorised over the chunks), a sequential fold of the chunks'
    totals, and one vectorised combine of each chunk with the total of all chunks
    before it. About `2 T` combines, like the tree."""
    if reverse:
        flip = lambda tree: jtu.tree_map(lambda x: jnp.flip(x, axis=0), tree)  # noqa: E731
        return flip(fold_in_chunks(fn, flip(elems)))
    T = jtu.tree_leaves(elems)[0].shape[0]
    if T <= 1:
        return elems
    L = math.isqrt(T - 1) + 1  # ceil(sqrt(T))
    C = -(-T // L)
    # Padding after the last step (copies of it, so that it stays finite) only ever
    # reaches outputs that are dropped.
    pad = C * L - T
    chunks = jtu.tree_map(
        lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge").reshape(
            (C, L) + x.shape[1:]
        ),
        elems,
    )

    def fold(stack):
        # Along the leading axis of `stack`, `fn` batched over the next one.
        first = jtu.tree_map(lambda x: x[0], stack)

        def step(prefix, e):
            out = fn(prefix, e)
            return out, out

        _, outs = lax.scan(step, first, jtu.tree_map(lambda x: x[1:], stack))
        return jtu.tree_map(lambda f, o: jnp.concatenate([f[None], o]), first, outs)

    local = fold(jtu.tree_map(lambda x: jnp.swapaxes(x, 0, 1), chunks))  # [l, c]
    local = jtu.tree_map(lambda x: jnp.swapaxes(x, 0, 1), local)  # [c, l]
    if C > 1:
        totals = jtu.tree_map(lambda x: x[:-1, -1][:, None], local)  # chunks 0..C-2
        before = jtu.tree_map(lambda x: x[:, 0], fold(totals))  # [c - 1]
        rest = jtu.tree_map(lambda x: x[1:].reshape(((C - 1) * L,) + x.shape[2:]), local)
        incoming = jtu.tree_map(lambda x: jnp.repeat(x, L, axis=0), before)
        fixed = fn(incoming, rest)
        local = jtu.tree_map(
            lambda x, f: jnp.concatenate([x[:1], f.reshape((C - 1, L) + x.shape[2:])]),
            local,
            fixed,
        )
    return jtu.tree_map(lambda x: x.reshape((C * L,) + x.shape[2:])[:T], local)


class ChunkedScan(AbstractScanImpl):
    """Sequential within chunks, parallel across them, in pure JAX.

    Time is cut into chunks of `chunk_size` steps. One `lax.scan` of `chunk_size` steps,
    vectorised over all chunks, gives every step's state from a zero start within its
    chunk together with the running product of the maps; an associative scan over the
    `T / chunk_size` chunk summaries gives the state entering each chunk, and one
    elementwise fix-up adds its contribution. Depth `chunk_size + O(log(T / chunk_size))`;
    memory as for [`parassm.linear.AssociativeScan`][] (the running products are kept).

    **Arguments:**

    - `chunk_size`: time steps per chunk. `T` need not be a multiple of it.
    """

    chunk_size: int = eqx.field(default=128, static=True)

    def __check_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"`chunk_size` must be positive, got {self.chunk_size}.")

    def scan(self, transition, b, *, reverse):
        a = transition.elements()
        T = b.shape[0]
        L = min(self.chunk_size, T)
        C = -(-T // L)
        # Zero maps and offsets after the end: in forward time they come after every real
        # step; in reverse time they are visited first and leave the state at zero, which
        # is the start state anyway.
        a = jnp.pad(a, [(0, C * L - T)] + [(0, 0)] * (a.ndim - 1)).reshape(C, L, *a.shape[1:])
        b = jnp.pad(b, ((0, C * L - T), (0, 0))).reshape(C, L, -1)
        compose, apply = transition.compose, transition.apply
        first = L - 1 if reverse else 0

        def step(carry, inputs):
            prod, s = carry
            a_t, b_t, t = inputs
            prod = jnp.where(t == first, a_t, compose(a_t, prod))
            s = apply(a_t, s) + b_t
            return (prod, s), (prod, s)

        def local(a_c, b_c):
            init = (jnp.zeros_like(a_c[0]), jnp.zeros_like(b_c[0]))
            return lax.scan(step, init, (a_c, b_c, jnp.arange(L)), reverse=reverse)

        (summary_a, summary_b), (prods, states) = jax.vmap(local)(a, b)
        _, ends = lax.associative_scan(
            _combine(transition), (summary_a, summary_b), reverse=reverse
        )
        zero = jnp.zeros_like(ends[:1])
        if reverse:
            incoming = jnp.concatenate([ends[1:], zero])
        else:
            incoming = jnp.concatenate([zero, ends[:-1]])
        incoming = jnp.broadcast_to(incoming[:, None], states.shape)
        return (states + apply(prods, incoming)).reshape(C * L, -1)[:T]


class PallasScan(AbstractScanImpl):
    """Fused chunked Pallas kernels (the `parassm_kernels` package, in `kernels/`).

    Each program scans one chunk of time for a block of components sequentially; a
    short associative scan combines the chunk summaries; a second kernel replays each
    chunk from its incoming state. About two reads and one write of the inputs, against
    $2 \\log_2 T$ passes for [`parassm.linear.AssociativeScan`][]: meant for GPUs, where
    the step is memory bound.

    [`parassm.linear.Diagonal`][] and [`parassm.linear.Scalar`][] use the diagonal
    kernel; [`parassm.linear.BlockDiagonal`][] with blocks up to 32 and
    [`parassm.linear.Dense`][] up to `D = 32` use the block kernel. Larger blocks have
    no kernel and are solved by [`parassm.linear.AssociativeScan`][] (same result).
    Derivatives never go through the kernel: the solve is a `lax.custom_linear_solve`
    whose transpose is the reverse-time kernel, so `jit`, `vmap`, `grad` and `jvp` work.

    **Arguments:**

    - `chunk_size`: time steps per program, a power of two.
    - `interpret`: run in the Pallas interpreter; defaults to True on CPU (where Pallas
        has no compiled backend) and False elsewhere.
    """

    chunk_size: int = eqx.field(default=128, static=True)
    interpret: bool | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        if self.chunk_size < 1 or self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"`chunk_size` must be a power of two, got {self.chunk_size}.")

    def _kernel_scan(self, transition, a, b, reverse):
        import parassm_kernels as kernels

        options = dict(reverse=reverse, chunk_size=self.chunk_size, interpret=self.interpret)
        if isinstance(transition, Diagonal):
            return kernels.diagonal_scan(a, b, **options)
        if isinstance(transition, Scalar):
            return kernels.diagonal_scan(jnp.broadcast_to(a[:, None], b.shape), b, **options)
        if isinstance(transition, BlockDiagonal):
            return kernels.block_scan(a, b, **options)
        if isinstance(transition, Dense):
            return kernels.block_scan(a[:, None], b, **options)
        raise AssertionError(type(transition))

    def scan(self, transition, b, *, reverse):
        if not _has_kernel(transition):
            return AssociativeScan().scan(transition, b, reverse=reverse)
        a = transition.elements()
        zero = jnp.zeros_like(a[:1])
        # The transposed problem runs the other way in time with `A_{t+1}^T`
        # (`A_{t-1}^T` for a reverse solve).
        at = transition.transpose().elements()
        at = jnp.concatenate([zero, at[:-1]]) if reverse else jnp.concatenate([at[1:], zero])

        def matvec(s):
            prev = jnp.zeros_like(s[:1])
            shifted = jnp.concatenate([s[1:], prev]) if reverse else jnp.concatenate([prev, s[:-1]])
            return s - transition.apply(a, shifted)

        return lax.custom_linear_solve(
            matvec,
            b,
            solve=lambda _, rhs: self._kernel_scan(transition, a, rhs, reverse),
            transpose_solve=lambda _, rhs: self._kernel_scan(transition, at, rhs, not reverse),
        )


def _has_kernel(transition: AbstractTransition) -> bool:
    import parassm_kernels as kernels

    if isinstance(transition, Diagonal | Scalar):
        return True
    if isinstance(transition, BlockDiagonal):
        return transition.blocks.shape[-1] <= kernels.MAX_BLOCK_SIZE
    if isinstance(transition, Dense):
        return transition.matrices.shape[-1] <= kernels.MAX_BLOCK_SIZE
    return False


_NAMES = {"xla": AssociativeScan, "chunked": ChunkedScan, "pallas": PallasScan, "loop": LoopScan}


def as_scan_impl(impl: "AbstractScanImpl | str") -> AbstractScanImpl:
    if isinstance(impl, AbstractScanImpl):
        return impl
    if isinstance(impl, str) and impl in _NAMES:
        return _NAMES[impl]()
    raise ValueError(
        f"`scan_impl` must be one of {sorted(_NAMES)} or a `parassm.linear.AbstractScanImpl` "
        f"(e.g. `parassm.linear.ChunkedScan(chunk_size=64)`), got {impl!r}."
    )


if hasattr(jax, "make_user_context"):
    _current = jax.make_user_context(None)

    def _get() -> AbstractScanImpl | None:
        return _current.value

    def _swap(impl):
        return _current(impl)

else:  # jax without user contexts: a thread-local default, not in the tracing-cache key.
    _local = threading.local()

    def _get() -> AbstractScanImpl | None:
        return getattr(_local, "impl", None)

    @contextlib.contextmanager
    def _swap(impl):
        previous = _get()
        _local.impl = impl
        try:
            yield
        finally:
            _local.impl = previous


def default_scan_impl() -> AbstractScanImpl:
    """The implementation [`parassm.linear.solve`][] uses when not given one, unless a
    [`parassm.linear.scan_impl`][] context says otherwise:
    [`parassm.linear.LoopScan`][] on the CPU backend (measured on a 2-core CPU, GRU,
    `T = 1e4`: a DEER iteration 1.9x / 1.9x / 3.3x faster than with the associative
    scan at `D = 8 / 32 / 64`, quasi-DEER 1.4-1.7x) and
    [`parassm.linear.AssociativeScan`][] on every other backend, where depth matters."""
    impl = _get()
    if impl is not None:
        return impl
    return LoopScan() if jax.default_backend() == "cpu" else AssociativeScan()


def associative_scan(
    fn: Callable, elems: PyTree[Array], *, reverse: bool = False, costly: bool = False
):
    """`jax.lax.associative_scan`, run by the current scan implementation (so that it is
    sharded over time under `parassm.Sharded`, and folded in chunks by `LoopScan`
    when `costly`; see `AbstractScanImpl.associative_scan`)."""
    return default_scan_impl().associative_scan(fn, elems, reverse=reverse, costly=costly)


@contextlib.contextmanager
def scan_impl(impl: AbstractScanImpl | str) -> Iterator[AbstractScanImpl]:
    """Choose the scan every [`parassm.linear.solve`][] traced inside the block uses, and
    with it every solver, without changing their code.

    **Arguments:**

    - `impl`: `"xla"` ([`parassm.linear.AssociativeScan`][], the default except on
        CPU), `"chunked"`
        ([`parassm.linear.ChunkedScan`][]), `"pallas"` ([`parassm.linear.PallasScan`][]),
        `"loop"` ([`parassm.linear.LoopScan`][], the default on CPU), or an instance
        with non-default options.

    The choice is thread-local and is part of jax's tracing-cache key: a function
    jitted outside the block is traced again inside it.

    !!! example

        ```python
        with parassm.linear.scan_impl("chunked"):
            sol = parassm.evaluate(f, s0, xs=xs, solver=parassm.QuasiDEER())
        ```
    """
    impl = as_scan_impl(impl)
    with _swap(impl):
        yield impl
