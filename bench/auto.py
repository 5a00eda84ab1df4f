"""Auto against every one of its candidates, in one process (issue 15's targets).

For a GRU of hidden size H in {8, 32}, T in {256, 1e4, 1e5}, batch 1 and batch 16
(`jax.vmap`), all jitted: the compile time (trace + lower + compile, from a fresh
`jax.jit`, min of 3 for Auto and Sequential; for Auto this includes its host-side
decision) and the steady-state run time (min over interleaved
rounds; calls shorter than 20 ms are timed in groups) of `Auto()`, `Sequential()`,
`DEER()` and `QuasiDEER()`. Reports Auto's ratio to the best candidate, and its
compile time against the chosen solver's. Candidates whose Jacobians would not fit in
`--max-gb` are skipped and said so.

Also: the cost of Auto's host-side work (hardware model from the disk cache, flops of
`f`, the decision) at trace time, and of an eager first call with a concrete diagnosis
on a GPU-like hardware model (what a first call costs where the static rule does not
decide).

    python bench/auto.py [--rounds 7] [--quick]

Prints a table and writes JSON rows to `bench/results/auto_cpu.json`.
"""

import argparse
import json
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import parassm


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from core import RESULTS_DIR, stamp  # noqa: E402


SOLVERS = {
    "Auto": parassm.Auto(),
    "Sequential": parassm.Sequential(),
    "DEER": parassm.DEER(),
    "QuasiDEER": parassm.QuasiDEER(),
}
CANDIDATES = ("Sequential", "DEER", "QuasiDEER")


def make_fn(system, solver, batch: int):
    def one(xs):
        return parassm.evaluate(system.f, system.s0, xs=xs, solver=solver, throw=False).value

    return jax.jit(one if batch == 1 else jax.vmap(one))


def chosen_index(system, solver, xs, batch: int) -> int:
    def one(xs):
        return parassm.evaluate(system.f, system.s0, xs=xs, solver=solver, throw=False)

    fn = one if batch == 1 else jax.vmap(one)
    return int(jnp.ravel(jax.jit(fn)(xs).stats["solver"])[0])


def memory_gb(name: str, H: int, T: int, batch: int) -> float:
    if name not in ("DEER", "QuasiDEER"):
        return 4 * batch * T * 2 * H / 1e9  # the trajectory (Auto is costed as its choice)
    per_step = H * H if name == "DEER" else H
    # The Jacobians, and about four trajectory-sized work arrays per iteration.
    return 4 * batch * T * (3 * per_step + 4 * H) / 1e9


def run_config(H: int, T: int, batch: int, rounds: int, max_gb: float) -> list[dict]:
    system = parassm.systems.GRU(hidden_size=H)
    xs = system.inputs(T)
    if batch > 1:
        xs = jnp.stack([xs * (1 + 0.01 * i) for i in range(batch)])
    compiled, compile_s, skipped, hlo = {}, {}, {}, {}
    for name, solver in SOLVERS.items():
        if memory_gb(name, H, T, batch) > max_gb:
            skipped[name] = f"needs ~{memory_gb(name, H, T, batch):.1f} GB > --max-gb"
            continue
        # The cheap programs are compiled three times, each from a fresh `jax.jit`
        # (min), so that a 0.2 s compile is not decided by the machine's noise.
        best = math.inf
        for _ in range(1 if name in ("DEER", "QuasiDEER") else 3):
            fn = make_fn(system, solver, batch)
            start = time.perf_counter()
            lowered = fn.lower(xs)
            compiled[name] = lowered.compile()
            best = min(best, time.perf_counter() - start)
        compile_s[name] = best
        hlo[name] = lowered.as_text()
    for fn in compiled.values():
        jax.block_until_ready(fn(xs))  # warm-up
    times = {name: math.inf for name in compiled}
    single = {name: _time(fn, xs) for name, fn in compiled.items()}
    long_run = max(single.values()) > 5.0
    # Short calls are timed in groups of `repeat` (at least ~20 ms a sample), so that
    # dispatch jitter does not decide a 10% comparison.
    repeat = {name: max(1, min(200, int(0.02 / max(t, 1e-6)))) for name, t in single.items()}
    for _ in range(2 if long_run else rounds):
        for name, fn in compiled.items():
            times[name] = min(times[name], _time(fn, xs, repeat[name]))
    choice = ("Sequential", "DEER", "QuasiDEER")[chosen_index(system, SOLVERS["Auto"], xs, batch)]
    best = min((times[n] for n in CANDIDATES if n in times), default=math.nan)
    rows = []
    for name in SOLVERS:
        row = dict(
            bench="auto",
            problem=f"gru(H={H})",
            H=H,
            T=T,
            batch=batch,
            solver=name,
            auto_choice=choice,
            compile_s=compile_s.get(name),
            run_s=times.get(name),
            ratio_to_best_candidate=times[name] / best if name in times else None,
            skipped=skipped.get(name),
            rounds=2 if long_run else rounds,
            **stamp(jnp.float32),
        )
        if name == "Auto" and choice in compile_s:
            row["compile_ratio_to_chosen"] = compile_s["Auto"] / compile_s[choice]
            # The same program as the chosen solver's: a run-time ratio away from 1 is
            # then the machine's noise, not Auto.
            row["same_program_as_chosen"] = hlo["Auto"] == hlo[choice]
        rows.append(row)
    return rows


