"""The front end of the `parassm` command: the parser and every check of the command line.

This module imports no JAX (only the standard library, the registry of systems and the
command's errors; `import parassm` itself imports nothing heavy), because importing JAX
takes seconds on an idle machine and tens of seconds on a loaded one.
`parassm --help`, `parassm diagnose --help` and every usage error are answered from
here; JAX is imported (by `_commands.py`) only once the command line has passed every
check below.

Exit status: 0 success; 1 the computation failed (the model raised, its shapes do not
fit, ...); 2 usage error (anything wrong with the command line, found before any long
work); 130 interrupted.
"""

import argparse
import ast
import dataclasses
import importlib.util
import math
import os
import pathlib
import sys
import textwrap
import time
from typing import Any

from ..systems._registry import Param, REGISTRY
from ._errors import CLIError, EXIT_FAILURE, EXIT_INTERRUPTED, one_line, UsageError


# Keyword arguments a model factory may declare to receive the command's settings.
FACTORY_SETTINGS = {"T": "--T", "dtype": "--dtype", "key": "--seed"}
PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps")


# -- Checks of single values (argparse types) ---------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number), got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


# -- The parser ------------------------------------------------------------------------------


def _wrap(*paragraphs: str) -> str:
    """Paragraphs filled to the width of argparse's help (the formatter keeps them)."""
    return "\n\n".join(textwrap.fill(p, width=79, break_on_hyphens=False) for p in paragraphs)


def systems_help() -> str:
    """The systems and their parameters, for `--help`."""
    lines = ["systems (--system NAME, --param KEY=VALUE, defaults shown):"]
    for name, entry in REGISTRY.items():
        lines.append(f"  {name:<11} {entry.summary}")
        if entry.params:
            shown = "  ".join(f"{k}={_literal(p.default)}" for k, p in entry.params.items())
            lines.append(f"  {'':<11}   {shown}")
    return "\n".join(lines)


def _literal(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, tuple):
        return "(" + ",".join(_literal(v) for v in value) + ")"
    return str(value)


EXIT_HELP = (
    "exit status: 0 success; 1 the computation failed (one-line message); 2 usage error "
    "(found before any long work); 130 interrupted. Progress goes to stderr, results to "
    "stdout."
)

DEMO_DESCRIPTION = (
    "Evaluate a random GRU with every solver and with jax.lax.scan, in the same process, "
    "and compare compile time, run time, Newton steps and error. Each solver gets a share "
    "of the time budget; one that is still running when its share is spent is stopped "
    "and marked 'stopped' in the table. Ends with a one-line verdict for this machine."
)

DIAGNOSE_DESCRIPTION = (
    "Estimate the largest Lyapunov exponent, the conditioning of the parallel problem "
    "and the Newton steps each solver will need, and recommend a solver. With --check, "
    "also run the solvers (within --budget) and compare measured with predicted steps."
)


