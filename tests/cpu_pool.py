"""The two one-core CPU devices e2e tests run a device pool on (this machine's stand-in for two
small GPUs), imported by basename: the first two CPUs this process may use, and a skip mark for
machines with fewer."""

import os

import pytest

CORES = sorted(os.sched_getaffinity(0))[:2]
A, B = (f"cpu:{c}" for c in (CORES + [0, 0])[:2])  # placeholders where there are not two: the tests skip
NEEDS_TWO_CPUS = pytest.mark.skipif(len(CORES) < 2, reason="needs two usable CPUs")
