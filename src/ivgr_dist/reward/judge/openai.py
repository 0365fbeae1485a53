"""``OpenAIJudge``: the judge behind one or more OpenAI-compatible ``/v1/chat/completions`` endpoints.

Why this much machinery: judge calls sit on the reward path of every training step, and remote
model servers are slow, overloaded, restarted or wrong in all the usual ways. A judge fault must
cost a bounded amount of time and turn into an explicit, counted fallback score, never an exception
or a hang. The retry loop and the endpoint balancer are shared with the engine backend
(:mod:`ivgr_dist.reward.judge.engine`).

Behaviour per request (one ``JudgeRequest``):

- up to ``max_retries + 1`` attempts. One attempt asks for ``cfg.samples`` answers: with the ``n``
  parameter, or with separate concurrent calls on an endpoint seen to ignore or reject ``n``;
- each attempt has a deadline of ``timeout_s`` (httpx timeout AND an ``asyncio.wait_for`` guard);
- retried: timeouts, connection errors (refused, dropped), HTTP 5xx/429 and any other status except
  those below, bodies that are not a chat completion, and answers of which no sample parses. Not
  retried: HTTP 400/413/422, which blame the request itself (malformed, prompt too long), and
  401/403/404, which blame the configuration (a missing or rejected key, a wrong base URL or model
  name): no retry mends them (the OpenAI SDK does not retry them either), and the start-up check
  (:meth:`OpenAIJudge.check`) stops the run on them. A 400/422 to a request with ``n > 1`` is taken
  as "no ``n`` support" and answered with separate calls;
- between attempts: exponential backoff with full jitter, ``uniform(0, min(backoff_s * 2**k, cap))``;
- an attempt succeeds when at least one sample parses; the score is the mean of the parsed samples;
- when every attempt fails: ``score = request.fallback``, ``failed=True``;
- an overall guard of ``(max_retries + 1) * (timeout_s + max backoff)`` covers the whole request;
- a reply body is read as a stream and at most :data:`MAX_REPLY_BYTES`: a 200 whose body is longer (declared or
  sent) is a failed call (a bad body, retried within ``max_retries``), so a runaway server costs neither memory nor
  parse time; each sample's text is then capped again in characters by the parsers (``prompts.MAX_REPLY_CHARS``).

Concurrency: ``asyncio.Semaphore(cfg.concurrency)`` bounds requests in flight. A request makes one
HTTP call at a time, except on endpoints without ``n`` support, where one attempt makes ``samples``
concurrent calls. Waiting for a slot is not part of a request's deadline (it is bounded by the
deadlines of the requests holding the slots).

Load balancing: least requests in flight, ties round-robin. An endpoint with ``fail_threshold``
consecutive failures is cooled down for ``cooldown_s`` (used only when no other endpoint is
available); a retry avoids the endpoint that just failed. ``endpoint_stats()`` shows the counters.

The API key is read at construction, in the process that builds the judge (a reward worker), from
the file ``cfg.api_key_file`` when set, else from the environment variable NAMED by ``cfg.api_key_env``,
and is only ever put in the ``Authorization`` header: not in reprs, logs or exception text.

Start-up check (:meth:`OpenAIJudge.check`, run once per reward worker by ``make_scorer`` before the
engines and the learner start): one real request per endpoint, one try, deadline ``timeout_s``. An
endpoint that cannot be reached (refused, DNS, no answer), answers 401/403 (the key), 404 (base URL or
``reward.judge.model``) or 400/413/422, or a key that is missing in this worker while the driver has it
(or an unreadable ``api_key_file``), raises :class:`~ivgr_dist.reward.judge.JudgeUnavailable` naming
the URL, the status and the key's variable or file. A 5xx/429 or an unparsable answer only warns: the
server is up, and the run-time failure-rate stop (``reward.judge.max_failure_rate``) covers a judge
that keeps failing.

The httpx client is created on first use inside the running event loop (a new loop gets a new client),
so the judge works from a Ray actor's thread-less asyncio loop and from ``asyncio.run`` in tests.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ivgr_dist.reward.judge.base import JudgeRequest, JudgeResult, JudgeUnavailable
from ivgr_dist.reward.judge.prompts import build_messages, parser_for

__all__ = ["Balancer", "CallError", "OpenAIJudge", "max_backoff_s", "request_deadline_s", "run_request"]

log = logging.getLogger(__name__)

_BAD_REQUEST = (400, 413, 422)
"""HTTP statuses that blame the request itself (malformed, too long): not retried."""
_BAD_CONFIG = (401, 403, 404)
"""HTTP statuses that blame the configuration (API key, base URL, model name): not retried, fatal at start."""

BACKOFF_CAP_S = 30.0
"""Longest single backoff sleep (unless ``backoff_s`` itself is longer)."""

MAX_REPLY_BYTES = 8 * 2**20
"""Longest reply body read from an endpoint (bytes, after any content decoding). A judge reply is a few KB
(``max_tokens`` x ``samples``); 8 MiB leaves room for reasoning judges and JSON escapes."""


class CallError(Exception):
    """One judge call failed. ``retryable=False`` stops the attempts; ``timeout`` counts as a timeout; ``kind``:
    what failed, without the URL (``HTTP 503``, ``ConnectError``; default the message), for ``JudgeResult.error``."""

    def __init__(self, message: str, retryable: bool = True, timeout: bool = False, status: int = 0, kind: str = ""):
        super().__init__(message)
        self.retryable = retryable
        self.timeout = timeout
        self.status = status
        self.kind = kind or message


def max_backoff_s(cfg) -> float:
    """Longest backoff sleep the retry loop can take under ``cfg``."""
    if cfg.max_retries == 0:
        return 0.0
    cap = max(BACKOFF_CAP_S, cfg.backoff_s)
    return min(cfg.backoff_s * 2 ** (cfg.max_retries - 1), cap)


def request_deadline_s(cfg) -> float:
    """Upper bound on one request's wall time once it holds a slot."""
    return (cfg.max_retries + 1) * (cfg.timeout_s + max_backoff_s(cfg))


