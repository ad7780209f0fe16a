"""One suggestion for one cursor: window the text, heal the last token, build the prompt, generate, fit.

    prefix, suffix (the document around the cursor)
      -> window: at most `window_chars` either side, cut at a line start/end (huge documents stay cheap)
      -> token healing: a partial identifier before the cursor ("retu|") leaves the prompt and becomes the
         worker's `required_prefix`, so the model picks the token boundary itself ("return" is one token,
         "retu" + "rn" is a sequence it rarely saw in training); the healed text is stripped from the answer
      -> lsp/prompt.py build_prompt (exact token budget, context chunks first, SPM by default)
      -> worker: greedy tokens until <EOT> or a stop rule the worker applies itself (stop_at_eol for a
         single-line cursor, dedent_column for a block, the code after the cursor as a stop string for lines
         inserted above it), so it stops as soon as the answer is complete
      -> lsp/postprocess.py fit (scope, de-duplication, auto-closed brackets, trimming)
      -> Suggestion(text, replace_after, mean_logprob)
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from codefill.inference_workers.client import AsyncWorkerClient, StopRules
from codefill.inference_workers.protocol import FinishReason, Token
from codefill.model.fim import cut_middle
from codefill.model.sampling import SamplingConfig
from codefill.model.tokenizer import Tokenizer

from .postprocess import BLOCK_OPENERS, _indent, cursor_lines, fit, inserts_lines, wants_multiline
from .prompt import Chunk, PromptConfig, build_prompt
from .settings import Settings

# An identifier being typed: letters, digits, underscores ending at the cursor, not starting with a digit.
_PARTIAL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_HEAL_CHARS = 32  # a longer "identifier" is probably data; healing it would cost many constrained steps
CHARS_PER_TOKEN_BOUND = 8  # windowing: no token covers more characters than this in practice


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


class Completer:
    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def prompt_config(self, settings: Settings, max_seq_len: int, max_new: int) -> PromptConfig:
        budget = max(8, min(settings.max_prompt_tokens, max_seq_len - max_new + 1))
        return PromptConfig(max_prompt_tokens=budget, suffix_share=settings.suffix_share,
                            context_share=settings.context_share, spm=settings.spm,
                            path_header=settings.path_header)

    async def generate(self, client: AsyncWorkerClient, max_seq_len: int, settings: Settings, prefix: str,
                       suffix: str, *, path: str | None, language_id: str | None,
                       chunks: Sequence[Chunk] = (), healing: bool | None = None) -> Generated:
        tok = self.tok
        max_new = max(1, min(settings.max_new_tokens, max_seq_len // 2))
        prefix, suffix = window(prefix, suffix, settings.max_prompt_tokens * CHARS_PER_TOKEN_BOUND)
        multiline = wants_multiline(prefix, suffix)
        heal_on = settings.token_healing if healing is None else healing
        heal = partial_identifier(prefix, suffix) if heal_on else ""
        prompt = build_prompt(tok, prefix[:len(prefix) - len(heal)], suffix,
                              self.prompt_config(settings, max_seq_len, max_new),
                              path=path, language_id=language_id, chunks=chunks)
        sampling = None if settings.temperature == 0 else SamplingConfig(temperature=settings.temperature)
        kwargs = {"required_prefix": heal} if heal else {}
        tokens, finished = await client.complete(prompt.ids, max_new, sampling, [tok.eot_id, tok.eos_id],
                                                 rules=stop_rules(prefix, suffix, multiline), **kwargs)
        ids, _ = cut_middle(tok, [t.token_id for t in tokens])
        text = tok.decode_infilling(ids)
        # End of line and dedent cut before a newline, which `fit` cuts at too, so only a stop string needs
        # text_bytes (an offset into the raw bytes: meaningless once invalid UTF-8 became U+FFFD).
        if finished.finish_reason == FinishReason.STOP_STRING and finished.text_bytes >= 0 and "\ufffd" not in text:
            text = text.encode("utf-8")[:finished.text_bytes].decode("utf-8", "ignore")
        mean = _mean_logprob(tokens[:len(ids)])
        if heal:
            if not text.startswith(heal):  # the worker must honour required_prefix; refuse rather than garble
                return Generated(None, finished.n_prompt, finished.n_reused, "healing-mismatch")
            text = text[len(heal):]
        ended = finished.finish_reason in (FinishReason.STOP, FinishReason.STOP_STRING)
        fitted = fit(prefix, suffix, text, multiline, ended=ended)
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
