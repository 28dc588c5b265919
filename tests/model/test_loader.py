"""Loading: both config.json styles, sharded checkpoints, bf16 weights, and clear errors for broken ones."""

import json
import shutil

import pytest
import torch

from glmserve.config import ConfigError, EngineConfig, ModelConfig
from glmserve.engine.model_runner import ModelRunner
from glmserve.loader import LoaderError
from glmserve.testing.checkpoint import write_random_checkpoint


def _load(directory, **kwargs) -> ModelRunner:
    return ModelRunner(ModelConfig.from_pretrained(directory),
                       EngineConfig(model=str(directory), num_kv_blocks=4, **kwargs), progress=False)


def _params(runner: ModelRunner) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in runner.model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = write_random_checkpoint(tmp_path_factory.mktemp("single"), "glm45")
    return directory, _params(_load(directory))


def test_sharded_checkpoint_and_transformers5_config_load_the_same_weights(reference, tmp_path):
    directory, expected = reference
    sharded = write_random_checkpoint(tmp_path, "glm45", num_shards=3, config_style="5")
    assert len(list(sharded.glob("model-*-of-00003.safetensors"))) == 3
    assert ModelConfig.from_pretrained(sharded) == ModelConfig.from_pretrained(directory)
    got = _params(_load(sharded))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_mtp_layer_is_loaded_and_kept(reference):
    directory, expected = reference
    runner = _load(directory)
    mtp = runner.model.mtp_layer
    assert mtp is not None
    assert torch.equal(mtp.eh_proj.weight, expected["model.layers.5.eh_proj.weight"])
    assert "model.layers.5.mlp.experts.w13" in expected


def test_bf16_checkpoint_computes_in_fp32_on_cpu(tmp_path):
    directory = write_random_checkpoint(tmp_path, "air", dtype=torch.bfloat16)
    runner = _load(directory)
    assert runner.dtype == torch.float32
    assert runner.model.lm_head.weight.dtype == torch.float32
    assert _load(directory, dtype="bfloat16").model.lm_head.weight.dtype == torch.bfloat16


def test_missing_shard_names_the_file(tmp_path):
    directory = write_random_checkpoint(tmp_path, "air", num_shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LoaderError, match="model-00002-of-00002.safetensors"):
        _load(directory)


def test_wrong_shape_names_the_tensor(tmp_path):
    directory = write_random_checkpoint(tmp_path, "air")
    config = json.loads((directory / "config.json").read_text())
    config["moe_intermediate_size"] = 48
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoaderError, match=r"model\.layers\.1\.mlp\.experts\.\d+\..*shape mismatch"):
        _load(directory)


def test_missing_and_unexpected_tensors_are_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = write_random_checkpoint(tmp_path, "air")
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.weight"]
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(LoaderError, match=r"missing.*o_proj.*unexpected.*extra"):
        _load(directory)


def test_unsupported_architecture_and_missing_config(tmp_path):
    directory = write_random_checkpoint(tmp_path / "a", "air")
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unsupported architecture 'LlamaForCausalLM'"):
        ModelConfig.from_pretrained(directory)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_pretrained(empty)
    shutil.copy(directory / "config.json", empty / "config.json")
    config["architectures"] = ["Glm4MoeForCausalLM"]
    (empty / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoaderError, match="no \\*.safetensors files"):
        _load(empty)


def test_dummy_load_format_needs_only_config_json(reference, tmp_path):
    """--load-format dummy: random weights from config.json alone, the same for the same seed, norms ones and
    the rest small; the engine generates with them. Without it, a directory without weights is an error."""
    from glmserve.engine.llm_engine import LLMEngine
    from glmserve.types import SamplingParams

    directory, _ = reference
    shutil.copyfile(directory / "config.json", tmp_path / "config.json")
    with pytest.raises(LoaderError):
        _load(tmp_path)
    first, again, other = (_params(_load(tmp_path, load_format="dummy", seed=s)) for s in (0, 0, 1))
    for name, value in first.items():
        assert torch.equal(value, again[name]), name
        if name.endswith("norm.weight"):
            assert torch.equal(value, torch.ones_like(value)), name
        elif name.endswith("e_score_correction_bias"):
            assert not value.any(), name
        else:
            assert 0 < value.abs().max() <= 0.02 and not torch.equal(value, other[name]), name
    engine = LLMEngine(EngineConfig(model=str(tmp_path), load_format="dummy", num_kv_blocks=16), progress=False)
    engine.add_request("dummy", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    tokens = []
    while engine.has_unfinished_requests():
        tokens += [t for output in engine.step() for t in output.new_token_ids]
    assert len(tokens) == 4
    with pytest.raises(ConfigError, match="--load-format"):
        EngineConfig(model=str(tmp_path), load_format="pt")
