"""Data preparation: code-alpaca conversion, and instruct / pretrain / FIM rows written to MindRecord and read
back through mindspore.dataset, with a real tokenizer, a real git repository and real files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from codefill.model.fim import infilling_prompt_tokens
from codefill.training.alpaca import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, alpaca_to_conversations, convert_alpaca_file
from codefill.training.data_error import DataError
from codefill.training.fim_examples import (
    FIM_OVERHEAD, FimConfig, FimCounts, fim_example, fim_rows, line_starts, split_into_windows, window_rng,
)
from codefill.training.instruct_examples import InstructCounts, instruct_example, instruct_rows
from codefill.training.mindrecord_io import IGNORE_INDEX, pad_row, read_rows
from codefill.training.pretrain_packing import PretrainCounts, pack_documents, read_documents
from codefill.training.source_files import SourceConfig, SourceSummary, is_held_out, iter_source_files, list_files
from codefill.training.tokenize_data import (
    load_tokenizer, read_held_out_list, tokenize_fim, tokenize_instruct, tokenize_pretrain,
)
from helpers import make_tiny_model_dir

CODE_ALPACA = Path(__file__).resolve().parents[1].parent / "shared/data/code_alpaca_2k.json"

# Source text for FIM tests: indentation, blank lines, non-ASCII (byte-fallback pieces), a tab.
SOURCE = '''\
import math


def area(r: float) -> float:
    """Area of a circle of radius r (π r²)."""
    return math.pi * r * r


class Stack:
    def __init__(self):
        self.items = []

    def push(self, x):
\tself.items.append(x)  # tab-indented → still round-trips
        return len(self.items)
'''


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def tok(model_dir):
    return load_tokenizer(model_dir)


def padded(rows, row_length, tok):
    return [pad_row(ids, labels, row_length, tok.eos_id) for ids, labels in rows]


def assert_same_rows(read, expected):
    assert len(read) == len(expected)
    for got, (ids, labels) in zip(read, expected):
        assert got["input_ids"].dtype == np.int32 and got["labels"].dtype == np.int32
        np.testing.assert_array_equal(got["input_ids"], ids)
        np.testing.assert_array_equal(got["labels"], labels)


# --- alpaca ---------------------------------------------------------------------------------------------


def test_alpaca_conversion_inline():
    records = [
        {"instruction": "Reverse a list.", "input": "", "output": "xs[::-1]"},
        {"instruction": "Sum the numbers.", "input": "[1, 2, 3]", "output": "sum([1, 2, 3])"},
        {"instruction": "Say hi.", "input": "  \n", "output": "print('hi')"},
    ]
    conversations, summary = alpaca_to_conversations(records)
    assert summary.records == 3 and summary.written == 3 and not summary.skipped
    assert conversations[0] == {"id": "0", "conversations": [
        {"from": "human", "value": "Below is an instruction that describes a task. Write a response that "
                                   "appropriately completes the request.\n\n### Instruction:\nReverse a list."
                                   "\n\n### Response:"},
        {"from": "gpt", "value": "xs[::-1]"},
    ]}
    assert conversations[1]["conversations"][0]["value"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSum the numbers.\n\n"
        "### Input:\n[1, 2, 3]\n\n### Response:")
    # A whitespace-only input is no input.
    assert conversations[2]["conversations"][0]["value"] == PROMPT_NO_INPUT.format(instruction="Say hi.")


def test_alpaca_malformed_records_are_named_and_blank_ones_skipped(tmp_path):
    records = [
        {"instruction": "ok", "input": "", "output": "fine"},
        {"instruction": "no input key", "output": "x"},
        "not a record",
        {"instruction": "number", "input": "", "output": 42},
        {"instruction": "blank output", "input": "", "output": "  "},
    ]
    with pytest.raises(DataError) as e:
        alpaca_to_conversations(records, where="bad.json")
    msg = str(e.value)
    assert "bad.json" in msg and "3 of 5" in msg
    assert "record 1: missing 'input'" in msg and "record 2: not an object but str" in msg
    assert "record 3: 'output' is int, not a string" in msg

    conversations, summary = alpaca_to_conversations(records, skip_invalid=True)
    assert [c["id"] for c in conversations] == ["0"]
    assert sorted(summary.skipped) == [1, 2, 3, 4] and summary.skipped[4] == "'output' is blank"
    assert "skipped 4 records" in summary.report()

    # Blank records alone are skipped (and reported) without skip_invalid; the file is written.
    src = tmp_path / "in.json"
    src.write_text(json.dumps([records[0], records[4]]))
    summary = convert_alpaca_file(src, tmp_path / "out.json")
    assert summary.written == 1 and summary.skipped == {1: "'output' is blank"}
    assert json.loads((tmp_path / "out.json").read_text())[0]["id"] == "0"
    with pytest.raises(DataError, match="already exists"):
        convert_alpaca_file(src, tmp_path / "out.json")


def test_alpaca_conversion_of_code_alpaca_2k(tmp_path):
    if not CODE_ALPACA.is_file():
        pytest.skip(f"{CODE_ALPACA} is absent (shared data is not laid out beside the repository)")
    records = json.loads(CODE_ALPACA.read_text())
    summary = convert_alpaca_file(CODE_ALPACA, tmp_path / "conversations.json")
    conversations = json.loads((tmp_path / "conversations.json").read_text())
    blank = [i for i, r in enumerate(records) if not r["output"].strip() or not r["instruction"].strip()]
    assert summary.records == len(records) == 2017
    assert summary.written == len(conversations) == len(records) - len(blank)
    assert sorted(summary.skipped) == blank
    for c in conversations:
        r = records[int(c["id"])]
        human, gpt = c["conversations"]
        template = PROMPT_WITH_INPUT if r["input"].strip() else PROMPT_NO_INPUT
        assert human == {"from": "human", "value": template.format(**r)}
        assert gpt == {"from": "gpt", "value": r["output"]}


# --- instruct -------------------------------------------------------------------------------------------


def test_instruct_labels_mask_exactly_the_prompt(tok):
    prompt, response = PROMPT_NO_INPUT.format(instruction="Add one."), "def f(x):\n    return x + 1"
    ids, labels = instruct_example(tok, [(prompt, response)])
    p, r = tok.encode(prompt), tok.encode(response)
    assert ids == [tok.bos_id] + p + r + [tok.eos_id]
    assert labels == [IGNORE_INDEX] * (1 + len(p)) + r + [tok.eos_id]

    # Two turns: each human turn masked, each response followed by EOS and trained.
    ids, labels = instruct_example(tok, [("a?", "b."), ("c?", "d.")])
    a, b, c, d = (tok.encode(s) for s in ("a?", "b.", "c?", "d."))
    assert ids == [tok.bos_id] + a + b + [tok.eos_id] + c + d + [tok.eos_id]
    assert labels == ([IGNORE_INDEX] * (1 + len(a)) + b + [tok.eos_id] + [IGNORE_INDEX] * len(c) + d
                      + [tok.eos_id])


def test_instruct_overlong_dropped_or_truncated(tok):
    records = [
        {"id": "short", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"id": "long", "conversations": [{"from": "human", "value": "x = 1\n" * 3},
                                         {"from": "gpt", "value": "y = 2\n" * 40}]},
    ]
    full_long, _ = instruct_example(tok, [("x = 1\n" * 3, "y = 2\n" * 40)])
    row_length = 40
    assert len(full_long) > row_length
    rows = list(instruct_rows(tok, records, row_length))
    assert len(rows) == 1
    rows_counts = InstructCounts()
    list(instruct_rows(tok, records, row_length, counts=rows_counts))
    assert rows_counts.dropped_too_long == ["long"] and rows_counts.examples == 1
    truncated = list(instruct_rows(tok, records, row_length, truncate=True))
    assert len(truncated) == 2 and truncated[1][0] == full_long[:row_length]

    bad = [{"id": "x", "conversations": [{"from": "gpt", "value": "?"}, {"from": "human", "value": "!"}]}]
    with pytest.raises(DataError, match=r"conversation 0 \(id 'x'\): turn 0 should be from 'human', got 'gpt'"):
        list(instruct_rows(tok, bad, row_length))


def test_instruct_mindrecord_round_trip(tmp_path, model_dir, tok):
    records = [{"id": str(i), "conversations": [
        {"from": "human", "value": PROMPT_NO_INPUT.format(instruction=f"Print {i}.")},
        {"from": "gpt", "value": f"print({i})"}]} for i in range(7)]
    src = tmp_path / "conversations.json"
    src.write_text(json.dumps(records))
    seq_length = 255
    summary = tokenize_instruct(model_dir, src, tmp_path / "instruct.mindrecord", seq_length)
    expected = padded(instruct_rows(tok, records, seq_length + 1), seq_length + 1, tok)
    read = list(read_rows(tmp_path / "instruct.mindrecord"))
    assert_same_rows(read, expected)
    assert summary.rows == 7 and len(read[0]["input_ids"]) == seq_length + 1
    assert summary.tokens + summary.padding == 7 * (seq_length + 1)
    with pytest.raises(DataError, match="already exists"):
        tokenize_instruct(model_dir, src, tmp_path / "instruct.mindrecord", seq_length)


# --- pretrain -------------------------------------------------------------------------------------------


def test_pretrain_packing_is_exact(tok):
    docs = ["def a():\n    return 1\n", "", "x = [i * i for i in range(10)]\n" * 5, "print('bye')\n"]
    stream = [i for d in docs if d.strip() for i in tok.encode(d, bos=True, eos=True)]
    row_length = 17
    counts = PretrainCounts()
    rows = list(pack_documents(tok, docs, row_length, counts))
    assert all(len(ids) == row_length for ids, _ in rows[:-1]) and 1 < len(rows[-1][0]) <= row_length
    assert all(ids == labels for ids, labels in rows)
    # Rows overlap by one token, so the stream comes back by dropping each later row's first token ...
    assert rows[0][0] + [i for ids, _ in rows[1:] for i in ids[1:]] == stream
    # ... and every stream token after the first is a training target (labels[1:]) exactly once.
    assert sum(len(ids) - 1 for ids, _ in rows) == len(stream) - 1
    assert counts.documents == 4 and counts.blank_documents == 1 and counts.stream_tokens == len(stream)
    assert counts.rows == len(rows)


def test_pretrain_mindrecord_round_trip(tmp_path, model_dir, tok):
    docs = [f"def f{i}(x):\n    return x * {i}\n" for i in range(20)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    summary = tokenize_pretrain(model_dir, src, tmp_path / "pretrain.mindrecord", 32)
    expected = padded(pack_documents(tok, docs, 33), 33, tok)
    assert_same_rows(list(read_rows(tmp_path / "pretrain.mindrecord")), expected)
    assert summary.rows == len(expected)
    # Only the last row has padding, and its padding is never a target.
    last_labels = expected[-1][1]
    assert summary.padding == int((last_labels == IGNORE_INDEX).sum())

    # Bad input, even with overwrite: a clear error, and the earlier output is left as it was.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a string or an object with a string 'text'"):
        tokenize_pretrain(model_dir, bad, tmp_path / "pretrain.mindrecord", 32, overwrite=True)
    assert_same_rows(list(read_rows(tmp_path / "pretrain.mindrecord")), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "docs.jsonl", "pretrain.mindrecord",
                                                          "pretrain.mindrecord.db"]


def test_pretrain_document_formats(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["one", {"text": "two"}]))
    (tmp_path / "b.txt").write_text("three\n")
    assert list(read_documents(tmp_path / "a.json")) == ["one", "two"]
    assert list(read_documents(tmp_path / "b.txt")) == ["three\n"]
    (tmp_path / "c.json").write_text(json.dumps({"text": "not a list"}))
    with pytest.raises(DataError, match="expected a JSON list of documents, got dict"):
        list(read_documents(tmp_path / "c.json"))


# --- FIM ------------------------------------------------------------------------------------------------


def split_example(tok, ids):
    """(kind, prefix, middle, suffix) decoded back from an example's ids."""
    assert ids[0] == tok.bos_id
    if ids[1] != tok.prefix_id:
        return "plain", tok.decode(ids[1:]), "", ""
    assert ids[-1] == tok.eot_id
    mid = ids.index(tok.middle_id)
    if ids[2] == tok.suffix_id:   # SPM: [BOS, PRE, SUF] suffix [MID] prefix+middle [EOT]
        suffix = tok.decode_infilling(ids[3:mid])
        return "spm", tok.decode(ids[mid + 1:-1]), "", suffix
    suf = ids.index(tok.suffix_id)
    return ("psm", tok.decode(ids[2:suf]), tok.decode_infilling(ids[mid + 1:-1]),
            tok.decode_infilling(ids[suf + 1:mid]))


