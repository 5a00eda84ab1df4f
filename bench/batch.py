"""A batch at the cost of its batch: every parallel solver under `jax.vmap`, beside
`lax.scan` and the two published implementations, in one process.

The problem is the GRU of `bench/peers.py` (`equinox.nn.GRUCell`, input 4, hidden `H`,
random weights, zero state, standard normal inputs, float32), now `B` independent input
sequences. For every point of the grid (`H`, `T`, `B`) the script compiles ahead of
time, warms up, then times every contender round-robin (so that load from other
processes hits them alike) and keeps the fastest of `--rounds` runs, each followed by
`block_until_ready`:

- `lax.scan`, on one sequence and vmapped over the batch;
- every parassm parallel solver, on one sequence and vmapped (`throw=False`: every
  element keeps its own result code and step count), with the backend's default
  linear scan;
- the peers, vmapped (and on one sequence), when their code is found
  (`--peers-dir`, default `$PARASSM_PEERS_DIR`, as in `bench/peers.py`).

Each row records the time over `lax.scan`'s in the same mode, and for a batch the
**batch cost**: the batch's time over the sum of its `B` sequences' single runs, each
sequence timed alone (1.0: the batch costs what its sequences cost one by one;
`lax.scan` itself is about 0.9 on a CPU). `batch_cost_first`, the batch's time over `B`
times the first sequence's, is what the rows without `single_sum_s` reported as the
batch cost: a batch whose first sequence needs fewer iterations than another looks
dearer by it. Newton steps are the first sequence's single run's and the batch's
largest and mean; the error is the largest against `lax.scan` over the batch. Dense
maps over `DENSE_LIMIT` numbers are skipped (memory), and say so.

    python bench/batch.py                                   # H in {8, 32}, T = 2000, B = 8
    python bench/batch.py --profile full --peers-dir ~/peers
    python bench/batch.py --H 16 --T 2000 --B 8 --solvers DEER,QuasiDEER
    python bench/batch.py --clock cpu       # CPU seconds of the process, on a loaded machine
    python bench/batch.py --train           # a training step instead (see below)

With `--train` each contender is a training step instead: `eqx.filter_value_and_grad`
of the mean squared hidden state with respect to the cell's parameters, on one sequence
and on the batch (`jax.vmap` of the layer inside the loss, as a model is trained):
`lax.scan` over the cell, and `parassm.nn.ParallelRNN(cell, solver=...)` (implicit
adjoint, `throw=False`) for `TRAIN_SOLVERS`. The error is the largest against
`lax.scan`'s gradient.

JSON rows (with the git sha) go to `bench/results/batch_<backend>.json`; `--md` prints
the table as Markdown (for docs/benchmarks.md).
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import core  # noqa: E402  (stamps and result names)
import parassm  # noqa: E402
from core import forms_dense  # noqa: E402
from peers import Case, load_peers, peer_runs  # noqa: E402


PROFILES = {
    "quick": dict(H=(8, 32), T=(2_000,), B=(8,)),
    "full": dict(H=(8, 32, 64), T=(2_000, 10_000), B=(8, 32)),
    "smoke": dict(H=(4,), T=(200,), B=(3,)),
}
DENSE_LIMIT = 4e8
# Zeroth-order solvers (Picard, Jacobi) are capped: their batch cost is what is measured.
ZEROTH_CAP = 200


def solvers() -> dict[str, parassm.AbstractSolver]:
    return {
        "DEER": parassm.DEER(),
        "QuasiDEER": parassm.QuasiDEER(),
        "QuasiDEER (relinearise=0)": parassm.QuasiDEER(relinearise=0),
        "QuasiDEER (Hutchinson)": parassm.QuasiDEER(parassm.HutchinsonDiagonal()),
        "BlockQuasiDEER(4)": parassm.BlockQuasiDEER(4),
        "ELK": parassm.ELK(),
        "QuasiELK": parassm.QuasiELK(),
        "Picard": parassm.Picard(),
        "Jacobi": parassm.Jacobi(),
        "MultipleShooting": parassm.MultipleShooting(),
        "SlidingWindow": parassm.SlidingWindow(parassm.DEER(), window=512),
    }


# The solvers of `--train` (fixed in the layer, as a jitted training step needs).
TRAIN_SOLVERS = ("DEER", "QuasiDEER")
DENSE = ("DEER", "ELK", "MultipleShooting", "SlidingWindow")
ZEROTH = ("Picard", "Jacobi")
# The peer each parassm solver is compared with (dense against dense, diagonal against
# diagonal).
KIND = {"DEER": "dense", "ELK": "dense", "QuasiDEER": "diagonal", "QuasiELK": "diagonal"}
PEER_KIND = {
    "deer repo: DEER": "dense",
    "elk repo: DEER": "dense",
    "elk repo: quasi-DEER": "diagonal",
}


@dataclasses.dataclass
class Contender:
    name: str
    kind: str  # baseline | parassm | peer
    single: Callable  # xs (T, 4) -> output
    batch: Callable  # xs (B, T, 4) -> output


def compile_fn(fn, xs):
    start = time.perf_counter()
    comp = jax.jit(fn).lower(xs).compile()
    compile_s = time.perf_counter() - start
    out = jax.block_until_ready(comp(xs))
    return comp, compile_s, out


def trajectory_of(out):
    if isinstance(out, parassm.Solution):
        return out.value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--H", type=int, nargs="*")
    parser.add_argument("--T", type=int, nargs="*")
    parser.add_argument("--B", type=int, nargs="*")
    parser.add_argument("--solvers", default=None, help="comma-separated parassm solvers")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument(
        "--peers-dir", type=pathlib.Path, default=os.environ.get("PARASSM_PEERS_DIR")
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time by the wall clock (default) or by the process's CPU time (all its "
        "threads: steadier on a machine other processes load)",
    )
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument(
        "--train",
        action="store_true",
        help="time a training step (value and gradient) through ParallelRNN instead",
    )
    parser.add_argument("--md", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    grid = dict(PROFILES[args.profile])
    for key in ("H", "T", "B"):
        if getattr(args, key):
            grid[key] = tuple(getattr(args, key))
    every = solvers()
    chosen = every
    if args.train:
        chosen = {k: every[k] for k in TRAIN_SOLVERS}
    if args.solvers:
        chosen = {k: every[k] for k in args.solvers.split(",")}
    peers = {} if (args.no_peers or args.train) else load_peers(args.peers_dir)
    for name, module in peers.items():
        if isinstance(module, Exception):
            print(f"peer {name}: could not be imported ({module!r})", file=sys.stderr)
    bench = "batch_train" if args.train else "batch"
    base = dict(core.stamp(jnp.float32), bench=bench, profile=args.profile)
    out_path = args.out or core.RESULTS_DIR / f"{bench}_{base['backend']}.json"
    point_fn = run_train_point if args.train else run_point
    rows: list[dict] = []
    for H in grid["H"]:
        for T in grid["T"]:
            for B in grid["B"]:
                rows += point_fn(H, T, B, chosen, peers, args.rounds, dict(base, clock=args.clock))
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps(rows, indent=1, default=float) + "\n")
                jax.clear_caches()
    print_table(rows, markdown=args.md)
    print(f"wrote {len(rows)} rows to {out_path}", file=sys.stderr)
    return 0


def run_point(H, T, B, chosen, peers, rounds, base) -> list[dict]:
    cell = eqx.nn.GRUCell(4, H, dtype=jnp.float32, key=jr.key(0))
    s0 = jnp.zeros(H, jnp.float32)
    xs = jr.normal(jr.key(1), (B, T, 4), jnp.float32)
    point = dict(base, H=H, T=T, B=B)

    def f(s, x):
        return cell(x, s)

    def scan(xs):
        return jax.lax.scan(lambda s, x: (f(s, x), f(s, x)), s0, xs)[1]

    contenders = [Contender("lax.scan", "baseline", scan, jax.vmap(scan))]
    skipped = []
    for name, solver in chosen.items():
        if name in DENSE and forms_dense(solver, H) and B * T * H * H > DENSE_LIMIT:
            skipped.append(dict(point, name=name, skipped=f"dense maps over {DENSE_LIMIT:.0e}"))
            continue
        cap = ZEROTH_CAP if name in ZEROTH else None

        def run(xs, solver=solver, cap=cap):
            return parassm.evaluate(f, s0, xs=xs, solver=solver, max_steps=cap, throw=False)

        contenders.append(Contender(name, "parassm", run, jax.vmap(run)))
    if peers:
        case = Case(cell, xs[0], s0)
        for name, (run, _) in peer_runs(case, peers).items():
            if PEER_KIND[name] == "dense" and B * T * H * H > DENSE_LIMIT:
                skipped.append(dict(point, name=name, skipped="dense maps over limit"))
                continue
            contenders.append(Contender(name, "peer", run, jax.vmap(run)))

    compiled = time_contenders(contenders, xs, rounds, base["clock"], f"H={H} T={T} B={B}")

    ref = compiled["lax.scan", "batch"].output
    scan_s = {m: compiled["lax.scan", m].run_s for m in ("single", "batch")}
    rows = []
    for c in contenders:
        for mode in ("single", "batch"):
            out = compiled[c.name, mode].output
            value = trajectory_of(out)
            err = jnp.max(jnp.abs(value - (ref if mode == "batch" else ref[0])))
            row = timing_row(point, c, mode, compiled, scan_s, max_err=float(err))
            if isinstance(out, parassm.Solution):
                steps = out.stats["num_steps"]
                row["steps_max"] = int(jnp.max(steps))
                row["steps_mean"] = float(jnp.mean(steps))
                ok = out.result == parassm.RESULTS.successful
                row["successful"] = int(jnp.sum(ok))
                row["elements"] = 1 if mode == "single" else B
                if "num_linearisations" in out.stats:
                    row["linearisations_max"] = int(jnp.max(out.stats["num_linearisations"]))
            rows.append(row)
    add_peer_ratios(rows)
    return rows + skipped


@dataclasses.dataclass
class Timed:
    """A contender in one mode: its compiled program, the inputs it is timed on (the
    batch, or each of its sequences alone), its compile time, its output (on the
    batch or the first sequence) and the fastest run on each input."""

    compiled: Callable
    inputs: list
    compile_s: float
    output: object
    each_s: list[float]

    @property
    def run_s(self) -> float:
        """The fastest run on the first input (the batch, or the first sequence)."""
        return self.each_s[0]


def time_contenders(contenders, xs, rounds, clock_name, label) -> dict[tuple, Timed]:
    """`(name, mode) -> Timed`: each contender on the batch and on each of its
    sequences alone, compiled ahead of time, then timed round-robin (the fastest of
    `rounds`). "B single runs" is then what running the batch's own sequences one by
    one costs (`each_s`), whichever of them needs more iterations."""
    compiled = {}
    for c in contenders:
        for mode, fn, x in (("single", c.single, xs[0]), ("batch", c.batch, xs)):
            comp, compile_s, out = compile_fn(fn, x)
            inputs = list(xs) if mode == "single" else [xs]
            compiled[c.name, mode] = Timed(comp, inputs, compile_s, out, [math.inf] * len(inputs))
            print(
                f"  {label} {c.name} {mode}: compiled in {compile_s:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    for _ in range(rounds):
        for timed in compiled.values():
            for i, x in enumerate(timed.inputs):
                start = clock()
                jax.block_until_ready(timed.compiled(x))
                timed.each_s[i] = min(timed.each_s[i], clock() - start)
    return compiled


class ScanRNN(eqx.Module):
    """The baseline layer of `--train`: the cell under `lax.scan`."""

    cell: eqx.nn.GRUCell

    def __call__(self, xs):
        h0 = jnp.zeros(self.cell.hidden_size, xs.dtype)
        return jax.lax.scan(lambda h, x: (self.cell(x, h),) * 2, h0, xs)[1]


def run_train_point(H, T, B, chosen, peers, rounds, base) -> list[dict]:
    """A training step on one sequence and on a batch (`jax.vmap` of the layer inside
    the loss): the loss's value and its gradient with respect to the cell's
    parameters. Returns the steps' rows, like `run_point`."""
    cell = eqx.nn.GRUCell(4, H, dtype=jnp.float32, key=jr.key(0))
    xs = jr.normal(jr.key(1), (B, T, 4), jnp.float32)
    point = dict(base, H=H, T=T, B=B)
    layers = {"lax.scan": ScanRNN(cell)}
    for name, solver in chosen.items():
        if name in DENSE and B * T * H * H > DENSE_LIMIT:
            continue
        layers[name] = parassm.nn.ParallelRNN(cell, solver=solver, throw=False)

    def training_step(layer, batched):
        params, static = eqx.partition(layer, eqx.is_array)

        def loss(params, xs):
            layer = eqx.combine(params, static)
            hs = jax.vmap(layer)(xs) if batched else layer(xs)
            return jnp.mean(hs**2)

        return lambda xs: jax.value_and_grad(loss)(params, xs)

    contenders = [
        Contender(
            f"train: {name}",
            "baseline" if name == "lax.scan" else "parassm",
            training_step(layer, False),
            training_step(layer, True),
        )
        for name, layer in layers.items()
    ]
    compiled = time_contenders(contenders, xs, rounds, base["clock"], f"H={H} T={T} B={B}")
    scan_s = {m: compiled["train: lax.scan", m].run_s for m in ("single", "batch")}
    rows = []
    for c in contenders:
        for mode in ("single", "batch"):
            value, grads = compiled[c.name, mode].output
            ref_value, ref_grads = compiled["train: lax.scan", mode].output
            err = max(
                float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))
            )
            loss_err = float(jnp.abs(value - ref_value))
            rows.append(
                timing_row(point, c, mode, compiled, scan_s, max_err=err, loss_err=loss_err)
            )
    return rows


