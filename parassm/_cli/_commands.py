"""The work of the `parassm` command: `parassm demo` and `parassm diagnose`.

The command line is parsed and checked without JAX by `_front.py` (so that `--help` and
usage errors answer at once); this module is imported only after that, and runs the JAX
work.
"""

import argparse
import importlib.util
import inspect
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .. import (
    AbstractSolver,
    BlockQuasiDEER,
    DEER,
    diagnose as run_diagnosis,
    HutchinsonDiagonal,
    Jacobi,
    MultipleShooting,
    Picard,
    QuasiDEER,
    Sequential,
)
from .._timing import environment, measure
from ..diagnostics._diagnose import BY_NAME
from ..systems import get, GRU
from ._errors import CLIError, one_line, UsageError
from ._runner import (
    compile_each,
    max_error,
    Outcome,
    Progress,
    run_compiled,
    run_in_turn,
    seconds as _seconds,
)


# -- parassm demo ---------------------------------------------------------------------------

# The demo's solvers, each with how it is written in code (for the verdict).
DEMO_SOLVERS: dict[str, tuple[AbstractSolver, str]] = {
    "Sequential": (Sequential(), "parassm.Sequential()"),
    "DEER": (DEER(), "parassm.DEER()"),
    "QuasiDEER": (QuasiDEER(), "parassm.QuasiDEER()"),
    "QuasiDEER(Hutchinson)": (
        QuasiDEER(HutchinsonDiagonal()),
        "parassm.QuasiDEER(parassm.HutchinsonDiagonal())",
    ),
    "BlockQuasiDEER(4)": (BlockQuasiDEER(4), "parassm.BlockQuasiDEER(4)"),
    "Picard": (Picard(), "parassm.Picard()"),
    "Jacobi": (Jacobi(), "parassm.Jacobi()"),
    "MultipleShooting(Jacobi)": (
        MultipleShooting(Jacobi()),
        "parassm.MultipleShooting(parassm.Jacobi())",
    ),
}


def _enable_dtype(name: str):
    if name == "float64":
        jax.config.update("jax_enable_x64", True)
    return jnp.dtype(name)


def demo(args: argparse.Namespace, start: float) -> int:
    deadline = start + args.budget
    dtype = _enable_dtype(args.dtype)
    system = GRU(hidden_size=args.hidden, input_size=4, dtype=dtype)
    xs = system.inputs(args.T)
    env = environment()
    progress = Progress("parassm demo")
    progress.line(
        f"random GRU, hidden={args.hidden}, T={args.T}, {dtype.name}, on {env['backend']} "
        f"({env['device']}), jax {env['jax_version']}; budget {args.budget:g} s, "
        "compilation included"
    )

    def sequential(xs):
        def step(s, x):
            s = system.f(s, x)
            return s, s

        return jax.lax.scan(step, system.s0, xs)[1]

    progress.line("lax.scan (the baseline): compiling and timing ...")
    reference, ref_compile, ref_run = measure(sequential, xs, repeats=max(args.repeats, 1))
    solvers = {name: solver for name, (solver, _) in DEMO_SOLVERS.items()}
    n = len(solvers)
    labels = {name: Progress(f"parassm demo [{i + 1}/{n}]") for i, name in enumerate(solvers)}
    compiled, failed = compile_each(
        solvers, system.f, system.s0, xs, args.T, progress=labels.__getitem__
    )
    done = failed | run_in_turn(
        compiled, deadline=deadline, repeats=args.repeats, progress=labels.__getitem__
    )
    outcomes = [done[name] for name in solvers]
    rows = [_demo_row(o, reference, ref_run) for o in outcomes]
    verdict = _verdict(outcomes, ref_run, args.T)
    wall_s = time.perf_counter() - start
    if args.json:
        report = _demo_report(
            T=args.T,
            hidden=args.hidden,
            dtype=dtype.name,
            budget_s=args.budget,
            env=env,
            lax_scan=dict(compile_s=ref_compile, run_s=ref_run),
            rows=rows,
            verdict=verdict,
            wall_s=wall_s,
        )
        print(json.dumps(report))
    else:
        print(_demo_table(rows, ref_compile, ref_run, args.repeats))
        print(f"\nVerdict: {verdict}")
    progress.line(f"finished in {wall_s:.3g} s")
    return 0


