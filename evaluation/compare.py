"""Two evaluations of the same tasks, paired: where is model B better than model A, and by how much?

    codefill eval compare A_DIR B_DIR --out DIR

A_DIR and B_DIR are `codefill eval` output folders: `infill_tasks.jsonl` (`eval infill`: HumanEval infilling
modes such as `single_served`, and held-out FIM, `held_out_served`) and/or `humaneval_samples.jsonl` (`eval
humaneval`, mode `humaneval`). Within a mode the rows are paired by task (mode, task or file, line, middle; for
HumanEval, problem and sample), and both sides must hold the same tasks: a comparison over different task sets
would not be paired. Modes only one side has are listed and skipped.

For each mode and measure the rows hold (`passed`: the tests ran and passed; `exact`: exact match; `similarity`:
edit similarity), the report gives A's and B's means, the difference, a paired bootstrap interval of the mean
difference (training/paired_decision.bootstrap_interval: the same resampled tasks for both models) and, for the
0/1 measures, the exact sign test over the tasks where only one model succeeded. A row's verdict is `better` or
`worse` when its interval lies wholly above or below 0 and, for a 0/1 measure, the sign test agrees at the same
level (the bootstrap alone calls 4 tasks gained and none lost out of 256 a difference; the sign test, p = 0.125,
does not), else `no clear difference`: a point difference alone is not called better. Writes DIR/compare.json
and DIR/compare.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codefill.training.paired_decision import DecisionConfig, bootstrap_interval, sign_test

from .eval_error import EvalError

FILES = ("infill_tasks.jsonl", "humaneval_samples.jsonl")
MEASURES = ("passed", "exact", "similarity")


def _key(row: dict) -> tuple:
    if "sample" in row:  # eval humaneval
        return ("humaneval", row["task_id"], row["sample"])
    return (row["mode"], row.get("task_id", row.get("path")), row["line"], row["middle"])


def _values(row: dict) -> dict[str, float]:
    out = {}
    if "status" in row:
        out["passed"] = float(row["status"] == "passed")
    if "exact" in row:
        out["exact"] = float(bool(row["exact"]))
    if "similarity" in row:
        out["similarity"] = float(row["similarity"])
    return out


def load_rows(folder: str | Path) -> dict[str, dict[tuple, dict[str, float]]]:
    """mode -> task key -> measure -> value, from an evaluation folder's per-task files."""
    folder = Path(folder)
    found = [folder / name for name in FILES if (folder / name).is_file()]
    if not found:
        raise EvalError(f"{folder} holds none of {', '.join(FILES)}: give a `codefill eval infill` or "
                        f"`codefill eval humaneval` --out folder")
    modes: dict[str, dict[tuple, dict[str, float]]] = {}
    for path in found:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                row = json.loads(line)
                key = _key(row)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise EvalError(f"{path}:{n} is not a per-task row of codefill eval: {e!r}") from e
            tasks = modes.setdefault(key[0], {})
            if key in tasks:
                raise EvalError(f"{path}:{n} repeats task {key[1:]!r} of mode {key[0]!r}")
            tasks[key] = _values(row)
    return modes


@dataclass(frozen=True)
class Row:
    mode: str
    measure: str
    tasks: int
    a: float  # means
    b: float
    low: float  # paired bootstrap interval of mean(b - a)
    high: float
    wins: int | None  # 0/1 measures: tasks only B got, only A got, and the sign test's p-value
    losses: int | None
    p_value: float | None
    alpha: float  # 1 - the confidence level: the sign test's p-value must be below it

    @property
    def verdict(self) -> str:
        agreed = self.p_value is None or self.p_value < self.alpha
        return "better" if self.low > 0 and agreed else "worse" if self.high < 0 and agreed else \
            "no clear difference"


def compare(a: dict, b: dict, config: DecisionConfig = DecisionConfig()) -> tuple[list[Row], list[str]]:
    """The rows of every mode both sides hold, and the modes only one side holds."""
    rows, skipped = [], sorted(set(a) ^ set(b))
    for mode in sorted(set(a) & set(b)):
        ta, tb = a[mode], b[mode]
        if set(ta) != set(tb):
            only_a, only_b = set(ta) - set(tb), set(tb) - set(ta)
            example = next(iter(only_a or only_b))
            raise EvalError(f"mode {mode!r} is not over the same tasks: {len(ta)} against {len(tb)}, "
                            f"{len(only_a)} only in A and {len(only_b)} only in B (e.g. {example[1:]!r}); "
                            f"evaluate both models with the same options")
        keys = sorted(ta, key=repr)
        for measure in MEASURES:
            if not all(measure in ta[k] and measure in tb[k] for k in keys):
                continue
            va = np.array([ta[k][measure] for k in keys])
            vb = np.array([tb[k][measure] for k in keys])
            low, high = bootstrap_interval(vb - va, config)
            sign = sign_test(va > 0.5, vb > 0.5) if measure != "similarity" else None
            rows.append(Row(mode, measure, len(keys), float(va.mean()), float(vb.mean()), low, high,
                            sign.wins if sign else None, sign.losses if sign else None,
                            sign.p_value if sign else None, 1.0 - config.confidence))
    if not rows:
        raise EvalError(f"no mode in common: A has {sorted(a)}, B has {sorted(b)}")
    return rows, skipped


def run(a_dir: str | Path, b_dir: str | Path, out_dir: str | Path, config: DecisionConfig = DecisionConfig()) -> dict:
    rows, skipped = compare(load_rows(a_dir), load_rows(b_dir), config)
    report = {"a": str(a_dir), "b": str(b_dir), "confidence": config.confidence, "resamples": config.resamples,
              "seed": config.seed, "skipped_modes": skipped,
              "rows": [{**r.__dict__, "difference": r.b - r.a, "verdict": r.verdict} for r in rows]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "compare.md").write_text(markdown(report))
    return report


def markdown(r: dict) -> str:
    lines = [f"# {r['b']} (B) against {r['a']} (A), paired by task", "",
             f"Intervals: paired bootstrap of the mean difference B - A, {r['confidence']:.0%}, {r['resamples']} "
             f"resamples, seed {r['seed']}. Sign test: tasks only B got / only A got, two-sided exact p.", "",
             "| mode | measure | tasks | A | B | B - A | interval | only B / only A (p) | verdict |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for row in r["rows"]:
        pct = row["measure"] != "similarity"
        fmt = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.3f}")
        sign = "" if row["wins"] is None else f"{row['wins']} / {row['losses']} (p = {row['p_value']:.3g})"
        lines.append(f"| {row['mode']} | {row['measure']} | {row['tasks']} | {fmt(row['a'])} | {fmt(row['b'])} | "
                     f"{row['difference']:+.3f} | [{row['low']:+.3f}, {row['high']:+.3f}] | {sign} | "
                     f"{row['verdict']} |")
    if r["skipped_modes"]:
        lines += ["", f"Modes only one side evaluated (skipped): {', '.join(r['skipped_modes'])}."]
    return "\n".join(lines) + "\n"
