"""The Ascend attention path (model/ascend_attention.py) on CPU, with its two fused operators replaced by
stand-ins that follow their documentation (tests/ascend_standin.py): the same runner graphs as the
reference batched-matmul path give the same logits. This checks codefill's side of the call (layouts,
lengths, grouped-query heads, the causal mode, slot selection); the operators themselves need an NPU."""

from __future__ import annotations

import numpy as np

from ascend_standin import IncreFlashStandIn, PromptFlashStandIn
from codefill.bench_model import random_weights
from codefill.inference_workers.runner import Runner
from codefill.model.ascend_attention import FusedCacheAttention, use_ascend_attention
from codefill.model.config import preset


def test_fused_operators_give_the_reference_logits(monkeypatch):
    monkeypatch.setenv("CODEFILL_KERNELS", "reference")
    cfg = preset("tiny-gqa")
    weights = random_weights(cfg, 5)
    reference = Runner(cfg, weights, max_seq_len=64, max_batch=2)
    fused = Runner(cfg, weights, max_seq_len=64, max_batch=2)
    use_ascend_attention(fused.model, IncreFlashStandIn, PromptFlashStandIn)
    assert isinstance(fused.model.layers[1].attention.fused_attention, FusedCacheAttention)
    for r in (reference, fused):
        r.prefill_chunk = 8
    prompt = np.random.default_rng(2).integers(3, cfg.vocab_size, 21).tolist()
    np.testing.assert_allclose(fused.prefill(prompt, 1), reference.prefill(prompt, 1), atol=1e-4, rtol=0)
    np.testing.assert_allclose(fused.prefill(prompt[12:], 1, 12), reference.prefill(prompt[12:], 1, 12),
                               atol=1e-4, rtol=0)  # prefix reuse: 12 cached keys, 9 new queries
    positions = [reference.idle_position, len(prompt)]
    for step in range(4):  # every slot, slot 0 idle
        a = reference.decode_step([0, 7 + step], positions)[1]
        np.testing.assert_allclose(fused.decode_step([0, 7 + step], positions)[1], a, atol=1e-4, rtol=0)
        positions[1] += 1
    np.testing.assert_allclose(fused.verify([3, 5], 1, positions[1]), reference.verify([3, 5], 1, positions[1]),
                               atol=1e-4, rtol=0)
    assert [t for t, _ in fused.generate(prompt, 12)] == [t for t, _ in reference.generate(prompt, 12)]
