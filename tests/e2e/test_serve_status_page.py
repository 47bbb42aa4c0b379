"""The status page (GET /) in a real browser: headless Chromium loads it from a running `dfuse serve`,
its script polls /v1/stats, and the DOM it leaves shows what /v1/stats says (completed count, queue
depth per stage, the workers of device "cpu" by stage, one Gantt row per recent request with a wait
and a compute bar per stage). With --api-key the page reads the key from its #key= fragment, and
without it says how to give one; while the engine starts it says "starting"; server text is shown
as text, never parsed as HTML. Skipped where Chromium is missing (.ci/run installs it)."""

import http.server
import importlib.resources
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from html.parser import HTMLParser

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")]

STAGES = ("encoder", "dit", "decoder")
IMAGES = 3
API_KEY = "status-page-key"
# A served model name that is markup: the page must show it as text (no element gets made from it).
MARKUP_NAME = '<img id="injected" src="x">tiny'


# --- a running `dfuse serve` ------------------------------------------------------------------------
class Server:
    def __init__(self, process: subprocess.Popen, url: str, api_key: str | None):
        self.process, self.url, self.api_key = process, url, api_key

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 120) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def generate(self, count: int) -> None:
        for i in range(count):  # one after another: each is one engine request, one Gantt row
            answer = self.call("POST", "/v1/images/generations", {
                "prompt": f"a lighthouse {i}", "size": "64x64", "num_inference_steps": 2, "seed": i})
            assert len(answer["data"]) == 1


