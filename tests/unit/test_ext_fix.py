"""The torchvision / torchaudio / torchcodec import fix (src/ivgr_dist/runtime/_ext_fix.py); where it is installed:
tests/integration/test_ext_fix_processes.py."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> dict:
    """Run ``code`` in a FRESH interpreter (as Ray workers and vLLM engine processes are) and parse its JSON."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_transformers_qwen_processor_and_vllm_multimodal_import():
    out = _run(
        """
        import json
        import ivgr_dist.runtime._ext_fix as fix
        fix.install()  # as the project's processes do when they start (tests/integration/test_ext_fix_processes.py)
        import torchvision, torchaudio
        from transformers import Qwen2_5_VLProcessor, Qwen2_5_VLForConditionalGeneration  # noqa: F401
        import transformers.audio_utils  # imports torchaudio when installed
        try:
            import vllm.multimodal  # imports torchcodec optionally
            vllm_ok = True
        except ModuleNotFoundError:
            vllm_ok = None  # vllm not installed in this environment
        print(json.dumps({"fixed": fix.fixed, "vllm": vllm_ok}))
        """
    )
    assert out["vllm"] in (True, None)


def test_torchcodec_failure_becomes_import_error_never_oserror():
    out = _run(
        """
        import json
        import ivgr_dist.runtime._ext_fix as fix
        fix.install()
        try:
            import torchcodec  # noqa: F401
            result = "ok"
        except ImportError as exc:
            result = "ImportError: " + str(exc)
        except OSError as exc:
            result = "OSError: " + str(exc)
        print(json.dumps({"result": result}))
        """
    )
    if out["result"].startswith("ImportError: No module named"):
        pytest.skip("torchcodec not installed")
    assert out["result"] == "ok" or out["result"].startswith("ImportError: torchcodec's native library")


def test_ensure_torchvision_ops_is_idempotent_and_a_noop_once_defined():
    import torch

    from ivgr_dist.runtime._ext_fix import ensure_torchvision_ops

    ensure_torchvision_ops()
    assert ensure_torchvision_ops() == []  # ops exist now (native or declared): nothing more to do
    for op in ("nms", "qnms"):
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{op}", "")


def test_finder_ignores_other_modules():
    from ivgr_dist.runtime._ext_fix import _ExtFixFinder

    finder = _ExtFixFinder()
    assert finder.find_spec("json") is None
    assert finder.find_spec("torchvision.ops") is None
    assert finder.once == {"torchvision", "torchaudio._extension.utils"}
