"""One suggestion for one cursor: window the text, heal the last token, build the prompt, generate, fit.

    prefix, suffix (the document around the cursor)
      -> window: at most `window_chars` either side, cut at a line start/end (huge documents stay cheap)
      -> token healing: a partial identifier before the cursor ("retu|") leaves the prompt and becomes the
         worker's `required_prefix`, so the model picks the token boundary itself ("return" is one token,
         "retu" + "rn" is a sequence it rarely saw in training); the healed text is stripped from the answer
      -> lsp/prompt.py build_prompt (exact token budget, context chunks first, SPM by default)
      -> worker: greedy tokens until <EOT> or a stop rule the worker applies itself (stop_at_eol for a
         single-line cursor, dedent_column for a block, the code after the cursor as a stop string for lines
         inserted above it), so it stops as soon as the answer is complete; on a blank line <EOT> is held
         back for the first `blank_line_min_tokens` ids (min_new_tokens), so an answer has some text
      -> lsp/postprocess.py fit (scope, de-duplication, auto-closed brackets, trimming)
      -> Suggestion(text, replace_after, mean_logprob)
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from codefill.inference_workers.client import AsyncWorkerClient, StopRules
from codefill.inference_workers.protocol import Finished, FinishReason, Token
from codefill.model.fim import cut_middle
from codefill.model.sampling import SamplingConfig
from codefill.model.tokenizer import Tokenizer

from .postprocess import BLOCK_OPENERS, _indent, cursor_lines, fit, inserts_lines, min_new_tokens, wants_multiline
from .prompt import Chunk, Prompt, PromptConfig, build_prompt
from .settings import Settings

# An identifier being typed: letters, digits, underscores ending at the cursor, not starting with a digit.
_PARTIAL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_HEAL_CHARS = 32  # a longer "identifier" is probably data; healing it would cost many constrained steps
CHARS_PER_TOKEN_BOUND = 8  # windowing: no token covers more characters than this in practice
# Finish reasons whose Finished.text_bytes cuts the answer inside the generated text (the token that completed
# the match was still sent).
TEXT_CUTS = (FinishReason.STOP_STRING, FinishReason.END_OF_LINE, FinishReason.DEDENT)


@dataclass(frozen=True)
class Suggestion:
    text: str  # inserted at the cursor
    replace_after: int  # characters after the cursor (Python str units) that the insertion replaces
    mean_logprob: float | None  # over the generated tokens (the stop token excluded); None: nothing generated


@dataclass(frozen=True)
class Generated:
    suggestion: Suggestion | None
    n_prompt: int
    n_reused: int
    finish_reason: str


def window(prefix: str, suffix: str, max_chars: int) -> tuple[str, str]:
    """At most `max_chars` of each side, cut at line boundaries (a cut prefix starts at a line start)."""
    if len(prefix) > max_chars:
        cut = prefix[len(prefix) - max_chars:]
        nl = cut.find("\n")
        prefix = cut[nl + 1:] if 0 <= nl < len(cut) - 1 else cut
    if len(suffix) > max_chars:
        cut = suffix[:max_chars]
        nl = cut.rfind("\n")
        suffix = cut[:nl + 1] if nl > 0 else cut
    return prefix, suffix


def partial_identifier(prefix: str, suffix: str) -> str:
    """The identifier the cursor is in the middle of typing ("" if none): what token healing backs off."""
    if suffix[:1].isalnum() or suffix[:1] == "_":
        return ""  # inside a word: the model would have to end exactly at the following characters
    m = _PARTIAL.search(prefix[-MAX_HEAL_CHARS - 1:])
    if m is None or len(m.group()) > MAX_HEAL_CHARS:
        return ""
    return m.group()


def stop_rules(prefix: str, suffix: str, multiline: bool) -> StopRules:
    """The rules the worker applies so it stops where `fit` would cut anyway."""
    before, after = cursor_lines(prefix, suffix)
    if not multiline and inserts_lines(prefix, suffix):
        # lines above the code after the cursor end where the model starts a line with that code
        return StopRules(stop_strings=("\n" + before + after.rstrip(),))
    if not multiline:
        return StopRules(stop_at_eol=True)
    base = _indent(before)
    opens = before.strip().endswith(BLOCK_OPENERS)
    # fit's scope rule: a line dedenting below the cursor line's indent (to it, after a block opener) ends it
    return StopRules(dedent_column=base + 1 if opens else base)


@dataclass(frozen=True)
class Plan:
    """One cursor's request, ready for the worker: what `Completer.plan` built, what `Completer.middle` reads."""

    prefix: str  # the windowed document before the cursor (healed text included)
    suffix: str  # ... and after it
    multiline: bool  # postprocess rule 1: a block rather than the rest of one line
    heal: str  # the partial identifier backed off the prompt ("" if none): the worker's required_prefix
    prompt: Prompt
    max_new: int
    rules: StopRules  # what the worker applies itself (stop_rules, plus any stop strings a caller adds)

    def worker_kwargs(self) -> dict:
        return {"rules": self.rules, **({"required_prefix": self.heal} if self.heal else {})}


