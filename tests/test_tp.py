"""Tensor parallelism over real msrun ranks on CPU, on the tiny GQA model (8 query / 2 KV heads, FFN 172).

TP=2 and TP=1 (through the same rank code) must give the single-process Runner's greedy tokens and
logits; prefix reuse and rollback must give a cold prefill's logits; bad TP sizes are refused before any
process starts; a split directory loads the same shards as cutting at load time; rank 0 serves over ZeroMQ;
a rank that dies turns into a non-zero exit with its traceback within seconds, and a client's request in
flight into an error naming the endpoint within seconds too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from codefill.inference_workers import launch
from codefill.inference_workers import sharding as tp
from codefill.inference_workers.client import WorkerClient, WorkerError
from codefill.inference_workers.launch import LaunchError, start_job, start_workers
from codefill.inference_workers.sharding import TensorParallelError
from helpers import make_tiny_model_dir

DRIVER = Path(__file__).with_name("tp_driver.py")
PROMPT = [1, 17, 42, 99, 230, 7, 311, 64, 5, 9, 120, 33]
NEW_TOKENS = 8
MAX_SEQ_LEN, MAX_BATCH = 256, 2


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory, "tiny-gqa")


@pytest.fixture(scope="module")
def split_dir(gqa_dir, tmp_path_factory):
    return tp.split_model_dir(gqa_dir, 2, tmp_path_factory.mktemp("split") / "tp2")


@pytest.fixture(scope="module")
def reference(gqa_dir):
    """The foundation's single-process path on the same weights."""
    from codefill.inference_workers.runner import Runner

    gen = Runner.from_model_dir(gqa_dir, max_seq_len=MAX_SEQ_LEN, max_batch=MAX_BATCH)
    first_logits = gen.prefill(PROMPT, slot=0, start_pos=0)
    tokens = [t for t, _ in gen.generate(PROMPT, NEW_TOKENS)]
    return {"tokens": tokens, "first_logits": first_logits}


def run_driver(model_dir: Path, world: int, out: Path, timeout_s: float = 240.0) -> dict[str, np.ndarray]:
    args = ["--model", str(model_dir), "--tp", str(world), "--out", str(out), "--prompt",
            ",".join(map(str, PROMPT)), "--new-tokens", str(NEW_TOKENS), "--max-seq-len", str(MAX_SEQ_LEN),
            "--max-batch", str(MAX_BATCH)]
    job = start_job(DRIVER, args, world)
    try:
        try:
            job.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"msrun driver did not finish within {timeout_s} s:\n{job.rank_traceback()}")
        assert job.process.returncode == 0, f"msrun driver failed ({job.process.returncode}):\n{job.rank_traceback()}"
    finally:
        job.stop(5)
    return dict(np.load(out))


@pytest.fixture(scope="module")
def tp2(gqa_dir, tmp_path_factory):
    return run_driver(gqa_dir, 2, tmp_path_factory.mktemp("tp2") / "out.npz")


@pytest.fixture(scope="module")
def tp1(gqa_dir, tmp_path_factory):
    return run_driver(gqa_dir, 1, tmp_path_factory.mktemp("tp1") / "out.npz")


# --- parity ---------------------------------------------------------------------------------------------


def test_tp2_greedy_tokens_and_logits_equal_single_process(tp2, reference):
    assert tp2["greedy_tokens"].tolist() == reference["tokens"]
    np.testing.assert_allclose(tp2["greedy_logits"][0], reference["first_logits"], atol=1e-4, rtol=0)


def test_tp1_through_ranks_equals_tp2_and_single_process(tp1, tp2, reference):
    assert tp1["greedy_tokens"].tolist() == reference["tokens"] == tp2["greedy_tokens"].tolist()
    np.testing.assert_allclose(tp1["greedy_logits"], tp2["greedy_logits"], atol=1e-4, rtol=0)


def test_tp2_prefix_reuse_and_rollback_equal_cold_prefill(tp2):
    np.testing.assert_allclose(tp2["reuse_logits"], tp2["cold_logits"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(tp2["rollback_logits"], tp2["cold_logits"], atol=1e-5, rtol=0)


def test_tp2_speculation_keeps_greedy_output_token_for_token(tp1, tp2):
    """Prompt-lookup drafts verified in one step across both ranks: the tokens of plain greedy decoding, with
    prefix reuse and in-flight extension, equal at TP=1 and TP=2; the drafts were really verified."""
    for run in (tp1, tp2):
        assert run["spec4_tokens"].tolist() == run["spec0_tokens"].tolist()
        drafted, accepted = run["spec4_counts"].tolist()
        assert drafted > 0 and 0 <= accepted <= drafted, (drafted, accepted)
        assert run["spec0_counts"].tolist() == [0, 0]
    assert tp2["spec4_tokens"].tolist() == tp1["spec4_tokens"].tolist()


def test_tp2_compiles_each_graph_once(tp2):
    assert tp2["graphs"].tolist() == [1, 1]  # prefill, decode: no recompiles across lengths and steps


# --- sizes, shards, files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size, named", [(3, "n_heads 8, n_kv_heads 2, ffn_dim 172"), (4, "n_kv_heads 2, ffn_dim 172"),
                                         (0, "positive integer, got 0")])
