"""Real Ray clusters for tests: ``ray start`` heads and worker nodes on loopback, stopped by their own PIDs.

Several raylets on one machine form one cluster (measured here: README, "Multi-node runs"): each node gets its own ``--temp-dir`` (short:
Ray puts unix sockets there, ~107 bytes at most) and its own dashboard-agent port. Every process of a node
carries its temp dir in its command line, which is how :func:`stop_cluster` finds exactly those processes
(``ray stop`` would kill every Ray process on the machine). Token authentication is on, as Ray >= 2.5x
clusters have it by default: every process reads the same token file.
"""

from __future__ import annotations

import contextlib
import functools
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


def stop_cluster(temps: list[Path], grace_s: float = 20.0) -> None:
    """Terminate every process whose command line names one of ``temps``, kill those still alive after
    ``grace_s`` (the GCS server and the autoscaler's monitor can take that long after SIGTERM); remove the dirs."""
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
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
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
        cls,
        num_cpus: int,
        resources: dict | None = None,
        dashboard: bool = True,
        auth: bool = True,
        num_gpus: int = 0,
    ) -> LocalCluster:
        """``dashboard``: the dashboard and its job API (``ray job submit``); without it the head starts faster
        and drivers join it with ``ray.init(address=gcs)`` only. ``num_gpus``: GPUs the head declares (Ray
        schedules them; nothing here uses a device). ``auth``: a token file of the cluster's own, which
        its clients read from ``env``; False: no authentication (``RAY_AUTH_MODE=disabled``), for a loopback cluster
        that this process joins in-process: Ray keeps the token a process first used, so a process that has
        started a local cluster of its own cannot then present another token (measured with Ray 2.60)."""
        ray_bin = shutil.which("ray")
        assert ray_bin, "the ray CLI is not installed (ray[default])"
        temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        token = temp / "auth_token"
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        if auth:
            token.write_text(secrets.token_hex(32))
            env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        env.pop("RAY_ADDRESS", None)
        port, dash = free_port(), free_port()
        cluster = cls(ray_bin, [temp], env, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}")
        start = [
            ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}", f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}",
            "--disable-usage-stats",
        ]  # fmt: skip
        if resources:
            start.append(f"--resources={json.dumps(resources)}")
        cluster._run(start)
        return cluster

    def add_node(self, num_cpus: int, resources: dict | None = None, masked: Path | None = None) -> None:
        """A worker node. ``masked``: the node runs in a mount namespace of its own where an empty tmpfs
        hides that directory, as a node that does not mount a shared file system (needs ``unshare -m``)."""
        temp = Path(tempfile.mkdtemp(prefix="rayw", dir="/tmp"))
        self.temps.append(temp)
        start = [
            self.ray_bin, "start", f"--address={self.gcs}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            "--num-gpus=0", f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}",
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

    def wait_until_idle(self, ray, timeout_s: float) -> None:
        """Wait (connected as ``ray``) until every CPU and GPU of the cluster is free: the jobs before this one
        have ended and Ray has killed what they left; else fail, naming what is still held."""
        deadline = time.monotonic() + timeout_s
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        while held := {k: v - ray.available_resources().get(k, 0.0) for k, v in total.items()}:
            held = {k: v for k, v in held.items() if v > 1e-6}
            if not held:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the session's Ray cluster at {self.gcs} still holds {held} of {total} {timeout_s:g}s after the "
                    "previous job ended (a module left actors or placement groups that Ray could not kill)"
                )
            time.sleep(0.2)

    def descendants(self) -> list:
        """The processes started below this cluster's own (its raylets start the workers, and vLLM engine cores
        below them)."""
        import psutil

        out = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(str(t) in part for t in self.temps for part in proc.info["cmdline"] or []):
                    out.extend(proc.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list({p.pid: p for p in out}.values())

    def stop(self, grace_s: float = 20.0) -> None:
        stop_cluster(self.temps, grace_s)


_local_clusters: list[str] = []  # the tests during which this process started a local Ray cluster of its own


def record_local_clusters() -> None:
    """Wrap ``ray.init`` so that this process remembers the tests that started a local cluster in it: after one,
    :func:`joined` fails with the reason instead of the actors' cancelled creation."""
    import ray

    real = ray.init

    @functools.wraps(real)
    def init(*args, **kwargs):
        if not args and kwargs.get("address") is None and not os.environ.get("RAY_ADDRESS"):
            _local_clusters.append(os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0])
        return real(*args, **kwargs)

    ray.init = init


@contextlib.contextmanager
def joined(cluster: LocalCluster, idle_timeout_s: float = 60.0):
    """Join ``cluster`` as a job of this process, the import fix in every worker as ``init_ray`` sets it; yields the
    ``ray`` module. When the job ends Ray kills what it left (actors, placement groups). It starts only once every
    CPU and GPU of the cluster is free again, and fails, naming the resources still held, if they are not within
    ``idle_timeout_s`` (the job before it left something Ray could not kill)."""
    import ray

    from ivgr_dist.runtime.startup import worker_runtime_env

    if _local_clusters:
        raise AssertionError(
            f"this process started a local Ray cluster of its own ({_local_clusters[0]}): Ray 2.60 then cancels the "
            "creation of every actor on a cluster the process joins later, so in-process tests use the session's "
            "clusters only (the `ray_cluster` / `ray_heads` fixtures of tests/conftest.py)"
        )
    ray.init(address=cluster.gcs, log_to_driver=False, runtime_env=worker_runtime_env())
    try:
        cluster.wait_until_idle(ray, idle_timeout_s)
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
