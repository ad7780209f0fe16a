"""`codefill bench size`: candidates served for real, measured, and the largest one within every limit chosen.

Timings are not asserted (benchmarks make no speed claims in tests); what is checked is that each candidate was
built as described (float16 weights, its shape, the bundled tokenizer), measured through a real `codefill serve`
(a latency for every keystroke and cold document), and that the choice follows the limits.
"""

from __future__ import annotations

import json

from codefill import bench_size
from codefill.bundled import bundled_model_dir
from codefill.model.checkpoint import read_model_config


def _row(name, params, storage, typing, cold):
    return {"name": name, "params": params, "storage_bytes": storage, "typing_p50_ms": typing, "cold_ms": cold}


LIMITS = {"max_storage_bytes": 40_000_000, "max_typing_ms": 150.0, "max_cold_ms": 1500.0}


def test_choose_takes_the_most_parameters_within_every_limit():
    rows = [_row("small", 5e6, 10e6, 60, 200), _row("mid", 19e6, 38e6, 90, 600),
            _row("heavy", 24e6, 48e6, 100, 700),     # over the storage limit
            _row("slow", 20e6, 39e6, 151, 600),      # over the typing limit
            _row("cold", 21e6, 39e6, 100, 1501)]     # over the cold limit
    assert bench_size.choose(rows, LIMITS) == "mid"
    assert bench_size.choose(rows[2:], LIMITS) is None
    assert bench_size.choose([_row("edge", 1, 40_000_000, 150.0, 1500.0)], LIMITS) == "edge"  # limits inclusive


def test_candidates_are_served_measured_and_chosen(tmp_path):
    sizes = {"t64": bench_size._shape(64, 2, 1, 172), "t128": bench_size._shape(128, 2, 1, 344)}
    report = bench_size.run(tmp_path, sizes=sizes, keystrokes=3, max_storage_bytes=4_000_000)

    by_name = {row["name"]: row for row in report["rows"]}
    assert list(by_name) == ["t64", "t128"]
    for name, shape in sizes.items():
        row, model_dir = by_name[name], tmp_path / "size-models" / name
        config, dtype, _ = read_model_config(model_dir)
        assert dtype == "float16"
        assert (config.dim, config.n_layers, config.ffn_dim) == (shape.dim, shape.n_layers, shape.ffn_dim)
        assert (model_dir / "tokenizer.model").read_bytes() == (bundled_model_dir() / "tokenizer.model").read_bytes()
        assert row["params"] == config.n_params()
        assert row["storage_bytes"] == sum(f.stat().st_size for f in model_dir.iterdir())
        assert len(row["cold_each_ms"]) == len(bench_size.COLD_FILES) and min(row["cold_each_ms"]) > 0
        assert row["typing_p50_ms"] > 0

    # t64 is 2.4 MB, t128 5 MB: the 4 MB limit leaves only t64, whatever the latencies are on this machine
    # (a request that took more than the default 150 ms / 1.5 s would leave none).
    assert by_name["t64"]["storage_bytes"] < 4_000_000 < by_name["t128"]["storage_bytes"]
    fits = by_name["t64"]["typing_p50_ms"] <= 150 and by_name["t64"]["cold_ms"] <= 1500
    assert report["chosen"] == ("t64" if fits else None)
    assert json.loads((tmp_path / "size.json").read_text())["chosen"] == report["chosen"]
    md = (tmp_path / "size.md").read_text()
    assert "| t128 |" in md and "no: storage" in md


def test_trained_models_are_measured_as_stored_against_the_same_limits(tmp_path):
    """`bench size --model`: given model directories are served as they are (no candidate is built), with their
    own storage, parameters and tokenizer, and the report says which keep within every limit."""
    model = bench_size.build_candidate(tmp_path / "given", bench_size._shape(64, 2, 1, 172),
                                       bundled_model_dir() / "tokenizer.model")
    report = bench_size.run(tmp_path / "out", models={"given": model}, keystrokes=3, max_storage_bytes=1_000_000)
    (row,) = report["rows"]
    assert row["name"] == "given" and row["params"] == read_model_config(model)[0].n_params()
    assert row["storage_bytes"] == sum(f.stat().st_size for f in model.iterdir()) > 1_000_000
    assert row["typing_p50_ms"] > 0 and len(row["cold_each_ms"]) == len(bench_size.COLD_FILES)
    assert not (tmp_path / "out" / "size-models").exists()
    md = (tmp_path / "out" / "size.md").read_text()
    assert "Trained models as stored (given: `" in md and "no: storage" in md and "Within every limit: none." in md
