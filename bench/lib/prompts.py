"""Prompts and seeds the engine benchmarks share, so that their requests are the same ones."""

from __future__ import annotations

# Words the tiny tokenizers spell as one token (stages/tiny.py WORDS): prompts stay realistic.
_SUBJECTS = ["a red fox", "a white cat", "a black dog", "an astronaut riding a horse", "a small bird",
             "a blue car", "a green tree", "a yellow flower"]
_SCENES = ["in the snow", "in the forest", "in the city at night", "by the sea", "on the mountain",
           "with the moon in the sky"]
BASE_SEED = 1234


def make_prompts(n: int) -> list[str]:
    """n distinct prompts (every subject in one scene, then the next scene)."""
    return [f"{_SUBJECTS[i % len(_SUBJECTS)]} {_SCENES[(i // len(_SUBJECTS)) % len(_SCENES)]}, high quality photo"
            for i in range(n)]
