"""Newton steps of every parallel solver on a zoo of predictable systems (and chaotic
controls), from the default guess and from a random one.

    python -m bench.convergence                      # quick: T = 1e3, float32
    python -m bench.convergence --profile full       # T in {1e3, 1e4}, float32 and float64
    python -m bench.convergence --cases logistic --solvers DEER,ELK

The claim under test (issue 14): on every predictable system (largest Lyapunov
exponent < 0, estimated sequentially here) the default parallel solver converges in a
handful of Newton steps whatever the initial guess, and ELK / quasi-ELK are never much
slower than DEER. Each row is one (system, dtype, T, guess); each solver column shows
the accepted Newton steps (`!` if the result was not `successful`). Errors are
against `lax.scan` in the same process, relative to the size of the trajectory. At
T > 1000 `max_steps` is capped (`--cap`, default 300): a case that needs more is far
over the target anyway, and shows as `300!`.
`DEER-U` is DEER with the undamped search (the product before globalization).
`MultipleShooting` is DEER on the ends of chunks of ceil(sqrt(T)) steps; its iterations
are that many sequential steps deep. `Auto (wide)` is the solver `parassm.Auto` chooses
with a fixed model of a wide machine (GPU-like: the choice it makes on an accelerator),
decided on the default guess and run from the row's guess; the JSON row names it
(`chosen`), and a row where it chose `Sequential` shows `seq`.

With `--repeats N` every row is also timed: `lax.scan` and each solver compiled first,
then the best of N runs (`run_s`, `scan_s` and their ratio in the JSON rows):

    python -m bench.convergence --profile full --T 10000 --dtypes float64 \
        --cases pendulum --solvers DEER,ELK,MultipleShooting --repeats 5

The random guess is uniform in the box spanned by the true trajectory (per state
dimension): a guess of the right size with no information about the dynamics.

With `--ablate`, every solver runs with its default rules (`parassm.Rules`) and with
each rule that is on by default switched off in turn (the JSON rows say which:
`rules_off`, `none` for the default), and the script prints what each rule is worth:
for every solver and rule, the rows where switching it off changed the steps, the
total steps, the geometric mean of the ratio of steps, the largest ratio, and the
results that stopped being `successful` (the table in docs/solvers.md):

    python -m bench.convergence --profile full --ablate --solvers DEER,QuasiDEER \
        --output bench/results/ablation_cpu.json

JSON rows (with the git sha) go to `bench/results/convergence_<backend>.json`.
"""

import argparse
import dataclasses
import json
import math
import os
import time

import equinox as eqx
import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
import parassm  # noqa: E402
from parassm import systems as S  # noqa: E402

from .core import git_sha, RESULTS_DIR, WIDE  # noqa: E402


# ---------------------------------------------------------------------------------------
# Systems the package does not ship (small, written here).


class Ikeda(S.AbstractSystem):
    """The Ikeda map; a stable fixed point for small `u` (chaotic near `u = 0.9`)."""

    u: jax.Array
    s0: jax.Array
    dt: None = None
    name = "ikeda"

    def __init__(self, u, s0=(0.1, 0.1), dtype=None):
        self.u = jnp.asarray(u, dtype)
        self.s0 = jnp.asarray(s0, dtype)

    def f(self, s, x):
        x1, y1 = s[0], s[1]
        t = 0.4 - 6.0 / (1 + x1**2 + y1**2)
        c, sn = jnp.cos(t), jnp.sin(t)
        return jnp.stack([1 + self.u * (x1 * c - y1 * sn), self.u * (x1 * sn + y1 * c)])


class RK4Flow(S.AbstractSystem):
    """One RK4 step of a damped flow: `pendulum` (theta'' = -sin theta - c theta') or
    `duffing` (x'' = -c x' + x - x^3, two wells)."""

    kind: str = eqx.field(static=True)
    c: jax.Array
    dt: float
    s0: jax.Array
    name = "flow"

    def __init__(self, kind, c=0.5, dt=0.05, s0=(2.0, 0.0), dtype=None):
        self.kind = kind
        self.c = jnp.asarray(c, dtype)
        self.dt = dt
        self.s0 = jnp.asarray(s0, dtype)

    def field(self, s):
        q, p = s[0], s[1]
        force = -jnp.sin(q) if self.kind == "pendulum" else q - q**3
        return jnp.stack([p, force - self.c * p])

    def f(self, s, x):
        h = self.dt
        k1 = self.field(s)
        k2 = self.field(s + 0.5 * h * k1)
        k3 = self.field(s + 0.5 * h * k2)
        k4 = self.field(s + h * k3)
        return s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


