"""The precision policy (model/precision.py): defaults and refusals per device, and the half-precision path
on CPU (float16: MindSpore has no CPU bfloat16 MatMul) against float32 on the same weights.

Tolerance, measured on the tiny-gqa preset (logits of magnitude ~0.6): float16 weights, activations and KV
cache change prefill logits by at most ~3e-4 (asserted below 2e-3), and 40 greedy tokens agree with float32."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from codefill.bench_model import random_weights
from codefill.inference_workers.runner import Runner
from codefill.model import precision
from codefill.model.config import preset
from codefill.model.llama import weight_parameters


def test_defaults_and_refusals_name_the_values():
    assert precision.resolve(None, "cpu") == "fp32"
    assert precision.resolve(None, "ascend") == precision.resolve(None, "gpu") == "bf16"
    assert precision.resolve("fp16", "cpu") == "fp16"
    with pytest.raises(precision.PrecisionError, match=r"bf16 does not run on cpu.*\['fp32', 'fp16'\]"):
        precision.resolve("bf16", "cpu")
    with pytest.raises(precision.PrecisionError, match=r"unknown precision 'int4'"):
        precision.resolve("int4", "ascend")
    with pytest.raises(precision.PrecisionError, match=r"unknown device 'tpu'"):
        precision.resolve(None, "tpu")


@pytest.fixture(scope="module")
def pair():
    cfg = preset("tiny-gqa")
    weights = random_weights(cfg, 3)
    return cfg, Runner(cfg, weights, max_seq_len=128, max_batch=2), \
        Runner(cfg, weights, max_seq_len=128, max_batch=2, precision="fp16")


def test_half_precision_stores_weights_and_cache_in_float16(pair):
    _, full, half = pair
    assert {p.dtype for p in weight_parameters(half.model).values()} == {ms.float16}
    assert {p.dtype for p in weight_parameters(full.model).values()} == {ms.float32}
    attn = half.model.layers[0].attention
    assert attn.cache_k.dtype == attn.cache_v.dtype == ms.float16
    assert half.kernels.library is None and "fp16" in half.kernels.reason  # the CPU kernels are float32 only


def test_half_precision_logits_are_float32_and_close_to_full_precision(pair):
    cfg, full, half = pair
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, 60).tolist()
    a, b = full.prefill(prompt, 0), half.prefill(prompt, 0)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert np.abs(a - b).max() < 2e-3, np.abs(a - b).max()
    assert [t for t, _ in half.generate(prompt, 40)] == [t for t, _ in full.generate(prompt, 40)]


def test_a_checkpoint_loads_into_half_precision_and_reloads(pair, tmp_path):
    from helpers import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path, "tiny-gqa")
    runner = Runner.from_model_dir(model_dir, max_seq_len=64, precision="fp16")
    before = runner.prefill([1, 17, 42])
    runner.reload(model_dir)  # the same weights again, converted the same way
    np.testing.assert_array_equal(runner.prefill([1, 17, 42]), before)


def test_the_flag_reaches_every_process_and_the_memory_plan(monkeypatch, capsys, tmp_path):
    import os

    from codefill.cli import main
    from codefill.inference_workers.memory_plan import Available, plan
    from helpers import make_tiny_model_dir

    monkeypatch.setenv(precision.PRECISION_ENV, "fp32")  # restored after the test: the CLI sets it
    model_dir = make_tiny_model_dir(tmp_path, "tiny-gqa")
    assert main(["generate", "--model", str(model_dir), "--prompt-ids", "1,17,42", "--max-new-tokens", "3",
                 "--precision", "fp16", "--json"]) in (0, None)
    assert os.environ[precision.PRECISION_ENV] == "fp16"  # what workers and msrun ranks it starts inherit
    cfg = preset("codellama-7b")
    sizes = {}
    for name in ("fp16", "fp32"):
        monkeypatch.setenv(precision.PRECISION_ENV, name)
        sizes[name] = plan(cfg, 1, "cpu", Available(10**12, "test"), default_max_seq_len=2048, default_max_batch=1)
    assert sizes["fp32"].weights == 2 * sizes["fp16"].weights
    assert main(["generate", "--model", str(model_dir), "--prompt-ids", "1", "--max-new-tokens", "1",
                 "--precision", "bf16"]) == 2
    assert "bf16 does not run on cpu" in capsys.readouterr().err
