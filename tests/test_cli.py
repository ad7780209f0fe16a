"""The `codefill` command as a user types it: real subprocesses, JSON on the last line, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from codefill.model.fim import infilling_prompt_tokens
from codefill.model.tokenizer import Tokenizer
from helpers import make_tiny_model_dir

CODEFILL = [sys.executable, "-m", "codefill.cli"]


def codefill(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CODEFILL, *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory, preset="tiny-gqa")


@pytest.fixture(scope="module")
def generator(model_dir):
    from codefill.inference_workers.runner import Runner

    return Runner.from_model_dir(model_dir, max_seq_len=256, max_batch=1)


def greedy(generator, prompt, n, stop):
    from codefill.model.sampling import SamplingConfig

    return [t for t, _ in generator.generate(prompt, n, SamplingConfig(), stop_ids=frozenset(stop))]


def test_generate_prompt_ids_json_matches_in_process_greedy(model_dir, generator):
    tok = Tokenizer(model_dir / "tokenizer.model")
    prompt = [tok.bos_id] + tok.encode("def add(a, b):\n    return")
    out = last_json(codefill("generate", "--model", str(model_dir), "--prompt-ids", ",".join(map(str, prompt)),
                             "--max-new-tokens", "12", "--temperature", "0", "--json"))
    expected = greedy(generator, prompt, 12, {tok.eos_id})
    assert out["ids"] == expected
    assert out["text"] == tok.decode([t for t in expected if t != tok.eos_id])


def test_generate_text_prompt_is_encoded_with_bos(model_dir, generator):
    tok = Tokenizer(model_dir / "tokenizer.model")
    out = last_json(codefill("generate", "--model", str(model_dir), "--prompt", "import os\n",
                             "--max-new-tokens", "8", "--json"))
    assert out["ids"] == greedy(generator, tok.encode("import os\n", bos=True), 8, {tok.eos_id})


@pytest.mark.parametrize("spm", [False, True])
def test_infill_json_is_the_middle_up_to_eot(model_dir, generator, spm):
    tok = Tokenizer(model_dir / "tokenizer.model")
    prefix, suffix = "def area(r):\n    return ", "\n\nprint(area(2))\n"
    args = ["infill", "--model", str(model_dir), "--prefix", prefix, "--suffix", suffix, "--max-new-tokens", "16",
            "--json"] + (["--spm"] if spm else [])
    out = last_json(codefill(*args))
    expected = greedy(generator, infilling_prompt_tokens(tok, prefix, suffix, spm=spm), 16, {tok.eot_id, tok.eos_id})
    assert out["ids"] == expected
    middle = [t for t in expected if t not in (tok.eot_id, tok.eos_id)]
    assert out["text"] == tok.decode_infilling(middle)


@pytest.mark.parametrize("args,needle", [
    (["--prompt-ids", "1,x,3"], "comma-separated integers"),
    (["--prompt-ids", "1,99999"], "outside the vocabulary"),
    (["--prompt", "x", "--max-new-tokens", "0"], "must be positive"),
])
def test_bad_generate_arguments_are_one_clear_error(model_dir, args, needle):
    if "--max-new-tokens" not in args:
        args = args + ["--max-new-tokens", "4"]
    proc = codefill("generate", "--model", str(model_dir), *args, ok=False)
    assert proc.returncode == 2
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_missing_model_dir_is_a_clear_error(tmp_path):
    proc = codefill("generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--max-new-tokens", "2", ok=False)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_convert_round_trip_through_the_cli(model_dir, tmp_path):
    codefill("convert", "--to-hf", str(model_dir), "--output", str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").exists()
    codefill("convert", "--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "back"))
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    proc = codefill("convert", "--from-hf", str(model_dir), "--output", str(tmp_path / "bad"), ok=False)
    assert proc.returncode == 2 and not (tmp_path / "bad").exists()


def test_help_does_not_import_mindspore():
    code = "import sys; from codefill.cli import build_parser; build_parser(); print('mindspore' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--request-timeout", "--worker-max-seq-len"])
def test_serve_refuses_non_positive_settings_naming_the_flag(model_dir, flag):
    proc = codefill("serve", "--stdio", "--model", str(model_dir), flag, "0", ok=False)
    assert proc.returncode == 2 and f"{flag} must be positive, got 0" in proc.stderr


def test_serve_without_model_takes_the_bundled_one_or_says_why(monkeypatch, tmp_path, capsys):
    """No --model: the bundled model (tests/test_bundled_model.py serves it); where an install lacks it, the
    error says so and what to give instead."""
    import codefill.bundled
    from codefill.cli import main

    monkeypatch.setattr(codefill.bundled, "bundled_model_dir", lambda: tmp_path / "missing")
    assert main(["serve", "--stdio"]) == 2
    err = capsys.readouterr().err
    assert "give --model MODEL_DIR" in err and str(tmp_path / "missing") in err


@pytest.fixture(scope="module")
def bundled_generator():
    from codefill.bundled import bundled_model_dir
    from codefill.inference_workers.runner import Runner

    return Runner.from_model_dir(bundled_model_dir(), max_seq_len=256, max_batch=1)


def test_generate_without_model_runs_the_bundled_one(bundled_generator):
    from codefill.bundled import bundled_model_dir

    tok = Tokenizer(bundled_model_dir() / "tokenizer.model")
    out = last_json(codefill("generate", "--prompt", "import os\n", "--max-new-tokens", "2", "--json"))
    assert out["ids"] == greedy(bundled_generator, tok.encode("import os\n", bos=True), 2, {tok.eos_id})
    assert out["text"] == tok.decode([t for t in out["ids"] if t != tok.eos_id])


def test_infill_without_model_runs_the_bundled_one(bundled_generator):
    from codefill.bundled import bundled_model_dir

    tok = Tokenizer(bundled_model_dir() / "tokenizer.model")
    prefix, suffix = "def area(r):\n    return ", "\n"
    out = last_json(codefill("infill", "--prefix", prefix, "--suffix", suffix, "--max-new-tokens", "2", "--json"))
    prompt = infilling_prompt_tokens(tok, prefix, suffix)
    assert out["ids"] == greedy(bundled_generator, prompt, 2, {tok.eot_id, tok.eos_id})


@pytest.mark.parametrize("module,argv", [
    ("humaneval", ["eval", "humaneval", "--limit", "1"]),
    ("infilling", ["eval", "infill", "--limit", "1", "--no-humaneval"]),
])
def test_eval_without_model_evaluates_the_bundled_one(monkeypatch, tmp_path, capsys, module, argv):
    """The evaluation itself is replaced (it takes minutes): what it is given is the bundled MODEL_DIR."""
    import importlib

    from codefill.bundled import bundled_model_dir
    from codefill.cli import main

    evaluation = importlib.import_module(f"codefill.evaluation.{module}")
    given = []
    monkeypatch.setattr(evaluation, "run", lambda model_dir, *args, **kwargs: given.append(model_dir) or {})
    monkeypatch.setattr(evaluation, "report", lambda summary: "report")
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert given == [bundled_model_dir()] and (given[0] / "config.json").exists()
    assert capsys.readouterr().out == "report\n"


@pytest.mark.parametrize("argv", [["generate", "--prompt", "x", "--max-new-tokens", "2"],
                                  ["infill", "--prefix", "a", "--suffix", "b", "--max-new-tokens", "2"],
                                  ["eval", "humaneval"], ["eval", "infill"]])
def test_without_model_and_without_the_bundled_one_says_to_give_model(monkeypatch, tmp_path, capsys, argv):
    import codefill.bundled
    from codefill.cli import main

    monkeypatch.setattr(codefill.bundled, "bundled_model_dir", lambda: tmp_path / "missing")
    assert main([*argv, *(["--out", str(tmp_path / "out")] if argv[0] == "eval" else [])]) == 2
    err = capsys.readouterr().err
    assert "give --model MODEL_DIR" in err and str(tmp_path / "missing") in err


def test_data_alpaca_then_tokenize_instruct(model_dir, tmp_path):
    records = [{"instruction": "Add two numbers.", "input": "", "output": "def add(a, b):\n    return a + b"},
               {"instruction": "Reverse a list.", "input": "[1, 2]", "output": "xs[::-1]"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(records))
    proc = codefill("data", "alpaca", "--input", str(tmp_path / "alpaca.json"), "--output", str(tmp_path / "c.json"))
    assert "2 conversations written" in proc.stdout
    conv = json.loads((tmp_path / "c.json").read_text())
    assert conv[0]["conversations"][0]["value"].endswith("### Instruction:\nAdd two numbers.\n\n### Response:")
    proc = codefill("data", "tokenize", "--mode", "instruct", "--model", str(model_dir), "--input",
                    str(tmp_path / "c.json"), "--output", str(tmp_path / "rows.mindrecord"), "--seq-length", "384")
    assert "2 rows of 385 tokens" in proc.stdout and (tmp_path / "rows.mindrecord").exists()


def test_data_errors_name_the_record_and_keep_existing_output(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "x", "input": "", "output": 3}]))
    (tmp_path / "c.json").write_text("keep me")
    proc = codefill("data", "alpaca", "--input", str(tmp_path / "bad.json"), "--output", str(tmp_path / "c.json"),
                    "--overwrite", ok=False)
    assert proc.returncode == 2 and "record 0: 'output' is int" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "c.json").read_text() == "keep me"


def test_generate_and_infill_through_tensor_parallel_workers(model_dir, generator, tmp_path):
    """--tp 2 runs two real msrun ranks; greedy ids equal the in-process path. Then the same from a pre-split dir."""
    tok = Tokenizer(model_dir / "tokenizer.model")
    prompt = [tok.bos_id] + tok.encode("for i in range(10):\n")
    args = ["--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "10", "--json"]
    out = last_json(codefill("generate", "--model", str(model_dir), "--tp", "2", *args))
    assert out["ids"] == greedy(generator, prompt, 10, {tok.eos_id})

    codefill("split", "--model", str(model_dir), "--tp", "2", "--output", str(tmp_path / "tp2"))
    prefix, suffix = "def area(r):\n    return ", "\n"
    out = last_json(codefill("infill", "--model", str(tmp_path / "tp2"), "--tp", "2", "--prefix", prefix,
                             "--suffix", suffix, "--max-new-tokens", "8", "--json"))
    expected = greedy(generator, infilling_prompt_tokens(tok, prefix, suffix), 8, {tok.eot_id, tok.eos_id})
    assert out["ids"] == expected


@pytest.mark.parametrize("command", [["generate", "--prompt", "x", "--max-new-tokens", "2"],
                                     ["workers"]])
def test_a_tp_size_that_does_not_divide_is_refused_before_any_rank_starts(model_dir, command):
    proc = codefill(command[0], "--model", str(model_dir), "--tp", "3", *command[1:], ok=False)
    assert proc.returncode == 2 and "3" in proc.stderr and "Traceback" not in proc.stderr
    assert "n_heads" in proc.stderr or "heads" in proc.stderr
