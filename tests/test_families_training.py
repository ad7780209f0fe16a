"""Finetuning the byte-level families: the training forward (biases, linear rope scaling) is the serving
forward, LoRA on Qwen2's biased q/k/v projections equals its merge with the biases untouched, FIM rows use the
family's own layout and end token, and a short full finetune lowers the loss and exports back to Hugging Face
(its head, trained apart from the embedding, written untied)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from codefill.model.checkpoint import load_model_dir, load_tokenizer
from codefill.model.convert import hf_to_model_dir, model_dir_to_hf
from codefill.model.fim import infilling_prompt_tokens
from codefill.training import tokenize_data
from codefill.training.fim_examples import FimConfig, fim_example
from codefill.training.train_config import LoraConfig
from helpers import FIXED_CORPUS, make_family_hf_dir
from test_train import SEQ, all_position_logits, cfg

pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["qwen2.5-coder", "deepseek-coder"])
def family_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param + "-train")
    return hf_to_model_dir(make_family_hf_dir(root / "hf", request.param, seed=11), root / "model")


def test_training_forward_equals_serving_forward(family_dir):
    from codefill.inference_workers.runner import Runner
    from codefill.model.llama import Transformer, load_weights

    files = load_model_dir(family_dir)
    model = Transformer(files.config, max_batch=1, max_seq_len=64)
    load_weights(model, files.weights)
    prompt = [1, 17, 42, 99, 230, 7, 311, 64, 5, 9, 120, 33, 8, 200, 45, 6, 70, 81, 3, 2, 90, 91, 92, 93, 94,
              95, 96, 97, 98, 99, 100, 101, 102, 103, 104]  # past 32 positions: scaled rope shows
    logits = all_position_logits(model, np.array([prompt]))
    gen = Runner.from_model_dir(family_dir, max_seq_len=64, max_batch=1)
    for k in (1, 20, len(prompt)):
        np.testing.assert_allclose(logits[0, k - 1], np.asarray(gen.prefill(prompt[:k])).reshape(-1),
                                   rtol=1e-4, atol=1e-4)


def test_lora_on_biased_projections_equals_merge(family_dir):
    from codefill.model.llama import Transformer, load_weights
    from codefill.model.weights import expected_shapes
    from codefill.training.lora import apply_lora, init_adapters, merge_adapters

    files = load_model_dir(family_dir)
    lora = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    adapters = init_adapters(expected_shapes(files.config), files.config.n_layers, lora, seed=1)
    rng = np.random.default_rng(2)
    adapters = {n: (rng.normal(0, 0.05, a.shape).astype(np.float32) if n.endswith("lora_b") else a)
                for n, a in adapters.items()}
    tokens = np.array([[1, 5, 9, 33, 120, 7, 64, 300]])
    model = Transformer(files.config, max_batch=1, max_seq_len=SEQ)
    load_weights(model, files.weights)
    apply_lora(model, lora, adapters)
    with_lora = all_position_logits(model, tokens)
    merged_weights = merge_adapters(files.weights, adapters, files.config.n_layers, lora)
    bias_names = [n for n in files.weights if n.endswith(".bias")]
    assert bool(bias_names) == files.config.attention_bias
    assert all(np.array_equal(merged_weights[n], files.weights[n]) for n in bias_names)  # no adapter on a bias
    merged_model = Transformer(files.config, max_batch=1, max_seq_len=SEQ)
    load_weights(merged_model, merged_weights)
    np.testing.assert_allclose(with_lora, all_position_logits(merged_model, tokens), rtol=1e-4, atol=1e-5)


def test_fim_examples_use_the_family_layout(family_dir):
    tok = load_tokenizer(family_dir)
    config = FimConfig(fim_rate=1.0, spm_rate=1.0)  # SPM asked for: these families were trained PSM only
    for seed in range(5):
        ex = fim_example(tok, FIXED_CORPUS[:300], random.Random(seed), config)
        assert ex.kind == "psm"
        head = [tok.bos_id] if tok.family.fim_bos else []
        assert ex.ids[:len(head) + 1] == head + [tok.prefix_id] and ex.ids[-1] == tok.eot_id
        assert tok.piece(ex.ids[-1]) == {"qwen2.5-coder": "<|endoftext|>",
                                         "deepseek-coder": "<｜end▁of▁sentence｜>"}[tok.family.name]


def test_full_finetune_lowers_loss_and_exports(family_dir, tmp_path):
    from codefill.training.trainer import train

    (tmp_path / "docs.txt").write_text(FIXED_CORPUS * 3)
    tokenize_data.tokenize_pretrain(family_dir, tmp_path / "docs.txt", tmp_path / "rows.mindrecord", SEQ)
    result = train(family_dir, tmp_path / "rows.mindrecord", tmp_path / "run", cfg(max_steps=8, eval_every=0),
                   progress=False)
    assert result.losses[-1] < result.losses[0], result.losses
    trained = load_model_dir(result.model_dir)
    assert trained.config == load_model_dir(family_dir).config
    back = model_dir_to_hf(result.model_dir, tmp_path / "hf")
    written = json.loads((back / "config.json").read_text())
    assert written["tie_word_embeddings"] is False  # Qwen's head was trained apart from its embedding
    assert (back / "tokenizer.json").is_file()


def test_refresh_on_a_qwen_repository_publishes_to_its_worker(tmp_path, capsys):
    """`codefill train --repo` on Qwen2.5-Coder: FIM rows and held-out tasks in Qwen's layout, LoRA on its
    biased projections, and the merged weights published to a worker serving the Qwen MODEL_DIR, which then
    answers with exactly the new weights."""
    from codefill.cli import main
    from codefill.inference_workers.client import WorkerClient
    from codefill.inference_workers.runner import Runner
    from codefill.inference_workers.startup import spawn_worker, stop_worker
    from test_refresh import _repo

    model_dir = hf_to_model_dir(make_family_hf_dir(tmp_path / "hf", "qwen2.5-coder", seed=13), tmp_path / "model")
    fraction = 0.3
    body = "".join(FIXED_CORPUS.splitlines(keepends=True)[:6]) * 4
    repo = _repo(tmp_path, fraction, 6, lambda k: body)
    out = tmp_path / "run"
    process, endpoint = spawn_worker(model_dir, max_seq_len=128, max_batch=2, timeout_s=300)
    try:
        code = main(["train", "--repo", str(repo), "--model", str(model_dir), "--output", str(out), "--preset",
                     "tiny-test", "--seq-length", "64", "--max-steps", "40", "--held-out-fraction", str(fraction),
                     "--eval-tasks", "4", "--eval-max-new-tokens", "12", "--publish", endpoint])
        text = capsys.readouterr().out
        assert code == 0, text
        assert "before: exact match" in text and "after : exact match" in text, text
        assert load_model_dir(out / "model").config == load_model_dir(model_dir).config
        prompt = infilling_prompt_tokens(load_tokenizer(model_dir), "def f(x):\n    return ", "\n")
        new = [t for t, _ in Runner.from_model_dir(out / "model", max_seq_len=128, max_batch=1).generate(prompt, 8)]
        with WorkerClient(endpoint, timeout_s=60) as client:
            served = [t.token_id for t in client.complete(prompt, 8)[0]]
        if "are better" in text:
            assert f"published {out / 'model'}" in text and served == new
        else:
            assert "not published" in text and served != new
    finally:
        stop_worker(process)
