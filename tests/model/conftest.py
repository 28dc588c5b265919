import pytest

from glmserve.testing.checkpoint import write_random_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name → directory of a small random checkpoint, written once per session."""
    made: dict[str, object] = {}

    def get(name: str, **kwargs):
        if name not in made:
            shape = kwargs.pop("shape", name)
            made[name] = write_random_checkpoint(tmp_path_factory.mktemp(name), shape, **kwargs)
        return made[name]

    return get


@pytest.fixture(scope="session")
def hf_model(checkpoints):
    """transformers' Glm4MoeForCausalLM on a checkpoint: the reference implementation."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = transformers.Glm4MoeForCausalLM.from_pretrained(checkpoints(name),
                                                                         dtype=torch.float32).eval()
        return cache[name]

    return get
