"""Running a solver for the `parassm` command: within a time budget, with progress.

A solver is compiled once for a chunk of `CHUNK` Newton iterations (`max_steps=CHUNK`)
that starts from a given guess (`init=`). A run calls that program again from where
the last chunk stopped until the result is successful, fails, or the solver's share of
the time is spent. Every parallel solver's next iterate depends only on the current
one, so a run in chunks takes the same steps as one call, and a solver that converges
within one chunk (most of them, on predictable problems) is timed as one uninterrupted
call. The commands compile every solver before running any, so that the time left for
running is known and can be shared out. The budget is checked between chunks, never
inside XLA: compilation and one chunk always run.
"""

import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .. import AbstractSolver, evaluate, RESULTS, Sequential
from ._errors import one_line


CHUNK = 16


class Progress:
    """Progress lines on stderr, `prefix: message`, at most one per `every_s` seconds
    for `tick` (every `line` is printed)."""

    def __init__(self, prefix: str, stream: TextIO | None = None, every_s: float = 5.0):
        self.prefix = prefix
        self.stream = sys.stderr if stream is None else stream
        self.every_s = every_s
        self._last = -math.inf

    def line(self, message: str) -> None:
        print(f"{self.prefix}: {message}", file=self.stream, flush=True)
        self._last = time.perf_counter()

    def tick(self, message: str) -> None:
        if time.perf_counter() - self._last >= self.every_s:
            self.line(message)


@dataclasses.dataclass
class Outcome:
    """What running one solver gave.

    `status` is `"ok"` (successful), `"stopped"` (its time was spent first: `steps` and
    `converged` are what it reached) or `"failed"` (`result` says why: a `RESULTS`
    name, or the error that compiling or running raised).
    """

    name: str
    status: str
    result: str
    steps: int
    converged: int
    length: int
    compile_s: float | None  # None: compilation failed
    first_s: float  # the first run (warm-up), chunks included
    run_s: float | None  # median of the timed runs after the warm-up, else `first_s`
    timed_runs: int
    value: Any = dataclasses.field(repr=False, default=None)
    residual: float | None = None  # the largest scaled residual (<= 1: converged)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def note(self, predicted: int | None = None) -> str:
        """What a reader of the table needs to know about this run, or "". `predicted`:
        the steps the diagnosis predicts, for the time a stopped run still needs."""
        if self.status == "failed":
            return f"failed: {self.result}"
        if self.status != "stopped":
            return ""
        text = (
            f"stopped after {self.first_s:.3g} s (its share of the budget) with "
            f"{self.converged}/{self.length} states converged"
        )
        if self.residual is not None:
            if math.isfinite(self.residual):
                text += f", largest residual {self.residual:.2g}x the tolerance"
            else:
                text += ", the residual of its unconverged steps overflows"
        per_step = self.first_s / max(self.steps, 1)
        if predicted is not None and predicted > self.steps:
            more = predicted - self.steps
            text += f"; predicted {predicted} steps in all: about {seconds(more * per_step)} more"
        elif self.steps >= 4 * CHUNK and 0 < self.converged < self.length:
            # Enough steps to see the converged prefix crawl forward.
            rate = self.converged / self.steps
            more = math.ceil((self.length - self.converged) / rate)
            text += (
                f"; if it keeps converging {rate:.2g} states per step, about {more} more "
                f"steps ({seconds(more * per_step)})"
            )
        return text


def seconds(s: float) -> str:
    """A duration, in the unit that reads best."""
    if not math.isfinite(s):
        return "unknown"
    if s < 120:
        return f"{s:.3g} s"
    if s < 7200:
        return f"{s / 60:.3g} min"
    return f"{s / 3600:.3g} h"


def error_outcome(
    name: str, length: int, error: Exception, compile_s: float | None = None
) -> Outcome:
    """A solver whose compilation or run raised (e.g. out of memory)."""
    reason = f"{type(error).__name__}: {one_line(error)}"
    return Outcome(name, "failed", reason, 0, 0, length, compile_s, 0.0, None, 0)


def result_name(result) -> str:
    for name in ("successful", "max_steps_reached", "nonfinite"):
        if bool(result == getattr(RESULTS, name)):
            return name
    return "failed"


@dataclasses.dataclass
class Compiled:
    """A solver compiled for one problem, in chunks of `chunk` Newton iterations."""

    name: str
    program: Any  # (xs, init) -> Solution, compiled
    xs: Any
    guess: Any
    length: int
    chunk: int
    sequential: bool
    compile_s: float


def compile_solver(
    name: str,
    solver: AbstractSolver,
    f: Callable,
    s0: Any,
    xs: Any,
    length: int,
    *,
    progress: Progress,
    chunk: int = CHUNK,
) -> Compiled:
    """Compile `solver` on this problem for a chunk of `chunk` iterations from a guess."""
    guess = jtu.tree_map(lambda s: jnp.broadcast_to(s, (length,) + jnp.shape(s)), s0)

    def program(xs, init):
        return evaluate(
            f, s0, length, xs=xs, solver=solver, init=init, max_steps=chunk, throw=False
        )

    progress.line(f"{name}: compiling ...")
    start = time.perf_counter()
    compiled = jax.jit(program).lower(xs, guess).compile()
    compile_s = time.perf_counter() - start
    progress.line(f"{name}: compiled in {compile_s:.3g} s")
    return Compiled(
        name, compiled, xs, guess, length, chunk, isinstance(solver, Sequential), compile_s
    )


