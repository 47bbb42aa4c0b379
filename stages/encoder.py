"""Encoder stage: tokenizers + text encoders -> prompt embeddings."""

from .base import Stage


class EncoderStage(Stage):
    kind = "encoder"

    def load(self):
        self.model = self.family.load_encoder(self.model_path, self.device, self.dtype)

    def forward(self, inputs, params, on_step, out):
        return self.family.encode(self.model, params)

    def forward_batch(self, inputs, params, on_step):
        return self.family.encode_batch(self.model, params)

    def warnings(self, params):
        return self.family.prompt_warnings(self.model, params)  # the part of a prompt cut to an encoder's length
