"""Rule rewards of iVGR: format, box validity, box IoU, rule-based accuracy, and the per-stream sums.

Every function here is pure (no I/O, no global state), never raises on arbitrary model output, and, except
:func:`math_match` (SymPy) and the duplicate-box check (pairs of boxes), runs in time linear in the length of its
input (no regex with quadratic backtracking on degenerate text such as long whitespace or digit runs or thousands
of unclosed tags). The spec is ``docs/algorithm.md`` (2, "Prompts and output format";
3, "Rewards").

Before scoring, every response goes through :func:`normalize_response` (whitespace around ``<``, ``>`` and ``/``
removed, ends stripped). Tags are case-sensitive (``<Think>`` is not a think tag).

Choices made where the paper/recipe leaves room, or where this module departs from the public recipe:

- ``format_reward``: the normalized response must be exactly ``<think>A</think><answer>B</answer>`` where A and B
  contain no further think/answer tags (open or close). Empty A or B is allowed (accuracy scores an empty answer 0).
- Boxes: every ``<box>...</box>`` anywhere in the response is an entry (the paper asks for boxes in the reasoning;
  boxes in the answer count too). The content must be ``[x1,y1,x2,y2]`` with plain numbers (optional minus sign,
  optional decimals, no exponent). Anything else is a malformed entry: it counts in the denominator of
  ``box_valid`` and is never used for IoU. Swapped corners are invalid and are NOT repaired. Coordinates that
  overflow a float (e.g. a 400-digit integer) become ``inf`` and make the box invalid.
- Duplicate boxes (anti-spam): ``box_valid`` is 0 when two VALID predicted boxes have IoU strictly greater than
  ``dup_iou`` (0.9). The default ``dup_scope="all"`` checks every pair, which is what the paper describes.
  ``dup_scope="first_half"`` compares only the valid boxes ``i < n_valid // 2`` with every other valid box (an
  earlier approximation of the recipe, kept for comparison; it is not the recipe's rule).
- ``recipe_exact=True`` (config ``reward.recipe_exact``) applies the public recipe's box rules instead, as its
  documentation states them (``docs/algorithm.md``, section 7). An entry parses only if its content is four
  integers (``[x1,y1,x2,y2]``, optional minus sign, spaces allowed); decimals do not parse, so such an entry is
  invalid. The parsed entries, ordered or not, form a list; each of its first ``total // 2`` entries (``total``:
  every entry, parsable or not) is compared with every other entry of that list, and an IoU above ``dup_iou``
  makes ``box_valid`` 0 (``dup_scope="recipe"``). The recipe's documentation does not define the IoU of an
  unordered box (``x2 < x1`` or ``y2 < y1``); with the usual intersection (largest x1 to smallest x2) it has an
  empty intersection with any box, and :func:`iou` gives 0, so an unordered box is never a duplicate here: what it
  changes is which entries fill the first ``total // 2`` places. Entries in the answer count, as the recipe's rule
  speaks of all ``<box>`` entries.
- IoU uses continuous coordinates (area = (x2 - x1) * (y2 - y1), no "+1 pixel" convention); degenerate boxes have
  IoU 0 with everything.
- ``box_iou_reward`` uses all valid predicted boxes, duplicates included (duplicates are punished by ``box_valid``).
  Invalid target boxes raise ``ValueError`` instead of being scored: they mean broken data.
- Accuracy: multiple-choice letters and exact matches are decided by rules; math goes to ``math-verify`` first;
  everything the rules cannot accept returns ``None`` from :func:`rule_accuracy`, meaning "ask the judge". Answers
  longer than ``algorithm.max_answer_chars`` (default :data:`MAX_ANSWER_CHARS`) score 0 without a judge, for every
  question type (the paper states the rule for free-form answers; applying it everywhere also bounds the cost of
  math-verify). A multiple-choice record whose ground truth is not a letter is scored like a free-form one.
- ``math-verify`` times out with ``SIGALRM``, which only works in the main thread, and not even there while SymPy
  sits in one long C call (``9^{99999999}``: CPython computes the 95-million-digit power holding the GIL for
  minutes). :func:`math_match` passes its timeout only when it runs in the main thread and disables math-verify's
  timeout elsewhere (otherwise math-verify raises in worker threads); it screens out expressions known to make
  SymPy run for minutes (power towers, factorials of large expressions) up front. The screen is a heuristic, not a
  bound (``9^{99999999}`` passes it): the scorer never calls :func:`math_match` in its own process but in a
  :class:`~ivgr_dist.reward.rule_pool.RulePool`, whose processes are killed past ``reward.rule_timeout_s``. Note
  that in a main thread math-verify's ``signal.alarm`` replaces any pending ``SIGALRM`` timer of the process (e.g.
  pytest-timeout's) and cancels it when done.
- Every regex here runs in linear time on any text (unrolled loops, no two quantifiers over the same characters,
  digit runs tried only from their first digit); ``tests/unit/test_linear_time.py`` times each on adversarial
  inputs of 1 K and 100 K characters.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import NamedTuple

__all__ = [
    "DUP_IOU",
    "DUP_SCOPES",
    "MAX_ANSWER_CHARS",
    "QUESTION_TYPES",
    "SINGLE_ACCURACY_WEIGHT",
    "BoxParse",
    "answer_too_long",
    "box_iou_from_boxes",
    "box_iou_reward",
    "box_valid_from_entries",
    "box_valid_reward",
    "choice_letter",
    "choice_match",
    "exact_match",
    "extract_answer",
    "format_reward",
    "grounded_box_rewards",
    "grounded_overall",
    "iou",
    "iou_matrix",
    "math_match",
    "normalize_response",
    "parse_boxes",
    "question_kind",
    "rule_accuracy",
    "single_overall",
    "textual_overall",
    "think_text",
    "valid_boxes",
    "validate_target_boxes",
]

#: Two valid predicted boxes with IoU strictly above this are near-duplicates (box_valid becomes 0).
DUP_IOU = 0.9
#: Answers longer than this many characters score 0 without a judge (the default of ``algorithm.max_answer_chars``).
MAX_ANSWER_CHARS = 1000
#: Weight of accuracy in the reward of the ``single`` (text/math-only) stream.
SINGLE_ACCURACY_WEIGHT = 1.5
#: Pair counts above which IoU matrices are computed with numpy instead of pure Python.
_NUMPY_MIN_PAIRS = 256

Box = tuple[float, float, float, float]

# --------------------------------------------------------------------------------------------------------------------
# Normalisation and tags
# --------------------------------------------------------------------------------------------------------------------

_DELIM_SPLIT = re.compile(r"([<>/])")


def normalize_response(text: str | None) -> str:
    """Remove whitespace (``str.isspace``) around every ``<``, ``>`` and ``/``, and strip both ends.

    ``"< think > a </ think >"`` becomes ``"<think>a</think>"``. Linear time: the text is split on the three
    delimiters and each piece between delimiters is stripped (a ``\\s*[<>/]\\s*`` regex would be quadratic on long
    whitespace runs). ``None`` becomes ``""``.
    """
    if not text:
        return ""
    if "<" not in text and ">" not in text and "/" not in text:
        return text.strip()
    parts = _DELIM_SPLIT.split(text)  # [text, delim, text, delim, ..., text]
    last = len(parts) - 1
    parts[0] = parts[0].rstrip()
    parts[last] = parts[last].lstrip()
    for i in range(2, last, 2):
        parts[i] = parts[i].strip()
    return "".join(parts).strip()


# Body of a think/answer block: any text without another think/answer tag (open or close). Unrolled loop, so it runs
# in linear time: every repetition of the group starts with a "<".
_BLOCK_BODY = r"[^<]*(?:<(?!/?(?:think|answer)>)[^<]*)*"
_FORMAT_RE = re.compile(rf"<think>{_BLOCK_BODY}</think><answer>{_BLOCK_BODY}</answer>")


def format_reward(response: str | None) -> float:
    """1.0 iff the normalized response is exactly one think block followed by one answer block, else 0.0."""
    return 1.0 if _FORMAT_RE.fullmatch(normalize_response(response)) else 0.0


def extract_answer(response: str | None) -> str | None:
    """Text of the LAST ``<answer>...</answer>`` of the normalized response, stripped; ``None`` when there is none.

    "Last" means the last ``</answer>`` and the nearest ``<answer>`` before it.
    """
    text = normalize_response(response)
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end].strip()


def think_text(response: str | None) -> str:
    """Content of the first ``<think>...</think>`` block of the normalized response, stripped; ``""`` if none."""
    text = normalize_response(response)
    start = text.find("<think>")
    if start < 0:
        return ""
    start += len("<think>")
    end = text.find("</think>", start)
    if end < 0:
        return ""
    return text[start:end].strip()


# --------------------------------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------------------------------

_NUM = r"(-?(?:\d+(?:\.\d*)?|\.\d+))"
_BOX_CONTENT_RE = re.compile(rf"\s*\[\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*,\s*{_NUM}\s*\]\s*")
# The recipe's grammar (``recipe_exact``): four integers.
_INT = r"(-?\d+)"
_RECIPE_BOX_CONTENT_RE = re.compile(rf"\s*\[\s*{_INT}\s*,\s*{_INT}\s*,\s*{_INT}\s*,\s*{_INT}\s*\]\s*")
_BOX_OPEN = "<box>"
_BOX_CLOSE = "</box>"


class BoxParse(NamedTuple):
    """One ``<box>...</box>`` entry of a response.

    ``coords`` is ``None`` when the content is not ``[x1,y1,x2,y2]`` (with ``recipe_exact``: four integers);
    ``valid`` is True iff the coordinates are all finite and ``x1 < x2`` and ``y1 < y2``.
    """

    text: str
    coords: Box | None
    valid: bool


def _parse_box_content(content: str, recipe_exact: bool = False) -> BoxParse:
    m = (_RECIPE_BOX_CONTENT_RE if recipe_exact else _BOX_CONTENT_RE).fullmatch(content)
    if m is None:
        return BoxParse(content, None, False)
    # float() on a decimal string never raises for this grammar; values beyond the float range become +-inf.
    x1, y1, x2, y2 = (float(g) for g in m.groups())
    valid = x1 < x2 and y1 < y2 and -math.inf < x1 and x2 < math.inf and -math.inf < y1 and y2 < math.inf
    return BoxParse(content, (x1, y1, x2, y2), valid)


def parse_boxes(response: str | None, recipe_exact: bool = False) -> list[BoxParse]:
    """Every ``<box>...</box>`` entry of the normalized response, in order.

    Entries are delimited like a non-greedy ``<box>(.*?)</box>`` search (so ``<box><box>[..]</box>`` is ONE malformed
    entry), but with ``str.find`` so the scan stays linear on text with many unclosed tags. A trailing ``<box>``
    without a closing tag is not an entry. With ``recipe_exact`` only four integers parse as coordinates.
    """
    text = normalize_response(response)
    entries: list[BoxParse] = []
    pos = 0
    open_len = len(_BOX_OPEN)
    while True:
        start = text.find(_BOX_OPEN, pos)
        if start < 0:
            break
        end = text.find(_BOX_CLOSE, start + open_len)
        if end < 0:
            break
        entries.append(_parse_box_content(text[start + open_len : end], recipe_exact))
        pos = end + len(_BOX_CLOSE)
    return entries


def valid_boxes(response: str | None, recipe_exact: bool = False) -> list[Box]:
    """Coordinates of the valid predicted boxes of a response, in order (``recipe_exact``: the recipe's grammar)."""
    return [e.coords for e in parse_boxes(response, recipe_exact) if e.valid]


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes in continuous coordinates.

    Degenerate boxes (``x1 >= x2`` or ``y1 >= y2``), NaN and infinite coordinates give 0.0. The result is in [0, 1].
    """
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    if not (ax1 < ax2 and ay1 < ay2 and bx1 < bx2 and by1 < by2):
        return 0.0
    iw = min(ax2, bx2) - max(ax1, bx1)
    if not iw > 0:
        return 0.0
    ih = min(ay2, by2) - max(ay1, by1)
    if not ih > 0:
        return 0.0
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    if 0.0 < inter and union < math.inf:
        r = inter / union
        return r if r <= 1.0 else 1.0
    # Areas overflowed or underflowed: use the ratio form 1 / (area_a/inter + area_b/inter - 1), which only divides
    # widths by widths.
    wa, ha, wb, hb = ax2 - ax1, ay2 - ay1, bx2 - bx1, by2 - by1
    denom = (wa / iw) * (ha / ih) + (wb / iw) * (hb / ih) - 1.0
    if not (1.0 <= denom < math.inf):  # also rejects NaN from infinite coordinates
        return 0.0
    return 1.0 / denom


def iou_matrix(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]):
    """IoU of every box of ``a`` (n x 4) with every box of ``b`` (m x 4) as an ``(n, m)`` float64 numpy array.

    Same conventions as :func:`iou` (degenerate or non-finite boxes give 0).
    """
    import numpy as np

    a_arr = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b_arr = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax1, ay1, ax2, ay2 = (a_arr[:, i : i + 1] for i in range(4))
    bx1, by1, bx2, by2 = (b_arr[None, :, i] for i in range(4))
    with np.errstate(all="ignore"):
        iw = np.minimum(ax2, bx2) - np.maximum(ax1, bx1)
        ih = np.minimum(ay2, by2) - np.maximum(ay1, by1)
        wa, ha, wb, hb = ax2 - ax1, ay2 - ay1, bx2 - bx1, by2 - by1
        ok = (wa > 0) & (ha > 0) & (wb > 0) & (hb > 0) & (iw > 0) & (ih > 0)
        inter = iw * ih
        union = wa * ha + wb * hb - inter
        out = inter / union
        bad = ok & ~((inter > 0) & (union < np.inf))
        if bad.any():
            denom = (wa / iw) * (ha / ih) + (wb / iw) * (hb / ih) - 1.0
            fallback = np.where((denom >= 1.0) & (denom < np.inf), 1.0 / denom, 0.0)
            out = np.where(bad, fallback, out)
        out = np.where(ok & np.isfinite(out), np.clip(out, 0.0, 1.0), 0.0)
    return out


def _has_duplicate(boxes: Sequence[Box], dup_iou: float, rows: int | None) -> bool:
    """Whether two boxes have IoU > ``dup_iou``: every pair (``rows=None``), or each of ``boxes[:rows]`` against
    every other box."""
    n = len(boxes)
    if n < 2 or rows == 0:
        return False
    all_pairs = rows is None
    rows = n if all_pairs else min(rows, n)
    if rows * n >= _NUMPY_MIN_PAIRS:
        import numpy as np

        m = iou_matrix(boxes[:rows], boxes)
        if all_pairs:
            m = np.triu(m, k=1)
        else:
            m[np.arange(rows), np.arange(rows)] = 0.0  # a box is not its own duplicate
        return bool((m > dup_iou).any())
    for i in range(rows):
        bi = boxes[i]
        for j in range(i + 1 if all_pairs else 0, n):
            if j != i and iou(bi, boxes[j]) > dup_iou:
                return True
    return False


DUP_SCOPES = ("all", "first_half", "recipe")


def _dup_scope(dup_scope: str | None, recipe_exact: bool) -> str:
    if recipe_exact:
        if dup_scope not in (None, "recipe"):
            raise ValueError(f"recipe_exact=True uses dup_scope='recipe', got dup_scope={dup_scope!r}")
        return "recipe"
    if dup_scope is None:
        return "all"
    if dup_scope not in DUP_SCOPES:
        raise ValueError(f"dup_scope must be one of {list(DUP_SCOPES)}, got {dup_scope!r}")
    return dup_scope


def box_valid_from_entries(entries: Sequence[BoxParse], dup_iou: float = DUP_IOU, dup_scope: str = "all") -> float:
    """``box_valid`` from already parsed entries (see :func:`box_valid_reward`).

    ``dup_scope``: ``"all"`` (every pair of valid boxes), ``"first_half"`` (valid boxes ``i < n_valid // 2`` against
    every other valid box) or ``"recipe"`` (the entries that parsed, valid or not, ``i < len(entries) // 2`` against
    every other parsed entry; meant for entries parsed with ``recipe_exact``).
    """
    if dup_scope not in DUP_SCOPES:
        raise ValueError(f"dup_scope must be one of {list(DUP_SCOPES)}, got {dup_scope!r}")
    if not entries:
        return 0.0
    boxes = [e.coords for e in entries if e.valid]
    if not boxes:
        return 0.0
    if dup_scope == "recipe":
        parsed = [e.coords for e in entries if e.coords is not None]
        duplicate = _has_duplicate(parsed, dup_iou, len(entries) // 2)
    else:
        duplicate = _has_duplicate(boxes, dup_iou, len(boxes) // 2 if dup_scope == "first_half" else None)
    if duplicate:
        return 0.0
    return len(boxes) / len(entries)


def box_valid_reward(
    response: str | None, dup_iou: float = DUP_IOU, dup_scope: str | None = None, recipe_exact: bool = False
) -> float:
    """Share of ``<box>`` entries that are valid; 0 without entries or when two boxes have IoU > ``dup_iou``.

    Default (``dup_scope=None`` = ``"all"``): every pair of valid boxes is checked. ``"first_half"``: only the valid
    boxes ``i < n_valid // 2`` against the others. ``recipe_exact=True``: the public recipe's rule (integer grammar,
    ``dup_scope="recipe"``; see the module docstring).
    """
    scope = _dup_scope(dup_scope, recipe_exact)
    return box_valid_from_entries(parse_boxes(response, recipe_exact), dup_iou, scope)


def validate_target_boxes(target_boxes: Sequence[Sequence[float]]) -> list[Box]:
    """Target boxes as float 4-tuples; ``ValueError`` naming the first box that is not a finite, non-degenerate box."""
    out: list[Box] = []
    for k, t in enumerate(target_boxes):
        try:
            if isinstance(t, (str, bytes)) or len(t) != 4:
                raise ValueError
            if any(isinstance(v, (str, bytes, bool)) for v in t):
                raise ValueError
            x1, y1, x2, y2 = (float(v) for v in t)
        except (TypeError, ValueError):
            raise ValueError(f"target box {k} is not a sequence of 4 numbers: {t!r}") from None
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            raise ValueError(f"target box {k} has non-finite coordinates: {t!r}")
        if not (x1 < x2 and y1 < y2):
            raise ValueError(f"target box {k} is degenerate or has swapped corners (needs x1<x2, y1<y2): {t!r}")
        out.append((x1, y1, x2, y2))
    return out


def _best_ious(preds: Sequence[Box], targets: Sequence[Box]) -> tuple[list[float], list[float]]:
    """(best IoU of each target over preds, best IoU of each pred over targets)."""
    if len(preds) * len(targets) >= _NUMPY_MIN_PAIRS:
        m = iou_matrix(preds, targets)
        return m.max(axis=0).tolist(), m.max(axis=1).tolist()
    best_t = [0.0] * len(targets)
    best_p = [0.0] * len(preds)
    for i, p in enumerate(preds):
        for j, t in enumerate(targets):
            v = iou(p, t)
            if v > best_p[i]:
                best_p[i] = v
            if v > best_t[j]:
                best_t[j] = v
    return best_t, best_p


def box_iou_from_boxes(pred_boxes: Sequence[Box], targets: Sequence[Box]) -> float:
    """``box_iou`` from valid predicted boxes and validated targets (see :func:`box_iou_reward`)."""
    if not targets or not pred_boxes:
        return 0.0
    best_t, best_p = _best_ious(pred_boxes, targets)
    recall = sum(best_t) / len(best_t)
    precision = sum(best_p) / len(best_p)
    return 0.5 * (recall + precision)


def box_iou_reward(response: str | None, target_boxes: Sequence[Sequence[float]], recipe_exact: bool = False) -> float:
    """0.5 * (recall + precision) of the valid predicted boxes against the target boxes.

    recall = mean over targets of the best IoU with any valid predicted box; precision = mean over valid predicted
    boxes of the best IoU with any target. 0.0 without targets or without valid predicted boxes. Targets are in the
    same (resized image) pixel space as the predictions; an invalid target raises ``ValueError``. With
    ``recipe_exact`` only boxes of four integers are predictions.
    """
    targets = validate_target_boxes(target_boxes)
    if not targets:
        return 0.0
    return box_iou_from_boxes(valid_boxes(response, recipe_exact), targets)


def grounded_box_rewards(
    response: str | None,
    target_boxes: Sequence[Sequence[float]],
    dup_iou: float = DUP_IOU,
    dup_scope: str | None = None,
    recipe_exact: bool = False,
) -> tuple[float, float]:
    """``(box_valid, box_iou)`` of one response, parsing the boxes once (see :func:`box_valid_reward` for
    ``dup_scope`` and ``recipe_exact``)."""
    scope = _dup_scope(dup_scope, recipe_exact)
    targets = validate_target_boxes(target_boxes)
    entries = parse_boxes(response, recipe_exact)
    valid = box_valid_from_entries(entries, dup_iou, scope)
    preds = [e.coords for e in entries if e.valid]
    return valid, box_iou_from_boxes(preds, targets)


# --------------------------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------------------------

_WRAP_CHARS = "\"'`\u201c\u201d\u2018\u2019$*"
_TRAILING_PUNCT = ".,;:!?\u3002"
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def _normalize_text_answer(text: str) -> str:
    # The fixed point of repeating strip() / strip(_WRAP_CHARS) / rstrip(_TRAILING_PUNCT): the leading run of
    # whitespace and wrapping characters and the trailing run of those and punctuation go. Two index scans instead
    # of the loop, which copied the string once per layer ('a.".".".' peels one quote and one dot per round).
    i, j = 0, len(text)
    while j > 0 and (text[j - 1].isspace() or text[j - 1] in _WRAP_CHARS or text[j - 1] in _TRAILING_PUNCT):
        j -= 1
    while i < j and (text[i].isspace() or text[i] in _WRAP_CHARS):
        i += 1
    return " ".join(text[i:j].split()).lower()


def _as_number(s: str) -> Decimal | None:
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    elif not _PLAIN_NUMBER_RE.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:  # pragma: no cover - the grammar above only admits valid decimals
        return None


def exact_match(pred: str | None, gt: str | None) -> float:
    """1.0 iff pred and gt are equal after normalisation, else 0.0.

    Normalisation: strip surrounding whitespace, quotes, ``$`` and ``*`` (markdown bold) and trailing punctuation,
    collapse inner whitespace, lower-case. If both sides are plain numbers (``3``, ``-0.50``, ``1e3``, ``1,000``)
    they are compared as exact decimals, so ``"3" == "3.0"``.
    """
    if pred is None or gt is None:
        return 0.0
    p, g = _normalize_text_answer(pred), _normalize_text_answer(gt)
    if not p or not g:
        return 0.0
    if p == g:
        return 1.0
    pn, gn = _as_number(p), _as_number(g)
    if pn is not None and gn is not None:
        return 1.0 if pn == gn else 0.0
    return 0.0


# Whole answer is a letter, optionally bracketed and followed by punctuation: "B", "(B)", "[b].", "B:".
_CHOICE_ONLY_RE = re.compile(r"[(\[]?([A-Za-z])[)\]]?[.:,]?")
# Answer starts with an option label followed by its text: "B) cat", "(B) cat", "B. cat", "B: cat".
_CHOICE_PREFIX_RE = re.compile(r"(?:[(\[]([A-Z])[)\]]|([A-Z])[).:])\s*\S")
# A keyword followed by a letter: "Option B", "the answer is (B)", "Answer: B", "choice C". No two quantifiers can
# take the same character (the colon's own whitespace follows it inside its optional group): "\s*[:]?\s*" let a
# whitespace run be split between the two in every way, quadratic in its length ("answer" + 10 K spaces took
# seconds). Plain ``re`` syntax, no possessive quantifiers: those need Python 3.11.
_CHOICE_KEYWORD_RE = re.compile(
    r"(?i:answer|option|choice)(?:\s+(?i:is|would be|should be))?\s*(?:[:\uff1a]\s*)?\**[(\[]?([A-Z])(?![A-Za-z])"
)
_CHOICE_PAREN_RE = re.compile(r"\(([A-Z])\)")


def choice_letter(text: str | None) -> str | None:
    """The option letter a multiple-choice answer selects (upper-case), or ``None`` when it names none.

    Tried in order: the whole answer is a letter (``"B"``, ``"(b)"``, ``"B."``); the answer starts with an option
    label (``"B) cat"``, ``"(B) cat"``, ``"B. cat"``); the last keyword phrase (``"Option B"``, ``"the answer is
    B"``, ``"Answer: (B)"``); a single distinct parenthesised capital ``"(B)"`` anywhere. A bare article such as
    ``"A cat"`` names no option.
    """
    if not text:
        return None
    s = text.strip().strip(_WRAP_CHARS).strip()
    m = _CHOICE_ONLY_RE.fullmatch(s)
    if m:
        return m.group(1).upper()
    m = _CHOICE_PREFIX_RE.match(s)
    if m:
        return m.group(1) or m.group(2)
    last = None
    for m in _CHOICE_KEYWORD_RE.finditer(s):
        last = m.group(1)
    if last is not None:
        return last
    letters = set(_CHOICE_PAREN_RE.findall(s))
    if len(letters) == 1:
        return letters.pop()
    return None


def choice_match(pred: str | None, gt: str | None) -> float:
    """1.0 iff pred selects the same option letter as gt (see :func:`choice_letter`), else 0.0."""
    g = choice_letter(gt)
    if g is None:
        return 0.0
    return 1.0 if choice_letter(pred) == g else 0.0


# Expressions that can keep SymPy busy for minutes: nested exponents ("10^{10^{10}}", "9^9^9", "2**3**4"),
# factorials of bracketed expressions or of numbers with 6+ digits, binomials of 6+ digit numbers. Linear time: a
# digit run is tried only from its first digit ("\d{6,}\s*!" from every digit of a 10 K-digit run was quadratic),
# and no two quantifiers can take the same character ("\s*\{?\s*" could split a whitespace run every way).
_MATH_RISKY_RE = re.compile(r"\^[\w.]*\^|\*\*[\w.]*\*\*|[)}]\s*!|(?<!\d)\d{6,}\s*!|\\binom\s*(?:\{\s*)?\d{6}")


def _nested_exponent(text: str) -> bool:
    """True if an exponent group ``^{...}`` or ``^(...)`` itself contains an exponent."""
    pos = text.find("^")
    n = len(text)
    while pos >= 0:
        j = pos + 1
        while j < n and text[j].isspace():
            j += 1
        if j < n and text[j] in "{(":
            opener = text[j]
            closer = "}" if opener == "{" else ")"
            depth = 0
            k = j
            while k < n:
                c = text[k]
                if c == opener:
                    depth += 1
                elif c == closer:
                    depth -= 1
                    if depth == 0:
                        break
                elif c == "^" or (c == "*" and k + 1 < n and text[k + 1] == "*"):
                    return True
                k += 1
        pos = text.find("^", pos + 1)
    return False


def _math_risky(text: str) -> bool:
    return bool(_MATH_RISKY_RE.search(text)) or _nested_exponent(text)


def _math_parse(text: str, timeout: int | None):
    from math_verify import parse

    # Bare answers ("\frac{1}{2}", "x+1") parse best as LaTeX math; without the "$" wrapper math-verify's plain
    # expression extractor may pick out a lone number ("1+x" -> 1). Fall back to the raw text (e.g. prose).
    if "$" not in text and "\\boxed" not in text:
        out = parse(f"${text}$", parsing_timeout=timeout)
        if out:
            return out
    return parse(text, parsing_timeout=timeout)


def math_match(pred: str | None, gt: str | None, timeout_s: int = 5, max_chars: int = MAX_ANSWER_CHARS) -> float:
    """1.0 iff ``math-verify`` finds pred equivalent to gt, else 0.0 (also on errors, timeouts and risky input).

    In the main thread math-verify's own ``SIGALRM`` timeout of ``timeout_s`` seconds per parse/compare is used; in
    any other thread it is switched off (``parsing_timeout=None``, ``timeout_seconds=None``), because
    ``signal.alarm`` cannot be used there. Inputs longer than ``max_chars`` (``algorithm.max_answer_chars``) and
    expressions SymPy may take very long on (see ``_math_risky``) score 0.0 without calling math-verify. Not bounded
    in time (see the module docstring): the scorer calls it through :class:`~ivgr_dist.reward.rule_pool.RulePool`.
    """
    if not pred or not gt:
        return 0.0
    pred, gt = pred.strip(), gt.strip()
    if not pred or not gt or len(pred) > max_chars or len(gt) > max_chars:
        return 0.0
    if _math_risky(pred) or _math_risky(gt):
        return 0.0
    from math_verify import verify

    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        gold_parsed = _math_parse(gt, timeout)
        pred_parsed = _math_parse(pred, timeout)
        if not gold_parsed or not pred_parsed:
            return 0.0
        return 1.0 if verify(gold_parsed, pred_parsed, timeout_seconds=timeout) else 0.0
    except Exception:  # math-verify is best effort; a crash must not kill a reward worker
        return 0.0


#: Accepted ``question_type`` values (lower-cased, stripped) and the rule family each maps to. Unknown types and
#: ``None`` map to ``"free_form"``.
QUESTION_TYPES: dict[str, str] = {
    "multiple_choice": "multiple_choice",
    "choice": "multiple_choice",
    "mc": "multiple_choice",
    "math": "math",
    "numeric": "math",
    "exact": "exact",
    "free_form": "free_form",
}


def question_kind(question_type: str | None) -> str:
    """Rule family of a ``question_type`` (see :data:`QUESTION_TYPES`)."""
    if question_type is None:
        return "free_form"
    return QUESTION_TYPES.get(str(question_type).strip().lower(), "free_form")


def answer_too_long(text: str, max_chars: int = MAX_ANSWER_CHARS) -> bool:
    """Whether an answer (prediction or ground truth) is longer than ``max_chars`` after stripping."""
    return len(text.strip()) > max_chars


def rule_accuracy(
    pred: str | None,
    gt: str | None,
    question_type: str | None = "free_form",
    max_chars: int = MAX_ANSWER_CHARS,
    math_verify: bool = True,
) -> float | None:
    """Rule-based accuracy (1.0 / 0.0), or ``None`` when only the judge can decide.

    - empty/``None`` pred, or pred longer than ``max_chars`` after stripping (``algorithm.max_answer_chars``;
      :data:`MAX_ANSWER_CHARS`, the paper's 1000, by default): 0.0.
    - a ground truth longer than ``max_chars`` after stripping: 0.0 for every prediction, without a judge (bad data:
      the scorer counts it as ``reward/long_ground_truths``).
    - ``multiple_choice``: :func:`choice_match` (0.0 or 1.0, never the judge). If gt is not a letter, as free_form.
    - ``exact``: :func:`exact_match` (never the judge).
    - ``math``: 1.0 on an exact match or when math-verify agrees, else ``None`` (judge). ``math_verify=False``
      leaves math-verify to the caller (the scorer runs it in a :class:`~ivgr_dist.reward.rule_pool.RulePool`): a
      math answer that is not an exact match then returns ``None``.
    - ``free_form`` (and unknown types): 1.0 on an exact match, else ``None`` (judge).

    A missing/empty ground truth raises ``ValueError``: bad data must not be scored silently.
    """
    if gt is None or not str(gt).strip():
        raise ValueError(f"ground-truth answer is empty: {gt!r}")
    gt = str(gt)
    if pred is None or answer_too_long(gt, max_chars):
        return 0.0
    pred = pred.strip()
    if not pred or len(pred) > max_chars:
        return 0.0
    kind = question_kind(question_type)
    if kind == "multiple_choice":
        if choice_letter(gt) is not None:
            return choice_match(pred, gt)
        kind = "free_form"
    if exact_match(pred, gt) == 1.0:
        return 1.0
    if kind == "exact":
        return 0.0
    if kind == "math" and math_verify and math_match(pred, gt, max_chars=max_chars) == 1.0:
        return 1.0
    return None


# --------------------------------------------------------------------------------------------------------------------
# Per-stream sums
# --------------------------------------------------------------------------------------------------------------------


def grounded_overall(format: float, box_valid: float, box_iou: float, accuracy: float) -> float:
    """Reward of a stream-A (grounded) rollout: ``format + box_valid + box_iou + accuracy``."""
    return format + box_valid + box_iou + accuracy


def textual_overall(format: float, accuracy: float, consistency: float, consistency_weight: float = 1.0) -> float:
    """Reward of a stream-B (textual) rollout: ``format + accuracy + consistency_weight * consistency`` (weight 1:
    the paper; ``algorithm.consistency_weight``)."""
    return format + accuracy + consistency_weight * consistency


def single_overall(format: float, accuracy: float, accuracy_weight: float = SINGLE_ACCURACY_WEIGHT) -> float:
    """Reward of a ``single``-stream rollout: ``format + accuracy_weight * accuracy`` (weight 1.5)."""
    return format + accuracy_weight * accuracy
