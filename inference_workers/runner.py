"""What the serving engine drives: one model, many cache slots, token ids in, logits out.

The engine (`engine.py`, on rank 0) decides which sequences prefill and decode at each step; a runner
executes that on the model. `LocalRunner` runs it in this process on a plain `Generator`. The tensor-parallel
runner (`tp.py`) has the same methods: it hands each call to the other ranks, which run the same step on
their shards, and returns rank 0's logits (identical on every rank after the all-reduces).

Cache slots are the unit of memory: slot s holds the keys/values of one sequence, positions 0..len-1. What a
slot holds is the engine's bookkeeping; a runner only writes where it is told. Prefill onto a slot from
`start_pos` > 0 reuses the cached prefix; rolling a slot back is just prefilling from an earlier position,
since entries past a row's position are never attended to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class ModelRunner(Protocol):
    max_batch: int  # cache slots; decode_step takes one row per slot
    max_seq_len: int  # positions per slot
    vocab_size: int
    idle_position: int  # the position to pass for a slot that has no sequence in a decode step

    def prefill(self, ids: Sequence[int], slot: int, start_pos: int) -> np.ndarray:
        """Write ids at positions start_pos.. of `slot`; logits [vocab] of the last one."""

    def decode_step(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """tokens[i] at positions[i] in slot i for every slot -> logits [max_batch, vocab]."""

    def close(self) -> None:
        """Release the model (and, for tensor parallelism, tell the other ranks to stop)."""


class LocalRunner:
    """A ModelRunner over one in-process Generator (TP=1)."""

    def __init__(self, generator):
        self.generator = generator
        self.max_batch = generator.max_batch
        self.max_seq_len = generator.max_seq_len
        self.vocab_size = generator.config.vocab_size
        self.idle_position = generator.idle_position

    def prefill(self, ids: Sequence[int], slot: int, start_pos: int) -> np.ndarray:
        return self.generator.prefill(ids, slot=slot, start_pos=start_pos)

    def decode_step(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        return self.generator.decode_step(tokens, positions)

    def close(self) -> None:
        pass
