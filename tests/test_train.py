"""Finetuning on the tiny model in graph mode: the loss falls, the training forward is the serving forward,
resume is exact, LoRA equals its merge, incomplete checkpoints are refused, split then merge is the identity,
and two data-parallel msrun ranks match one rank on the same global batch."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from codefill.training import tokenize_data
from codefill.training.run_checkpoint import COMPLETE, complete_checkpoints, latest_checkpoint, load_checkpoint
from codefill.training.train_config import PRESETS, LoraConfig, TrainConfig, cosine_lr
from codefill.training.train_error import TrainError
from codefill.training.trainer import train
from helpers import FIXED_CORPUS, assert_drawn, make_tiny_model_dir, read_png

SEQ = 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def data(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    (root / "docs.txt").write_text(FIXED_CORPUS * 3)
    tokenize_data.tokenize_pretrain(tiny_dir, root / "docs.txt", root / "rows.mindrecord", SEQ)
    return root / "rows.mindrecord"


def cfg(**kw) -> TrainConfig:
    return replace(PRESETS["tiny-test"], seq_length=SEQ, **kw)


def test_cosine_schedule_warms_up_then_decays_to_end_lr():
    c = TrainConfig(max_steps=100, warmup_ratio=0.1, lr=1.0, end_lr=0.1)
    lrs = [cosine_lr(c, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert cosine_lr(c, 100) == pytest.approx(0.1)


def test_full_finetune_loss_decreases_and_writes_outputs(tiny_dir, data, tmp_path):
    result = train(tiny_dir, data, tmp_path / "run", cfg(max_steps=12, eval_every=6), progress=False)
    assert result.losses[-1] < result.losses[0] - 0.5, result.losses
    assert result.held_out[-1][1] < result.held_out[0][1] + 1e-6
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert_drawn(read_png(tmp_path / "run" / "loss.png"))  # the loss curve: a real chart
    # the output is a MODEL_DIR the serving path loads, with the trained weights
    from codefill.model.checkpoint import load_model_dir

    trained = load_model_dir(result.model_dir).weights
    base = load_model_dir(tiny_dir).weights
    assert any(not np.array_equal(trained[n], base[n]) for n in base)
    assert len(complete_checkpoints(tmp_path / "run")) == PRESETS["tiny-test"].keep_last


def all_position_logits(model, tokens: np.ndarray) -> np.ndarray:
    """The one model's all-position forward (no cache), as the training loss runs it: [B, T, V]."""
    from mindspore import Tensor

    positions = np.tile(np.arange(tokens.shape[1], dtype=np.int32), (tokens.shape[0], 1))
    return model(Tensor(tokens.astype(np.int32)), Tensor(positions)).asnumpy()


def test_training_forward_equals_serving_forward(tiny_dir):
    """All-position logits of the model's training forward equal the Runner's prefill at every length, and
    the loss Cell is the cross-entropy of exactly those logits."""
    import mindspore as ms
    from mindspore import Tensor

    from codefill.inference_workers.runner import Runner
    from codefill.model.checkpoint import load_model_dir
    from codefill.model.llama import Transformer, load_weights
    from codefill.training.train_network import LanguageModelLoss

    files = load_model_dir(tiny_dir)
    model = Transformer(files.config, max_batch=1, max_seq_len=SEQ)
    load_weights(model, files.weights)
    prompt = [1, 17, 42, 99, 230, 7, 311, 64, 5, 9, 120, 33]
    logits = all_position_logits(model, np.array([prompt]))
    gen = Runner.from_model_dir(tiny_dir, max_seq_len=64, max_batch=1)
    for k in (1, 4, len(prompt)):
        ref = gen.prefill(prompt[:k], slot=0, start_pos=0)
        np.testing.assert_allclose(logits[0, k - 1], np.asarray(ref).reshape(-1), rtol=1e-4, atol=1e-4)
    labels = np.array([prompt[1:] + [-100]], np.int32)
    loss = float(LanguageModelLoss(model)(Tensor(np.array([prompt], np.int32)), Tensor(labels),
                                          Tensor(0.0, ms.float32)).asnumpy())
    shifted = logits[0] - logits[0].max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -sum(logp[i, t] for i, t in enumerate(prompt[1:]))
    assert loss == pytest.approx(expected, rel=1e-4)


