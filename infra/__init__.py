"""infra: Google Cloud submission of the training and batch jobs."""
