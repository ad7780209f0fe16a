"""Instruction examples: a conversation becomes token ids with the loss only on the responses.

    ids    = [BOS] + encode(human_1) + encode(gpt_1) + [EOS] + encode(human_2) + encode(gpt_2) + [EOS] ...
    labels = [-100] + [-100] * len(human_1) + encode(gpt_1) + [EOS] + ...

A code-alpaca conversation is one human turn (the Alpaca prompt, ending at "### Response:") and one gpt
turn. Prompt and response are encoded separately, so the prompt/response boundary is a token boundary and
the training sequence starts its response exactly where a served prompt stops: at inference the prompt is
encoded alone and the model continues it. (Each encode adds SentencePiece's leading space, so the text the
model sees is "### Response: <output>".)

Over-long conversations (more than seq_length + 1 tokens) are dropped and counted by default. With
truncate=True they are cut at the end to seq_length + 1 tokens instead (the EOS is then lost, so the model
sees a response that does not end); one whose cut leaves no response token is still dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from codefill.model.tokenizer import Tokenizer

from .data_error import DataError
from .mindrecord_io import IGNORE_INDEX

ROLES = ("human", "gpt")
_SHOWN = 10


@dataclass
class InstructCounts:
    conversations: int = 0
    examples: int = 0                                    # rows written
    truncated: int = 0                                   # written, but cut at the end (truncate=True)
    dropped_too_long: list[str] = field(default_factory=list)  # ids of conversations not written

    def report(self) -> str:
        lines = [f"  conversations: {self.conversations}, examples written: {self.examples}"]
        if self.truncated:
            lines.append(f"  truncated to fit: {self.truncated}")
        if self.dropped_too_long:
            ids = ", ".join(self.dropped_too_long[:_SHOWN])
            more = f" and {len(self.dropped_too_long) - _SHOWN} more" if len(self.dropped_too_long) > _SHOWN else ""
            lines.append(f"  dropped (too long): {len(self.dropped_too_long)}: ids {ids}{more}")
        return "\n".join(lines)


def conversation_pairs(record: object, index: int) -> list[tuple[str, str]]:
    """(human, gpt) turn pairs of one record of a conversations JSON; errors name the record."""
    where = f"conversation {index}"
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise DataError(f"{where}: expected an object with a 'conversations' list, got {str(record)[:80]!r}")
    where = f"conversation {index} (id {record.get('id')!r})"
    turns = record["conversations"]
    if not turns or len(turns) % 2:
        raise DataError(f"{where}: expected human/gpt turn pairs, got {len(turns)} turns")
    values = []
    for t, turn in enumerate(turns):
        expected = ROLES[t % 2]
        if not isinstance(turn, dict) or turn.get("from") != expected:
            got = turn.get("from") if isinstance(turn, dict) else type(turn).__name__
            raise DataError(f"{where}: turn {t} should be from {expected!r}, got {got!r}")
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: turn {t} has no string 'value' (got {type(turn.get('value')).__name__})")
        values.append(turn["value"])
    return list(zip(values[0::2], values[1::2]))


def instruct_example(tok: Tokenizer, pairs: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation, untruncated; labels are IGNORE_INDEX over BOS and human turns."""
    ids, labels = [tok.bos_id], [IGNORE_INDEX]
    for human, gpt in pairs:
        prompt = tok.encode(human)
        response = tok.encode(gpt) + [tok.eos_id]
        ids += prompt + response
        labels += [IGNORE_INDEX] * len(prompt) + response
    return ids, labels


def instruct_rows(tok: Tokenizer, records: list, row_length: int, *, truncate: bool = False,
                  counts: InstructCounts | None = None):
    """Yield (ids, labels) lists of at most `row_length` tokens, unpadded; tallies go into `counts`."""
    counts = counts if counts is not None else InstructCounts()
    if not isinstance(records, list):
        raise DataError(f"expected a JSON list of conversations, got {type(records).__name__}")
    for index, record in enumerate(records):
        pairs = conversation_pairs(record, index)
        counts.conversations += 1
        ids, labels = instruct_example(tok, pairs)
        if len(ids) > row_length:
            if truncate and any(x != IGNORE_INDEX for x in labels[:row_length]):
                ids, labels = ids[:row_length], labels[:row_length]
                counts.truncated += 1
            else:
                counts.dropped_too_long.append(str(record.get("id", index)))
                continue
        counts.examples += 1
        yield ids, labels