@dataclass
class Endpoint:
    """One judge target (a URL or an engine) and its counters."""

    name: str
    index: int
    in_flight: int = 0
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    cooldowns: int = 0
    cooldown_until: float = 0.0
    supports_n: bool = True


class Balancer:
    """Least in-flight selection with round-robin ties and a failure cool-down."""

    def __init__(self, names: list[str], fail_threshold: int = 3, cooldown_s: float = 10.0):
        if not names:
            raise ValueError("a judge needs at least one endpoint")
        self.endpoints = [Endpoint(name, i) for i, name in enumerate(names)]
        self.fail_threshold = fail_threshold
        self.cooldown_s = cooldown_s
        self._rr = 0

    def pick(self, avoid: Endpoint | None = None) -> Endpoint:
        now = time.monotonic()
        eps = self.endpoints
        tiers = (
            [e for e in eps if e.cooldown_until <= now and e is not avoid],
            [e for e in eps if e.cooldown_until <= now],
            [e for e in eps if e is not avoid],
            eps,
        )
        pool = next(t for t in tiers if t)
        start = self._rr % len(eps)
        self._rr += 1
        rotated = sorted(pool, key=lambda e: (e.index - start) % len(eps))
        return min(rotated, key=lambda e: e.in_flight)  # min keeps the first of equals: round-robin ties

    def success(self, ep: Endpoint) -> None:
        ep.successes += 1
        ep.consecutive_failures = 0

    def failure(self, ep: Endpoint) -> None:
        ep.failures += 1
        ep.consecutive_failures += 1
        if ep.consecutive_failures >= self.fail_threshold:
            if ep.cooldown_until <= time.monotonic():
                ep.cooldowns += 1
                log.warning("judge endpoint %s: %d failures in a row, cooling down", ep.name, ep.consecutive_failures)
            ep.cooldown_until = time.monotonic() + self.cooldown_s

    def stats(self) -> list[dict]:
        now = time.monotonic()
        return [
            {
                "endpoint": e.name,
                "in_flight": e.in_flight,
                "attempts": e.attempts,
                "successes": e.successes,
                "failures": e.failures,
                "cooldowns": e.cooldowns,
                "cooling_down": e.cooldown_until > now,
                "supports_n": e.supports_n,
            }
            for e in self.endpoints
        ]


Call = Callable[[Endpoint, JudgeResult], Awaitable[list[str]]]


