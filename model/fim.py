"""Fill-in-the-middle prompts for Code Llama, as pure functions of a tokenizer and two strings.

Meta trained two layouts (codellama `llama/generation.py`, `infilling_prompt_tokens`):

    PSM (prefix-suffix-middle):  "<PRE> {prefix} <SUF>{suffix} <MID>"
        [BOS, <PRE>] + encode(prefix) + [<SUF>] + encode_infilling(suffix) + [<MID>]
    SPM (suffix-prefix-middle):  "<PRE> <SUF>{suffix} <MID> {prefix}"
        [BOS, <PRE>, <SUF>] + encode_infilling(suffix) + [<MID>] + encode(prefix)

The space written before {prefix} is SentencePiece's implicit leading space, which `encode` adds; the
suffix follows its marker with no space, so it goes through `encode_infilling`. In SPM the model continues
straight after the prefix, which is what makes it suit an editor cursor mid-token. Generation stops at <EOT>.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: building prompts needs no SentencePiece import of its own
    from .tokenizer import Tokenizer


def infilling_prompt_tokens(tok: Tokenizer, prefix: str, suffix: str, spm: bool = False) -> list[int]:
    """Token ids of an infilling prompt; the model's output after them is the middle, ended by <EOT>."""
    if spm:
        return ([tok.bos_id, tok.prefix_id, tok.suffix_id] + tok.encode_infilling(suffix) + [tok.middle_id]
                + tok.encode(prefix))
    return ([tok.bos_id, tok.prefix_id] + tok.encode(prefix) + [tok.suffix_id] + tok.encode_infilling(suffix)
            + [tok.middle_id])


def cut_middle(tok: Tokenizer, generated: Sequence[int]) -> tuple[list[int], bool]:
    """The generated ids before the first <EOT> (or EOS, which an infilling model may emit instead), and
    whether such a stop was found (False: the middle was cut short by a length limit)."""
    stops = {tok.eot_id, tok.eos_id}
    for n, i in enumerate(generated):
        if i in stops:
            return list(generated[:n]), True
    return list(generated), False


def decode_middle(tok: Tokenizer, generated: Sequence[int]) -> str:
    """Text of the middle: ids up to the first <EOT>/EOS, decoded without dropping a leading space, since
    the middle continues the prefix (" return" after "x =" keeps its space)."""
    ids, _ = cut_middle(tok, generated)
    return tok.decode_infilling(ids)
