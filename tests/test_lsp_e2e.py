"""The language server as an editor sees it: a real LSP client (pytest-lsp) drives the server subprocess,
which drives a real worker subprocess on a tiny model.

The completion text must equal what the in-process path gives for the same prefix and suffix: the
Runner's greedy tokens on lsp/prompt.py's SPM prompt (path header, same budget), decoded and passed
through lsp/postprocess.py's `fit`. The server is started without cross-file context and without token
healing, so the expectation depends only on the document. A cursor after an emoji proves positions are read
in UTF-16 code units (and UTF-32, when the client asks for it), not as Python str indices.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import pytest_asyncio
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient

from codefill.inference_workers.startup import spawn_worker, stop_worker
from helpers import make_tiny_model_dir

MAX_SEQ_LEN = 512  # the worker's and the reference's context: equal, so the graphs compute the same sums
MAX_NEW = 64
SERVER = [sys.executable, "-m", "codefill.cli", "serve", "--stdio"]

# Cursor positions are marked with | in the source; the document is the text without it.
DOC = '''def fibonacci(n: int) -> int:
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return |b


def main():
    print(fibonacci(10))
'''
# Two astral-plane emoji before the cursor: 2 UTF-16 units each, 1 code point each.
EMOJI_DOC = '''def greet(name):
    s = "😋😋" + na|me
    return s
'''


def split(marked: str) -> tuple[str, str, int, int, int]:
    """(document, prefix, line, UTF-16 character, UTF-32 character) of the | in `marked`."""
    i = marked.index("|")
    prefix, text = marked[:i], marked[:i] + marked[i + 1 :]
    line = prefix.count("\n")
    col = prefix[prefix.rfind("\n") + 1 :]
    return text, prefix, line, len(col.encode("utf-16-le")) // 2, len(col)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def expected_middle(tiny_dir):
    """The in-process path, for the same model: prompt ids -> Runner greedy -> decode_middle."""
    from codefill.model.checkpoint import TOKENIZER_NAME
    from codefill.model.fim import decode_middle, infilling_prompt_tokens
    from codefill.inference_workers.runner import Runner
    from codefill.model.sampling import SamplingConfig
    from codefill.model.tokenizer import Tokenizer
    from codefill.lsp.prompt import PromptConfig, build_prompt

    tok = Tokenizer(tiny_dir / TOKENIZER_NAME)
    gen = Runner.from_model_dir(tiny_dir, max_seq_len=MAX_SEQ_LEN, max_batch=1)

    def middle(prefix: str, suffix: str, path: str | None = None) -> str:
        """The raw middle for `path` (None: the old PSM prompt without header, for the wrong-cut check)."""
        if path is None:
            ids = infilling_prompt_tokens(tok, prefix, suffix)
        else:
            config = PromptConfig(max_prompt_tokens=min(PromptConfig().max_prompt_tokens, MAX_SEQ_LEN - MAX_NEW + 1))
            ids = build_prompt(tok, prefix, suffix, config, path=path, language_id="python").ids
        out = gen.generate(ids, MAX_NEW, SamplingConfig(), stop_ids=frozenset({tok.eot_id, tok.eos_id}))
        return decode_middle(tok, [t for t, _ in out])

    return middle


@pytest.fixture(scope="module")
def expected_items(expected_middle):
    """What the server should show: the fitted middle, as a list of insert texts (empty: nothing shown)."""
    from codefill.lsp.postprocess import fit

    def items(prefix: str, suffix: str, path: str) -> list[str]:
        fitted = fit(prefix, suffix, expected_middle(prefix, suffix, path))
        return [] if fitted is None else [fitted.text]

    return items


# Deterministic prompts: no other documents in the context, no token healing; telemetry into a temp dir.
OPTIONS = {"context_chunks": 0, "token_healing": False}


async def start(command: list[str], position_encodings: list[str] | None = None,
                options: dict | None = None) -> LanguageClient:
    state = os.environ.get("CODEFILL_TEST_STATE") or __import__("tempfile").mkdtemp(prefix="codefill-state-")
    env = {**os.environ, "XDG_STATE_HOME": state}
    client = await ClientServerConfig(server_command=command, server_env=env).start()
    general = types.GeneralClientCapabilities(position_encodings=position_encodings) if position_encodings else None
    capabilities = types.ClientCapabilities(
        general=general,
        text_document=types.TextDocumentClientCapabilities(
            inline_completion=types.InlineCompletionClientCapabilities(),
            completion=types.CompletionClientCapabilities(),
        ),
    )
    client.initialize_result = await client.initialize_session(types.InitializeParams(
        capabilities=capabilities, initialization_options={**OPTIONS, **(options or {})}))
    return client


def open_doc(client: LanguageClient, uri: str, text: str) -> None:
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(types.TextDocumentItem(uri=uri, language_id="python", version=1, text=text))
    )


async def inline(client: LanguageClient, uri: str, line: int, character: int) -> types.InlineCompletionList:
    return await client.text_document_inline_completion_async(
        types.InlineCompletionParams(
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
            text_document=types.TextDocumentIdentifier(uri),
            position=types.Position(line, character),
        )
    )


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # the command name (field 2) may contain spaces; ppid is the 2nd field after the closing paren
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(tiny_dir):
    """Server started the way the CLI does, spawning its own worker (UTF-16: the client offers nothing else)."""
    client = await start(SERVER + ["--model", str(tiny_dir), "--worker-max-seq-len", str(MAX_SEQ_LEN)])
    yield client
    await client.shutdown_session()


@pytest.mark.asyncio(loop_scope="module")
async def test_server_advertises_both_features(client):
    result = client.initialize_result
    assert result.server_info.name == "codefill"
    assert result.capabilities.inline_completion_provider is not None
    assert result.capabilities.completion_provider is not None
    assert result.capabilities.position_encoding == types.PositionEncodingKind.Utf16


@pytest.mark.asyncio(loop_scope="module")
async def test_inline_completion_equals_in_process_middle(client, expected_items):
    text, prefix, line, char16, _ = split(DOC)
    uri = "file:///work/fib.py"
    open_doc(client, uri, text)
    expected = expected_items(prefix, text[len(prefix) :], "/work/fib.py")
    assert expected, "the tiny model should produce a visible middle for this document"

    result = await inline(client, uri, line, char16)
    assert [item.insert_text for item in result.items] == expected
    assert result.items[0].range == types.Range(types.Position(line, char16), types.Position(line, char16))
    assert result.items[0].command.command == "codefill.accept"


@pytest.mark.asyncio(loop_scope="module")
async def test_completion_item_inserts_the_middle(client, expected_items):
    text, prefix, line, char16, _ = split(DOC)
    uri = "file:///work/fib2.py"
    open_doc(client, uri, text)
    [expected] = expected_items(prefix, text[len(prefix) :], "/work/fib2.py")

    result = await client.text_document_completion_async(
        types.CompletionParams(text_document=types.TextDocumentIdentifier(uri), position=types.Position(line, char16))
    )
    assert len(result.items) == 1
    item = result.items[0]
    assert item.text_edit.new_text == expected
    assert item.text_edit.range == types.Range(types.Position(line, char16), types.Position(line, char16))
    assert item.label == next(ln for ln in expected.split("\n") if ln.strip()).strip()


@pytest.mark.asyncio(loop_scope="module")
async def test_emoji_before_cursor_uses_utf16_positions(client, expected_middle, expected_items):
    text, prefix, line, char16, char32 = split(EMOJI_DOC)
    assert char16 == char32 + 2  # the two emoji
    uri = "file:///work/emoji.py"
    open_doc(client, uri, text)
    path = "/work/emoji.py"
    expected = expected_items(prefix, text[len(prefix) :], path)
    # What a server reading the character as a str index would have sent: a different prompt, another middle.
    wrong_cut = text.index("\n") + 1 + char16
    assert expected_middle(prefix, text[len(prefix) :], path) != expected_middle(text[:wrong_cut], text[wrong_cut:], path)

    result = await inline(client, uri, line, char16)
    assert [item.insert_text for item in result.items] == expected


@pytest.mark.asyncio(loop_scope="module")
async def test_edits_are_seen(client, expected_items):
    """Incremental didChange with an emoji in the edited range: the server's copy of the document follows."""
    text, _, _, _, _ = split(EMOJI_DOC)
    uri = "file:///work/edit.py"
    open_doc(client, uri, text)
    # replace `na` (UTF-16 chars 15..17 on line 1, after 4 spaces + `s = "😋😋" + `) with `full_na`
    client.text_document_did_change(
        types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
            content_changes=[
                types.TextDocumentContentChangePartial(
                    range=types.Range(types.Position(1, 17), types.Position(1, 19)), text="full_na"
                )
            ],
        )
    )
    edited = text.replace("+ name", "+ full_name")
    cut = edited.index("full_na") + len("full_na")
    result = await inline(client, uri, 1, 17 + len("full_na"))
    assert [item.insert_text for item in result.items] == expected_items(edited[:cut], edited[cut:], "/work/edit.py")


