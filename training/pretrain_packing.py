"""Pretraining rows: documents joined into one token stream and cut into rows of seq_length + 1 tokens.

    stream = [BOS] + encode(doc_1) + [EOS] + [BOS] + encode(doc_2) + [EOS] + ...

Every document starts with BOS, as a served prompt does, and ends with EOS, so the model learns where one
document stops. Rows are consecutive slices of the stream that overlap by one token (row k+1 starts with
the last token of row k), because training scores labels[1:]: with the overlap every token of the stream
after the first is a target exactly once. labels equal input_ids. The last, partial row is padded, its
padding labelled -100, so no token is lost. Rows may span a document boundary; attention then crosses it,
as in Llama pretraining, and the EOS/BOS pair marks the switch.

Input documents: a .jsonl file of {"text": ...} objects (one per line), a .json file holding a list of
strings or of {"text": ...} objects, or any other file, read as one plain-text document. Blank documents are
skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from codefill.model.tokenizer import Tokenizer

from .data_error import DataError


@dataclass
class PretrainCounts:
    documents: int = 0
    blank_documents: int = 0   # skipped
    stream_tokens: int = 0     # tokens in the stream, BOS/EOS included
    rows: int = 0

    def report(self) -> str:
        return (f"  documents: {self.documents} ({self.blank_documents} blank, skipped), "
                f"stream tokens: {self.stream_tokens}, rows: {self.rows}")


def _text_of(item: object, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    raise DataError(f"{where}: expected a string or an object with a string 'text', got {str(item)[:80]!r}")


def read_documents(path: str | Path) -> Iterator[str]:
    """Documents of a .jsonl, .json or plain-text file (see the module docstring); errors name the line/item."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pretraining input {path} is not a file")
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, start=1):
                    if line.strip():
                        try:
                            item = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}:{n}: not a JSON line: {e}") from e
                        yield _text_of(item, f"{path}:{n}")
        elif path.suffix == ".json":
            with path.open(encoding="utf-8") as f:
                try:
                    items = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} is not JSON: {e}") from e
            if not isinstance(items, list):
                raise DataError(f"{path}: expected a JSON list of documents, got {type(items).__name__}")
            for i, item in enumerate(items):
                yield _text_of(item, f"{path} item {i}")
        else:
            yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e


def pack_documents(tok: Tokenizer, documents: Iterable[str], row_length: int,
                   counts: PretrainCounts | None = None) -> Iterator[tuple[list[int], list[int]]]:
    """Yield (ids, labels) rows of `row_length` tokens (the last one may be shorter; the writer pads it)."""
    if row_length < 2:
        raise DataError(f"row length must be at least 2 (seq_length >= 1), got {row_length}")
    counts = counts if counts is not None else PretrainCounts()
    buffer: list[int] = []
    emitted = False
    for doc in documents:
        counts.documents += 1
        if not doc.strip():
            counts.blank_documents += 1
            continue
        ids = tok.encode(doc, bos=True, eos=True)
        counts.stream_tokens += len(ids)
        buffer.extend(ids)
        start = 0
        while len(buffer) - start >= row_length:
            row = buffer[start:start + row_length]
            counts.rows += 1
            emitted = True
            yield row, list(row)
            start += row_length - 1  # the next row starts with this row's last token
        del buffer[:start]
    # After a full row the buffer keeps its last token; a row is only worth writing if it adds a target.
    if len(buffer) > (1 if emitted else 0):
        counts.rows += 1
        yield buffer, list(buffer)
