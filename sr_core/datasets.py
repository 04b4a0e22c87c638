"""Image sets on storage, as evaluation, training and the batch job name them: ``.txt``
lists of images, and LR images paired with their HR images by name."""

from __future__ import annotations

import posixpath
import re

from sr_core import storage


def read_list(url: str) -> list[tuple[str, str]]:
    """(entry as written, URL) for each line of a text file listing images or objects, in
    order, blank lines and ``#`` comments skipped (see ``resolve_entry``)."""
    try:
        text = storage.read_bytes(url).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{url}: a list must be UTF-8 text, one path or URL per line") from None
    entries = []
    for line in text.splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            entries.append((entry, resolve_entry(url, entry)))
    return entries


def resolve_entry(list_url: str, entry: str) -> str:
    """An entry of a list (or manifest) file as a URL: relative entries are relative to
    the list's folder (``..`` resolved); absolute paths and URLs stay as they are."""
    if "://" in entry or entry.startswith("/"):
        return entry
    folder = posixpath.dirname(storage.get_fs(list_url)[1]) or "."
    return storage.protocol_prefix(list_url) + posixpath.normpath(posixpath.join(folder, entry))


def hr_key(rel: str, scale: int | None = None) -> str:
    """The key that pairs an LR image with its HR image: the relative path without its
    extension and, for an LR name, without DIV2K's scale suffix (``X4/0801x4.png`` in the
    LR folder pairs with ``0801.png`` in the HR folder; ``0801.png`` pairs too)."""
    stem = posixpath.splitext(rel)[0]
    if scale is not None:
        stem = re.sub(rf"[xX]{scale}$", "", stem)
    return stem
