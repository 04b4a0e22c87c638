"""`sr upscale` and `sr prepare` agree on what they do with leftovers of killed runs,
bad images, links out of the input, hidden files and output folders that cannot take
files: the same rules, one line per file, exit codes that say something was wrong."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from events import HANG_TIMEOUT, wait_for
from jobs.prepare import PrepareSettings, prepare
from sr_core import build_generator, save_generator, storage
from sr_cli.main import main as sr_main

pytestmark = pytest.mark.faults_full

SR = os.path.join(os.path.dirname(sys.executable), "sr")


def photos(folder, n=2, size=40):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def leftovers(folder):
    """Temporaries as our writers name them: one of a killed writer, one of a live run
    (this test's process), one of an unknown writer written just now."""
    host = storage._HOST
    stale = folder / f".tmp-{host}-{dead_pid()}-abcd1234-p0_sr.png"
    live = folder / f".tmp-{host}-{os.getpid()}-efgh5678-p1_sr.png"
    foreign = folder / ".tmp-zzzzzzzz-p1_sr.png"
    for path in (stale, live, foreign):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half an image")
    return stale, live, foreign


# ---- defect 6: leftovers of killed writers ------------------------------------------


def test_upscale_removes_killed_writers_temporaries_but_not_a_live_runs(tmp_path, model_file, capsys):
    src = photos(tmp_path / "in")
    out = tmp_path / "out"
    stale, live, foreign = leftovers(out / "deep" / "er")
    assert sr_main(["upscale", str(src), "-o", str(out), "-m", model_file]) == 0
    assert not stale.exists()
    assert live.exists() and foreign.exists()  # a live writer's, and one that may still be written
    assert sorted(p.name for p in out.glob("*.png")) == ["p0_sr.png", "p1_sr.png"]


def test_prepare_removes_only_temporaries_of_killed_runs(tmp_path):
    src = photos(tmp_path / "src")
    dst = tmp_path / "dst"
    stale, live, foreign = leftovers(dst / "shards")
    prepare(str(src), str(dst), PrepareSettings(size=32, step=32), progress=False)
    assert not stale.exists() and live.exists() and foreign.exists()


def test_a_real_write_leaves_a_temporary_only_while_its_writer_lives(tmp_path):
    target = tmp_path / "x.bin"
    code = ("import os, sys; from sr_core import storage\n"
            "os.replace = lambda a, b: os.kill(os.getpid(), 9)\n"  # killed between write and rename
            f"storage.write_bytes({str(target)!r}, b'data')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == -9
    tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert len(tmps) == 1 and not target.exists()
    assert storage.remove_stale_temporaries(str(tmp_path)) == 1
    assert list(tmp_path.iterdir()) == []


# ---- defect 7: the same rules in prepare as in upscale ------------------------------


def test_prepare_exits_1_on_bad_images_and_names_each_once(tmp_path, capsys):
    src = photos(tmp_path / "src")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    capsys.readouterr()
    assert sr_main(["prepare", str(src), str(tmp_path / "dst"), "--size", "32", "--step", "32", "-q"]) == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "broken.png" in ln)
    assert line.count("broken.png") == 1, line
    assert "truncated or corrupt PNG" in line
    # a rerun of the finished set says so again
    assert sr_main(["prepare", str(src), str(tmp_path / "dst"), "--size", "32", "--step", "32", "-q"]) == 1


def test_prepare_refuses_symlinks_out_of_src_like_upscale(tmp_path, capsys):
    secret = photos(tmp_path / "elsewhere", 1)
    src = photos(tmp_path / "src", 1)
    (src / "link.png").symlink_to(secret / "p0.png")
    (src / "inside.png").symlink_to(src / "p0.png")  # a link inside SRC is an ordinary image
    index = prepare(str(src), str(tmp_path / "dst"), PrepareSettings(size=32, step=32), progress=False)
    assert index["sources"] == ["inside.png", "p0.png"]
    [bad] = index["bad"]
    assert bad["source"] == "link.png" and "outside" in bad["reason"] and "not followed" in bad["reason"]


def test_hidden_images_are_reported_not_silently_skipped(tmp_path, model_file, capsys):
    src = photos(tmp_path / "src")
    shutil.copy(src / "p0.png", src / "..double-dot.png")
    shutil.copy(src / "p0.png", src / ".hidden.png")
    capsys.readouterr()
    assert sr_main(["prepare", str(src), str(tmp_path / "dst"), "--size", "32", "--step", "32", "-q"]) == 0
    err = capsys.readouterr().err
    for name in ("..double-dot.png", ".hidden.png"):
        assert f"skipped {name}: hidden file" in err
    assert sr_main(["upscale", str(src), "-o", str(tmp_path / "out"), "-m", model_file]) == 0
    captured = capsys.readouterr()
    assert "2 hidden file(s) not read" in captured.out
    for name in ("..double-dot.png", ".hidden.png"):
        assert f"SKIPPED {src / name}: hidden file" in captured.err
    # named on the command line, a hidden file is an ordinary input
    assert sr_main(["upscale", str(src / ".hidden.png"), "-o", str(tmp_path / "out2"), "-m", model_file]) == 0
    assert (tmp_path / "out2" / ".hidden_sr.png").exists()


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs user+mount namespaces (unshare -rm) to make a read-only "
                                              "and a full filesystem")