class Completer:
    """The completion path shared by the language server and the HTTP APIs (http_api/): `plan` (window,
    token healing, prompt), the worker call, `middle` (the answer's text), and for the editor `fit`."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    @property
    def stop_ids(self) -> list[int]:
        return self.tok.stop_ids

    def prompt_config(self, settings: Settings, max_seq_len: int, max_new: int) -> PromptConfig:
        budget = max(8, min(settings.max_prompt_tokens, max_seq_len - max_new + 1))
        return PromptConfig(max_prompt_tokens=budget, suffix_share=settings.suffix_share,
                            context_share=settings.context_share, spm=settings.spm,
                            path_header=settings.path_header)

    def plan(self, max_seq_len: int, settings: Settings, prefix: str, suffix: str, *, path: str | None,
             language_id: str | None, chunks: Sequence[Chunk] = (), healing: bool | None = None,
             max_new: int | None = None, rules: StopRules | None = None) -> Plan:
        """The prompt and stop rules for a cursor; `max_new` (default: the settings') is capped at half the
        worker's context, and `rules` (default: the editor's, from the cursor and blank_line_min_tokens)
        replace the cursor's rules."""
        tok = self.tok
        max_new = max(1, min(settings.max_new_tokens if max_new is None else max_new, max_seq_len // 2))
        prefix, suffix = window(prefix, suffix, settings.max_prompt_tokens * CHARS_PER_TOKEN_BOUND)
        multiline = wants_multiline(prefix, suffix)
        heal_on = settings.token_healing if healing is None else healing
        heal = partial_identifier(prefix, suffix) if heal_on else ""
        prompt = build_prompt(tok, prefix[:len(prefix) - len(heal)], suffix,
                              self.prompt_config(settings, max_seq_len, max_new),
                              path=path, language_id=language_id, chunks=chunks)
        if rules is None:
            rules = replace(stop_rules(prefix, suffix, multiline),
                            min_new_tokens=min_new_tokens(prefix, settings.blank_line_min_tokens, max_new))
        return Plan(prefix, suffix, multiline, heal, prompt, max_new, rules)

    def middle(self, plan: Plan, tokens: Sequence[Token], finished: Finished) -> tuple[str | None, int]:
        """(the answer's text: up to <EOT> and the worker's stop-rule cut, healed text removed; None if the
        worker did not honour the healing prefix, the number of generated ids in it)."""
        tok = self.tok
        ids, _ = cut_middle(tok, [t.token_id for t in tokens])
        text = tok.decode_infilling(ids)
        # text_bytes is an offset into the raw bytes: meaningless once invalid UTF-8 became U+FFFD (then the
        # editor's `fit` still cuts at end of line and dedent, which are before a newline).
        if finished.finish_reason in TEXT_CUTS and finished.text_bytes >= 0 and "\ufffd" not in text:
            text = text.encode("utf-8")[:finished.text_bytes].decode("utf-8", "ignore")
        if plan.heal:
            if not text.startswith(plan.heal):  # the worker must honour required_prefix; refuse rather than garble
                return None, len(ids)
            text = text[len(plan.heal):]
        return text, len(ids)

    async def generate(self, client: AsyncWorkerClient, max_seq_len: int, settings: Settings, prefix: str,
                       suffix: str, *, path: str | None, language_id: str | None,
                       chunks: Sequence[Chunk] = (), healing: bool | None = None) -> Generated:
        plan = self.plan(max_seq_len, settings, prefix, suffix, path=path, language_id=language_id,
                         chunks=chunks, healing=healing)
        sampling = None if settings.temperature == 0 else SamplingConfig(temperature=settings.temperature)
        tokens, finished = await client.complete(plan.prompt.ids, plan.max_new, sampling, self.stop_ids,
                                                 **plan.worker_kwargs())
        text, n_ids = self.middle(plan, tokens, finished)
        if text is None:
            return Generated(None, finished.n_prompt, finished.n_reused, "healing-mismatch")
        mean = _mean_logprob(tokens[:n_ids])
        ended = finished.finish_reason in (FinishReason.STOP, FinishReason.STOP_STRING)
        fitted = fit(plan.prefix, plan.suffix, text, plan.multiline, ended=ended)
        suggestion = None if fitted is None else Suggestion(fitted.text, fitted.replace_after, mean)
        return Generated(suggestion, finished.n_prompt, finished.n_reused, finished.finish_reason.name)


def _mean_logprob(tokens: Sequence[Token]) -> float | None:
    values = [t.logprob for t in tokens if math.isfinite(t.logprob)]
    return sum(values) / len(values) if values else None


@dataclass
class Entry:
    uri: str
    prefix: str  # the document before the cursor when it was computed
    suffix: str  # ... and after it
    suggestion: Suggestion
    sid: str  # telemetry id of the suggestion as first shown


class SuggestionCache:
    """Suggestions by the text around the cursor; serves a request whose prefix extends an entry's prefix by
    characters the suggestion starts with (the user typed ahead, or accepted it), with the rest of it."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()

    def put(self, entry: Entry) -> None:
        if self.size == 0:
            return
        key = (entry.uri, entry.prefix)
        self._entries.pop(key, None)
        self._entries[key] = entry
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def forget(self, uri: str) -> None:
        for key in [k for k in self._entries if k[0] == uri]:
            del self._entries[key]

    def lookup(self, uri: str, prefix: str, suffix: str) -> tuple[Entry, Suggestion] | None:
        """(the entry, the suggestion for this cursor) or None. Newest entries are tried first."""
        for entry in reversed(self._entries.values()):
            if entry.uri != uri or not prefix.startswith(entry.prefix):
                continue
            typed = prefix[len(entry.prefix):]
            s = entry.suggestion
            if not s.text.startswith(typed) or len(typed) >= len(s.text):
                continue
            # Typing ahead never touches the auto-closed tail the suggestion replaces: it is still there.
            if suffix != entry.suffix:
                continue
            self._entries.move_to_end((entry.uri, entry.prefix))
            return entry, Suggestion(s.text[len(typed):], s.replace_after, s.mean_logprob)
        return None