def test_fim_examples_decode_back_to_the_window(tok):
    seen = set()
    for spm_rate in (0.0, 1.0):
        config = FimConfig(fim_rate=1.0, spm_rate=spm_rate)
        for n in range(60):
            ex = fim_example(tok, SOURCE, window_rng(0, "a.py", n), config)
            kind, prefix, middle, suffix = split_example(tok, ex.ids)
            assert kind == ex.kind == ("spm" if spm_rate else "psm")
            seen.add(kind)
            assert ex.prefix + ex.middle + ex.suffix == SOURCE
            if kind == "psm":
                assert (prefix, middle, suffix) == (ex.prefix, ex.middle, ex.suffix)
                # PSM: the prompt is exactly what the server sends, and the middle follows it.
                prompt = infilling_prompt_tokens(tok, ex.prefix, ex.suffix)
                assert ex.ids[:len(prompt)] == prompt
            else:
                assert (prefix, suffix) == (ex.prefix + ex.middle, ex.suffix)
                assert ex.ids[3 + len(tok.encode_infilling(ex.suffix)):][1:-1] == tok.encode(ex.prefix + ex.middle)
            assert prefix + middle + suffix == SOURCE
    assert seen == {"psm", "spm"}
    plain = fim_example(tok, SOURCE, window_rng(0, "a.py", 0), FimConfig(fim_rate=0.0))
    assert plain.ids == tok.encode(SOURCE, bos=True, eos=True) and split_example(tok, plain.ids)[1] == SOURCE
    not_last = fim_example(tok, SOURCE, window_rng(0, "a.py", 0), FimConfig(fim_rate=0.0), ends_file=False)
    assert not_last.ids == tok.encode(SOURCE, bos=True)


