"""When a request stops: stop ids, max new tokens, and stop rules on the generated text.

Workers see token ids only: they never tokenize and never build prompts. Three stop rules are about text,
though (stop strings, end of line, dedent), and an engine that waits for the client to notice them would
decode tokens nobody reads. So the worker holds one table derived from the model directory's tokenizer,
`token_bytes_of_model_dir(dir)[id] -> bytes` (SentencePiece pieces with "▁" as a space, byte-fallback
pieces "<0x0A>" as that byte, byte-level BPE tokens through their byte alphabet, control and special tokens
as nothing), and uses it ONLY to match these rules on the bytes
of the generated tokens. Concatenating the table's bytes of generated ids gives exactly the UTF-8 of
`Tokenizer.decode_infilling(ids)` wherever that is valid UTF-8, so a byte offset reported here
(`Finished.text_bytes`) is an offset into the client's decoded middle.

The rules, checked after every token, the earliest cut winning:
- a stop id: the token ends generation (FinishReason.STOP); its own bytes are not part of the answer. Before
  `min_new_tokens` ids were generated the engine never chooses one (`holds_back_stop_ids`);
- a stop string: the answer ends where the first match begins (STOP_STRING);
- end of line: the answer ends before the first newline that follows some non-blank generated text, so a
  completion that starts on the next line still gets that line (END_OF_LINE);
- dedent: the answer ends before the newline of the first generated line that starts with fewer than
  `dedent_column` blanks (spaces or tabs, one column each) and has something else on it (DEDENT): the model
  has left the block the cursor is in;
- max_new_tokens: LENGTH, the whole text kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from codefill.errors import CodefillError

from .protocol import FinishReason, GenerateRequest

_BLANKS = b" \t"


class StopRuleError(CodefillError, ValueError):
    """A tokenizer file the table cannot be built from, or a text rule without a table; names the values."""


def token_bytes_of_model_dir(model_dir: str | Path) -> list[bytes]:
    """id -> bytes for every id the model can emit: the tokenizer's table (`token_bytes()` of
    model/tokenizer.py or model/bpe_tokenizer.py; byte-level BPE checkpoints pad the vocabulary beyond the
    tokenizer's ids, Qwen2.5-Coder 151665 -> 151936, and those ids have no bytes)."""
    from codefill.inference_workers.sharding import load_tokenizer, read_tp_config
    from codefill.model.checkpoint import CheckpointError
    from codefill.model.tokenizer import TokenizerError

    try:
        cfg, _ = read_tp_config(model_dir)
        table = load_tokenizer(model_dir).token_bytes()
    except (CheckpointError, TokenizerError) as e:
        raise StopRuleError(f"cannot build the token table of {model_dir}: {e}") from e
    if len(table) != cfg.vocab_size:  # check_vocab has refused this already; a table must cover every id
        raise StopRuleError(f"the token table of {model_dir} has {len(table)} ids, the model {cfg.vocab_size}")
    return table


@dataclass
class StopState:
    """One request's stop rules and the text generated so far."""

    max_new_tokens: int
    stop_ids: frozenset[int]
    stop_strings: tuple[bytes, ...]
    stop_at_eol: bool
    dedent_column: int
    table: Sequence[bytes] | None
    min_new_tokens: int = 0
    text: bytearray = field(default_factory=bytearray)
    n_generated: int = 0
    _line_start: int = -1  # index of the newline starting the current line, once one was generated
    _scanned: int = 0  # text before this has been checked for eol/dedent

    @classmethod
    def of(cls, req: GenerateRequest, table: Sequence[bytes] | None) -> "StopState":
        uses_text = bool(req.stop_strings) or req.stop_at_eol or req.dedent_column > 0
        if uses_text and table is None:
            raise StopRuleError(
                f"request {req.request_id!r} has text stop rules (stop_strings {req.stop_strings!r:.80}, "
                f"stop_at_eol {req.stop_at_eol}, dedent_column {req.dedent_column}) but this worker has no "
                f"token table (it was started without a tokenizer.model)")
        return cls(req.max_new_tokens, frozenset(req.stop_ids), tuple(s.encode("utf-8") for s in req.stop_strings),
                   req.stop_at_eol, req.dedent_column, table, req.min_new_tokens)

    @property
    def holds_back_stop_ids(self) -> bool:
        """True while the next id may not be a stop id (fewer than min_new_tokens generated)."""
        return self.n_generated < self.min_new_tokens and bool(self.stop_ids)

    @property
    def text_bytes(self) -> int:
        return len(self.text) if self.table is not None else -1

    def add(self, token: int) -> tuple[FinishReason | None, int]:
        """Account one generated token: (why generation ends here or None, bytes of text in the answer)."""
        self.n_generated += 1
        before = len(self.text)
        if token in self.stop_ids:
            return FinishReason.STOP, before if self.table is not None else -1
        if self.table is not None:
            self.text += self.table[token] if 0 <= token < len(self.table) else b""
            cut = self._text_rules(before)
            if cut is not None:
                return cut
        if self.n_generated >= self.max_new_tokens:
            return FinishReason.LENGTH, self.text_bytes
        return None, self.text_bytes

    def _text_rules(self, before: int) -> tuple[FinishReason, int] | None:
        found: list[tuple[int, FinishReason]] = []
        text = bytes(self.text)
        for s in self.stop_strings:
            # only a match that ends in the new bytes is new
            i = text.find(s, max(0, before - len(s) + 1))
            if i >= 0:
                found.append((i, FinishReason.STOP_STRING))
        if self.stop_at_eol or self.dedent_column > 0:
            line_cut = self._line_rules(text)
            if line_cut is not None:
                found.append(line_cut)
        if not found:
            return None
        at, reason = min(found, key=lambda f: f[0])
        return reason, at

    def _line_rules(self, text: bytes) -> tuple[int, FinishReason] | None:
        """Scan the bytes not yet scanned for a newline that ends the answer."""
        i = self._scanned
        while i < len(text):
            if text[i] == 0x0A:
                if self.stop_at_eol and text[:i].strip(b" \t\r\n"):
                    return i, FinishReason.END_OF_LINE
                self._line_start = i
            elif self._line_start >= 0 and text[i] not in _BLANKS and text[i] != 0x0D:
                # first non-blank byte of a generated line: its indent decides
                indent = i - self._line_start - 1
                if self.dedent_column > 0 and indent < self.dedent_column:
                    return self._line_start, FinishReason.DEDENT
                self._line_start = -1  # this line is settled; wait for the next newline
            i += 1
        self._scanned = i
        return None
