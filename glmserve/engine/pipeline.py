"""Pipeline parallelism inside one step: the step's batch is cut into micro-batches that flow through the stages.

Every rank received the step's SchedulerOutput, so each stage knows every micro-batch's rows and builds its own
attention metadata. Stage s runs its layers over micro-batch 0, starts sending the hidden states to stage s + 1
(whose counterpart rank, same tensor-parallel rank, receives them) and goes on with micro-batch 1 while stage s + 1
works on micro-batch 0: with m micro-batches and p stages a step takes m + p - 1 micro-batch times instead of m * p.
The last stage joins the micro-batches' hidden states back into the step's rows, in order, and samples (and drafts)
over the whole batch exactly as one process does. The scheduler still waits for each step's tokens, so two steps are
never in flight at once (SGLang's pipeline keeps several batches in flight; not built here).

Each micro-batch reads the stage's weights again, so splitting pays only when a step is compute-bound (prefill):
a step is split into pp_size micro-batches when each gets at least MIN_MICRO_BATCH_TOKENS tokens, and decode
batches go through whole (BENCHMARKS.md has the measurement); --pp-max-micro-batch-size sets the split instead.
"""

from __future__ import annotations

from datetime import timedelta

import torch

from glmserve.distributed import ParallelContext
from glmserve.layers.attention import AttentionMetadata
from glmserve.types import ScheduledChunk

MIN_MICRO_BATCH_TOKENS = 128


def split_micro_batches(tokens: list[int], count: int) -> list[range]:
    """Contiguous runs of chunks (given each chunk's token count), at most `count`, each about an equal share of
    the tokens; a chunk is never cut."""
    total = sum(tokens)
    runs, start, done = [], 0, 0
    for i, n in enumerate(tokens):
        done += n
        if done * count >= total * (len(runs) + 1) or i == len(tokens) - 1:
            runs.append(range(start, i + 1))
            start = i + 1
    return runs


class PipelineStage:
    """This rank's stage of the model: forward over a step's micro-batches, hidden states in and out by p2p."""

    def __init__(self, model: torch.nn.Module, parallel: ParallelContext, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, block_size: int, attn_backend, timeout: float,
                 max_micro_batch_size: int | None = None):
        self.model = model
        self.parallel = parallel
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device
        self.block_size = block_size
        self.attn_backend = attn_backend
        self.timeout = timeout  # how long to wait for the previous stage's hidden states (a hung stage)
        self.max_micro_batch_size = max_micro_batch_size  # requests; None: by the step's tokens

    def forward(self, chunks: list[ScheduledChunk], input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor | None:
        """The last decoder layer's hidden states for all the step's rows on the last stage; None on the others."""
        parallel = self.parallel
        sizes = [c.num_tokens for c in chunks]
        outputs, sending = [], []
        row = 0
        if self.max_micro_batch_size:
            count = -(-len(chunks) // self.max_micro_batch_size)
        else:  # pp_size: enough to keep every stage busy once the pipe is full, when it pays (see above)
            count = parallel.pp_size if sum(sizes) >= MIN_MICRO_BATCH_TOKENS * parallel.pp_size else 1
        for run in split_micro_batches(sizes, count):
            rows = slice(row, row + sum(sizes[i] for i in run))
            row = rows.stop
            part = [chunks[i] for i in run]
            meta = AttentionMetadata.build([c.start_pos for c in part], [c.num_tokens for c in part],
                                           [c.request.block_ids for c in part], self.block_size, self.device,
                                           self.attn_backend)
            if parallel.is_first_stage:
                inputs = input_ids[rows]
            else:
                inputs = torch.empty(rows.stop - rows.start, self.hidden_size, dtype=self.dtype, device=self.device)
                parallel.recv(inputs, parallel.stage_rank(parallel.pp_rank - 1), self.timeout)
            hidden = self.model(inputs, positions[rows], meta)
            if parallel.is_last_stage:
                outputs.append(hidden)
            else:  # kept referenced until sent
                sending.append((hidden, parallel.send(hidden, parallel.stage_rank(parallel.pp_rank + 1))))
        for _, work in sending:
            work.wait(timedelta(seconds=self.timeout))
        return torch.cat(outputs) if outputs else None
