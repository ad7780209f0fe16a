"""`codefill eval infill`: HumanEval infilling tasks and scoring, held-out FIM, and the n-gram/copy baseline."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from codefill.evaluation.eval_error import EvalError
from codefill.evaluation.humaneval import load_problems
from codefill.evaluation.infilling import (InfillConfig, as_served, end_of_line, filled_program,
                                           humaneval_infilling, humaneval_tasks, solution_spans, spread)
from codefill.evaluation.ngram_baseline import NgramBaseline
from codefill.evaluation.sandbox import run_many
from codefill.model.fim import decode_middle, infilling_prompt_tokens
from codefill.model.tokenizer import Tokenizer
from codefill.training.fim_eval import FimEvalConfig, FimResult, FimTask, task_prompt
from helpers import make_tiny_model_dir, run_codefill


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def tok(tiny):
    return Tokenizer(tiny / "tokenizer.model")


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """Sixteen real stdlib files: enough for a by-file held-out split at fraction 0.3."""
    root = tmp_path_factory.mktemp("src")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = ["bisect.py", "heapq.py", "fnmatch.py", "shlex.py", "textwrap.py", "string.py", "colorsys.py",
             "keyword.py", "glob.py", "stat.py", "copy.py", "abc.py", "this.py", "types.py", "numbers.py",
             "getopt.py"]
    for name in names:
        shutil.copy(stdlib / name, root / name)
    return root


# --- HumanEval infilling tasks ----------------------------------------------------------------------------


BODY = ("    best = None\n"
        "    for x in xs:\n"
        "        if x > 0:  # positive\n"
        "            best = x\n"
        "\n"
        "    return best\n")


def test_single_line_spans_are_the_non_blank_lines():
    assert solution_spans(BODY, "single") == [(0, 1), (1, 2), (2, 3), (3, 4), (5, 6)]


def test_multi_line_spans_are_blocks_with_their_bodies():
    # the for block stops before the blank line and the dedented return; the if block is nested in it
    assert solution_spans(BODY, "multi") == [(1, 4), (2, 4)]
    with pytest.raises(EvalError, match="unknown infilling mode 'double'"):
        solution_spans(BODY, "double")


def test_tasks_reassemble_the_canonical_program_and_it_passes():
    problems = load_problems()
    for mode in ("single", "multi"):
        tasks = humaneval_tasks(problems, mode)
        by_id = {p.task_id: p for p in problems}
        for t in tasks:
            p = by_id[t.path]
            assert t.prefix + t.middle + t.suffix == p.prompt + p.canonical_solution
            assert t.middle.strip()
    single, multi = humaneval_tasks(problems, "single"), humaneval_tasks(problems, "multi")
    # The FIM paper's benchmark has 1033 single-line tasks from the same solutions; blocks are fewer.
    assert 900 <= len(single) <= 1200 and 100 <= len(multi) < len(single)
    sample = spread(single, 12) + spread(multi, 6)
    true = run_many([filled_program(by_id[t.path], t, t.middle.rstrip("\n")) for t in sample], workers=2)
    assert all(r.passed for r in true), [r for r in true if not r.passed][:1]
    wrong = run_many([filled_program(by_id[t.path], t, "    pass\n") for t in spread(multi, 6)], workers=2)
    assert sum(r.passed for r in wrong) <= 1


def test_spread_is_even_and_bounded():
    assert spread(list(range(10)), None) == list(range(10))
    assert spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert spread(list(range(3)), 5) == [0, 1, 2]
    with pytest.raises(EvalError, match="limit must be a positive integer"):
        InfillConfig(limit=0)
    with pytest.raises(EvalError, match="modes must be a non-empty subset"):
        InfillConfig(modes=("single", "triple"))


def test_an_oracle_scores_full_marks_and_a_wrong_answer_does_not(tok):
    problems = load_problems()[:6]
    config = InfillConfig(limit=8)
    # The oracle answers every prompt with its hidden middle; it can only do so if the prompts carry the task.
    answers = {}
    for mode in config.modes:
        fim_cfg = FimEvalConfig(max_tasks=10_000, max_new_tokens=config.max_new_tokens[mode], max_seq_len=2048,
                                context_lines=10_000)
        for t in spread(humaneval_tasks(problems, mode), config.limit):
            answers[tuple(task_prompt(tok, t, fim_cfg))] = tok.encode_infilling(t.middle) + [tok.eot_id]

    results, rows = humaneval_infilling(lambda p, n, s, m: answers[tuple(p)], tok, config, max_seq_len=2048,
                                        problems=problems, progress=False)
    assert [r.mode for r in results] == ["single", "single_eol", "single_served", "multi", "multi_served"]
    for r in results:
        assert r.tasks == 8 and r.passed == 8 and r.score.exact_matches == 8, r.summary()
    assert len(rows) == 40 and all(row["status"] == "passed" for row in rows)

    results, _ = humaneval_infilling(lambda p, n, s, m: tok.encode_infilling("    pass\n") + [tok.eot_id], tok,
                                     config, max_seq_len=2048, problems=problems, progress=False)
    assert all(r.score.exact_matches == 0 for r in results)
    assert all(r.passed < r.tasks for r in results)


# --- the n-gram / copy baseline ----------------------------------------------------------------------------


def test_ngram_picks_the_most_frequent_continuation(tok):
    docs = ["def f():\n    return 1\n"] * 5 + ["def f():\n    return 2\n"] * 2
    base = NgramBaseline(tok, docs)
    prompt = infilling_prompt_tokens(tok, "def f():\n", "", spm=True)
    out = base.complete(prompt, 32, frozenset({tok.eos_id, tok.eot_id}))
    assert out[-1] == tok.eot_id
    assert decode_middle(tok, out) == "    return 1\n"


def test_copy_repeats_a_line_from_the_visible_file(tok):
    base = NgramBaseline(tok, ["x = 1\n"])
    prefix = "total_count = combine(alpha_value, beta_value)\nprint(total_count)\ntotal_count = combine("
    for spm in (True, False):
        out = base.complete(infilling_prompt_tokens(tok, prefix, "\n", spm=spm), 32, frozenset({tok.eot_id}))
        assert decode_middle(tok, out) == "alpha_value, beta_value)\n"
    # ...and from the suffix when the prefix does not have it
    prefix, suffix = "zed_value = 1\nresult_holder = compute_everything(", "\nresult_holder = compute_everything(zed_value, 7)\n"
    out = base.complete(infilling_prompt_tokens(tok, prefix, suffix, spm=True), 32, frozenset({tok.eot_id}))
    assert decode_middle(tok, out) == "zed_value, 7)\n"


def test_split_prompt_reads_both_layouts(tok):
    base = NgramBaseline(tok, ["a = 1\n"])
    pre, suf = tok.encode("def g(x):\n    "), tok.encode_infilling("\n    return y\n")
    assert base.split_prompt(infilling_prompt_tokens(tok, "def g(x):\n    ", "\n    return y\n", spm=True)) == (pre, suf)
    assert base.split_prompt(infilling_prompt_tokens(tok, "def g(x):\n    ", "\n    return y\n")) == (pre, suf)
    with pytest.raises(EvalError, match="not an infilling prompt"):
        base.split_prompt(tok.encode("plain text", bos=True))


# --- the command, end to end on a tiny model --------------------------------------------------------------



def test_eval_infill_command_for_model_and_baseline(tiny, source_dir, tmp_path):
    common = ["--limit", "3", "--source", source_dir, "--held-out-fraction", "0.3", "--fim-tasks", "6",
              "--fim-max-new-tokens", "8", "--out", tmp_path]
    done = run_codefill("eval", "infill", "--model", tiny, *common)
    assert "single-line infilling: pass@1" in done.stdout and "held-out FIM" in done.stdout
    summary = json.loads((tmp_path / "infill.json").read_text())
    assert set(summary["humaneval_infilling"]) == {"single", "single_eol", "single_served", "multi", "multi_served"}
    for m in summary["humaneval_infilling"].values():
        assert m["tasks"] == 3 and 0.0 <= m["pass@1"] <= 1.0 and 0.0 <= m["edit_similarity"] <= 1.0
    held = summary["held_out_fim"]
    assert held["tasks"] == 6 and held["files"] >= 2
    served = held["served"]
    assert 0 <= served["exact_matches"] <= 6 and 0.0 <= served["edit_similarity"] <= 1.0
    assert "held-out FIM as served" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "infill_tasks.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 5 + 6 + 6
    raw = [r for r in rows if r["mode"] == "held_out"]
    shown = [r for r in rows if r["mode"] == "held_out_served"]
    assert [(r["path"], r["line"]) for r in shown] == [(r["path"], r["line"]) for r in raw]
    assert sum(r["exact"] for r in shown) == served["exact_matches"]

    done = run_codefill("eval", "infill", "--model", tiny, "--baseline", "ngram", "--no-humaneval", *common)
    base = json.loads((tmp_path / "infill_ngram.json").read_text())
    assert base["held_out_fim"]["tasks"] == 6 and "n-gram baseline" in base["evaluated"]
    # the baseline is scored on the same tasks as the model
    base_rows = [json.loads(line) for line in (tmp_path / "infill_ngram_tasks.jsonl").read_text().splitlines()]
    assert ([(r["path"], r["line"]) for r in base_rows if r["mode"] == "held_out"]
            == [(r["path"], r["line"]) for r in raw])


def test_eval_infill_on_a_recipes_held_out_files(tiny, source_dir, tmp_path):
    """--recipe: held-out FIM on exactly the files the recipe held out, with its exclusions applied."""
    from codefill.training.source_files import SourceConfig, iter_source_files
    from test_recipe import TINY_RECIPE

    split = SourceConfig(extensions=(".py",), held_out_fraction=0.3)
    held = [f.path for f in iter_source_files(source_dir, split) if f.held_out]
    assert len(held) >= 3
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE.format(source=source_dir).replace('exclude = ["skipme/*"]',
                                                                    f'exclude = ["{held[0]}"]'))
    done = run_codefill("eval", "infill", "--model", tiny, "--no-humaneval", "--recipe", recipe, "--fim-tasks", "8",
                        "--fim-max-new-tokens", "4", "--out", tmp_path)
    summary = json.loads((tmp_path / "infill.json").read_text())
    assert summary["held_out_fim"]["files"] == len(held) - 1, done.stdout
    rows = [json.loads(line) for line in (tmp_path / "infill_tasks.jsonl").read_text().splitlines()]
    assert rows and {r["path"] for r in rows} <= set(held[1:])
    done = run_codefill("eval", "infill", "--model", tiny, "--recipe", recipe, "--source", source_dir,
                        "--exclude", "x", "--out", tmp_path, check=False)
    assert done.returncode == 2 and "sets the held-out files; drop --source, --exclude" in done.stderr


def test_eval_infill_refuses_bad_input_clearly(tiny, tmp_path):
    done = run_codefill("eval", "infill", "--model", tiny, "--baseline", "ngram", "--out", tmp_path, check=False)
    assert done.returncode == 2 and "give one (--source)" in done.stderr
    done = run_codefill("eval", "infill", "--model", tiny, "--source", tmp_path / "nope", "--no-humaneval",
                     "--out", tmp_path, check=False)
    assert done.returncode == 2 and "is not a directory" in done.stderr
    done = run_codefill("eval", "infill", "--model", tiny, "--modes", "single,sideways", "--out", tmp_path, check=False)
    assert done.returncode == 2 and "sideways" in done.stderr


def test_eval_humaneval_command_on_a_tiny_model(tiny, tmp_path):
    done = run_codefill("eval", "humaneval", "--model", tiny, "--limit", "2", "--samples", "2", "--temperature", "0.8",
                     "--k", "1,2", "--max-new-tokens", "16", "--out", tmp_path)
    summary = json.loads((tmp_path / "humaneval.json").read_text())
    assert set(summary["pass_at_k"]) == {"pass@1", "pass@2"}
    assert all(0.0 <= v <= 1.0 for v in summary["pass_at_k"].values())
    assert summary["execution_check"]["canonical_passed"] == 8
    assert len((tmp_path / "humaneval_samples.jsonl").read_text().splitlines()) == 4
    assert "pass@1" in done.stdout
    done = run_codefill("eval", "humaneval", "--model", tiny, "--samples", "2", "--out", tmp_path, check=False)
    assert done.returncode == 2 and "temperature" in done.stderr


# --- through running workers (--endpoint): the same answers as in process -----------------------------------


@pytest.fixture(scope="module")
def tiny_worker(tiny):
    from codefill.inference_workers.startup import spawn_worker, stop_worker

    process, endpoint = spawn_worker(tiny, max_batch=2, timeout_s=300)
    yield endpoint
    stop_worker(process)


def test_eval_through_workers_gives_the_in_process_answers(tiny, tiny_worker, source_dir, tmp_path):
    common = ["--limit", "3", "--source", source_dir, "--held-out-fraction", "0.3", "--fim-tasks", "4",
              "--fim-max-new-tokens", "8"]
    run_codefill("eval", "infill", "--model", tiny, *common, "--out", tmp_path / "local")
    run_codefill("eval", "infill", "--model", tiny, *common, "--endpoint", tiny_worker, "--out", tmp_path / "served")
    local = (tmp_path / "local" / "infill_tasks.jsonl").read_text().splitlines()
    served = (tmp_path / "served" / "infill_tasks.jsonl").read_text().splitlines()
    assert len(local) == 3 * 5 + 4 + 4 and served == local
    assert "served at" in json.loads((tmp_path / "served" / "infill.json").read_text())["evaluated"]

    he = ["--limit", "2", "--max-new-tokens", "12"]
    run_codefill("eval", "humaneval", "--model", tiny, *he, "--out", tmp_path / "local")
    run_codefill("eval", "humaneval", "--model", tiny, *he, "--endpoint", tiny_worker, "--out", tmp_path / "served")

    def completions(d):
        return [json.loads(line)["completion"] for line in (d / "humaneval_samples.jsonl").read_text().splitlines()]

    assert completions(tmp_path / "served") == completions(tmp_path / "local")


def test_eval_refuses_a_baseline_through_workers(tiny, tiny_worker, source_dir, tmp_path):
    done = run_codefill("eval", "infill", "--model", tiny, "--baseline", "ngram", "--source", source_dir,
                     "--endpoint", tiny_worker, "--out", tmp_path, check=False)
    assert done.returncode == 2 and "either --baseline or --endpoint" in done.stderr


def test_single_line_answers_are_also_scored_cut_at_the_end_of_the_line(tok):
    problems = load_problems()[:3]
    rambling = tok.encode_infilling("    \n    return 1\n    return 2\n") + [tok.eot_id]
    results, rows = humaneval_infilling(lambda p, n, s, m: rambling, tok, InfillConfig(modes=("single",), limit=2),
                                        max_seq_len=2048, problems=problems, progress=False)
    assert [r.mode for r in results] == ["single", "single_eol", "single_served"]
    by_mode = {m: [r["prediction"] for r in rows if r["mode"] == m] for m in ("single", "single_eol")}
    assert by_mode["single"] == ["    \n    return 1\n    return 2\n"] * 2
    # the blank first line is kept, the cut comes after the first line with text on it
    assert by_mode["single_eol"] == ["    \n    return 1\n"] * 2
    assert end_of_line("  x = 1\n  y\n") == "  x = 1\n" and end_of_line("\n\n") == "\n\n"


def test_held_out_answers_are_also_scored_as_the_server_shows_them():
    def scored(prefix, middle, suffix, prediction):
        shown = as_served(FimResult(FimTask("f.py", 3, prefix, middle, suffix), prediction, False, 0.0, False))
        return shown.prediction, shown.exact

    prefix = "def f(xs):\n    total = 0\n"
    # the cursor stands at the start of a line of code: lines are inserted above it, the first one only when
    # the model did not say where its middle ends, up to that line of code when it wrote it
    assert scored(prefix, "    n = len(xs)\n", "    return total\n", "    n = len(xs)\n    n = 0\n    n = 1\n") == (
        "    n = len(xs)\n", True)
    two = "    n = len(xs)\n    m = 2\n"
    assert scored(prefix, two, "    return total\n", two + "    return total\n    x") == (two, True)
    # on a blank line the server shows a block: it stops where the answer leaves the block or repeats the suffix
    block = "    for x in xs:\n        total += x\n"
    assert scored(prefix, block, "\n    return total\n",
                  block + "    return total\n") == (block.rstrip("\n"), True)
    body = "for x in xs:\n        total += x\n"  # the cursor is indented on its blank line
    assert scored(prefix + "    ", body, "\n    return total\n", body + "def g():\n    pass\n") == (
        body.rstrip("\n"), True)
    # an answer that only repeats the rest of the line is no suggestion: scored as empty
    assert scored("x = (", "1)\n", ")\n", ")") == ("", False)


def test_evaluation_holds_back_eot_where_the_language_server_does(tok):
    from codefill.training.data_error import DataError
    from codefill.training.fim_eval import evaluate

    tasks = [FimTask("a.py", 1, "def f(x):\n", "    return x\n", "\nprint(f(1))\n"),   # blank cursor line
             FimTask("b.py", 1, "def f(x):\n    y", " = x\n", "    return y\n")]          # after code
    seen = []

    def complete(prompt, max_new, stops, min_new):
        seen.append(min_new)
        return [tok.eot_id]

    evaluate(tasks, tok, complete, FimEvalConfig())
    assert seen == [1, 0]  # lsp/settings.py's default blank_line_min_tokens
    seen.clear()
    evaluate(tasks, tok, complete, FimEvalConfig(blank_line_min_tokens=0))
    assert seen == [0, 0]
    with pytest.raises(DataError, match="blank_line_min_tokens must be a non-negative integer, got -1"):
        FimEvalConfig(blank_line_min_tokens=-1)