def test_fim_rates_and_cut_points(tok):
    config = FimConfig()  # fim_rate 0.9, spm_rate 0.5
    window = "abcdefghij" * 3
    kinds = {"psm": 0, "spm": 0, "plain": 0}
    starts = []
    n = 3000
    for k in range(n):
        ex = fim_example(tok, window, window_rng(7, f"f{k}.py", 0), config)
        kinds[ex.kind] += 1
        if ex.kind != "plain":
            starts.append(len(ex.prefix))
    fim = kinds["psm"] + kinds["spm"]
    assert abs(fim / n - 0.9) < 0.02, kinds
    assert abs(kinds["spm"] / fim - 0.5) < 0.04, kinds
    # The first cut is the smaller of two uniform draws over 0..len: mean len/3.
    assert abs(np.mean(starts) - len(window) / 3) < 1.0


def test_windows_cover_the_text_and_fit(tok):
    text = SOURCE * 6 + "z = '" + "q" * 500 + "'\n" + SOURCE
    for max_tokens in (8, 40, 200):
        windows = split_into_windows(tok, text, max_tokens)
        assert "".join(windows) == text and all(windows)
        assert all(len(tok.encode(w)) <= max_tokens for w in windows)
    assert split_into_windows(tok, SOURCE, 10_000) == [SOURCE]
    # Greedy packing fills windows: only the last one of a run may be small.
    windows = split_into_windows(tok, SOURCE * 20, 200)
    assert sum(len(tok.encode(w)) for w in windows) / len(windows) > 150


