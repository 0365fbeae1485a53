"""vLLM general plugin (entry point ``vllm.general_plugins``): runs in every vLLM process.

Registers the receiver of every weight-sync backend (``ivgr_dist.sync.BACKENDS``: ``ivgr_shm`` and
``ivgr_collective`` today) with vLLM's factory, so engines created with ``weight_transfer_config={"backend": ...}``
find them in their own (spawned) processes.
"""

from __future__ import annotations


def register() -> None:
    from ivgr_dist.runtime._ext_fix import install

    install()
    from ivgr_dist.sync import BACKENDS

    for backend in BACKENDS.values():
        backend.register()
