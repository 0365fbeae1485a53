"""Model families: what the model directory says about images and boxes, and the parameter names per
architecture (both tiny families are real transformers models built locally)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ivgr_dist.config import DataConfig
from ivgr_dist.data.image import box_in_model_space, relative_box
from ivgr_dist.models.family import check_pixel_bounds, image_spec
from ivgr_dist.models.naming import NamingError, checkpoint_names


def test_image_spec_reads_each_family_from_its_directory(tiny_model_dir, tiny_qwen3_dir):
    q25, q3 = image_spec(tiny_model_dir), image_spec(tiny_qwen3_dir)
    assert (q25.model_type, q25.factor, q25.box_coords) == ("qwen2_5_vl", 28, "pixels")
    assert (q3.model_type, q3.factor, q3.box_coords) == ("qwen3_vl", 32, "relative_1000")
    assert (q3.min_pixels, q3.max_pixels) == (DataConfig().min_pixels, DataConfig().max_pixels)


def test_image_spec_refuses_what_it_cannot_know(tmp_path, tiny_model_dir):
    other = tmp_path / "m"
    shutil.copytree(tiny_model_dir, other)
    conf = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**conf, "model_type": "llava"}))
    with pytest.raises(ValueError, match=r"model_type='llava' is not a supported vision-language family"):
        image_spec(other)
    (other / "config.json").write_text(json.dumps(conf))
    proc = json.loads((other / "processor_config.json").read_text())
    proc["image_processor"]["image_processor_type"] = "SiglipImageProcessor"
    (other / "processor_config.json").write_text(json.dumps(proc))
    with pytest.raises(ValueError, match="SiglipImageProcessor.*resize rule"):
        image_spec(other)


def test_data_pixel_bounds_must_lie_inside_the_processors(tiny_qwen3_dir):
    spec = image_spec(tiny_qwen3_dir)
    check_pixel_bounds(spec, spec.min_pixels, spec.max_pixels)
    with pytest.raises(ValueError, match=r"data.min_pixels=1024 is below the image processor's minimum 3136"):
        check_pixel_bounds(spec, 1024, spec.max_pixels)
    with pytest.raises(ValueError, match=r"data.max_pixels=999999 is above .* maximum 200704.*<= 200704"):
        check_pixel_bounds(spec, spec.min_pixels, 999999)


def test_boxes_follow_the_family_convention():
    box = [10, 20, 60, 100]  # original pixels of a 200 x 400 (W x H) image resized by sx=0.5, sy=0.25
    assert box_in_model_space(box, (200, 400), (0.5, 0.25), "pixels") == [5.0, 5.0, 30.0, 25.0]
    assert box_in_model_space(box, (200, 400), (0.5, 0.25), "relative_1000") == [50.0, 50.0, 300.0, 250.0]
    assert relative_box([0, 0, 200, 400], 200, 400) == [0.0, 0.0, 1000.0, 1000.0]
    with pytest.raises(ValueError, match="coords='normalized'"):
        box_in_model_space(box, (200, 400), (1, 1), "normalized")


def test_qwen3_prompts_count_tokens_as_its_processor_expands_them(tmp_path, tiny_qwen3_dir):
    """A grounded Qwen3-VL prompt: 32-pixel image grid, relative target boxes, the matching instruction;
    the learner's encoder (the HF processor) expands the image to exactly the counted tokens."""
    from PIL import Image
    from transformers import AutoTokenizer

    from ivgr_dist.data.prompts import PromptBuilder
    from ivgr_dist.learner.batch import SampleEncoder
    from ivgr_dist.types import Rollout

    Image.new("RGB", (150, 100), "white").save(tmp_path / "a.png")
    record = {
        "problem": "<image>What colour is the circle?",
        "answer": "red",
        "images": ["a.png"],
        "target_instances": [{"bbox": [15, 10, 75, 60], "label": "circle"}],
    }
    spec = image_spec(tiny_qwen3_dir)
    builder = PromptBuilder(AutoTokenizer.from_pretrained(tiny_qwen3_dir), DataConfig(), spec.factor, spec.box_coords)
    prompt = builder.build(record, 0, "grounded", tmp_path)
    assert prompt.images[0].size == (160, 96)  # sides rounded to multiples of 32
    assert prompt.target_boxes == [[100.0, 100.0, 500.0, 600.0]]  # 0-1000 of the original 150 x 100
    assert "0 to 1000 relative to the image" in prompt.prompt_text
    assert prompt.num_prompt_tokens == len(prompt.prompt_token_ids) - 1 + (160 // 32) * (96 // 32)
    rollout = Rollout(
        prompt=prompt, sample_idx=0, response_ids=[5, 6], response_text="", logprobs=[-1.0, -1.0], weight_version=0
    )
    sample = SampleEncoder(tiny_qwen3_dir).encode(rollout)
    assert sample.prompt_len == prompt.num_prompt_tokens


def test_checkpoint_names_are_what_save_pretrained_writes_for_each_family(tiny_model_dir, tiny_qwen3_dir):
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    for model_dir in (tiny_model_dir, tiny_qwen3_dir):
        model = AutoModelForImageTextToText.from_pretrained(model_dir)
        names = checkpoint_names(model)
        with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
            saved = set(f.keys())
        assert set(names.values()) == saved, sorted(set(names.values()) ^ saved)[:5]
        assert list(names) == list(model.state_dict())  # in the order asked for
    q25 = checkpoint_names(AutoModelForImageTextToText.from_pretrained(tiny_model_dir))
    assert q25["model.language_model.layers.0.mlp.up_proj.weight"] == "model.layers.0.mlp.up_proj.weight"
    assert q25["model.visual.blocks.0.attn.qkv.bias"] == "visual.blocks.0.attn.qkv.bias"
    q3 = checkpoint_names(AutoModelForImageTextToText.from_pretrained(tiny_qwen3_dir))
    assert all(k == v for k, v in q3.items())  # Qwen3-VL checkpoints keep the in-memory names


def test_checkpoint_names_refuse_a_conversion_that_is_not_a_rename():
    from transformers.core_model_loading import Concatenate, WeightConverter

    model = torch.nn.Module()
    model.a = torch.nn.Linear(2, 2)
    model.b = torch.nn.Linear(2, 2)
    model._weight_conversions = [
        WeightConverter(
            source_patterns=["a.weight", "b.weight"], target_patterns="ab.weight", operations=[Concatenate(dim=0)]
        )
    ]
    with pytest.raises(NamingError, match="not supported|not a per-parameter rename|several in-memory"):
        checkpoint_names(model)
