"""dsv4-serve engine: ``from engine import LLM, SamplingParams``."""
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):
    # Imported lazily so that importing a pure-Python submodule (scheduler, request …) stays light.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(name)
