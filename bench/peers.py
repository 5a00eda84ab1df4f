"""parassm's parallel solvers side by side with `lax.scan`, a minimal reference Newton
iteration, and the two published implementations, in one process.

The problem is the same for everyone: an `equinox.nn.GRUCell` (input 4, hidden `H`,
random weights), zero initial state, standard normal inputs, float32, on a grid of
`H` and `T`. For every point of the grid the script times, after an ahead-of-time
compile and a warm-up, with `block_until_ready` (median of repeats; compile time
separately):

- `lax.scan`: the sequential baseline;
- every parassm parallel solver (DEER, quasi-DEER with the exact / Hutchinson diagonal,
  block quasi-DEER, ELK, quasi-ELK, Picard, Jacobi), and DEER / quasi-DEER with the GRU's
  closed-form Jacobian / diagonal (`parassm.nn`), each with its own convergence test,
  with the backend's default linear scan (on CPU a loop over time,
  `parassm.linear.LoopScan`); and DEER / quasi-DEER with the associative scan (the
  algorithm accelerators run, and the peers' and the reference's on every backend);
  and quasi-DEER forming its diagonals at every iterate (`relinearise=0`, as the peers
  and the reference do; the default keeps them after fast steps); and multiple shooting
  (`parassm.MultipleShooting`, chunks of ceil(sqrt(T)) steps run by `lax.scan`, all at
  once, with Jacobi or DEER on the chunk ends: another algorithm, `sqrt(T)` sequential
  steps deep per iteration where the others are `log T` deep, compared with the
  fastest peer of either kind);
- the minimal reference iteration written below -- `jax.vmap(jax.jacfwd(f))` over all
  steps and one `lax.associative_scan` (matmul combine for DEER, elementwise for the
  diagonal) -- run for the same number of iterations as parassm plus one (parassm's
  last evaluation only confirms convergence);
- the peers, if their code is found (`--peers-dir`, default `$PARASSM_PEERS_DIR`):
  `deer.seq1d` of github.com/machine-discovery/deer (DEER) and `elk.algs.deer.seq1d`
  of github.com/lindermanlab/elk (DEER and quasi-DEER, its generic Jacobian path), each
  with its own default tolerance. Their code is never part of this repository: fetch
  it yourself (see bench/README.md) and say where it is.

Each row records Newton steps, the result, the largest error against `lax.scan`,
compile and run seconds, and ratios: to `lax.scan`, to the reference iteration with the
same number of iterations + 1, and to the fastest peer of the same kind (dense Newton
against dense, diagonal against diagonal). JSON rows (with the git sha) go
to `bench/results/peers_<backend>.json`.

    python bench/peers.py                              # H in {8, 32, 64}, T = 1e4
    python bench/peers.py --profile full --budget-s 3600
"""

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import core  # noqa: E402  (bench/core.py: stamps and result names)
import parassm  # noqa: E402
from parassm.nn._cells import cell_derivatives  # noqa: E402


PROFILES = {
    "quick": dict(H=(8, 32, 64), T=(10_000,), repeats=5),
    "full": dict(H=(8, 32, 64, 128), T=(1_000, 10_000, 100_000), repeats=5),
    "smoke": dict(H=(4,), T=(200,), repeats=2),
}
# Dense (T, D, D) arrays above this many numbers are not attempted (memory).
DENSE_LIMIT = 4e8
# Zeroth-order solvers (Picard, Jacobi) get at most this many iterations.
ZEROTH_CAP = 2_000


@dataclasses.dataclass
class Case:
    cell: eqx.nn.GRUCell
    xs: jax.Array
    s0: jax.Array

    def f(self, s, x):
        return self.cell(x, s)


def make_case(H: int, T: int) -> Case:
    cell = eqx.nn.GRUCell(4, H, dtype=jnp.float32, key=jr.key(0))
    xs = jr.normal(jr.key(1), (T, 4), jnp.float32)
    return Case(cell, xs, jnp.zeros(H, jnp.float32))


# ------------------------------------------------------------------ the reference


def reference(case: Case, iterations: int, diagonal: bool) -> Callable:
    """The minimal Newton iteration: vmapped `jacfwd` and one associative scan per
    iteration, a fixed number of iterations, from the zero guess."""
    f, s0 = case.f, case.s0
    jac = jax.vmap(jax.jacfwd(f))
    values = jax.vmap(f)

    def dense_combine(a, b):
        return b[0] @ a[0], jnp.einsum("...ij,...j->...i", b[0], a[1]) + b[1]

    def diagonal_combine(a, b):
        return b[0] * a[0], b[0] * a[1] + b[1]

    def run(xs):
        def body(_, S):
            prev = jnp.concatenate([s0[None], S[:-1]])
            fs, J = values(prev, xs), jac(prev, xs)
            if diagonal:
                J = jnp.diagonal(J, axis1=1, axis2=2)
                offsets = fs - J * prev
                combine = diagonal_combine
            else:
                offsets = fs - jnp.einsum("tij,tj->ti", J, prev)
                combine = dense_combine
            return lax.associative_scan(combine, (J, offsets))[1]

        return lax.fori_loop(0, iterations, body, jnp.zeros_like(xs[:, :1] * s0))

    return run


