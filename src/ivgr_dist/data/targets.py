"""Supervised targets for the warm start: what a response to a :class:`~ivgr_dist.types.Prompt` should be.

Two sources, chosen by ``sft.response_column``:

- **Templated** (``response_column`` unset; the synthetic set): built from the record's answer and
  its targets, so the grounded and the textual response of a record describe the same objects::

      grounded  <think>I look at the red circle <box>[12,30,58,77]</box>. The answer is red.</think> <answer>red</answer>
      textual   <think>I look at the red circle. The answer is red.</think> <answer>red</answer>
      single    <think>What is 3 + 4? The result is 7.</think> <answer>7</answer>

  Boxes are the prompt's ``target_boxes`` (already in RESIZED-image pixels, what the model sees),
  rounded to integers; labels come from ``target_instances[].label`` ("object" where missing).
  The textual response names the same objects without coordinates, so the rule judge's
  consistency between the two streams is 1.0 by construction.

  Records of the ``search`` task (datasource ``synthetic_search``: one small target among distractors,
  ``data.synthetic.task=search``) reason "find it, then read it": the sought object (from the question),
  where it is, what it is, the answer. The grounded stream locates it with its box, the textual one in
  words, by the 3 x 3 cell of the image holding the box centre::

      grounded  <think>I look for the star. It is at <box>[52,30,64,41]</box>: the red star. The answer is red.</think> <answer>red</answer>
      textual   <think>I look for the star. It is at the top left of the image: the red star. The answer is red.</think> <answer>red</answer>

  ("What shape is the red object?": "I look for the red object. ... The answer is star.") Both streams state the
  same colour+shape fact, so the rule judge's consistency is 1.0 here too.
- **A response column** (real data): the column's text is the response. Which stream's prompt it
  is paired with comes from a ``stream`` column when the parquet has one, else from the text:
  a response with a ``<box>`` is ``grounded``, any other ``textual`` (``single`` for records
  without targets). A record yields one sample per row, not one per stream.
"""

from __future__ import annotations

from ivgr_dist.data.synthetic import DATASOURCE_SEARCH
from ivgr_dist.quote import short_repr
from ivgr_dist.types import Prompt

__all__ = ["infer_stream", "region_words", "templated_response"]

_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "middle", "right")


def _box(box: list[float]) -> str:
    return "[" + ",".join(str(round(v)) for v in box) + "]"


def region_words(box: list[float], width: float, height: float) -> str:
    """Where ``box``'s centre lies in a ``width`` x ``height`` image, in words: the cell of a 3 x 3 grid
    (``top left``, ``top middle``, ... ``centre``, ... ``bottom right``)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col = _COLS[min(2, max(0, int(3 * cx / width)))]
    row = _ROWS[min(2, max(0, int(3 * cy / height)))]
    return "centre" if row == col == "middle" else f"{row} {col}"


def _extent(prompt: Prompt, box_coords: str) -> tuple[float, float]:
    """(width, height) of the space ``prompt.target_boxes`` are in."""
    if box_coords == "relative_1000":
        return 1000.0, 1000.0
    if box_coords != "pixels":
        raise ValueError(f"box_coords={box_coords!r}: must be 'pixels' or 'relative_1000'")
    if not prompt.images:
        raise ValueError(f"prompt {prompt.uid}: target boxes in pixels but no image to place them in")
    return tuple(float(v) for v in prompt.images[0].size)


def _search_response(prompt: Prompt, answer: str, box_coords: str) -> str:
    """Find-then-read reasoning for a ``search`` record (one target labelled ``<colour> <shape>``)."""
    label = prompt.target_labels[0] if prompt.target_labels else ""
    parts = label.split()
    if len(prompt.target_boxes) != 1 or len(parts) != 2 or answer not in parts:
        raise ValueError(
            f"prompt {prompt.uid}: a {DATASOURCE_SEARCH} record needs one target labelled '<colour> <shape>' "
            f"containing the answer; got labels {short_repr(prompt.target_labels)}, answer {short_repr(answer)}"
        )
    color, shape = parts
    sought = f"the {shape}" if answer == color else f"the {color} object"
    box = prompt.target_boxes[0]
    where = (
        f"<box>{_box(box)}</box>"
        if prompt.stream == "grounded"
        else f"the {region_words(box, *_extent(prompt, box_coords))} of the image"
    )
    return (
        f"<think>I look for {sought}. It is at {where}: the {label}. The answer is {answer}.</think> "
        f"<answer>{answer}</answer>"
    )


def templated_response(prompt: Prompt, box_coords: str = "pixels") -> str:
    """The target response of ``prompt`` in its stream (see the module docstring). ``box_coords``: the space of
    ``prompt.target_boxes`` (the model family's, ``PromptBuilder.box_coords``), for the search task's words."""
    answer = prompt.answer.strip()
    if prompt.stream == "single" or not prompt.target_boxes:
        question = prompt.question.strip()
        return f"<think>{question} The result is {answer}.</think> <answer>{answer}</answer>"
    if prompt.datasource == DATASOURCE_SEARCH:
        return _search_response(prompt, answer, box_coords)
    labels = list(prompt.target_labels) + [""] * (len(prompt.target_boxes) - len(prompt.target_labels))
    mentions = []
    for label, box in zip(labels, prompt.target_boxes, strict=False):
        name = f"the {label or 'object'}"
        mentions.append(f"{name} <box>{_box(box)}</box>" if prompt.stream == "grounded" else name)
    return f"<think>I look at {', '.join(mentions)}. The answer is {answer}.</think> <answer>{answer}</answer>"


def infer_stream(response: str, paired: bool, stream_column: str | None = None) -> str:
    """Stream of a response-column row: the ``stream`` column when given, else from the text."""
    if stream_column:
        if stream_column not in ("grounded", "textual", "single"):
            raise ValueError(f"stream={short_repr(stream_column)}: must be grounded, textual or single")
        return stream_column
    if not paired:
        return "single"
    return "grounded" if "<box>" in response.replace(" ", "") else "textual"
