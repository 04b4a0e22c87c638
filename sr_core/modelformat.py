"""The names of our model-file format, shared by ``sr_core.modelfile`` (our own layouts)
and ``sr_core.foreign`` (spandrel's architectures), which both write and check files of
it; here so that neither of the two imports the other back."""

FORMAT = "sr-cloud"
"""The ``format`` metadata entry of our files."""

FORMAT_VERSION = "1"
"""The ``format_version`` metadata entry of our files."""

PTH_METADATA_KEY = "sr_cloud_metadata"
"""Where a ``.pth`` written by us keeps our metadata (plain strings) beside ``params``."""


class ModelFileError(ValueError):
    """A file that is not a model we can load (names the file and the reason)."""
