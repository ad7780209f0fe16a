"""A FIM prompt a client wrote out as text, back to the cursor's prefix and suffix.

Continue renders its autocomplete template itself and sends the result as a plain `prompt` (its llama.cpp
provider to /completion, its OpenAI provider to /v1/completions): for Code Llama
"<PRE> {prefix} <SUF>{suffix} <MID>", for other families their own markers. codefill builds prompts itself
(token budget, SPM order, context), so the markers are read back out of the text; the marker strings are
the served tokenizer's own FIM pieces, so whichever family is served, its template is the one recognised.

SentencePiece pieces that start with "▁" ("▁<SUF>") stand for the marker with a space before it, and the
text after "<PRE>" carries SentencePiece's implicit leading space: one space on each of those sides is part
of the layout, not of the code. Both layouts are read:

    PSM  [text before] PRE prefix SUF suffix MID
    SPM  PRE SUF suffix MID prefix

Text before the prefix marker (Qwen's repository header, a BOS written out) is kept at the start of the
prefix. A prompt without the three markers is a plain prefix.
"""

from __future__ import annotations

from codefill.model.tokenizer import Tokenizer


def _marker(tok: Tokenizer, token_id: int) -> tuple[str, bool]:
    """(the marker's text, whether its piece stands for a space before it)."""
    piece = tok.piece(token_id)
    return (piece[1:], True) if piece.startswith("\u2581") else (piece, False)


def _drop(text: str, space: bool, end: bool) -> str:
    """`text` without one layout space at its end (or start), when the layout has one there."""
    if not space:
        return text
    if end:
        return text[:-1] if text.endswith(" ") else text
    return text[1:] if text.startswith(" ") else text


def split_fim_text(tok: Tokenizer, text: str) -> tuple[str, str] | None:
    """(prefix, suffix) of a prompt written in the served model's FIM layout, or None if it is not one."""
    (pre, pre_sp), (suf, suf_sp), (mid, mid_sp) = (_marker(tok, i) for i in (tok.prefix_id, tok.suffix_id,
                                                                               tok.middle_id))
    p, s, m = text.find(pre), text.find(suf), text.rfind(mid)
    if p < 0 or s < 0 or m < 0 or not p < s < m:
        return None
    head = text[:p]
    head = "" if head.strip() in ("", "<s>") else head
    between = text[p + len(pre):s]
    suffix = _drop(text[s + len(suf):m], mid_sp, end=True)
    if between.strip() == "" and text[m + len(mid):]:  # SPM: the prefix follows the middle marker
        return head + _drop(text[m + len(mid):], pre_sp, end=False), suffix
    if text[m + len(mid):].strip():
        return None  # text after the middle marker in PSM: not a layout we know
    return head + _drop(_drop(between, pre_sp, end=False), suf_sp, end=True), suffix
