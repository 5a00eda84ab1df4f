"""Forward + backward through `parassm.nn.ParallelRNN` against the same cell under
`jax.lax.scan`, in the same process.

For a random GRU (hidden size `D`) over `T` steps, times `value_and_grad` of a scalar
loss of all hidden states with respect to the cell's parameters: once through
`lax.scan` (the baseline), once through `ParallelRNN` with a parallel solver and the
implicit adjoint (DEER with the adjoint's default linear solver: on a CPU from 17
components `SequentialScan`, else a dense scan). Rows record compile seconds, median
run seconds (after a warm-up, with `block_until_ready`), the forward Newton steps, the
largest gradient error against the baseline and the ratio to it. Configurations that
cannot finish in reasonable time or memory on the machine are written as `skipped`
rows with the reason.

    python bench/bench_grad.py --profile quick     # a few minutes on a CPU
    python bench/bench_grad.py --profile full      # D in {16, 64, 256}, T in {1e3, 1e4, 1e5}

Rows go to `bench/results/grad_<backend>.json`.
"""

import argparse
import json
import pathlib
import sys

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import parassm  # noqa: E402
from parassm._timing import measure  # noqa: E402

from bench.core import stamp  # noqa: E402


PROFILES = {
    "quick": dict(Ds=(16, 64), Ts=(1_000, 10_000), repeats=3),
    "full": dict(Ds=(16, 64, 256), Ts=(1_000, 10_000, 100_000), repeats=5),
}


def configurations(D: int, T: int, backend: str):
    """(name, solver, adjoint) to run for this size, or a reason to skip."""
    small = D <= 64
    out = [
        (
            "QuasiDEER(Hutchinson)+implicit",
            parassm.QuasiDEER(parassm.HutchinsonDiagonal()),
            parassm.ImplicitAdjoint(
                parassm.DenseScan() if small else parassm.QuasiScan(parassm.HutchinsonDiagonal())
            ),
        ),
    ]
    if D <= 64 and (backend != "cpu" or D * D * T <= 64 * 64 * 10_000):
        out.insert(0, ("DEER+implicit", parassm.DEER(), parassm.ImplicitAdjoint()))
    else:
        out.insert(0, ("DEER+implicit", None, f"skipped: T D^2 = {T * D**2:.1e}, over budget"))
    out.append(
        (
            "QuasiDEER(Hutchinson)+implicit(sequential)",
            parassm.QuasiDEER(parassm.HutchinsonDiagonal()),
            parassm.ImplicitAdjoint(parassm.SequentialScan()),
        )
    )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)
    profile = PROFILES[args.profile]
    backend = jax.default_backend()
    out = args.out or pathlib.Path(__file__).parent / "results" / f"grad_{backend}.json"
    rows = []
    header = f"{'D':>4} {'T':>7} {'method':<44}{'steps':>6}{'compile s':>10}{'run s':>9}"
    header += f"{'x scan':>8}{'grad err':>10}"
    print(header)
    print("-" * len(header))
    for D in profile["Ds"]:
        for T in profile["Ts"]:
            cell = eqx.nn.GRUCell(4, D, key=jr.key(0), dtype=dtype)
            xs = jr.normal(jr.key(1), (T, 4), dtype)

            def loss_scan(cell, xs):
                hs = lax.scan(lambda h, x: (cell(x, h),) * 2, jnp.zeros(D, dtype), xs)[1]
                return jnp.mean(hs**2)

            base = eqx.filter_value_and_grad(loss_scan)
            ref, ref_c, ref_r = measure(
                lambda c, x: base(c, x), cell, xs, repeats=profile["repeats"]
            )
            row0 = dict(
                stamp(dtype),
                D=D,
                T=T,
                method="lax.scan",
                compile_s=ref_c,
                run_s=ref_r,
                ratio=1.0,
                steps=None,
                grad_err=0.0,
            )
            rows.append(row0)
            print(
                f"{D:>4} {T:>7} {'lax.scan':<44}{'-':>6}{ref_c:>10.2f}{ref_r:>9.4f}{1.0:>8.2f}"
                f"{0.0:>10.1e}"
            )
            for name, solver, adjoint in configurations(D, T, backend):
                if solver is None:
                    rows.append(dict(stamp(dtype), D=D, T=T, method=name, skipped=adjoint))
                    print(f"{D:>4} {T:>7} {name:<44}{adjoint}")
                    continue
                rnn = parassm.nn.ParallelRNN(cell, solver=solver, adjoint=adjoint, throw=False)

                def loss_par(rnn, xs):
                    sol = rnn.solve(xs)
                    return jnp.mean(sol.value**2), sol.stats["num_steps"]

                vg = eqx.filter_value_and_grad(loss_par, has_aux=True)
                (val, grads), c_s, r_s = measure(
                    lambda m, x: vg(m, x), rnn, xs, repeats=profile["repeats"]
                )
                steps = int(val[1])
                err = max(
                    float(jnp.max(jnp.abs(a - b)))
                    for a, b in zip(
                        jax.tree_util.tree_leaves(grads.cell), jax.tree_util.tree_leaves(ref[1])
                    )
                )
                rows.append(
                    dict(
                        stamp(dtype),
                        D=D,
                        T=T,
                        method=name,
                        compile_s=c_s,
                        run_s=r_s,
                        ratio=r_s / ref_r,
                        steps=steps,
                        grad_err=err,
                    )
                )
                print(
                    f"{D:>4} {T:>7} {name:<44}{steps:>6}{c_s:>10.2f}{r_s:>9.4f}"
                    f"{r_s / ref_r:>8.2f}{err:>10.1e}"
                )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