@pytest.mark.asyncio(loop_scope="module")
async def test_cursor_past_line_end_is_clamped(client, expected_items):
    text = "x = 1\ny = \n"
    uri = "file:///work/clamp.py"
    open_doc(client, uri, text)
    result = await inline(client, uri, 1, 99)
    assert [item.insert_text for item in result.items] == expected_items("x = 1\ny = ", "\n", "/work/clamp.py")


@pytest.mark.asyncio(loop_scope="module")
async def test_shutdown_stops_the_worker(tiny_dir):
    client = await start(SERVER + ["--model", str(tiny_dir), "--worker-max-seq-len", "64"])
    uri = "file:///work/one.py"
    long_doc = DOC.replace("|", "") * 30  # far over this worker's 64-token context: the prompt is cut to fit
    open_doc(client, uri, long_doc)
    result = await inline(client, uri, 100, 4)  # the worker is up once this answers
    assert isinstance(result, types.InlineCompletionList)
    workers = children_of(client._server.pid)
    assert len(workers) == 1
    await client.shutdown_session()
    deadline = time.monotonic() + 15
    while os.path.exists(f"/proc/{workers[0]}") and "Z" not in _state(workers[0]):
        assert time.monotonic() < deadline, f"worker {workers[0]} still running after shutdown"
        time.sleep(0.1)


