"""The driver of a run: the RL loop (``trainer``), its batches (``producer``), checkpoints, sample logs and the
``ivgr-dist scale`` / ``stop`` mailbox (``control``). It wires the roles; the heavy work is in rollout/, learner/, reward/
and sync/.
"""
