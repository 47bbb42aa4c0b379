"""The fused role: the whole pipeline in one process, each request run start to finish.

It holds the encoder, DiT and decoder stages of one model and hands each stage's outputs to the
next as the tensors themselves: no slot, no message, no copy. Each stage computes exactly as it
does alone (the same code on the same inputs), so the image equals the split pipeline's and
diffusers'. Only the final pixels go to the task's output slot, as a decoder's do.
"""

from __future__ import annotations

import time

import torch

from ..scheduler.core import FUSED
from .base import Stage
from .decoder import DecoderStage
from .dit import DiTStage
from .encoder import EncoderStage


class FusedStage(Stage):
    kind = FUSED

    def __init__(self, family, model_path, device, dtype):
        super().__init__(family, model_path, device, dtype)
        self.parts = [cls(family, model_path, device, dtype) for cls in (EncoderStage, DiTStage, DecoderStage)]
        self._seconds: dict[str, float] = {}

    def load(self):
        for part in self.parts:
            part.load()
        self.model = tuple(part.model for part in self.parts)  # what the host weight cache publishes

    def forward(self, inputs, params, on_step, out):
        seconds, outputs = {}, inputs
        for part in self.parts:
            started = time.perf_counter()
            outputs = part.run(outputs, params, on_step, out)
            if self.device.type == "cuda":  # kernels run asynchronously: a stage's time ends with its last
                torch.cuda.synchronize(self.device)
            seconds[part.kind] = time.perf_counter() - started
        self._seconds = seconds
        return outputs

    def stage_seconds(self) -> dict[str, float]:
        return dict(self._seconds)

    def warnings(self, params):
        return self.parts[0].warnings(params)
