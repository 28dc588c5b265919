"""The periodic engine log line (vLLM's LoggingStatLogger): throughput, queue, KV cache and, with speculative
decoding, acceptance over the interval since the last line."""

from __future__ import annotations

import logging
import time

from glmserve.engine.scheduler import SchedulerStats, SpecDecodingStats

logger = logging.getLogger("glmserve.engine")


class StatLogger:
    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self._since = time.monotonic()
        self._tokens = 0
        self._last_spec = SpecDecodingStats()

    def record(self, stats: SchedulerStats, num_generated_tokens: int) -> None:
        """Called after each step; logs when the interval has passed and something was generated."""
        self._tokens += num_generated_tokens
        elapsed = time.monotonic() - self._since
        if elapsed < self.interval_s:
            return
        if self._tokens:
            logger.info(self.line(stats, self._tokens / elapsed))
        self._since, self._tokens = time.monotonic(), 0

    def line(self, stats: SchedulerStats, tokens_per_s: float) -> str:
        hit_rate = stats.prefix_cache_hits / stats.prefix_cache_queries if stats.prefix_cache_queries else 0.0
        text = (f"generation throughput: {tokens_per_s:.1f} tokens/s, running: {stats.num_running}, waiting: "
                f"{stats.num_waiting}, KV cache usage: {stats.kv_cache_usage:.1%}, prefix cache hit rate: "
                f"{hit_rate:.1%}")
        spec = stats.spec_decoding
        if spec is not None:
            last = self._last_spec
            drafts = spec.num_drafts - last.num_drafts
            draft_tokens = spec.num_draft_tokens - last.num_draft_tokens
            accepted = spec.num_accepted_tokens - last.num_accepted_tokens
            per_position = [n - (last.accepted_per_position[j] if j < len(last.accepted_per_position) else 0)
                            for j, n in enumerate(spec.accepted_per_position)]
            rates = ", ".join(f"{n / drafts:.2f}" for n in per_position) if drafts else "-"
            text += (f"; speculative decoding: mean acceptance length {1 + accepted / drafts if drafts else 0:.2f}, "
                     f"accepted {accepted}/{draft_tokens} draft tokens, per-position acceptance [{rates}]")
            self._last_spec = spec
        return text
