"""The loss curve as a PNG, drawn by matplotlib: train loss per step and held-out loss, in nats per token.

matplotlib is imported inside the functions, so importing codefill stays light, and figures are drawn on an
explicit Agg canvas (`FigureCanvasAgg`), not through pyplot: no display is needed, no process-wide backend is
switched, and no figure outlives the call. The numbers themselves are in metrics.jsonl.
"""

from __future__ import annotations

import math
from pathlib import Path

SMOOTH_FROM = 200  # with at least this many train points, a running mean is drawn over the raw curve


def save_png(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib Figure to `path` as PNG through the Agg canvas, atomically (temporary file, rename)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(fig)  # attaches itself to fig
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    tmp.replace(path)
    return path


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(path: str | Path, train: list[tuple[int, float]], held_out: list[tuple[int, float]]) -> None:
    """train / held_out: (step, loss) pairs. Non-finite losses (a diverged step) are left out."""
    from matplotlib.figure import Figure

    train = [(s, v) for s, v in train if math.isfinite(v)]
    held_out = [(s, v) for s, v in held_out if math.isfinite(v)]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    last = []
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", linewidth=0.8, alpha=0.45 if len(train) >= SMOOTH_FROM else 1.0,
                label="train (each step)")
        last.append(f"train {losses[-1]:.3f}")
        if len(train) >= SMOOTH_FROM:  # one step's loss is noisy: the title gives the running mean's
            window = max(10, len(train) // 50)
            mean = running_mean(list(losses), window)
            ax.plot(steps, mean, color="tab:blue", linewidth=1.8, label=f"train (mean of the last {window} steps)")
            last[-1] = f"train {mean[-1]:.3f} (mean of the last {window} steps)"
    if held_out:
        steps, losses = zip(*held_out)
        ax.plot(steps, losses, color="tab:orange", linewidth=1.8, marker="o", markersize=3.5, label="held out")
        last.append(f"held out {losses[-1]:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss" + (f" at the last step: {', '.join(last)}" if last else " (no steps yet)"))
    ax.grid(True, alpha=0.3)
    if train or held_out:
        ax.legend(loc="upper right")
    save_png(fig, path)
