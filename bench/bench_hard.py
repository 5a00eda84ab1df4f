"""Hard systems: Newton steps and time of every parallel solver against `jax.lax.scan`.

The zoo of issue 4: two-well Langevin from a zero initial guess, the mean-field RNN at
gains 1.2 / 1.5 / 2.0, the forward-Euler Lorenz-63 map, the logistic map at r = 3.9 and
the scalar RNN tanh(3 s + u). For each system and T the sequential `lax.scan` baseline
runs first, in the same process, then DEER, quasi-DEER, DEER with a backtracking line
search, ELK, quasi-ELK, Picard, Jacobi and a sliding window (DEER, W = 256). Each row has
compile seconds, the median run seconds (after a warm-up, `block_until_ready`), Newton
steps, the result code, the largest error against `lax.scan`, and the run-time ratio to
`lax.scan`. Solvers stop at `--max-steps` iterations (default 100 at T = 1e3 and 30 at
T = 1e4, to keep the run to minutes on two CPU cores); a `max_steps_reached` row is a
clear non-success code, not an error of the benchmark.

    python bench/bench_hard.py                          # T = 1e3 and 1e4, float32
    python bench/bench_hard.py --T 1000 --dtype float64

CPU timings on a small, shared machine are indicative only.
"""

import argparse
import json
import pathlib
import time

import jax
import jax.lax as lax
import jax.numpy as jnp
import parassm
from parassm._timing import environment, measure
from parassm.systems import Logistic, Lorenz63, MeanFieldRNN, TanhRNN, TwoWellLangevin


HERE = pathlib.Path(__file__).resolve().parent
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
        ("DEER+Backtracking", parassm.DEER(globalization=parassm.Backtracking())),
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--size", type=int, default=16, help="mean-field RNN state size")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="default: 100 for T <= 1000, else 30"
    )
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="system names to run")
    parser.add_argument("--solvers", nargs="*", help="solver labels to run")
    parser.add_argument("--out", default=str(HERE / "results" / "hard_cpu.json"))
    args = parser.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)
    env = environment()
    rows = []
    header = (
        f"{'system':16s} {'T':>6s} {'solver':26s} {'steps':>5s} {'result':18s} "
        f"{'max err':>9s} {'compile s':>9s} {'run s':>9s} {'run/scan':>9s}"
    )
    print(header)
    for T in args.T:
        max_steps = args.max_steps or (100 if T <= 1000 else 30)
        for name, system in systems(dtype, args.size):
            if args.only and name not in args.only:
                continue
            xs = system.inputs(T)
            f = system.f
            ref, scan_compile, scan_run = measure(
                lambda s0, xs: _sequential(f, s0, xs, T), system.s0, xs, repeats=args.repeats
            )
            D = int(jnp.size(system.s0))
            base = dict(problem=name, T=T, D=D, dtype=args.dtype, **env)
            rows.append(
                dict(
                    base,
                    solver="lax.scan",
                    compile_s=scan_compile,
                    run_s=scan_run,
                    steps=0,
                    result="successful",
                    max_err=0.0,
                    ratio_to_scan=1.0,
                )
            )
            print(
                f"{name:16s} {T:6d} {'lax.scan':26s} {0:5d} {'successful':18s} {0.0:9.2e} "
                f"{scan_compile:9.2f} {scan_run:9.4f} {1.0:9.2f}",
                flush=True,
            )
            for label, solver in solvers(args.window):
                if args.solvers and label not in args.solvers:
                    continue

                def run(s0, xs, solver=solver):
                    sol = parassm.evaluate(
                        f, s0, T, xs=xs, solver=solver, max_steps=max_steps, throw=False
                    )
                    return sol.value, sol.result._value, sol.stats

                start = time.perf_counter()
                (value, code, stats), compile_s, run_s = measure(
                    run, system.s0, xs, repeats=args.repeats
                )
                result = _NAMES[int(code)]
                finite = bool(jnp.all(jnp.isfinite(value)))
                err = float(jnp.max(jnp.abs(value - ref))) if finite else float("nan")
                steps = int(stats["num_steps"])
                row = dict(
                    base,
                    solver=label,
                    compile_s=compile_s,
                    run_s=run_s,
                    steps=steps,
                    result=result,
                    residual=float(stats["residual"]),
                    converged_prefix=int(stats["converged_prefix"]),
                    finite=finite,
                    max_err=err,
                    ratio_to_scan=run_s / scan_run,
                    max_steps=max_steps,
                    wall_s=time.perf_counter() - start,
                )
                rows.append(row)
                print(
                    f"{name:16s} {T:6d} {label:26s} {steps:5d} {result:18s} {err:9.2e} "
                    f"{compile_s:9.2f} {run_s:9.4f} {run_s / scan_run:9.2f}",
                    flush=True,
                )
            out = pathlib.Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
