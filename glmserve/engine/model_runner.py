"""ModelRunner: owns the model, its KV caches and the sampler; turns a SchedulerOutput into a StepOutput."""

from __future__ import annotations

import logging
import os

import torch

from glmserve.config import (
    ConfigError,
    EngineConfig,
    ModelConfig,
    check_speculative_decoding,
)
from glmserve.distributed import init_parallel
from glmserve.engine.kv_planning import (
    KVCacheSpec,
    kv_bytes_per_token,
    num_blocks_for_budget,
)
from glmserve.engine.lora_manager import LoRAManager
from glmserve.engine.mtp_proposer import MTPProposer
from glmserve.engine.pipeline import PipelineStage
from glmserve.engine.rejection_sampler import RejectionSampler
from glmserve.engine.sampler import Sampler, SamplingBatch, argmax_rows, plain_argmax
from glmserve.engine.token_bitmask import apply_token_bitmask
from glmserve.layers.attention import (
    AttentionMetadata,
    PagedKVCache,
    get_attention_backend,
    kv_storage_dtype,
)
from glmserve.layers.quantization import QuantMethod, get_quant_method
from glmserve.loader import fill_dummy_weights, keep_freed_heap_for_steps, load_model, release_freed_heap
from glmserve.loader.fp8 import Fp8Scheme
from glmserve.model import get_model_class
from glmserve.types import ScheduledChunk, SchedulerOutput, StepOutput

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


