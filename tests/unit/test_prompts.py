"""Tests of the per-stream prompts (ivgr_dist.data.prompts) against the real Qwen2.5-VL processor."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from ivgr_dist.config import DataConfig, SyntheticConfig
from ivgr_dist.data.image import smart_resize
from ivgr_dist.data.prompts import INSTRUCTIONS, PromptBuilder
from ivgr_dist.data.synthetic import PALETTE, make_synthetic


@pytest.fixture(scope="module")
def tok_proc(tiny_model_dir):
    from transformers import AutoProcessor, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def builder(tok_proc):
    return PromptBuilder(tok_proc[0], DataConfig())


def _image_record(root, name, size, box=(10, 12, 40, 50), color="red"):
    img = Image.new("RGB", size, (255, 255, 255))
    x1, y1, x2, y2 = box
    ImageDraw.Draw(img).rectangle([x1, y1, x2 - 1, y2 - 1], fill=PALETTE[color])
    img.save(root / name)
    return {
        "problem": "<image>\nWhat color is the square?",
        "query": "What color is the square?",
        "answer": color,
        "images": [name],
        "target_instances": [{"bbox": [float(v) for v in box], "label": f"{color} square"}],
        "datasource": "synthetic_shapes",
        "question_type": "exact",
        "objects": "[]",
        "my_column": 5,
    }


@pytest.mark.parametrize("stream", ["grounded", "textual", "single"])
@pytest.mark.parametrize("size", [(112, 112), (150, 110), (30, 45), (900, 640)])
def test_token_count_matches_the_processor(tmp_path, builder, tok_proc, stream, size):
    rec = _image_record(tmp_path, "a.png", size, box=(2, 3, 20, 25))
    p = builder.build(rec, 3, stream, tmp_path)
    _, proc = tok_proc
    with Image.open(tmp_path / "a.png") as im:  # the ORIGINAL image: the processor resizes it itself
        ids = proc(text=[p.prompt_text], images=[im.convert("RGB")], return_tensors="pt")["input_ids"]
    assert p.num_prompt_tokens == ids.shape[1]
    h, w = smart_resize(size[1], size[0], min_pixels=3136, max_pixels=200704)
    assert p.num_prompt_tokens == len(p.prompt_token_ids) + (h // 28) * (w // 28) - 1
    # the already-resized image gives the same count (the rule is idempotent)
    ids2 = proc(text=[p.prompt_text], images=p.images, return_tensors="pt")["input_ids"]
    assert ids2.shape[1] == ids.shape[1]


def test_two_images_with_markers_are_interleaved(tmp_path, builder, tok_proc):
    for name, size in (("a.png", (112, 84)), ("b.png", (60, 200))):
        Image.new("RGB", size, (255, 255, 255)).save(tmp_path / name)
    rec = {
        "problem": "Left: <image> Right: <image> Which is wider?",
        "answer": "left",
        "images": ["a.png", "b.png"],
        "question_type": "free_form",
    }
    p = builder.build(rec, 0, "textual", tmp_path)
    assert "<image>" not in p.prompt_text
    assert "Left:<|vision_start|><|image_pad|><|vision_end|>Right:<|vision_start|>" in p.prompt_text
    assert p.prompt_text.count("<|image_pad|>") == 2 and len(p.images) == 2
    ims = [Image.open(tmp_path / n).convert("RGB") for n in ("a.png", "b.png")]
    ids = tok_proc[1](text=[p.prompt_text], images=ims)["input_ids"]
    assert p.num_prompt_tokens == len(ids[0])
    assert p.question == "Left: Right: Which is wider?"


def test_stream_instructions_and_format(tmp_path, builder):
    rec = _image_record(tmp_path, "a.png", (112, 112))
    texts = {s: builder.build(rec, 0, s, tmp_path).prompt_text for s in ("grounded", "textual", "single")}
    for s, t in texts.items():
        assert INSTRUCTIONS[s] in t
        assert "<think>" in t and "</think>" in t and "<answer>" in t and "</answer>" in t
        assert t.endswith("<|im_start|>assistant\n")
        assert "What color is the square?" in t
        assert t.count("<|image_pad|>") == 1 and "<image>" not in t
    assert "<box>[x1,y1,x2,y2]</box>" in texts["grounded"]
    assert "<box>" not in texts["textual"] and "<box>" not in texts["single"]
    assert len({t for t in texts.values()}) == 3


def test_multiple_choice_hint(tmp_path, builder):
    rec = _image_record(tmp_path, "a.png", (112, 112))
    rec["question_type"] = "multiple_choice"
    assert "option letter" in builder.build(rec, 0, "textual", tmp_path).prompt_text


def test_prompt_fields_and_rescaled_boxes(tmp_path, builder):
    rec = _image_record(tmp_path, "a.png", (300, 150), box=(200, 40, 260, 110), color="blue")
    p = builder.build(rec, 17, "grounded", tmp_path)
    assert (p.original_idx, p.stream, p.uid) == (17, "grounded", "17:grounded")
    assert (p.answer, p.question_type, p.datasource) == ("blue", "exact", "synthetic_shapes")
    assert p.question == "What color is the square?"
    assert p.extra == {"objects": "[]", "my_column": 5}
    (img,) = p.images
    assert img.mode == "RGB" and img.size == (308, 140)
    sx, sy = 308 / 300, 140 / 150
    assert len(p.target_boxes) == 1
    assert p.target_boxes[0] == pytest.approx([200 * sx, 40 * sy, 260 * sx, 110 * sy])
    x1, y1, x2, y2 = p.target_boxes[0]
    assert img.getpixel((int((x1 + x2) / 2), int((y1 + y2) / 2))) == PALETTE["blue"]
    assert img.getpixel((int(x1) - 3, int(y1) - 3)) == (255, 255, 255)
    assert p.prompt_token_ids == builder.token_ids([p.prompt_text])[0]


def test_text_only_record(builder, tmp_path):
    rec = {"problem": "What is 3 + 4?", "query": "What is 3 + 4?", "answer": "7", "images": [],
           "target_instances": [], "datasource": "synthetic_math", "question_type": "math"}  # fmt: skip
    p = builder.build(rec, 1, "single", tmp_path)
    assert p.images == [] and p.target_boxes == []
    assert "<|image_pad|>" not in p.prompt_text and "<|vision_start|>" not in p.prompt_text
    assert p.num_prompt_tokens == len(p.prompt_token_ids)
    assert "What is 3 + 4?\n" in p.prompt_text


def test_bad_stream_and_boxes_without_image(builder, tmp_path):
    rec = {"problem": "q", "answer": "a", "images": [], "target_instances": [{"bbox": [1, 2, 3, 4]}]}
    with pytest.raises(ValueError, match="stream='both'"):
        builder.build(rec, 0, "both", tmp_path)
    with pytest.raises(ValueError, match="no image"):
        builder.build(rec, 0, "grounded", tmp_path)


def test_default_synthetic_prompts_fit_the_tiny_budget(tmp_path, builder):
    make_synthetic(tmp_path, SyntheticConfig(), num_records=8, seed=0)
    import pyarrow.parquet as pq

    for r in pq.read_table(tmp_path / "train.parquet").to_pylist():
        for s in ("grounded", "textual", "single"):
            assert builder.build(r, 0, s, tmp_path).num_prompt_tokens <= DataConfig().max_prompt_length


def test_string_image_cell_and_json_target_instances(tmp_path, builder):
    """Real-data conversions often store one image path as a string and targets as JSON text."""
    import json

    rec = _image_record(tmp_path, "a.png", (300, 150), box=(200, 40, 260, 110), color="blue")
    plain = builder.build(rec, 3, "grounded", tmp_path)
    rec = {**rec, "images": "a.png", "target_instances": json.dumps(rec["target_instances"])}
    p = builder.build(rec, 3, "grounded", tmp_path)
    assert p.prompt_token_ids == plain.prompt_token_ids and len(p.images) == 1
    assert p.target_boxes == plain.target_boxes and p.target_labels == ["blue square"]