def make_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The `parassm` parser and its subcommands' parsers (by name)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="parassm",
        description="Parallel evaluation of nonlinear recurrences, and whether it pays off.",
        epilog=_wrap(
            f"Reference systems for 'parassm diagnose': {', '.join(REGISTRY)} (their "
            "parameters: parassm diagnose --help).",
            EXIT_HELP,
        ),
        formatter_class=formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="evaluate a random GRU with every solver and compare with lax.scan",
        description=_wrap(DEMO_DESCRIPTION),
        epilog=_wrap(EXIT_HELP),
        formatter_class=formatter,
    )
    demo.add_argument(
        "--T", type=positive_int, default=10_000, help="sequence length (default 10000)"
    )
    demo.add_argument(
        "--hidden", type=positive_int, default=16, help="GRU hidden size (default 16)"
    )
    demo.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    demo.add_argument(
        "--repeats",
        type=non_negative_int,
        default=3,
        help="timed runs after the warm-up, within the budget; run s is their median (default 3)",
    )
    demo.add_argument(
        "--budget",
        type=positive_seconds,
        default=45.0,
        metavar="SECONDS",
        help="wall-clock budget of the whole demo, compilation included (default 45)",
    )
    demo.add_argument("--json", action="store_true", help="print one JSON object instead")

    diagnose = sub.add_parser(
        "diagnose",
        help="predict whether parallel evaluation of a system will pay off",
        description=_wrap(DIAGNOSE_DESCRIPTION),
        epilog=systems_help()
        + "\n\n"
        + _wrap(
            "models (--model PATH.py:FACTORY): FACTORY is a function in that file that "
            "returns (f, s0, xs) or a system object; it receives each --param as a keyword "
            "argument, and --T, --dtype and --seed as T, dtype and key (a JAX PRNG key) if "
            "it declares parameters of those names.",
            EXIT_HELP,
        ),
        formatter_class=formatter,
    )
    source = diagnose.add_mutually_exclusive_group(required=True)
    source.add_argument("--system", metavar="NAME", help="a reference system (listed below)")
    source.add_argument(
        "--model", metavar="PATH.py:FACTORY", help="your own model: a factory in a Python file"
    )
    diagnose.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter of the system or factory (repeatable); VALUE is a Python literal",
    )
    diagnose.add_argument(
        "--T", type=positive_int, default=None, help="sequence length (default 1000)"
    )
    diagnose.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    diagnose.add_argument(
        "--seed", type=int, default=0, help="seed of the random inputs (default 0)"
    )
    diagnose.add_argument(
        "--proxy-length",
        type=positive_int,
        default=None,
        help="length of the prefix the trial runs on (default 128)",
    )
    diagnose.add_argument("--json", action="store_true", help="print one JSON object instead")
    diagnose.add_argument(
        "--verbose",
        action="store_true",
        help="also show the conditioning figures (overshoot, sigma_min bounds, trial steps)",
    )
    diagnose.add_argument(
        "--plot", metavar="FILE.png", help="plot the LLE estimate and predicted/measured steps"
    )
    diagnose.add_argument(
        "--check", action="store_true", help="also run the solvers: measured vs predicted steps"
    )
    diagnose.add_argument(
        "--budget",
        type=positive_seconds,
        default=120.0,
        metavar="SECONDS",
        help="wall-clock budget of the command (default 120); solvers of --check still "
        "running when their share is spent are stopped, with what they have",
    )
    return parser, {"demo": demo, "diagnose": diagnose}


# -- Checks of the whole command line --------------------------------------------------------


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(
                f"--param expects KEY=VALUE with a Python identifier as KEY, got {item!r}"
            )
        if key in params:
            raise UsageError(f"--param {key} is given twice")
        params[key] = parse_value(value)
    return params


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_system_param(system: str, key: str, value: Any, param: Param) -> Any:
    """`value` converted to what the constructor expects, or a `UsageError`."""
    expected = f"--param {key}: {system}'s {key} is {_article(param.describe())}"
    if param.kind == "float":
        if not _is_number(value):
            raise UsageError(f"{expected}, got {value!r}")
        value = float(value)
    elif param.kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"{expected}, got {value!r}")
    elif param.kind == "str":
        if not isinstance(value, str) or (param.choices and value not in param.choices):
            raise UsageError(f"{expected}, got {value!r}")
    elif param.kind == "vector":
        if not (
            isinstance(value, tuple | list)
            and len(value) == len(param.default)
            and all(_is_number(v) for v in value)
        ):
            raise UsageError(f"{expected} such as {_literal(param.default)}, got {value!r}")
        value = tuple(float(v) for v in value)
    numbers = value if param.kind == "vector" else (value,)
    if param.kind in ("float", "vector") and not all(math.isfinite(v) for v in numbers):
        raise UsageError(f"{expected} and must be finite, got {value!r}")
    if param.positive and not value > 0:
        raise UsageError(f"{expected}, got {value!r}")
    return value


def _article(text: str) -> str:
    if "|" in text:
        return f"one of {text.replace('|', ', ')}"
    if text[0].isdigit():
        return text
    return ("an " if text[0] in "aeiou" else "a ") + text


@dataclasses.dataclass
class ModelSpec:
    """A `--model PATH.py:FACTORY` that passed the checks that need no import."""

    path: pathlib.Path
    factory: str
    parameters: list[str] | None  # the factory's parameters, when read from the source
    takes_kwargs: bool


