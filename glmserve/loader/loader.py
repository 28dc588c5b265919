"""Checkpoint tensor names → model parameters, with a strict report of what is missing or unexpected.

The mapping is short because the model uses Hugging Face attribute names; the only renames are the fused
projections (q/k/v → qkv_proj, gate/up → gate_up_proj) and the per-expert tensors stacked into w13/w2.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from glmserve.layers.quantization import QuantizedTensor
from glmserve.loader.checkpoint import (
    LoaderError,
    TensorLookup,
    checkpoint_files,
    count_tensors,
    iterate_tensors,
)
from glmserve.loader.fp8 import Fp8Scheme, with_scales

_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_STACKED = [  # (checkpoint piece, parameter piece, shard id)
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
]
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# FP8 KV-cache scales, under the names vLLM reads (compressed-tensors stores them as k_proj/v_proj output_scale).
_KV_SCALE = re.compile(r"^(.*\.self_attn)\.(?:attn\.|[kv]_proj\.)?([kv])_scale$"
                       r"|^(.*\.self_attn)\.([kv])_proj\.output_scale$")


def _target(name: str) -> tuple[str, object] | None:
    """(parameter name, shard id) for a checkpoint tensor name, or None for a 1:1 name."""
    m = _EXPERT.match(name)
    if m:
        prefix, expert, which = m.groups()
        return f"{prefix}.{'w2' if which == 'down' else 'w13'}", (int(expert), which)
    for ckpt_piece, param_piece, shard in _STACKED:
        if ckpt_piece in name:
            return name.replace(ckpt_piece, param_piece), shard
    return None


def load_model(model: nn.Module, model_dir: str | Path, num_hidden_layers: int, num_mtp_layers: int,
               progress: bool = True, quantization: dict | None = None) -> None:
    """quantization: config.json's quantization_config (an FP8 checkpoint's weights reach their layers with their
    scales). Tensors stream in one at a time; each layer stores its slice in its own format."""
    model_dir = Path(model_dir)
    files = checkpoint_files(model_dir)
    params = dict(model.named_parameters())
    # What must be filled: each parameter, or each (parameter, shard) for fused and stacked ones.
    loaded: set[tuple[str, object]] = set()
    unexpected: list[str] = []
    bar = tqdm(total=count_tensors(files), desc="Loading weights", unit="tensor", disable=not progress,
               leave=False)
    held = getattr(model, "holds", lambda name: True)  # a pipeline stage holds only its layers
    tensors = _kv_scales_taken(((n, t) for n, t in _counted(iterate_tensors(files), bar) if held(n)), model)
    if quantization is not None:
        tensors = with_scales(tensors, Fp8Scheme.from_config(quantization), TensorLookup(files).get)
    for name, tensor in tensors:
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= num_hidden_layers + num_mtp_layers:
            continue  # an MTP layer the config does not ask for (num_nextn_predict_layers = 0)
        target = _target(name)
        param_name, shard = target if target else (name, None)
        param = params.get(param_name)
        if param is None:
            unexpected.append(name)
            continue
        try:
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                if isinstance(tensor, QuantizedTensor):
                    tensor = tensor.dequantize()
                if param.shape != tensor.shape:
                    raise ValueError(f"shape mismatch: expected {tuple(param.shape)}, "
                                     f"checkpoint has {tuple(tensor.shape)}")
                param.data.copy_(tensor)
            else:
                loader(param, tensor, shard) if shard is not None else loader(param, tensor)
        except (ValueError, IndexError) as e:  # IndexError: an expert number beyond n_routed_experts
            raise LoaderError(f"tensor {name!r}: {e}") from None
        loaded.add((param_name, shard))
    bar.close()
    _check_complete(model, params, loaded, unexpected, model_dir)


def _kv_scales_taken(tensors: Iterator[tuple[str, torch.Tensor]], model: nn.Module):
    """The tensors, less the KV-cache scales, which are set on their attention modules as k_scale / v_scale."""
    for name, tensor in tensors:
        m = _KV_SCALE.match(name)
        if m is None:
            yield name, tensor
            continue
        module_name, which = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue  # a layer this model does not build (an MTP layer it was not asked for)
        if tensor.numel() != 1:
            raise LoaderError(f"tensor {name!r}: a KV-cache scale must be one value per tensor, got shape "
                              f"{tuple(tensor.shape)}")
        setattr(module, f"{which}_scale", float(tensor.float()))


def _counted(tensors: Iterator[tuple[str, torch.Tensor]], bar: tqdm) -> Iterator[tuple[str, torch.Tensor]]:
    for item in tensors:
        bar.update()
        yield item


def _required(model: nn.Module, params: dict) -> set[tuple[str, object]]:
    required: set[tuple[str, object]] = set()
    for name, param in params.items():
        if name.endswith(".w13") or name.endswith(".w2"):
            parts = ("gate", "up") if name.endswith(".w13") else ("down",)
            experts = model.get_submodule(name.rsplit(".", 1)[0]).expert_ids  # this rank's, numbered in the model
            required.update((name, (e, p)) for e in experts for p in parts)
        elif ".qkv_proj." in name:
            required.update((name, s) for s in ("q", "k", "v"))
        elif ".gate_up_proj." in name:
            required.update((name, s) for s in (0, 1))
        else:
            required.add((name, None))
    return required


def _check_complete(model: nn.Module, params: dict, loaded: set, unexpected: list[str], model_dir: Path) -> None:
    missing = sorted({name for name, _ in _required(model, params) - loaded})
    problems = []
    if missing:
        problems.append(f"missing tensors for {len(missing)} parameter(s): {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}"
                        + (" ..." if len(unexpected) > 8 else ""))
    if problems:
        raise LoaderError(f"checkpoint {model_dir} does not match the model: " + "; ".join(problems))
