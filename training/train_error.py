"""The one error type of the training boundary (configs, checkpoints of a run, shards, publishing)."""


class TrainError(ValueError):
    """A training run, training checkpoint or merge that cannot proceed as asked; names the values."""
