"""`codefill http`: llama.cpp's and OpenAI's completion APIs in front of codefill's workers.

    codefill http --port P [--model DIR] [--endpoint E | --tp N] [--host H --allow-remote --api-key-file F]

    GET  /health            {"status": "ok"} once the worker answers; 503 with the reason before
    POST /infill            llama.cpp: input_prefix, input_suffix, input_extra, prompt -> content, timings...
    POST /completion        llama.cpp: prompt (text before the cursor) -> the same answer
    GET  /v1/models         OpenAI: the served model
    POST /v1/completions    OpenAI: prompt, suffix -> choices[].text

Every request goes through the language server's completion code (http_api/generation.py) on a worker that
lsp/backend.py starts or connects to, exactly as `codefill serve` does. Streaming answers are server-sent
events (`data: {...}`; OpenAI's end with `data: [DONE]`). A client that disconnects cancels its handler
(aiohttp's handler cancellation), and with it the worker requests. Errors are JSON in the shape both APIs use,
{"error": {"code", "message", "type"}}: 4xx for the request, 503 while the worker is down or busy, 502 when
it fails.

Who may connect: the server listens on loopback unless `--allow-remote` is given, and then it needs an API
key (`--api-key-file`): every endpoint but /health wants `Authorization: Bearer KEY`, as llama-server's
`--api-key` does; the workers run whatever they are sent, like the rules of inference_workers/security.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from codefill.inference_workers.client import WorkerError, WorkerOverloaded
from codefill.inference_workers.protocol import FinishReason
from codefill.lsp.backend import Backend, WorkerDown
from codefill.lsp.completion import Completer
from codefill.lsp.prompt import PromptError
from codefill.lsp.settings import Settings
from codefill.model.checkpoint import load_tokenizer
from codefill.model.tokenizer import Tokenizer, TokenizerError

from . import schema
from .fim_text import split_fim_text
from .generation import Completion, Delta, Generation
from .schema import CompletionRequest, HttpError

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 8 * 1024 * 1024  # a body over this is refused (413); the prompt keeps only a window anyway


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8012  # llama.vim's default endpoint, http://127.0.0.1:8012/infill
    allow_remote: bool = False
    api_key: str | None = None
    model_name: str = "codefill"  # the id /v1/models answers and responses carry


def check_listen(config: HttpConfig) -> None:
    """HttpError unless the address is loopback, or remote access is allowed explicitly and keyed."""
    host = config.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise HttpError(f"--host {host!r} is not an IP address or localhost") from None
    if not 0 <= config.port <= 65535:
        raise HttpError(f"--port {config.port} is out of range [0, 65535]")
    if loopback:
        return
    if not config.allow_remote:
        raise HttpError(f"--host {host} can be reached from other machines; serving it needs --allow-remote and "
                        f"--api-key-file (the workers run whatever they are sent)")
    if not config.api_key:
        raise HttpError(f"--host {host}: --allow-remote needs --api-key-file; without a key anyone on the network "
                        f"could run the model")


def read_api_key(path: str | Path) -> str:
    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise HttpError(f"cannot read the API key file {path}: {e}") from e
    if len(key) < 16 or any(c.isspace() for c in key):
        raise HttpError(f"the API key in {path} must be one word of at least 16 characters")
    return key


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message, "type": kind}}, status=status)


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


# --- the two response shapes ----------------------------------------------------------------------------


def _timings(c: Completion) -> dict:
    prompt_n = c.n_prompt - c.n_reused
    return {
        "cache_n": c.n_reused,
        "prompt_n": prompt_n, "prompt_ms": c.prompt_ms,
        "prompt_per_token_ms": c.prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / c.prompt_ms * 1000 if c.prompt_ms > 0 else 0.0,
        "predicted_n": c.n_generated, "predicted_ms": c.predicted_ms,
        "predicted_per_token_ms": c.predicted_ms / c.n_generated if c.n_generated else 0.0,
        "predicted_per_second": c.n_generated / c.predicted_ms * 1000 if c.predicted_ms > 0 else 0.0,
    }


def _stop_type(c: Completion) -> str:
    if c.finish == FinishReason.LENGTH:
        return "limit"
    return "word" if c.stopping_word else "eos"


def _pick(fields: tuple[str, ...] | None, res: dict) -> dict:
    """llama.cpp's response_fields: only the listed paths, "a/b" taken from res["a"]["b"] to the top level
    under its full path (llama.vim reads "timings/prompt_n"); missing paths are left out."""
    if fields is None:
        return res
    out = {}
    for path in fields:
        value, ok = res, True
        for key in path.split("/"):
            if ok and isinstance(value, dict) and key in value:
                value = value[key]
            else:
                ok = False
        if ok:
            out[path] = value
    return out


class Server:
    def __init__(self, tok: Tokenizer, backend: Backend, settings: Settings, config: HttpConfig):
        self.tok, self.backend, self.config = tok, backend, config
        self.generation = Generation(backend, Completer(tok), settings)
        self.started = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors, self._auth])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/health", self.health)
        app.router.add_post("/infill", self.infill)
        app.router.add_post("/completion", self.completion)
        app.router.add_post("/completions", self.completion)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/models", self.models)
        app.router.add_post("/v1/completions", self.openai_completions)
        return app

    # --- middlewares ---

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as e:
            return _error(e.status, str(e), e.kind)
        except web.HTTPRequestEntityTooLarge as e:
            return _error(413, f"the request body is larger than {MAX_BODY_BYTES} bytes ({e.text})",
                          "invalid_request_error")
        except web.HTTPException as e:  # 404, 405 from the router
            if e.status < 400:
                raise
            return _error(e.status, f"{request.method} {request.path}: {e.reason}",
                          "not_found_error" if e.status == 404 else "invalid_request_error")
        except ConnectionError:
            raise  # the client is gone: nobody to answer
        except Exception as e:  # a bug: logged with its traceback, answered in the APIs' error shape
            logger.exception("%s %s failed", request.method, request.path)
            return _error(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        key = self.config.api_key
        if key and request.path not in ("/health", "/v1/health"):
            given = request.headers.get("Authorization", "")
            token = given[len("Bearer "):] if given.startswith("Bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return _error(401, "Invalid API Key", "authentication_error")
        return await handler(request)

    # --- endpoints ---

    async def health(self, request: web.Request) -> web.Response:
        b = self.backend
        if b.down_reason is not None:
            return _error(503, b.down_reason, "unavailable_error")
        if b.link is None:
            return _error(503, "Loading model", "unavailable_error")
        try:
            pong = await asyncio.wait_for(b.link.client.ping(), 5.0)
        except (WorkerError, TimeoutError) as e:
            return _error(503, f"the worker does not answer: {e}", "unavailable_error")
        if not pong.ready:
            return _error(503, "the worker is not ready (draining, or its model failed)", "unavailable_error")
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{
            "id": self.config.model_name, "object": "model", "created": self.started, "owned_by": "codefill",
            "meta": {"n_vocab": self.tok.vocab_size, "n_ctx": self.backend.link.max_seq_len if self.backend.link
                     else None}}]})

    async def _body(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HttpError(f"the request body is not JSON: {e}") from None

    async def infill(self, request: web.Request) -> web.StreamResponse:
        return await self._llama(request, schema.infill_request(await self._body(request)))

    async def completion(self, request: web.Request) -> web.StreamResponse:
        return await self._llama(request, self._unwrap(schema.completion_request(await self._body(request))))

    async def openai_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, self._unwrap(schema.openai_request(await self._body(request))))

    def _unwrap(self, req: CompletionRequest) -> CompletionRequest:
        """A prompt the client wrote in the served model's FIM layout (Continue does) as prefix and suffix."""
        found = split_fim_text(self.tok, req.prefix) if not req.suffix else None
        return req if found is None else dataclasses.replace(req, prefix=found[0], suffix=found[1])

    # --- running a request ---

    async def _results(self, req: CompletionRequest):
        """The generation's events, with worker and prompt failures turned into HttpErrors."""
        try:
            async with contextlib.aclosing(self.generation.run(req)) as events:
                async for item in events:
                    yield item
        except WorkerOverloaded as e:
            raise HttpError(f"the worker is busy: {e}; retry", 503, "unavailable_error") from e
        except WorkerDown as e:
            raise HttpError(str(e), 503, "unavailable_error") from e
        except WorkerError as e:
            self.backend.mark_down(str(e))
            raise HttpError(f"the worker failed: {e}", 502, "server_error") from e
        except (PromptError, TokenizerError) as e:
            raise HttpError(f"cannot build a prompt for this request: {e}") from e

    async def _completions(self, req: CompletionRequest) -> list[Completion]:
        async with contextlib.aclosing(self._results(req)) as results:
            return sorted([item async for item in results if isinstance(item, Completion)], key=lambda c: c.index)

    async def _stream(self, request: web.Request, events, done: bytes | None) -> web.StreamResponse:
        """Server-sent events from `events` (payloads); an error after the start goes as one more event.

        The generators are closed explicitly (aclosing), not left to the garbage collector: a client that goes
        away mid-stream must cancel the worker requests now."""
        async with contextlib.aclosing(events) as agen:
            try:
                first = await anext(agen)  # before the headers: a request refused at once gets a JSON error
            except StopAsyncIteration:
                first = None
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            try:
                if first is not None:
                    await response.write(_sse(first))
                async for payload in agen:
                    await response.write(_sse(payload))
            except HttpError as e:
                await response.write(_sse({"error": {"code": e.status, "message": str(e), "type": e.kind}}))
        if done is not None:
            await response.write(done)
        await response.write_eof()
        return response

    # llama.cpp

    def _llama_final(self, req: CompletionRequest, c: Completion) -> dict:
        return _pick(req.response_fields, {
            "index": c.index, "content": c.text[c.streamed:] if req.stream else c.text,
            "tokens": c.token_ids if req.return_tokens or req.stream else [],
            "id_slot": -1, "stop": True, "model": self.config.model_name,
            "tokens_predicted": c.n_generated, "tokens_evaluated": c.n_prompt,
            "generation_settings": {"n_predict": -1 if req.max_tokens is None else req.max_tokens,
                                    "temperature": req.temperature, "top_k": req.top_k, "top_p": req.top_p,
                                    "seed": req.seed, "stop": list(req.stop), "stream": req.stream},
            "prompt": "", "has_new_line": "\n" in c.text, "truncated": False,
            "stop_type": _stop_type(c), "stopping_word": c.stopping_word,
            "tokens_cached": c.n_prompt + c.n_generated, "timings": _timings(c),
        })

    async def _llama(self, request: web.Request, req: CompletionRequest) -> web.StreamResponse:
        if req.stream:
            async def events():
                async with contextlib.aclosing(self._results(req)) as results:
                    async for item in results:
                        if isinstance(item, Delta):
                                yield {"index": item.index, "content": item.text, "tokens": item.token_ids,
                                   "stop": False, "id_slot": -1, "tokens_predicted": item.n_generated,
                                   "tokens_evaluated": item.n_prompt}
                        else:
                            yield self._llama_final(req, item)
            return await self._stream(request, events(), None)
        done = await self._completions(req)
        out = [self._llama_final(req, c) for c in done]
        return web.json_response(out[0] if req.n == 1 else out)

    # OpenAI

    def _openai_chunk(self, cid: str, created: int, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": cid, "object": "text_completion", "created": created, "model": self.config.model_name,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    async def _openai(self, request: web.Request, req: CompletionRequest) -> web.StreamResponse:
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def finish(c: Completion) -> str:
            return "stop" if c.stopped else "length"

        if req.stream:
            async def events():
                async with contextlib.aclosing(self._results(req)) as results:
                    async for item in results:
                        if isinstance(item, Delta):
                            choice = {"text": item.text, "index": item.index, "logprobs": None,
                                      "finish_reason": None}
                        else:
                            choice = {"text": item.text[item.streamed:], "index": item.index, "logprobs": None,
                                      "finish_reason": finish(item)}
                        yield self._openai_chunk(cid, created, [choice])
            return await self._stream(request, events(), b"data: [DONE]\n\n")
        done = await self._completions(req)
        prompt_tokens = done[0].n_prompt if done else 0
        completion_tokens = sum(c.n_generated for c in done)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        choices = [{"text": c.text, "index": c.index, "logprobs": None, "finish_reason": finish(c)} for c in done]
        return web.json_response(self._openai_chunk(cid, created, choices, usage))


def main(model_dir: str | Path, settings: Settings, config: HttpConfig,
         on_listening: Callable[[str, int], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM; the worker this server started is stopped on the way out.
    Bad arguments raise HttpError or TokenizerError before anything starts."""
    check_listen(config)
    tok = load_tokenizer(Path(model_dir))
    Completer(tok).stop_ids  # TokenizerError naming the missing pieces: a model without FIM cannot serve /infill

    async def serve() -> None:
        backend = Backend(Path(model_dir), settings, notify=lambda message: logger.error("%s", message))
        server = Server(tok, backend, settings, config)
        runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.host, config.port)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]
            logger.info("serving HTTP on %s:%d", config.host, port)
            if on_listening is not None:
                on_listening(config.host, port)

            async def warm() -> None:  # start the worker now, not on the first request
                try:
                    await backend.get()
                except WorkerError:
                    pass  # logged and marked down; /health says why

            loop = asyncio.get_running_loop()
            warming = loop.create_task(warm())
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            try:
                await stop.wait()
            finally:
                warming.cancel()
        finally:
            await runner.cleanup()
            backend.stop()

    asyncio.run(serve())
