"""Token rows on disk: one MindRecord file (plus its `.db` index) per dataset, read back with MindDataset.

Every mode of `codefill data tokenize` writes the same schema, so the trainer needs no mode switch:

    input_ids  int32[seq_length + 1]   token ids, padded at the end with `pad_id`
    labels     int32[seq_length + 1]   the id to score at each position, or IGNORE_INDEX (-100) for none

A row holds seq_length + 1 tokens because training shifts by one: the model reads input_ids[:-1] (seq_length
positions) and is scored against labels[1:]. Padding is only ever at the end of a row and its labels are
IGNORE_INDEX, so under a causal mask it changes no loss; its id is the tokenizer's EOS (Llama has no pad piece).

MindSpore is imported inside the functions, so preparing data in plain Python stays cheap to import.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .data_error import DataError

IGNORE_INDEX = -100
COLUMNS = ("input_ids", "labels")
SCHEMA = {name: {"type": "int32", "shape": [-1]} for name in COLUMNS}
_BATCH = 1000  # rows handed to the writer at a time, so a large corpus never sits in memory


def pad_row(ids: list[int], labels: list[int], row_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad one example to `row_length` (padding labelled IGNORE_INDEX); longer examples are a caller bug."""
    if len(ids) != len(labels):
        raise DataError(f"row has {len(ids)} ids but {len(labels)} labels")
    if len(ids) > row_length:
        raise DataError(f"row of {len(ids)} tokens does not fit row length {row_length}")
    pad = row_length - len(ids)
    return (np.array(ids + [pad_id] * pad, dtype=np.int32),
            np.array(labels + [IGNORE_INDEX] * pad, dtype=np.int32))


def output_paths(path: str | Path) -> list[Path]:
    """The files one MindRecord dataset occupies."""
    path = Path(path)
    return [path, path.with_name(path.name + ".db")]


def write_rows(path: str | Path, rows: Iterable[tuple[np.ndarray, np.ndarray]], *, overwrite: bool = False,
               description: str = "codefill") -> int:
    """Write (input_ids, labels) rows to a single-shard MindRecord file; returns the number of rows.

    The files are written in a temporary folder beside `path` and moved into place at the end, so a failed
    run leaves any earlier output as it was. (They keep their final name there: the .db index records the
    data file's name, so a renamed file cannot be read.) With no rows nothing is written and 0 is returned
    (MindSpore cannot read an empty dataset back); the caller says why it had none."""
    from mindspore.mindrecord import FileWriter

    path = Path(path)
    existing = [str(p) for p in output_paths(path) if p.exists()]
    if existing and not overwrite:
        raise DataError(f"output {existing} already exists (pass overwrite / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        writer = FileWriter(str(staged), shard_num=1, overwrite=True)
        writer.add_schema(SCHEMA, description)
        batch: list[dict] = []
        for ids, labels in rows:
            batch.append({"input_ids": ids, "labels": labels})
            count += 1
            if len(batch) == _BATCH:
                writer.write_raw_data(batch)
                batch = []
        if batch:
            writer.write_raw_data(batch)
        if count:
            writer.commit()
            for src, dst in zip(output_paths(staged), output_paths(path)):
                os.replace(src, dst)
    return count


def read_rows(path: str | Path) -> Iterator[dict[str, np.ndarray]]:
    """Rows in file order, as {"input_ids", "labels"} int32 arrays, read through mindspore.dataset."""
    import mindspore.dataset as ds

    if not Path(path).is_file():
        raise DataError(f"MindRecord file {path} does not exist")
    dataset = ds.MindDataset(str(path), columns_list=list(COLUMNS), shuffle=False)
    yield from dataset.create_dict_iterator(output_numpy=True, num_epochs=1)
