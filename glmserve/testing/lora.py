"""Random PEFT LoRA adapters for the small test checkpoints, and the reference they are checked against: the
adapter's deltas (scale x B x A) merged into a transformers Glm4MoeForCausalLM's weights.

Layouts: "per_expert" writes routed-expert LoRA one expert at a time (`mlp.experts.{e}.gate_proj`, transformers
4.x names), "fused" as PEFT 0.21 saves it for transformers 5's fused expert tensors (`mlp.experts.base_layer.lora_A`
[r x E, H] for gate_up_proj, `mlp.experts.lora_A` [r x E, I] for down_proj).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from glmserve.testing.checkpoint import TinyShape

TARGETS = {
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),  # the dense MLP and the shared experts
    "experts": ("experts",),
}


def _modules(shape: TinyShape, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """HF module name → (out, in) of every projection of the target groups (TARGETS' keys), per expert for the
    routed experts."""
    targets = tuple(name for group in targets for name in TARGETS[group])
    h, q, kv = shape.hidden_size, shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    found = {}
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}"
        dims = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
        found.update({f"{p}.self_attn.{n}": dims[n] for n in targets if n in dims})
        moe = i >= shape.first_k_dense_replace
        inter = shape.moe_intermediate_size * shape.n_shared_experts if moe else shape.intermediate_size
        mlp = f"{p}.mlp.shared_experts" if moe else f"{p}.mlp"
        mdims = {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
        found.update({f"{mlp}.{n}": mdims[n] for n in targets if n in mdims})
        if moe and "experts" in targets:
            i_e = shape.moe_intermediate_size
            for e in range(shape.n_routed_experts):
                found.update({f"{p}.mlp.experts.{e}.{n}": d for n, d in
                              (("gate_proj", (i_e, h)), ("up_proj", (i_e, h)), ("down_proj", (h, i_e)))})
    return found


def write_random_adapter(directory: str | Path, shape: TinyShape, rank: int, targets: tuple[str, ...],
                         layout: str = "per_expert", alpha: float = 16.0, use_rslora: bool = False, seed: int = 0,
                         magnitude: float = 1.0) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Writes the adapter; returns HF module name (per expert) → (A, B, scale) for merge_into()."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    scale = alpha / (math.sqrt(rank) if use_rslora else rank)
    deltas, tensors = {}, {}
    modules = _modules(shape, targets)
    for name, (out, inp) in modules.items():
        a = torch.randn(rank, inp, generator=gen) / math.sqrt(inp)
        b = torch.randn(out, rank, generator=gen) * magnitude / (math.sqrt(rank) * scale)
        deltas[name] = (a, b, scale)
        if layout == "per_expert" or ".experts." not in name:
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": use_rslora, "bias": "none",
              "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
              "target_modules": sorted({n.rsplit(".", 1)[1] for n in modules if ".experts." not in n})}
    if layout == "fused" and "experts" in targets:
        _fuse_experts(shape, deltas, tensors, rank)
        # PEFT doubles gate_up's rank (and alpha, so the scale stays) for the fused tensor
        config.update(target_parameters=["gate_up_proj", "down_proj"], rank_pattern={r".*\.gate_up_proj": 2 * rank},
                      alpha_pattern={r".*\.gate_up_proj": 2 * alpha})
    elif layout not in ("per_expert", "fused"):
        raise ValueError(f"unknown layout {layout!r}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return deltas


def _fuse_experts(shape: TinyShape, deltas: dict, tensors: dict, rank: int) -> None:
    """PEFT's fused layout: A [r*E, in] expert-major, B [out, r*E] rank-major; gate_up's rank is 2r (gate's and
    up's A stacked, B block-diagonal), the same deltas as the per-expert adapter (and the same scale)."""
    num_e = shape.n_routed_experts
    for i in range(shape.first_k_dense_replace, shape.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        if f"{p}.0.gate_proj" not in deltas:
            continue
        a13, b13, a2, b2 = [], [], [], []
        for e in range(num_e):
            (ag, bg, _), (au, bu, _), (ad, bd, _) = (deltas[f"{p}.{e}.{n}"] for n in ("gate_proj", "up_proj",
                                                                                     "down_proj"))
            a13.append(torch.cat([ag, au]))
            b13.append(torch.block_diag(bg, bu))
            a2.append(ad)
            b2.append(bd)
        # B [out, r, E] flattened rank-major, as PEFT's ParamWrapper reshapes it
        tensors[f"base_model.model.{p}.base_layer.lora_A.weight"] = torch.cat(a13)
        tensors[f"base_model.model.{p}.base_layer.lora_B.weight"] = torch.stack(b13, dim=2).flatten(1)
        tensors[f"base_model.model.{p}.lora_A.weight"] = torch.cat(a2)
        tensors[f"base_model.model.{p}.lora_B.weight"] = torch.stack(b2, dim=2).flatten(1)


@torch.no_grad()
def merge_into(hf_model: torch.nn.Module, deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """Add scale x B x A to the transformers model's weights (its routed experts fused as in transformers 5:
    gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    params = dict(hf_model.named_parameters())
    for name, (a, b, scale) in deltas.items():
        delta = scale * b @ a
        if ".experts." in name:
            experts, e, proj = name.rsplit(".", 2)
            e = int(e)
            if proj == "down_proj":
                params[f"{experts}.down_proj"][e] += delta
            else:
                rows = delta.shape[0]
                offset = 0 if proj == "gate_proj" else rows
                params[f"{experts}.gate_up_proj"][e, offset : offset + rows] += delta
        else:
            params[f"{name}.weight"] += delta
