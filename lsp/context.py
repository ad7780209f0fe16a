"""From an editor cursor to a fill-in-the-middle prompt: split the document, fit the prompt in the context.

LSP positions count characters in the encoding the client and server agreed on (UTF-16 unless the client
offers another), so "x = '😋'" has the closing quote at character 7 in UTF-16 but index 6 in a Python str.
pygls' document knows the agreed encoding (its position codec); `cursor_context` goes through it and never
uses `position.character` as a str index.
"""

from __future__ import annotations

from lsprotocol import types
from pygls.workspace import TextDocument

from codefill.model.fim import infilling_prompt_tokens
from codefill.model.tokenizer import Tokenizer

# When the prompt does not fit, the suffix may keep at most this share of it: the code before the cursor
# says more about what comes next than the code after it.
SUFFIX_SHARE = 0.25


class ContextError(ValueError):
    """A cursor or document that cannot be turned into a prompt; the message names the values."""


def cursor_context(document: TextDocument, position: types.Position) -> tuple[str, str]:
    """(prefix, suffix): the document text before and after `position` (in the client's units)."""
    lines = document.lines
    # A cursor on the line after a final newline is valid (line == len(lines)); beyond that is not.
    if not 0 <= position.line <= len(lines) or position.character < 0:
        raise ContextError(f"position out of bounds: {position} in {document.uri} of {len(lines)} lines")
    character = position.character
    if position.line < len(lines):
        # The spec: "If the character value is greater than the line length it defaults back to the line length."
        line = lines[position.line].rstrip("\r\n")
        character = min(character, document.position_codec.client_num_units(line))
    # A new Position: pygls' codec may rewrite the one it is given.
    offset = document.offset_at_position(types.Position(position.line, character))
    source = document.source
    return source[:offset], source[offset:]


def _fit(tok_len, text: str, max_tokens: int, keep_end: bool) -> str:
    """A piece of `text` whose encoding has at most `max_tokens` tokens: its end (keep_end) or its start."""
    n = tok_len(text)
    while text and n > max_tokens:
        # Shrink by the measured chars-per-token, a little more than needed, so this ends in a few rounds.
        keep = int(len(text) * max_tokens / n * 0.9)
        text = (text[len(text) - keep :] if keep_end else text[:keep]) if keep > 0 else ""
        n = tok_len(text)
    return text


def fit_prompt(tok: Tokenizer, prefix: str, suffix: str, max_prompt_tokens: int) -> tuple[list[int], str, str]:
    """The PSM infilling prompt of (prefix, suffix), cut to at most `max_prompt_tokens` ids.

    When it is too long, the suffix is cut to its start (at most SUFFIX_SHARE of the room, or less if the
    prefix needs less) and the prefix to its end: the text nearest the cursor is kept. Returns the ids and
    the prefix and suffix they were built from. A prompt that fits is exactly fim.infilling_prompt_tokens.
    """
    ids = infilling_prompt_tokens(tok, prefix, suffix)
    if len(ids) <= max_prompt_tokens:
        return ids, prefix, suffix
    n_markers = len(infilling_prompt_tokens(tok, "", ""))  # BOS, <PRE>, <SUF>, <MID> and any empty-text ids
    room = max_prompt_tokens - n_markers
    if room < 1:
        raise ContextError(f"a prompt needs more than {n_markers} ids, but only {max_prompt_tokens} fit")
    suffix_room = max(int(room * SUFFIX_SHARE), room - len(tok.encode(prefix)))
    suffix = _fit(lambda s: len(tok.encode_infilling(s)), suffix, suffix_room, keep_end=False)
    prefix_room = room - len(tok.encode_infilling(suffix))
    prefix = _fit(lambda s: len(tok.encode(s)), prefix, prefix_room, keep_end=True)
    ids = infilling_prompt_tokens(tok, prefix, suffix)
    # Tokens can merge differently at the new edges; trim the prefix further until the whole prompt fits.
    while len(ids) > max_prompt_tokens and prefix:
        prefix = prefix[1:]
        ids = infilling_prompt_tokens(tok, prefix, suffix)
    if len(ids) > max_prompt_tokens:
        raise ContextError(f"cannot fit the prompt in {max_prompt_tokens} ids: {len(ids)} with an empty prefix")
    return ids, prefix, suffix
