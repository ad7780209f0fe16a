"""A real worker subprocess on a tiny model, over real ZeroMQ sockets.

The worker's greedy tokens must equal the in-process Runner's, alone and with other clients decoding in
the same batch; cancel, bad frames, failing requests, failing startups, overload, SIGTERM drain and a hung
model (a fake runner under `serve` in a thread) are each driven through the real sockets.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from codefill.inference_workers import worker as worker_module
from codefill.inference_workers.client import (
    AsyncWorkerClient,
    StopRules,
    WorkerClient,
    WorkerError,
    WorkerOverloaded,
)
from codefill.inference_workers.startup import spawn_worker, stop_worker
from codefill.inference_workers.protocol import (
    MAX_FRAME_BYTES,
    ErrorReply,
    Finished,
    FinishReason,
    GenerateRequest,
    MessageType,
    Ping,
    Token,
    WireError,
    decode,
    encode,
)
from helpers import make_tiny_model_dir

MAX_SEQ_LEN = 512
PROMPT = [1, 17, 42, 99, 230, 7, 311, 64]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """The in-process path: the same Runner the worker runs, called directly."""
    from codefill.inference_workers.runner import Runner
    from codefill.model.sampling import SamplingConfig

    gen = Runner.from_model_dir(tiny_dir, max_seq_len=MAX_SEQ_LEN, max_batch=1)

    def run(prompt, max_new_tokens, sampling=SamplingConfig(), stop_ids=frozenset()):
        return list(gen.generate(prompt, max_new_tokens, sampling, stop_ids=stop_ids))

    return run


@pytest.fixture(scope="module")
def endpoint(tiny_dir):
    process, endpoint = spawn_worker(tiny_dir, max_seq_len=MAX_SEQ_LEN, timeout_s=300)
    assert endpoint.startswith("ipc://")
    yield endpoint
    stop_worker(process)
    assert process.returncode is not None


@pytest.fixture
def client(endpoint):
    with WorkerClient(endpoint, timeout_s=60) as c:
        yield c


def test_greedy_tokens_equal_in_process_generator(client, reference):
    expected = reference(PROMPT, 16)
    tokens, finished = client.complete(PROMPT, 16)
    assert [t.token_id for t in tokens] == [t for t, _ in expected]
    assert [t.logprob for t in tokens] == pytest.approx([lp for _, lp in expected], abs=1e-5)
    assert finished.finish_reason == FinishReason.LENGTH
    assert (finished.n_prompt, finished.n_generated) == (len(PROMPT), 16)
    assert finished.elapsed_ms > 0


def test_sampled_tokens_equal_in_process_generator(client, reference):
    from codefill.model.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=0.8, top_k=50, top_p=0.9, seed=3)
    expected = reference(PROMPT, 12, sampling)
    tokens, _ = client.complete(PROMPT, 12, sampling)
    assert [t.token_id for t in tokens] == [t for t, _ in expected]


def test_stop_id_ends_generation_and_is_sent_last(client, reference):
    greedy = [t for t, _ in reference(PROMPT, 16)]
    stop = greedy[3]
    n = greedy.index(stop) + 1
    tokens, finished = client.complete(PROMPT, 16, stop_ids=[stop])
    assert [t.token_id for t in tokens] == greedy[:n]
    assert finished.finish_reason == FinishReason.STOP and finished.n_generated == n


def test_cancel_mid_generation(client, endpoint):
    max_new = MAX_SEQ_LEN - len(PROMPT)
    stream = client.generate(PROMPT, max_new)
    first = [next(stream), next(stream)]
    assert all(isinstance(t, Token) for t in first)
    request_id = first[0].request_id
    # Health is answered between tokens, from a second connection
    with WorkerClient(endpoint, timeout_s=30) as other:
        pong = other.ping()
    assert pong.max_seq_len == MAX_SEQ_LEN and pong.busy
    client.cancel(request_id)
    rest = list(stream)
    finished = rest[-1]
    assert isinstance(finished, Finished) and finished.request_id == request_id
    assert finished.finish_reason == FinishReason.CANCELLED
    assert 2 <= finished.n_generated < max_new
    assert finished.n_generated == 2 + len(rest) - 1
    assert client.ping().busy is False


def test_closing_the_stream_early_cancels(client):
    stream = client.generate(PROMPT, MAX_SEQ_LEN - len(PROMPT))
    next(stream)
    stream.close()  # sends Cancel
    deadline = time.monotonic() + 30
    while client.ping().busy:
        assert time.monotonic() < deadline, "worker still busy 30 s after the stream was closed"
        time.sleep(0.05)
    tokens, finished = client.complete(PROMPT, 3)  # late replies to the abandoned request are skipped
    assert len(tokens) == 3 and finished.finish_reason == FinishReason.LENGTH


def _raw_dealer(endpoint):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.connect(endpoint)
    return sock


@pytest.mark.parametrize(
    "frames, match",
    [
        ([b"\x01garbage"], "GenerateRequest body is not valid msgpack"),
        ([b""], "empty frame"),
        ([bytes([250]) + msgpack.packb([])], "unknown message type tag 250"),
        ([encode(Token("r", 1, -1.0))], "expected GenerateRequest, Cancel, Ping, ReloadWeights, got Token"),
        ([bytes([MessageType.GENERATE_REQUEST]) + msgpack.packb(["r", [1, "x"], 4, 0.0, 0, 1.0, 0, [], [], False,
                                                                 0, 0.0, "", 0])],
         r"prompt_ids\[1\] = 'x' is not a token id"),
        ([bytes([MessageType.GENERATE_REQUEST]) + msgpack.packb(["r", [1], 4, 0.0, 0, 1.0, 0, []])],
         r"GenerateRequest body must be a list of 14 fields, got 8-item list"),
        ([bytes([MessageType.CANCEL]) + b"\x00" * MAX_FRAME_BYTES], f"over the {MAX_FRAME_BYTES}-byte cap"),
        ([encode(Ping(1)), encode(Ping(2))], "expected 1 frame after the routing id, got 2"),
        ([b"\x80\x04\x95pickle"], "unknown message type tag 128"),
    ],
    ids=["garbage", "empty", "unknown-tag", "wrong-type", "bad-field", "old-version", "oversize", "two-frames",
         "pickle"],
)
def test_bad_frames_get_error_reply_and_worker_keeps_serving(endpoint, frames, match, reference):
    sock = _raw_dealer(endpoint)
    try:
        sock.send_multipart(frames)
        reply = decode(sock.recv(), ErrorReply)
        assert reply.request_id == ""
        assert re.search(match, reply.message), reply.message
        sock.send(encode(GenerateRequest("after-bad", PROMPT, 4)))
        replies = [decode(sock.recv(), (Token, Finished)) for _ in range(5)]
    finally:
        sock.close()
    assert [r.token_id for r in replies[:4]] == [t for t, _ in reference(PROMPT, 4)]
    assert replies[4].finish_reason == FinishReason.LENGTH


def test_failing_request_reports_error_and_worker_keeps_serving(client):
    too_long = PROMPT * (MAX_SEQ_LEN // len(PROMPT) + 1)
    with pytest.raises(WorkerError, match=rf"prompt of {len(too_long)} tokens .*max_seq_len 512\)"):
        client.complete(too_long, 4)
    with pytest.raises(WorkerError, match=r"token id 100000 out of range \[0, 512\)"):
        client.complete([1, 100000], 4)
    tokens, finished = client.complete(PROMPT, 2)
    assert len(tokens) == 2


def test_cancel_of_unknown_request_is_ignored(client):
    client.cancel("no-such-request")
    assert client.ping().busy is False


def test_async_client_matches_and_cancels_on_task_cancel(endpoint, reference):
    async def scenario():
        client = AsyncWorkerClient(endpoint, timeout_s=60)
        try:
            # two requests in flight on one socket: replies are routed by request id, served one at a time
            (a, fa), (b, fb) = await asyncio.gather(client.complete(PROMPT, 6), client.complete(PROMPT[:4], 5))
            assert [t.token_id for t in a] == [t for t, _ in reference(PROMPT, 6)]
            assert [t.token_id for t in b] == [t for t, _ in reference(PROMPT[:4], 5)]

            first_token = asyncio.Event()

            async def consume():
                async for msg in client.generate(PROMPT, MAX_SEQ_LEN - len(PROMPT)):
                    first_token.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(first_token.wait(), 60)
            task.cancel()  # what pygls does on $/cancelRequest
            with pytest.raises(asyncio.CancelledError):
                await task
            deadline = time.monotonic() + 30
            while (await client.ping()).busy:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        finally:
            client.close()

    asyncio.run(scenario())


def test_no_reply_times_out_with_worker_error(tmp_path):
    with WorkerClient(f"ipc://{tmp_path}/nobody.sock", timeout_s=0.3) as c:
        with pytest.raises(WorkerError, match=r"no reply from worker at ipc://.*nobody.sock within 0.3 s"):
            c.ping()


def test_missing_model_dir_fails_to_start_with_the_childs_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(WorkerError) as info:
        spawn_worker(missing, timeout_s=120)
    message = str(info.value)
    assert f"worker for model {missing} failed to start" in message
    assert "CheckpointError" in message and str(missing) in message
    assert "Traceback" in message  # the child's own traceback, read from its ready file


def test_non_local_endpoint_is_refused(tiny_dir, tmp_path):
    with pytest.raises(WorkerError, match=r"'tcp://0.0.0.0:5555' is refused"):
        spawn_worker(tiny_dir, "tcp://0.0.0.0:5555")
    # the worker itself refuses too, before loading anything, and says so in its ready file
    ready = tmp_path / "ready.json"
    with pytest.raises(WireError, match=r"'tcp://192.168.1.5:5555' can be reached from other machines; "
                                        r"binding it needs --allow-remote and CURVE keys"):
        worker_module.main(tiny_dir, "tcp://192.168.1.5:5555", ready)
    status = json.loads(ready.read_text())
    assert status["status"] == "error" and "--allow-remote" in status["error"]


def test_tcp_loopback_with_ephemeral_port(tiny_dir):
    process, endpoint = spawn_worker(tiny_dir, "tcp://127.0.0.1:*", max_seq_len=64)
    try:
        assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith("*")
        with WorkerClient(endpoint) as c:
            assert c.ping().max_seq_len == 64
    finally:
        stop_worker(process)


def test_concurrent_clients_decode_together_and_get_their_solo_tokens(endpoint, reference):
    prompts = [PROMPT, [1, 5, 6, 7], [1, 300, 301, 302, 303], PROMPT[:5] + [9]]
    results: dict[int, list[int]] = {}

    def one(i):
        with WorkerClient(endpoint, timeout_s=60) as c:
            tokens, finished = c.complete(prompts[i], 10 + i)
            assert finished.finish_reason == FinishReason.LENGTH
            results[i] = [t.token_id for t in tokens]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, p in enumerate(prompts):
        assert results[i] == [t for t, _ in reference(p, 10 + i)]


def test_repeated_prompt_reuses_the_cache_and_replays(client, reference):
    tokens, first = client.complete(PROMPT, 8)
    ids = [t.token_id for t in tokens]
    # the next keystroke typed the first two suggested tokens: the rest comes from the cached decode
    tokens, second = client.complete(PROMPT + ids[:2], 6)
    assert [t.token_id for t in tokens] == [t for t, _ in reference(PROMPT + ids[:2], 6)]
    assert second.n_reused == len(PROMPT) + 2 and second.n_replayed == 6


def test_text_stop_rules_and_text_bytes(client, tiny_dir):
    from codefill.inference_workers.stops import token_bytes_of_model_dir

    table = token_bytes_of_model_dir(tiny_dir)  # random weights emit stray UTF-8 pieces: compare bytes
    tokens, _ = client.complete(PROMPT, 20)
    text = b"".join(table[t.token_id] for t in tokens)
    at = next(i for i in range(2, len(text)) if text[i:i + 2].isascii() and text[i:i + 2].strip())
    stop = text[at:at + 2]
    tokens, finished = client.complete(PROMPT, 20, rules=StopRules(stop_strings=(stop.decode(),)))
    assert finished.finish_reason == FinishReason.STOP_STRING
    assert finished.text_bytes == text.find(stop)
    assert b"".join(table[t.token_id] for t in tokens)[:finished.text_bytes] == text[:text.find(stop)]


def test_health_reports_ready_queue_and_slots(client):
    pong = client.ping()
    assert pong.ready and pong.reason == "" and pong.max_batch == 4 and pong.n_queued == pong.n_active == 0


def test_overload_and_deadline_over_the_socket(tiny_dir):
    from codefill.inference_workers.engine import EngineConfig

    # A warmed-up tiny model decodes fast: the long request gets the whole 2048-position context and no
    # speculation, so it still holds the only slot when the other two arrive.
    process, endpoint = spawn_worker(tiny_dir, max_seq_len=2048, max_batch=1,
                                     engine=EngineConfig(max_queue=1, speculate=0))
    try:
        with WorkerClient(endpoint, timeout_s=60) as c:
            long = c.generate(PROMPT, 2048 - len(PROMPT))
            next(long)  # holds the only slot
            # fills the queue and expires there (another prompt: the long request's tokens cannot answer it)
            c.send(GenerateRequest("queued", PROMPT[::-1], 2, deadline_ms=1.0))
            with pytest.raises(WorkerOverloaded, match=r"overloaded: 1 requests queued \(max_queue 1\)"):
                c.complete(PROMPT, 2)
            time.sleep(0.05)  # past the queued request's deadline, whatever the machine's speed
            long.close()  # cancel: the slot frees, the queued request is dropped for its deadline
            msg = _replies_until_finished(c, "queued")[-1]
            assert msg.finish_reason == FinishReason.DEADLINE and msg.n_generated == 0
    finally:
        stop_worker(process)


def _replies_until_finished(client, request_id, timeout_s=30.0):
    """Raw replies to `request_id` on a WorkerClient's socket, up to its Finished."""
    out = []
    while True:
        assert client._sock.poll(int(timeout_s * 1000)), f"no Finished for {request_id} within {timeout_s} s"
        msg = decode(client._sock.recv(), (Token, Finished, ErrorReply))
        if getattr(msg, "request_id", None) == request_id:
            out.append(msg)
            if isinstance(msg, Finished):
                return out


