"""Starting the training job from ``sr train``: in this process, or on N local processes
through Accelerate's launcher (``--processes N``). Imports nothing heavy at the top, so
that the SIGTERM handler is in place before torch is imported."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys


def train_here(items: list[str], preset: str, resume: str) -> int:
    """Load the config from ``items`` and train in this process; returns the exit code."""
    from jobs import preemption

    # Before torch is imported (seconds): a SIGTERM from now on is answered with a
    # checkpoint and exit 0, start-up included.
    previous_handler = preemption.install()
    try:
        from jobs import train

        return train.run(train.load_job_config(items, preset), resume)
    finally:
        preemption.restore(previous_handler)


def train(items: list[str], preset: str = "default", resume: str = "", processes: int = 1) -> int:
    """``sr train``: the job on ``processes`` local processes (1: in this process)."""
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    if processes == 1:
        return train_here(items, preset, resume)
    return launch_local(items, preset, resume, processes)


def launch_local(items: list[str], preset: str, resume: str, processes: int) -> int:
    """``--processes N``: the same job on N processes of this machine through Accelerate's
    launcher. This process takes the run directory's lease, so a refusal is one line
    before any process starts, then hands it to rank 0: it lives as long as the ranks
    write, even if this process is killed. SIGTERM and SIGINT are passed on to the ranks
    as SIGTERM (each checkpoints and exits) and this process waits for them: one line,
    then exit 0 after SIGTERM (a preemption), 130 after SIGINT."""
    from jobs import checkpoint as ckpt
    from jobs import train

    config = train.load_job_config(items, preset)  # a bad config fails here, before any process starts
    run_dir = config.train.run_dir
    with ckpt.run_lease(run_dir) as lease:
        if not resume:
            ckpt.refuse_to_replace(run_dir)
        os.environ[ckpt.LEASE_HELD_ENV] = run_dir
        if lease is not None:
            lease.hand_over()
            os.environ[ckpt.LEASE_TOKEN_ENV] = lease.token
        try:
            return _launch(items, preset, resume, processes)
        finally:
            os.environ.pop(ckpt.LEASE_HELD_ENV, None)
            os.environ.pop(ckpt.LEASE_TOKEN_ENV, None)


def _launch(items: list[str], preset: str, resume: str, processes: int) -> int:
    import torch

    from sr_core.net import free_port

    port = free_port()
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "-m", "jobs.train", "--preset", preset, *items]
    if resume:
        command += ["--resume", resume]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # gloo; without it Accelerate looks for GPUs
    # A session of its own: Ctrl-C at a terminal (SIGINT to the whole foreground group)
    # reaches this process only, which stops the ranks the one way that checkpoints.
    child = subprocess.Popen(command, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        _stop_ranks(child.pid)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not received:
        return code
    name = signal.Signals(received[0]).name
    outcome = ("the ranks wrote a checkpoint and stopped; --resume auto continues" if code == 0 else
               f"the ranks stopped (launcher exit {code}); --resume auto continues from the last complete checkpoint")
    if received[0] == signal.SIGTERM:
        print(f"sr train: SIGTERM: {outcome}", file=sys.stderr)
        return 0  # a preemption: the work so far is saved, as with one process
    raise KeyboardInterrupt(f"interrupted by {name}: {outcome}")


def _stop_ranks(launcher_pid: int) -> None:
    """SIGTERM to the ranks (the launcher's children), which checkpoint and exit 0, so
    that Accelerate's launcher ends quietly. Signalled itself, it would stop them with
    the signal, kill them 30 s later whatever they were writing, and print its error
    report. Before the ranks exist, the launcher is all there is to stop."""
    ranks = _children(launcher_pid)
    for pid in ranks or [launcher_pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc: Linux, like the training VMs)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found