def test_fim_rows_reproducible_and_fit_the_row(tok):
    sources = [(f"m{k}.py", SOURCE * (k + 1)) for k in range(5)]
    row_length = 129
    counts = FimCounts()
    a = list(fim_rows(tok, sources, row_length, FimConfig(seed=3), counts))
    b = list(fim_rows(tok, sources, row_length, FimConfig(seed=3)))
    c = list(fim_rows(tok, sources, row_length, FimConfig(seed=4)))
    assert a == b and a != c
    assert all(len(ids) <= row_length for ids, _ in a) and all(ids == labels for ids, labels in a)
    assert counts.files == 5 and counts.windows == len(a) + counts.dropped_too_long
    assert counts.dropped_too_long == 0 and counts.psm + counts.spm + counts.plain == len(a)
    # A file's examples depend on that file only: dropping another file does not change them.
    only_last = list(fim_rows(tok, sources[-1:], row_length, FimConfig(seed=3)))
    assert a[-len(only_last):] == only_last
    # Windows of one file reassemble it (plain or FIM alike).
    windows = split_into_windows(tok, sources[4][1], row_length - FIM_OVERHEAD)
    parts = []
    for i, w in enumerate(windows):
        ex = fim_example(tok, w, window_rng(3, "m4.py", i), FimConfig(seed=3), ends_file=i == len(windows) - 1)
        parts.append(ex.prefix + ex.middle + ex.suffix)
    assert "".join(parts) == sources[4][1]


