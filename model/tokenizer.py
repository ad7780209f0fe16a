"""Code Llama's SentencePiece tokenizer, with the infilling pieces and Meta's no-leading-space encoding.

SentencePiece prepends a space ("▁") to every string it encodes (`add_dummy_prefix`), so `encode("x")` is
the encoding of " x". That is right for the start of a document and for the prefix of an infilling prompt
(the prompt format is "<PRE> {prefix} <SUF>{suffix} <MID>"), but wrong for the suffix, which continues the
text with no space in between: `encode_infilling` removes it, as Meta's reference does.

The four infilling ids are looked up by piece ("▁<PRE>", ...) in the tokenizer itself, never hard-coded:
they are 32007..32010 in the 7B/13B tokenizer, other numbers in our small trained tokenizers, and absent
from the Python variants and 34B models, which were trained without infilling.

Known limit, shared with Llama's tokenizer: SentencePiece reads a literal "▁" (U+2581) in the text as a space,
so such a character decodes as " ".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from codefill.errors import CodefillError

from .families import FAMILIES

INFILLING_PIECES = {"prefix": "▁<PRE>", "suffix": "▁<SUF>", "middle": "▁<MID>", "eot": "▁<EOT>"}

# Encoded in front of a string to absorb SentencePiece's dummy "▁"; any character that never merges with
# what follows works. Meta uses "☺", a single piece in the Llama vocabulary; in a small byte-fallback
# vocabulary it is three byte pieces. Either way it is dropped by comparing with its own encoding.
_SENTINEL = "☺"


class TokenizerError(CodefillError, ValueError):
    """A tokenizer file or a request the tokenizer cannot serve; the message names the values."""


class Tokenizer:
    family = FAMILIES["codellama"]  # the one SentencePiece family (byte-level BPE ones: bpe_tokenizer.py)

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer model {self.path} does not exist or is not a file")
        import sentencepiece as spm  # here: importing this module (for TokenizerError) needs no SentencePiece

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"cannot load SentencePiece model {self.path}: {e}") from e
        self.vocab_size: int = self._sp.vocab_size()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(f"{self.path} has no BOS/EOS piece (bos_id={self.bos_id}, eos_id={self.eos_id})")
        # piece_to_id answers unk_id for a piece it does not know, so check the id maps back to the piece.
        self._infilling: dict[str, int | None] = {}
        for name, piece in INFILLING_PIECES.items():
            i = self._sp.piece_to_id(piece)
            self._infilling[name] = i if self._sp.id_to_piece(i) == piece else None
        self._sentinel_ids: list[int] = self._sp.encode(_SENTINEL)

    # --- ids ------------------------------------------------------------------------------------------

    @property
    def has_infilling(self) -> bool:
        return all(i is not None for i in self._infilling.values())

    def _infilling_id(self, name: str) -> int:
        i = self._infilling[name]
        if i is None:
            missing = [INFILLING_PIECES[n] for n, v in self._infilling.items() if v is None]
            raise TokenizerError(
                f"infilling is unavailable: tokenizer {self.path} has no pieces {missing} "
                f"(Code Llama Python variants and 34B models were trained without infilling)"
            )
        return i

    @property
    def prefix_id(self) -> int:
        return self._infilling_id("prefix")

    @property
    def suffix_id(self) -> int:
        return self._infilling_id("suffix")

    @property
    def middle_id(self) -> int:
        return self._infilling_id("middle")

    @property
    def eot_id(self) -> int:
        return self._infilling_id("eot")

    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a middle: <EOT>, and EOS, which an infilling model may emit instead."""
        return [self.eot_id, self.eos_id]

    def piece(self, i: int) -> str:
        """The vocabulary piece of one id (for debugging and logs)."""
        self._check_ids([i])
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a piece, or None if the vocabulary lacks it."""
        i = self._sp.piece_to_id(piece)
        return i if self._sp.id_to_piece(i) == piece else None

    # --- encode / decode ------------------------------------------------------------------------------

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `s`, with SentencePiece's implicit leading space (as at the start of a document)."""
        if not isinstance(s, str):
            raise TokenizerError(f"encode needs a str, got {type(s).__name__}")
        ids = self._sp.encode(s)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_infilling(self, s: str) -> list[int]:
        """Token ids of `s` continuing earlier text: without the implicit leading space."""
        if not isinstance(s, str):
            raise TokenizerError(f"encode_infilling needs a str, got {type(s).__name__}")
        ids = self._sp.encode(_SENTINEL + s)
        n = len(self._sentinel_ids)
        if ids[:n] != self._sentinel_ids:
            raise TokenizerError(
                f"sentinel {_SENTINEL!r} merged with the start of {s[:20]!r}: "
                f"{ids[:n + 2]} does not start with {self._sentinel_ids}"
            )
        return ids[n:]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`. The leading "▁" of the first piece is dropped (it stands for the implicit space);
        control pieces (BOS, EOS, infilling markers) decode to nothing; -1 (padding) is skipped."""
        ids = [int(i) for i in ids if i != -1]
        self._check_ids(ids)
        return self._sp.decode(ids)

    def decode_infilling(self, ids: Sequence[int]) -> str:
        """Text of ids that continue earlier text (a generated middle): a leading "▁" is a real space."""
        ids = [int(i) for i in ids if i != -1]
        self._check_ids(ids)
        text = self._sp.decode(self._sentinel_ids + ids)
        if not text.startswith(_SENTINEL):
            raise TokenizerError(f"decoding {ids[:8]}... did not keep the sentinel {_SENTINEL!r}: {text[:20]!r}")
        return text[len(_SENTINEL):]

    def token_bytes(self) -> list[bytes]:
        """id -> the bytes its piece stands for ("▁" a space, byte-fallback "<0x0A>" that byte, control and
        unknown pieces nothing), for the workers' stop-rule table (inference_workers/stops.py)."""
        sp, table = self._sp, []
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i):
                table.append(b"")
            elif sp.is_byte(i):
                table.append(bytes([int(piece[3:5], 16)]))
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids {bad[:8]} are outside the vocabulary [0, {self.vocab_size})")
