"""glmserve: inference engine and OpenAI-compatible server for GLM-4.5 models."""

from glmserve.types import LoRARequest, SamplingParams

__all__ = ["LLM", "LoRARequest", "SamplingParams"]


def __getattr__(name: str):
    # Imported on first use, so `import glmserve.types` stays free of torch.
    if name == "LLM":
        from glmserve.llm import LLM

        return LLM
    raise AttributeError(name)
