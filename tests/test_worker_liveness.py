"""A worker that dies is noticed within seconds, not at the request timeout: a remote-style worker (TCP on
all interfaces, CURVE keys, started as `codefill worker` by someone else) killed with SIGKILL mid-request.

The clients run with the default 60 s request timeout; the in-flight request, and a new one, must fail within
a few seconds with an error naming the endpoint, and the same client must be served again once a worker is
back on that endpoint (ZeroMQ redials by itself)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from codefill.inference_workers.client import AsyncWorkerClient, WorkerClient, WorkerError
from codefill.inference_workers.protocol import Token
from codefill.inference_workers.launch import free_port
from codefill.inference_workers.security import ClientKeys, generate_keys
from helpers import make_tiny_model_dir

CODEFILL = [sys.executable, "-m", "codefill.cli"]
PROMPT = [1, 17, 42, 99, 230, 7, 311, 64]
LONG = 240  # tokens: seconds of decoding, so the request is in flight when the worker dies
NOTICED_WITHIN_S = 10.0  # generous (liveness is 2 s); the request timeout is 60 s


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    server_pub, server_secret = generate_keys(root / "worker", "worker")
    generate_keys(root / "allowed", "laptop")
    model = make_tiny_model_dir(tmp_path_factory)
    return model, server_secret, root / "allowed", ClientKeys(server_pub, root / "allowed" / "laptop.key_secret")


def start_worker(setup, port: int, tmp_path) -> subprocess.Popen:
    model, server_secret, allowed, _ = setup
    ready = tmp_path / f"ready-{time.monotonic_ns()}.json"
    worker = subprocess.Popen([*CODEFILL, "worker", "--model", str(model), "--endpoint", f"tcp://0.0.0.0:{port}",
                               "--ready-file", str(ready), "--max-seq-len", "256", "--allow-remote",
                               "--curve-secret-key", str(server_secret), "--curve-authorized-clients", str(allowed)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not ready.exists():
        assert worker.poll() is None, worker.stderr.read()
        assert time.monotonic() < deadline, "the worker did not get ready"
        time.sleep(0.1)
    assert json.loads(ready.read_text())["status"] == "ready"
    return worker


def kill(worker: subprocess.Popen) -> None:
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)


def test_a_killed_tcp_curve_worker_is_noticed_in_seconds_and_a_restarted_one_serves_again(setup, tmp_path):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    keys = setup[3]
    worker = start_worker(setup, port, tmp_path)
    try:
        with WorkerClient(endpoint, timeout_s=60, keys=keys) as client:
            assert len(client.complete(PROMPT, 4)[0]) == 4  # warm: graphs compiled
            stream = client.generate(PROMPT, LONG)
            assert isinstance(next(stream), Token)  # in flight
            kill(worker)
            t0 = time.monotonic()
            with pytest.raises(WorkerError) as info:
                for _ in stream:
                    pass
            assert time.monotonic() - t0 < NOTICED_WITHIN_S
            assert endpoint in str(info.value) and "died" in str(info.value), info.value

            t0 = time.monotonic()
            with pytest.raises(WorkerError, match=f"no reply from worker at {endpoint} .*died"):
                client.complete(PROMPT, 4)  # a new request on the same client
            assert time.monotonic() - t0 < NOTICED_WITHIN_S

            worker = start_worker(setup, port, tmp_path)  # back on the same endpoint
            tokens, finished = client.complete(PROMPT, 6)  # the same socket redialled by itself
            assert len(tokens) == finished.n_generated == 6
    finally:
        if worker.poll() is None:
            worker.terminate()
            worker.wait(30)


def test_the_async_client_notices_too(setup, tmp_path):
    """The language server's client: the waiting request fails within seconds, naming the endpoint."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    worker = start_worker(setup, port, tmp_path)

    async def scenario() -> float:
        client = AsyncWorkerClient(endpoint, timeout_s=60, keys=setup[3])
        try:
            await client.complete(PROMPT, 4)
            stream = client.generate(PROMPT, LONG)
            assert isinstance(await stream.__anext__(), Token)
            kill(worker)
            t0 = time.monotonic()
            with pytest.raises(WorkerError, match=f"no reply from worker at {endpoint} .*died"):
                async for _ in stream:
                    pass
            return time.monotonic() - t0
        finally:
            client.close()

    try:
        assert asyncio.run(scenario()) < NOTICED_WITHIN_S
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(30)


def test_a_busy_live_worker_is_not_declared_dead(setup, tmp_path):
    """The other side of the rule: a client with a liveness of 0.3 s waits out a long request on a live
    worker (its pings are answered while the model decodes) and gets every token."""
    port = free_port()
    worker = start_worker(setup, port, tmp_path)
    try:
        with WorkerClient(f"tcp://127.0.0.1:{port}", timeout_s=60, keys=setup[3], liveness_s=0.3) as client:
            tokens, finished = client.complete(PROMPT, LONG)
            assert len(tokens) == finished.n_generated == LONG
    finally:
        worker.terminate()
        worker.wait(30)
