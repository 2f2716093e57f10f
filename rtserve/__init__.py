"""rtserve: a soft-real-time LLM serving engine."""
from rtserve.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch; import it lazily so `import rtserve` stays cheap for the API and bench tools.
    if name == "LLM":
        from rtserve.llm import LLM
        return LLM
    raise AttributeError(name)