def _wait_for(what: str, condition, timeout: float, process: subprocess.Popen, log_path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert process.poll() is None, f"dfuse serve exited ({process.returncode}):\n{log_path.read_text()}"
        time.sleep(0.1)
    pytest.fail(f"dfuse serve: no {what} within {timeout:.0f} s:\n{log_path.read_text()}")


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status == 200
    except OSError:  # 503 (HTTPError is an OSError) while it starts
        return False


def _start_server(model_path, log_path, *flags) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block the server's logging
        return subprocess.Popen(
            [sys.executable, "-m", "dfuse.cli", "serve", "--model", str(model_path), "--threads", "1",
             "--host", "127.0.0.1", "--port", "0", *flags],
            stdout=log, stderr=subprocess.STDOUT, env=env)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # drains, closes the engine: workers and shared memory go
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _serve(model_path, log_path, api_key=None, *flags):
    process = _start_server(model_path, log_path, *flags, *(["--api-key", api_key] if api_key else []))
    try:
        listening = lambda: re.search(r"listening on (http://127\.0\.0\.1:\d+)", log_path.read_text())  # noqa: E731
        url = _wait_for("'listening on' line", listening, 60, process, log_path).group(1)
        _wait_for("healthy engine", lambda: _health_ok(url), 180, process, log_path)
        yield Server(process, url, api_key)
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def open_server(model_path, tmp_path_factory):
    server_log = tmp_path_factory.mktemp("open-server") / "serve.log"
    yield from _serve(model_path, server_log)


@pytest.fixture(scope="module")
def keyed_server(model_path, tmp_path_factory):
    server_log = tmp_path_factory.mktemp("keyed-server") / "serve.log"
    yield from _serve(model_path, server_log, API_KEY, "--served-model-name", MARKUP_NAME)


# --- headless Chromium ------------------------------------------------------------------------------
def chromium(url: str, tmp_path, *mode: str) -> str:
    """Run Chromium on `url` with `mode` (--dump-dom or --screenshot=...); its stdout. Virtual time
    lets the page's timers run 5 s (pausing while a fetch is pending), so its polls have answered."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage",
        # Only loopback: any other host name fails to resolve, so nothing can leave this machine.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}", "--virtual-time-budget=5000", *mode, url,
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


class Element:
    def __init__(self, tag: str, attrs: dict, parent=None):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find_all(self, tag: str | None = None, **attrs) -> list["Element"]:
        """Descendants with this tag and attributes (data_stage= means data-stage; None: any value)."""
        wanted = {name.replace("_", "-"): value for name, value in attrs.items()}
        found = []
        for child in self.children:
            if isinstance(child, str):
                continue
            if (tag is None or child.tag == tag) and all(
                    name in child.attrs and (value is None or child.attrs[name] == str(value))
                    for name, value in wanted.items()):
                found.append(child)
            found.extend(child.find_all(tag, **attrs))
        return found

    def one(self, tag: str | None = None, **attrs) -> "Element":
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag}> with {attrs}"
        return found[0]


class _TreeBuilder(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Element("#document", {})

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {name: value or "" for name, value in attrs}, self.current)
        self.current.children.append(element)
        if tag not in self.VOID:
            self.current = element

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Element(tag, {name: value or "" for name, value in attrs}, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def rendered_dom(url: str, tmp_path) -> Element:
    builder = _TreeBuilder()
    builder.feed(chromium(url, tmp_path, "--dump-dom"))
    return builder.root


# --- the tests --------------------------------------------------------------------------------------
def test_the_page_shows_the_live_numbers_workers_and_a_gantt_row_per_request(open_server, tmp_path):
    open_server.generate(IMAGES)
    stats = open_server.call("GET", "/v1/stats")
    assert stats["completed"] == IMAGES and len(stats["recent"]) == IMAGES

    dom = rendered_dom(open_server.url + "/", tmp_path)
    body = dom.one("body")
    assert body.attrs["data-state"] == "live", body.text()
    assert dom.one(id="completed").text() == str(stats["completed"])
    assert dom.one(id="failed").text() == "0"
    assert dom.one(id="worker-count").text() == str(len(stats["workers"]))
    for stage in STAGES:
        depth = dom.one(data_queue_stage=stage)
        assert depth.text() == depth.attrs["data-depth"] == str(stats["queues"][stage])

    cpu = dom.one("div", data_device="cpu")
    workers = cpu.find_all("tr", data_worker_id=None)
    assert cpu.attrs["data-worker-count"] == str(len(workers)) == "3"
    assert sorted(w.attrs["data-stage"] for w in workers) == sorted(STAGES)
    assert {(int(w.attrs["data-worker-id"]), w.attrs["data-stage"], w.attrs["data-ready"]) for w in workers} == {
        (w["id"], w["stage"], "true") for w in stats["workers"] if w["device"] == "cpu"}

    assert [legend.attrs["data-legend-stage"] for legend in dom.find_all(data_legend_stage=None)] == list(STAGES)
    rows = dom.one(id="gantt").find_all("g", data_request_id=None)
    assert [int(row.attrs["data-request-id"]) for row in rows] == [r["id"] for r in stats["recent"]]
    for row in rows:
        assert row.attrs["data-outcome"] == "completed"
        for part in ("wait", "compute"):
            assert [bar.attrs["data-stage"] for bar in row.find_all("rect", data_part=part)] == list(STAGES)
        assert all(float(bar.attrs["width"]) >= 1 for bar in row.find_all("rect", data_part="compute"))


def test_the_page_screenshot_is_a_png_in_the_stage_colours(open_server, tmp_path):
    if not open_server.call("GET", "/v1/stats")["recent"]:
        open_server.generate(1)  # the Gantt has bars to draw even when run alone
    shot = tmp_path / "status.png"
    chromium(open_server.url + "/", tmp_path, f"--screenshot={shot}", "--window-size=1200,900")
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
        colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    # The page's palette (status.html's --encoder, --dit, --decoder): a rendered page, not a blank one.
    assert {(0x4E, 0x79, 0xA7), (0xF2, 0x8E, 0x2B), (0x59, 0xA1, 0x4F)} <= colours


def test_with_the_key_in_the_fragment_the_page_shows_the_numbers_and_server_text_stays_text(keyed_server, tmp_path):
    keyed_server.generate(1)
    stats = keyed_server.call("GET", "/v1/stats")
    dom = rendered_dom(f"{keyed_server.url}/#key={API_KEY}", tmp_path)
    assert dom.one("body").attrs["data-state"] == "live"
    assert dom.one(id="completed").text() == str(stats["completed"]) == "1"
    assert len(dom.one(id="gantt").find_all("g", data_request_id=None)) == 1
    assert dom.one(id="model-name").text() == MARKUP_NAME
    assert dom.find_all(id="injected") == []


@pytest.mark.parametrize("fragment, says", [("", "This server needs an API key"),
                                            ("#key=not-the-key", "The API key in this page's address was refused")])
def test_without_the_right_key_the_page_says_how_to_give_it(keyed_server, tmp_path, fragment, says):
    dom = rendered_dom(f"{keyed_server.url}/{fragment}", tmp_path)
    assert dom.one("body").attrs["data-state"] == "unauthorized"
    message = dom.one(id="message")
    assert "hidden" not in message.attrs
    assert says in message.text()
    assert f"{keyed_server.url}/#key=YOUR_KEY" in message.text()
    assert "hidden" in dom.one(id="dashboard").attrs
    assert dom.one(id="completed").text() == "–"  # no numbers without the key


class _StartingServer(http.server.BaseHTTPRequestHandler):
    """What dfuse serve answers while its engine starts: the page, and 503 with OpenAI's error JSON."""

    page = importlib.resources.files("dfuse.serve").joinpath("static/status.html").read_bytes()
    message = "the engine is starting (its workers load their weights); try again shortly"

    def do_GET(self):
        if self.path == "/":
            self._send(200, "text/html; charset=utf-8", self.page)
        else:
            error = {"error": {"message": self.message, "type": "service_unavailable", "param": None,
                               "code": "starting"}}
            self._send(503, "application/json", json.dumps(error).encode())

    def _send(self, status: int, content_type: str, body: bytes):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_while_the_engine_starts_the_page_says_starting(tmp_path):
    # A stand-in server: dfuse serve's start-up window (seconds) is too short to hit reliably.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StartingServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dom = rendered_dom(f"http://127.0.0.1:{server.server_port}/", tmp_path)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert dom.one("body").attrs["data-state"] == "starting"
    assert dom.one(id="state").text() == "starting"
    assert dom.one(id="message").text() == _StartingServer.message
    assert "hidden" in dom.one(id="dashboard").attrs
