"""The runner's LoRA adapters: read from disk into an LRU of at most max_cpu_loras, copied into max_loras slots of
the model's LoRA layers when a step needs them, and each step's rows mapped to their request's slot (LoRABatch).

The scheduler never puts more than max_loras adapters in one step, so a step's adapters always fit the slots; a
slot whose adapter the step does not use is reused, least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from glmserve.config import ConfigError, ModelConfig
from glmserve.layers.linear import LinearBase
from glmserve.layers.lora import ExpertLoRASlots, LinearLoRASlots, LoRABatch
from glmserve.layers.lora.batch import BASE
from glmserve.layers.quantization import UnquantizedMethod
from glmserve.loader.peft import LoRAWeights, read_peft_adapter
from glmserve.types import AdapterError, LoRARequest, ScheduledChunk

# LoRA layers and how many projections each stacks (its slots are that many ranks wide).
_STACKED = {"qkv_proj": 3, "gate_up_proj": 2, "o_proj": 1, "down_proj": 1}


class LoRAManager:
    def __init__(self, model: nn.Module, config: ModelConfig, max_loras: int, max_lora_rank: int,
                 max_cpu_loras: int, dtype: torch.dtype, device: torch.device):
        self.model, self.config = model, config
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = max_loras, max_lora_rank, max_cpu_loras
        self.dtype, self.device = dtype, device
        self.cache: OrderedDict[int, LoRAWeights] = OrderedDict()  # lora_int_id → weights, least recent first
        self.slots: OrderedDict[int, int] = OrderedDict()  # lora_int_id → slot, least recently used first
        self.linears: dict[str, LinearBase] = {}
        self.moe_blocks: dict[str, nn.Module] = {}  # "model.layers.{i}.mlp.experts" → its Glm4MoeMoE
        for name, module in model.named_modules():
            if not name.startswith("model.layers.") or int(name.split(".")[2]) >= config.num_hidden_layers:
                continue  # the MTP layer drafts with the base weights
            if isinstance(module, LinearBase) and name.rsplit(".", 1)[1] in _STACKED:
                module.lora = LinearLoRASlots(max_loras, _STACKED[name.rsplit(".", 1)[1]] * max_lora_rank,
                                              module.in_features, module.out_features, dtype, device)
                self.linears[name] = module
            elif hasattr(module, "experts_lora"):
                self.moe_blocks[f"{name}.experts"] = module

    def weights(self, lora: LoRARequest) -> LoRAWeights:
        """The adapter's weights, read (and checked) unless cached. Raises AdapterError."""
        if lora.lora_int_id in self.cache:
            self.cache.move_to_end(lora.lora_int_id)
            return self.cache[lora.lora_int_id]
        weights = read_peft_adapter(lora.lora_path, self.config, self.max_lora_rank)
        for module in set(weights.linear) - set(self.linears) | set(weights.experts) - set(self.moe_blocks):
            raise AdapterError(f"target module {module!r}: the model has no such module")
        for module in weights.experts:
            experts = self.moe_blocks[module].experts
            if type(experts.quant_method) is not UnquantizedMethod or experts.w13.numel() == 0:
                raise AdapterError(f"{module}: LoRA on the routed experts needs their weights in float "
                                   "(not with --quantization or --weight-dtype float16)")
        self.cache[lora.lora_int_id] = weights
        while len(self.cache) > self.max_cpu_loras:
            self.cache.popitem(last=False)
        return weights

    def remove(self, lora_int_id: int) -> None:
        self.cache.pop(lora_int_id, None)
        self.slots.pop(lora_int_id, None)  # the slot's stale weights are overwritten before any reuse

    def prepare(self, chunks: list[ScheduledChunk]) -> LoRABatch | None:
        """Put the step's adapters in slots and map each chunk's rows to its slot."""
        needed = {c.request.sampling_params.lora_request.lora_int_id: c.request.sampling_params.lora_request
                  for c in chunks if c.request.sampling_params.lora_request is not None}
        if len(needed) > self.max_loras:
            raise ConfigError(f"a step holds {len(needed)} adapters, more than --max-loras {self.max_loras}")
        for lora_id, lora in needed.items():
            if lora_id in self.slots:
                self.slots.move_to_end(lora_id)
            else:
                self._load(lora, self._free_slot(needed))
        runs = []
        for chunk in chunks:
            lora = chunk.request.sampling_params.lora_request
            runs.append((BASE if lora is None else self.slots[lora.lora_int_id], chunk.num_tokens))
        return LoRABatch.build(runs, self.device)

    def _free_slot(self, needed: dict) -> int:
        used = set(self.slots.values())
        for slot in range(self.max_loras):
            if slot not in used:
                return slot
        victim = next(i for i in self.slots if i not in needed)
        return self.slots.pop(victim)

    def _load(self, lora: LoRARequest, slot: int) -> None:
        weights = self.weights(lora)
        for name, linear in self.linears.items():
            pair = weights.linear.get(name)
            linear.lora.set_slot(slot, *(pair if pair is not None else (None, None)))
        for name, moe in self.moe_blocks.items():
            w13, w2 = weights.experts.get(name, ({}, {}))
            if moe.experts_lora is None:
                if not (w13 or w2):
                    continue
                experts = moe.experts
                moe.experts_lora = ExpertLoRASlots(self.max_loras, experts.num_experts, experts.hidden,
                                                   experts.intermediate, self.max_lora_rank, self.dtype,
                                                   self.device)
            moe.experts_lora.set_slot(slot, w13, w2)
        self.slots[lora.lora_int_id] = slot
