"""Draw the benchmark figures from the JSON rows in bench/results/.

    python bench/plot.py                          # bench/results/*.json -> docs/img/
    python bench/plot.py --results DIR --out DIR
    python bench/plot.py --allow-dirty            # plot from a tree with uncommitted changes

Every figure is stamped with the commits its rows measured (each row's `git_sha`) and the
commit it was plotted at, and says so when the two differ. A tree with uncommitted
changes to tracked files is refused unless `--allow-dirty` (then the stamp says
`+dirty`): a figure should come from code anyone can check out.

One set of figures per backend found in the rows (`cpu`, `gpu`, ...):

- `speedup_vs_T_<backend>.png`: speed-up over `lax.scan` (run in the same process)
  against T, one line per solver, one panel per problem; runs that did not converge are
  drawn hollow.
- `steps_vs_T_<backend>.png`: Newton steps against T, same layout.
- `lle_vs_steps_<backend>.png`: steps against the largest Lyapunov exponent of the
  problem (the LLE sweep of the core benchmark and every grid row).
"""

import argparse
import collections
import json
import pathlib
import subprocess
import sys
import textwrap

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt


HERE = pathlib.Path(__file__).resolve().parent
GRID_BENCHES = ("core", "gpu_suite")
LLE_BENCHES = ("core", "core_lle", "gpu_suite", "gpu_suite_lle")
MARKERS = "osD^v<>pX*h"


def load_rows(folder: pathlib.Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        if isinstance(data, dict):
            data = data.get("rows", [])
        rows.extend(r for r in data if isinstance(r, dict))
    return rows


def _panel_key(row: dict) -> str:
    return row["label"]


def _solvers(rows: list[dict]) -> list[str]:
    seen = []
    for r in rows:
        if r["solver"] not in seen and r["solver"] not in ("lax.scan",):
            seen.append(r["solver"])
    return seen


def grid_figure(
    rows: list[dict],
    y: str,
    ylabel: str,
    title: str,
    baseline: float | None,
    leave_out: tuple[str, ...] = (),
):
    panels = collections.OrderedDict()
    for r in rows:
        panels.setdefault(_panel_key(r), []).append(r)
    if not panels:
        return None
    solvers = _solvers(rows)
    n = len(panels)
    cols = min(3, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    for ax, (panel, prow) in zip(axes.flat, panels.items()):
        for i, solver in enumerate(solvers):
            if solver in leave_out:
                continue
            pts = sorted((r for r in prow if r["solver"] == solver), key=lambda r: r["T"])
            if not pts:
                continue
            ts = [r["T"] for r in pts]
            ys = [r[y] for r in pts]
            color = f"C{i % 10}"
            ax.plot(ts, ys, "-", lw=1, color=color, label=solver)
            ok = [r.get("result") == "successful" for r in pts]
            for t, v, good in zip(ts, ys, ok):
                ax.plot(
                    t,
                    v,
                    MARKERS[i % len(MARKERS)],
                    color=color,
                    mfc=color if good else "none",
                )
        if baseline is not None:
            ax.axhline(baseline, color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("T")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9)
    fig.suptitle(title, fontsize=11)
    top = 1 - 0.03 * (title.count("\n") + 1) / nrows
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(labels) > 4), 1, top))
    return fig


def lle_figure(rows: list[dict], title: str):
    pts = [r for r in rows if r.get("lle") is not None and not r.get("skipped")]
    pts = [r for r in pts if r["solver"] in ("DEER", "QuasiDEER") and "steps" in r]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, solver in enumerate(("DEER", "QuasiDEER")):
        sel = [r for r in pts if r["solver"] == solver]
        if not sel:
            continue
        good = [r for r in sel if r.get("result") == "successful"]
        bad = [r for r in sel if r.get("result") != "successful"]
        color = f"C{i}"
        ax.plot(
            [r["lle"] for r in good],
            [r["steps"] for r in good],
            MARKERS[i],
            color=color,
            label=f"{solver} (converged)",
        )
        if bad:
            ax.plot(
                [r["lle"] for r in bad],
                [r["steps"] for r in bad],
                MARKERS[i],
                color=color,
                mfc="none",
                label=f"{solver} (hit max_steps)",
            )
    ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("largest Lyapunov exponent (per step)")
    ax.set_ylabel("Newton steps")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def git_state() -> tuple[str, bool]:
    """`(HEAD's 12-character sha, whether tracked files differ from it)`, or
    `("unknown", False)` outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return git("rev-parse", "--short=12", "HEAD"), bool(
            git("status", "--porcelain", "--untracked-files=no")
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def describe(rows: list[dict], plotted: str, width: int) -> str:
    """The machine and software of `rows`, the commits they measured, and `plotted`
    (the commit the figure is drawn at), in lines of at most `width` characters."""
    r = rows[0]
    shas = collections.Counter(row.get("git_sha") or "unknown" for row in rows)
    measured = ", ".join(f"{sha} ({n} rows)" if len(shas) > 1 else sha for sha, n in shas.items())
    plot = f"plotted at {plotted}" + ("" if set(shas) == {plotted} else ", not the rows' commit")
    return "\n".join(
        [
            f"{r.get('backend', '?')} ({r.get('device', '?')}, {r.get('cpu_count', '?')} "
            f"CPUs), jax {r.get('jax_version', '?')}, {r.get('dtype', '?')}",
            *textwrap.wrap(f"rows measured at git {measured}; {plot}", width),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot bench/results/*.json.")
    parser.add_argument("--results", type=pathlib.Path, default=HERE / "results")
    parser.add_argument("--out", type=pathlib.Path, default=HERE.parent / "docs" / "img")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="plot even if tracked files have uncommitted changes (the stamp says +dirty)",
    )
    args = parser.parse_args(argv)
    head, dirty = git_state()
    if dirty and not args.allow_dirty:
        parser.error(
            "the working tree has uncommitted changes, so the figures would not match any "
            "commit: commit them first, or pass --allow-dirty (the figures then say +dirty)"
        )
    plotted = head + ("+dirty" if dirty else "")
    rows = load_rows(args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    backends = sorted({r.get("backend", "unknown") for r in rows})
    written = []
    for backend in backends:
        mine = [r for r in rows if r.get("backend", "unknown") == backend]
        grid = [
            r
            for r in mine
            if r.get("bench") in GRID_BENCHES and not r.get("skipped") and "run_s" in r
        ]
        if grid:
            where = describe(grid, plotted, width=120)
            figures = {
                f"speedup_vs_T_{backend}.png": grid_figure(
                    grid,
                    "speedup",
                    "speed-up over lax.scan",
                    f"Speed-up over lax.scan (> 1: faster)\n{where}",
                    1.0,
                ),
                f"steps_vs_T_{backend}.png": grid_figure(
                    grid,
                    "steps",
                    "Newton steps",
                    f"Newton steps (hollow: hit max_steps)\n{where}",
                    None,
                    leave_out=("Sequential",),
                ),
            }
        else:
            figures = {}
        lle_rows = [r for r in mine if r.get("bench") in LLE_BENCHES]
        if lle_rows:
            figures[f"lle_vs_steps_{backend}.png"] = lle_figure(
                lle_rows, f"Steps vs predictability\n{describe(lle_rows, plotted, width=60)}"
            )
        for name, fig in figures.items():
            if fig is None:
                continue
            fig.savefig(args.out / name, dpi=110)
            plt.close(fig)
            written.append(args.out / name)
    for path in written:
        print(path)
    if not written:
        print(f"no plottable rows in {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
