"""The figure of `parassm diagnose --plot`: readable without the command line."""

import pathlib

import numpy as np


def plot(path: pathlib.Path, report: dict, lle_history) -> None:
    """Two panels: the running estimate of the largest Lyapunov exponent, and the
    predicted (and, with `--check`, measured) Newton steps of each solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inputs = report["inputs"]
    T = report["T"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    fig.suptitle(
        f"parassm diagnose: {inputs['label']}, T = {T}, D = {report['state_size']}, "
        f"{inputs['dtype']}\nregime: {report['regime']}; recommended solver: "
        f"{report['recommendation']['solver']}",
        fontsize=10,
    )

    history = np.asarray(lle_history)
    lle = report["lle"]
    ax1.plot(np.arange(1, len(history) + 1), history, lw=1.2)
    ax1.axhline(0.0, color="gray", lw=0.8)
    ax1.set_xlabel("time step t of the trajectory (estimate over steps 1..t)")
    ax1.set_ylabel("running LLE estimate (per step)")
    title = "largest Lyapunov exponent: "
    title += "not finite" if lle["per_step"] is None else f"{lle['per_step']:.3g} per step"
    if lle["per_unit_time"] is not None:
        title += f" ({lle['per_unit_time']:.3g} per unit time)"
    title += "\n< 0: perturbations die out (predictable); > 0: chaos"
    ax1.set_title(title, fontsize=10)

    predicted = report["predicted_steps"]
    check = report.get("check")
    names = list(predicted)
    x = np.arange(len(names))
    width = 0.38 if check else 0.6
    offset = width / 2 if check else 0.0
    bars = ax2.bar(x - offset, [predicted[n] for n in names], width, label="predicted")
    ax2.bar_label(bars, fontsize=7, padding=1)
    if check:
        for i, name in enumerate(names):
            c = check.get(name)
            if c is None:
                ax2.text(
                    i + offset,
                    1.2,
                    "not run\n(predicted\nfrom DEER)",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    rotation=90,
                )
                continue
            stopped = c["status"] != "ok"
            bar = ax2.bar(
                i + offset,
                c["measured_steps"],
                width,
                color="tab:orange",
                hatch="//" if stopped else None,
                edgecolor="white" if stopped else None,
                label="measured" if i == 0 else None,
            )
            ax2.bar_label(
                bar, [f"{c['measured_steps']}{'+' if stopped else ''}"], fontsize=7, padding=1
            )
    ax2.axhline(T, color="gray", ls="--", lw=0.8, label=f"T = {T}: no solver needs more")
    ax2.set_xticks(x, names)
    ax2.set_yscale("log")
    ax2.set_ylim(0.8, T * 40)
    ax2.set_ylabel("Newton steps to converge (log scale)")
    ax2.set_title(
        "predicted" + (" and measured (--check)" if check else "") + " Newton steps",
        fontsize=10,
    )
    footnote = (
        f"predicted: extrapolated from a trial on the first {report['proxy']['length']} steps"
    )
    if check:
        footnote += "; hatched: stopped by the time budget after that many steps"
    else:
        footnote += "; run with --check to measure"
    ax2.legend(fontsize=8, loc="upper right")
    fig.text(0.99, 0.01, footnote, fontsize=7, ha="right", va="bottom", color="dimgray")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
