"""A record's images as stored: paths under the image root, raw bytes, or Hugging Face ``datasets`` structs.

An ``images`` cell holds one image or a list of them (the public recipe's loader takes all three forms):

- a path (text), relative to the image root (``data.image_root``; default the parquet file's folder);
- raw encoded image bytes (binary);
- a ``{bytes, path}`` struct, what the ``datasets`` Image feature writes: its bytes when present, else its path.

Paths resolve under the image root. An absolute path, or a ``..`` that leaves the root, is refused
(``image_outside_root``) unless ``data.allow_outside_image_root=true``: a data file must not read arbitrary
files of the machine it runs on by default. The check is on the path as written (normalised; symlinks are not
followed), so a data set may still link image folders in from elsewhere.

Load-time validation (:func:`probe_image`) and prompt building (:func:`open_image`) read images through this
module only, so both accept and refuse the same things.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from ivgr_dist.quote import short_repr, short_text

__all__ = ["ImageError", "image_list", "image_source", "open_image", "probe_image", "resolve_path"]

OUTSIDE_ROOT_KEY = "data.allow_outside_image_root"


class ImageError(ValueError):
    """An image of a record cannot be used; :attr:`reason` is its bad-row reason (``data/bad_rows/<reason>``)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def image_list(value: Any) -> list[Any]:
    """An ``images`` cell as a list of images (path text, bytes or ``{bytes, path}`` dicts); a single image is a
    list of one; null or blank text: none."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (bytes, bytearray, memoryview, dict)):
        return [value]
    return list(value)


def image_source(item: Any) -> tuple[str, Any]:
    """``("bytes", data)`` or ``("path", text)`` for one image of a cell; :class:`ImageError` (``missing_image``)
    for an empty one. A ``{bytes, path}`` struct gives its bytes when it has any (the path is then only the
    original file name, as ``datasets`` writes it), else its path."""
    if isinstance(item, dict):
        data = item.get("bytes")
        item = data if data else item.get("path")
    if isinstance(item, (bytes, bytearray, memoryview)) and len(item):
        return "bytes", bytes(item)
    if isinstance(item, str) and item.strip():
        return "path", item
    raise ImageError("missing_image", f"image {short_repr(item)} is neither a path nor image bytes")


def resolve_path(root: str | Path, rel: str, allow_outside: bool = False) -> Path:
    """``rel`` under ``root``; :class:`ImageError` (``image_outside_root``) when it leaves the root and
    ``allow_outside`` is off."""
    base = Path(os.path.normpath(os.path.abspath(root)))
    full = Path(os.path.normpath(os.path.join(base, rel)))  # an absolute `rel` replaces the root here
    if not allow_outside and not full.is_relative_to(base):
        raise ImageError(
            "image_outside_root",
            f"image path {short_repr(rel)} resolves to {short_text(str(full))}, outside the image root {base}; "
            f"set {OUTSIDE_ROOT_KEY}=true to read images outside it",
        )
    return full


def open_image(item: Any, root: str | Path, allow_outside: bool = False):
    """The PIL image of one image of a cell (opened lazily, as ``PIL.Image.open``: use it in a ``with``)."""
    from PIL import Image

    kind, value = image_source(item)
    if kind == "bytes":
        return Image.open(io.BytesIO(value))
    return Image.open(resolve_path(root, value, allow_outside))


def probe_image(item: Any, root: str | Path, allow_outside: bool = False) -> tuple[str | None, tuple | None, str]:
    """``(reason or None, (width, height), detail)``: the load-time check of one image (header read and
    ``verify()``; a file truncated in its pixel data passes here and fails when its prompt is built)."""
    from PIL import Image

    try:
        kind, value = image_source(item)
        if kind == "path":
            full = resolve_path(root, value, allow_outside)
            try:
                found = full.is_file()
            except OSError as exc:  # a name too long for the file system ...
                return "missing_image", None, f"image file {short_text(str(full))}: {short_text(exc)}"
            if not found:
                return "missing_image", None, f"image file {short_text(str(full))} does not exist"
            target, what = full, f"image file {short_text(str(full))}"
        else:
            target, what = io.BytesIO(value), f"image bytes ({len(value)} bytes)"
    except ImageError as exc:
        return exc.reason, None, str(exc)
    try:
        with Image.open(target) as im:
            size = im.size
            im.verify()
    except Exception as exc:  # PIL raises many types for bad data
        return "unreadable_image", None, f"{what} is unreadable ({type(exc).__name__}: {short_text(str(exc))})"
    return None, size, ""
