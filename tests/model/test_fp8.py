"""FP8 checkpoints: float8 weights with per-row (compressed-tensors, as GLM-4.5-FP8) or per-block (DeepSeek-style)
scales are kept in fp8 on CPU (the embeddings and heads the release left in float stay float), compute what their
dequantized weights compute, and broken ones fail clearly."""

import json

import pytest
import torch

from glmserve.config import ConfigError, EngineConfig, ModelConfig
from glmserve.engine.model_runner import ModelRunner
from glmserve.layers.attention import AttentionMetadata
from glmserve.loader import LoaderError
from glmserve.testing.checkpoint import write_fp8_checkpoint
from glmserve.testing.quantization import dequantized_weights


def _load(directory) -> ModelRunner:
    return ModelRunner(ModelConfig.from_pretrained(directory), EngineConfig(model=str(directory), num_kv_blocks=8),
                       progress=False)


def _checkpoint_names(runner: ModelRunner) -> dict[str, torch.Tensor]:
    """The values the loaded parameters stand for, under their checkpoint names (the fused and stacked ones split
    back)."""
    model, out = runner.model, {}
    config = runner.model_config
    for name, param in dequantized_weights(model).items():
        if ".qkv_proj." in name:
            q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
            for piece, part in zip("qkv", param.split([q, kv, kv])):
                out[name.replace("qkv_proj", f"{piece}_proj")] = part
        elif name.endswith("gate_up_proj.weight"):
            gate, up = param.chunk(2)
            out[name.replace("gate_up_proj", "gate_proj")], out[name.replace("gate_up_proj", "up_proj")] = gate, up
        elif name.endswith("experts.w13"):
            for e, stacked in enumerate(param):
                gate, up = stacked.chunk(2)
                out[name.replace("w13", f"{e}.gate_proj.weight")] = gate
                out[name.replace("w13", f"{e}.up_proj.weight")] = up
        elif name.endswith("experts.w2"):
            for e, stacked in enumerate(param):
                out[name.replace("w2", f"{e}.down_proj.weight")] = stacked
        else:
            out[name] = param
    return out


@pytest.mark.parametrize("block", [None, (24, 16)], ids=["compressed-tensors-per-row", "block-fp8"])
def test_fp8_checkpoint_keeps_its_fp8_weights(block, checkpoints, tmp_path):
    """Every projection (attention, dense MLP, experts, shared experts, the MTP layer's) is held in fp8 and stands
    for its fp8 values times its scales, exactly; the rest is untouched. Blocks of 24 x 16 leave partial blocks at
    the edges."""
    directory, expected = write_fp8_checkpoint(tmp_path / "fp8", checkpoints("glm45"), block)
    assert any(t.dtype == torch.float8_e4m3fn for t in _stored_tensors(directory))
    runner = _load(directory)
    layers = runner.model.model.layers
    assert layers[0].self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert layers[-1].mlp.experts.w13.dtype == torch.float8_e4m3fn
    assert runner.model.lm_head.weight.dtype == torch.float32  # stored in float by the release: kept so
    got = _checkpoint_names(runner)
    for name, want in expected.items():
        assert torch.equal(got[name].float(), want), name
    # fp8's rounding is real: the weights differ from the source checkpoint's.
    source = _checkpoint_names(_load(checkpoints("glm45")))
    name = "model.layers.3.mlp.experts.5.down_proj.weight"
    assert not torch.equal(source[name], got[name])


def test_fp8_checkpoint_logits_match_transformers_on_the_dequantized_weights(checkpoints, tmp_path, monkeypatch):
    """On the native kernels (fp32 activations); from 32 rows prefill_gemm would round them to bf16."""
    import transformers

    monkeypatch.setenv("GLMSERVE_PREFILL_GEMM", "0")
    from safetensors.torch import save_file

    directory, expected = write_fp8_checkpoint(tmp_path / "fp8", checkpoints("glm45"))
    runner = _load(directory)
    dequantized = tmp_path / "dequantized"
    dequantized.mkdir()
    config = json.loads((directory / "config.json").read_text())
    del config["quantization_config"]
    (dequantized / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in expected.items()}, str(dequantized / "model.safetensors"))
    hf = transformers.Glm4MoeForCausalLM.from_pretrained(dequantized, dtype=torch.float32).eval()

    prompt = list(range(3, 40))
    meta = AttentionMetadata.build([0], [len(prompt)], [[0, 1, 2]], runner.block_size, runner.device)
    with torch.inference_mode():
        ours = runner.model.compute_logits(runner.model(torch.tensor(prompt), torch.arange(len(prompt)), meta))
        ref = hf(torch.tensor([prompt])).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-4


def _stored_tensors(directory):
    from safetensors.torch import load_file

    return [t for f in directory.glob("*.safetensors") for t in load_file(f).values()]


def test_fp8_weight_without_its_scale_is_a_clear_error(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    directory, _ = write_fp8_checkpoint(tmp_path / "fp8", checkpoints("glm45"), num_shards=1)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.weight_scale"]
    save_file(tensors, str(directory / "model.safetensors"))
    with pytest.raises(LoaderError, match="o_proj.weight.*no.*weight_scale"):
        _load(directory)


@pytest.mark.parametrize("quantization", [
    {"quant_method": "awq", "bits": 4},
    {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}},
])
def test_other_quantization_methods_are_refused_by_name(quantization, checkpoints, tmp_path):
    config = json.loads((checkpoints("glm45") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": quantization}))
    with pytest.raises(ConfigError, match="quantization_config"):
        ModelConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("block", [None, (24, 16)], ids=["compressed-tensors-per-row", "block-fp8"])
@pytest.mark.parametrize("shape", ["glm45", "air"])
def test_fp8_greedy_tokens_equal_the_dequantized_checkpoints(shape, block, checkpoints, tmp_path, monkeypatch):
    """Held in fp8, the checkpoint generates what its weights dequantized to fp32 (written as a float checkpoint)
    generate: the same values, multiplied in another order. On the native kernels: prefill_gemm (from 32 rows)
    rounds activations to bf16, which flips near-tied tokens of these random models (its accuracy is held to
    bounds in test_quantization.py and tests/kernels/test_prefill_gemm.py)."""
    monkeypatch.setenv("GLMSERVE_PREFILL_GEMM", "0")
    from safetensors.torch import save_file

    from glmserve.llm import LLM
    from glmserve.types import SamplingParams

    directory, expected = write_fp8_checkpoint(tmp_path / "fp8", checkpoints(shape), block)
    dequantized = tmp_path / "dequantized"
    dequantized.mkdir()
    config = json.loads((directory / "config.json").read_text())
    del config["quantization_config"]
    (dequantized / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (dequantized / extra).write_bytes((directory / extra).read_bytes())
    save_file({k: v.contiguous() for k, v in expected.items()}, str(dequantized / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(0, 1000, (n,), generator=gen).tolist()} for n in (5, 17, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    fp8 = LLM(str(directory), num_kv_blocks=32)
    assert fp8.engine.runner.quant_method.name == "fp8"
    got = [o.outputs[0].token_ids for o in fp8.generate(prompts, params)]
    want = [o.outputs[0].token_ids for o in LLM(str(dequantized), num_kv_blocks=32).generate(prompts, params)]
    assert got == want
