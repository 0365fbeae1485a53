"""``reward.judge.on_failure=mask`` end to end: the in-process scorer with the OpenAI-compatible judge backend
against the fault-injecting HTTP server (loopback), which fails 30% of the judge calls.

Done-when of the issue: no textual rollout's reward contains a fallback value. Every judged text carries a tag
(``[c-<record>-<i>]`` in a textual reasoning, ``[e-<record>-<stream>-<i>]`` in an answer the rules cannot
decide), so the server knows which rollout each call is about: a seeded 30% of the tags get a fault (5xx,
dropped connection, garbage body, unparsable answer, timeout), the others a real answer (consistency 1.0 or
0.7, equivalence yes). With ``max_retries=0`` a failed call is a failed request, and the expected masks follow
from the failed tags alone.
"""

from __future__ import annotations

import random
import re

import pytest

from ivgr_dist.config import AlgorithmConfig, JudgeConfig
from ivgr_dist.driver.trainer import rollout_advantages
from ivgr_dist.reward.scorer import InProcessScorer
from ivgr_dist.types import Prompt, Rollout
from support.fault_server import Fault, FaultServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RECORDS, N = 6, 5
FALLBACK = 0.3  # a consistency the server never answers: a 0.3 could only be the fallback
TAG = re.compile(r"\[([ce]-[\w-]+)\]")
FAULTS = [Fault.status(503), Fault.drop(), Fault.garbage(), Fault.unparsable(), Fault.delay(5.0)]


def _real_consistency(i: int) -> float:
    return 1.0 if i % 2 == 0 else 0.7


def _batch() -> tuple[list[list[Rollout]], list[str]]:
    """Grounded and textual groups of RECORDS records, and every tag (= every judge call) they make."""
    groups, tags = [], []
    for idx in range(RECORDS):
        base = dict(original_idx=idx, prompt_text="", prompt_token_ids=[1], num_prompt_tokens=1, answer="red",
                    question_type="free_form", datasource="t", target_boxes=[[10, 10, 50, 50]],
                    question="What color is the circle?")  # fmt: skip
        a, b = Prompt(stream="grounded", **base), Prompt(stream="textual", **base)
        a_texts = []
        for i in range(N):  # rollout 0: exact answer and IoU 1, always the record's reference
            box = f"[{10 + 2 * i},10,50,50]"
            answer = "red" if i % 2 == 0 else f"red [e-{idx}-grounded-{i}]"
            a_texts.append(f"<think>the red circle <box>{box}</box> is red</think><answer>{answer}</answer>")
            tags += [f"e-{idx}-grounded-{i}"] * (i % 2)
        b_texts = []
        for i in range(N):
            answer = "red" if i % 3 == 0 else f"red [e-{idx}-textual-{i}]"
            b_texts.append(f"<think>the red circle is red [c-{idx}-{i}]</think><answer>{answer}</answer>")
            tags += [f"c-{idx}-{i}"] + [f"e-{idx}-textual-{i}"] * (i % 3 != 0)
        groups.append([Rollout(a, i, [1], t, [0.0], 0) for i, t in enumerate(a_texts)])
        groups.append([Rollout(b, i, [1], t, [0.0], 0) for i, t in enumerate(b_texts)])
    return groups, tags


def _tag_of(body) -> str:
    found = {m for msg in (body or {}).get("messages", []) for m in TAG.findall(str(msg.get("content", "")))}
    assert len(found) == 1, found
    return found.pop()


