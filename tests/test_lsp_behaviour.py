"""Language-server behaviour with a real LSP client (pytest-lsp) against the real server subprocess and a
FAKE worker speaking the real ZeroMQ protocol (tests/lsp_fake_worker.py): positions under three encodings,
the request lifecycle (flood of cancellations, supersede, stale versions, typed-ahead cache, prefetch),
stop rules, confidence, settings, telemetry, robustness, transports and exit semantics.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.lsp.client import LanguageClient
from pytest_lsp import ClientServerConfig

from helpers import make_tiny_model_dir
from lsp_fake_worker import FakeWorker
from test_lsp_e2e import SERVER, open_doc, start

ASYNC = pytest.mark.asyncio(loop_scope="function")  # on the async tests only; the rest are plain
QUIET = {"prefetch": False, "debounce_min_ms": 0, "debounce_max_ms": 0}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from codefill.model.checkpoint import TOKENIZER_NAME
    from codefill.model.tokenizer import Tokenizer

    return Tokenizer(tiny_dir / TOKENIZER_NAME)


@pytest.fixture
def fake(tok, tmp_path):
    worker = FakeWorker(tok, f"ipc://{tmp_path}/fake.sock").start()
    yield worker
    worker.stop()


async def connect(tiny_dir, fake, tmp_path, options=None, encodings=None, extra=()):
    opts = {**QUIET, "log_dir": str(tmp_path / "state"), **(options or {})}
    return await start(SERVER + ["--model", str(tiny_dir), "--endpoint", fake.endpoint, *extra],
                       position_encodings=encodings, options=opts)


async def ask(client, uri, line, character, invoked=True):
    kind = types.InlineCompletionTriggerKind.Invoked if invoked else types.InlineCompletionTriggerKind.Automatic
    return await client.text_document_inline_completion_async(types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=kind),
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(line, character)))


def change(client, uri, version, line, char_from, char_to, text):
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangePartial(
            range=types.Range(types.Position(line, char_from), types.Position(line, char_to)), text=text)]))


async def stats(client):
    return await client.protocol.send_request_async("codefill/stats", {})


def prompt_prefix(tok, request) -> str:
    """The text after <MID> in an SPM prompt: header + the document's prefix as the server cut it."""
    ids = request.prompt_ids
    return tok.decode(ids[ids.index(tok.middle_id) + 1:])


# --- positions: emoji, CJK and CRLF under UTF-8, UTF-16 and UTF-32 ---

LINE = 'label = "😋中文" + name('  # cursor after "(", an auto-closed ")" follows
DOC = "import os\r\n" + LINE + ")\r\nprint(label)\r\n"


def units(text: str, encoding: str) -> int:
    return {"utf-8": len(text.encode("utf-8")), "utf-16": len(text.encode("utf-16-le")) // 2,
            "utf-32": len(text)}[encoding]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
@ASYNC
async def test_unicode_positions_under_each_encoding(tiny_dir, fake, tok, tmp_path, encoding):
    fake.reply = "x)"
    client = await connect(tiny_dir, fake, tmp_path, encodings=[encoding])
    try:
        assert client.initialize_result.capabilities.position_encoding == encoding
        uri = "file:///work/u.py"
        open_doc(client, uri, DOC)
        col = units(LINE, encoding)
        result = await ask(client, uri, 1, col)
        [item] = result.items
        assert item.insert_text == "x)"
        # the auto-closed ")" after the cursor is replaced, so the range covers it: one unit in every encoding
        assert item.range == types.Range(types.Position(1, col), types.Position(1, col + 1))
        [request] = fake.requests
        assert prompt_prefix(tok, request).endswith("import os\r\n" + LINE)
        # a cursor one character left (inside the CJK text) in the same encoding
        col2 = units(LINE[: LINE.index("文")], encoding)
        await ask(client, uri, 1, col2)
        assert prompt_prefix(tok, fake.requests[-1]).endswith('label = "😋中')
    finally:
        await client.shutdown_session()


