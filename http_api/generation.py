"""Running one HTTP completion request on the workers, through the language server's completion path.

    CompletionRequest (http_api/schema.py)
      -> lsp/completion.py Completer.plan: window, token healing, lsp/prompt.py's token budget and the served
         family's FIM layout (model/fim.py), input_extra as context chunks
      -> n worker requests at once (lsp/backend.py's link), each streaming Tokens
      -> TextStream: text deltas that never take anything back (held: an incomplete UTF-8 character, the
         healed identifier until it is complete, a tail that may begin a stop string, and with line rules
         the text from the last newline on, since the worker cuts those before a newline)
      -> Completer.middle: the answer (stop-rule cut, healing removed); for a one-line request
         (a "\\n" stop) the language server's single-line rules and lsp/postprocess.py's `fit`
      -> Delta events while streaming, one Completion per choice with counts and timings

The answer is otherwise the raw middle, as llama.cpp returns it: editor plugins for those APIs trim it
themselves. Cancelling the consumer (the client went away) cancels every worker request: the worker
client's cleanup sends Cancel, so the slot is free within one token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from codefill.inference_workers.client import StopRules
from codefill.inference_workers.protocol import Finished, FinishReason, Token
from codefill.lsp.backend import Backend, Link
from codefill.lsp.completion import Completer, Plan, stop_rules
from codefill.lsp.postprocess import fit
from codefill.lsp.settings import Settings
from codefill.model.fim import cut_middle
from codefill.model.sampling import SamplingConfig

from .schema import CompletionRequest, HttpError


@dataclass(frozen=True)
class Delta:
    index: int  # which of the n choices
    text: str
    token_ids: list[int]
    n_prompt: int
    n_generated: int  # so far


@dataclass
class Completion:
    index: int
    text: str
    finish: FinishReason
    stopping_word: str  # the client's stop string that ended it, or ""
    token_ids: list[int]  # the generated ids of the answer
    n_prompt: int
    n_reused: int  # prompt ids served from the workers' cache
    n_generated: int
    prompt_ms: float  # request sent -> first token (queue and prefill)
    predicted_ms: float  # first token -> finished
    streamed: int = 0  # characters of `text` already sent as Deltas

    @property
    def stopped(self) -> bool:
        """Ended by the model or a stop rule, not by the token limit."""
        return self.finish != FinishReason.LENGTH


@dataclass
class TextStream:
    """Text of a growing list of generated ids, handed out in pieces that are never taken back."""

    completer: Completer
    plan: Plan
    stops: tuple[str, ...]
    hold_lines: bool  # a worker rule cuts before a newline: hold the text from the last newline on
    sent: int = 0
    broken: bool = field(default=False)  # the healed identifier did not come: nothing more is handed out

    def push(self, ids: list[int]) -> str:
        if self.broken:
            return ""
        tok = self.completer.tok
        text = tok.decode_infilling(cut_middle(tok, ids)[0])
        heal = self.plan.heal
        if heal:
            if len(text) < len(heal):
                if not heal.startswith(text):
                    self.broken = True
                return ""
            if not text.startswith(heal):
                self.broken = True
                return ""
            text = text[len(heal):]
        safe = len(text.rstrip("\ufffd"))
        for s in self.stops:
            at = text.find(s)
            if 0 <= at < safe:
                safe = at
            for k in range(min(len(s) - 1, safe), 0, -1):  # a tail that may be the start of `s`
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        if self.hold_lines:
            nl = text.rfind("\n", 0, safe)
            if nl >= 0:
                safe = nl
        if safe <= self.sent:
            return ""
        out, self.sent = text[self.sent:safe], safe
        return out


class Generation:
    """The HTTP server's completion path: one per server, sharing the language server's Backend."""

    def __init__(self, backend: Backend, completer: Completer, settings: Settings):
        self.backend, self.completer, self.settings = backend, completer, settings

    def plan(self, req: CompletionRequest, max_seq_len: int) -> Plan:
        limit = max_seq_len // 2
        if req.max_tokens is not None and req.max_tokens > limit:
            raise HttpError(f"max tokens {req.max_tokens} exceeds what the worker generates per request: {limit} "
                            f"(half its context of {max_seq_len}; the rest holds the prompt)")
        max_new = self.settings.max_new_tokens if req.max_tokens is None else max(1, req.max_tokens)
        prefix, suffix = req.prefix, req.suffix
        if req.one_line:
            editor = stop_rules(prefix, suffix, multiline=False)
            rules = StopRules(stop_strings=editor.stop_strings + tuple(s for s in req.stop if s != "\n"),
                              stop_at_eol=editor.stop_at_eol, dedent_column=editor.dedent_column)
        else:
            rules = StopRules(stop_strings=req.stop, dedent_column=req.n_indent)
        return self.completer.plan(max_seq_len, self.settings, prefix, suffix, path=None, language_id=None,
                                   chunks=req.chunks, max_new=max_new, rules=rules)

    async def run(self, req: CompletionRequest) -> AsyncIterator[Delta | Completion]:
        """Deltas (when streaming) and one Completion per choice, in the order they happen. Raises WorkerError
        (and its WorkerDown / WorkerOverloaded), PromptError, TokenizerError, HttpError."""
        link = await self.backend.get()
        plan = self.plan(req, link.max_seq_len)
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.ensure_future(self._choice(link, plan, req, i, queue)) for i in range(req.n)]
        try:
            done = 0
            while done < req.n:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                done += isinstance(item, Completion)
                yield item
        finally:
            for task in tasks:
                task.cancel()  # each one's worker client sends Cancel for a request still running

    async def _choice(self, link: Link, plan: Plan, req: CompletionRequest, index: int,
                      queue: asyncio.Queue) -> None:
        try:
            queue.put_nowait(await self.backend.while_alive(self._generate(link, plan, req, index, queue)))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, which raises it
            queue.put_nowait(e)

    async def _generate(self, link: Link, plan: Plan, req: CompletionRequest, index: int,
                        queue: asyncio.Queue) -> Completion:
        c = self.completer
        sampling = None if req.temperature == 0 else SamplingConfig(
            temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed + index)
        rules = plan.rules
        stream = TextStream(c, plan, rules.stop_strings,
                            hold_lines=rules.stop_at_eol or rules.dedent_column > 0) \
            if req.stream and not req.one_line else None
        tokens: list[Token] = []
        finished: Finished | None = None
        t0 = time.perf_counter()
        t_first = None
        async for msg in link.client.generate(plan.prompt.ids, plan.max_new, sampling, c.stop_ids,
                                              **plan.worker_kwargs()):
            if isinstance(msg, Token):
                t_first = t_first or time.perf_counter()
                tokens.append(msg)
                if stream is not None and req.max_tokens != 0:
                    delta = stream.push([t.token_id for t in tokens])
                    if delta:
                        queue.put_nowait(Delta(index, delta, [msg.token_id], len(plan.prompt.ids), len(tokens)))
            else:
                finished = msg
        t_end = time.perf_counter()
        t_first = t_first or t_end
        text, n_ids = c.middle(plan, tokens, finished)
        text = "" if text is None or req.max_tokens == 0 else text
        for stop in req.stop:  # the worker's byte offset is not used where invalid UTF-8 became U+FFFD
            if (at := text.find(stop)) >= 0:
                text = text[:at]
        if req.one_line:
            ended = finished.finish_reason in (FinishReason.STOP, FinishReason.STOP_STRING)
            fitted = fit(plan.prefix, plan.suffix, text, multiline=False, ended=ended)
            # An auto-closed tail the suggestion would replace is already in the suffix: leave it out.
            text = "" if fitted is None else fitted.text[:len(fitted.text) - fitted.replace_after]
        return Completion(
            index=index, text=text, finish=finished.finish_reason,
            stopping_word=_stopping_word(c, plan, tokens, finished, req.stop),
            token_ids=[t.token_id for t in tokens[:n_ids]], n_prompt=finished.n_prompt, n_reused=finished.n_reused,
            n_generated=finished.n_generated, prompt_ms=(t_first - t0) * 1000, predicted_ms=(t_end - t_first) * 1000,
            streamed=stream.sent if stream is not None else 0)


def _stopping_word(c: Completer, plan: Plan, tokens: list[Token], finished: Finished, stops: tuple[str, ...]) -> str:
    """The client's stop string found where the worker cut the answer ("" if none ended it)."""
    if finished.finish_reason != FinishReason.STOP_STRING or finished.text_bytes < 0:
        return ""
    raw = c.tok.decode_infilling(cut_middle(c.tok, [t.token_id for t in tokens])[0]).encode("utf-8")
    rest = raw[finished.text_bytes:].decode("utf-8", "ignore")
    return next((s for s in stops if rest.startswith(s)), "")
