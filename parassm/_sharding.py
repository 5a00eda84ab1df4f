"""Sequence-parallel evaluation across devices: the time axis split over a mesh axis.

The only step XLA's automatic partitioning handles badly is the associative scan (it
compiles to many collective-permutes per scan). `ShardedScan` replaces it by an explicit
`jax.shard_map`: a local scan on each shard, ONE all-gather of the per-shard affine
summaries `(A_total, b_total)`, a tiny scan over the shards (redundantly on every
device) and a local fix-up. Everything else in a Newton step is elementwise in time
(vectorised `f`, residuals) or a reduction (the convergence test), which XLA partitions
well: a one-step halo for `s_{t-1}` and a few all-reduces.
"""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.flatten_util import ravel_pytree
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ._jit import filter_jit
from ._linear._scan_impl import _combine, _swap, AbstractScanImpl
from ._solvers._base import AbstractSolver


def check_mesh(mesh: Mesh, axis: str) -> None:
    if axis not in mesh.axis_names:
        raise ValueError(f"Mesh axis {axis!r} is not in the mesh (axes {mesh.axis_names}).")
    if mesh.axis_types[mesh.axis_names.index(axis)] != AxisType.Auto:
        raise ValueError(
            f"Mesh axis {axis!r} has type {mesh.axis_types[mesh.axis_names.index(axis)]}; "
            "parassm shards time over `AxisType.Auto` axes, where XLA's partitioner "
            "places everything outside the scan. Create the mesh with "
            f"`jax.make_mesh(..., axis_types=(jax.sharding.AxisType.Auto,) * n_axes)`."
        )


def place(tree, mesh: Mesh, axis: str):
    """Constrain the leading (time) axis of every array leaf of `tree` to be split over
    `axis` (leaves whose leading axis does not divide evenly are left alone)."""
    n = mesh.shape[axis]
    sharding = NamedSharding(mesh, PartitionSpec(axis))

    def one(x):
        if not eqx.is_array(x) or x.ndim == 0 or x.shape[0] % n:
            return x
        return lax.with_sharding_constraint(x, sharding)

    return jtu.tree_map(one, tree)


class ShardedScan(AbstractScanImpl):
    """Solve the linear recurrence with the time axis split over `axis` of `mesh`.

    Per solve: a local associative scan on each device's `T / n` steps, one all-gather of
    the `n` per-shard summaries (`O(n D^2)` numbers for dense maps, `O(n D)` for
    diagonal ones), a scan over the `n` summaries and a local fix-up. `T` need not be a
    multiple of `n` (the end is padded with zero maps).

    **Arguments:**

    - `mesh`: a `jax.sharding.Mesh`.
    - `axis`: the name of the mesh axis the time axis is split over.
    """

    mesh: Mesh = eqx.field(static=True)
    axis: str = eqx.field(static=True)

    def __check_init__(self):
        check_mesh(self.mesh, self.axis)

    def _across_shards(self, fn, elems, reverse, fix_up):
        """The sharded scan: a local `lax.associative_scan` of `fn` on each shard, ONE
        all-gather of the per-shard totals, a scan over those (redundantly on every
        device), and `fix_up(incoming, local)` on every shard but the first in scan
        order. Returns the scan of `elems`' leaves, `T` long."""
        n = self.mesh.shape[self.axis]
        T = jtu.tree_leaves(elems)[0].shape[0]
        pad = -T % n
        # Padding after the last step in scan order (at the start when reversed) never
        # reaches a real output; its outputs are dropped.
        where = (pad, 0) if reverse else (0, pad)
        elems = jtu.tree_map(lambda x: jnp.pad(x, [where] + [(0, 0)] * (x.ndim - 1)), elems)
        axis = self.axis

        def local(elems):
            scanned = lax.associative_scan(fn, elems, reverse=reverse)
            edge = 0 if reverse else -1
            # The shard's total, packed into one buffer: one all-gather per scan.
            packed, unpack = ravel_pytree(jtu.tree_map(lambda x: x[edge], scanned))
            totals = jax.vmap(unpack)(lax.all_gather(packed, axis))
            totals = lax.associative_scan(fn, totals, reverse=reverse)
            i = lax.axis_index(axis)
            before = i + 1 if reverse else i - 1
            incoming = jtu.tree_map(lambda x: x[jnp.clip(before, 0, n - 1)], totals)
            fixed = fix_up(incoming, scanned)
            first = i == (n - 1 if reverse else 0)
            return jtu.tree_map(lambda s, f: jnp.where(first, s, f), scanned, fixed)

        spec = PartitionSpec(axis)
        elems = place(elems, self.mesh, axis)
        out = jax.shard_map(
            local, mesh=self.mesh, in_specs=(spec,), out_specs=spec, check_vma=False
        )(elems)
        return jtu.tree_map(lambda x: x[pad:] if reverse else x[:T], out)

    # Jitted, so that an eager call is one compiled program rather than many small
    # sharded dispatches (inside a jitted solver it is inlined).
    def scan(self, transition, b, *, reverse):
        return _sharded_linear_scan(self, transition, b, reverse)

    def associative_scan(self, fn, elems, *, reverse=False, costly=False):
        return _sharded_associative_scan(self, fn, elems, reverse)