def test_sigterm_drains_in_flight_requests_then_exits(tiny_dir):
    from codefill.inference_workers.engine import EngineConfig

    process, endpoint = spawn_worker(tiny_dir, max_seq_len=MAX_SEQ_LEN, engine=EngineConfig(drain_timeout_s=120))
    try:
        with WorkerClient(endpoint, timeout_s=60) as c, WorkerClient(endpoint, timeout_s=60) as late:
            n = MAX_SEQ_LEN - len(PROMPT)
            stream = c.generate(PROMPT, n)
            next(stream)
            process.send_signal(signal.SIGTERM)
            while late.ping().ready:
                time.sleep(0.01)
            with pytest.raises(WorkerOverloaded, match="draining"):
                late.complete(PROMPT, 2)
            rest = list(stream)
            assert rest[-1].finish_reason == FinishReason.LENGTH and rest[-1].n_generated == n
        assert process.wait(60) == 0
    finally:
        stop_worker(process)


class HangingRunner:
    """A model of 16 ids whose decode_step never returns until released: a rank stuck in a collective."""

    max_batch, max_seq_len, vocab_size, idle_position = 2, 64, 16, 64

    def __init__(self):
        from codefill.model.kernels import KernelStatus

        self.release = threading.Event()
        self.kernels = KernelStatus(None, "a test runner")

    def prefill(self, ids, slot, start_pos):
        return np.eye(self.vocab_size, dtype=np.float32)[(ids[-1] + 1) % self.vocab_size]

    def decode_step(self, tokens, positions):
        self.release.wait(120)
        return np.zeros((self.max_batch, self.vocab_size), np.float32)

    def close(self):
        pass


