"""The codefill language server: Code Llama fill-in-the-middle as inline completions and completion items.

    python -m codefill.lsp.server --model MODEL_DIR [--endpoint ipc://...]     (or `codefill serve --stdio`)

On `initialized` the server loads the tokenizer from MODEL_DIR and starts a worker on the same directory
(or connects to `--endpoint`, a worker someone else started; the tokenizer still comes from MODEL_DIR,
since workers see token ids only). For each request it splits the document at the cursor (positions in the
client's units, UTF-16 by default), builds the PSM prompt, asks the worker for greedy tokens up to <EOT>,
and answers with the decoded middle:

- textDocument/inlineCompletion: one InlineCompletionItem inserting the middle at the cursor.
- textDocument/completion: one CompletionItem labelled with the middle's first line, whose textEdit
  inserts the whole middle.

An empty or whitespace-only middle is an empty answer. A worker that fails or cannot start turns into an
error response (code RequestFailed) with the reason, and a window/showMessage the first time; the server
keeps running. $/cancelRequest cancels the handler's task, which cancels the worker's request.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pygls.lsp.server import LanguageServer

from codefill.inference_workers.client import AsyncWorkerClient, WorkerError, spawn_worker, stop_worker, worker_log
from codefill.inference_workers.protocol import WireError, check_endpoint
from codefill.lsp.context import ContextError, cursor_context, fit_prompt
from codefill.model.checkpoint import TOKENIZER_NAME
from codefill.model.fim import decode_middle
from codefill.model.tokenizer import Tokenizer, TokenizerError

logger = logging.getLogger(__name__)
VERSION = "0.1.0"


@dataclass(frozen=True)
class Settings:
    """Server defaults, one per key."""

    max_new_tokens: int = 64  # longest middle, in tokens; generation usually ends earlier at <EOT>
    request_timeout_s: float = 60.0  # longest silence from the worker during one request
    worker_start_timeout_s: float = 300.0  # model load + graph compile; minutes for a 7B on CPU
    worker_max_seq_len: int | None = None  # context of a spawned worker; None = Generator's default (2048)


class CompletionError(JsonRpcException):
    """Why a completion request failed; sent to the client as the error response of that request."""

    CODE = types.LSPErrorCodes.RequestFailed


@dataclass
class Backend:
    tokenizer: Tokenizer
    client: AsyncWorkerClient
    max_seq_len: int  # the worker's: prompt + max_new_tokens - 1 must fit


class CodefillServer(LanguageServer):
    def __init__(self) -> None:
        super().__init__("codefill", VERSION)
        # Set by main() before serving.
        self.model_dir = Path(".")
        self.tokenizer: Tokenizer | None = None
        self.endpoint: str | None = None
        self.settings = Settings()
        self.worker: subprocess.Popen | None = None  # when we spawned it
        self._backend: asyncio.Task | None = None
        self._reported = False

    # --- startup and shutdown ---

    def start_backend(self) -> asyncio.Task:
        if self._backend is None:
            self._backend = asyncio.get_running_loop().create_task(self._start_backend())
        return self._backend

    async def _start_backend(self) -> Backend:
        if self.tokenizer is None:
            raise CompletionError("codefill was started without a tokenizer (call lsp.server.main)")
        try:
            endpoint = self.endpoint
            if endpoint is None:
                self.worker, endpoint = await asyncio.to_thread(
                    spawn_worker,
                    self.model_dir,
                    timeout_s=self.settings.worker_start_timeout_s,
                    max_seq_len=self.settings.worker_max_seq_len,
                )
                logger.info("worker %d on %s, log %s", self.worker.pid, endpoint, worker_log(self.worker))
            client = AsyncWorkerClient(endpoint, timeout_s=self.settings.request_timeout_s)
            pong = await client.ping()
        except WorkerError as e:
            raise CompletionError(f"codefill could not start its worker: {e}") from e
        return Backend(self.tokenizer, client, pong.max_seq_len)

    async def backend(self) -> Backend:
        # shield: a cancelled completion must not cancel the startup that later requests share
        return await asyncio.shield(self.start_backend())

    def stop_backend(self) -> None:
        task = self._backend
        if task is not None and task.done() and not task.cancelled() and task.exception() is None:
            task.result().client.close()
        if self.worker is not None:
            stop_worker(self.worker)
            self.worker = None

    def report_once(self, error: Exception) -> None:
        """The first failure also goes to window/showMessage, where a user sees it; later ones only to logs."""
        logger.error("%s", error)
        if not self._reported:
            self._reported = True
            self.window_show_message(types.ShowMessageParams(types.MessageType.Error, f"codefill: {error}"))

    def check_worker_alive(self) -> None:
        """Raise CompletionError if the worker we spawned has exited (the log tail says why)."""
        if self.worker is None or self.worker.poll() is None:
            return
        log = worker_log(self.worker)
        tail = log.read_text(errors="replace")[-1000:] if log is not None and log.exists() else ""
        raise CompletionError(f"the worker (pid {self.worker.pid}) exited with status {self.worker.returncode}; "
                              f"restart the language server. Log {log}:\n{tail}")

    async def while_worker_lives(self, coro):
        """Await `coro`, but fail at once if the spawned worker dies meanwhile, instead of at the timeout."""
        task = asyncio.ensure_future(coro)
        if self.worker is None:
            return await task
        try:
            while True:
                done, _ = await asyncio.wait([task], timeout=0.2)
                if done:
                    return task.result()
                self.check_worker_alive()
        finally:
            task.cancel()  # no-op when done; otherwise its cleanup sends Cancel

    # --- completion ---

    async def middle_at(self, uri: str, position: types.Position) -> str:
        """The text the model would insert at `position` of document `uri`."""
        try:
            backend = await self.backend()
            self.check_worker_alive()
            document = self.workspace.get_text_document(uri)
            prefix, suffix = cursor_context(document, position)
            tok = backend.tokenizer
            max_new = min(self.settings.max_new_tokens, backend.max_seq_len // 2)
            ids, _, _ = fit_prompt(tok, prefix, suffix, backend.max_seq_len - max_new + 1)
            tokens, _ = await self.while_worker_lives(
                backend.client.complete(ids, max_new, stop_ids=[tok.eot_id, tok.eos_id])
            )
            return decode_middle(tok, [t.token_id for t in tokens])
        except CompletionError as e:
            self.report_once(e)
            raise
        except (WorkerError, ContextError, TokenizerError) as e:
            error = CompletionError(str(e))
            self.report_once(error)
            raise error from e


server = CodefillServer()


@server.feature(types.INITIALIZED)
def initialized(ls: CodefillServer, params: types.InitializedParams) -> None:
    ls.start_backend()  # load the model while the user opens files


@server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
async def inline_completion(ls: CodefillServer, params: types.InlineCompletionParams) -> types.InlineCompletionList:
    middle = await ls.middle_at(params.text_document.uri, params.position)
    if not middle.strip():
        return types.InlineCompletionList(items=[])
    at_cursor = types.Range(params.position, params.position)
    return types.InlineCompletionList(items=[types.InlineCompletionItem(insert_text=middle, range=at_cursor)])


@server.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions())
async def completion(ls: CodefillServer, params: types.CompletionParams) -> types.CompletionList:
    middle = await ls.middle_at(params.text_document.uri, params.position)
    if not middle.strip():
        return types.CompletionList(is_incomplete=True, items=[])
    first_line = next(line for line in middle.split("\n") if line.strip())
    item = types.CompletionItem(
        label=first_line.strip(),
        kind=types.CompletionItemKind.Text,
        detail="codefill",
        documentation=middle,
        text_edit=types.TextEdit(types.Range(params.position, params.position), middle),
        insert_text_format=types.InsertTextFormat.PlainText,
        # the middle need not start with what the user typed, so do not let the client filter it away
        filter_text=first_line.strip(),
        sort_text="0",
    )
    # Incomplete: the next keystroke changes the prompt, so the client must ask again.
    return types.CompletionList(is_incomplete=True, items=[item])


@server.feature(types.SHUTDOWN)
def shutdown(ls: CodefillServer, params: None) -> None:
    ls.stop_backend()


@server.feature(types.EXIT)
def exit_(ls: CodefillServer, params: None) -> None:
    ls.stop_backend()  # an exit without shutdown still must not leave a worker behind


def main(model_dir: str | Path | None = None, endpoint: str | None = None, settings: Settings | None = None) -> None:
    """Serve LSP over stdin/stdout until the client sends exit.

    `model_dir` is required: the server tokenizes (workers see token ids only). A worker is started on it,
    unless `endpoint` names a running one. Bad arguments raise before serving: TokenizerError (no model dir,
    no or bad tokenizer.model) or WorkerError (an endpoint that is not local). Worker failures after that
    are LSP error responses, never an exit.
    """
    if model_dir is None:
        raise TokenizerError(
            "the language server needs a model directory for its tokenizer (workers see token ids only): "
            "give --model DIR, plus --endpoint E to use an already running worker"
        )
    if endpoint is not None:
        try:
            check_endpoint(endpoint)
        except WireError as e:
            raise WorkerError(str(e)) from e
    server.model_dir = Path(model_dir)
    server.tokenizer = Tokenizer(server.model_dir / TOKENIZER_NAME)
    server.endpoint, server.settings = endpoint, settings or Settings()
    # stdout carries JSON-RPC; anything printed by mistake must not land in it.
    rpc_out = sys.stdout.buffer
    sys.stdout = sys.stderr
    try:
        server.start_io(sys.stdin.buffer, rpc_out)
    finally:
        server.stop_backend()
