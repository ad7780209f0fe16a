"""`codefill eval infill`: HumanEval infilling (scored by running the tests) and held-out FIM (scored by text).

HumanEval infilling tasks are built from the 164 problems' canonical solutions, as in Bavarian et al. 2022
("Efficient Training of Language Models to Fill in the Middle") and the Code Llama paper's Table 14:

    single-line  every non-blank line of a canonical solution is hidden in turn
    multi-line   every block is hidden in turn: a line ending in ":" (an if/for/while/def/with/try... header)
                 together with all the following lines indented deeper than it (its body)

For a hidden span the prefix is the problem's prompt plus the solution lines before it, the suffix is the
solution lines after it; the tests are never shown. The model's greedy middle (up to <EOT>, at most
`max_new_tokens`) is scored two ways:

    pass@1       prefix + middle + suffix, then the problem's tests, run in the sandbox (sandbox.py). The span
                 is whole lines, so a middle without a final newline gets one (the editor's cursor sits before
                 the line break); nothing else is fixed up.
    exact match  the middle equals the hidden span, compared as training/fim_eval.py does (trailing whitespace
                 of each line and trailing blank lines ignored), plus the mean edit similarity

Every task is also scored "served" ("single_served", "multi_served"): its answer passed through the language
server's own post-processing (lsp/postprocess.fit, through fim_eval.as_served), which is what an editor
shows at that cursor, and single-line tasks once more cut after their first line break that follows some
text ("single_eol"), the one-line rule alone. As generated is the papers' protocol and measures the raw
model, whose middle may run past the span before it emits <EOT>; the others measure the product.

Held-out FIM uses training/fim_eval.py unchanged: tasks of 1-3 whole lines cut from the held-out files of a
directory or repository (the same by-file split as `codefill data tokenize --mode fim`), exact match and edit
similarity. These too are scored twice from the same answers: as generated, and "served". The served answer
is what `fit` makes of it at the task's cursor: lines inserted above the code that follows (the first line, or
up to where the model itself writes that code or emits <EOT>), or a block on a blank line, cut at the block's end
and where it repeats the suffix; no suggestion scores as an empty answer.

Both kinds of task go through one `complete(prompt_ids, max_new, stop_ids)` function, so the n-gram baseline
(ngram_baseline.py) is scored on exactly the same prompts, and through the same post-processing, as the model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from codefill.training.fim_eval import (Complete, FimEvalConfig, FimResult, FimScore, FimTask, as_served,
                                        edit_similarity, evaluate, exact_match)
from codefill.training.source_files import (STDLIB, STDLIB_EXCLUDE, SourceConfig, iter_source_files,
                                            source_root)

from .eval_error import EvalError
from .humaneval import Problem, load_problems, program
from .sandbox import SandboxLimits, check_sandbox, isolation, network_isolation, run_many

MODES = ("single", "multi")


@dataclass(frozen=True)
class InfillConfig:
    modes: tuple[str, ...] = MODES
    spm: bool = True                 # SPM prompts, as the language server sends; False: PSM
    max_new_tokens: dict = field(default_factory=lambda: {"single": 48, "multi": 192})
    limit: int | None = None         # at most this many tasks per mode (an even spread), None: all
    workers: int = 2                 # sandbox processes at a time
    limits: SandboxLimits = SandboxLimits()
    blank_line_min_tokens: int = FimEvalConfig.blank_line_min_tokens  # as the language server generates

    def __post_init__(self):
        object.__setattr__(self, "modes", tuple(self.modes))
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise EvalError(f"infilling modes must be a non-empty subset of {list(MODES)}, got {list(self.modes)}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise EvalError(f"limit must be a positive integer or None, got {self.limit!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise EvalError(f"workers must be a positive integer, got {self.workers!r}")


# --- tasks ----------------------------------------------------------------------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def solution_spans(solution: str, mode: str) -> list[tuple[int, int]]:
    """[start, end) line ranges of the canonical solution hidden in `mode`."""
    lines = solution.splitlines(keepends=True)
    if mode == "single":
        return [(i, i + 1) for i, line in enumerate(lines) if line.strip()]
    if mode != "multi":
        raise EvalError(f"unknown infilling mode {mode!r}; known: {list(MODES)}")
    spans = []
    for i, line in enumerate(lines):
        if not line.strip() or not line.split("#", 1)[0].rstrip().endswith(":"):
            continue
        end = i + 1
        while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > _indent(line)):
            end += 1
        while end > i + 1 and not lines[end - 1].strip():  # trailing blank lines stay in the suffix
            end -= 1
        if end > i + 1:
            spans.append((i, end))
    return spans


def humaneval_tasks(problems: Sequence[Problem], mode: str) -> list[FimTask]:
    """Infilling tasks of every problem; FimTask.path is the task id, .line the hidden span's first line."""
    tasks = []
    for p in problems:
        lines = p.canonical_solution.splitlines(keepends=True)
        for start, end in solution_spans(p.canonical_solution, mode):
            tasks.append(FimTask(p.task_id, start, p.prompt + "".join(lines[:start]), "".join(lines[start:end]),
                                 "".join(lines[end:])))
    return tasks


