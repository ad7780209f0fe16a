"""Tensor-parallel training on real msrun ranks: `codefill train --tp 2` gives the losses, gradient norms and
weights of one process (with clipping active, so the global norm is checked too), resume is exact and a TP
checkpoint resumes on one process, and what is not supported is refused before any rank starts."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from codefill.model.checkpoint import load_model_dir
from codefill.training import tokenize_data
from codefill.training.launch_train import train_on_ranks
from codefill.training.run_checkpoint import latest_checkpoint, load_checkpoint
from codefill.training.train_config import PRESETS, LoraConfig
from codefill.training.train_error import TrainError
from codefill.training.trainer import train
from helpers import FIXED_CORPUS, make_tiny_model_dir

SEQ = 32
CLIP = 0.5  # below the tiny model's early gradient norms: clipping runs, so the global norm must be right


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory, "tiny-gqa")  # 8 query heads on 2 KV heads: GQA per rank


@pytest.fixture(scope="module")
def data(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-tp-data")
    (root / "docs.txt").write_text(FIXED_CORPUS * 3)
    tokenize_data.tokenize_pretrain(tiny_dir, root / "docs.txt", root / "rows.mindrecord", SEQ)
    return root / "rows.mindrecord"


def cfg(**kw):
    base = replace(PRESETS["tiny-test"], seq_length=SEQ, max_steps=4, micro_batch=2, grad_accum=2, clip_norm=CLIP,
                   weight_decay=0.1, eval_every=2, save_every=2)
    return replace(base, **kw)


@pytest.fixture(scope="module")
def tp2_run(tiny_dir, data, tmp_path_factory):
    """`codefill train --tp 2 --preset tiny-test` with cfg()'s settings: two msrun ranks, full finetune."""
    from codefill.cli import main

    out = tmp_path_factory.mktemp("tp2") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["train", "--model", str(tiny_dir), "--data", str(data), "--output", str(out), "--tp", "2",
                     "--preset", "tiny-test", "--max-steps", "4", "--micro-batch", "2", "--grad-accum", "2",
                     "--clip-norm", str(CLIP), "--weight-decay", "0.1", "--eval-every", "2", "--save-every", "2"])
    assert code == 0 and "trained 4 steps on 2 tensor-parallel ranks" in printed.getvalue(), printed.getvalue()
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert state["config"] == cfg(tp=2).to_dict()  # the CLI ran exactly the config the other tests use
    return out, json.loads((out / "rank0_losses.json").read_text())


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_tensor_parallel_ranks_match_one_process(tiny_dir, data, tp2_run, tmp_path):
    out, losses_tp2 = tp2_run
    one = train(tiny_dir, data, tmp_path / "tp1", cfg(), progress=False)
    np.testing.assert_allclose(losses_tp2, one.losses, rtol=2e-4)
    norms = [r["grad_norm"] for r in records(out) if "grad_norm" in r]
    norms_1 = [r["grad_norm"] for r in records(tmp_path / "tp1") if "grad_norm" in r]
    np.testing.assert_allclose(norms, norms_1, rtol=2e-4)  # the global norm: shards summed, replicas once
    assert max(norms) > CLIP, norms  # clipping was active
    held = [r["held_out_loss"] for r in records(out) if "held_out_loss" in r]
    np.testing.assert_allclose(held, [v for _, v in one.held_out], rtol=2e-4)
    # OUT/model and the checkpoints hold full tensors, as a one-process run writes them
    a, b = load_model_dir(out / "model").weights, load_model_dir(one.model_dir).weights
    assert set(a) == set(b)
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-3, atol=2e-5, err_msg=n)
    base = load_model_dir(tiny_dir).weights
    assert all(not np.array_equal(a[n], base[n]) for n in ("output.weight", "layers.0.attention.wo.weight"))
    t2, o2, _ = load_checkpoint(latest_checkpoint(out))
    t1, o1, _ = load_checkpoint(latest_checkpoint(tmp_path / "tp1"))
    assert set(o2) == set(o1) and all(o2[n].shape == o1[n].shape for n in o1)
    for n in ("adam_v.output.weight", "adam_m.layers.1.feed_forward.w2.weight", "adam_m.norm.weight"):
        np.testing.assert_allclose(o2[n], o1[n], rtol=1e-3, atol=1e-7, err_msg=n)


def test_tensor_parallel_resume_is_exact_and_resumes_on_one_process(tiny_dir, data, tp2_run, tmp_path):
    out, whole = tp2_run
    first = train_on_ranks(tiny_dir, data, tmp_path / "cut", cfg(tp=2), stop_after=2, timeout_s=400)
    assert latest_checkpoint(tmp_path / "cut").name == "step-00000002"
    shutil.copytree(tmp_path / "cut", tmp_path / "cut-tp1")
    rest = train_on_ranks(tiny_dir, data, tmp_path / "cut", cfg(tp=2), resume=True, timeout_s=400)
    assert first + rest == whole
    a, b = load_model_dir(out / "model").weights, load_model_dir(tmp_path / "cut" / "model").weights
    assert all(np.array_equal(a[n], b[n]) for n in a)
    # the checkpoint holds full tensors, so one process continues the same run (up to reduction order)
    on_one = train(tiny_dir, data, tmp_path / "cut-tp1", cfg(), resume=True, progress=False)
    np.testing.assert_allclose(first + on_one.losses, whole, rtol=2e-4)


def test_a_tp_size_that_does_not_divide_the_model_is_refused_before_any_rank_starts(tiny_dir, data, tmp_path):
    with pytest.raises(TrainError, match=r"--tp 3: tensor-parallel size 3 does not divide n_heads 8, n_kv_heads 2"):
        train_on_ranks(tiny_dir, data, tmp_path / "tp3", cfg(tp=3), timeout_s=30)
    assert not (tmp_path / "tp3").exists()


@pytest.mark.parametrize("kw, message", [
    ({"dp": 2}, r"--tp 2 with --dp 2 is not supported"),
    ({"lora": LoraConfig(rank=4)}, r"--tp 2 trains the full model only; LoRA \(rank 4"),
])
def test_unsupported_combinations_are_refused_before_any_rank_starts(tiny_dir, data, tmp_path, kw, message):
    with pytest.raises(TrainError, match=message):
        train_on_ranks(tiny_dir, data, tmp_path / "run", cfg(tp=2, **kw), timeout_s=30)
    with pytest.raises(TrainError, match=message):  # and by the trainer itself, whoever calls it
        train(tiny_dir, data, tmp_path / "run", cfg(tp=2, **kw), world=2 * kw.get("dp", 1), progress=False)
    assert not (tmp_path / "run").exists()



def test_a_repository_refresh_refuses_lora_with_tp_before_tokenizing(tiny_dir, tmp_path):
    from codefill.training.refresh import data_path, refresh

    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "a.py").write_text(FIXED_CORPUS)
    with pytest.raises(TrainError, match=r"--tp 2 trains the full model only"):
        refresh(tiny_dir, tmp_path / "repo", tmp_path / "out", replace(PRESETS["refresh"], tp=2), log=lambda s: None)
    assert not data_path(tmp_path / "out").parent.exists()
