"""`codefill bench profile` on a tiny preset: MindSpore's real profiler, a real op table, a readable report."""

from __future__ import annotations

import json

from codefill import bench_model, llamacpp
from codefill.bench_profile import run


def test_profile_reports_the_ops_of_a_decode_step_and_a_prefill_chunk(tmp_path):
    report = run(tmp_path, preset="tiny-test")
    for phase in ("decode", "prefill"):
        p = report[phase]
        ops = {o["op"]: o for o in p["ops"]}
        # The CPU kernels (model/kernels.py), 4 a layer: norm, q/k/v, rotary, cache write and attention; the output
        # projection with the residual; norm, gate and up; the down projection with the residual. 2 layers, then
        # the final norm and the head.
        assert "Custom" in ops and ops["Custom"]["calls_per_call"] >= 4 * 2 + 2
        assert not {"MatMul", "ScatterUpdate", "Add"} & set(ops)  # every projection, cache write and residual
        assert p["op_ms"] > 0 and p["wall_ms"] > 0 and p["op_launches"] >= 4 * 2 + 2
    assert json.loads((tmp_path / "profile.json").read_text())["preset"] == "tiny-test"
    md = (tmp_path / "profile.md").read_text()
    assert "## decode:" in md and "| Custom |" in md


def test_model_benchmark_says_why_when_llamacpp_cannot_be_built(monkeypatch, tmp_path):
    def unavailable(cache=None):
        raise llamacpp.AnchorUnavailable("building llama.cpp needs 'cmake', which is not on PATH")

    monkeypatch.setattr(llamacpp, "ensure", unavailable)
    anchor = bench_model._bench_anchor(tmp_path, reps=1)
    assert anchor == {"unavailable": "building llama.cpp needs 'cmake', which is not on PATH"}
    assert "Not measured: building llama.cpp needs 'cmake'" in "\n".join(bench_model._anchor_markdown(anchor))


def test_speculation_benchmark_counts_steps_and_keeps_outputs(monkeypatch, tmp_path):
    from codefill import bench_speculation

    monkeypatch.setattr(bench_speculation, "FILES", ("argparse.py",))
    monkeypatch.setattr(bench_speculation, "CUTS", (0.5,))
    report = bench_speculation.run(tmp_path)
    off, on = report["modes"]["0"], report["modes"]["4"]
    assert report["identical_outputs"] and report["prompts"] == 1
    assert off["tokens"] == on["tokens"] == bench_speculation.TOKENS
    assert off["decode_steps"] >= bench_speculation.TOKENS - 1 and off["drafted"] == 0
    assert on["decode_steps"] <= off["decode_steps"] and on["accepted"] <= on["drafted"]
    assert "| off |" in (tmp_path / "speculation.md").read_text()
