"""Shared fixtures: the tiny models and one Ray cluster are started once per session (per xdist worker; the
default tier runs ``-n 2``), and every in-process Ray test module joins that cluster as a job of its own; GPU
tests skip without CUDA. Shared-memory segments the session leaves in /dev/shm fail it (support.shm_check)."""

from __future__ import annotations

import pytest

from ivgr_dist.runtime._ext_fix import install
from support.ray_cluster import record_local_clusters
from support.shm_check import (  # noqa: F401
    pytest_runtest_logstart,
    pytest_sessionfinish,
    pytest_sessionstart,
    pytest_terminal_summary,
    pytest_testnodedown,
)

record_local_clusters()  # a local ray.init in this process, then a joined cluster: fails naming the test
install()  # as the command line does (ivgr_dist.runtime._ext_fix): tests import transformers and start vLLM engines


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_logging():
    """``ivgr_dist.cli.main`` sets up the process's logging (console filter, logs/driver.log, captured warnings);
    tests that call it must not change what later tests see."""
    import logging

    from ivgr_dist.runtime import logs

    root = logging.getLogger()
    handlers, level, state = list(root.handlers), root.level, dict(logs._state)
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    logs._state.clear()
    logs._state.update(state)
    logging.captureWarnings(False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL model directory (built once, ~5 s)."""
    from ivgr_dist.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    """A tiny random Qwen3-VL model directory (built once)."""
    from ivgr_dist.config import TinyModelConfig
    from ivgr_dist.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3", TinyModelConfig(family="qwen3_vl"))


# Logical CPUs of the session's Ray clusters: the largest module's need (test_tp_sync: a TP=2 engine, a fresh TP=2
# engine beside it and learner ranks of 0.01 CPU), plus one; processes share the machine's real cores as before.
SESSION_RAY_CPUS = 6


@pytest.fixture(scope="session")
def ray_heads():
    """The session's Ray clusters, one per declared GPU count, each started on first use: ``ray start`` heads on
    loopback, stopped by their processes' PIDs at the end (support.ray_cluster). Starting a cluster costs ~3 s and
    ~5 CPU-seconds; joining one costs 0.1 s. In-process tests use only these: a process that has started a local
    cluster of its own (``ray.init(num_cpus=...)``) cannot start actors on a cluster it joins afterwards (Ray 2.60;
    their creation is cancelled), while joining one head after another works."""
    from support.ray_cluster import LocalCluster

    heads: dict[tuple[int, int], LocalCluster] = {}

    def head(num_gpus: int = 0, num_cpus: int = SESSION_RAY_CPUS) -> LocalCluster:
        key = (num_cpus, num_gpus)
        if key not in heads:
            heads[key] = LocalCluster.start_head(num_cpus, dashboard=False, auth=False, num_gpus=num_gpus)
        return heads[key]

    try:
        yield head
    finally:
        for cluster in heads.values():
            cluster.stop(grace_s=3)  # no job is left to finish: what has not exited after SIGTERM is killed


@pytest.fixture(scope="module")
def ray_cluster(ray_heads):
    """This module's connection to the session's CPU-only Ray cluster, as a job of its own
    (:func:`support.ray_cluster.joined`)."""
    from support.ray_cluster import joined

    with joined(ray_heads()) as ray:
        yield ray
