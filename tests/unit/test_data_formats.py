"""Real-world data at load and prompt time: column types, the three ways to store images (paths, bytes,
``datasets`` structs), the image-root rule, and values quoted in errors kept short."""

from __future__ import annotations

import io
import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from ivgr_dist.config import DataConfig
from ivgr_dist.data.dataset import DataError, RecordTable
from ivgr_dist.data.prompts import PromptBuilder
from ivgr_dist.data.sources import ImageError
from ivgr_dist.quote import short_repr

BOX = [10.0, 12.0, 40.0, 50.0]
STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def builder(tiny_model_dir):
    from transformers import AutoTokenizer

    return PromptBuilder(AutoTokenizer.from_pretrained(tiny_model_dir), DataConfig())


def _png(path, color="red", size=(96, 80)) -> bytes:
    img = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(img).rectangle([10, 12, 39, 49], fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path.read_bytes()


def _rows(n=4, images=None):
    """Records with one image each (``images[i]``, any form), the first two with a target box."""
    return [
        {
            "problem": "<image>\nWhat color is the square?",
            "answer": "red",
            "images": images[i] if images is not None else None,
            "target_instances": [{"bbox": BOX, "label": "red square"}] if i < 2 else [],
            "datasource": "mine",
            "question_type": "exact",
        }
        for i in range(n)
    ]


def _write(path, rows, types=None):
    schema = pa.schema(
        {
            "problem": pa.string(),
            "answer": pa.string(),
            "images": pa.list_(pa.string()),
            "target_instances": pa.list_(pa.struct([("bbox", pa.list_(pa.float64())), ("label", pa.string())])),
            "datasource": pa.string(),
            "question_type": pa.string(),
        }
        | (types or {})
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture
def images(tmp_path):
    """Four PNGs under tmp_path/images, as (relative path, bytes)."""
    return [(f"images/{i}.png", _png(tmp_path / f"images/{i}.png", size=(96 + 8 * i, 80))) for i in range(4)]


# ------------------------------------------------------------------------------------------ column types

WRONG = [
    ("problem", pa.int64(), [7] * 4, "text (string)"),
    ("query", pa.list_(pa.string()), [["a"]] * 4, "text (string)"),
    ("answer", pa.float64(), [7.0] * 4, "integers (converted to text)"),
    ("answer", pa.bool_(), [True] * 4, "integers (converted to text)"),
    ("images", pa.int64(), [3] * 4, "a {bytes: binary, path: string} struct"),
    ("images", pa.list_(pa.int64()), [[3]] * 4, "a {bytes: binary, path: string} struct"),
    ("images", pa.struct([("file", pa.string())]), [{"file": "a"}] * 4, "or a list of one of these"),
    ("target_instances", pa.int64(), [5] * 4, "a list of structs with a 'bbox' list of numbers"),
    ("target_instances", pa.list_(pa.string()), [["[1,2,3,4]"]] * 4, "JSON text (string) of either"),
    (
        "target_instances",
        pa.list_(pa.struct([("bbox", pa.string())])),
        [[{"bbox": "1 2 3 4"}]] * 4,
        "[x1, y1, x2, y2] number lists",
    ),
    ("datasource", pa.int64(), [1] * 4, "text (string)"),
    ("question_type", pa.list_(pa.string()), [["exact"]] * 4, "text (string)"),
]


@pytest.mark.parametrize(("column", "type_", "values", "expected"), WRONG, ids=lambda v: str(v)[:24])
def test_a_column_of_the_wrong_type_is_one_data_error_naming_file_column_and_types(
    tmp_path, images, builder, column, type_, values, expected
):
    rows = _rows(images=[[p] for p, _ in images])
    for row, value in zip(rows, values, strict=True):
        row[column] = value
    path = _write(tmp_path / "t.parquet", rows, {column: type_})
    with pytest.raises(DataError) as err:
        RecordTable([path], DataConfig(), builder)
    msg, stored = str(err.value), pq.read_schema(path).field(column).type
    assert msg.startswith(f"{path}: column {column!r} has type {stored}; expected ") and expected in msg, msg


def test_accepted_conversions_integer_answers_and_categorical_text(tmp_path, images, builder):
    table = pa.Table.from_pylist(_rows(images=[[p] for p, _ in images]))
    table = table.set_column(1, "answer", pa.array([7, 8, 9, 10], pa.int64()))
    table = table.set_column(4, "datasource", pa.array(["mine"] * 4).dictionary_encode())  # a pandas category
    pq.write_table(table, tmp_path / "t.parquet")
    t = RecordTable([tmp_path / "t.parquet"], DataConfig(), builder)
    a, b = t.prompts([(0, "grounded"), (3, "single")])
    assert (a.answer, b.answer, a.datasource) == ("7", "10", "mine")


# ------------------------------------------------------------------------------------------ image forms


def _same_prompts(table, reference):
    for i, stream in [(0, "grounded"), (0, "textual"), (1, "grounded"), (2, "single"), (3, "single")]:
        got, want = table.prompt(i, stream), reference.prompt(i, stream)
        assert got.prompt_token_ids == want.prompt_token_ids and got.num_prompt_tokens == want.num_prompt_tokens
        assert got.target_boxes == want.target_boxes and got.images[0].size == want.images[0].size
        assert got.images[0].tobytes() == want.images[0].tobytes()


FORMS = {
    "path": (pa.string(), lambda rel, data: rel),
    "bytes": (pa.binary(), lambda rel, data: data),
    "struct": (STRUCT, lambda rel, data: {"bytes": data, "path": os.path.basename(rel)}),
    "struct_path_only": (STRUCT, lambda rel, data: {"bytes": None, "path": rel}),
    "list_of_bytes": (pa.list_(pa.binary()), lambda rel, data: [data]),
    "list_of_structs": (pa.list_(STRUCT), lambda rel, data: [{"bytes": data, "path": None}]),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_paths_bytes_and_structs_load_to_the_same_prompts_as_a_path_list(tmp_path, images, builder, form):
    reference = RecordTable(
        [_write(tmp_path / "ref.parquet", _rows(images=[[p] for p, _ in images]))], DataConfig(), builder
    )
    type_, cell = FORMS[form]
    path = _write(tmp_path / "t.parquet", _rows(images=[cell(p, d) for p, d in images]), {"images": type_})
    table = RecordTable([path], DataConfig(bad_rows="raise"), builder)
    assert table.paired_ids == [0, 1] and table.single_ids == [2, 3]
    _same_prompts(table, reference)


def test_a_parquet_written_by_the_datasets_package(tmp_path, images, builder, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)  # datasets reads relative image paths from the working directory
    reference = RecordTable(
        [_write(tmp_path / "ref.parquet", _rows(images=[[p] for p, _ in images]))], DataConfig(), builder
    )
    features = datasets.Features(
        {
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "images": datasets.List(datasets.Image()),
            "target_instances": datasets.List(
                {"bbox": datasets.List(datasets.Value("float64")), "label": datasets.Value("string")}
            ),
            "datasource": datasets.Value("string"),
            "question_type": datasets.Value("string"),
        }
    )
    pil = [[Image.open(io.BytesIO(d))] for _, d in images]  # datasets encodes PIL images as {bytes, path}
    ds = datasets.Dataset.from_list(_rows(images=pil), features=features)
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    assert pq.read_schema(tmp_path / "hf.parquet").field("images").type == pa.list_(STRUCT)
    _same_prompts(RecordTable([tmp_path / "hf.parquet"], DataConfig(bad_rows="raise"), builder), reference)
    # a single Image feature holding file paths (bytes null): the path is used, under the image root
    single = datasets.Features({**features, "images": datasets.Image()})
    rows = _rows(images=[str(p) for p, _ in images])
    datasets.Dataset.from_list(rows, features=single).to_parquet(str(tmp_path / "hf1.parquet"))
    assert pq.read_schema(tmp_path / "hf1.parquet").field("images").type == STRUCT
    _same_prompts(RecordTable([tmp_path / "hf1.parquet"], DataConfig(bad_rows="raise"), builder), reference)


def test_bad_bytes_and_empty_entries_are_bad_rows_at_load(tmp_path, images):
    cells = [[d] for _, d in images]
    cells[1] = [b"not an image at all"]
    cells[2] = [b""]
    path = _write(tmp_path / "t.parquet", _rows(images=cells), {"images": pa.list_(pa.large_binary())})
    t = RecordTable([path], DataConfig(max_bad_row_fraction=1.0))
    m = t.metrics()
    assert m["data/bad_rows/unreadable_image"] == 1 and m["data/bad_rows/missing_image"] == 1
    assert t.streams(1) == t.streams(2) == () and t.streams(0) == ("grounded", "textual")
    assert "image bytes (19 bytes) is unreadable" in " ".join(t.bad_examples)


# ------------------------------------------------------------------------------------------ image root


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_an_image_path_outside_the_root_is_a_bad_row_unless_allowed(tmp_path, images, builder, where):
    outside = tmp_path / "elsewhere" / "x.png"
    _png(outside, "blue")
    root = tmp_path / "images"  # holds 0.png ... 3.png
    rel = "../elsewhere/x.png" if where == "dotdot" else str(outside)
    path = _write(tmp_path / "t.parquet", _rows(images=[[rel]] + [[f"{k}.png"] for k in (1, 2, 3)]))
    with pytest.raises(DataError, match=r"row 0 .*image_outside_root: .*set data.allow_outside_image_root=true"):
        RecordTable([path], DataConfig(image_root=str(root), bad_rows="raise"), builder)
    t = RecordTable([path], DataConfig(image_root=str(root), max_bad_row_fraction=1.0), builder)
    assert t.metrics()["data/bad_rows/image_outside_root"] == 1 and t.metrics()["data/bad_rows/total"] == 1
    assert t.streams(0) == () and t.streams(1) == ("grounded", "textual")
    cfg = DataConfig(image_root=str(root), allow_outside_image_root=True)
    allowed = RecordTable([path], cfg, PromptBuilder(builder.tokenizer, cfg))
    assert allowed.metrics()["data/bad_rows/total"] == 0
    assert allowed.prompt(0, "grounded").images[0].getpixel((20, 20)) == (0, 0, 255)
    # prompt building applies the same rule (a record that reached it some other way)
    record = {"problem": "<image> q", "answer": "a", "images": [rel]}
    with pytest.raises(ImageError, match="outside the image root") as err:
        builder.load_images(record, root)
    assert err.value.reason == "image_outside_root"


# ------------------------------------------------------------------------------------------ quoting


def test_short_repr_never_shows_bytes_and_cuts_long_values():
    assert short_repr(b"\x89PNG" * 1000) == "<4000 bytes>"
    assert short_repr({"bytes": b"\xff" * 10, "path": "a.jpg"}) == "{'bytes': <10 bytes>, 'path': 'a.jpg'}"
    cut = short_repr("x" * 10_000_000)
    assert len(cut) < 300 and cut.endswith("(10000000 chars)")
    assert len(short_repr(list(range(1_000_000)))) < 300 and short_repr(list(range(10**6))).endswith("(1000000 items)")
    assert short_repr([1.5, "a"]) == "[1.5, 'a']"


@pytest.mark.parametrize("cell", ["path", "bytes", "bbox"])
def test_a_10_mb_cell_quoted_in_an_error_or_a_warning_is_truncated(tmp_path, images, cell, caplog):
    big = "x" * (10 << 20)
    cells, types = [[p] for p, _ in images], {}
    rows = _rows(images=cells)
    if cell == "path":
        rows[1]["images"] = [big]
    elif cell == "bytes":
        rows = _rows(images=[[d] for _, d in images])
        rows[1]["images"] = [big.encode()]
        types = {"images": pa.list_(pa.binary())}
    else:  # a malformed box stored as JSON text, quoted in the bad_bbox detail
        rows = [{**r, "target_instances": json.dumps(r["target_instances"])} for r in rows]
        rows[1]["target_instances"] = json.dumps([{"bbox": big, "label": "x"}])
        types = {"target_instances": pa.string()}
    path = _write(tmp_path / "t.parquet", rows, types)
    with pytest.raises(DataError) as err:
        RecordTable([path], DataConfig(bad_rows="raise"))
    msg = str(err.value)
    assert "row 1 " in msg and len(msg) < 1000, msg[:2000]
    assert "xxxx" * 100 not in msg
    with caplog.at_level(logging.WARNING, logger="ivgr_dist.data.dataset"):
        RecordTable([path], DataConfig(max_bad_row_fraction=1.0))
    assert "row 1" in caplog.text and len(caplog.text) < 2000