async def run_request(req: JudgeRequest, cfg, balancer: Balancer, call: Call) -> JudgeResult:
    """Retry loop shared by the backends: ``call(endpoint, result)`` returns the sample texts of one
    attempt (counting its calls on ``result``) or raises ``CallError``; never raises itself."""
    parse = parser_for(req.kind)
    res = JudgeResult(score=req.fallback)
    t0 = time.monotonic()
    scores: list[float] = []

    async def attempts() -> None:
        avoid = None
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                res.retries += 1
                cap = min(cfg.backoff_s * 2 ** (attempt - 1), max(BACKOFF_CAP_S, cfg.backoff_s))
                await asyncio.sleep(random.uniform(0.0, cap))
            ep = balancer.pick(avoid)
            ep.in_flight += 1
            ep.attempts += 1
            try:
                texts = await asyncio.wait_for(call(ep, res), timeout=cfg.timeout_s)
            except (asyncio.TimeoutError, CallError) as e:
                timed_out = isinstance(e, asyncio.TimeoutError) or e.timeout
                res.timeouts += int(timed_out)
                balancer.failure(ep)
                avoid = ep
                why = "timeout" if isinstance(e, asyncio.TimeoutError) else str(e)
                res.error = "timeout" if isinstance(e, asyncio.TimeoutError) else e.kind
                log.debug("judge %s attempt %d on %s failed: %s", req.request_id, attempt, ep.name, why)
                if isinstance(e, CallError) and not e.retryable:
                    return
                continue
            finally:
                ep.in_flight -= 1
            balancer.success(ep)  # the endpoint answered; unparsable text is the model's fault
            parsed = [parse(t) for t in texts]
            res.parse_failures += sum(p is None for p in parsed)
            scores.extend(p for p in parsed if p is not None)
            if scores:
                return
            res.error = "unparsable answer"
            avoid = None

    try:
        await asyncio.wait_for(attempts(), timeout=request_deadline_s(cfg))
    except asyncio.TimeoutError:
        res.timeouts += 1
        res.error = "request deadline"
    except Exception as e:  # a backend bug must still not take the reward step down
        log.error("judge %s: unexpected %s: %s", req.request_id, type(e).__name__, e)
        res.error = type(e).__name__
    if scores:
        res.score, res.error = math.fsum(scores) / len(scores), ""
    else:
        res.score, res.failed = req.fallback, True
    res.latency_s = time.monotonic() - t0
    return res


_KEY_HINT = (
    "reward workers read ${var} from their own environment, and under `ray job submit` the submitting shell's "
    "variables do not reach them: pass it in the job's runtime_env env_vars (cluster/submit.sh does), or put the key "
    "in a file on storage every node sees and set reward.judge.api_key_file"
)


def _read_key(cfg) -> tuple[str, str]:
    """``(key, problem)``: the key from ``cfg.api_key_file`` when set, else from ``$cfg.api_key_env`` (empty when
    unset); ``problem`` says why a configured key file gave no key (raised by the start-up check), else ""."""
    path = getattr(cfg, "api_key_file", None)
    if not path:
        return (os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""), ""
    where = f"reward.judge.api_key_file={path!r} on host {socket.gethostname()}"
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        return "", f"{where}: cannot read it ({type(e).__name__}): it must be on storage every node sees"
    return key, ("" if key else f"{where}: the file is empty")


class _Secret:
    """Holds the API key; prints as ``***``."""

    __slots__ = ("value",)

    def __init__(self, value: str):
        self.value = value

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__


