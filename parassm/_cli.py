"""The `parassm` command."""

import argparse
import ast
import importlib.util
import inspect
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import jax.tree_util as jtu


def _demo_solvers():
    from . import (
        BlockQuasiDEER,
        DEER,
        HutchinsonDiagonal,
        Jacobi,
        Picard,
        QuasiDEER,
        Sequential,
    )

    return {
        "Sequential": Sequential(),
        "DEER": DEER(),
        "QuasiDEER": QuasiDEER(),
        "QuasiDEER(Hutchinson)": QuasiDEER(HutchinsonDiagonal()),
        "BlockQuasiDEER(4)": BlockQuasiDEER(4),
        "Picard": Picard(),
        "Jacobi": Jacobi(),
    }


def demo(args: argparse.Namespace) -> int:
    from . import evaluate, RESULTS
    from ._timing import environment, measure
    from .systems import GRU

    dtype = jnp.dtype(args.dtype)
    if dtype == jnp.float64:
        jax.config.update("jax_enable_x64", True)
    system = GRU(hidden_size=args.hidden, input_size=4, dtype=dtype)
    xs = system.inputs(args.T)

    def sequential(xs):
        def step(s, x):
            s = system.f(s, x)
            return s, s

        return jax.lax.scan(step, system.s0, xs)[1]

    reference, ref_compile, ref_run = measure(sequential, xs, repeats=args.repeats)
    env = environment()
    print(
        f"parassm demo: random GRU, hidden={args.hidden}, T={args.T}, {dtype.name}, "
        f"{env['backend']} ({env['device']}), jax {env['jax_version']}",
        file=sys.stderr,
    )
    rows = []
    for name, solver in _demo_solvers().items():

        def run(xs, solver=solver):
            return evaluate(system.f, system.s0, xs=xs, solver=solver, throw=False)

        sol, compile_s, run_s = measure(run, xs, repeats=args.repeats)
        rows.append(
            dict(
                solver=name,
                steps=int(sol.stats["num_steps"]),
                ok=bool(sol.result == RESULTS.successful),
                compile_s=compile_s,
                run_s=run_s,
                ratio=run_s / ref_run,
                max_err=float(jnp.max(jnp.abs(sol.value - reference))),
            )
        )
    if args.json:
        print(json.dumps(dict(T=args.T, hidden=args.hidden, dtype=dtype.name, **env, rows=rows)))
        return 0
    header = f"{'solver':<24}{'steps':>7}{'ok':>5}{'compile s':>11}{'run s':>10}"
    header += f"{'x lax.scan':>12}{'max err':>11}"
    print(header)
    print("-" * len(header))
    print(
        f"{'lax.scan':<24}{'-':>7}{'-':>5}{ref_compile:>11.3f}{ref_run:>10.4f}{1.0:>12.2f}"
        f"{0.0:>11.1e}"
    )
    for r in rows:
        print(
            f"{r['solver']:<24}{r['steps']:>7}{('yes' if r['ok'] else 'NO'):>5}"
            f"{r['compile_s']:>11.3f}{r['run_s']:>10.4f}{r['ratio']:>12.2f}{r['max_err']:>11.1e}"
        )
    print(
        "\nratio > 1 means slower than lax.scan. On a CPU with few cores a parallel step "
        "costs about as much as T sequential ones, so Sequential wins; the payoff of "
        "parallel evaluation is on accelerators.",
        file=sys.stderr,
    )
    return 0


class CLIError(Exception):
    """A runtime failure with a one-line message (exit code 1)."""


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_params(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            parser.error(f"--param expects key=value with a Python identifier as key, got {item!r}")
        params[key] = _parse_value(value)
    return params


def _system_params(cls) -> list[str]:
    return [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "dtype")]


