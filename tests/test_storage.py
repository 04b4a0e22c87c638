"""sr_core.storage: atomic writes, listing, and keys that cannot escape their prefix,
on local folders and on a real GCS API server."""

from __future__ import annotations

import os

import pytest

from sr_core import storage


def test_atomic_local_write_gets_ordinary_permissions(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    storage.write_bytes(str(target), b"abc")
    mask = os.umask(0)
    os.umask(mask)
    assert target.read_bytes() == b"abc"
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]  # no temp file left


def test_safe_key_refuses_escapes_and_keeps_names_as_they_are():
    assert storage.safe_key("a/b c/ü.png") == "a/b c/ü.png"
    assert storage.safe_key("back\\slash.png") == "back\\slash.png"
    for hostile in ("../x.png", "a/../../x", "/etc/passwd", "..\\x.png", "a//b", "./a", ""):
        with pytest.raises(ValueError, match="unsafe"):
            storage.safe_key(hostile)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_write_list_relative_keys_round_trip(tmp_path, where, request):
    if where == "gcs":
        root = request.getfixturevalue("gcs_emulator").make_bucket("storage") + "/data"
    else:
        root = str(tmp_path / "data")
    names = ["a.png", "sub/b.PNG", "sub/deeper/c d ü.jpg", "notes.txt", ".hidden.png"]
    for i, name in enumerate(names):
        storage.write_bytes(storage.join(root, name), bytes([i]) * (i + 1))

    listed = storage.list_files(root, suffixes={".png", ".jpg"})
    # Extension filter is case-insensitive; hidden files are left out; full URLs come back.
    assert [storage.relative_key(root, u) for u in listed] == ["a.png", "sub/b.PNG", "sub/deeper/c d ü.jpg"]
    assert all(u.startswith("gs://") for u in listed) == (where == "gcs")
    assert storage.read_bytes(listed[2]) == bytes([2]) * 3
    assert storage.exists(storage.join(root, "notes.txt"))
    assert storage.size(storage.join(root, "notes.txt")) == 4
    with pytest.raises(FileNotFoundError, match="missing"):
        storage.list_files(storage.join(root, "missing"))


def test_our_bounded_retries_replace_gcsfs_own_requests(gcs_emulator):
    # storage replaces gcsfs's per-request retry decorator on each instance; it relies on
    # private gcsfs methods, so pyproject pins the gcsfs releases this was checked
    # against, and a release that renames them fails here rather than silently going
    # back to gcsfs's minute-long silent retries.
    bucket = gcs_emulator.make_bucket()
    fs, _ = storage.get_fs(bucket + "/x")
    cls = type(fs)
    for name in ("_request", "_get_file_request", "_get_file_concurrent"):
        assert hasattr(getattr(cls, name), "__wrapped__"), f"gcsfs.{cls.__name__}.{name} has no retry decorator"
        assert name in vars(fs), f"{name} is still gcsfs's own on this instance"
    storage.write_bytes(bucket + "/x", b"abc")
    assert storage.read_bytes(bucket + "/x") == b"abc"