@ASYNC
async def test_incremental_edit_with_emoji_in_utf8(tiny_dir, fake, tok, tmp_path):
    client = await connect(tiny_dir, fake, tmp_path, encodings=["utf-8"])
    try:
        uri = "file:///work/e.py"
        open_doc(client, uri, 's = "😋😋" + na\n')
        start_ = len('s = "😋😋" + '.encode())
        change(client, uri, 2, 0, start_, start_ + 2, "full_na")
        await ask(client, uri, 0, start_ + len("full_na"))
        assert prompt_prefix(tok, fake.requests[-1]).endswith('s = "😋😋" + full_na')
    finally:
        await client.shutdown_session()


# --- request lifecycle ---


@ASYNC
async def test_cancellation_flood_only_the_live_request_reaches_the_model(tiny_dir, fake, tmp_path):
    fake.reply = "return a + b"
    client = await connect(tiny_dir, fake, tmp_path, options={"debounce_min_ms": 30, "debounce_max_ms": 60})
    try:
        uri = "file:///work/flood.py"
        text = "def add(a, b):\n    "
        open_doc(client, uri, text)
        futures = []
        for i in range(50):
            params = types.InlineCompletionParams(
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
                text_document=types.TextDocumentIdentifier(uri), position=types.Position(1, 4))
            msg_id = f"flood-{i}"
            futures.append(asyncio.wrap_future(client.protocol.send_request(
                types.TEXT_DOCUMENT_INLINE_COMPLETION, params, msg_id=msg_id)))
            if i < 49:
                client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=msg_id))
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 20)
        assert len(results) == 50  # every request answered
        cancelled = [r for r in results[:49] if isinstance(r, Exception) or not r.items]
        assert len(cancelled) == 49
        assert [i.insert_text for i in results[49].items] == ["return a + b"]
        assert len(fake.requests) == 1  # only the live one reached the model
    finally:
        await client.shutdown_session()


@ASYNC
async def test_superseding_keystroke_cancels_the_worker_request(tiny_dir, fake, tmp_path):
    fake.reply = "return a + b + c + d"
    fake.token_delay_s = 0.2  # slow: the second keystroke arrives mid-generation
    client = await connect(tiny_dir, fake, tmp_path)
    try:
        uri = "file:///work/sup.py"
        open_doc(client, uri, "def add(a, b):\n    \n")
        first = asyncio.ensure_future(ask(client, uri, 1, 4, invoked=False))
        while not fake.requests:
            await asyncio.sleep(0.01)
        change(client, uri, 2, 1, 4, 4, "r")
        second = asyncio.ensure_future(ask(client, uri, 1, 5, invoked=False))
        r1 = await first
        assert len(r1.items) == 0  # superseded: an empty answer
        for _ in range(500):  # the cancel crosses a socket to the fake worker's thread: give it up to 5 s
            if fake.cancelled:
                break
            await asyncio.sleep(0.01)
        assert fake.cancelled == [fake.requests[0].request_id]
        fake.token_delay_s = 0.0
        await second
    finally:
        await client.shutdown_session()


@ASYNC
async def test_stale_version_gets_content_modified(tiny_dir, fake, tmp_path):
    fake.reply = "return 1"
    fake.token_delay_s = 0.1
    client = await connect(tiny_dir, fake, tmp_path)
    try:
        uri = "file:///work/stale.py"
        open_doc(client, uri, "def f():\n    \n")
        pending = asyncio.ensure_future(ask(client, uri, 1, 4))
        while not fake.requests:
            await asyncio.sleep(0.01)
        change(client, uri, 2, 0, 0, 0, "# edited\n")  # the document moves on, no new request
        with pytest.raises(Exception, match="changed from version 1 to 2"):
            await pending
    finally:
        await client.shutdown_session()


