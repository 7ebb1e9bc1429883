"""A fake OpenAI chat-completions server for tests and benchmarks.

It speaks the real protocol over a real loopback socket (aiohttp.web, 127.0.0.1, port 0)
from a background thread with its own event loop, and can inject faults:
429 (optionally with Retry-After), 500, slow replies, truncated JSON bodies and dropped
connections.  Faults are drawn from a `random.Random(seed)` in arrival order, so a run
with the same seed and arrival order gets the same faults; `Faults.script` forces the
first arrivals' faults exactly.

    with FakeOpenAIServer(latency_s=0.01) as srv:
        base_url = srv.base_url          # "http://127.0.0.1:<port>/v1"
        ...
        srv.completed, srv.by_status, srv.peak_in_flight, srv.arrivals
        srv.answered, srv.delivered   # per request signature: answers made, answers written out

The batch API too, in memory (`/v1/files`, `/v1/batches`: OpenAI's layout): a batch ends
after `BatchFaults.polls` GETs of it, answering each line as the chat endpoint would, with
faults: an expired (or cancelled, failed) batch with only its first lines done, error lines,
non-200 lines and lines missing from the output. `srv.files_uploaded`, `srv.batches_created`,
`srv.batch_answered` (per request signature) count what it saw. `prompt_cache=True` reports
`usage.prompt_tokens_details.cached_tokens`: a system prompt's words, from the second request
that carries it on.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import multiprocessing as mp
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from aiohttp import web

from support.loopback import ServedApp

FAULT_KINDS = ("429", "500", "slow", "malformed", "drop", "ok")


@dataclass
class BatchFaults:
    """How the fake batch API ends a batch. Line numbers count the uploaded file's lines from 0."""

    polls: int = 2  # GETs of a batch before it ends (the first GET after that sees it ended)
    status: str = "completed"  # or "expired", "cancelled", "failed": then only the first `done` lines are answered
    done: int = 0
    error_lines: set = field(default_factory=set)  # in the error file, with an error object
    status_500_lines: set = field(default_factory=set)  # in the output file, status_code 500
    missing_lines: set = field(default_factory=set)  # in neither file


@dataclass
class Faults:
    """Per-request fault probabilities (one draw per arrival); deterministic given seed."""

    p_429: float = 0.0
    retry_after_s: float | None = None  # Retry-After header value sent with 429s
    p_500: float = 0.0
    p_slow: float = 0.0
    slow_s: float = 0.0  # extra latency of a slow reply
    p_malformed: float = 0.0  # 200 with a truncated JSON body
    p_drop: float = 0.0  # close the connection without any response
    seed: int = 0
    # forced faults for the first arrivals, e.g. ["429", "429"]; then the probabilities apply
    script: list[str] = field(default_factory=list)


def words(text: str) -> int:
    return len(text.split())


def signature(body: dict) -> str:
    """Identity of a request (what a client would resend on retry)."""
    key = {k: body.get(k) for k in ("messages", "seed", "temperature", "top_p", "max_tokens")}
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def last_user_message(body: dict) -> str:
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


_FILLER = "and so the answer goes on for a few more words"


def default_reply(body: dict) -> str:
    """Deterministic text that names its request: its last user message, seed, temperature."""
    return f"reply to [{last_user_message(body)}] seed={body.get('seed')} temperature={body.get('temperature')} : {_FILLER}"


