"""benchmarks/gpu_acceptance.py: its CPU mode runs the learner's real path (LearnerWorker on 2 gloo ranks, both
families) with Ray, vLLM and OmegaConf unimportable, as on the lent GPU machines; without CUDA the default mode
says that nothing ran; (``gpu``) the same on a CUDA GPU in bf16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_acceptance.py"
ABSENT = ["vllm", "ray", "omegaconf"]  # what the GPU machines lack and the package needs elsewhere


def _run(args: list[str], tmp_path: Path, timeout: float, env: dict | None = None) -> tuple[int, dict, str]:
    """Run the script as the GPU machines do (``PYTHONPATH=src``, the package not installed), with the
    ``ABSENT`` packages replaced by ones that fail to import (in every process, spawned ranks included)."""
    blocked = tmp_path / "absent"
    for name in ABSENT:
        (blocked / name).mkdir(parents=True, exist_ok=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is absent in this test')\n")
    path = os.pathsep.join([str(blocked), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
    )
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout[-3000:] + out.stderr[-3000:]  # ONE JSON verdict on stdout
    return out.returncode, json.loads(lines[0]), out.stderr


def _assert_real_path(verdict: dict, precision: str, backend: str) -> None:
    checks = verdict["checks"]
    assert verdict["summary"]["families_ran"] == ["qwen2_5_vl", "qwen3_vl"], verdict["summary"]
    for family in ("qwen2_5_vl", "qwen3_vl"):
        c = checks[f"tiny_{family}"]
        assert c["status"] == "ran" and c["failures"] == [] and c["model_type"] == family, c
        lrn = c["learner"]
        assert lrn["class"] == "ivgr_dist.learner.worker.LearnerWorker"
        assert lrn["backend"] == backend and lrn["precision"] == precision
        assert lrn["pack_sequences"] and lrn["sharded_init"] and lrn["gradient_checkpointing"], lrn
        assert lrn["all_params_fsdp_sharded"] and lrn["reference_loaded"]
        assert lrn["attn_implementation"] in ("flash_attention_2", "ivgr_packed_sdpa")
        assert c["packing"]["micro_batches"] >= 2 and c["packing"]["max_sequences_per_row"] >= 2, c["packing"]
        step = c["grpo_step"]
        assert step["padding_ratio"] == 0.0 and step["skipped_step"] == 0.0 and step["grad_norm"] > 0
        assert step["tensors_changed"] == step["tensors"] and step["logprob_mean_shift"] > 0
        lp = c["logprob_vs_fp32"]
        assert lp["within_tolerance"] and lp["max_abs_diff"] < lp["tolerance"]["max"] and lp["tokens"] > 100
    assert checks["weight_sync"]["status"] in ("ran", "skipped"), checks["weight_sync"]
    assert verdict["ok"] is True


def test_cpu_mode_runs_the_learner_worker_on_two_gloo_ranks_for_both_families(tmp_path, tiny_model_dir, tiny_qwen3_dir):
    work = tmp_path / "work"  # the session's tiny models (conftest), where the script looks for the ones it builds
    work.mkdir()
    (work / "tiny-qwen2_5_vl").symlink_to(tiny_model_dir)
    (work / "tiny-qwen3_vl").symlink_to(tiny_qwen3_dir)
    code, verdict, err = _run(
        ["--device", "cpu", "--world-size", "2", "--work-dir", str(work), "--out", str(tmp_path / "verdict.json")],
        tmp_path,
        timeout=240,
        env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
    )
    assert code == 0, json.dumps(verdict)[-3000:] + err[-3000:]
    assert json.loads((tmp_path / "verdict.json").read_text()) == verdict
    _assert_real_path(verdict, precision="fp32", backend="gloo")
    assert verdict["checks"]["weight_sync"] == {
        "status": "skipped",
        "reason": "skipped: vllm, ray, omegaconf not importable",
    }
    for family in ("qwen2_5_vl", "qwen3_vl"):
        lrn = verdict["checks"][f"tiny_{family}"]["learner"]
        assert lrn["world_size"] == 2 and lrn["local_param_fraction"] == pytest.approx(0.5, abs=0.05)
        assert lrn["attn_implementation"] == "ivgr_packed_sdpa"  # no CUDA: SDPA within each packed sequence


def test_default_mode_without_cuda_runs_nothing_and_exits_2(tmp_path):
    code, verdict, _ = _run([], tmp_path, timeout=120, env={"CUDA_VISIBLE_DEVICES": ""})
    assert code == 2 and verdict["ok"] is False and "no CUDA device" in verdict["error"]


@pytest.mark.gpu
def test_on_cuda_the_learner_runs_bf16_on_both_families(tmp_path):
    code, verdict, err = _run(["--world-size", "1", "--out", str(tmp_path / "verdict.json")], tmp_path, timeout=300)
    assert code == 0, json.dumps(verdict)[-3000:] + err[-3000:]
    _assert_real_path(verdict, precision="bf16", backend="nccl")
    for family in ("qwen2_5_vl", "qwen3_vl"):
        c = verdict["checks"][f"tiny_{family}"]
        assert c["learner_peak_mem_gib"] > 0
        want = "flash_attention_2" if verdict["environment"]["flash_attn_importable"] else "ivgr_packed_sdpa"
        assert c["learner"]["attn_implementation"] == want
