"""The benchmark suite sized for one accelerator: T up to 1e6, batches up to 64.

    python bench/gpu_suite.py OUT_DIR                 # < 8 minutes on one H100
    python bench/gpu_suite.py OUT_DIR --budget-s 300  # stop starting new runs sooner
    python bench/gpu_suite.py OUT_DIR --smoke         # tiny sizes: checks the script on a CPU

The same measurements as `bench/core.py` (every solver against `lax.scan` in the same
process: compile seconds, median run seconds after a warm-up with `block_until_ready`,
Newton steps, result, max error against `lax.scan`), on problems sized for a GPU:

1. GRU, D = 16, T in {1e4, 1e5, 1e6};
2. GRU, D = 16, batch 64 (`jax.vmap` over sequences), T in {1e4, 1e5};
3. GRU, D = 64 and D = 256, T in {1e4, 1e5};
4. the mean-field RNN, D = 100, T = 1000, g = 0.8 (predictable) and 1.5 (chaotic): the
   setting of Gonzalez et al. (2025), who report DEER ~10x faster than sequential for
   the predictable one and 10-100x slower for the chaotic one on an H100;
5. the two-well Langevin sampler, T in {1e4, 1e5, 1e6}, and batch 64 at T = 1e4 (the
   paper: DEER steps grow sublinearly, max ~35 at T = 1e4 over 20 seeds);
6. the LLE sweep (mean-field RNN over gains: steps against the Lyapunov exponent).

Problems run in that order. The suite keeps to a time budget (`--budget-s`, default 420 s
of wall time): once it is spent, the remaining solvers and problems are written as
skipped rows with that reason, so the whole run stays under 8 minutes including start-up.
Rows go to `OUT_DIR/gpu_suite_<backend>.json` (a JSON list), written again after each
problem so an interrupted run keeps what it measured.
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import time


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import core  # noqa: E402  (bench/core.py, next to this file)
import jax.numpy as jnp  # noqa: E402


GPU = core.Profile(
    gru_D=(),
    gru_T=(),
    mean_field=(),
    two_well_T=(),
    repeats=5,
    cap_zeroth_order=1_000,
    cap_first_order=1_000,
    dense_numbers=4e8,  # 1.6 GB of float32 per (T, D, D) array
    dense_work=2e11,
    long_run_s=2.0,
    floor_T=1_000_000,
    floor_rounds=21,
    sweep_gains=(0.4, 0.7, 0.9, 1.1, 1.3, 1.6, 2.0),
    sweep_cap=1_000,
    machine="one accelerator",
)

SMOKE = dataclasses.replace(
    GPU,
    repeats=2,
    cap_zeroth_order=20,
    cap_first_order=20,
    dense_numbers=2e6,
    dense_work=2e8,
    sweep_gains=(0.5, 1.6),
    sweep_cap=20,
    machine="smoke test",
)


def problems(dtype, smoke: bool) -> list[core.Problem]:
    def batched(problem: core.Problem, batch: int) -> core.Problem:
        return dataclasses.replace(problem, batch=batch, label=f"{problem.label}, batch {batch}")

    if smoke:
        return [
            core.gru(8, 300, dtype),
            batched(core.gru(8, 200, dtype), 4),
            core.mean_field(0.8, 200, dtype, D=16),
            core.two_well(500, dtype),
        ]
    out = [core.gru(16, T, dtype) for T in (10_000, 100_000, 1_000_000)]
    out += [batched(core.gru(16, T, dtype), 64) for T in (10_000, 100_000)]
    out += [core.gru(D, T, dtype) for D in (64, 256) for T in (10_000, 100_000)]
    out += [core.mean_field(g, 1_000, dtype) for g in (0.8, 1.5)]
    out += [core.two_well(T, dtype) for T in (10_000, 100_000, 1_000_000)]
    out += [batched(core.two_well(10_000, dtype), 64)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=pathlib.Path, help="folder for the JSON rows")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (any machine)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    deadline = start + args.budget_s
    dtype = jnp.dtype(args.dtype)
    if dtype == jnp.float64:
        import jax

        jax.config.update("jax_enable_x64", True)
    profile = SMOKE if args.smoke else GPU
    base = dict(core.stamp(dtype), profile="smoke" if args.smoke else "gpu")
    if base["backend"] == "cpu" and not args.smoke:
        print(
            "warning: no accelerator found (backend cpu); this suite is sized for one "
            "GPU and will mostly run out of its time budget. Use --smoke to check it.",
            file=sys.stderr,
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"gpu_suite_{base['backend']}.json"
    print(
        f"parassm GPU suite: jax {base['jax_version']}, {base['backend']} "
        f"({base['device']}), {dtype.name}, git {base['git_sha']}, budget {args.budget_s:.0f} s"
    )
    rows: list[dict] = []

    def save():
        out.write_text(json.dumps(rows, indent=1, default=core._json_default) + "\n")

    core.print_header()
    for problem in problems(dtype, args.smoke):
        if time.perf_counter() > deadline:
            rows.append(
                dict(
                    bench="gpu_suite",
                    problem=problem.name,
                    label=problem.label,
                    T=problem.T,
                    D=problem.D,
                    batch=problem.batch,
                    solver="all",
                    skipped=True,
                    note="time budget of the run exhausted before this problem started",
                    **base,
                )
            )
            core.print_row(rows[-1])
            continue
        rows.extend(
            core.run_problem(problem, profile, dtype, base, bench="gpu_suite", deadline=deadline)
        )
        save()
    if time.perf_counter() < deadline:
        sweep = core.lle_sweep(profile, dtype, base)
        rows.extend(dict(r, bench="gpu_suite_lle") for r in sweep)
    else:
        print("LLE sweep skipped: time budget exhausted")
    save()
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
