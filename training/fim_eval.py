"""Fill-in-the-middle evaluation on held-out files: deterministic tasks, greedy infill, two metrics.

    tasks = make_tasks(root, paths, FimEvalConfig())        # from the held-out list tokenize_fim writes
    score = evaluate_model_dir(model_dir, tasks, config)    # an in-process Runner, greedy
    score = evaluate(tasks, tok, complete, config)          # any `complete(prompt_ids, max_new, stop_ids, min_new)`
    print(score.report("after")); served = FimScore([as_served(r) for r in score.results])

A task hides a span of 1 to `max_middle_lines` whole lines of a file (the lines an editor user would type
next), starting at a non-blank line. Start lines and span lengths come from a random stream seeded by
(seed, path), so the tasks of a file depend only on that file and the config. Files are visited in path order
and their tasks interleaved (first task of every file, then the second...) up to `max_tasks`, so the budget is
shared equally: a repository with few held-out files gets many spans from each, a file with fewer non-blank
lines than its share gets a span at every one of them (the whole file) and leaves the rest of its share to
the longer files. `tasks_per_file` caps a file's spans (default: no cap but max_tasks). Each prompt
keeps `context_lines` lines before the span and half as many after it, then drops lines from the far ends
until it fits the model's context with `max_new_tokens` to spare.

The model's answer is its greedy continuation up to <EOT> (or EOS), read with `fim.decode_middle`, generated as
the language server generates it: on a task whose cursor line is blank, the stop ids are held back for the
first `blank_line_min_tokens` ids (lsp/postprocess.min_new_tokens; 0: the model's own first choice);
`as_served` turns it into what the language server would show at that cursor (lsp/postprocess.fit). Metrics,
both on text with trailing whitespace stripped from every line and trailing blank lines dropped:

    exact match      the answer equals the hidden span
    edit similarity  1 - Levenshtein(answer, span) / max(len(answer), len(span)), in [0, 1] (1: equal)

Which of two scores is better is not decided here: `codefill train --repo` compares them span by span with
a confidence level (paired_decision.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from codefill.lsp.postprocess import fit, min_new_tokens
from codefill.lsp.settings import Settings
from codefill.model.fim import cut_middle, infilling_prompt_tokens
from codefill.model.tokenizer import Tokenizer

from .data_error import DataError

# complete(prompt_ids, max_new_tokens, stop_ids, min_new_tokens) -> generated ids (greedy), the stop id included or
# not; no stop id among the first min_new_tokens
Complete = Callable[[list[int], int, frozenset[int], int], list[int]]


@dataclass(frozen=True)
class FimEvalConfig:
    max_tasks: int = 256  # bound on the whole evaluation (tasks x max_new_tokens decode steps at most)
    tasks_per_file: int | None = None  # a cap per file; None: none but max_tasks
    max_middle_lines: int = 3
    context_lines: int = 40  # lines kept before the span; half as many after it
    max_new_tokens: int = 64
    max_seq_len: int = 1024  # the evaluation's context (prompt + answer), at most the model's
    spm: bool = True  # SPM prompts, as the language server sends; False: PSM
    seed: int = 0
    blank_line_min_tokens: int = Settings.blank_line_min_tokens  # the language server's rule and default

    def __post_init__(self):
        for name in ("max_tasks", "tasks_per_file", "max_middle_lines", "max_new_tokens", "max_seq_len"):
            v = getattr(self, name)
            if v is None and name == "tasks_per_file":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise DataError(f"FimEvalConfig.{name} must be a positive integer, got {v!r}")
        if not isinstance(self.blank_line_min_tokens, int) or isinstance(self.blank_line_min_tokens, bool) \
                or self.blank_line_min_tokens < 0:
            raise DataError(f"FimEvalConfig.blank_line_min_tokens must be a non-negative integer, got "
                            f"{self.blank_line_min_tokens!r}")
        if not isinstance(self.context_lines, int) or self.context_lines < 0:
            raise DataError(f"FimEvalConfig.context_lines must be a non-negative integer, got {self.context_lines!r}")
        if self.max_new_tokens + 8 > self.max_seq_len:
            raise DataError(f"FimEvalConfig: max_new_tokens {self.max_new_tokens} leaves no room for a prompt in "
                            f"max_seq_len {self.max_seq_len}")


@dataclass(frozen=True)
class FimTask:
    path: str  # relative to the evaluated root
    line: int  # 0-based index of the span's first line
    prefix: str
    middle: str  # the hidden span: whole lines
    suffix: str


@dataclass(frozen=True)
class FimResult:
    task: FimTask
    prediction: str
    exact: bool
    similarity: float
    stopped: bool  # the model ended its answer with <EOT>/EOS (False: cut at max_new_tokens)


@dataclass
class FimScore:
    results: list[FimResult] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def exact_matches(self) -> int:
        return sum(r.exact for r in self.results)

    @property
    def exact_match(self) -> float:
        return self.exact_matches / self.n if self.n else 0.0

    @property
    def edit_similarity(self) -> float:
        return sum(r.similarity for r in self.results) / self.n if self.n else 0.0

    def report(self, name: str) -> str:
        return (f"{name}: exact match {self.exact_matches}/{self.n} ({self.exact_match:.1%}), "
                f"edit similarity {self.edit_similarity:.3f}")


# --- metrics ---------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Trailing whitespace of every line and trailing blank lines removed."""
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip("\n")


