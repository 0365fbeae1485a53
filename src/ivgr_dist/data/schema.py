"""Column types the data pipeline reads, checked when a parquet file is opened.

A column of the wrong type would otherwise surface as a raw traceback deep in loading or prompt building
(``'int' object has no attribute 'split'``, ``ArrowNotImplementedError: list_flatten``); here it is one
:class:`~ivgr_dist.data.dataset.DataError` naming the file, the column, the type found and the types accepted.

Accepted (any column may also be all-null; dictionary-encoded text, e.g. a pandas ``category``, counts as text):

=====================  ===========================================================================
column                 types
=====================  ===========================================================================
``problem``, ``query``  text
``answer``             text; integers are converted to text (``7`` -> ``"7"``). Floats and booleans
                       are refused: ``7.0`` would not match a reference answer ``"7"``, so store them
                       as the text you want compared
``images``             a path (text), image bytes (binary), a ``{bytes, path}`` struct (the ``datasets``
                       Image feature), or a list of one of these
``target_instances``   a list of structs with a ``bbox`` list of numbers (and optionally a text
                       ``label``), a list of 4-number lists, or JSON text of either
``datasource``,        text
``question_type``
=====================  ===========================================================================
"""

from __future__ import annotations

__all__ = ["EXPECTED", "column_problem", "is_binary"]

EXPECTED = {
    "problem": "text (string)",
    "query": "text (string)",
    "answer": "text (string) or integers (converted to text)",
    "images": "a path (string), image bytes (binary), a {bytes: binary, path: string} struct, or a list of one of these",
    "target_instances": (
        "a list of structs with a 'bbox' list of numbers (and an optional string 'label'), a list of "
        "[x1, y1, x2, y2] number lists, or JSON text (string) of either"
    ),
    "datasource": "text (string)",
    "question_type": "text (string)",
}
"""The types each column the pipeline reads may have, as the error states them."""


def _text(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_null(t) or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def is_binary(t) -> bool:
    """An Arrow binary type (any width or layout)."""
    import pyarrow as pa

    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def _list(t) -> bool:
    import pyarrow as pa

    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _numbers(t) -> bool:
    """A list of numbers (or of nulls: all empty)."""
    import pyarrow as pa

    if not _list(t):
        return False
    v = t.value_type
    return pa.types.is_integer(v) or pa.types.is_floating(v) or pa.types.is_null(v)


def _image(t) -> bool:
    """One image: path text, bytes, or a {bytes, path} struct."""
    import pyarrow as pa

    if _text(t) or is_binary(t):
        return True
    if not pa.types.is_struct(t):
        return False
    names = {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
    if not names.keys() & {"bytes", "path"}:
        return False
    ok_bytes = "bytes" not in names or is_binary(names["bytes"]) or pa.types.is_null(names["bytes"])
    ok_path = "path" not in names or _text(names["path"])
    return ok_bytes and ok_path


def _target(t) -> bool:
    """One target: a struct with a numeric ``bbox`` list (optional text ``label``), or a number list."""
    import pyarrow as pa

    if pa.types.is_null(t) or _numbers(t):
        return True
    if not pa.types.is_struct(t) or t.get_field_index("bbox") < 0:
        return False
    bbox = t.field(t.get_field_index("bbox")).type
    label = t.get_field_index("label")
    return (_numbers(bbox) or pa.types.is_null(bbox)) and (label < 0 or _text(t.field(label).type))


def _accepts(name: str, t) -> bool:
    import pyarrow as pa

    if pa.types.is_null(t):
        return True
    if name == "answer":
        return _text(t) or pa.types.is_integer(t)
    if name == "images":
        return _image(t) or (_list(t) and (_image(t.value_type) or pa.types.is_null(t.value_type)))
    if name == "target_instances":
        return _text(t) or (_list(t) and _target(t.value_type))
    return _text(t)


def column_problem(schema) -> str | None:
    """The first column of ``schema`` (a pyarrow schema) the pipeline reads whose type it cannot use, as
    ``"column 'x' has type T; expected ..."``, or None when every column it reads is fine."""
    for name in EXPECTED:
        if name in schema.names:
            t = schema.field(name).type
            if not _accepts(name, t):
                return f"column {name!r} has type {t}; expected {EXPECTED[name]}"
    return None
