"""vLLM general plugin (entry point ``vllm.general_plugins``): runs in every vLLM process.

Registers ivgr-dist's weight-transfer engines with vLLM's factory (``ivgr_shm`` and ``ivgr_collective``), so
engines created with ``weight_transfer_config={"backend": ...}`` find them in their own (spawned) processes.
"""

from __future__ import annotations


def register() -> None:
    from ivgr_dist._ext_fix import install

    install()
    from ivgr_dist.sync import collective, shm

    shm.register_with_vllm()
    collective.register_with_vllm()
