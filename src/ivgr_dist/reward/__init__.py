"""Rewards for iVGR rollouts.

- :mod:`ivgr_dist.reward.rules`: pure rule rewards (format, box validity, box IoU, rule-based accuracy) and the
  per-stream sums.
- :mod:`ivgr_dist.reward.reference`: choosing the grounded reference reasoning for the consistency reward and the
  per-record reference cache that is checkpointed with the model.

Nothing is imported here so that ``import ivgr_dist.reward`` stays cheap; import the submodules directly.
"""