def test_resume_gives_the_losses_of_an_uninterrupted_run(tiny_dir, data, tmp_path):
    c = cfg(max_steps=6, save_every=3, lora=LoraConfig(rank=4, dropout=0.1, targets=("wq", "wv", "w2")))
    whole = train(tiny_dir, data, tmp_path / "whole", c, progress=False)
    first = train(tiny_dir, data, tmp_path / "cut", c, progress=False, stop_after=4)
    assert first.model_dir is None and latest_checkpoint(tmp_path / "cut").name == "step-00000004"
    shutil.rmtree(latest_checkpoint(tmp_path / "cut"))  # as if killed after step 4's save began: resume from 3
    rest = train(tiny_dir, data, tmp_path / "cut", c, progress=False, resume=True)
    assert first.losses[:3] + rest.losses == whole.losses
    from codefill.model.checkpoint import load_model_dir

    a, b = load_model_dir(whole.model_dir).weights, load_model_dir(rest.model_dir).weights
    assert all(np.array_equal(a[n], b[n]) for n in a)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert lines == (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines() or \
        [json.loads(x)["step"] for x in lines] == [json.loads(x)["step"] for x in
                                                   (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]


def test_lora_outputs_equal_the_merged_model(tiny_dir):
    from codefill.model.checkpoint import load_model_dir
    from codefill.model.llama import Transformer, load_weights, weight_parameters
    from codefill.model.weights import expected_shapes
    from codefill.training.lora import apply_lora, init_adapters, merge_adapters

    files = load_model_dir(tiny_dir)
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.2, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    adapters = init_adapters(expected_shapes(files.config), files.config.n_layers, lora, seed=1)
    rng = np.random.default_rng(2)
    adapters = {n: (rng.normal(0, 0.05, a.shape).astype(np.float32) if n.endswith("lora_b") else a)
                for n, a in adapters.items()}  # trained-looking B (an untrained B is zero)
    tokens = np.array([[1, 5, 9, 33, 120, 7, 64, 300]])

    plain_model = Transformer(files.config, max_batch=1, max_seq_len=SEQ)
    load_weights(plain_model, files.weights)
    plain = all_position_logits(plain_model, tokens)
    model = Transformer(files.config, max_batch=1, max_seq_len=SEQ)  # transforms come before the first compile
    load_weights(model, files.weights)
    trained, seed = apply_lora(model, lora, adapters)  # the seed Parameter stays 0: evaluation, no dropout
    assert sorted(trained) == sorted(adapters)
    assert sorted(weight_parameters(model)) == sorted(expected_shapes(files.config))  # names kept
    with_lora = all_position_logits(model, tokens)
    merged_model = Transformer(files.config, max_batch=1, max_seq_len=SEQ)
    load_weights(merged_model, merge_adapters(files.weights, adapters, files.config.n_layers, lora))
    merged = all_position_logits(merged_model, tokens)
    assert np.abs(with_lora - plain).max() > 1e-3  # the adapters matter
    np.testing.assert_allclose(with_lora, merged, rtol=1e-4, atol=1e-5)


def test_incomplete_or_corrupt_checkpoints_are_refused(tiny_dir, data, tmp_path):
    c = cfg(max_steps=2, save_every=1, keep_last=3)
    train(tiny_dir, data, tmp_path / "run", c, progress=False)
    step1, step2 = complete_checkpoints(tmp_path / "run")
    (step2 / COMPLETE).unlink()  # interrupted while saving
    with pytest.raises(TrainError, match="incomplete"):
        load_checkpoint(step2)
    assert latest_checkpoint(tmp_path / "run") == step1
    with open(step1 / "trained.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(TrainError, match="step-00000001"):
        load_checkpoint(step1)
    with pytest.raises(TrainError, match="not empty"):
        train(tiny_dir, data, tmp_path / "run", c, progress=False)


def test_split_then_merge_is_the_identity(tmp_path_factory, tmp_path):
    from codefill.inference_workers.sharding import TensorParallelError, merge_split_dir, split_model_dir

    gqa = make_tiny_model_dir(tmp_path_factory, "tiny-gqa")
    split = split_model_dir(gqa, 2, tmp_path / "tp2")
    merged = merge_split_dir(split, tmp_path / "merged")
    assert (merged / "model.safetensors").read_bytes() == (gqa / "model.safetensors").read_bytes()
    with pytest.raises(TensorParallelError, match="not a tensor-parallel split"):
        merge_split_dir(gqa, tmp_path / "again")


def test_two_data_parallel_ranks_match_one_rank(tiny_dir, data, tmp_path):
    from codefill.training.launch_train import train_on_ranks

    two = cfg(max_steps=3, micro_batch=2, grad_accum=1, dp=2)
    losses_dp2 = train_on_ranks(tiny_dir, data, tmp_path / "dp2", two, timeout_s=300)
    one = train(tiny_dir, data, tmp_path / "dp1", replace(two, grad_accum=2, dp=1), progress=False)
    np.testing.assert_allclose(losses_dp2, one.losses, rtol=1e-5)
    from codefill.model.checkpoint import load_model_dir

    a = load_model_dir(tmp_path / "dp2" / "model").weights
    b = load_model_dir(one.model_dir).weights
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-4, atol=1e-6)
