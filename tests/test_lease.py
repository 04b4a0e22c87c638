"""sr_core.lease: one job at a time per folder (a run directory, a batch OUTPUT), on a
local disk and on gs:// (the real GCS API server of conftest.py). A lease names its
holder (host, pid, command) and carries a heartbeat; it is taken over only when stale
(the heartbeat is older than the holder's own limit, or the holder's process is gone
on this host), and released at exit."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from sr_core import storage
from sr_core.lease import LEASE_NAME, Lease, LeaseHeld


@pytest.fixture(params=["local", "gs"])
def folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("gcs_emulator").make_bucket("lease") + "/runs/x"


def _write_holder(folder: str, **fields) -> None:
    holder = {"host": "elsewhere", "pid": 4242, "command": "sr train", "token": "theirs",
              "heartbeat": time.time(), "stale_seconds": 120.0, "started": time.time()}
    holder.update(fields)
    storage.write_bytes(storage.join(folder, LEASE_NAME), json.dumps(holder).encode())


def test_a_held_lease_is_refused_naming_the_holder_and_released_at_exit(folder):
    with Lease(folder, "sr train", heartbeat_seconds=30) as first:
        holder = Lease.holder(folder)
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
        assert holder["token"] == first.token and holder["command"] == "sr train"
        with pytest.raises(LeaseHeld) as info:
            Lease(folder, "sr batch").acquire()
        text = str(info.value)
        assert "\n" not in text and folder in text and f"pid {os.getpid()}" in text, text
        assert socket.gethostname() in text and "sr train" in text and "stale" in text, text
        assert isinstance(info.value, ValueError)  # exit 2 under sr_core.errors
    assert Lease.holder(folder) is None
    with Lease(folder, "sr batch"):  # free again
        assert Lease.holder(folder)["command"] == "sr batch"


def test_only_a_stale_lease_is_taken_over(folder):
    _write_holder(folder, heartbeat=time.time())  # another host, beating: refused
    with pytest.raises(LeaseHeld, match="elsewhere"):
        Lease(folder, "sr train").acquire()
    assert Lease.holder(folder)["token"] == "theirs"
    _write_holder(folder, heartbeat=time.time() - 121)  # past its own 120 s limit
    with Lease(folder, "sr train") as mine:
        assert Lease.holder(folder)["token"] == mine.token
        assert "elsewhere" in mine.took_over_from
    assert Lease.holder(folder) is None


def test_a_holder_on_another_host_is_waited_for_until_it_beats_or_goes_stale(folder):
    """For a replacement VM starting while its vanished predecessor's lease still looks
    fresh: wait_for_stale waits until the holder beats (a live job: refused) or its
    heartbeat passes its limit (taken over)."""
    _write_holder(folder, heartbeat=time.time() - 0.5, heartbeat_seconds=0.1, stale_seconds=1.0)
    with Lease(folder, "sr train", wait_for_stale=True) as mine:  # gone quiet: taken over
        assert Lease.holder(folder)["token"] == mine.token and "elsewhere" in mine.took_over_from

    _write_holder(folder, heartbeat=time.time(), heartbeat_seconds=0.1, stale_seconds=60.0)
    waiter = Lease(folder, "sr train", wait_for_stale=True)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_try(waiter)))
    thread.start()
    assert waiter.waiting.wait(60)
    _write_holder(folder, heartbeat=time.time(), heartbeat_seconds=0.1, stale_seconds=60.0)  # it beats
    thread.join(60)
    assert isinstance(outcome[0], LeaseHeld) and "elsewhere" in str(outcome[0])
    assert Lease.holder(folder)["token"] == "theirs"


def _try(lease: Lease):
    try:
        return lease.acquire()
    except LeaseHeld as exc:
        return exc


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    folder = str(tmp_path / "run")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _write_holder(folder, host=socket.gethostname(), pid=gone.pid, heartbeat=time.time())
    with Lease(folder, "sr train") as mine:
        assert Lease.holder(folder)["token"] == mine.token


def test_the_heartbeat_renews_the_lease_and_a_lost_lease_is_left_alone(folder):
    lease = Lease(folder, "sr train", heartbeat_seconds=0.05, stale_seconds=60).acquire()
    try:
        first = Lease.holder(folder)["heartbeat"]
        assert lease.beat_event.wait(60)  # the heartbeat thread wrote at least once more
        deadline = time.monotonic() + 60
        while Lease.holder(folder)["heartbeat"] == first:
            assert time.monotonic() < deadline
            lease.beat_event.clear()
            lease.beat_event.wait(1)
        # someone took it over (we looked stale to them): we notice and do not touch theirs
        _write_holder(folder, token="intruder", heartbeat=time.time())
        lease.beat_event.clear()
        assert lease.beat_event.wait(60)
        deadline = time.monotonic() + 60
        while not lease.lost:
            assert time.monotonic() < deadline
            lease.beat_event.clear()
            lease.beat_event.wait(1)
    finally:
        lease.release()
    assert not lease.thread_alive()
    assert Lease.holder(folder)["token"] == "intruder"


def _race(folder: str, start, results) -> None:
    start.wait()
    try:
        lease = Lease(folder, "sr train").acquire()
        results.put(("won", os.getpid()))
        start.wait()  # hold it until every contender has tried
        lease.release()
    except LeaseHeld:
        results.put(("refused", os.getpid()))
        start.wait()


def test_of_processes_starting_at_once_exactly_one_gets_the_lease(tmp_path):
    folder = str(tmp_path / "run")
    _write_holder(folder, heartbeat=time.time() - 1000)  # a stale one to take over, too
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_race, args=(folder, start, results)) for _ in range(4)]
    for w in workers:
        w.start()
    outcomes = sorted(results.get(timeout=120)[0] for _ in workers)
    for w in workers:
        w.join(timeout=120)
    assert outcomes == ["refused", "refused", "refused", "won"]
    assert Lease.holder(folder) is None


@pytest.mark.parametrize("claims", [
    {"heartbeat": time.time() + 1_000_000},  # a heartbeat 11.6 days in the future
    {"stale_seconds": 100_000.0},  # a stale limit of 28 hours
    {"heartbeat_seconds": float("nan"), "stale_seconds": float("inf")},  # damaged figures
])
def test_a_lease_file_does_not_choose_how_long_we_wait(tmp_path, claims):
    """Issue 27 #7: our own bound, then one line naming the holder and how to take over."""
    folder = str(tmp_path / "run")
    _write_holder(folder, **{"heartbeat_seconds": 0.1, **claims})
    waiter = Lease(folder, "sr train", wait_for_stale=True, max_wait_seconds=0.5)
    with pytest.raises(LeaseHeld) as info:
        waiter.acquire()
    text = str(info.value)
    assert "\n" not in text and "elsewhere" in text and "pid 4242" in text, text
    assert f"delete {storage.join(folder, LEASE_NAME)}" in text and "within 0 s" not in text, text
    assert Lease.holder(folder)["token"] == "theirs"  # nothing taken over


def test_a_signal_ends_the_wait_for_a_lease_at_once(tmp_path):
    """SIGTERM while `sr train` waits for a holder on another host: one line, exit 130,
    long before the wait's bound (after which the exit would be 2, a refusal)."""
    import signal

    from events import HANG_TIMEOUT, wait_for

    run = tmp_path / "run"
    _write_holder(str(run), stale_seconds=100_000.0)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "index.json").write_text("{}")
    cmd = [sys.executable, "-m", "sr_cli", "train", "--preset", "tiny", f"data.train_shards={shards}",
           f"train.run_dir={run}"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines = []

    def waiting():
        lines.append(proc.stderr.readline())
        return "waiting up to" in lines[-1]

    wait_for(waiting, "the lease wait's log line", proc=proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.stderr.read()
    assert proc.wait(HANG_TIMEOUT) == 130, "".join(lines) + err
    assert err.strip().splitlines() == ["sr train: interrupted by SIGTERM"], err
    assert Lease.holder(str(run))["token"] == "theirs"
