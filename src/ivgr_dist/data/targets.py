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
- **A response column** (real data): the column's text is the response. Which stream's prompt it
  is paired with comes from a ``stream`` column when the parquet has one, else from the text:
  a response with a ``<box>`` is ``grounded``, any other ``textual`` (``single`` for records
  without targets). A record yields one sample per row, not one per stream.
"""

from __future__ import annotations

from ivgr_dist.types import Prompt

__all__ = ["infer_stream", "templated_response"]


def _box(box: list[float]) -> str:
    return "[" + ",".join(str(round(v)) for v in box) + "]"


def templated_response(prompt: Prompt) -> str:
    """The target response of ``prompt`` in its stream (see the module docstring)."""
    answer = prompt.answer.strip()
    if prompt.stream == "single" or not prompt.target_boxes:
        question = prompt.question.strip()
        return f"<think>{question} The result is {answer}.</think> <answer>{answer}</answer>"
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
            raise ValueError(f"stream={stream_column!r}: must be grounded, textual or single")
        return stream_column
    if not paired:
        return "single"
    return "grounded" if "<box>" in response.replace(" ", "") else "textual"
