"""What a model family means for images and boxes, read from the model directory (never assumed).

- **Image side multiple** (``factor``): the image processor's ``patch_size * merge_size``; 28 for Qwen2.5-VL
  (14-pixel patches), 32 for Qwen3-VL (16-pixel patches). Both families' processors are transformers'
  Qwen2-VL image processor, whose resize rule ``ivgr_dist.data.image.smart_resize`` mirrors; a directory
  with another image processor is refused rather than resized by a rule it does not use.
- **The processor's own pixel bounds** (``size.shortest_edge`` / ``longest_edge``, or the older
  ``min_pixels`` / ``max_pixels``): the engines and the learner run that processor on the pipeline's
  already-resized images, so ``data.min_pixels`` / ``data.max_pixels`` must lie inside them, or the processor
  would resize again and the token counts would no longer match (:func:`check_pixel_bounds`).
- **Box coordinates** (``box_coords``): Qwen2.5-VL grounds in absolute pixels of the image it is shown, so
  target boxes are rescaled into the resized image; Qwen3-VL grounds in integers 0-1000 relative to the
  image width and height, so target boxes become ``1000 * x / width`` and ``1000 * y / height`` of the
  original image (resizing does not change them). The convention is a property of the architecture
  (``config.json`` ``model_type``), listed in :data:`BOX_COORDS`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BOX_COORDS", "ImageSpec", "check_pixel_bounds", "image_spec"]

BOX_COORDS = {
    "qwen2_vl": "pixels",
    "qwen2_5_vl": "pixels",
    "qwen3_vl": "relative_1000",
    "qwen3_vl_moe": "relative_1000",
}
"""How each supported architecture writes a box: ``pixels`` (absolute, resized image) or ``relative_1000``."""

_RESIZE_RULE_PROCESSORS = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")
"""Image processors that resize with the Qwen2-VL ``smart_resize`` rule the data pipeline mirrors."""


@dataclass(frozen=True)
class ImageSpec:
    """How one model directory's family sees images and writes boxes."""

    model_type: str
    factor: int
    """Resized image sides are multiples of this (patch size x spatial merge)."""
    box_coords: str
    """``pixels`` or ``relative_1000`` (see the module docstring)."""
    min_pixels: int | None = None
    """The processor's lower pixel bound (None where its config names none)."""
    max_pixels: int | None = None
    """The processor's upper pixel bound (None where its config names none)."""


def _image_processor_config(model_dir: Path) -> dict:
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = model_dir / name
        if path.is_file():
            conf = json.loads(path.read_text())
            return conf.get("image_processor", conf)
    raise FileNotFoundError(
        f"{model_dir}: no preprocessor_config.json or processor_config.json; the image processor (patch and "
        "merge size, pixel bounds) cannot be read"
    )


def image_spec(model_dir: str | Path) -> ImageSpec:
    """The :class:`ImageSpec` of the model in ``model_dir`` (``ValueError`` naming what is unsupported)."""
    model_dir = Path(model_dir)
    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
    if model_type not in BOX_COORDS:
        raise ValueError(
            f"{model_dir}: model_type={model_type!r} is not a supported vision-language family; "
            f"supported: {sorted(BOX_COORDS)} (each grounds boxes in a known coordinate convention)"
        )
    conf = _image_processor_config(model_dir)
    kind = conf.get("image_processor_type", "")
    if kind and kind not in _RESIZE_RULE_PROCESSORS:
        raise ValueError(
            f"{model_dir}: image_processor_type={kind!r} is not one whose resize rule the data pipeline mirrors "
            f"({list(_RESIZE_RULE_PROCESSORS)})"
        )
    if "patch_size" not in conf or "merge_size" not in conf:
        raise ValueError(f"{model_dir}: the image processor config has no patch_size / merge_size")
    size = conf.get("size") or {}
    lo = conf.get("min_pixels", size.get("shortest_edge"))
    hi = conf.get("max_pixels", size.get("longest_edge"))
    return ImageSpec(
        model_type=model_type,
        factor=int(conf["patch_size"]) * int(conf["merge_size"]),
        box_coords=BOX_COORDS[model_type],
        min_pixels=None if lo is None else int(lo),
        max_pixels=None if hi is None else int(hi),
    )


def check_pixel_bounds(spec: ImageSpec, min_pixels: int, max_pixels: int, model_dir: str | Path = "") -> None:
    """``data.min_pixels`` / ``data.max_pixels`` must lie inside the processor's own bounds; else the
    processor would resize the pipeline's images again (``ValueError`` naming both)."""
    where = f" of {model_dir}" if model_dir else ""
    if spec.min_pixels is not None and min_pixels < spec.min_pixels:
        raise ValueError(
            f"data.min_pixels={min_pixels} is below the image processor's minimum {spec.min_pixels}{where}: it would "
            f"enlarge small images the pipeline sized for the prompt; set data.min_pixels >= {spec.min_pixels}"
        )
    if spec.max_pixels is not None and max_pixels > spec.max_pixels:
        raise ValueError(
            f"data.max_pixels={max_pixels} is above the image processor's maximum {spec.max_pixels}{where}: it would "
            f"shrink large images the pipeline sized for the prompt; set data.max_pixels <= {spec.max_pixels}"
        )
