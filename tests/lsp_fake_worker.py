"""A fake inference worker for language-server tests: the real ZeroMQ ROUTER and the real protocol module,
with scripted answers instead of a model, so LSP behaviour tests are deterministic and fast.

    fake = FakeWorker(tok, f"ipc://{tmp_path}/fake.sock").start()
    fake.reply = "return a + b"           # every GenerateRequest streams these tokens, then <EOT>
    fake.token_delay_s = 0.05             # per token, so tests can cancel or edit mid-generation
    ... fake.requests (every GenerateRequest that reached it), fake.cancelled (request ids) ...
    fake.stop()

It counts what reaches it: that is what "reached the model" means in the cancellation tests.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import zmq

from codefill.inference_workers.protocol import (
    Cancel,
    Finished,
    FinishReason,
    GenerateRequest,
    Ping,
    Pong,
    Token,
    decode,
    encode,
)


@dataclass
class _Active:
    identity: bytes
    request: GenerateRequest
    ids: list[int]
    logprob: float
    started: float
    sent: int = 0
    next_at: float = 0.0


@dataclass
class FakeWorker:
    tok: object
    endpoint: str
    reply: str = "pass"
    logprob: float = -0.1
    token_delay_s: float = 0.0
    max_seq_len: int = 2048
    requests: list[GenerateRequest] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "FakeWorker":
        self._stop.clear()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(5)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except OSError:
                pass

    def _ids(self) -> list[int]:
        return self.tok.encode_infilling(self.reply) + [self.tok.eot_id]

    def _serve(self, ready: threading.Event) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        ready.set()
        active: dict[tuple[bytes, str], _Active] = {}
        try:
            while not self._stop.is_set():
                if sock.poll(2, zmq.POLLIN):
                    identity, frame = sock.recv_multipart()
                    msg = decode(frame, (GenerateRequest, Cancel, Ping))
                    if isinstance(msg, Ping):
                        sock.send_multipart([identity, encode(Pong(msg.nonce, os.getpid(), True, 0, len(active), 4,
                                                                   self.max_seq_len))])
                    elif isinstance(msg, GenerateRequest):
                        self.requests.append(msg)
                        now = time.monotonic()
                        ids = self._ids()[:msg.max_new_tokens]
                        active[(identity, msg.request_id)] = _Active(identity, msg, ids, self.logprob, now,
                                                                     next_at=now + self.token_delay_s)
                    else:
                        a = active.pop((identity, msg.request_id), None)
                        if a is not None:
                            self.cancelled.append(msg.request_id)
                            self._finish(sock, a, FinishReason.CANCELLED)
                now = time.monotonic()
                for key, a in list(active.items()):
                    while a.sent < len(a.ids) and now >= a.next_at:
                        sock.send_multipart([a.identity, encode(Token(a.request.request_id, a.ids[a.sent], a.logprob))])
                        a.sent += 1
                        a.next_at += self.token_delay_s
                    if a.sent == len(a.ids):
                        del active[key]
                        stopped = a.ids[-1] in a.request.stop_ids
                        self._finish(sock, a, FinishReason.STOP if stopped else FinishReason.LENGTH)
        finally:
            sock.close(linger=0)

    def _finish(self, sock, a: _Active, reason: FinishReason) -> None:
        elapsed = (time.monotonic() - a.started) * 1000
        sock.send_multipart([a.identity, encode(Finished(a.request.request_id, reason, len(a.request.prompt_ids),
                                                         a.sent, elapsed))])
