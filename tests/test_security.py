"""Remote endpoints: refused by default, and with --allow-remote only for CURVE clients named in advance."""

import json
import subprocess
import sys
import time

import pytest

from codefill.inference_workers.client import WorkerClient, WorkerError
from codefill.inference_workers.launch import free_port
from codefill.inference_workers.protocol import WireError
from codefill.inference_workers.security import ClientKeys, ServerKeys, check_bind, generate_keys
from helpers import make_tiny_model_dir

CODEFILL = [sys.executable, "-m", "codefill.cli"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    server_pub, server_secret = generate_keys(root / "worker", "worker")
    generate_keys(root / "allowed", "laptop")  # the authorized directory holds laptop.key (and its secret)
    generate_keys(root / "stranger", "stranger")
    return root, server_pub, server_secret


def test_non_local_endpoints_need_the_flag_and_keys(keys, tmp_path):
    root, _, server_secret = keys
    server = ServerKeys(server_secret, root / "allowed")
    assert check_bind("ipc:///tmp/x.sock", False, None) == "ipc:///tmp/x.sock"
    assert check_bind("tcp://127.0.0.1:5555", False, None)
    with pytest.raises(WireError, match="--allow-remote"):
        check_bind("tcp://0.0.0.0:5555", False, server)
    with pytest.raises(WireError, match="needs CURVE keys"):
        check_bind("tcp://0.0.0.0:5555", True, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WireError, match="no NAME.key files"):
        check_bind("tcp://*:5555", True, ServerKeys(server_secret, tmp_path / "empty"))
    assert check_bind("tcp://0.0.0.0:5555", True, server) == "tcp://0.0.0.0:5555"


def test_keys_are_not_overwritten_and_secret_is_private(keys, tmp_path):
    public, secret = generate_keys(tmp_path, "a")
    assert oct(secret.stat().st_mode & 0o777) == "0o600" and public.exists()
    with pytest.raises(WireError, match="already exist"):
        generate_keys(tmp_path, "a")
    proc = subprocess.run([*CODEFILL, "keys", "--output", str(tmp_path), "--name", "a"], capture_output=True, text=True)
    assert proc.returncode == 2 and "refusing to overwrite" in proc.stderr


def test_cli_refuses_a_remote_bind_before_loading_the_model(tmp_path):
    proc = subprocess.run([*CODEFILL, "worker", "--model", str(tmp_path / "missing"), "--endpoint",
                           "tcp://0.0.0.0:5555"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--allow-remote" in proc.stderr and "missing" not in proc.stderr


@pytest.fixture(scope="module")
def curve_worker(keys, tmp_path_factory):
    """A worker bound on all interfaces with CURVE keys; yields (loopback endpoint, its process)."""
    root, server_pub, server_secret = keys
    model = make_tiny_model_dir(tmp_path_factory)
    port = free_port()
    ready = tmp_path_factory.mktemp("ready") / "ready.json"
    worker = subprocess.Popen([*CODEFILL, "worker", "--model", str(model), "--endpoint", f"tcp://0.0.0.0:{port}",
                               "--ready-file", str(ready), "--max-seq-len", "64", "--allow-remote",
                               "--curve-secret-key", str(server_secret),
                               "--curve-authorized-clients", str(root / "allowed")],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert worker.poll() is None, worker.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert json.loads(ready.read_text())["status"] == "ready"
        yield f"tcp://127.0.0.1:{port}", worker  # connect over loopback to the all-interfaces bind
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_curve_worker_serves_authorized_clients_only(keys, curve_worker):
    root, server_pub, _ = keys
    endpoint, worker = curve_worker
    allowed = ClientKeys(server_pub, root / "allowed" / "laptop.key_secret")
    with WorkerClient(endpoint, timeout_s=30, keys=allowed) as client:
        tokens, finished = client.complete([1, 5, 6, 7], 4)
        assert len(tokens) == finished.n_generated == 4

    stranger = ClientKeys(server_pub, root / "stranger" / "stranger.key_secret")
    with WorkerClient(endpoint, timeout_s=2, keys=stranger) as client:
        with pytest.raises(WorkerError):
            client.complete([1, 5, 6, 7], 4)
    with WorkerClient(endpoint, timeout_s=2) as plain:  # no CURVE at all
        with pytest.raises(WorkerError):
            plain.complete([1, 5, 6, 7], 4)
    assert worker.poll() is None  # refused connections never reached, let alone crashed, the worker


def test_the_language_servers_backend_reaches_a_curve_worker_with_its_keys(keys, curve_worker, tmp_path):
    """`codefill serve --endpoint E --curve-server-key worker.key --curve-secret-key laptop.key_secret`."""
    import asyncio
    from dataclasses import replace

    from codefill.lsp.backend import Backend
    from codefill.lsp.settings import Settings

    root, server_pub, _ = keys
    endpoint, _ = curve_worker
    settings = Settings(endpoint=endpoint, request_timeout_s=30, telemetry=False)
    allowed = ClientKeys(server_pub, root / "allowed" / "laptop.key_secret")

    async def ping(keys, timeout_s=30.0):
        backend = Backend(tmp_path, replace(settings, request_timeout_s=timeout_s), lambda message: None, keys=keys)
        try:
            link = await backend.get()
            return (await link.client.ping()).ready
        finally:
            backend.stop()
            await asyncio.sleep(0.2)  # the link's socket closes on the loop (Backend.close_link)

    assert asyncio.run(ping(allowed)) is True
    with pytest.raises(WorkerError):  # without them the worker never answers
        asyncio.run(ping(None, timeout_s=2.0))


def test_serve_takes_client_keys_only_together_and_with_an_endpoint(tmp_path):
    proc = subprocess.run([*CODEFILL, "serve", "--curve-server-key", "w.key"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "--curve-server-key and --curve-secret-key go together" in proc.stderr
    proc = subprocess.run([*CODEFILL, "serve", "--curve-server-key", "w.key", "--curve-secret-key", "l.key_secret"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "are for a remote --endpoint" in proc.stderr
