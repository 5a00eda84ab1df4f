"""The memory traffic of a solve, one sequence against a batch: what the compiler says
the program reads and writes, per sequence.

A parallel solver's iteration passes over whole trajectories (`T` states of `D`
numbers): values of `f`, maps, residuals, the iterate and the trial, the selects of
the search. One sequence's trajectories stay in cache on a CPU at moderate `T D`; a
batch's `B T D` do not, so a batch pays for its traffic at memory speed where one
sequence pays at cache speed. And under `jax.vmap` the loop itself moves more: a
`lax.while_loop` whose predicate is batched selects every carried array between the
old and the new carry after each iteration, for every element (its finished ones keep
their state), where one sequence's loop selects nothing.

For the GRU of `bench/batch.py` and each solver given, this compiles the solve of one
sequence and of a vmapped batch and reports, per sequence:

- `bytes_total`: XLA's cost analysis of the whole program (`bytes accessed`, a
  while loop's body counted once);
- `bytes_iteration`: the Newton loop's body alone, i.e. one iteration: the operands
  and results of its top-level instructions in the optimised HLO (a fusion counts as
  what it reads and writes). Conditionals are not counted: their branches (the
  descent where it is behind one, the restarts, the estimate of the error) run only
  when taken, so this is the part of an iteration that runs every time;
- `bytes_loop_selects`: the part of that which the while loop's batching adds (the
  instructions jax names `body_pred`), and `loop_selects`, how many;
- `trajectory_bytes`: one trajectory, `T D` numbers, for scale.

No timing: the traffic is a property of the compiled program. `bench/batch.py` times
the same programs.

    python bench/traffic.py                               # QuasiDEER and DEER, H = 64
    python bench/traffic.py --H 32 64 --T 2000 --B 8 32 --solvers QuasiDEER,Picard

Rows go to `bench/results/traffic_<backend>.json`.
"""

import argparse
import json
import pathlib
import re
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import core  # noqa: E402
import parassm  # noqa: E402
from batch import solvers, ZEROTH, ZEROTH_CAP  # noqa: E402


_ITEMSIZE = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2}
_ITEMSIZE.update({"s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1})
_SHAPE = re.compile(r"\b(" + "|".join(_ITEMSIZE) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)(.*)$")
# Instructions that move nothing themselves: views, and calls whose operands pass by
# reference (a conditional's branches, which run only when taken, are not counted).
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant"}
_FREE |= {"conditional", "while", "call"}


def _bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _ITEMSIZE[dtype]
    return total


def computations(hlo: str) -> dict[str, list[str]]:
    """The optimised HLO module's computations: name -> instruction lines."""
    out, current = {}, None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = out.setdefault(header.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            current.append(line.strip())
    return out


def body_traffic(lines: list[str]) -> tuple[int, int, int]:
    """`(bytes, loop_select_bytes, loop_selects)` of one computation: the operands and
    results of its top-level instructions (a fusion counts as what it reads and
    writes; see `_FREE`), and those of the selects jax's while-loop batching adds
    (`body_pred`)."""
    shapes: dict[str, str] = {}
    total = selects = count = 0
    for line in lines:
        m = _INSTRUCTION.match(line)
        if m is None:
            continue
        name, shape, op, operands, rest = m.groups()
        shapes[name] = shape
        if op in _FREE:
            continue
        moved = _bytes(shape) + sum(
            _bytes(shapes.get(o, "")) for o in re.findall(r"%([\w.\-]+)", operands)
        )
        total += moved
        if "body_pred" in rest:
            selects += moved
            count += 1
    return total, selects, count


def newton_traffic(hlo: str) -> tuple[int, int, int]:
    """`body_traffic` of the program's largest while loop body by traffic: the Newton
    loop (the others are scans over time, whose bodies move one step)."""
    comps = computations(hlo)
    bodies = set(re.findall(r"body=%([\w.\-]+)", hlo))
    return max((body_traffic(comps[b]) for b in bodies if b in comps), key=lambda t: t[0])


def measure_point(H: int, T: int, B: int, name: str, solver, base: dict) -> list[dict]:
    cell = eqx.nn.GRUCell(4, H, dtype=jnp.float32, key=jr.key(0))
    s0 = jnp.zeros(H, jnp.float32)
    xs = jr.normal(jr.key(1), (B, T, 4), jnp.float32)
    cap = ZEROTH_CAP if name in ZEROTH else None

    def run(xs):
        return parassm.evaluate(
            lambda s, x: cell(x, s), s0, xs=xs, solver=solver, max_steps=cap, throw=False
        )

    rows = []
    for mode, fn, x, n in (("single", run, xs[0], 1), ("batch", jax.vmap(run), xs, B)):
        compiled = jax.jit(fn).lower(x).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        hlo = compiled.as_text()
        body, selects, count = newton_traffic(hlo)
        rows.append(
            dict(
                base,
                H=H,
                T=T,
                B=B,
                name=name,
                mode=mode,
                trajectory_bytes=T * H * 4,
                bytes_total=cost["bytes accessed"] / n,
                bytes_iteration=body / n,
                bytes_loop_selects=selects / n,
                loop_selects=count,
            )
        )
        print(
            f"H={H} T={T} B={B} {name} {mode}: {rows[-1]['bytes_iteration'] / 1e6:.1f} MB "
            f"per iteration per sequence",
            file=sys.stderr,
            flush=True,
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| H | T | B | solver | MB per sequence, single / batch | one iteration, single / "
        "batch (trajectories) | loop selects under vmap |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    single = {(r["H"], r["T"], r["name"]): r for r in rows if r["mode"] == "single"}
    for r in rows:
        if r["mode"] != "batch":
            continue
        s = single[r["H"], r["T"], r["name"]]
        traj = r["trajectory_bytes"]
        share = r["bytes_loop_selects"] / r["bytes_iteration"]
        print(
            f"| {r['H']} | {r['T']} | {r['B']} | {r['name']} | "
            f"{s['bytes_total'] / 1e6:.1f} / {r['bytes_total'] / 1e6:.1f} | "
            f"{s['bytes_iteration'] / 1e6:.1f} / {r['bytes_iteration'] / 1e6:.1f} "
            f"({s['bytes_iteration'] / traj:.0f} / {r['bytes_iteration'] / traj:.0f}) | "
            f"{r['loop_selects']}, {100 * share:.0f}% of the batch's iteration |"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--H", type=int, nargs="*", default=[64])
    parser.add_argument("--T", type=int, nargs="*", default=[2000])
    parser.add_argument("--B", type=int, nargs="*", default=[32])
    parser.add_argument("--solvers", default="QuasiDEER,DEER")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    every = solvers()
    chosen = {k: every[k] for k in args.solvers.split(",")}
    base = dict(core.stamp(jnp.float32), bench="traffic")
    out_path = args.out or core.RESULTS_DIR / f"traffic_{base['backend']}.json"
    rows: list[dict] = []
    for H in args.H:
        for T in args.T:
            for B in args.B:
                for name, solver in chosen.items():
                    rows += measure_point(H, T, B, name, solver, base)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(rows, indent=1, default=float) + "\n")
    print_table(rows)
    print(f"wrote {len(rows)} rows to {out_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
