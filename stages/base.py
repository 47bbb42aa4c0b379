"""A stage: loads its own components only, declares the inputs it needs, and runs `forward`."""

from __future__ import annotations

from typing import Any

import torch

from ..engine.protocol import RequestParams
from ..engine.transport.base import SlotWriter
from .families.base import Family, OnStep, Tensors


class Stage:
    """Base class: `load` once, then `run` per request (validates inputs, delegates to `forward`)."""

    kind: str
    requires: tuple[str, ...] = ()  # input tensors that must be present

    def __init__(self, family: Family, model_path: str, device: torch.device, dtype: torch.dtype):
        self.family = family
        self.model_path = model_path
        self.device = device
        self.dtype = dtype
        self.model: Any = None

    def load(self) -> None:
        raise NotImplementedError

    def forward(self, inputs: Tensors, params: RequestParams, on_step: OnStep, out: SlotWriter) -> Tensors:
        """Return the outputs by name. A stage that can produce an output in place asks `out`
        for it (`out.empty(...)`) and returns it too: it is then not copied again."""
        raise NotImplementedError

    def forward_batch(self, inputs: list[Tensors], params: list[RequestParams], on_step: list[OnStep]) -> list[Tensors]:
        """Several requests of one batch key as one call; outputs per request, in order."""
        raise NotImplementedError

    def stage_seconds(self) -> dict[str, float]:
        """Compute seconds per pipeline stage of the last `run`, where one call ran several (the
        fused role); empty: the call was this one stage."""
        return {}

    def warnings(self, params: RequestParams) -> list[str]:
        """What the request's caller should hear about this stage's work on it (nothing by default)."""
        return []

    def run(self, inputs: Tensors, params: RequestParams, on_step: OnStep, out: SlotWriter) -> Tensors:
        self._check(inputs)
        return self.forward(inputs, params, on_step, out)

    def run_batch(self, inputs: list[Tensors], params: list[RequestParams], on_step: list[OnStep]) -> list[Tensors]:
        for one in inputs:
            self._check(one)
        return self.forward_batch(inputs, params, on_step)

    def _check(self, inputs: Tensors) -> None:
        missing = [name for name in self.requires if name not in inputs]
        if missing:
            raise ValueError(f"{self.kind} stage is missing inputs {missing}; got {sorted(inputs)}")