def spread(items: list, limit: int | None) -> list:
    """At most `limit` items evenly spread over the list (all when limit is None)."""
    if limit is None or len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def filled_program(problem: Problem, task: FimTask, middle: str) -> str:
    if middle and not middle.endswith("\n") and task.suffix:
        middle += "\n"
    return program(problem, task.prefix[len(problem.prompt):] + middle + task.suffix)


# --- scoring ----------------------------------------------------------------------------------------------


@dataclass
class InfillModeResult:
    mode: str
    tasks: int
    passed: int
    score: FimScore

    @property
    def pass_at_1(self) -> float:
        return self.passed / self.tasks if self.tasks else 0.0

    def summary(self) -> dict:
        return {"mode": self.mode, "tasks": self.tasks, "pass@1": self.pass_at_1, "passed": self.passed,
                "exact_match": self.score.exact_match, "exact_matches": self.score.exact_matches,
                "edit_similarity": self.score.edit_similarity,
                "stopped_with_eot": sum(r.stopped for r in self.score.results)}


def humaneval_infilling(complete: Complete, tok, config: InfillConfig, *, max_seq_len: int,
                        problems: Sequence[Problem] | None = None, progress: bool = True
                        ) -> tuple[list[InfillModeResult], list[dict]]:
    """Score `complete` on HumanEval infilling; returns per-mode results and one row per task."""
    check_sandbox(config.limits)
    problems = list(problems) if problems is not None else load_problems()
    by_id = {p.task_id: p for p in problems}
    results, rows = [], []
    for mode in config.modes:
        tasks = spread(humaneval_tasks(problems, mode), config.limit)
        fim_cfg = FimEvalConfig(max_tasks=max(1, len(tasks)), max_new_tokens=config.max_new_tokens[mode],
                                max_seq_len=max_seq_len, spm=config.spm, context_lines=10_000,
                                blank_line_min_tokens=config.blank_line_min_tokens)
        with tqdm(total=len(tasks), desc=f"infill {mode}", unit="task", disable=not progress) as bar:
            score = evaluate(tasks, tok, _counted(complete, bar), fim_cfg)
        scores = [(mode, score)]
        if mode == "single":
            scores.append(("single_eol", FimScore([_to_end_of_line(r) for r in score.results])))
        scores.append((f"{mode}_served", FimScore([as_served(r) for r in score.results])))
        for name, s in scores:
            programs = [filled_program(by_id[r.task.path], r.task, r.prediction) for r in s.results]
            executed = run_many(programs, config.limits, workers=config.workers)
            results.append(InfillModeResult(name, len(tasks), sum(e.passed for e in executed), s))
            for r, e in zip(s.results, executed):
                rows.append({"mode": name, "task_id": r.task.path, "line": r.task.line, "middle": r.task.middle,
                             "prediction": r.prediction, "exact": r.exact, "similarity": round(r.similarity, 4),
                             "stopped": r.stopped, "status": e.status})
    return results, rows


def end_of_line(text: str) -> str:
    """`text` up to and including its first line break that follows some non-blank text (all of it if none)."""
    seen_text = False
    for i, ch in enumerate(text):
        if ch == "\n" and seen_text:
            return text[:i + 1]
        seen_text = seen_text or not ch.isspace()
    return text


def _to_end_of_line(r: FimResult) -> FimResult:
    cut = end_of_line(r.prediction)
    return FimResult(r.task, cut, exact_match(cut, r.task.middle), edit_similarity(cut, r.task.middle),
                     r.stopped or cut != r.prediction)


def _counted(complete: Complete, bar: tqdm) -> Complete:
    """`complete`, advancing the progress bar `bar` (a disabled one when progress is off) once per task."""

    def wrapped(prompt, max_new, stops, min_new):
        out = complete(prompt, max_new, stops, min_new)
        bar.update()
        return out

    return wrapped


