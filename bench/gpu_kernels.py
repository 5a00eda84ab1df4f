"""Check the Pallas scan kernels on the device and time them.

    python bench/gpu_kernels.py OUTDIR            # on a GPU: < 8 minutes on one H100
    python bench/gpu_kernels.py OUTDIR --quick    # CPU smoke run (Pallas interpret mode)

For each recurrence (diagonal `s_t = a_t * s_{t-1} + b_t`; dense `D = 16` and
block-diagonal `k = 8` for `D = 256`), `T` in {1e4, 1e5, 1e6} and `D` in {16, 256}
(float32), it times four implementations of the same solve: `pallas` (`parassm_kernels`,
in kernels/), `chunked` (`parassm.linear.ChunkedScan`), `associative_scan`
(`parassm.linear.AssociativeScan`, the default) and `lax_scan` (the sequential reference
in kernels/parassm_kernels/_reference.py), and reports each one's error against
`lax_scan`. Check rows (float64, reverse) compare the kernels with the references on the
device.

Each row: impl, case, T, D, k, dtype, compile_s, run_s (median after a warm-up, with
`block_until_ready`), max_abs_error and max_rel_error vs lax_scan, device, backend,
jax_version; skipped rows say why (memory guard, time budget) and failures keep the
error message. Written to OUTDIR/kernels_<backend>.json.
"""

import argparse
import json
import os
import pathlib
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import jax.random as jr
import parassm.linear as linear
import parassm_kernels as kernels
from parassm._timing import environment, measure


# Peak memory as a multiple of the transition array, per implementation (generous).
MEMORY_FACTOR = dict(lax_scan=2.5, associative_scan=6.0, chunked=5.0, pallas=3.0)


