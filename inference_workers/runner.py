"""What the serving engine drives: one model, many cache slots, token ids in, logits out.

The engine (`engine.py`, on rank 0) decides which sequences prefill and decode at each step; a runner
executes that on the model. `LocalRunner` runs it in this process on a plain `Generator`. The tensor-parallel
runner (`tp.py`) has the same methods: it hands each call to the other ranks, which run the same step on
their shards, and returns rank 0's logits (identical on every rank after the all-reduces).

Cache slots are the unit of memory: slot s holds the keys/values of one sequence, positions 0..len-1. What a
slot holds is the engine's bookkeeping; a runner only writes where it is told. Prefill onto a slot from
`start_pos` > 0 reuses the cached prefix; rolling a slot back is just prefilling from an earlier position,
since entries past a row's position are never attended to.

`reload(model_dir)` replaces the weights in place, between steps (the engine calls it only when no request
is active, and forgets every cached slot afterwards). It loads and checks everything before touching a
single parameter, so a corrupt or mismatched directory raises a ValueError (CheckpointError, WeightError,
TensorParallelError) and the old weights keep serving. `Parameter.set_data` keeps the compiled graphs: they
read the parameters, so neither graph is recompiled.
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

    def reload(self, model_dir: str) -> str:
        """Switch to the weights of `model_dir` (same architecture), or raise ValueError and change nothing.
        Returns a one-line description of what now serves."""

    def close(self) -> None:
        """Release the model (and, for tensor parallelism, tell the other ranks to stop)."""


def check_same_architecture(serving, new, where: str) -> None:
    """Raise CheckpointError unless the LlamaConfig `new` (read from `where`) equals the serving one."""
    from dataclasses import fields

    from codefill.model.checkpoint import CheckpointError

    if new != serving:
        diff = [f"{f.name} {getattr(new, f.name)!r} (serving {getattr(serving, f.name)!r})" for f in fields(serving)
                if getattr(new, f.name) != getattr(serving, f.name)]
        raise CheckpointError(f"{where} has another architecture than the serving model: {', '.join(diff)}")


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

    def reload(self, model_dir: str) -> str:
        from codefill.model.checkpoint import load_model_dir
        from codefill.model.llama import load_weights

        files = load_model_dir(model_dir)  # strict: format, names, shapes, dtype, vocabulary
        check_same_architecture(self.generator.config, files.config, str(model_dir))
        load_weights(self.generator.model, files.weights)  # checks every tensor before setting any
        return f"serving {model_dir} ({files.stored_dtype}, {len(files.weights)} tensors)"

    def close(self) -> None:
        pass