class OpenAIJudge:
    """Judge over OpenAI-compatible HTTP endpoints (``cfg.urls``, base URLs such as ``http://host:8000/v1``)."""

    def __init__(self, cfg, fail_threshold: int = 3, cooldown_s: float = 10.0):
        if not cfg.urls:
            raise ValueError("reward.judge.urls: backend=openai needs at least one endpoint")
        self.cfg = cfg
        self.balancer = Balancer([u.rstrip("/") for u in cfg.urls], fail_threshold, cooldown_s)
        key, self.key_problem = _read_key(cfg)
        self._key = _Secret(key)
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._client = None
        self._loop = None

    def __repr__(self) -> str:
        key = "set" if self._key.value else "unset"
        return f"OpenAIJudge(urls={[e.name for e in self.balancer.endpoints]}, model={self.cfg.model!r}, api_key={key})"

    # ----------------------------------------------------------------------------------- start-up check

    async def check(self, driver_has_key: bool | None = None) -> None:
        """One test request per endpoint (one try, deadline ``timeout_s``); raises ``JudgeUnavailable`` when the
        judge cannot work (module docstring). ``driver_has_key``: whether the driver has ``$api_key_env`` (None:
        unknown or not applicable), so that a key missing only here is named as such."""
        if self.key_problem:
            raise JudgeUnavailable(self.key_problem)
        if driver_has_key and not self._key.value:
            raise JudgeUnavailable(
                f"${self.cfg.api_key_env} is set in the driver but not in this reward worker "
                f"(host {socket.gethostname()}): {_KEY_HINT.format(var=self.cfg.api_key_env)}"
            )
        self._http()
        request = JudgeRequest("equivalence", "start-up check", "4", "4", request_id="start-up check")
        messages = build_messages(request)
        await asyncio.gather(*(self._check_endpoint(ep, messages) for ep in self.balancer.endpoints))

    async def _check_endpoint(self, ep: Endpoint, messages: list[dict]) -> None:
        cfg = self.cfg
        try:
            await asyncio.wait_for(self._post(ep, messages, 1, JudgeResult(0.0)), timeout=cfg.timeout_s)
            return
        except asyncio.TimeoutError:
            error = CallError("timeout", timeout=True, kind="timeout")
        except CallError as e:
            error = e
        if error.timeout:
            raise JudgeUnavailable(
                f"judge {ep.name} did not answer a test request within reward.judge.timeout_s={cfg.timeout_s:g} s "
                f"({error.kind}): is the server up and reward.judge.urls right?"
            )
        if error.kind == "ConnectError":  # refused, DNS: nothing answers there
            raise JudgeUnavailable(
                f"judge {ep.name} is unreachable ({error.kind}): is the server up and reward.judge.urls right?"
            )
        if error.status in (401, 403):
            raise JudgeUnavailable(f"judge {ep.name} answered HTTP {error.status}: {self._key_advice()}")
        if error.status == 404:
            raise JudgeUnavailable(
                f"judge {ep.name} answered HTTP 404 to POST {ep.name}/chat/completions: a wrong base URL in "
                f"reward.judge.urls (it ends in /v1, e.g. http://host:8000/v1) or reward.judge.model={cfg.model!r} "
                "is not served there"
            )
        if not error.retryable:
            raise JudgeUnavailable(
                f"judge {ep.name} rejected a test request with HTTP {error.status}: check reward.judge.model="
                f"{cfg.model!r} and reward.judge.max_tokens={cfg.max_tokens}"
            )
        log.warning("judge %s: the start-up test request failed (%s); starting anyway", ep.name, error.kind)

    def _key_advice(self) -> str:
        """Why a 401/403 happened, naming where the key comes from (never the key)."""
        cfg = self.cfg
        if cfg.api_key_file:
            return f"the endpoint rejected the API key read from reward.judge.api_key_file={cfg.api_key_file!r}"
        if self._key.value:
            return f"the endpoint rejected the API key in ${cfg.api_key_env} (reward.judge.api_key_env)"
        return (
            f"this reward worker (host {socket.gethostname()}) has no API key: ${cfg.api_key_env} "
            f"(reward.judge.api_key_env) is not set here. {_KEY_HINT.format(var=cfg.api_key_env)}"
        )

    def endpoint_stats(self) -> list[dict]:
        """Per-endpoint counters (attempts, failures, cool-downs, in flight, ``n`` support)."""
        return self.balancer.stats()

    def _http(self):
        import httpx

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            conns = self.cfg.concurrency * self.cfg.samples
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.cfg.timeout_s),
                limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns),
            )
            self._loop = loop
            self._sem = asyncio.Semaphore(self.cfg.concurrency)  # asyncio primitives belong to one loop
        return self._client

    async def score(self, requests: list[JudgeRequest]) -> list[JudgeResult]:
        for r in requests:
            parser_for(r.kind)  # unknown kinds are caller bugs: raise before any work
        self._http()
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, req: JudgeRequest) -> JudgeResult:
        messages = build_messages(req)

        async def call(ep: Endpoint, res: JudgeResult) -> list[str]:
            k = self.cfg.samples
            if k == 1 or not ep.supports_n:
                return await self._separate(ep, messages, k, res)
            try:
                texts = await self._post(ep, messages, k, res)
            except CallError as e:
                if e.status not in (400, 422):
                    raise
                ep.supports_n = False  # a 4xx on n > 1: try once more without n
                log.info("judge endpoint %s rejected n=%d; using separate calls", ep.name, k)
                return await self._separate(ep, messages, k, res)
            if len(texts) < k:  # the server ignored n: top up with separate calls
                ep.supports_n = False
                texts += await self._separate(ep, messages, k - len(texts), res)
            return texts

        async with self._sem:
            return await run_request(req, self.cfg, self.balancer, call)

    async def _separate(self, ep: Endpoint, messages: list[dict], k: int, res: JudgeResult) -> list[str]:
        parts = await asyncio.gather(*(self._post(ep, messages, 1, res) for _ in range(k)), return_exceptions=True)
        texts = [t for p in parts if not isinstance(p, BaseException) for t in p]
        if not texts:
            errors = [p for p in parts if isinstance(p, BaseException)]
            raise errors[0] if isinstance(errors[0], CallError) else CallError(repr(errors[0]))
        return texts

    async def _post(self, ep: Endpoint, messages: list[dict], n: int, res: JudgeResult) -> list[str]:
        import httpx

        body = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }
        if n > 1:
            body["n"] = n
        headers = {"Authorization": f"Bearer {self._key.value}"} if self._key.value else {}
        res.calls += 1
        try:
            r = await _post_capped(self._http(), f"{ep.name}/chat/completions", body, headers)
        except httpx.TimeoutException as e:
            kind = type(e).__name__
            raise CallError(f"{kind} from {ep.name}", timeout=True, kind=kind) from None
        except httpx.HTTPError as e:  # connection refused/dropped, DNS, protocol errors
            kind = type(e).__name__
            raise CallError(f"{kind} from {ep.name}", kind=kind) from None
        if r.status_code != 200:
            code = r.status_code
            final = code in _BAD_REQUEST or code in _BAD_CONFIG
            raise CallError(f"HTTP {code} from {ep.name}", retryable=not final, status=code, kind=f"HTTP {code}")
        try:
            choices = r.json()["choices"]
            texts = [c["message"]["content"] or "" for c in choices]
        except (ValueError, KeyError, TypeError) as e:
            kind = "not a chat completion"
            raise CallError(f"{kind} from {ep.name} ({type(e).__name__})", kind=kind) from None
        if not texts or not all(isinstance(t, str) for t in texts):
            raise CallError(f"no text choices from {ep.name}", kind="no text choices")
        return texts

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.aclose()
            except RuntimeError:  # its loop is gone: nothing left to close
                pass