def _demo_report(
    *,
    T: int,
    hidden: int,
    dtype: str,
    budget_s: float,
    env: dict,
    lax_scan: dict,
    rows: list[dict],
    verdict: str,
    wall_s: float,
) -> dict:
    """The JSON object of `parassm demo --json` (documented in docs/cli.md)."""
    return dict(
        T=T,
        hidden=hidden,
        dtype=dtype,
        budget_s=budget_s,
        **env,
        lax_scan=lax_scan,
        rows=rows,
        verdict=verdict,
        wall_s=wall_s,
    )


def _demo_row(o: Outcome, reference, ref_run: float) -> dict:
    upto = None if o.ok else o.converged
    return dict(
        solver=o.name,
        status=o.status,
        steps=o.steps,
        ok=o.ok,
        converged=o.converged,
        compile_s=o.compile_s,
        run_s=o.run_s,
        timed_runs=o.timed_runs,
        ratio=o.run_s / ref_run if o.ok else None,
        max_err=max_error(o.value, reference, upto),
        note=_demo_note(o),
    )


def _demo_note(o: Outcome) -> str:
    if o.status == "stopped":
        return o.note() + "; max err over its converged states"
    if o.ok and o.timed_runs == 0:
        return "run s is the warm-up run: no time was left to repeat it"
    return o.note()


def _verdict(outcomes: list[Outcome], ref_run: float, length: int) -> str:
    parallel = [o for o in outcomes if o.ok and o.name != "Sequential"]
    if not parallel:
        return (
            "use parassm.Sequential() (lax.scan) here: no parallel solver finished within "
            "the budget."
        )
    best = min(parallel, key=lambda o: o.run_s)
    if best.run_s < ref_run:
        return (
            f"use {DEMO_SOLVERS[best.name][1]} for sequences like this one: it was "
            f"{ref_run / best.run_s:.3g}x faster than lax.scan at T={length} on this machine."
        )
    return (
        f"use parassm.Sequential() (lax.scan) on this machine: the fastest parallel solver, "
        f"{best.name}, took {best.run_s / ref_run:.3g}x as long as lax.scan. Parallel "
        "evaluation pays on wide hardware (GPU/TPU); parassm.Auto(), the default solver, "
        "decides per machine."
    )


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _demo_table(rows: list[dict], ref_compile: float, ref_run: float, repeats: int) -> str:
    head = (
        f"{'solver':<26}{'steps':>7}  {'result':<8}{'compile s':>10}{'run s':>10}"
        f"{'x lax.scan':>12}{'max err':>10}"
    )
    lines = [head, "-" * len(head)]
    lines.append(
        f"{'lax.scan':<26}{'-':>7}  {'ok':<8}{ref_compile:>10.3f}{ref_run:>10.4f}"
        f"{1.0:>12.2f}{'0':>10}"
    )
    notes = []
    for r in rows:
        mark = "" if r["status"] == "ok" else "+"
        star = "*" if r["note"] else " "
        lines.append(
            f"{r['solver']:<26}{str(r['steps']) + mark:>7}  {r['status']:<8}"
            f"{_fmt(r['compile_s'], '.3f'):>10}{_fmt(r['run_s'], '.4f'):>10}"
            f"{_fmt(r['ratio'], '.2f'):>12}"
            f"{_fmt(r['max_err'], '.1e'):>10}{star}"
        )
        if r["note"]:
            notes.append(f"  * {r['solver']}: {r['note']}")
    lines += [
        "",
        f"steps: Newton iterations (0 for Sequential; N+ = stopped after N). run s: median "
        f"of up to {repeats} runs after a warm-up, compilation excluded. x lax.scan: run s "
        "/ lax.scan's run s (> 1 is slower). max err: largest |difference| from lax.scan.",
    ]
    return "\n".join(lines + notes)


