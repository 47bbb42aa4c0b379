"""A `dfuse serve` process for the e2e tests (imported by name, like process_utils: a module
called conftest is not one module when several folders have one)."""

THREADS = 1  # as the e2e conftest: equal thread counts are the condition for bit-identical outputs


class ServerProcess:
    """A `dfuse serve` process on loopback: its URL, its stderr lines so far, and a bounded stop."""

    def __init__(self, args: list[str], env: dict | None = None, ready_s: float = 120.0):
        import os
        import re
        import subprocess
        import sys
        import threading

        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dfuse.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--threads", str(THREADS),
             *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        listening = threading.Event()

        def read() -> None:
            for line in self.process.stderr:
                self.lines.append(line.rstrip())
                match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
                if match:
                    self.url = match[1]
                    listening.set()

        threading.Thread(target=read, daemon=True).start()
        self.url = None
        if not listening.wait(ready_s):
            self.stop()
            raise RuntimeError("dfuse serve did not listen:\n" + "\n".join(self.lines))

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Until GET /health says ok (the workers loaded), bounded in time."""
        import time

        import httpx2 as httpx  # openai's HTTP client (the package is httpx2 now)

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "dfuse serve exited:\n" + "\n".join(self.lines)
            if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                return
            time.sleep(0.2)
        raise AssertionError("dfuse serve never became healthy:\n" + "\n".join(self.lines))

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then wait for the exit (killed only past the timeout, which fails the test)."""
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                raise AssertionError("dfuse serve did not exit within its timeout after SIGTERM")
        return self.process.returncode


def serving(*args: str):
    """A healthy ServerProcess for a module-scoped fixture: `yield from serving("--model", ...)`."""
    server = ServerProcess(list(args))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
