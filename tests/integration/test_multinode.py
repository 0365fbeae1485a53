"""The tiny job on a multi-node Ray cluster on loopback: driver, learner ranks and engine on three nodes.

``ray start --head`` plus worker nodes (``ray start --address``), each with a role resource; the job goes in
through ``cluster/submit.sh`` (``ray job submit --working-dir .``), so every node's workers run in their own
unpacked copy of the working directory, as on a real cluster. Weights move with ``sync.backend=gloo``
(``ivgr_shm`` is one node only). Cases:

1. absolute shared ``trainer.output_dir``: warm start, 2 RL steps, checkpoints; the roles ran on three nodes;
2. a second submission resumes from the checkpoint (step 3 only);
3. a relative ``trainer.output_dir`` (resolving into the driver's working-dir copy) fails at start;
4. an engine on a node that does not see the output directory (a mount namespace hides it) fails at start,
   naming the node (skipped where mount namespaces are not allowed).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from support.ray_cluster import LocalCluster, can_unshare_mounts

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The 'shared file system': one directory every node but the masked one sees."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def cluster(shared):
    masked = can_unshare_mounts()
    c = LocalCluster.start_head(num_cpus=1, resources={"driver_node": 1})
    try:
        c.add_node(num_cpus=2, resources={"rollout_node": 2})
        c.add_node(num_cpus=2, resources={"learner_node": 2})
        nodes = 3
        if masked:
            c.add_node(num_cpus=1, resources={"masked_node": 1}, masked=shared)
            nodes += 1
        c.wait_for_nodes(nodes)
        c.masked = masked
        yield c
    finally:
        c.stop()


def _overrides(shared: Path, model: Path, steps: int, output_dir: str | None = None) -> list[str]:
    return [
        f"model.path={model}",
        f"data.train_files=[{shared}/data/train.parquet]",
        f"data.val_files=[{shared}/data/val.parquet]",
        "data.synthetic.num_records=64",
        "data.rollout_batch_size=8",
        "rollout.num_engines=1",
        "rollout.max_response_length=32",
        "rollout.resources={rollout_node: 1}",
        "learner.num_ranks=2",
        "learner.resources={learner_node: 1}",
        "learner.global_batch_size=8",
        "reward.num_workers=0",
        "sync.backend=gloo",
        "sft.steps=4",
        "sft.batch_size=4",
        f"trainer.output_dir={output_dir or shared / 'run'}",
        f"trainer.max_steps={steps}",
        "trainer.save_every=1",
        "trainer.loggers=[jsonl]",
    ]


def _submit(cluster, args: list[str], timeout: int = 900) -> tuple[int, str, float]:
    env = {**cluster.env, "RAY_ADDRESS": cluster.dashboard}
    t0 = time.monotonic()
    job = subprocess.run(
        ["bash", str(REPO / "cluster" / "submit.sh"), "--", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )
    return job.returncode, job.stdout + job.stderr, time.monotonic() - t0


@pytest.fixture(scope="module")
def model(shared, tiny_model_dir):
    path = shared / "model"
    shutil.copytree(tiny_model_dir, path)
    return path


@pytest.mark.slow  # ~4 min: the slow tier (CI runs it after the default tier)
def test_train_on_three_nodes_then_resume(cluster, shared, model):
    rc, log, elapsed = _submit(cluster, _overrides(shared, model, steps=2))
    assert rc == 0 and "succeeded" in log.lower(), log[-8000:]
    run = shared / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and [r["weight_version"] for r in records] == [1, 2]
    assert all(r["sync/verified"] == 1.0 for r in records)
    for step in (1, 2):
        ckpt = run / "checkpoints" / f"step_{step:06d}"
        assert (ckpt / "COMPLETE").is_file() and (ckpt / "learner" / ".metadata").is_file()
        assert sorted(p.name for p in (ckpt / "learner").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (run / "sft_model" / "config.json").is_file() and (run / "model" / "model.safetensors").is_file()
    assert not list(run.glob(".*.tmp"))  # rank 0 renamed its exports itself
    nodes = json.loads((run / "nodes.json").read_text())
    print(f"\n[multinode] job 1 in {elapsed:.0f}s; nodes {json.dumps({k: v['node_id'][:8] for k, v in nodes.items()})}")
    driver, engine = nodes["driver"]["node_id"], nodes["rollout engine 0"]["node_id"]
    ranks = {nodes["learner rank 0"]["node_id"], nodes["learner rank 1"]["node_id"]}
    assert len(ranks) == 1 and len({driver, engine, *ranks}) == 3  # three different Ray nodes

    rc, log, elapsed = _submit(cluster, _overrides(shared, model, steps=3))
    assert rc == 0, log[-8000:]
    assert "resumed from" in log and "step_000002" in log, log[-8000:]
    assert "reusing it" in log  # the finished warm start is not repeated
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["weight_version"] == 3
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000002", "step_000003"]  # keep 2
    print(f"[multinode] resume in {elapsed:.0f}s")


def test_a_relative_output_dir_fails_at_start_with_the_storage_error(cluster, shared, model):
    rc, log, elapsed = _submit(cluster, _overrides(shared, model, steps=1, output_dir="outputs/relative_run"), 300)
    print(f"\n[multinode] relative output dir: exit {rc} after {elapsed:.0f}s")
    assert rc != 0
    assert "trainer.output_dir='outputs/relative_run' resolves to" in log, log
    assert "inside this node's copy of the job's working directory" in log
    assert elapsed < 120


def test_an_engine_on_a_node_without_the_shared_dir_fails_at_start_naming_it(cluster, shared, model):
    if not cluster.masked:
        pytest.skip("this machine does not allow mount namespaces (unshare -m): no node can be made blind")
    args = [
        a
        for a in _overrides(shared, model, steps=1, output_dir=str(shared / "run_masked"))
        if "rollout.resources" not in a
    ]
    rc, log, elapsed = _submit(cluster, [*args, "rollout.resources={masked_node: 1}", "sft.enabled=false"], 300)
    print(f"\n[multinode] engine on a blind node: exit {rc} after {elapsed:.0f}s")
    assert rc != 0
    assert re.search(r"is not shared: rollout engine 0 on node \S+ \(\S+, [0-9a-f]{8}\) cannot see", log), log[-8000:]
    assert "cannot see" in log and "driver.json" in log and "storage every node mounts" in log
    assert not (shared / "run_masked" / "metrics.jsonl").exists()
    assert elapsed < 120
