"""The HTTP side of `dfuse bench serve`: an asyncio client that hands out concurrent Futures (so
bench/lib/load.py drives HTTP requests exactly as it drives an Engine), and `dfuse serve` run as
a child process on loopback.

The benchmark talks to the server only over HTTP, as any client would: bench/ may not import
serve/ (tests/unit/test_layers.py), and an in-process server would share the benchmark's
interpreter lock, which is not what a deployment sees.

The client library is httpx2 (the `openai` package's HTTP client, so installed with it) or, where
that is missing, httpx: the same API under another name.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass

IMAGES_PATH = "/v1/images/generations"
CLIENT_LIBRARIES = ("httpx2", "httpx")
INSTALL_CLIENT = "pip install httpx2 (it comes with the openai package: pip install -e '.[test]')"
_LISTENING = re.compile(r"listening on (http://\S+)")


def http_library():
    """The first of CLIENT_LIBRARIES that is installed; RuntimeError saying what to install."""
    for name in CLIENT_LIBRARIES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise RuntimeError(f"dfuse bench serve needs an async HTTP client: {INSTALL_CLIENT}, or pip install httpx")


@dataclass(frozen=True)
class Answer:
    """What the server said to one generation request."""

    status: int
    error: str | None  # None: a 200 with the images asked for
    images: int = 0
    retry_after: str | None = None  # a 429's Retry-After header


def read_answer(status: int, content: bytes, n: int, size: str | None, retry_after: str | None = None) -> Answer:
    """Check a /v1/images/generations response: a 200 must carry n images of `size` ("WxH", None:
    any); an error's message is OpenAI's error.message (the body's start when it is not JSON)."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if status != 200:
        message = body.get("error", {}).get("message") if isinstance(body, dict) and isinstance(body.get("error"), dict) \
            else content[:200].decode("utf-8", "replace")
        return Answer(status, f"HTTP {status}: {message}", retry_after=retry_after)
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return Answer(status, "HTTP 200 without a JSON body holding data[]")
    images = [d for d in body["data"] if isinstance(d, dict) and (d.get("b64_json") or d.get("url"))]
    if len(images) != n:
        return Answer(status, f"HTTP 200 with {len(images)} image(s) for n={n}", images=len(images))
    if size is not None and body.get("size") != size:
        return Answer(status, f"HTTP 200 with size {body.get('size')!r} for a {size} request", images=len(images))
    return Answer(status, None, images=len(images))


class AnswerError(Exception):
    """A generation the server refused or answered wrongly: raised by `HttpClient.result`."""

    def __init__(self, answer: Answer):
        super().__init__(answer.error)
        self.answer = answer


class HttpClient:
    """One AsyncClient on an event loop of its own thread. `submit` returns a concurrent Future of
    the request's Answer: cancelling it cancels the HTTP request (the server then cancels the work)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 600.0,
                 max_connections: int = 1024):
        httpx = http_library()
        self.base_url, self.timeout_s = base_url.rstrip("/"), timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-http-client", daemon=True)
        self._thread.start()
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}

        async def make_client():
            # Every request of an open loop may be outstanding at once: the pool must not queue them
            # (that would be the client's latency, not the server's).
            limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
            return httpx.AsyncClient(base_url=self.base_url, headers=headers, limits=limits,
                                     timeout=httpx.Timeout(timeout_s, connect=10.0))

        self._client = asyncio.run_coroutine_threadsafe(make_client(), self._loop).result()

    def submit(self, body: dict) -> Future:
        """POST body to /v1/images/generations; a Future of its Answer (never raises for a refusal:
        a 429 is an answer; a connection error or the timeout is the Future's exception)."""
        return asyncio.run_coroutine_threadsafe(self._generate(body), self._loop)

    async def _generate(self, body: dict) -> Answer:
        # One bound for the whole exchange: the client's own timeout restarts at every byte read.
        response = await asyncio.wait_for(self._client.post(IMAGES_PATH, json=body), self.timeout_s)
        return read_answer(response.status_code, response.content, body.get("n", 1), body.get("size"),
                           response.headers.get("retry-after"))

    def generate(self, body: dict) -> Answer:
        """One request, waited for; AnswerError unless it was served (warm-ups, isolated latency)."""
        answer = self.submit(body).result(self.timeout_s + 5)
        if answer.error is not None:
            raise AnswerError(answer)
        return answer

    def get_json(self, path: str) -> tuple[int, object]:
        async def get():
            response = await self._client.get(path)
            try:
                return response.status_code, response.json()
            except ValueError:
                return response.status_code, None

        return asyncio.run_coroutine_threadsafe(get(), self._loop).result(self.timeout_s)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def wait_healthy(base_url: str, timeout_s: float, alive=lambda: True) -> dict:
    """Poll GET /health until it answers 200 (the engine's workers all ready); its JSON. RuntimeError
    after `timeout_s`, or as soon as `alive()` says the server is gone."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(f"{base_url.rstrip('/')}/health", timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:  # 503 while the engine starts: keep waiting
            last = f"HTTP {e.code}: {e.read()[:200].decode('utf-8', 'replace')}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            last = f"{type(e).__name__}: {e}"
        if not alive():
            raise RuntimeError(f"the server at {base_url} is gone ({last})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {base_url} was not healthy within {timeout_s:g} s (last: {last})")
        time.sleep(0.2)


class ServerProcess:
    """`dfuse serve ARGS` as a child process on 127.0.0.1, port 0 (the port it prints is read from
    its stderr). Always stop() it: SIGTERM drains and closes its engine; SIGKILL only if it hangs."""

    def __init__(self, serve_args: list[str], log_level: str = "warning"):
        self.command = [sys.executable, "-m", "dfuse.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                        "--log-level", log_level, *serve_args]
        self.url: str | None = None
        self._listening = threading.Event()
        self._stderr: deque[str] = deque(maxlen=40)
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, bufsize=1)
        # The pipe is read to its end: a server that fills it would block on its next log line.
        self._reader = threading.Thread(target=self._read_stderr, name="dfuse-serve-stderr", daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self._stderr.append(line.rstrip())
            match = _LISTENING.search(line)
            if match and self.url is None:
                self.url = match.group(1)
                self._listening.set()
        self._listening.set()  # the process ended: whoever waits learns it now

    @property
    def stderr_tail(self) -> str:
        return "\n".join(self._stderr)

    def wait_ready(self, timeout_s: float = 300.0) -> str:
        """The server's base URL once /health says ok; RuntimeError (with its last log lines) if it
        exits or is not ready in time."""
        started = time.monotonic()
        self._listening.wait(timeout_s)
        if self.url is None:
            raise RuntimeError(f"dfuse serve did not start listening (exit code {self.process.poll()}):\n"
                               f"{self.stderr_tail}")
        try:
            wait_healthy(self.url, max(1.0, timeout_s - (time.monotonic() - started)),
                         alive=lambda: self.process.poll() is None)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{self.stderr_tail}") from None
        return self.url

    def pids(self) -> list[int]:
        """The server and every process below it (its stage workers)."""
        return [self.process.pid, *descendants(self.process.pid)]

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (drain, close the engine), then SIGKILL after `timeout_s`; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self._reader.join(5)
        return self.process.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def descendants(pid: int) -> list[int]:
    """Every process whose chain of parents leads to `pid` (Linux /proc; empty elsewhere)."""
    parents: dict[int, int] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found
