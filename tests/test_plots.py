"""The PNGs codefill writes: the loss curve (training/plot_png.py) and the benchmarks' latency charts
(codefill/bench_chart.py) are real images with something drawn on them, written atomically."""

from __future__ import annotations

import math
import random

import numpy as np

from codefill import bench_lsp, bench_workers
from codefill.bench_chart import latency_chart
from codefill.training.plot_png import plot_losses, running_mean
from helpers import assert_drawn, read_png


def coloured(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> int:
    return int((np.abs(img.astype(int) - rgb).sum(axis=2) < tol).sum())


BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's tab:blue, tab:orange


def test_loss_curve_has_both_curves(tmp_path):
    train = [(s, 9.0 * math.exp(-s / 300) + 2 + 0.1 * math.sin(s)) for s in range(1, 601)]
    held = [(s, 9.0 * math.exp(-s / 300) + 1.9) for s in range(50, 601, 50)]
    plot_losses(tmp_path / "loss.png", train, held)
    img = read_png(tmp_path / "loss.png")
    assert_drawn(img)
    assert coloured(img, BLUE) > 200 and coloured(img, ORANGE) > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]  # no temporary file left


def test_loss_curve_without_held_out_or_points(tmp_path):
    plot_losses(tmp_path / "loss.png", [(1, 9.0), (2, 8.5), (3, float("nan")), (4, 8.0)], [])
    img = read_png(tmp_path / "loss.png")
    assert_drawn(img)
    assert coloured(img, BLUE) > 50 and coloured(img, ORANGE) == 0
    plot_losses(tmp_path / "empty.png", [], [])
    assert_drawn(read_png(tmp_path / "empty.png"))


def test_running_mean():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_latency_chart_draws_each_configuration(tmp_path):
    r = random.Random(0)
    ttft = {"full": [r.lognormvariate(3.5, 0.4) for _ in range(40)],
            "cold": [r.lognormvariate(6.5, 0.2) for _ in range(10)], "empty": []}
    done = {k: [2 * v for v in vs] for k, vs in ttft.items()}
    path = latency_chart(tmp_path / "workers_latency.png", {"time to first token": ttft, "complete": done},
                         title="synthetic")
    assert path == tmp_path / "workers_latency.png"
    img = read_png(path)
    assert_drawn(img, min_width=800)  # two panels side by side
    assert coloured(img, BLUE) > 100 and coloured(img, ORANGE) > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["workers_latency.png"]


def test_latency_chart_with_no_answers(tmp_path):
    assert_drawn(read_png(latency_chart(tmp_path / "lsp.png", {"keystroke to suggestion": {"paced": []}},
                                        title="nothing answered")))


def test_reports_link_their_chart():
    lsp = {"model_dir": "m", "preset": "small", "max_prompt_tokens": 1, "max_new_tokens": 1, "source": "s",
           "machine": {}, "passes": {}, "latency_chart": "lsp_latency.png"}
    assert "![latency chart](lsp_latency.png)" in bench_lsp._markdown(lsp)
    workers = {"model_dir": "m", "preset": "small", "max_batch": 1, "max_seq_len": 8, "context_tokens": 1,
               "max_new_tokens": 1, "source": "s", "machine": {}, "keystroke_replay": {},
               "cost_ratio_cold_over_keystroke_ttft": 1.0, "typists": {"single_complete_ms_p50": 1.0},
               "latency_chart": "workers_latency.png"}
    assert "![latency chart](workers_latency.png)" in bench_workers._markdown(workers)
