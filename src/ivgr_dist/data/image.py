"""Image resizing the Qwen2.5-VL way, and boxes rescaled with the image.

Qwen2.5-VL cuts an image into 14x14 patches and merges 2x2 patches into one token, so both sides
of the resized image must be multiples of 28 and the image costs ``(h / 28) * (w / 28)`` tokens.
The pixel count is kept within ``[min_pixels, max_pixels]``. The rule here mirrors the one in the
transformers image processor (which the rollout engines use), so a prompt's token count computed
here matches what the engine sees; it is idempotent: a size the rule produced maps to itself.

Boxes follow the model family's convention (``ivgr_dist.models.family``): Qwen2.5-VL reasons in
absolute pixel coordinates of the image it is shown, so target boxes are rescaled from original-image
pixels into resized-image pixels with the per-axis scale factors (:func:`rescale_box`); Qwen3-VL
writes integers 0-1000 relative to the image's width and height (:func:`relative_box`), which resizing
does not change. The side multiple (28 here) is the Qwen2.5-VL default only: callers pass the model's
own ``patch_size * merge_size``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "FACTOR",
    "MAX_ASPECT_RATIO",
    "box_in_model_space",
    "relative_box",
    "rescale_box",
    "resize_image",
    "smart_resize",
]

FACTOR = 28
"""Side multiple for Qwen2.5-VL: patch size 14 x spatial merge 2."""
MAX_ASPECT_RATIO = 200
"""Longer side / shorter side above this is rejected (as the Qwen2.5-VL processor does)."""


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = 3136,
    max_pixels: int = 200704,
) -> tuple[int, int]:
    """Resized ``(height, width)``: sides multiples of ``factor``, pixel count in ``[min_pixels, max_pixels]``.

    Each side is rounded to the nearest multiple of ``factor`` (Python ``round``, as transformers
    does). If the area is then above ``max_pixels`` both sides are scaled down by the same factor and
    floored to multiples (at least ``factor``); if it is below ``min_pixels`` they are scaled up and
    ceiled. Raises ``ValueError`` naming the size for a side < 1, an aspect ratio above 200, bad
    bounds, or when no size within the bounds exists for this shape (only for extreme aspect ratios
    with narrow bounds). Default bounds are ``DataConfig``'s (the tiny CPU setting).
    """
    if factor < 1:
        raise ValueError(f"factor={factor!r}: must be >= 1")
    if min_pixels < factor * factor:
        raise ValueError(f"min_pixels={min_pixels!r}: must be >= factor**2={factor * factor}")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels={max_pixels!r}: must be >= min_pixels={min_pixels}")
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} (HxW): both sides must be >= 1 pixel")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise ValueError(f"image size {height}x{width} (HxW): aspect ratio {aspect:.1f} exceeds {MAX_ASPECT_RATIO}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    if not (min_pixels <= h * w <= max_pixels):
        raise ValueError(
            f"image size {height}x{width} (HxW): resizing gives {h}x{w} = {h * w} pixels, outside "
            f"[min_pixels={min_pixels}, max_pixels={max_pixels}]; the aspect ratio is too extreme for these bounds"
        )
    return h, w


def resize_image(img, min_pixels: int, max_pixels: int, factor: int = FACTOR):
    """``(resized RGB image, sx, sy)`` with ``sx = new_width / width`` and ``sy = new_height / height``.

    Bicubic resampling, as the Qwen2.5-VL processor uses. An image already at its target size is
    only converted to RGB (a copy), so resizing twice changes nothing.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    new_h, new_w = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    if (new_w, new_h) == (width, height):
        out = img.copy()
    else:
        from PIL import Image

        out = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    return out, new_w / width, new_h / height


def rescale_box(box: Sequence[float], sx: float, sy: float) -> list[float]:
    """``[x1, y1, x2, y2]`` in original pixels -> resized pixels (x scaled by ``sx``, y by ``sy``)."""
    if len(box) != 4:
        raise ValueError(f"box {list(box)!r}: must have 4 numbers [x1, y1, x2, y2]")
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]


def relative_box(box: Sequence[float], width: int, height: int) -> list[float]:
    """``[x1, y1, x2, y2]`` in original pixels -> 0-1000 relative to the original ``width`` and ``height``."""
    if len(box) != 4:
        raise ValueError(f"box {list(box)!r}: must have 4 numbers [x1, y1, x2, y2]")
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} (WxH): both sides must be >= 1 pixel")
    x1, y1, x2, y2 = (float(v) for v in box)
    return [1000.0 * x1 / width, 1000.0 * y1 / height, 1000.0 * x2 / width, 1000.0 * y2 / height]


def box_in_model_space(
    box: Sequence[float], size: tuple[int, int], scale: tuple[float, float], coords: str
) -> list[float]:
    """A target box in the coordinates the model writes: ``coords`` is ``pixels`` (the resized image,
    ``scale`` = (sx, sy)) or ``relative_1000`` (``size`` = the original (width, height))."""
    if coords == "pixels":
        return rescale_box(box, *scale)
    if coords == "relative_1000":
        return relative_box(box, *size)
    raise ValueError(f"coords={coords!r}: must be 'pixels' or 'relative_1000'")
