"""The wire format: every message round-trips, and every kind of bad frame is a WireError naming the value."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import pytest

from codefill.inference_workers import protocol
from codefill.inference_workers.protocol import (
    MESSAGES,
    Cancel,
    ErrorReply,
    Finished,
    FinishReason,
    GenerateRequest,
    MessageType,
    Ping,
    Pong,
    Token,
    WireError,
    check_endpoint,
    decode,
    encode,
)

EXAMPLES = [
    GenerateRequest("r1", [1, 32007, 415, 32008, 32009], 64, 0.7, 40, 0.95, 1234, [32010, 2]),
    GenerateRequest("r2", [5], 1),  # defaults: greedy, no stop rules, no deadline
    GenerateRequest("r3", [1, 2], 24, stop_ids=[32010], stop_strings=["\n\n", "☺"], stop_at_eol=True,
                    dedent_column=4, deadline_ms=250.0),
    Token("r1", 32010, -0.25),
    Token("r1", 0, -math.inf),
    Finished("r1", FinishReason.STOP, 5, 12, 33.5),
    Finished("r1", FinishReason.CANCELLED, 5, 0, 0.0),
    Finished("r1", FinishReason.STOP_STRING, 1500, 9, 20.0, n_reused=1497, n_replayed=4, text_bytes=17),
    Finished("r1", FinishReason.SUPERSEDED, 5, 3, 1.0),
    Cancel("r1"),
    ErrorReply("", "bad frame: unknown message type tag 200"),
    ErrorReply("r1", "GenerationError: prompt of 9000 tokens ... ☺ non-ascii survives"),
    Ping(7),
    Pong(7, 4242, True, 3, 2, 4, 2048),
    Pong(8, 4242, False, 0, 0, 1, 2048, "model step hung: decode step of 2 rows has run for 31.0 s"),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frame = encode(msg)
    assert frame[0] == msg.TYPE
    back = decode(frame, type(msg))
    assert back == msg and type(back) is type(msg)
    # decode also accepts a tuple of expected types, and memoryview/bytearray frames (zmq Frame buffers)
    assert decode(memoryview(frame), (Cancel, type(msg))) == msg
    assert decode(bytearray(frame), tuple(MESSAGES.values())) == msg


def test_every_message_type_has_one_class():
    assert set(MESSAGES) == set(MessageType)
    assert all(cls.TYPE == t for t, cls in MESSAGES.items())


def test_finish_reason_decodes_as_enum():
    back = decode(encode(Finished("r", FinishReason.LENGTH, 1, 2, 3.0)), Finished)
    assert back.finish_reason is FinishReason.LENGTH


def test_wrong_expected_type_is_refused():
    with pytest.raises(WireError, match="expected GenerateRequest, Cancel, got Token"):
        decode(encode(Token("r", 1, -1.0)), (GenerateRequest, Cancel))
    with pytest.raises(WireError, match="expected Pong, got Ping"):
        decode(encode(Ping(1)), Pong)


@pytest.mark.parametrize(
    "frame, match",
    [
        (b"", "empty frame"),
        (bytes([200]) + msgpack.packb(["r"]), "unknown message type tag 200"),
        (bytes([0]), "unknown message type tag 0"),
        (bytes([MessageType.CANCEL]) + b"\xc1", "not valid msgpack"),  # 0xc1 is never used by msgpack
        (bytes([MessageType.CANCEL]), "not valid msgpack"),  # no body at all
        (bytes([MessageType.CANCEL]) + msgpack.packb(["r"]) + b"\x00", "not valid msgpack"),  # trailing data
        (bytes([MessageType.CANCEL]) + msgpack.packb({"request_id": "r"}), "must be a list of 1 fields, got dict"),
        (bytes([MessageType.CANCEL]) + msgpack.packb(["r", "extra"]), "got 2-item list"),
        (bytes([MessageType.CANCEL]) + b"\x91\xc4\x01r", "Cancel.request_id must be a str, got bytes"),
        (bytes([MessageType.CANCEL]) + b"\x91\xa2\xff\xfe", "not valid msgpack"),  # invalid UTF-8 str
    ],
)
def test_malformed_frames(frame, match):
    with pytest.raises(WireError, match=match):
        decode(frame, tuple(MESSAGES.values()))


def _frame(cls, *fields) -> bytes:
    """A frame built by hand, bypassing the dataclass checks, as a buggy or hostile peer would send it."""
    return bytes([cls.TYPE]) + msgpack.packb(list(fields), use_bin_type=True)


GOOD_REQ = ["r", [1, 2, 3], 16, 0.0, 0, 1.0, 0, [9], [], False, 0, 0.0, "", 0]


def _req(**changes) -> bytes:
    fields = dict(zip([f.name for f in dataclasses.fields(GenerateRequest)], GOOD_REQ))
    fields.update(changes)
    return _frame(GenerateRequest, *fields.values())


def test_hand_built_good_request_decodes():
    assert decode(_req(), GenerateRequest) == GenerateRequest("r", [1, 2, 3], 16, 0.0, 0, 1.0, 0, [9])


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"request_id": 5}, r"GenerateRequest.request_id must be a str, got int 5"),
        ({"request_id": ""}, r"request_id has length 0"),
        ({"request_id": "x" * 500}, r"request_id has length 500"),
        ({"prompt_ids": "123"}, r"prompt_ids must be a list of token ids, got str"),
        ({"prompt_ids": []}, r"prompt_ids has 0 ids"),
        ({"prompt_ids": [1, 2.5]}, r"prompt_ids\[1\] = 2.5 is not a token id"),
        ({"prompt_ids": [1, -3]}, r"prompt_ids\[1\] = -3 is not a token id"),
        ({"prompt_ids": [1, True]}, r"prompt_ids\[1\] = True is not a token id"),
        ({"prompt_ids": [1 << 40]}, r"prompt_ids\[0\] = 1099511627776 is not a token id"),
        ({"max_new_tokens": 0}, r"max_new_tokens = 0 is out of range"),
        ({"max_new_tokens": "64"}, r"max_new_tokens must be an int, got str '64'"),
        ({"max_new_tokens": 3.0}, r"max_new_tokens must be an int, got float 3.0"),
        ({"temperature": -1.0}, r"temperature = -1.0 is out of range"),
        ({"temperature": float("nan")}, r"temperature = nan is out of range"),
        ({"temperature": None}, r"temperature must be a float, got NoneType"),
        ({"top_p": 0.0}, r"top_p = 0.0 is out of range"),
        ({"top_p": 1.5}, r"top_p = 1.5 is out of range"),
        ({"top_k": -1}, r"top_k = -1 is out of range"),
        ({"seed": -1}, r"seed = -1 is out of range"),
        ({"stop_ids": [[1]]}, r"stop_ids\[0\] = \[1\] is not a token id"),
        ({"stop_ids": None}, r"stop_ids must be a list of token ids, got NoneType"),
        ({"stop_strings": "\n"}, r"stop_strings must be a list of at most 16 strings, got str"),
        ({"stop_strings": ["a"] * 17}, r"stop_strings must be a list of at most 16 strings, got 17 items"),
        ({"stop_strings": [""]}, r"stop_strings\[0\] = '' is not a str of length \[1, 256\]"),
        ({"stop_strings": [b"x"]}, r"stop_strings\[0\] = b'x' is not a str"),
        ({"stop_at_eol": 1}, r"stop_at_eol must be a bool, got int 1"),
        ({"dedent_column": -1}, r"dedent_column = -1 is out of range"),
        ({"deadline_ms": -5}, r"deadline_ms = -5.0 is out of range"),
        ({"deadline_ms": "soon"}, r"deadline_ms must be a float, got str"),
        ({"min_new_tokens": 17}, r"min_new_tokens = 17 is out of range"),
        ({"min_new_tokens": -1}, r"min_new_tokens = -1 is out of range"),
    ],
)
def test_bad_request_fields(changes, match):
    with pytest.raises(WireError, match=match):
        decode(_req(**changes), GenerateRequest)


@pytest.mark.parametrize(
    "frame, match",
    [
        (_frame(Finished, "r", 99, 1, 1, 1.0, 0, 0, -1), r"Finished.finish_reason = 99 is not a FinishReason \(STOP=1"),
        (_frame(Finished, "r", 1, -1, 1, 1.0, 0, 0, -1), r"Finished.n_prompt = -1 is out of range"),
        (_frame(Finished, "r", 1, 1, 1, -5.0, 0, 0, -1), r"Finished.elapsed_ms = -5.0 is out of range"),
        (_frame(Finished, "r", 1, 1, 1, 1.0), r"Finished body must be a list of 8 fields, got 5-item list"),
        (_frame(Token, "r", 3, 2.0), r"Token.logprob = 2.0 is out of range"),
        (_frame(Token, "r", 3, float("nan")), r"Token.logprob = nan is out of range"),
        (_frame(Pong, 1, 2, 1, 0, 0, 4, 2048, ""), r"Pong.ready must be a bool, got int 1"),
        (_frame(Ping, -1), r"Ping.nonce = -1 is out of range"),
        (_frame(ErrorReply, "r", b"bytes"), r"ErrorReply.message must be a str, got bytes"),
    ],
)
def test_bad_reply_fields(frame, match):
    with pytest.raises(WireError, match=match):
        decode(frame, tuple(MESSAGES.values()))


def test_messages_are_checked_when_built_too():
    with pytest.raises(WireError, match="prompt_ids has 0 ids"):
        GenerateRequest("r", [], 4)
    with pytest.raises(WireError, match=r"token_id = -1 is out of range"):
        Token("r", -1, 0.0)
    # ints are accepted where floats are expected and normalised
    assert GenerateRequest("r", (1, 2), 4, temperature=1).temperature == 1.0
    assert GenerateRequest("r", (1, 2), 4).prompt_ids == [1, 2]


def test_oversize_frames():
    n = protocol.MAX_FRAME_BYTES
    with pytest.raises(WireError, match=rf"frame is {n + 1} bytes, over the {n}-byte cap"):
        decode(bytes([MessageType.CANCEL]) + b"\x00" * n, Cancel)
    # encode refuses to make one: 2 x 1M ids of 5 bytes each is ~10 MiB
    big = [70000] * protocol.MAX_TOKENS
    with pytest.raises(WireError, match="GenerateRequest frame is 104858.. bytes, over the"):
        encode(GenerateRequest("r", big, 1, stop_ids=big))


def test_encode_refuses_non_messages():
    @dataclasses.dataclass(frozen=True)
    class Fake:
        TYPE = MessageType.CANCEL
        request_id: str

    with pytest.raises(WireError, match="cannot encode Fake"):
        encode(Fake("r"))
    with pytest.raises(WireError, match="cannot encode dict"):
        encode({"request_id": "r"})


def test_never_pickles():
    source = open(protocol.__file__).read()
    assert "pickle" not in source.replace("Nothing here is pickled", "")
    # a pickle stream is just an unknown tag (0x80 is pickle's PROTO opcode)
    import pickle

    with pytest.raises(WireError, match="unknown message type tag 128"):
        decode(pickle.dumps(Cancel("r")), Cancel)


@pytest.mark.parametrize(
    "endpoint",
    ["ipc:///tmp/codefill/w.sock", "tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://127.0.0.1:*"],
)
def test_local_endpoints_accepted(endpoint):
    assert check_endpoint(endpoint) == endpoint


@pytest.mark.parametrize(
    "endpoint, match",
    [
        ("tcp://0.0.0.0:5555", "only ipc://PATH"),
        ("tcp://*:5555", "only ipc://PATH"),
        ("tcp://10.0.0.3:5555", "only ipc://PATH"),
        ("tcp://127.0.0.1", "only ipc://PATH"),
        ("tcp://127.0.0.1:70000", "port 70000 is out of range"),
        ("inproc://x", "only ipc://PATH"),
        ("ipc://", "needs a filesystem path"),
        ("ipc://@abstract", "abstract sockets are refused"),
        ("ipc:///" + "x" * 200, "ipc path is 201 bytes"),
    ],
)
def test_other_endpoints_refused(endpoint, match):
    with pytest.raises(WireError, match=match):
        check_endpoint(endpoint)
