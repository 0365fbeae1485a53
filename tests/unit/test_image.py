"""Tests of the Qwen2.5-VL resize rule and box rescaling (ivgr_dist.data.image)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from ivgr_dist.data.image import rescale_box, resize_image, smart_resize

MIN_PX, MAX_PX = 3136, 200704  # DataConfig defaults
RECIPE_MAX = 3211264


@st.composite
def sizes(draw, max_side=4000):
    h = draw(st.integers(1, max_side))
    w = draw(st.integers(max(1, -(-h // 200)), min(max_side, h * 200)))
    return h, w


@st.composite
def bounds(draw):
    lo = draw(st.integers(28 * 28, 200_000))
    hi = draw(st.integers(lo, 4_000_000))
    return lo, hi


@settings(max_examples=300, deadline=None)
@given(sizes(), bounds())
def test_multiples_of_28_and_within_bounds_or_a_clear_error(size, bnd):
    h, w = size
    lo, hi = bnd
    try:
        rh, rw = smart_resize(h, w, min_pixels=lo, max_pixels=hi)
    except ValueError as exc:
        assert f"{h}x{w}" in str(exc)
        return
    assert rh % 28 == 0 and rw % 28 == 0
    assert rh >= 28 and rw >= 28
    assert lo <= rh * rw <= hi


@settings(max_examples=300, deadline=None)
@given(sizes(max_side=6000), st.sampled_from([(MIN_PX, MAX_PX), (MIN_PX, RECIPE_MAX)]))
def test_project_bounds_never_fail_for_aspect_up_to_200(size, bnd):
    rh, rw = smart_resize(*size, min_pixels=bnd[0], max_pixels=bnd[1])
    assert bnd[0] <= rh * rw <= bnd[1]


@settings(max_examples=300, deadline=None)
@given(sizes(), bounds())
def test_idempotent(size, bnd):
    lo, hi = bnd
    try:
        once = smart_resize(*size, min_pixels=lo, max_pixels=hi)
    except ValueError:
        return
    assert smart_resize(*once, min_pixels=lo, max_pixels=hi) == once


@settings(max_examples=300, deadline=None)
@given(sizes(max_side=3000))
def test_agrees_with_the_transformers_processor_rule(size):
    tf = pytest.importorskip("transformers.models.qwen2_vl.image_processing_qwen2_vl")
    assert smart_resize(*size, min_pixels=MIN_PX, max_pixels=MAX_PX) == tf.smart_resize(
        *size, factor=28, min_pixels=MIN_PX, max_pixels=MAX_PX
    )


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((112, 112), (112, 112)),  # already fine
        ((110, 150), (112, 140)),  # rounded to the nearest multiple
        ((10, 10), (56, 56)),  # scaled up to min_pixels
        ((1000, 1000), (448, 448)),  # scaled down: 1000 / sqrt(1e6 / 200704) / 28 = 16.0 -> 16 * 28
        ((1200, 900), (504, 364)),  # scaled down, aspect kept, floored under max_pixels
    ],
)
def test_known_sizes(size, expected):
    assert smart_resize(*size, min_pixels=MIN_PX, max_pixels=MAX_PX) == expected


def test_errors_name_the_size():
    with pytest.raises(ValueError, match=r"10x2010.*aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError, match=r"0x50"):
        smart_resize(0, 50)
    with pytest.raises(ValueError, match="max_pixels"):
        smart_resize(100, 100, min_pixels=5000, max_pixels=4000)
    with pytest.raises(ValueError, match="outside"):  # extreme shape, no size fits these narrow bounds
        smart_resize(28, 5600, min_pixels=3136, max_pixels=3136)


def _square_image(mode="RGB"):
    img = Image.new("RGB", (150, 110), (255, 255, 255))
    ImageDraw.Draw(img).rectangle([30, 20, 89, 69], fill=(200, 10, 10))  # box [30, 20, 90, 70]
    return img.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_resize_image_returns_rgb_at_the_rule_size(mode):
    img = _square_image(mode)
    out, sx, sy = resize_image(img, MIN_PX, MAX_PX)
    assert out.mode == "RGB"
    assert (out.height, out.width) == smart_resize(110, 150, min_pixels=MIN_PX, max_pixels=MAX_PX) == (112, 140)
    assert sx == pytest.approx(140 / 150) and sy == pytest.approx(112 / 110)


def test_resize_image_is_a_no_op_at_the_target_size():
    img = Image.new("RGB", (140, 112), (1, 2, 3))
    out, sx, sy = resize_image(img, MIN_PX, MAX_PX)
    assert (sx, sy) == (1.0, 1.0)
    assert out.tobytes() == img.tobytes() and out is not img


def test_rescaled_box_lands_on_the_object_in_the_resized_image():
    img = Image.new("RGB", (600, 300), (255, 255, 255))
    ImageDraw.Draw(img).rectangle([400, 100, 499, 199], fill=(0, 0, 255))  # box [400, 100, 500, 200]
    out, sx, sy = resize_image(img, MIN_PX, 28 * 28 * 40)
    box = rescale_box([400, 100, 500, 200], sx, sy)
    assert box == pytest.approx([400 * sx, 100 * sy, 500 * sx, 200 * sy])
    assert out.size != img.size
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    assert out.getpixel((int(cx), int(cy))) == (0, 0, 255)
    # just outside the rescaled box the image is white again
    assert out.getpixel((int(box[0]) - 3, int(cy))) == (255, 255, 255)
    assert out.getpixel((int(cx), min(out.height - 1, int(box[3]) + 3))) == (255, 255, 255)


def test_rescale_box_rejects_bad_length():
    with pytest.raises(ValueError, match="4 numbers"):
        rescale_box([1, 2, 3], 1.0, 1.0)