def levenshtein(a: str, b: str) -> int:
    """Insertions, deletions and substitutions turning a into b (two-row dynamic programme, O(len a * len b))."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_similarity(prediction: str, reference: str) -> float:
    a, b = normalise(prediction), normalise(reference)
    if not a and not b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


def exact_match(prediction: str, reference: str) -> bool:
    return normalise(prediction) == normalise(reference)


# --- tasks -----------------------------------------------------------------------------------------------


def file_tasks(path: str, text: str, config: FimEvalConfig) -> list[FimTask]:
    """The tasks of one file in the order they were drawn (see the module docstring): tasks_per_file of them
    (else max_tasks), or one at every non-blank line when the file has fewer."""
    per_file = config.tasks_per_file or config.max_tasks
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip()]
    rng = random.Random(f"{config.seed}\0{path}")  # str seeds hash with SHA-512: stable across runs
    chosen = rng.sample(starts, min(per_file, len(starts)))
    tasks = []
    for i in chosen:
        k = min(rng.randint(1, config.max_middle_lines), len(lines) - i)
        after = config.context_lines // 2
        tasks.append(FimTask(path, i, "".join(lines[max(0, i - config.context_lines):i]), "".join(lines[i:i + k]),
                             "".join(lines[i + k:i + k + after])))
    return tasks


def make_tasks(root: str | Path, paths: Sequence[str], config: FimEvalConfig = FimEvalConfig()) -> list[FimTask]:
    """Tasks from the files `paths` (relative to `root`), interleaved across files, at most max_tasks: each
    file's drawn tasks taken in turn, so files share the budget equally and what a short file cannot use
    goes to the longer ones."""
    root = Path(root)
    per_file = []
    for path in sorted(paths):
        try:
            text = (root / path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read held-out file {root / path}: {e}") from e
        per_file.append(file_tasks(path, text, config))
    tasks: list[FimTask] = []
    for round_ in range(max(map(len, per_file), default=0)):
        for ts in per_file:
            if round_ < len(ts) and len(tasks) < config.max_tasks:
                tasks.append(ts[round_])
    return tasks


def task_prompt(tok: Tokenizer, task: FimTask, config: FimEvalConfig) -> list[int]:
    """The task's infilling prompt, with context lines dropped from the far ends until it leaves room for
    max_new_tokens in max_seq_len."""
    budget = config.max_seq_len - config.max_new_tokens + 1  # len(prompt) + max_new - 1 <= max_seq_len
    before, after = task.prefix.splitlines(keepends=True), task.suffix.splitlines(keepends=True)
    while True:
        ids = infilling_prompt_tokens(tok, "".join(before), "".join(after), spm=config.spm)
        if len(ids) <= budget or not (before or after):
            break
        if len(before) >= len(after):
            before = before[1:]
        else:
            after = after[:-1]
    if len(ids) > budget:
        raise DataError(f"{task.path}:{task.line + 1}: the bare FIM prompt ({len(ids)} tokens) does not fit "
                        f"max_seq_len {config.max_seq_len} with max_new_tokens {config.max_new_tokens}")
    return ids


# --- running ----------------------------------------------------------------------------------------------


def evaluate(tasks: Sequence[FimTask], tok: Tokenizer, complete: Complete,
             config: FimEvalConfig = FimEvalConfig()) -> FimScore:
    if not tok.has_infilling:
        raise DataError("the tokenizer has no infilling pieces (<PRE> <SUF> <MID> <EOT>); FIM evaluation needs them")
    stops = frozenset({tok.eot_id, tok.eos_id})
    score = FimScore()
    for task in tasks:
        min_new = min_new_tokens(task.prefix, config.blank_line_min_tokens, config.max_new_tokens)
        generated = complete(task_prompt(tok, task, config), config.max_new_tokens, stops, min_new)
        ids, stopped = cut_middle(tok, generated)
        prediction = tok.decode_infilling(ids)
        score.results.append(FimResult(task, prediction, exact_match(prediction, task.middle),
                                       edit_similarity(prediction, task.middle), stopped))
    return score


def as_served(r: FimResult) -> FimResult:
    """The answer as the language server would show it at the task's cursor (no suggestion: empty)."""
    fitted = fit(r.task.prefix, r.task.suffix, r.prediction, ended=r.stopped)
    shown = fitted.text if fitted is not None else ""
    return FimResult(r.task, shown, exact_match(shown, r.task.middle), edit_similarity(shown, r.task.middle),
                     r.stopped)


