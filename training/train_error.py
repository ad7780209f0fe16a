"""The one error type of the training boundary (configs, checkpoints of a run, shards, publishing)."""

from codefill.errors import CodefillError


class TrainError(CodefillError, ValueError):
    """A training run, training checkpoint or merge that cannot proceed as asked; names the values."""
