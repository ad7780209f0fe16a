"""The CPU serving kernels (model/kernels.py, model/cpu_kernels.cc) against the stock MindSpore ops they
replace, on the same weights: every graph of the runner (chunked prefill with prefix reuse, decode of every
slot with idle ones, decode of one slot, verify), and the fallback when they cannot be built.
(tests/test_parity_hf.py checks the runner, kernels included, against transformers itself.)"""

from __future__ import annotations

import numpy as np
import pytest

from codefill.bench_model import random_weights
from codefill.inference_workers.runner import Runner
from codefill.model import kernels
from codefill.model.config import preset

CACHE, SLOTS = 96, 3


def runners(monkeypatch, cache: int = CACHE):
    cfg = preset("tiny-gqa")
    weights = random_weights(cfg, 3)
    monkeypatch.setenv("CODEFILL_KERNELS", "reference")
    reference = Runner(cfg, weights, max_seq_len=cache, max_batch=SLOTS)
    monkeypatch.delenv("CODEFILL_KERNELS")
    fast = Runner(cfg, weights, max_seq_len=cache, max_batch=SLOTS)
    if fast.kernels.library is None and "no C++ compiler" in fast.kernels.reason:
        pytest.skip(fast.kernels.reason)  # a machine without g++: the stock ops serve (tested below)
    assert reference.kernels.library is None and fast.kernels.library is not None, fast.kernels.reason
    for r in (reference, fast):
        r.prefill_chunk = 16  # several chunks per prompt, each reading the keys of the ones before
    return cfg, reference, fast


def test_every_graph_equals_the_stock_ops(monkeypatch):
    cfg, reference, fast = runners(monkeypatch)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (41, 7, 23)]
    for slot, prompt in enumerate(prompts):
        a, b = reference.prefill(prompt, slot), fast.prefill(prompt, slot)
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)
    # prefix reuse: the tail of slot 0 again from position 30 over what the cache holds
    np.testing.assert_allclose(fast.prefill(prompts[0][30:], 0, 30), reference.prefill(prompts[0][30:], 0, 30),
                               atol=1e-4, rtol=0)
    # decode of every slot, slot 1 idle (the scratch column), then of slot 2 alone
    positions = [len(prompts[0]), reference.idle_position, len(prompts[2])]
    for step in range(6):
        tokens = [5 + step, 0, 9 + step]
        a, b = reference.decode_step(tokens, positions), fast.decode_step(tokens, positions)
        np.testing.assert_allclose(b[[0, 2]], a[[0, 2]], atol=1e-4, rtol=0)
        assert np.argmax(b[0]) == np.argmax(a[0]) and np.argmax(b[2]) == np.argmax(a[2])
        positions = [positions[0] + 1, positions[1], positions[2] + 1]
    np.testing.assert_allclose(fast.verify([4, 8, 15], 2, positions[2]), reference.verify([4, 8, 15], 2, positions[2]),
                               atol=1e-4, rtol=0)
    one = [reference.idle_position, reference.idle_position, positions[2] + 3]
    np.testing.assert_allclose(fast.decode_step([0, 0, 16], one)[2], reference.decode_step([0, 0, 16], one)[2],
                               atol=1e-4, rtol=0)
    assert fast.compiled_graphs() == reference.compiled_graphs()


def test_greedy_generation_is_unchanged(monkeypatch):
    cfg, reference, fast = runners(monkeypatch)
    prompt = np.random.default_rng(1).integers(3, cfg.vocab_size, 50).tolist()
    assert [t for t, _ in fast.generate(prompt, 20)] == [t for t, _ in reference.generate(prompt, 20)]


def test_without_a_compiler_the_stock_ops_serve_and_say_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CODEFILL_CACHE", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    status = kernels.load()
    assert status.library is None and "no-such-compiler" in status.reason
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    status = kernels.load()
    assert status.library is None and "could not build" in status.reason
    assert not list(tmp_path.rglob("*.so"))  # no half-written library left to be picked up later
    runner = Runner(preset("tiny-gqa"), random_weights(preset("tiny-gqa"), 3), max_seq_len=32)
    assert runner.kernels.library is None
    assert np.isfinite(runner.prefill([1, 2, 3])).all()


def test_other_devices_keep_the_stock_ops():
    assert kernels.load("Ascend").library is None


def test_long_chunks_and_verifies_take_the_gemm_path(monkeypatch):
    """Past 16 rows the projections are oneDNN GEMMs (one per thread of the kernels' team), past 8 queries the
    attention too, in blocks of 128 queries: prefill chunks of 48, then of 300 (three blocks, over the keys of
    the chunk before), and a verify of 20 ids, against the stock ops."""
    cfg, reference, fast = runners(monkeypatch, cache=420)
    prompt = np.random.default_rng(2).integers(3, cfg.vocab_size, 390).tolist()
    for chunk, start, end in ((48, 0, 70), (300, 70, 370)):
        for r in (reference, fast):
            r.prefill_chunk = chunk
        np.testing.assert_allclose(fast.prefill(prompt[start:end], 1, start),
                                   reference.prefill(prompt[start:end], 1, start), atol=1e-4, rtol=0)
    ids = np.random.default_rng(3).integers(3, cfg.vocab_size, 20).tolist()
    np.testing.assert_allclose(fast.verify(ids, 1, 370), reference.verify(ids, 1, 370), atol=1e-4, rtol=0)


def test_projection_kernel_called_from_two_threads_at_once():
    """The kernels' thread team serves one call at a time; a second caller meanwhile (another runner in another
    thread) computes its call alone. Both get the right answer: the `linear` kernel called directly through
    ctypes (which releases the GIL) from two threads, against NumPy."""
    import ctypes
    import threading

    status = kernels.load()
    if status.library is None:
        pytest.skip(status.reason)
    linear = ctypes.CDLL(str(status.library)).linear

    def call(x, w):
        y = np.zeros((x.shape[0], w.shape[0]), np.float32)
        arrays = (x, w, y)
        params = (ctypes.c_void_p * 3)(*(a.ctypes.data for a in arrays))
        ndims = (ctypes.c_int * 3)(2, 2, 2)
        dims = [(ctypes.c_int64 * 2)(*a.shape) for a in arrays]
        shapes = (ctypes.POINTER(ctypes.c_int64) * 3)(*dims)
        assert linear(3, params, ndims, shapes, None, None, None) == 0
        return y

    failures = []

    def worker(rows):
        rng = np.random.default_rng(rows)
        for _ in range(200):
            x = rng.standard_normal((rows, 64), dtype=np.float32)
            w = rng.standard_normal((300, 64), dtype=np.float32)
            if not np.allclose(call(x, w), x @ w.T, atol=1e-4):
                failures.append(rows)

    threads = [threading.Thread(target=worker, args=(rows,)) for rows in (1, 40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
