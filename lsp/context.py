"""From an editor cursor to the text before and after it.

LSP positions count characters in the encoding the client and server agreed on (UTF-16 unless the client
offers another), so "x = '😋'" has the closing quote at character 7 in UTF-16 but index 6 in a Python str.
pygls' document knows the agreed encoding (its position codec); `cursor_context` goes through it and never
uses `position.character` as a str index. Prompt building from (prefix, suffix) is lsp/prompt.py.
"""

from __future__ import annotations

from lsprotocol import types
from pygls.workspace import TextDocument

from codefill.errors import CodefillError


class ContextError(CodefillError, ValueError):
    """A cursor that is not in the document; the message names the values."""


def cursor_context(document: TextDocument, position: types.Position) -> tuple[str, str, types.Position]:
    """(prefix, suffix, position clamped to its line): the document text before and after the cursor."""
    lines = document.lines
    # A cursor on the line after a final newline is valid (line == len(lines)); beyond that is not.
    if not 0 <= position.line <= len(lines) or position.character < 0:
        raise ContextError(f"line out of bounds: {position.line} > {len(lines)} lines in {document.uri}")
    line = lines[position.line].rstrip("\r\n") if position.line < len(lines) else ""
    # The spec: "If the character value is greater than the line length it defaults back to the line length."
    clamped = types.Position(position.line, min(position.character, document.position_codec.client_num_units(line)))
    # A copy: pygls' codec may rewrite the Position it is given.
    offset = document.offset_at_position(types.Position(clamped.line, clamped.character))
    source = document.source
    return source[:offset], source[offset:], clamped
