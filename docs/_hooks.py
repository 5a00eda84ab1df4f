"""mkdocs hook: generate the API reference pages from the package's public names.

Every public name of `parassm`, `parassm.linear`, `parassm.systems`, `parassm.nn` and
`parassm.diagnostics` (a name re-exported by the package's `__init__`, not starting
with `_`, and not a module) is rendered with mkdocstrings on one of the `api/*.md`
pages. Names listed below keep their place; names added later land on the page of the
module that defines them, so a new public name is documented (and cross-references to
it resolve) without editing the docs.
"""

import importlib
import types


# page -> (title, introduction, [(module, [preferred order of names])])
PAGES: dict[str, tuple[str, str, list[tuple[str, list[str]]]]] = {
    "api/evaluate.md": (
        "evaluate, scan and the solution",
        "The standalone face: evaluate a recurrence, or replace `jax.lax.scan`.",
        [("parassm", ["evaluate", "scan", "Solution", "RESULTS"])],
    ),
    "api/solvers.md": (
        "Solvers",
        "Every solver is a frozen `equinox.Module` holding its hyperparameters; pass one "
        "as `solver=` to [`parassm.evaluate`][], [`parassm.scan`][] or "
        "[`parassm.nn.ParallelRNN`][]. See [Choosing a solver](../choosing.md).",
        [
            (
                "parassm",
                [
                    "Sequential",
                    "DEER",
                    "QuasiDEER",
                    "AbstractDiagonal",
                    "ExactDiagonal",
                    "HutchinsonDiagonal",
                    "FunctionDiagonal",
                    "BlockQuasiDEER",
                    "Picard",
                    "Jacobi",
                    "ELK",
                    "QuasiELK",
                    "SlidingWindow",
                    "MultipleShooting",
                    "Auto",
                    "AbstractSolver",
                    "AbstractParallelSolver",
                    "Rules",
                    "RestartBlownUp",
                    "RestartInPhase",
                    "RestartOnStall",
                    "RestartAtRest",
                    "KeepFront",
                    "ReuseMaps",
                    "KeepVerified",
                ],
            )
        ],
    ),
    "api/adjoint.md": (
        "Gradients",
        "How derivatives of a solution are computed: pass one as `adjoint=`.",
        [("parassm", ["AbstractAdjoint", "ImplicitAdjoint", "UnrolledAdjoint"])],
    ),
    "api/linear.md": (
        "parassm.linear",
        "The linear-recurrence layer every solver shares: "
        "$s_t = A_t s_{t-1} + b_t$ for all $t$ at once.",
        [
            (
                "parassm.linear",
                [
                    "solve",
                    "AbstractTransition",
                    "Dense",
                    "Diagonal",
                    "BlockDiagonal",
                    "Scalar",
                    "Zero",
                ],
            )
        ],
    ),
    "api/systems.md": (
        "parassm.systems",
        "Reference recurrences used by the tests, the benchmarks, the docs and the "
        "`parassm` command.",
        [("parassm.systems", ["get", "SYSTEMS", "AbstractSystem"])],
    ),
    "api/nn.md": (
        "parassm.nn",
        "Equinox layers that evaluate recurrent cells in parallel, forward and backward.",
        [("parassm.nn", ["ParallelRNN"])],
    ),
    "api/diagnostics.md": (
        "parassm.diagnostics",
        "Before evaluating: how predictable is the system, how well conditioned is the "
        "parallel problem, how many steps will it take, and will parallel pay off?",
        [("parassm.diagnostics", ["diagnose", "Diagnosis"])],
    ),
}

# Where a top-level name that no page lists goes, by the module that defines it.
HOMES = [
    ("parassm._adjoint", "api/adjoint.md"),
    ("parassm._solvers", "api/solvers.md"),
    ("parassm._linear", "api/linear.md"),
    ("parassm.diagnostics", "api/diagnostics.md"),
    ("parassm.nn", "api/nn.md"),
    ("parassm.systems", "api/systems.md"),
]
# mkdocstrings options for particular names. `Hardware`'s members are cross-referenced
# from `parassm.Auto`'s docstring, so all of them are shown.
OPTIONS: dict[str, dict[str, object]] = {
    "parassm.diagnostics.Hardware": {"show_if_no_docstring": True},
}

SUBMODULE_PAGES = {
    "parassm.linear": "api/linear.md",
    "parassm.systems": "api/systems.md",
    "parassm.nn": "api/nn.md",
    "parassm.diagnostics": "api/diagnostics.md",
}