# ------------------------------------------------------------------ parassm


def parassm_solvers(case: Case) -> dict[str, Any]:
    diagonal, jacobian = cell_derivatives(case.cell)
    return {
        "DEER": parassm.DEER(),
        "DEER (associative scan)": parassm.DEER(),
        "DEER (closed-form J)": parassm.DEER(parassm.FunctionJacobian(jacobian)),
        "QuasiDEER": parassm.QuasiDEER(),
        "QuasiDEER (diagonals every iterate)": parassm.QuasiDEER(relinearise=0),
        # The peers stop on the change between iterates, at 1e-5-2e-5 of lax.scan here:
        # parassm at a looser tolerance, for a comparison at matched accuracy.
        "QuasiDEER (rtol=3e-5)": parassm.QuasiDEER(rtol=3e-5),
        "QuasiDEER (rtol=1e-4)": parassm.QuasiDEER(rtol=1e-4),
        "QuasiDEER (associative scan)": parassm.QuasiDEER(),
        "QuasiDEER (closed-form diag)": parassm.QuasiDEER(parassm.FunctionDiagonal(diagonal)),
        "QuasiDEER (Hutchinson)": parassm.QuasiDEER(parassm.HutchinsonDiagonal()),
        "BlockQuasiDEER(4)": parassm.BlockQuasiDEER(4),
        "ELK": parassm.ELK(),
        "QuasiELK": parassm.QuasiELK(),
        "Picard": parassm.Picard(),
        "Jacobi": parassm.Jacobi(),
        "MultipleShooting (Jacobi)": parassm.MultipleShooting(parassm.Jacobi()),
        "MultipleShooting (DEER)": parassm.MultipleShooting(),
    }


DENSE = ("DEER", "DEER (associative scan)", "DEER (closed-form J)", "ELK")
# Solvers run with a linear scan other than the backend's default (on CPU: the loop).
SCAN_OF = {"DEER (associative scan)": "xla", "QuasiDEER (associative scan)": "xla"}
# Which reference iteration each parassm solver is compared with.
REFERENCE_OF = {
    "DEER": "dense",
    "DEER (associative scan)": "dense",
    "DEER (closed-form J)": "dense",
    "ELK": "dense",
    "QuasiDEER": "diagonal",
    "QuasiDEER (diagonals every iterate)": "diagonal",
    "QuasiDEER (rtol=3e-5)": "diagonal",
    "QuasiDEER (rtol=1e-4)": "diagonal",
    "QuasiDEER (associative scan)": "diagonal",
    "QuasiDEER (closed-form diag)": "diagonal",
    "QuasiDEER (Hutchinson)": "diagonal",
    "QuasiELK": "diagonal",
}


# ------------------------------------------------------------------ the peers


def load_peers(peers_dir: pathlib.Path | None) -> dict[str, Any]:
    """The peers' `seq1d` functions that can be imported from `peers_dir` (which holds
    `deer/` and `elk/`, the checkouts of the two repositories)."""
    found: dict[str, Any] = {}
    if peers_dir is None:
        return found
    for name, sub, module in (("deer", "deer", "deer"), ("elk", "elk", "elk.algs.deer")):
        path = peers_dir / sub
        if not path.is_dir():
            continue
        sys.path.insert(0, str(path))
        try:
            found[name] = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 -- report any import failure as a row note
            found[name] = e
        finally:
            sys.path.remove(str(path))
    return found


