"""`codefill recipe`: a small model trained from scratch as a recipe file says, resumable, refusing bad input."""

import json
import shutil
import sysconfig
from pathlib import Path

import pytest

from codefill.model.checkpoint import load_model_dir
from codefill.model.tokenizer import Tokenizer
from codefill.training.recipe import load_recipe, tokens_trained, train_elapsed_s
from codefill.training.train_error import TrainError
from helpers import run_codefill

ROOT = Path(__file__).resolve().parent.parent

TINY_RECIPE = """
name = "tiny-recipe"
[data]
source = "{source}"
extensions = [".py"]
exclude = ["skipme/*"]
held_out_fraction = 0.3
heldout_rows = 4
[tokenizer]
vocab_size = 600
max_chars = 200_000
[model]
dim = 32
n_layers = 1
n_heads = 2
n_kv_heads = 1
ffn_dim = 64
max_seq_len = 128
[fim]
fim_rate = 0.9
[train]
seq_length = 64
micro_batch = 2
grad_accum = 1
max_steps = 6
lr = 3e-3
end_lr = 3e-4
eval_every = 3
save_every = 3
save_dtype = "bfloat16"
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-src")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ["bisect.py", "heapq.py", "fnmatch.py", "shlex.py", "textwrap.py", "string.py", "colorsys.py",
                 "keyword.py", "glob.py", "stat.py", "copy.py", "abc.py"]:
        shutil.copy(stdlib / name, root / name)
    (root / "skipme").mkdir()
    (root / "skipme" / "big.py").write_text("x = 1\n" * 10)
    return root



def test_recipe_trains_a_model_and_continues_after_an_interruption(source, tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE.format(source=source))
    out = tmp_path / "run"
    done = run_codefill("recipe", recipe, "--output", out, "--no-progress")
    assert "wrote the trained model" in done.stdout

    files = load_model_dir(out / "model", dtype=None)
    assert files.config.dim == 32 and files.config.max_seq_len == 128
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    tok = Tokenizer(files.tokenizer_path)
    assert tok.has_infilling and tok.vocab_size == files.config.vocab_size == 600
    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [m["step"] for m in metrics if "held_out_loss" in m] == [3, 6]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["train_files"] + summary["held_out_files"] >= 10
    assert summary["tokens_trained"] == 6 * 2 * 64  # 6 steps of 2 rows of 64 positions
    held = json.loads((out / "data" / "train.heldout.json").read_text())["files"]
    assert sorted(held) == sorted(summary["held_out_paths"]) and held
    assert not any(p.startswith("skipme/") for p in held)

    # Run again: every step is complete, the same model comes out (training resumes at its end).
    before = (out / "model" / "model.safetensors").read_bytes()
    run_codefill("recipe", recipe, "--output", out, "--no-progress")
    assert (out / "model" / "model.safetensors").read_bytes() == before

    # The same recipe with other comments is the same recipe: accepted, nothing changes.
    recipe.write_text("# a comment added later\n" + recipe.read_text())
    run_codefill("recipe", recipe, "--output", out, "--no-progress")
    assert (out / "model" / "model.safetensors").read_bytes() == before

    # Another recipe into the same output is refused, and nothing is overwritten.
    other = tmp_path / "other.toml"
    other.write_text(TINY_RECIPE.format(source=source).replace("max_steps = 6", "max_steps = 7"))
    done = run_codefill("recipe", other, "--output", out, check=False)
    assert done.returncode == 2 and "different recipe" in done.stderr
    assert (out / "model" / "model.safetensors").read_bytes() == before


def test_tokens_trained_counts_every_step_between_logged_ones():
    # log_every 10, a resumed run that logged step 20 twice, and the last step (25) logged off the grid
    losses = [{"step": s, "tokens": 8192} for s in (10, 20, 20, 25)]
    assert tokens_trained(losses) == 25 * 8192
    assert tokens_trained([]) == 0


def test_train_elapsed_s_adds_the_segments_of_a_resumed_run():
    elapsed = [10.0, 20.0, 5.0, 15.0, 2.0]  # three calls: 20 s, 15 s, 2 s
    assert train_elapsed_s([{"elapsed_s": e} for e in elapsed]) == 37.0
    assert train_elapsed_s([]) == 0.0


def test_a_recipe_with_line_cuts_short_windows_and_packed_rows(source, tmp_path):
    from codefill.training.mindrecord_io import IGNORE_INDEX, read_rows
    recipe = tmp_path / "packed.toml"
    recipe.write_text(TINY_RECIPE.format(source=source)
                      .replace("fim_rate = 0.9", "fim_rate = 0.9\nline_rate = 0.5\nline_lines = 2\nwindow_tokens = 20\npack = true")
                      .replace("max_steps = 6", "max_steps = 2").replace("eval_every = 3", "eval_every = 2"))
    out = tmp_path / "run"
    run_codefill("recipe", recipe, "--output", out, "--no-progress")
    assert (out / "model" / "model.safetensors").exists()
    tok = Tokenizer(out / "tokenizer.model")
    for name in ("train", "heldout"):
        rows = list(read_rows(out / "data" / f"{name}.mindrecord"))
        per_row = [int((r["input_ids"][r["labels"] != IGNORE_INDEX] == tok.bos_id).sum()) for r in rows]
        assert min(per_row) >= 1 and sum(per_row) > 2 * len(rows), (name, per_row)


@pytest.mark.parametrize("change, message", [
    (("vocab_size = 600", "vocab_size = 600\ncolour = 1"), "unknown [tokenizer] keys ['colour']"),
    (("n_heads = 2", "n_heads = 3"), "dim 32 is not divisible by n_heads 3"),
    (("save_dtype = \"bfloat16\"", "save_dtype = \"int8\""), "save_dtype must be one of"),
    (("max_steps = 6", "max_steps = 6\nlora = true"), "lora must be absent or false"),
    (("max_steps = 6", "max_steps = 6\ndp = 2"), "one process (dp 1, tp 1)"),
    (("[fim]", "[fims]"), "unknown keys ['fims']"),
    (("fim_rate = 0.9", "fim_rate = 1.5"), "fim_rate must be a number in [0, 1], got 1.5"),
    (("fim_rate = 0.9", "fim_rate = 0.9\nline_lines = 3"), "line_lines 3 needs line_rate > 0"),
    (("fim_rate = 0.9", "fim_rate = 0.9\nwindow_tokens = 500"),
     "window_tokens 500 does not fit a row of 65 tokens (at most 57"),
    (("fim_rate = 0.9", "fim_rate = 0.9\npack = 1"), "pack must be true or false, got 1"),
    (("lr = 3e-3", "lr = -1"), "need lr > 0"),
])
def test_bad_recipes_are_refused_with_the_offending_value(tmp_path, change, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(TINY_RECIPE.format(source=tmp_path).replace(*change))
    with pytest.raises(TrainError) as e:
        load_recipe(recipe)
    assert message in str(e.value) and str(recipe) in str(e.value)


def test_a_missing_source_is_refused_before_anything_is_written(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE.format(source=tmp_path / "nowhere"))
    done = run_codefill("recipe", recipe, "--output", tmp_path / "out", check=False)
    assert done.returncode == 2 and "is not a directory" in done.stderr
    assert not (tmp_path / "out" / "tokenizer.model").exists()


def test_the_bundled_recipe_parses_and_matches_the_bundled_model():
    recipe = load_recipe(ROOT / "recipes" / "codefill-pypi-cpu.toml")
    assert recipe.corpus is not None and recipe.fim.fim_rate == 0.9 and recipe.train.lora is None
    bundled = ROOT / "models" / "codefill-pypi-5m"
    assert load_recipe(bundled / "recipe.toml") == recipe  # the copy beside the model is the recipe
    if not (bundled / "config.json").exists():
        pytest.skip("the bundled model is not in this checkout")
    files = load_model_dir(bundled, dtype=None)
    arch = files.config.to_dict()
    assert {k: arch[k] for k in recipe.arch} == recipe.arch
    assert arch["vocab_size"] == recipe.vocab_size == Tokenizer(files.tokenizer_path).vocab_size


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_every_committed_recipe_parses(path):
    recipe = load_recipe(path)
    assert (recipe.source == "stdlib" or recipe.corpus is not None) and recipe.train.max_steps > 0
