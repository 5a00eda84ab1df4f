"""One entry point for the benchmark suite.

    python -m bench                       # quick profile (minutes): CI sized
    python -m bench --profile full        # the whole grid
    python bench/run.py --profile quick --only core
    python bench/run.py --list

Runs `bench/core.py` and, when they are present, the other benchmark scripts
(`bench_hard.py`, `bench_grad.py`, `bench_diagnose.py`, `gpu_kernels.py`), each in its
own process (a fresh JAX runtime, and one script's failure does not stop the others). Every script
writes JSON rows under `--out-dir` (default `bench/results/`); `bench/plot.py` turns them
into the figures of the documentation. For one accelerator, use `bench/gpu_suite.py`.
"""

import argparse
import pathlib
import subprocess
import sys
import time


HERE = pathlib.Path(__file__).resolve().parent

# name -> script; the core benchmark first.
SCRIPTS = {
    "core": "core.py",
    "hard": "bench_hard.py",
    "grad": "bench_grad.py",
    "diagnose": "bench_diagnose.py",
    "gpu_kernels": "gpu_kernels.py",
}


def arguments(name: str, profile: str, out_dir: pathlib.Path, backend: str) -> list[str] | None:
    """The command-line arguments of each script for a profile (the scripts come from
    different authors and take different options); `None`: not run on this backend."""
    quick = profile == "quick"
    if name == "core":
        return ["--profile", profile, "--out", str(out_dir / f"core_{backend}.json")]
    if name == "hard":
        return (["--T", "1000", "--dtype", "float32"] if quick else []) + [
            "--out",
            str(out_dir / f"hard_{backend}.json"),
        ]
    if name == "grad":
        return ["--profile", profile, "--out", str(out_dir / f"grad_{backend}.json")]
    if name == "diagnose":
        # Writes bench/results/diagnose_<backend>.json itself.
        return ["--T", "1024", "--no-plot"] if quick else []
    if name == "gpu_kernels":
        if backend == "cpu":
            # Its CPU mode is a smoke run of the kernels (interpreted), quick only.
            return [str(out_dir), "--quick"] if quick else None
        return [str(out_dir)] + (["--quick"] if quick else [])
    raise ValueError(name)


def command(name: str, profile: str, out_dir: pathlib.Path) -> list[str] | None:
    import jax

    script = HERE / SCRIPTS[name]
    if not script.exists():
        return None
    args = arguments(name, profile, out_dir, jax.default_backend())
    return None if args is None else [sys.executable, str(script)] + args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run parassm's benchmark suite.")
    parser.add_argument("--profile", choices=["quick", "full"], default="quick")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(SCRIPTS), help="run only these benchmarks"
    )
    parser.add_argument("--out-dir", type=pathlib.Path, default=HERE / "results")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)

    names = args.only or list(SCRIPTS)
    if args.list:
        for name in SCRIPTS:
            present = (HERE / SCRIPTS[name]).exists()
            print(f"{name:<12} bench/{SCRIPTS[name]:<20} {'' if present else '(not present)'}")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failures = []
    for name in names:
        cmd = command(name, args.profile, args.out_dir)
        if cmd is None:
            present = (HERE / SCRIPTS[name]).exists()
            why = "needs an accelerator" if present else "is not present"
            print(f"[bench] {name}: bench/{SCRIPTS[name]} {why}; skipped", flush=True)
            continue
        print(f"[bench] {name}: {' '.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        start = time.perf_counter()
        code = subprocess.run(cmd, cwd=HERE.parent).returncode
        print(f"[bench] {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failures.append(name)
    if failures:
        print(f"[bench] failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    print(f"[bench] results in {args.out_dir}; plots: python bench/plot.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
