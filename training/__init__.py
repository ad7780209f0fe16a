"""Training: preprocessing, finetuning, checkpoint shards, refreshing served weights (a later issue)."""
