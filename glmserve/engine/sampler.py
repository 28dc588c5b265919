"""Batched token sampling with vLLM v1 semantics.

One row per request whose next token is sampled this step. The order follows vLLM v1: raw logprobs from the
unprocessed logits, then min_tokens masking and penalties (these change greedy choices too), then for random rows
temperature, min-p, top-k, top-p and an exponential-race draw. Per-request Python only builds the batch tensors
and draws seeded rows from their own generators.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glmserve import kernels
from glmserve.types import Request, TokenLogprobs

_NEG_INF = float("-inf")


def _column(values: list, neutral, dtype: torch.dtype, device) -> Tensor | None:
    """A [B] tensor, or None when every row holds the neutral value (so the step skips that operation)."""
    if all(v == neutral for v in values):
        return None
    return torch.tensor(values, dtype=dtype, device=device)


def _long(values: list, device) -> Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _padded(rows: list[list[int]], pad: int, device) -> Tensor:
    width = max(map(len, rows), default=0)
    return _long([r + [pad] * (width - len(r)) for r in rows], device)


# torch's CPU argmax along a row is not vectorised: 580 us for [16, 32000] here and 2.8 ms for GLM-4.5's
# [16, 151552], where amax takes tens of us. With a large vocabulary the row's first block holding the maximum is
# found by amax, then the index within that block.
_ARGMAX_BLOCK = 256


def argmax_rows(x: Tensor) -> Tensor:
    """x.argmax(dim=-1) of a [B, V] tensor, the same index (the first maximum), faster on CPU for large V: one
    native call on fp32 rows, else the blocked search below."""
    if kernels.fused_ops_native(x):
        return kernels.argmax(x)
    batch, vocab = x.shape
    if x.device.type != "cpu" or vocab % _ARGMAX_BLOCK or vocab < 16 * _ARGMAX_BLOCK:
        return x.argmax(dim=-1)
    blocks = x.reshape(batch, -1, _ARGMAX_BLOCK)
    best = blocks.amax(dim=-1).argmax(dim=-1)
    within = blocks.gather(1, best.view(batch, 1, 1).expand(batch, 1, _ARGMAX_BLOCK)).view(batch, -1)
    return best * _ARGMAX_BLOCK + within.argmax(dim=-1)


def plain_argmax(requests: list[Request]) -> bool:
    """Whether every row's next token is the argmax of its raw logits: greedy, no penalties, no logprobs asked, past
    min_tokens. A decode step of such rows needs no SamplingBatch (building one took longer than the argmax)."""
    for r in requests:
        p = r.sampling_params
        if not (p.greedy and p.logprobs is None and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0
                and p.repetition_penalty == 1.0 and r.num_output_tokens >= p.min_tokens):
            return False
    return True


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling parameters as tensors. A None field means no row uses that operation."""

    request_ids: list[str]
    seeds: list[int | None]  # None for unseeded and greedy rows (greedy never draws)
    temperature: Tensor | None  # [B] fp32, 1.0 on greedy rows; None: all rows greedy
    greedy_rows: Tensor | None  # [B] bool; None: no row greedy
    top_k: Tensor | None  # [B] int64, 0 = off
    max_top_k: int  # largest top_k in the batch, so a top-k-only batch needs topk(max_top_k), not a full sort
    top_p: Tensor | None  # [B] fp32
    min_p: Tensor | None  # [B] fp32
    presence_penalty: Tensor | None  # [B] fp32
    frequency_penalty: Tensor | None  # [B] fp32
    repetition_penalty: Tensor | None  # [B] fp32
    prompt_token_ids: Tensor | None  # [B, Lp] int64 padded with vocab_size; set when repetition_penalty is
    output_token_ids: Tensor | None  # [B, Lo] int64 padded with vocab_size; set when any penalty is
    min_tokens_mask: tuple[Tensor, Tensor] | None  # (rows, token ids) to set to -inf
    num_logprobs: list[int | None]
    max_num_logprobs: int | None

    @classmethod
    def build(cls, requests: list[Request], vocab_size: int, device,
              draft_prefixes: list[list[int]] | None = None) -> SamplingBatch:
        """One row per request; with `draft_prefixes`, row i samples the token after requests[i]'s output
        extended by draft_prefixes[i] (speculative verification), so penalties and min_tokens see those drafts."""
        prefixes = draft_prefixes or [[] for _ in requests]
        params = [r.sampling_params for r in requests]
        greedy = [p.greedy for p in params]
        f32 = torch.float32
        # Greedy rows get neutral random-sampling values so an all-greedy batch builds none of those tensors.
        temperature = None if all(greedy) else [1.0 if g else p.temperature for g, p in zip(greedy, params)]
        top_k = [0 if g else min(p.top_k, vocab_size) for g, p in zip(greedy, params)]
        presence = _column([p.presence_penalty for p in params], 0.0, f32, device)
        frequency = _column([p.frequency_penalty for p in params], 0.0, f32, device)
        repetition = _column([p.repetition_penalty for p in params], 1.0, f32, device)
        any_penalty = presence is not None or frequency is not None or repetition is not None
        # Padding with vocab_size lands in a column that _bin_counts drops.
        prompt_ids = output_ids = None
        if repetition is not None:
            prompt_ids = _padded([r.prompt_token_ids for r in requests], vocab_size, device)
        if any_penalty:
            output_ids = _padded([r.output_token_ids + d for r, d in zip(requests, prefixes)], vocab_size, device)

        rows, ids = [], []
        for i, (r, p, d) in enumerate(zip(requests, params, prefixes)):
            if r.num_output_tokens + len(d) < p.min_tokens:
                stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(r.eos_token_ids))
                stop_ids = sorted(t for t in stop_ids if t < vocab_size)
                rows += [i] * len(stop_ids)
                ids += stop_ids

        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            request_ids=[r.request_id for r in requests],
            seeds=[None if g else p.seed for g, p in zip(greedy, params)],
            temperature=None if temperature is None else torch.tensor(temperature, dtype=f32, device=device),
            greedy_rows=torch.tensor(greedy, device=device) if any(greedy) else None,
            top_k=_column(top_k, 0, torch.int64, device),
            max_top_k=max(top_k),
            top_p=_column([1.0 if g else p.top_p for g, p in zip(greedy, params)], 1.0, f32, device),
            min_p=_column([0.0 if g else p.min_p for g, p in zip(greedy, params)], 0.0, f32, device),
            presence_penalty=presence,
            frequency_penalty=frequency,
            repetition_penalty=repetition,
            prompt_token_ids=prompt_ids,
            output_token_ids=output_ids,
            min_tokens_mask=(_long(rows, device), _long(ids, device)) if rows else None,
            num_logprobs=[p.logprobs for p in params],
            max_num_logprobs=max(asked) if asked else None,
        )

    @property
    def edits_logits(self) -> bool:
        """Whether anything changes the logits before the greedy argmax."""
        return self.min_tokens_mask is not None or self.output_token_ids is not None


