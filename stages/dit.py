"""DiT stage: the diffusion transformer's denoising loop -> latents."""

from .base import Stage


class DiTStage(Stage):
    kind = "dit"
    requires = ("prompt_embeds",)

    def load(self):
        self.model = self.family.load_dit(self.model_path, self.device, self.dtype)

    def forward(self, inputs, params, on_step, out):
        return self.family.denoise(self.model, inputs, params, on_step)
