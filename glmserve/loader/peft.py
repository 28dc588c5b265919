"""A PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors), read for this model.

Layouts read:
- one LoRA per module, `<module>.lora_A.weight` [r, in] and `<module>.lora_B.weight` [out, r], for the attention
  projections (q/k/v/o_proj), the dense MLP and the shared experts (gate/up/down_proj), and the routed experts one
  by one (`mlp.experts.{e}.gate_proj`, as transformers 4.x names them);
- PEFT 0.21's routed experts on transformers 5's fused expert tensors (`target_parameters`): `mlp.experts.lora_A`
  [r x E, in] and `lora_B` [out, r x E] per tensor, nested as `experts.base_layer.lora_*` when both gate_up_proj
  [E, 2I, H] and down_proj [E, H, I] are targeted; told apart by their shapes.
The result is in glmserve's modules (q/k/v stacked in qkv_proj, gate/up in gate_up_proj, experts' w13/w2), the
adapter's scale (lora_alpha / r, or / sqrt(r) with rsLoRA) folded into B.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from glmserve.config import ModelConfig
from glmserve.types import AdapterError

LoRAPair = tuple[torch.Tensor, torch.Tensor]  # (A [r, in], B [out, r] with the scale folded in)

_PROJ = r"model\.layers\.(\d+)\."
_MODULE = re.compile(_PROJ + r"(self_attn\.[qkvo]_proj|mlp\.(?:shared_experts\.)?(?:gate|up|down)_proj|"
                     r"mlp\.experts\.\d+\.(?:gate|up|down)_proj)$")
_FUSED_EXPERTS = re.compile(_PROJ + r"mlp\.experts$")


@dataclass
class LoRAWeights:
    """One adapter's weights in glmserve's modules."""

    rank: int  # the largest rank of one projection (PEFT's doubled fused gate_up rank counted once)
    linear: dict[str, LoRAPair] = field(default_factory=dict)  # "model.layers.0.self_attn.qkv_proj" → pair
    experts: dict[str, tuple[dict[int, LoRAPair], dict[int, LoRAPair]]] = field(default_factory=dict)  # w13, w2


def read_adapter_config(directory: Path) -> dict:
    path = directory / "adapter_config.json"
    if not directory.is_dir():
        raise AdapterError(f"LoRA adapter directory {str(directory)!r} does not exist")
    if not path.is_file():
        raise AdapterError(f"{str(directory)!r} has no adapter_config.json: not a PEFT adapter directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {config['peft_type']!r}; only LORA adapters are served")
    if config.get("use_dora"):
        raise AdapterError(f"{path}: use_dora (DoRA) adapters are not supported")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path}: modules_to_save ({config['modules_to_save']}) is not supported: the adapter "
                           "replaces whole modules, which per-request LoRA serving does not do")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise AdapterError(f"{path}: LoRA biases (bias / lora_bias) are not supported")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{path}: fan_in_fan_out adapters (Conv1D models) do not fit this model")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterError(f"{path}: r must be a positive integer")
    return config


def load_adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors in fp32, under the model's module names (PEFT's `base_model.model.` prefix off)."""
    path = directory / "adapter_model.safetensors"
    if not path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterError(f"{str(directory)!r} holds adapter_model.bin (a pickle, which glmserve does not "
                               "load); save it with safetensors (PEFT's default, safe_serialization=True)")
        raise AdapterError(f"{str(directory)!r} has no adapter_model.safetensors")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a damaged file
        raise AdapterError(f"{path}: cannot be read ({e})") from None
    return {k.removeprefix("base_model.model."): v.float() for k, v in tensors.items()}