@dataclass(slots=True)
class SamplerOutput:
    token_ids: Tensor  # [B] int64
    logprobs: list[TokenLogprobs | None] | None  # None unless some row asked; None on rows that did not


def _bin_counts(token_ids: Tensor, vocab_size: int) -> Tensor:
    """[B, vocab_size] occurrence counts; the padding id vocab_size lands in an extra column that is dropped."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.int64, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids))
    return counts[:, :vocab_size]


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition (prompt or output tokens), then frequency and presence (output tokens only), in place."""
    if batch.output_token_ids is None:
        return logits
    vocab_size = logits.shape[1]
    counts = _bin_counts(batch.output_token_ids, vocab_size)
    if batch.repetition_penalty is not None:
        seen = (counts > 0) | (_bin_counts(batch.prompt_token_ids, vocab_size) > 0)
        p = batch.repetition_penalty.unsqueeze(1)
        # Dividing positive and multiplying negative logits both make a seen token less likely (for p > 1).
        logits.copy_(torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits))
    if batch.frequency_penalty is not None:
        logits -= batch.frequency_penalty.unsqueeze(1) * counts
    if batch.presence_penalty is not None:
        logits -= batch.presence_penalty.unsqueeze(1) * (counts > 0)
    return logits


def apply_sampling_masks(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """min-p, then top-k, then top-p on temperature-scaled logits; dropped tokens become -inf, in place."""
    if batch.min_p is not None:
        probs = logits.softmax(dim=-1)
        logits.masked_fill_(probs < probs.amax(dim=-1, keepdim=True) * batch.min_p.unsqueeze(1), _NEG_INF)
    k, p = batch.top_k, batch.top_p
    if p is None:
        if k is not None:
            # k-th largest value per row; rows with top-k off get -inf so nothing is dropped. Ties with it stay.
            kth = logits.topk(batch.max_top_k, dim=-1).values.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))
            logits.masked_fill_(logits < kth.masked_fill_((k == 0).unsqueeze(1), _NEG_INF), _NEG_INF)
        return logits
    sorted_logits, order = logits.sort(dim=-1)  # ascending
    if k is not None:
        kth = sorted_logits.gather(1, (logits.shape[1] - k.clamp(min=1)).unsqueeze(1))
        sorted_logits.masked_fill_((sorted_logits < kth) & (k > 0).unsqueeze(1), _NEG_INF)
    # Drop the low tail whose total mass is at most 1 - top_p; what is left has mass >= top_p.
    tail_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = tail_mass <= (1 - p).unsqueeze(1)
    drop[:, -1] = False  # the top token always stays
    sorted_logits.masked_fill_(drop, _NEG_INF)
    return logits.scatter_(1, order, sorted_logits)