def test_line_cut_middles_are_whole_lines(tok):
    config = FimConfig(fim_rate=1.0, line_rate=1.0)
    starts = set(line_starts(SOURCE))
    assert 0 in starts and len(SOURCE) in starts and len(starts) == SOURCE.count("\n") + 1
    middles = []
    for n in range(200):
        ex = fim_example(tok, SOURCE, window_rng(0, "a.py", n), config)
        assert ex.kind in ("psm", "spm") and ex.prefix + ex.middle + ex.suffix == SOURCE
        assert len(ex.prefix) in starts and len(ex.prefix + ex.middle) in starts
        middles.append(ex.middle)
    assert len({m.count("\n") for m in middles}) > 3  # one line, several lines, none
    # line_rate 0.5: about half of the middles fall on line starts (character cuts rarely do).
    half = [fim_example(tok, SOURCE, window_rng(1, f"f{n}.py", 0), FimConfig(fim_rate=1.0, line_rate=0.5))
            for n in range(600)]
    on_lines = sum(len(e.prefix) in starts and len(e.prefix + e.middle) in starts for e in half)
    assert 0.45 < on_lines / 600 < 0.65, on_lines
    # line_rate 0 draws nothing extra: the draws are those made before the option existed (the bundled data).
    for n in range(40):
        rng = window_rng(2, "a.py", n)
        ex = fim_example(tok, SOURCE, window_rng(2, "a.py", n), FimConfig())
        if rng.random() >= 0.9:
            assert ex.kind == "plain"
            continue
        i, j = sorted((rng.randint(0, len(SOURCE)), rng.randint(0, len(SOURCE))))
        assert (len(ex.prefix), len(ex.prefix + ex.middle)) == (i, j)
        assert ex.kind == ("spm" if rng.random() < 0.5 else "psm")