def device_memory_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def make_problem(case, T, D, k, dtype, key):
    ka, kb = jr.split(key)

    @jax.jit
    def make():
        b = jr.normal(kb, (T, D), dtype)
        if case == "diagonal":
            # Slow decay (long memory): rounding in the carried state matters.
            return jr.uniform(ka, (T, D), dtype, 0.9, 0.999), b
        scale = jnp.asarray(0.4 / k**0.5, dtype)
        return scale * jr.normal(ka, (T, D // k, k, k), dtype), b

    return make()


def implementations(case, chunk_size, interpret):
    if case == "diagonal":
        transition = linear.Diagonal
        kernel = lambda a, b: kernels.diagonal_scan(  # noqa: E731
            a, b, chunk_size=chunk_size, interpret=interpret
        )
        reference = kernels.diagonal_scan_reference
    else:
        transition = linear.BlockDiagonal
        kernel = lambda a, b: kernels.block_scan(  # noqa: E731
            a, b, chunk_size=chunk_size, interpret=interpret
        )
        reference = kernels.block_scan_reference
    solve = lambda impl: lambda a, b: linear.solve(transition(a), b, scan_impl=impl)  # noqa: E731
    return dict(
        lax_scan=reference,
        associative_scan=solve(linear.AssociativeScan()),
        pallas=kernel,
        chunked=solve(linear.ChunkedScan(chunk_size)),
    )


def errors(out, ref):
    scale = float(jnp.max(jnp.abs(ref)))
    err = float(jnp.max(jnp.abs(out - ref.astype(out.dtype))))
    return dict(max_abs_error=err, max_rel_error=err / max(scale, 1e-30))


def run_config(case, T, D, k, impl_names, *, chunk_size, interpret, repeats, deadline, env, log):
    rows = []
    dtype = jnp.float32
    base = dict(case=case, T=T, D=D, k=k, dtype="float32", chunk_size=chunk_size, **env)
    a_bytes = T * D * (1 if case == "diagonal" else k) * 4
    budget = 0.7 * device_memory_bytes()
    fns = implementations(case, chunk_size, interpret)
    a = b = ref = None
    for name in impl_names:
        row = dict(base, impl=name)
        rows.append(row)
        if MEMORY_FACTOR[name] * a_bytes > budget:
            row["skipped"] = f"memory guard: ~{MEMORY_FACTOR[name] * a_bytes / 2**30:.1f} GiB"
            log(row)
            continue
        if time.perf_counter() > deadline:
            row["skipped"] = "time budget"
            log(row)
            continue
        try:
            if a is None:
                a, b = make_problem(case, T, D, k, dtype, jr.key(T + D))
            reps = 1 if (name == "lax_scan" and T >= 10**6) else repeats
            out, compile_s, run_s = measure(fns[name], a, b, repeats=reps)
            row.update(compile_s=compile_s, run_s=run_s)
            if name == "lax_scan":
                ref = out
            elif ref is not None:
                row.update(errors(out, ref))
            del out
        except Exception as e:  # record and go on: one failure must not lose the table
            row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            traceback.print_exc(limit=3)
        log(row)
    return rows


def checks(*, interpret, env, log):
    """Float64 and reverse-time agreement of the kernels with their references."""
    rows = []
    T, D = 1000 + 37, 16
    for case in ("diagonal", "dense"):
        for dtype, reverse in ((jnp.float64, False), (jnp.float32, True), (jnp.float64, True)):
            row = dict(
                env,
                impl="pallas-check",
                case=case,
                T=T,
                D=D,
                reverse=reverse,
                dtype=jnp.dtype(dtype).name,
            )
            try:
                with jax.enable_x64(dtype == jnp.float64):
                    k = 1 if case == "diagonal" else D
                    a, b = make_problem(
                        "diagonal" if case == "diagonal" else "block", T, D, k, dtype, jr.key(7)
                    )
                    init = jnp.ones((D,), dtype)
                    if case == "diagonal":
                        out = kernels.diagonal_scan(
                            a, b, init, reverse=reverse, chunk_size=64, interpret=interpret
                        )
                        ref = kernels.diagonal_scan_reference(a, b, init, reverse=reverse)
                    else:
                        out = kernels.block_scan(
                            a, b, init, reverse=reverse, chunk_size=64, interpret=interpret
                        )
                        ref = kernels.block_scan_reference(a, b, init, reverse=reverse)
                    row.update(errors(out, ref))
                    tol = 1e-4 if dtype == jnp.float32 else 1e-10
                    row["ok"] = bool(row["max_rel_error"] < tol)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                row["ok"] = False
            rows.append(row)
            log(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", type=pathlib.Path)
    parser.add_argument("--quick", action="store_true", help="small CPU smoke run")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for timing rows")
    parser.add_argument("--chunk-size", type=int, default=128)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    deadline = start + args.budget
    env = environment()
    interpret = jax.default_backend() == "cpu"
    args.outdir.mkdir(parents=True, exist_ok=True)
    rows = []

    def log(row):
        keys = (
            "impl",
            "case",
            "T",
            "D",
            "k",
            "chunk_size",
            "dtype",
            "reverse",
            "compile_s",
            "run_s",
            "max_rel_error",
            "ok",
            "skipped",
            "error",
        )
        print(" ".join(f"{key}={row[key]}" for key in keys if key in row), flush=True)

    rows += checks(interpret=interpret, env=env, log=log)
    all_impls = ["lax_scan", "associative_scan", "pallas", "chunked"]
    if args.quick:
        # Interpret-mode Pallas is slow: kernel timings only at small T. The chunk-size
        # sweep answers "does ChunkedScan beat associative_scan on this CPU?".
        configs = [
            ("diagonal", 1000, 16, 1, all_impls, args.chunk_size),
            ("dense", 1000, 16, 16, all_impls, args.chunk_size),
            ("diagonal", 10_000, 16, 1, all_impls, args.chunk_size),
        ]
        for chunk in (16, 64, 128, 256, 1024):
            impls = ["lax_scan"] + (["associative_scan"] if chunk == 16 else []) + ["chunked"]
            configs.append(("diagonal", 100_000, 16, 1, impls, chunk))
        repeats = 5
    else:
        configs = []
        for T in (10_000, 100_000, 1_000_000):
            for D in (16, 256):
                configs.append(("diagonal", T, D, 1, all_impls, args.chunk_size))
                # Dense for D = 16; D = 256 dense has no kernel (k <= 32): block k = 8.
                configs.append(
                    (
                        "dense" if D == 16 else "block",
                        T,
                        D,
                        16 if D == 16 else 8,
                        all_impls,
                        args.chunk_size,
                    )
                )
        repeats = 5
    for case, T, D, k, impls, chunk in configs:
        rows += run_config(
            "diagonal" if case == "diagonal" else "block",
            T,
            D,
            k,
            impls,
            chunk_size=chunk,
            interpret=interpret,
            repeats=repeats,
            deadline=deadline,
            env=env,
            log=log,
        )
        for row in rows[-len(impls) :]:
            row["case"] = case
    name = f"kernels_{env['backend']}.json"
    meta = dict(env, quick=args.quick, total_s=time.perf_counter() - start, argv=sys.argv[1:])
    (args.outdir / name).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
    print(f"wrote {args.outdir / name} in {meta['total_s']:.0f} s")
    bad = [r for r in rows if r.get("ok") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
