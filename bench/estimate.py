"""What the estimate of the trajectory's error costs: each solver with it (the default)
and without it, in one process, beside one scan of the estimate's own kind.

The problem is the GRU of `bench/peers.py` (`equinox.nn.GRUCell`, input 4, hidden `H`,
random weights, zero state, standard normal inputs, float32), on one sequence or, with
`--B`, `jax.vmap` over `B` of them. Every contender is compiled ahead of time, warmed
up, then timed round-robin (the fastest of `--rounds` runs, CPU seconds of the process
with `--clock cpu`):

- `lax.scan`;
- each solver as `parassm.evaluate(..., throw=False)` runs it, and the same loop
  stopping at the residual test. There is no public switch for the second on purpose
  (without the estimate a result is never `successful`): the script builds that
  program by passing `verify=False` to the loop's private `newton_loop` while it is
  traced. The rows say how many steps and formations of the maps each took, how many
  results were `successful`, and the error against `lax.scan`;
- the two passes the estimate is made of: one tangent scan (`d_t = J_t d_{t-1} + c_t`,
  one JVP per step, sequential: what DEER, ELK and the quasi solvers run on the CPU
  from 17 components) and one pass of dense Jacobians (what a solver forms its dense
  maps with; the estimate's other form, with a dense scan, below 17 components).

`extra_s` is the time with the estimate minus the time without it; `extra_scans` is that
over one tangent scan. Without the estimate a quasi solver stops where its residual
meets the tolerance, and its trajectory may be farther from `lax.scan` than that
(`max_err`): part of what the estimate costs is the Newton step it then asks for.

    python bench/estimate.py                       # H in {8, 32, 64}, T = 1e4, one sequence
    python bench/estimate.py --H 32 --T 2000 --B 8 --clock cpu

JSON rows (with the git sha) go to `bench/results/estimate_<backend>.json`.
"""

import argparse
import contextlib
import functools
import json
import math
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import core  # noqa: E402  (stamps)
import parassm  # noqa: E402
import parassm._solvers._parallel as _parallel  # noqa: E402  (the loop, to switch it off)
from parassm._linear._shift import shift  # noqa: E402
from parassm._solvers import _jacobian as jacobian  # noqa: E402


SOLVERS = {
    "DEER": parassm.DEER,
    "QuasiDEER": parassm.QuasiDEER,
    "ELK": parassm.ELK,
    "QuasiELK": parassm.QuasiELK,
}


@contextlib.contextmanager
def estimate(on: bool):
    """Trace the Newton loop with (default) or without the estimate."""
    loop = _parallel.newton_loop
    if not on:
        _parallel.newton_loop = functools.partial(loop, verify=False)
    try:
        yield
    finally:
        _parallel.newton_loop = loop


def run_point(H: int, T: int, B: int, names: list[str], rounds: int, clock, base) -> list[dict]:
    cell = eqx.nn.GRUCell(4, H, dtype=jnp.float32, key=jr.key(0))
    s0 = jnp.zeros(H, jnp.float32)
    shape = (B, T, 4) if B else (T, 4)
    xs = jr.normal(jr.key(1), shape, jnp.float32)
    batch = jax.vmap if B else (lambda fn: fn)

    def scan(xs):
        return jax.lax.scan(lambda s, x: (cell(x, s),) * 2, s0, xs)[1]

    sequential = jax.jit(batch(scan))
    ref = sequential(xs)
    prev = batch(lambda S: shift(S, s0))(ref)  # the state before every step

    def f(s, x):
        return cell(x, s)

    def tangent(prev, xs, c):
        return jacobian.tangent_scan(f, prev, xs, c)

    def dense(prev, xs):
        return jacobian.value_and_dense(f, prev, xs)

    contenders = {
        "lax.scan": (sequential, (xs,)),
        "one tangent scan": (jax.jit(batch(tangent)), (prev, xs, ref)),
        "one dense Jacobian pass": (jax.jit(batch(dense)), (prev, xs)),
    }
    for name in names:
        for on in (True, False):
            solver = SOLVERS[name]()

            # A new step function per variant: each its own program.
            def g(s, x):
                return cell(x, s)

            def run(xs, g=g, solver=solver):
                return parassm.evaluate(g, s0, xs=xs, solver=solver, throw=False)

            with estimate(on):
                compiled = jax.jit(batch(run)).lower(xs).compile()
            contenders[name, on] = (compiled, (xs,))
    outs, best = {}, {}
    for key, (fn, args) in contenders.items():
        outs[key] = jax.block_until_ready(fn(*args))
        best[key] = math.inf
    for _ in range(rounds):
        for key, (fn, args) in contenders.items():
            start = clock()
            jax.block_until_ready(fn(*args))
            best[key] = min(best[key], clock() - start)
    point = dict(base, H=H, T=T, B=B or 1, batched=bool(B))
    scan_s = best["one tangent scan"]
    rows = [
        dict(point, name=name, run_s=best[name])
        for name in ("lax.scan", "one tangent scan", "one dense Jacobian pass")
    ]
    for name in names:
        for on in (True, False):
            out = outs[name, on]
            row = dict(
                point,
                name=name,
                estimate=on,
                run_s=best[name, on],
                steps_max=int(jnp.max(out.stats["num_steps"])),
                linearisations_max=int(jnp.max(out.stats["num_linearisations"])),
                successful=int(jnp.sum(out.result == parassm.RESULTS.successful)),
                max_err=float(jnp.max(jnp.abs(out.value - ref))),
            )
            if on:
                extra = best[name, True] - best[name, False]
                row.update(extra_s=extra, extra_scans=extra / scan_s)
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| H | T | B | solver | estimate | ms | steps | maps | ok | max err | extra ms "
        "| extra / one tangent scan |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "estimate" not in r:
            print(
                f"| {r['H']} | {r['T']} | {r['B']} | {r['name']} | | {1e3 * r['run_s']:.1f} "
                "| | | | | | |"
            )
            continue
        extra = f"{1e3 * r['extra_s']:.1f} | {r['extra_scans']:.2f}" if r["estimate"] else " | "
        print(
            f"| {r['H']} | {r['T']} | {r['B']} | {r['name']} | "
            f"{'on' if r['estimate'] else 'off'} | {1e3 * r['run_s']:.1f} | {r['steps_max']} | "
            f"{r['linearisations_max']} | {r['successful']}/{r['B']} | {r['max_err']:.1e} | "
            f"{extra} |"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--H", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--T", type=int, nargs="+", default=[10_000])
    parser.add_argument("--B", type=int, default=0, help="vmap over B sequences (0: one)")
    parser.add_argument("--solvers", default="DEER,QuasiDEER")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    base = dict(core.stamp(jnp.float32), bench="estimate", clock=args.clock)
    out = args.out or core.RESULTS_DIR / f"estimate_{base['backend']}.json"
    rows: list[dict] = []
    for H in args.H:
        for T in args.T:
            rows += run_point(H, T, args.B, args.solvers.split(","), args.rounds, clock, base)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=1, default=float) + "\n")
            jax.clear_caches()
    print_table(rows)
    print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
