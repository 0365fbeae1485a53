"""Quoting data values in errors and logs: never raw image bytes, never a megabyte cell in a log line.

:func:`short_repr` is the one helper every data error and warning quotes values with. Bytes show as their
length only (they are image data, or garbage that a terminal would choke on); long text is cut with its full
length noted; containers are quoted element by element with the same rules, so a ``{bytes, path}`` image struct
shows its path and the size of its bytes.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QUOTE_LIMIT", "short_repr", "short_text"]

QUOTE_LIMIT = 200
"""Characters of a quoted value shown before it is cut."""


def short_repr(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message or a log line, at most about ``limit`` characters plus a note of
    the full size: bytes as ``<N bytes>``, text cut as ``'abc'... (N chars)``, containers cut after ``limit``."""
    out = _quote(value, limit)  # text, bytes and scalars come back short already
    if isinstance(value, (dict, list, tuple)) and len(out) > limit:
        out = f"{out[:limit]}... ({len(value)} items)"
    return out


def short_text(text: str, limit: int = QUOTE_LIMIT) -> str:
    """A message (an exception's text, a path) cut the same way, without quotes: at most ``limit`` characters
    plus a note of the full length."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _quote(value: Any, limit: int) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        if len(value) > limit:  # cut before repr: a 10 MB cell is never copied whole
            return f"{value[:limit]!r}... ({len(value)} chars)"
        return repr(value)
    if isinstance(value, dict):
        return _join("{", "}", (f"{_quote(k, limit)}: {_quote(v, limit)}" for k, v in value.items()), limit)
    if isinstance(value, (list, tuple)):
        brackets = "[]" if isinstance(value, list) else "()"
        return _join(brackets[0], brackets[1], (_quote(v, limit) for v in value), limit)
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _join(open_: str, close: str, parts, limit: int) -> str:
    """Join quoted parts, stopping once the text is longer than ``limit`` (a million-element list costs a few)."""
    out, size = [], 0
    for part in parts:
        if size > limit:
            out.append("...")
            break
        out.append(part)
        size += len(part) + 2
    return open_ + ", ".join(out) + close