class FakeOpenAIServer:
    def __init__(
        self,
        latency_s: float = 0.0,
        faults: Faults | None = None,
        reply: Callable[[dict], str] | None = None,
        require_key: str | None = None,
        record_arrivals: bool = True,
        batch: BatchFaults | None = None,
        prompt_cache: bool = False,
        port: int = 0,
    ):
        self.latency_s = latency_s
        self.port = port  # 0: any free port; a fixed one gives a client the same base_url run after run
        self.faults = faults or Faults()
        self.reply = reply or default_reply
        self.require_key = require_key
        self.record_arrivals = record_arrivals
        self.batch = batch or BatchFaults()
        self.prompt_cache = prompt_cache
        self._rng = random.Random(self.faults.seed)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._served: ServedApp | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.base_url: str | None = None
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self._seen_prefixes: set = set()
        self.reset_counters()

    # -- counters -----------------------------------------------------------------
    def reset_counters(self) -> None:
        with self._lock:
            self.requests_total = 0  # every POST /v1/chat/completions that arrived
            self.completed = 0  # 200 OK with a valid chat.completion body
            self.by_status: collections.Counter = collections.Counter()  # int status or "drop"
            self.faults_injected: collections.Counter = collections.Counter()
            # with record_arrivals (the default):
            self.answered: collections.Counter = collections.Counter()  # signature -> valid answers
            # signature -> valid answers written whole to the client's socket (a client that
            # timed out and hung up first is not counted): a duplicate delivery shows here
            self.delivered: collections.Counter = collections.Counter()
            self.arrivals: list[float] = []  # time.monotonic() of each arrival (server clock)
            self.arrivals_by_sig: dict[str, list[float]] = collections.defaultdict(list)
            self.in_flight = 0
            self.peak_in_flight = 0
            self.last_request: dict | None = None
            self._fault_count = 0
            # the batch API (its files and batches are state, not counters: kept)
            self.files_uploaded = 0
            self.batches_created: list[str] = []
            self.batch_polls: collections.Counter = collections.Counter()  # batch id -> GETs
            self.batch_answered: collections.Counter = collections.Counter()  # signature -> lines answered
            self.batch_order: list[str] = []  # last user message of each line, in file order

    def stats(self) -> dict:
        with self._lock:
            return {
                "requests_total": self.requests_total,
                "completed": self.completed,
                "by_status": {str(k): v for k, v in self.by_status.items()},
                "faults_injected": dict(self.faults_injected),
                "peak_in_flight": self.peak_in_flight,
            }

    # -- fault drawing -------------------------------------------------------------
    def _draw_fault(self) -> str:
        f = self.faults
        with self._lock:
            n = self._fault_count
            self._fault_count += 1
            if n < len(f.script):
                return f.script[n]
            x = self._rng.random()
        for kind, p in (("429", f.p_429), ("500", f.p_500), ("drop", f.p_drop),
                        ("malformed", f.p_malformed), ("slow", f.p_slow)):
            if x < p:
                return kind
            x -= p
        return "ok"

    # -- handlers ------------------------------------------------------------------
    @staticmethod
    def _error(status: int, message: str, type_: str, headers: dict | None = None) -> web.Response:
        body = {"error": {"message": message, "type": type_, "param": None, "code": None}}
        return web.json_response(body, status=status, headers=headers)

    def _count_status(self, status) -> None:
        with self._lock:
            self.by_status[status] += 1

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "fake-model", "object": "model", "created": 0, "owned_by": "charbuild-tests"}]})

    def _check_key(self, request: web.Request) -> web.Response | None:
        if self.require_key is None:
            return None
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if token != self.require_key:
            # like the real API, the message echoes (part of) the key it got
            return self._error(401, f"Incorrect API key provided: {token}.", "invalid_request_error")
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        now = time.monotonic()
        with self._lock:
            self.requests_total += 1
            if self.record_arrivals:
                self.arrivals.append(now)
            self.in_flight += 1
            if self.in_flight > self.peak_in_flight:
                self.peak_in_flight = self.in_flight
        try:
            resp = await self._chat_inner(request, now)
        finally:
            with self._lock:
                self.in_flight -= 1
        return resp

    async def _chat_inner(self, request: web.Request, now: float) -> web.StreamResponse:
        bad_key = self._check_key(request)
        if bad_key is not None:
            self._count_status(401)
            return bad_key
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            self._count_status(400)
            return self._error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        if not body.get("model") or not isinstance(body.get("messages"), list) or not body["messages"]:
            self._count_status(400)
            return self._error(400, "'model' and a non-empty 'messages' are required.", "invalid_request_error")
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or len(stop) > 4):
            self._count_status(400)
            return self._error(400, "'stop' accepts at most 4 sequences.", "invalid_request_error")

        sig = signature(body) if self.record_arrivals else ""
        with self._lock:
            self.last_request = body
            if self.record_arrivals:
                self.arrivals_by_sig[sig].append(now)
        fault = self._draw_fault()
        if fault != "ok":
            with self._lock:
                self.faults_injected[fault] += 1

        if fault == "429":
            self._count_status(429)
            headers = {}
            if self.faults.retry_after_s is not None:
                headers["Retry-After"] = f"{self.faults.retry_after_s:g}"
            return self._error(429, "Rate limit reached for requests.", "requests", headers=headers)
        if fault == "500":
            self._count_status(500)
            return self._error(500, "The server had an error while processing your request.", "server_error")

        delay = self.latency_s + (self.faults.slow_s if fault == "slow" else 0.0)
        if delay > 0:
            await asyncio.sleep(delay)

        if fault == "drop":
            self._count_status("drop")
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=200)  # writing it fails: the client sees a dropped connection

        payload = self._completion(body, stop or [])
        raw = json.dumps(payload).encode()
        if fault == "malformed":
            self._count_status(200)
            cut = raw[: max(1, len(raw) // 2)]
            if self._rng.random() < 0.5:
                # truncated JSON with a matching Content-Length: a complete but broken body
                return web.Response(body=cut, content_type="application/json")
            # declared length longer than what is sent, then the connection closes
            resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            resp.content_length = len(raw)
            await resp.prepare(request)
            await resp.write(cut)
            if request.transport is not None:
                request.transport.close()
            return resp

        with self._lock:
            self.by_status[200] += 1
            self.completed += 1
            if sig:
                self.answered[sig] += 1
        resp = web.Response(body=raw, content_type="application/json")
        if not sig:
            return resp
        # Sent here, not by aiohttp after the handler returns, so the server knows the answer
        # reached the client's socket; a hung-up client raises or cancels this handler.
        await resp.prepare(request)
        await resp.write_eof()
        with self._lock:
            self.delivered[sig] += 1
        return resp

    def _completion(self, body: dict, stop: list[str]) -> dict:
        text = self.reply(body)
        finish = "stop"
        cut = -1
        for s in stop:
            i = text.find(s) if s else -1
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            text = text[:cut]
        max_tokens = body.get("max_tokens")
        toks = text.split()
        if isinstance(max_tokens, int) and len(toks) > max_tokens:
            text = " ".join(toks[:max_tokens])
            finish = "length"
        prompt_tokens = sum(words(str(m.get("content", ""))) for m in body["messages"] if isinstance(m, dict))
        completion_tokens = words(text)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if self.prompt_cache:  # a prefix cache: the system prompt is cached once a request carried it
            first = body["messages"][0] if body["messages"] else {}
            system = first.get("content") if isinstance(first, dict) and first.get("role") == "system" else None
            cached = 0
            if system:
                with self._lock:
                    cached = words(str(system)) if (body["model"], system) in self._seen_prefixes else 0
                    self._seen_prefixes.add((body["model"], system))
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return {
            "id": f"chatcmpl-{next(self._ids):024d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }],
            "usage": usage,
        }

    # -- the batch API -------------------------------------------------------------
    async def _upload(self, request: web.Request) -> web.Response:
        bad_key = self._check_key(request)
        if bad_key is not None:
            return bad_key
        form = await request.post()
        f = form.get("file")
        if form.get("purpose") != "batch" or f is None or not hasattr(f, "file"):
            return self._error(400, "'purpose' batch and a 'file' are required.", "invalid_request_error")
        data = f.file.read()
        with self._lock:
            fid = f"file-{next(self._ids):024d}"
            self.files[fid] = data
            self.files_uploaded += 1
        return web.json_response({"id": fid, "object": "file", "bytes": len(data), "purpose": "batch",
                                  "filename": f.filename, "created_at": int(time.time())})

    async def _file_content(self, request: web.Request) -> web.Response:
        bad_key = self._check_key(request)
        if bad_key is not None:
            return bad_key
        data = self.files.get(request.match_info["fid"])
        if data is None:
            return self._error(404, "No such file.", "invalid_request_error")
        return web.Response(body=data, content_type="application/octet-stream")

    async def _create_batch(self, request: web.Request) -> web.Response:
        bad_key = self._check_key(request)
        if bad_key is not None:
            return bad_key
        body = json.loads(await request.read())
        if body.get("input_file_id") not in self.files or body.get("endpoint") != "/v1/chat/completions" \
                or body.get("completion_window") != "24h":
            return self._error(400, "bad batch request", "invalid_request_error")
        with self._lock:
            bid = f"batch_{next(self._ids):024d}"
            self.batches[bid] = {"id": bid, "object": "batch", "endpoint": body["endpoint"],
                                 "input_file_id": body["input_file_id"], "completion_window": "24h",
                                 "status": "validating", "output_file_id": None, "error_file_id": None,
                                 "created_at": int(time.time()), "metadata": body.get("metadata"),
                                 "request_counts": {"total": 0, "completed": 0, "failed": 0}}
            self.batches_created.append(bid)
        return web.json_response(self.batches[bid])

    async def _list_batches(self, request: web.Request) -> web.Response:
        bad_key = self._check_key(request)
        if bad_key is not None:
            return bad_key
        return web.json_response({"object": "list", "data": list(reversed(list(self.batches.values())))})

    async def _get_batch(self, request: web.Request) -> web.Response:
        bad_key = self._check_key(request)
        if bad_key is not None:
            return bad_key
        bid = request.match_info["bid"]
        b = self.batches.get(bid)
        if b is None:
            return self._error(404, "No such batch.", "invalid_request_error")
        with self._lock:
            self.batch_polls[bid] += 1
            polls = self.batch_polls[bid]
        if b["status"] in ("validating", "in_progress"):
            b["status"] = "in_progress"
            if polls > self.batch.polls:
                self._finish(b)
        return web.json_response(b)

    def _finish(self, b: dict) -> None:
        """Answer the batch's lines as the chat endpoint would, with the configured faults."""
        f = self.batch
        out, err = [], []
        lines = [json.loads(x) for x in self.files[b["input_file_id"]].decode().splitlines() if x.strip()]
        for i, line in enumerate(lines):
            body = line["body"]
            with self._lock:
                self.batch_order.append(last_user_message(body))
            if i in f.missing_lines:
                continue
            if f.status != "completed" and i >= f.done:
                err.append({"id": f"batch_req_{i}", "custom_id": line["custom_id"], "response": None,
                            "error": {"code": f"batch_{f.status}", "message": f"This request could not be executed "
                                                                              f"before the batch {f.status}."}})
                continue
            if i in f.error_lines:
                err.append({"id": f"batch_req_{i}", "custom_id": line["custom_id"], "response": None,
                            "error": {"code": "server_error", "message": "The line failed."}})
                continue
            if i in f.status_500_lines:
                out.append({"id": f"batch_req_{i}", "custom_id": line["custom_id"], "error": None,
                            "response": {"status_code": 500, "request_id": f"req_{i}",
                                         "body": {"error": {"message": "server error", "type": "server_error"}}}})
                continue
            stop = body.get("stop") or []
            payload = self._completion(body, [stop] if isinstance(stop, str) else stop)
            with self._lock:
                self.batch_answered[signature(body)] += 1
            out.append({"id": f"batch_req_{i}", "custom_id": line["custom_id"], "error": None,
                        "response": {"status_code": 200, "request_id": f"req_{i}", "body": payload}})
        with self._lock:
            for name, rows in (("output_file_id", out), ("error_file_id", err)):
                if rows:
                    fid = f"file-{next(self._ids):024d}"
                    self.files[fid] = "".join(json.dumps(r) + "\n" for r in rows).encode()
                    b[name] = fid
            b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
            b["status"] = f.status

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> str:
        if self.base_url is not None:
            return self.base_url

        def app() -> web.Application:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            app.router.add_get("/v1/models", self._models)
            app.router.add_post("/v1/files", self._upload)
            app.router.add_get("/v1/files/{fid}/content", self._file_content)
            app.router.add_post("/v1/batches", self._create_batch)
            app.router.add_get("/v1/batches", self._list_batches)
            app.router.add_get("/v1/batches/{bid}", self._get_batch)
            return app

        self._served = ServedApp(app, "fake-openai-server", self.port, handler_cancellation=True)
        self._loop = self._served.loop
        self.base_url = f"http://127.0.0.1:{self._served.port}/v1"
        return self.base_url

    def stop(self) -> None:
        if self._served is not None:
            self._served.stop()
        self._served = self._loop = None
        self.base_url = None

    def __enter__(self) -> "FakeOpenAIServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# -- a lean server for benchmarks: the same answers, a fraction of the CPU per request -------

class _LeanProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, POST /v1/chat/completions only, no faults: each request is
    answered `latency_s` after it arrived with the body `FakeOpenAIServer` would send (same
    text, usage and shape), so the client parses what it parses against the full server."""

    def __init__(self, server: "LeanOpenAIServer"):
        self.server = server
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buf) < end + 4 + length:
                return
            body, self.buf = self.buf[end + 4:end + 4 + length], self.buf[end + 4 + length:]
            self.server._arrived(self, head.split(" ", 2)[:2], body)

    def send(self, status: str, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                                 b"Connection: keep-alive\r\n\r\n%s" % (status.encode(), len(payload), payload))


class LeanOpenAIServer(FakeOpenAIServer):
    """`FakeOpenAIServer`'s answers over a bare asyncio protocol (no aiohttp.web, no fault
    drawing, no per-request task): for throughput benchmarks, where the fake server's own
    CPU would otherwise compete with the client under test on a small machine."""

    def __init__(self, latency_s: float = 0.0, reply: Callable[[dict], str] | None = None):
        super().__init__(latency_s=latency_s, reply=reply, record_arrivals=False)
        self._server: asyncio.AbstractServer | None = None

    def _arrived(self, proto: _LeanProtocol, request_line: list[str], raw: bytes) -> None:
        self.requests_total += 1
        self.in_flight += 1
        if self.in_flight > self.peak_in_flight:
            self.peak_in_flight = self.in_flight
        if request_line != ["POST", "/v1/chat/completions"]:
            self.in_flight -= 1
            proto.send("404 Not Found", b'{"error": {"message": "not found"}}')
            return
        try:
            body = json.loads(raw)
            stop = body.get("stop") or []
            payload = json.dumps(self._completion(body, [stop] if isinstance(stop, str) else stop)).encode()
        except (ValueError, KeyError, TypeError, AttributeError):
            self.in_flight -= 1
            proto.send("400 Bad Request", b'{"error": {"message": "bad request"}}')
            return
        self._loop.call_later(self.latency_s, self._answer, proto, payload)

    def _answer(self, proto: _LeanProtocol, payload: bytes) -> None:
        self.in_flight -= 1
        self.completed += 1
        self.by_status[200] += 1
        proto.send("200 OK", payload)

    def start(self) -> str:
        if self.base_url is not None:
            return self.base_url
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(
                loop.create_server(lambda: _LeanProtocol(self), "127.0.0.1", 0, backlog=1024))
            self.base_url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"
            ready.set()
            loop.run_forever()
            self._server.close()
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="lean-openai-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        assert self.base_url is not None, "lean server did not start"
        return self.base_url

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None
        self.base_url = None


# -- the server in its own process, for benchmarks (a thread would share the client's GIL) --

SERVER_IMPLS = {"aiohttp": FakeOpenAIServer, "lean": LeanOpenAIServer}


def _make_server(impl: str, latency: float, reply: Callable[[dict], str] | None):
    kw = {"record_arrivals": False} if impl == "aiohttp" else {}
    return SERVER_IMPLS[impl](latency_s=latency, reply=reply, **kw)


def _serve_child(latency: float, conn, impl: str = "aiohttp", reply: Callable[[dict], str] | None = None) -> None:
    srv = _make_server(impl, latency, reply)
    conn.send(srv.start())
    while conn.recv() == "cpu":
        conn.send(time.process_time())
    conn.send(srv.stats())  # anything else: stop
    srv.stop()


class ServerHandle:
    """The fake server for a benchmark: `mode` "process" (its own process: its CPU does not
    share the client's GIL) or "thread"; `impl` "aiohttp" (FakeOpenAIServer, what the tests
    use) or "lean" (LeanOpenAIServer: same answers, less CPU per request). `reply`: the
    server's answer text for a request body (a module-level function, for a process server)."""

    def __init__(self, mode: str, latency: float, impl: str = "aiohttp", reply: Callable[[dict], str] | None = None):
        self.mode = mode
        if mode == "thread":
            self.srv = _make_server(impl, latency, reply)
            self.base_url = self.srv.start()
        else:
            ctx = mp.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_serve_child, args=(latency, child, impl, reply), daemon=True)
            self.proc.start()
            self.base_url = self.conn.recv()

    def cpu(self) -> float:
        """Server CPU seconds so far (0 for a thread server: it is in the client's own CPU)."""
        if self.mode == "thread":
            return 0.0
        self.conn.send("cpu")
        return self.conn.recv()

    def stop(self) -> dict:
        if self.mode == "thread":
            stats = self.srv.stats()
            self.srv.stop()
            return stats
        self.conn.send("stop")
        stats = self.conn.recv()
        self.proc.join(10)
        return stats
