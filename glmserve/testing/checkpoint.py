"""Small random checkpoints in the real Hugging Face GLM-4.5 layout: config.json (either transformers style),
generation_config.json, per-expert safetensors tensors with the released names, an MTP layer, optional shards.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class TinyShape:
    """A scaled-down GLM-4.5 config; field names as in config.json."""

    hidden_size: int = 64
    num_hidden_layers: int = 5
    first_k_dense_replace: int = 3
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 16  # q width 128 != hidden, as in the real models
    intermediate_size: int = 128
    moe_intermediate_size: int = 32
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    n_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1
    use_qk_norm: bool = True
    vocab_size: int = 1024
    max_position_embeddings: int = 2048
    num_nextn_predict_layers: int = 1


# GLM-4.5: QK-norm, 3 dense layers, scaling 2.5. GLM-4.5-Air: no QK-norm, 1 dense layer, scaling 1.0.
GLM45 = TinyShape()
GLM45_AIR = TinyShape(num_hidden_layers=3, first_k_dense_replace=1, routed_scaling_factor=1.0, use_qk_norm=False)
GLM45_GROUPED = replace(GLM45_AIR, n_group=4, topk_group=2)  # group-limited routing actually limits
SHAPES = {"glm45": GLM45, "air": GLM45_AIR, "grouped": GLM45_GROUPED}


def config_dict(shape: TinyShape, eos_token_ids: list[int], pad_token_id: int, style: str = "4.54",
                dtype: str = "float32") -> dict:
    cfg = {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        **{k: v for k, v in shape.__dict__.items()},
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "norm_topk_prob": True,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "use_cache": True,
        "eos_token_id": eos_token_ids,
        "pad_token_id": pad_token_id,
    }
    if style == "4.54":  # the released checkpoints
        cfg.update(rope_theta=1000000.0, partial_rotary_factor=0.5, rope_scaling=None, torch_dtype=dtype,
                   transformers_version="4.54.0")
    elif style == "5":
        cfg.update(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5},
                   dtype=dtype, transformers_version="5.24.0")
    else:
        raise ValueError(f"unknown config style {style!r}")
    return cfg


def random_tensors(shape: TinyShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights with O(1) activations (std 1/sqrt(fan_in)) and non-trivial norms and biases, so that a wrong
    norm, bias or routing rule changes the logits visibly."""
    gen = torch.Generator().manual_seed(seed)
    h, hd = shape.hidden_size, shape.head_dim

    def w(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=gen) / math.sqrt(inp)

    def norm(size: int) -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(size, generator=gen)

    def bias(size: int) -> torch.Tensor:
        return 0.1 * torch.randn(size, generator=gen)

    def decoder_layer(prefix: str, moe: bool) -> dict[str, torch.Tensor]:
        t = {
            f"{prefix}.input_layernorm.weight": norm(h),
            f"{prefix}.post_attention_layernorm.weight": norm(h),
            f"{prefix}.self_attn.q_proj.weight": w(shape.num_attention_heads * hd, h),
            f"{prefix}.self_attn.q_proj.bias": bias(shape.num_attention_heads * hd),
            f"{prefix}.self_attn.k_proj.weight": w(shape.num_key_value_heads * hd, h),
            f"{prefix}.self_attn.k_proj.bias": bias(shape.num_key_value_heads * hd),
            f"{prefix}.self_attn.v_proj.weight": w(shape.num_key_value_heads * hd, h),
            f"{prefix}.self_attn.v_proj.bias": bias(shape.num_key_value_heads * hd),
            f"{prefix}.self_attn.o_proj.weight": w(h, shape.num_attention_heads * hd),
        }
        if shape.use_qk_norm:
            t[f"{prefix}.self_attn.q_norm.weight"] = norm(hd)
            t[f"{prefix}.self_attn.k_norm.weight"] = norm(hd)
        if not moe:
            inter = shape.intermediate_size
            t.update({f"{prefix}.mlp.gate_proj.weight": w(inter, h), f"{prefix}.mlp.up_proj.weight": w(inter, h),
                      f"{prefix}.mlp.down_proj.weight": w(h, inter)})
            return t
        inter = shape.moe_intermediate_size
        t[f"{prefix}.mlp.gate.weight"] = w(shape.n_routed_experts, h)
        t[f"{prefix}.mlp.gate.e_score_correction_bias"] = 0.1 * torch.randn(shape.n_routed_experts, generator=gen)
        for e in range(shape.n_routed_experts):
            t[f"{prefix}.mlp.experts.{e}.gate_proj.weight"] = w(inter, h)
            t[f"{prefix}.mlp.experts.{e}.up_proj.weight"] = w(inter, h)
            t[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = w(h, inter)
        shared = inter * shape.n_shared_experts
        t.update({f"{prefix}.mlp.shared_experts.gate_proj.weight": w(shared, h),
                  f"{prefix}.mlp.shared_experts.up_proj.weight": w(shared, h),
                  f"{prefix}.mlp.shared_experts.down_proj.weight": w(h, shared)})
        return t

    tensors = {"model.embed_tokens.weight": torch.randn(shape.vocab_size, h, generator=gen)}
    for i in range(shape.num_hidden_layers):
        tensors.update(decoder_layer(f"model.layers.{i}", i >= shape.first_k_dense_replace))
    tensors["model.norm.weight"] = norm(h)
    tensors["lm_head.weight"] = w(shape.vocab_size, h)
    for j in range(shape.num_nextn_predict_layers):
        prefix = f"model.layers.{shape.num_hidden_layers + j}"
        tensors.update(decoder_layer(prefix, True))
        tensors.update({
            f"{prefix}.enorm.weight": norm(h),
            f"{prefix}.hnorm.weight": norm(h),
            f"{prefix}.eh_proj.weight": w(h, 2 * h),
            f"{prefix}.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
            f"{prefix}.shared_head.norm.weight": norm(h),
            f"{prefix}.shared_head.head.weight": tensors["lm_head.weight"].clone(),
        })
    return tensors


def save_tensors(tensors: dict[str, torch.Tensor], directory: Path, num_shards: int = 1) -> None:
    """One model.safetensors, or num_shards files with a model.safetensors.index.json, as save_pretrained does."""
    if num_shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    for s in range(num_shards):
        file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[s * per_shard : (s + 1) * per_shard]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_random_checkpoint(directory: str | Path, shape: TinyShape | str = "glm45", seed: int = 0,
                            num_shards: int = 1, config_style: str = "4.54", dtype: torch.dtype = torch.float32,
                            chat_template: str | None = None) -> Path:
    """Writes a complete checkpoint directory (weights, configs, tokenizer) and returns its path."""
    from glmserve.testing.tokenizer import save_test_tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    ids = save_test_tokenizer(directory, vocab_size=shape.vocab_size, chat_template=chat_template)
    eos, pad = list(ids["eos_token_id"]), ids["pad_token_id"]
    dtype_name = str(dtype).removeprefix("torch.")
    config = config_dict(shape, eos, pad, style=config_style, dtype=dtype_name)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "eos_token_id": eos, "pad_token_id": pad}, indent=2))
    tensors = {k: v.to(dtype) for k, v in random_tensors(shape, seed).items()}
    save_tensors(tensors, directory, num_shards)
    return directory


