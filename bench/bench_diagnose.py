"""What `parassm.diagnose` costs, and how well it predicts Newton steps, on the zoo.

For each system of the calibration zoo (`bench/calibrate_steps.py`) at length `T`:
the diagnosis (first call, with compilation, and a second, cached call), the
sequential baseline, and each parallel solver's measured steps and run time, against
the predicted steps. Prints a table, writes JSON rows to
`bench/results/diagnose_cpu.json` and the plot `docs/diagnostics_steps.png`.

    python bench/bench_diagnose.py [--T 2048] [--no-plot]
"""

import argparse
import json
import pathlib
import sys
import time

import jax


jax.config.update("jax_enable_x64", True)

import parassm
from parassm._timing import environment, measure


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from calibrate_steps import MEASURED, ZOO  # noqa: E402


ROOT = pathlib.Path(__file__).resolve().parent.parent


def timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree_util.tree_leaves(out))
    return out, time.perf_counter() - start


def bench_system(label, system, T):
    xs = system.inputs(T)
    D = sum(leaf.size for leaf in jax.tree_util.tree_leaves(system.s0))

    def diag():
        return parassm.diagnose(system.f, system.s0, T, xs=xs, dt=system.dt)

    d, cold = timed(diag)
    _, warm = timed(diag)

    def run_with(solver):
        def run(s0, xs):
            return parassm.evaluate(system.f, s0, T, xs=xs, solver=solver, throw=False)

        return measure(run, system.s0, xs, repeats=1)

    _, seq_compile, seq_run = run_with(parassm.Sequential())
    solvers = {}
    for name, solver in MEASURED.items():
        sol, compile_s, run_s = run_with(solver)
        solvers[name] = dict(
            predicted=d.predicted_steps[name],
            measured=int(sol.stats["num_steps"]),
            success=bool(sol.result == parassm.RESULTS.successful),
            compile_s=compile_s,
            run_s=run_s,
        )
    return dict(
        problem=label,
        T=T,
        D=D,
        dtype=str(system.s0.dtype),
        lle=d.lle,
        regime=d.regime,
        recommended=d.recommended_name,
        diagnose_first_call_s=cold,
        diagnose_cached_s=warm,
        sequential_compile_s=seq_compile,
        sequential_run_s=seq_run,
        solvers=solvers,
        **environment(),
    )


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    markers = dict(DEER="o", QuasiDEER="s", Picard="^", Jacobi="x")
    for name, marker in markers.items():
        pred = [r["solvers"][name]["predicted"] for r in rows]
        meas = [r["solvers"][name]["measured"] for r in rows]
        ax.scatter(meas, pred, marker=marker, label=name)
    T = rows[0]["T"]
    ax.plot([1, T], [1, T], color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured Newton steps")
    ax.set_ylabel("predicted Newton steps")
    ax.set_title(f"parassm.diagnose on the zoo, T = {T}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--T", type=int, default=2048)
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    rows = []
    for label, make in ZOO.items():
        print(f"{label} ...", file=sys.stderr)
        rows.append(bench_system(label, make("float64"), args.T))
    names = list(MEASURED)
    header = f"{'system':<20}{'LLE':>8} {'regime':<14}" + "".join(
        f"{n + ' p/m':>16}" for n in names
    )
    header += f"{'diag s':>9}{'cached s':>10}{'seq s':>9}"
    print(header)
    for r in rows:
        line = f"{r['problem']:<20}{r['lle']:>8.3f} {r['regime']:<14}"
        for n in names:
            s = r["solvers"][n]
            line += f"{str(s['predicted']) + ' / ' + str(s['measured']):>16}"
        line += f"{r['diagnose_first_call_s']:>9.2f}{r['diagnose_cached_s']:>10.4f}"
        line += f"{r['sequential_run_s']:>9.4f}"
        print(line)
    out = ROOT / "bench" / "results" / "diagnose_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    if not args.no_plot:
        plot(rows, ROOT / "docs" / "diagnostics_steps.png")
        print(f"wrote {ROOT / 'docs' / 'diagnostics_steps.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
