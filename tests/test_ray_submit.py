"""The README's `ray job submit` commands, run as written against a local head started from the project's
environment: prepare -> cache_teacher -> train -> export, each job SUCCEEDED and its outputs in place.

The head is this test's own (`ray start --head --block`, its own ports, --temp-dir and token), beside the session's
in-process Ray of conftest.py; it is stopped by ending its `ray start --block` process, which takes its node
down with it, never by `ray stop`, which stops every Ray process on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline import cache

ROOT = Path(__file__).resolve().parents[1]
README_ADDRESS = "http://127.0.0.1:8265"
STAGES = ["prepare", "cache_teacher", "train", "export"]
NO_AGENT = "No available agent to submit job"  # Ray's job API, before the head's agent has registered


def readme_commands() -> list[str]:
    """The `ray job submit` lines of the README's local-head section, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Submitting the stages to a local Ray head", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.startswith("ray job submit ")]


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (held open together so that none repeats)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def head_env(token: str) -> dict[str, str]:
    """The environment a user has after `source .venv/bin/activate`: this interpreter's bin first on PATH, no Ray
    address inherited from this process (a session Ray may have set one), and Ray's token authentication on (as
    `ray start --head` turns it on where ~/.ray/auth_token exists), with a token of this head's own."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(Path(sys.executable).parent.parent)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def own_processes(temp_dir: str) -> list[int]:
    """Pids whose command line names this head's --temp-dir (every process of its node does; Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:  # gone, or not ours to read
                continue
            if temp_dir.encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def answers(url: str, token: str) -> bool:
    """Whether an HTTP server answers at url (any status: the agent has no route at /)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def wait_for_job_server(url: str, agent_url: str, token: str, head: subprocess.Popen, log: Path,
                        timeout_s: float = 180) -> bool:
    """Until the job API answers and so does the head's dashboard agent, which runs the jobs: the job API answers
    first, and a submission made before the agent is up fails after 10 s with "No available agent to submit job"
    (Ray's WAIT_AVAILABLE_AGENT_TIMEOUT), as one did on a loaded CI machine. False if `ray start` exited first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            return False
        if answers(f"{url}/api/version", token) and answers(agent_url, token):
            return True
        time.sleep(1)
    pytest.fail(f"no job server at {url} with its agent at {agent_url} after {timeout_s} s:\n"
                f"{log.read_text()[-4000:]}")


def stop(head: subprocess.Popen, temp_dir: str) -> None:
    """End `ray start --block`, which stops its node's processes on the way out; then kill whatever of this head
    is left: its process group (its own session), and anything naming its --temp-dir. Nothing else."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (group_alive(head.pid) or own_processes(temp_dir)):
        time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    for pid in own_processes(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def start_head(env: dict[str, str]) -> tuple[subprocess.Popen, str, str, str, Path]:
    """`ray start --head --block` as the README says, on ports and a --temp-dir of its own: (process, job API URL,
    agent URL, temp dir, log)."""
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dash, client, agent, agent_grpc, runtime_env_agent, metrics = free_ports(7)
    log = Path(temp_dir) / "ray-start.log"
    cmd = ["ray", "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
           "--port", str(gcs), "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(runtime_env_agent), "--metrics-export-port", str(metrics),
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    with open(log, "w") as out:
        # No drain on SIGTERM (a head of Serve replicas would want one): the node stops at once, not in up to 30 s.
        proc = subprocess.Popen(cmd, env={**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{agent}/", temp_dir, log


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[str, dict[str, str], Path]]:
    """A local head started as the README says, from .venv, on ports of its own; yields (job API URL, env,
    its --temp-dir). Up to 3 starts: Ray gives its raylet a fixed 30 s to register, which a loaded CI machine
    has exceeded ("The current node timed out during startup"); each failed start is shown if all fail."""
    token = secrets.token_hex(32)
    env = head_env(token)
    failures = []
    for _ in range(3):
        proc, url, agent_url, temp_dir, log = start_head(env)
        try:
            if wait_for_job_server(url, agent_url, token, proc, log):
                yield url, env, Path(temp_dir)
                return
            failures.append(f"ray start exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        finally:
            stop(proc, temp_dir)
            shutil.rmtree(temp_dir, ignore_errors=True)
    pytest.fail("\n\n".join(failures))


def ray_job(url: str, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(["ray", "job", *args, "--address", url], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    return done.stdout + done.stderr


def submit(line: str, url: str, env: dict[str, str], out: Path) -> tuple[str, str]:
    """Run one README line in bash, as a user would (with $OUT set, the head's address in place of 8265);
    returns (submission id, its output), failing with the job's logs if it did not succeed."""
    command = line.replace(README_ADDRESS, url)
    for _ in range(3):  # the agent registers a moment after it answers; Ray's message says to try again later
        done = subprocess.run(["bash", "-c", command], env={**env, "OUT": str(out)}, cwd=ROOT, capture_output=True,
                              text=True, timeout=900)
        output = done.stdout + done.stderr
        if NO_AGENT not in output:
            break
        time.sleep(5)
    ids = re.findall(r"Job '(raysubmit_\w+)' submitted successfully", output)
    if done.returncode != 0 or not ids:
        logs = ray_job(url, env, "logs", ids[0]) if ids else "(no submission id)"
        pytest.fail(f"{command}\nexit {done.returncode}:\n{output[-6000:]}\njob logs:\n{logs[-6000:]}")
    client = JobSubmissionClient(url, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    status = client.get_job_status(ids[0])
    assert status == JobStatus.SUCCEEDED, f"{command}\n{status}\njob logs:\n{ray_job(url, env, 'logs', ids[0])[-6000:]}"
    return ids[0], output


def last_json(output: str) -> dict:
    """The job's result: the last JSON object it printed (jobs end with one)."""
    start = output.rindex("\n{") + 1
    return json.loads(output[start:output.index("\n}", start) + 2])


def test_readme_commands_name_every_stage():
    lines = readme_commands()
    assert [re.search(r"-m jobs\.(\w+)", line).group(1) for line in lines] == STAGES
    for line in lines:
        assert line.startswith(f"ray job submit --address {README_ADDRESS} --working-dir . -- python -m jobs."), line


@pytest.mark.slow
def test_readme_submissions_on_a_local_head(head, tmp_path):
    url, env, temp_dir = head
    out = tmp_path / "submit"
    results = {}
    for stage, line in zip(STAGES, readme_commands(), strict=True):
        start = time.monotonic()
        _, output = submit(line, url, env, out)
        results[stage] = last_json(output)
        print(f"{stage}: {time.monotonic() - start:.1f} s")  # shown on failure, or with -s

    mels = cache.check_manifest(str(out / "mels"), kind="mels")
    assert mels["counts"]["clips"] == results["prepare"]["clips"] == 16, results["prepare"]
    teacher = cache.check_manifest(str(out / "teacher"), kind="teacher")
    assert teacher["counts"]["targets"] == results["cache_teacher"]["targets"] == 16, results["cache_teacher"]
    assert results["train"]["metrics"]["step"] == 2, results["train"]
    checkpoint = Path(results["train"]["checkpoint"])
    assert checkpoint.parent.parent == out / "run" and (checkpoint / "checkpoint.json").is_file(), checkpoint
    assert results["export"] == {"checkpoint": str(checkpoint), "step": 2, "output": str(out / "model")}
    model = out / "model"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file(), sorted(model.iterdir())

    # What `--working-dir .` uploaded, as the head unpacked it: the code, not the environment, models or outputs.
    packages = [p for p in temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert packages, sorted(temp_dir.glob("session_latest/runtime_resources/*"))
    for package in packages:  # one per content hash: one, unless the tree changed between submissions
        assert (package / "jobs" / "prepare.py").is_file() and (package / "pipeline").is_dir()
        for ignored in (".venv", "runs", "models", ".git", "build", "dist"):
            assert not (package / ignored).exists(), f"{ignored} was uploaded"
        size = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        assert size < 20 * 2**20, f"the working dir upload is {size / 2**20:.1f} MiB"
        print(f"working dir upload: {size / 2**20:.1f} MiB unpacked")