def test_bad_tp_refused_before_any_process_starts(gqa_dir, monkeypatch, size, named):
    def no_process(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with pytest.raises(TensorParallelError, match=named):
        start_workers(gqa_dir, size)
    with pytest.raises(TensorParallelError, match=named):
        tp.split_model_dir(gqa_dir, size, gqa_dir.parent / "never")


def test_shards_put_back_together_are_the_full_weights(gqa_dir):
    from codefill.model.checkpoint import load_model_dir

    full = load_model_dir(gqa_dir)
    shards = [tp.load_rank_weights(gqa_dir, r, 2)[1] for r in range(2)]
    for name, w in full.weights.items():
        axis = tp.split_axis(name)
        if axis is None:
            assert all(np.array_equal(s[name], w) for s in shards), name
        else:
            np.testing.assert_array_equal(np.concatenate([s[name] for s in shards], axis), w, err_msg=name)
    # GQA: rank 1 holds query heads 4..7 and KV head 1, which is the one they read (head h -> kv h // 4).
    d = full.config.head_dim
    np.testing.assert_array_equal(shards[1]["layers.0.attention.wk.weight"],
                                  full.weights["layers.0.attention.wk.weight"][d:2 * d])


def test_split_then_load_equals_cutting_at_load_time(gqa_dir, split_dir):
    for rank in range(2):
        cfg_a, cut = tp.load_rank_weights(gqa_dir, rank, 2)
        cfg_b, pre = tp.load_rank_weights(split_dir, rank, 2)
        assert cfg_a == cfg_b and list(cut) == list(pre)
        for name in cut:
            np.testing.assert_array_equal(cut[name], pre[name], err_msg=name)
    assert tp.tokenizer_path(split_dir).read_bytes() == (gqa_dir / "tokenizer.model").read_bytes()


def test_split_for_another_tp_size_is_refused_naming_both(split_dir, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a process was started"))
    with pytest.raises(TensorParallelError, match="split for tensor-parallel size 2, not 1"):
        start_workers(split_dir, 1)
    with pytest.raises(TensorParallelError, match="size 2, not 1"):
        tp.load_rank_weights(split_dir, 0, 1)


# --- serving over ZeroMQ, faults ---------------------------------------------------------------------------


def test_rank0_serves_the_split_model_over_zeromq(split_dir, reference):
    job = start_workers(split_dir, 2, max_seq_len=MAX_SEQ_LEN, max_batch=MAX_BATCH, ready_timeout_s=240)
    try:
        assert job.endpoint.startswith("ipc://") and sorted(job.rank_pids()) == [0, 1]
        with WorkerClient(job.endpoint, timeout_s=60) as client:
            tokens, finished = client.complete(PROMPT, NEW_TOKENS)
            assert [t.token_id for t in tokens] == reference["tokens"]
            # the same prompt again: the engine may reuse the cached prefix; the tokens must not change
            again, _ = client.complete(PROMPT, NEW_TOKENS)
            assert [t.token_id for t in again] == reference["tokens"]
            assert client.ping().ready
    finally:
        assert job.stop(30) == 0  # SIGTERM to rank 0: drain, close the runner, followers return, msrun exits 0
    assert not any(launch._alive(pid) for pid in job.rank_pids().values())


def test_a_rank_failing_at_startup_is_reported_with_its_traceback(split_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(split_dir, broken)
    (broken / tp.shard_file_name(1, 2)).write_bytes(b"\x00" * 16)  # rank 1's shard is garbage
    t = time.monotonic()
    with pytest.raises(LaunchError) as info:
        start_workers(broken, 2, max_seq_len=MAX_SEQ_LEN, ready_timeout_s=120)
    message = str(info.value)
    assert "rank 1" in message and "Traceback" in message and "rank-01-of-02.safetensors" in message
    assert time.monotonic() - t < 60


def test_killed_rank_makes_codefill_workers_exit_nonzero_with_the_reason(gqa_dir, tmp_path):
    cmd = [sys.executable, "-m", "codefill.cli", "workers", "--model", str(gqa_dir), "--tp", "2",
           "--max-seq-len", str(MAX_SEQ_LEN), "--max-batch", "1", "--log-dir", str(tmp_path / "logs")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "ranks ready" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        endpoint = line.split("serving on ")[1].split(";")[0]
        pids = {}
        for path in Path(endpoint[len("ipc://"):]).parent.glob("rank-*.json"):
            info = json.loads(path.read_text())
            pids[info["rank"]] = info["pid"]
        with WorkerClient(endpoint, timeout_s=60) as client:  # a client of workers someone else started
            assert len(client.complete(PROMPT, 2)[0]) == 2
            stream = client.generate(PROMPT, MAX_SEQ_LEN - len(PROMPT))
            next(stream)  # in flight when rank 1 dies
            os.kill(pids[1], signal.SIGKILL)
            t = time.monotonic()
            with pytest.raises(WorkerError, match=f"no reply from worker at {endpoint} .*died"):
                for _ in stream:
                    pass
            noticed_s = time.monotonic() - t
        assert noticed_s < 10, noticed_s  # not the 60 s request timeout
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - t < 10
        assert proc.returncode == 2
        assert "rank 1" in err and "exited" in err and "worker_1.log" in err, err
        time.sleep(0.5)
        assert not launch._alive(pids[0])  # rank 0, blocked or idle, was killed with the job
        with pytest.raises(WorkerError), WorkerClient(endpoint, timeout_s=2) as client:
            client.complete(PROMPT, 2)
    finally:
        if proc.poll() is None:
            proc.kill()
