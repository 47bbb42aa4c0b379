"""A synthetic model family for benchmarking the engine itself (like vLLM's dummy weights).

Selected like a model: `synthetic:encoder=20ms,dit=100ms,decoder=60ms[,mode=sleep|burn]`.
Each stage takes its configured time per request and produces tensors of realistic shapes, so
the real workers, transport, engine core and scheduler run; only the model math is replaced.

    mode=sleep  the stage waits, like a stage process whose GPU computes (measures the engine's
                own overhead without two CPU cores' contention deciding the result)
    mode=burn   the stage spins on its core (measures contention too)

Costs are given at the nominal shape (4 steps, 64x64 px) and scale like real stages: the
encoder is flat, the DiT grows with steps x pixels, the decoder with pixels. The image is a
deterministic function of the seed, so correctness stays checkable end to end.

Chaos knobs: a prompt `crash:<stage>` makes that stage's worker process die on the spot (as on
SIGKILL or the kernel's OOM killer), to test that such a request fails cleanly after bounded
attempts; `oom:<stage>` makes that stage raise MemoryError, as an allocation that does not fit;
`device-fault:<stage>` raises the error an illegal memory access or a device-side assert gives
(torch.AcceleratorError), after which a real worker's CUDA context is unusable; `hang:<stage>` blocks that
stage's compute forever (a deadlock, a stuck kernel) while the process lives on.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import torch

from ...engine.models.synthetic import NOMINAL_PIXELS, NOMINAL_STEPS, SyntheticSpec
from ...engine.protocol import RequestParams
from .base import Family, OnStep, Tensors


class SyntheticFamily(SyntheticSpec, Family):
    def __init__(self, spec: str, device: str = "cpu"):
        super().__init__(spec)
        self.speed_factor = self.device_factors.get(device, 1.0)  # this worker's device: slower by this

    def cost(self, stage: str, params: RequestParams) -> float:
        pixels = params.height * params.width / NOMINAL_PIXELS
        scale = {"encoder": 1.0, "dit": pixels * params.num_inference_steps / NOMINAL_STEPS, "decoder": pixels}
        return self.costs[stage] * scale[stage] * self.speed_factor

    def _maybe_crash(self, stage: str, params: RequestParams) -> None:
        if params.prompt == f"crash:{stage}":
            os.kill(os.getpid(), signal.SIGKILL)
        if params.prompt == f"hang:{stage}":
            threading.Event().wait()  # a deadlock, or a kernel that never returns
        if params.prompt == f"oom:{stage}":
            raise MemoryError(f"synthetic allocation failure in the {stage} stage")
        if params.prompt == f"device-fault:{stage}":
            raise torch.AcceleratorError(f"synthetic device fault in the {stage} stage: an illegal memory access")

    def _spend(self, seconds: float) -> None:
        if self.mode == "sleep":
            time.sleep(seconds)
            return
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            pass

    def load_encoder(self, path, device, dtype):
        return dtype

    def encode(self, dtype, params: RequestParams) -> Tensors:
        self._maybe_crash("encoder", params)
        self._spend(self.cost("encoder", params))
        return {"prompt_embeds": torch.full((1, 77, 64), float(len(params.prompt)), dtype=dtype)}

    def load_dit(self, path, device, dtype):
        return dtype

    def denoise(self, dtype, inputs: Tensors, params: RequestParams, on_step: OnStep) -> Tensors:
        self._maybe_crash("dit", params)
        per_step = self.cost("dit", params) / params.num_inference_steps
        for step in range(params.num_inference_steps):
            self._spend(per_step)
            on_step(step + 1, params.num_inference_steps)
        shape = (1, 16, params.height // 8, params.width // 8)
        return {"latents": torch.full(shape, float(params.seed % 251), dtype=dtype)}

    def load_decoder(self, path, device, dtype):
        return dtype

    def decode(self, dtype, inputs: Tensors, params: RequestParams) -> Tensors:
        self._maybe_crash("decoder", params)
        self._spend(self.cost("decoder", params))
        value = int(inputs["latents"].flatten()[0].item())
        return {"image": torch.full((1, params.height, params.width, 3), value, dtype=torch.uint8)}
