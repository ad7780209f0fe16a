"""One inference worker: a model behind a ZeroMQ ROUTER socket, serving one request at a time.

    python -m codefill.inference_workers.worker --model DIR --endpoint ipc:///tmp/x/worker.sock

The worker knows nothing about text: it receives `GenerateRequest`s of token ids and streams back one
`Token` per generated id, then one `Finished` (see protocol.py for the whole conversation). Between two
decode steps it reads whatever has arrived, so a `Cancel` stops the running request after at most one more
token, a `Ping` is answered while generating, and new requests queue behind the running one.

A frame it cannot decode (garbage, unknown tag, wrong field types, oversize) is answered with an
`ErrorReply` and the worker carries on; an exception inside generation ends that request with
`ErrorReply` + `Finished(ERROR)` and the worker carries on. Only startup can fail the process.

Startup is reported to whoever spawned the worker (client.spawn_worker) through `ready_file`, written
atomically once: {"status": "ready", "endpoint": ..., "pid": ...} after the socket is bound, or
{"status": "error", "error": ..., "traceback": ...} if anything before that raised.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from codefill.inference_workers.protocol import (
    Cancel,
    ErrorReply,
    Finished,
    FinishReason,
    GenerateRequest,
    Ping,
    Pong,
    Token,
    WireError,
    check_endpoint,
    decode,
    encode,
)

_POLL_MS = 500  # idle poll period; also how quickly the worker notices that its parent died


@dataclass
class _Pending:
    identity: bytes  # ROUTER routing id of the client that sent it
    request: GenerateRequest
    received: float  # time.perf_counter() when it arrived


class Worker:
    """The serving loop around a generator: anything with Generator's `generate(prompt_ids, max_new_tokens,
    sampling, stop_ids)` and `max_seq_len` (tests pass a stand-in)."""

    def __init__(self, generator: Any, sock: zmq.Socket, parent_pid: int | None = None):
        self.generator = generator
        self.sock = sock
        self.parent_pid = parent_pid
        self.queue: collections.deque[_Pending] = collections.deque()
        self.running: _Pending | None = None
        self.cancel_running = False
        self.handlers = {GenerateRequest: self._on_generate, Cancel: self._on_cancel, Ping: self._on_ping}

    # --- loop ---

    def serve_forever(self) -> None:
        while True:
            if self.queue:
                self._run(self.queue.popleft())
                continue
            if self.sock.poll(_POLL_MS, zmq.POLLIN):
                self._receive_one()
            elif self.parent_pid is not None and os.getppid() != self.parent_pid:
                print(f"codefill worker {os.getpid()}: parent {self.parent_pid} is gone, exiting", file=sys.stderr)
                return

    def _drain(self) -> None:
        """Handle every frame that has already arrived, without waiting."""
        while self.sock.poll(0, zmq.POLLIN):
            self._receive_one()

    def _send(self, identity: bytes, msg: Any) -> None:
        self.sock.send_multipart([identity, encode(msg)])

    def _receive_one(self) -> None:
        frames = self.sock.recv_multipart(copy=True)
        identity, payload = frames[0], frames[1:]
        if len(payload) != 1:
            self._send(identity, ErrorReply("", f"expected 1 frame after the routing id, got {len(payload)}"))
            return
        try:
            msg = decode(payload[0], tuple(self.handlers))
        except WireError as e:
            self._send(identity, ErrorReply("", f"bad frame: {e}"))
            return
        handler = self.handlers.get(type(msg))
        if handler is None:  # decode only returns expected types; this guards the table itself
            raise RuntimeError(f"no handler for {type(msg).__name__}")
        handler(identity, msg)

    # --- handlers ---

    def _on_generate(self, identity: bytes, req: GenerateRequest) -> None:
        self.queue.append(_Pending(identity, req, time.perf_counter()))

    def _on_cancel(self, identity: bytes, msg: Cancel) -> None:
        if self.running is not None and (self.running.identity, self.running.request.request_id) == (
            identity,
            msg.request_id,
        ):
            self.cancel_running = True
            return
        for p in self.queue:
            if (p.identity, p.request.request_id) == (identity, msg.request_id):
                self.queue.remove(p)
                self._finish(p, FinishReason.CANCELLED, 0)
                return
        # Unknown or already finished: a cancel racing the end of its request is normal; nothing to do.

    def _on_ping(self, identity: bytes, msg: Ping) -> None:
        busy, n_queued = self.running is not None, len(self.queue)
        self._send(identity, Pong(msg.nonce, os.getpid(), busy, n_queued, self.generator.max_seq_len))

    # --- generation ---

    def _finish(self, p: _Pending, reason: FinishReason, n_generated: int) -> None:
        elapsed_ms = (time.perf_counter() - p.received) * 1000.0
        req = p.request
        self._send(p.identity, Finished(req.request_id, reason, len(req.prompt_ids), n_generated, elapsed_ms))

    def _run(self, p: _Pending) -> None:
        from codefill.model.sampling import SamplingConfig

        req = p.request
        self.running, self.cancel_running = p, False
        n_generated, reason = 0, FinishReason.LENGTH
        try:
            sampling = SamplingConfig(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed)
            stop_ids = frozenset(req.stop_ids)
            stream = self.generator.generate(req.prompt_ids, req.max_new_tokens, sampling, stop_ids=stop_ids)
            try:
                for token_id, logprob in stream:
                    self._send(p.identity, Token(req.request_id, int(token_id), float(logprob)))
                    n_generated += 1
                    if token_id in stop_ids:
                        reason = FinishReason.STOP
                        break
                    self._drain()
                    if self.cancel_running:
                        reason = FinishReason.CANCELLED
                        break
            finally:
                close = getattr(stream, "close", None)  # a Python generator: frees its state if stopped early
                if close is not None:
                    close()
        except Exception as e:
            # One bad request must not take the worker down: report it, keep serving.
            traceback.print_exc(file=sys.stderr)
            message = f"request {req.request_id!r} failed after {n_generated} tokens: {type(e).__name__}: {e}"
            self._send(p.identity, ErrorReply(req.request_id, message[:4096]))
            reason = FinishReason.ERROR
        finally:
            self.running = None
        self._finish(p, reason, n_generated)


def _write_ready_file(path: Path, status: dict[str, Any]) -> None:
    # Write then rename, so the parent never reads half a file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


def main(
    model_dir: str | Path,
    endpoint: str,
    ready_file: str | Path | None = None,
    *,
    max_seq_len: int | None = None,
    parent_pid: int | None = None,
) -> None:
    """Load the model in `model_dir`, bind `endpoint`, report ready, serve until killed (or the parent dies).

    max_seq_len: the generator's context (prompt + new tokens); None leaves Generator's default.
    parent_pid: exit when this process is no longer our parent (set by spawn_worker, so that a crashed
    language server does not leave a worker holding the model in memory).
    """
    ready_path = Path(ready_file) if ready_file is not None else None
    ctx = zmq.Context()
    sock = None
    try:
        try:
            check_endpoint(endpoint)
            from codefill.model.generate import Generator

            kwargs: dict[str, Any] = {"max_batch": 1}
            if max_seq_len is not None:
                kwargs["max_seq_len"] = max_seq_len
            generator = Generator.from_model_dir(Path(model_dir), **kwargs)
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as e:
                raise WireError(f"cannot bind {endpoint!r}: {e}") from e
            bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)  # the real port when endpoint ends in :*
        except Exception as e:
            if ready_path is not None:
                _write_ready_file(
                    ready_path,
                    {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()},
                )
            raise
        if ready_path is not None:
            _write_ready_file(ready_path, {"status": "ready", "endpoint": bound, "pid": os.getpid()})
        print(f"codefill worker {os.getpid()} ready on {bound} (model {model_dir})", file=sys.stderr, flush=True)
        # SIGTERM (stop_worker) unwinds through the finally below, so the socket is closed cleanly.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        Worker(generator, sock, parent_pid).serve_forever()
    finally:
        if sock is not None:
            sock.close(linger=0)
        ctx.term()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m codefill.inference_workers.worker", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory (checkpoint.load_model_dir layout)")
    p.add_argument("--endpoint", required=True, help="ipc://PATH, tcp://127.0.0.1:PORT or tcp://localhost:PORT")
    p.add_argument("--ready-file", help="where to write the ready/error status JSON")
    p.add_argument("--max-seq-len", type=int, help="context length of the generator (prompt + new tokens)")
    p.add_argument("--parent-pid", type=int, help="exit when this process stops being the parent")
    return p.parse_args(argv)


if __name__ == "__main__":
    args = _parse_args(None)
    try:
        main(args.model, args.endpoint, args.ready_file, max_seq_len=args.max_seq_len, parent_pid=args.parent_pid)
    except KeyboardInterrupt:
        pass
    except Exception as e:
        # The traceback is already in the ready file when there is one; stderr gets the full story anyway.
        traceback.print_exc()
        print(f"codefill worker: error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