# -- parassm diagnose: the problem -----------------------------------------------------------


def _label(name: str, params: dict) -> str:
    if not params:
        return name
    return f"{name} ({', '.join(f'{k}={v!r}' for k, v in params.items())})"


def _build_system(args: argparse.Namespace, dtype, key):
    try:
        system = get(args.system, **args.params, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise CLIError(f"cannot build system {args.system!r}: {one_line(e)}") from None
    T = 1000 if args.T is None else args.T
    return system.f, system.s0, system.inputs(T, key), T, system.dt


def _import_model(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"_parassm_model_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"--model: cannot import {path} (is it a Python file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that dataclasses and pickling in it work
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise CLIError(f"importing {path} failed: {type(e).__name__}: {one_line(e)}") from None
    return module


def _time_length(xs) -> int | None:
    lengths = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jtu.tree_leaves(xs)}
    if not lengths:
        return None
    if None in lengths or len(lengths) != 1:
        raise CLIError("shape mismatch: every leaf of xs needs the same leading time axis")
    return lengths.pop()


def _build_model(args: argparse.Namespace, dtype, key, progress: Progress):
    """`(f, s0, xs, T, dt)` from `--model path.py:factory`."""
    spec = args.model_spec
    module = _import_model(spec.path)
    factory = getattr(module, spec.factory, None)
    if factory is None:
        raise UsageError(f"--model: {spec.path} has no function {spec.factory!r}")
    if not callable(factory):
        raise UsageError(f"--model: {spec.factory!r} in {spec.path} is not a function")
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    kwargs = dict(args.params)
    if parameters and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        for key_name in kwargs:
            if key_name not in parameters:
                raise UsageError(
                    f"--param {key_name}: {spec.factory}() has no parameter {key_name!r} "
                    f"(its parameters: {', '.join(parameters) or 'none'})"
                )
    T_given = "T" in parameters
    if T_given:
        if args.T is not None:
            kwargs["T"] = args.T
        elif parameters["T"].default is inspect.Parameter.empty:
            kwargs["T"] = 1000
    if "dtype" in parameters:
        kwargs["dtype"] = dtype
    if "key" in parameters:
        kwargs["key"] = key
    name = f"{spec.path.name}:{spec.factory}"
    try:
        out = factory(**kwargs)
    except Exception as e:
        raise CLIError(f"the factory {name} failed: {type(e).__name__}: {one_line(e)}") from None
    if isinstance(out, tuple | list) and len(out) == 3 and callable(out[0]):
        f, s0, xs = out
        dt = None
    elif hasattr(out, "f") and hasattr(out, "s0") and callable(out.f):
        f, s0, dt = out.f, out.s0, getattr(out, "dt", None)
        T = kwargs.get("T", 1000 if args.T is None else args.T)
        xs = out.inputs(T, key) if hasattr(out, "inputs") else None
    else:
        raise CLIError(
            f"the factory {name} must return (f, s0, xs) or a system object (with .f and "
            f".s0), got {type(out).__name__}"
        )
    length = _time_length(xs) if xs is not None else None
    if length is None:
        T = kwargs.get("T", 1000 if args.T is None else args.T)
    elif T_given and "T" in kwargs and kwargs["T"] != length:
        raise CLIError(
            f"shape mismatch: the factory {name} was given T={kwargs['T']} but its xs has "
            f"{length} steps"
        )
    elif args.T is not None and args.T < length:
        progress.line(f"using the first {args.T} of the {length} steps of the factory's xs")
        xs = jtu.tree_map(lambda x: x[: args.T], xs)
        T = args.T
    elif args.T is not None and args.T > length:
        raise CLIError(
            f"shape mismatch: --T {args.T} but the factory's xs has only {length} steps; "
            "declare a parameter T in the factory so that --T reaches it"
        )
    else:
        T = length
    return f, s0, xs, T, dt


# -- parassm diagnose: the command -------------------------------------------------------------


def diagnose(args: argparse.Namespace, start: float) -> int:
    deadline = start + args.budget
    dtype = _enable_dtype(args.dtype)
    key = jax.random.key(args.seed)
    progress = Progress("parassm diagnose")
    if args.system is not None:
        f, s0, xs, T, dt = _build_system(args, dtype, key)
        label = _label(args.system, args.params)
    else:
        f, s0, xs, T, dt = _build_model(args, dtype, key, progress)
        label = _label(f"{args.model_spec.path.name}:{args.model_spec.factory}", args.params)
    size = sum(math.prod(jnp.shape(leaf)) for leaf in jtu.tree_leaves(s0))
    proxy = min(T, 128 if args.proxy_length is None else args.proxy_length)
    progress.line(
        f"{label}, T={T}, D={size}, {dtype.name}: diagnosing (the Lyapunov exponent on the "
        f"first {min(T, 512)} steps, a trial of each solver on the first {proxy}; the cost "
        "does not grow with T) ..."
    )
    begin = time.perf_counter()
    try:
        diagnosis = run_diagnosis(f, s0, T, xs=xs, dt=dt, proxy_length=args.proxy_length)
    except (TypeError, ValueError) as e:
        raise CLIError(f"the model does not fit: {one_line(e)}") from None
    diagnose_s = time.perf_counter() - begin
    progress.line(
        f"diagnosed in {diagnose_s:.3g} s: {diagnosis.regime}, recommended "
        f"{diagnosis.recommended_name}"
    )
    check = None
    if args.check:
        check = _run_check(f, s0, xs, T, diagnosis, deadline, progress)
    report = dict(
        schema="parassm.diagnose/1",
        inputs=dict(
            label=label,
            system=args.system,
            model=args.model,
            params=args.params,
            T=T,
            dtype=args.dtype,
            seed=args.seed,
            budget_s=args.budget,
        ),
        **_clean(diagnosis.to_dict()),
        check=check,
        timings=dict(diagnose_s=diagnose_s, total_s=time.perf_counter() - start),
        **environment(),
    )
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print(_diagnose_table(report, verbose=args.verbose))
    sys.stdout.flush()
    if args.plot_path is not None:
        from ._plot import plot

        try:
            plot(args.plot_path, report, diagnosis.lle_history)
        except OSError as e:
            raise CLIError(f"--plot: cannot write {args.plot}: {one_line(e)}") from None
        progress.line(f"wrote {args.plot}")
    return 0


def _clean(x: Any) -> Any:
    """-0.0 written as 0.0 (a bound that is exactly zero has no sign)."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, float) and x == 0.0:
        return 0.0
    return x


def _run_check(f, s0, xs, T, diagnosis, deadline: float, progress: Progress) -> dict:
    """Run Sequential and the parallel solvers the diagnosis predicts (ELK excepted:
    slow to compile and run), cheapest predicted first, each within its share of what
    is left of the budget."""
    solvers = {"Sequential": Sequential()}
    solvers |= {name: cls() for name, cls in BY_NAME.items() if name != "ELK"}
    compiled_list, outcomes = compile_each(solvers, f, s0, xs, T, progress=lambda n: progress)
    compiled = {c.name: c for c in compiled_list}
    if "Sequential" in compiled:
        outcomes["Sequential"] = run_compiled(
            compiled.pop("Sequential"), deadline=deadline, repeats=1, progress=progress
        )
    seq = outcomes["Sequential"]
    costs = diagnosis.costs
    predicted = diagnosis.predicted_steps
    per_cost = (seq.run_s or math.nan) / max(costs.get("Sequential", T), 1.0)
    estimates = {n: costs.get(n, math.inf) * per_cost for n in compiled}
    order = sorted(compiled, key=lambda n: estimates[n])
    total = sum(estimates.values())
    left = max(deadline - time.perf_counter(), 0.0)
    progress.line(
        "--check: predicted steps "
        + ", ".join(f"{n} {predicted.get(n, '?')}" for n in order)
        + f"; estimated run time about {_seconds(total)} (cost model); {_seconds(left)} "
        "of the budget left"
        + ("" if total < left else ", so the slowest solvers will be stopped early")
    )

    def eta(name: str):
        def report(per_step: float, converged: int) -> None:
            steps = predicted.get(name)
            if steps is not None:
                progress.line(
                    f"{name}: {per_step:.3g} s per step; {steps} predicted steps take about "
                    f"{_seconds(steps * per_step)}"
                )

        return report

    outcomes |= run_in_turn(
        [compiled[n] for n in order],
        deadline=deadline,
        repeats=1,
        progress=lambda name: progress,
        on_first_chunk=eta,
        predicted=predicted,
    )
    check = {}
    for name in ["Sequential"] + [n for n in predicted if n in outcomes]:
        o = outcomes[name]
        check[name] = dict(
            measured_steps=o.steps,
            predicted_steps=predicted.get(name),
            success=o.ok,
            status=o.status,
            converged_prefix=o.converged,
            compile_s=o.compile_s,
            run_s=o.run_s,
            max_err=None if name == "Sequential" else _error_vs(o, seq),
            note=o.note(predicted.get(name)),
        )
    return check


def _error_vs(o: Outcome, seq: Outcome) -> float | None:
    if not seq.ok:
        return None
    return max_error(o.value, seq.value, None if o.ok else o.converged)


REGIME_MEANING = {
    "predictable": "perturbations die out and the trial converged in few steps: parallel "
    "evaluation can pay off on wide hardware",
    "marginal": "neither clearly predictable nor chaotic: expect many Newton steps",
    "unpredictable": "the system is chaotic (LLE > 0): parallel solvers need about T "
    "steps; evaluate sequentially",
}


def _pow(log_x: float | None) -> str:
    """`e^log_x`, readable whatever its size."""
    if log_x is None:
        return "n/a"
    if log_x > -700:
        return format(math.exp(log_x), ".3g")
    return f"1e{log_x / math.log(10):.0f}"


def _why(report: dict) -> str:
    rec = report["recommendation"]
    costs = {k: v for k, v in rec["costs"].items() if v is not None}
    hardware = rec["hardware"]["name"]
    parallel = {k: v for k, v in costs.items() if k != "Sequential"}
    if not parallel or "Sequential" not in costs:
        return ""
    best = min(parallel, key=lambda k: parallel[k])
    if rec["solver"] in parallel:
        best = rec["solver"]
    ratio = parallel[best] / costs["Sequential"]
    if rec["solver"] != "Sequential":
        return f"predicted {1 / ratio:.3g}x cheaper than sequential evaluation on {hardware}"
    if report["regime"] == "unpredictable":
        return "the system is unpredictable"
    return (
        f"on {hardware} the cheapest parallel solver, {best}, is predicted to take "
        f"{ratio:.3g}x the time of sequential evaluation"
    )


def _diagnose_table(report: dict, verbose: bool = False) -> str:
    d = report
    lle = d["lle"]
    per_step = lle["per_step"]
    lines = [
        f"parassm diagnose: {d['inputs']['label']}, T={d['T']}, D={d['state_size']}, "
        f"{d['inputs']['dtype']}",
        "",
    ]
    if per_step is None:
        lines.append(f"{'largest Lyapunov exponent':<27}not finite")
    else:
        text = f"{per_step:.4g} per step"
        if lle["per_unit_time"] is not None:
            text += f" ({lle['per_unit_time']:.4g} per unit time)"
        factor = math.exp(min(per_step, 700.0))
        verb = "shrink" if per_step < 0 else "grow"
        text += f": perturbations {verb} by a factor {factor:.3g} per step"
        lines.append(f"{'largest Lyapunov exponent':<27}{text}")
    lines.append(f"{'regime':<27}{d['regime']}: {REGIME_MEANING[d['regime']]}")
    if verbose:
        b = d["bounds"]
        trial = d["proxy"]["steps"]
        lines += [
            f"{'overshoot':<27}{_fmt(d['overshoot'], '.4g')}: transient growth of "
            "perturbations beyond the LLE's rate (1 = none)",
            f"{'sigma_min bounds':<27}[{_pow(b['log_sigma_min_lower'])}, "
            f"{_pow(b['log_sigma_min_upper'])}]: smallest singular value of the residual "
            "Jacobian (1 = well conditioned; small = Newton's errors amplified by up to "
            "1/sigma_min)",
            f"{'trial steps':<27}"
            + ", ".join(f"{n} {s if s >= 0 else 'not converged'}" for n, s in trial.items())
            + f" (on the first {d['proxy']['length']} steps)",
        ]
    check = d.get("check")
    lines.append("")
    head = f"{'solver':<12}{'predicted':>10}"
    if check:
        head += f"{'measured':>10}  {'result':<9}{'run s':>9}  {'max err':>8}"
    lines += [head, "-" * max(len(head), 40)]
    notes = []
    for name, steps in d["predicted_steps"].items():
        row = f"{name:<12}{steps:>10}"
        if check:
            c = check.get(name)
            if c is None:
                row += f"{'-':>10}  {'not run':<9}{'-':>9}  {'-':>8}"
                notes.append(
                    f"  {name}: not run by --check (slow to compile and run); its "
                    "prediction is DEER's trial"
                )
            else:
                mark = "" if c["status"] == "ok" else "+"
                row += (
                    f"{str(c['measured_steps']) + mark:>10}  {c['status']:<9}"
                    f"{_fmt(c['run_s'], '.3g'):>9}  {_fmt(c['max_err'], '.1e'):>8}"
                )
                if c["note"]:
                    notes.append(f"  {name}: {c['note']}")
        lines.append(row)
    if check:
        c = check["Sequential"]
        lines.append(
            f"{'Sequential':<12}{'-':>10}{'-':>10}  {c['status']:<9}"
            f"{_fmt(c['run_s'], '.3g'):>9}  {'-':>8}"
        )
    lines.append("")
    lines.append(
        f"predicted: Newton steps for T={d['T']}, extrapolated from a trial on the first "
        f"{d['proxy']['length']} steps (at most T)."
    )
    if check:
        lines.append(
            "measured: steps --check took (N+ = stopped after N); run s: compilation "
            "excluded; max err: largest |difference| from Sequential"
            + (
                " (chaos amplifies the solvers' tolerance, so large differences are expected)."
                if d["regime"] == "unpredictable"
                else "."
            )
        )
    lines += notes
    why = _why(d)
    rec = d["recommendation"]
    chunk, shooting_steps = rec["multiple_shooting_chunk"], rec["multiple_shooting_steps"]
    solver = rec["solver"]
    if solver == "MultipleShooting":
        solver = f"parassm.MultipleShooting(chunk_length={chunk})"
    lines += ["", f"{'recommended':<27}{solver}" + (f" ({why})" if why else "")]
    if chunk is not None:
        predicted = (
            ""
            if shooting_steps is None
            else f"; its trial predicts {shooting_steps} iterations on the chunk ends"
        )
        lines.append(
            f"{'why multiple shooting' if rec['solver'] == 'MultipleShooting' else 'or try':<27}"
            f"parassm.MultipleShooting(chunk_length={chunk}): the system contracts, but "
            "slowly, and Newton's method crawls on it; multiple shooting solves only for "
            "the states between chunks of about 4/|LLE| steps, each chunk sequential" + predicted
        )
    lines += [
        f"{'diagnosis time':<27}{d['timings']['diagnose_s']:.3g} s (including compilation)",
    ]
    return "\n".join(lines)


COMMANDS = {"demo": demo, "diagnose": diagnose}