@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_unwritable_output_is_refused_before_any_work(tmp_path, model_file, kind):
    src = photos(tmp_path / "src", 2)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if kind == "read-only":
        setup = f"mount -t tmpfs -o size=4m tmpfs {mnt} && mount -o remount,ro {mnt}"
    else:  # 256 KiB, all but a few blocks taken
        setup = (f"mount -t tmpfs -o size=256k tmpfs {mnt} && "
                 f"(dd if=/dev/zero of={mnt}/filler bs=4k count=60 2>/dev/null)")
    # The model named does not exist: a run that looked at OUT only after loading the
    # model (and upscaling) would complain about the model instead.
    script = (f"{setup} && {SR} upscale {src} -o {mnt}/out -m {tmp_path}/no-model.safetensors; "
              f"echo EXIT=$?; {SR} prepare {src} {mnt}/dst --size 32 --step 32 -q; echo EXIT=$?")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          timeout=HANG_TIMEOUT)
    assert proc.stdout.count("EXIT=2") == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in proc.stderr, proc.stderr
    why = "Read-only file system" if kind == "read-only" else "No space left on device"
    assert f"{mnt}/out: cannot write there ({why}" in lines[0], lines[0]
    assert f"{mnt}/dst: cannot write there ({why}" in lines[1], lines[1]


# ---- load: a 16K x 16K input at x4 ---------------------------------------------------


def test_16k_input_at_x4_is_refused_up_front_with_the_memory_it_would_need(tmp_path, capsys):
    import resource

    from hostile_corpus import png_bytes
    from sr_core.memory import memory_needed

    torch.manual_seed(0)
    model = str(tmp_path / "x4.safetensors")
    save_generator(build_generator("rrdbnet", "tiny", scale=4), model)
    # A real 16384 x 16384 PNG header (the refusal must come before any pixel is decoded)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "huge.png").write_bytes(png_bytes(16384, 16384, 8, 2))
    Image.new("RGB", (16, 16)).save(tmp_path / "in" / "small.png")
    # The output alone is 65536^2 x 3 bytes = 12 GiB; input + 3x output + 256 MiB = 37 GiB.
    need = memory_needed(16384, 16384, 3, 1, 4, None)
    assert need == 16384**2 * 3 * 49 + 2**28
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    capsys.readouterr()
    code = sr_main(["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", model, "--tile", "256",
                    "--max-pixels", "300000000", "--memory-limit", "16"])
    err = capsys.readouterr().err
    assert code == 1
    line = next(ln for ln in err.splitlines() if "huge.png" in ln)
    assert "16384x16384 at x4 would need about 37.0 GiB" in line and "16.0 GiB" in line, line
    assert (tmp_path / "out" / "small_sr.png").exists()  # the others are still done
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300_000  # KiB: nothing decoded


