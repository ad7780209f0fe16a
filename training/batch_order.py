"""Which rows each optimiser step trains on: a pure function of (seed, step), shared by the MindSpore trainer
(trainer.py) and the PyTorch one (torch_trainer.py), so both see the same rows in the same order and a resumed
run needs nothing but the step number. Imports neither framework."""

from __future__ import annotations

import numpy as np


def global_batch_rows(n_rows: int, step: int, global_batch: int, seed: int) -> np.ndarray:
    """Row indices of optimiser step `step`: epochs are seeded permutations laid end to end."""
    start = step * global_batch
    out = []
    for g in range(start, start + global_batch):
        epoch, i = divmod(g, n_rows)
        out.append(np.random.default_rng([seed, epoch]).permutation(n_rows)[i])
    return np.array(out, np.int64)
