"""The core benchmark: every solver against `jax.lax.scan`, in the same process.

Problems: the random GRU (`D` in {8, 64, 256}, `T` in {1e3, 1e4, 1e5}), the mean-field
RNN (a predictable gain and a chaotic one) and the two-well Langevin sampler. For each
problem the sequential `lax.scan` baseline is timed first, then every solver; each row
records compile seconds, the median run time (after a warm-up, with
`block_until_ready`), Newton steps, the result code, the largest error against
`lax.scan` and the speed-up over it. Combinations that cannot run in reasonable time or
memory on the machine are written as `skipped` rows with the reason, never dropped.

It also measures the cost of ONE quasi-DEER iteration against its floor (one
vectorised `f`, one JVP and one diagonal scan), on the GRU with `D = 16`,
`T = 1e5`, float32: see `iteration_vs_floor`.

    python bench/core.py --profile quick            # minutes
    python bench/core.py --profile full             # the whole grid (tens of minutes on 2 cores)
    python bench/core.py --only floor               # just the iteration/floor ratio

Rows go to `bench/results/core_<backend>.json` (a JSON list) unless `--out` says
otherwise.
"""

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import parassm
import parassm.linear
from parassm._solvers._measure import Problem as LoopProblem
from parassm._timing import environment, measure
from parassm.systems import GRU, MeanFieldRNN, TwoWellLangevin


HERE = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"


# A fixed model of a wide machine (an accelerator), for decisions made on this host.
WIDE = parassm.diagnostics.Hardware(
    step_latency=5e-6,
    sequential_flops=1e9,
    call_latency=5e-6,
    vector_flops=1e13,
    name="wide (GPU-like model)",
)


# --------------------------------------------------------------------------- stamps