class Cell(S.AbstractSystem):
    """An equinox GRU or LSTM cell with weights scaled by `scale`, Gaussian inputs."""

    cell: eqx.Module
    s0: jax.Array
    dt: None = None
    name = "cell"

    def __init__(self, kind, hidden=16, inputs=4, scale=0.5, dtype=None):
        key = jr.key(0)
        make = eqx.nn.GRUCell if kind == "gru" else eqx.nn.LSTMCell
        cell = make(inputs, hidden, key=key, dtype=dtype)
        self.cell = jax.tree.map(lambda w: w * scale if eqx.is_inexact_array(w) else w, cell)
        zeros = jnp.zeros(hidden, dtype)
        self.s0 = zeros if kind == "gru" else (zeros, zeros)

    def f(self, s, x):
        return self.cell(x, s)

    def inputs(self, T, key=None):
        return jr.normal(
            jr.key(1), (T, self.cell.input_size), jnp.result_type(*jax.tree.leaves(self.s0))
        )


def zoo(dtype) -> dict[str, tuple[S.AbstractSystem, bool]]:
    """`name -> (system, predictable)`; predictability is checked by the LLE estimate."""
    cases = {}
    for r in (2.5, 2.8, 3.2, 3.4):
        for x0 in (0.05, 0.1, 0.3, 0.6):
            cases[f"logistic r={r} s0={x0}"] = (S.Logistic(r=r, x0=x0, dtype=dtype), True)
    cases.update(
        {
            "henon a=0.2 b=0.3": (S.Henon(a=0.2, b=0.3, dtype=dtype), True),
            "ikeda u=0.3": (Ikeda(u=0.3, dtype=dtype), True),
            "two-well langevin": (S.TwoWellLangevin(dtype=dtype), True),
            "mean-field g=0.8 D=32": (S.MeanFieldRNN(size=32, g=0.8, dtype=dtype), True),
            "tanh rnn a=0.9": (S.TanhRNN(a=0.9, dtype=dtype), True),
            "gru H=16 w*0.5": (Cell("gru", scale=0.5, dtype=dtype), True),
            "lstm H=16 w*0.5": (Cell("lstm", scale=0.5, dtype=dtype), True),
            "pendulum rk4 c=0.5": (RK4Flow("pendulum", dtype=dtype), True),
            "duffing rk4 c=0.3": (RK4Flow("duffing", c=0.3, s0=(0.5, 1.0), dtype=dtype), True),
            # Negative controls: chaotic.
            "CHAOS logistic r=3.9": (S.Logistic(r=3.9, dtype=dtype), False),
            "CHAOS henon a=1.4": (S.Henon(dtype=dtype), False),
            "CHAOS lorenz63 rk4": (S.Lorenz63(dtype=dtype), False),
        }
    )
    return cases


SOLVERS = {
    "DEER": parassm.DEER(),
    "QuasiDEER": parassm.QuasiDEER(),
    "ELK": parassm.ELK(),
    "QuasiELK": parassm.QuasiELK(),
    "Jacobi": parassm.Jacobi(),
    "DEER-U": parassm.DEER(search=parassm.Undamped()),
    "MultipleShooting": parassm.MultipleShooting(),
    "MultipleShooting (Jacobi)": parassm.MultipleShooting(parassm.Jacobi()),
    # What Auto runs on an accelerator: decided on the host (on the default guess) with
    # a fixed model of a wide machine, then run from the row's guess.
    "Auto (wide)": parassm.Auto(hardware=WIDE),
}


# How a rule is switched off with a value of one of its fields: the same steps as
# `None` in its place, the trajectory to rounding (tests/test_rules.py). Then every
# variant of a solver but `blown_up` (no value switches it off) is one compiled
# program, the rules' fields traced (ablations(..., dtype)).
DISABLED = {
    "in_phase": ("rtol", -1.0),  # no prefix repeats to a negative tolerance
    "stall": ("merit_ratio", math.inf),  # no step keeps infinitely much of the merit
    "at_rest": ("merit_ratio", math.inf),
    "keep_front": ("cut", -1.0),  # no scaled residual is negative
    "reuse": ("max_kept", 0),  # never keeps
}


def _traced(rule, dtype, **values):
    """`rule` with its non-static fields as arrays (floats of `dtype`)."""
    kwargs = {}
    for field in dataclasses.fields(rule):
        value = values.get(field.name, getattr(rule, field.name))
        if not field.metadata.get("static", False):
            value = jnp.asarray(value, dtype if isinstance(value, float) else None)
        kwargs[field.name] = value
    return type(rule)(**kwargs)


