"""A real worker subprocess on a tiny model, over real ZeroMQ sockets.

The worker's greedy tokens must equal the in-process Generator's; cancel, bad frames, failing requests and
failing startups are each driven through the real sockets.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import msgpack
import pytest
import zmq

from codefill.inference_workers import worker as worker_module
from codefill.inference_workers.client import (
    AsyncWorkerClient,
    WorkerClient,
    WorkerError,
    spawn_worker,
    stop_worker,
)
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
    """The in-process path: the same Generator the worker runs, called directly."""
    from codefill.model.generate import Generator
    from codefill.model.sampling import SamplingConfig

    gen = Generator.from_model_dir(tiny_dir, max_seq_len=MAX_SEQ_LEN, max_batch=1)

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
        ([encode(Token("r", 1, -1.0))], "expected GenerateRequest, Cancel, Ping, got Token"),
        ([bytes([MessageType.GENERATE_REQUEST]) + msgpack.packb(["r", [1, "x"], 4, 0.0, 0, 1.0, 0, []])],
         r"prompt_ids\[1\] = 'x' is not a token id"),
        ([bytes([MessageType.CANCEL]) + b"\x00" * MAX_FRAME_BYTES], f"over the {MAX_FRAME_BYTES}-byte cap"),
        ([encode(Ping(1)), encode(Ping(2))], "expected 1 frame after the routing id, got 2"),
        ([b"\x80\x04\x95pickle"], "unknown message type tag 128"),
    ],
    ids=["garbage", "empty", "unknown-tag", "wrong-type", "bad-field", "oversize", "two-frames", "pickle"],
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
    with pytest.raises(WorkerError, match=rf"GenerationError: prompt of {len(too_long)} tokens .*max_seq_len 512\)"):
        client.complete(too_long, 4)
    with pytest.raises(WorkerError, match=r"GenerationError: token id 100000 out of range \[0, 512\)"):
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
    with pytest.raises(WireError, match=r"'tcp://192.168.1.5:5555' is refused"):
        worker_module.main(tiny_dir, "tcp://192.168.1.5:5555", ready)
    status = json.loads(ready.read_text())
    assert status["status"] == "error" and "is refused" in status["error"]


def test_tcp_loopback_with_ephemeral_port(tiny_dir):
    process, endpoint = spawn_worker(tiny_dir, "tcp://127.0.0.1:*", max_seq_len=64)
    try:
        assert endpoint.startswith("tcp://127.0.0.1:") and not endpoint.endswith("*")
        with WorkerClient(endpoint) as c:
            assert c.ping().max_seq_len == 64
    finally:
        stop_worker(process)
