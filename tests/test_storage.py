"""sr_core.storage: atomic writes, listing, and keys that cannot escape their prefix,
on local folders and on a real GCS API server."""

from __future__ import annotations

import logging
import os

import pytest

from faultproxy import FaultProxy

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


def test_our_bounded_retries_wrap_gcsfs_requests_without_replacing_its_methods(gcs_emulator, monkeypatch, caplog):
    # Our retries are an aiohttp middleware that gcsfs is configured with (its public
    # session_kwargs): no gcsfs method is replaced on the instance, and a request that
    # keeps failing is tried exactly SR_STORAGE_ATTEMPTS times -- not that many times
    # gcsfs's own 6 -- with one log line per retry and one StorageError naming the object.
    import gcsfs

    bucket = gcs_emulator.make_bucket()
    storage.write_bytes(bucket + "/x", b"abc")
    gcsfs.GCSFileSystem.clear_instance_cache()
    monkeypatch.setenv("SR_STORAGE_ATTEMPTS", "3")
    monkeypatch.setenv("SR_STORAGE_BACKOFF", "0.01")
    try:
        with FaultProxy(gcs_emulator.url) as proxy:
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
            fs, _ = storage.get_fs(bucket + "/x")
            assert not {"_request", "_get_file_request", "_get_file_concurrent"} & set(vars(fs))
            assert storage.read_bytes(bucket + "/x") == b"abc"
            proxy.outage = True
            caplog.clear()
            with caplog.at_level(logging.DEBUG, logger="gcsfs"), pytest.raises(storage.StorageError) as failed:
                storage.write_bytes(bucket + "/y", b"def")  # one request: an upload (its object
                # is named in the body, so the request line shows the bucket; the error says which)
            assert proxy.counts["outage"] == 3, proxy.counts
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()
    message = str(failed.value)
    assert message.startswith(f"writing {bucket}/y: POST {bucket}/") and "\n" not in message, message
    assert "still failing after 3 attempts (HTTP 503" in message, message
    retries = [r.getMessage() for r in caplog.records if r.name == "sr_core.storage"]
    assert len(retries) == 2 and all(f"POST {bucket}/ failed (HTTP 503" in m for m in retries), retries
    # gcsfs's traceback for an error it does not retry is not shown for ours
    assert not [r for r in caplog.records if r.name == "gcsfs" and r.levelno >= logging.ERROR]


def test_a_request_that_gave_up_is_a_storage_error_across_processes_and_exits_75():
    # Worker processes (sr prepare -j N) send their exceptions back pickled: the error a
    # request ends with must arrive as the same StorageError, message and exit code intact.
    import pickle

    from sr_core.errors import EXIT_TEMPFAIL, exit_code, short_reason
    from sr_core.gcs import StorageGaveUp

    gave_up = StorageGaveUp("GET gs://b/k: still failing after 3 attempts (HTTP 503)")
    back = pickle.loads(pickle.dumps(gave_up))
    assert isinstance(back, storage.StorageError) and str(back) == str(gave_up)
    assert exit_code(back) == EXIT_TEMPFAIL
    assert short_reason(OSError("line one\n   line\ttwo"), 12) == "line one lin"
    assert short_reason(ValueError("x " * 300), None) == ("x " * 300).strip()
