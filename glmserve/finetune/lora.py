"""LoRA on the project's Glm4MoeForCausalLM, for training: adapter matrices beside a frozen model.

Each target is a PEFT module name of the transformers model (`model.layers.3.self_attn.q_proj`). Our model fuses
some of them (q/k/v_proj → qkv_proj, gate/up_proj → gate_up_proj), so a target is a row range of one of our linear
layers: the adapter adds scale · (x Aᵀ) Bᵀ to those output rows with a forward hook. The serving path and the
weights are untouched (the hook also sees past the oneDNN-packed weight copy inference uses), and training
computes only the low-rank products. `merge_into` adds scale · B A to the weights instead (for evaluation copies).
Only the main decoder layers are targeted: transformers' Glm4Moe has no MTP layer, so PEFT has nothing to match
it with.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from glmserve.finetune.flags import TARGETS
from glmserve.model.glm4_moe import Glm4MoeForCausalLM, Glm4MoeMLP


@dataclass(frozen=True)
class LoraSite:
    name: str  # PEFT's module name, without the `base_model.model.` prefix
    module: nn.Module  # our linear layer that computes it
    row: int  # its first output row in that layer
    rows: int
    in_features: int


def lora_sites(model: Glm4MoeForCausalLM, targets: Iterable[str]) -> list[LoraSite]:
    """Where each target sits in the model, layer by layer."""
    targets = list(dict.fromkeys(targets))
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise ValueError(f"unsupported LoRA target modules {unknown or targets}; supported: {', '.join(TARGETS)}")
    sites = []
    for i, layer in enumerate(model.model.layers[: model.config.num_hidden_layers]):
        attn, prefix = layer.self_attn, f"model.layers.{i}"
        q, kv = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        qkv, o = attn.qkv_proj, attn.o_proj
        mlp, mlp_name = (layer.mlp, "mlp") if isinstance(layer.mlp, Glm4MoeMLP) else \
            (layer.mlp.shared_experts, "mlp.shared_experts")
        inter = mlp.down_proj.in_features
        where = {"q_proj": ("self_attn", qkv, 0, q), "k_proj": ("self_attn", qkv, q, kv),
                 "v_proj": ("self_attn", qkv, q + kv, kv), "o_proj": ("self_attn", o, 0, o.out_features),
                 "gate_proj": (mlp_name, mlp.gate_up_proj, 0, inter),
                 "up_proj": (mlp_name, mlp.gate_up_proj, inter, inter),
                 "down_proj": (mlp_name, mlp.down_proj, 0, mlp.down_proj.out_features)}
        for target in targets:
            parent, module, row, rows = where[target]
            sites.append(LoraSite(f"{prefix}.{parent}.{target}", module, row, rows, module.in_features))
    return sites


def lora_scale(rank: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(rank) if use_rslora else rank)


class LoraAdapter(nn.Module):
    """A and B for every site, initialised as PEFT initialises them (A Kaiming-uniform, B zero: the adapter
    starts as the identity). `attach` hooks them into the model; the model's own parameters stay frozen."""

    def __init__(self, model: Glm4MoeForCausalLM, targets: Iterable[str], rank: int, alpha: float,
                 use_rslora: bool = False, seed: int = 0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.sites = lora_sites(model, targets)
        self.targets = list(dict.fromkeys(targets))
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scale = lora_scale(rank, alpha, use_rslora)
        generator = torch.Generator().manual_seed(seed)
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for site in self.sites:
            a = torch.empty(rank, site.in_features)
            bound = 1 / math.sqrt(site.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT use
            a.uniform_(-bound, bound, generator=generator)
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(torch.zeros(site.rows, rank)))
        self._hooks: list = []

    def attach(self) -> LoraAdapter:
        by_module: dict[nn.Module, list[int]] = {}
        for index, site in enumerate(self.sites):
            by_module.setdefault(site.module, []).append(index)
        for module, indices in by_module.items():
            self._hooks.append(module.register_forward_hook(self._hook(indices)))
        return self

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _hook(self, indices: list[int]):
        def add_delta(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            delta = out.new_zeros(out.shape)
            for i in indices:
                site = self.sites[i]
                delta[..., site.row: site.row + site.rows] = (x @ self.lora_A[i].T) @ self.lora_B[i].T
            return out + self.scale * delta

        return add_delta

    @torch.no_grad()
    def merge_into(self) -> None:
        """Add scale · B A to the weights of the model the adapter was made for (then re-pack them for inference);
        call it on a copy that will not be hooked."""
        for site, a, b in zip(self.sites, self.lora_A, self.lora_B):
            site.module.weight[site.row: site.row + site.rows] += self.scale * (b @ a)
        for module in {site.module for site in self.sites}:
            module.process_weights_after_loading()

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter under PEFT's tensor names (fp32, contiguous), as `PeftModel.save_pretrained` writes them."""
        tensors = {}
        for site, a, b in zip(self.sites, self.lora_A, self.lora_B):
            tensors[f"base_model.model.{site.name}.lora_A.weight"] = a.detach().float().contiguous().clone()
            tensors[f"base_model.model.{site.name}.lora_B.weight"] = b.detach().float().contiguous().clone()
        return tensors

    @torch.no_grad()
    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of `peft_tensors` (read back by loader/peft.py, without PEFT's `base_model.model.` prefix):
        every site's A and B must be present with this adapter's shapes."""
        for site, a, b in zip(self.sites, self.lora_A, self.lora_B):
            for param, kind in ((a, "lora_A"), (b, "lora_B")):
                key = f"{site.name}.{kind}.weight"
                if key not in tensors:
                    raise ValueError(f"the adapter has no tensor {key}")
                if tuple(tensors[key].shape) != tuple(param.shape):
                    raise ValueError(f"{key} has shape {tuple(tensors[key].shape)}, expected {tuple(param.shape)}")
                param.copy_(tensors[key])
