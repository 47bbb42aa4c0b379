"""DiT stage: the diffusion transformer's denoising loop -> latents."""

from .base import Stage


class DiTStage(Stage):
    kind = "dit"
    requires = ("prompt_embeds",)

    def load(self):
        self.model = self.family.load_dit(self.model_path, self.device, self.dtype)

    def forward(self, inputs, params, on_step, out):
        return self.family.denoise(self.model, inputs, params, on_step)

    def forward_batch(self, inputs, params, on_step):
        return self.family.denoise_batch(self.model, inputs, params, on_step)
