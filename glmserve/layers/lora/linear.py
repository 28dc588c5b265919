"""The LoRA weights of one linear layer for every adapter slot, and the per-row delta x A^T B^T.

A layer that stacks several projections (q/k/v, gate/up) gets each projection's A rows and B block side by side
(B block-diagonal), so one pair of matmuls computes every projection's delta. The adapter's scale is already
folded into B. Slot s holds A rows s*W .. s*W + w of `a` and the same columns of `b` (W: the slot width, w: the
adapter's), zeros past w.

Two ways to a step's deltas (LoRABatch.masked picks one): a few rows (decodes) multiply every slot's A at once and
keep each row's own slot's columns (bgmv-like: three ops whatever the adapters); more rows take one matmul pair
per slot over that slot's rows (sgmv-like), so prefills pay no work for other slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmserve.layers.lora.batch import LoRABatch, add_rows


class LinearLoRASlots:
    def __init__(self, num_slots: int, width: int, in_features: int, out_features: int, dtype: torch.dtype,
                 device: torch.device):
        """width: the most A rows one adapter may use here (max rank x stacked projections)."""
        self.in_features, self.out_features, self.max_width = in_features, out_features, width
        self.a = torch.zeros(num_slots * width, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(out_features, num_slots * width, dtype=dtype, device=device)
        self.widths = [0] * num_slots  # A rows the slot's adapter uses; 0: it does not target this layer

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """a: [w, in], b: [out, w] (scale folded in), or None to leave the layer without LoRA in this slot."""
        start = slot * self.max_width
        self.a[start : start + self.max_width].zero_()
        self.b[:, start : start + self.max_width].zero_()
        self.widths[slot] = 0 if a is None else a.shape[0]
        if a is not None:
            if a.shape[0] > self.max_width or a.shape[1] != self.in_features or b.shape != (self.out_features,
                                                                                             a.shape[0]):
                raise ValueError(f"LoRA shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit a slot of width "
                                 f"{self.max_width} for [{self.out_features}, {self.in_features}]")
            self.a[start : start + a.shape[0]].copy_(a)
            self.b[:, start : start + a.shape[0]].copy_(b)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
        """out += each row's delta with its slot's adapter; rows of the base model and of adapters that do not
        target this layer are left as they are."""
        if not any(self.widths[slot] for slot, _ in batch.groups):
            return out
        if batch.masked:
            own_slot = batch.slot_mask(self.max_width, len(self.widths), self.a.dtype)
            return out.addmm_(F.linear(x, self.a) * own_slot, self.b.t())
        for slot, rows in batch.groups:
            width = self.widths[slot]
            if width:
                start = slot * self.max_width
                delta = F.linear(F.linear(x[rows], self.a[start : start + width]), self.b[:, start : start + width])
                add_rows(out, rows, delta)
        return out