def test_hung_model_turns_into_errors_and_not_ready(tmp_path):
    from codefill.inference_workers.engine import EngineConfig

    runner, stop = HangingRunner(), threading.Event()
    endpoint = f"ipc://{tmp_path}/w.sock"
    ready = tmp_path / "ready.json"
    thread = threading.Thread(target=worker_module.serve, args=(runner, endpoint),
                              kwargs=dict(config=EngineConfig(step_timeout_s=0.5), ready_file=ready,
                                          stop_event=stop))
    thread.start()
    try:
        while not ready.exists():
            time.sleep(0.01)
        with WorkerClient(endpoint, timeout_s=30) as a, WorkerClient(endpoint, timeout_s=30) as b:
            stream = a.generate([1, 2], 10)
            assert next(stream).token_id == 3  # from the prefill; then the decode step hangs
            b.send(GenerateRequest("waiting", [1, 5], 4))
            with pytest.raises(WorkerError, match=r"model step hung: decode step of \d rows has run for"):
                list(stream)
            msgs = _replies_until_finished(b, "waiting")
            assert msgs[-1].finish_reason == FinishReason.ERROR and "model step hung" in msgs[-2].message
            pong = b.ping()
            assert not pong.ready and "step_timeout_s 0.5" in pong.reason
            with pytest.raises(WorkerError, match="model not ready"):
                b.complete([1], 2)
    finally:
        stop.set()
        runner.release.set()
        thread.join(30)
    assert not thread.is_alive()


