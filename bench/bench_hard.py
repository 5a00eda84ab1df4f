"""Hard systems: Newton steps and time of every parallel solver against `jax.lax.scan`.

The zoo of issue 4: two-well Langevin from a zero initial guess, the mean-field RNN at
gains 1.2 / 1.5 / 2.0, the forward-Euler Lorenz-63 map, the logistic map at r = 3.9 and
the scalar RNN tanh(3 s + u). For each dtype, T and system the sequential `lax.scan`
baseline runs first, in the same process, then DEER, quasi-DEER, DEER with a
backtracking line search, ELK, quasi-ELK, Picard, Jacobi and a sliding window (DEER,
W = 256). Each row has compile seconds (separate from the run), the run seconds,
Newton steps, the result code, the converged prefix, the largest error against
`lax.scan`, and the run-time ratio to `lax.scan`.

Step cap: `max_steps = T` by default, the causality bound (every solver converges at
least one more step per iteration), so every row that runs ends `successful` and its
step count is a result, not a cap.

Subset at the larger T: a (system, solver, dtype) runs at T only if its row at the
previous T converged and its projected run time, `run_s(previous T) * (T / previous
T)^2` (iterations and cost per iteration both linear in T in the worst case), is at
most `--row-budget` seconds (default 60). Otherwise the row is recorded with
`result = "skipped"` and the reason. This drops the chaotic systems (logistic, Lorenz:
the converged front grows by about one step per iteration, so about T iterations, as
the predictability theory says) and the slowest solvers on the unpredictable ones at
T = 1e4. Float64 runs at the smallest T only (`--larger-T-dtypes`): the T scaling is
the question at the larger T, and float32 answers it at half the cost. Even so the
default run took 35 minutes on a shared 2-core CPU, most of it compiling and
running ELK (its dense Kalman smoother compiles slowly and, on the unpredictable
systems, needs hundreds of iterations of several trials each).

Run time: the median of `--repeats` runs after a warm-up, except that a warm-up run
longer than one second is itself the measurement (a long run does not need warming up).

    python bench/bench_hard.py              # float32 at T = 1e3, 1e4; float64 at T = 1e3
    python bench/bench_hard.py --T 1000 --dtype float64 --only two_well

CPU timings on a small, shared machine are indicative only; the step counts are
machine-independent.
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.lax as lax
import jax.numpy as jnp
import parassm
from parassm._timing import environment, measure
from parassm.systems import Logistic, Lorenz63, MeanFieldRNN, TanhRNN, TwoWellLangevin


HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from core import git_sha  # noqa: E402  (the stamp every bench row carries)


_NAMES = {int(item._value): name for name, item in parassm.RESULTS._name_to_item.items()}


def systems(dtype, size):
    return [
        ("two_well", TwoWellLangevin(dtype=dtype)),
        ("mean_field_g1.2", MeanFieldRNN(size=size, g=1.2, dtype=dtype)),
        ("mean_field_g1.5", MeanFieldRNN(size=size, g=1.5, dtype=dtype)),
        ("mean_field_g2.0", MeanFieldRNN(size=size, g=2.0, dtype=dtype)),
        ("lorenz63_euler", Lorenz63(integrator="euler", dtype=dtype)),
        ("logistic_r3.9", Logistic(r=3.9, dtype=dtype)),
        ("tanh_rnn_a3", TanhRNN(a=3.0, dtype=dtype)),
    ]


def solvers(window):
    return [
        ("DEER", parassm.DEER()),
        ("QuasiDEER", parassm.QuasiDEER()),
        ("DEER+Backtracking", parassm.DEER(search=parassm.Backtracking())),
        ("ELK", parassm.ELK()),
        ("QuasiELK", parassm.QuasiELK()),
        ("Picard", parassm.Picard()),
        ("Jacobi", parassm.Jacobi()),
        (f"SlidingWindow(DEER,{window})", parassm.SlidingWindow(parassm.DEER(), window=window)),
    ]


def _sequential(f, s0, xs, T):
    def step(s, x):
        s = f(s, x)
        return s, s

    return lax.scan(step, s0, xs, length=T)[1]


def _print_row(row):
    steps = row.get("steps", "-")
    err = row.get("max_err", float("nan"))
    print(
        f"{row['dtype']:8s} {row['problem']:16s} {row['T']:6d} {row['solver']:26s} "
        f"{steps!s:>5s} {row['result']:18s} {err:9.2e} {row.get('compile_s', 0.0):9.2f} "
        f"{row.get('run_s', 0.0):9.4f} {row.get('ratio_to_scan', float('nan')):9.2f}",
        flush=True,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument(
        "--dtype", nargs="+", default=["float32", "float64"], choices=["float32", "float64"]
    )
    parser.add_argument("--size", type=int, default=8, help="mean-field RNN state size")
    parser.add_argument("--max-steps", type=int, default=None, help="default: T")
    parser.add_argument(
        "--row-budget",
        type=float,
        default=60.0,
        help="skip a row at the larger T whose projected run time exceeds this (seconds)",
    )
    parser.add_argument(
        "--larger-T-dtypes",
        nargs="*",
        default=["float32"],
        help="dtypes that also run at the T values above the smallest (default: float32)",
    )
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="system names to run")
    parser.add_argument("--solvers", nargs="*", help="solver labels to run")
    parser.add_argument("--out", default=str(HERE / "results" / "hard_cpu.json"))
    args = parser.parse_args(argv)
    if "float64" in args.dtype:
        # Every array below has an explicit dtype, so float32 rows stay float32.
        jax.config.update("jax_enable_x64", True)
    env = dict(git_sha=git_sha(), **environment())
    rows = []
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    print(
        f"{'dtype':8s} {'system':16s} {'T':>6s} {'solver':26s} {'steps':>5s} {'result':18s} "
        f"{'max err':>9s} {'compile s':>9s} {'run s':>9s} {'run/scan':>9s}"
    )
    # (dtype, system, solver) -> (T, row) of the last run, for the larger-T subset.
    previous = {}
    for dtype_name in args.dtype:
        dtype = jnp.dtype(dtype_name)
        for T in sorted(args.T):
            if T > min(args.T) and dtype_name not in args.larger_T_dtypes:
                continue
            max_steps = args.max_steps or T
            for name, system in systems(dtype, args.size):
                if args.only and name not in args.only:
                    continue
                xs = system.inputs(T)
                f = system.f
                ref, scan_compile, scan_run = measure(
                    lambda s0, xs: _sequential(f, s0, xs, T),
                    system.s0,
                    xs,
                    repeats=args.repeats,
                    long_warmup_s=1.0,
                )
                D = int(jnp.size(system.s0))
                base = dict(problem=name, T=T, D=D, dtype=dtype_name, **env)
                row = dict(
                    base,
                    solver="lax.scan",
                    compile_s=scan_compile,
                    run_s=scan_run,
                    steps=0,
                    result="successful",
                    max_err=0.0,
                    ratio_to_scan=1.0,
                )
                rows.append(row)
                _print_row(row)
                for label, solver in solvers(args.window):
                    if args.solvers and label not in args.solvers:
                        continue
                    key = (dtype_name, name, label)
                    reason = None
                    if key in previous:
                        T_prev, prev = previous[key]
                        projected = prev.get("run_s", float("inf")) * (T / T_prev) ** 2
                        if prev["result"] != "successful":
                            reason = f"not successful at T={T_prev} ({prev['result']})"
                        elif projected > args.row_budget:
                            reason = (
                                f"projected run {projected:.0f} s > {args.row_budget:.0f} s "
                                f"({prev['steps']} steps, {prev['run_s']:.3g} s at T={T_prev})"
                            )
                    if reason is not None:
                        row = dict(base, solver=label, result="skipped", reason=reason)
                        rows.append(row)
                        previous[key] = (T, row)
                        print(f"{dtype_name:8s} {name:16s} {T:6d} {label:26s} skipped: {reason}")
                        continue

                    def run(s0, xs, solver=solver):
                        sol = parassm.evaluate(
                            f, s0, T, xs=xs, solver=solver, max_steps=max_steps, throw=False
                        )
                        return sol.value, sol.result._value, sol.stats

                    start = time.perf_counter()
                    (value, code, stats), compile_s, run_s = measure(
                        run, system.s0, xs, repeats=args.repeats, long_warmup_s=1.0
                    )
                    result = _NAMES[int(code)]
                    finite = bool(jnp.all(jnp.isfinite(value)))
                    err = float(jnp.max(jnp.abs(value - ref))) if finite else float("nan")
                    row = dict(
                        base,
                        solver=label,
                        compile_s=compile_s,
                        run_s=run_s,
                        steps=int(stats["num_steps"]),
                        result=result,
                        residual=float(stats["residual"]),
                        converged_prefix=int(stats["converged_prefix"]),
                        finite=finite,
                        max_abs_value=float(jnp.max(jnp.abs(value))),
                        max_err=err,
                        ratio_to_scan=run_s / scan_run,
                        max_steps=max_steps,
                        wall_s=time.perf_counter() - start,
                    )
                    if "num_trials" in stats:
                        row["num_trials"] = int(stats["num_trials"])
                    rows.append(row)
                    previous[key] = (T, row)
                    _print_row(row)
                out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {len(rows)} rows to {args.out} in {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
