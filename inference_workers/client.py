"""Talking to an inference worker: stream tokens from it, cancel, ping (startup.py spawns one).

Two clients share one reply-checking core (`_Replies`):

- `WorkerClient`: blocking, for the CLI, benchmarks and tests.
- `AsyncWorkerClient`: `zmq.asyncio`, for the language server. Chosen over running the blocking client in a
  thread because cancellation then flows by itself: when the editor sends $/cancelRequest, pygls cancels the
  handler's task, the `await` on the socket raises CancelledError, and `generate`'s cleanup sends `Cancel`,
  so the worker stops within one token and is free for the next keystroke. A thread blocked in recv cannot be
  interrupted like that, and a zmq socket must not be shared between threads. One reader task routes
  replies to the request they belong to, so several completions can be in flight on one socket.

Both raise `WorkerError` (the one error type of this boundary) for a worker that fails a request, sends
something unreadable, or is silent for longer than `timeout_s`; its subclass `WorkerOverloaded` when the
worker refuses a request at once (full queue, draining). Other finish reasons (DEADLINE, CANCELLED,
SUPERSEDED, the stop rules) are normal ends: the caller reads `Finished.finish_reason`.

A dead worker is noticed within `liveness_s` (2 s by default), not at `timeout_s`: while a call waits, a
silence of PING_EVERY_S sends a Ping (the worker's socket loop answers it at once, even while its model
thread is busy), and a silence of `liveness_s`, pings included, fails the call with a WorkerError naming
the endpoint. That covers a worker process killed, a tensor-parallel job torn down by its launcher, and a
remote host gone. The DEALER also runs ZeroMQ heartbeats (ZMTP PING/PONG every HEARTBEAT_IVL_MS, the
connection dropped after HEARTBEAT_TIMEOUT_MS without an answer), so a connection to a host that vanished
without closing it is dropped and redialled instead of left half-open.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from codefill.errors import CodefillError
from codefill.inference_workers.protocol import (
    Cancel,
    ErrorReply,
    Finished,
    FinishReason,
    GenerateRequest,
    Ping,
    Pong,
    Reloaded,
    ReloadWeights,
    Token,
    WireError,
    check_endpoint,
    decode,
    encode,
)
from codefill.inference_workers.security import ClientKeys, secure_client

REPLY_TYPES = (Token, Finished, ErrorReply, Pong, Reloaded)
LIVENESS_S = 2.0  # default: nothing at all heard for this long while waiting (pings included) = gone
PING_EVERY_S = 0.5  # silence after which a waiting call pings the worker (at most liveness_s / 4)
HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 500, 1500


class WorkerError(CodefillError, RuntimeError):
    """A worker that cannot be started or reached, or that failed a request; the message says which and why."""


class WorkerOverloaded(WorkerError):
    """The worker refused a request at once (queue full, or draining): retrying later may work."""


@dataclass(frozen=True)
class StopRules:
    """The text stop rules of a request (see stops.py); the defaults stop on nothing but stop ids."""

    stop_strings: tuple[str, ...] = ()
    stop_at_eol: bool = False
    dedent_column: int = 0  # 0 = off
    min_new_tokens: int = 0  # the stop ids are held back until this many ids were generated; 0 = off


def _request(request_id: str, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Any,
             stop_ids: Sequence[int], rules: StopRules | None = None,
             deadline_s: float | None = None, required_prefix: str = "") -> GenerateRequest:
    """`sampling` is a model.sampling.SamplingConfig or anything with its four fields; None is greedy."""
    rules = rules or StopRules()
    try:
        greedy = sampling is None
        return GenerateRequest(request_id, list(prompt_ids), max_new_tokens,
                               0.0 if greedy else sampling.temperature, 0 if greedy else sampling.top_k,
                               1.0 if greedy else sampling.top_p, 0 if greedy else sampling.seed, list(stop_ids),
                               list(rules.stop_strings), rules.stop_at_eol, rules.dedent_column,
                               0.0 if deadline_s is None else deadline_s * 1000.0, required_prefix,
                               rules.min_new_tokens)
    except WireError as e:
        raise WorkerError(f"invalid request: {e}") from e


class _Replies:
    """Checks the replies to one request: Token*, [ErrorReply], Finished."""

    def __init__(self, endpoint: str, request_id: str):
        self.endpoint, self.request_id = endpoint, request_id
        self.error: str | None = None
        self.done = False

    def accept(self, msg: Any) -> Token | Finished | None:
        """The message to hand to the caller, None to skip it, or WorkerError."""
        if isinstance(msg, ErrorReply):
            if msg.request_id == "":  # the worker could not read a frame we sent: a bug on this side
                raise WorkerError(f"worker at {self.endpoint} rejected a frame: {msg.message}")
            self.error = msg.message
            return None
        if isinstance(msg, Finished):
            self.done = True
            if msg.finish_reason == FinishReason.ERROR:
                raise WorkerError(f"worker at {self.endpoint} failed: {self.error or 'no reason given'}")
            if msg.finish_reason == FinishReason.OVERLOADED:
                raise WorkerOverloaded(f"worker at {self.endpoint} refused the request: "
                                       f"{self.error or 'overloaded'}")
        return msg


def _decode_reply(endpoint: str, frame: bytes) -> Any:
    try:
        return decode(frame, REPLY_TYPES)
    except WireError as e:
        raise WorkerError(f"unreadable reply from worker at {endpoint}: {e}") from e


def _connect(ctx: zmq.Context, endpoint: str, keys: ClientKeys | None, timeout_s: float) -> zmq.Socket:
    """A DEALER socket connected to a worker: a local endpoint, or with CURVE keys any endpoint.

    A DEALER with no completed connection (worker not started yet, or a CURVE handshake the worker refused)
    blocks on send; SNDTIMEO turns that into zmq.Again after `timeout_s`, which callers report."""
    try:
        check_endpoint(endpoint, allow_remote=keys is not None)
    except WireError as e:
        raise WorkerError(str(e)) from e
    if endpoint.endswith(":*"):
        raise WorkerError(f"cannot connect to {endpoint!r}: a port of * only makes sense when binding")
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    if keys is not None:
        try:
            secure_client(sock, keys)
        except WireError as e:
            sock.close(linger=0)
            raise WorkerError(str(e)) from e
    sock.connect(endpoint)
    return sock


def _unreachable(endpoint: str, timeout_s: float) -> WorkerError:
    return WorkerError(f"cannot reach the worker at {endpoint} within {timeout_s} s "
                       f"(not running, or it refused this client's keys)")


def _new_request_id() -> str:
    return uuid.uuid4().hex


def _gone(endpoint: str, silent_s: float, what: str) -> WorkerError:
    return WorkerError(f"no reply from worker at {endpoint} for {silent_s:.1f} s while {what}, health pings "
                       f"included: the worker died or the connection to it is down")


class _Silence:
    """When to ping and when to give up, for one wait (see the module docstring)."""

    def __init__(self, timeout_s: float, liveness_s: float):
        self.start = time.monotonic()
        self.deadline = self.start + timeout_s
        self.liveness_s = liveness_s
        self.heard = self.start  # last frame of any kind from the worker, or the start of this wait

    def next_wait_s(self) -> float:
        """Seconds to wait for a frame before the next ping (or the end)."""
        now = time.monotonic()
        every = min(PING_EVERY_S, self.liveness_s / 4)  # a few pings go unanswered before the verdict
        return max(0.0, min(self.deadline, self.heard + self.liveness_s, now + every) - now)

    def check(self, endpoint: str, timeout_s: float, what: str) -> None:
        """WorkerError if the wait is over; else the caller pings and waits again."""
        now = time.monotonic()
        if now >= self.deadline:
            raise WorkerError(f"no reply from worker at {endpoint} within {timeout_s} s while {what}")
        if now - self.heard >= self.liveness_s:
            raise _gone(endpoint, now - self.heard, what)


class WorkerClient:
    """Blocking client on a DEALER socket. Not thread-safe (no zmq socket is); one per thread."""

    def __init__(self, endpoint: str, timeout_s: float = 60.0, context: zmq.Context | None = None, *,
                 keys: ClientKeys | None = None, liveness_s: float = LIVENESS_S):
        self.endpoint, self.timeout_s, self.liveness_s = endpoint, timeout_s, liveness_s
        self._ctx = context or zmq.Context.instance()
        self._sock = _connect(self._ctx, endpoint, keys, timeout_s)
        self._nonces = itertools.count(1)
        self._liveness_pings: set[int] = set()  # nonces of the pings _recv sent while waiting

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _recv(self, what: str, timeout_s: float | None = None) -> Any:
        """The next frame; WorkerError at the timeout, or sooner when the worker is gone (module docstring)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        silence = _Silence(timeout_s, self.liveness_s)
        while True:
            if self._sock.poll(int(silence.next_wait_s() * 1000) + 1, zmq.POLLIN):
                msg = _decode_reply(self.endpoint, self._sock.recv())
                if not (isinstance(msg, Pong) and msg.nonce in self._liveness_pings):
                    return msg
                self._liveness_pings.discard(msg.nonce)  # ours: the worker is alive; keep waiting
                silence.heard = time.monotonic()
                continue
            silence.check(self.endpoint, timeout_s, what)
            nonce = next(self._nonces)
            with contextlib.suppress(zmq.ZMQError):  # no connection: the silence check will say so
                self._sock.send(encode(Ping(nonce)), zmq.NOBLOCK)
                self._liveness_pings.add(nonce)

    def send(self, msg: Any) -> None:
        try:
            self._sock.send(encode(msg))
        except zmq.Again:
            raise _unreachable(self.endpoint, self.timeout_s) from None

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Any = None,
                 stop_ids: Sequence[int] = (), request_id: str | None = None, *, rules: StopRules | None = None,
                 deadline_s: float | None = None, required_prefix: str = "") -> Iterator[Token | Finished]:
        """Yield each Token as the worker sends it, then the Finished. Closing the iterator early cancels.
        Raises WorkerError for Finished(ERROR), WorkerOverloaded for Finished(OVERLOADED)."""
        replies = _Replies(self.endpoint, request_id or _new_request_id())
        self.send(_request(replies.request_id, prompt_ids, max_new_tokens, sampling, stop_ids, rules, deadline_s,
                           required_prefix))
        try:
            while not replies.done:
                msg = self._recv(f"generating {replies.request_id}")
                if getattr(msg, "request_id", None) != replies.request_id:
                    continue  # a late reply to an earlier, abandoned request
                out = replies.accept(msg)
                if out is not None:
                    yield out
        finally:
            if not replies.done:
                self.cancel(replies.request_id)

    def complete(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Any = None,
                 stop_ids: Sequence[int] = (), *, rules: StopRules | None = None,
                 deadline_s: float | None = None, required_prefix: str = "") -> tuple[list[Token], Finished]:
        tokens: list[Token] = []
        for msg in self.generate(prompt_ids, max_new_tokens, sampling, stop_ids, rules=rules, deadline_s=deadline_s,
                                 required_prefix=required_prefix):
            if isinstance(msg, Token):
                tokens.append(msg)
            else:
                return tokens, msg
        raise WorkerError(f"worker at {self.endpoint} ended a request without Finished")  # unreachable

    def cancel(self, request_id: str) -> None:
        self.send(Cancel(request_id))

    def reload(self, model_dir: str | Path, timeout_s: float | None = None) -> Reloaded:
        """Make the worker serve the weights of `model_dir` (a path it can read; made absolute here). Returns
        once the worker switched: running requests finish on the old weights first, so this waits for them.
        Raises WorkerError with the worker's reason when it refuses (then the old weights still serve), or
        when no answer comes within `timeout_s` (default: this client's timeout)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        request_id = _new_request_id()
        try:
            msg = ReloadWeights(request_id, str(Path(model_dir).absolute()))
        except WireError as e:
            raise WorkerError(f"invalid reload request: {e}") from e
        self.send(msg)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"no answer from worker at {self.endpoint} within {timeout_s} s to the reload of "
                                  f"{msg.model_dir}")
            reply = self._recv(f"reloading {msg.model_dir}", left)
            if isinstance(reply, ErrorReply) and reply.request_id == "":
                raise WorkerError(f"worker at {self.endpoint} rejected a frame: {reply.message}")
            if isinstance(reply, Reloaded) and reply.request_id == request_id:
                if not reply.ok:
                    raise WorkerError(f"worker at {self.endpoint} did not reload {msg.model_dir}: {reply.message}")
                return reply

    def ping(self) -> Pong:
        """The worker's health (Pong.ready, queue, active requests); answered even while it generates."""
        nonce = next(self._nonces)
        self.send(Ping(nonce))
        while True:
            msg = self._recv("waiting for Pong")
            if isinstance(msg, Pong) and msg.nonce == nonce:
                return msg