@filter_jit
def _sharded_linear_scan(impl: ShardedScan, transition, b, reverse: bool):
    apply = transition.apply

    def fix_up(incoming, scanned):
        # From a zero start the state entering the shard is the incoming offset; only
        # offsets are needed (no products of maps).
        a_cum, b_cum = scanned
        return a_cum, b_cum + apply(a_cum, jnp.broadcast_to(incoming[1], b_cum.shape))

    pair = (transition.elements(), b)
    return impl._across_shards(_combine(transition), pair, reverse, fix_up)[1]


@filter_jit
def _sharded_associative_scan(impl: ShardedScan, fn, elems, reverse: bool):
    def fix_up(incoming, scanned):
        incoming = jtu.tree_map(lambda x, s: jnp.broadcast_to(x, s.shape), incoming, scanned)
        return fn(incoming, scanned)

    return impl._across_shards(fn, elems, reverse, fix_up)


class Sharded(AbstractSolver):
    """Run any parallel solver with the time axis split over a mesh axis.

    Inputs `xs` and the initial guess are placed with `NamedSharding(mesh,
    PartitionSpec(axis))` along time; every linear-recurrence solve inside the solver
    (Newton steps, and the implicit adjoint's scans) runs as a
    [`parassm.ShardedScan`][]. Per Newton step the devices exchange a one-step halo,
    the per-shard scan summaries (`O(n D^2)` numbers for dense Jacobians) and a few
    scalars for the global convergence test, so they iterate in lockstep.

    The time axis must be a mesh axis of type `jax.sharding.AxisType.Auto` (pass
    `axis_types=(jax.sharding.AxisType.Auto,)` to `jax.make_mesh`, whose default in
    current JAX is `Explicit`): placement outside the scan is left to XLA's partitioner,
    guided by sharding constraints on the inputs and the initial guess.

    **Arguments:**

    - `solver`: the parallel solver to run, e.g. [`parassm.QuasiDEER`][].
    - `mesh`: a `jax.sharding.Mesh`.
    - `axis`: the mesh axis for time (default `"seq"`).

    !!! example

        ```python
        mesh = jax.make_mesh((4,), ("seq",), axis_types=(jax.sharding.AxisType.Auto,))
        solver = parassm.Sharded(parassm.QuasiDEER(), mesh)
        sol = parassm.evaluate(f, s0, xs=xs, solver=solver)
        ```
    """

    solver: AbstractSolver
    mesh: Mesh = eqx.field(static=True)
    axis: str = eqx.field(default="seq", static=True)

    def __check_init__(self):
        if isinstance(self.solver, Sharded):
            raise ValueError("`Sharded` cannot wrap another `Sharded` solver.")
        check_mesh(self.mesh, self.axis)

    def linear_context(self):
        return _swap(ShardedScan(self.mesh, self.axis))

    def solve(self, f, s0, xs, length, init, max_steps):
        if init is None:
            init = jtu.tree_map(lambda s: jnp.broadcast_to(s, (length,) + s.shape), s0)
        with self.linear_context():
            return self.solver.solve(
                f,
                s0,
                place(xs, self.mesh, self.axis),
                length,
                place(init, self.mesh, self.axis),
                max_steps,
            )