FP8_MAX = 448.0  # largest float8_e4m3fn


def _is_quantized_linear(name: str) -> bool:
    """What FP8 releases quantize: the projections; embeddings, norms, the router and the heads stay as they are."""
    return name.endswith("_proj.weight")


def write_fp8_checkpoint(directory: str | Path, source: str | Path, block: tuple[int, int] | None = None,
                         num_shards: int = 2) -> tuple[Path, dict[str, torch.Tensor]]:
    """An FP8 copy of the checkpoint at `source`: every projection as float8_e4m3fn with its scales (compressed-tensors
    with one scale per output row, or DeepSeek-style block FP8 when `block` is given), the scales stored in the last
    shard, away from their weights. Returns the directory and the dequantized weights a loader must produce."""
    from safetensors.torch import load_file

    source, directory = Path(source), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float() for f in sorted(source.glob("*.safetensors")) for k, v in load_file(f).items()}
    weights, scales, expected = {}, {}, {}
    for name, w in tensors.items():
        if not _is_quantized_linear(name):
            weights[name] = expected[name] = w
            continue
        if block is None:
            scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
            full = scale
            scales[name + "_scale"] = scale
        else:
            rows, cols = block
            blocks = torch.nn.functional.pad(w.abs(), (0, -w.shape[1] % cols, 0, -w.shape[0] % rows))
            blocks = blocks.view(blocks.shape[0] // rows, rows, blocks.shape[1] // cols, cols)
            scale = blocks.amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
            full = scale.repeat_interleave(rows, 0)[: w.shape[0]].repeat_interleave(cols, 1)[:, : w.shape[1]]
            scales[name + "_scale_inv"] = scale
        weights[name] = (w / full).to(torch.float8_e4m3fn)
        expected[name] = weights[name].float() * full
    save_tensors({**weights, **scales}, directory, num_shards)
    config = json.loads((source / "config.json").read_text())
    if block is None:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "float-quantized",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                            "dynamic": False, "group_size": None, "block_structure": None},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}},
            "ignore": ["lm_head"]}
    else:
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                         "weight_block_size": list(block)}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (source / extra).exists():
            (directory / extra).write_bytes((source / extra).read_bytes())
    return directory, expected
