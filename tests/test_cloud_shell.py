"""Hostile values in the shell files `sr cloud` generates (commands.sh, run.sh, setup.sh):
each file is written with values that try to break out of a quote, a comment or a
word (newlines, quotes, `$(...)`, backticks, `${port}`), then RUN under stubs of the
cloud tools (`sky`, `ray`, `gcloud`, `accelerate`, the VM's python) that record their
argv. The files must execute nothing but those tools, with the values passed through
literally, and write nothing outside their output folder; names and ids that become
folder names or reach `ray up` are refused in one line with nothing written."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cloudenv import offline_env, sr  # noqa: F401 (fixtures)

STUB = """
import http.server, json, os, sys
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps([name, *args]) + "\\n")
if name == "sky" and args[:2] == ["jobs", "queue"]:
    print("[]")
if name == "ray" and args[0] == "get-head-ip":
    sys.exit(1)  # no head yet: commands.sh runs `ray up`
if name == "ray" and args[0] == "dashboard":  # the tunnel: a stand-in job server on --port
    class JobServer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"ray_version": "2.60.0"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", int(args[args.index("--port") + 1])), JobServer).serve_forever()
"""


def _stub_tools(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(f"#!{sys.executable}\n{STUB}")
        (folder / name).chmod(0o755)


@pytest.fixture
def hostile(tmp_path, offline_env, monkeypatch):
    """A working folder (the default sr-cloud-out/ lands in it), stub tools on PATH, a
    stub VM environment (SR_VENV), and a canary path that every injection targets."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _stub_tools(tmp_path / "bin", ["sky", "ray", "gcloud"])
    _stub_tools(tmp_path / "venv" / "bin", ["accelerate", "python"])
    log = tmp_path / "stub.log"
    log.write_text("")
    canary = "PWNED"  # a relative name: it fits in file names too
    env = dict(offline_env, PATH=f"{tmp_path / 'bin'}{os.pathsep}{offline_env['PATH']}", STUB_LOG=str(log),
               SR_VENV=str(tmp_path / "venv"))
    return work, env, log, canary


def _pwned(root: Path) -> list[str]:
    """Files an injection created, wherever the shell that ran it stood."""
    return [str(p) for p in root.rglob("*PWNED*") if "$" not in p.name and "`" not in p.name]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run_file(path: Path, env: dict, log: Path, root: Path, extra_env: dict | None = None) -> list[list[str]]:
    """Run one generated file with bash; return the stubs' argv. Nothing may appear below
    ``root`` but the stub log (and the output folder's own files)."""
    before = _tree(root)
    log.write_text("")
    done = subprocess.run(["bash", str(path)], env=dict(env, **(extra_env or {})), capture_output=True, text=True,
                          timeout=120, cwd=path.parent)
    assert done.returncode == 0, (path, done.stderr[-2000:])
    new = {p for p in _tree(root) - before if not p.startswith(str(path.parent.relative_to(root)))}
    assert not new, f"{path.name} wrote outside its output folder: {sorted(new)}"
    return [json.loads(line) for line in log.read_text().splitlines()]


def _injections(canary: str) -> list[str]:
    """Ways out of a word, a quote or a comment, each creating the canary if it runs."""
    return [f"$(touch {canary})", f"`touch {canary}`", f"';touch {canary};'", f'";touch {canary};"',
            f"\ntouch {canary}\n", f"${{port}}$(touch {canary})"]


