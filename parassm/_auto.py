"""`parassm.Auto`: choose a solver from measurements, on the host, at trace time.

Auto sits above both the solvers and the diagnostics (it imports them; neither imports
it). The decision is a Python object made when the problem is traced, so one program
is compiled (the chosen solver's) and a `vmap` batch gets one decision. It combines:

- a model of the hardware measured on this machine (`diagnostics/_hardware.py`,
  cached on disk) and the flops of one step of `f` (counted on its jaxpr);
- a diagnosis of the problem (LLE, trials of each candidate on a prefix, predicted
  steps), run on the host on concrete values, once per problem signature (the
  structure and static parts of `f`, the shapes and dtypes of every array, the
  candidates and `T` rounded to a power of two) and cached in memory.
"""

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._jit import split_static, WeakLRU
from ._problem import check_state, is_concrete, time_length
from ._solvers._base import AbstractSolver, check_tolerances
from ._solvers._parallel import AbstractParallelSolver
from ._solvers.deer import DEER
from ._solvers.quasi_deer import QuasiDEER
from ._solvers.sequential import Sequential
from .diagnostics._diagnose import (
    choose,
    choose_shooting,
    costs,
    default_settings,
    diagnosis_arrays,
    MARGIN,
    problem_flops,
    REGIMES,
)
from .diagnostics._hardware import Hardware


class Decision(NamedTuple):
    """What the diagnosis of one problem signature found."""

    regime: str
    steps: tuple[int, ...]
    lle: float
    seconds: float
    # `(chunk length, predicted coarse iterations)` of multiple shooting, where the
    # diagnosis trialled it; else None.
    shooting: tuple[int, int] | None = None


_CACHE_SIZE = 256
# Keyed on the problem's signature, which holds the identity of `f` (and of any other
# static leaf compared by identity) only weakly: an entry goes when `f` does, so a
# cached diagnosis never keeps a step function, or the programs compiled for it, alive.
_DECISIONS = WeakLRU(_CACHE_SIZE)
_FLOPS = WeakLRU(_CACHE_SIZE)


def clear_cache() -> None:
    """Forget every cached diagnosis (e.g. after changing the arrays `f` closes over
    so much that the problem's predictability may have changed)."""
    _DECISIONS.clear()
    _FLOPS.clear()


def length_bucket(length: int) -> int:
    """`T` rounded to the nearest power of two: problems whose lengths differ by less
    than a factor of about 1.4 share a diagnosis."""
    return 2 ** round(math.log2(max(length, 1)))


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def signature(f: Callable, s0: PyTree, xs: PyTree | None, length: int) -> tuple[tuple, list]:
    """`(key, owners)`: the key of a problem is the structure and static parts of
    `(f, s0, xs)`, the shape and dtype of every array in them (not their values:
    `jax.jit` traces those) and the length bucket; equal for the same problem eagerly
    and under `jit`/`vmap`. Static parts compared by identity (functions) enter the key
    by `id`, and are the `owners` whose garbage collection drops the entry."""
    leaves, treedef = jtu.tree_flatten((f, s0, xs))
    arrays = [("array", tuple(x.shape), jnp.dtype(x.dtype).name) for x in leaves if _is_array(x)]
    static, _, owners = split_static([x for x in leaves if not _is_array(x)])
    mask = tuple(_is_array(x) for x in leaves)
    return (treedef, mask, tuple(arrays), static, length_bucket(length)), owners