def generator_complete(generator) -> Complete:
    """`complete` over an in-process inference_workers.runner.Runner (greedy, slot 0)."""
    from codefill.model.sampling import SamplingConfig

    def complete(prompt: list[int], max_new_tokens: int, stop_ids: frozenset[int], min_new_tokens: int) -> list[int]:
        return [t for t, _ in generator.generate(prompt, max_new_tokens, SamplingConfig(), stop_ids=stop_ids,
                                                 min_new_tokens=min_new_tokens)]

    return complete


def evaluate_model_dir(model_dir: str | Path, tasks: Sequence[FimTask], config: FimEvalConfig = FimEvalConfig(),
                       progress: str | None = None) -> FimScore:
    """Greedy FIM score of a MODEL_DIR on `tasks`, on a batch-1 Runner built for the evaluation's context
    (max_seq_len capped at the model's own). `progress`: a tqdm bar on stderr with that label."""
    from tqdm import tqdm

    from codefill.inference_workers.runner import Runner
    from codefill.model.checkpoint import load_model_dir

    files = load_model_dir(model_dir)
    if config.max_seq_len > files.config.max_seq_len:
        config = replace(config, max_seq_len=files.config.max_seq_len)
    generator = Runner(files.config, files.weights, max_seq_len=config.max_seq_len, max_batch=1)
    complete = generator_complete(generator)
    with tqdm(total=len(tasks), desc=progress, unit="span", disable=progress is None) as bar:
        def counted(prompt: list[int], max_new_tokens: int, stop_ids: frozenset[int], min_new: int) -> list[int]:
            out = complete(prompt, max_new_tokens, stop_ids, min_new)
            bar.update()
            return out

        return evaluate(tasks, files.tokenizer(), counted, config)
