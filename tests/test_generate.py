"""Sampling, stop ids, log-probs and strict weight loading, on a tiny random model through the real graphs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from codefill.model.config import LlamaConfig
from codefill.inference_workers.runner import GenerationError, Runner
from codefill.model.llama import Transformer, WeightError, load_weights
from codefill.model.sampling import SamplingConfig, SamplingError, log_softmax, sample
from codefill.model.weights import expected_shapes

CFG = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, rope_theta=1e6,
                  max_seq_len=256)
PROMPT = [5, 17, 99, 3, 250, 42, 7, 8, 120, 64, 33]


def random_weights(cfg: LlamaConfig, seed: int = 0, std: float = 0.1) -> dict[str, np.ndarray]:
    # std 0.1: logits spread over a few units, peaked enough for stable greedy, flat enough for sampling.
    rng = np.random.default_rng(seed)
    return {name: (np.ones(shape, np.float32) if len(shape) == 1 else
                   (rng.standard_normal(shape) * std).astype(np.float32))
            for name, shape in expected_shapes(cfg).items()}


@pytest.fixture(scope="module")
def gen() -> Runner:
    return Runner(CFG, random_weights(CFG), max_seq_len=96)


def reference_logits(gen: Runner, ids: list[int]) -> np.ndarray:
    """Logits after `ids`, by a fresh prefill (not through the decode graph)."""
    return gen.prefill(ids)


# --- SamplingConfig and sample() on plain arrays -------------------------------------------------------------

@pytest.mark.parametrize("kwargs, fragment", [
    ({"temperature": -0.5}, "temperature.*-0.5"),
    ({"temperature": float("nan")}, "temperature.*nan"),
    ({"top_k": -1}, "top_k.*-1"),
    ({"top_k": 2.5}, "top_k.*2.5"),
    ({"top_p": 0.0}, r"top_p.*0\.0"),
    ({"top_p": 1.5}, r"top_p.*1\.5"),
    ({"seed": -3}, "seed.*-3"),
])
def test_invalid_sampling_config_names_the_value(kwargs, fragment):
    with pytest.raises(SamplingError, match=fragment):
        SamplingConfig(**kwargs)


def test_greedy_is_argmax_lowest_id_on_ties():
    logits = np.array([0.1, 3.0, -2.0, 3.0, 1.0], np.float32)
    assert sample(logits, SamplingConfig()) == 1


def test_top_k_and_top_p_restrict_the_support():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32)
    top3 = set(np.argsort(-logits)[:3].tolist())
    cfg = SamplingConfig(temperature=1.0, top_k=3, seed=1)
    r = cfg.rng()
    assert {sample(logits, cfg, r) for _ in range(200)} <= top3
    # top_p: the smallest set of most likely tokens whose mass reaches p.
    probs = np.exp(log_softmax(logits))
    order = np.argsort(-probs)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5) + 1)].tolist())
    cfg = SamplingConfig(temperature=1.0, top_p=0.5, seed=2)
    r = cfg.rng()
    drawn = {sample(logits, cfg, r) for _ in range(300)}
    assert drawn <= nucleus and len(drawn) > 1
    # A tiny top_p keeps only the most likely token.
    assert {sample(logits, SamplingConfig(temperature=1.0, top_p=1e-6), r) for _ in range(20)} == {int(order[0])}


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    cfg = SamplingConfig(temperature=1.0, seed=3)
    r = cfg.rng()
    counts = np.bincount([sample(logits, cfg, r) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


# --- generation through the model --------------------------------------------------------------------------

def test_greedy_generation_is_argmax_of_the_logits(gen):
    out = list(gen.generate(PROMPT, 12, SamplingConfig()))
    tokens = [t for t, _ in out]
    for i, token in enumerate(tokens):
        assert token == int(np.argmax(reference_logits(gen, PROMPT + tokens[:i]))), f"step {i}"


def test_logprobs_are_log_softmax_of_unmodified_logits(gen):
    # Sampled at a high temperature with cuts: the reported log-prob must still be the model's own.
    sampling = SamplingConfig(temperature=1.7, top_k=20, top_p=0.9, seed=5)
    out = list(gen.generate(PROMPT, 10, sampling))
    tokens = [t for t, _ in out]
    for i, (token, logprob) in enumerate(out):
        logits = reference_logits(gen, PROMPT + tokens[:i])
        expected = float(log_softmax(logits)[token])
        assert logprob <= 0.0
        assert math.isclose(logprob, expected, abs_tol=1e-4), f"step {i}: {logprob} vs {expected}"


def test_seeded_sampling_is_reproducible(gen):
    cfg = SamplingConfig(temperature=1.2, top_k=40, top_p=0.95, seed=123)
    first = list(gen.generate(PROMPT, 16, cfg))
    second = list(gen.generate(PROMPT, 16, cfg))
    assert first == second
    others = [[t for t, _ in gen.generate(PROMPT, 16, SamplingConfig(temperature=1.2, top_k=40, seed=s))]
              for s in (1, 2, 3)]
    assert any(o != [t for t, _ in first] for o in others), "different seeds never changed the output"


def test_top_k_1_equals_greedy(gen):
    greedy = list(gen.generate(PROMPT, 12, SamplingConfig()))
    top1 = list(gen.generate(PROMPT, 12, SamplingConfig(temperature=0.8, top_k=1, seed=9)))
    assert [t for t, _ in top1] == [t for t, _ in greedy]


def test_stop_id_is_yielded_then_generation_ends(gen):
    full = [t for t, _ in gen.generate(PROMPT, 12, SamplingConfig())]
    stop = full[4]
    first = full.index(stop)  # the stop id may already appear earlier
    out = [t for t, _ in gen.generate(PROMPT, 12, SamplingConfig(), stop_ids=frozenset({stop, 10_000}))]
    assert out == full[: first + 1]
    assert list(gen.generate(PROMPT, 0, SamplingConfig())) == []


def test_generation_is_lazy_one_token_at_a_time(gen):
    it = gen.generate(PROMPT, 50, SamplingConfig())
    assert isinstance(next(it), tuple)
    it.close()  # a client may stop early (cancelled completion); the next request is unaffected
    assert [t for t, _ in gen.generate(PROMPT, 3)] == [t for t, _ in gen.generate(PROMPT, 50)][:3]


@pytest.mark.parametrize("prompt, n, fragment", [
    ([], 4, "non-empty"),
    ([1, 256], 4, "token id 256 out of range"),
    ([1, -1], 4, "token id -1"),
    ([[1, 2]], 4, r"shape \(1, 2\)"),
    ([1, 2], -1, "max_new_tokens must be >= 0, got -1"),
    (list(range(90)), 8, "prompt of 90 tokens \\+ max_new_tokens 8 .*max_seq_len 96"),
])
def test_bad_requests_raise_at_call_time(gen, prompt, n, fragment):
    with pytest.raises(GenerationError, match=fragment):
        gen.generate(prompt, n)  # raises here, before the iterator is consumed


def test_generator_config_errors():
    with pytest.raises(GenerationError, match="max_seq_len 512 must be in \\[1, 256\\]"):
        Runner(CFG, random_weights(CFG), max_seq_len=512)
    with pytest.raises(GenerationError, match="max_batch must be >= 1, got 0"):
        Runner(CFG, random_weights(CFG), max_seq_len=32, max_batch=0)


def test_decode_step_checks_its_arguments(gen):
    with pytest.raises(GenerationError, match="one token and position per slot"):
        gen.decode_step([1, 2], [3, 4])
    with pytest.raises(GenerationError, match=r"positions \[97\] out of range \[0, 96\]"):
        gen.decode_step([1], [97])
    with pytest.raises(GenerationError, match="slot 1 out of range"):
        gen.prefill([1, 2], slot=1)


# --- strict weight loading ------------------------------------------------------------------------------

def test_parameter_names_are_the_codefill_names():
    model = Transformer(CFG, max_batch=1, max_seq_len=8)
    names = [n for n, _ in model.parameters_and_names() if "cache_" not in n]
    assert names == list(expected_shapes(CFG))


def test_load_weights_is_strict():
    model = Transformer(CFG, max_batch=1, max_seq_len=8)
    good = random_weights(CFG)

    missing = dict(good)
    del missing["layers.1.attention.wk.weight"]
    with pytest.raises(WeightError, match=r"missing \['layers.1.attention.wk.weight'\]"):
        load_weights(model, missing)

    extra = dict(good, **{"layers.9.attention.wq.weight": good["layers.0.attention.wq.weight"]})
    with pytest.raises(WeightError, match=r"unexpected \['layers.9.attention.wq.weight'\]"):
        load_weights(model, extra)

    bad = dict(good, **{"layers.0.feed_forward.w2.weight": np.zeros((128, 64), np.float32)})
    with pytest.raises(WeightError, match=r"layers.0.feed_forward.w2.weight has shape \(128, 64\).*\(64, 128\)"):
        load_weights(model, bad)

    load_weights(model, good)
    np.testing.assert_array_equal(model.output.weight.asnumpy(), good["output.weight"])


def test_from_model_dir_defaults_to_the_models_own_context_when_it_is_short(tmp_path):
    """A model trained for fewer than 2048 positions (the bundled one has 1024) opens with its own context;
    asking for more is refused with both numbers."""
    import dataclasses

    from codefill.model.checkpoint import load_model_dir, save_model_dir
    from helpers import make_tiny_model_dir

    tiny = make_tiny_model_dir(tmp_path)
    files = load_model_dir(tiny)
    short = save_model_dir(tmp_path / "short", dataclasses.replace(files.config, max_seq_len=256), files.weights,
                           files.tokenizer_path)
    assert Runner.from_model_dir(short).max_seq_len == 256
    assert Runner.from_model_dir(tiny).max_seq_len == 2048
    with pytest.raises(GenerationError, match=r"max_seq_len 512 must be in \[1, 256\]"):
        Runner.from_model_dir(short, max_seq_len=512)


def test_a_decode_step_runs_only_the_active_slots():
    """A lone sequence on a runner with 4 slots gets the logits it gets on a runner with 1 slot, through the
    one-slot graph (idle slots get zeros); several active slots go through the all-slots graph; each graph
    compiles once."""
    weights = random_weights(CFG)
    one = Runner(CFG, weights, max_seq_len=48, max_batch=1)
    four = Runner(CFG, weights, max_seq_len=48, max_batch=4)
    prompts = {0: [1, 17, 42, 99], 2: [5, 9, 120, 33, 64, 200, 2], 3: [8, 8, 9]}
    for slot, prompt in prompts.items():
        four.prefill(prompt, slot, 0)
    lone = prompts[2]
    one.prefill(lone, 0, 0)
    tokens, positions = [0] * 4, [four.idle_position] * 4
    tokens[2], positions[2] = 7, len(lone)
    logits = four.decode_step(tokens, positions)
    np.testing.assert_allclose(logits[2], one.decode_step([7], [len(lone)])[0], rtol=1e-5, atol=1e-5)
    assert not logits[[0, 1, 3]].any()
    for slot in (0, 3):  # then three rows at once, each equal to its own step alone
        tokens[slot], positions[slot] = 11, len(prompts[slot])
    positions[2] += 1
    both = four.decode_step(tokens, positions)
    one_more = one.decode_step([7], [len(lone) + 1])[0]
    np.testing.assert_allclose(both[2], one_more, rtol=1e-5, atol=1e-5)
    assert both[0].any() and both[3].any()
    assert four.compiled_graphs() == {"prefill": 1, "decode": 1, "decode_one": 1}
    assert one.compiled_graphs() == {"prefill": 1, "decode": 1}
