"""The wire between the language server and the inference workers: typed messages, nothing else.

A frame is one byte of `MessageType` followed by a msgpack array holding the message's fields in
declaration order:

    b"\\x01" + msgpack([request_id, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids,
                        stop_strings, stop_at_eol, dedent_column, deadline_ms])

`decode(frame, expected)` reads the tag, refuses any type the caller did not expect, then rebuilds the
dataclass, whose `__post_init__` checks every field's type and range. Building a message checks it the
same way, so a bad value is caught on the side that made it. Every failure is a `WireError` naming the
offending value. Nothing here is pickled: a frame can only ever become one of the dataclasses below.

Workers see token ids only; tokenizing and prompt formats stay on the language-server side. The one
exception is stop rules on text (stop strings, end of line, dedent): the worker matches them on the bytes
of the generated pieces (a token -> bytes table, `stops.py`) and reports where the answer ends.

Conversation for one request (DEALER client <-> ROUTER worker):

    client: GenerateRequest(id)
    worker: Token(id) ... Token(id)   one per generated token, the stop token included
    worker: [ErrorReply(id)]          before Finished(ERROR) and Finished(OVERLOADED): the reason
    worker: Finished(id)              always last, exactly once per decoded GenerateRequest
    client: Cancel(id)                at any time; the worker stops between two tokens
    client: Ping(nonce) -> worker: Pong(nonce, ready, ...)   health, answered even while generating

Publishing new weights (`codefill train --repo ... --publish`, training/refresh.py):

    client: ReloadWeights(id, model_dir)
    worker: Reloaded(id, ok, message, weights_version)   once, after the switch or the refusal

The engine stops admitting requests, lets the running ones finish on the old weights, loads and checks the
new directory (every rank, for tensor parallelism) and switches only if all of it loaded; `ok` False means
nothing changed and the old weights keep serving (`message` says why).

Request ids are scoped to the client's connection: two clients may both use "1".

A frame the worker cannot decode gets `ErrorReply(request_id="", message)`.

To add a message: give it a new `MessageType` value, write its dataclass with `TYPE` and checks in
`__post_init__`, and add it to `MESSAGES`. Fields are positional on the wire, so both sides must be
built from the same version of this file; that holds because the worker is always spawned by, or shipped
with, the same codefill.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from codefill.errors import CodefillError

# A 16k-token prompt is ~80 KiB of msgpack; the cap only has to stop a runaway or hostile frame.
MAX_FRAME_BYTES = 8 * 1024 * 1024
MAX_TOKENS = 1 << 20  # per prompt, per stop list, per max_new_tokens
MAX_TOKEN_ID = (1 << 31) - 1
MAX_REQUEST_ID_LEN = 128
MAX_MESSAGE_LEN = 64 * 1024  # ErrorReply text
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_PATH_LEN = 4096  # ReloadWeights.model_dir (Linux PATH_MAX)


class WireError(CodefillError, ValueError):
    """A frame or message that breaks this protocol; the message names the offending value."""


class MessageType(enum.IntEnum):
    """The first byte of every frame."""

    GENERATE_REQUEST = 1
    TOKEN = 2
    FINISHED = 3
    CANCEL = 4
    ERROR_REPLY = 5
    PING = 6
    PONG = 7
    RELOAD_WEIGHTS = 8
    RELOADED = 9


class FinishReason(enum.IntEnum):
    STOP = 1  # a stop id was generated (it was sent as the last Token)
    LENGTH = 2  # max_new_tokens reached
    CANCELLED = 3  # a Cancel arrived before either of the above
    ERROR = 4  # the worker failed; an ErrorReply with the reason came just before
    STOP_STRING = 5  # the generated text contains one of stop_strings (Finished.text_bytes cuts before it)
    END_OF_LINE = 6  # stop_at_eol: a newline after some non-blank generated text (cut before the newline)
    DEDENT = 7  # a generated line starts left of dedent_column (cut before that line's newline)
    DEADLINE = 8  # deadline_ms passed: dropped from the queue unstarted, or stopped between two tokens
    OVERLOADED = 9  # refused at once: the queue is full or the worker is draining (ErrorReply says which)
    SUPERSEDED = 10  # a newer request from the same client extended this one's prompt and took over its decode

# ---- field checks: each returns the value (possibly normalised) or raises WireError ----


def _where(msg: Any, name: str) -> str:
    return f"{type(msg).__name__}.{name}"


def _int(msg: Any, name: str, lo: int, hi: int) -> None:
    value = getattr(msg, name)
    # bool is an int subclass; True as a token count is a bug on the sending side.
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"{_where(msg, name)} must be an int, got {type(value).__name__} {value!r:.80}")
    if not lo <= value <= hi:
        raise WireError(f"{_where(msg, name)} = {value} is out of range [{lo}, {hi}]")


def _float(msg: Any, name: str, lo: float, hi: float) -> None:
    value = getattr(msg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WireError(f"{_where(msg, name)} must be a float, got {type(value).__name__} {value!r:.80}")
    value = float(value)
    object.__setattr__(msg, name, value)  # frozen dataclass; normalise ints like 0 to 0.0
    if math.isnan(value) or not lo <= value <= hi:
        raise WireError(f"{_where(msg, name)} = {value} is out of range [{lo}, {hi}]")


def _str(msg: Any, name: str, max_len: int, min_len: int = 0) -> None:
    value = getattr(msg, name)
    if not isinstance(value, str):
        raise WireError(f"{_where(msg, name)} must be a str, got {type(value).__name__} {value!r:.80}")
    if not min_len <= len(value) <= max_len:
        raise WireError(f"{_where(msg, name)} has length {len(value)}, allowed [{min_len}, {max_len}]")


def _token_ids(msg: Any, name: str, min_len: int) -> None:
    value = getattr(msg, name)
    if isinstance(value, tuple):
        value = list(value)
        object.__setattr__(msg, name, value)
    if not isinstance(value, list):
        raise WireError(f"{_where(msg, name)} must be a list of token ids, got {type(value).__name__}")
    if not min_len <= len(value) <= MAX_TOKENS:
        raise WireError(f"{_where(msg, name)} has {len(value)} ids, allowed [{min_len}, {MAX_TOKENS}]")
    for i, t in enumerate(value):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= MAX_TOKEN_ID:
            raise WireError(f"{_where(msg, name)}[{i}] = {t!r:.80} is not a token id in [0, {MAX_TOKEN_ID}]")


def _enum(msg: Any, name: str, enum_cls: type[enum.IntEnum]) -> None:
    value = getattr(msg, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"{_where(msg, name)} must be an int {enum_cls.__name__}, got {value!r:.80}")
    try:
        object.__setattr__(msg, name, enum_cls(value))
    except ValueError:
        valid = ", ".join(f"{m.name}={m.value}" for m in enum_cls)
        raise WireError(f"{_where(msg, name)} = {value} is not a {enum_cls.__name__} ({valid})") from None


def _bool(msg: Any, name: str) -> None:
    value = getattr(msg, name)
    if not isinstance(value, bool):
        raise WireError(f"{_where(msg, name)} must be a bool, got {type(value).__name__} {value!r:.80}")


def _strings(msg: Any, name: str, max_items: int, max_len: int) -> None:
    value = getattr(msg, name)
    if isinstance(value, tuple):
        value = list(value)
        object.__setattr__(msg, name, value)
    if not isinstance(value, list) or len(value) > max_items:
        got = f"{len(value)} items" if isinstance(value, list) else type(value).__name__
        raise WireError(f"{_where(msg, name)} must be a list of at most {max_items} strings, got {got}")
    for i, s in enumerate(value):
        if not isinstance(s, str) or not 1 <= len(s) <= max_len:
            raise WireError(f"{_where(msg, name)}[{i}] = {s!r:.80} is not a str of length [1, {max_len}]")


def _request_id(msg: Any, allow_empty: bool = False) -> None:
    _str(msg, "request_id", MAX_REQUEST_ID_LEN, min_len=0 if allow_empty else 1)


# ---- messages ----


@dataclass(frozen=True)
class GenerateRequest:
    TYPE: ClassVar[MessageType] = MessageType.GENERATE_REQUEST
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    stop_ids: list[int] = dataclasses.field(default_factory=list)  # e.g. <EOT>, EOS; the stop id is sent
    # Stop rules on the generated *text* (the worker's token -> bytes table; see stops.py). The Token that
    # completes a match is sent; Finished.text_bytes says where the answer's text ends.
    stop_strings: list[str] = dataclasses.field(default_factory=list)
    stop_at_eol: bool = False  # end at the first newline after some non-blank generated text
    dedent_column: int = 0  # end when a generated line starts with fewer than this many blanks; 0 = off
    # Milliseconds after the worker receives the request: unstarted by then -> dropped, running -> stopped,
    # both with Finished(DEADLINE). 0 = no deadline.
    deadline_ms: float = 0.0
    # Token healing: the generated text must start with this (the partial identifier the language server
    # backed off from the prompt). Tokens are constrained until it is covered; "" = off.
    required_prefix: str = ""
    # The stop ids are held back (never chosen) until this many ids were generated: a language server asking
    # for a suggestion on a blank line wants some text, not an answer that ends before it starts. 0 = off.
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        _request_id(self)
        _token_ids(self, "prompt_ids", min_len=1)
        _int(self, "max_new_tokens", 1, MAX_TOKENS)
        _float(self, "temperature", 0.0, 100.0)
        _int(self, "top_k", 0, MAX_TOKEN_ID)
        # top_p = 0 would keep no token at all; the smallest useful nucleus is "just the best one".
        _float(self, "top_p", 1e-9, 1.0)
        _int(self, "seed", 0, (1 << 64) - 1)
        _token_ids(self, "stop_ids", min_len=0)
        _strings(self, "stop_strings", MAX_STOP_STRINGS, MAX_STOP_STRING_LEN)
        _bool(self, "stop_at_eol")
        _int(self, "dedent_column", 0, MAX_TOKENS)
        _float(self, "deadline_ms", 0.0, 1e9)
        _str(self, "required_prefix", MAX_STOP_STRING_LEN, min_len=0)
        _int(self, "min_new_tokens", 0, self.max_new_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Token:
    TYPE: ClassVar[MessageType] = MessageType.TOKEN
    request_id: str
    token_id: int
    logprob: float  # natural log

    def __post_init__(self) -> None:
        _request_id(self)
        _int(self, "token_id", 0, MAX_TOKEN_ID)
        _float(self, "logprob", -math.inf, 1e-3)  # slack above 0 for float rounding of log_softmax


@dataclass(frozen=True)
class Finished:
    TYPE: ClassVar[MessageType] = MessageType.FINISHED
    request_id: str
    finish_reason: FinishReason
    n_prompt: int
    n_generated: int
    elapsed_ms: float  # from the worker receiving the request to this message
    n_reused: int = 0  # prompt tokens whose keys/values came from the cache instead of a prefill
    n_replayed: int = 0  # generated tokens streamed from a cached decode of the same prompt (in-flight extension)
    # UTF-8 bytes of the generated tokens' text that belong to the answer: all of it, or the text before a
    # stop string / end of line / dedent (the Token that completed it was still sent). -1: the worker has no
    # token table (no text stop rules).
    text_bytes: int = -1

    def __post_init__(self) -> None:
        _request_id(self)
        _enum(self, "finish_reason", FinishReason)
        _int(self, "n_prompt", 0, MAX_TOKENS)
        _int(self, "n_generated", 0, MAX_TOKENS)
        _float(self, "elapsed_ms", 0.0, math.inf)
        _int(self, "n_reused", 0, MAX_TOKENS)
        _int(self, "n_replayed", 0, MAX_TOKENS)
        _int(self, "text_bytes", -1, MAX_TOKENS * 64)


@dataclass(frozen=True)
class Cancel:
    TYPE: ClassVar[MessageType] = MessageType.CANCEL
    request_id: str

    def __post_init__(self) -> None:
        _request_id(self)


@dataclass(frozen=True)
class ErrorReply:
    TYPE: ClassVar[MessageType] = MessageType.ERROR_REPLY
    request_id: str  # "" when the offending frame could not be decoded far enough to know it
    message: str

    def __post_init__(self) -> None:
        _request_id(self, allow_empty=True)
        _str(self, "message", MAX_MESSAGE_LEN)


@dataclass(frozen=True)
class Ping:
    TYPE: ClassVar[MessageType] = MessageType.PING
    nonce: int

    def __post_init__(self) -> None:
        _int(self, "nonce", 0, (1 << 63) - 1)


@dataclass(frozen=True)
class Pong:
    """Health: the worker is up and this is what it is doing. Answered by the socket loop, never by the
    model thread, so a hung model still gets a (not ready) answer."""

    TYPE: ClassVar[MessageType] = MessageType.PONG
    nonce: int
    pid: int
    ready: bool  # accepting and able to run requests (False: the model failed, or the worker is draining)
    n_queued: int  # requests waiting for a cache slot
    n_active: int  # requests holding a slot (prefilling or decoding)
    max_batch: int  # cache slots: requests that decode together
    max_seq_len: int  # the worker's context: len(prompt) + max_new_tokens - 1 must fit
    reason: str = ""  # why not ready: the model error, a hung step, "draining"

    def __post_init__(self) -> None:
        _int(self, "nonce", 0, (1 << 63) - 1)
        _int(self, "pid", 0, (1 << 31) - 1)
        _bool(self, "ready")
        _int(self, "n_queued", 0, MAX_TOKENS)
        _int(self, "n_active", 0, MAX_TOKENS)
        _int(self, "max_batch", 1, MAX_TOKENS)
        _int(self, "max_seq_len", 1, MAX_TOKENS)
        _str(self, "reason", MAX_MESSAGE_LEN)

    @property
    def busy(self) -> bool:
        return self.n_queued + self.n_active > 0


@dataclass(frozen=True)
class ReloadWeights:
    """Serve the weights of `model_dir` (a MODEL_DIR, or a split directory for tensor-parallel workers; a
    path on the worker's machine, absolute) instead of the current ones. Same architecture and tokenizer only."""

    TYPE: ClassVar[MessageType] = MessageType.RELOAD_WEIGHTS
    request_id: str
    model_dir: str

    def __post_init__(self) -> None:
        _request_id(self)
        _str(self, "model_dir", MAX_PATH_LEN, min_len=1)


@dataclass(frozen=True)
class Reloaded:
    """The answer to ReloadWeights. ok False: refused (corrupt, mismatched, a rank failed to load, a reload
    already pending...) and the old weights still serve."""

    TYPE: ClassVar[MessageType] = MessageType.RELOADED
    request_id: str
    ok: bool
    message: str  # what was loaded, or why not
    weights_version: int  # how many reloads the worker has completed; 0: the weights it started with

    def __post_init__(self) -> None:
        _request_id(self)
        _bool(self, "ok")
        _str(self, "message", MAX_MESSAGE_LEN)
        _int(self, "weights_version", 0, (1 << 31) - 1)


Message = GenerateRequest | Token | Finished | Cancel | ErrorReply | Ping | Pong | ReloadWeights | Reloaded

MESSAGES: dict[MessageType, type] = {
    cls.TYPE: cls for cls in (GenerateRequest, Token, Finished, Cancel, ErrorReply, Ping, Pong, ReloadWeights,
                              Reloaded)
}


# ---- frames ----


def encode(msg: Message) -> bytes:
    cls = type(msg)
    if MESSAGES.get(getattr(cls, "TYPE", None)) is not cls:
        raise WireError(f"cannot encode {cls.__name__}: not a protocol message")
    # Enum members pack as their int value: IntEnum is an int subclass and msgpack packs it as one.
    body = msgpack.packb([getattr(msg, f.name) for f in dataclasses.fields(msg)], use_bin_type=True)
    frame = bytes([cls.TYPE]) + body
    if len(frame) > MAX_FRAME_BYTES:
        raise WireError(f"{cls.__name__} frame is {len(frame)} bytes, over the {MAX_FRAME_BYTES}-byte cap")
    return frame


def peek_type(data: bytes | bytearray | memoryview) -> MessageType:
    """The frame's type from its first byte, without decoding the body."""
    if len(data) == 0:
        raise WireError("empty frame")
    tag = data[0]
    try:
        return MessageType(tag)
    except ValueError:
        raise WireError(f"unknown message type tag {tag}") from None


def decode(data: bytes | bytearray | memoryview, expected: type | tuple[type, ...]) -> Message:
    """Decode one frame into one of the `expected` message classes, or raise WireError."""
    expected_types = expected if isinstance(expected, tuple) else (expected,)
    if len(data) > MAX_FRAME_BYTES:
        raise WireError(f"frame is {len(data)} bytes, over the {MAX_FRAME_BYTES}-byte cap")
    cls = MESSAGES[peek_type(data)]
    if cls not in expected_types:
        names = ", ".join(t.__name__ for t in expected_types)
        raise WireError(f"expected {names}, got {cls.__name__}")
    try:
        body = msgpack.unpackb(
            bytes(data[1:]),
            raw=False,  # str fields must be valid UTF-8
            strict_map_key=True,
            use_list=True,
        )
    except ValueError as e:  # msgpack's ExtraData, FormatError, StackError, UnicodeDecodeError, truncation
        raise WireError(f"{cls.__name__} body is not valid msgpack: {type(e).__name__}: {e}") from None
    fields = dataclasses.fields(cls)
    if not isinstance(body, list) or len(body) != len(fields):
        got = f"{len(body)}-item list" if isinstance(body, list) else type(body).__name__
        raise WireError(f"{cls.__name__} body must be a list of {len(fields)} fields, got {got}")
    return cls(*body)


_PORT = r"(\d{1,5}|\*)"
_LOCAL_TCP = re.compile(rf"tcp://(127\.0\.0\.1|localhost):{_PORT}")
# Any other host: an IPv4 address, a hostname, an interface name, * (all interfaces) or a bracketed IPv6.
_ANY_TCP = re.compile(rf"tcp://(\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.\-]*):{_PORT}")
_IPC_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux


def is_local_endpoint(endpoint: str) -> bool:
    """ipc:// or loopback TCP: reachable from this machine only."""
    return endpoint.startswith("ipc://") or _LOCAL_TCP.fullmatch(endpoint) is not None


def check_endpoint(endpoint: str, allow_remote: bool = False) -> str:
    """A well-formed endpoint: ipc://PATH, tcp://127.0.0.1:PORT or tcp://localhost:PORT; with allow_remote,
    also tcp://HOST:PORT for any host (security.check_bind decides whether a worker may bind it: only with
    CURVE keys). The workers run whatever they are sent, so nothing non-local is accepted by default.
    PORT may be * when binding (the worker reports the port it got).
    """
    if not isinstance(endpoint, str):
        raise WireError(f"endpoint must be a str, got {endpoint!r}")
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if not path or path.startswith("@"):
            raise WireError(f"endpoint {endpoint!r}: ipc:// needs a filesystem path (abstract sockets are refused)")
        if len(path.encode()) > _IPC_PATH_MAX:
            raise WireError(f"endpoint {endpoint!r}: ipc path is {len(path.encode())} bytes, over {_IPC_PATH_MAX}")
        return endpoint
    m = _LOCAL_TCP.fullmatch(endpoint) or (_ANY_TCP.fullmatch(endpoint) if allow_remote else None)
    if m is None:
        hint = " (other hosts need --allow-remote and CURVE keys)" if _ANY_TCP.fullmatch(endpoint) else ""
        raise WireError(
            f"endpoint {endpoint!r} is refused: only ipc://PATH, tcp://127.0.0.1:PORT or tcp://localhost:PORT{hint}"
        )
    if m.group(2) != "*" and not 1 <= int(m.group(2)) <= 65535:
        raise WireError(f"endpoint {endpoint!r}: port {m.group(2)} is out of range [1, 65535]")
    return endpoint
