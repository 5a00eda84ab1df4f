import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._problem import flatten
from ..diagnostics._predict import Hardware
from ._base import AbstractSolver, check_tolerances
from .deer import DEER
from .jacobi import Jacobi
from .picard import Picard
from .quasi_deer import QuasiDEER
from .sequential import Sequential


_PARALLEL = {"DEER": DEER, "QuasiDEER": QuasiDEER, "Picard": Picard, "Jacobi": Jacobi}


class Auto(AbstractSolver):
    r"""Diagnose, then evaluate with the solver the diagnosis recommends (the default
    solver of [`parassm.evaluate`][] and [`parassm.scan`][]).

    The choice is made in two stages:

    1. Statically, from the hardware model
        ([`parassm.diagnostics.Hardware.detect`][] unless given): if even one iteration
        of the cheapest candidate cannot beat `T` sequential steps by the margin of
        [`parassm.diagnose`][] (a CPU with few cores, where a vectorised step costs
        about as much as a sequential one), Auto is [`parassm.Sequential`][] and
        nothing is diagnosed.
    2. Otherwise at run time, under `jit`: the diagnosis of [`parassm.diagnose`][]
        (LLE, a trial of each candidate on a prefix, step prediction, cost model) is
        computed from the traced problem and `lax.switch` runs the chosen solver
        (every candidate is compiled; Sequential when the system is unpredictable or
        parallel evaluation does not pay).

    `stats["solver"]` holds the index of the solver used in `("Sequential",) + solvers`
    (always present, 0 for the static choice).

    **Arguments:**

    - `solvers`: names of the parallel candidates, among `"DEER"`, `"QuasiDEER"`,
        `"Picard"` and `"Jacobi"`.
    - `rtol`, `atol`: the tolerances given to the parallel candidates (as for
        [`parassm.DEER`][]).
    - `hardware`: a [`parassm.diagnostics.Hardware`][] model; `None` detects it from
        `jax.default_backend()` when the problem is traced.
    - `proxy_length`: the length of the prefix the diagnosis runs on (`None`: the
        calibrated default).
    """

    solvers: tuple[str, ...] = ("DEER", "QuasiDEER")
    rtol: float | None = None
    atol: float | None = None
    hardware: Hardware | None = None
    proxy_length: int | None = None

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol)
        if not self.solvers:
            raise ValueError("`solvers` must name at least one parallel solver.")
        for name in self.solvers:
            if name not in _PARALLEL:
                raise ValueError(
                    f"Unknown solver {name!r} for Auto; choose from {', '.join(_PARALLEL)}."
                )

    def candidates(self) -> dict[str, AbstractSolver]:
        out: dict[str, AbstractSolver] = {"Sequential": Sequential()}
        for name in self.solvers:
            out[name] = _PARALLEL[name](rtol=self.rtol, atol=self.atol)
        return out

    def _hardware(self) -> Hardware:
        hardware = Hardware.detect() if self.hardware is None else self.hardware
        if not isinstance(hardware, Hardware):
            raise TypeError("`hardware` must be a `parassm.diagnostics.Hardware` or None.")
        return hardware

    def runs_sequentially(self, s0, length):
        from ..diagnostics._diagnose import MARGIN
        from ..diagnostics._predict import iteration_cost

        hardware = self._hardware()
        size = sum(leaf.size for leaf in jtu.tree_leaves(s0))
        cheapest = min(iteration_cost(n, size, length, hardware) for n in self.solvers)
        return cheapest * MARGIN >= length

    def solve(self, f, s0, xs, length, init, max_steps):
        from ..diagnostics._diagnose import default_settings, diagnose_flat

        hardware = self._hardware()
        dtype = jtu.tree_leaves(s0)[0].dtype
        candidates = self.candidates()

        def run(name):
            value, result, stats = candidates[name].solve(f, s0, xs, length, init, max_steps)
            return value, result, _normalise(stats, dtype)

        if self.runs_sequentially(s0, length):
            value, result, stats = run("Sequential")
            return value, result, dict(stats, solver=jnp.array(0))
        settings = default_settings(self.solvers, hardware, self.proxy_length)
        out = diagnose_flat(flatten(f, s0), xs, length, settings)
        names = out["candidates"]
        branches = [lambda name=name: run(name) for name in names]
        value, result, stats = lax.switch(out["choice"], branches)
        return value, result, dict(stats, solver=out["choice"])


def _normalise(stats: dict, dtype) -> dict:
    """One dtype per statistic, so that every candidate's stats have the same types."""

    def cast(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        if jnp.issubdtype(x.dtype, jnp.integer):
            return x.astype(jnp.result_type(int))
        return x

    return {k: cast(v) for k, v in stats.items()}