@ASYNC
async def test_typed_ahead_characters_are_served_from_the_cache(tiny_dir, fake, tmp_path):
    fake.reply = "return a + b"
    client = await connect(tiny_dir, fake, tmp_path)
    try:
        uri = "file:///work/ahead.py"
        open_doc(client, uri, "def add(a, b):\n    \n")
        assert [i.insert_text for i in (await ask(client, uri, 1, 4)).items] == ["return a + b"]
        change(client, uri, 2, 1, 4, 4, "ret")
        assert [i.insert_text for i in (await ask(client, uri, 1, 7)).items] == ["urn a + b"]
        assert len(fake.requests) == 1
        s = await stats(client)
        assert (s.cache_hits, s.cache_misses, s.model_calls) == (1, 1, 1)
        change(client, uri, 3, 1, 7, 7, "X")  # typed over: the suggestion no longer applies
        await ask(client, uri, 1, 8)
        assert len(fake.requests) == 2
        assert (await stats(client)).dismissed == 1
    finally:
        await client.shutdown_session()


@ASYNC
async def test_prefetch_serves_the_completion_after_acceptance(tiny_dir, fake, tmp_path):
    fake.reply = "x = 1"
    client = await connect(tiny_dir, fake, tmp_path, options={"prefetch": True})
    try:
        uri = "file:///work/pre.py"
        open_doc(client, uri, "def f():\n    \n")
        [item] = (await ask(client, uri, 1, 4)).items
        for _ in range(100):  # the prefetch: the text after accepting "x = 1"
            if len(fake.requests) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(fake.requests) == 2
        assert fake.requests[1].stop_at_eol  # after "    x = 1", a code line that opens nothing: one line
        await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command=item.command.command, arguments=item.command.arguments))
        change(client, uri, 2, 1, 4, 4, "x = 1")
        [nxt] = (await ask(client, uri, 1, 9)).items
        assert nxt.insert_text == "x = 1"  # the prefetched entry (the fake always answers the same)
        s = await stats(client)
        # answered without a model call of its own (a further prefetch may have started after it)
        assert s.accepted == 1 and s.model_calls == 1 and s.cache_hits == 1 and s.prefetches >= 1
    finally:
        await client.shutdown_session()


@ASYNC
async def test_a_keystroke_before_the_prefetch_delay_keeps_the_prefetch_off_the_worker(tiny_dir, fake, tmp_path):
    """The next keystroke right after a suggestion (not towards it) cancels the prefetch while it waits for the
    user's pause, so the worker only ever sees the keystrokes' own requests."""
    fake.reply = "x = 1"
    client = await connect(tiny_dir, fake, tmp_path, options={"prefetch": True, "prefetch_delay_ms": 300,
                                                              "debounce_min_ms": 0, "debounce_max_ms": 0})
    try:
        uri = "file:///work/pre.py"
        open_doc(client, uri, "def f():\n    \n")
        await ask(client, uri, 1, 4)
        change(client, uri, 2, 1, 4, 4, "y")  # typed over the suggestion "x = 1"
        await ask(client, uri, 1, 5)
        await asyncio.sleep(0.1)  # the second answer's prefetch is still waiting for a pause
        change(client, uri, 3, 1, 5, 5, "z")
        await ask(client, uri, 1, 6)
        await asyncio.sleep(0.6)  # past the delay: the last answer's prefetch runs
        assert len(fake.requests) == 4  # three keystrokes, one prefetch
        s = await stats(client)
        assert s.model_calls == 3 and s.prefetches == 1
    finally:
        await client.shutdown_session()


@ASYNC
async def test_stop_rules_are_sent_to_the_worker(tiny_dir, fake, tmp_path):
    client = await connect(tiny_dir, fake, tmp_path)
    try:
        uri = "file:///work/rules.py"
        open_doc(client, uri, "def f(x):\n    if x:\n        \n    y = f(x)\n")
        await ask(client, uri, 3, 10)  # mid-line: one line, and after code nothing more may be the answer
        assert fake.requests[-1].stop_at_eol and fake.requests[-1].dedent_column == 0
        assert fake.requests[-1].min_new_tokens == 0
        await ask(client, uri, 2, 8)  # a blank line in a block: stop when a line dedents below 8
        assert not fake.requests[-1].stop_at_eol and fake.requests[-1].dedent_column == 8
        assert fake.requests[-1].min_new_tokens == 1  # blank_line_min_tokens: <EOT> only after some text
        await ask(client, uri, 1, 9)  # after "if x:": the block's lines must be indented deeper than 4
        assert fake.requests[-1].dedent_column == 5 and fake.requests[-1].min_new_tokens == 0
        for col in (0, 4):  # the start of a code line: lines above it, ending where the model writes that line
            await ask(client, uri, 3, col)
            r = fake.requests[-1]
            assert r.stop_strings == ["\n    y = f(x)"] and not r.stop_at_eol and r.dedent_column == 0
            assert r.min_new_tokens == 1
    finally:
        await client.shutdown_session()


