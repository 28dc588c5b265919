"""LoRA adapters applied per row: each step's rows grouped by adapter slot (LoRABatch), and per layer the stacked
weights of the adapters in the slots (LinearLoRASlots, ExpertLoRASlots). Weights are never merged per request."""

from glmserve.layers.lora.batch import LoRABatch
from glmserve.layers.lora.experts import ExpertLoRASlots, experts_with_lora
from glmserve.layers.lora.linear import LinearLoRASlots

__all__ = ["ExpertLoRASlots", "LinearLoRASlots", "LoRABatch", "experts_with_lora"]
