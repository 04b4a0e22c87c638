"""jobs: the training job (data pipeline from storage, train loop, checkpoints, logging)."""