@ASYNC
async def test_blank_line_min_tokens_setting(tiny_dir, fake, tmp_path):
    client = await connect(tiny_dir, fake, tmp_path, options={"blank_line_min_tokens": 3, "cache_size": 0})
    try:
        uri = "file:///work/blank.py"
        open_doc(client, uri, "def f(x):\n    \n    return x\n")
        await ask(client, uri, 1, 4)
        assert fake.requests[-1].min_new_tokens == 3
        await ask(client, uri, 2, 12)  # after code: never held back
        assert fake.requests[-1].min_new_tokens == 0
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"codefill": {"blank_line_min_tokens": 0}}))
        await ask(client, uri, 1, 4)
        assert fake.requests[-1].min_new_tokens == 0  # the model may answer nothing
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"codefill": {"blank_line_min_tokens": -1}}))
        await stats(client)
        assert any("blank_line_min_tokens = -1" in m.message for m in client.messages)
    finally:
        await client.shutdown_session()


@ASYNC
async def test_lines_inserted_above_a_code_line_end_with_a_line_break(tiny_dir, fake, tmp_path):
    fake.reply = "    y = x + 1\n    z = y\n    return z\n"
    client = await connect(tiny_dir, fake, tmp_path, options={"cache_size": 0})
    try:
        uri = "file:///work/above.py"
        open_doc(client, uri, "def f(x):\n    return z\n")
        [item] = (await ask(client, uri, 1, 0)).items
        # up to the line the model wrote that is already there; accepting it leaves "    return z" intact
        assert item.insert_text == "    y = x + 1\n    z = y\n"
        assert item.range.start == item.range.end == types.Position(1, 0)
    finally:
        await client.shutdown_session()


@ASYNC
async def test_confidence_threshold_hides_and_reports_mean_logprob(tiny_dir, fake, tmp_path):
    fake.reply, fake.logprob = "return 1", -3.0
    client = await connect(tiny_dir, fake, tmp_path)
    try:
        uri = "file:///work/conf.py"
        open_doc(client, uri, "def f():\n    \n")
        [item] = (await ask(client, uri, 1, 4)).items
        assert item.command.arguments[1]["mean_logprob"] == pytest.approx(-3.0)
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"codefill": {"min_mean_logprob": -2.0, "cache_size": 0}}))
        assert len((await ask(client, uri, 1, 4)).items) == 0
        assert (await stats(client)).hidden_low_confidence == 1
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"bogus": 1}))
        await stats(client)
        assert any("unknown setting(s) bogus" in m.message for m in client.messages)
        assert len((await ask(client, uri, 1, 4)).items) == 0  # the previous settings stay in force
    finally:
        await client.shutdown_session()


@ASYNC
async def test_languages_enabled(tiny_dir, fake, tmp_path):
    client = await connect(tiny_dir, fake, tmp_path, options={"languages": ["rust"]})
    try:
        uri = "file:///work/lang.py"
        open_doc(client, uri, "x = \n")
        assert len((await ask(client, uri, 0, 4)).items) == 0
        assert fake.requests == []
    finally:
        await client.shutdown_session()