def timing_row(point, c, mode, compiled, scan_s, **measured) -> dict:
    """The row of contender `c` in `mode` (`time_contenders`' entries): its times,
    over `lax.scan`'s in the same mode (`scan_s`), and for a batch over `B` single
    runs; `measured` adds the accuracy fields."""
    compile_s, run_s = compiled[c.name, mode].compile_s, compiled[c.name, mode].run_s
    row = dict(
        point,
        name=c.name,
        kind=c.kind,
        mode=mode,
        compile_s=compile_s,
        run_s=run_s,
        x_scan=run_s / scan_s[mode],
        **measured,
    )
    if mode == "batch":
        each = compiled[c.name, "single"].each_s
        row["single_sum_s"] = sum(each)
        row["batch_cost"] = run_s / sum(each)
        row["batch_cost_first"] = run_s / (point["B"] * each[0])
    return row


def add_peer_ratios(rows: list[dict]) -> None:
    """Each parassm row of a kind with a peer: its time over the fastest peer's of the
    same kind in the same mode."""
    for row in rows:
        kind = KIND.get(row["name"])
        if row["kind"] != "parassm" or kind is None:
            continue
        peers = [
            r["run_s"]
            for r in rows
            if r["kind"] == "peer" and PEER_KIND[r["name"]] == kind and r["mode"] == row["mode"]
        ]
        if peers:
            row["x_fastest_peer"] = row["run_s"] / min(peers)


