"""jobs: the training job — ``sr prepare`` (prepare.py), the data pipeline from storage
(data.py), the typed config (config.py), and ``sr train``: entry points and the train
loop (train.py), the training state's set-up and checkpoints (state.py, checkpoint.py),
DDP vs DeepSpeed (engines.py), validation, logging (progress.py, tblog.py), SIGTERM
(preemption.py) and model export (export.py)."""
