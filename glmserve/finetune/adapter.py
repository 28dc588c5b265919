"""The PEFT adapter directory: adapter_config.json + adapter_model.safetensors, as `PeftModel.save_pretrained`
writes them for a transformers Glm4MoeForCausalLM, so that peft, vLLM-style servers and `glmserve serve
--lora-modules` load what `glmserve finetune` writes.

Tensors: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r], fp32, for each target module of each main decoder layer (dense MLP: `model.layers.{i}.mlp.gate_proj`,
shared experts: `model.layers.{i}.mlp.shared_experts.gate_proj`).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from glmserve.finetune.lora import LoraAdapter
from glmserve.loader.peft import load_adapter_tensors, read_adapter_config

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def adapter_config(adapter: LoraAdapter, base_model: str) -> dict:
    """PEFT's LoraConfig fields that say what the tensors mean; the rest (training-only options) keep PEFT's
    defaults when PEFT reads the file."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "use_rslora": adapter.use_rslora,
        "target_modules": adapter.targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def write_adapter(adapter: LoraAdapter, directory: str | Path, base_model: str) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter.peft_tensors(), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps(adapter_config(adapter, base_model), indent=2) + "\n")
    return directory


def adapter_from_directory(model, directory: str | Path) -> LoraAdapter:
    """A LoraAdapter for `model` holding the adapter in `directory` (not attached)."""
    directory = Path(directory)
    config, tensors = read_adapter_config(directory), load_adapter_tensors(directory)
    adapter = LoraAdapter(model, config["target_modules"], config["r"], config["lora_alpha"],
                          config.get("use_rslora", False))
    adapter.load_peft_tensors(tensors)
    return adapter
