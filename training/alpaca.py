"""Code-alpaca instruction records -> the conversations JSON that instruct tokenization reads.

This is the conversion step of the MindFormers Code Llama finetuning guide. The input is a JSON list of
`{"instruction", "input", "output"}` records (sahil280114/codealpaca); the output is a JSON list of

    {"id": "<index of the record in the input>",
     "conversations": [{"from": "human", "value": <prompt>}, {"from": "gpt", "value": <output>}]}

where <prompt> is the Stanford Alpaca template, with the "### Input:" section only when the record's input is
not blank. The prompt ends at "### Response:"; the response is tokenized as its own text later
(`instruct_examples.py`), exactly as a served prompt is, so nothing is appended to the template here.

A record that is not an object or lacks a string "instruction", "input" or "output" is malformed: an error
that names every such record's index, since it means a wrong or damaged file (skip_invalid=True skips them
instead). A well-formed record whose instruction or output is blank has nothing to learn from (code_alpaca_2k
has two with an empty output); it is skipped. Every skipped record is counted and named in the summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .data_error import DataError
from .json_files import read_json, write_json_atomic

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
FIELDS = ("instruction", "input", "output")
# How many bad records an error message lists before it says "and N more".
_SHOWN = 10


@dataclass
class AlpacaSummary:
    records: int = 0                                  # records in the input
    written: int = 0                                  # conversations in the output
    skipped: dict[int, str] = field(default_factory=dict)  # record index -> why it was not written

    def report(self) -> str:
        lines = [f"alpaca: {self.records} records read, {self.written} conversations written"]
        if self.skipped:
            shown = ", ".join(f"#{i} ({why})" for i, why in list(self.skipped.items())[:_SHOWN])
            more = f" and {len(self.skipped) - _SHOWN} more" if len(self.skipped) > _SHOWN else ""
            lines.append(f"  skipped {len(self.skipped)} records: {shown}{more}")
        return "\n".join(lines)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt of one record; a blank input selects the template without "### Input:"."""
    if input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def malformed(record: object) -> str | None:
    """Why a record is not an {instruction, input, output} object of strings, or None."""
    if not isinstance(record, dict):
        return f"not an object but {type(record).__name__}"
    for name in FIELDS:
        if name not in record:
            return f"missing {name!r}"
        if not isinstance(record[name], str):
            return f"{name!r} is {type(record[name]).__name__}, not a string"
    return None


def blank(record: dict) -> str | None:
    """Why a well-formed record carries nothing to train on, or None."""
    for name in ("instruction", "output"):
        if not record[name].strip():
            return f"{name!r} is blank"
    return None


def alpaca_to_conversations(records: list, *, skip_invalid: bool = False,
                            where: str = "input") -> tuple[list[dict], AlpacaSummary]:
    """Convert records (already parsed JSON) to conversations; `where` names the source in errors."""
    if not isinstance(records, list):
        raise DataError(f"{where}: expected a JSON list of {{instruction, input, output}} records, "
                        f"got {type(records).__name__}")
    summary = AlpacaSummary(records=len(records))
    problems = {i: p for i, r in enumerate(records) if (p := malformed(r)) is not None}
    if problems and not skip_invalid:
        shown = "; ".join(f"record {i}: {p}" for i, p in list(problems.items())[:_SHOWN])
        more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
        raise DataError(f"{where}: {len(problems)} of {len(records)} records are malformed: {shown}{more} "
                        f"(pass skip_invalid / --skip-invalid to skip them)")
    conversations = []
    for i, r in enumerate(records):
        if i not in problems and (why := blank(r)) is not None:
            problems[i] = why
        if i in problems:
            continue
        conversations.append({
            "id": str(i),
            "conversations": [
                {"from": "human", "value": alpaca_prompt(r["instruction"], r["input"])},
                {"from": "gpt", "value": r["output"]},
            ],
        })
    summary.skipped = dict(sorted(problems.items()))
    summary.written = len(conversations)
    return conversations, summary


def convert_alpaca_file(input_path: str | Path, output_path: str | Path, *, skip_invalid: bool = False,
                        overwrite: bool = False) -> AlpacaSummary:
    """`codefill data alpaca`: read code-alpaca JSON, write conversations JSON, return the summary."""
    conversations, summary = alpaca_to_conversations(read_json(input_path), skip_invalid=skip_invalid,
                                                     where=str(input_path))
    write_json_atomic(output_path, conversations, overwrite=overwrite)
    return summary
