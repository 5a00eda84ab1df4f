"""The `parassm` command."""

import argparse
import json
import sys

import jax
import jax.numpy as jnp


def _demo_solvers():
    from . import (
        BlockQuasiDEER,
        DEER,
        HutchinsonDiagonal,
        Jacobi,
        Picard,
        QuasiDEER,
        Sequential,
    )

    return {
        "Sequential": Sequential(),
        "DEER": DEER(),
        "QuasiDEER": QuasiDEER(),
        "QuasiDEER(Hutchinson)": QuasiDEER(HutchinsonDiagonal()),
        "BlockQuasiDEER(4)": BlockQuasiDEER(4),
        "Picard": Picard(),
        "Jacobi": Jacobi(),
    }


def demo(args: argparse.Namespace) -> int:
    from . import evaluate, RESULTS
    from ._timing import environment, measure
    from .systems import GRU

    dtype = jnp.dtype(args.dtype)
    if dtype == jnp.float64:
        jax.config.update("jax_enable_x64", True)
    system = GRU(hidden_size=args.hidden, input_size=4, dtype=dtype)
    xs = system.inputs(args.T)

    def sequential(xs):
        def step(s, x):
            s = system.f(s, x)
            return s, s

        return jax.lax.scan(step, system.s0, xs)[1]

    reference, ref_compile, ref_run = measure(sequential, xs, repeats=args.repeats)
    env = environment()
    print(
        f"parassm demo: random GRU, hidden={args.hidden}, T={args.T}, {dtype.name}, "
        f"{env['backend']} ({env['device']}), jax {env['jax_version']}",
        file=sys.stderr,
    )
    rows = []
    for name, solver in _demo_solvers().items():

        def run(xs, solver=solver):
            return evaluate(system.f, system.s0, xs=xs, solver=solver, throw=False)

        sol, compile_s, run_s = measure(run, xs, repeats=args.repeats)
        rows.append(
            dict(
                solver=name,
                steps=int(sol.stats["num_steps"]),
                ok=bool(sol.result == RESULTS.successful),
                compile_s=compile_s,
                run_s=run_s,
                ratio=run_s / ref_run,
                max_err=float(jnp.max(jnp.abs(sol.value - reference))),
            )
        )
    if args.json:
        print(json.dumps(dict(T=args.T, hidden=args.hidden, dtype=dtype.name, **env, rows=rows)))
        return 0
    header = f"{'solver':<24}{'steps':>7}{'ok':>5}{'compile s':>11}{'run s':>10}"
    header += f"{'x lax.scan':>12}{'max err':>11}"
    print(header)
    print("-" * len(header))
    print(
        f"{'lax.scan':<24}{'-':>7}{'-':>5}{ref_compile:>11.3f}{ref_run:>10.4f}{1.0:>12.2f}"
        f"{0.0:>11.1e}"
    )
    for r in rows:
        print(
            f"{r['solver']:<24}{r['steps']:>7}{('yes' if r['ok'] else 'NO'):>5}"
            f"{r['compile_s']:>11.3f}{r['run_s']:>10.4f}{r['ratio']:>12.2f}{r['max_err']:>11.1e}"
        )
    print(
        "\nratio > 1 means slower than lax.scan. On a CPU with few cores a parallel step "
        "costs about as much as T sequential ones, so Sequential wins; the payoff of "
        "parallel evaluation is on accelerators.",
        file=sys.stderr,
    )
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parassm",
        description="Parallel evaluation of nonlinear recurrences, and whether it pays off.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="evaluate a random GRU with every solver and compare")
    p.add_argument("--T", type=int, default=10_000, help="sequence length (default 10000)")
    p.add_argument("--hidden", type=int, default=16, help="GRU hidden size (default 16)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
