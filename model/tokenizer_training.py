"""Train a SentencePiece tokenizer with the options Code Llama's (Llama 2's) tokenizer was trained with.

Used for the tiny test models and for the small bundled model; real Code Llama checkpoints ship their own
`tokenizer.model`. The options below are the ones stored in Llama 2's model proto (BPE, byte fallback,
identity normalization, whitespace kept as is, digits split), plus Code Llama's four infilling pieces.

Training is deterministic for a given input and sentencepiece version: one thread, no sampling or shuffling
of the input sentences, so golden token lists in tests stay fixed.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from .tokenizer import INFILLING_PIECES, TokenizerError

# SentencePiece drops training sentences longer than this many bytes (default 4192); long generated lines in
# source files are rare and losing them does not matter.
_MAX_SENTENCE_BYTES = 4192


def read_text_budget(files: Iterable[str | Path], max_chars: int) -> str:
    """Concatenate files in the given order, stopping at `max_chars` characters (the last file is cut)."""
    if max_chars <= 0:
        raise TokenizerError(f"max_chars must be positive, got {max_chars}")
    parts: list[str] = []
    total = 0
    for f in files:
        try:
            text = Path(f).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read training text {f}: {e}") from e
        parts.append(text[: max_chars - total])
        total += len(parts[-1])
        if total >= max_chars:
            break
    return "".join(parts)


def _lines(texts: Iterable[str]) -> Iterator[str]:
    # SentencePiece trains on sentences: one line each. Newlines never enter the vocabulary; like Llama's
    # tokenizer, "\n" is encoded through byte fallback as the piece <0x0A>.
    for text in texts:
        yield from text.split("\n")


def train_sentencepiece(
    text: str | Iterable[str] | list[Path],
    out_path: str | Path,
    vocab_size: int,
    *,
    max_chars: int = 2_000_000,
    character_coverage: float = 0.99995,
) -> Path:
    """Train a Code Llama-style BPE tokenizer and write it to `out_path` (a SentencePiece `.model` file).

    `text` is either a list of `Path`s (read in order until `max_chars` characters) or an iterable of
    strings (e.g. file contents; plain `str` items are text, never paths); a single string is one text. Ids: unk=0, bos=1, eos=2, no pad, then the
    four infilling control pieces, then byte pieces and merges.
    """
    if isinstance(text, str):
        texts: Iterable[str] = [text]
    elif isinstance(text, (list, tuple)) and text and all(isinstance(t, os.PathLike) for t in text):
        texts = [read_text_budget(text, max_chars)]
    else:
        texts = text  # an iterable of strings
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            # Unknown characters fall back to their UTF-8 bytes, so every string round-trips and no id is <unk>.
            byte_fallback=True,
            # Code is not natural language: no NFKC (it would rewrite e.g. full-width characters) and
            # runs of spaces are kept, so indentation survives encode/decode unchanged.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            # Every digit is its own piece, as in Llama; numbers then tokenize uniformly.
            split_digits=True,
            max_sentencepiece_length=16,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            character_coverage=character_coverage,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            # Control symbols, not user-defined symbols: SentencePiece never produces a control id from
            # text, so source code that literally contains "<PRE>" encodes as ordinary pieces and cannot
            # forge an infilling marker; only infilling_prompt_tokens() places them. The pieces carry
            # the leading "▁" because that is how Code Llama's tokenizer spells them.
            control_symbols=list(INFILLING_PIECES.values()),
            # Determinism: one thread and the input taken in order, never sampled or shuffled.
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size too high" when the text is too small
        raise TokenizerError(f"SentencePiece training with vocab_size={vocab_size} failed: {e}") from e
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a reader never sees half a model file.
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path
