"""Frozen configs: the model's (parsed from a checkpoint's config.json) and the engine's (from flags).

Validation lives here, once; everything downstream trusts these objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("Glm4MoeForCausalLM",)


class ConfigError(ValueError):
    """A checkpoint or flag value that cannot work; the message says which and why."""


def _check_fp8(quantization: dict) -> None:
    """The quantization_configs whose checkpoints load (glmserve/loader/fp8.py; kept in fp8 on CPU): FP8 weights as
    compressed-tensors (GLM-4.5-FP8, GLM-4.5-Air-FP8) or DeepSeek-style block FP8 (quant_method "fp8")."""
    method = quantization.get("quant_method")
    if method == "fp8":
        return
    if method != "compressed-tensors":
        raise ConfigError(f"quantization_config: quant_method {method!r} is not supported (FP8 checkpoints: "
                          "'compressed-tensors' or 'fp8')")
    groups = list((quantization.get("config_groups") or {}).values())
    formats = {(g.get("weights") or {}).get(k) for g in groups for k in ("type", "num_bits")}
    strategies = {(g.get("weights") or {}).get("strategy") for g in groups}
    if not groups or formats != {"float", 8} or len(strategies) != 1:
        raise ConfigError("quantization_config: only compressed-tensors with 8-bit float weights, one strategy "
                          f"for every group, is supported (FP8); got config_groups {quantization.get('config_groups')}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: a model directory needs a config.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    partial_rotary_factor: float
    max_position_embeddings: int
    attention_bias: bool
    use_qk_norm: bool
    rms_norm_eps: float
    first_k_dense_replace: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    routed_scaling_factor: float
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    num_nextn_predict_layers: int
    tie_word_embeddings: bool
    checkpoint_dtype: str  # "bfloat16", "float32", ... as the checkpoint declares it
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    quantization: dict | None = field(default=None, hash=False, compare=False)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {arch!r}: glmserve serves {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        # transformers 5 nests RoPE settings in rope_parameters; 4.54 (the released checkpoints) keeps them top-level.
        rope = raw.get("rope_parameters") or {}
        if (rope.get("rope_type") or "default") != "default" or raw.get("rope_scaling"):
            raise ConfigError("rope scaling is not supported for Glm4Moe (the released configs have none)")
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        cfg = cls(
            architecture=arch,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))),
            max_position_embeddings=raw.get("max_position_embeddings", 131072),
            attention_bias=bool(raw.get("attention_bias", False)),
            use_qk_norm=bool(raw.get("use_qk_norm", False)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            first_k_dense_replace=raw.get("first_k_dense_replace", 1),
            moe_intermediate_size=raw["moe_intermediate_size"],
            n_routed_experts=raw["n_routed_experts"],
            num_experts_per_tok=raw["num_experts_per_tok"],
            n_shared_experts=raw.get("n_shared_experts", 1),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            n_group=raw.get("n_group", 1),
            topk_group=raw.get("topk_group", 1),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            num_nextn_predict_layers=raw.get("num_nextn_predict_layers", 0),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            checkpoint_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
            eos_token_ids=eos_ids,
            pad_token_id=raw.get("pad_token_id"),
            quantization=raw.get("quantization_config"),
        )
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.n_routed_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ConfigError("n_routed_experts must split into n_group groups and 1 <= topk_group <= n_group")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError("num_experts_per_tok exceeds n_routed_experts")
        if self.rotary_dim % 2:
            raise ConfigError("head_dim * partial_rotary_factor must be even")
        if self.quantization is not None:
            _check_fp8(self.quantization)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        return cls.from_dict(_read_json(Path(model_dir) / "config.json"))


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """generation_config.json: EOS ids and the checkpoint's default sampling values."""

    eos_token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "GenerationDefaults":
        path = Path(model_dir) / "generation_config.json"
        if not path.exists():
            return cls()
        raw = _read_json(path)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(eos_ids, raw.get("temperature"), raw.get("top_p"), raw.get("top_k"))


DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHT_DTYPES = ("auto", "float32", "float16")
LOAD_FORMATS = ("auto", "dummy")
# --quantization (vLLM's flag; aliases as other engines spell them) → (method, group size of inputs per scale;
# None: one scale per output channel). Weight-only: activations stay fp32. See glmserve/layers/quantization.
QUANTIZATION_METHODS = {
    "fp8": ("fp8", None),  # an FP8 checkpoint's own blocks or groups are kept
    "int8": ("int8", None),
    "experts_int8": ("int8", None),  # vLLM's int8 weight-only method (here every linear layer, not only experts)
    "w8a16": ("int8", None),
    "q8_0": ("int8", 32),  # llama.cpp's blocks of 32
    "int4": ("int4", 128),  # AWQ / GPTQ's usual group
    "w4a16": ("int4", 128),
    "q4_0": ("int4", 32),
}
MAX_SPECULATIVE_TOKENS = 16  # chained MTP drafts; acceptance decays fast, peers use 1-4
# vLLM's names for drafting with the checkpoint's own MTP layer.
MTP_METHODS = ("mtp", "deepseek_mtp", "glm4_moe_mtp")
# --kv-cache-dtype: vLLM's values and SGLang's spellings → the canonical name (fp8 is e4m3, as in vLLM).
KV_CACHE_DTYPES = {"auto": "auto", "bfloat16": "bfloat16", "bf16": "bfloat16", "fp8": "fp8_e4m3",
                   "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}


def num_speculative_tokens(speculative_config: dict | str | None) -> int:
    """vLLM's `speculative_config` (a dict or its JSON) → the number of MTP draft tokens per step (0: off)."""
    if speculative_config is None:
        return 0
    if isinstance(speculative_config, str):
        try:
            speculative_config = json.loads(speculative_config)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--speculative-config is not valid JSON: {e}") from None
    if not isinstance(speculative_config, dict):
        raise ConfigError("speculative_config must be a JSON object such as "
                          '{"method": "mtp", "num_speculative_tokens": 3}')
    unknown = set(speculative_config) - {"method", "num_speculative_tokens"}
    if unknown:
        raise ConfigError(f"speculative_config: unsupported keys {sorted(unknown)}")
    method = speculative_config.get("method", "mtp")
    if method not in MTP_METHODS:
        raise ConfigError(f"speculative_config: method {method!r} is not supported; glmserve drafts with the "
                          f"checkpoint's MTP layer (method \"mtp\")")
    k = speculative_config.get("num_speculative_tokens", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"speculative_config: num_speculative_tokens must be a positive integer, got {k!r}")
    return k


def check_speculative_decoding(model_config: ModelConfig, num_speculative_tokens: int) -> None:
    if num_speculative_tokens and model_config.num_nextn_predict_layers < 1:
        raise ConfigError("MTP speculative decoding needs the checkpoint's MTP layer, and this one has none "
                          "(num_nextn_predict_layers is 0)")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine flags, named as vLLM names them."""

    model: str
    dtype: str = "auto"  # auto: float32 on CPU (no native bf16 here), the checkpoint's dtype on CUDA
    weight_dtype: str = "auto"  # CPU, fp32 compute: float16 stores large linear weights and experts in fp16
    load_format: str = "auto"  # dummy: random weights from config.json alone (timing real shapes)
    quantization: str | None = None  # weights held quantized (CPU, fp32 compute); None: an FP8 checkpoint's own
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory_gb: float = 1.0  # KV pool budget on CPU
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # overrides the memory budget (tests)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int = 0
    enable_prefix_caching: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False  # routed experts split whole across the tensor-parallel ranks
    num_speculative_tokens: int = 0  # MTP drafts per step (vLLM's speculative_config num_speculative_tokens)
    step_timeout: float = 30.0  # tensor parallel: seconds a collective may wait for the other ranks while serving
    pipeline_parallel_size: int = 1  # layers split across this many stages (ranks = tp x pp)
    pp_max_micro_batch_size: int | None = None  # requests per pipeline micro-batch; None: by tokens
    nnodes: int = 1  # the ranks spread evenly over this many nodes (SGLang's --nnodes)
    node_rank: int = 0  # this node's place (0: the API server and the scheduler)
    dist_init_addr: str | None = None  # HOST:PORT where the ranks meet (node 0 listens); None: a local port
    dist_timeout: float = 120.0  # seconds a node waits at the rendezvous for the others
    kv_cache_dtype: str = "auto"  # auto: the compute dtype; fp8 (e4m3), fp8_e5m2, bfloat16: one or two bytes
    calculate_kv_scales: bool = False  # FP8 KV: scales from the first step's keys and values (vLLM)
    attention_backend: str | None = None  # None: layers.attention's default
    # LoRA serving (vLLM's flags): adapters per step, their largest rank, how many are kept read in memory, and
    # the adapters loaded at start-up as (name, path) pairs.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras
    lora_modules: tuple[tuple[str, str], ...] = ()

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size // self.nnodes

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        object.__setattr__(self, "kv_cache_dtype", KV_CACHE_DTYPES[self.kv_cache_dtype])
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"--weight-dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.weight_dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"--load-format must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if self.weight_dtype == "float16" and (self.dtype not in ("auto", "float32") or self.device == "cuda"):
            raise ConfigError("--weight-dtype float16 is for fp32 compute on CPU; on CUDA choose --dtype")
        if self.quantization is not None:
            if self.quantization not in QUANTIZATION_METHODS:
                raise ConfigError(f"--quantization must be one of {', '.join(QUANTIZATION_METHODS)}, "
                                  f"got {self.quantization!r}")
            if self.dtype not in ("auto", "float32") or self.device == "cuda" or self.weight_dtype == "float16":
                raise ConfigError("--quantization holds weights for fp32 compute on CPU (not with --dtype other "
                                  "than float32, --device cuda or --weight-dtype float16)")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("--max-num-seqs and --max-num-batched-tokens must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError("--num-kv-blocks must be positive")
        if self.tensor_parallel_size < 1:
            raise ConfigError("--tensor-parallel-size must be positive")
        if self.pipeline_parallel_size < 1:
            raise ConfigError("--pipeline-parallel-size must be positive")
        if self.pp_max_micro_batch_size is not None and self.pp_max_micro_batch_size < 1:
            raise ConfigError("--pp-max-micro-batch-size must be positive")
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        if self.nnodes < 1 or world % self.nnodes:
            raise ConfigError(f"--nnodes {self.nnodes} must divide the {world} ranks (tensor-parallel size x "
                              f"pipeline-parallel size) evenly")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be in [0, {self.nnodes}) with --nnodes {self.nnodes}, "
                              f"got {self.node_rank}")
        if self.dist_init_addr is not None and not self.dist_init_addr.rpartition(":")[2].isdigit():
            raise ConfigError(f"--dist-init-addr must be HOST:PORT, got {self.dist_init_addr!r}")
        if self.nnodes > 1 and self.dist_init_addr is None:
            raise ConfigError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address, the same on every "
                              "node)")
        if not self.dist_timeout > 0:
            raise ConfigError(f"--dist-timeout must be positive, got {self.dist_timeout}")
        if not self.step_timeout > 0:
            raise ConfigError(f"--step-timeout must be positive, got {self.step_timeout}")
        self._check_lora()
        if not 0 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"the number of speculative tokens must be in [0, {MAX_SPECULATIVE_TOKENS}], "
                              f"got {self.num_speculative_tokens}")

    def _check_lora(self) -> None:
        if self.max_loras < 1 or self.max_lora_rank < 1 or (self.max_cpu_loras is not None and
                                                            self.max_cpu_loras < self.max_loras):
            raise ConfigError("--max-loras and --max-lora-rank must be positive, --max-cpu-loras at least "
                              "--max-loras")
        if self.lora_modules and not self.enable_lora:
            raise ConfigError("--lora-modules needs --enable-lora")
        if self.enable_lora and self.tensor_parallel_size > 1:
            raise ConfigError("LoRA serving runs with one rank: --enable-lora is not supported with "
                              "--tensor-parallel-size > 1")
        names = [name for name, _ in self.lora_modules]
        if len(set(names)) != len(names):
            raise ConfigError(f"--lora-modules names an adapter twice: {names}")