@pytest.mark.asyncio(loop_scope="module")
async def test_dead_worker_gives_error_response_not_a_crash(tiny_dir):
    client = await start(SERVER + ["--model", str(tiny_dir), "--worker-max-seq-len", "64"])
    try:
        uri = "file:///work/dies.py"
        open_doc(client, uri, "import os\n")
        await inline(client, uri, 1, 0)
        workers = children_of(client._server.pid)
        [worker] = workers
        os.kill(worker, signal.SIGKILL)
        # No waiting: whether the worker dies before the request or during it, the answer is the same error.
        # (A new cursor position: the one asked before is answered from the suggestion cache.)
        with pytest.raises(Exception, match=r"the worker \(pid \d+\) exited with status -9"):
            await inline(client, uri, 0, 9)
        assert client._server.returncode is None
        assert [m.type for m in client.messages] == [types.MessageType.Error]
        # While it is down: empty answers at once, no more messages.
        t0 = time.monotonic()
        assert len((await inline(client, uri, 0, 8)).items) == 0
        assert time.monotonic() - t0 < 1.0
        # The server restarts the worker it owns and serves again.
        deadline = time.monotonic() + 120
        while not (stats := await client.protocol.send_request_async("codefill/stats", {})).worker.up:
            assert time.monotonic() < deadline, f"worker not restarted: {stats}"
            await asyncio.sleep(0.5)
        assert stats.worker.restarts == 1
        [new_worker] = children_of(client._server.pid)
        assert new_worker != worker
        assert isinstance(await inline(client, uri, 0, 7), types.InlineCompletionList)
        assert len(client.messages) == 1
    finally:
        await client.shutdown_session()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.asyncio(loop_scope="module")
