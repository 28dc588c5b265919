"""Mixture-of-experts: the GLM-4.5 router (DeepSeek-V3 noaux_tc) and the routed experts.

Tokens are grouped by expert and each active expert runs one matmul pair over its tokens: the cost follows
active experts, never a Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from glmserve import kernels
from glmserve.distributed import ParallelContext
from glmserve.layers.linear import take_shard
from glmserve.layers.quantization import QuantMethod, UnquantizedMethod

ExpertFn = Callable[[nn.Module, torch.Tensor, int], torch.Tensor]


class TopkRouter(nn.Module):
    """Sigmoid scores in fp32; the correction bias only chooses experts, the unbiased scores weight them
    (on fp32 rows two native calls: kernels.router_logits and kernels.router_topk)."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, n_group: int, topk_group: int,
                 norm_topk_prob: bool, routed_scaling_factor: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=torch.float32), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                    requires_grad=False)
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] → (weights [T, k] fp32, expert ids [T, k])."""
        x = x.float()
        native = kernels.fused_ops_native(x, self.weight)
        logits = kernels.router_logits(x, self.weight) if native else F.linear(x, self.weight)
        return kernels.router_topk(logits, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                                   self.norm_topk_prob, self.routed_scaling_factor)


class FusedExperts(nn.Module):
    """The routed experts this rank holds, stacked: w13 [E, 2*I, H] (gate then up), w2 [E, H, I].

    Tensor parallel: every expert, each rank with a slice of its intermediate dimension. Expert parallel: whole
    experts, a contiguous share of them per rank (expert_ids); choices of other ranks' experts are skipped here.
    Either way each rank's output is partial and the all-reduce sums it.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, parallel: ParallelContext,
                 quant_method: QuantMethod | None = None):
        super().__init__()
        self.parallel = parallel
        self.num_experts = num_experts  # in the model; this rank holds expert_ids
        if parallel.expert_parallel and parallel.tp_size > 1:
            local = parallel.shard(num_experts, "n_routed_experts (expert parallel)")
            self.expert_ids = range(parallel.tp_rank * local, (parallel.tp_rank + 1) * local)
            self.intermediate, self.intermediate_shards = intermediate, 1
        else:
            self.expert_ids = range(num_experts)
            self.intermediate = parallel.shard(intermediate, "moe_intermediate_size")
            self.intermediate_shards = parallel.tp_size
        self.hidden = hidden
        self.quant_method = quant_method or UnquantizedMethod()
        self.quant_method.create_experts(self, len(self.expert_ids), hidden, self.intermediate)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_experts(self)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: tuple[int, str]) -> None:
        """shard_id = (expert, "gate" | "up" | "down"), the expert numbered in the model; other ranks' experts
        are skipped."""
        expert, which = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is beyond n_routed_experts ({self.num_experts})")
        if expert not in self.expert_ids:
            return
        expert -= self.expert_ids.start
        size, shards = self.intermediate, self.intermediate_shards
        rank = self.parallel.tp_rank % shards
        if which == "down":
            name, row, shape = "w2", 0, (self.hidden, size)
            source = take_shard(loaded, 1, rank, size, size * shards)
        else:
            name, row, shape = "w13", 0 if which == "gate" else size, (size, self.hidden)
            source = take_shard(loaded, 0, rank, size, size * shards)
        if tuple(source.shape) != shape:
            raise ValueError(f"shape mismatch: expected {shape}, checkpoint has {tuple(loaded.shape)}")
        self.quant_method.load_rows(self, name, expert, row, source)

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Expert ids [T, k] numbered on this rank, for the native kernels: -1 (skipped) for another rank's."""
        first, held = self.expert_ids.start, len(self.expert_ids)
        if held == self.num_experts:
            return ids
        local = ids - first
        return torch.where((local >= 0) & (local < held), local, -1)

    # On CPU, up to this many (token, expert) choices run one by one: each costs ~5 small ops, where sorting
    # rows by expert costs ~11 ops plus ~7 per active expert (measured: 2.2x faster at 2 choices, even at 8).
    MAX_CHOICES_ONE_BY_ONE = 8

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; weights, ids: [T, k] -> [T, H], summed over the ranks."""
        return self.parallel.all_reduce(self.quant_method.apply_experts(self, x, weights, ids))

    def grouped_forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, expert_fn: ExpertFn,
                        allow_grouped_mm: bool) -> torch.Tensor:
        """This rank's part, with `expert_fn(self, rows, expert)` for one expert's SwiGLU (float weights). Rows are
        sorted by expert, each expert multiplies its run of rows, then each token's rows are summed with its
        routing weights (small decodes on CPU skip the sorting)."""
        top_k = ids.shape[1]
        if x.device.type == "cpu" and ids.numel() <= self.MAX_CHOICES_ONE_BY_ONE:
            return self._one_by_one(x, weights, ids, expert_fn)
        choices, counts = self._sort_choices(ids.flatten())
        if allow_grouped_mm and self._prefer_grouped_mm(x, counts, choices.numel()):
            grouped_x = x.index_select(0, choices // top_k)  # (index_select: ~5x faster than x[...] on CPU)
            return self._combine(self._grouped_mm(grouped_x, counts), choices, weights)
        if x.device.type == "cpu":
            return self._add_expert_by_expert(x, weights, choices, counts.tolist(), expert_fn)
        grouped_out = self._expert_loop(x.index_select(0, choices // top_k), counts.tolist(), expert_fn)
        return self._combine(grouped_out, choices, weights)

    def _sort_choices(self, flat_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (token, k) choices this rank computes, as flat indices sorted by expert, and how many rows each
        of its experts gets."""
        held = len(self.expert_ids)
        if held == self.num_experts:
            return flat_ids.argsort(stable=True), torch.bincount(flat_ids, minlength=held)
        first = self.expert_ids.start  # expert parallel: only the choices of this rank's experts
        mine = ((flat_ids >= first) & (flat_ids < first + held)).nonzero().squeeze(1)
        local_ids = flat_ids.index_select(0, mine) - first
        return mine.index_select(0, local_ids.argsort(stable=True)), torch.bincount(local_ids, minlength=held)

    @staticmethod
    def _combine(grouped_out: torch.Tensor, choices: torch.Tensor, weights: torch.Tensor,
                 add_in_place: bool | None = None) -> torch.Tensor:
        """Sum each token's expert rows with its routing weights [T, k]: row i of grouped_out is flat choice
        choices[i] (token choices[i] // k); choices a rank does not compute add nothing.

        add_in_place (the default on CPU): each row is scaled in place and added into its token's row. Copying
        the rows back to (token, k) order, multiplying and summing over k took 7x as long on CPU for a prefill
        chunk (2048 tokens x 4 choices x 512: 36 against 4.9 ms, micro-benchmark, 1 thread). CUDA's index_add_
        adds with atomics in no fixed order, so there the rows go back to (token, k) order and one batched
        [1, k] x [k, H] product per token sums them."""
        num_tokens, top_k = weights.shape
        weights = weights.to(grouped_out.dtype)
        hidden = grouped_out.shape[1]
        if add_in_place if add_in_place is not None else grouped_out.device.type == "cpu":
            grouped_out.mul_(weights.view(-1).index_select(0, choices).unsqueeze(1))
            return grouped_out.new_zeros(num_tokens, hidden).index_add_(0, choices // top_k, grouped_out)
        per_choice = grouped_out.new_zeros(num_tokens * top_k, hidden).index_copy_(0, choices, grouped_out)
        return torch.bmm(weights.unsqueeze(1), per_choice.view(num_tokens, top_k, hidden)).squeeze(1)

    def _prefer_grouped_mm(self, x: torch.Tensor, counts: torch.Tensor, num_choices: int) -> bool:
        """torch's grouped GEMM runs on CPU in any float dtype, on CUDA with bf16 on Hopper or newer. On CPU it
        visits every expert, empty ones too (~20 us each), while the Python loop costs ~100 us of dispatch per
        active expert: the loop wins only when fewer than a quarter of the experts are active (small decodes)."""
        if not hasattr(F, "grouped_mm"):
            return False
        held = len(self.expert_ids)
        if x.device.type == "cpu":  # at most num_choices experts are active: small decodes need not count them
            return 4 * num_choices >= held and 4 * int((counts > 0).sum()) >= held
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9

    def _grouped_mm(self, grouped_x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All active experts in two grouped GEMMs: each expert's weights are read once per step."""
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        gate, up = F.grouped_mm(grouped_x, self.w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), offs=offsets)

    def _one_by_one(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    expert_fn: ExpertFn) -> torch.Tensor:
        """Small decodes: each token's row through each of its experts, no sorting or regrouping."""
        outs = []
        for row, experts in zip(x.split(1), ids.tolist()):
            for expert in experts:  # (expert parallel: another rank's expert adds nothing here)
                outs.append(expert_fn(self, row, expert - self.expert_ids.start) if expert in self.expert_ids
                            else row.new_zeros(row.shape))
        return (torch.cat(outs).view(*ids.shape, -1) * weights.to(x.dtype)[..., None]).sum(1)

    def _add_expert_by_expert(self, x: torch.Tensor, weights: torch.Tensor, choices: torch.Tensor,
                              counts: list[int], expert_fn: ExpertFn) -> torch.Tensor:
        """_combine(_expert_loop(...)) on CPU without the grouped rows: each expert's rows are scaled by their
        routing weights and added into their tokens' rows as soon as they are computed. A token's rows are added in
        the same order (choices are sorted by expert), so the sums are the same, bit for bit; what goes is the
        grouped buffer the experts' outputs were copied into and read back from. expert_fn's rows are fresh tensors
        (every QuantMethod.expert returns a product's output), so they are scaled in place."""
        top_k = weights.shape[1]
        flat_weights = weights.to(x.dtype).view(-1)
        out = x.new_zeros(x.shape)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            mine = choices[start : start + count]
            start += count
            tokens = mine // top_k
            rows = expert_fn(self, x.index_select(0, tokens), expert)
            out.index_add_(0, tokens, rows.mul_(flat_weights.index_select(0, mine).unsqueeze(1)))
        return out

    def _expert_loop(self, grouped_x: torch.Tensor, counts: list[int], expert_fn: ExpertFn) -> torch.Tensor:
        """The plain reference: one matmul pair per active expert."""
        grouped_out = torch.empty_like(grouped_x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            grouped_out[start:end] = expert_fn(self, grouped_x[start:end], expert)
            start = end
        return grouped_out
