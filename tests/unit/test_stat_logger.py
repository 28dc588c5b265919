"""The periodic engine log line: interval figures, speculative decoding's acceptance since the last line."""

import logging

from glmserve.engine.scheduler import SchedulerStats, SpecDecodingStats
from glmserve.engine.stat_logger import StatLogger


def stats(spec: SpecDecodingStats | None) -> SchedulerStats:
    return SchedulerStats(3, 1, 0.25, 100, 40, spec)


def test_line_without_speculation():
    line = StatLogger().line(stats(None), 123.4)
    assert line == ("generation throughput: 123.4 tokens/s, running: 3, waiting: 1, KV cache usage: 25.0%, "
                    "prefix cache hit rate: 40.0%")


def test_acceptance_is_measured_over_the_interval():
    logger = StatLogger()
    first = SpecDecodingStats()
    for accepted in (3, 1, 0, 2):
        first.record(3, accepted)
    assert first.mean_acceptance_length == 2.5
    assert "mean acceptance length 2.50, accepted 6/12 draft tokens, per-position acceptance [0.75, 0.50, 0.25]" \
        in logger.line(stats(first.snapshot()), 10.0)
    second = first.snapshot()
    second.record(3, 3)  # one more verification since the last line: all accepted
    assert "mean acceptance length 4.00, accepted 3/3 draft tokens, per-position acceptance [1.00, 1.00, 1.00]" \
        in logger.line(stats(second), 10.0)


def test_record_logs_once_per_interval(caplog):
    logger = StatLogger(interval_s=0.0)
    with caplog.at_level(logging.INFO, logger="glmserve.engine"):
        logger.record(stats(None), 0)  # nothing generated: no line
        logger.record(stats(None), 5)
    assert len(caplog.records) == 1 and "generation throughput" in caplog.records[0].getMessage()