async def test_endpoint_mode_with_utf32_client(tiny_dir, expected_items):
    """A worker started elsewhere; the server only tokenizes. The client negotiates UTF-32 positions."""
    process, endpoint = spawn_worker(tiny_dir, max_seq_len=MAX_SEQ_LEN)
    try:
        client = await start(SERVER + ["--model", str(tiny_dir), "--endpoint", endpoint],
                             position_encodings=[types.PositionEncodingKind.Utf32])
        try:
            text, prefix, line, _, char32 = split(EMOJI_DOC)
            uri = "file:///work/emoji32.py"
            open_doc(client, uri, text)
            result = await inline(client, uri, line, char32)
            assert [item.insert_text for item in result.items] == expected_items(prefix, text[len(prefix) :],
                                                                                 "/work/emoji32.py")
        finally:
            await client.shutdown_session()
        assert process.poll() is None, "a worker the server did not start must outlive it"
    finally:
        stop_worker(process)


@pytest.mark.asyncio(loop_scope="module")
async def test_worker_that_cannot_start_gives_error_responses_and_one_message(tiny_dir, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_dir, broken)
    # The config (which names the family) and the tokenizer are fine; the worker cannot load the weights.
    (broken / "model.safetensors").unlink()
    client = await start(SERVER + ["--model", str(broken)])
    try:
        uri = "file:///work/x.py"
        open_doc(client, uri, "def f():\n    return 1\n")
        # The request that waited for the start gets the reason; later ones an empty answer at once.
        with pytest.raises(Exception) as info:
            await inline(client, uri, 1, 4)
        assert "could not start its worker" in str(info.value) and "model.safetensors" in str(info.value)
        t0 = time.monotonic()
        assert len((await inline(client, uri, 1, 5)).items) == 0
        assert time.monotonic() - t0 < 1.0
        assert client._server.returncode is None  # still serving
        shown = [m for m in client.messages if m.type == types.MessageType.Error]
        assert len(shown) == 1 and "model.safetensors" in shown[0].message
    finally:
        await client.shutdown_session()


@pytest.mark.asyncio(loop_scope="module")
async def test_silent_worker_times_out_with_error_response(tiny_dir, tmp_path):
    client = await start(SERVER + ["--model", str(tiny_dir), "--endpoint", f"ipc://{tmp_path}/nobody.sock",
                                   "--request-timeout", "1"])
    try:
        uri = "file:///work/y.py"
        open_doc(client, uri, "x = 1\n")
        with pytest.raises(Exception, match=r"no reply from worker at ipc://.*nobody.sock within 1.0 s"):
            await inline(client, uri, 1, 0)
        assert client._server.returncode is None
    finally:
        await client.shutdown_session()


# --- the pure parts, without processes ---


def test_cursor_context_bounds():
    from pygls.workspace import TextDocument

    from codefill.lsp.context import ContextError, cursor_context

    doc = TextDocument("file:///a.py", "ab😋c\nxyz")
    assert cursor_context(doc, types.Position(0, 4)) == ("ab😋", "c\nxyz", types.Position(0, 4))  # UTF-16: 😋 is 2
    assert cursor_context(doc, types.Position(1, 99)) == ("ab😋c\nxyz", "", types.Position(1, 3))  # clamped
    with pytest.raises(ContextError, match="line out of bounds: 5 > 2 lines"):
        cursor_context(doc, types.Position(5, 0))
