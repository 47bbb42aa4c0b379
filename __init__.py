"""dfuse: serve diffusion models disaggregated (encoder, DiT, decoder as separate processes).

The package root is the repository root. This module stays lazy on purpose: pytest imports it
under the checkout folder's name, and an eager `from .engine import Engine` would load a second
copy of the whole tree (see FACTS.md, packaging).
"""

__all__ = ["Engine", "EngineConfig", "BatchConfig", "ElasticConfig", "TransportConfig", "GenerationResult",
           "EngineStats", "EngineClosed", "RequestFailed", "RequestTimeout"]
_ERRORS = ("EngineClosed", "RequestFailed", "RequestTimeout")  # what generate()/submit() raise
_CONFIGS = ("EngineConfig", "BatchConfig", "ElasticConfig", "TransportConfig")  # what EngineConfig takes


def __getattr__(name):
    if name == "Engine":
        from .engine.engine import Engine

        return Engine
    if name in _CONFIGS:
        from .engine import config

        return getattr(config, name)
    if name == "GenerationResult":
        from .engine.engine import GenerationResult

        return GenerationResult
    if name == "EngineStats":
        from .engine.stats import EngineStats

        return EngineStats
    if name in _ERRORS:
        from .engine import state

        return getattr(state, name)
    raise AttributeError(f"module 'dfuse' has no attribute {name!r}")
