"""The nano model's shape, a freshly initialised Glm4MoeForCausalLM for training, and the checkpoint writer.

`save_checkpoint` is the loader's mapping run backwards: qkv_proj → q/k/v_proj, gate_up_proj → gate/up_proj,
experts.w13/w2 → experts.{e}.gate/up/down_proj.weight, so the files have the released GLM-4.5 tensor names and
load in glmserve and in transformers alike.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from glmserve.config import ModelConfig
from glmserve.loader import load_model
from glmserve.model.glm4_moe import Glm4MoeForCausalLM
from glmserve.testing.checkpoint import TinyShape, config_dict, save_tensors

# What a 2-core CPU trains usefully in about an hour: ~4.5M parameters (~9 MB in bfloat16), ~1M active per token.
NANO_SHAPE = TinyShape(
    hidden_size=128, num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, intermediate_size=384, moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=2,
    n_shared_experts=1, routed_scaling_factor=1.0, use_qk_norm=True, vocab_size=2048,
    max_position_embeddings=4096, num_nextn_predict_layers=1,
)
# For tests: the same architecture, small enough to train a few steps in seconds.
TINY_SHAPE = TinyShape(
    hidden_size=48, num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=1,
    head_dim=32, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
    n_shared_experts=1, routed_scaling_factor=1.0, use_qk_norm=True, vocab_size=512,
    max_position_embeddings=2048, num_nextn_predict_layers=1,
)
ROPE_THETA = 10000.0  # short contexts: spread the 16 rotary dims' frequencies over ~1k positions
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
WEIGHTS_FILE = "model.safetensors"


def nano_config(shape: TinyShape, eos_token_ids: list[int], pad_token_id: int, dtype: str = "bfloat16") -> dict:
    """config.json in the released checkpoints' (transformers 4.54) style."""
    return {**config_dict(shape, eos_token_ids, pad_token_id, dtype=dtype), "rope_theta": ROPE_THETA}


def init_model(config: dict, seed: int = 0) -> Glm4MoeForCausalLM:
    """An fp32 model with trainable parameters, GPT-2 style init (residual outputs scaled by depth), and the MTP
    layer sharing the main embedding and output head, as DeepSeek-V3's MTP modules do."""
    torch.manual_seed(seed)
    model = Glm4MoeForCausalLM(ModelConfig.from_dict(config))
    residual_std = 0.02 / math.sqrt(2 * (config["num_hidden_layers"] + config["num_nextn_predict_layers"]))
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            nn.init.ones_(param)
        elif name.endswith(".bias") or name.endswith("e_score_correction_bias"):
            nn.init.zeros_(param)
        elif name.endswith(("o_proj.weight", "down_proj.weight", ".w2")):
            nn.init.normal_(param, std=residual_std)
        else:
            nn.init.normal_(param, std=0.02)
    mtp = model.mtp_layer
    mtp.embed_tokens.weight = model.model.embed_tokens.weight
    mtp.shared_head.head.weight = model.lm_head.weight
    for name, param in model.named_parameters():
        param.requires_grad_(not name.endswith("e_score_correction_bias"))  # updated by load balancing, not SGD
    return model


def checkpoint_tensors(model: Glm4MoeForCausalLM) -> dict[str, torch.Tensor]:
    """The model's parameters under the released GLM-4.5 tensor names (every tensor its own copy)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        value = param.detach()
        if ".qkv_proj." in name:
            attn = model.model.layers[int(name.split(".")[2])].self_attn
            q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
            for part, piece in zip("qkv", value.split([q, kv, kv])):
                tensors[name.replace(".qkv_proj.", f".{part}_proj.")] = piece
        elif ".gate_up_proj." in name:
            gate, up = value.chunk(2)
            tensors[name.replace(".gate_up_proj.", ".gate_proj.")] = gate
            tensors[name.replace(".gate_up_proj.", ".up_proj.")] = up
        elif name.endswith(".experts.w13"):
            for e, stacked in enumerate(value):
                gate, up = stacked.chunk(2)
                tensors[f"{name[:-4]}.{e}.gate_proj.weight"] = gate
                tensors[f"{name[:-4]}.{e}.up_proj.weight"] = up
        elif name.endswith(".experts.w2"):
            for e, down in enumerate(value):
                tensors[f"{name[:-3]}.{e}.down_proj.weight"] = down
        else:
            tensors[name] = value
    return {name: t.clone().contiguous() for name, t in tensors.items()}


def save_checkpoint(model: Glm4MoeForCausalLM, config: dict, directory: str | Path) -> Path:
    """Write config.json, generation_config.json and model.safetensors (in config["torch_dtype"]); the router
    and its correction bias stay fp32, as transformers keeps them. The tokenizer files are written separately."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[config["torch_dtype"]]
    tensors = {name: t if name.endswith(("mlp.gate.weight", "e_score_correction_bias")) else t.to(dtype)
               for name, t in checkpoint_tensors(model).items()}
    save_tensors(tensors, directory)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    # Sampling defaults of the GLM-4.5 series (Z.ai's API documentation): temperature 0.6, top_p 0.95.
    generation = {"_from_model_config": True, "do_sample": True, "temperature": 0.6, "top_p": 0.95,
                  "eos_token_id": config["eos_token_id"], "pad_token_id": config["pad_token_id"],
                  "transformers_version": config["transformers_version"]}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return directory


def load_checkpoint(directory: str | Path, quantization: str | None = None) -> Glm4MoeForCausalLM:
    """A written checkpoint as an fp32 model (MTP layer included), through glmserve's loader; with `quantization`
    (--quantization's names), its weights held in that format."""
    from glmserve.layers.quantization import get_quant_method

    config = ModelConfig.from_pretrained(directory)
    model = Glm4MoeForCausalLM(config, quant=get_quant_method(quantization) if quantization else None)
    load_model(model, directory, config.num_hidden_layers, config.num_nextn_predict_layers, progress=False)
    return model.eval()


def write_derived_checkpoint(source: Path, out: Path, tensors: dict[str, torch.Tensor], config: dict | None = None
                             ) -> Path:
    """A checkpoint made from `source`'s (a soup, a grown copy): `tensors` as its weights, `config` (if given) as its
    config.json, and every other file of `source` (tokenizer, chat template, generation config) copied."""
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != WEIGHTS_FILE and not (config and path.name == "config.json"):
            shutil.copyfile(path, out / path.name)
    if config:
        (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out