def compile_each(
    solvers: dict[str, AbstractSolver],
    f: Callable,
    s0: Any,
    xs: Any,
    length: int,
    *,
    progress: Callable[[str], Progress],
) -> tuple[list[Compiled], dict[str, Outcome]]:
    """`compile_solver` for each; those that fail to compile are failed outcomes."""
    compiled, failed = [], {}
    for name, solver in solvers.items():
        try:
            c = compile_solver(name, solver, f, s0, xs, length, progress=progress(name))
            compiled.append(c)
        except Exception as e:
            failed[name] = error_outcome(name, length, e)
            progress(name).line(f"{name}: compilation failed: {failed[name].result}")
    return compiled, failed


def run_compiled(c: Compiled, *, progress: Progress, **kwargs) -> Outcome:
    """`_run`, with an error (e.g. out of memory) reported as a failed outcome."""
    try:
        return _run(c, progress=progress, **kwargs)
    except Exception as e:
        outcome = error_outcome(c.name, c.length, e, c.compile_s)
        progress.line(f"{c.name}: failed: {outcome.result}")
        return outcome


def _run(
    c: Compiled,
    *,
    deadline: float,
    repeats: int,
    progress: Progress,
    on_first_chunk: Callable[[float, int], None] | None = None,
    resume: Outcome | None = None,
    predicted: int | None = None,
) -> Outcome:
    """Run until the result is successful, fails, or the clock passes `deadline`
    (`time.perf_counter()` seconds, checked between chunks; a chunk is not started if
    the last one would not fit before it). Then repeat the run up to `repeats` times
    while time remains, for the median. `resume`: a stopped outcome of this solver, to
    continue from where it stopped. `predicted`: its predicted steps, for progress."""
    name, length = c.name, c.length

    def one_run(report: bool, init, steps: int, spent: float):
        while True:
            start = time.perf_counter()
            sol = jax.block_until_ready(c.program(c.xs, init))
            took = time.perf_counter() - start
            spent += took
            steps += int(sol.stats["num_steps"])
            converged = int(sol.stats["converged_prefix"])
            result = result_name(sol.result)
            if result == "successful":
                return sol, "ok", result, steps, converged, spent
            if result != "max_steps_reached" or c.sequential or steps >= length:
                return sol, "failed", result, steps, converged, spent
            if report:
                if steps == c.chunk and on_first_chunk is not None:
                    on_first_chunk(took / c.chunk, converged)
                progress.tick(
                    f"{name}: {steps} steps, {converged}/{length} states converged, {spent:.3g} s"
                )
            if time.perf_counter() + took > deadline:
                return sol, "stopped", result, steps, converged, spent
            init = sol.value

    if resume is None:
        progress.line(f"{name}: running ...")
        start = (c.guess, 0, 0.0)
    else:
        progress.line(f"{name}: continuing with the time left ...")
        start = (resume.value, resume.steps, resume.first_s)
    sol, status, result, steps, converged, first_s = one_run(True, *start)
    runs = []
    while status == "ok" and len(runs) < repeats and time.perf_counter() + first_s <= deadline:
        runs.append(one_run(False, c.guess, 0, 0.0)[-1])
    outcome = Outcome(
        name=name,
        status=status,
        result=result,
        steps=steps,
        converged=converged,
        length=length,
        compile_s=c.compile_s,
        first_s=first_s,
        run_s=statistics.median(runs) if runs else first_s,
        timed_runs=len(runs),
        value=sol.value,
        residual=float(sol.stats["residual"]),
    )
    if status == "ok":
        progress.line(f"{name}: done: {steps} steps, {outcome.run_s:.3g} s per run")
    else:
        progress.line(f"{name}: {outcome.note(predicted)}")
    return outcome


def run_in_turn(
    compiled: list[Compiled],
    *,
    deadline: float,
    repeats: int,
    progress: Callable[[str], Progress],
    on_first_chunk: Callable[[str], Callable[[float, int], None]] | None = None,
    predicted: dict[str, int] | None = None,
) -> dict[str, Outcome]:
    """Run each in turn, each within an equal share of the time left before `deadline`
    (time one leaves unused goes to those after it). Then those stopped continue, in
    turn, with whatever time is left."""
    outcomes: dict[str, Outcome] = {}
    for i, c in enumerate(compiled):
        share = max(deadline - time.perf_counter(), 0.0) / (len(compiled) - i)
        outcomes[c.name] = run_compiled(
            c,
            deadline=time.perf_counter() + share,
            repeats=repeats,
            progress=progress(c.name),
            on_first_chunk=None if on_first_chunk is None else on_first_chunk(c.name),
            predicted=None if predicted is None else predicted.get(c.name),
        )
    stopped = [c for c in compiled if outcomes[c.name].status == "stopped"]
    for i, c in enumerate(stopped):
        share = (deadline - time.perf_counter()) / (len(stopped) - i)
        if share <= outcomes[c.name].first_s / max(outcomes[c.name].steps, 1) * c.chunk:
            continue  # not even one more chunk would fit
        outcomes[c.name] = run_compiled(
            c,
            deadline=time.perf_counter() + share,
            repeats=repeats,
            progress=progress(c.name),
            resume=outcomes[c.name],
            predicted=None if predicted is None else predicted.get(c.name),
        )
    return outcomes


def max_error(value: Any, reference: Any, upto: int | None = None) -> float | None:
    """The largest |value - reference| over the first `upto` steps (all by default);
    None if there is nothing to compare or the difference is not finite."""
    errors = []
    for a, b in zip(jtu.tree_leaves(value), jtu.tree_leaves(reference)):
        a, b = a[:upto], b[:upto]
        if a.size:
            errors.append(float(jnp.max(jnp.abs(a.astype(b.dtype) - b))))
    error = max(errors) if errors else math.nan
    return error if math.isfinite(error) else None