def ablations(solver, dtype=None) -> dict[str, object]:
    """`rules_off -> solver`: the solver with its default rules, and with each rule that
    is on by default and applies to it switched off. With `dtype`, the rules' fields
    are traced arrays and a rule is switched off by a value (`DISABLED`), so that the
    variants share one compiled program; else by `None`."""
    rules = solver.rules
    names = [
        name
        for name in rules.names()
        if not (name == "keep_front" and not solver.search.may_reject)
        and not (name == "reuse" and getattr(solver, "relinearise", 0) == 0)
    ]
    if dtype is not None:
        rules = dataclasses.replace(
            rules, **{name: _traced(getattr(rules, name), dtype) for name in rules.names()}
        )
    out = {"none": dataclasses.replace(solver, rules=rules)}
    for name in names:
        if dtype is not None and name in DISABLED:
            field, value = DISABLED[name]
            off = _traced(getattr(rules, name), dtype, **{field: value})
        else:
            off = None
        out[name] = dataclasses.replace(solver, rules=dataclasses.replace(rules, **{name: off}))
    return out


def describe(solver) -> str:
    """A solver's name, with the chunk length of multiple shooting."""
    name = type(solver).__name__
    if isinstance(solver, parassm.MultipleShooting):
        name += f"(L={solver.chunk_length})"
    return name


@eqx.filter_jit
def _solve(system, solver, T, xs, init, max_steps):
    return parassm.evaluate(
        system.f, system.s0, T, xs=xs, solver=solver, init=init, max_steps=max_steps, throw=False
    )


@eqx.filter_jit
def _sequential(system, xs, T):
    def step(s, x):
        s = system.f(s, x)
        return s, s

    return jax.lax.scan(step, system.s0, xs, length=T)[1]


def _random_guess(ref, seed=0):
    leaves, treedef = jax.tree.flatten(ref)
    keys = jr.split(jr.key(seed), len(leaves))
    out = []
    for key, leaf in zip(keys, leaves):
        lo, hi = jnp.min(leaf, axis=0), jnp.max(leaf, axis=0)
        out.append(jr.uniform(key, leaf.shape, leaf.dtype) * (hi - lo) + lo)
    return jax.tree.unflatten(treedef, out)


def _rel_err(value, ref):
    diff = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(value), jax.tree.leaves(ref))
    )
    size = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref))
    return diff / max(size, 1e-300)


def _best(run, repeats: int) -> float | None:
    """The best wall time of `repeats` runs of `run` (already compiled), or None."""
    if not repeats:
        return None
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    return min(times)


def lle(system, xs, T) -> float:
    T = min(T, 4000)
    xs = None if xs is None else jax.tree.map(lambda x: x[:T], xs)
    burn = T // 4
    return float(
        parassm.diagnostics.lyapunov_exponents(system.f, system.s0, T, xs=xs, burn_in=burn)[0]
    )


