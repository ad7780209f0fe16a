"""Latency charts beside the benchmark reports: one PNG of latency distributions per configuration.

`latency_chart(path, panels, title=...)` draws, for each panel (say "time to first token" and "complete
suggestion"), one cumulative distribution per configuration: a point (x ms, y) says that a fraction y of the
requests took at most x ms, so p50 and p95 are where a curve crosses the dotted 0.5 and 0.95 lines, and a
curve further left is faster everywhere. The x axis turns logarithmic when latencies span more than 20x (a
cold prefill next to a reused one). The reports link the PNG (`![...](NAME.png)`) next to their tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from codefill.training.plot_png import save_png

LOG_SCALE_SPAN = 20.0


def latency_chart(path: str | Path, panels: Mapping[str, Mapping[str, Sequence[float]]], *, title: str,
                  unit: str = "ms") -> Path:
    """panels: {panel title: {configuration: latencies}}; configurations with no latencies are left out."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    panels = {name: {k: sorted(v) for k, v in series.items() if len(v)} for name, series in panels.items()}
    fig = Figure(figsize=(6 * max(1, len(panels)), 4.5), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (name, series) in zip(axes, panels.items()):
        for label, values in series.items():
            n = len(values)
            ax.step(values, [(i + 1) / n for i in range(n)], where="post", linewidth=1.6, label=f"{label} (n={n})")
        for q in (0.5, 0.95):
            ax.axhline(q, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"p{round(q * 100)}", (0, q), xycoords=("axes fraction", "data"), xytext=(3, 2),
                        textcoords="offset points", color="grey", fontsize=8)
        every = [v for values in series.values() for v in values]
        if every and min(every) > 0 and max(every) / min(every) > LOG_SCALE_SPAN:
            ax.set_xscale("log")  # labelled 1, 2, 5 x 10^k in plain numbers, not as powers of ten
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(name)
        ax.set_xlabel(f"latency ({unit}{', log scale' if ax.get_xscale() == 'log' else ''})")
        ax.set_ylabel("fraction of requests answered within")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        if series:
            ax.legend(loc="lower right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no answered requests", transform=ax.transAxes, ha="center", color="grey")
    return save_png(fig, path)


def chart_link(name: str, what: str) -> list[str]:
    """Markdown lines that show the chart file `name` (beside the report) under a sentence on `what`."""
    return [f"Latency distributions ({what}): [{name}]({name})", "", f"![latency chart]({name})", ""]
