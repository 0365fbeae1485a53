"""``OpenAIJudge`` against scripted faults (a local fault server) and, once, a real vLLM server.

The fault-server tests use only localhost HTTP and take a few seconds in all, so they are plain
tests. Each one bounds its own wall time: every ``score()`` runs under ``asyncio.wait_for``.
The real-server test (``integration``) starts ``vllm.entrypoints.openai.api_server`` on the tiny
random model, whose answers are nonsense: it checks that nonsense becomes counted fallbacks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ivgr_dist.config import JudgeConfig
from ivgr_dist.reward.judge import JudgeRequest, JudgeUnavailable, make_judge
from ivgr_dist.reward.judge.openai import OpenAIJudge, request_deadline_s
from ivgr_dist.reward.judge.prompts import RUBRIC
from support.fault_server import Fault, FaultServer

SECRET = "sk-test-0123456789abcdef"
# vLLM's OpenAI-compatible server with the import fix (README, "The CPU stack"): run as a module from ``-c``, so its
# engine processes, spawned, get the fix from the process config before they import anything (``-m`` would have
# them import the server module, transformers included, first)
VLLM_SERVER = (
    "import runpy, ivgr_dist.runtime._ext_fix as fix; fix.install(); "
    "runpy.run_module('vllm.entrypoints.openai.api_server', run_name='__main__')"
)


def _cfg(urls, **kw) -> JudgeConfig:
    base = dict(backend="openai", urls=list(urls), timeout_s=1.0, max_retries=2, backoff_s=0.02, concurrency=8)
    base.update(kw)
    return JudgeConfig(**base)


def _req(i: int = 0, kind: str = "consistency", fallback: float = 0.3) -> JudgeRequest:
    return JudgeRequest(
        kind, f"question {i}?", "the circle is red", "a red circle", fallback=fallback, request_id=str(i)
    )


def _score(judge, requests, limit_s: float = 20.0):
    async def go():
        try:
            return await asyncio.wait_for(judge.score(requests), timeout=limit_s)
        finally:
            await judge.close()

    return asyncio.run(go())


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}/v1"


def test_samples_are_averaged_over_parsable_ones():
    texts = ["<score>1.0</score>", "<score>0.3</score>", "no idea", "<score>0.7</score>"]
    with FaultServer(default=Fault.ok(texts)) as srv:
        judge = make_judge(_cfg([srv.url], samples=4, temperature=0.5))
        assert isinstance(judge, OpenAIJudge)
        [res] = _score(judge, [_req()])
        assert srv.count == 1 and srv.requests[0].body["n"] == 4 and srv.requests[0].body["temperature"] == 0.5
        assert srv.requests[0].path == "/v1/chat/completions"
    assert res.score == pytest.approx((1.0 + 0.3 + 0.7) / 3)
    assert (res.calls, res.retries, res.parse_failures, res.failed) == (1, 0, 1, False)


def test_server_ignoring_n_is_topped_up_with_separate_calls():
    with FaultServer(default=Fault.ok("<score>0.7</score>"), honour_n=False) as srv:
        judge = OpenAIJudge(_cfg([srv.url], samples=3))
        first, second = _score(judge, [_req(0)]) + _score(judge, [_req(1)])
        assert srv.count == 6 and "n" not in srv.requests[-1].body
    assert first.calls == 3 and second.calls == 3 and first.score == pytest.approx(0.7) == second.score
    assert judge.endpoint_stats()[0]["supports_n"] is False


def test_timeouts_retry_then_fall_back_within_the_deadline():
    with FaultServer(default=Fault.delay(10.0)) as srv:
        cfg = _cfg([srv.url], timeout_s=0.3, max_retries=2, backoff_s=0.05)
        t0 = time.monotonic()
        [res] = _score(OpenAIJudge(cfg), [_req(fallback=0.3)])
        elapsed = time.monotonic() - t0
        assert srv.count == 3
    assert (res.score, res.failed, res.timeouts, res.calls, res.retries) == (0.3, True, 3, 3, 2)
    assert request_deadline_s(cfg) == pytest.approx(3 * (0.3 + 0.1))
    assert 0.9 <= elapsed < request_deadline_s(cfg) + 0.5
    assert res.latency_s < request_deadline_s(cfg)


@pytest.mark.parametrize(
    "faults",
    [
        [Fault.status(500), Fault.status(503), Fault.status(429)],
        [Fault.drop(), Fault.drop()],
        [Fault.garbage(), Fault.status(502)],
        [Fault.unparsable()],
    ],
    ids=["5xx-429", "dropped", "garbage", "unparsable"],
)
def test_faults_then_success_are_retried(faults):
    with FaultServer(script=faults, default=Fault.ok("<score>0.7</score>")) as srv:
        [res] = _score(OpenAIJudge(_cfg([srv.url], max_retries=3)), [_req()])
        assert srv.count == len(faults) + 1
    assert (res.score, res.failed, res.retries, res.calls) == (0.7, False, len(faults), len(faults) + 1)
    assert res.timeouts == 0 and res.parse_failures == sum(f.text.startswith("I am") for f in faults)


@pytest.mark.parametrize(
    "fault",
    [Fault.unparsable(), Fault.garbage(), Fault.drop(), Fault.status(500)],
    ids=["unparsable", "garbage", "dropped", "500"],
)
def test_persistent_faults_give_the_fallback(fault):
    with FaultServer(default=fault) as srv:
        results = _score(
            OpenAIJudge(_cfg([srv.url], max_retries=2)), [_req(0, fallback=0.7), _req(1, "equivalence", 0.0)]
        )
        assert srv.count == 6
    for res, fallback in zip(results, (0.7, 0.0), strict=True):
        assert (res.score, res.failed, res.calls, res.retries) == (fallback, True, 3, 2)
        assert res.parse_failures == (3 if fault.kind == "ok" else 0)


def test_bad_request_is_not_retried():
    with FaultServer(default=Fault.status(400)) as srv:
        [res] = _score(OpenAIJudge(_cfg([srv.url], max_retries=3)), [_req()])
        assert srv.count == 1
    assert res.failed and res.calls == 1 and res.retries == 0


@pytest.mark.parametrize("code", [401, 403, 404])
def test_key_and_url_errors_are_not_retried(code):
    with FaultServer(default=Fault.status(code)) as srv:
        [res] = _score(OpenAIJudge(_cfg([srv.url], max_retries=3)), [_req(fallback=0.3)])
        assert srv.count == 1
    assert (res.failed, res.score, res.calls, res.retries, res.error) == (True, 0.3, 1, 0, f"HTTP {code}")


def _check(judge, driver_has_key=None, limit_s: float = 20.0):
    async def go():
        try:
            await asyncio.wait_for(judge.check(driver_has_key), timeout=limit_s)
        finally:
            await judge.close()

    asyncio.run(go())


KEY_VAR = "IVGR_TEST_JUDGE_KEY"


@pytest.mark.parametrize("sent", ["none", "wrong"])
def test_start_check_fails_on_a_missing_or_rejected_key(monkeypatch, sent):
    monkeypatch.delenv(KEY_VAR, raising=False)
    if sent == "wrong":
        monkeypatch.setenv(KEY_VAR, "sk-wrong-key")
    with FaultServer(api_key=SECRET, forbid_wrong_key=True) as srv:
        with pytest.raises(JudgeUnavailable) as err:
            _check(OpenAIJudge(_cfg([srv.url], api_key_env=KEY_VAR)))
        assert srv.count == 1  # one request, no retry
        url = srv.url
    msg = str(err.value)
    assert url in msg and f"${KEY_VAR}" in msg and "sk-wrong-key" not in msg
    if sent == "none":
        assert "HTTP 401" in msg and "no API key" in msg
        assert "ray job submit" in msg and "env_vars" in msg and "reward.judge.api_key_file" in msg
    else:
        assert "HTTP 403" in msg and "rejected the API key" in msg


def test_start_check_fails_when_only_the_driver_has_the_key(monkeypatch):
    """The driver has $VAR, this process (a reward worker) does not: fail before any request, naming it."""
    monkeypatch.delenv(KEY_VAR, raising=False)
    with FaultServer() as srv:  # an endpoint that needs no key: the missing key is still a mistake
        with pytest.raises(JudgeUnavailable, match=rf"\${KEY_VAR} is set in the driver but not in this reward worker"):
            _check(OpenAIJudge(_cfg([srv.url], api_key_env=KEY_VAR)), driver_has_key=True)
        assert srv.count == 0


def test_start_check_404_names_the_url_and_the_model():
    with FaultServer(served_model="judge") as srv:
        with pytest.raises(JudgeUnavailable) as err:
            _check(OpenAIJudge(_cfg([srv.url], model="no-such-model")))
        assert srv.count == 1
        url = srv.url
    msg = str(err.value)
    assert "HTTP 404" in msg and url in msg and "reward.judge.model='no-such-model'" in msg and "/v1" in msg


def test_start_check_fails_in_seconds_on_an_unreachable_url():
    url = _dead_url()
    t0 = time.monotonic()
    with pytest.raises(JudgeUnavailable, match=rf"judge {url} is unreachable \(ConnectError\)"):
        _check(OpenAIJudge(_cfg([url], timeout_s=30.0, max_retries=3)))
    assert time.monotonic() - t0 < 5


def test_start_check_fails_on_a_judge_that_does_not_answer():
    with FaultServer(default=Fault.delay(10.0)) as srv:
        t0 = time.monotonic()
        with pytest.raises(JudgeUnavailable, match=r"did not answer a test request within reward.judge.timeout_s=0.5"):
            _check(OpenAIJudge(_cfg([srv.url], timeout_s=0.5, max_retries=3)))
        assert time.monotonic() - t0 < 3 and srv.count == 1


def test_start_check_passes_a_working_judge_and_only_warns_on_a_5xx(caplog):
    with FaultServer(script=[Fault.status(503)], default=Fault.ok(), served_model="judge") as srv:
        with caplog.at_level(logging.WARNING, logger="ivgr_dist.reward.judge.openai"):
            _check(OpenAIJudge(_cfg([srv.url])))  # 503: the server is up; the failure-rate stop covers the rest
            assert "HTTP 503" in caplog.text and "starting anyway" in caplog.text
            _check(OpenAIJudge(_cfg([srv.url])))
        assert srv.count == 2


def test_api_key_file_is_read_and_a_missing_one_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_VAR, raising=False)
    key_file = tmp_path / "judge.key"
    key_file.write_text(SECRET + "\n")
    with FaultServer(api_key=SECRET) as srv:
        judge = OpenAIJudge(_cfg([srv.url], api_key_env=KEY_VAR, api_key_file=str(key_file)))
        _check(judge)
        assert srv.requests[0].headers["authorization"] == f"Bearer {SECRET}" and SECRET not in repr(judge)
        missing = tmp_path / "absent.key"
        with pytest.raises(JudgeUnavailable, match=rf"reward.judge.api_key_file='{missing}'.*cannot read it"):
            _check(OpenAIJudge(_cfg([srv.url], api_key_file=str(missing))))
        assert srv.count == 1  # the missing file fails before any request


def test_load_is_spread_and_a_dead_endpoint_is_avoided():
    with (
        FaultServer(default=Fault.delay(0.05, "<verdict>yes</verdict>")) as a,
        FaultServer(default=Fault.delay(0.05, "<verdict>yes</verdict>")) as b,
    ):
        results = _score(OpenAIJudge(_cfg([a.url, b.url], concurrency=4)), [_req(i, "equivalence") for i in range(20)])
        assert a.count + b.count == 20 and min(a.count, b.count) >= 6, (a.count, b.count)
        assert all(r.score == 1.0 and not r.failed for r in results)

        judge = OpenAIJudge(_cfg([_dead_url(), a.url], concurrency=4, max_retries=1), cooldown_s=30.0)
        before = a.count
        results = _score(judge, [_req(i, "equivalence") for i in range(20)])
        assert a.count - before == 20
    assert all(r.score == 1.0 and not r.failed for r in results)
    dead, live = judge.endpoint_stats()
    assert dead["failures"] >= 3 and dead["cooldowns"] == 1 and dead["cooling_down"] and dead["successes"] == 0
    assert live["successes"] == 20 and live["failures"] == 0
    assert sum(r.retries for r in results) == dead["failures"]  # each failed try was retried on the live one


def test_concurrency_bound_is_respected():
    with FaultServer(default=Fault.delay(0.15, "<score>1.0</score>")) as srv:
        results = _score(OpenAIJudge(_cfg([srv.url], concurrency=3)), [_req(i) for i in range(12)])
        assert srv.count == 12 and srv.max_concurrent == 3
    assert all(not r.failed for r in results)


def test_api_key_is_sent_and_never_shown(monkeypatch, caplog):
    monkeypatch.setenv("IVGR_TEST_JUDGE_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    script = [Fault.status(500), Fault.drop(), Fault.garbage(), Fault.status(401)]
    with FaultServer(script=script, default=Fault.ok()) as srv:
        judge = OpenAIJudge(_cfg([srv.url], api_key_env="IVGR_TEST_JUDGE_KEY", max_retries=3, concurrency=1))
        results = _score(judge, [_req(0), _req(1)])
        assert {r.headers["authorization"] for r in srv.requests} == {f"Bearer {SECRET}"}
    assert results[0].failed and not results[1].failed
    shown = [repr(judge), str(judge), repr(vars(judge)), repr(judge.cfg), repr(results), caplog.text]
    assert "api_key=set" in repr(judge)
    assert all(SECRET not in s for s in shown)
    monkeypatch.delenv("IVGR_TEST_JUDGE_KEY")
    assert "api_key=unset" in repr(OpenAIJudge(_cfg(["http://127.0.0.1:9/v1"], api_key_env="IVGR_TEST_JUDGE_KEY")))


def test_unknown_kind_is_a_caller_error():
    judge = OpenAIJudge(_cfg(["http://127.0.0.1:9/v1"]))
    with pytest.raises(ValueError, match="kind"):
        _score(judge, [JudgeRequest("bogus", "q", "c", "r")])


# ------------------------------------------------------------------------------ real vLLM server


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", VLLM_SERVER, "--model", str(tiny_model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", "judge", "--enforce-eager"]
    cmd += ["--gpu-memory-utilization", "0.2", "--max-model-len", "1024"]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="2")
    log_file = open(os.devnull, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"vLLM server exited with {proc.returncode}"
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "vLLM server not ready within 120 s"
            time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log_file.close()


@pytest.mark.integration
def test_real_vllm_server_nonsense_becomes_counted_fallbacks(vllm_server):
    cfg = _cfg([vllm_server], samples=4, temperature=0.5, max_tokens=24, timeout_s=30.0, max_retries=1)
    judge = OpenAIJudge(cfg)
    requests = [_req(i, fallback=0.0) for i in range(3)] + [_req(9, "equivalence", fallback=0.0)]
    results = _score(judge, requests, limit_s=request_deadline_s(cfg) + 10)
    print("vLLM server judge results:", results, "stats:", judge.endpoint_stats())  # shown on failure / with -s
    for req, res in zip(requests, results, strict=True):
        if res.failed:
            assert res.score == req.fallback and res.parse_failures == 4 * res.calls
        else:
            valid = RUBRIC if req.kind == "consistency" else (0.0, 1.0)
            assert min(valid) <= res.score <= max(valid)
        assert res.calls == res.retries + 1 and res.timeouts == 0
    assert judge.endpoint_stats()[0]["supports_n"] is True  # vLLM honours n
    assert dataclasses.asdict(results[0]).keys() >= {"calls", "parse_failures", "latency_s"}