def peer_runs(case: Case, peers: dict[str, Any]) -> dict[str, tuple[Callable, Callable]]:
    """`name -> (run(xs) -> trajectory, iterations(xs) -> int)`."""

    def step(y, x, cell):
        return cell(x, y)

    runs: dict[str, tuple[Callable, Callable]] = {}
    deer = peers.get("deer")
    if deer is not None and not isinstance(deer, Exception):

        def deer_run(xs, max_iter=10_000):
            return deer.seq1d(
                step, case.s0, xs, case.cell, method=deer.seq1d.DEER(max_iter=max_iter)
            )

        def deer_iterations(xs):
            # The repository returns no iteration count: the first cap at which every
            # step reports convergence.
            for k in range(1, 200):
                if bool(jnp.all(jax.jit(lambda xs, k=k: deer_run(xs, k).success)(xs))):
                    return k
            return -1

        runs["deer repo: DEER"] = (lambda xs: deer_run(xs).value, deer_iterations)
    elk = peers.get("elk")
    if elk is not None and not isinstance(elk, Exception):
        for label, quasi in (("elk repo: DEER", False), ("elk repo: quasi-DEER", True)):

            def elk_run(xs, quasi=quasi):
                return elk.seq1d(step, case.s0, xs, case.cell, quasi=quasi, qmem_efficient=False)

            runs[label] = (
                lambda xs, elk_run=elk_run: elk_run(xs)[0],
                lambda xs, elk_run=elk_run: int(jax.jit(lambda xs: elk_run(xs)[1])(xs)),
            )
    return runs


# ------------------------------------------------------------------ the run


@dataclasses.dataclass
class Contender:
    name: str
    kind: str  # baseline | peer | parassm | reference
    fn: Callable  # compiled: xs -> output
    compile_s: float
    warmup_s: float
    output: Any
    steps: int | None = None
    result: str = "converged"
    note: str = ""
    of: str | None = None  # for a parassm solver: the name of its reference iteration
    times: list[float] = dataclasses.field(default_factory=list)


def compiled(fn: Callable, xs) -> tuple[Callable, float, float, Any]:
    """`(compiled fn, compile seconds, warm-up seconds, output)`."""
    start = time.perf_counter()
    comp = jax.jit(fn).lower(xs).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(comp(xs))
    return comp, compile_s, time.perf_counter() - start, out


