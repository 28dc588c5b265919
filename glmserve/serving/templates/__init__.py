"""Chat templates shipped with glmserve, for checkpoints that carry none (and for test checkpoints)."""

from importlib import resources


def glm45_chat_template() -> str:
    """glmserve's own GLM-4.5 template: renders what the released checkpoints' template renders."""
    return resources.files(__name__).joinpath("glm45.jinja").read_text(encoding="utf-8")
