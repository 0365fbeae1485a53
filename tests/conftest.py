"""Shared fixtures: the tiny models are built once per session (per xdist worker: the default tier runs ``-n 2``),
a local Ray cluster once per module that asks for ``ray_cluster``; GPU tests skip without CUDA. Shared-memory
segments the session leaves in /dev/shm fail it (support.shm_check)."""

from __future__ import annotations

import pytest

from ivgr_dist.runtime._ext_fix import install
from support.shm_check import (  # noqa: F401
    pytest_runtest_logstart,
    pytest_sessionfinish,
    pytest_sessionstart,
    pytest_terminal_summary,
    pytest_testnodedown,
)

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


# Logical CPUs of a test module's Ray cluster: the largest module's need (test_tp_sync: a TP=2 engine, a fresh TP=2
# engine beside it and learner ranks of 0.01 CPU), plus one; processes share the machine's real cores as before.
RAY_CPUS = 6


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for the module (support.ray_cluster.local_ray), shut down when it ends."""
    from support.ray_cluster import local_ray

    with local_ray(RAY_CPUS) as ray:
        yield ray
