"""TensorBoard logging for a run: rank 0 writes ``RUN/tb``.

A ``SummaryWriter`` pointed at ``gs://`` raises nothing but loses data (object stores
have no append, so every flush replaces the object): remote runs write to a local
folder whose event files are uploaded whole every ``sync_seconds``, at checkpoints and
at the end (``sr_core.storage.UploadedFolder``). A resumed run adds new event files
beside the old ones; TensorBoard merges every events file of the folder, and
``tensorboard --logdir gs://bucket/runs/`` shows every run (reading gs:// works).
"""

from __future__ import annotations

import time

from torch.utils.tensorboard import SummaryWriter

from sr_core import storage


class TensorBoardLog:
    """Rank 0's TensorBoard writer for ``RUN/tb``."""

    def __init__(self, run_dir: str, sync_seconds: float = 60.0):
        self.folder = storage.UploadedFolder(storage.join(run_dir, "tb"), prefix="sr-tb-")
        self.writer = SummaryWriter(self.folder.path, flush_secs=30)
        self.sync_seconds = sync_seconds
        self._last_sync = time.monotonic()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image_chw, step: int) -> None:
        self.writer.add_image(tag, image_chw, step, dataformats="CHW")

    def hparams(self, hparams: dict, metrics: dict) -> None:
        self.writer.add_hparams(hparams, metrics, run_name=".")

    def maybe_sync(self) -> None:
        if self.folder.remote and time.monotonic() - self._last_sync >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Flush, and upload every event file to ``RUN/tb`` (whole files: an upload
        replaces the object)."""
        self.writer.flush()
        self._last_sync = time.monotonic()
        self.folder.upload()

    def close(self) -> None:
        self.writer.close()
        self.folder.close()
