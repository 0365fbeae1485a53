"""Per-stream instructions and the record -> :class:`~ivgr_dist.types.Prompt` conversion.

Every prompt is one user turn: the images (one image part each) and the question, followed by the
instruction of its stream. The instructions are short on purpose: on the tiny CPU model the whole
prompt must fit ``data.max_prompt_length`` (512) tokens, and each image already costs
``(h / 28) * (w / 28)`` tokens.

Token count: the chat template writes one ``<|image_pad|>`` per image; the processor (and the
rollout engine) later expands it to one token per merged 28x28 patch of the resized image. So
``num_prompt_tokens = len(prompt_token_ids) + sum(image_tokens - 1)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ivgr_dist.config import DataConfig
from ivgr_dist.data.image import FACTOR, box_in_model_space, resize_image, smart_resize
from ivgr_dist.data.sources import ImageError, image_list, open_image
from ivgr_dist.quote import short_repr, short_text
from ivgr_dist.types import STREAMS, Prompt

__all__ = [
    "ANSWER_HINTS",
    "IMAGE_MARKER",
    "IMAGE_PAD",
    "INSTRUCTIONS",
    "instructions",
    "KNOWN_COLUMNS",
    "PromptBuilder",
    "target_bboxes",
    "target_labels",
    "image_list",
    "instances_list",
]

_FORMAT = "Reply as <think> reasoning </think> <answer> final answer </answer>."
_COORDS = {
    "pixels": "in pixel coordinates of the image as shown",
    "relative_1000": "as integers from 0 to 1000 relative to the image width and height",
}
"""How the grounded instruction names the box coordinates, per convention (``ivgr_dist.models.family``)."""


def instructions(box_coords: str = "pixels") -> dict[str, str]:
    """Instruction appended to the question, per stream (A = grounded, B = textual, single), for a model
    that writes boxes in ``box_coords``."""
    if box_coords not in _COORDS:
        raise ValueError(f"box_coords={box_coords!r}: must be one of {list(_COORDS)}")
    return {
        "grounded": (
            "Reason step by step. Each time you look at an object, cite it as <box>[x1,y1,x2,y2]</box> "
            f"{_COORDS[box_coords]}. " + _FORMAT
        ),
        "textual": "Reason step by step in plain words only, with no coordinates or boxes. " + _FORMAT,
        "single": "Reason step by step, then answer. " + _FORMAT,
    }


INSTRUCTIONS: dict[str, str] = instructions("pixels")
"""The instructions for a model that grounds in pixels (Qwen2.5-VL)."""
ANSWER_HINTS: dict[str, str] = {"multiple_choice": "Answer with the option letter."}
"""Extra line before the instruction for some question types."""
IMAGE_MARKER = "<image>"
"""Image placeholder inside ``problem`` texts."""
IMAGE_PAD = "<|image_pad|>"
"""The chat template's per-image placeholder token (expanded by the processor)."""
KNOWN_COLUMNS = frozenset({"problem", "query", "answer", "images", "target_instances", "datasource", "question_type"})
"""Columns the pipeline interprets; every other column is kept in ``Prompt.extra``."""