def git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=HERE,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "parassm"],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp(dtype) -> dict[str, Any]:
    """What every JSON row carries: code version, software, hardware, dtype, time."""
    return dict(
        git_sha=git_sha(),
        **environment(),
        cpu_count=os.cpu_count(),
        dtype=jnp.dtype(dtype).name,
        timestamp=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def result_name(result) -> str:
    for name in parassm.RESULTS._name_to_item:
        if bool(result == getattr(parassm.RESULTS, name)):
            return name
    return "unknown"


# --------------------------------------------------------------------------- problems


@dataclasses.dataclass
class Problem:
    name: str  # e.g. "gru"
    label: str  # e.g. "gru D=64"
    system: Any
    T: int
    D: int
    params: dict
    batch: int = 1  # > 1: that many independent input sequences, under `jax.vmap`

    def inputs(self):
        if self.batch == 1:
            return self.system.inputs(self.T)
        keys = [jr.key(1000 + i) for i in range(self.batch)]
        return jnp.stack([self.system.inputs(self.T, key=k) for k in keys])


def gru(D: int, T: int, dtype) -> Problem:
    system = GRU(hidden_size=D, input_size=4, dtype=dtype)
    return Problem("gru", f"gru D={D}", system, T, D, dict(hidden_size=D, input_size=4))


def mean_field(g: float, T: int, dtype, D: int = 100) -> Problem:
    system = MeanFieldRNN(size=D, g=g, dtype=dtype)
    return Problem("mean_field", f"mean_field g={g}", system, T, D, dict(size=D, g=g))


def two_well(T: int, dtype) -> Problem:
    system = TwoWellLangevin(dtype=dtype)
    return Problem("two_well", "two_well", system, T, 2, dict(step=0.01, separation=2.0))


# --------------------------------------------------------------------------- solvers


@dataclasses.dataclass
class Profile:
    gru_D: tuple[int, ...]
    gru_T: tuple[int, ...]
    mean_field: tuple[tuple[float, int], ...]  # (g, T)
    two_well_T: tuple[int, ...]
    repeats: int
    # Caps on iterations for the solvers that may need ~T of them (reported honestly as
    # `max_steps_reached` when hit).
    cap_zeroth_order: int
    cap_first_order: int
    # Feasibility limits for dense Jacobians on this machine (numbers per array, work
    # per iteration): beyond them a combination is skipped with the reason.
    dense_numbers: float
    dense_work: float
    # A solver run expected to exceed this many seconds is timed once instead of
    # `repeats` times.
    long_run_s: float
    floor_T: int
    floor_rounds: int
    machine: str = f"{os.cpu_count()} CPU cores"
    sweep_gains: tuple[float, ...] = (0.4, 0.7, 0.9, 1.1, 1.3, 1.6, 2.0)
    sweep_cap: int = 300


PROFILES = {
    "quick": Profile(
        gru_D=(8, 64),
        gru_T=(1_000, 10_000),
        mean_field=((0.8, 1_000), (1.5, 1_000)),
        two_well_T=(1_000, 10_000),
        repeats=3,
        cap_zeroth_order=100,
        cap_first_order=100,
        dense_numbers=2e7,
        dense_work=3e9,
        long_run_s=2.0,
        floor_T=100_000,
        floor_rounds=9,
    ),
    "full": Profile(
        gru_D=(8, 64, 256),
        gru_T=(1_000, 10_000, 100_000),
        mean_field=((0.8, 1_000), (1.5, 1_000), (0.8, 10_000)),
        two_well_T=(1_000, 10_000, 100_000),
        repeats=5,
        cap_zeroth_order=300,
        cap_first_order=300,
        dense_numbers=5e7,
        dense_work=2e10,
        long_run_s=4.0,
        floor_T=100_000,
        floor_rounds=21,
    ),
}


@dataclasses.dataclass
class Plan:
    name: str
    solver: Any
    max_steps: int | None = None
    skip: str | None = None
    note: str = ""


def forms_dense(solver, size: int) -> bool:
    """Whether `solver` forms dense maps of a state of `size` components on this
    backend: DEER does not where its scans are sequential (`tangent_maps`)."""
    tangent_maps = getattr(solver, "tangent_maps", None)
    return not (tangent_maps is not None and tangent_maps(size))


def plan_solvers(problem: Problem, profile: Profile) -> list[Plan]:
    """The solvers to run on `problem`, with caps and skips (and why)."""
    T, D, B = problem.T, problem.D, problem.batch
    dense_numbers = B * T * D * D  # one (T, D, D) array of Jacobians per sequence
    dense_work = B * T * D**3  # one dense composition per scan element
    # The exact diagonal / blocks take D JVPs; batching them bounds the transient
    # (T, batch, D) tangents to about `dense_numbers` numbers.
    batch = (
        None
        if dense_numbers <= profile.dense_numbers
        else max(1, int(profile.dense_numbers // (B * T * D)))
    )
    too_dense = None
    if dense_numbers > profile.dense_numbers or dense_work > profile.dense_work:
        too_dense = (
            f"dense Jacobians: (batch*)T*D^2 = {dense_numbers:.1e} numbers per array "
            f"and T*D^3 = {dense_work:.1e} flops per scan level exceed this profile's "
            f"limits ({profile.dense_numbers:.0e}, {profile.dense_work:.0e}) on "
            f"{profile.machine}"
        )
    d_jvps = None
    if dense_work > 10 * profile.dense_work:
        d_jvps = (
            f"D = {D} JVPs per iteration cost T*D^3 = {dense_work:.1e} flops, over 10x "
            f"this profile's limit ({profile.dense_work:.0e})"
        )
    cap0 = min(T, profile.cap_zeroth_order)
    cap1 = min(T, profile.cap_first_order)
    capped0 = f"capped at max_steps={cap0} (may need ~T={T})" if cap0 < T else ""
    capped1 = f"capped at max_steps={cap1}" if cap1 < T else ""
    block = 4 if D % 4 == 0 else (2 if D % 2 == 0 else 1)
    deer = parassm.DEER()
    plans = [
        Plan(
            "DEER",
            deer,
            max_steps=cap1,
            skip=too_dense if forms_dense(deer, D) else None,
            note=capped1,
        ),
        Plan(
            "QuasiDEER",
            parassm.QuasiDEER(parassm.ExactDiagonal(batch_size=batch)),
            max_steps=cap1,
            skip=d_jvps,
            note=capped1 + (f"; JVP batch_size={batch}" if batch else ""),
        ),
        Plan(
            "QuasiDEER(Hutchinson)",
            parassm.QuasiDEER(parassm.HutchinsonDiagonal(num_samples=1)),
            max_steps=cap1,
            note=capped1,
        ),
        Plan(
            f"BlockQuasiDEER({block})",
            parassm.BlockQuasiDEER(block, batch_size=batch),
            max_steps=cap1,
            skip=d_jvps,
            note=capped1 + (f"; JVP batch_size={batch}" if batch else ""),
        ),
        Plan("Picard", parassm.Picard(), max_steps=cap0, note=capped0),
        Plan("Jacobi", parassm.Jacobi(), max_steps=cap0, note=capped0),
    ]
    return plans


# --------------------------------------------------------------------------- LLE


def largest_lyapunov(system, xs, steps: int = 2_000) -> float:
    """The largest Lyapunov exponent per step along the sequential trajectory: push a
    tangent vector through the Jacobians (one JVP per step), renormalise, and average
    the log growth. Deliberately independent of `parassm.diagnostics`, so the benchmark
    can check the diagnostics rather than rely on them."""
    xs = jax.tree_util.tree_map(lambda x: x[:steps], xs)
    v0 = jnp.ones_like(system.s0) / jnp.sqrt(jnp.asarray(system.s0.size, system.s0.dtype))

    def step(carry, x):
        s, v = carry
        s_new, w = jax.jvp(lambda s: system.f(s, x), (s,), (v,))
        norm = jnp.linalg.norm(w)
        return (s_new, w / norm), jnp.log(norm)

    _, logs = jax.jit(lambda xs: jax.lax.scan(step, (system.s0, v0), xs))(xs)
    # Skip the transient while the vector aligns with the leading direction.
    burn = logs.shape[0] // 10
    return float(jnp.mean(logs[burn:]))


# --------------------------------------------------------------------------- running


def sequential_fn(system, batch: int = 1) -> Callable:
    def run(xs):
        def step(s, x):
            s = system.f(s, x)
            return s, s

        return jax.lax.scan(step, system.s0, xs)[1]

    return run if batch == 1 else jax.vmap(run)


def solver_fn(system, solver, max_steps, batch: int = 1) -> Callable:
    def run(xs):
        return parassm.evaluate(
            system.f, system.s0, xs=xs, solver=solver, max_steps=max_steps, throw=False
        )

    return run if batch == 1 else jax.vmap(run)


def batch_result(result) -> str:
    """The result name, or for a batch the first failure and how many failed."""
    ok = np.asarray(result == parassm.RESULTS.successful)
    if ok.ndim == 0:
        return result_name(result)
    if ok.all():
        return "successful"
    first = int(np.argmin(ok))
    name = result_name(jax.tree_util.tree_map(lambda x: x[first], result))
    return f"{name} ({int((~ok).sum())}/{ok.size})"


def time_once(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def run_problem(
    problem: Problem,
    profile: Profile,
    dtype,
    base: dict,
    *,
    bench: str = "core",
    deadline: float = math.inf,
) -> list[dict]:
    """Time `lax.scan` and every planned solver on `problem`; solvers not started by
    `deadline` (a `time.perf_counter()` value) are recorded as skipped."""
    B = problem.batch
    xs = problem.inputs()
    row0 = dict(
        bench=bench,
        problem=problem.name,
        label=problem.label,
        params=problem.params,
        T=problem.T,
        D=problem.D,
        batch=B,
        lle=largest_lyapunov(problem.system, xs if B == 1 else xs[0]),
        **base,
    )
    reference, ref_compile, ref_run = measure(
        sequential_fn(problem.system, B), xs, repeats=profile.repeats
    )
    rows = [
        dict(
            row0,
            solver="lax.scan",
            compile_s=ref_compile,
            run_s=ref_run,
            steps=0,
            max_steps=0,
            result="successful",
            max_err=0.0,
            speedup=1.0,
            skipped=False,
            note="baseline",
        )
    ]
    print_row(rows[-1])
    # Sequential() through parassm.evaluate: the overhead of the entry point itself.
    plans = [Plan("Sequential", parassm.Sequential())] + plan_solvers(problem, profile)
    for plan in plans:
        if plan.skip is None and time.perf_counter() > deadline:
            plan.skip = "time budget of the run exhausted before this solver started"
        if plan.skip is not None:
            rows.append(dict(row0, solver=plan.name, skipped=True, note=plan.skip))
            print_row(rows[-1])
            continue
        fn = solver_fn(problem.system, plan.solver, plan.max_steps, B)
        # One untimed probe run (after an AOT compile, which is timed by `measure`
        # below) decides whether repeats are affordable.
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(xs).compile()
        probe_compile = time.perf_counter() - start
        start = time.perf_counter()
        sol = jax.block_until_ready(compiled(xs))
        probe = time.perf_counter() - start
        if probe < profile.long_run_s:
            repeats = profile.repeats
            # `measure` compiles again (a cache hit by now): the first compile is the
            # one to report.
            sol, _, run_s = measure(fn, xs, repeats=repeats)
        else:
            # A long run: the probe (the first run after compiling) is the timing;
            # one-off costs are small next to it, and repeating it would cost minutes.
            repeats = 1
            run_s = probe
            plan.note = (plan.note + "; " if plan.note else "") + "timed once"
        compile_s = probe_compile
        err = float(jnp.max(jnp.abs(sol.value - reference)))
        rows.append(
            dict(
                row0,
                solver=plan.name,
                compile_s=compile_s,
                run_s=run_s,
                repeats=repeats,
                steps=int(jnp.max(sol.stats["num_steps"])),
                max_steps=int(jnp.max(sol.stats["max_steps"])),
                result=batch_result(sol.result),
                residual=float(jnp.max(sol.stats["residual"])),
                max_err=err,
                speedup=ref_run / run_s,
                skipped=False,
                note=plan.note,
            )
        )
        print_row(rows[-1])
    return rows


def print_header() -> None:
    print(
        f"{'problem':<20}{'T':>8}  {'solver':<24}{'compile s':>10}{'run s':>10}"
        f"{'x scan':>8}{'steps':>7}  {'result':<18}{'max err':>9}  note"
    )
    print("-" * 132)


def print_row(r: dict) -> None:
    if r.get("skipped"):
        print(f"{r['label']:<20}{r['T']:>8}  {r['solver']:<24}SKIPPED: {r['note']}")
        return
    speed = r["speedup"]
    print(
        f"{r['label']:<20}{r['T']:>8}  {r['solver']:<24}{r['compile_s']:>10.2f}"
        f"{r['run_s']:>10.4f}{speed:>8.2f}{r['steps']:>7}  {r['result']:<18}"
        f"{r['max_err']:>9.1e}  {r.get('note', '')}",
        flush=True,
    )


# --------------------------------------------------------------------------- floor


def interleaved(fns: dict[str, Callable], args: dict[str, tuple], rounds: int) -> dict:
    """Time compiled functions round-robin (so that load from other processes hits them
    alike); returns every timing per name."""
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_once(fn, *args[name]))
    return times


def cost(compiled) -> dict:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {
        "flops": float(analysis.get("flops", float("nan"))),
        "bytes_accessed": float(analysis.get("bytes accessed", float("nan"))),
    }


def iteration_vs_floor(D: int, T: int, dtype, rounds: int, base: dict) -> list[dict]:
    """One quasi-DEER iteration against its floor, measured in the same process.

    iteration = time(evaluate, max_steps=1) - time(evaluate, max_steps=0), paired per
    round. With `max_steps=0` the solver evaluates (and linearises) `f` once, measures
    the residual and stops; with `max_steps=1` it does that, one update (diagonal, scan,
    safeguards) and a second residual evaluation. So the difference is one full Newton
    iteration as the solver loop runs it.

    floor = jit of: `vmap(f)` over T, one `jax.jvp` of `vmap(f)` (one probe vector) and
    one `parassm.linear.solve` with a `Diagonal` transition (the Hutchinson update
    `S + solve(Diagonal(v * Jv), f(S_prev) - S)`).
    """
    system = GRU(hidden_size=D, input_size=4, dtype=dtype)
    xs = system.inputs(T)
    S = jnp.broadcast_to(system.s0, (T, D))
    v = jr.rademacher(jr.key(0), (T, D), dtype=S.dtype)
    a = jnp.full((T, D), 0.5, S.dtype)

    # Every array of size T is an argument, never a closed-over constant: XLA would
    # constant-fold through it at compile time and time something else.
    def step(s_prev, xs):
        return jax.vmap(system.f)(s_prev, xs)

    def shift(S):
        return jnp.concatenate([system.s0[None], S[:-1]])

    def floor(S, v, xs):
        s_prev = shift(S)
        fs = step(s_prev, xs)
        _, jv = jax.jvp(lambda s: step(s, xs), (s_prev,), (v,))
        return S + parassm.linear.solve(parassm.linear.Diagonal(v * jv), fs - S)

    def f_only(S, xs):
        return step(shift(S), xs)

    def jvp_only(S, v, xs):
        return jax.jvp(lambda s: step(s, xs), (shift(S),), (v,))

    def scan_only(a, b):
        return parassm.linear.solve(parassm.linear.Diagonal(a), b)

    def linearize_apply(S, v, xs):
        # What the solver loop does instead of `jax.jvp`: linearise once (saving the
        # residuals), then apply the linear map.
        fs, lin = jax.linearize(lambda s: step(s, xs), shift(S))
        return fs, lin(v)

    def probes(key):
        # The Hutchinson probe the solver draws every iteration (threefry on CPU).
        return jr.rademacher(key, (1, T, D), dtype=S.dtype)

    def exact_diag_only(S, xs):
        # The values and the exact diagonals as QuasiDEER forms them (`D` JVPs).
        problem = LoopProblem(system.f, lambda s: s, xs, system.s0, T)
        return parassm.ExactDiagonal()(problem, shift(S), jnp.array(0))

    fns = dict(
        floor=(floor, (S, v, xs)),
        f=(f_only, (S, xs)),
        jvp=(jvp_only, (S, v, xs)),
        diagonal_scan=(scan_only, (a, S)),
        linearize_apply=(linearize_apply, (S, v, xs)),
        rademacher_probe=(probes, (jr.key(1),)),
        exact_diagonal_jvps=(exact_diag_only, (S, xs)),
    )
    solvers = {
        "ExactDiagonal": parassm.QuasiDEER(parassm.ExactDiagonal()),
        "HutchinsonDiagonal(1)": parassm.QuasiDEER(parassm.HutchinsonDiagonal(num_samples=1)),
        # No JVP at all (a constant diagonal): its iteration minus (f + scan) is the
        # cost of the shared loop itself (residual test, safeguards, cond, carry).
        "FunctionDiagonal(const)": parassm.QuasiDEER(
            parassm.FunctionDiagonal(lambda s, x: jnp.full_like(s, 0.5))
        ),
    }
    for label, solver in solvers.items():
        for ms in (0, 1):

            def run(xs, solver=solver, ms=ms):
                sol = parassm.evaluate(
                    system.f, system.s0, xs=xs, solver=solver, max_steps=ms, throw=False
                )
                return sol.value

            fns[f"{label} max_steps={ms}"] = (run, (xs,))

    compiled, args, costs, compile_s = {}, {}, {}, {}
    for name, (fn, fn_args) in fns.items():
        start = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(*fn_args).compile()
        compile_s[name] = time.perf_counter() - start
        args[name] = fn_args
        costs[name] = cost(compiled[name])
    times = interleaved(compiled, args, rounds)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    floor_times = times["floor"]
    # The same three pieces jitted separately: what a floor without any fusion
    # trouble would cost.
    pieces = med["f"] + med["jvp"] + med["diagonal_scan"]
    rows = []
    print(
        f"\nquasi-DEER iteration vs floor: GRU D={D}, T={T}, {jnp.dtype(dtype).name}, "
        f"{rounds} interleaved rounds (median seconds)"
    )
    for name in fns:
        print(
            f"  {name:<36}{med[name]:>10.4f}   flops {costs[name]['flops']:.2e}"
            f"   bytes {costs[name]['bytes_accessed']:.2e}"
        )
    one = {}
    for label in solvers:
        t0 = times[f"{label} max_steps=0"]
        t1 = times[f"{label} max_steps=1"]
        paired = [b - a for a, b in zip(t0, t1)]
        iteration = statistics.median(paired)
        one[label] = iteration
        ratio = iteration / med["floor"]
        ratio_rounds = [d / fl for d, fl in zip(paired, floor_times)]
        q = np.percentile(ratio_rounds, [25, 75])
        print(
            f"  {label}: one iteration {iteration:.4f} s, floor {med['floor']:.4f} s, "
            f"ratio {ratio:.2f} (per-round ratio interquartile {q[0]:.2f}-{q[1]:.2f}); "
            f"target <= 1.5: {'met' if ratio <= 1.5 else 'NOT met'}; against the sum of "
            f"the separately jitted pieces ({pieces:.4f} s): {iteration / pieces:.2f}"
        )
        rows.append(
            dict(
                bench="core_floor",
                problem="gru",
                label=f"gru D={D}",
                T=T,
                D=D,
                solver=f"QuasiDEER({label})",
                iteration_s=iteration,
                floor_s=med["floor"],
                ratio=ratio,
                ratio_iqr=[float(q[0]), float(q[1])],
                floor_pieces_s=pieces,
                ratio_vs_pieces=iteration / pieces,
                rounds=rounds,
                pieces_s={name: med[name] for name in fns},
                compile_s=compile_s,
                cost_analysis=costs,
                **base,
            )
        )
    # Where the time of a Hutchinson iteration goes, from the same run's medians.
    loop = one["FunctionDiagonal(const)"] - med["f"] - med["diagonal_scan"]
    jvp_in_loop = one["HutchinsonDiagonal(1)"] - one["FunctionDiagonal(const)"]
    print(
        "  breakdown of one HutchinsonDiagonal(1) iteration: "
        f"loop overhead (FunctionDiagonal iteration - f - scan) {loop:.4f} s; "
        f"linearise + JVP + probe in the loop (Hutchinson - FunctionDiagonal) "
        f"{jvp_in_loop:.4f} s, against linearize+apply {med['linearize_apply']:.4f} s "
        f"- f {med['f']:.4f} s + probe {med['rademacher_probe']:.4f} s outside it"
    )
    for row in rows:
        row["loop_overhead_s"] = loop
        row["jvp_and_probe_in_loop_s"] = jvp_in_loop
    return rows


# --------------------------------------------------------------------------- main


def lle_sweep(profile: Profile, dtype, base: dict) -> list[dict]:
    """Newton steps against the largest Lyapunov exponent: the mean-field RNN
    (`D = 32`, `T = 1000`) over a range of gains, DEER and quasi-DEER (here Jacobi, as
    `diag(J) = 0`) and the two-well sampler, capped at `profile.sweep_cap` steps."""
    rows = []
    T, D = 1_000, 32
    print(f"\nLLE sweep: mean-field RNN, D={D}, T={T}, steps capped at {profile.sweep_cap}")
    for g in profile.sweep_gains:
        system = MeanFieldRNN(size=D, g=g, dtype=dtype)
        xs = system.inputs(T)
        lle = largest_lyapunov(system, xs)
        reference = jax.jit(sequential_fn(system))(xs)
        for name, solver in (("DEER", parassm.DEER()), ("QuasiDEER", parassm.QuasiDEER())):
            fn = jax.jit(solver_fn(system, solver, profile.sweep_cap))
            sol = jax.block_until_ready(fn(xs))
            row = dict(
                bench="core_lle",
                problem="mean_field",
                label=f"mean_field D={D}",
                params=dict(size=D, g=g),
                T=T,
                D=D,
                lle=lle,
                solver=name,
                steps=int(sol.stats["num_steps"]),
                max_steps=int(sol.stats["max_steps"]),
                result=result_name(sol.result),
                max_err=float(jnp.max(jnp.abs(sol.value - reference))),
                **base,
            )
            rows.append(row)
            print(f"  g={g:<5} LLE={lle:+.3f}  {name:<10} steps={row['steps']:>5}  {row['result']}")
    return rows


def problems(profile: Profile, dtype) -> list[Problem]:
    out = []
    for D in profile.gru_D:
        for T in profile.gru_T:
            out.append(gru(D, T, dtype))
    for g, T in profile.mean_field:
        out.append(mean_field(g, T, dtype))
    for T in profile.two_well_T:
        out.append(two_well(T, dtype))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument(
        "--only",
        choices=["all", "grid", "floor", "lle"],
        default="all",
        help="which part to run",
    )
    parser.add_argument("--out", type=pathlib.Path, default=None, help="JSON file to write")
    parser.add_argument("--floor-D", type=int, default=16)
    parser.add_argument("--floor-T", type=int, default=None)
    parser.add_argument("--floor-rounds", type=int, default=None)
    parser.add_argument(
        "--problems",
        nargs="+",
        choices=["gru", "mean_field", "two_well"],
        default=None,
        help="run only these problems of the grid",
    )
    parser.add_argument("--gru-D", type=int, nargs="+", default=None, help="override")
    parser.add_argument("--gru-T", type=int, nargs="+", default=None, help="override")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=math.inf,
        help="no new grid run starts after this many seconds (the rest: skipped rows)",
    )
    args = parser.parse_args(argv)

    dtype = jnp.dtype(args.dtype)
    if dtype == jnp.float64:
        jax.config.update("jax_enable_x64", True)
    profile = PROFILES[args.profile]
    if args.gru_D:
        profile = dataclasses.replace(profile, gru_D=tuple(args.gru_D))
    if args.gru_T:
        profile = dataclasses.replace(profile, gru_T=tuple(args.gru_T))
    base = dict(stamp(dtype), profile=args.profile)
    print(
        f"parassm core benchmark ({args.profile}): jax {base['jax_version']}, "
        f"{base['backend']} ({base['device']}, {base['cpu_count']} CPUs), {dtype.name}, "
        f"git {base['git_sha']}"
    )
    if base["backend"] == "cpu":
        print(
            "note: on a CPU with few cores a vectorised step costs about as much as T "
            "sequential ones, so lax.scan is expected to win; timings on a shared "
            "machine are noisy (medians of repeats)."
        )
    rows: list[dict] = []
    start = time.perf_counter()
    out = args.out or RESULTS_DIR / f"core_{base['backend']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(rows, indent=1, default=_json_default) + "\n")

    if args.only in ("all", "grid"):
        print_header()
        deadline = start + args.budget_s
        for problem in problems(profile, dtype):
            if args.problems and problem.name not in args.problems:
                continue
            rows.extend(run_problem(problem, profile, dtype, base, deadline=deadline))
            save()  # after every problem: an interrupted run keeps what it measured
    if args.only in ("all", "lle"):
        rows.extend(lle_sweep(profile, dtype, base))
    if args.only in ("all", "floor"):
        rows.extend(
            iteration_vs_floor(
                args.floor_D,
                args.floor_T or profile.floor_T,
                dtype,
                args.floor_rounds or profile.floor_rounds,
                base,
            )
        )
    save()
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s -> {out}")
    return 0


def _json_default(x):
    if isinstance(x, np.generic | jax.Array):
        return x.item()
    if isinstance(x, float) and math.isnan(x):
        return None
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


if __name__ == "__main__":
    sys.exit(main())
