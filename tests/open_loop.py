"""An open-loop feeder for tests of engines under load: requests at a fixed rate, whatever the
engine's progress, and a check that each got its own synthetic image."""

import time

from dfuse import Engine


class OpenLoop:
    """Submits at a fixed rate from a thread, whatever the engine's progress (open loop)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.futures: list = []  # (seed, future)

    def feed(self, rate: float, seconds: float, until=lambda: False, **params) -> None:
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            seed = len(self.futures)
            self.futures.append((seed, self.engine.submit("a fox", seed=seed, **params)))
            if until():
                return

    def check_all(self) -> int:
        """Every request completes with its own image (the synthetic image is its seed % 251)."""
        for seed, future in self.futures:
            image = future.result(timeout=120).images[0]
            assert image.getpixel((0, 0))[0] == seed % 251, f"request {seed} got another request's image"
        return len(self.futures)
