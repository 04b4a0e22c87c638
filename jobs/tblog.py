"""TensorBoard logging for a run: events are written to a local folder and copied to
``RUN/tb`` on remote storage.

A ``SummaryWriter`` pointed at ``gs://`` raises nothing but loses data (object stores
have no append, so every flush replaces the object), so remote runs write locally and
upload the event files whole every ``sync_seconds`` and at checkpoints and the end.
``tensorboard --logdir gs://bucket/runs/`` then shows every run; reading gs:// works.
"""

from __future__ import annotations

import shutil
import tempfile
import time

from sr_core import storage


class TensorBoardLog:
    """Rank 0's TensorBoard writer for ``RUN/tb``."""

    def __init__(self, run_dir: str, sync_seconds: float = 60.0):
        from torch.utils.tensorboard import SummaryWriter

        self.remote = None
        if storage.is_local(run_dir):
            self.local = storage.join(run_dir, "tb")
            self._tmp = None
        else:
            self.remote = storage.join(run_dir, "tb")
            self._tmp = tempfile.mkdtemp(prefix="sr-tb-")
            self.local = self._tmp
            # A resumed run appends new event files beside the old ones: fetch nothing,
            # TensorBoard merges every events file of the folder.
        self.writer = SummaryWriter(self.local, flush_secs=30)
        self.sync_seconds = sync_seconds
        self._last_sync = time.monotonic()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image_chw, step: int) -> None:
        self.writer.add_image(tag, image_chw, step, dataformats="CHW")

    def hparams(self, hparams: dict, metrics: dict) -> None:
        self.writer.add_hparams(hparams, metrics, run_name=".")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def maybe_sync(self) -> None:
        if self.remote and time.monotonic() - self._last_sync >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Flush, and upload every local event file to ``RUN/tb`` (whole files: an upload
        replaces the object)."""
        self.writer.flush()
        self._last_sync = time.monotonic()
        if self.remote:
            from jobs.checkpoint import upload_folder

            upload_folder(self.local, self.remote)

    def close(self) -> None:
        self.sync()
        self.writer.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
