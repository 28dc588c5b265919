"""What a quantized model's weights stand for, in fp32: for comparing it with a float model on the same values."""

from __future__ import annotations

import torch
from torch import nn

from glmserve.kernels import dequantize


def dequantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter by name, quantized ones (those with a `<name>_scale` buffer beside them) as fp32 values of
    their logical shape ([E, rows, cols] for stacked experts)."""
    out = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            scales = getattr(module, f"{name}_scale", None)
            if scales is None:
                out[full] = param.detach().float()
            elif param.dim() == 3:
                out[full] = torch.stack([dequantize(w, s, param.group_size) for w, s in zip(param, scales)])
            else:
                out[full] = dequantize(param, scales, param.group_size)
    return out


def load_float_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copies fp32 values into a float model's parameters of the same names, and redoes its after-loading step."""
    for name, param in model.named_parameters():
        param.data.copy_(weights[name])
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
