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
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

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

    def scan(self, transition, b, *, reverse):
        n = self.mesh.shape[self.axis]
        T = b.shape[0]
        a = transition.elements()
        pad = -T % n
        # Zero maps and offsets after the end: forwards they come after every real step;
        # backwards they are visited first and leave the (zero) start state unchanged.
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
        b = jnp.pad(b, ((0, pad), (0, 0)))
        combine = _combine(transition)
        apply = transition.apply
        axis = self.axis

        def local(a, b):
            a_cum, b_cum = lax.associative_scan(combine, (a, b), reverse=reverse)
            edge = 0 if reverse else -1
            summaries = lax.all_gather((a_cum[edge], b_cum[edge]), axis)

            def through(s, summary):
                a_j, b_j = summary
                return apply(a_j[None], s[None])[0] + b_j, s

            _, incoming = lax.scan(through, jnp.zeros_like(b[0]), summaries, reverse=reverse)
            s_in = incoming[lax.axis_index(axis)]
            return b_cum + apply(a_cum, jnp.broadcast_to(s_in, b_cum.shape))

        spec = PartitionSpec(axis)
        a, b = place((a, b), self.mesh, self.axis)
        out = jax.shard_map(
            local, mesh=self.mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False
        )(a, b)
        return out[:T]


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
        mesh = jax.make_mesh((4,), ("seq",))
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
