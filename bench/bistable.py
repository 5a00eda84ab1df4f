"""A bistable map: Newton steps against the memory of its wells, over input seeds.

The scalar RNN `s_t = tanh(a s_{t-1} + u_t)`, `u_t ~ N(0, 1)`, `a = 3`, contracts
(largest Lyapunov exponent about -3.4) yet has two wells near +-1, and the input only
rarely pushes the state from one to the other. A small perturbation dies within a few
steps; the *other well* survives until an input forces both wells together. That
memory is what a Newton-type solver has to cross: linearised in the wrong well, the
maps are nearly zero, so a correction carries about one step per iteration there.

For each dtype, T and input seed this prints and writes:

- the **coupling time**: the longest stretch over which the trajectories started at
  +1 and at -1 from the same step (which bracket every other, tanh being increasing)
  stay apart by more than 1e-4, a finite-perturbation memory the LLE does not see;
- the Newton steps, result, largest error against `lax.scan` and run time over
  `lax.scan`'s of DEER, ELK, DEER with the undamped search, and multiple shooting (DEER
  on chunks of `sqrt(T)` steps, the chunk length the diagnosis suggests here);
- what the diagnosis recommends on a wide machine (`bench.core.WIDE`).

`lax.scan` runs first for every row, in the same process. Run time is the median of
`--repeats` runs after compiling and a warm-up (`parassm._timing.measure`); one
compilation per solver, dtype and T (the inputs are arguments).

    python bench/bistable.py                      # T = 1e3, 1e4; float32, float64; 8 seeds
    python bench/bistable.py --T 1000 --seeds 4

CPU timings on a small, shared machine are indicative only; step counts and coupling
times are machine-independent.
"""

import argparse
import json
import pathlib
import sys

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np


if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import parassm  # noqa: E402
from parassm._timing import measure  # noqa: E402

from bench.core import result_name, RESULTS_DIR, stamp, WIDE  # noqa: E402


GAIN = 3.0
COUPLED = 1e-4


def f(s, u):
    return jnp.tanh(GAIN * s + u)


def coupling_time(u: np.ndarray) -> int:
    """The longest number of steps, over every start `t0`, before the trajectories from
    +1 and -1 at `t0` (driven by the same inputs) come within `COUPLED` of each other;
    starts whose pair never meets before the end count until the end."""
    T = len(u)
    hi, lo = np.ones(T), -np.ones(T)
    apart = np.ones(T, bool)
    longest = 0
    for k in range(1, T + 1):
        t = np.arange(T) + k - 1  # the input of step t0 + k
        inside = t < T
        uk = u[np.minimum(t, T - 1)]
        hi, lo = np.tanh(GAIN * hi + uk), np.tanh(GAIN * lo + uk)
        apart &= inside & (np.abs(hi - lo) >= COUPLED)
        if apart.any():
            longest = k
        else:
            break
    return longest


def solvers(T: int) -> dict:
    chunk = parassm.MultipleShooting().chunk(T)
    return {
        "DEER": parassm.DEER(),
        "ELK": parassm.ELK(),
        "DEER-U": parassm.DEER(search=parassm.Undamped()),
        f"MultipleShooting(L={chunk})": parassm.MultipleShooting(chunk_length=chunk),
    }


def _program(solver, T: int):
    """`(s0, xs) -> (value, result, steps)` of `solver`, jitted (compiled once; later
    seeds hit the cache)."""

    def run(s0, xs):
        sol = parassm.evaluate(f, s0, T, xs=xs, solver=solver, throw=False)
        return sol.value, sol.result, sol.stats["num_steps"]

    return jax.jit(run)


def _sequential(s0, xs):
    def step(s, x):
        s = f(s, x)
        return s, s

    return lax.scan(step, s0, xs)[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS_DIR / "bistable_cpu.json"))
    args = parser.parse_args(argv)
    if "float64" in args.dtype:
        jax.config.update("jax_enable_x64", True)
    rows = []
    print(
        f"{'dtype':8s} {'T':>6s} {'seed':>4s} {'coupling':>8s} {'solver':22s} {'steps':>5s} "
        f"{'result':12s} {'max err':>8s} {'run/scan':>8s}"
    )
    for dtype_name in args.dtype:
        dtype = jnp.dtype(dtype_name)
        s0 = jnp.zeros((), dtype)
        for T in args.T:
            # One program per solver at this dtype and T; the inputs are arguments.
            programs = {label: _program(solver, T) for label, solver in solvers(T).items()}
            for seed in range(args.seeds):
                xs = jr.normal(jr.key(seed + 1), (T,), dtype)
                coupling = coupling_time(np.asarray(xs, np.float64))
                ref, _, scan_s = measure(_sequential, s0, xs, repeats=args.repeats)
                base = dict(stamp(dtype), system=f"tanh({GAIN:g} s + u)", T=T, seed=seed)
                base["coupling_time"] = coupling
                rows.append(dict(base, solver="lax.scan", steps=0, run_s=scan_s))
                for label, program in programs.items():
                    (value, result, steps), _, run_s = measure(
                        program, s0, xs, repeats=args.repeats, long_warmup_s=1.0
                    )
                    err = float(jnp.max(jnp.abs(value - ref)))
                    row = dict(
                        base,
                        solver=label,
                        steps=int(steps),
                        result=result_name(result),
                        max_err=err,
                        run_s=run_s,
                        ratio_to_scan=run_s / scan_s,
                    )
                    rows.append(row)
                    print(
                        f"{dtype_name:8s} {T:6d} {seed:4d} {coupling:8d} {label:22s} "
                        f"{row['steps']:5d} {row['result']:12s} {err:8.1e} "
                        f"{row['ratio_to_scan']:8.1f}",
                        flush=True,
                    )
                d = parassm.diagnose(f, s0, T, xs=xs, solvers=("DEER",), hardware=WIDE)
                rows.append(
                    dict(
                        base,
                        solver="Auto (wide)",
                        recommended=type(d.recommended).__name__,
                        chunk_length=getattr(d.recommended, "chunk_length", None),
                        regime=d.regime,
                        lle=d.lle,
                        predicted_deer=d.predicted_steps["DEER"],
                        predicted_shooting=d.shooting_steps,
                    )
                )
                print(
                    f"{dtype_name:8s} {T:6d} {seed:4d} {coupling:8d} {'Auto (wide)':22s} "
                    f"-> {d.recommended!r} ({d.regime}, LLE {d.lle:.2f})",
                    flush=True,
                )
                pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    # Summary: totals over seeds.
    print()
    for dtype_name in args.dtype:
        for T in args.T:
            sel = [r for r in rows if r["dtype"] == dtype_name and r["T"] == T]
            couplings = sorted({(r["seed"], r["coupling_time"]) for r in sel})
            line = f"{dtype_name:8s} {T:6d} coupling {sum(c for _, c in couplings):6d}"
            for label in solvers(T):
                line += f"  {label} {sum(r['steps'] for r in sel if r['solver'] == label):6d}"
            print(line)


if __name__ == "__main__":
    main()