def test_a_restarted_worker_loads_its_compiled_graphs_and_answers_the_same(tiny_dir, tmp_path, monkeypatch,
                                                                            reference):
    """The compile cache (runner.graph_cache_dir): the first start writes it, the second reads it; both serve
    the in-process greedy tokens. Its key changes with what the graphs depend on."""
    from codefill.inference_workers.runner import graph_cache_dir
    from codefill.model import kernels
    from codefill.model.checkpoint import read_model_config

    monkeypatch.setenv("CODEFILL_CACHE", str(tmp_path))
    prompt = [1, 17, 42, 99, 230, 7]
    for start in range(2):
        process, endpoint = spawn_worker(tiny_dir, max_seq_len=MAX_SEQ_LEN, max_batch=2, timeout_s=300)
        try:
            with WorkerClient(endpoint, timeout_s=60) as c:
                tokens, _ = c.complete(prompt, 6)
        finally:
            stop_worker(process)
        assert [t.token_id for t in tokens] == [t for t, _ in reference(prompt, 6)]
        cached = list((tmp_path / "graphs").glob("*/rank_0/*"))
        assert cached, f"start {start}: no compile cache under {tmp_path}"
    cfg = read_model_config(tiny_dir)[0]
    library = kernels.load().library  # the workers' kernels, built once under tmp_path
    assert library is not None and library.is_relative_to(tmp_path)
    key = graph_cache_dir(cfg, MAX_SEQ_LEN, 2, 0, 1, library)
    assert key.parent == tmp_path / "graphs" and key.exists()
    assert len({key, graph_cache_dir(cfg, MAX_SEQ_LEN, 4, 0, 1, library), graph_cache_dir(cfg, 256, 2, 0, 1, library),
                graph_cache_dir(cfg, MAX_SEQ_LEN, 2, 1, 2, library), graph_cache_dir(cfg, MAX_SEQ_LEN, 2, 0, 1)}) == 5
