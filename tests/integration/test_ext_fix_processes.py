"""The torchvision import fix (ivgr_dist.runtime._ext_fix) reaches every kind of process the project starts, with no ``.pth``.

Each check runs in a bare Python environment: a virtual environment whose site-packages only names this one's on
a path line, so no ``.pth`` of this environment runs there (an older install's ``ivgr_dist_ext_fix.pth`` would
otherwise put the fix everywhere and hide a gap), with this checkout's ``src`` on PYTHONPATH. The fix's effects
are checked in tests/unit/test_ext_fix.py; here only that its finder is in place where it must be.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

import ivgr_dist

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SRC = Path(ivgr_dist.__file__).resolve().parents[1]
FINDER = 'any(type(f).__name__ == "_ExtFixFinder" for f in sys.meta_path)'


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = (venv / "lib").glob("python*/site-packages")
    # this environment's package directories (its own, and any it names on path lines), as path lines only
    paths = [sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith(("site-packages", "dist-packages")))]
    (site / "this_env.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(paths)))
    return venv / "bin" / "python"


def _run(python: Path, code: str, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(cwd)])
    proc = subprocess.run(
        [str(python), "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240, env=env, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_bare_environment_runs_no_pth(bare_python, tmp_path):
    out = _run(bare_python, f"import json, sys, ivgr_dist; print(json.dumps({{'finder': {FINDER}}}))", tmp_path)
    assert out == {"finder": False}  # else the checks below would prove nothing


def test_ray_workers_started_by_init_ray_have_the_fix(bare_python, tmp_path):
    out = _run(
        bare_python,
        f"""
        import json, sys
        import ray
        from ivgr_dist.config import load_config
        from ivgr_dist.runtime.startup import init_ray

        init_ray(load_config(None))

        @ray.remote(num_cpus=0)
        def probe():
            finder = {FINDER}
            from transformers import Qwen2_5_VLProcessor  # noqa: F401  (imports torchvision)
            return finder

        print(json.dumps({{"worker_finder": ray.get(probe.remote(), timeout=120)}}))
        ray.shutdown()
        """,
        tmp_path,
    )
    assert out == {"worker_finder": True}


def test_multiprocessing_children_of_a_command_have_the_fix(bare_python, tmp_path):
    # vLLM's EngineCore is such a child: it imports transformers while unpickling its target, before any plugin
    (tmp_path / "probe_child.py").write_text(
        f"import json, sys\nFINDER_AT_IMPORT = {FINDER}\n\n"
        "def report(path):\n    open(path, 'w').write(json.dumps(FINDER_AT_IMPORT))\n"
    )
    out = _run(
        bare_python,
        f"""
        import json, multiprocessing, sys
        import ivgr_dist.cli  # the command line installs the fix when imported
        import probe_child

        if __name__ == "__main__":
            child = multiprocessing.get_context("spawn").Process(target=probe_child.report, args=["child.json"])
            child.start()
            child.join(120)
            print(json.dumps({{"driver": {FINDER}, "child": json.load(open("child.json"))}}))
        """,
        tmp_path,
    )
    assert out == {"driver": True, "child": True}


def test_vllm_plugin_installs_the_fix(bare_python, tmp_path):
    pytest.importorskip("vllm")
    out = _run(
        bare_python,
        f"""
        import json, sys
        from vllm.plugins import load_general_plugins

        load_general_plugins()  # the entry point ivgr_dist.sync.vllm_plugin:register
        print(json.dumps({{"finder": {FINDER}}}))
        """,
        tmp_path,
    )
    assert out == {"finder": True}