def _scale(config: dict, key: str, rank: int) -> float:
    """lora_alpha / r (rsLoRA: / sqrt(r)), with rank_pattern / alpha_pattern matched as PEFT matches them."""
    def pattern(name: str, default):
        for p, value in (config.get(name) or {}).items():
            if re.match(rf"(.*\.)?({p})$", key):
                return value
        return default

    expected = pattern("rank_pattern", config["r"])
    if expected != rank:
        raise AdapterError(f"{key}: rank {rank} in the weights, {expected} in adapter_config.json")
    alpha = pattern("alpha_pattern", config.get("lora_alpha", 8))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


class _Reader:
    def __init__(self, config: dict, model: ModelConfig, max_rank: int):
        self.config, self.model, self.max_rank = config, model, max_rank
        self.parts: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}  # module → (out offset, A, B)
        self.expert_parts: dict[str, dict[str, dict[int, list]]] = {}  # experts module → w13/w2 → expert → parts
        self.rank = 0

    def layer(self, path: str, index: str, moe_part: bool) -> int:
        layer = int(index)
        m = self.model
        if layer >= m.num_hidden_layers or (moe_part != m.is_moe_layer(layer) and ".mlp." in path):
            raise AdapterError(f"target module {path!r}: the model has no such module")
        return layer

    def check_rank(self, path: str, rank: int, limit: int) -> None:
        if rank > limit:
            raise AdapterError(f"{path}: rank {rank} is above --max-lora-rank {self.max_rank}")
        self.rank = max(self.rank, rank)

    def add_module(self, path: str, a: torch.Tensor, b: torch.Tensor) -> None:
        m = self.model
        layer_idx, sub = _MODULE.match(path).groups()
        self.layer(path, layer_idx, "shared_experts" in sub or ".experts." in sub)
        rank = a.shape[0]
        self.check_rank(path, rank, self.max_rank)
        b = b * _scale(self.config, path, rank)
        prefix, name = path.rsplit(".", 1)
        q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
        inter = (m.moe_intermediate_size * m.n_shared_experts if "shared_experts" in sub else
                 m.moe_intermediate_size if ".experts." in sub else m.intermediate_size)
        h = m.hidden_size
        shapes = {"q_proj": (0, q, h), "k_proj": (q, kv, h), "v_proj": (q + kv, kv, h),
                  "o_proj": (0, m.hidden_size, q), "gate_proj": (0, inter, m.hidden_size),
                  "up_proj": (inter, inter, m.hidden_size), "down_proj": (0, m.hidden_size, inter)}
        offset, out, inp = shapes[name]
        if tuple(a.shape) != (rank, inp) or tuple(b.shape) != (out, rank):
            raise AdapterError(f"{path}: LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit the model's "
                               f"[{out}, {inp}] projection")
        if ".experts." in sub:
            experts, expert = prefix.rsplit(".", 1)
            which = "w2" if name == "down_proj" else "w13"
            self.expert_parts.setdefault(experts, {"w13": {}, "w2": {}})[which].setdefault(int(expert), []).append(
                (offset, a, b))
            return
        target = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                  "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}.get(name, name)
        self.parts.setdefault(f"{prefix}.{target}", []).append((offset, a, b))

    def add_fused_experts(self, path: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """PEFT's LoRA on a 3-D expert tensor: A [r*E, in] expert-major, B [out, r*E] rank-major (as its
        ParamWrapper reshapes them: delta[e] = B.view(out, r, E)[..., e] @ A.view(E, r, in)[e])."""
        m = self.model
        self.layer(path, _FUSED_EXPERTS.match(path).group(1), True)
        num_experts, hidden, inter = m.n_routed_experts, m.hidden_size, m.moe_intermediate_size
        if a.shape[0] % num_experts or b.shape[1] != a.shape[0]:
            raise AdapterError(f"{path}: fused expert LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not "
                               f"split into {num_experts} experts")
        rank = a.shape[0] // num_experts
        if (a.shape[1], b.shape[0]) == (hidden, 2 * inter):
            which, key, limit = "w13", f"{path}.gate_up_proj", 2 * self.max_rank  # PEFT doubles gate_up's rank
        elif (a.shape[1], b.shape[0]) == (inter, hidden):
            which, key, limit = "w2", f"{path}.down_proj", self.max_rank
        else:
            raise AdapterError(f"{path}: fused expert LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} fit neither "
                               f"gate_up_proj [{2 * inter}, {hidden}] nor down_proj [{hidden}, {inter}]")
        if rank > limit:
            raise AdapterError(f"{path}: rank {rank} is above what --max-lora-rank {self.max_rank} allows here")
        self.rank = max(self.rank, rank if which == "w2" else -(-rank // 2))
        b = b * _scale(self.config, key, rank)
        a_e, b_e = a.view(num_experts, rank, -1), b.view(b.shape[0], rank, num_experts)
        parts = self.expert_parts.setdefault(path, {"w13": {}, "w2": {}})[which]
        for e in range(num_experts):
            parts.setdefault(e, []).append((0, a_e[e], b_e[:, :, e]))

    def weights(self) -> LoRAWeights:
        m = self.model
        q, kv = m.num_attention_heads * m.head_dim, m.num_key_value_heads * m.head_dim
        out_features = {"qkv_proj": q + 2 * kv, "o_proj": m.hidden_size, "down_proj": m.hidden_size}
        result = LoRAWeights(self.rank)
        for module, parts in self.parts.items():
            name = module.rsplit(".", 1)[1]
            shared = "shared_experts" in module
            inter = m.moe_intermediate_size * m.n_shared_experts if shared else m.intermediate_size
            result.linear[module] = _stack(parts, out_features.get(name, 2 * inter))
        for module, per in self.expert_parts.items():
            result.experts[module] = ({e: _stack(p, 2 * m.moe_intermediate_size) for e, p in per["w13"].items()},
                                      {e: _stack(p, m.hidden_size) for e, p in per["w2"].items()})
        return result


def _stack(parts: list[tuple[int, torch.Tensor, torch.Tensor]], out_features: int) -> LoRAPair:
    """Projections stacked on the output dim: their A rows side by side, B block-diagonal."""
    a = torch.cat([p[1] for p in parts])
    b = a.new_zeros(out_features, a.shape[0])
    col = 0
    for offset, pa, pb in parts:
        b[offset : offset + pb.shape[0], col : col + pa.shape[0]] = pb
        col += pa.shape[0]
    return a, b


def read_peft_adapter(directory: str | Path, model: ModelConfig, max_lora_rank: int) -> LoRAWeights:
    """Raises AdapterError naming what is wrong: a missing or malformed directory, an unsupported feature, a rank
    above max_lora_rank, or a target module the model lacks."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors = load_adapter_tensors(directory)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for side in ("lora_A", "lora_B"):
            if key.endswith(f".{side}.weight"):
                pairs.setdefault(key.removesuffix(f".{side}.weight"), {})[side] = tensor
                break
        else:
            raise AdapterError(f"adapter tensor {key!r}: only lora_A / lora_B weights of linear layers are served")
    if not pairs:
        raise AdapterError(f"{str(directory)!r}: adapter_model.safetensors holds no LoRA weights")
    reader = _Reader(config, model, max_lora_rank)
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"} or pair["lora_A"].dim() != 2 or pair["lora_B"].dim() != 2:
            raise AdapterError(f"{module}: needs a 2-D lora_A and lora_B")
        path = module
        while path.endswith(".base_layer"):
            path = path.removesuffix(".base_layer")
        if _MODULE.match(path):
            reader.add_module(path, pair["lora_A"], pair["lora_B"])
        elif _FUSED_EXPERTS.match(path):
            reader.add_fused_experts(path, pair["lora_A"], pair["lora_B"])
        else:
            raise AdapterError(f"target module {path!r}: the model has no such module (glmserve serves LoRA on "
                               "q/k/v/o_proj, gate/up/down_proj of the MLPs and shared experts, and the routed "
                               "experts)")
    return reader.weights()