@ASYNC
async def test_an_empty_list_is_empty_settings(tiny_dir, fake, tmp_path):
    # Neovim's JSON encoder writes an empty Lua table (a plugin's `settings = {}`) as [].
    fake.reply = "return 1"
    client = await ClientServerConfig(server_command=SERVER + ["--model", str(tiny_dir), "--endpoint", fake.endpoint],
                                      server_env={**os.environ, "XDG_STATE_HOME": str(tmp_path)}).start()
    try:
        await client.initialize_session(types.InitializeParams(
            capabilities=types.ClientCapabilities(), initialization_options=[]))
        for settings in ([], {"codefill": []}):
            client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings=settings))
        uri = "file:///work/empty.py"
        open_doc(client, uri, "def f():\n    \n")
        assert [i.insert_text for i in (await ask(client, uri, 1, 4)).items] == ["return 1"]
        assert (await stats(client)) is not None and client.messages == []
    finally:
        await client.shutdown_session()


# --- robustness ---


@ASYNC
async def test_bad_requests_get_clear_errors_and_the_server_lives(tiny_dir, fake, tmp_path):
    client = await connect(tiny_dir, fake, tmp_path, options={"max_document_chars": 10_000})
    try:
        with pytest.raises(Exception, match="unknown document file:///work/nope.py"):
            await ask(client, "file:///work/nope.py", 0, 0)
        uri = "file:///work/bad.py"
        open_doc(client, uri, "x = 1\n")
        with pytest.raises(Exception, match="line out of bounds: 7 > 1 lines"):
            await ask(client, uri, 7, 0)
        # malformed: no position (written raw: the client would refuse to build such params)
        from concurrent.futures import Future

        answer: Future = Future()
        client.protocol._request_futures["malformed-1"] = answer
        body = json.dumps({"jsonrpc": "2.0", "id": "malformed-1", "method": types.TEXT_DOCUMENT_INLINE_COMPLETION,
                           "params": {"textDocument": {"uri": uri}}}).encode()
        client.protocol.writer.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        with pytest.raises(Exception, match="invalid params for textDocument/inlineCompletion: .*position"):
            await asyncio.wait_for(asyncio.wrap_future(answer), 5)
        huge = "file:///work/huge.py"
        open_doc(client, huge, "y = 2\n" * 5000)
        assert len((await ask(client, huge, 10, 0)).items) == 0
        assert client._server.returncode is None
        assert fake.requests == []
        await stats(client)
    finally:
        await client.shutdown_session()


@ASYNC
async def test_worker_down_then_back(tiny_dir, fake, tmp_path):
    fake.reply = "return 1"
    client = await connect(tiny_dir, fake, tmp_path, options={"request_timeout_s": 1.0, "reconnect_interval_s": 0.3})
    try:
        uri = "file:///work/down.py"
        open_doc(client, uri, "def f():\n    \n")
        assert len((await ask(client, uri, 1, 4)).items) == 1
        fake.stop()
        with pytest.raises(Exception, match="no reply from worker"):
            await ask(client, uri, 1, 3)
        t0 = time.monotonic()
        for col in (2, 1):
            assert len((await ask(client, uri, 1, col)).items) == 0
        assert time.monotonic() - t0 < 1.0  # quickly, not a timeout each
        fake.start()
        deadline = time.monotonic() + 15
        while not (await stats(client)).worker.up:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert len((await ask(client, uri, 1, 0)).items) == 1
        assert len([m for m in client.messages if m.type == types.MessageType.Error]) == 1
    finally:
        await client.shutdown_session()


@ASYNC
async def test_a_worker_gone_mid_request_is_noticed_in_seconds_not_at_the_timeout(tiny_dir, fake, tmp_path):
    """With the default 60 s request timeout: the worker stops while a completion streams; that request
    fails within seconds naming the endpoint, the editor is told once, and completions resume by themselves
    when a worker is back on the endpoint."""
    fake.reply = "return a + b + c"
    fake.token_delay_s = 1.0  # the request is still streaming when the worker goes
    client = await connect(tiny_dir, fake, tmp_path, options={"reconnect_interval_s": 0.3})
    try:
        uri = "file:///work/gone.py"
        open_doc(client, uri, "def f(a, b, c):\n    \n")
        pending = asyncio.ensure_future(ask(client, uri, 1, 4))
        deadline = time.monotonic() + 10
        while not fake.requests:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        fake.stop()
        t0 = time.monotonic()
        with pytest.raises(Exception, match=f"no reply from worker at {fake.endpoint} .*died"):
            await pending
        assert time.monotonic() - t0 < 10  # not the 60 s timeout
        assert len((await ask(client, uri, 1, 3)).items) == 0  # while down: empty at once
        fake.token_delay_s = 0.0
        fake.start()
        deadline = time.monotonic() + 15
        while not (await stats(client)).worker.up:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert len((await ask(client, uri, 1, 4)).items) == 1
        shown = [m for m in client.messages if m.type == types.MessageType.Error]
        assert len(shown) == 1 and fake.endpoint in shown[0].message, shown
    finally:
        await client.shutdown_session()