def _build_system(parser, args, params, dtype):
    from .systems import SYSTEMS

    if args.system not in SYSTEMS:
        parser.error(f"unknown system {args.system!r}; choose from {', '.join(sorted(SYSTEMS))}")
    cls = SYSTEMS[args.system]
    accepted = _system_params(cls)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        parser.error(
            f"system {args.system!r} has no parameter {', '.join(unknown)}; "
            f"its parameters are: {', '.join(accepted)}"
        )
    try:
        return cls(**params, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise CLIError(f"cannot build system {args.system!r}: {_one_line(e)}") from None


def _load_factory(spec: str):
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise CLIError(f"--model expects path.py:factory, got {spec!r}")
    file = pathlib.Path(path)
    if not file.is_file():
        raise CLIError(f"model file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"_parassm_model_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise CLIError(f"cannot import {path} (is it a Python file?)")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise CLIError(f"importing {path} failed: {type(e).__name__}: {_one_line(e)}") from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise CLIError(f"{path} has no callable {name!r}")
    return factory


def _build_model(args, params, T, key):
    """`(f, s0, xs, T, dt, label)` from `--model path.py:factory`."""
    from .systems import AbstractSystem

    factory = _load_factory(args.model)
    try:
        out = factory(**params)
    except Exception as e:
        raise CLIError(f"the factory {args.model} failed: {type(e).__name__}: {_one_line(e)}")
    if isinstance(out, AbstractSystem) or (hasattr(out, "f") and hasattr(out, "s0")):
        T = 1000 if T is None else T
        xs = out.inputs(T, key) if hasattr(out, "inputs") else None
        return out.f, out.s0, xs, T, getattr(out, "dt", None)
    if not (isinstance(out, tuple | list) and len(out) == 3 and callable(out[0])):
        raise CLIError(
            f"the factory {args.model} must return (f, s0, xs) or a system object "
            f"(with .f and .s0), got {type(out).__name__}"
        )
    f, s0, xs = out
    if xs is not None:
        lengths = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jtu.tree_leaves(xs)}
        if None in lengths or len(lengths) != 1:
            raise CLIError("shape mismatch: every leaf of xs needs the same leading time axis")
        length = lengths.pop()
        if T is not None and T != length:
            raise CLIError(f"shape mismatch: --T {T} but the factory's xs has {length} steps")
        T = length
    elif T is None:
        T = 1000
    return f, s0, xs, T, None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _check_solvers() -> dict:
    from . import DEER, Jacobi, Picard, QuasiDEER

    return {"DEER": DEER(), "QuasiDEER": QuasiDEER(), "Picard": Picard(), "Jacobi": Jacobi()}


def _run_check(f, s0, xs, T, diagnosis) -> dict:
    from . import evaluate, RESULTS, Sequential
    from ._timing import measure

    rows = {}
    solvers = dict(Sequential=Sequential(), **_check_solvers())
    for name, solver in solvers.items():
        print(f"parassm diagnose: --check running {name} ...", file=sys.stderr)

        def run(s0, xs, solver=solver):
            return evaluate(f, s0, T, xs=xs, solver=solver, throw=False)

        sol, compile_s, run_s = measure(run, s0, xs, repeats=1)
        rows[name] = dict(
            measured_steps=int(sol.stats["num_steps"]),
            predicted_steps=diagnosis.predicted_steps.get(name),
            success=bool(sol.result == RESULTS.successful),
            compile_s=compile_s,
            run_s=run_s,
        )
    return rows


def _plot(path: str, diagnosis, check: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    history = diagnosis.lle_history
    ax1.plot(range(1, len(history) + 1), history)
    ax1.axhline(0.0, color="gray", lw=0.8)
    ax1.set_xlabel("steps")
    ax1.set_ylabel("running LLE estimate (per step)")
    ax1.set_title(f"LLE -> {diagnosis.lle:.4g} ({diagnosis.regime})")
    names = list(diagnosis.predicted_steps)
    xs = range(len(names))
    ax2.bar(
        [x - 0.2 for x in xs], [diagnosis.predicted_steps[n] for n in names], 0.4, label="predicted"
    )
    if check:
        measured = [check[n]["measured_steps"] if n in check else 0 for n in names]
        ax2.bar([x + 0.2 for x in xs], measured, 0.4, label="measured")
    ax2.set_xticks(list(xs), names)
    ax2.set_yscale("log")
    ax2.set_ylabel("Newton steps")
    ax2.set_title(f"T = {diagnosis.length}; recommended: {diagnosis.recommended_name}")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _table(report: dict) -> str:
    d = report
    b = d["bounds"]

    def num(x, fmt=".4g"):
        return "n/a" if x is None else format(x, fmt)

    lines = [
        f"parassm diagnose: {d['inputs']['label']}, T={d['T']}, D={d['state_size']}, "
        f"{d['inputs']['dtype']}",
        "",
        f"{'largest Lyapunov exponent':<34}{num(d['lle']['per_step'])} per step"
        + (
            f" ({num(d['lle']['per_unit_time'])} per unit time)"
            if d["lle"]["per_unit_time"] is not None
            else ""
        ),
        f"{'overshoot a':<34}{num(d['overshoot'])}",
        f"{'-log mu (mu = sigma_min^2)':<34}[{num(b['neg_log_mu_lower'])}, "
        f"{num(b['neg_log_mu_upper'])}]",
        f"{'regime':<34}{d['regime']}",
        "",
        f"{'solver':<14}{'predicted':>10}{'proxy':>8}"
        + (f"{'measured':>10}{'ok':>5}{'run s':>10}" if d.get("check") else ""),
    ]
    proxy = d["proxy"]["steps"]
    from .diagnostics._predict import TRIAL_OF

    for name, steps in d["predicted_steps"].items():
        p = proxy.get(TRIAL_OF[name], -1)
        row = f"{name:<14}{steps:>10}{(str(p) if p >= 0 else '>' + str(d['proxy']['length'])):>8}"
        if d.get("check") and name in d["check"]:
            c = d["check"][name]
            row += f"{c['measured_steps']:>10}{('yes' if c['success'] else 'NO'):>5}"
            row += f"{c['run_s']:>10.4f}"
        lines.append(row)
    if d.get("check"):
        c = d["check"]["Sequential"]
        lines.append(f"{'Sequential':<14}{'-':>10}{'-':>8}{'-':>10}{'yes':>5}{c['run_s']:>10.4f}")
    lines += [
        "",
        f"{'recommended':<34}{d['recommendation']['solver']} "
        f"(hardware: {d['recommendation']['hardware']['name']})",
        f"{'diagnosis time':<34}{d['timings']['diagnose_s']:.3f} s (including compilation)",
    ]
    return "\n".join(lines)


def diagnose(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    params = _parse_params(parser, args.param)
    if args.T is not None and args.T < 1:
        parser.error(f"--T must be at least 1, got {args.T}")
    if args.proxy_length is not None and args.proxy_length < 1:
        parser.error(f"--proxy-length must be at least 1, got {args.proxy_length}")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CLIError(
                "--plot needs matplotlib, which is not installed: "
                "pip install matplotlib (or parassm[plot])"
            ) from None
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)
    key = jax.random.key(args.seed)
    if args.system is not None:
        system = _build_system(parser, args, params, dtype)
        T = 1000 if args.T is None else args.T
        f, s0, xs, dt = system.f, system.s0, system.inputs(T, key), system.dt
        label = args.system
    else:
        f, s0, xs, T, dt = _build_model(args, params, args.T, key)
        label = args.model
    from . import diagnose as run_diagnosis
    from ._timing import environment

    print(f"parassm diagnose: {label}, T={T} ...", file=sys.stderr)
    start = time.perf_counter()
    try:
        diagnosis = run_diagnosis(f, s0, T, xs=xs, dt=dt, proxy_length=args.proxy_length)
    except (TypeError, ValueError) as e:
        raise CLIError(f"the model does not fit: {_one_line(e)}") from None
    elapsed = time.perf_counter() - start
    check = _run_check(f, s0, xs, T, diagnosis) if args.check else None
    report = dict(
        schema="parassm.diagnose/1",
        inputs=dict(
            label=label,
            system=args.system,
            model=args.model,
            params=params,
            T=T,
            dtype=args.dtype,
            seed=args.seed,
        ),
        **diagnosis.to_dict(),
        check=check,
        timings=dict(diagnose_s=elapsed),
        **environment(),
    )
    if args.plot is not None:
        _plot(args.plot, diagnosis, check)
        print(f"parassm diagnose: wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print(_table(report))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="parassm",
        description="Parallel evaluation of nonlinear recurrences, and whether it pays off.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="evaluate a random GRU with every solver and compare")
    p.add_argument("--T", type=int, default=10_000, help="sequence length (default 10000)")
    p.add_argument("--hidden", type=int, default=16, help="GRU hidden size (default 16)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=demo)

    p = sub.add_parser(
        "diagnose",
        help="predict whether parallel evaluation of a system will pay off",
        description=(
            "Estimate the largest Lyapunov exponent, the conditioning of the parallel "
            "problem and the Newton steps each solver will need, and recommend a solver. "
            "Data go to stdout, progress to stderr. Exit status: 0 when the diagnosis ran "
            "(whatever the verdict), 2 for usage errors, 1 for runtime failures."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--system", metavar="NAME", help="a system of parassm.systems")
    source.add_argument(
        "--model",
        metavar="PATH.py:FACTORY",
        help="a factory returning (f, s0, xs) or a system object",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter of the system or factory (repeatable); VALUE is a Python literal",
    )
    p.add_argument("--T", type=int, default=None, help="sequence length (default 1000)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    p.add_argument("--proxy-length", type=int, default=None, help="length of the trial prefix")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.add_argument("--plot", metavar="FILE.png", help="plot LLE convergence and steps")
    p.add_argument(
        "--check", action="store_true", help="also run the solvers: measured vs predicted"
    )
    p.set_defaults(func=diagnose)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.func is demo:
        return demo(args)
    try:
        return args.func(args, parser)
    except CLIError as e:
        print(f"parassm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a failure inside the user's model or the library
        print(f"parassm {args.command}: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
