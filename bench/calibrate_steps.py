"""Calibrate the step predictor of `parassm.diagnose` on the systems zoo.

For each system of `ZOO`: run the diagnosis trials (one per solver, on the proxy
prefix) and evaluate the full problem with each solver to measure its Newton steps.
Then grid-search the extrapolation constants (`crawl_fraction` and one factor per
solver) that minimise the mean |log(predicted / measured)|, per dtype (each at the
solvers' default tolerance, `eps ** 0.7`), and write them, with the rows they were
fitted on, to `parassm/diagnostics/calibration.json`. The held-out evaluation is
`bench/heldout.py` (different systems).

    python bench/calibrate_steps.py [--T 1024] [--dtypes float32,float64]
"""

import argparse
import datetime
import json
import math
import pathlib
import sys

import jax


jax.config.update("jax_enable_x64", True)

import numpy as np
import parassm
from parassm._timing import environment
from parassm.diagnostics._diagnose import default_settings, diagnosis_arrays, LLE_TOL
from parassm.diagnostics._predict import CALIBRATION_FILE, extrapolate, trial_solver


ROOT = pathlib.Path(__file__).resolve().parent
S = parassm.systems
ZOO = {
    "gru": lambda dtype: S.GRU(hidden_size=16, dtype=dtype),
    "tanh_rnn(a=0.8)": lambda dtype: S.TanhRNN(a=0.8, dtype=dtype),
    "tanh_rnn(a=10)": lambda dtype: S.TanhRNN(a=10.0, dtype=dtype),
    "mean_field(g=0.5)": lambda dtype: S.MeanFieldRNN(size=16, g=0.5, dtype=dtype),
    "mean_field(g=2)": lambda dtype: S.MeanFieldRNN(size=16, g=2.0, dtype=dtype),
    "logistic(r=4)": lambda dtype: S.Logistic(r=4.0, dtype=dtype),
    "tent(mu=0.7)": lambda dtype: S.Tent(mu=0.7, x0=0.8, dtype=dtype),
    "henon": lambda dtype: S.Henon(dtype=dtype),
    "lorenz63(rk4)": lambda dtype: S.Lorenz63(integrator="rk4", dtype=dtype),
    "two_well": lambda dtype: S.TwoWellLangevin(dtype=dtype),
    "s5": lambda dtype: S.S5WordProblem(dtype=dtype),
}
MEASURED = {
    "DEER": parassm.DEER(),
    "QuasiDEER": parassm.QuasiDEER(),
    "Picard": parassm.Picard(),
    "Jacobi": parassm.Jacobi(),
}


def measure_steps(system, T, xs) -> dict[str, int]:
    out = {}
    for name, solver in MEASURED.items():
        sol = parassm.evaluate(system.f, system.s0, T, xs=xs, solver=solver, throw=False)
        out[name] = int(sol.stats["num_steps"])
    return out


def trials(system, T, xs, settings):
    """The diagnosis' trials (host side, as `parassm.diagnose` runs them): `(trials by
    solver name, LLE, proxy length)`."""
    out = diagnosis_arrays(system.f, system.s0, xs, T, settings)
    found = {
        name: tuple(np.asarray(a) for a in out["trials"][i])
        for i, name in enumerate(_trial_names(settings))
    }
    return found, float(out["lle"]), int(out["proxy_length"])


def _trial_names(settings):
    names = []
    for solver in settings.solvers:
        name = type(trial_solver(solver)).__name__
        if name not in names:
            names.append(name)
    return names


_extrapolate = jax.jit(extrapolate, static_argnums=(2, 3, 4, 5, 6))


def predict(row, name, T, crawl, factor):
    h, r = row["trials"][type(trial_solver(MEASURED[name])).__name__]
    contracting = row["lle"] < -LLE_TOL
    h, r = jax.numpy.asarray(h), jax.numpy.asarray(r)
    return int(_extrapolate(h, r, row["proxy_length"], T, crawl, factor, contracting))


def loss(pred, measured):
    return abs(math.log(pred / max(measured, 1)))


def fit(rows, T):
    crawls = [0.15, 0.2, 0.25, 0.3, 0.4, 0.5]
    factors = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    best = None
    for crawl in crawls:
        total, chosen = 0.0, {}
        for name in MEASURED:
            errs = {
                c: np.mean([loss(predict(r, name, T, crawl, c), r["measured"][name]) for r in rows])
                for c in factors
            }
            chosen[name] = min(errs, key=errs.get)
            total += errs[chosen[name]]
        if best is None or total < best[0]:
            best = (total, crawl, chosen)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--T", type=int, default=1024)
    parser.add_argument("--dtypes", default="float32,float64")
    args = parser.parse_args()
    T = args.T
    settings = default_settings(tuple(MEASURED.values()), conditioning=False)
    by_dtype, table = {}, []
    for dtype in args.dtypes.split(","):
        rows = []
        for label, make in ZOO.items():
            system = make(dtype)
            xs = system.inputs(T)
            print(f"{dtype} {label} ...", file=sys.stderr)
            found, lle, proxy = trials(system, T, xs, settings)
            rows.append(
                dict(
                    system=label,
                    trials=found,
                    lle=lle,
                    proxy_length=proxy,
                    measured=measure_steps(system, T, xs),
                )
            )
        total, crawl, chosen = fit(rows, T)
        chosen["ELK"] = chosen["DEER"]
        chosen["QuasiELK"] = chosen["QuasiDEER"]
        by_dtype[dtype] = dict(
            crawl_fraction=crawl,
            factors=chosen,
            mean_abs_log_error=total / len(MEASURED),
            rtol="default (eps**0.7)",
        )
        for r in rows:
            pred = {n: predict(r, n, T, crawl, chosen[n]) for n in MEASURED}
            table.append(
                dict(
                    system=r["system"],
                    dtype=dtype,
                    T=T,
                    lle=r["lle"],
                    proxy_length=r["proxy_length"],
                    measured=r["measured"],
                    predicted=pred,
                )
            )
            print(
                f"{dtype} {r['system']:<20}"
                + "".join(f"{n}: {pred[n]:>5} / {r['measured'][n]:<5} " for n in MEASURED)
            )
    old = json.loads(CALIBRATION_FILE.read_text()).get("by_dtype", {})
    calibration = dict(
        proxy_length=settings.proxy_length,
        max_trial_steps=settings.max_trial_steps,
        by_dtype={**old, **by_dtype},
        produced_by="bench/calibrate_steps.py",
        date=datetime.date.today().isoformat(),
        environment=environment(),
        rows=table,
    )
    with open(CALIBRATION_FILE, "w") as f:
        json.dump(calibration, f, indent=1)
        f.write("\n")
    print(f"wrote {CALIBRATION_FILE}: {by_dtype}", file=sys.stderr)


if __name__ == "__main__":
    main()
