"""benchmarks/gpu_learner_check.py: clean skip without CUDA, the CPU dry run with only torch +
transformers importable, and (``gpu``) the full check on a CUDA GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_learner_check.py"
# What the lent GPU machines lack (they have torch, transformers, pyarrow): made unimportable in the dry run.
ABSENT = ["vllm", "ray", "omegaconf", "torchvision", "PIL", "datasets"]


def _run(args: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_without_cuda_it_says_so_and_exits_0():
    out = _run([str(SCRIPT)], env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert _lines(out.stdout) == [{"skipped": True, "reason": "no CUDA GPU: skipping"}]


def test_cpu_dry_run_needs_only_torch_and_transformers():
    """The same code path on CPU/gloo with the tiny model, with Ray, vLLM, OmegaConf, torchvision and
    PIL made unimportable (``sys.modules[name] = None``)."""
    code = (
        f"import runpy, sys; [sys.modules.__setitem__(m, None) for m in {ABSENT!r}]; "
        f"sys.argv = [{str(SCRIPT)!r}, '--cpu', '--models', 'tiny']; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    out = _run(["-c", code], env={"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (line,) = _lines(out.stdout)
    assert line["model"] == "tiny" and line["ok"] is True and line["backend"] == "gloo"
    assert 0 < line["logprob_max_abs_diff"] < 0.1  # bf16 compute vs fp32 on the same weights
    assert line["grad_norm"] > 0 and line["batch"]["response_tokens"] == 32


@pytest.mark.gpu
def test_full_check_on_gpu():
    out = _run([str(SCRIPT)], timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = {line["model"]: line for line in _lines(out.stdout)}
    assert set(lines) == {"tiny", "0.5b"}
    for line in lines.values():
        assert line["ok"] is True and line["backend"] == "nccl", line
        assert line["logprob_max_abs_diff"] < 0.5 and line["peak_mem_gib"] > 0
    assert 0.4e9 < lines["0.5b"]["params"] < 0.6e9
