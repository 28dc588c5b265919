"""LoRA on the routed experts: each expert's gate/up (w13) and down (w2) projections get per-slot A and B, and the
deltas are added inside each expert's SwiGLU, so the rows of an adapter that targets experts are computed here.

(token, choice) pairs are grouped by (expert, slot) and each group runs one SwiGLU with its adapter's deltas: the
plain grouped path, on float expert weights (quantized experts are refused when an adapter targets them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmserve.layers.lora.batch import BASE, LoRABatch


class ExpertLoRASlots:
    def __init__(self, num_slots: int, num_experts: int, hidden: int, intermediate: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_slots, self.num_experts, self.max_rank = num_slots, num_experts, max_rank
        w = 2 * max_rank  # gate and up side by side (or PEFT's fused gate_up, up to twice the rank)
        self.a13 = torch.zeros(num_slots, num_experts, w, hidden, dtype=dtype, device=device)
        self.b13 = torch.zeros(num_slots, num_experts, 2 * intermediate, w, dtype=dtype, device=device)
        self.a2 = torch.zeros(num_slots, num_experts, max_rank, intermediate, dtype=dtype, device=device)
        self.b2 = torch.zeros(num_slots, num_experts, hidden, max_rank, dtype=dtype, device=device)
        self.active = [False] * num_slots  # whether the slot's adapter targets these experts

    def set_slot(self, slot: int, w13: dict[int, tuple[torch.Tensor, torch.Tensor]],
                 w2: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """w13, w2: expert → (A [r, in], B [out, r]) with the scale folded into B; experts left out get none."""
        for t in (self.a13, self.b13, self.a2, self.b2):
            t[slot].zero_()
        for (a_all, b_all), parts in ((self.a13, self.b13), w13), ((self.a2, self.b2), w2):
            for expert, (a, b) in parts.items():
                if a.shape[0] > a_all.shape[2] or b.shape != (b_all.shape[2], a.shape[0]) or \
                        a.shape[1] != a_all.shape[3]:
                    raise ValueError(f"expert LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit the slots")
                a_all[slot, expert, : a.shape[0]].copy_(a)
                b_all[slot, expert, :, : a.shape[0]].copy_(b)
        self.active[slot] = bool(w13 or w2)

    def targets(self, batch: LoRABatch) -> bool:
        return any(self.active[slot] for slot, _ in batch.groups)


def experts_with_lora(experts, slots: ExpertLoRASlots, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                      batch: LoRABatch) -> torch.Tensor:
    """The routed experts' output [T, H] (a FusedExperts holding float w13/w2) with each row's adapter deltas."""
    num_tokens, top_k = ids.shape
    groups = slots.num_slots + 1  # slot index + 1: 0 is the base model
    slot_of_choice = batch.row_slots.repeat_interleave(top_k)
    active = torch.tensor([False] + slots.active, device=x.device)
    slot_of_choice = torch.where(active[slot_of_choice + 1], slot_of_choice, BASE)
    keys = ids.flatten() * groups + slot_of_choice + 1
    choices = keys.argsort(stable=True)
    counts = torch.bincount(keys, minlength=experts.num_experts * groups).tolist()
    grouped_x = x.index_select(0, choices // top_k)
    grouped_out = torch.empty_like(grouped_x)
    start = 0
    for key, count in enumerate(counts):
        if not count:
            continue
        expert, slot = divmod(key, groups)
        slot -= 1
        end = start + count
        rows = grouped_x[start:end]
        h = F.linear(rows, experts.w13[expert])
        if slot != BASE:
            h += F.linear(F.linear(rows, slots.a13[slot, expert]), slots.b13[slot, expert])
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) * up
        out = F.linear(act, experts.w2[expert])
        if slot != BASE:
            out += F.linear(F.linear(act, slots.a2[slot, expert]), slots.b2[slot, expert])
        grouped_out[start:end] = out
        start = end
    return experts._combine(grouped_out, choices, weights)