def gather_logprobs(raw_logprobs: Tensor, token_ids: Tensor, batch: SamplingBatch) -> list[TokenLogprobs | None]:
    sampled = raw_logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (raw_logprobs > sampled).sum(dim=-1) + 1
    top = raw_logprobs.topk(min(batch.max_num_logprobs, raw_logprobs.shape[1]), dim=-1)
    # One device-to-host copy per tensor; the per-row Python below only assembles the results.
    tokens, logprobs, ranks = token_ids.tolist(), sampled.squeeze(1).tolist(), ranks.tolist()
    top_ids, top_values = top.indices.tolist(), top.values.tolist()
    return [
        None if n is None else TokenLogprobs(t, lp, r, list(zip(ids[:n], values[:n])))
        for n, t, lp, r, ids, values in zip(batch.num_logprobs, tokens, logprobs, ranks, top_ids, top_values)
    ]


class Sampler:
    """Samples one token per row. Seeded requests own a generator that lives across steps until `remove`."""

    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def remove(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        # vLLM's default logprobs mode: from the raw logits, before penalties and masks.
        raw_logprobs = logits.float().log_softmax(dim=-1) if batch.max_num_logprobs is not None else None
        if batch.temperature is None and not batch.edits_logits:
            token_ids = argmax_rows(logits)  # all greedy, nothing to edit: argmax on any dtype is exact
        else:
            edited = self.edited(logits, batch)
            greedy = None if batch.greedy_rows is None else argmax_rows(edited)
            if batch.temperature is None:
                token_ids = greedy
            else:
                probs = self.probs(edited, batch)
                sampled = argmax_rows(probs.div_(self.draw(probs, batch)[0]))
                token_ids = sampled if greedy is None else torch.where(batch.greedy_rows, greedy, sampled)
        logprobs = None if raw_logprobs is None else gather_logprobs(raw_logprobs, token_ids, batch)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    @staticmethod
    def edited(logits: Tensor, batch: SamplingBatch) -> Tensor:
        """An fp32 copy (the caller's logits stay untouched) with min_tokens masking and penalties applied:
        these change greedy choices too."""
        logits = logits.to(torch.float32, copy=True)
        if batch.min_tokens_mask is not None:
            logits[batch.min_tokens_mask] = _NEG_INF
        return apply_penalties(logits, batch)

    @staticmethod
    def probs(edited: Tensor, batch: SamplingBatch) -> Tensor:
        """The random rows' distribution: temperature, then min-p, top-k, top-p. Overwrites `edited`."""
        edited.div_(batch.temperature.unsqueeze(1))
        return apply_sampling_masks(edited, batch).softmax(dim=-1)

    def draw(self, probs: Tensor, batch: SamplingBatch,
             uniform_rows: list[bool] | None = None) -> tuple[Tensor, Tensor | None]:
        """Exponential noise for the race, argmax(p / q) with q ~ Exp(1), which picks token i with probability
        p_i with no CDF search; and, for the rows in `uniform_rows`, one U[0, 1) draw after the row's noise.

        Seeded rows draw from their request's own generator, in row order, so their draws do not depend on the
        rest of the batch (several rows of one request draw one after another from the same stream)."""
        q = torch.empty_like(probs)
        u = None if uniform_rows is None else torch.empty(probs.shape[0], device=probs.device)
        if any(s is None for s in batch.seeds):
            q.exponential_()
            if u is not None:
                u.uniform_()
        for i, seed in enumerate(batch.seeds):
            if seed is not None:
                generator = self._generator(batch.request_ids[i], seed, probs.device)
                q[i].exponential_(generator=generator)
                if u is not None and uniform_rows[i]:
                    u[i : i + 1].uniform_(generator=generator)
        return q, u

    def _generator(self, request_id: str, seed: int, device: torch.device) -> torch.Generator:
        g = self._generators.get(request_id)
        if g is None:
            g = self._generators[request_id] = torch.Generator(device=device)
            g.manual_seed(seed)
        return g
