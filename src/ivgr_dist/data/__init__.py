"""Data pipeline: records (parquet + image folder) -> validated table -> per-stream prompts -> batches.

- :mod:`ivgr_dist.data.synthetic` writes a synthetic set of coloured shapes in the iVGR-RL-51K layout.
- :mod:`ivgr_dist.data.image` resizes images the Qwen2.5-VL way and rescales boxes with them.
- :mod:`ivgr_dist.data.prompts` holds the per-stream instructions and turns a record into a ``Prompt``.
- :mod:`ivgr_dist.data.dataset` loads and validates parquet files lazily and decides each record's streams.
- :mod:`ivgr_dist.data.sampler` draws batches that keep grounded/textual pairs together, resumable exactly.
"""
