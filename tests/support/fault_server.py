"""A fault-injecting OpenAI-compatible chat server for judge tests (127.0.0.1, a free port, one thread).

Why: the judge's value is in how it survives bad servers; real servers misbehave only by chance.
Here every request's behaviour is scripted, so each fault is exercised on purpose:

    with FaultServer(script=[Fault.status(503), Fault.ok("<score>0.7</score>")]) as srv:
        ... srv.url (base URL, ends in /v1), srv.count, srv.requests[i].headers, srv.max_concurrent

``script`` is consumed one entry per chat request, in arrival order; afterwards ``default`` answers.
``script`` may also be a callable ``(index, body) -> Fault``. Behaviours: ``ok(text)`` (a chat
completion whose choices hold ``text``, or cycle through a list of texts; honours ``n`` unless
``honour_n=False``), ``delay(s,
then)``, ``status(code)``, ``drop()`` (closes the connection without a response), ``garbage()`` (a
200 body that is not JSON), ``unparsable()`` (a valid completion whose content parses as no score),
``huge(nbytes, declare)`` (a 200 completion of ``nbytes`` bytes streamed in 1 MiB writes, with or without a
``Content-Length``; ``requests[i].sent`` counts the bytes the client took before it hung up).

Like a real server, it can check what it is sent before the script is consulted: ``api_key`` set, a
request without ``Authorization: Bearer <api_key>`` gets 401 (a wrong key 403 with ``forbid_wrong_key``);
``served_model`` set, a body naming another model gets 404 (as vLLM answers). Such requests are recorded
(with their status) but consume no script entry.

Bounded: handler threads are daemons, delays wake up when the server stops, and ``stop()`` returns
within about a second; the server serves only between ``start()`` and ``stop()``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Fault:
    """What the server does with one request."""

    kind: str = "ok"
    text: str | list[str] = "<score>1.0</score>"
    """Content of every choice, or a list that choice i takes entry i (cycling)."""
    delay_s: float = 0.0
    code: int = 200
    nbytes: int = 0
    declare: bool = True

    @staticmethod
    def ok(text: str | list[str] = "<score>1.0</score>") -> Fault:
        return Fault("ok", text)

    @staticmethod
    def delay(seconds: float, then: str = "<score>1.0</score>") -> Fault:
        return Fault("ok", then, delay_s=seconds)

    @staticmethod
    def status(code: int) -> Fault:
        return Fault("status", code=code)

    @staticmethod
    def drop() -> Fault:
        return Fault("drop")

    @staticmethod
    def garbage() -> Fault:
        return Fault("garbage")

    @staticmethod
    def unparsable() -> Fault:
        return Fault("ok", "I am not sure what the score should be.")

    @staticmethod
    def huge(nbytes: int, declare: bool = True) -> Fault:
        return Fault("huge", nbytes=nbytes, declare=declare)


@dataclass
class Recorded:
    """One request as the server saw it."""

    path: str
    headers: dict[str, str]
    body: Any
    fault: Fault
    started: float
    ended: float = 0.0
    sent: int = 0
    """Body bytes written (``huge``)."""


@dataclass
class FaultServer:
    script: Any = field(default_factory=list)
    default: Fault = field(default_factory=Fault.ok)
    honour_n: bool = True
    api_key: str | None = None
    """Required bearer token: none -> 401, a wrong one -> 401 (403 with ``forbid_wrong_key``)."""
    forbid_wrong_key: bool = False
    served_model: str | None = None
    """The only model served: a body naming another one gets 404."""

    def __post_init__(self) -> None:
        self.requests: list[Recorded] = []
        self._scripted = 0  # requests the script answered (refusals take no entry)
        self.in_flight = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ lifecycle

    def start(self) -> FaultServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive threads

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": [{"id": "judge", "object": "model"}]}))
                else:
                    self._send(404, "{}")

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = None
                server._serve(self, body)

            def _send(self, code: int, text: str, ctype: str = "application/json") -> None:
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL, as the judge config wants it."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def count(self) -> int:
        """Chat requests received."""
        return len(self.requests)

    # ------------------------------------------------------------------------------- serving

    def _next_fault(self, body: Any) -> tuple[Fault, Recorded]:
        with self._lock:
            i = self._scripted
            self._scripted += 1
            if callable(self.script):
                fault = self.script(i, body)
            else:
                fault = self.script[i] if i < len(self.script) else self.default
            rec = Recorded(path="", headers={}, body=body, fault=fault, started=time.monotonic())
            self.requests.append(rec)
            self.in_flight += 1
            self.max_concurrent = max(self.max_concurrent, self.in_flight)
        return fault, rec

    def _refusal(self, headers: dict[str, str], body: Any) -> Fault | None:
        """The 401/403/404 a real server would send before looking at the request, if any."""
        if self.api_key is not None:
            auth = headers.get("authorization")
            if auth != f"Bearer {self.api_key}":
                return Fault.status(403 if auth and self.forbid_wrong_key else 401)
        if self.served_model is not None and (body or {}).get("model") != self.served_model:
            return Fault.status(404)
        return None

    def _serve(self, handler, body: Any) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        refusal = self._refusal(headers, body)
        if refusal is not None:
            with self._lock:
                rec = Recorded(path="", headers={}, body=body, fault=refusal, started=time.monotonic())
                self.requests.append(rec)
                self.in_flight += 1
            fault = refusal
        else:
            fault, rec = self._next_fault(body)
        rec.path, rec.headers = handler.path, headers
        try:
            if fault.delay_s:
                self._stop.wait(fault.delay_s)
                if self._stop.is_set():
                    return
            if fault.kind == "status":
                handler._send(fault.code, json.dumps({"error": {"message": "injected", "code": fault.code}}))
            elif fault.kind == "drop":
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
            elif fault.kind == "garbage":
                handler._send(200, "<html>this is not json", ctype="text/html")
            elif fault.kind == "huge":
                _send_huge(handler, fault, rec)
            else:
                n = int((body or {}).get("n") or 1) if self.honour_n else 1
                handler._send(200, json.dumps(_completion(fault.text, n, (body or {}).get("model", "judge"))))
        except OSError:  # the client went away (its timeout): nothing to answer
            pass
        finally:
            with self._lock:
                self.in_flight -= 1
                rec.ended = time.monotonic()


def _completion(text: str | list[str], n: int, model: str) -> dict:
    texts = [text] if isinstance(text, str) else list(text)
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": texts[i % len(texts)]}, "finish_reason": "stop"}
            for i in range(n)
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _send_huge(handler, fault: Fault, rec: Recorded) -> None:
    """A chat completion whose one content string makes the body ``fault.nbytes`` long, written 1 MiB at a time;
    without ``declare`` the body ends when the connection closes (HTTP/1.0)."""
    head, tail = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "', b'"}}]}'
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    if fault.declare:
        handler.send_header("Content-Length", str(fault.nbytes))
    handler.end_headers()
    chunk = b"7" * 2**20
    left = fault.nbytes - len(head) - len(tail)
    handler.wfile.write(head)
    rec.sent = len(head)
    while left > 0:
        part = chunk[: min(left, len(chunk))]
        handler.wfile.write(part)
        rec.sent += len(part)
        left -= len(part)
    handler.wfile.write(tail)
    rec.sent += len(tail)