def time_round_robin(contenders: list[Contender], xs, rounds: int, slow_s: float) -> None:
    """Time every contender once per round, in turn, so that load from other processes
    hits them alike. A contender whose warm-up took over `slow_s` runs once more only."""
    for r in range(rounds):
        for c in contenders:
            if r > 0 and c.warmup_s > slow_s:
                continue
            start = time.perf_counter()
            jax.block_until_ready(c.fn(xs))
            c.times.append(time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument(
        "--peers-dir", type=pathlib.Path, default=os.environ.get("PARASSM_PEERS_DIR")
    )
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument(
        "--budget-s", type=float, default=None, help="stop starting new grid points after this"
    )
    parser.add_argument("--only", nargs="*", default=None, help="parassm solver names to run")
    parser.add_argument(
        "--peer-methods", nargs="*", default=None, help="peer methods to run (default: all)"
    )
    parser.add_argument("--H", type=int, nargs="*", default=None, help="override the grid")
    parser.add_argument("--T", type=int, nargs="*", default=None, help="override the grid")
    args = parser.parse_args(argv)
    profile = dict(PROFILES[args.profile])
    profile["H"] = tuple(args.H) if args.H else profile["H"]
    profile["T"] = tuple(args.T) if args.T else profile["T"]
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    base = dict(core.stamp(jnp.float32), bench="peers", profile=args.profile)
    out = args.out or core.RESULTS_DIR / f"peers_{base['backend']}.json"
    peers = load_peers(args.peers_dir)
    for name, module in peers.items():
        if isinstance(module, Exception):
            print(f"peer {name}: could not be imported ({module!r})", file=sys.stderr)
    rows: list[dict] = []

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1, default=core._json_default) + "\n")

    print(
        f"parassm vs peers: jax {base['jax_version']}, {base['backend']} ({base['device']}), "
        f"float32, git {base['git_sha']}; run = min over {profile['repeats']} round-robin "
        "rounds (median in the JSON)"
    )
    header = (
        f"{'H':>4} {'T':>7}  {'method':40s} {'steps':>6} {'result':>9} {'max err':>8} "
        f"{'compile':>8} {'run':>10} {'/scan':>7} {'/ref':>6} {'/peer':>6}"
    )
    for H in profile["H"]:
        for T in profile["T"]:
            if deadline is not None and time.perf_counter() > deadline:
                rows.append(dict(base, H=H, T=T, result="skipped", note="time budget spent"))
                continue
            case = make_case(H, T)
            xs = case.xs
            point = dict(base, H=H, T=T, D=H, problem="gru (eqx.nn.GRUCell, input 4)")
            contenders: list[Contender] = []
            skipped: list[dict] = []

            def sequential(xs, case=case):
                return lax.scan(lambda s, x: (case.f(s, x),) * 2, case.s0, xs)[1]

            contenders.append(
                Contender("lax.scan", "baseline", *compiled(sequential, xs), result="-")
            )
            expected = contenders[0].output
            for name, (run, iterations) in peer_runs(case, peers).items():
                if args.peer_methods is not None and name not in args.peer_methods:
                    continue
                if "quasi" not in name and T * H * H > DENSE_LIMIT:
                    skipped.append(dict(method=name, kind="peer", note="dense Jacobians too large"))
                    continue
                c = Contender(name, "peer", *compiled(run, xs))
                c.steps = iterations(xs)
                c.result = "converged" if c.steps > 0 else "unknown"
                contenders.append(c)
            for name, solver in parassm_solvers(case).items():
                if args.only and name not in args.only:
                    continue
                if name in DENSE and T * H * H > DENSE_LIMIT:
                    skipped.append(
                        dict(method=name, kind="parassm", note="dense Jacobians too large")
                    )
                    continue
                cap = ZEROTH_CAP if name in ("Picard", "Jacobi") else None

                def run(xs, solver=solver, cap=cap, case=case, impl=SCAN_OF.get(name)):
                    scan = (
                        contextlib.nullcontext() if impl is None else parassm.linear.scan_impl(impl)
                    )
                    with scan:
                        return parassm.evaluate(
                            case.f, case.s0, xs=xs, solver=solver, max_steps=cap, throw=False
                        )

                c = Contender(name, "parassm", *compiled(run, xs))
                sol = c.output
                c.steps = int(sol.stats["num_steps"])
                c.result = core.result_name(sol.result)
                c.output = sol.value
                if cap and c.result != "successful":
                    c.note = f"capped at {cap} iterations"
                contenders.append(c)
                if name in REFERENCE_OF and c.result == "successful":
                    kind, iters = REFERENCE_OF[name], c.steps + 1
                    c.of = f"reference {kind} ({iters} it)"
                    if not any(r.name == c.of for r in contenders):
                        ref = reference(case, iters, kind == "diagonal")
                        contenders.append(
                            Contender(c.of, "reference", *compiled(ref, xs), steps=iters)
                        )
            time_round_robin(contenders, xs, profile["repeats"], slow_s=5.0)

            by_name = {c.name: c for c in contenders}
            scan_run = min(by_name["lax.scan"].times)
            fastest = {
                quasi: min(
                    (
                        min(c.times)
                        for c in contenders
                        if c.kind == "peer" and quasi in (None, _quasi(c.name))
                    ),
                    default=None,
                )
                for quasi in (False, True, None)
            }
            print("\n" + header)
            for c in contenders:
                run_s = min(c.times)
                ref_ratio = None if c.of is None else run_s / min(by_name[c.of].times)
                row = dict(
                    point,
                    method=c.name,
                    reference=c.of,
                    kind=c.kind,
                    steps=c.steps,
                    result=c.result,
                    max_err=float(jnp.max(jnp.abs(c.output - expected))),
                    compile_s=c.compile_s,
                    run_s=run_s,
                    run_median_s=statistics.median(c.times),
                    timings=len(c.times),
                    ratio_to_scan=run_s / scan_run,
                    ratio_to_reference=ref_ratio,
                    ratio_to_fastest_peer=(
                        None
                        if c.kind != "parassm" or fastest[_quasi(c.name)] is None
                        else run_s / fastest[_quasi(c.name)]
                    ),
                    note=c.note,
                )
                rows.append(row)
                print(_line(row))
            for sk in skipped:
                rows.append(dict(point, result="skipped", **sk))
                print(f"{H:>4} {T:>7}  {sk['method']:40s} skipped: {sk['note']}")
            save()
    save()
    print(f"\n{len(rows)} rows -> {out}")
    return 0


def _quasi(method: str) -> bool | None:
    """Like for like: diagonal (quasi) methods against the fastest diagonal peer, dense
    ones against the fastest dense peer; multiple shooting (another algorithm: Newton or
    Jacobi on the chunk ends, chunks sequential) against the fastest peer of either."""
    if method.startswith("MultipleShooting"):
        return None
    return "quasi" in method.lower() or method in ("Jacobi", "Picard")


def _line(row) -> str:
    fmt = lambda x, spec: "" if x is None else format(x, spec)  # noqa: E731
    return (
        f"{row['H']:>4} {row['T']:>7}  {row['method']:40s} {fmt(row['steps'], '>6')} "
        f"{row['result'][:9]:>9} {fmt(row['max_err'], '>8.1e')} {row['compile_s']:>7.2f}s "
        f"{row['run_s'] * 1e3:>8.2f}ms {row['ratio_to_scan']:>7.2f} "
        f"{fmt(row['ratio_to_reference'], '>6.2f')} {fmt(row['ratio_to_fastest_peer'], '>6.2f')}"
    )


if __name__ == "__main__":
    sys.exit(main())
