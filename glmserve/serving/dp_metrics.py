"""/metrics for data parallelism: each replica's counts and state under an `engine` label (vLLM labels its
data-parallel engines' metrics the same way), and the router's decisions. The unlabelled glmserve:* engine metrics
stay the replicas' totals."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from glmserve.engine.data_parallel import DataParallelEngine


class DataParallelCollector(Collector):
    def __init__(self, engine: DataParallelEngine):
        self._engine = engine

    def collect(self):
        routed = CounterMetricFamily("glmserve:dp_requests", "Requests routed to each data-parallel replica.",
                                     labels=["engine"])
        steps = CounterMetricFamily("glmserve:dp_engine_steps", "Engine steps run, per replica.", labels=["engine"])
        running = GaugeMetricFamily("glmserve:dp_num_requests_running", "Requests in each replica's running batch.",
                                    labels=["engine"])
        waiting = GaugeMetricFamily("glmserve:dp_num_requests_waiting", "Requests waiting in each replica.",
                                    labels=["engine"])
        usage = GaugeMetricFamily("glmserve:dp_kv_cache_usage_perc", "Fraction of each replica's KV-cache blocks "
                                  "in use (0 to 1).", labels=["engine"])
        queries = CounterMetricFamily("glmserve:dp_prefix_cache_queries", "Prompt tokens looked up in each "
                                      "replica's prefix cache.", labels=["engine"])
        hits = CounterMetricFamily("glmserve:dp_prefix_cache_hits", "Prompt tokens found in each replica's prefix "
                                   "cache.", labels=["engine"])
        for index, replica in enumerate(self._engine.replica_stats()):
            label, s = [str(index)], replica.scheduler
            routed.add_metric(label, replica.routed)
            steps.add_metric(label, replica.num_steps)
            running.add_metric(label, s.num_running)
            waiting.add_metric(label, s.num_waiting)
            usage.add_metric(label, s.kv_cache_usage)
            queries.add_metric(label, s.prefix_cache_queries)
            hits.add_metric(label, s.prefix_cache_hits)
        yield from (routed, steps, running, waiting, usage, queries, hits)
        router = self._engine.router
        if router is not None:
            decisions = CounterMetricFamily("glmserve:dp_router_decisions", "Requests routed, by why their replica "
                                            "was chosen (affinity: the longest cached prefix; load: the least "
                                            "loaded; balance: loads out of balance).", labels=["reason"])
            for reason, count in router.decisions.items():
                decisions.add_metric([reason], count)
            yield decisions