def test_line_lines_bounds_the_middle_to_a_few_whole_lines(tok):
    starts = line_starts(SOURCE)
    config = FimConfig(fim_rate=1.0, line_rate=1.0, line_lines=3)
    counts = []
    for n in range(300):
        ex = fim_example(tok, SOURCE, window_rng(0, "a.py", n), config)
        assert ex.prefix + ex.middle + ex.suffix == SOURCE
        i, j = len(ex.prefix), len(ex.prefix + ex.middle)
        assert i in starts and j in starts and 1 <= starts.index(j) - starts.index(i) <= 3
        counts.append(starts.index(j) - starts.index(i))
    # Every length from 1 to 3 lines, about equally often (cut short only at the window's end).
    assert all(70 < counts.count(k) < 130 for k in (1, 2, 3)), [counts.count(k) for k in (1, 2, 3)]
    # Without line_lines the same draws give middles of any length (the v3 data).
    free = [fim_example(tok, SOURCE, window_rng(0, "a.py", n), FimConfig(fim_rate=1.0, line_rate=1.0))
            for n in range(300)]
    assert max(e.middle.count("\n") for e in free) > 3
    # A one-line window still gives a middle: that line.
    ex = fim_example(tok, "x = 1\n", window_rng(0, "b.py", 0), config)
    assert (ex.prefix, ex.middle, ex.suffix) == ("", "x = 1\n", "")


def test_short_windows_and_packed_rows(tok):
    sources = [(f"m{k}.py", SOURCE * (k + 1)) for k in range(5)]
    row_length = 257
    plain = list(fim_rows(tok, sources, row_length, FimConfig(seed=3, window_tokens=60)))
    assert all(len(ids) <= 60 + FIM_OVERHEAD for ids, _ in plain)
    assert len(plain) > len(list(fim_rows(tok, sources, row_length, FimConfig(seed=3))))
    counts = FimCounts()
    packed = list(fim_rows(tok, sources, row_length, FimConfig(seed=3, window_tokens=60, pack=True), counts))
    # The same examples, in order, whole, several to a row, and no row over length.
    assert [t for ids, _ in packed for t in ids] == [t for ids, _ in plain for t in ids]
    assert all(len(ids) <= row_length and ids == labels and ids[0] == tok.bos_id for ids, labels in packed)
    starts = [i for ids, _ in packed for i, t in enumerate(ids) if t == tok.bos_id]
    assert len(starts) == len(plain) == counts.psm + counts.spm + counts.plain
    assert len(packed) < len(plain) / 2
    # Greedy: a row is only closed when the next example does not fit in it.
    lengths = [len(ids) for ids, _ in plain]
    k = 0
    for ids, _ in packed[:-1]:
        k += ids.count(tok.bos_id)
        assert len(ids) + lengths[k] > row_length
    with pytest.raises(DataError, match="window_tokens 300 does not fit a row of 257"):
        list(fim_rows(tok, sources, row_length, FimConfig(window_tokens=300)))


@pytest.mark.parametrize("bad, match", [
    (dict(line_rate=1.5), "line_rate must be a number in \\[0, 1\\], got 1.5"),
    (dict(line_rate="half"), "line_rate must be a number in \\[0, 1\\], got 'half'"),
    (dict(window_tokens=4), "window_tokens must be 0 .* or an integer >= 8, got 4"),
    (dict(window_tokens=64.0), "got 64.0"),
    (dict(pack="yes"), "pack must be true or false, got 'yes'"),
    (dict(passes=0), "passes must be an integer >= 1, got 0"),
    (dict(line_rate=0.5, line_lines=-1), "line_lines must be an integer >= 0, got -1"),
    (dict(line_rate=0.5, line_lines=2.0), "line_lines must be an integer >= 0, got 2.0"),
    (dict(line_lines=3), "line_lines 3 needs line_rate > 0"),
])
def test_fim_config_refuses_bad_values(bad, match):
    with pytest.raises(DataError, match=match):
        FimConfig(**bad)