def write_report(out_dir: str | Path, name: str, summary: dict, rows: list[dict]) -> Path:
    """OUT/NAME.json (the summary) and OUT/NAME_tasks.jsonl (one row per task)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = out / f"{name}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def config_summary(config: InfillConfig) -> dict:
    d = asdict(config)
    d["layout"] = "SPM" if config.spm else "PSM"
    d["network_isolation"] = network_isolation()
    d["sandbox_isolation"] = isolation()
    return d


def heldout_tasks(root: str | Path, sources, fim_config: FimEvalConfig, every_file: bool = False
                  ) -> tuple[list[FimTask], list[str]]:
    """Held-out FIM tasks of a directory or repository (`sources`: a training.source_files.SourceConfig whose
    held_out_fraction picks the files, as at tokenization, or every file with `every_file`), and the held-out
    paths."""
    from codefill.training.fim_eval import make_tasks
    held = [f.path for f in iter_source_files(root, sources) if f.held_out or every_file]
    if not held:
        raise EvalError(f"no held-out file under {root} with held_out_fraction {sources.held_out_fraction}; "
                        f"raise it, or evaluate another directory")
    return make_tasks(root, held, fim_config), held


# --- the command -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOutConfig:
    source: str                                  # a directory or repository, or "stdlib"
    files: SourceConfig                          # which files, and the by-file split
    fim: FimEvalConfig = FimEvalConfig(max_tasks=256)
    every_file: bool = False                     # every file of the source is held out (a corpus's packages)

    @classmethod
    def of_source(cls, source: str, fim: FimEvalConfig, held_out_fraction: float = 0.05,
                  extensions: tuple[str, ...] | None = (".py",), exclude: tuple[str, ...] = ()) -> HeldOutConfig:
        """A directory or "stdlib" (whose site-packages is left out unless `exclude` says otherwise)."""
        exclude = exclude or (STDLIB_EXCLUDE if source == STDLIB else ())
        return cls(source, SourceConfig(extensions=extensions, exclude=exclude, held_out_fraction=held_out_fraction),
                   fim)

    @classmethod
    def of_recipe(cls, recipe, fim: FimEvalConfig) -> HeldOutConfig:
        """The held-out files of the recipe that trained a model: its source, every filter, its split; for a
        recipe reading a corpus, every file of its held-out packages (training/corpus.held_out_tree)."""
        if getattr(recipe, "corpus", None) is not None:
            from codefill.training.corpus import held_out_tree

            return cls(str(held_out_tree(recipe.corpus)), SourceConfig(extensions=(".py",)), fim, every_file=True)
        return cls(recipe.source, recipe.sources, fim)

    def root(self) -> Path:
        root = source_root(self.source)
        if not root.is_dir():
            raise EvalError(f"held-out source {self.source!r} ({root}) is not a directory")
        return root


def build_baseline(tok, held: HeldOutConfig):
    """The n-gram baseline over the train files (not held out) of `held`'s source."""
    from .ngram_baseline import NgramBaseline

    if held.every_file:
        raise EvalError(f"{held.source} holds held-out files only: the n-gram baseline needs the train files beside "
                        f"them (evaluate it with --source and --held-out-fraction instead)")
    texts = [f.text for f in iter_source_files(held.root(), held.files) if not f.held_out]
    return NgramBaseline(tok, texts)