def check_model(spec: str, params: dict[str, Any]) -> ModelSpec:
    """Check `--model` without running the file: it exists, parses, and defines the
    factory at top level with the parameters given by `--param`."""
    path_text, sep, name = spec.rpartition(":")
    if not sep or not path_text or not name.isidentifier():
        raise UsageError(
            f"--model expects PATH.py:FACTORY (the file, a colon, the name of the factory "
            f"function in it), got {spec!r}"
        )
    path = pathlib.Path(path_text)
    if not path.is_file():
        raise UsageError(f"--model: file not found: {path_text}")
    try:
        source = path.read_text()
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as e:
        raise UsageError(f"--model: {path_text} is not valid Python: line {e.lineno}: {e.msg}")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"--model: cannot read {path_text}: {e}") from None
    for key in params:
        if key in FACTORY_SETTINGS:
            raise UsageError(
                f"--param {key}: the factory receives {key} from {FACTORY_SETTINGS[key]}; "
                f"use {FACTORY_SETTINGS[key]}"
            )
    bound: dict[str, ast.AST] = {}
    dynamic = False
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound[node.name] = node
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        bound[n.id] = node
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    dynamic = True
                bound[(alias.asname or alias.name).split(".")[0]] = node
        elif not isinstance(node, ast.Expr | ast.Pass | ast.Assert | ast.Delete):
            # if/try/for/with blocks may bind names too: do not judge statically.
            dynamic = True
    node = bound.get(name)
    if node is None:
        if dynamic:
            return ModelSpec(path, name, None, True)
        defined = sorted(n for n, v in bound.items() if isinstance(v, ast.FunctionDef))
        hint = f"; it defines {', '.join(defined)}" if defined else ""
        raise UsageError(f"--model: {path_text} has no function {name!r}{hint}")
    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
        raise UsageError(f"--model: {name!r} in {path_text} is not a function")
    if not isinstance(node, ast.FunctionDef):
        return ModelSpec(path, name, None, True)
    args = node.args
    positional = args.posonlyargs + args.args
    names = [a.arg for a in positional + args.kwonlyargs]
    takes_kwargs = args.kwarg is not None
    unknown = [k for k in params if k not in names and not takes_kwargs]
    if unknown:
        listed = ", ".join(names) if names else "none"
        raise UsageError(
            f"--param {unknown[0]}: {name}() in {path_text} has no parameter {unknown[0]!r} "
            f"(its parameters: {listed})"
        )
    required = [a.arg for a in positional[: len(positional) - len(args.defaults)]]
    required += [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
    missing = [r for r in required if r not in params and r not in FACTORY_SETTINGS]
    if missing:
        raise UsageError(
            f"{name}() in {path_text} needs a value for {missing[0]!r}: "
            f"add --param {missing[0]}=VALUE"
        )
    return ModelSpec(path, name, names, takes_kwargs)


def check_plot(path_text: str) -> pathlib.Path:
    path = pathlib.Path(path_text)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(
            f"--plot: cannot tell the image format of {path_text!r}; end the name with one "
            f"of {', '.join(PLOT_SUFFIXES)}"
        )
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"--plot: folder {str(folder)!r} does not exist (create it first)")
    if path.is_dir():
        raise UsageError(f"--plot: {path_text!r} is a folder; give a file name")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--plot: cannot write {path_text!r} (permission denied)")
    if _find_spec("matplotlib") is None:
        raise UsageError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or parassm[plot]), or leave out --plot"
        )
    return path


def _find_spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def check_diagnose(args: argparse.Namespace) -> None:
    """Every check of `parassm diagnose` that needs no JAX; fills `args.params`,
    `args.model_spec` and `args.plot_path`."""
    params = parse_params(args.param)
    args.model_spec = None
    if args.system is not None:
        if args.system not in REGISTRY:
            close = [n for n in REGISTRY if n.startswith(args.system[:3].lower())]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UsageError(
                f"unknown system {args.system!r}{hint}; choose from {', '.join(REGISTRY)} "
                "(parameters: parassm diagnose --help)"
            )
        accepted = REGISTRY[args.system].params
        for key, value in params.items():
            if key not in accepted:
                names = ", ".join(accepted) or "none"
                raise UsageError(
                    f"system {args.system!r} has no parameter {key}; its parameters are: {names}"
                )
            params[key] = check_system_param(args.system, key, value, accepted[key])
    else:
        args.model_spec = check_model(args.model, params)
    args.params = params
    args.plot_path = None if args.plot is None else check_plot(args.plot)


CHECKS = {"demo": lambda args: None, "diagnose": check_diagnose}


def main(argv: list[str] | None = None) -> int:
    """Run the `parassm` command; returns the exit status (usage errors exit with 2)."""
    start = time.perf_counter()
    parser, subparsers = make_parser()
    args = parser.parse_args(argv)
    usage = subparsers[args.command]
    try:
        CHECKS[args.command](args)
    except UsageError as e:
        usage.error(str(e))
    prefix = f"parassm {args.command}"
    try:
        from . import _commands  # JAX, from here on

        return _commands.COMMANDS[args.command](args, start)
    except UsageError as e:  # found only once the model was imported
        usage.error(str(e))
    except CLIError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a failure inside the user's model or the library
        print(f"{prefix}: error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
    return EXIT_FAILURE
