"""``RuleJudge``: a deterministic structured comparator, the CPU default and the judge of tests.

It answers the same two questions as an LLM judge, without a model:

- ``consistency``: facts are extracted from the candidate (textual) and reference (grounded)
  reasoning, then compared on the judge's rubric:

  * a fact is a colour+shape mention (``the red circle``, ``the circle is red``) or a count
    (``two blue objects``, ``3 squares``); the vocabulary is the synthetic palette and shapes,
    plus every colour/shape of ``request.context["objects"]`` when present (the synthetic set's
    ``objects`` column, as a list or its JSON text);
  * 0.0: a contradiction: the same shape is given only different colours by the two texts (unless
    the candidate's colour+shape is an object of the scene, when ``objects`` are known: then the
    texts merely mention different objects), or the same subject is given different counts;
  * 0.3: no contradiction, but the candidate both adds facts and omits some;
  * 0.7: exactly one of the two (adds, or omits). An EMPTY candidate fact set against a non-empty
    reference is "omits only" and scores 0.7 (documented choice: saying less is not a contradiction);
  * 1.0: identical fact sets (two texts with no facts at all included).

- ``equivalence``: 1.0 when the normalised answers match exactly (``rules.exact_match``: case,
  spacing, quotes, trailing punctuation, numbers as decimals) or when the reference is a number and
  the candidate states exactly that one number (``the answer is 17``); else 0.0.

Counters: one call per request, never a retry or timeout. An unexpected internal error returns the
request's fallback with ``failed=True`` (the Judge contract: never raise for judge faults).
"""

from __future__ import annotations

import json
import re
import time
from decimal import Decimal, InvalidOperation
from typing import Any

from ivgr_dist.reward.judge.base import JudgeRequest, JudgeResult

__all__ = ["RuleJudge", "consistency_score", "equivalence_score", "extract_facts"]

_TOKEN = re.compile(r"[a-z]+|\d+(?:\.\d+)?")
_NUMBER = re.compile(r"[+-]?\d+(?:,\d{3})*(?:\.\d+)?")
_NUMBER_WORDS = {
    "zero": 0, "no": 0, "one": 1, "a": 1, "an": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
}  # fmt: skip
_GENERIC = ("object", "shape", "item", "thing")
_COPULA = ("is", "are", "looks", "appears", "seems")

Fact = tuple


def _vocabulary(context: dict[str, Any] | None) -> tuple[set[str], set[str], set[tuple[str, str]] | None]:
    """(colours, shapes, scene pairs or None) for one request."""
    from ivgr_dist.data.synthetic import PALETTE, SHAPES

    colours, shapes = set(PALETTE), set(SHAPES)
    scene: set[tuple[str, str]] | None = None
    objects = (context or {}).get("objects")
    if isinstance(objects, str):
        try:
            objects = json.loads(objects)
        except ValueError:
            objects = None
    if isinstance(objects, list):
        scene = set()
        for o in objects:
            if isinstance(o, dict) and isinstance(o.get("color"), str) and isinstance(o.get("shape"), str):
                c, s = o["color"].lower(), o["shape"].lower()
                colours.add(c)
                shapes.add(s)
                scene.add((s, c))
    return colours, shapes, scene


def _singular(word: str, nouns: set[str]) -> str | None:
    if word in nouns:
        return word
    if word.endswith("s") and word[:-1] in nouns:
        return word[:-1]
    return None


def _count(word: str) -> int | None:
    if word.isdigit():
        return int(word)
    return _NUMBER_WORDS.get(word)