def test_refused_names_write_nothing(hostile, sr, tmp_path):
    """Names and ids that would break a line or leave sr-cloud-out/: one line, exit 2, no file."""
    work, env, log, canary = hostile
    cluster = tmp_path / "cluster.yaml"
    assert sr(["cloud", "ray-config", "--project", "p", "-o", cluster]).returncode == 0
    bad_cluster = tmp_path / "bad-cluster.yaml"
    bad_cluster.write_text(yaml.safe_dump({**yaml.safe_load(cluster.read_text()),
                                           "cluster_name": f"c\ntouch {canary}"}))
    batch = ["cloud", "batch", "gs://in/a", "gs://out/a", "--model", "gs://m/x.safetensors", "--dry-run"]
    cases = []
    for bad in [f"x\ntouch {canary}", "../../../x", "x/../../y", "X", ""]:
        cases += [(["cloud", action, bad, "--dry-run"], "RUN") for action in ("stop", "status", "logs")]
        cases.append((["cloud", "train", "--preset", "tiny", "--name", bad, "--bucket", "gs://b", "--dry-run"],
                      "--name"))
    for bad in [f"../../../y", f"y\ntouch {canary}", "y/../z", ".hidden", "$(touch x)"]:
        cases.append(([*batch, "--cluster", cluster, "--submission-id", bad], "--submission-id"))
    for bad in [f"gs://b\ntouch {canary} #", "gs://b/$(touch x)", "gs://b/../../c", "gs://B", "gs://b c"]:
        cases.append((["cloud", "train", "--preset", "tiny", "--name", "r", "--bucket", bad, "--dry-run"],
                      "--bucket"))
        cases.append((["cloud", "doctor", "--project", "p", "--bucket", bad, "--dry-run"], "--bucket"))
    cases.append(([*batch, "--cluster", bad_cluster, "--submission-id", "j"], "cluster_name"))
    # Values that reach the cluster's setup lines, API URLs and the fix commands doctor prints.
    bad_project = tmp_path / "bad-project.yaml"
    config = yaml.safe_load(cluster.read_text())
    config["provider"]["project_id"] = f"p;touch {canary}"
    bad_project.write_text(yaml.safe_dump(config))
    cases.append((["cloud", "doctor", "--no-train", "--cluster", bad_project, "--dry-run"], "project"))
    for option, bad in (("--project", f"p;touch {canary}"), ("--service-account", f"a b@p.iam.gserviceaccount.com"),
                        ("--image", f"host.io/x;touch {canary}:1"), ("--image", "host.io/x:$(touch y)"),
                        ("--zone", "us-central1-a;x")):
        cases.append((["cloud", "ray-config", "--project", "p", option, bad], option))
    cases.append((["cloud", "train", "--preset", "tiny", "--name", "r", "--bucket", "gs://b", "--image",
                   f"docker:host.io/x`touch {canary}`:1", "--dry-run"], "--image"))
    cases.append((["cloud", "train", "--preset", "tiny", "--name", "r", "--bucket", "gs://b", "--region",
                   "us;touch x", "--dry-run"], "--region"))
    before = _tree(tmp_path)
    for args, named in cases:
        done = sr(args)
        assert done.returncode == 2 and named in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, (args, done.stderr)
    assert _tree(tmp_path) == before  # nothing written, inside sr-cloud-out/ or out of it
    assert not _pwned(tmp_path)


def test_batch_commands_sh_passes_hostile_values_literally(hostile, sr, tmp_path):
    work, env, log, canary = hostile
    bits = _injections(canary)
    cluster = tmp_path / f"cluster{bits[0]}.yaml"  # the cluster file's own name, too
    assert sr(["cloud", "ray-config", "--project", "p", "-o", cluster]).returncode == 0
    source = f"gs://in/{bits[5]}"
    output = f"gs://out/{bits[2]}{bits[3]}"
    model = f"gs://m/{bits[1]}.safetensors"
    done = sr(["cloud", "batch", source, output, "--model", model, "--cluster", cluster,
               "--submission-id", "job1", "--dry-run", f"--batch-args=--include {shlex.quote(bits[4])} --suffix x"])
    assert done.returncode == 0, done.stderr
    out = work / "sr-cloud-out" / "job1"
    calls = _run_file(out / "commands.sh", env, log, tmp_path)
    assert [c[:2] for c in calls] == [["ray", "get-head-ip"], ["ray", "up"], ["ray", "dashboard"],
                                      ["ray", "job"], ["ray", "job"]]
    assert calls[0][2:] == [str(cluster)] and calls[1][2:] == ["-y", "--no-restart", str(cluster)]
    submit = calls[3]
    entry = submit[submit.index("--") + 1:]
    assert entry[:6] == ["sr", "batch", source, output, "--model", model]  # literally, ${port} included
    assert entry[entry.index("--include") + 1] == bits[4]
    port = calls[2][calls[2].index("--port") + 1]
    assert port.isdigit() and submit[submit.index("--address") + 1] == f"http://127.0.0.1:{port}"
    assert not _pwned(tmp_path)