@ASYNC
async def test_telemetry_stats_and_rotating_log(tiny_dir, fake, tmp_path):
    fake.reply = "return 1"
    state = tmp_path / "state"
    client = await connect(tiny_dir, fake, tmp_path, options={"log_max_bytes": 400, "log_backups": 2})
    try:
        uri = "file:///work/tel.py"
        open_doc(client, uri, "def f():\n    \n")
        for col in range(4, 0, -1):
            [item] = (await ask(client, uri, 1, col)).items
        await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command="codefill.accept", arguments=item.command.arguments))
        s = await stats(client)
        assert s.shown == 4 and s.accepted == 1 and s.latency_ms.n == 4 and s.latency_ms.p95 >= s.latency_ms.p50
        assert s.log == str(state / "events.jsonl")
    finally:
        await client.shutdown_session()
    files = sorted(p.name for p in state.iterdir())
    assert files == ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]
    events = [json.loads(line) for p in state.iterdir() for line in p.read_text().splitlines()]
    assert all(p.stat().st_size <= 400 for p in state.iterdir())
    assert "accepted" in {e["event"] for e in events}
    assert not any("return" in json.dumps(e) for e in events)  # sizes and timings, never code


# --- transports, exit, parent ---


@ASYNC
async def test_exit_without_shutdown_is_status_1(tiny_dir, fake, tmp_path):
    client = await connect(tiny_dir, fake, tmp_path)
    client.exit(None)
    for _ in range(100):
        if client._server.returncode is not None:
            break
        await asyncio.sleep(0.05)
    assert client._server.returncode == 1


