"""Run the server: listen at once (GET /health says "starting" while the workers load), start the
engine beside it, drain on SIGTERM or Ctrl-C, and leave nothing behind.

Draining: the first SIGTERM/SIGINT makes /health answer 503 and new requests get 503, while the
images and video jobs already in flight finish (at most `grace_s` seconds); then uvicorn stops,
the engine closes (its workers exit, its shared memory is freed) and the served files go. A second
signal stops at once (in-flight requests fail; the engine still closes cleanly)."""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
import time

import uvicorn

from ..engine.config import EngineConfig
from ..engine.engine import Engine
from .app import create_app
from .state import ServeSettings, ServerState

log = logging.getLogger("dfuse.serve")
# What a person starting the server waits for (the address, the engine ready, draining): `dfuse
# serve` prints these as plain lines (cli.py), not as log records.
status = logging.getLogger("dfuse.serve.status")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float):
        super().__init__(config)
        self.state, self.grace_s = state, grace_s
        self.drain_deadline: float | None = None
        self.announced = False

    def handle_exit(self, sig, frame) -> None:
        # Not uvicorn's own: it re-raises the signal once it has stopped, which would kill this
        # process before the engine is closed.
        if self.state.draining or self.state.engine is None:
            self.should_exit = True
            if self.state.draining:
                self.force_exit = True
            self.state.draining = True
            return
        self.state.draining = True
        self.drain_deadline = time.monotonic() + self.grace_s
        status.warning("%s: draining: no new requests; waiting for %d in flight (at most %g s; signal again to stop now)",
                       signal.Signals(sig).name, self.state.inflight, self.grace_s)

    async def on_tick(self, counter: int) -> bool:
        if not self.announced and self.started and self.servers:
            self.announced = True
            for server in self.servers:
                for sock in server.sockets:
                    host, port = sock.getsockname()[:2]
                    status.warning("dfuse serve: listening on http://%s:%d", host, port)
        if self.drain_deadline is not None and (self.state.inflight == 0 or time.monotonic() > self.drain_deadline):
            self.should_exit = True
        return await super().on_tick(counter)


def serve(config: EngineConfig, settings: ServeSettings, host: str, port: int, grace_s: float = 30.0,
          log_level: str = "warning") -> int:
    """Serve until SIGTERM/Ctrl-C; returns the exit status (1 if the engine could not start)."""
    state = ServerState(settings)
    server_box: list[_DrainingServer] = []

    def start_engine() -> None:
        started = time.perf_counter()
        try:
            engine = Engine(config=config)
        except Exception as e:  # noqa: BLE001 - reported on /health and as the exit status
            state.engine_error = f"{type(e).__name__}: {e}"
            log.error("the engine could not start: %s", state.engine_error)
            server_box[0].should_exit = True
            return
        if state.draining:  # stopped while the workers loaded
            engine.close()
            return
        state.engine = engine
        layout = "; ".join(f"{d}: {'+'.join(s)}" for d, s in engine.stats().placement.items() if s)
        status.warning("engine ready in %.1f s (%s); serving %s", time.perf_counter() - started, layout,
                       settings.model_name)

    app = create_app(state)
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                               timeout_graceful_shutdown=min(5.0, grace_s), lifespan="off")
    server = _DrainingServer(uv_config, state, grace_s)
    server_box.append(server)
    starter = threading.Thread(target=start_engine, name="dfuse-engine-start")
    starter.start()
    try:
        server.run()
    finally:
        state.draining = True
        starter.join()  # a start still loading finishes, then closes at once
        if state.engine is not None:
            state.engine.close()
        state.close()
    return 1 if state.engine_error else 0
