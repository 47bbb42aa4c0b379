"""One place where what a caller asked for becomes requests the engine may run: `Engine.submit`
and `dfuse run` (before any worker starts) both call it, so a bad field gets the same ValueError,
naming it and its range, whichever front it came through.

    build_requests (requests.py)   fields, defaults and ranges; one RequestParams per prompt
    admit (admission.py)           memory: decode in tiles, or refuse (once budgets are measured)
    check_transport (admission.py) every stage's outputs fit one transport slot
    stage_profiles (batching.py)   batch keys and activation estimates, when batching is on
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass

from .admission import admit, check_transport
from .batching import stage_profiles
from .config import EngineConfig
from .models.base import FamilySpec, ModelInfo
from .protocol import RequestParams
from .requests import build_requests, check_priority, check_timeout
from .state import Request


@dataclass
class InputProcessor:
    info: ModelInfo
    family: FamilySpec
    slot_bytes: int  # one transport slot: each stage's outputs for a request must fit
    itemsizes: Mapping[str, int]  # bytes per element of each stage's dtype
    batching: bool = False
    budgets: Mapping[str, int] | None = None  # activation bytes per stage; None: not measured yet

    @classmethod
    def for_config(cls, config: EngineConfig, info: ModelInfo, family: FamilySpec) -> "InputProcessor":
        return cls(info, family, config.transport.slot_bytes, config.itemsizes(), config.batching.enabled)

    def params(self, prompt, negative_prompt=None, num_inference_steps=None, guidance_scale=None, height=None,
               width=None, seed=None, true_cfg_scale=None, num_frames=None) -> list[RequestParams]:
        """One RequestParams per prompt, as they will run; ValueError naming the first bad field."""
        params = build_requests(self.info, prompt, negative_prompt, num_inference_steps, guidance_scale, height,
                                width, seed, true_cfg_scale, num_frames)
        if self.budgets is not None:
            params = [admit(self.family, self.info, p, self.budgets, self.itemsizes) for p in params]
        for p in params:
            check_transport(self.family, self.info, p, self.slot_bytes, self.itemsizes)
        return params

    def requests(self, ids, prompt, *, on_progress=None, priority=0, timeout=None, **fields) -> list[Request]:
        """Requests ready for the engine core, each with a new id from `ids` and its own future."""
        params = self.params(prompt, **fields)
        priority, timeout = check_priority(priority), check_timeout(timeout)
        if on_progress is not None and not callable(on_progress):
            raise ValueError(f"on_progress: must be callable (stage, step, total) or None (got {on_progress!r})")
        deadline = None if timeout is None else time.monotonic() + timeout
        requests = [Request(next(ids), p, Future(), on_progress, priority, deadline) for p in params]
        if self.batching:
            for request in requests:
                request.profiles = stage_profiles(self.family, self.info, request.params, self.itemsizes)
        return requests