# --- source files ---------------------------------------------------------------------------------------


def git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def make_source_tree(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    (root / "build").mkdir()
    (root / ".gitignore").write_text("build/\n*.log\n")
    (root / "pkg" / ".gitignore").write_text("secret.py\n")
    (root / "pkg" / "main.py").write_text(SOURCE)
    (root / "pkg" / "util.py").write_text("def util():\n    return 42\n")
    (root / "pkg" / "main_copy.py").write_text(SOURCE)   # duplicate of main.py, later in path order
    (root / "pkg" / "secret.py").write_text("KEY = 'ignored by pkg/.gitignore'\n")
    (root / "build" / "out.py").write_text("ignored = True\n")
    (root / "run.log").write_text("ignored log\n")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (root / "latin1.py").write_bytes("s = 'caf\xe9'\n".encode("latin-1"))
    (root / "app.min.js").write_text("var a=1;\n")
    (root / "bundle.js").write_text("var x=" + "1+" * 800 + "1;\n")       # one 1600-character line
    (root / "pb2.py").write_text("# -*- coding: utf-8 -*-\n# Generated by the protocol buffer compiler.  "
                                 "DO NOT EDIT!\nX = 1\n")
    (root / "yarn.lock").write_text("# yarn lockfile v1\n")
    (root / "empty.py").write_text("\n\n")
    (root / "link.py").symlink_to("pkg/util.py")
    (root / "big.py").write_text("x = 1\n" * 300)                          # 1,800 bytes


KEPT = ["pkg/.gitignore", ".gitignore", "big.py", "pkg/main.py", "pkg/util.py"]
SKIPPED = {"duplicate": 1, "binary": 1, "not_utf8": 1, "minified": 2, "generated": 2, "empty": 1,
           "not_regular_file": 1}


@pytest.mark.parametrize("with_git", [True, False])
def test_source_files_filters(tmp_path, with_git):
    root = tmp_path / "repo"
    make_source_tree(root)
    if with_git:
        git(root, "init", "-q")
        git(root, "add", ".gitignore", "pkg/main.py")   # tracked; the rest untracked but not ignored
        (root / "nested").mkdir()
        git(root / "nested", "init", "-q")                # a nested repository is listed as one entry
        (root / "nested" / "n.py").write_text("n = 1\n")
    listed = list_files(root)
    assert not any(p.startswith("build/") or p.endswith((".log", "secret.py")) for p in listed)
    summary = SourceSummary()
    files = list(iter_source_files(root, SourceConfig(held_out_fraction=0.0), summary))
    assert sorted(f.path for f in files) == sorted(KEPT)
    expected = dict(SKIPPED)
    if with_git:
        expected["not_regular_file"] += 1   # nested/
    assert dict(summary.skipped) == expected
    assert summary.listed == len(KEPT) + sum(expected.values()) and summary.train == len(KEPT)
    assert next(f for f in files if f.path == "pkg/main.py").text == SOURCE

    small_summary = SourceSummary()
    small = list(iter_source_files(root, SourceConfig(max_file_bytes=1000, extensions=(".py",)), small_summary))
    assert sorted(f.path for f in small) == ["pkg/main.py", "pkg/util.py"]
    assert small_summary.skipped["too_large"] == 1 and small_summary.skipped["extension"] == 6


def test_duplicate_keeps_the_first_path(tmp_path):
    (tmp_path / "b.py").write_text("same = 1\n")
    (tmp_path / "a.py").write_text("same = 1\n")
    summary = SourceSummary()
    assert [f.path for f in iter_source_files(tmp_path, SourceConfig(held_out_fraction=0.0), summary)] == ["a.py"]
    assert summary.skipped == {"duplicate": 1}


def test_held_out_split_is_by_file_disjoint_and_deterministic():
    paths = [f"src/mod_{i}/file_{j}.py" for i in range(40) for j in range(50)]
    held = [p for p in paths if is_held_out(p, 0.1)]
    assert held == [p for p in paths if is_held_out(p, 0.1)]
    assert abs(len(held) / len(paths) - 0.1) < 0.02
    assert set(held) <= {p for p in paths if is_held_out(p, 0.2)}   # a larger fraction only adds files
    assert not any(is_held_out(p, 0.0) for p in paths)
    with pytest.raises(DataError, match=r"held_out_fraction must be in \[0, 1\), got 1.5"):
        SourceConfig(held_out_fraction=1.5)


def test_fim_mindrecord_round_trip_and_held_out_list(tmp_path, model_dir, tok):
    root = tmp_path / "src"
    root.mkdir()
    for k in range(30):
        (root / f"m{k:02d}.py").write_text(SOURCE.replace("Stack", f"Stack{k}") * (1 + k % 3))
    sources = SourceConfig(held_out_fraction=0.3)
    fim = FimConfig(seed=11)
    out = tmp_path / "data" / "fim.mindrecord"
    summary = tokenize_fim(model_dir, root, out, 127, fim=fim, sources=sources)

    held_root, held = read_held_out_list(tmp_path / "data" / "fim.heldout.json")
    assert held_root == root.resolve() and summary.held_out_list == tmp_path / "data" / "fim.heldout.json"
    train = [f.path for f in iter_source_files(root, sources) if not f.held_out]
    assert 0 < len(held) < 30 and not set(held) & set(train) and sorted(held + train) == [
        f"m{k:02d}.py" for k in range(30)]
    assert summary.sources.train == len(train) and summary.sources.held_out == len(held)

    expected = padded(fim_rows(tok, [(p, (root / p).read_text()) for p in train], 128, fim), 128, tok)
    assert_same_rows(list(read_rows(out)), expected)
    assert summary.rows == len(expected) and summary.counts.files == len(train)
    assert "held out" in summary.report() and "psm" in summary.report()

    # Same inputs, same seed: byte-identical rows and the same held-out list.
    again = tokenize_fim(model_dir, root, tmp_path / "again.mindrecord", 127, fim=fim, sources=sources)
    assert again.rows == summary.rows
    assert_same_rows(list(read_rows(tmp_path / "again.mindrecord")), expected)
    assert read_held_out_list(tmp_path / "again.heldout.json")[1] == held

    # passes=2: the first pass's rows, then a second pass drawn with seed + 1; the held-out list is the same.
    twice = tokenize_fim(model_dir, root, tmp_path / "twice.mindrecord", 127,
                         fim=FimConfig(seed=11, passes=2), sources=sources)
    second = padded(fim_rows(tok, [(p, (root / p).read_text()) for p in train], 128, FimConfig(seed=12)), 128, tok)
    assert_same_rows(list(read_rows(tmp_path / "twice.mindrecord")), expected + second)
    assert read_held_out_list(tmp_path / "twice.heldout.json")[1] == held
    assert f"source files: {len(train)} x 2 passes" in twice.report() and twice.rows == len(expected) + len(second)

    with pytest.raises(DataError, match="already exists"):
        tokenize_fim(model_dir, root, out, 127, fim=fim, sources=sources)
    with pytest.raises(DataError, match="seq_length must be an integer >= 16, got 8"):
        tokenize_fim(model_dir, root, tmp_path / "small.mindrecord", 8)
    with pytest.raises(DataError, match="fim_rate must be a number in"):
        FimConfig(fim_rate=1.5)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.bin").write_bytes(b"\0\1")
    with pytest.raises(DataError, match=r"no usable examples(.|\n)*skipped: 1 \(binary 1\)"):
        tokenize_fim(model_dir, empty, tmp_path / "none.mindrecord", 127)
    assert not (tmp_path / "none.mindrecord").exists()