def test_train_files_pass_hostile_values_literally(hostile, sr, tmp_path):
    """commands.sh (sky jobs queue + launch), run.sh (accelerate on a node) and setup.sh."""
    work, env, log, canary = hostile
    bits = _injections(canary)
    config = tmp_path / f"cfg{bits[0]}{bits[1]}.yaml"
    config.write_text("{}\n")
    overrides = [f"data.train_shards=gs://b/{bits[2]}{bits[3]}{bits[4]}", f"data.val_folder=gs://v/{bits[5]}"]
    done = sr(["cloud", "train", config, *overrides, "--preset", "tiny", "--name", "r1",
               "--bucket", "gs://b/p_1", "--no-local-ssd", "--dry-run"])
    assert done.returncode == 0, done.stderr
    out = work / "sr-cloud-out" / "r1"
    calls = _run_file(out / "commands.sh", env, log, tmp_path)
    assert calls == [["sky", "jobs", "queue", "--skip-finished", "--output", "json"],
                     ["sky", "jobs", "launch", str(out / "task.yaml"), "--name", "r1", "--yes", "--detach-run"]]
    task = yaml.safe_load((out / "task.yaml").read_text())
    assert task["file_mounts"] == {"~/sr-job/config.yaml": str(config)}  # data, not shell

    node = {"SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_GPUS_PER_NODE": "1",
            "SKYPILOT_NODE_IPS": "10.0.0.1", "HOME": str(tmp_path / "work")}
    (accelerate,) = _run_file(out / "run.sh", env, log, tmp_path, node)
    tail = accelerate[accelerate.index("jobs.train") + 1:]
    assert tail == ["--preset", "tiny", f"{tmp_path / 'work'}/sr-job/config.yaml", *overrides,
                    "train.run_dir=gs://b/p_1/runs/r1", "--resume", "auto"]
    calls = _run_file(out / "setup.sh", env, log, tmp_path)
    assert {c[0] for c in calls} == {"python"} and not _pwned(tmp_path)


def test_job_and_gpu_check_commands_sh(hostile, sr, tmp_path):
    work, env, log, canary = hostile
    for action, expected in (("stop", ["jobs", "cancel", "--name", "run-2", "--yes"]),
                             ("status", ["jobs", "queue", "--all"]),
                             ("logs", ["jobs", "logs", "--name", "run-2", "--follow"])):
        assert sr(["cloud", action, "run-2", "--dry-run"]).returncode == 0
        calls = _run_file(work / "sr-cloud-out" / "run-2" / "commands.sh", env, log, tmp_path)
        assert calls == [["sky", *expected]]
    table = f"gs://b/{''.join(_injections(canary))}.md"
    assert sr(["cloud", "gpu-check", "--table", table, "--dry-run"]).returncode == 0
    out = work / "sr-cloud-out" / "sr-gpu-check"
    (launch,) = _run_file(out / "commands.sh", env, log, tmp_path)
    assert launch == ["sky", "launch", "-c", "sr-gpu-check", str(out / "task.yaml"), "--down", "--yes"]
    # The task's run script, on the VM: nvidia-smi and the check, with the table's URL literal.
    run = out / "run.sh"
    run.write_text(yaml.safe_load((out / "task.yaml").read_text())["run"])
    _stub_tools(tmp_path / "bin", ["nvidia-smi"])
    calls = _run_file(run, env, log, tmp_path)
    assert calls[0] == ["nvidia-smi"] and calls[1][-4:] == ["-m", "infra.gpucheck", "--out", table]
    assert not _pwned(tmp_path)


def test_cluster_setup_and_start_lines_run_only_the_tools(hostile, sr, tmp_path):
    """The lines `ray up` runs on the nodes (initialization, setup, start), each with bash
    under the stubs in a stand-in HOME: only the tools run (the project install through
    the VM's python, `gcloud auth configure-docker` for the Artifact Registry host, ray)."""
    work, env, log, canary = hostile
    image = "us-central1-docker.pkg.dev/p/sr/sr-cloud:0.1.0"
    cluster = tmp_path / "cluster.yaml"
    assert sr(["cloud", "ray-config", "--project", "p", "--image", image, "-o", cluster]).returncode == 0
    config = yaml.safe_load(cluster.read_text())
    home = tmp_path / "home"
    (home / "sr-cloud").mkdir(parents=True)
    _stub_tools(home / "sr-venv" / "bin", ["python", "ray"])
    _stub_tools(tmp_path / "bin", ["nvidia-smi"])
    worker = config["available_node_types"]["gpu_worker"]
    lines = (config["initialization_commands"] + worker["initialization_commands"] + config["setup_commands"]
             + config["head_setup_commands"] + config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    node_env = dict(env, HOME=str(home), RAY_HEAD_IP="10.0.0.2")
    node_env.pop("SR_VENV")  # the nodes use the default, $HOME/sr-venv
    calls = []
    for line in lines:
        log.write_text("")
        done = subprocess.run(["bash", "-c", line], env=node_env, capture_output=True, text=True, timeout=120,
                              cwd=home)
        assert done.returncode == 0, (line, done.stderr[-2000:])
        calls += [json.loads(c) for c in log.read_text().splitlines()]
    assert {c[0] for c in calls} == {"gcloud", "nvidia-smi", "python", "ray"}
    assert ["gcloud", "auth", "configure-docker", "us-central1-docker.pkg.dev", "--quiet"] in calls
    assert ["ray", "start", "--address=10.0.0.2:6379", "--object-manager-port=8076"] in calls
    assert not _pwned(tmp_path)