@ASYNC
async def test_server_exits_when_its_parent_dies(tiny_dir, fake, tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    client = LanguageClient("test", "1")
    await client.start_io(*SERVER, "--model", str(tiny_dir), "--endpoint", fake.endpoint,
                          env={**os.environ, "XDG_STATE_HOME": str(tmp_path)})
    await client.initialize_async(types.InitializeParams(capabilities=types.ClientCapabilities(),
                                                         process_id=parent.pid))
    parent.kill()
    parent.wait()
    server = client._server
    for _ in range(100):
        if server.returncode is not None:
            break
        await asyncio.sleep(0.1)
    assert server.returncode == 1
    await client.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ASYNC
async def test_tcp_one_session_and_a_clear_refusal(tiny_dir, fake, tmp_path):
    fake.reply = "return 1"
    port = _free_port()
    proc = subprocess.Popen(SERVER[:-1] + ["--tcp", f"127.0.0.1:{port}", "--model", str(tiny_dir),
                                           "--endpoint", fake.endpoint],
                            stderr=subprocess.PIPE, env={**os.environ, "XDG_STATE_HOME": str(tmp_path)})
    try:
        line = proc.stderr.readline().decode()
        while "listening on" not in line:
            assert line, "server ended before listening"
            line = proc.stderr.readline().decode()
        client = LanguageClient("test", "1")
        await client.start_tcp("127.0.0.1", port)
        await client.initialize_async(types.InitializeParams(capabilities=types.ClientCapabilities(),
                                                             initialization_options={**QUIET}))
        client.initialized(types.InitializedParams())
        open_doc(client, "file:///work/t.py", "def f():\n    \n")
        result = await ask(client, "file:///work/t.py", 1, 4)
        assert [i.insert_text for i in result.items] == ["return 1"]
        # a second client is told why and disconnected
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = await asyncio.wait_for(reader.read(), 5)
        assert b"already serves another client" in data
        writer.close()
        await client.shutdown_async(None)
        client.exit(None)
        assert proc.wait(10) == 0
        await client.stop()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tcp_refuses_non_loopback(tiny_dir):
    out = subprocess.run(SERVER[:-1] + ["--tcp", "0.0.0.0:7000", "--model", str(tiny_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "only loopback addresses" in out.stderr


# --- the pure parts ---


def test_partial_identifier_and_window():
    from codefill.lsp.completion import partial_identifier, window

    assert partial_identifier("    retu", "\n") == "retu"
    assert partial_identifier("x = foo.ba", ")") == "ba"
    assert partial_identifier("x = 1", "") == ""  # a number is not an identifier being typed
    assert partial_identifier("x = ", "") == ""
    assert partial_identifier("na", "me") == ""  # inside a word
    pre, suf = window("a\n" * 100 + "bc", "d\n" * 100, 11)
    assert pre == "a\n" * 4 + "bc" and suf == "d\n" * 5


def test_debounce_adapts_to_typing_speed_and_latency():
    from codefill.lsp.lifecycle import Debounce

    d = Debounce()
    assert d.delay_s(15, 150) == 0.015  # nothing measured yet
    for i in range(5):
        d.keystroke(now=i * 0.08)  # typing every 80 ms
    d.model_latency(0.3)  # answers take 300 ms: the next key will come first
    assert d.delay_s(15, 150) == pytest.approx(0.096)
    d.model_latency(0.01)
    for _ in range(10):
        d.model_latency(0.01)
    assert d.delay_s(15, 150) == 0.015  # fast model: no reason to wait


def test_suggestion_cache_serves_typed_ahead_text_only():
    from codefill.lsp.completion import Entry, Suggestion, SuggestionCache

    cache = SuggestionCache(4)
    cache.put(Entry("u", "x = ", ")\n", Suggestion("foo(1)", 1, -0.5), "id"))
    assert cache.lookup("u", "x = fo", ")\n")[1] == Suggestion("o(1)", 1, -0.5)
    assert cache.lookup("u", "x = fa", ")\n") is None  # typed something else
    assert cache.lookup("u", "x = foo(1)", ")\n") is None  # typed it all: nothing left to suggest
    assert cache.lookup("u", "x = fo", "\n") is None  # the text after the cursor changed
    assert cache.lookup("v", "x = fo", ")\n") is None


@ASYNC
async def test_token_healing_backs_off_the_partial_identifier(tiny_dir, fake, tmp_path):
    """ "    ret|": the prompt ends before "ret", the worker is asked for text starting with "ret", and the
    editor is shown only what follows the typed characters."""
    tok = fake.tok
    fake.reply = "return a + b"
    client = await connect(tiny_dir, fake, tmp_path, options={"cache_size": 0, "context_chunks": 0,
                                                            "token_healing": True})
    try:
        uri = "file:///work/heal.py"
        open_doc(client, uri, "def f(a, b):\n    ret\n")
        [item] = (await ask(client, uri, 1, 7)).items
        sent = fake.requests[-1]
        assert sent.required_prefix == "ret"
        assert item.insert_text == "urn a + b"
        # SPM: what follows <MID> is the prefix, which now ends where the partial identifier began.
        after_mid = sent.prompt_ids[sent.prompt_ids.index(tok.middle_id) + 1:]
        assert tok.decode(after_mid).endswith("def f(a, b):\n    ")

        fake.reply = "print(a)"  # a worker that ignored the constraint: refused, not garbled
        assert len((await ask(client, uri, 1, 7)).items) == 0

        open_doc(client, "file:///work/mid.py", "x = rety\n")  # inside a word: no healing
        await ask(client, "file:///work/mid.py", 0, 7)
        assert fake.requests[-1].required_prefix == ""
    finally:
        await client.shutdown_session()