# ---- issue 17 #9: --outscale in the memory estimate -------------------------------------


def test_an_absurd_outscale_is_a_usage_error(tmp_path, model_file, capsys):
    src = photos(tmp_path / "in", 1, size=64)
    capsys.readouterr()
    code = sr_main(["upscale", str(src), "-o", str(tmp_path / "out"), "-m", model_file, "--outscale", "1000"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.rstrip().splitlines() == [
        "sr upscale: error: --outscale must be a number above 0 and at most 64, got 1000.0"], err
    assert not (tmp_path / "out").exists()


def test_outscale_is_counted_before_decoding_where_the_old_estimate_let_it_through(tmp_path, capsys):
    import resource

    from hostile_corpus import png_bytes
    from sr_core.memory import WORKING_MEMORY, memory_needed

    torch.manual_seed(0)
    model = str(tmp_path / "x2.safetensors")
    save_generator(build_generator("rrdbnet", "tiny", scale=2), model)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "big.png").write_bytes(png_bytes(4096, 4096, 8, 2))  # a header: nothing to decode
    # x2 network output 8192^2 (192 MiB), resized to x8: 32768^2 x 3 = 3 GiB.
    side, network, final = 4096, 4096**2 * 4 * 3, 4096**2 * 64 * 3
    old = side * side * 3 + 3 * network + int(1.55 * final) + WORKING_MEMORY  # the estimate before the fix
    new = memory_needed(side, side, 3, 1, 2, 8.0)
    limit_gib = 7.0
    assert old < limit_gib * 2**30 < new  # the case the old estimate let through
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    capsys.readouterr()
    code = sr_main(["upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m", model, "--outscale", "8",
                    "--memory-limit", str(limit_gib)])
    err = capsys.readouterr().err
    assert code == 1, err
    line = next(ln for ln in err.splitlines() if "big.png" in ln)
    assert f"4096x4096 at x8.0 would need about {new / 2**30:.1f} GiB" in line and "7.0 GiB" in line, line
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300_000  # KiB: nothing decoded


@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_a_memory_limit_that_is_not_positive_is_a_usage_error(tmp_path, model_file, capsys, value):
    src = photos(tmp_path / "in", 1)
    capsys.readouterr()
    code = sr_main(["upscale", str(src), "-o", str(tmp_path / "out"), "-m", model_file, "--memory-limit", value])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.rstrip().splitlines() == [
        f"sr upscale: error: --memory-limit must be a positive number of GiB, got {float(value)}"], err
    assert not (tmp_path / "out").exists()


# ---- issue 17, minor: SIGTERM during start-up ---------------------------------------------


def test_sigterm_during_start_up_is_one_line_and_exit_130(tmp_path, model_file):
    src = photos(tmp_path / "in", 2)
    proc = subprocess.Popen([SR, "upscale", str(src), "-o", str(tmp_path / "out"), "-m", model_file],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def importing_torch() -> bool:  # start-up: torch's library is being loaded or was
        try:
            with open(f"/proc/{proc.pid}/maps") as f:
                return "libtorch" in f.read()
        except OSError:
            return False

    wait_for(importing_torch, "torch loaded", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=HANG_TIMEOUT)
    assert proc.returncode == 130, err[-3000:]
    assert err.rstrip().splitlines()[-1] in ("sr upscale: interrupted by SIGTERM",
                                            "sr upscale: interrupted with 2 image(s) not done; run the same "
                                            "command again to finish them (outputs that exist are skipped)"), err
    assert "Traceback" not in err