def _run(on_failure: str, failing: list[str]):
    groups, tags = _batch()
    order = {t: k for k, t in enumerate(failing)}

    def script(index: int, body) -> Fault:
        tag = _tag_of(body)
        if tag in order:
            return FAULTS[order[tag] % len(FAULTS)]
        if tag.startswith("c-"):
            return Fault.ok(f"<score>{_real_consistency(int(tag.rsplit('-', 1)[1]))}</score>")
        return Fault.ok("<verdict>yes</verdict>")

    with FaultServer(script=script) as srv:
        cfg = JudgeConfig(backend="openai", urls=[srv.url], timeout_s=1.0, max_retries=0, concurrency=4,
                          fallback_consistency=FALLBACK, on_failure=on_failure)  # fmt: skip
        scorer = InProcessScorer(AlgorithmConfig(), cfg)
        try:
            out = list(scorer.score_stream(groups, [g[0].prompt for g in groups], step=1))
            metrics = scorer.metrics()
        finally:
            scorer.close()
        seen = sorted(_tag_of(r.body) for r in srv.requests)
    assert seen == sorted(tags)  # one call per judged component, each exactly once
    return {g[0].prompt.uid: g for g in out}, metrics


@pytest.fixture(scope="module")
def failing() -> list[str]:
    _, tags = _batch()
    return random.Random(7).sample(sorted(tags), k=round(0.3 * len(tags)))


def test_mask_no_textual_reward_holds_a_fallback(failing):
    out, m = _run("mask", failing)
    failed = set(failing)
    masked_rollouts, masked_groups, dropped, kept = set(), set(), 0, 0
    for idx in range(RECORDS):
        textual = out[f"{idx}:textual"]
        excluded = [f"e-{idx}-textual-{i}" in failed for i in range(N)]
        drop = any(f"c-{idx}-{i}" in failed and not excluded[i] for i in range(N))
        dropped, kept = dropped + drop, kept + (not drop)
        for i, r in enumerate(textual):
            assert r.excluded == excluded[i]
            if excluded[i]:
                assert "accuracy" not in r.rewards
            else:
                assert r.rewards["accuracy"] == 1.0  # exact, or the judge's yes; never the 0.0 fallback
            if drop or f"c-{idx}-{i}" in failed:
                assert "consistency" not in r.rewards
            else:
                assert r.rewards["consistency"] == _real_consistency(i)  # the judge's own score
            assert r.rewards.get("consistency") != FALLBACK
            assert r.reward == pytest.approx(sum(r.rewards.values()))  # exactly the components present
            if excluded[i] or f"c-{idx}-{i}" in failed:
                masked_rollouts.add(r.prompt.uid + f"#{i}")
                masked_groups.add(r.prompt.uid)
        advantages = rollout_advantages(textual, eps=1e-6)
        assert all(a == 0.0 for a, x in zip(advantages, excluded, strict=True) if x)
        for i, r in enumerate(out[f"{idx}:grounded"]):
            assert r.excluded == (f"e-{idx}-grounded-{i}" in failed)
            if r.excluded:
                masked_rollouts.add(r.prompt.uid + f"#{i}")
                masked_groups.add(r.prompt.uid)
    assert dropped and kept, "the seed should give groups with and without a dropped consistency"
    assert m["judge/failures"] == len(failing) == 18 and m["judge/requests"] == m["judge/calls"] == 60
    assert m["reward/judge_masked_rollouts"] == len(masked_rollouts)  # the rollouts of the failed calls
    assert m["reward/judge_masked_groups"] == len(masked_groups)
    assert m["reward/judge_excluded_rollouts"] == sum(t.startswith("e-") for t in failing) > 0


def test_zero_trains_on_the_fallbacks_the_mask_leaves_out(failing):
    out, m = _run("zero", failing)
    failed = set(failing)
    textual = [(idx, i, r) for idx in range(RECORDS) for i, r in enumerate(out[f"{idx}:textual"])]
    for idx, i, r in textual:
        expected = FALLBACK if f"c-{idx}-{i}" in failed else _real_consistency(i)
        assert r.rewards["consistency"] == expected and not r.excluded
        assert r.rewards["accuracy"] == (0.0 if f"e-{idx}-textual-{i}" in failed else 1.0)
    assert any(r.rewards["consistency"] == FALLBACK for _, _, r in textual)
    assert m["judge/failures"] == 18 and m["reward/judge_masked_rollouts"] == m["reward/judge_masked_groups"] == 0
