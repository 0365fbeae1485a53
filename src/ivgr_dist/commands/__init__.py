"""The commands besides ``train`` that ``ivgr-dist`` (``ivgr_dist.cli``) runs: ``eval`` (``evaluate``), the supervised
warm start (``sft``, also ``train``'s first stage), ``report`` and ``preflight`` (``train`` runs its fast form first).
"""