class ModelRunner:
    def __init__(self, model_config: ModelConfig, engine_config: EngineConfig, progress: bool = True,
                 rank: int | None = None, store=None):
        """rank, store: this process's place in the tensor x pipeline-parallel world and the store its ranks meet
        at (engine/tensor_parallel.py); None with several ranks: the world torchrun describes in the environment."""
        self.model_config = model_config
        self.config = engine_config
        self.device = resolve_device(engine_config.device)
        self.parallel = init_parallel(engine_config.tensor_parallel_size, self.device, rank, store,
                                      engine_config.enable_expert_parallel, engine_config.pipeline_parallel_size)
        if self.device.type == "cuda" and self.parallel.world_size > 1:  # one GPU per rank, numbered on its node
            local_rank = os.environ.get("LOCAL_RANK", self.parallel.rank % engine_config.ranks_per_node)  # torchrun's
            self.device = torch.device("cuda", int(local_rank))
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(engine_config.dtype, model_config, self.device)
        self.block_size = engine_config.block_size
        self.attn_backend = get_attention_backend(engine_config.attention_backend)

        self.quant_method = self._quant_method()
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = get_model_class(model_config)(model_config, self.parallel, self.quant_method)
        finally:
            torch.set_default_dtype(default_dtype)
        self._keep_router_in_fp32()
        if engine_config.load_format == "dummy":
            fill_dummy_weights(self.model, engine_config.seed)
        else:
            load_model(self.model, engine_config.model, model_config.num_hidden_layers,
                       model_config.num_nextn_predict_layers, progress=progress,
                       quantization=model_config.quantization)
        self.model.eval()
        for module in self.model.modules():  # each weight once in its compute form (prepacked, fp16-packed, ...)
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
        release_freed_heap()
        keep_freed_heap_for_steps()
        self.proposer = self._make_proposer()
        self.lora = None if not engine_config.enable_lora else LoRAManager(
            self.model, model_config, engine_config.max_loras, engine_config.max_lora_rank,
            engine_config.max_cpu_loras or engine_config.max_loras, self.dtype, self.device)
        self.num_blocks = self._allocate_kv_cache()
        self.pipeline = (PipelineStage(self.model, self.parallel, model_config.hidden_size, self.dtype, self.device,
                                       self.block_size, self.attn_backend, engine_config.step_timeout,
                                       engine_config.pp_max_micro_batch_size)
                         if self.parallel.pp_size > 1 else None)
        self.sampler = Sampler()
        self.rejection_sampler = RejectionSampler(self.sampler)

    def _quant_method(self) -> QuantMethod:
        """--quantization's method. Without it an FP8 checkpoint is held as it is stored on CPU with fp32 compute:
        its fp8 weights in fp8, the embeddings and heads its release left in bf16 as float (elsewhere all is
        dequantized to the compute dtype); other checkpoints are float (fp16-stored with --weight-dtype float16)."""
        cpu_fp32 = self.device.type == "cpu" and self.dtype == torch.float32
        checkpoint = self.model_config.quantization
        name, as_stored = self.config.quantization, False
        if name is None and checkpoint is not None and cpu_fp32 and self.config.weight_dtype != "float16":
            name, as_stored = "fp8", True
        if name is not None and not cpu_fp32:
            raise ConfigError("--quantization holds weights for fp32 compute on CPU")
        if self.config.weight_dtype == "float16" and (not cpu_fp32 or
                                                      "fbgemm" not in torch.backends.quantized.supported_engines):
            raise ConfigError("--weight-dtype float16 stores weights for fp32 compute on a CPU with fbgemm; "
                              "elsewhere choose the compute dtype with --dtype")
        group = Fp8Scheme.from_config(checkpoint).group_size if checkpoint is not None else None
        return get_quant_method(name, self.config.weight_dtype == "float16", group, float_vocab=as_stored)

    def _keep_router_in_fp32(self) -> None:
        """The router and its correction bias are fp32 in every dtype (transformers keeps them so too)."""
        for name, module in self.model.named_modules():
            if name.endswith("mlp.gate"):
                module.float()

    def _make_proposer(self) -> MTPProposer | None:
        k = self.config.num_speculative_tokens
        check_speculative_decoding(self.model_config, k)
        if not k or not self.parallel.is_last_stage:  # the MTP layer lives on the last pipeline stage
            return None
        return MTPProposer(self.model.mtp_layer, k, self.block_size, self.model_config.max_position_embeddings,
                           self.device)

    def _allocate_kv_cache(self) -> int:
        layers = self.model.attention_layers
        if self.proposer is not None:
            layers = layers + [self.proposer.mtp.self_attn]
        kv_heads, head_dim = layers[0].num_kv_heads, layers[0].head_dim
        storage = kv_storage_dtype(self.config.kv_cache_dtype, self.dtype)
        bytes_per_token = kv_bytes_per_token(len(layers), kv_heads, head_dim, storage.itemsize)
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            num_blocks = num_blocks_for_budget(int(free * self.config.gpu_memory_utilization), self.block_size,
                                               bytes_per_token)
        else:
            num_blocks = num_blocks_for_budget(int(self.config.kv_cache_memory_gb * 2**30), self.block_size,
                                               bytes_per_token)
        num_blocks = self.parallel.smallest(num_blocks, self.device)  # every rank must hold the same blocks
        if num_blocks < 1:
            raise ConfigError("the KV cache budget is too small for a single block")
        quantized = storage.itemsize == 1  # scales apply to an FP8 cache only, as in vLLM
        for layer in layers:
            scales = (layer.k_scale, layer.v_scale) if quantized else (1.0, 1.0)
            layer.kv_cache = PagedKVCache.allocate(num_blocks, self.block_size, kv_heads, head_dim, storage,
                                                   self.device, *scales,
                                                   calculate_scales=quantized and self.config.calculate_kv_scales)
        self.kv_spec = KVCacheSpec(str(storage).removeprefix("torch."), self.block_size, num_blocks, bytes_per_token)
        logger.info(self.kv_spec.describe())
        return num_blocks

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> StepOutput:
        chunks = scheduler_output.chunks
        input_ids: list[int] = []
        positions: list[int] = []
        last_known: list[int] = []  # flat index of each chunk's last known token; its drafts follow it
        for chunk in chunks:
            tokens = chunk.token_ids + chunk.draft_token_ids
            input_ids.extend(tokens)
            positions.extend(range(chunk.start_pos, chunk.start_pos + len(tokens)))
            last_known.append(len(input_ids) - 1 - len(chunk.draft_token_ids))
        block_tables = [c.request.block_ids for c in chunks]
        meta = AttentionMetadata.build([c.start_pos for c in chunks], [c.num_tokens for c in chunks],
                                       block_tables, self.block_size, self.device, self.attn_backend)
        if self.lora is not None:
            meta.lora = self.lora.prepare(chunks)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        if self.pipeline is None:
            hidden = self.model(ids, pos, meta)
        else:
            hidden = self.pipeline.forward(chunks, ids, pos)
            if hidden is None:  # an earlier stage: the last one samples, and its first rank tells rank 0
                return self._step_from_last_stage() if self.parallel.rank == 0 else None

        sampling = [i for i, c in enumerate(chunks) if c.sample]
        mask = scheduler_output.grammar_bitmask
        if any(c.draft_token_ids for c in chunks):
            sampled, logprobs = self._verify(chunks, sampling, last_known, hidden, mask)
        else:
            sampled, logprobs = self._sample(chunks, sampling, last_known, hidden, mask)
        drafts = None
        if self.proposer is not None:
            drafts = self._propose(chunks, sampled, last_known, hidden, pos, meta)
        step = StepOutput(sampled_token_ids=sampled, logprobs=logprobs, draft_token_ids=drafts)
        if self.pipeline is not None and self.parallel.tp_rank == 0:
            self.parallel.send_object(step, 0)
        return step

    def _step_from_last_stage(self) -> StepOutput:
        last_stage_first_rank = (self.parallel.pp_size - 1) * self.parallel.tp_size
        return self.parallel.recv_object(last_stage_first_rank, self.config.step_timeout)

    def _sample(self, chunks: list[ScheduledChunk], sampling: list[int], last_known: list[int],
                hidden: torch.Tensor, mask) -> tuple[list[list[int]], list | None]:
        sampled: list[list[int]] = [[] for _ in chunks]
        logprobs: list | None = None
        if not sampling:
            return sampled, logprobs
        rows = [last_known[i] for i in sampling]
        if rows != list(range(hidden.shape[0])):  # (a decode-only step samples every row, in order)
            hidden = hidden.index_select(0, torch.tensor(rows, device=self.device))
        logits = self.model.compute_logits(hidden)
        requests = [chunks[i].request for i in sampling]
        if mask is None and plain_argmax(requests):
            for i, token in zip(sampling, argmax_rows(logits).tolist()):
                sampled[i] = [token]
            return sampled, logprobs
        _apply_grammar_bitmask(logits, mask)
        batch = SamplingBatch.build(requests, logits.shape[-1], self.device)
        out = self.sampler(logits, batch)
        for i, token in zip(sampling, out.token_ids.tolist()):
            sampled[i] = [token]
        if out.logprobs is not None:
            logprobs = [None] * len(chunks)
            for i, lp in zip(sampling, out.logprobs):
                logprobs[i] = None if lp is None else [lp]
        return sampled, logprobs

    def _verify(self, chunks: list[ScheduledChunk], sampling: list[int], last_known: list[int],
                hidden: torch.Tensor, mask) -> tuple[list[list[int]], list | None]:
        """Score each sampling chunk's last known token and its drafts, and keep what the rejection sampler
        accepts plus one more token."""
        requests, prefixes, draft_ids, rows, row_index = [], [], [], [], []
        width = 1 + max(len(chunks[i].draft_token_ids) for i in sampling)
        for i in sampling:
            drafts = chunks[i].draft_token_ids
            row_index.append([len(rows) + j if j <= len(drafts) else -1 for j in range(width)])
            for j in range(len(drafts) + 1):
                requests.append(chunks[i].request)
                prefixes.append(drafts[:j])
                draft_ids.append(drafts[j] if j < len(drafts) else -1)
                rows.append(last_known[i] + j)
        logits = self.model.compute_logits(hidden.index_select(0, torch.tensor(rows, device=self.device)))
        _apply_grammar_bitmask(logits, mask)
        batch = SamplingBatch.build(requests, logits.shape[-1], self.device, draft_prefixes=prefixes)
        out = self.rejection_sampler(logits, batch, torch.tensor(draft_ids, device=self.device),
                                     torch.tensor(row_index, device=self.device))
        token_ids = out.token_ids.tolist()
        sampled: list[list[int]] = [[] for _ in chunks]
        logprobs = None if out.logprobs is None else [None] * len(chunks)
        for i, first, n in zip(sampling, (r[0] for r in row_index), out.num_emitted.tolist()):
            sampled[i] = token_ids[first : first + n]
            if logprobs is not None and out.logprobs[first] is not None:
                logprobs[i] = out.logprobs[first : first + n]
        return sampled, logprobs

    def _propose(self, chunks: list[ScheduledChunk], sampled: list[list[int]], last_known: list[int],
                 hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> list[list[int]]:
        """Run the MTP layer over the target's rows (each with the token after it) and draft for every chunk
        that emitted tokens; rows past a chunk's accepted drafts get a placeholder token."""
        next_token_ids: list[int] = []
        last_rows, last_positions, tables = [], [], []
        for chunk, new, last in zip(chunks, sampled, last_known):
            if chunk.sample:  # the kept run ends with the token emitted this step
                unverified = len(chunk.draft_token_ids) + 1 - len(new)
                next_token_ids += chunk.token_ids[1:] + new + [new[-1]] * unverified
                last_rows.append(last + len(new) - 1)
                last_positions.append(chunk.start_pos + len(chunk.token_ids) + len(new) - 2)
                tables.append(chunk.request.block_ids)
            else:  # a prefill chunk: the token after its last one is the next prompt token
                end = chunk.start_pos + len(chunk.token_ids)
                next_token_ids += chunk.request.token_ids[chunk.start_pos + 1 : end + 1]
        drafts = iter(self.proposer.propose(positions, next_token_ids, hidden, meta, last_rows, last_positions,
                                            tables))
        return [next(drafts) if chunk.sample else [] for chunk in chunks]

    def release(self, request_id: str) -> None:
        """Forget per-request state (seeded generators) of a finished request."""
        self.sampler.remove(request_id)


def _apply_grammar_bitmask(logits: torch.Tensor, mask) -> None:
    """Mask the logits rows of requests held to a grammar with the step's bitmask (engine/grammar.py fills it on
    rank 0, in the row order of `_sample` and `_verify`)."""
    if mask is not None:
        apply_token_bitmask(logits, *mask)