def run(model_dir: str | Path, out_dir: str | Path, config: InfillConfig = InfillConfig(), *,
        held_out: HeldOutConfig | None = None, baseline: str | None = None, humaneval: bool = True,
        endpoint: str | None = None, progress: bool = True, device: str = "cpu") -> dict:
    """Evaluate a MODEL_DIR (or, with baseline="ngram", the n-gram baseline built with its tokenizer on the
    train files of `held_out`'s source) on HumanEval infilling and/or held-out FIM. Writes OUT/NAME.json and
    OUT/NAME_tasks.jsonl, NAME = infill or infill_ngram; returns the summary. device: where the model runs."""
    from codefill.model.checkpoint import load_model_dir, load_tokenizer
    from codefill.training.fim_eval import generator_complete

    if not humaneval and held_out is None:
        raise EvalError("nothing to evaluate: HumanEval infilling is off and no held-out source is given")
    if baseline not in (None, "ngram"):
        raise EvalError(f"unknown baseline {baseline!r}; known: ngram")
    if baseline is not None and held_out is None:
        raise EvalError("the n-gram baseline is built from the train files of a source: give one (--source)")
    if baseline is not None and endpoint is not None:
        raise EvalError("give either --baseline or --endpoint: the baseline runs in this process")
    tok = load_tokenizer(model_dir)
    if not tok.has_infilling:
        raise EvalError(f"the tokenizer of {model_dir} has no infilling pieces; infilling needs a Code Llama base "
                        f"tokenizer (7B/13B), not a Python or 34B one")
    if endpoint is not None:  # the workers hold the model; MODEL_DIR gives the tokenizer
        from . import worker_completer

        client = worker_completer.connect(endpoint)
        max_seq_len = worker_completer.context(client, tok)
        return _score(worker_completer.fim_complete(client), tok, max_seq_len, f"{model_dir} served at {endpoint}",
                      "infill", model_dir, out_dir, config, held_out, humaneval, progress)
    files = load_model_dir(model_dir)
    max_seq_len = min(files.config.max_seq_len, 2048)
    if baseline == "ngram":
        model = build_baseline(tok, held_out)
        complete, name = model.complete, "infill_ngram"
        what = f"n-gram baseline ({model.n_tokens:,} train tokens of {held_out.source}, tokenizer of {model_dir})"
    else:
        from codefill.inference_workers.runner import Runner

        complete = generator_complete(Runner(files.config, files.weights, max_seq_len=max_seq_len, max_batch=1,
                                             device=device))
        name, what = "infill", str(model_dir)
    return _score(complete, tok, max_seq_len, what, name, model_dir, out_dir, config, held_out, humaneval, progress)


def _score(complete: Complete, tok, max_seq_len: int, what: str, name: str, model_dir, out_dir,
           config: InfillConfig, held_out: HeldOutConfig | None, humaneval: bool, progress: bool) -> dict:
    summary: dict = {"evaluated": what, "model_dir": str(model_dir), "config": config_summary(config)}
    rows: list[dict] = []
    if humaneval:
        modes, task_rows = humaneval_infilling(complete, tok, config, max_seq_len=max_seq_len, progress=progress)
        summary["humaneval_infilling"] = {m.mode: m.summary() for m in modes}
        rows += task_rows
    if held_out is not None:
        fim_cfg = replace(held_out.fim, max_seq_len=min(held_out.fim.max_seq_len, max_seq_len), spm=config.spm)
        tasks, paths = heldout_tasks(held_out.root(), held_out.files, fim_cfg, held_out.every_file)
        with tqdm(total=len(tasks), desc="held-out FIM", unit="task", disable=not progress) as bar:
            score = evaluate(tasks, tok, _counted(complete, bar), fim_cfg)
        served = FimScore([as_served(r) for r in score.results])
        summary["held_out_fim"] = {"source": held_out.source, "files": len(paths), "tasks": score.n,
                                   "exact_match": score.exact_match, "exact_matches": score.exact_matches,
                                   "edit_similarity": score.edit_similarity,
                                   "served": {"exact_match": served.exact_match,
                                              "exact_matches": served.exact_matches,
                                              "edit_similarity": served.edit_similarity},
                                   "config": asdict(fim_cfg)}
        for mode, s in (("held_out", score), ("held_out_served", served)):
            rows += [{"mode": mode, "path": r.task.path, "line": r.task.line, "middle": r.task.middle,
                      "prediction": r.prediction, "exact": r.exact, "similarity": round(r.similarity, 4),
                      "stopped": r.stopped} for r in s.results]
    write_report(out_dir, name, summary, rows)
    return summary


def report(summary: dict) -> str:
    lines = [f"{summary['evaluated']}, {summary['config']['layout']} prompts, greedy"]
    for mode, m in summary.get("humaneval_infilling", {}).items():
        label = {"single_eol": "single-line (cut at end of line)", "single_served": "single-line (as served)",
                 "multi_served": "multi-line (as served)"}.get(mode, f"{mode}-line")
        lines.append(f"  HumanEval {label} infilling: pass@1 {m['pass@1']:.1%} ({m['passed']}/{m['tasks']}), "
                     f"exact match {m['exact_match']:.1%}, edit similarity {m['edit_similarity']:.3f}")
    h = summary.get("held_out_fim")
    if h:
        lines.append(f"  held-out FIM ({h['source']}, {h['files']} files): exact match {h['exact_match']:.1%} "
                     f"({h['exact_matches']}/{h['tasks']}), edit similarity {h['edit_similarity']:.3f}")
        s = h["served"]
        lines.append(f"  held-out FIM as served (lsp postprocessing): exact match {s['exact_match']:.1%} "
                     f"({s['exact_matches']}/{h['tasks']}), edit similarity {s['edit_similarity']:.3f}")
    return "\n".join(lines)