PROFILES = {
    "quick": dict(T=(1000,), dtypes=("float32",), guesses=("default", "random")),
    "full": dict(T=(1000, 10000), dtypes=("float32", "float64"), guesses=("default", "random")),
    "smoke": dict(T=(64,), dtypes=("float32",), guesses=("default",)),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--cases", default="", help="substring filter on case names")
    parser.add_argument("--exclude", default=None, help="skip cases containing this")
    parser.add_argument("--T", type=int, nargs="*", default=None, help="override the profile")
    parser.add_argument("--dtypes", nargs="*", default=None, help="override the profile")
    parser.add_argument(
        "--resume", action="store_true", help="keep the rows in the output file, run the rest"
    )
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="also time every row: best of this many runs after compiling (0: no timing)",
    )
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="run each solver with its default rules and with each rule off in turn",
    )
    parser.add_argument(
        "--rules",
        default=None,
        help="with --ablate: only these rules (comma-separated) switched off, beside all on",
    )
    parser.add_argument(
        "--cap",
        type=int,
        default=300,
        help="max_steps for T > 1000 (T = 1000 runs uncapped): a case that needs more is "
        "far over the target of 50, and every such iteration costs O(T)",
    )
    parser.add_argument(
        "--table", default=None, help="print the ablation table of this JSON file and stop"
    )
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as fh:
            ablation_table(json.load(fh))
        return
    prof = dict(PROFILES[args.profile])
    prof["T"] = tuple(args.T) if args.T else prof["T"]
    prof["dtypes"] = tuple(args.dtypes) if args.dtypes else prof["dtypes"]
    solvers = {k: SOLVERS[k] for k in args.solvers.split(",")}
    if args.ablate:
        # The variants' names; the solvers themselves are made per dtype (below).
        ablated = solvers
        only = None if args.rules is None else {"none", *args.rules.split(",")}

        def variants(solver, dtype=None):
            out = ablations(solver, dtype)
            return {k: v for k, v in out.items() if only is None or k in only}

        solvers = {f"{k}/{off}": None for k, solver in ablated.items() for off in variants(solver)}
    sha = git_sha()
    rows = []
    out = args.output or RESULTS_DIR / f"convergence_{jax.default_backend()}.json"
    if args.resume and os.path.exists(out):
        with open(out) as fh:
            rows = json.load(fh)
    done = {(r["case"], r["dtype"], r["T"], r["guess"]) for r in rows}

    def save():
        with open(out, "w") as fh:
            json.dump(rows, fh, indent=1)
            fh.write("\n")

    header = (
        f"{'case':28s} {'dtype':7s} {'T':>6s} {'guess':7s} {'LLE':>7s} "
        + " ".join(f"{k:>9s}" for k in solvers)
        + "   max rel err"
    )
    print(header)
    for dtype_name in prof["dtypes"]:
        dtype = jnp.dtype(dtype_name)
        if args.ablate:
            solvers = {
                f"{k}/{off}": variant
                for k, solver in ablated.items()
                for off, variant in variants(solver, dtype).items()
            }
        kind = None
        for T in prof["T"]:
            for name, (system, predictable) in zoo(dtype).items():
                if args.cases and args.cases not in name:
                    continue
                if args.exclude and args.exclude in name:
                    continue
                if not predictable and T > 1000:
                    # Chaotic controls take ~T iterations of O(T) work: T = 1e3 shows it.
                    continue
                # Every kind of system compiles its own programs: drop the last kind's,
                # or one process runs out of memory maps for the compiled code (seen on
                # the CPU backend). (Systems of one kind share programs: their
                # parameters are arrays.)
                if (type(system), getattr(system, "kind", None), T) != kind:
                    jax.clear_caches()
                    parassm.clear_programs()
                    kind = (type(system), getattr(system, "kind", None), T)
                xs = system.inputs(T)
                ref = _sequential(system, xs, T)
                scan_s = _best(lambda: _sequential(system, xs, T), args.repeats)
                exponent = lle(system, xs, T)
                # Auto decides once per case, on the default guess. Every case is
                # diagnosed afresh: Auto caches decisions per signature (shapes, not
                # values), and the zoo's systems of one kind differ only in values.
                decided = {}
                for sname, solver in solvers.items():
                    if isinstance(solver, parassm.Auto):
                        parassm._auto.clear_cache()
                        decided[sname] = solver.decide(system.f, system.s0, T, xs=xs)
                for guess in prof["guesses"]:
                    if (name, dtype_name, T, guess) in done:
                        continue
                    init = None if guess == "default" else _random_guess(ref)
                    cells, errs = [], []
                    for sname, solver in solvers.items():
                        t0 = time.perf_counter()
                        chosen = None
                        if isinstance(solver, parassm.Auto):
                            solver = decided[sname]
                            chosen = describe(solver)
                        cap = T if T <= 1000 else min(T, args.cap)
                        sol = _solve(system, solver, T, xs, init, cap)
                        jax.block_until_ready(sol.value)
                        wall = time.perf_counter() - t0
                        run_s = _best(
                            lambda: _solve(system, solver, T, xs, init, cap).value, args.repeats
                        )
                        ok = bool(sol.result == parassm.RESULTS.successful)
                        steps = int(sol.stats["num_steps"])
                        err = _rel_err(sol.value, ref)
                        errs.append(err if ok else math.nan)
                        cell = f"{steps:>8d}{' ' if ok else '!'}"
                        if chosen == "Sequential":
                            cell = f"{'seq':>8s} "
                        if run_s is not None:
                            cell += f" {run_s * 1e3:.1f} ms ({run_s / scan_s:.0f}x scan)"
                        cells.append(cell)
                        rows.append(
                            dict(
                                bench="convergence",
                                case=name,
                                dtype=dtype_name,
                                T=T,
                                guess=guess,
                                lle=exponent,
                                predictable=predictable,
                                solver=sname.split("/")[0],
                                **(dict(rules_off=sname.split("/")[1]) if args.ablate else {}),
                                **({} if chosen is None else dict(chosen=chosen)),
                                steps=steps,
                                trials=int(sol.stats.get("num_trials", steps)),
                                linearisations=int(sol.stats.get("num_linearisations", -1)),
                                successful=ok,
                                rel_err_vs_scan=err,
                                wall_s_incl_compile=wall,
                                **(
                                    dict(run_s=run_s, scan_s=scan_s, ratio_to_scan=run_s / scan_s)
                                    if args.repeats
                                    else {}
                                ),
                                git_sha=sha,
                                backend=jax.default_backend(),
                            )
                        )
                    worst = np.nanmax(errs) if not all(math.isnan(e) for e in errs) else math.nan
                    print(
                        f"{name:28s} {dtype_name:7s} {T:>6d} {guess:7s} {exponent:>7.3f} "
                        + " ".join(cells)
                        + f"   {worst:.1e}",
                        flush=True,
                    )
                    save()
    save()
    print(f"wrote {len(rows)} rows to {out}")
    if args.ablate:
        ablation_table(rows)
    else:
        _summary(rows)


