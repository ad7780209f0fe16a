"""`codefill eval compare`: two evaluation folders paired by task, per mode and measure, with intervals."""

from __future__ import annotations

import json

import pytest

from codefill.evaluation import compare
from codefill.evaluation.eval_error import EvalError
from helpers import run_codefill


def _infill_row(mode, i, exact, similarity, status=None):
    row = {"mode": mode, "line": i, "middle": f"x = {i}\n", "prediction": "", "exact": exact,
           "similarity": similarity, "stopped": True}
    if status is None:
        row["path"] = f"pkg/m{i % 7}.py"
    else:
        row["task_id"], row["status"] = f"HumanEval/{i}", status
    return row


def _write(folder, infill_rows=(), samples=()):
    folder.mkdir(parents=True, exist_ok=True)
    if infill_rows:
        (folder / "infill_tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in infill_rows))
    if samples:
        (folder / "humaneval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    return folder


def _sample(i, passed):
    return {"task_id": f"HumanEval/{i}", "sample": 0, "completion": "", "status": "passed" if passed else "failed"}


def test_paired_rows_give_verdicts_from_their_intervals(tmp_path):
    n = 80
    # held-out spans: B matches 30 that A missed and loses none; similarity rises with them.
    a = [_infill_row("held_out_served", i, False, 0.4) for i in range(n)]
    b = [_infill_row("held_out_served", i, i < 30, 1.0 if i < 30 else 0.4) for i in range(n)]
    # HumanEval single-line as served: B passes 2 more and fails 3 that A passed (listed in B's own order).
    a += [_infill_row("single_served", i, False, 0.5, "passed" if i < 10 else "failed") for i in range(n)]
    b += [_infill_row("single_served", i, False, 0.5, "passed" if 3 <= i < 12 else "failed")
          for i in reversed(range(n))]
    a_dir = _write(tmp_path / "a", a, [_sample(i, False) for i in range(20)])
    b_dir = _write(tmp_path / "b", b, [_sample(i, i == 4) for i in range(20)])

    report = compare.run(a_dir, b_dir, tmp_path / "out")
    rows = {(r["mode"], r["measure"]): r for r in report["rows"]}
    assert set(rows) == {("held_out_served", "exact"), ("held_out_served", "similarity"),
                         ("single_served", "passed"), ("single_served", "exact"), ("single_served", "similarity"),
                         ("humaneval", "passed")}
    held = rows[("held_out_served", "exact")]
    assert (held["tasks"], held["a"], held["b"], held["wins"], held["losses"]) == (n, 0.0, 30 / n, 30, 0)
    assert held["low"] > 0 and held["verdict"] == "better" and held["p_value"] < 1e-6
    single = rows[("single_served", "passed")]
    assert (single["a"], single["b"], single["wins"], single["losses"]) == (10 / n, 9 / n, 2, 3)
    assert single["low"] < 0 < single["high"] and single["verdict"] == "no clear difference"
    assert rows[("single_served", "similarity")]["low"] == rows[("single_served", "similarity")]["high"] == 0
    assert rows[("humaneval", "passed")]["b"] == 1 / 20 and rows[("humaneval", "passed")]["verdict"] != "better"
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| held_out_served | exact | 80 | 0.0% | 37.5% | +0.375 |" in md and "30 / 0" in md


def test_a_few_tasks_gained_and_none_lost_need_the_sign_test_too(tmp_path):
    # 4 of 256 gained, none lost: every bootstrap resample has a difference >= 0 and most > 0, so the interval
    # lies above 0, but 4 / 0 is p = 0.125 by the sign test: not called better.
    a = [_infill_row("held_out_served", i, False, 0.4) for i in range(256)]
    b = [_infill_row("held_out_served", i, i < 4, 0.4) for i in range(256)]
    report = compare.run(_write(tmp_path / "a", a), _write(tmp_path / "b", b), tmp_path / "out")
    [row] = [r for r in report["rows"] if r["measure"] == "exact"]
    assert row["low"] > 0 and row["p_value"] == pytest.approx(0.125)
    assert row["verdict"] == "no clear difference"


def test_a_worse_model_is_called_worse_and_modes_of_one_side_are_skipped(tmp_path):
    a = [_infill_row("held_out", i, True, 1.0) for i in range(40)] + [_infill_row("multi_served", 1, False, 0.1)]
    b = [_infill_row("held_out", i, i % 4 == 0, 0.5) for i in range(40)]
    report = compare.run(_write(tmp_path / "a", a), _write(tmp_path / "b", b), tmp_path / "out")
    assert {r["verdict"] for r in report["rows"]} == {"worse"}
    assert report["skipped_modes"] == ["multi_served"]


def test_different_task_sets_and_bad_rows_are_refused(tmp_path):
    a = _write(tmp_path / "a", [_infill_row("held_out", i, False, 0.1) for i in range(10)])
    b = _write(tmp_path / "b", [_infill_row("held_out", i, False, 0.1) for i in range(1, 11)])
    with pytest.raises(EvalError, match=r"not over the same tasks: 10 against 10, 1 only in A and 1 only in B"):
        compare.run(a, b, tmp_path / "out")
    with pytest.raises(EvalError, match="holds none of infill_tasks.jsonl"):
        compare.run(a, tmp_path, tmp_path / "out")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "infill_tasks.jsonl").write_text(json.dumps({"mode": "held_out"}) + "\n")
    with pytest.raises(EvalError, match=r"infill_tasks.jsonl:1 is not a per-task row"):
        compare.run(a, tmp_path / "bad", tmp_path / "out")
    twice = _write(tmp_path / "twice", [_infill_row("held_out", 0, False, 0.1)] * 2)
    with pytest.raises(EvalError, match="repeats task"):
        compare.load_rows(twice)


def test_the_command(tmp_path):
    rows = [_infill_row("held_out_served", i, i % 2 == 0, 0.5) for i in range(12)]
    a, b = _write(tmp_path / "a", rows), _write(tmp_path / "b", rows)
    done = run_codefill("eval", "compare", a, b, "--out", tmp_path / "out", "--confidence", "0.9")
    assert "| held_out_served | exact | 12 | 50.0% | 50.0% | +0.000 | [+0.000, +0.000] | 0 / 0 (p = 1) | " \
           "no clear difference |" in done.stdout
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["confidence"] == 0.9
