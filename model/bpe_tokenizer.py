"""A byte-level BPE tokenizer (`tokenizer.json`, Qwen2.5-Coder and DeepSeek-Coder) behind the interface of
Code Llama's SentencePiece `Tokenizer`: `encode`, `encode_infilling`, `decode`, `decode_infilling`,
`piece`, `piece_to_id`, `bos_id`, `eos_id`, the FIM ids, `stop_ids`, `token_bytes`.

The `tokenizers` library does the work. Byte-level BPE adds no leading space (the checkpoints' pre-tokenizers
have `add_prefix_space` false, checked at load), so `encode_infilling` is `encode` and `decode_infilling` is
`decode`. Two choices keep it equivalent to the SentencePiece side:

- special tokens written as text are text: a document containing "<|fim_prefix|>" must not turn into the
  marker id (`encode_special_tokens`), as SentencePiece never parses control pieces out of text;
- special tokens decode to nothing (`skip_special_tokens`), as SentencePiece's control pieces do.

The FIM, BOS, EOS and stop tokens are the family's (families.py), looked up by their text in the vocabulary.

Checkpoints pad the model's vocabulary beyond the file's tokens (Qwen2.5-Coder: 151665 tokens, 151936 rows),
and a model can emit a padding id. Given the model's `vocab_size`, ids in [n_tokens, vocab_size) are valid and
stand for nothing: they decode to "" and have no bytes, as control pieces do.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from .families import Family
from .tokenizer import TokenizerError


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the printable character standing for each byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class BpeTokenizer:
    def __init__(self, path: str | Path, family: Family, vocab_size: int | None = None):
        self.path, self.family = Path(path), family
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer {self.path} does not exist or is not a file")
        try:
            text = self.path.read_text(encoding="utf-8")
            spec = json.loads(text)
            import tokenizers  # here: importing this module needs no tokenizers library

            self._tk = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # OSError, JSONDecodeError, and the plain Exception tokenizers raises on a bad spec
            raise TokenizerError(f"cannot load tokenizer {self.path}: {e}") from e
        decoder = (spec.get("decoder") or {}).get("type")
        if decoder != "ByteLevel":
            raise TokenizerError(f"{self.path}: decoder type {decoder!r}, codefill reads only byte-level BPE "
                                 f"('ByteLevel') tokenizer.json files")
        self._tk.encode_special_tokens = True
        self._special = {t.content for t in self._tk.get_added_tokens_decoder().values() if t.special}
        self.n_tokens: int = max(self._tk.get_vocab(with_added_tokens=True).values()) + 1  # the file's ids
        self.vocab_size: int = max(self.n_tokens, vocab_size or 0)  # the model's ids (padding beyond n_tokens)
        if self.decode(self.encode("a")) != "a":
            raise TokenizerError(f"{self.path} adds a prefix space or more to every text; "
                                 f"codefill's byte-level families never do")
        self.bos_id: int = self._required(family.bos, "BOS")
        self.eos_id: int = self._required(family.eos, "EOS")

    def _required(self, token: str, role: str) -> int:
        i = self.piece_to_id(token)
        if i is None:
            raise TokenizerError(f"tokenizer {self.path} has no {role} token {token!r} ({self.family.name})")
        return i

    # --- ids ------------------------------------------------------------------------------------------

    @property
    def has_infilling(self) -> bool:
        f = self.family
        return all(self.piece_to_id(t) is not None for t in (f.prefix, f.suffix, f.middle, f.eot))

    def _infilling_id(self, token: str) -> int:
        i = self.piece_to_id(token)
        if i is None:
            f = self.family
            missing = [t for t in (f.prefix, f.suffix, f.middle, f.eot) if self.piece_to_id(t) is None]
            raise TokenizerError(f"infilling is unavailable: tokenizer {self.path} has no tokens {missing} "
                                 f"({f.name} FIM format)")
        return i

    @property
    def prefix_id(self) -> int:
        return self._infilling_id(self.family.prefix)

    @property
    def suffix_id(self) -> int:
        return self._infilling_id(self.family.suffix)

    @property
    def middle_id(self) -> int:
        return self._infilling_id(self.family.middle)

    @property
    def eot_id(self) -> int:
        return self._infilling_id(self.family.eot)

    @property
    def stop_ids(self) -> list[int]:
        """Every id that ends a middle: eot, EOS, then the family's other stops the vocabulary has."""
        ids = [self.eot_id, self.eos_id] + [self.piece_to_id(t) for t in self.family.stops]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def special_id(self, token: str) -> int:
        """The id of a family token such as <|file_sep|>; TokenizerError when the vocabulary lacks it."""
        return self._required(token, "special")

    def piece(self, i: int) -> str:
        self._check_ids([i])
        return self._tk.id_to_token(i) or ""  # a padding id has no token

    def piece_to_id(self, piece: str) -> int | None:
        return self._tk.token_to_id(piece)

    # --- encode / decode ------------------------------------------------------------------------------

    def encode(self, s: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(s, str):
            raise TokenizerError(f"encode needs a str, got {type(s).__name__}")
        ids = self._tk.encode(s, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_infilling(self, s: str) -> list[int]:
        if not isinstance(s, str):
            raise TokenizerError(f"encode_infilling needs a str, got {type(s).__name__}")
        return self.encode(s)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if i != -1]
        self._check_ids(ids)
        return self._tk.decode([i for i in ids if i < self.n_tokens], skip_special_tokens=True)

    def decode_infilling(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    def token_bytes(self) -> list[bytes]:
        """id -> the bytes its token stands for (special tokens: none), for the workers' stop-rule table."""
        inverse, table = _byte_decoder(), []
        for i in range(self.vocab_size):
            token = self._tk.id_to_token(i) if i < self.n_tokens else None
            if token is None or token in self._special:
                table.append(b"")
            else:  # a character outside the byte alphabet (in an added token) stands for its own UTF-8
                table.append(b"".join(bytes([inverse[c]]) if c in inverse else c.encode("utf-8") for c in token))
        return table

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids {bad[:8]} are outside the vocabulary [0, {self.vocab_size})")