def extract_facts(text: str, colours: set[str], shapes: set[str]) -> set[Fact]:
    """``("pair", shape, colour)`` and ``("count", colour or "", shape or "object", n)`` facts of ``text``."""
    tokens = _TOKEN.findall(text.lower())
    nouns = shapes | set(_GENERIC)
    facts: set[Fact] = set()
    for i, tok in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        shape = _singular(nxt, shapes)
        if tok in colours and shape:  # "red circle"
            facts.add(("pair", shape, tok))
        base = _singular(tok, shapes)
        if base and nxt in _COPULA and i + 2 < len(tokens):  # "circle is red", "circle is a red one"
            after = tokens[i + 2] if tokens[i + 2] not in ("a", "an", "the") else tokens[min(i + 3, len(tokens) - 1)]
            if after in colours:
                facts.add(("pair", base, after))
        n = _count(tok)
        # Counts: "<n> [colour] <noun>s"; "a"/"an"/"one" before a singular noun is an article, not a count.
        if n is not None and tok not in ("a", "an"):
            j = i + 1
            colour = ""
            if j < len(tokens) and tokens[j] in colours:
                colour, j = tokens[j], j + 1
            noun = _singular(tokens[j], nouns) if j < len(tokens) else None
            if noun and (n != 1 or tok.isdigit() or tok == "one"):
                facts.add(("count", colour, noun if noun in shapes else "object", n))
    return facts


def consistency_score(candidate: str, reference: str, context: dict[str, Any] | None = None) -> float:
    """Rubric score (0.0 / 0.3 / 0.7 / 1.0) of ``candidate`` reasoning against ``reference`` (see module doc)."""
    colours, shapes, scene = _vocabulary(context)
    cand, ref = extract_facts(candidate, colours, shapes), extract_facts(reference, colours, shapes)
    # Contradictions: colours of one shape, counts of one subject.
    for shape in {f[1] for f in cand if f[0] == "pair"}:
        c_cols = {f[2] for f in cand if f[0] == "pair" and f[1] == shape}
        r_cols = {f[2] for f in ref if f[0] == "pair" and f[1] == shape}
        if r_cols and not (c_cols & r_cols):
            if scene is None or any((shape, c) not in scene for c in c_cols):
                return 0.0
    c_counts = {(f[1], f[2]): f[3] for f in cand if f[0] == "count"}
    for f in ref:
        if f[0] == "count" and (f[1], f[2]) in c_counts and c_counts[(f[1], f[2])] != f[3]:
            return 0.0
    extra, missing = bool(cand - ref), bool(ref - cand)
    if extra and missing:
        return 0.3
    if extra or missing:
        return 0.7
    return 1.0


def _decimal(s: str) -> Decimal | None:
    try:
        return Decimal(s.replace(",", "").lstrip("+"))
    except InvalidOperation:
        return None


def equivalence_score(candidate: str, reference: str) -> float:
    """1.0 / 0.0: normalised exact match, or the one number of ``candidate`` equals a numeric ``reference``."""
    from ivgr_dist.reward.rules import exact_match

    if exact_match(candidate, reference) == 1.0:
        return 1.0
    ref = reference.strip().rstrip(".")
    if _NUMBER.fullmatch(ref):
        found = _NUMBER.findall(candidate)
        if len(found) == 1 and _decimal(found[0]) == _decimal(ref):
            return 1.0
    return 0.0


class RuleJudge:
    """Deterministic judge (``reward.judge.backend=rule``); implements the async ``Judge`` protocol."""

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    def _one(self, req: JudgeRequest) -> JudgeResult:
        t0 = time.perf_counter()
        try:
            if req.kind == "consistency":
                score = consistency_score(req.candidate, req.reference, req.context)
            elif req.kind == "equivalence":
                score = equivalence_score(req.candidate, req.reference)
            else:
                return JudgeResult(score=req.fallback, calls=1, parse_failures=1, failed=True)
        except Exception:  # noqa: BLE001 - the Judge contract: a fault becomes the fallback, counted
            return JudgeResult(score=req.fallback, calls=1, failed=True, latency_s=time.perf_counter() - t0)
        return JudgeResult(score=score, calls=1, latency_s=time.perf_counter() - t0)

    async def score(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        return [self._one(r) for r in requests]

    async def close(self) -> None:
        return None
