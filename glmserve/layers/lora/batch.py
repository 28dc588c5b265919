"""Which adapter slot each row of a step uses, grouped once per step for every LoRA layer to read.

As punica's sgmv does, rows are taken in segments per adapter: the runner lays a step's rows out request by
request, so an adapter's rows are usually one contiguous run (a slice, no copy); otherwise an index tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

BASE = -1  # the slot of rows that run the base model
# Steps of at most this many rows compute every slot's LoRA for every row and mask (LinearLoRASlots.add_to).
MASKED_MAX_ROWS = 32


@dataclass(slots=True)
class LoRABatch:
    row_slots: torch.Tensor  # [T] long: the slot of each row, BASE for the base model
    groups: list[tuple[int, slice | torch.Tensor]]  # (slot, its rows) for every slot with rows in the step
    masks: dict[tuple, torch.Tensor] = field(default_factory=dict)  # slot_mask's, per (width, slots, dtype)

    @property
    def masked(self) -> bool:
        return self.row_slots.shape[0] <= MASKED_MAX_ROWS

    def slot_mask(self, width: int, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
        """[T, num_slots * width]: 1 in the `width` columns of each row's own slot, 0 elsewhere (base rows: all 0).
        Made once per step for each slot width."""
        mask = self.masks.get((width, num_slots, dtype))
        if mask is None:
            columns = torch.arange(num_slots * width, device=self.row_slots.device) // width
            mask = (self.row_slots[:, None] == columns).to(dtype)
            self.masks[(width, num_slots, dtype)] = mask
        return mask

    @classmethod
    def build(cls, runs: list[tuple[int, int]], device: torch.device) -> LoRABatch | None:
        """runs: (slot, number of consecutive rows) in row order. None when every row runs the base model."""
        if all(slot == BASE for slot, _ in runs):
            return None
        ranges: dict[int, list[tuple[int, int]]] = {}
        start = 0
        for slot, count in runs:
            if slot != BASE and count:
                spans = ranges.setdefault(slot, [])
                if spans and spans[-1][1] == start:  # extends the slot's previous run
                    spans[-1] = (spans[-1][0], start + count)
                else:
                    spans.append((start, start + count))
            start += count
        groups: list[tuple[int, slice | torch.Tensor]] = []
        for slot, spans in ranges.items():
            if len(spans) == 1:
                groups.append((slot, slice(*spans[0])))
            else:
                groups.append((slot, torch.cat([torch.arange(a, b) for a, b in spans]).to(device)))
        row_slots = torch.tensor([slot for slot, count in runs for _ in range(count)], dtype=torch.long,
                                 device=device)
        return cls(row_slots, groups)


def add_rows(out: torch.Tensor, rows: slice | torch.Tensor, delta: torch.Tensor) -> None:
    """out[rows] += delta, for a slice or an index tensor of rows."""
    if isinstance(rows, slice):
        out[rows] += delta
    else:
        out.index_add_(0, rows, delta)
