"""Judge replies are capped: bytes on the wire (``openai.MAX_REPLY_BYTES``), characters before parsing
(``prompts.MAX_REPLY_CHARS``). The server is the real loopback HTTP server of ``support.fault_server``."""

from __future__ import annotations

import asyncio
import time

import pytest

from ivgr_dist.config import JudgeConfig
from ivgr_dist.reward.judge import JudgeRequest
from ivgr_dist.reward.judge.openai import MAX_REPLY_BYTES, OpenAIJudge
from ivgr_dist.reward.judge.prompts import MAX_REPLY_CHARS, parse_consistency, parse_equivalence
from support.fault_server import Fault, FaultServer

pytestmark = pytest.mark.timeout(120)

HUGE = 150 * 2**20
# What the kernel may take beyond the cap before the client hangs up: both loopback socket buffers.
SOCKET_SLACK = 16 * 2**20


@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "no-length"])
def test_a_150_mb_reply_is_cut_off_at_the_cap_and_fails_the_call(declare):
    req = JudgeRequest("consistency", "q?", "the red circle", "the red circle", 0.0)
    with FaultServer(script=[Fault.huge(HUGE, declare)] * 2, default=Fault.ok("<score>1.0</score>")) as srv:
        judge = OpenAIJudge(JudgeConfig(backend="openai", urls=[srv.url], timeout_s=20.0, max_retries=1, backoff_s=0))

        async def run():
            try:
                return await judge.score([req])
            finally:
                await judge.close()

        t0 = time.monotonic()
        [res] = asyncio.run(run())
        wall = time.monotonic() - t0
        time.sleep(0.2)  # let the server's handlers see the hang-up
        sent = [r.sent for r in srv.requests]
    assert res.failed and res.score == 0.0 and res.calls == 2  # a bad body: retried within max_retries, then failed
    assert len(sent) == 2 and all(s < MAX_REPLY_BYTES + SOCKET_SLACK for s in sent), sent
    assert wall < 15


def test_parsers_do_not_read_a_reply_over_the_char_cap():
    pad = "x" * (MAX_REPLY_CHARS - len("<score>0.7</score>"))
    assert parse_consistency(pad + "<score>0.7</score>") == 0.7  # at the cap: read
    assert parse_consistency(pad + "x<score>0.7</score>") is None  # one over: not read
    assert parse_equivalence("y" * MAX_REPLY_CHARS + "<verdict>yes</verdict>") is None
