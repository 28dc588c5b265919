"""ModelRunner: owns the model, its KV caches and the sampler; turns a SchedulerOutput into a StepOutput."""

from __future__ import annotations

import logging

import torch

from glmserve.config import ConfigError, EngineConfig, ModelConfig
from glmserve.distributed import init_parallel
from glmserve.engine.sampler import Sampler, SamplingBatch
from glmserve.layers.attention import AttentionMetadata
from glmserve.layers.linear import LinearBase
from glmserve.loader import load_model
from glmserve.model import get_model_class
from glmserve.types import SchedulerOutput, StepOutput

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    return device


def resolve_dtype(name: str, model_config: ModelConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":  # this class of CPU has no native bf16: fp32 compute is both exact and faster
        return torch.float32
    return _DTYPES.get(model_config.checkpoint_dtype, torch.bfloat16)


def _onednn_prepack_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, progress: bool = True):
        self.model_config = model_config
        self.config = engine_config
        self.device = resolve_device(engine_config.device)
        self.dtype = resolve_dtype(engine_config.dtype, model_config, self.device)
        self.parallel = init_parallel(engine_config.tensor_parallel_size, self.device)
        self.block_size = engine_config.block_size

        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = get_model_class(model_config)(model_config, self.parallel)
        finally:
            torch.set_default_dtype(default_dtype)
        self._keep_router_in_fp32()
        load_model(self.model, engine_config.model, model_config.num_hidden_layers,
                   model_config.num_nextn_predict_layers, progress=progress)
        self.model.eval()
        if self.device.type == "cpu" and self.dtype == torch.float32 and _onednn_prepack_available():
            for module in self.model.modules():
                if isinstance(module, LinearBase):
                    module.prepack_for_cpu()
        self.num_blocks = self._allocate_kv_cache()
        self.sampler = Sampler()

    def _keep_router_in_fp32(self) -> None:
        """The router and its correction bias are fp32 in every dtype (transformers keeps them so too)."""
        for name, module in self.model.named_modules():
            if name.endswith("mlp.gate"):
                module.float()

    def _allocate_kv_cache(self) -> int:
        layers = self.model.attention_layers
        kv_heads, head_dim = layers[0].num_kv_heads, layers[0].head_dim
        bytes_per_block = 2 * len(layers) * self.block_size * kv_heads * head_dim * self.dtype.itemsize
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            num_blocks = int(free * self.config.gpu_memory_utilization) // bytes_per_block
        else:
            num_blocks = int(self.config.kv_cache_memory_gb * 2**30) // bytes_per_block
        if num_blocks < 1:
            raise ConfigError("the KV cache budget is too small for a single block")
        for layer in layers:
            shape = (num_blocks * self.block_size, kv_heads, head_dim)
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.block_size,
                    num_blocks * bytes_per_block / 2**20)
        return num_blocks

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> StepOutput:
        chunks = scheduler_output.chunks
        input_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []  # flat index of the last token of each chunk that samples
        for chunk in chunks:
            n = len(chunk.token_ids)
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start_pos, chunk.start_pos + n))
            if chunk.sample:
                sample_rows.append(len(input_ids) - 1)
        meta = AttentionMetadata.build([c.start_pos for c in chunks], [len(c.token_ids) for c in chunks],
                                       [c.request.block_ids for c in chunks], self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, meta)

        sampled: list[list[int]] = [[] for _ in chunks]
        logprobs: list | None = None
        sampling = [i for i, c in enumerate(chunks) if c.sample]
        if sampling:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=self.device)])
            batch = SamplingBatch.build([chunks[i].request for i in sampling], logits.shape[-1], self.device)
            out = self.sampler(logits, batch)
            for i, token in zip(sampling, out.token_ids.tolist()):
                sampled[i] = [token]
            if out.logprobs is not None:
                logprobs = [None] * len(chunks)
                for i, lp in zip(sampling, out.logprobs):
                    logprobs[i] = None if lp is None else [lp]
        return StepOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def release(self, request_id: str) -> None:
        """Forget per-request state (seeded generators) of a finished request."""
        self.sampler.remove(request_id)