def _time(fn, xs, repeat: int = 1) -> float:
    """Seconds per call, over `repeat` calls each waited for."""
    start = time.perf_counter()
    for _ in range(repeat):
        jax.block_until_ready(fn(xs))
    return (time.perf_counter() - start) / repeat


def host_overhead() -> list[dict]:
    """Auto's own work, separately: what a trace of Auto adds, and what an eager first
    call costs when the static rule does not decide (a GPU-like model, so that the
    problem is diagnosed on the host)."""
    rows = []
    system = parassm.systems.GRU(hidden_size=8)
    xs = system.inputs(10_000)
    auto = parassm.Auto()
    start = time.perf_counter()
    auto.decide(system.f, system.s0, xs=xs)
    rows.append(dict(bench="auto_host", what="decide (static rule, cached)", seconds=None))
    rows[-1]["seconds"] = time.perf_counter() - start
    gpu = parassm.diagnostics.Hardware(
        step_latency=5e-6, sequential_flops=1e9, call_latency=5e-6, vector_flops=1e13, name="gpu"
    )
    auto = parassm.Auto(hardware=gpu)
    start = time.perf_counter()
    solver = auto.decide(system.f, system.s0, xs=xs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    auto.decide(system.f, system.s0, xs=1.1 * xs)
    again = time.perf_counter() - start
    rows.append(
        dict(
            bench="auto_host",
            what=f"diagnosis on a GPU-like model, first call (chose {type(solver).__name__})",
            seconds=first,
        )
    )
    rows.append(dict(bench="auto_host", what="same signature, cached", seconds=again))
    for row in rows:
        row.update(stamp(jnp.float32))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-gb", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="T in {256, 1e4} only")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    parassm.diagnostics.Hardware.detect(jnp.float32)
    print(f"hardware model ready in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    lengths = (256, 10_000) if args.quick else (256, 10_000, 100_000)
    rows = []
    print(
        f"{'H':>3} {'T':>7} {'B':>3} {'solver':<11} {'compile s':>10} {'run ms':>10} "
        f"{'x best':>7}  note"
    )
    for H in (8, 32):
        for T in lengths:
            for batch in (1, 16):
                out = run_config(H, T, batch, args.rounds, args.max_gb)
                rows += out
                for r in out:
                    note = r["skipped"] or ""
                    if r["solver"] == "Auto":
                        note = f"chose {r['auto_choice']}"
                        if "compile_ratio_to_chosen" in r:
                            note += f", compile x{r['compile_ratio_to_chosen']:.2f} of it"
                            if r["same_program_as_chosen"]:
                                note += ", same HLO"
                    run = "-" if r["run_s"] is None else f"{1e3 * r['run_s']:.3f}"
                    comp = "-" if r["compile_s"] is None else f"{r['compile_s']:.2f}"
                    ratio = r["ratio_to_best_candidate"]
                    ratio = "-" if ratio is None else f"{ratio:.2f}"
                    print(
                        f"{H:>3} {T:>7} {batch:>3} {r['solver']:<11} {comp:>10} {run:>10} "
                        f"{ratio:>7}  {note}",
                        flush=True,
                    )
    for row in host_overhead():
        rows.append(row)
        print(f"host: {row['what']}: {row['seconds']:.3f} s")
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / "auto_cpu.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    autos = [r for r in rows if r.get("solver") == "Auto" and r["run_s"] is not None]
    worst = max(r["ratio_to_best_candidate"] for r in autos)
    worst_c = max((r.get("compile_ratio_to_chosen", 0) for r in autos), default=math.nan)
    print(f"worst Auto / best candidate: {worst:.3f}; worst compile ratio: {worst_c:.2f}")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
