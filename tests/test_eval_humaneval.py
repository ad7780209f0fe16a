"""HumanEval: the pass@k estimator against brute force, the 164 problems and their canonical solutions in the
real sandbox, stop sequences, the run path with a fake completer, and an end-to-end run on the tiny model."""

from __future__ import annotations

import gzip
import itertools
import json
import math
from fractions import Fraction

import pytest

from codefill.evaluation import humaneval
from codefill.evaluation.eval_error import EvalError
from codefill.evaluation.humaneval import (STOP_SEQUENCES, HumanEvalConfig, PromptTooLong, generate_completions,
                                           load_problems, program, run, run_with, truncate)
from codefill.evaluation.pass_at_k import mean_pass_at_k, pass_at_k
from codefill.evaluation.sandbox import SandboxLimits, run_many
from helpers import make_tiny_model_dir


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


# --- pass@k ---------------------------------------------------------------------------------------------


def brute_force(n: int, c: int, k: int) -> Fraction:
    """Share of the k-subsets of n samples (the first c passing) holding at least one pass."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_brute_force_enumeration():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_force(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_known_values():
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k: every 3-subset holds a pass
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    # large n, where the binomials themselves overflow a float: against exact integer arithmetic
    exact = 1 - Fraction(math.comb(190, 100), math.comb(200, 100))
    assert pass_at_k(200, 10, 100) == pytest.approx(float(exact), rel=1e-12)
    assert mean_pass_at_k([(10, 1), (10, 0), (10, 10)], 1) == pytest.approx((0.1 + 0 + 1) / 3)


@pytest.mark.parametrize("n,c,k,match", [(3, 1, 4, "k must be in"), (3, 1, 0, "k must be in"),
                                         (3, 4, 1, "c=4"), (-1, 0, 1, "n must be"), (3, -1, 1, "c must be"),
                                         (3, 1, 1.0, "k must be"), (3, True, 1, "c must be")])
def test_pass_at_k_bad_arguments(n, c, k, match):
    with pytest.raises(EvalError, match=match):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_needs_problems():
    with pytest.raises(EvalError, match="no problems"):
        mean_pass_at_k([], 1)


# --- problems and programs ------------------------------------------------------------------------------


def test_load_problems_gives_the_164(problems):
    assert len(problems) == 164
    assert len({p.task_id for p in problems}) == 164
    assert problems[0].task_id == "HumanEval/0" and problems[0].entry_point == "has_close_elements"
    assert all(p.prompt.endswith("\n") and "def check(" in p.test for p in problems)


def test_load_problems_refuses_bad_files(tmp_path, problems):
    with pytest.raises(EvalError, match="does not exist"):
        load_problems(tmp_path / "missing.jsonl.gz")
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write('{"task_id": "X/0"\n')
    with pytest.raises(EvalError, match=r"bad.jsonl.gz:1: not JSON"):
        load_problems(bad)
    missing = tmp_path / "missing_field.jsonl"
    missing.write_text(json.dumps({"task_id": "X/0", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(EvalError, match=r"missing_field.jsonl:1: missing or non-string fields \['canonical_solution'"):
        load_problems(missing)
    twice = tmp_path / "twice.jsonl"
    row = {k: getattr(problems[0], k) for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point")}
    twice.write_text((json.dumps(row) + "\n") * 2)
    with pytest.raises(EvalError, match="appears twice"):
        load_problems(twice)
    twice.write_text(json.dumps(row) + "\n")
    assert load_problems(twice) == [problems[0]]


def test_program_layout(problems):
    p = problems[0]
    text = program(p, "    return True\n")
    assert text == p.prompt + "    return True\n" + "\n\n" + p.test + "\n\ncheck(has_close_elements)\n"


def test_all_canonical_solutions_pass_and_stubs_fail(problems):
    canonical = run_many([program(p, p.canonical_solution) for p in problems], SandboxLimits(), workers=2)
    failed = [(p.task_id, r.describe()) for p, r in zip(problems, canonical) if not r.passed]
    assert not failed, failed
    stubs = run_many([program(p, "    pass\n") for p in problems], SandboxLimits(), workers=2)
    assert sum(r.status == "failed" for r in stubs) >= 160, [p.task_id for p, r in zip(problems, stubs) if r.passed]


def test_truncate_cuts_at_each_stop_sequence():
    body = "    x = 1\n    # an indented comment stays\n    def inner():\n        return 2\n    return x\n"
    assert truncate(body) == body
    for stop in STOP_SEQUENCES:
        assert truncate(body + stop[1:] + "junk()\n") == body[:-1], stop  # the newline before it goes too
    assert truncate("    return 1\n#\ndef f():\n") == "    return 1"  # the earliest one wins
    assert truncate("\ndef f():") == ""


# --- config ---------------------------------------------------------------------------------------------


def test_config_validation():
    with pytest.raises(EvalError, match="identical greedy"):
        HumanEvalConfig(samples=2)
    with pytest.raises(EvalError, match="pass@5 needs at least 5 samples.*samples is 2"):
        HumanEvalConfig(samples=2, temperature=0.8, ks=(1, 5))
    with pytest.raises(EvalError, match="top_p"):
        HumanEvalConfig(top_p=0)
    with pytest.raises(EvalError, match="limit"):
        HumanEvalConfig(limit=0)
    with pytest.raises(EvalError, match="check_problems"):
        HumanEvalConfig(check_problems=-2)
    assert HumanEvalConfig(samples=10, temperature=0.8, ks=(1, 10)).ks == (1, 10)


def test_sample_seeds_are_stable_and_distinct():
    seeds = {humaneval.sample_seed(0, i, j) for i in range(164) for j in range(10)}
    assert len(seeds) == 1640
    assert humaneval.sample_seed(0, 3, 1) == humaneval.sample_seed(0, 3, 1) != humaneval.sample_seed(1, 3, 1)


# --- the run path with fake completers ------------------------------------------------------------------


def test_run_with_canonical_completer_scores_one(tmp_path, problems):
    solutions = {p.prompt: p.canonical_solution for p in problems}
    calls = []

    def complete(prompt: str, seed: int) -> str:
        calls.append(seed)
        return solutions[prompt] + "\ndef junk():\n    raise SystemExit(1)\n"  # cut at "\ndef "

    config = HumanEvalConfig(limit=4, check_problems=2)
    summary = run_with(lambda: complete, config, tmp_path, model="canonical", progress=False)
    assert summary["pass_at_k"] == {"pass@1": 1.0}
    assert summary["statuses"] == {"passed": 4, "failed": 0, "timeout": 0}
    assert summary["problems"] == 4 and summary["samples"] == 4 and len(calls) == 4
    rows = [json.loads(line) for line in (tmp_path / "humaneval_samples.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == [p.canonical_solution for p in problems[:4]]


def test_run_with_wrong_and_unfitting_completions(tmp_path):
    def complete(prompt: str, seed: int) -> str:
        if "has_close_elements" in prompt:
            raise PromptTooLong("pretend the prompt does not fit")
        return "    return None\n"

    config = HumanEvalConfig(limit=3, check_problems=0)
    summary = run_with(lambda: complete, config, tmp_path, model="wrong", progress=False)
    assert summary["pass_at_k"] == {"pass@1": 0.0}
    assert summary["statuses"]["passed"] == 0 and summary["statuses"]["failed"] == 3
    assert summary["not_run"] == {"prompt too long": 1}
    rows = [json.loads(line) for line in (tmp_path / "humaneval_samples.jsonl").read_text().splitlines()]
    assert rows[0]["reason"] == "prompt too long" and rows[0]["status"] == "failed"
    assert "AssertionError" in rows[1]["output_tail"] or "Error" in rows[1]["output_tail"]


def test_a_broken_sandbox_stops_the_run_before_generation(tmp_path):
    built = []
    config = HumanEvalConfig(limit=1, limits=SandboxLimits(memory_bytes=8 << 20))
    with pytest.raises(EvalError, match="SANDBOX BROKEN"):
        run_with(lambda: built.append(1), config, tmp_path, model="never", progress=False)
    assert not built and not (tmp_path / "humaneval.json").exists()


def test_generate_completions_seeds_per_problem_and_sample(problems):
    seen = []
    config = HumanEvalConfig(samples=3, temperature=0.5, ks=(1, 3))
    samples = generate_completions(problems[:2], config, lambda prompt, seed: seen.append(seed) or "x\nprint(1)",
                                   progress=False)
    assert [(s.problem, s.index) for s in samples] == [(i, j) for i in range(2) for j in range(3)]
    assert seen == [humaneval.sample_seed(0, i, j) for i in range(2) for j in range(3)]
    assert all(s.completion == "x" for s in samples)


# --- the tiny model ------------------------------------------------------------------------------------


def test_decoded_continuation_keeps_leading_indentation(tiny_dir):
    from codefill.model.tokenizer import Tokenizer

    tok = Tokenizer(tiny_dir / "tokenizer.model")
    prompt = 'def f(x):\n    """Add one."""\n'
    body = "    return x + 1\n"
    ids = tok.encode(prompt + body, bos=True)
    prompt_ids = tok.encode(prompt, bos=True)
    assert ids[:len(prompt_ids)] == prompt_ids, "the test needs a tokenization that splits at the prompt's end"
    generated = ids[len(prompt_ids):]
    assert humaneval.decode_continuation(tok, generated) == body
    assert tok.decode(generated) != body  # plain decode would lose a space of the indentation


def test_model_completer_refuses_a_prompt_too_long(tiny_dir):
    complete = humaneval.model_completer(tiny_dir, HumanEvalConfig(max_new_tokens=8))
    with pytest.raises(PromptTooLong, match="does not fit the KV cache of 2048"):
        complete("x = 1\n" * 3000, 0)


def test_end_to_end_on_the_tiny_model(tiny_dir, tmp_path):
    config = HumanEvalConfig(limit=2, samples=2, temperature=0.8, ks=(1, 2), max_new_tokens=48, check_problems=2)
    summary = run(tiny_dir, config, tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"humaneval_samples.jsonl", "humaneval.json", "humaneval.md"}
    on_disk = json.loads((tmp_path / "humaneval.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(summary["pass_at_k"]) == {"pass@1", "pass@2"}
    assert all(0.0 <= v <= 1.0 for v in summary["pass_at_k"].values())
    assert summary["problems"] == 2 and summary["samples"] == 4 and sum(summary["statuses"].values()) == 4
    assert summary["model_dir"] == str(tiny_dir) and summary["config"]["ks"] == [1, 2]
    assert isinstance(summary["network_isolation"], bool)
    rows = [json.loads(line) for line in (tmp_path / "humaneval_samples.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["sample"]) for r in rows] == [("HumanEval/0", 0), ("HumanEval/0", 1),
                                                           ("HumanEval/1", 0), ("HumanEval/1", 1)]
    assert all(r["status"] in ("passed", "failed", "timeout") for r in rows)
    assert all(not any(s in r["completion"] for s in STOP_SEQUENCES) for r in rows)
    md = (tmp_path / "humaneval.md").read_text()
    assert "| pass@1 |" in md and "| pass@2 |" in md
    text = humaneval.report(summary)
    assert "pass@1" in text and "network isolation" in text