_BODY_HEADERS = ("content-encoding", "content-length", "transfer-encoding")
"""Headers that describe the body on the wire, not the body the capped response holds."""


async def _post_capped(client, url: str, body: dict, headers: dict, limit: int = MAX_REPLY_BYTES):
    """POST ``body`` and read the reply, at most ``limit`` bytes of it, as a fully read ``httpx.Response``.

    A 200 whose body is longer than ``limit`` (by its ``Content-Length``, or once that much has arrived) raises
    ``CallError`` and closes the connection; another status keeps what was read (its body is only diagnostics).
    The request asks for an uncompressed reply, so the bytes counted are the bytes received.
    """
    import httpx

    async with client.stream("POST", url, json=body, headers={**headers, "Accept-Encoding": "identity"}) as r:
        declared = r.headers.get("content-length", "")
        if r.status_code == 200 and declared.isdigit() and int(declared) > limit:
            raise CallError(
                f"reply of {int(declared)} bytes from {url} is over the {limit}-byte cap", kind="reply over cap"
            )
        chunks, size = [], 0
        async for chunk in r.aiter_bytes():
            size += len(chunk)
            if size > limit:
                if r.status_code == 200:
                    raise CallError(
                        f"reply from {url} passed the {limit}-byte cap; stopped reading", kind="reply over cap"
                    )
                break
            chunks.append(chunk)
        kept = [(k, v) for k, v in r.headers.multi_items() if k.lower() not in _BODY_HEADERS]
        return httpx.Response(r.status_code, headers=kept, content=b"".join(chunks), request=r.request)
