"""FIM rows of a corpus (corpus.py's text shards), built in parallel, and row files ("token shards") on disk.

Rows are the trainers' rows (fim_examples.fim_pass_rows, padded as mindrecord_io.pad_row pads them): ids and
a scored mask (labels = ids where scored, IGNORE_INDEX elsewhere). Documents are cut into chunks of
CHUNK_DOCS in shard order and each chunk is turned into rows on its own, so the rows are the same whatever the
number of worker processes. Neither MindSpore nor torch is imported.

Row files (`PREFIX-NNNNN.npz.xz`: an .npz of ids uint16 [N, L] and the mask bit-packed, compressed with xz,
which makes them 31% smaller than the .npz's own zlib and as small as the xz text they came from) are each at
most `max_bytes`, so rows built where SentencePiece runs can travel instead of the text when the other
machine cannot tokenize.
"""

from __future__ import annotations

import io
import lzma
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .corpus_shards import read_docs, shard_paths
from .data_error import DataError
from .fim_examples import fim_pass_rows
from .mindrecord_io import IGNORE_INDEX

CHUNK_DOCS = 256
MIB = 1 << 20


@dataclass
class Rows:
    ids: np.ndarray      # uint16 or int32 [N, L]
    scored: np.ndarray   # bool [N, L]

    def __len__(self) -> int:
        return len(self.ids)

    def labels(self, index) -> np.ndarray:
        """int64 labels of the rows `index`: the ids where scored, IGNORE_INDEX elsewhere."""
        return np.where(self.scored[index], self.ids[index].astype(np.int64), IGNORE_INDEX)

    @classmethod
    def of_labels(cls, ids: np.ndarray, labels: np.ndarray) -> "Rows":
        """From the MindRecord layout (int32 ids and labels)."""
        scored = labels != IGNORE_INDEX
        if np.any(labels[scored] != ids[scored]):
            raise DataError("rows whose labels are not their own ids cannot be stored as ids + mask")
        return cls(ids.astype(np.uint16 if ids.max() < 65536 else np.int32), scored)


_worker: dict = {}


def _init(tokenizer: str, fim, row_length: int) -> None:
    from codefill.model.tokenizer import Tokenizer

    _worker.update(tok=Tokenizer(tokenizer), fim=fim, row_length=row_length)


def _chunk_rows(chunk: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    tok, row_length = _worker["tok"], _worker["row_length"]
    rows = list(fim_pass_rows(tok, chunk, row_length, _worker["fim"]))
    ids = np.full((len(rows), row_length), tok.eos_id, np.uint16)
    scored = np.zeros((len(rows), row_length), bool)
    for r, (row_ids, _) in enumerate(rows):
        ids[r, :len(row_ids)] = row_ids
        scored[r, :len(row_ids)] = True
    return ids, scored


def fim_rows_parallel(docs: list[tuple[str, str]], tokenizer: str | Path, fim, row_length: int, *,
                      workers: int | None = None) -> Rows:
    """Rows of (path, text) documents: chunks of CHUNK_DOCS, each by fim_pass_rows, in `workers` processes."""
    from codefill.model.tokenizer import Tokenizer

    n_pieces = Tokenizer(tokenizer).vocab_size
    if n_pieces > 65536:
        raise DataError(f"tokenizer {tokenizer}: {n_pieces} pieces do not fit uint16 rows")
    chunks = [docs[i:i + CHUNK_DOCS] for i in range(0, len(docs), CHUNK_DOCS)]
    if not chunks:
        raise DataError("no documents to make rows of")
    workers = min(len(chunks), workers or os.cpu_count() or 1)
    args = (str(tokenizer), fim, row_length)
    if workers == 1:
        _init(*args)
        parts = [_chunk_rows(c) for c in chunks]
    else:
        with get_context("spawn").Pool(workers, _init, args) as pool:
            parts = pool.map(_chunk_rows, chunks, chunksize=1)
    return Rows(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def corpus_rows(corpus_dir: str | Path, tokenizer: str | Path, fim, row_length: int, *, part: str = "train",
                workers: int | None = None) -> Rows:
    """Rows of the corpus's `part` ("train" or "heldout") shards, documents named PACKAGE/PATH."""
    paths = shard_paths(corpus_dir, part)
    if not paths:
        raise DataError(f"{corpus_dir} has no {part}-*.jsonl.xz shards")
    docs = [(f"{d.package}/{d.path}", d.text) for d in read_docs(paths)]
    return fim_rows_parallel(docs, tokenizer, fim, row_length, workers=workers)


def spread(rows: Rows, n: int) -> Rows:
    """`n` rows spread evenly over `rows` (the held-out loss's rows), as recipe.heldout_loss_rows picks them."""
    index = sorted(set(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int).tolist()))
    return Rows(rows.ids[index], rows.scored[index])


SUFFIX = ".npz.xz"


def save_rows(rows: Rows, out_dir: str | Path, prefix: str, max_bytes: int = 16 * MIB) -> list[Path]:
    """PREFIX-NNNNN.npz.xz files of at most `max_bytes` each (cut by an estimate, then halved until they fit)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def write(lo: int, hi: int) -> None:
        buf = io.BytesIO()
        np.savez(buf, ids=rows.ids[lo:hi], mask=np.packbits(rows.scored[lo:hi], axis=1),
                 row_length=np.int64(rows.ids.shape[1]))
        packed = lzma.compress(buf.getvalue(), preset=6)
        if len(packed) > max_bytes:
            if hi - lo == 1:
                raise DataError(f"row {lo} alone makes a {len(packed)}-byte file, over the limit of {max_bytes}")
            mid = (lo + hi) // 2
            write(lo, mid)
            write(mid, hi)
            return
        final = out_dir / f"{prefix}-{len(written):05d}{SUFFIX}"
        tmp = final.with_name(final.name + ".tmp")
        tmp.write_bytes(packed)
        os.replace(tmp, final)
        written.append(final)

    per_row = rows.ids.itemsize * rows.ids.shape[1]
    step = max(1, int(max_bytes * 4 // per_row))   # xz shrinks rows ~6x: a file is halved if it does not fit
    for lo in range(0, len(rows), step):
        write(lo, min(len(rows), lo + step))
    return written


def row_paths(directory: str | Path, prefix: str) -> list[Path]:
    return sorted(Path(directory).glob(f"{prefix}-*{SUFFIX}"))


def load_rows(paths: list[str | Path]) -> Rows:
    if not paths:
        raise DataError("no row files given")
    ids, scored = [], []
    for path in paths:
        try:
            with np.load(io.BytesIO(lzma.decompress(Path(path).read_bytes()))) as z:
                length = int(z["row_length"])
                ids.append(z["ids"])
                scored.append(np.unpackbits(z["mask"], axis=1)[:, :length].astype(bool))
        except (OSError, KeyError, ValueError, lzma.LZMAError) as e:
            raise DataError(f"cannot read row file {path}: {e}") from e
    if len({a.shape[1] for a in ids}) != 1:
        raise DataError(f"row files {paths} mix row lengths {sorted({a.shape[1] for a in ids})}")
    return Rows(np.concatenate(ids), np.concatenate(scored))