def instances_list(value: Any) -> list[Any]:
    """A ``target_instances`` cell as a list (JSON strings parsed; a bad value becomes one malformed target)."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError:
            return [value]
    if isinstance(value, dict):
        return [value]
    return list(value)


def target_labels(instances: Any) -> list[str]:
    """The ``label`` of each entry of a ``target_instances`` value ("" for entries without one)."""
    return [str(inst.get("label") or "") if isinstance(inst, dict) else "" for inst in instances_list(instances)]


def target_bboxes(instances: Any) -> list[list[float]]:
    """The ``bbox`` of each entry of a ``target_instances`` value (list of dicts or bare 4-lists, or its JSON)."""
    out = []
    for inst in instances_list(instances):
        box = inst.get("bbox") if isinstance(inst, dict) else inst
        out.append([float(v) for v in box])
    return out


class PromptBuilder:
    """Turns records into chat-templated, tokenised prompts of one stream.

    ``tokenizer`` is a Hugging Face tokenizer with a chat template that accepts content parts
    (``{"type": "image"}``, ``{"type": "text", "text": ...}``); ``data_cfg`` supplies the pixel bounds.
    ``factor`` is the image side multiple and ``box_coords`` the box convention of the model family
    (``ivgr_dist.models.family.image_spec`` reads both from the model directory; the defaults are
    Qwen2.5-VL's: 28 = patch 14 x merge 2, absolute pixels).
    """

    def __init__(self, tokenizer, data_cfg: DataConfig, factor: int = FACTOR, box_coords: str = "pixels"):
        self.tokenizer = tokenizer
        self.cfg = data_cfg
        self.factor = factor
        self.box_coords = box_coords
        self.instructions = instructions(box_coords)
        self.image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if self.image_pad_id is None or self.image_pad_id == getattr(tokenizer, "unk_token_id", object()):
            raise ValueError(f"tokenizer has no {IMAGE_PAD!r} token; it is not a Qwen-VL tokenizer")

    # ------------------------------------------------------------------------------------ text

    def messages(self, record: dict, stream: str) -> list[dict]:
        """The one-turn chat for ``record`` in ``stream``: image parts where the markers were, then the text."""
        if stream not in STREAMS:
            raise ValueError(f"stream={stream!r}: must be one of {list(STREAMS)}")
        n_images = len(image_list(record.get("images")))
        problem = record.get("problem") or record.get("query") or ""
        qtype = str(record.get("question_type") or "")
        tail = "\n".join(t for t in (ANSWER_HINTS.get(qtype, ""), self.instructions[stream]) if t)
        pieces = problem.split(IMAGE_MARKER)
        parts: list[dict] = []
        if n_images and len(pieces) - 1 == n_images:
            # One marker per image: images go where the markers are.
            for k, piece in enumerate(pieces):
                if k > 0:
                    parts.append({"type": "image"})
                if piece.strip():
                    parts.append({"type": "text", "text": piece.strip()})
        else:
            # No markers, or a count that does not match: all images first, markers dropped.
            parts = [{"type": "image"} for _ in range(n_images)]
            text = " ".join(p.strip() for p in pieces if p.strip())
            if text:
                parts.append({"type": "text", "text": text})
        if parts and parts[-1]["type"] == "text":
            parts[-1] = {"type": "text", "text": parts[-1]["text"] + "\n" + tail}
        else:
            parts.append({"type": "text", "text": tail})
        return [{"role": "user", "content": parts}]

    def render(self, record: dict, stream: str) -> str:
        """Chat-templated prompt text (generation prompt added, image placeholders not expanded)."""
        return self.tokenizer.apply_chat_template(
            self.messages(record, stream), add_generation_prompt=True, tokenize=False
        )

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of rendered prompts (batched; no special tokens added beyond the template's)."""
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    # ---------------------------------------------------------------------------------- images

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this original size is resized to; ``ValueError`` if impossible."""
        return smart_resize(
            height, width, factor=self.factor, min_pixels=self.cfg.min_pixels, max_pixels=self.cfg.max_pixels
        )

    def image_tokens(self, height: int, width: int) -> int:
        """Tokens an image of this ORIGINAL size expands to."""
        h, w = self.resized_size(height, width)
        return (h // self.factor) * (w // self.factor)

    def count_tokens(self, num_text_tokens: int, image_sizes: Sequence[tuple[int, int]]) -> int:
        """Full prompt length: text tokens (one pad per image) plus each image's expansion; sizes are (w, h)."""
        return num_text_tokens + sum(self.image_tokens(h, w) - 1 for w, h in image_sizes)

    # ----------------------------------------------------------------------------------- build

    def load_images(self, record: dict, image_root: str | Path) -> tuple[list, list, list]:
        """The record's images resized the model's way: ``(images, original sizes, scales)``. Both streams of a
        record can share one call's result (``build(..., loaded=)``), so the image is read and resized once.
        Images may be paths under ``image_root``, bytes or ``{bytes, path}`` structs (:mod:`~ivgr_dist.data.sources`);
        one that cannot be read raises :class:`~ivgr_dist.data.sources.ImageError` with its bad-row reason."""
        images, scales, sizes = [], [], []
        allow = self.cfg.allow_outside_image_root
        for k, item in enumerate(image_list(record.get("images"))):
            try:
                with open_image(item, image_root, allow) as im:
                    im.load()  # decode now: a file truncated in its pixel data fails here, not in an engine
                    size = im.size
                    try:
                        resized, sx, sy = resize_image(im, self.cfg.min_pixels, self.cfg.max_pixels, self.factor)
                    except ValueError as exc:  # smart_resize's size rule (checked at load from the header)
                        raise ImageError("bad_image_size", f"image {k} {short_repr(item)}: {exc}") from exc
            except ImageError:
                raise
            except FileNotFoundError as exc:
                raise ImageError("missing_image", f"image {k} {short_repr(item)} is gone ({short_text(exc)})") from exc
            except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError ... for data it cannot decode
                raise ImageError(
                    "unreadable_image",
                    f"image {k} {short_repr(item)} cannot be decoded ({type(exc).__name__}: {short_text(exc)})",
                ) from exc
            sizes.append(size)
            images.append(resized)
            scales.append((sx, sy))
        return images, sizes, scales

    def build(
        self, record: dict, original_idx: int, stream: str, image_root: str | Path, loaded: tuple | None = None
    ) -> Prompt:
        """The :class:`Prompt` of ``record`` in ``stream``: images loaded and resized (or ``loaded``, what
        :meth:`load_images` returned for this record), boxes rescaled."""
        text = self.render(record, stream)
        ids = self.token_ids([text])[0]
        n_images = len(image_list(record.get("images")))
        n_pads = sum(1 for t in ids if t == self.image_pad_id)
        if n_pads != n_images:
            raise ValueError(
                f"record {original_idx}: the chat template wrote {n_pads} {IMAGE_PAD} tokens for {n_images} "
                "image(s); the template must write one per image part"
            )
        images, sizes, scales = loaded if loaded is not None else self.load_images(record, image_root)
        boxes = target_bboxes(record.get("target_instances"))
        if boxes and not scales:
            raise ValueError(f"record {original_idx}: target boxes but no image to place them in")
        # Boxes refer to the first image (iVGR records carry one image).
        target_boxes = [box_in_model_space(b, sizes[0], scales[0], self.box_coords) for b in boxes] if boxes else []
        extra = {k: v for k, v in record.items() if k not in KNOWN_COLUMNS}
        answer = record.get("answer")
        return Prompt(
            original_idx=int(original_idx),
            stream=stream,
            prompt_text=text,
            prompt_token_ids=list(ids),
            num_prompt_tokens=self.count_tokens(len(ids), sizes),
            answer="" if answer is None else str(answer),
            question_type=str(record.get("question_type") or "free_form"),
            datasource=str(record.get("datasource") or "unknown"),
            images=images,
            target_boxes=target_boxes,
            target_labels=target_labels(record.get("target_instances")) if boxes else [],
            question=_question(record),
            extra=extra,
        )


def _question(record: dict) -> str:
    query = record.get("query")
    if query:
        return str(query)
    problem = str(record.get("problem") or "")
    return " ".join(p.strip() for p in problem.split(IMAGE_MARKER) if p.strip())
