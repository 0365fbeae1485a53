"""What the LLM judge is asked, and how its answers are read.

Two questions (see ``ivgr_dist.reward.judge``):

- **consistency**: compare a candidate textual reasoning with the reference grounded reasoning and
  grade it on the iVGR rubric 0.0 / 0.3 / 0.7 / 1.0; the answer goes in ``<score>...</score>``.
- **equivalence**: is a predicted answer equivalent to the ground truth; the answer goes in
  ``<verdict>yes|no</verdict>``.

The prompts are chat messages (system + user) so every backend can render them: HTTP backends send
them as they are, the engine backend applies the judge model's chat template.

Parsers are strict about values and lenient about layout, because the judge is a sampled model and
its output is untrusted:

- ``parse_consistency``: the LAST ``<score>`` tag wins (a model that drafts and then corrects itself
  is read by its final word; a candidate text quoted back by the judge comes earlier). Whitespace and
  case inside and around the tag are ignored. Only the four rubric values are accepted (``1``,
  ``1.0``, ``.7``, ``0.70`` are fine; ``0.5``, ``-0.3``, ``10`` are not). If the text holds NO score
  tag at all, a bare rubric number at the very end is accepted (``... Score: 0.7`` or ``0.7.``);
  a tag whose content is invalid is NOT rescued by a trailing number.
- ``parse_equivalence``: the LAST ``<verdict>`` tag, ``yes`` -> 1.0 and ``no`` -> 0.0 (case,
  whitespace and trailing ``.``/``!`` ignored). Without any tag, a text that is exactly ``yes`` or
  ``no`` (same leniency) is accepted.

Both return ``None`` for anything else; the caller counts that as a parse failure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

__all__ = [
    "RUBRIC",
    "build_messages",
    "consistency_messages",
    "equivalence_messages",
    "parse_consistency",
    "parse_equivalence",
    "parser_for",
]

RUBRIC: tuple[float, ...] = (0.0, 0.3, 0.7, 1.0)
"""The consistency grades, lowest first."""

_CONSISTENCY_SYSTEM = (
    "You grade how well a piece of reasoning about an image agrees with a trusted reference "
    "reasoning about the same image. You cannot see the image; treat the reference as the truth "
    "about what the image shows."
)

_CONSISTENCY_USER = """Question asked about the image:
{question}

Trusted reference reasoning (it located the relevant objects in the image):
{reference}

Reasoning to grade:
{candidate}

Grade the reasoning to grade against the reference with exactly one of these values:
- 0.0: it states something about the image content that conflicts with the reference.
- 0.3: nothing conflicts, but it BOTH mentions image details that the reference does not have AND leaves out details that the reference has.
- 0.7: nothing conflicts, but it EITHER mentions image details that the reference does not have OR leaves out details that the reference has (not both).
- 1.0: it agrees with the reference completely: nothing conflicts, nothing is added, nothing is left out.

Think briefly, then end your reply with the grade in a score tag, for example <score>0.7</score>."""

_EQUIVALENCE_SYSTEM = "You check whether a predicted answer to a question means the same as the correct answer."

_EQUIVALENCE_USER = """Question:
{question}

Correct answer:
{reference}

Predicted answer:
{candidate}

Does the predicted answer express the same answer as the correct one? Differences in wording, units written \
out, letter case or formatting do not matter; a different value, object or choice does.
End your reply with <verdict>yes</verdict> or <verdict>no</verdict>."""


def consistency_messages(question: str, reference: str, candidate: str) -> list[dict]:
    """Chat messages asking for the consistency grade of ``candidate`` against ``reference``."""
    user = _CONSISTENCY_USER.format(question=question.strip(), reference=reference.strip(), candidate=candidate.strip())
    return [{"role": "system", "content": _CONSISTENCY_SYSTEM}, {"role": "user", "content": user}]


def equivalence_messages(question: str, reference: str, candidate: str) -> list[dict]:
    """Chat messages asking whether ``candidate`` (prediction) is equivalent to ``reference`` (ground truth)."""
    user = _EQUIVALENCE_USER.format(question=question.strip(), reference=reference.strip(), candidate=candidate.strip())
    return [{"role": "system", "content": _EQUIVALENCE_SYSTEM}, {"role": "user", "content": user}]


def build_messages(request) -> list[dict]:
    """Messages for a ``JudgeRequest`` of either kind; ``ValueError`` for an unknown kind."""
    if request.kind == "consistency":
        return consistency_messages(request.question, request.reference, request.candidate)
    if request.kind == "equivalence":
        return equivalence_messages(request.question, request.reference, request.candidate)
    raise ValueError(f"judge request kind={request.kind!r}: must be 'consistency' or 'equivalence'")


_SCORE_TAG = re.compile(r"<\s*score\s*>(.*?)<\s*/\s*score\s*>", re.IGNORECASE | re.DOTALL)
_ANY_SCORE_TAG = re.compile(r"<\s*/?\s*score\s*>", re.IGNORECASE)
_NUMBER = re.compile(r"[0-9]*\.?[0-9]+")
# A final number not glued to a word, a sign or another number: "score: 0.7", "0.7.", but not "v10.7" or "-0.3".
_TRAILING_NUMBER = re.compile(r"(?<![\w.+\-])([0-9]*\.?[0-9]+)\s*[.!]?\s*$")
_VERDICT_TAG = re.compile(r"<\s*verdict\s*>(.*?)<\s*/\s*verdict\s*>", re.IGNORECASE | re.DOTALL)
_ANY_VERDICT_TAG = re.compile(r"<\s*/?\s*verdict\s*>", re.IGNORECASE)
_YES_NO = {"yes": 1.0, "no": 0.0}


def _rubric_value(token: str) -> float | None:
    token = token.strip()
    if not _NUMBER.fullmatch(token):
        return None
    value = float(token)
    for grade in RUBRIC:
        if math.isclose(value, grade, abs_tol=1e-9):
            return grade
    return None


def parse_consistency(text: str | None) -> float | None:
    """The rubric grade in a judge answer, or ``None`` (see the module docstring for the rules)."""
    if not isinstance(text, str) or not text.strip():
        return None
    tags = _SCORE_TAG.findall(text)
    if tags:
        return _rubric_value(tags[-1])
    if _ANY_SCORE_TAG.search(text):  # a broken or unclosed tag: do not guess from the text around it
        return None
    m = _TRAILING_NUMBER.search(text)
    return _rubric_value(m.group(1)) if m else None


def _yes_no(token: str) -> float | None:
    return _YES_NO.get(token.strip().rstrip(".!").strip().lower())


def parse_equivalence(text: str | None) -> float | None:
    """1.0 (equivalent), 0.0 (not) or ``None`` (see the module docstring for the rules)."""
    if not isinstance(text, str) or not text.strip():
        return None
    tags = _VERDICT_TAG.findall(text)
    if tags:
        return _yes_no(tags[-1])
    if _ANY_VERDICT_TAG.search(text):
        return None
    return _yes_no(text)


def parser_for(kind: str) -> Callable[[str | None], float | None]:
    """The parser of a request kind; ``ValueError`` for an unknown kind."""
    if kind == "consistency":
        return parse_consistency
    if kind == "equivalence":
        return parse_equivalence
    raise ValueError(f"judge request kind={kind!r}: must be 'consistency' or 'equivalence'")
