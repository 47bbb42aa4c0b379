"""dfuse serve's life: /health while it starts, a bounded load where no request is lost, a client
that hangs up cancels its work, and SIGTERM drains: in-flight requests finish, new ones get 503,
and nothing (worker process, shared-memory segment) outlives the server."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import pytest

SLOW = "synthetic:encoder=1ms,dit=1500ms,decoder=1ms"  # requests long enough to be caught in flight
QUICK = "synthetic:encoder=2ms,dit=5ms,decoder=2ms"


def _generate(url: str, timeout: float = 60, **fields) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": "a fox", "size": "64x64", **fields},
                      timeout=timeout)


def _metric(url: str, line_start: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_says_starting_then_ok(dfuse_server):
    server = dfuse_server("--model", QUICK, wait=False)
    first = httpx.get(f"{server.url}/health", timeout=30)
    # The port opens before the workers load; on a fast machine they may already be up.
    assert (first.status_code, first.json()["status"]) in ((503, "starting"), (200, "ok"))
    if first.status_code == 503:
        r = _generate(server.url)
        assert r.status_code == 503 and r.json()["error"]["code"] == "starting"
    server.wait_ready()
    assert _generate(server.url).status_code == 200


def test_32_clients_times_8_requests_are_all_answered(dfuse_server):
    server = dfuse_server("--model", QUICK, "--instances", "encoder=1,dit=2,decoder=1")
    deadline = time.monotonic() + 240  # bounds the whole load, whatever the machine's pace

    def client(k: int) -> list[int]:
        codes = []
        with httpx.Client(timeout=120) as http:
            for i in range(8):
                if time.monotonic() > deadline:
                    break
                r = http.post(f"{server.url}/v1/images/generations",
                              json={"prompt": f"client {k} request {i}", "size": "64x64", "seed": k * 100 + i})
                codes.append(r.status_code)
        return codes

    with ThreadPoolExecutor(32) as pool:
        codes = [c for result in pool.map(client, range(32)) for c in result]
    assert codes == [200] * 256
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    stats = httpx.get(f"{server.url}/v1/stats", timeout=30).json()
    assert stats["completed"] == 256 and stats["failed"] == 0 and stats["server"]["inflight"] == 0


def test_a_client_that_hangs_up_cancels_its_request(dfuse_server):
    server = dfuse_server("--model", SLOW)
    with pytest.raises(httpx.ReadTimeout):
        _generate(server.url, timeout=0.5, n=2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _metric(server.url, 'dfuse_requests_total{endpoint="images",outcome="cancelled"}') < 1:
        time.sleep(0.1)
    assert _metric(server.url, 'dfuse_requests_total{endpoint="images",outcome="cancelled"}') == 1
    while time.monotonic() < deadline and httpx.get(f"{server.url}/v1/stats", timeout=30).json()["server"]["inflight"]:
        time.sleep(0.1)
    stats = httpx.get(f"{server.url}/v1/stats", timeout=30).json()
    # Both images were dropped: the first stopped in the DiT, the second never ran to the end.
    assert stats["server"]["inflight"] == 0 and stats["completed"] == 0


def test_sigterm_lets_requests_in_flight_finish_then_leaves_nothing(dfuse_server):
    server = dfuse_server("--model", SLOW, "--grace-period", "60")
    stats = httpx.get(f"{server.url}/v1/stats", timeout=30).json()
    worker_pids = [w["pid"] for w in stats["workers"]]
    with ThreadPoolExecutor(3) as pool:
        inflight = [pool.submit(_generate, server.url, 120, seed=i) for i in range(3)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and httpx.get(f"{server.url}/v1/stats", timeout=30).json()["server"]["inflight"] < 3:
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        draining = _poll_health_while_draining(server.url)
        late = _generate(server.url, timeout=30) if server.process.poll() is None else None
        assert [f.result().status_code for f in inflight] == [200, 200, 200]
    assert draining == (503, "draining")
    if late is not None:  # the server may already be gone: then the port refuses instead
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
    assert server.process.wait(60) == 0
    assert not [p for p in worker_pids if _alive(p)]
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"dfuse_{server.process.pid}_")]
    assert any("draining" in line for line in server.lines)


def _poll_health_while_draining(url: str):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5)
        except httpx.TransportError:
            return None
        if r.status_code == 503:
            return r.status_code, r.json()["status"]
        time.sleep(0.02)
    return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_second_signal_stops_at_once_and_still_cleans_up(dfuse_server):
    server = dfuse_server("--model", SLOW, "--grace-period", "600")
    worker_pids = [w["pid"] for w in httpx.get(f"{server.url}/v1/stats", timeout=30).json()["workers"]]
    results = []
    thread = threading.Thread(target=lambda: results.append(_try_generate(server.url)))
    thread.start()
    time.sleep(0.3)  # let the request reach the engine (if it has not, the test still holds)
    server.process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(60) == 0  # well before the 600 s grace period
    thread.join(60)
    assert not [p for p in worker_pids if _alive(p)]
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"dfuse_{server.process.pid}_")]


def _try_generate(url: str):
    try:
        return _generate(url, timeout=60).status_code
    except httpx.TransportError as e:
        return type(e).__name__
