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


def test_curve_worker_serves_authorized_clients_only(keys, tmp_path_factory):
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
        endpoint = f"tcp://127.0.0.1:{port}"  # connect over loopback to the all-interfaces bind

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
    finally:
        worker.terminate()
        worker.wait(timeout=30)
