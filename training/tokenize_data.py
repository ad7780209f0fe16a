"""`codefill data tokenize`: turn prepared text into MindRecord rows for training, in three modes.

    instruct  conversations JSON -> prompt-masked examples, one per row        (instruct_examples.py)
    pretrain  text documents     -> one token stream packed into rows          (pretrain_packing.py)
    fim       a source tree      -> FIM / left-to-right examples, one per row  (source_files.py, fim_examples.py)

`seq_length` is the number of positions the model trains on; every row stores seq_length + 1 tokens
(input_ids and labels, see mindrecord_io.py) and the trainer reads input_ids[:-1] against labels[1:].
The tokenizer is the MODEL_DIR's own, checked against its config.

Each function writes OUT (and OUT.db), refuses to replace existing output unless overwrite=True, leaves any
earlier output as it was when it fails, and returns a DataSummary whose report() is what the CLI prints. The fim mode also
writes the held-out files' paths to OUT's stem + ".heldout.json" (see `held_out_list_path`), for evaluation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codefill.model.checkpoint import load_tokenizer as checkpoint_tokenizer
from codefill.model.tokenizer import Tokenizer

from .data_error import DataError
from .fim_examples import FimConfig, FimCounts, fim_pass_rows
from .instruct_examples import InstructCounts, instruct_rows
from .json_files import read_json, write_json_atomic
from .mindrecord_io import output_paths, pad_row, write_rows
from .pretrain_packing import PretrainCounts, pack_documents, read_documents
from .source_files import SourceConfig, SourceSummary, iter_source_files


@dataclass
class DataSummary:
    mode: str
    output: Path
    seq_length: int
    rows: int = 0
    tokens: int = 0            # real tokens written (padding excluded)
    padding: int = 0           # padding tokens written
    counts: InstructCounts | PretrainCounts | FimCounts | None = None
    sources: SourceSummary | None = None      # fim only
    held_out_list: Path | None = None         # fim only

    def report(self) -> str:
        lines = [f"tokenize {self.mode}: {self.rows} rows of {self.seq_length + 1} tokens -> {self.output}",
                 f"  tokens: {self.tokens} real + {self.padding} padding "
                 f"({self.padding / max(1, self.tokens + self.padding):.1%} padding)"]
        if self.sources is not None:
            lines.append(self.sources.report())
        if self.counts is not None:
            lines.append(self.counts.report())
        if self.held_out_list is not None:
            lines.append(f"  held-out file list: {self.held_out_list}")
        return "\n".join(lines)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    return checkpoint_tokenizer(model_dir)


def _check_seq_length(seq_length: int, minimum: int = 1) -> int:
    if not isinstance(seq_length, int) or seq_length < minimum:
        raise DataError(f"seq_length must be an integer >= {minimum}, got {seq_length!r}")
    return seq_length + 1


def _padded(rows: Iterable[tuple[list[int], list[int]]], row_length: int, pad_id: int,
            summary: DataSummary) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for ids, labels in rows:
        summary.tokens += len(ids)
        summary.padding += row_length - len(ids)
        yield pad_row(ids, labels, row_length, pad_id)


def _write(output: str | Path, rows, row_length: int, tok: Tokenizer, summary: DataSummary,
           overwrite: bool) -> DataSummary:
    summary.rows = write_rows(output, _padded(rows, row_length, tok.eos_id, summary), overwrite=overwrite,
                              description=f"codefill {summary.mode} rows of {row_length} tokens")
    if summary.rows == 0:
        raise DataError(f"no usable examples, nothing written to {output}:\n{summary.report()}")
    return summary


def tokenize_instruct(model_dir: str | Path, input_path: str | Path, output: str | Path, seq_length: int, *,
                      truncate: bool = False, overwrite: bool = False) -> DataSummary:
    """Conversations JSON (from convert_alpaca_file) -> prompt-masked rows. Over-long conversations are
    dropped and counted, or cut at the end with truncate=True."""
    row_length = _check_seq_length(seq_length)
    tok = load_tokenizer(model_dir)
    records = read_json(input_path)
    summary = DataSummary("instruct", Path(output), seq_length, counts=InstructCounts())
    rows = instruct_rows(tok, records, row_length, truncate=truncate, counts=summary.counts)
    return _write(output, rows, row_length, tok, summary, overwrite)


def tokenize_pretrain(model_dir: str | Path, input_path: str | Path, output: str | Path, seq_length: int, *,
                      overwrite: bool = False) -> DataSummary:
    """Documents (.jsonl / .json / plain text) -> packed rows, every token a target once."""
    row_length = _check_seq_length(seq_length)
    tok = load_tokenizer(model_dir)
    summary = DataSummary("pretrain", Path(output), seq_length, counts=PretrainCounts())
    rows = pack_documents(tok, read_documents(input_path), row_length, counts=summary.counts)
    return _write(output, rows, row_length, tok, summary, overwrite)


def held_out_list_path(output: str | Path) -> Path:
    """train.mindrecord -> train.heldout.json, beside it."""
    output = Path(output)
    return output.with_name(output.stem + ".heldout.json")


def tokenize_fim(model_dir: str | Path, input_dir: str | Path, output: str | Path, seq_length: int, *,
                 fim: FimConfig | None = None, sources: SourceConfig | None = None,
                 overwrite: bool = False) -> DataSummary:
    """A source directory or git repository -> FIM rows from its train files, and the held-out list.

    The held-out list is JSON: {"root", "held_out_fraction", "files": [paths relative to root]}."""
    fim = fim if fim is not None else FimConfig()
    sources = sources if sources is not None else SourceConfig()
    row_length = _check_seq_length(seq_length, minimum=16)
    tok = load_tokenizer(model_dir)
    if not tok.has_infilling:
        raise DataError(f"tokenizer of {model_dir} has no infilling pieces of its family {tok.family.name}; FIM "
                        f"data needs them (for Code Llama the 7B/13B base tokenizer, not a Python or 34B one)")
    held_out_path = held_out_list_path(output)
    existing = [str(p) for p in [*output_paths(output), held_out_path] if p.exists()]
    if existing and not overwrite:   # checked up front, not after a long run
        raise DataError(f"output {existing} already exists (pass overwrite / --overwrite to replace it)")

    summary = DataSummary("fim", Path(output), seq_length, counts=FimCounts(passes=fim.passes),
                          sources=SourceSummary())
    held_out: list[str] = []

    def train_texts() -> Iterator[tuple[str, str]]:
        for f in iter_source_files(input_dir, sources, summary.sources):
            if f.held_out:
                held_out.append(f.path)
            else:
                yield f.path, f.text

    _write(output, fim_pass_rows(tok, train_texts(), row_length, fim, summary.counts), row_length, tok, summary,
           overwrite)
    summary.held_out_list = write_json_atomic(
        held_out_path,
        {"root": str(Path(input_dir).resolve()), "held_out_fraction": sources.held_out_fraction, "files": held_out},
        overwrite=True)
    return summary


def read_held_out_list(path: str | Path) -> tuple[Path, list[str]]:
    """(root, relative paths) of a held-out list written by tokenize_fim."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("files"), list) or "root" not in data:
        raise DataError(f"{path} is not a held-out list (expected {{root, held_out_fraction, files}})")
    return Path(data["root"]), [str(p) for p in data["files"]]
