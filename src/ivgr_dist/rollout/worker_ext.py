"""Methods vLLM mixes into every worker of a rollout engine (engine argument ``worker_extension_cls``).

``AsyncLLM.collective_rpc("ivgr_...")`` calls them BY NAME on each worker (every TP rank): a name travels
to multiprocessing workers as it is, where a function object would need vLLM's insecure pickle fallback.
Names carry the ``ivgr_`` prefix so they cannot collide with vLLM's own worker methods (vLLM checks).
"""

from __future__ import annotations

import os

QUALNAME = "ivgr_dist.rollout.worker_ext.IvgrWorkerExtension"
"""What ``engine_kwargs`` passes as ``worker_extension_cls``."""


class IvgrWorkerExtension:
    def ivgr_missing_parameters(self) -> list[str]:
        """Engine parameters (engine naming) the last weight update did not reach on this worker.

        A full push must give every engine parameter a new value: names vLLM does not know already fail in
        its loader ("no module or parameter named ..."); a parameter the push never reached would keep the
        old weights silently. Weight-transfer engines of this project record ``missing`` when an update
        finishes; others (vLLM's own NCCL engine) report nothing."""
        engine = getattr(self, "weight_transfer_engine", None)
        return list(getattr(engine, "missing", None) or [])

    def ivgr_ping(self) -> int:
        """The health probe's no-op: answers with this worker's PID, proving that the EngineCore loop and this
        worker both still run (``RolloutWorker.probe``)."""
        return os.getpid()
