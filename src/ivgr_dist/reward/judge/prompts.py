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

Both return ``None`` for anything else; the caller counts that as a parse failure. A reply longer than
:data:`MAX_REPLY_CHARS` is not read at all (``None``): a judge answer is a few hundred tokens, and a runaway or
hostile server must not cost the reward worker time. Both parsers run in linear time on any text (a tag scan that
pairs openers and closers as the non-greedy ``<score>(.*?)</score>`` search did, and a backwards scan for the
trailing number): the regex forms were quadratic (20 KB of ``<score>`` openers took 20 s, 40 KB of digits 71 s).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

__all__ = [
    "MAX_REPLY_CHARS",
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


MAX_REPLY_CHARS = 262_144
"""Longest judge reply (characters, one sample) the parsers read; longer ones parse as nothing (``None``)."""

# One tag token, opener or closer (group 1: "/" for a closer, else None). Tokens never overlap (each starts at its
# only "<"), so a left-to-right scan sees every one; no two quantifiers can take the same whitespace (the slash's
# own run follows it inside its optional group), so a start costs the length of its own run.
_SCORE_TOKEN = re.compile(r"<\s*(?:(/)\s*)?score\s*>", re.IGNORECASE)
_VERDICT_TOKEN = re.compile(r"<\s*(?:(/)\s*)?verdict\s*>", re.IGNORECASE)
# The rubric number grammar, [0-9]*\.?[0-9]+, written so that no digit can be claimed by two quantifiers.
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?|\.[0-9]+")
_NUMBER_CHARS = frozenset("0123456789.")
_YES_NO = {"yes": 1.0, "no": 0.0}


def _last_tag(text: str, token: re.Pattern) -> tuple[str | None, bool]:
    """(content of the last ``<tag>...</tag>`` pair, whether the text holds any tag token).

    Pairs like ``re.findall(r"<tag>(.*?)</tag>", text, re.DOTALL)``: an opener takes the first closer after it,
    openers in between are content, the scan goes on after that closer, and closers without an opener are skipped.
    """
    last, open_end, seen = None, -1, False
    for m in token.finditer(text):
        seen = True
        if m.group(1):
            if open_end >= 0:
                last, open_end = text[open_end : m.start()], -1
        elif open_end < 0:
            open_end = m.end()
    return last, seen


def _trailing_number(text: str) -> str | None:
    """The number that ends ``text``, as ``(?<![\\w.+\\-])([0-9]*\\.?[0-9]+)\\s*[.!]?\\s*$`` would find it
    ("score: 0.7", "0.7." but not "v10.7" or "-0.3"), or ``None``; scanned backwards, so linear."""
    end = len(text.rstrip())
    if end and text[end - 1] in ".!":
        end = len(text[: end - 1].rstrip())
    start = end
    while start > 0 and text[start - 1] in _NUMBER_CHARS:
        start -= 1
    if start == end or (start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_.+-")):
        return None
    return text[start:end]


def _rubric_value(token: str) -> float | None:
    token = token.strip()
    if not _NUMBER.fullmatch(token):
        return None
    value = float(token)
    for grade in RUBRIC:
        if math.isclose(value, grade, abs_tol=1e-9):
            return grade
    return None


def _readable(text: str | None) -> bool:
    return isinstance(text, str) and len(text) <= MAX_REPLY_CHARS and bool(text.strip())


def parse_consistency(text: str | None) -> float | None:
    """The rubric grade in a judge answer, or ``None`` (see the module docstring for the rules)."""
    if not _readable(text):
        return None
    content, any_tag = _last_tag(text, _SCORE_TOKEN)
    if content is not None:
        return _rubric_value(content)
    if any_tag:  # a broken or unclosed tag: do not guess from the text around it
        return None
    number = _trailing_number(text)
    return _rubric_value(number) if number is not None else None


def _yes_no(token: str) -> float | None:
    return _YES_NO.get(token.strip().rstrip(".!").strip().lower())


def parse_equivalence(text: str | None) -> float | None:
    """1.0 (equivalent), 0.0 (not) or ``None`` (see the module docstring for the rules)."""
    if not _readable(text):
        return None
    content, any_tag = _last_tag(text, _VERDICT_TOKEN)
    if content is not None:
        return _yes_no(content)
    if any_tag:
        return None
    return _yes_no(text)


def parser_for(kind: str) -> Callable[[str | None], float | None]:
    """The parser of a request kind; ``ValueError`` for an unknown kind."""
    if kind == "consistency":
        return parse_consistency
    if kind == "equivalence":
        return parse_equivalence
    raise ValueError(f"judge request kind={kind!r}: must be 'consistency' or 'equivalence'")
