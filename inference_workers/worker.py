"""An inference worker: the serving engine behind a ZeroMQ ROUTER socket.

    python -m codefill.inference_workers.worker --model DIR --endpoint ipc:///tmp/x/worker.sock

`serve(runner, endpoint, ...)` is the whole worker around a runner.Runner: the single-process worker
(`main`, a Runner of world size 1) and rank 0 of a tensor-parallel group both call it. Two threads:

- the socket loop (the caller's thread) owns the socket: it decodes each frame against the message types it
  handles, dispatches through a table, answers Ping itself, and sends whatever the engine emitted;
- the engine's model thread (engine.py) runs the model steps and never touches the socket; it appends
  replies to an outbox and rings a doorbell (a pipe the socket loop polls).

So a frame that cannot be decoded (garbage, unknown tag, wrong field types, oversize) gets an `ErrorReply`
at once, health is answered while the model runs, and a model step that hangs is noticed by the socket
loop's watchdog (`EngineConfig.step_timeout_s`): every waiting request gets ErrorReply + Finished(ERROR) and
health turns not ready. The worker knows nothing about text beyond the stop-rule table (stops.py).

ReloadWeights swaps the served weights between steps with no request dropped or mixed (engine.py).

SIGTERM (or `stop_event`): stop admitting (new requests get ErrorReply "draining" + Finished(OVERLOADED)),
let queued and running requests finish for up to `drain_timeout_s`, fail the rest, return.

Startup is reported through `ready_file`, written atomically once: {"status": "ready", "endpoint": ...,
"pid": ...} after the socket is bound, or {"status": "error", "error": ..., "traceback": ...} if anything
before that raised.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from codefill.inference_workers.engine import Engine, EngineConfig
from codefill.inference_workers.memory_plan import MemoryConfig
from codefill.inference_workers.protocol import (
    Cancel,
    ErrorReply,
    GenerateRequest,
    Message,
    Ping,
    ReloadWeights,
    WireError,
    decode,
    encode,
)
from codefill.inference_workers.security import ServerKeys, check_bind, secure_server
from codefill.inference_workers.startup import SERVING_SLOTS, report_error, write_ready_file
from codefill.model.device import check_device_present

_POLL_MS = 100  # longest wait of the socket loop: watchdog, drain and parent checks run at least this often
_MAX_FRAMES_PER_TURN = 256  # frames read before the loop flushes replies and checks the watchdog again


class _Outbox:
    """Replies from any thread, sent by the socket loop in the order they were emitted."""

    def __init__(self) -> None:
        self.items: collections.deque[tuple[bytes, Message]] = collections.deque()
        self.bell_r, self.bell_w = os.pipe()
        os.set_blocking(self.bell_r, False)
        os.set_blocking(self.bell_w, False)

    def put(self, identity: bytes, msg: Message) -> None:
        self.items.append((identity, msg))  # deque.append is atomic
        self.ring()

    def ring(self) -> None:
        try:
            os.write(self.bell_w, b"\0")
        except BlockingIOError:  # the pipe is full of unread rings: the loop is waking up anyway
            pass

    def flush(self, sock: zmq.Socket) -> None:
        try:
            while os.read(self.bell_r, 4096):
                pass
        except BlockingIOError:
            pass
        while self.items:
            identity, msg = self.items.popleft()
            sock.send_multipart([identity, encode(msg)])  # to a vanished client: ROUTER drops it

    def close(self) -> None:
        os.close(self.bell_r)
        os.close(self.bell_w)


def serve(runner: Any, endpoint: str, *, table: Sequence[bytes] | None = None,
          config: EngineConfig = EngineConfig(), ready_file: str | Path | None = None,
          parent_pid: int | None = None, stop_event: threading.Event | None = None,
          allow_remote: bool = False, keys: ServerKeys | None = None) -> None:
    """Bind `endpoint`, serve requests on `runner` until SIGTERM, `stop_event` or the parent's death.

    runner: a runner.Runner (rank 0 of its ranks); serve does not close it. table: token id -> bytes for text stop rules
    (`stops.token_bytes_of_model_dir`); None refuses requests that use them. ready_file: see the module
    docstring. parent_pid: return when this process is no longer our parent. SIGTERM is handled only when
    serve runs in the main thread; otherwise set `stop_event`. Both drain (see the module docstring).
    allow_remote, keys: an endpoint other machines can reach is bound only with both (security.py).
    """
    ctx = zmq.Context()
    sock = outbox = engine = auth = None
    old_handler = None
    term = threading.Event()
    try:
        try:
            check_bind(endpoint, allow_remote, keys)
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            if keys is not None:
                auth = secure_server(ctx, sock, keys)
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as e:
                raise WireError(f"cannot bind {endpoint!r}: {e}") from e
            bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)  # the real port when endpoint ends in :*
            outbox = _Outbox()
            engine = Engine(runner, config, table, outbox.put)
        except Exception as e:
            report_error(ready_file, e)
            raise
        if threading.current_thread() is threading.main_thread():
            def on_term(signum, frame):
                term.set()
                outbox.ring()

            old_handler = signal.signal(signal.SIGTERM, on_term)
        engine.start()
        if ready_file is not None:
            write_ready_file(ready_file, {"status": "ready", "endpoint": bound, "pid": os.getpid()})
        kernels = "CPU kernels" if runner.kernels.library else f"stock ops: {runner.kernels.reason}"
        print(f"codefill worker {os.getpid()} ready on {bound} ({runner.max_batch} slots x {runner.max_seq_len}, "
              f"{kernels})", file=sys.stderr, flush=True)
        _SocketLoop(sock, engine, outbox, config, parent_pid, term, stop_event).run()
    finally:
        if engine is not None:
            engine.close(timeout_s=1.0)
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        if sock is not None:
            sock.close(linger=0)
        if auth is not None:
            auth.stop()
        if outbox is not None:
            outbox.close()
        ctx.term()


class _SocketLoop:
    def __init__(self, sock: zmq.Socket, engine: Engine, outbox: _Outbox, config: EngineConfig,
                 parent_pid: int | None, term: threading.Event, stop_event: threading.Event | None):
        self.sock, self.engine, self.outbox, self.config = sock, engine, outbox, config
        self.parent_pid, self.term, self.stop_event = parent_pid, term, stop_event
        self.handlers = {GenerateRequest: self._on_generate, Cancel: self._on_cancel, Ping: self._on_ping,
                         ReloadWeights: self._on_reload}

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.outbox.bell_r, zmq.POLLIN)
        drain_until: float | None = None
        while True:
            events = dict(poller.poll(_POLL_MS))
            if self.sock in events:
                for _ in range(_MAX_FRAMES_PER_TURN):
                    if not self.sock.poll(0, zmq.POLLIN):
                        break
                    self._receive_one()
            self.engine.check_watchdog()
            self._flush()
            if drain_until is None and (self.term.is_set() or (self.stop_event and self.stop_event.is_set())):
                print(f"codefill worker {os.getpid()}: draining for up to {self.config.drain_timeout_s} s",
                      file=sys.stderr, flush=True)
                self.engine.drain()
                drain_until = time.monotonic() + self.config.drain_timeout_s
            if drain_until is not None:
                if self.engine.idle():
                    return
                if time.monotonic() > drain_until:
                    self.engine.abort_all(f"draining: not finished within drain_timeout_s "
                                          f"{self.config.drain_timeout_s} s; the worker is exiting")
                    self._flush()
                    return
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                print(f"codefill worker {os.getpid()}: parent {self.parent_pid} is gone, exiting", file=sys.stderr)
                return

    def _flush(self) -> None:
        self.outbox.flush(self.sock)

    def _send(self, identity: bytes, msg: Message) -> None:
        self.outbox.put(identity, msg)  # through the outbox, so it is ordered after the engine's replies

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

    def _on_generate(self, identity: bytes, req: GenerateRequest) -> None:
        self.engine.submit(identity, req)

    def _on_cancel(self, identity: bytes, msg: Cancel) -> None:
        self.engine.cancel(identity, msg.request_id)  # unknown or finished: a normal race, nothing to do

    def _on_ping(self, identity: bytes, msg: Ping) -> None:
        self._send(identity, self.engine.health(msg.nonce))

    def _on_reload(self, identity: bytes, msg: ReloadWeights) -> None:
        self.engine.reload(identity, msg)  # answered with Reloaded by the model thread, between steps


def main(model_dir: str | Path, endpoint: str, ready_file: str | Path | None = None, *,
         max_seq_len: int | None = None, max_batch: int | None = None, parent_pid: int | None = None,
         config: EngineConfig = EngineConfig(), allow_remote: bool = False, keys: ServerKeys | None = None,
         device: str = "cpu", memory: MemoryConfig | None = None) -> None:
    """The single-process worker: load `model_dir` on a Runner of world size 1 with `max_batch` cache slots,
    serve it.

    device: where the model runs (checked present first); memory: its memory plan's settings, checked
    before any weight is loaded (memory_plan.py). max_batch None: as many slots as fit, at most SERVING_SLOTS.

    max_seq_len: positions per slot (prompt + new tokens); None: the runner's default, or less if the memory
    plan says so.
    parent_pid: exit when this process is no longer our parent (set by spawn_worker, so that a crashed
    language server does not leave a worker holding the model in memory).
    """
    try:
        check_bind(endpoint, allow_remote, keys)  # before loading anything
        check_device_present(device)
        from codefill.inference_workers.runner import Runner
        from codefill.inference_workers.stops import token_bytes_of_model_dir

        runner = Runner.from_model_dir(model_dir, max_seq_len=max_seq_len, max_batch=max_batch, compile_cache=True,
                                       device=device, memory=memory, default_max_batch=SERVING_SLOTS)
        runner.warm_up()  # both graphs compiled (or loaded from the compile cache) before "ready"
        table = token_bytes_of_model_dir(model_dir)
    except Exception as e:
        report_error(ready_file, e)
        raise
    try:
        serve(runner, endpoint, table=table, config=config, ready_file=ready_file, parent_pid=parent_pid,
              allow_remote=allow_remote, keys=keys)
    finally:
        runner.close()


if __name__ == "__main__":  # spawn_worker's entry: `python -m codefill.inference_workers.worker` is `codefill worker`
    from codefill.cli import main as cli_main

    sys.exit(cli_main(["worker", *sys.argv[1:]]))
