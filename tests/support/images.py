"""Image faults for data tests: a JPEG cut in its pixel data (passes the load-time checks, fails to decode)."""

from __future__ import annotations

import io

import numpy as np


def cut_jpeg(path) -> None:
    """Overwrite ``path`` with a JPEG cut in half: its header reads and ``verify()`` passes (the load-time check),
    decoding fails with "image file is truncated". PIL detects the format from the bytes, not the file name."""
    from PIL import Image

    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