class Auto(AbstractSolver):
    r"""Choose the solver from measurements, then evaluate with it (the default solver of
    [`parassm.evaluate`][], [`parassm.scan`][] and [`parassm.nn.ParallelRNN`][]).

    The choice is made on the host when the problem is traced, so only the chosen
    solver is compiled, and a `jax.vmap` batch gets one decision:

    1. **Static**: with the hardware model measured on this machine
        ([`parassm.diagnostics.Hardware.detect`][], cached on disk) and the flops of one
        step of `f`, if even one Newton step of the cheapest candidate cannot beat `T`
        sequential steps by a factor 1.5 (a CPU with few cores, short sequences, large
        states), Auto is [`parassm.Sequential`][] and nothing is diagnosed.
    2. **Diagnosed**: otherwise, when the problem's values are concrete (an eager call
        of `evaluate`, or [`parassm.Auto.decide`][]), the diagnosis of
        [`parassm.diagnose`][] (LLE and a short trial of each candidate on a prefix,
        with Auto's tolerances) runs once on the host and is cached per problem
        signature: the structure and static parts of `f`, the shapes and dtypes of
        every array (not their values) and `T` rounded to a power of two. The predicted
        times pick the candidate, or Sequential if parallel evaluation is not at least
        1.5x cheaper, or if the regime is not "predictable": unpredictable (LLE > 0) or
        marginal (periodic orbits, where a constant initial guess carries no phase and
        Newton crawls; flows with an LLE about zero). In the marginal regime, a system
        that contracts (LLE < 0) on which the candidates crawl (a long memory, e.g. a
        weakly damped oscillator) gets [`parassm.MultipleShooting`][] with `shooting`
        on the chunk ends and chunks of `4 / |LLE|` steps (at least $\sqrt{T}$), if
        its own trial (on the first 16 chunks) predicts it 1.5x cheaper than
        Sequential.
    3. **Under a transformation** (`jax.jit`, `jax.vmap`, `jax.grad` of a function
        that calls `evaluate`), the values are tracers: Auto uses the cached diagnosis
        of the same signature if there is one, and otherwise Sequential, which is never
        catastrophically slow (a parallel solver on an unpredictable problem would be).
        Call `evaluate` once eagerly, or `Auto().decide(f, s0, xs=xs)`, with
        representative values to let Auto pick a parallel solver inside `jit`.

    `stats["solver"]` holds the index of the solver used in
    `("Sequential",) + candidates + ("MultipleShooting",)`.

    **Arguments:**

    - `candidates`: the parallel solvers to choose from, as instances (e.g.
        `(parassm.DEER(), parassm.QuasiDEER(parassm.HutchinsonDiagonal()))`);
        Sequential is always a candidate.
    - `shooting`: the parallel solver that [`parassm.MultipleShooting`][] runs on the
        chunk ends where Auto chooses multiple shooting (default [`parassm.DEER`][]);
        None never chooses it.
    - `rtol`, `atol`: when given, they replace the candidates' (and `shooting`'s) own
        tolerances, in the trials and in the evaluation (as for [`parassm.DEER`][]).
    - `hardware`: a [`parassm.diagnostics.Hardware`][] model; `None` measures it
        (once per device kind and dtype, see `docs/diagnostics.md`).
    - `proxy_length`: the length of the prefix the diagnosis trials run on (`None`: the
        calibrated default).
    """

    candidates: tuple[AbstractParallelSolver, ...] = eqx.field(
        default=(DEER(), QuasiDEER()), converter=tuple
    )
    shooting: AbstractParallelSolver | None = DEER()
    rtol: float | None = None
    atol: float | None = None
    hardware: Hardware | None = None
    proxy_length: int | None = None

    def __check_init__(self):
        check_tolerances(self.rtol, self.atol)
        if not self.candidates:
            raise TypeError(
                "`candidates` must be a non-empty sequence of parallel solver instances, e.g. "
                f"`(parassm.DEER(), parassm.QuasiDEER())`; got {self.candidates!r}."
            )
        for candidate in self.candidates:
            if not isinstance(candidate, AbstractParallelSolver):
                raise TypeError(
                    "Every Auto candidate must be a parallel solver instance such as "
                    f"`parassm.DEER()` (Sequential is always included); got {candidate!r}."
                )
        if self.shooting is not None and not isinstance(self.shooting, AbstractParallelSolver):
            raise TypeError(
                "`shooting` is the parallel solver multiple shooting runs on the chunk ends "
                f"(e.g. `parassm.DEER()`) or None; got {self.shooting!r}."
            )
        if self.hardware is not None and not isinstance(self.hardware, Hardware):
            raise TypeError("`hardware` must be a `parassm.diagnostics.Hardware` or None.")
        if self.proxy_length is not None and self.proxy_length < 1:
            raise ValueError(f"`proxy_length` must be at least 1, got {self.proxy_length}.")

    def _tolerances(self, solver: AbstractParallelSolver) -> AbstractParallelSolver:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None:
                solver = eqx.tree_at(
                    lambda c: getattr(c, name), solver, value, is_leaf=lambda x: x is None
                )
        return solver

    def configured(self) -> tuple[AbstractParallelSolver, ...]:
        """The candidates with Auto's `rtol` and `atol`, where given."""
        return tuple(self._tolerances(candidate) for candidate in self.candidates)

    def configured_shooting(self) -> AbstractParallelSolver | None:
        """`shooting` with Auto's `rtol` and `atol`, where given."""
        return None if self.shooting is None else self._tolerances(self.shooting)

    def _measure(self, f, s0, xs, length) -> tuple[Hardware, float, int]:
        dtype = jtu.tree_leaves(s0)[0].dtype
        hardware = Hardware.detect(dtype) if self.hardware is None else self.hardware
        key, owners = signature(f, s0, xs, 1)
        flops = _FLOPS.get(key)
        if flops is None:
            flops = problem_flops(f, s0, xs)
            _FLOPS.put(key, flops, owners)
        size = sum(leaf.size for leaf in jtu.tree_leaves(s0))
        return hardware, flops, size

    def _static_sequential(self, f, s0, xs, length) -> bool:
        hardware, flops, size = self._measure(f, s0, xs, length)
        candidates = self.configured()
        ones = [1] * len(candidates)
        # Multiple shooting is not costed here: it is only considered where the
        # diagnosis finds the candidates crawling, and without the diagnosis' LLE its
        # chunk (so its cost) is unknown.
        sequential, one_step = costs(candidates, ones, size, flops, length, hardware)
        return min(one_step) * MARGIN >= sequential

    def _key(self, f, s0, xs, length):
        configured = self.configured(), self.configured_shooting()
        key, owners = signature(f, s0, xs, length)
        return (key, configured, self.proxy_length), owners

    def diagnosis(self, f, s0, xs, length) -> Decision | None:
        """The cached diagnosis of this problem's signature, running it now if the
        values are concrete and it is not cached; None otherwise."""
        key, owners = self._key(f, s0, xs, length)
        decision = _DECISIONS.get(key)
        if decision is None and is_concrete((f, s0, xs)):
            start = time.perf_counter()
            settings = default_settings(
                self.configured(), self.proxy_length, lle_steps=256, conditioning=False
            )
            out = diagnosis_arrays(f, s0, xs, length, settings, self.configured_shooting())
            shooting = None
            if bool(out["finite"]):
                regime = REGIMES[int(out["regime"])]
                steps = tuple(int(k) for k in out["predicted"])
                if out["shooting"] is not None:
                    shooting = (out["shooting"]["chunk"], int(out["shooting"]["predicted"]))
            else:
                # Nothing to predict from: Sequential, which reports the non-finite
                # step as such.
                regime, steps = "marginal", (length,) * len(settings.solvers)
            decision = Decision(
                regime=regime,
                steps=steps,
                lle=float(out["lle"]),
                seconds=time.perf_counter() - start,
                shooting=shooting,
            )
            _DECISIONS.put(key, decision, owners)
        return decision

    def _choice(self, f, s0, xs, length) -> tuple[int, AbstractSolver]:
        """`(index, solver)`: index 0 for Sequential, `i + 1` for candidate `i`,
        `len(candidates) + 1` for multiple shooting."""
        if self._static_sequential(f, s0, xs, length):
            return 0, Sequential()
        decision = self.diagnosis(f, s0, xs, length)
        if decision is None:
            return 0, Sequential()
        hardware, flops, size = self._measure(f, s0, xs, length)
        candidates = self.configured()
        sequential, parallel = costs(candidates, decision.steps, size, flops, length, hardware)
        best = choose(sequential, parallel, decision.steps, decision.regime, length)
        if best is not None:
            return best + 1, candidates[best]
        shooting = self.configured_shooting()
        if shooting is not None and decision.shooting is not None:
            chunk, steps = decision.shooting
            _, shooter = choose_shooting(
                shooting, chunk, steps, sequential, size, flops, length, hardware
            )
            if shooter is not None:
                return len(candidates) + 1, shooter
        return 0, Sequential()

    def decide(
        self, f: Callable, s0: PyTree[Array], T: int | None = None, *, xs: PyTree | None = None
    ) -> AbstractSolver:
        """The solver Auto will use for this problem (and for every problem of the same
        signature, including inside `jax.jit`), diagnosing it now on these values if
        needed. Arguments as for [`parassm.evaluate`][]."""
        length = time_length(xs, T)
        s0 = check_state(s0, floating=True)
        return self._choice(f, s0, xs, length)[1]

    def prepare(self, f, s0, xs, length):
        if is_concrete((f, s0, xs)) and not self._static_sequential(f, s0, xs, length):
            self.diagnosis(f, s0, xs, length)

    def select(self, f, s0, xs, length):
        index, solver = self._choice(f, s0, xs, length)
        return solver, dict(solver=jnp.array(index))

    def solve(self, f, s0, xs, length, init, max_steps):
        solver, extra = self.select(f, s0, xs, length)
        value, result, stats = solver.solve(f, s0, xs, length, init, max_steps)
        return value, result, dict(stats, **extra)
