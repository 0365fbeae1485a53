"""Real Ray clusters for tests: ``ray start`` heads and worker nodes on loopback, stopped by their own PIDs.

Several raylets on one machine form one cluster (measured here: README, "Multi-node runs"): each node gets its own ``--temp-dir`` (short:
Ray puts unix sockets there, ~107 bytes at most) and its own dashboard-agent port. Every process of a node
carries its temp dir in its command line, which is how :func:`stop_cluster` finds exactly those processes
(``ray stop`` would kill every Ray process on the machine). Token authentication is on, as Ray >= 2.5x
clusters have it by default: every process reads the same token file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_cluster(temps: list[Path]) -> None:
    """Terminate (then kill) every process whose command line names one of ``temps``; remove the dirs."""
    import psutil

    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
            if any(str(t) in part for t in temps for part in cmd):
                procs.append(proc)
                proc.terminate()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive:
        proc.kill()
    for t in temps:
        shutil.rmtree(t, ignore_errors=True)


def wait_for_job_agent(ray_bin: str, address: str, env: dict, deadline_s: float) -> None:
    """A fresh head accepts jobs only once its dashboard agent is up: submit a no-op until it is taken."""
    end = time.monotonic() + deadline_s
    while True:
        probe = [ray_bin, "job", "submit", "--address", address, "--no-wait", "--", "python", "-c", "pass"]
        proc = subprocess.run(probe, capture_output=True, text=True, timeout=120, env=env)
        if proc.returncode == 0:
            return
        if time.monotonic() > end:
            raise AssertionError(f"the Ray head at {address} did not accept jobs within {deadline_s}s: {proc.stderr}")
        time.sleep(2)


@dataclass
class LocalCluster:
    """A head plus worker nodes; ``gcs`` / ``dashboard`` addresses and the environment clients need."""

    ray_bin: str
    temps: list[Path] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    gcs: str = ""
    dashboard: str = ""

    @classmethod
    def start_head(
        cls, num_cpus: int, resources: dict | None = None, num_gpus: int = 0, env: dict | None = None
    ) -> LocalCluster:
        ray_bin = shutil.which("ray")
        assert ray_bin, "the ray CLI is not installed (ray[default])"
        temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        token = temp / "auth_token"
        token.write_text(secrets.token_hex(32))
        env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            **(env or {}),
        }
        env.pop("RAY_ADDRESS", None)
        port, dash = free_port(), free_port()
        cluster = cls(ray_bin, [temp], env, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
        start = [
            ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}", "--disable-usage-stats",
        ]  # fmt: skip
        if resources:
            start.append(f"--resources={json.dumps(resources)}")
        cluster._run(start)
        return cluster

    def add_node(
        self, num_cpus: int, resources: dict | None = None, masked: Path | None = None, num_gpus: int = 0
    ) -> None:
        """A worker node. ``masked``: the node runs in a mount namespace of its own where an empty tmpfs
        hides that directory, as a node that does not mount a shared file system (needs ``unshare -m``)."""
        temp = Path(tempfile.mkdtemp(prefix="rayw", dir="/tmp"))
        self.temps.append(temp)
        start = [
            self.ray_bin, "start", f"--address={self.gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}", f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}",
            "--disable-usage-stats",
        ]  # fmt: skip
        if resources:
            start.append(f"--resources={json.dumps(resources)}")
        if masked is not None:
            inner = " ".join(f"'{a}'" for a in start)
            start = [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount -t tmpfs none '{masked}' && {inner}",
            ]
        self._run(start)

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=self.env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    def wait_for_nodes(self, n: int, deadline_s: float = 120) -> None:
        end = time.monotonic() + deadline_s
        code = "import ray, json; ray.init(); print(json.dumps(sum(1 for x in ray.nodes() if x['Alive'])))"
        env = {**self.env, "RAY_ADDRESS": self.gcs}
        while True:
            proc = subprocess.run(["python", "-c", code], capture_output=True, text=True, timeout=120, env=env)
            alive = int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else 0
            if alive >= n:
                return
            if time.monotonic() > end:
                raise AssertionError(f"{alive} of {n} Ray nodes alive after {deadline_s}s: {proc.stderr[-1000:]}")
            time.sleep(2)

    def stop(self) -> None:
        stop_cluster(self.temps)


@contextlib.contextmanager
def local_ray(num_cpus: int, num_gpus: int = 0, resources: dict[str, float] | None = None):
    """A local Ray cluster of this process for the block, as ``init_ray`` starts one (the import fix in every
    worker, no dashboard), with custom ``resources`` (declared devices: ``{"FAKE_GPU": 4}``); yields the ``ray``
    module. Measured against one cluster shared by a whole session: an
    idle Ray head burns ~9% of a core (GCS, raylet, agents, idle workers), more over a session on 2 cores than the
    ~5 CPU-seconds a start costs, so each module starts its own."""
    import ray

    from ivgr_dist.runtime.startup import worker_runtime_env

    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        resources=resources,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=worker_runtime_env(),
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def can_unshare_mounts() -> bool:
    """Whether this machine lets a process make a mount namespace (root with CAP_SYS_ADMIN)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /mnt"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0
