"""The codefill language server: Code Llama fill-in-the-middle as inline completions and completion items.

    codefill serve --model MODEL_DIR [--endpoint E | --tp N] [--stdio | --tcp HOST:PORT]

The server tokenizes (workers see token ids only), so it always loads MODEL_DIR's tokenizer; the worker is
one it starts (lsp/backend.py) or one running at `endpoint`. What a request goes through:

    textDocument/inlineCompletion, textDocument/completion
      -> the document (pygls, incremental sync) and the cursor in the negotiated position encoding
         (UTF-16 unless the client offers UTF-8 or UTF-32; pygls' position codec converts)
      -> the suggestion cache (lsp/completion.py): typed-ahead or accepted text is answered without the model
      -> debounce and supersede (lsp/lifecycle.py)
      -> window, token healing, prompt, worker, post-processing (lsp/completion.py)
      -> ContentModified if the document changed meanwhile; hidden if under the confidence threshold
      -> the item; then the suggestion that would follow its acceptance is prefetched

Errors: a request the server cannot serve (unknown document, a position outside it) gets an InvalidParams
error naming the values; a worker failure gets a RequestFailed error and one window/showMessage, and while
the worker is down requests get an empty answer at once (lsp/backend.py reconnects). Settings: lsp/settings.py.
Telemetry (local only): lsp/telemetry.py, `codefill/stats`, commands `codefill.accept` / `codefill.dismiss`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.exceptions import JsonRpcContentModified, JsonRpcException, JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.uris import to_fs_path
from pygls.workspace import TextDocument

from codefill.inference_workers.client import WorkerError, WorkerOverloaded
from codefill.inference_workers.protocol import WireError, check_endpoint
from codefill.model.checkpoint import load_tokenizer
from codefill.model.tokenizer import Tokenizer, TokenizerError

from . import transport
from .backend import Backend, WorkerDown
from .completion import Completer, Entry, Suggestion, SuggestionCache
from .context import ContextError, cursor_context
from .context_ring import ContextRing
from .lifecycle import Debounce, Requests, Superseded
from .prompt import PromptError
from .settings import Settings, SettingsError
from .telemetry import JsonlLog, Telemetry

logger = logging.getLogger(__name__)
VERSION = "0.2.0"
STATS = "codefill/stats"
ACCEPT, DISMISS = "codefill.accept", "codefill.dismiss"

__all__ = ["Settings", "main", "server"]


class CompletionError(JsonRpcException):
    """Why a completion request failed; sent to the client as the error response of that request."""

    CODE = types.LSPErrorCodes.RequestFailed


@dataclass(frozen=True)
class Cursor:
    prefix: str
    suffix: str
    position: types.Position  # clamped to the line's end, in the client's units
    after: str  # the rest of the cursor line (for the range of replaced characters)


@dataclass
class Shown:
    sid: str
    prefix: str
    text: str


def _leaf_errors(exc: BaseException) -> list[str]:
    inner = getattr(exc, "exceptions", None)
    if inner:
        return [m for e in inner for m in _leaf_errors(e)]
    return [f"missing field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"]


class _Ignored:
    jsonrpc = "ignored"  # handle_message drops it


class CodefillProtocol(LanguageServerProtocol):
    """pygls answers a request whose params do not deserialize with an out-of-band showMessage only; the
    client would wait for its response forever. This answers the request itself with InvalidParams."""

    def structure_message(self, data: dict[str, Any]):
        try:
            return super().structure_message(data)
        except JsonRpcInvalidParams as e:
            if not (isinstance(data, dict) and "id" in data and "method" in data):
                raise
            why = "; ".join(_leaf_errors(e.__cause__)) if e.__cause__ is not None else "invalid params"
            error = JsonRpcInvalidParams(f"invalid params for {data['method']}: {why}")
            self._send_response(data["id"], error=error.to_response_error())
            return _Ignored()


class CodefillServer(LanguageServer):
    def __init__(self) -> None:
        super().__init__("codefill", VERSION, protocol_cls=CodefillProtocol)
        self.model_dir = Path(".")
        self.tokenizer: Tokenizer | None = None
        self.settings = Settings()
        self.backend: Backend | None = None
        self.client_keys = None  # security.ClientKeys for a remote --endpoint
        self.completer: Completer | None = None
        self.requests = Requests()
        self.debounce = Debounce()
        self.cache = SuggestionCache(self.settings.cache_size)
        self.ring = ContextRing(max_chunks=max(1, self.settings.context_chunks))
        self.telemetry = Telemetry()
        self.shown: dict[str, Shown] = {}  # uri -> the suggestion last shown there
        self.prefetching: dict[tuple[str, str], asyncio.Task] = {}
        self.shutdown_received = False
        self.exit_code: int | None = None
        self._parent_watch: asyncio.Task | None = None

    # --- settings ---

    def apply_settings(self, settings: Settings) -> None:
        self.settings = settings
        self.cache.size = settings.cache_size
        self.ring.max_chunks = max(1, settings.context_chunks)
        self.telemetry.log = JsonlLog(settings.telemetry_dir(), settings.log_max_bytes, settings.log_backups) \
            if settings.telemetry else None
        if self.backend is not None:
            self.backend.reconfigure(settings)

    def get_backend(self) -> Backend:
        if self.backend is None:
            if self.tokenizer is None:
                raise CompletionError("codefill was started without a tokenizer (call lsp.server.main)")
            self.backend = Backend(self.model_dir, self.settings, self.show_error, keys=self.client_keys)
            self.completer = Completer(self.tokenizer)
        return self.backend

    def show_error(self, message: str) -> None:
        self.window_show_message(types.ShowMessageParams(types.MessageType.Error, f"codefill: {message}"))

    # --- documents and cursors ---

    def document(self, uri: str) -> TextDocument:
        if uri not in self.workspace.text_documents:
            raise JsonRpcInvalidParams(f"unknown document {uri}: it was not opened (textDocument/didOpen)")
        return self.workspace.get_text_document(uri)

    def cursor(self, doc: TextDocument, position: types.Position) -> Cursor:
        try:
            prefix, suffix, clamped = cursor_context(doc, position)
        except ContextError as e:
            raise JsonRpcInvalidParams(str(e)) from None
        return Cursor(prefix, suffix, clamped, suffix.split("\n", 1)[0].rstrip("\r"))

    def path_of(self, uri: str) -> str:
        path = to_fs_path(uri) or uri
        root = self.workspace.root_path
        if root and path.startswith(root.rstrip("/") + "/"):
            return path[len(root.rstrip("/")) + 1:]
        return path

    # --- completion ---

    async def suggest(self, uri: str, position: types.Position, invoked: bool
                      ) -> tuple[Suggestion, str, Cursor] | None:
        """The suggestion to show at `position`, its telemetry id, and the cursor; None for nothing."""
        started = time.perf_counter()
        self.telemetry.count("requests")
        doc = self.document(uri)
        s = self.settings
        if not s.language_enabled(doc.language_id) or len(doc.source) > s.max_document_chars:
            return None
        cur = self.cursor(doc, position)
        version = doc.version
        self.debounce.keystroke()
        seq = self.requests.begin(uri)
        self.follow_shown(uri, cur.prefix)
        self.cancel_prefetches(uri, cur.prefix)

        source = "cache"
        hit = self.cache.lookup(uri, cur.prefix, cur.suffix)
        if hit is None and (pending := self.prefetching.get((uri, cur.prefix))) is not None:
            try:
                await asyncio.shield(pending)
            except (asyncio.CancelledError, Exception):
                if asyncio.current_task().cancelling():
                    raise
            hit = self.cache.lookup(uri, cur.prefix, cur.suffix)
            source = "prefetch"
        if hit is not None:
            self.telemetry.count("cache_hits")
            suggestion = hit[1]
        else:
            self.telemetry.count("cache_misses")
            source = "model"
            try:
                if not invoked:
                    await asyncio.sleep(self.debounce.delay_s(s.debounce_min_ms, s.debounce_max_ms))
                self.requests.check(uri, seq)
                suggestion = await self.requests.run(uri, seq, self.model_call(uri, doc, cur.prefix, cur.suffix))
            except Superseded:
                return None
            if suggestion is None:
                return None
        if doc.version != version or self.workspace.text_documents.get(uri) is not doc:
            raise JsonRpcContentModified(f"{uri} changed from version {version} to {doc.version} "
                                         "while its completion was computed")
        if s.min_mean_logprob is not None and suggestion.mean_logprob is not None \
                and suggestion.mean_logprob < s.min_mean_logprob:
            self.telemetry.count("hidden_low_confidence")
            return None
        sid = uuid.uuid4().hex[:12]
        self.telemetry.shown(sid, (time.perf_counter() - started) * 1000, source, uri, len(suggestion.text),
                             suggestion.mean_logprob)
        self.shown[uri] = Shown(sid, cur.prefix, suggestion.text)
        if source == "model":
            self.cache.put(Entry(uri, cur.prefix, cur.suffix, suggestion, sid))
        if s.prefetch:
            self.start_prefetch(uri, doc, cur, suggestion)
        return suggestion, sid, cur

    async def model_call(self, uri: str, doc: TextDocument, prefix: str, suffix: str,
                         prefetch: bool = False) -> Suggestion | None:
        """One worker request; None when the worker is down, overloaded or the answer is empty."""
        backend = self.get_backend()
        try:
            link = await backend.get()
            chunks = self.ring.chunks(exclude_uri=uri) if self.settings.context_chunks else []
            t0 = time.perf_counter()
            self.telemetry.count("prefetches" if prefetch else "model_calls")
            generated = await backend.while_alive(self.completer.generate(
                link.client, link.max_seq_len, self.settings, prefix, suffix, path=self.path_of(uri),
                language_id=doc.language_id, chunks=chunks))
            self.debounce.model_latency(time.perf_counter() - t0)
            return generated.suggestion
        except WorkerDown:
            return None
        except WorkerOverloaded as e:
            logger.warning("%s", e)
            return None
        except WorkerError as e:
            self.telemetry.count("errors")
            backend.mark_down(str(e))
            raise CompletionError(str(e)) from e
        except (PromptError, TokenizerError, WireError) as e:
            self.telemetry.count("errors")
            raise CompletionError(f"cannot complete in {uri}: {e}") from e

    def start_prefetch(self, uri: str, doc: TextDocument, cur: Cursor, suggestion: Suggestion) -> None:
        """Compute, in the background, what to suggest once `suggestion` is accepted."""
        prefix = cur.prefix + suggestion.text
        suffix = cur.suffix[suggestion.replace_after:]
        key = (uri, prefix)
        if key in self.prefetching or self.cache.lookup(uri, prefix, suffix) is not None:
            return

        async def run() -> None:
            try:
                # Only once the user pauses: a keystroke meanwhile that does not lead towards `prefix` cancels
                # this before it reaches the worker (cancel_prefetches), so it never takes the slot whose
                # cached prompt that keystroke's own request extends.
                await asyncio.sleep(self.settings.prefetch_delay_ms / 1000)
                nxt = await self.model_call(uri, doc, prefix, suffix, prefetch=True)
                if nxt is not None:
                    self.cache.put(Entry(uri, prefix, suffix, nxt, ""))
            except (JsonRpcException, asyncio.CancelledError):
                pass
            finally:
                self.prefetching.pop(key, None)

        self.prefetching[key] = asyncio.get_running_loop().create_task(run())

    def cancel_prefetches(self, uri: str, prefix: str) -> None:
        """A keystroke that does not lead towards a prefetched text makes that prefetch useless."""
        for (u, p), task in list(self.prefetching.items()):
            if u == uri and not p.startswith(prefix):
                task.cancel()

    def follow_shown(self, uri: str, prefix: str) -> None:
        """Telemetry: the last suggestion shown in `uri` was typed in full (accepted), typed over (dismissed),
        or is still being typed ahead."""
        shown = self.shown.get(uri)
        if shown is None or prefix == shown.prefix:
            return
        typed = prefix[len(shown.prefix):] if prefix.startswith(shown.prefix) else None
        if typed is not None and shown.text.startswith(typed) and typed != shown.text:
            return
        del self.shown[uri]
        if typed == shown.text:
            self.telemetry.accepted(shown.sid)
        else:
            self.telemetry.dismissed(shown.sid, "typed-over")

    def range_of(self, cur: Cursor, suggestion: Suggestion, doc: TextDocument) -> types.Range:
        replaced = cur.after[:suggestion.replace_after]
        end = cur.position.character + doc.position_codec.client_num_units(replaced)
        return types.Range(cur.position, types.Position(cur.position.line, end))

    def stop(self) -> None:
        for task in list(self.prefetching.values()):
            task.cancel()
        if self.backend is not None:
            self.backend.stop()


server = CodefillServer()


@server.feature(types.INITIALIZE)
def initialize(ls: CodefillServer, params: types.InitializeParams) -> None:
    try:
        ls.apply_settings(ls.settings.merged(params.initialization_options))
    except SettingsError as e:
        ls.apply_settings(ls.settings)
        ls.show_error(f"initializationOptions refused, defaults kept: {e}")
    if params.process_id is not None:
        def gone() -> None:
            # No orderly exit: pygls' stdin reader thread blocks in read() and would keep the process alive.
            ls.stop()
            logging.shutdown()
            os._exit(1)

        ls._parent_watch = asyncio.get_running_loop().create_task(transport.watch_parent(params.process_id, gone))


@server.feature(types.INITIALIZED)
def initialized(ls: CodefillServer, params: types.InitializedParams) -> None:
    backend = ls.get_backend()

    async def warm() -> None:  # load the model while the user opens files
        try:
            await backend.get()
        except WorkerError:
            pass  # already shown and marked down

    asyncio.get_running_loop().create_task(warm())


@server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
def did_change_configuration(ls: CodefillServer, params: types.DidChangeConfigurationParams) -> None:
    try:
        ls.apply_settings(ls.settings.merged(params.settings))
    except SettingsError as e:
        ls.show_error(f"settings refused, previous ones kept: {e}")


@server.feature(types.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: CodefillServer, params: types.DidOpenTextDocumentParams) -> None:
    item = params.text_document
    if len(item.text) <= ls.settings.max_document_chars:
        ls.ring.note_open(item.uri, ls.path_of(item.uri), item.text)


@server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: CodefillServer, params: types.DidChangeTextDocumentParams) -> None:
    uri = params.text_document.uri
    doc = ls.workspace.text_documents.get(uri)
    if doc is None or len(doc.source) > ls.settings.max_document_chars:
        return
    change = params.content_changes[-1] if params.content_changes else None
    line = change.range.start.line if isinstance(change, types.TextDocumentContentChangePartial) else 0
    ls.ring.note_edit(uri, ls.path_of(uri), doc.source, line)


@server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: CodefillServer, params: types.DidCloseTextDocumentParams) -> None:
    uri = params.text_document.uri
    ls.ring.forget(uri)
    ls.cache.forget(uri)
    ls.requests.forget(uri)
    ls.shown.pop(uri, None)


def _accept_command(sid: str, suggestion: Suggestion) -> types.Command:
    return types.Command(title="codefill: suggestion accepted", command=ACCEPT,
                         arguments=[sid, {"mean_logprob": suggestion.mean_logprob}])


@server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
async def inline_completion(ls: CodefillServer, params: types.InlineCompletionParams) -> types.InlineCompletionList:
    invoked = params.context is not None and params.context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
    found = await ls.suggest(params.text_document.uri, params.position, invoked=invoked)
    if found is None:
        return types.InlineCompletionList(items=[])
    suggestion, sid, cur = found
    doc = ls.document(params.text_document.uri)
    item = types.InlineCompletionItem(insert_text=suggestion.text,
                                      range=ls.range_of(cur, suggestion, doc),
                                      command=_accept_command(sid, suggestion))
    return types.InlineCompletionList(items=[item])


@server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())
async def completion(ls: CodefillServer, params: types.CompletionParams) -> types.CompletionList:
    found = await ls.suggest(params.text_document.uri, params.position, invoked=True)
    if found is None:
        return types.CompletionList(is_incomplete=True, items=[])
    suggestion, sid, cur = found
    doc = ls.document(params.text_document.uri)
    first_line = next(line for line in suggestion.text.split("\n") if line.strip())
    confidence = "" if suggestion.mean_logprob is None else f" (mean log-prob {suggestion.mean_logprob:.2f})"
    item = types.CompletionItem(
        label=first_line.strip(),
        kind=types.CompletionItemKind.Text,
        detail="codefill" + confidence,
        documentation=suggestion.text,
        text_edit=types.TextEdit(ls.range_of(cur, suggestion, doc), suggestion.text),
        insert_text_format=types.InsertTextFormat.PlainText,
        # the middle need not start with what the user typed, so do not let the client filter it away
        filter_text=first_line.strip(),
        sort_text="0",
        command=_accept_command(sid, suggestion),
        data={"id": sid, "mean_logprob": suggestion.mean_logprob},
    )
    # Incomplete: the next keystroke changes the prompt, so the client must ask again.
    return types.CompletionList(is_incomplete=True, items=[item])


def _sid(args: Any) -> str:
    if not args or not isinstance(args[0], str):
        raise JsonRpcInvalidParams(f"expected the suggestion id as the first argument, got {args!r:.80}")
    return args[0]


@server.command(ACCEPT)
def accept(ls: CodefillServer, *args: Any) -> bool:
    sid = _sid(args)
    for uri, shown in list(ls.shown.items()):
        if shown.sid == sid:
            del ls.shown[uri]
    return ls.telemetry.accepted(sid)


@server.command(DISMISS)
def dismiss(ls: CodefillServer, *args: Any) -> bool:
    sid = _sid(args)
    for uri, shown in list(ls.shown.items()):
        if shown.sid == sid:
            del ls.shown[uri]
    return ls.telemetry.dismissed(sid, "editor")


@server.feature(STATS)
def stats(ls: CodefillServer, params: Any) -> dict:
    out = ls.telemetry.stats()
    backend = ls.backend
    out["worker"] = {"up": backend is not None and backend.link is not None and backend.down_reason is None,
                     "down_reason": backend.down_reason if backend else None,
                     "restarts": backend.restarts if backend else 0}
    return out


@server.feature(types.SHUTDOWN)
def shutdown(ls: CodefillServer, params: None) -> None:
    ls.shutdown_received = True
    ls.stop()


@server.feature(types.EXIT)
def exit_(ls: CodefillServer, params: None) -> None:
    ls.stop()  # an exit without shutdown still must not leave a worker behind
    ls.exit_code = 0 if ls.shutdown_received else 1


def main(model_dir: str | Path | None = None, endpoint: str | None = None, settings: Settings | None = None,
         tcp: str | None = None, client_keys=None) -> int:
    """Serve LSP over stdio (or one TCP connection) until the client sends exit; returns the exit status.

    `model_dir` is required: the server tokenizes (workers see token ids only). A worker is started on it,
    unless `endpoint` names a running one. Bad arguments raise before serving: TokenizerError (no model dir,
    no or bad tokenizer.model), WorkerError (an endpoint that is not local), TransportError (a bad --tcp).
    Worker failures after that are LSP error responses, never an exit. client_keys: security.ClientKeys, with
    which `endpoint` may be another machine's (a worker bound with --allow-remote and CURVE keys).
    """
    if model_dir is None:
        raise TokenizerError(
            "the language server needs a model directory for its tokenizer (workers see token ids only): "
            "give --model DIR, plus --endpoint E to use an already running worker"
        )
    settings = settings or Settings()
    if endpoint is not None:
        settings = settings.merged({"endpoint": endpoint})
    if settings.endpoint is not None:
        try:
            check_endpoint(settings.endpoint, allow_remote=client_keys is not None)
        except WireError as e:
            raise WorkerError(str(e)) from e
    address = transport.parse_tcp(tcp) if tcp is not None else None
    server.model_dir = Path(model_dir)
    server.tokenizer = load_tokenizer(server.model_dir)
    server.settings = settings
    server.client_keys = client_keys
    try:
        if address is None:
            transport.serve_stdio(server)
        else:
            transport.serve_tcp(server, *address,
                                on_listening=lambda h, p: print(f"codefill: listening on {h}:{p}",
                                                                file=sys.stderr, flush=True))
    finally:
        server.stop()
    return 1 if server.exit_code is None else server.exit_code
