"""Starting `codefill http` as a user does (a subprocess on a free port) and talking to it over real sockets."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

HTTP = [sys.executable, "-m", "codefill.cli", "http", "--port", "0"]


@contextmanager
def running_http(model_dir: Path, log: Path, *args: str, wait_healthy: bool = True):
    """`codefill http --model model_dir ARGS` on a free loopback port; yields its base URL (once /health says
    ok, if `wait_healthy`). Its stderr goes to `log`; the test fails with the log if it never listens."""
    with open(log, "wb") as f:
        process = subprocess.Popen([*HTTP, "--model", str(model_dir), *args], stdin=subprocess.DEVNULL,
                                   stdout=f, stderr=subprocess.STDOUT)
    try:
        url = None
        deadline = time.monotonic() + 600  # a safety net for a server that never comes up, not a timing check
        while url is None:
            text = log.read_text(errors="replace")
            for line in text.splitlines():
                if line.startswith("codefill: listening on "):
                    url = line.split()[-1]
            if url is None:
                assert process.poll() is None, f"codefill http exited with {process.returncode}:\n{text}"
                assert time.monotonic() < deadline, f"codefill http never listened:\n{text}"
                time.sleep(0.05)
        while wait_healthy:
            status, _ = get(url + "/health")
            if status == 200:
                break
            assert process.poll() is None, f"codefill http exited:\n{log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, f"the worker never became healthy:\n{log.read_text()}"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(url: str, body, headers: dict | None = None) -> tuple[int, object]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_events(url: str, body: dict) -> list:
    """A streaming POST: the JSON of every `data:` event, "[DONE]" kept as the string."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def open_then_drop(url: str, path: str, body: dict, read_first_event: bool, until=None) -> None:
    """POST on a raw socket, optionally read until the first server-sent event, wait for `until()` if given,
    then close the connection."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        if read_first_event:
            got = b""
            while b"data: " not in got:
                chunk = s.recv(4096)
                assert chunk, f"the server closed the stream before any event: {got!r}"
                got += chunk
        if until is not None:
            until()


def wait_for(condition, what: str, limit_s: float = 60.0) -> None:
    """Poll until `condition()`; the limit is a safety net for a hang, not a timing check."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)