def public_names(module_name: str) -> list[str]:
    """The public names a module exports (not modules, not dunder, not `_private`)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    return [
        name
        for name in dir(module)
        if not name.startswith("_") and not isinstance(getattr(module, name), types.ModuleType)
    ]


def _home(obj) -> str:
    import parassm

    bases = [
        (parassm.AbstractSolver, "api/solvers.md"),
        (getattr(parassm, "AbstractAdjoint", None), "api/adjoint.md"),
        (getattr(parassm.linear, "AbstractScanImpl", None), "api/solvers.md"),
    ]
    for base, page in bases:
        if base is not None and isinstance(obj, type) and issubclass(obj, base):
            return page
    module = getattr(obj, "__module__", "") or ""
    for prefix, page in HOMES:
        if module.startswith(prefix):
            return page
    return "api/evaluate.md"


def api_pages() -> dict[str, list[str]]:
    """page -> fully qualified names rendered on it (the whole public API)."""
    pages: dict[str, list[str]] = {page: [] for page in PAGES}
    placed: set[str] = set()
    for page, (_, _, sections) in PAGES.items():
        for module_name, order in sections:
            available = set(public_names(module_name))
            for name in order:
                if name in available:
                    pages[page].append(f"{module_name}.{name}")
                    placed.add(f"{module_name}.{name}")
    top = importlib.import_module("parassm")
    for name in sorted(public_names("parassm"), key=str.lower):
        qualified = f"parassm.{name}"
        if qualified not in placed:
            pages[_home(getattr(top, name))].append(qualified)
            placed.add(qualified)
    for module_name, page in SUBMODULE_PAGES.items():
        for name in sorted(public_names(module_name), key=str.lower):
            qualified = f"{module_name}.{name}"
            if qualified not in placed:
                pages[page].append(qualified)
                placed.add(qualified)
    return pages


def render(page: str, names: list[str]) -> str:
    title, intro, _ = PAGES[page]
    lines = [f"# {title}", "", intro, ""]
    if not names:
        lines.append("Nothing here yet: this module has no public names in this version.")
    for name in names:
        lines.append(f"::: {name}")
        if name in OPTIONS:
            lines += ["    options:"]
            lines += [f"      {key}: {str(value).lower()}" for key, value in OPTIONS[name].items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def on_files(files, config):
    # Imported here so that tests can use `api_pages` without mkdocs installed.
    from mkdocs.structure.files import File

    for page, names in api_pages().items():
        if files.get_file_from_path(page) is None:
            files.append(File.generated(config, page, content=render(page, names)))
    return files


def cli_help() -> str:
    """The help of the `parassm` command and of each subcommand, as Markdown."""
    from parassm._cli._front import make_parser

    parser, subcommands = make_parser()
    parts = ["## `parassm`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in subcommands.items():
        parts += [f"## `parassm {name}`", "", "```text", sub.format_help().rstrip()]
        parts += ["```", ""]
    return "\n".join(parts)


def _fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def bench_table(name: str) -> str:
    """The rows of `bench/results/<name>` as Markdown tables (grid, then floor)."""
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "results" / name
    if not path.exists():
        return f"*No results yet: `bench/results/{name}` is not in this checkout.*"
    rows = json.loads(path.read_text())
    if rows and rows[0].get("bench") == "peers":
        return _peers_table(rows)
    if rows and rows[0].get("bench") == "convergence":
        return _convergence_table(rows)
    grid = [r for r in rows if r.get("bench") in ("core", "gpu_suite")]
    floor = [r for r in rows if r.get("bench") == "core_floor"]
    out = []
    if grid:
        r0 = grid[0]
        out += [
            f"Measured with jax {r0['jax_version']} on {r0['backend']} "
            f"({r0['device']}, {r0.get('cpu_count', '?')} CPUs), {r0['dtype']}, git "
            f"`{r0['git_sha']}`, profile `{r0.get('profile', '?')}`, {r0['timestamp']}.",
            "",
            "| problem | T | solver | run s | speed-up vs lax.scan | steps | result | "
            "max error | note |",
            "| --- | ---: | --- | ---: | ---: | ---: | --- | ---: | --- |",
        ]
        for r in grid:
            if r.get("skipped"):
                out.append(
                    f"| {r['label']} | {r['T']} | {r['solver']} | — | — | — | skipped | — "
                    f"| {r['note']} |"
                )
                continue
            out.append(
                f"| {r['label']} | {r['T']} | {r['solver']} | {_fmt(r['run_s'], '.4f')} | "
                f"{_fmt(r['speedup'], '.3g')} | {r['steps']} | {r['result']} | "
                f"{_fmt(r['max_err'], '.1e')} | {r.get('note', '')} |"
            )
        out.append("")
    if floor:
        r0 = floor[0]
        out += [
            f"One quasi-DEER iteration against its floor, GRU D={r0['D']}, T={r0['T']}, "
            f"{r0['dtype']}, {r0['rounds']} interleaved rounds (medians, seconds):",
            "",
            "| diagonal | one iteration | floor | ratio (target <= 1.5) | per-round IQR |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for r in floor:
            lo, hi = r["ratio_iqr"]
            out.append(
                f"| {r['solver']} | {r['iteration_s']:.3f} | {r['floor_s']:.3f} | "
                f"{r['ratio']:.2f} | {lo:.2f}-{hi:.2f} |"
            )
        out += ["", "The pieces, each jitted on its own (medians, seconds):", ""]
        out += ["| piece | seconds |", "| --- | ---: |"]
        for piece, t in r0["pieces_s"].items():
            out.append(f"| `{piece}` | {t:.3f} |")
        out.append("")
    return "\n".join(out)


def _peers_table(rows: list[dict]) -> str:
    r0 = rows[0]
    out = [
        f"Measured with jax {r0['jax_version']} on {r0['backend']} ({r0['device']}, "
        f"{r0.get('cpu_count', '?')} CPUs), float32, git `{r0['git_sha']}`, profile "
        f"`{r0['profile']}`, {r0['timestamp']}. Run: the fastest of the round-robin "
        "rounds; ratios to `lax.scan`, to the reference iteration with parassm's "
        "iterations + 1, and to the fastest peer at the same point.",
        "",
        "| H | T | method | steps | result | max error | compile s | run ms | / lax.scan "
        "| / reference | / fastest peer |",
        "| ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.get("result") == "skipped":
            out.append(
                f"| {r['H']} | {r['T']} | {r.get('method', '')} | — | skipped | — | — | — "
                f"| — | — | {r.get('note', '')} |"
            )
            continue
        out.append(
            f"| {r['H']} | {r['T']} | {r['method']} | {_fmt(r['steps'], '')} | "
            f"{r['result']} | {_fmt(r['max_err'], '.1e')} | {r['compile_s']:.1f} | "
            f"{r['run_s'] * 1e3:.1f} | {r['ratio_to_scan']:.1f} | "
            f"{_fmt(r['ratio_to_reference'], '.2f')} | "
            f"{_fmt(r['ratio_to_fastest_peer'], '.2f')} |"
        )
    return "\n".join(out + [""])


def _convergence_table(rows: list[dict]) -> str:
    r0 = rows[0]
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    shas = ", ".join(f"`{sha}`" for sha in dict.fromkeys(r["git_sha"] for r in rows))
    out = [
        f"Measured with git {shas} on {r0['backend']}. Newton steps to "
        "`successful` (**bold**: over 50; `!`: not successful within `max_steps`, "
        "which is T at T = 1000 and 300 above). LLE: sequential estimate.",
        "",
        "| case | dtype | T | guess | LLE | " + " | ".join(solvers) + " |",
        "| --- | --- | ---: | --- | ---: | " + " | ".join("---:" for _ in solvers) + " |",
    ]
    cells: dict[tuple, dict] = {}
    for r in rows:
        key = (r["case"], r["dtype"], r["T"], r["guess"], r["lle"])
        steps = str(r["steps"]) + ("" if r["successful"] else "!")
        cells.setdefault(key, {})[r["solver"]] = (
            f"**{steps}**" if r["steps"] > 50 or not r["successful"] else steps
        )
    for (case, dtype, T, guess, lle), by in cells.items():
        out.append(
            f"| {case} | {dtype} | {T} | {guess} | {lle:.3f} | "
            + " | ".join(by.get(s, "—") for s in solvers)
            + " |"
        )
    return "\n".join(out + [""])


def on_page_markdown(markdown, page, config, files):
    import re

    if "<!-- parassm-cli-help -->" in markdown:
        markdown = markdown.replace("<!-- parassm-cli-help -->", cli_help())
    return re.sub(r"<!-- bench-table: ([\w.]+) -->", lambda m: bench_table(m.group(1)), markdown)
