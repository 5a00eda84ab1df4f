"""Memory held per distinct problem: memory mappings (`/proc/self/maps`) of a process
that evaluates many different step functions, one after the other.

Each problem is a new closure `f` (a different constant), solved once and then deleted
and garbage-collected, as in a notebook, a sweep or a service. Every runner is measured
in its own process (a fresh interpreter) so the counts do not mix; caches are never
cleared. The baselines run the same problems: `jax.jit` of a `lax.scan` (a new jitted
function per problem), and a module-level `eqx.filter_jit` taking `f` as a static
argument (equinox keeps static arguments, so their programs, alive in jax's cache).

    python bench/memory.py                      # 300 problems per runner
    python bench/memory.py --problems 1000 --only DEER Auto
    python bench/memory.py --problems 1000 --only DEER --log progress.jsonl  # counts as it goes

Prints maps per problem (the growth over the last half of the problems, divided by
their number, and over all of them) and writes JSON rows to
`bench/results/memory_<backend>.json`. Linux only (reads `/proc/self/maps`).
"""

import argparse
import gc
import json
import os
import pathlib
import subprocess
import sys
import time


HERE = pathlib.Path(__file__).resolve().parent
RUNNERS = (
    "jax.jit(lax.scan)",
    "eqx.filter_jit(static f)",
    "eqx.filter_jit(while+jacfwd)",
    "DEER",
    "QuasiDEER",
    "ELK",
    "Picard",
    "Jacobi",
    "MultipleShooting",
    "SlidingWindow",
    "Auto",
    "Auto(wide)",
    "scan",
    "diagnose",
)


def maps() -> int:
    with open("/proc/self/maps") as fh:
        return sum(1 for _ in fh)


def make_runner(name: str):
    import equinox as eqx
    import jax
    import jax.lax as lax
    import parassm

    def plain(f, s0, xs):
        return jax.jit(lambda s0, xs: lax.scan(lambda s, x: (f(s, x), s), s0, xs)[1])(s0, xs)

    @eqx.filter_jit
    def static_scan(f, s0, xs):
        return lax.scan(lambda s, x: (f(s, x), s), s0, xs)[1]

    @eqx.filter_jit
    def static_while(f, s0, xs):
        def body(c):
            k, s = c
            return k + 1, s - jax.jacfwd(f)(s, xs[0]) * 0.1

        return lax.while_loop(lambda c: c[0] < 3, body, (0, s0))[1]

    if name == "jax.jit(lax.scan)":
        return plain
    if name == "eqx.filter_jit(static f)":
        return static_scan
    if name == "eqx.filter_jit(while+jacfwd)":
        return static_while
    if name == "diagnose":
        return lambda f, s0, xs: parassm.diagnose(f, s0, xs=xs).lle
    if name == "scan":
        return lambda f, s0, xs: parassm.scan(
            lambda c, x: (f(c, x), c), s0, xs, solver=parassm.DEER()
        )[1]
    if name == "Auto(wide)":
        sys.path.insert(0, str(HERE.parent))
        from bench.core import WIDE

        solver = parassm.Auto(hardware=WIDE)
    elif name == "MultipleShooting":
        solver = parassm.MultipleShooting(parassm.DEER(), chunk_length=20)
    elif name == "SlidingWindow":
        solver = parassm.SlidingWindow(parassm.DEER(), window=50)
    else:
        solver = getattr(parassm, name)()
    return lambda f, s0, xs: parassm.evaluate(f, s0, xs=xs, solver=solver, throw=False).value


def child(name: str, problems: int, T: int, every: int, log: str | None = None) -> dict:
    import jax
    import jax.numpy as jnp

    runner = make_runner(name)
    xs = jnp.linspace(-1.0, 1.0, T, dtype=jnp.float32)
    s0 = jnp.zeros((), jnp.float32)
    counts = []
    start = time.perf_counter()
    for k in range(problems):
        a = 0.3 + 0.4 * k / problems

        def f(s, x, a=a):
            return jnp.tanh(a * s + x)

        jax.block_until_ready(runner(f, s0, xs))
        del f
        gc.collect()
        if (k + 1) % every == 0:
            counts.append(maps())
            if log is not None:
                # A run stopped early still leaves its counts so far.
                with open(log, "a") as fh:
                    row = dict(runner=name, problems=k + 1, maps=counts[-1])
                    row["seconds"] = round(time.perf_counter() - start, 1)
                    fh.write(json.dumps(row) + "\n")
    seconds = time.perf_counter() - start
    half = len(counts) // 2
    late = (counts[-1] - counts[half - 1]) / ((len(counts) - half) * every)
    overall = (counts[-1] - counts[0]) / ((len(counts) - 1) * every)
    return dict(
        runner=name,
        problems=problems,
        T=T,
        maps_first=counts[0],
        maps_last=counts[-1],
        maps_per_problem=round(overall, 2),
        maps_per_problem_late=round(late, 2),
        seconds=round(seconds, 1),
        counts=counts,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=300)
    parser.add_argument("--T", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--log",
        default=None,
        help="append each runner's count after every `--every` problems "
        "to this file (JSON lines), as it goes",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.problems, args.T, args.every, args.log)))
        return 0

    sys.path.insert(0, str(HERE.parent))
    import jax.numpy as jnp

    from bench.core import stamp

    rows = []
    print(f"{'runner':32s} {'maps/problem':>13s} {'late half':>10s} {'first':>7s} {'last':>7s}")
    for name in args.only or RUNNERS:
        cmd = [sys.executable, __file__, "--child", name, "--problems", str(args.problems)]
        cmd += ["--T", str(args.T), "--every", str(args.every)]
        cmd += [] if args.log is None else ["--log", args.log]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            row = dict(runner=name, status="failed", returncode=proc.returncode)
            row["stderr"] = proc.stderr[-2000:]
            print(f"{name:32s} failed (rc {proc.returncode}): {proc.stderr[-300:]}")
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"{name:32s} {row['maps_per_problem']:13.2f} {row['maps_per_problem_late']:10.2f}"
                f" {row['maps_first']:7d} {row['maps_last']:7d}"
            )
        rows.append(dict(stamp(jnp.float32), **row))
    backend = rows[0].get("backend", "cpu") if rows else "cpu"
    out = pathlib.Path(args.out or HERE / "results" / f"memory_{backend}.json")
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