def maps(pairs) -> str:
    """Formations of the maps, all rules on -> the rule off (where the rows have them)."""
    if not all("linearisations" in r for pair in pairs for r in pair):
        return ""
    on = sum(a["linearisations"] for a, _ in pairs)
    return f"{on} -> {sum(b['linearisations'] for _, b in pairs)}"


def ablation_table(rows):
    """What each rule is worth: per solver and rule switched off, against the default
    rules on the same row (system, dtype, T, guess), as a Markdown table."""
    base = {
        (r["solver"], r["case"], r["dtype"], r["T"], r["guess"]): r
        for r in rows
        if r.get("rules_off") == "none"
    }
    groups = {}
    for r in rows:
        off = r.get("rules_off", "none")
        if off == "none":
            continue
        ref = base.get((r["solver"], r["case"], r["dtype"], r["T"], r["guess"]))
        if ref is not None:
            groups.setdefault((r["solver"], off), []).append((ref, r))
    print(
        "\n| solver | rule off | rows | changed | steps (all on -> off) | geomean ratio "
        "| largest ratio | fewer / more steps | `successful` lost / gained | maps formed |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for (solver, off), pairs in sorted(groups.items()):
        ratios = [max(b["steps"], 1) / max(a["steps"], 1) for a, b in pairs]
        changed = sum(a["steps"] != b["steps"] for a, b in pairs)
        fewer = sum(b["steps"] < a["steps"] for a, b in pairs)
        more = sum(b["steps"] > a["steps"] for a, b in pairs)
        lost = sum(a["successful"] and not b["successful"] for a, b in pairs)
        gained = sum(b["successful"] and not a["successful"] for a, b in pairs)
        geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
        worst = max(pairs, key=lambda ab: max(ab[1]["steps"], 1) / max(ab[0]["steps"], 1))
        a = worst[0]
        where = f"{max(ratios):.2f} ({a['case']}, {a['dtype']}, T={a['T']}, {a['guess']})"
        print(
            f"| {solver} | {off} | {len(pairs)} | {changed} | "
            f"{sum(a['steps'] for a, _ in pairs)} -> {sum(b['steps'] for _, b in pairs)} | "
            f"{geo:.3f} | {where} | {fewer} / {more} | {lost} / {gained} | {maps(pairs)} |"
        )


def _summary(rows):
    """The issue's targets, checked on the rows."""
    pred = [r for r in rows if r["predictable"] and r["lle"] < 0]
    by = {}
    for r in pred:
        by.setdefault(r["solver"], []).append(r)
    print("\npredictable cases (LLE < 0): worst steps, cases over 50 steps or unsuccessful")
    for s, rs in by.items():
        bad = [r for r in rs if r["steps"] > 50 or not r["successful"]]
        print(
            f"  {s:10s} worst {max(r['steps'] for r in rs):6d}   over target: {len(bad)}/{len(rs)}"
        )
        for r in bad[:6]:
            print(f"      {r['case']} {r['dtype']} T={r['T']} {r['guess']}: {r['steps']}")
        chosen = [r["chosen"] for r in rs if "chosen" in r]
        if chosen:
            kinds = sorted({c.split("(")[0] for c in chosen})
            print(
                "      chose: "
                + ", ".join(f"{k} {sum(c.startswith(k) for c in chosen)}" for k in kinds)
            )
    chaos = [r for r in rows if not r["predictable"]]
    dishonest = [r for r in chaos if r["successful"] and r["rel_err_vs_scan"] > 1e6]
    print(f"chaotic controls: {len(chaos)} rows, successful with absurd error: {len(dishonest)}")


if __name__ == "__main__":
    main()