def print_table(rows: list[dict], markdown: bool = False) -> None:
    head = (
        "H",
        "T",
        "B",
        "solver",
        "single x scan",
        "batch x scan",
        "batch cost",
        "x fastest peer (batch)",
        "steps (single / batch max)",
        "ok",
        "max err",
    )
    lines = []
    by = {}
    for r in rows:
        if "skipped" in r:
            lines.append(
                (
                    r["H"],
                    r["T"],
                    r["B"],
                    r["name"],
                    "skipped: " + r["skipped"],
                    "",
                    "",
                    "",
                    "",
                    "",
                    "",
                )
            )
            continue
        by.setdefault((r["H"], r["T"], r["B"], r["name"]), {})[r["mode"]] = r
    for (H, T, B, name), m in by.items():
        s, b = m.get("single", {}), m.get("batch", {})
        steps = ""
        if "steps_max" in s:
            steps = f"{s['steps_max']} / {b.get('steps_max', '')}"
        ok = f"{b['successful']}/{b['elements']}" if "successful" in b else ""
        peer = f"{b['x_fastest_peer']:.2f}" if "x_fastest_peer" in b else ""
        lines.append(
            (
                H,
                T,
                B,
                name,
                f"{s.get('x_scan', math.nan):.1f}",
                f"{b.get('x_scan', math.nan):.1f}",
                f"{b.get('batch_cost', math.nan):.2f}",
                peer,
                steps,
                ok,
                f"{b.get('max_err', math.nan):.1e}",
            )
        )
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + " --- |" * len(head))
        for line in lines:
            print("| " + " | ".join(str(x) for x in line) + " |")
    else:
        widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
        for line in (head, *lines):
            print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))


if __name__ == "__main__":
    raise SystemExit(main())