class AsyncWorkerClient:
    """asyncio client on a zmq.asyncio DEALER socket; create and use it inside one running event loop."""

    def __init__(self, endpoint: str, timeout_s: float = 60.0, *, keys: ClientKeys | None = None,
                 liveness_s: float = LIVENESS_S):
        self.endpoint, self.timeout_s, self.liveness_s = endpoint, timeout_s, liveness_s
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = _connect(self._ctx, endpoint, keys, timeout_s)
        self._nonces = itertools.count(1)
        self._queues: dict[str | int, asyncio.Queue] = {}  # request id or ping nonce -> its replies
        self._reader: asyncio.Task | None = None
        self._reader_error: WorkerError | None = None
        self._heard = 0.0  # monotonic time of the last frame from the worker

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self._sock.close(linger=0)

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())

    async def _read_forever(self) -> None:
        while True:
            frame = await self._sock.recv()
            self._heard = time.monotonic()
            try:
                msg = decode(frame, REPLY_TYPES)
            except WireError as e:
                msg = ErrorReply("", f"unreadable reply: {e}")
            key = msg.nonce if isinstance(msg, Pong) else msg.request_id
            if key == "":  # not attributable: every waiter sees it
                for q in self._queues.values():
                    q.put_nowait(msg)
            elif (q := self._queues.get(key)) is not None:
                q.put_nowait(msg)
            # else: a reply to an abandoned request; drop it

    async def _get(self, q: asyncio.Queue, what: str) -> Any:
        """The next reply in `q`; WorkerError at the timeout, or sooner when the worker is gone."""
        silence = _Silence(self.timeout_s, self.liveness_s)
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancellation that arrives as the
            # queue hands over a reply, and the request would then run on without sending Cancel.
            try:
                async with asyncio.timeout(silence.next_wait_s()):
                    return await q.get()
            except TimeoutError:
                pass
            silence.heard = max(silence.heard, self._heard)  # any frame counts, another request's too
            silence.check(self.endpoint, self.timeout_s, what)
            with contextlib.suppress(zmq.ZMQError):  # no connection: the silence check will say so
                self._sock.send(encode(Ping(next(self._nonces))), zmq.NOBLOCK)

    async def _send(self, msg: Any) -> None:
        try:
            await self._sock.send(encode(msg))
        except zmq.Again:
            raise _unreachable(self.endpoint, self.timeout_s) from None

    async def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Any = None,
                       stop_ids: Sequence[int] = (), request_id: str | None = None, *,
                       rules: StopRules | None = None,
                       deadline_s: float | None = None, required_prefix: str = "") -> AsyncIterator[Token | Finished]:
        """Yield each Token, then the Finished. If the consumer is cancelled or stops early, send Cancel."""
        replies = _Replies(self.endpoint, request_id or _new_request_id())
        q: asyncio.Queue = asyncio.Queue()
        self._queues[replies.request_id] = q
        self._ensure_reader()
        try:
            await self._send(_request(replies.request_id, prompt_ids, max_new_tokens, sampling, stop_ids, rules,
                                      deadline_s, required_prefix))
            while not replies.done:
                out = replies.accept(await self._get(q, f"generating {replies.request_id}"))
                if out is not None:
                    yield out
        finally:
            del self._queues[replies.request_id]
            if not replies.done:
                # No await here: this runs during cancellation, and a DEALER send never blocks in practice
                # (it queues). NOBLOCK keeps it that way if the worker is gone.
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.send(encode(Cancel(replies.request_id)), zmq.NOBLOCK)

    async def complete(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Any = None,
                       stop_ids: Sequence[int] = (), *, rules: StopRules | None = None,
                       deadline_s: float | None = None, required_prefix: str = "") -> tuple[list[Token], Finished]:
        tokens: list[Token] = []
        async for msg in self.generate(prompt_ids, max_new_tokens, sampling, stop_ids, rules=rules,
                                       deadline_s=deadline_s, required_prefix=required_prefix):
            if isinstance(msg, Token):
                tokens.append(msg)
            else:
                return tokens, msg
        raise WorkerError(f"worker at {self.endpoint} ended a request without Finished")  # unreachable

    async def ping(self) -> Pong:
        nonce = next(self._nonces)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[nonce] = q
        self._ensure_reader()
        try:
            await self._send(Ping(nonce))
            while True:
                msg = await self._get(q, "waiting for Pong")
                if isinstance(msg, ErrorReply):
                    raise WorkerError(f"worker at {self.endpoint} rejected a Ping: {msg.message}")
                if isinstance(msg, Pong):
                    return msg
        finally:
            del self._queues[nonce]
