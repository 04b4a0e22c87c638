"""``python -m jobs.config``: print the config reference (the block of docs/TRAINING.md
that starts at "### `data`:")."""

from jobs.config.reference import reference_markdown

print(reference_markdown())
