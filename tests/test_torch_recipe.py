"""`codefill recipe --trainer torch` on a corpus, and scripts/gpu_train.sh, on the CPU at toy size: prepared here,
stopped by its time budget with a checkpoint, resumed to the end, its Hugging Face output loaded by codefill; and
the same script on a machine without SentencePiece (the rows carried)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from codefill.model.checkpoint import load_model_dir, read_model_config
from codefill.model.safetensors_io import to_float32
from codefill.training.corpus_shards import Doc, write_shards
from codefill.training.recipe import export_checkpoint, run_recipe
from codefill.training.train_error import TrainError
from helpers import FIXED_CORPUS, run_codefill

pytest.importorskip("torch")
from codefill.training.torch_trainer import read_parts  # noqa: E402  (needs torch)
ROOT = Path(__file__).resolve().parent.parent

RECIPE = """
name = "tiny-corpus-recipe"
[data]
corpus = "{corpus}"
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
window_tokens = 48
pack = true
[train]
seq_length = 64
micro_batch = 2
grad_accum = 2
max_steps = 4
lr = 3e-3
end_lr = 3e-4
eval_every = 2
save_every = 2
save_dtype = "bfloat16"
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    chunks = [c for c in FIXED_CORPUS.split("\n\n\n") if c.strip()]
    write_shards([Doc("pkg", f"m{i}.py", c) for i, c in enumerate(chunks * 4)], out, "train")
    write_shards([Doc("held", f"h{i}.py", c) for i, c in enumerate(chunks[:2])], out, "heldout")
    (out / "corpus.json").write_text(json.dumps({"format": "codefill-corpus", "version": 1}))
    return out


@pytest.fixture
def recipe(tmp_path, corpus):
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE.format(corpus=corpus))
    return path


def gpu_train(recipe, run, corpus, budget, out, env_extra=None):
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **(env_extra or {})}
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_train.sh"), str(recipe), str(run), str(corpus),
                           str(budget)], capture_output=True, text=True, env=env, timeout=600)


def test_prepare_then_the_gpu_script_stops_on_its_budget_and_resumes(recipe, corpus, tmp_path):
    run = tmp_path / "run"
    run_codefill("recipe", recipe, "--output", run, "--trainer", "torch", "--prepare")
    assert (run / "tokenizer.model").exists() and (run / "init" / "config.json").exists()
    assert sorted(p.name for p in (run / "data").iterdir()) == ["heldout-rows-00000.npz.xz", "train-rows-00000.npz.xz"]
    assert not (run / "run").exists()
    with pytest.raises(TrainError, match="holds no checkpoint of a torch run"):
        export_checkpoint(run, tmp_path / "nothing")

    first = gpu_train(recipe, run, corpus, 0, tmp_path / "out1")   # no time: one step, then a checkpoint
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stopped at step-00000001 (budget)" in first.stdout
    assert (tmp_path / "out1" / "checkpoint" / "COMPLETE").exists()
    state = json.loads((tmp_path / "out1" / "checkpoint" / "state.json").read_text())
    assert state["weights_dtype"] == "bfloat16"

    # The run in progress, as a MODEL_DIR to evaluate: the checkpoint's weights upcast, init's architecture.
    run_codefill("recipe", recipe, "--output", run, "--trainer", "torch", "--export-checkpoint", tmp_path / "snap")
    snap, init = load_model_dir(tmp_path / "snap"), load_model_dir(run / "init")
    assert snap.config == init.config and "tiny-corpus-recipe at step 1" in read_model_config(tmp_path / "snap")[2]
    stored = read_parts(tmp_path / "out1" / "checkpoint", state["parts"])
    assert sorted(stored) == sorted(snap.weights)
    for name, w in stored.items():
        np.testing.assert_array_equal(snap.weights[name], to_float32(w))
    assert any(not np.array_equal(snap.weights[n], init.weights[n]) for n in stored)   # it trained a step

    second = gpu_train(recipe, run, corpus, 600, tmp_path / "out2")
    assert second.returncode == 0 and "finished" in second.stdout, second.stdout + second.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "out2" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]
    assert all(p.stat().st_size < 16 << 20 for p in (tmp_path / "out2" / "hf").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainer"] == "torch" and summary["held_out_files"] == 2
    model = load_model_dir(run / "model", dtype=None)   # the recipe converted its HF output
    assert model.stored_dtype == "bfloat16"   # the recipe's save_dtype
    run_codefill("convert", "--from-hf", tmp_path / "out2" / "hf", "--output", tmp_path / "converted")
    assert load_model_dir(tmp_path / "converted").config == model.config


def test_gpu_script_without_sentencepiece_trains_from_carried_rows(recipe, corpus, tmp_path):
    run = tmp_path / "run"
    run_recipe(recipe, run, trainer="torch", prepare=True, progress=False)
    blocker = tmp_path / "no-sentencepiece"
    blocker.mkdir()
    (blocker / "sentencepiece.py").write_text("raise ImportError('not on this machine')\n")
    done = gpu_train(recipe, run, corpus, 600, tmp_path / "out", {"PYTHONPATH": str(blocker), "TORCH_COMPILE": "1"})
    assert done.returncode == 0 and "no sentencepiece" in done.stdout, done.stdout + done.stderr
    assert "float32, torch.compile" in done.stdout   # TORCH_COMPILE reached the trainer (on a CPU: float32)
    assert (tmp_path / "out" / "hf" / "config.json").exists() and not (run / "model").exists()
    run_codefill("convert", "--from-hf", tmp_path / "out" / "hf", "--output", tmp_path / "converted")


def test_corpus_recipes_refuse_bad_combinations(recipe, corpus, tmp_path):
    with pytest.raises(TrainError, match="has no corpus.json"):
        run_recipe(recipe, tmp_path / "o", trainer="torch", corpus=tmp_path, prepare=True)
    with pytest.raises(TrainError, match="trainer must be one of"):
        run_recipe(recipe, tmp_path / "o", trainer="jax")
    with pytest.raises(TrainError, match=r"time budget \(60\).* add --trainer torch"):
        run_recipe(recipe, tmp_path / "o", time_budget_s=60)
    both = tmp_path / "both.toml"
    both.write_text(recipe.read_text().replace("[data]\n", '[data]\nsource = "stdlib"\n'))
    from codefill.training.recipe import load_recipe

    with pytest.raises(TrainError, match="sets both source 'stdlib' and corpus"):
        load_recipe(both)


def test_the_mindspore_path_reads_a_corpus_too(recipe, tmp_path):
    run_recipe(recipe, tmp_path / "ms", prepare=True, progress=False)
    assert (tmp_path / "ms" / "data" / "train.mindrecord").exists()
    assert (tmp_path / "ms" / "data" / "heldout.mindrecord").exists()


def test_eval_infill_reads_the_held_out_packages_of_a_corpus_recipe(recipe, corpus):
    from codefill.evaluation.eval_error import EvalError
    from codefill.evaluation.infilling import HeldOutConfig, build_baseline, heldout_tasks
    from codefill.training.fim_eval import FimEvalConfig
    from codefill.training.recipe import load_recipe

    held = HeldOutConfig.of_recipe(load_recipe(recipe), FimEvalConfig(max_tasks=6))
    tasks, paths = heldout_tasks(held.root(), held.files, held.fim, held.every_file)
    assert paths == ["held/h0.py", "held/h1.py"] and 0 < len(tasks) <= 6
    assert {t.path for t in tasks} <= set(paths)
    assert (corpus / "heldout-files" / "held" / "h0.py").is_file()
    with pytest.raises(EvalError, match="held-out files only"):
        build_baseline(None, held)
