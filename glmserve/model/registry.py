from __future__ import annotations

from torch import nn

from glmserve.config import ConfigError, ModelConfig


def get_model_class(config: ModelConfig) -> type[nn.Module]:
    """architectures[0] → model class. Imports lazily so unknown names fail before any model code loads."""
    if config.architecture == "Glm4MoeForCausalLM":
        from glmserve.model.glm4_moe import Glm4MoeForCausalLM

        return Glm4MoeForCausalLM
    raise ConfigError(f"unsupported architecture {config.architecture!r}")
