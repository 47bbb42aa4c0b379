"""Decoder stage: VAE decode + image postprocessing -> uint8 pixels."""

from .base import Stage


class DecoderStage(Stage):
    kind = "decoder"
    requires = ("latents",)

    def load(self):
        self.model = self.family.load_decoder(self.model_path, self.device, self.dtype)

    def forward(self, inputs, params, on_step, out):
        return self.family.decode(self.model, inputs, params)

    def forward_batch(self, inputs, params, on_step):
        return self.family.decode_batch(self.model, inputs, params)
